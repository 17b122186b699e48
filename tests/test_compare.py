import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import compare
import reward
from helpers import ENV, REPO
from infra import lora, models

sys.path.insert(0, os.path.join(REPO, "experiments"))
import gvm_sweep  # noqa: E402


def test_compare_runs_every_method_and_reports_every_phase_and_ratio(tmp_path):
    out = tmp_path / "cmp.json"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "compare.py"),
            "--root",
            str(tmp_path / "bench"),
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--sft-steps",
            "60",
            "--n-train-prompts",
            "200",
            "--n-eval-prompts",
            "20",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--eval-n",
            "10",
            "--batch-size",
            "8",
            "--minibatch-size",
            "4",
            "--value-epochs",
            "1",
            "--dpo-epochs",
            "1",
            "--methods",
            ",".join(compare.METHODS),
            "--target-kl",
            "3",
            "--json",
            str(out),
            "--extra",
            "--micro-batch-size 2 --dtype bf16",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for method in compare.METHODS:
        mem, t = res[method]["memory"], res[method]["time"]
        phases = ("update",) if method == "dpo" else ("generate", "score", "update")
        assert all(mem[p] > 0 for p in (*phases, "overall")) and set(t) >= {*phases, "step", "run"}
        # the tally of real parameter, gradient and AdamW-state bytes matches 16 B per trained and 2 B per frozen
        # (bf16) parameter, plus AdamW's one-number step counters
        assert mem["states_measured"] == pytest.approx(mem["states_analytic"], rel=1e-3)
        run_args = json.loads((tmp_path / "bench" / f"{method}-s0" / "summary.json").read_text())["args"]
        assert (run_args["micro_batch_size"], run_args["dtype"]) == (2, "bf16")  # --extra reached every trainer
        if method != "dpo":
            assert (run_args["adaptive_kl"], run_args["target_kl"], run_args["kl_horizon"]) == (True, 3.0, 640)
        assert len(res[method]["quality"]) == 1
    d, p = res["dvpo"]["memory"], res["ppo"]["memory"]
    assert d["states_analytic"] / p["states_analytic"] == pytest.approx(0.56, abs=0.01)  # bf16 frozen: 20 / 36 B/param
    frozen = json.loads((tmp_path / "bench" / "ppo-frozen-s0" / "summary.json").read_text())
    dvpo_run = json.loads((tmp_path / "bench" / "dvpo-s0" / "summary.json").read_text())
    assert frozen["params/trained"] == dvpo_run["params/trained"]  # the frozen critic trains nothing
    assert "| update | " in proc.stdout and "gold within" in proc.stdout
    assert f"| model states, analytic | {d['states_analytic'] / 2**20:.1f} (0.56) |" in proc.stdout  # DVPO's column
    assert "reward model" in proc.stdout and {"gvm", "rm"} <= set(res["value_models"])


def test_gvm_sweep_correlations_by_hand():
    assert gvm_sweep.ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]  # ties share their mean rank
    # a and b are orthogonal to each other, to the constants and to z: with z's linear effect removed, x = z + a
    # and y = 2z + b are uncorrelated although r(x, y) is high; y = z + 3a keeps a perfect partial correlation
    z, a, b = np.array([1.0, 2, 3, 4]), np.array([1.0, -1, -1, 1]), np.array([1.0, -3, 3, -1])
    assert np.corrcoef(z + a, 2 * z + b)[0, 1] > 0.5
    assert gvm_sweep.partial(z + a, 2 * z + b, z) == pytest.approx(0.0, abs=1e-9)
    assert gvm_sweep.partial(z + a, z + 3 * a, z) == pytest.approx(1.0)
    runs = [
        {"gold": g, "kl": k, "gvm": {f"eval/{c}": m for c in gvm_sweep.CRITERIA}}
        for g, k, m in zip(2 * z + b, z, z + a)
    ]
    c = gvm_sweep.correlations(runs)["margin"]
    assert c["spearman"] == pytest.approx(np.corrcoef(gvm_sweep.ranks(z + a), gvm_sweep.ranks(2 * z + b))[0, 1])
    assert c["pearson"] == pytest.approx(np.corrcoef(z + a, 2 * z + b)[0, 1]) and c["partial_kl"] == pytest.approx(
        0.0, abs=1e-9
    )


def test_gvm_sweep_runs_each_variant_and_reuses_finished_runs(tiny_world, tmp_path):
    """The sweep on a tiny budget, in a folder whose default world is the tiny one: a GVM and a DVPO run per
    variant and seed, PPO beside them, the table and the correlations; run again, it reuses every finished run;
    a bad variant is one line."""
    cwd = tmp_path
    shutil.copytree(tiny_world, cwd / "ckpt")
    argv = [
        sys.executable,
        os.path.join(REPO, "experiments", "gvm_sweep.py"),
        "--root",
        "ckpt/sw",
        "--variants",
        "e3,e10-margin",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--eval-n",
        "10",
        "--gvm-extra",
        "--max-steps 12 --eval-every 4",
    ]
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((cwd / "ckpt" / "sw" / "sweep.json").read_text())
    assert [r["seed"] for r in res["variants"]["e10-margin"]] == [0] and len(res["ppo"]) == 1
    g = json.loads((cwd / "ckpt" / "sw" / "gvm-e10-margin-s0" / "summary.json").read_text())
    assert (g["args"]["epochs"], g["args"]["select"], g["args"]["max_steps"], g["args"]["seed"]) == (
        10,
        "margin",
        12,
        0,
    )
    d = json.loads((cwd / "ckpt" / "sw" / "dvpo-e3-s0" / "summary.json").read_text())
    assert d["args"]["gvm"] == "ckpt/sw/gvm-e3-s0" and d["args"]["adaptive_kl"] and d["args"]["kl_horizon"] == 640
    assert res["variants"]["e3"][0]["gold"] == d["eval/gold"]
    rm = json.loads((cwd / "ckpt" / "sw" / "rm" / "summary.json").read_text())["args"]
    assert (rm["epochs"], rm["lr"], rm["select"]) == (reward.RewardFlags.rm_epochs, reward.RewardFlags.rm_lr, "last")
    assert set(res["correlations"]) == set(gvm_sweep.CRITERIA) and "| e10-margin |" in proc.stdout
    again = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reusing") == 5 and "-> ckpt" not in again.stdout
    bad = subprocess.run([*argv[:2], "--variants", "e3,nope"], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--variants e3,nope" in bad.stderr


def test_the_analytic_memory_model_counts_a_configs_parameters(families, capsys):
    res = compare.analytic_memory(compare.Args(analytic=str(families / "qwen2"), batch_size=2))
    model, _ = models.load_pretrained(str(families / "qwen2"))
    n = sum(p.numel() for p in model.parameters())
    assert res["params"] == n and res["value_model_params"] == n + model.config.hidden_size + 1  # tied LM head
    out = capsys.readouterr().out
    assert "| 0.60 |" in out and "| 0.56 |" in out  # 24/40 and 20/36 bytes per parameter
    layer, layers = sum(p.numel() for p in model.model.layers[0].parameters()), len(model.model.layers)
    adapters = lora.add_lora(model, 8, 16.0, 0.0)
    assert res["adapters"] == sum(p.numel() for p in adapters.parameters() if p.requires_grad)  # LoRA r=8 rows
    gpus = compare.analytic_memory(compare.Args(analytic=str(families / "qwen2"), batch_size=2, gpus="1,4"))["gpus"]
    one = res["full, bf16 frozen"]
    for m, trained in (("dvpo", n), ("ppo", 2 * n + model.config.hidden_size + 1)):
        assert gpus[1][f"ddp {m}"] * 2**30 == pytest.approx(one[m] + one["activations"])  # one GPU: one GPU's table
        assert gpus[1][f"fsdp {m}"] == gpus[1][f"fsdp+frozen {m}"] == gpus[1][f"ddp {m}"]  # one process shards nothing
        # 4 GPUs: FSDP2 leaves 1/4 of the trained 16 bytes per parameter; --shard-frozen 1/4 of the frozen 2
        frozen = 2 * (2 * n + model.config.hidden_size + 1)
        gathered = 8 * (n - layers * layer + layer)  # fp32 weights and gradients of the root group and one layer
        assert (gpus[1][f"fsdp {m}"] - gpus[4][f"fsdp {m}"]) * 2**30 == pytest.approx(
            16 * trained * 3 / 4 - gathered + one["activations"] - (gpus[4][f"ddp {m}"] * 2**30 - one[m]), rel=1e-6
        )
        assert (gpus[4][f"fsdp {m}"] - gpus[4][f"fsdp+frozen {m}"]) * 2**30 == pytest.approx(frozen * 3 / 4, rel=1e-6)


def test_compare_runs_on_an_existing_world(tiny_world, tmp_path, capsys):
    """--world: a world built elsewhere (e.g. around a real model) is used as it is, its SFT and data untouched."""
    from helpers import files_digest, one_line_error

    before = files_digest(tiny_world)
    argv = ["--world", str(tiny_world), "--root", str(tmp_path / "bench"), "--methods", "dvpo,ppo", "--seeds", "0"]
    argv += ["--steps", "1", "--eval-n", "4", "--batch-size", "4", "--minibatch-size", "2", "--value-epochs", "1"]
    argv += ["--value-lr", "3e-4"]
    res = compare.main(argv)
    assert set(res) >= {"dvpo", "ppo"} and res["value_models"]["gvm"]["eval/pairs"] > 0
    lrs = [json.loads((tmp_path / "bench" / m / "summary.json").read_text())["args"]["lr"] for m in ("gvm", "rm")]
    assert lrs == [3e-4, 3e-4]
    assert json.loads((tmp_path / "bench" / "gvm" / "value_model.json").read_text())["base_model"] == str(
        tiny_world / "sft"
    )
    assert files_digest(tiny_world) == before and not (tmp_path / "bench" / "sft").exists()
    err = one_line_error(capsys, lambda: compare.main(["--world", str(tmp_path), "--root", str(tmp_path / "b2")]))
    assert err == f"error: --world {tmp_path}: no data/world.json, so not a world (python -m infra.world)"
