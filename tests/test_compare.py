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
from infra import lora, memory, models

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
    res = memory.analytic_memory(compare.Args(analytic=str(families / "qwen2"), batch_size=2))
    model, _ = models.load_pretrained(str(families / "qwen2"))
    n = sum(p.numel() for p in model.parameters())
    assert res["params"] == n and res["value_model_params"] == n + model.config.hidden_size + 1  # tied LM head
    out = capsys.readouterr().out
    assert "| 0.60 |" in out and "| 0.56 |" in out  # 24/40 and 20/36 bytes per parameter
    layer, layers = sum(p.numel() for p in model.model.layers[0].parameters()), len(model.model.layers)
    adapters = lora.add_lora(model, 8, 16.0, 0.0)
    assert res["adapters"] == sum(p.numel() for p in adapters.parameters() if p.requires_grad)  # LoRA r=8 rows
    a, head, shared = res["adapters"], model.config.hidden_size + 1, res["LoRA r=8, bf16 frozen, one shared base"]
    assert shared["dvpo"] == 2 * (n + a + head) + 16 * a  # one bf16 base, the GVM's adapter and head on it
    assert shared["ppo"] == 2 * (n + a + head) + 16 * (2 * a + head)  # the critic's adapter and head trained
    gpus = memory.analytic_memory(compare.Args(analytic=str(families / "qwen2"), batch_size=2, gpus="1,4"))["gpus"]
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


def test_dpo_betas_span_the_targets_by_hand():
    # pilots KL 16 at beta 0.1 and 4 at beta 0.4: KL = 1.6 / beta (p = 1), so KL 8 at beta 0.2 and 2 at 0.8
    assert compare.dpo_betas([(0.1, 16.0), (0.4, 4.0)], [8.0, 2.0]) == [0.2, 0.8]
    # KL 16 at 0.1 and 1 at 0.4: p = 2, KL = 0.16 / beta^2, so KL 4 at beta 0.2
    assert compare.dpo_betas([(0.1, 16.0), (0.4, 1.0)], [4.0]) == [0.2]
    assert compare.dpo_betas([(0.1, 6.0)], [3.0, 12.0]) == [0.2, 0.05]  # one pilot: p = 1
    # pilots that barely differ would give p near 0 and send beta to 1e-30: p is held at 0.5 or more, beta
    # within 32x of the first pilot's
    assert compare.dpo_betas([(0.1, 6.0), (0.4, 5.99)], [12.0, 1e-4]) == [pytest.approx(0.1 * 0.5**2), 3.2]


def test_frontier_runs_every_method_at_every_budget_and_reuses_finished_runs(tiny_world, tmp_path, capsys):
    """--frontier on a tiny budget: each online method at both targets (its adaptive beta starting at 0.3 /
    target), DPO at its two pilots and the two betas they choose, every run evaluated on the same held-out
    prompts; the JSON, the tables and the PNG; run again, every run and evaluation is reused."""
    from helpers import files_digest, one_line_error

    argv = ["--frontier", "--world", str(tiny_world), "--root", str(tmp_path / "fr"), "--targets", "2,8"]
    argv += ["--seeds", "0", "--steps", "2", "--eval-n", "8", "--batch-size", "4", "--minibatch-size", "2"]
    argv += ["--group-size", "2", "--value-epochs", "1", "--dpo-epochs", "1"]
    res = compare.main(argv)
    out = capsys.readouterr().out
    by = {}
    for r in res["records"]:
        by.setdefault(r["method"], set()).add(r["budget"])
    assert set(by) == {"dvpo", "ppo", "grpo", "remax", "dpo"} and all(len(b) >= 2 for b in by.values())
    assert by["dvpo"] == {"KL 2", "KL 8"} and len(by["dpo"]) >= 3  # two pilots and the betas they chose
    for r in res["records"]:
        run_args = json.loads((tmp_path / "fr" / "runs" / os.path.basename(r["run"]) / "summary.json").read_text())[
            "args"
        ]
        if r["method"] == "dpo":
            assert run_args["beta"] == r["beta"]
        else:
            assert (run_args["adaptive_kl"], run_args["target_kl"]) == (True, r["target"])
            assert run_args["kl_coef"] == pytest.approx(0.3 / r["target"], rel=1e-3)
        ev = json.loads((tmp_path / "fr" / "runs" / (os.path.basename(r["run"]) + ".eval.json")).read_text())
        assert ev["args"]["n_prompts"] == 8 and ev["args"]["ref"] == str(tiny_world / "sft")
        assert ev["results"][0]["gold"] == r["gold"] and r["grammatical"] is not None and r["step_seconds"] > 0
        assert len(r["curve"]) >= 2 and r["peak_bytes"] > r["states_bytes"] > 0
    pilots = [r for r in res["records"] if r["method"] == "dpo"][:2]
    chosen = compare.dpo_betas([(p["beta"], max(p["kl"], 1e-3)) for p in pilots], [2.0, 8.0])
    assert {r["beta"] for r in res["records"] if r["method"] == "dpo"} == {0.1, 0.4, *chosen}
    assert res["sft"]["kl"] == 0.0 and "| DVPO: budget |" in out and "| DPO: budget |" in out
    png = tmp_path / "fr" / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "fr" / "frontier.json").is_file()
    stamp = {p: p.stat().st_mtime for p in (tmp_path / "fr" / "runs").iterdir()}
    again = compare.main(argv)
    out = capsys.readouterr().out
    assert out.count("reusing") == len(res["records"]) + 2 and " -> " not in out  # the runs, the GVM and the RM
    assert {p: p.stat().st_mtime for p in (tmp_path / "fr" / "runs").iterdir()} == stamp
    assert [r["gold"] for r in again["records"]] == [r["gold"] for r in res["records"]]
    before = files_digest(tiny_world)
    err = one_line_error(capsys, lambda: compare.main([*argv, "--plot", str(tiny_world / "sft" / "f.png")]))
    assert (
        err == f"error: --plot {tiny_world / 'sft' / 'f.png'}: inside the world's sft/, an input; name a file elsewhere"
    )
    assert files_digest(tiny_world) == before


def test_learning_curves_plot_a_hand_written_metrics_file(tmp_path, monkeypatch, capsys):
    from helpers import one_line_error
    from infra import plots

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 0, "eval/gold": 0.1, "eval/kl": 0.0, "time/elapsed": 1.0},
        {"step": 1, "loss/policy": 0.5, "time/update": 0.2},  # a training step: not an evaluation
        {"step": 5, "eval/gold": 0.4, "eval/kl": 2.5, "time/elapsed": 9.0},
        {"step": 10, "eval/gold": 0.7, "eval/kl": 4.0, "time/elapsed": 20.0},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}
    real_save = plots.save

    def spy(fig, path):
        drawn["axes"] = [[line.get_xydata().tolist() for line in ax.lines] for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(plots, "save", spy)
    plots.main([str(run), "--out", str(tmp_path / "c.png"), "--labels", "mine"])
    gold_step, gold_time, kl_step, kl_time = drawn["axes"]
    assert gold_step == [[[0, 0.1], [5, 0.4], [10, 0.7]]] and gold_time == [[[1.0, 0.1], [9.0, 0.4], [20.0, 0.7]]]
    assert kl_step == [[[0, 0.0], [5, 2.5], [10, 4.0]]] and kl_time == [[[1.0, 0.0], [9.0, 2.5], [20.0, 4.0]]]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and "wrote" in capsys.readouterr().out
    (tmp_path / "notes.png").write_text("my notes")
    err = one_line_error(capsys, lambda: plots.main([str(run), "--out", str(tmp_path / "notes.png")]))
    assert "exists and is not a PNG" in err and (tmp_path / "notes.png").read_text() == "my notes"
    err = one_line_error(capsys, lambda: plots.main([str(run), "--out", str(run / "c.png")]))
    assert err == f"error: --out {run / 'c.png'}: inside the run {run}, an input; name a file outside it"
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]
    (tmp_path / "empty").mkdir()
    err = one_line_error(capsys, lambda: plots.main([str(tmp_path / "empty"), "--out", str(tmp_path / "d.png")]))
    assert err == f"error: {tmp_path / 'empty'}: no metrics.jsonl, so not a finished or running training run"
    assert not (tmp_path / "d.png").exists()


def test_the_frontier_differences_and_interpolation_by_hand():
    run = lambda gold, ci=0.0, kl=0.0, budget="KL 6", method="ppo": {  # noqa: E731
        "gold": gold,
        "gold_ci95": ci,
        "kl": kl,
        "budget": budget,
        "method": method,
    }
    # two seeds each: means 0.7 and 0.5, variances 0.02 and 0.005 over 2 runs, Welch df = 1.47 -> t(1) = 12.71
    d, ci = compare.welch([run(0.8), run(0.6)], [run(0.55), run(0.45)])
    assert d == pytest.approx(0.2) and ci == pytest.approx(12.71 * (0.02 / 2 + 0.005 / 2) ** 0.5)
    d, ci = compare.welch([run(0.8, 0.03)], [run(0.5, 0.04)])  # one seed: the evaluations' intervals combined
    assert (d, ci) == (pytest.approx(0.3), pytest.approx(0.05))
    # a frontier through (KL 2, 0.4) and (KL 6, 0.8), seeds averaged, read at KL 3 and outside its range
    recs = [run(0.3, kl=1.0, budget="b1"), run(0.5, kl=3.0, budget="b1"), run(0.8, kl=6.0, budget="b2")]
    assert compare.frontier_at(recs, "ppo", 3.0) == pytest.approx(0.5)
    assert compare.frontier_at(recs, "ppo", 7.0) is None and compare.frontier_at(recs, "dpo", 3.0) is None
    # from the SFT policy at (KL 0, gold 0.1) to the first budget's mean (KL 2, gold 0.4): at KL 1, 0.25
    assert compare.frontier_at(recs, "ppo", 1.0) is None
    assert compare.frontier_at(recs, "ppo", 1.0, (0.0, 0.1)) == pytest.approx(0.25)
