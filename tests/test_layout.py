"""The layout's promises, checked on the source: the method files share one skeleton (copied on purpose, as
CleanRL's are, and kept honest here rather than by a hidden shared loop), their shared flags mean the same,
rollout.py holds no process group, gvm.py (stage 1) imports no stage-2 module, and no attribute protocol is
left between the scripts and the infrastructure."""

import ast
import dataclasses
import inspect
import os
import re
import sys

import pytest

import dpo_baseline
import dvpo
import grpo_baseline
import gvm
import ppo_baseline
import remax_baseline
import rollout
from helpers import REPO
from infra import cli

METHODS = {"ppo_baseline": ppo_baseline, "grpo_baseline": grpo_baseline, "remax_baseline": remax_baseline}
# what a method may define differently from dvpo.py: its algorithm
ALGORITHM = {
    "ppo_baseline": {"Args", "ppo_epochs", "train"},
    "grpo_baseline": {"Args", "clipped_policy_loss", "ppo_epochs", "train"},
    "remax_baseline": {"Args", "train"},
}
STEPS = ["# 1. sample", "# 2. old and reference log-probs", "# 3.", "# 4.", "# 5.", "# 6. PPO epochs", "# 7. log"]
# flags the online methods declare each for itself and may set apart: the output folder, GRPO's beta (0.04, as
# DeepSeekMath), what GRPO's minibatch counts (prompts, their groups whole), ReMax's gamma (a return-to-go only)
DIFFERENT_FLAGS = {"out", "kl_coef", "minibatch_size", "gamma"}


def source(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def top_level(module):
    return {
        n.name: ast.get_source_segment(source(f"{module.__name__}.py"), n)
        for n in ast.parse(source(f"{module.__name__}.py")).body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }


@pytest.mark.parametrize("name", METHODS)
def test_each_method_file_is_dvpos_skeleton_with_its_own_algorithm(name):
    """A definition a method shares with dvpo.py by name is the same text, unless it is the method's algorithm;
    its train() takes the steps of docs/DVPO.md §3 in order."""
    mine, dvpos = top_level(METHODS[name]), top_level(dvpo)
    for shared in set(mine) & set(dvpos) - ALGORITHM[name]:
        assert mine[shared] == dvpos[shared], f"{name}.{shared} drifted from dvpo.{shared}"
    for module in (dvpo, METHODS[name]):
        text = inspect.getsource(module.train)
        where = [text.find(step) for step in STEPS]
        assert -1 not in where and where == sorted(where), (module.__name__, where)
        assert "checkpoint.resume_state" in text and "checkpoint.save_run" in text and "evaluate.held_out" in text
    assert re.search(r"ratio\.clamp\(1 - cliprange, 1 \+ cliprange\)", source("dvpo.py"))  # the clipped objective


def test_flags_shared_by_the_online_methods_mean_the_same():
    fields = {m.__name__: {f.name: f for f in dataclasses.fields(m.Args)} for m in (dvpo, *METHODS.values())}
    names = set.union(*(set(f) for f in fields.values()))
    for name in names - DIFFERENT_FLAGS:
        declared = [
            (f[name].default, f[name].metadata.get("help"), f[name].metadata.get("check"))
            for f in fields.values()
            if name in f
        ]
        assert len(set(declared)) == 1, (name, declared)
    own = {m: set(f) - set(f.name for f in dataclasses.fields(dvpo.RLFlags)) for m, f in fields.items()}
    assert {"gvm", "advantage", "lam", "cliprange", "ppo_epochs"} <= own["dvpo"]
    assert {"critic_lr", "vf_coef", "cliprange_value", "lam"} <= own["ppo_baseline"]
    assert "lam" not in own["grpo_baseline"] and "lam" not in own["remax_baseline"]  # they never read it


def test_the_scripts_own_flags_come_first_in_help(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(dvpo.Args, ["--help"])
    text = capsys.readouterr().out.split("options:")[1]
    assert text.index("--gvm") < text.index("--cliprange") < text.index("--policy") < text.index("--device")


def imports(path):
    tree = ast.parse(source(path))
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            out |= {f"{n.module}.{a.name}" for a in n.names} | {n.module}
    return out


def test_rollout_is_math_gvm_is_stage_one_and_infra_is_plumbing():
    assert not {i for i in imports("rollout.py") if "distributed" in i}, "rollout.py reaches a process group"
    assert "torch.distributed" not in source("rollout.py") and "all_reduce" not in inspect.getsource(rollout).replace(
        "distributed.all_reduce makes", ""
    )
    stage2 = {
        "dvpo",
        "ppo_baseline",
        "grpo_baseline",
        "remax_baseline",
        "dpo_baseline",
        "reward",
        "compare",
        "evaluate",
    }
    assert not imports("gvm.py") & stage2
    for f in os.listdir(os.path.join(REPO, "infra")):
        if f.endswith(".py"):
            assert not imports(f"infra/{f}") & (stage2 | {"gvm", "rollout"}), f  # plumbing stays below the math


@pytest.mark.parametrize(
    "path",
    [
        "dvpo.py",
        "ppo_baseline.py",
        "grpo_baseline.py",
        "remax_baseline.py",
        "dpo_baseline.py",
        "gvm.py",
        "reward.py",
        "evaluate.py",
    ],
)
def test_no_attribute_protocol_between_scripts_and_infrastructure(path):
    assert not re.search(r"\b(getattr|hasattr)\(", source(path)), path


def test_value_model_objectives_declare_their_interface():
    import reward

    for objective in (gvm.TDObjective(gvm.Args()), reward.BradleyTerry()):
        assert isinstance(objective, gvm.Objective) and objective.kind in ("gvm", "reward-model")
    with pytest.raises(TypeError):
        type("Incomplete", (gvm.Objective,), {"kind": "gvm", "pair_batches": True})()
    assert dpo_baseline.Args().policy == dvpo.Args().policy  # one flag block, one default


def test_every_script_quiets_ctrl_c_before_it_imports_a_library():
    """A script run by hand imports infra.sigint before torch or numpy (tests/test_faults.py sends the Ctrl-C)."""
    scripts = [p for p in os.listdir(REPO) if p.endswith(".py")] + ["experiments/gvm_sweep.py"]
    scripts += [f"infra/{p}" for p in os.listdir(os.path.join(REPO, "infra")) if p.endswith(".py")]
    for path in scripts:
        tree = ast.parse(source(path))
        if "__main__" not in source(path):  # a module, not a script
            continue
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in imports]
        stdlib = set(sys.stdlib_module_names)
        first_other = next((name for name in names if name.split(".")[0] not in stdlib), None)
        assert first_other in ("infra.sigint", None), path  # None: the standard library alone loads in no time
