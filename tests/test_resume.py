import json
import os

import pytest
import torch

import dpo_baseline
import dvpo
import grpo_baseline
import gvm
import ppo_baseline
import remax_baseline
from helpers import files_digest, one_line_error, tiny_dvpo_argv, training_records
from infra import checkpoint


@pytest.mark.parametrize(
    "script", ["dvpo", "ppo", "dvpo-gpt2", "dvpo-lora", "ppo-lora", "dvpo-shared", "ppo-shared", "grpo", "remax"]
)
def test_a_resumed_run_matches_an_uninterrupted_one(tiny_world, tiny_gvm, families, tmp_path, script, request):
    """Also restored: the adaptive KL coefficient, fp16 loss scales (ppo: two), and, for a GPT-2 policy, a
    reference whose added pad token must get the same row in every process. -shared: the GVM, or the reward model
    and the critic, are adapters on the policy's base; every adapter comes back (the critic's trained one too)."""
    value_model = str(request.getfixturevalue("tiny_lora_gvm") if script == "dvpo-shared" else tiny_gvm)
    if script == "dvpo-gpt2":
        backbone, tok = gvm.load_backbone(str(families / "gpt2"))
        gvm.save_value_model(gvm.ValueModel(backbone), tok, str(tmp_path / "gvm-gpt2"), {"kind": "gvm"})
        value_model = str(tmp_path / "gvm-gpt2")

    def run(out, *extra):
        argv = tiny_dvpo_argv(
            tiny_world,
            value_model,
            out,
            "--eval-every",
            "2",
            "--save-every",
            "2",
            "--adaptive-kl",
            "--target-kl",
            "0.5",
            "--kl-horizon",
            "20",
            *extra,
        )
        argv += ["--lora-r", "4", "--lr", "3e-3"] if script.endswith(("lora", "shared")) else []
        if script != "dvpo" and not script.startswith("dvpo-"):
            argv[argv.index("--gvm") : argv.index("--gvm") + 2] = ["--rm", str(rm)]
        if script.startswith("ppo"):
            ppo_baseline.main(argv + ["--dtype", "fp16"])
        elif script == "grpo":
            grpo_baseline.main(argv + ["--group-size", "2"])
        elif script == "remax":
            remax_baseline.main(argv)
        else:
            dvpo.main(argv + (["--policy", str(families / "gpt2")] if script == "dvpo-gpt2" else []))

    rm = request.getfixturevalue("tiny_lora_rm") if script == "ppo-shared" else tmp_path / "rm"
    if not script.startswith("dvpo") and script != "ppo-shared":
        model, tok, _ = gvm.load_value_model(str(tiny_gvm))
        gvm.save_value_model(model, tok, str(rm), {"kind": "reward-model"})
    run(tmp_path / "full", "--steps", "4")
    run(tmp_path / "half", "--steps", "2")
    assert (tmp_path / "half" / checkpoint.STATE_FILE).exists()
    run(tmp_path / "half", "--steps", "4", "--resume")
    full, resumed = (
        training_records(tmp_path / "full" / "metrics.jsonl"),
        training_records(tmp_path / "half" / "metrics.jsonl"),
    )
    assert len(full) == 7 and resumed == full  # evals at 0, 2, 4 and four steps, every number equal
    betas = [m["objective/kl_coef"] for m in full if "objective/kl_coef" in m]
    assert len(set(betas)) == 4  # the controller moved beta at every step


def test_a_resumed_dpo_run_matches_an_uninterrupted_one(tiny_world, tmp_path):
    pairs = tmp_path / "pairs.jsonl"  # 24 pairs: 3 steps of 8 per epoch
    pairs.write_text("".join((tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines(keepends=True)[:24]))

    def run(out, epochs, *extra):
        dpo_baseline.main(
            [
                "--policy",
                str(tiny_world / "sft"),
                "--data",
                str(pairs),
                "--eval-data",
                str(pairs),
                "--eval-prompts",
                str(tiny_world / "data" / "prompts_eval.jsonl"),
                "--eval-n",
                "8",
                "--max-new-tokens",
                "16",
                "--batch-size",
                "8",
                "--eval-every",
                "2",
                "--save-every",
                "2",
                "--lr",
                "3e-3",
                "--epochs",
                str(epochs),
                "--out",
                str(out),
                *extra,
            ]
        )

    run(tmp_path / "full", 2)
    run(tmp_path / "half", 1)
    assert (tmp_path / "half" / checkpoint.STATE_FILE).exists()
    run(tmp_path / "half", 2, "--resume")
    full, resumed = (training_records(tmp_path / d / "metrics.jsonl") for d in ("full", "half"))
    steps = [m for m in full if "loss/dpo" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6] and [m for m in resumed if "loss/dpo" in m] == steps
    assert steps[-1]["rewards/margin"] != steps[0]["rewards/margin"]  # the policy moved
    evals = {m["step"]: m for m in full if "eval/kl" in m}
    assert sorted(evals) == [0, 2, 4, 6] and evals[6] == [m for m in resumed if "eval/kl" in m][-1]
    with pytest.raises(SystemExit):  # a finished run cannot be resumed without more epochs
        run(tmp_path / "half", 2, "--resume")


def test_an_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with checkpoint.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("step 2")
        open(os.path.join(tmp, "summary.json"), "w").write("{}")  # as every output of these scripts holds
    real_rename, calls = os.rename, []

    def crash_between_renames(a, b):  # the old output is moved aside, then the process dies
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", crash_between_renames)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model"), "w").write("step 4")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()  # mid-swap: only the backup holds step 2
    checkpoint.restore_interrupted(str(out))
    assert (out / "model").read_text() == "step 2" and os.listdir(tmp_path) == ["run"]
    with checkpoint.atomic_dir(str(out)) as tmp:  # a save that completes replaces it and leaves no backup behind
        open(os.path.join(tmp, "model"), "w").write("step 4")
    assert (out / "model").read_text() == "step 4" and os.listdir(tmp_path) == ["run"]


def test_resume_without_a_checkpoint_is_a_one_line_error(tiny_world, tiny_gvm, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "nothing", "--resume"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--resume: " in err and "no resumable checkpoint" in err


def test_resume_restores_both_fp16_loss_scales(tiny_world, tiny_gvm, tmp_path):
    """PPO under --dtype fp16 has two GradScalers (policy, critic); their scales drop after overflows and must
    come back on --resume. The checkpoint is edited as if both had dropped."""
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "run", "--save-every", "1", "--dtype", "fp16")
    argv[argv.index("--gvm") : argv.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm")]
    ppo_baseline.main(argv + ["--steps", "1"])
    path = tmp_path / "run" / checkpoint.STATE_FILE
    st = torch.load(path, weights_only=False)
    assert st["scaler"]["scale"] == st["algo_state"]["scaler"]["scale"] == 65536.0
    st["scaler"]["scale"], st["algo_state"]["scaler"]["scale"] = 1024.0, 512.0
    torch.save(st, path)
    ppo_baseline.main(argv + ["--steps", "2", "--resume"])
    last = [m for m in training_records(tmp_path / "run" / "metrics.jsonl") if "policy/loss_scale" in m][-1]
    assert (last["step"], last["policy/loss_scale"], last["val/loss_scale"]) == (2, 1024.0, 512.0)


def test_resume_loads_its_state_onto_the_cpu_first(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    """A checkpoint written on a GPU must resume on a machine without one: torch.load maps it to the CPU."""
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "run", "--steps", "1", "--save-every", "1"))
    seen, real_load = [], torch.load

    def spy(*a, **k):
        seen.append(k.get("map_location"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "run", "--steps", "2", "--save-every", "1", "--resume"))
    assert seen == ["cpu"]


def test_resume_refuses_changed_training_flags_and_accepts_the_others(tiny_world, tiny_gvm, tmp_path, capsys):
    out = tmp_path / "run"
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1", "--save-every", "1"))
    before = files_digest(out)
    for extra, flag in (
        (["--batch-size", "4"], "--batch-size 8"),
        (["--lr", "0.1"], "--lr 0.0003"),
        (["--advantage", "static"], "--advantage delta"),
    ):
        with pytest.raises(SystemExit) as e:
            dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--resume", *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"was run with {flag}" in err, err
        assert files_digest(out) == before
    dvpo.main(
        tiny_dvpo_argv(
            tiny_world,
            tiny_gvm,
            out,
            "--steps",
            "2",
            "--resume",
            "--eval-every",
            "1",
            "--micro-batch-size",
            "2",
            "--forward-batch-size",
            "4",
        )
    )
    assert json.loads((out / "summary.json").read_text())["train/steps"] == 2


def test_resume_names_a_checkpoint_without_its_policy(tiny_world, tiny_gvm, tmp_path, capsys):
    out = tmp_path / "run"
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1", "--save-every", "1"))
    (out / "config.json").unlink()
    err = one_line_error(
        capsys,
        lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--save-every", "1", "--resume")),
    )
    assert f"--resume: {out} has no config.json" in err and "--policy" not in err


def test_a_periodic_checkpoint_holds_the_evaluation_of_its_step(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    """--save-every writes after that step's held-out evaluation, so the checkpoint's metrics.jsonl has it."""
    saved, save_run = [], checkpoint.save_run

    def spy(out, summary, policy, tok, records, state):
        saved.append([r["step"] for r in records if any(k.startswith("eval/") for k in r)])
        return save_run(out, summary, policy, tok, records, state)

    monkeypatch.setattr(checkpoint, "save_run", spy)
    dvpo.main(
        tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "run", "--steps", "5", "--eval-every", "2", "--save-every", "2")
    )
    assert saved == [[0, 2], [0, 2, 4], [0, 2, 4, 5]]  # checkpoints at 2 and 4, then the final one
