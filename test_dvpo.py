"""Tests for dvpo: math against slow references and closed forms, invariants, and end-to-end runs.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_dvpo.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets import: a stray hub call hangs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import hashlib
import itertools
import math
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import dvpo
import gvm
import loop
import lora
import ppo_baseline
import reward
import rollout
import runtime
import world

REPO = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY_WORLD = world.WorldConfig(n_train_prompts=60, n_eval_prompts=20, sft_steps=150, sft_batch=32, gen_batch=40)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def default_world(tmp_path_factory):
    """A fresh folder in which `python gvm.py` runs with default paths and no world yet: it must build the
    world on first use and train a GVM. Yields (cwd, completed process)."""
    cwd = tmp_path_factory.mktemp("first_use")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "gvm.py"), "--max-steps", "400", "--eval-every", "200"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    return cwd, proc


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_world")
    world.build_world(str(root), TINY_WORLD, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_backbone(tiny_world):
    return str(tiny_world / "sft")


def files_digest(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if f == world.MARKER:
                continue  # holds the build time
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def random_states(B=5, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, S + 1, (B,), generator=g)  # T + 1 states, T >= 1
    mask = (torch.arange(S)[None] < lengths[:, None]).float()
    values = torch.randn(B, S, generator=g)
    labels = torch.tensor([random.Random(seed + b).choice([1.0, -1.0]) for b in range(B)])
    return values, mask, labels


# ---------------------------------------------------------------------------------------------- TD(lambda) targets
def lambda_return_reference(v, label, gamma, lam):
    """Slow reference from the definition of the lambda-return (Sutton & Barto 12.1): a (1-lam)-weighted
    mixture of n-step returns, the Monte Carlo return taking the remaining weight. v = V(s_0..s_T)."""
    T = len(v) - 1
    r = [0.0] * T
    r[T - 1] = label

    def n_step(t, n):  # G_t^(n); the state after the last token is terminal, worth 0
        g = sum(gamma ** k * r[t + k] for k in range(min(n, T - t)))
        return g + (gamma ** n * v[t + n] if t + n < T else 0.0)

    out = []
    for t in range(T):
        horizon = T - t
        g = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, horizon))
        out.append(g + lam ** (horizon - 1) * n_step(t, horizon))
    return out + [label]  # the value of the complete response regresses on the label


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.9, 0.7), (0.99, 0.5)])
def test_td_lambda_targets_match_lambda_return_definition(gamma, lam):
    values, mask, labels = random_states(seed=int(lam * 100))
    got = gvm.td_lambda_targets(values, mask, labels, gamma, lam)
    for b in range(len(values)):
        n = int(mask[b].sum())
        ref = lambda_return_reference(values[b, :n].tolist(), labels[b].item(), gamma, lam)
        assert got[b, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert (got[b, n:] == 0).all()


def test_monte_carlo_targets_are_the_label_everywhere():
    values, mask, labels = random_states()
    got = gvm.td_lambda_targets(values, mask, labels, gamma=1.0, lam=1.0)
    assert torch.allclose(got, labels[:, None] * mask, atol=1e-6)


def test_lambda_zero_is_one_step_bootstrap():
    values, mask, labels = random_states()
    got = gvm.td_lambda_targets(values, mask, labels, gamma=1.0, lam=0.0)
    for b in range(len(values)):
        T = int(mask[b].sum()) - 1
        expected = values[b, 1:T].tolist() + [labels[b].item(), labels[b].item()]  # R_t = V(s_{t+1}); R_{T-1} = label
        assert got[b, :T + 1].tolist() == pytest.approx(expected, abs=1e-6)


def test_masked_positions_change_neither_targets_nor_loss():
    values, mask, labels = random_states()
    garbage = values + 100.0 * torch.randn_like(values) * (1 - mask)
    t1 = gvm.td_lambda_targets(values, mask, labels)
    t2 = gvm.td_lambda_targets(garbage, mask, labels)
    assert torch.equal(t1 * mask, t2 * mask)
    assert gvm.value_loss(values, t1, mask).item() == pytest.approx(gvm.value_loss(garbage, t2, mask).item(), abs=1e-6)


def test_value_loss_by_hand():
    values = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.0, 7.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # 1/2 * mean(0.25, 4, 4, 1) = 1.15625
    assert gvm.value_loss(values, targets, mask).item() == pytest.approx(1.15625)


def test_gae_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 1, 3, 4])[:, None]).float()
    adv, ret = rollout.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(4):
        n = int(mask[b].sum())
        for t in range(n):
            a = sum((0.9 * 0.8) ** k * (rewards[b, t + k] + 0.9 * (values[b, t + k + 1] if t + k + 1 < n else 0)
                                         - values[b, t + k]) for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(float(a), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(float(a + values[b, t]), abs=1e-5)
        assert (adv[b, n:] == 0).all()


def test_heldout_metrics_by_hand(monkeypatch):
    # two pairs: (chosen T=2, rejected T=1) and (chosen T=1, rejected T=2)
    samples = [([1, 2], [3, 4], 1.0), ([1, 2], [5], -1.0), ([1], [6], 1.0), ([1], [7, 8], -1.0)]
    v = torch.tensor([[0.1, 0.5, 0.9], [0.1, -0.2, 0.0], [0.0, -0.5, 0.0], [0.0, -1.5, 0.5]])
    monkeypatch.setattr(gvm, "state_values", lambda model, batch: v * batch["state_mask"])
    m = gvm.heldout_metrics(torch.nn.Identity(), samples, 0, "cpu", lam=1.0)
    assert m["eval/pairwise_acc_final"] == 0.5  # 0.9 > -0.2, -0.5 < 0.5
    assert m["eval/pairwise_acc_mean"] == 0.75  # 0.7 > -0.2, and a tie: -0.5 = mean(-1.5, 0.5)
    assert m["eval/margin"] == pytest.approx((1.1 - 1.0) / 2)
    assert m["eval/bt_loss"] == pytest.approx((math.log1p(math.exp(-1.1)) + math.log1p(math.exp(1.0))) / 2, abs=1e-6)
    assert m["eval/terminal_mse"] == pytest.approx((0.01 + 0.64 + 2.25 + 2.25) / 4)
    assert m["eval/value_mse"] == pytest.approx((0.25 + 0.01 + 0.64 + 2.25 + 0.25 + 2.25) / 6)  # response states
    assert m["eval/td_loss"] == pytest.approx(0.5 * (5.65 + 0.81 + 1.21 + 1 + 1) / 10)  # lambda = 1: label targets, s_0 too
    # p = (1 + V_T) / 2 = 0.95, 0.4, 0.25, 0.75 against chosen = 1, 0, 1, 0, each alone in its bin
    assert m["eval/ece"] == pytest.approx((0.05 + 0.4 + 0.75 + 0.75) / 4, abs=1e-6)
    assert gvm.calibration_error(torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, -1.0, 1.0, -1.0])) == 0.0


def test_select_saves_the_best_evaluated_checkpoint(tiny_world, tmp_path):
    """--select keeps the checkpoint with the best held-out metric among the evaluations, not the last one; the
    saved folder reproduces that evaluation's numbers."""
    base = dict(model=str(tiny_world / "sft"), data=str(tiny_world / "data" / "pairs_train.jsonl"),
                eval_data=str(tiny_world / "data" / "pairs_eval.jsonl"), lr=0.03, max_steps=12, eval_every=2, batch_size=8)
    for select, higher in (("terminal_mse", False), ("acc_mean", True), ("last", None)):
        out = tmp_path / select
        summary = gvm.train(gvm.Args(**base, select=select, out=str(out)))
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "eval/terminal_mse" in r and r["step"] > 0]
        assert [r["step"] for r in evals] == list(range(2, 13, 2))
        key = "eval/" + select.replace("acc_", "pairwise_acc_")
        if higher is None:
            best = evals[-1]
        else:
            best = (max if higher else min)(evals, key=lambda r: r[key])  # the first of equals, as strict improvement keeps
            assert [r["step"] for r in evals if r["eval/selected"]][-1] == best["step"]
        assert summary["train/selected_step"] == best["step"] and summary["last"]["eval/td_loss"] == evals[-1]["eval/td_loss"]
        model, tok, meta = gvm.load_value_model(str(out))
        samples = gvm.pair_samples(data.load_pairs(base["eval_data"], "train", "--data"), tok, 512, "eval")
        again = gvm.heldout_metrics(model, samples, tok.pad_token_id, "cpu")
        for k in ("eval/terminal_mse", "eval/pairwise_acc_mean", "eval/td_loss"):
            assert again[k] == pytest.approx(best[k], abs=1e-6) and summary[k] == pytest.approx(best[k], abs=1e-6)


# ---------------------------------------------------------------------------------------------- value model
def batch_for(tok, pairs, max_len=64):
    samples = gvm.pair_samples(pairs, tok, max_len, "test")
    return samples, gvm.collate(samples, tok.pad_token_id)


PAIRS = [("the plot was", "very good .", "not good ."), ("i", "loved the film but the ending was dull .", "hated it .")]


def test_head_is_zero_at_init_and_dropout_is_off(tiny_backbone):
    from transformers import GPT2Config, GPT2Model
    backbone, tok = gvm.load_backbone(tiny_backbone)
    model = gvm.ValueModel(backbone)
    _, batch = batch_for(tok, PAIRS)
    assert torch.count_nonzero(gvm.state_values(model, batch)) == 0
    gpt2 = data.disable_dropout(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))))
    m2 = gvm.ValueModel(gpt2)
    torch.nn.init.normal_(m2.head.weight)
    m2.train()
    a = m2(batch["input_ids"], batch["attention_mask"])
    b = m2(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b), "dropout still active in train mode"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: absolute positions, where position ids matter
def test_values_do_not_depend_on_padding(tiny_backbone, arch):
    from transformers import GPT2Config, GPT2Model
    backbone, tok = gvm.load_backbone(tiny_backbone)
    if arch == "gpt2":
        backbone = data.disable_dropout(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))))
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight)
    samples, batch = batch_for(tok, PAIRS)
    together = gvm.state_values(model, batch)
    for i, s in enumerate(samples):
        alone = gvm.state_values(model, gvm.collate([s], tok.pad_token_id))
        n = alone.shape[1]
        assert torch.allclose(together[i, :n], alone[0], atol=1e-5)
    # left padding reads the same values (position ids come from the mask)
    p, r, _ = samples[0]
    L = batch["input_ids"].shape[1]
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p + r)) + p + r])
    mask = (ids != tok.pad_token_id).long()
    left = model(ids, mask)[0, L - len(r) - 1:]
    assert torch.allclose(left, together[0, :len(r) + 1], atol=1e-5)


def test_save_load_round_trip(tiny_backbone, tmp_path):
    backbone, tok = gvm.load_backbone(tiny_backbone)
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight)
    _, batch = batch_for(tok, PAIRS)
    gvm.save_value_model(model, tok, str(tmp_path), {"kind": "gvm"})
    loaded, tok2, meta = gvm.load_value_model(str(tmp_path))
    assert torch.equal(gvm.state_values(model.eval(), batch), gvm.state_values(loaded.eval(), batch))
    assert meta["tokenizer_fingerprint"] == data.tokenizer_fingerprint(tok2) == data.tokenizer_fingerprint(tok)
    with pytest.raises(runtime.UsageError, match="not a 'reward-model' one"):
        gvm.load_value_model(str(tmp_path), kind="reward-model")


def test_pair_samples_layout(tiny_backbone):
    _, tok = gvm.load_backbone(tiny_backbone)
    samples, batch = batch_for(tok, PAIRS[:1])
    (p, r, lab_c), (_, r2, lab_r) = samples
    assert (lab_c, lab_r) == (1.0, -1.0)
    assert p[0] == tok.bos_token_id and r[-1] == tok.eos_token_id and len(r) == 4  # very good . EOS
    assert batch["state_pos"][0, :len(r) + 1].tolist() == list(range(len(p) - 1, len(p) + len(r)))
    assert batch["state_mask"][0].sum() == len(r) + 1


# ---------------------------------------------------------------------------------------------- the world
def test_world_is_deterministic_for_a_seed(tiny_world, tmp_path):
    world.build_world(str(tmp_path / "again"), TINY_WORLD, progress=False)
    assert files_digest(tiny_world) == files_digest(tmp_path / "again")
    other = world.WorldConfig(**{**TINY_WORLD.__dict__, "seed": 1})
    world.build_world(str(tmp_path / "other"), other, progress=False)
    a, b = files_digest(tiny_world), files_digest(tmp_path / "other")
    assert a["data/pairs_train.jsonl"] != b["data/pairs_train.jsonl"]


def test_world_data_is_a_standard_preference_dataset(tiny_world):
    import datasets
    ds = datasets.load_dataset("json", data_files=str(tiny_world / "data" / "pairs_train.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names) and len(ds) > 20
    row = ds[0]
    assert row["chosen"] != row["rejected"] and row["chosen"].strip()
    assert world.gold_scores([row["chosen"]])[0] == pytest.approx(row["score_chosen"])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_world / "sft")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    AutoModelForCausalLM.from_pretrained(tiny_world / "sft")  # loads with no project code


def test_grammar_regex_accepts_the_grammar_and_rejects_word_salad():
    g = world.Grammar(random.Random(5))
    assert all(world.is_grammatical(g.review()) for _ in range(500))
    assert not world.is_grammatical("the plot good was .")
    assert not world.is_grammatical("i loved the the plot .")
    assert not world.is_grammatical("the plot was good")  # a review ends with " ."


def test_gold_judge_reads_negation_and_contrast():
    good, not_good, but = world.gold_scores(["the plot was good .", "the plot was not good .",
                                             "the plot was good but the acting was awful ."])
    assert good > 0 > not_good and but < 0


def test_label_flip_flips_labels():
    cfg = world.WorldConfig(bt_beta=1000.0)
    rows = world.label_pairs(["p"] * 3, ["good .", "bad .", "great ."], ["awful .", "nice .", "dull ."],
                             cfg, random.Random(0), flip=1.0)
    assert all(r["score_chosen"] < r["score_rejected"] for r in rows)


@pytest.fixture(scope="session")
def noisy_world(tmp_path_factory):
    """A quarter of the default world's pairs, with 25% of the training labels flipped (AlpacaFarm)."""
    root = tmp_path_factory.mktemp("noisy_world")
    world.build_world(str(root), world.WorldConfig(seed=7, label_flip=0.25, n_train_prompts=1000, n_eval_prompts=200,
                                                   sft_steps=400), progress=False)
    return root


def test_a_gvm_learns_from_noisy_labels(noisy_world, tmp_path):
    """The GVM reads V(s_T) at EOS, a position the SFT model never had to make informative; under 25% flips
    the +-1 regression's gradient is mostly noise, and with a pair's two samples in different batches the
    GVM often never leaves the label mean (every V near 0). Kept in one batch (the default), it learns."""
    def agreement(name):
        rows = [json.loads(x) for x in (noisy_world / "data" / name).read_text().splitlines()]
        return sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows)

    assert agreement("pairs_train.jsonl") < 0.75 < 0.85 < agreement("pairs_eval.jsonl")  # held-out labels unflipped
    for seed in range(3):
        summary = gvm.train(gvm.Args(model=str(noisy_world / "sft"), data=str(noisy_world / "data" / "pairs_train.jsonl"),
                                     eval_data=str(noisy_world / "data" / "pairs_eval.jsonl"), epochs=5, seed=seed,
                                     out=str(tmp_path / f"gvm{seed}")))
        assert summary["eval/pairwise_acc_final"] > 0.62, (seed, summary["eval/pairwise_acc_final"])


# ---------------------------------------------------------------------------------------------- gvm.py end to end
def test_first_use_builds_world_and_trains_a_gvm_above_chance(default_world):
    cwd, proc = default_world
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the embedded world" in proc.stdout
    stats = json.loads((cwd / "ckpt" / "data" / world.MARKER).read_text())["stats"]
    assert stats["sft_grammatical_rate"] > 0.9 and stats["sft_eos_rate"] > 0.95  # a fluent SFT policy
    assert stats["sft_gold_frac_pos"] > 0.25 and stats["sft_gold_frac_neg"] > 0.25  # of mixed sentiment
    out = cwd / "ckpt" / "gvm"
    summary = json.loads((out / "summary.json").read_text())
    # 443 held-out pairs: chance is 0.5 +- 0.024, so 0.6 is four standard errors above it
    assert summary["eval/pairwise_acc_final"] > 0.6 and summary["eval/pairwise_acc_mean"] > 0.6
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["eval/pairwise_acc_final"] == 0.5  # zero head: every pair ties
    assert any("loss/value" in m for m in metrics)
    model, tok, meta = gvm.load_value_model(str(out))
    assert meta["kind"] == "gvm" and meta["lam"] == 0.95
    samples = gvm.pair_samples(data.load_pairs(str(cwd / world.PAIRS_EVAL), "train", "--data"), tok, 512, "eval")
    again = gvm.heldout_metrics(model, samples, tok.pad_token_id, "cpu")
    assert again["eval/pairwise_acc_final"] == pytest.approx(summary["eval/pairwise_acc_final"], abs=1e-6)


def write_jsonl(path, rows):
    world.write_jsonl(path, rows)
    return str(path)


def bad_input_cases(tmp_path, sft):
    good = {"prompt": "the plot was", "chosen": "good .", "rejected": "bad ."}
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "the plot was", "chosen": \n')
    return [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(malformed)], "malformed.jsonl: cannot read it"),
        (["--strict", "--data", write_jsonl(tmp_path / "nochosen.jsonl", [good, {"prompt": "i", "rejected": "bad ."}])],
         "nochosen.jsonl: 1 bad rows (--strict): row 2: 'chosen' is missing or empty"),
        (["--strict", "--data", write_jsonl(tmp_path / "empty.jsonl", [good, {**good, "rejected": "  "}])],
         "empty.jsonl: 1 bad rows (--strict): row 2: 'rejected' is missing or empty"),
        (["--data", write_jsonl(tmp_path / "allbad.jsonl", [{**good, "chosen": ""}])], "allbad.jsonl: no usable rows"),
        (["--data", write_jsonl(tmp_path / "nocol.jsonl", [{"question": "x", "answer": "a"}])],
         "nocol.jsonl: needs columns chosen/rejected"),
        (["--model", str(tmp_path / "no_model")], "--model"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--lam", "1.5"], "--lam"),
        (["--select", "accuracy"], "--select accuracy: must be last or one of acc_final, acc_mean, margin"),
    ]


def test_bad_input_is_one_line_exit_2_and_no_output(tiny_world, tmp_path, capsys):
    sft = str(tiny_world / "sft")
    data = str(tiny_world / "data" / "pairs_train.jsonl")
    for extra, message in bad_input_cases(tmp_path, sft):
        out = tmp_path / "gvm_out"
        argv = ["--model", sft, "--data", data, "--eval-data", data, "--out", str(out), "--max-steps", "1"] + extra
        with pytest.raises(SystemExit) as e:
            gvm.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2, (extra, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (extra, err)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".gvm_out")]


def test_atomic_dir_keeps_the_last_good_output_when_a_run_fails(tmp_path):
    out = tmp_path / "ckpt"
    with runtime.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("good")
    with pytest.raises(RuntimeError):
        with runtime.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model"), "w").write("half")
            raise RuntimeError("crash mid-save")
    assert (out / "model").read_text() == "good"
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "gvm.py"), "--data", str(tmp_path / "nope.jsonl"),
                           "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- rollout math


def random_rollout_tensors(B=4, R=7, seed=0):
    """State values V(s_0..s_R), a state mask with T in [1, R], and KL rewards on the T actions."""
    g = torch.Generator().manual_seed(seed)
    T = torch.tensor([R, 1, 3, 5][:B])
    smask = (torch.arange(R + 1)[None] <= T[:, None]).float()
    values = torch.randn(B, R + 1, generator=g) * smask
    rewards = -0.1 * torch.randn(B, R, generator=g) * smask[:, 1:]
    return values, smask, rewards, T


def released_closed_form(v, r, T, lam):
    """docs/DVPO.md §3 (gamma = 1): A_t = -V_t + (1-lam) sum_{k>=1} lam^{k-1} V_{t+k} + sum_l lam^l r_{t+l}, V_T := 0."""
    v = v[:T] + [0.0]
    return [-v[t] + (1 - lam) * sum(lam ** (k - 1) * v[t + k] for k in range(1, T - t + 1))
            + sum(lam ** l * r[t + l] for l in range(T - t)) for t in range(T)]


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.5])
def test_released_advantage_closed_form_and_telescoping(lam):
    values, smask, rewards, T = random_rollout_tensors()
    adv = dvpo.compute_advantages("released", values, smask, rewards, 1.0, lam)
    for b in range(len(T)):
        n = int(T[b])
        ref = released_closed_form(values[b].tolist(), rewards[b].tolist(), n, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref, abs=1e-5)
        if lam == 1.0:  # the value terms telescope to -V_t: a pure baseline
            expected = [-values[b, t].item() + rewards[b, t:n].sum().item() for t in range(n)]
            assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)


def test_delta_advantage_closed_forms():
    values, smask, rewards, T = random_rollout_tensors()
    a0 = dvpo.compute_advantages("delta", values, smask, rewards, 1.0, 0.0)
    a1 = dvpo.compute_advantages("delta", values, smask, rewards, 1.0, 1.0)
    for b in range(len(T)):
        n = int(T[b])
        # lam = 0: V(s_{t+1}) - V(s_t) - beta * kl_t, with V(s_T) the value of the complete response
        assert a0[b, :n].tolist() == pytest.approx((values[b, 1:n + 1] - values[b, :n] + rewards[b, :n]).tolist(), abs=1e-5)
        # lam = 1: V(s_T) - V(s_t) + the KL rewards still to come
        tail = rewards[b, :n].flip(0).cumsum(0).flip(0)
        assert a1[b, :n].tolist() == pytest.approx((values[b, n] - values[b, :n] + tail).tolist(), abs=1e-5)


def test_static_advantage_by_hand():
    # responses of 3 and 1 tokens: V(s_0..s_3) and V(s_0..s_1), then padding that must not matter
    values = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, -2.0, 7.0, 7.0]])
    smask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[-0.1, 0.2, -0.3], [-0.5, 0.0, 0.0]])
    adv = dvpo.compute_advantages("static", values, smask, rewards, 1.0, 0.95)
    # A_t = V(s_{t+1}) + r_t: -1.0 - 0.1, 2.0 + 0.2, 0.25 - 0.3; -2.0 - 0.5
    assert adv.flatten().tolist() == pytest.approx([-1.1, 2.2, -0.05, -2.5, 0.0, 0.0])


@pytest.mark.parametrize("variant", dvpo.ADVANTAGES)
def test_values_at_masked_positions_change_no_advantage(variant):
    values, smask, rewards, _ = random_rollout_tensors()
    garbage = values + 50.0 * (1 - smask)
    a = dvpo.compute_advantages(variant, values, smask, rewards, 1.0, 0.95)
    b = dvpo.compute_advantages(variant, garbage, smask, rewards, 1.0, 0.95)
    assert torch.equal(a, b)
    assert (a * (1 - smask[:, 1:]) == 0).all()


def test_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = rollout.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    one = rollout.masked_whiten(x, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    none = rollout.masked_whiten(x, torch.zeros_like(x))
    assert torch.isfinite(one).all() and torch.isfinite(none).all() and (none == 0).all()


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert rollout.kl_k1(logp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    # k3 = e^{-k1} - 1 + k1: e^{-0.5} - 0.5 = 0.1065307, e^{1} - 2 = 0.7182818, 0
    assert rollout.kl_k3(logp, ref).tolist() == pytest.approx([0.1065307, 0.7182818, 0.0], abs=1e-6)


def test_truncation_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 3, 2, 9]])
    out, mask, ended = rollout.truncate_after_eos(ids, eos_ids=[2, 3], pad_id=0)  # two EOS ids, as instruct models declare
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


@pytest.fixture(scope="session")
def tiny_policy(tiny_world):
    return data.load_pretrained(str(tiny_world / "sft"))


def test_generation_and_logprobs_at_temperature(tiny_policy):
    policy, tok = tiny_policy
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the plot was", "i", "overall , it was a"], max_new_tokens=12)
    assert r.input_ids.shape[1] == r.prompt_len + r.response_mask.shape[1]
    for b in range(3):
        n = int(r.response_mask[b].sum())
        ids = r.response_ids[b, :n].tolist()
        assert (tok.eos_token_id in ids) == bool(r.ended[b]) and ids.count(tok.eos_token_id) <= 1
        assert r.texts[b] == " " + tok.decode([i for i in ids if i != tok.eos_token_id])
    T = 0.7
    got = rollout.response_logprobs(policy, r, T)
    for b, prompt in enumerate(r.prompts):  # reference: each sample alone, no padding, log_softmax(logits / T)
        p = tok(prompt)["input_ids"]
        n = int(r.response_mask[b].sum())
        seq = torch.tensor([p + r.response_ids[b, :n].tolist()])
        logits = policy(seq).logits[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits / T, -1).gather(-1, seq[0, len(p):, None]).squeeze(-1)
        assert got[b, :n].tolist() == pytest.approx(ref.tolist(), abs=1e-5)
        assert (got[b, n:] == 0).all()


def test_ppo_ratio_is_exactly_one_on_the_first_minibatch(tiny_policy):
    """Holds only with dropout off and the same temperature in the old and new log-probs: a GPT-2 policy
    configured with dropout 0.1, sampled and scored at temperature 0.7."""
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny_policy
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), resid_pdrop=0.1, embd_pdrop=0.1,
                        attn_pdrop=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    policy = data.disable_dropout(GPT2LMHeadModel(config)).train()
    r = rollout.generate(policy, tok, ["the plot was", "i", "overall ,", "the acting"] * 4, max_new_tokens=12,
                         temperature=0.7)
    plans = rollout.minibatches(16, 4, 2, torch.Generator().manual_seed(0))
    args = dvpo.Args(cliprange=0.2, max_grad_norm=1.0, temperature=0.7)
    prec = rollout.Precision("fp32", "cpu")
    old = rollout.old_logprobs(policy, r, plans[0], args, prec)
    adv = rollout.masked_whiten(torch.randn_like(old), r.response_mask)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = rollout.ppo_update(policy, opt, prec, r, old, adv, plans, args)
    assert stats["val/ratio_first_max_dev"] == 0.0
    assert stats["val/ratio"] != 1.0  # later minibatches see an updated policy


def test_ppo_loss_by_hand():
    new, old = torch.log(torch.tensor([[1.5, 0.5, 1.0]])), torch.zeros(1, 3)
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = rollout.ppo_loss(new, old, adv, mask, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; token 2 masked
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert stats["policy/clipfrac"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- dvpo.py
@pytest.fixture(scope="session")
def tiny_gvm(tiny_world, tmp_path_factory):
    """A GVM on the tiny world's backbone with a random head (training is not what these tests are about)."""
    backbone, tok = gvm.load_backbone(str(tiny_world / "sft"))
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    folder = tmp_path_factory.mktemp("tiny_gvm")
    gvm.save_value_model(model, tok, str(folder), {"kind": "gvm"})
    return folder


def tiny_dvpo_argv(tiny_world, tiny_gvm, out, *extra):
    return ["--gvm", str(tiny_gvm), "--policy", str(tiny_world / "sft"),
            "--prompts", str(tiny_world / "data" / "prompts_train.jsonl"),
            "--eval-prompts", str(tiny_world / "data" / "prompts_eval.jsonl"), "--out", str(out),
            "--steps", "3", "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2",
            "--eval-every", "3", "--eval-n", "8", "--max-new-tokens", "16", *extra]


def test_gvm_stays_frozen_and_outside_every_optimizer(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    loaded, optimizers = [], []
    real_load, real_adamw = gvm.load_value_model, torch.optim.AdamW

    def spy_load(*a, **k):
        out = real_load(*a, **k)
        loaded.append((out[0], {n: p.detach().clone() for n, p in out[0].state_dict().items()}))
        return out

    class SpyAdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            optimizers.append(self)

    monkeypatch.setattr(gvm, "load_value_model", spy_load)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out"))
    (model, before), = loaded
    after, on_disk = model.state_dict(), gvm.load_value_model(str(tiny_gvm))[0].state_dict()
    assert all(torch.equal(before[n], after[n]) and torch.equal(on_disk[n], after[n]) for n in before), "GVM weights changed"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()), "a gradient reached the GVM"
    in_opt = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    assert optimizers and not in_opt & {id(p) for p in model.parameters()}
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "objective/kl" in m]
    assert len(steps) == 3 and all(m["val/ratio_first_max_dev"] == 0.0 for m in steps)
    for key in ("objective/gold", "policy/clipfrac", "policy/approxkl", "policy/entropy", "val/ratio",
                "time/generate", "time/score", "time/update", "memory/update_state_bytes"):
        assert key in steps[0], key
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train/steps"] == 3


def other_tokenizer_gvm(tiny_world, folder):
    """A GVM whose tokenizer has one word fewer: token ids no longer line up with the policy's."""
    from transformers import LlamaConfig, LlamaModel
    tok = world.build_tokenizer(world.vocabulary()[:-1])
    model = gvm.ValueModel(LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2)))
    gvm.save_value_model(model, tok, str(folder), {"kind": "gvm"})
    return str(folder)


def test_dvpo_bad_input_is_one_line_exit_2_and_no_output(tiny_world, tiny_gvm, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--gvm", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--gvm", str(tiny_world / "sft")], "not a gvm checkpoint"),
        (["--gvm", other_tokenizer_gvm(tiny_world, tmp_path / "other_tok")], "another tokenizer"),
        (["--prompts", str(empty)], "empty.jsonl: the file is empty"),
        (["--minibatch-size", "3"], "--minibatch-size 3 does not divide --batch-size 8"),
        (["--advantage", "magic"], "--advantage magic"),
    ]
    for extra, message in cases:
        out = tmp_path / "dvpo_out"
        with pytest.raises(SystemExit) as e:
            dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, (extra, err)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".dvpo_out")]


def test_dvpo_raises_held_out_gold_and_evaluate_shows_it(default_world):
    """The README's chain on the default world: gvm.py (the fixture), dvpo.py, evaluate.py."""
    cwd, gvm_proc = default_world
    assert gvm_proc.returncode == 0
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dvpo.py"), "--gvm", "ckpt/gvm", "--steps", "20",
                           "--eval-every", "10"], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (cwd / "ckpt" / "dvpo" / "metrics.jsonl").read_text().splitlines()
             if "eval/gold" in line]
    first, last = evals[0], evals[-1]
    assert last["eval/gold"] - last["eval/gold_ci95"] > first["eval/gold"] + first["eval/gold_ci95"], (first, last)

    proc = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "ckpt/sft", "ckpt/dvpo", "ckpt/sft",
                           "--n-prompts", "200", "--gvm", "ckpt/gvm", "--json", "eval.json"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sft, tuned, sft_again = json.loads((cwd / "eval.json").read_text())["results"]
    assert sft["kl"] == 0 and sft["win_rate"] == 0.5 and sft_again == sft and sft["grammatical"] > 0.9
    assert tuned["gold"] - tuned["gold_ci95"] > sft["gold"] + sft["gold_ci95"] and tuned["win_rate"] > 0.5
    assert tuned["kl"] > 0 and "| ckpt/dvpo |" in proc.stdout and "V(s_0)" in proc.stdout


# ---------------------------------------------------------------------------------------------- ppo_baseline.py, compare.py
def test_bradley_terry_loss_by_hand():
    loss = reward.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    # (-log sigmoid(1) - log sigmoid(-2)) / 2 = (0.31326 + 2.12693) / 2
    assert loss.item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-5)


def test_reward_model_objective_reads_the_last_token_of_each_pair():
    values = torch.tensor([[0.0, 9.0, 2.0, 0.0], [0.0, 1.0, 9.0, 9.0]])  # chosen T=2, rejected T=1
    batch = {"state_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])}
    loss, m = reward.BradleyTerry().loss(values, batch)
    assert loss.item() == pytest.approx(reward.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0])).item())
    assert m["rm/accuracy"] == 1.0 and m["rm/margin"] == pytest.approx(1.0)


def test_clipped_value_loss_by_hand():
    vpred, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, clipfrac = ppo_baseline.clipped_value_loss(vpred, old, returns, torch.ones(1, 2), 0.2)
    # clipped values 0.7 and 0.3: max((1-2)^2, (0.7-2)^2) = 1.69, max(0^2, 0.3^2) = 0.09; half their mean
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert clipfrac.item() == pytest.approx(1.0)


def test_critic_starts_equal_to_the_reward_model_and_trains_alone(tiny_world, tiny_gvm, tmp_path):
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    args = ppo_baseline.Args(policy=str(tiny_world / "sft"))
    rm, critic_model = ppo_baseline.reward_model_and_critic(str(tmp_path / "rm"), args, tok, "cpu",
                                                            rollout.Precision("fp32", "cpu"))
    critic = ppo_baseline.LearnedCritic(args, rm, critic_model, "cpu")
    a, b = critic.critic.state_dict(), rm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad for p in critic.critic.parameters()) and not any(p.requires_grad for p in rm.parameters())
    in_opt = {id(p) for g in critic.opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in critic.critic.parameters()}


def test_ppo_baseline_refuses_a_gvm_as_reward_model(tiny_world, tiny_gvm, tmp_path, capsys):
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "ppo_out")
    argv[argv.index("--gvm"):argv.index("--gvm") + 2] = ["--rm", str(tiny_gvm)]
    with pytest.raises(SystemExit) as e:
        ppo_baseline.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "holds a 'gvm' checkpoint, not a 'reward-model' one" in err, err
    assert not (tmp_path / "ppo_out").exists()


def test_ppo_baseline_raises_held_out_gold(default_world):
    cwd, gvm_proc = default_world
    assert gvm_proc.returncode == 0
    # 30 steps, 400 prompts: PPO's gold at 20 steps of this world's fixture (+0.10 from -0.01, 200 prompts) sat inside
    # the two 95% intervals; at 30 it is +0.35 from +0.04
    proc = subprocess.run([sys.executable, os.path.join(REPO, "ppo_baseline.py"), "--steps", "30", "--eval-every", "15",
                           "--eval-n", "400", "--rm-epochs", "1"], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rm_summary = json.loads((cwd / "ckpt" / "rm" / "summary.json").read_text())
    assert rm_summary["eval/pairwise_acc_final"] > 0.6
    assert json.loads((cwd / "ckpt" / "rm" / gvm.META_FILE).read_text())["kind"] == "reward-model"
    lines = [json.loads(line) for line in (cwd / "ckpt" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/gold" in m]
    first, last = evals[0], evals[-1]
    assert last["eval/gold"] - last["eval/gold_ci95"] > first["eval/gold"] + first["eval/gold_ci95"], (first, last)
    steps = [m for m in lines if "loss/value" in m]
    assert len(steps) == 30 and all(m["val/ratio_first_max_dev"] == 0.0 for m in steps)


def test_compare_runs_every_method_and_reports_every_phase_and_ratio(tmp_path):
    import compare
    out = tmp_path / "cmp.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "compare.py"), "--root", str(tmp_path / "bench"),
                           "--hidden", "32", "--layers", "1", "--heads", "2", "--sft-steps", "60", "--seeds", "0",
                           "--steps", "2", "--eval-n", "10", "--batch-size", "8", "--minibatch-size", "4",
                           "--value-epochs", "1", "--dpo-epochs", "1", "--methods", ",".join(compare.METHODS),
                           "--target-kl", "3", "--json", str(out), "--extra", "--micro-batch-size 2 --dtype bf16"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
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
    assert f"| model states, analytic | {d['states_analytic'] / 2 ** 20:.1f} (0.56) |" in proc.stdout  # DVPO's column
    assert "reward model" in proc.stdout and {"gvm", "rm"} <= set(res["value_models"])


def test_gvm_sweep_correlations_by_hand():
    import gvm_sweep
    assert gvm_sweep.ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]  # ties share their mean rank
    # a and b are orthogonal to each other, to the constants and to z: with z's linear effect removed, x = z + a
    # and y = 2z + b are uncorrelated although r(x, y) is high; y = z + 3a keeps a perfect partial correlation
    z, a, b = np.array([1.0, 2, 3, 4]), np.array([1.0, -1, -1, 1]), np.array([1.0, -3, 3, -1])
    assert np.corrcoef(z + a, 2 * z + b)[0, 1] > 0.5
    assert gvm_sweep.partial(z + a, 2 * z + b, z) == pytest.approx(0.0, abs=1e-9)
    assert gvm_sweep.partial(z + a, z + 3 * a, z) == pytest.approx(1.0)
    runs = [{"gold": g, "kl": k, "gvm": {f"eval/{c}": m for c in gvm_sweep.CRITERIA}}
            for g, k, m in zip(2 * z + b, z, z + a)]
    c = gvm_sweep.correlations(runs)["margin"]
    assert c["spearman"] == pytest.approx(np.corrcoef(gvm_sweep.ranks(z + a), gvm_sweep.ranks(2 * z + b))[0, 1])
    assert c["pearson"] == pytest.approx(np.corrcoef(z + a, 2 * z + b)[0, 1]) and c["partial_kl"] == pytest.approx(0.0, abs=1e-9)


def test_gvm_sweep_runs_each_variant_and_reuses_finished_runs(default_world):
    """The sweep on a tiny budget: a GVM and a DVPO run per variant and seed, PPO beside them, the table and the
    correlations; run again, it reuses every finished run; a bad variant is one line."""
    import gvm_sweep
    cwd, first = default_world
    assert first.returncode == 0, first.stderr[-3000:]
    argv = [sys.executable, os.path.join(REPO, "gvm_sweep.py"), "--root", "ckpt/sw", "--variants", "e3,e10-margin",
            "--seeds", "0,1", "--steps", "2", "--eval-n", "10", "--gvm-extra", "--max-steps 12 --eval-every 4"]
    proc = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((cwd / "ckpt" / "sw" / "sweep.json").read_text())
    assert [r["seed"] for r in res["variants"]["e10-margin"]] == [0, 1] and len(res["ppo"]) == 2
    g = json.loads((cwd / "ckpt" / "sw" / "gvm-e10-margin-s1" / "summary.json").read_text())
    assert (g["args"]["epochs"], g["args"]["select"], g["args"]["max_steps"], g["args"]["seed"]) == (10, "margin", 12, 1)
    d = json.loads((cwd / "ckpt" / "sw" / "dvpo-e3-s0" / "summary.json").read_text())
    assert d["args"]["gvm"] == "ckpt/sw/gvm-e3-s0" and d["args"]["adaptive_kl"] and d["args"]["kl_horizon"] == 640
    assert res["variants"]["e3"][0]["gold"] == d["eval/gold"]
    rm = json.loads((cwd / "ckpt" / "sw" / "rm" / "summary.json").read_text())["args"]
    assert (rm["epochs"], rm["lr"], rm["select"]) == (reward.RewardArgs.rm_epochs, reward.RewardArgs.rm_lr, "last")
    assert set(res["correlations"]) == set(gvm_sweep.CRITERIA) and "| e10-margin |" in proc.stdout
    again = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reusing") == 10 and "-> ckpt" not in again.stdout
    bad = subprocess.run([*argv[:2], "--variants", "e3,nope"], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--variants e3,nope" in bad.stderr


# ---------------------------------------------------------------------------------------------- data shapes
def test_the_three_preference_shapes_normalise_to_the_same_pair():
    conv = [{"role": "user", "content": "rate the film"}]
    assert data.normalise_pair({"prompt": "rate the film", "chosen": "good .", "rejected": "bad ."}) == \
        ("rate the film", "good .", "bad .")
    ultra = {"prompt": "rate the film", "chosen": conv + [{"role": "assistant", "content": "good ."}],
             "rejected": conv + [{"role": "assistant", "content": "bad ."}]}
    assert data.normalise_pair(ultra) == (conv, "good .", "bad .")
    trl = {"prompt": conv, "chosen": [{"role": "assistant", "content": "good ."}],
           "rejected": [{"role": "assistant", "content": "bad ."}]}
    assert data.normalise_pair(trl) == (conv, "good .", "bad .")
    hh = {"chosen": "\n\nHuman: rate the film\n\nAssistant: it was good .",
          "rejected": "\n\nHuman: rate the film\n\nAssistant: it was bad ."}
    # the common prefix ends inside "it was "; the cut goes back to the last "Assistant:"
    assert data.normalise_pair(hh) == ("\n\nHuman: rate the film\n\nAssistant:", " it was good .", " it was bad .")
    assert data.split_common_prefix("the plot was good", "the plot was great") == ("the plot was", " good", " great")
    assert data.normalise_prompt(ultra) == conv and data.normalise_prompt({"prompt": "x"}) == "x"
    assert data.normalise_prompt({"messages": conv + [{"role": "assistant", "content": "ok"}]}) == conv


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is missing or empty"),
    ({"prompt": "p", "chosen": None, "rejected": "b"}, "'chosen' is missing or empty"),
    ({"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"}]},
     "'chosen' has no assistant turn at its end"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "different conversations"),
    ({"chosen": "same", "rejected": "same and more"}, "share no prompt prefix"),
])
def test_bad_rows_are_named(row, reason):
    with pytest.raises(data.BadRow, match=reason):
        data.normalise_pair(row)


def test_bad_rows_are_reported_by_number_and_skipped_or_stop_under_strict(tmp_path, capsys):
    good = {"prompt": "the plot was", "chosen": "good .", "rejected": "bad ."}
    path = write_jsonl(tmp_path / "p.jsonl", [good, {**good, "chosen": " "}, good, {**good, "rejected": None}])
    pairs = data.load_pairs(path, "train", "--data")
    assert pairs == [("the plot was", "good .", "bad .")] * 2
    out = capsys.readouterr().out
    assert "skipped 2 of 4 rows" in out and "row 2: 'chosen'" in out and "row 4: 'rejected'" in out
    with pytest.raises(runtime.UsageError, match=r"p.jsonl: 2 bad rows \(--strict\): row 2"):
        data.load_pairs(path, "train", "--data", strict=True)


def test_long_prompts_are_dropped_with_a_count(tiny_policy, tmp_path, capsys):
    _, tok = tiny_policy
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the plot was"}, {"prompt": "the plot was very very good"}])
    kept = data.load_prompts(path, "train", "--prompts", tok, max_prompt_len=4)
    assert [p for p, _ in kept] == ["the plot was"] and kept[0][1] == tok("the plot was")["input_ids"]
    assert "dropped 1 of 2 rows: 1 whose prompt exceeds --max-prompt-len 4 tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- memory knobs
@pytest.mark.parametrize("suppressed", [None, [3, 10]])
def test_chunked_logprobs_and_entropy_match_autograd_in_value_and_gradient(suppressed):
    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (7,))
    keep = torch.ones(11, dtype=torch.bool)
    if suppressed is not None:  # never sampled; the reference softmax runs over the other columns only
        ids = torch.tensor([0, 1, 2, 4, 5, 9, 8])
        keep[suppressed] = False
        suppressed = torch.tensor(suppressed)
    g1, g2 = torch.randn(7) * 3, torch.randn(7) * 3
    lp, ent = rollout.ChunkedLogprobEntropy.apply(logits, ids, 0.7, 3, suppressed)
    ref_all = torch.log_softmax(logits[:, keep] / 0.7, -1)
    ref_lp = ref_all.gather(-1, (ids - (~keep).cumsum(0)[ids])[:, None]).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    grad, = torch.autograd.grad((lp * g1 + ent * g2).sum(), logits)
    ref_grad, = torch.autograd.grad((ref_lp * g1 + ref_ent * g2).sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_chunked_logprobs_equal_the_plain_path_on_a_rollout(tiny_policy):
    policy, tok = tiny_policy
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the plot was", "i"], max_new_tokens=10)
    plain = rollout.response_logprobs(policy, r, 0.8, with_entropy=True)
    chunked = rollout.response_logprobs(policy, r, 0.8, with_entropy=True, chunk=3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, chunked))


def accumulation_setup(tiny_policy, seed=0):
    policy, tok = tiny_policy
    torch.manual_seed(seed)
    r = rollout.generate(policy, tok, ["the plot was", "i", "overall ,", "the acting"] * 2, max_new_tokens=12)
    adv = rollout.masked_whiten(torch.randn_like(r.response_mask), r.response_mask)
    return r, adv


@pytest.mark.parametrize("chunk", [0, 5])
def test_gradient_accumulation_gives_the_update_of_one_big_batch(tiny_policy, chunk):
    import copy
    r, adv = accumulation_setup(tiny_policy)
    grads, stats = [], []
    for micro in (0, 2, 1):
        policy = copy.deepcopy(tiny_policy[0]).train()
        args = dvpo.Args(micro_batch_size=micro, logprob_chunk=chunk, max_grad_norm=1e9)
        prec = rollout.Precision("fp32", "cpu")
        old = rollout.old_logprobs(policy, r, [torch.arange(8)], args, prec) - 0.1 * r.response_mask  # ratio != 1
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        stats.append(rollout.policy_step(policy, opt, prec, r, old, adv, args))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    for g, s in zip(grads[1:], stats[1:]):
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)
        assert s == pytest.approx(stats[0], rel=1e-4, abs=1e-6)


def test_gvm_gradient_accumulation_gives_the_update_of_one_big_batch(tiny_backbone):
    import copy
    backbone, tok = gvm.load_backbone(tiny_backbone)
    torch.manual_seed(0)
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    samples = gvm.pair_samples(PAIRS * 2, tok, 64, "test")
    for objective in (gvm.TDObjective(gvm.Args()), reward.BradleyTerry()):
        grads = []
        for micro in (0, 2):
            m = copy.deepcopy(model)
            opt = torch.optim.SGD(m.parameters(), lr=0.0)
            gvm.train_step(m, samples, objective, opt, rollout.Precision("fp32", "cpu"), tok.pad_token_id, "cpu", micro)
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_bf16_keeps_trained_weights_in_fp32_and_frozen_ones_in_bf16(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    seen = {}
    real_train = loop.rl_train

    def spy(args, algo, policy, ref, *rest):
        seen.update(policy=policy.dtype, ref=ref.dtype, gvm=next(algo.value_model.parameters()).dtype)
        return real_train(args, algo, policy, ref, *rest)

    monkeypatch.setattr(loop, "rl_train", spy)
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--dtype", "bf16", "--micro-batch-size", "2",
                             "--logprob-chunk", "8", "--gradient-checkpointing", "--forward-batch-size", "4"))
    assert seen == {"policy": torch.float32, "ref": torch.bfloat16, "gvm": torch.bfloat16}
    steps = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if "objective/kl" in x]
    assert len(steps) == 3 and all(m["val/ratio_first_max_dev"] == 0.0 for m in steps)
    assert all(torch.isfinite(torch.tensor(m["loss/policy"])) for m in steps)


# ---------------------------------------------------------------------------------------------- resume
def training_records(path):
    """metrics.jsonl without what depends on the clock or the process (time/*, RSS)."""
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/") and not k.endswith("rss_bytes")}
            for x in path.read_text().splitlines()]


@pytest.mark.parametrize("script", ["dvpo", "ppo", "dvpo-gpt2", "dvpo-lora", "ppo-lora", "grpo", "remax"])
def test_a_resumed_run_matches_an_uninterrupted_one(tiny_world, tiny_gvm, families, tmp_path, script):
    """Also restored: the adaptive KL coefficient, fp16 loss scales (ppo: two), and, for a GPT-2 policy, a
    reference whose added pad token must get the same row in every process."""
    import grpo_baseline
    import remax_baseline
    value_model = str(tiny_gvm)
    if script == "dvpo-gpt2":
        backbone, tok = gvm.load_backbone(str(families / "gpt2"))
        gvm.save_value_model(gvm.ValueModel(backbone), tok, str(tmp_path / "gvm-gpt2"), {"kind": "gvm"})
        value_model = str(tmp_path / "gvm-gpt2")

    def run(out, *extra):
        argv = tiny_dvpo_argv(tiny_world, value_model, out, "--eval-every", "2", "--save-every", "2",
                              "--adaptive-kl", "--target-kl", "0.5", "--kl-horizon", "20", *extra)
        argv += ["--lora-r", "4", "--lr", "3e-3"] if script.endswith("lora") else []
        if script != "dvpo" and not script.startswith("dvpo-"):
            argv[argv.index("--gvm"):argv.index("--gvm") + 2] = ["--rm", str(rm)]
        if script.startswith("ppo"):
            ppo_baseline.main(argv + ["--dtype", "fp16"])
        elif script == "grpo":
            grpo_baseline.main(argv + ["--group-size", "2"])
        elif script == "remax":
            remax_baseline.main(argv)
        else:
            dvpo.main(argv + (["--policy", str(families / "gpt2")] if script == "dvpo-gpt2" else []))

    rm = tmp_path / "rm"
    if not script.startswith("dvpo"):
        model, tok, _ = gvm.load_value_model(str(tiny_gvm))
        gvm.save_value_model(model, tok, str(rm), {"kind": "reward-model"})
    run(tmp_path / "full", "--steps", "4")
    run(tmp_path / "half", "--steps", "2")
    assert (tmp_path / "half" / loop.STATE_FILE).exists()
    run(tmp_path / "half", "--steps", "4", "--resume")
    full, resumed = training_records(tmp_path / "full" / "metrics.jsonl"), training_records(tmp_path / "half" / "metrics.jsonl")
    assert len(full) == 7 and resumed == full  # evals at 0, 2, 4 and four steps, every number equal
    betas = [m["objective/kl_coef"] for m in full if "objective/kl_coef" in m]
    assert len(set(betas)) == 4  # the controller moved beta at every step


def test_a_resumed_dpo_run_matches_an_uninterrupted_one(tiny_world, tmp_path):
    import dpo_baseline
    pairs = tmp_path / "pairs.jsonl"  # 24 pairs: 3 steps of 8 per epoch
    pairs.write_text("".join((tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines(keepends=True)[:24]))

    def run(out, epochs, *extra):
        dpo_baseline.main(["--policy", str(tiny_world / "sft"), "--data", str(pairs), "--eval-data", str(pairs),
                           "--eval-prompts", str(tiny_world / "data" / "prompts_eval.jsonl"), "--eval-n", "8",
                           "--max-new-tokens", "16", "--batch-size", "8", "--eval-every", "2", "--save-every", "2",
                           "--lr", "3e-3", "--epochs", str(epochs), "--out", str(out), *extra])

    run(tmp_path / "full", 2)
    run(tmp_path / "half", 1)
    assert (tmp_path / "half" / loop.STATE_FILE).exists()
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
    with runtime.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("step 2")
    real_rename, calls = os.rename, []

    def crash_between_renames(a, b):  # the old output is moved aside, then the process dies
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", crash_between_renames)
    with pytest.raises(KeyboardInterrupt):
        with runtime.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model"), "w").write("step 4")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()  # mid-swap: only the backup holds step 2
    runtime.restore_interrupted(str(out))
    assert (out / "model").read_text() == "step 2" and os.listdir(tmp_path) == ["run"]
    with runtime.atomic_dir(str(out)) as tmp:  # a save that completes replaces it and leaves no backup behind
        open(os.path.join(tmp, "model"), "w").write("step 4")
    assert (out / "model").read_text() == "step 4" and os.listdir(tmp_path) == ["run"]


def test_resume_without_a_checkpoint_is_a_one_line_error(tiny_world, tiny_gvm, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "nothing", "--resume"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--resume: " in err and "no resumable checkpoint" in err


# ---------------------------------------------------------------------------------------------- real model families
# Tiny random-init GPT-2 / Llama / Qwen2 checkpoints with their own tokenizers, built here: nothing is downloaded.
_SUBJECTS = ["the movie", "the film", "this show", "the plot", "the acting", "the ending", "the story", "the music"]
_VERBS = ["was", "is", "felt", "seemed"]
_ADJS = ["good", "bad", "great", "dull", "boring", "funny", "slow", "brilliant", "awful", "fine"]
_JOINS = ["but", "and", "because", "although"]

# a few hundred deterministic review-like sentences, plus some punctuation / digits / newlines
CORPUS = [f"{s} {v} {a} {j} {s2} {v} {a2} ." for (s, v, a, j), s2, a2 in
          zip(itertools.product(_SUBJECTS, _VERBS, _ADJS, _JOINS), itertools.cycle(reversed(_SUBJECTS)),
              itertools.cycle(_ADJS[3:] + _ADJS[:3]))][:400]
CORPUS += ["I liked it!\nWould watch again: 10/10.", "Not my thing, sorry?\n\nRating: 3/10."]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# kind -> (special tokens, PreTrainedTokenizerFast kwargs, chat template)
_TOKENIZER_SPECS = {
    "gpt2": (["<|endoftext|>"],
             dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"), None),
    "llama": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
              dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None), CHATML_TEMPLATE),
}
# transformers 5's AutoTokenizer always re-creates a qwen2 folder's tokenizer as Qwen2Tokenizer, rebuilt from
# vocab+merges with this regex split + NFC; train with the same pipeline so the saved tokenizer.json is what loads.
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_hf_tokenizer(kind, vocab_size=500):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials, token_kwargs, chat_template = _TOKENIZER_SPECS[kind]
    tok = Tokenizer(models.BPE())
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)  # also registers `specials` as special added tokens
    if kind == "llama":  # prepend BOS when add_special_tokens=True, like Llama-3
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", clean_up_tokenization_spaces=False,
                                   model_max_length=256, **token_kwargs)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(kind, folder, seed=0):
    """A random-init GPT-2, Llama or Qwen2 with a byte-level BPE tokenizer that mimics the real family's special
    tokens and chat template (GPT-2: no pad, no template; Llama-3: no pad; Qwen2.5: pad, ChatML), saved to folder."""
    from transformers import (GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    tok = build_hf_tokenizer(kind)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            tie_word_embeddings=True, **ids)
        model_cls = GPT2LMHeadModel
    elif kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **sizes, **ids)
        model_cls = LlamaForCausalLM
    elif kind == "qwen2":  # real Qwen has spare embedding rows beyond the tokenizer
        config = Qwen2Config(vocab_size=-(-len(tok) // 64) * 64, tie_word_embeddings=True, **sizes, **ids)
        model_cls = Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown kind {kind!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


FAMILIES = ("gpt2", "llama", "qwen2")


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    for kind in FAMILIES:
        build_tiny_model(kind, str(root / kind))
    return root


def pair_files(tiny_world, folder):
    """The tiny world's pairs in the three shapes people have: strings, UltraFeedback-style message lists and
    HH-RLHF transcripts."""
    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()][:24]

    def turns(p, a):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    shapes = {"strings": rows,
              "messages": [{"prompt": r["prompt"], "chosen": turns(r["prompt"], r["chosen"]),
                            "rejected": turns(r["prompt"], r["rejected"])} for r in rows],
              "hh": [{"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                      "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}"} for r in rows]}
    return {name: write_jsonl(folder / f"{name}.jsonl", r) for name, r in shapes.items()}


def test_families_get_a_pad_token_that_is_not_eos_and_never_sample_it(families):
    for kind in FAMILIES:
        policy, tok = data.load_pretrained(str(families / kind))
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, kind
        assert policy.get_input_embeddings().num_embeddings >= len(tok) and policy.config.pad_token_id == tok.pad_token_id
        assert tok.pad_token == {"gpt2": data.PAD_TOKEN, "llama": data.PAD_TOKEN, "qwen2": "<|endoftext|>"}[kind]
    policy, tok = data.load_pretrained(str(families / "gpt2"))
    with torch.no_grad():  # make the new, untrained pad token the likeliest next token everywhere
        policy.get_output_embeddings().weight[tok.pad_token_id] = 50 * policy.get_output_embeddings().weight.mean(0)
        policy.lm_head.bias = None
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was"] * 4, max_new_tokens=20)
    assert not (r.response_ids[r.response_mask.bool()] == tok.pad_token_id).any()
    # log-probs, like sampling, leave the pad token out of the softmax, or the ratio and the KL would use a
    # distribution the samples were not drawn from
    logits = rollout.logits_at_responses(policy, r)
    keep = torch.arange(logits.shape[-1]) != tok.pad_token_id
    ids = r.response_ids.masked_fill(r.response_mask == 0, 0)
    ref = torch.log_softmax(logits[..., keep], -1).gather(-1, (ids - (ids > tok.pad_token_id).long())[..., None])
    for chunk in (0, 7):
        logp, entropy = rollout.response_logprobs(policy, r, with_entropy=True, chunk=chunk)
        assert torch.allclose(logp, ref.squeeze(-1) * r.response_mask, atol=1e-5) and torch.isfinite(entropy).all()


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("shape", ["strings", "messages", "hh"])
def test_families_round_trip_through_gvm_and_dvpo(families, tiny_world, tmp_path, kind, shape, capsys):
    files = pair_files(tiny_world, tmp_path)
    model = str(families / kind)
    gvm_argv = ["--model", model, "--data", files[shape], "--eval-data", files[shape], "--out", str(tmp_path / "gvm"),
                "--max-steps", "3", "--batch-size", "8", "--eval-every", "3"]
    if shape == "messages" and kind == "gpt2":  # a conversation needs a chat template, which GPT-2 has not
        with pytest.raises(SystemExit) as e:
            gvm.main(gvm_argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "gvm").exists()
        assert "no usable rows (row 1: is a conversation, but the tokenizer has no chat template" in err
        return
    gvm.main(gvm_argv)
    meta = json.loads((tmp_path / "gvm" / gvm.META_FILE).read_text())
    assert meta["base_model"] == model
    # the GVM saw each prompt exactly as the RL scripts encode it (chat template, BOS, no double BOS)
    _, tok = data.load_pretrained(model)
    pairs = data.load_pairs(files[shape], "train", "--data")
    samples = gvm.pair_samples(pairs, tok, 512, "test")
    prompts = data.load_prompts(files[shape], "train", "--prompts", tok)
    assert [s[0] for s in samples[0::2]] == [ids for _, ids in prompts]
    first = tok.decode(prompts[0][1])
    if shape == "messages":
        assert first.endswith({"llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                               "qwen2": "<|im_start|>assistant\n"}[kind])
        assert first.count(tok.bos_token or "<none>") <= 1
    if shape == "hh":
        assert first.endswith("Assistant:")
    dvpo.main(["--gvm", str(tmp_path / "gvm"), "--policy", model, "--prompts", files[shape], "--eval-prompts",
               files[shape], "--out", str(tmp_path / "dvpo"), "--steps", "2", "--batch-size", "4",
               "--minibatch-size", "2", "--ppo-epochs", "1", "--eval-every", "2", "--eval-n", "4",
               "--max-new-tokens", "8"])
    steps = training_records(tmp_path / "dvpo" / "metrics.jsonl")
    assert [m["step"] for m in steps if "objective/kl" in m] == [1, 2]
    assert not any("objective/gold" in m or "eval/gold" in m for m in steps)  # VADER means nothing off the world
    assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps if "objective/kl" in m)
    _, saved_tok = data.load_pretrained(str(tmp_path / "dvpo"))
    assert data.tokenizer_fingerprint(saved_tok) == meta["tokenizer_fingerprint"]


def test_a_value_model_from_another_tokenizer_or_template_is_refused(families, tiny_world, tmp_path, capsys):
    files = pair_files(tiny_world, tmp_path)
    gvm.main(["--model", str(families / "gpt2"), "--data", files["strings"], "--eval-data", files["strings"],
              "--out", str(tmp_path / "gvm"), "--max-steps", "1"])
    model, tok = data.load_pretrained(str(families / "qwen2"))
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    model.save_pretrained(tmp_path / "qwen2-other-template")
    tok.save_pretrained(tmp_path / "qwen2-other-template")
    gvm.main(["--model", str(families / "qwen2"), "--data", files["messages"], "--eval-data", files["messages"],
              "--out", str(tmp_path / "gvm-qwen2"), "--max-steps", "1"])
    capsys.readouterr()
    for gvm_dir, policy in ((tmp_path / "gvm", families / "llama"), (tmp_path / "gvm-qwen2", tmp_path / "qwen2-other-template")):
        with pytest.raises(SystemExit) as e:
            dvpo.main(["--gvm", str(gvm_dir), "--policy", str(policy), "--prompts", files["strings"],
                       "--eval-prompts", "", "--out", str(tmp_path / "out"), "--steps", "1"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "with another tokenizer than --policy" in err, err
        assert not (tmp_path / "out").exists()


def test_a_datasetdict_folder_with_named_splits_feeds_gvm_and_dvpo(families, tiny_world, tmp_path):
    """The README's one-GPU commands in miniature: UltraFeedback-shaped rows in a save_to_disk DatasetDict
    with train_prefs / test_prefs splits, --split and --eval-split, a Qwen2-style model."""
    import datasets
    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()][:24]

    def conv(r):
        u = {"role": "user", "content": r["prompt"]}
        chosen, rejected = [u, {"role": "assistant", "content": r["chosen"]}], [u, {"role": "assistant", "content": r["rejected"]}]
        return {"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "messages": chosen}
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([conv(r) for r in rows[:16]]),
                          "test_prefs": datasets.Dataset.from_list([conv(r) for r in rows[16:]])}).save_to_disk(tmp_path / "uf")
    D, M = str(tmp_path / "uf"), str(families / "qwen2")
    summary = gvm.train(gvm.Args(model=M, data=D, split="train_prefs", eval_data=D, eval_split="test_prefs",
                                 max_steps=1, out=str(tmp_path / "gvm"), dtype="bf16", micro_batch_size=4))
    assert (summary["train/pairs"], summary["eval/pairs"]) == (16, 8)
    dvpo.main(["--gvm", str(tmp_path / "gvm"), "--policy", M, "--prompts", D, "--split", "train_prefs",
               "--eval-prompts", D, "--eval-split", "test_prefs", "--out", str(tmp_path / "dvpo"), "--steps", "1",
               "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "2", "--eval-every", "1",
               "--eval-n", "4", "--max-new-tokens", "8", "--dtype", "bf16", "--logprob-chunk", "4"])
    assert json.loads((tmp_path / "dvpo" / "summary.json").read_text())["train/steps"] == 1
    with pytest.raises(runtime.UsageError, match="no split 'nope' \\(splits: train_prefs, test_prefs\\)"):
        data.load_rows(D, "nope")


def test_the_analytic_memory_model_counts_a_configs_parameters(families, capsys):
    import compare
    res = compare.analytic_memory(compare.Args(analytic=str(families / "qwen2"), batch_size=2))
    model, _ = data.load_pretrained(str(families / "qwen2"))
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
        assert gpus[1][f"ddp {m}"] * 2 ** 30 == pytest.approx(one[m] + one["activations"])  # one GPU: one GPU's table
        assert gpus[1][f"fsdp {m}"] == gpus[1][f"fsdp+frozen {m}"] == gpus[1][f"ddp {m}"]  # one process shards nothing
        # 4 GPUs: FSDP2 leaves 1/4 of the trained 16 bytes per parameter; --shard-frozen 1/4 of the frozen 2
        frozen = 2 * (2 * n + model.config.hidden_size + 1)
        gathered = 8 * (n - layers * layer + layer)  # fp32 weights and gradients of the root group and one layer
        assert (gpus[1][f"fsdp {m}"] - gpus[4][f"fsdp {m}"]) * 2 ** 30 == pytest.approx(
            16 * trained * 3 / 4 - gathered + one["activations"] - (gpus[4][f"ddp {m}"] * 2 ** 30 - one[m]), rel=1e-6)
        assert (gpus[4][f"fsdp {m}"] - gpus[4][f"fsdp+frozen {m}"]) * 2 ** 30 == pytest.approx(frozen * 3 / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------- real checkpoints
def rollout_of(tok, rows, pad_left=0, pad_right=0):
    """A Rollout of (prompt ids, response ids) rows in rollout.generate's layout: prompts left-padded to the
    longest + pad_left, responses right-padded to the longest + pad_right, cut after their first EOS."""
    P, R = max(len(p) for p, _ in rows) + pad_left, max(len(r) for _, r in rows) + pad_right
    ids = torch.full((len(rows), P + R), tok.pad_token_id)
    attention = torch.zeros(len(rows), P + R, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        ids[b, P - len(p):P + len(r)] = torch.tensor(p + r)
        attention[b, P - len(p):P + len(r)] = 1
    response_mask = attention[:, P:].float()
    ended = torch.tensor([r[-1] == tok.eos_token_id for _, r in rows])
    return rollout.Rollout(ids, attention, response_mask, P, ended, ["?"] * len(rows), [""] * len(rows))


def kl_like_rewards(r):
    """Deterministic per-token rewards -0.01 * (t + 1) on each response's tokens."""
    return -0.01 * torch.arange(1, r.response_mask.shape[1] + 1).float()[None] * r.response_mask


def world_rows(tok):
    texts = [("the plot was", " very good ."), ("i", " loved the film but the ending was dull ."), ("overall ,", " bad")]
    return [(data.prompt_ids(tok, p), data.response_ids(tok, x)[:-1 if x == " bad" else None]) for p, x in texts]


def pollute(model, tok):
    """Settings real checkpoints ship in generation_config.json (Qwen2.5-Instruct: repetition_penalty), and
    others a checkpoint may carry: each one would make samples differ from softmax(logits / T)."""
    model.generation_config.update(do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=4, top_k=3,
                                   top_p=0.5, temperature=0.2, max_new_tokens=2,
                                   bad_words_ids=[[tok.convert_tokens_to_ids(tok.tokenize(" the")[0])]])
    return model


@pytest.mark.parametrize("kind", ["world", "qwen2", "qwen2-lora"])
def test_a_polluted_generation_config_samples_exactly_as_a_clean_one(tiny_world, families, tmp_path, kind):
    path = str(tiny_world / "sft") if kind == "world" else str(families / "qwen2")
    prompts = ["the plot was", "i", "overall , it was a", "the acting"] * 3
    clean, tok = data.load_pretrained(path)
    if kind != "world":  # a random model's near-uniform next-token distribution hardly feels a penalty: sharpen it
        with torch.no_grad():
            clean.get_output_embeddings().weight.mul_(30)
    dirty = copy.deepcopy(clean)
    pollute(dirty, tok).save_pretrained(tmp_path / "dirty")
    tok.save_pretrained(tmp_path / "dirty")
    dirty, _ = data.load_pretrained(str(tmp_path / "dirty"))
    assert dirty.generation_config.repetition_penalty == 1.3  # the checkpoint really carries it
    runs = []
    for model in (clean, dirty):
        if kind.endswith("lora"):  # a LoRA policy: generate() runs on the base model inside the peft wrapper
            model = lora.add_lora(model, 4, 8.0, 0.0)
        torch.manual_seed(0)
        runs.append(rollout.generate(model, tok, prompts, max_new_tokens=16, temperature=0.9))
    assert torch.equal(runs[0].input_ids, runs[1].input_ids) and torch.equal(runs[0].response_mask, runs[1].response_mask)
    assert dirty.generation_config.repetition_penalty == 1.3  # and it is left as the checkpoint has it
    if kind == "world":  # the world's own pair sampling
        texts = []
        for model in (clean, pollute(clean, tok)):
            torch.manual_seed(0)
            texts.append(world.sample_responses(model, tok, prompts, 16, 5, progress=False))
        assert texts[0] == texts[1]


def test_generation_stops_on_every_eos_id_the_model_declares(families):
    """Llama-3-Instruct declares [<|end_of_text|>, <|eom_id|>, <|eot_id|>]: a response ends at the first of any."""
    policy, tok = data.load_pretrained(str(families / "llama"))
    other = tok.convert_tokens_to_ids("<|end_of_text|>")
    policy.generation_config.eos_token_id = [other, tok.eos_token_id]
    policy.lm_head.bias = torch.nn.Parameter(torch.zeros(policy.lm_head.out_features))
    with torch.no_grad():
        policy.lm_head.bias[other] = 4.0  # the second EOS id ends many responses early, not all
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i"] * 16, max_new_tokens=12)
    eos = torch.tensor([other, tok.eos_token_id])
    ends_on_other = 0
    for b in range(len(r.prompts)):
        n = int(r.response_mask[b].sum())
        ids = r.response_ids[b, :n]
        is_eos = torch.isin(ids, eos)
        assert not is_eos[:-1].any(), "an EOS id inside a response: generation or truncation ignored it"
        assert bool(r.ended[b]) == bool(is_eos[-1]) and (bool(is_eos[-1]) or n == 12)
        ends_on_other += int(ids[-1] == other)
    assert 0 < ends_on_other < len(r.prompts)


def step0_kl(policy, ref, tok, prec=None):
    prec = prec or rollout.Precision("fp32", "cpu")
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i", "the ending was good but"] * 4, max_new_tokens=12)
    with prec.autocast():
        return (rollout.kl_k1(rollout.response_logprobs(policy, r), rollout.response_logprobs(ref, r))
                * r.response_mask).sum(1)


@pytest.mark.parametrize("kind", FAMILIES)
def test_policy_equal_to_its_reference_has_kl_exactly_zero(families, kind):
    """Policy and reference are loaded separately, as the trainers do; a pad token added to both (GPT-2,
    Llama 3) must give them the same rows and stay out of the softmax."""
    path = str(families / kind)
    policy, tok = data.load_pretrained(path)
    torch.randn(1000)  # whatever the RNG did in between
    ref, _ = data.load_pretrained(path)
    assert torch.equal(policy.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert (step0_kl(policy, ref, tok) == 0).all()
    ref16, _ = data.load_pretrained(path, dtype=torch.bfloat16)  # --dtype bf16: the frozen copy in bf16
    kl = step0_kl(policy, ref16, tok, rollout.Precision("bf16", "cpu"))
    assert kl.abs().max() < 0.05  # only bf16 rounding is left (README, Reproduce on one GPU)


def test_released_whitens_each_sequence_over_its_own_unpadded_tokens(tiny_gvm):
    """The authors' batched_forward_pass whitens each sequence's values (trl.core.whiten: unbiased variance,
    rsqrt(var + 1e-8)) over its unpadded prompt and response, so a row's advantages do not depend on the
    rest of the batch or on padding."""
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    critic = dvpo.FrozenGVM(dvpo.Args(advantage="released", lam=0.95), model.eval())
    rows = world_rows(tok)
    r = rollout_of(tok, rows)
    together = critic.advantages(r, kl_like_rewards(r))
    for i, (p, x) in enumerate(rows):
        alone_r = rollout_of(tok, [(p, x)], pad_left=3, pad_right=2)
        alone = critic.advantages(alone_r, kl_like_rewards(alone_r))
        assert torch.allclose(together[i, :len(x)], alone[0, :len(x)], atol=1e-5)
        with torch.no_grad():
            v = model(torch.tensor([p + x]), torch.ones(1, len(p + x), dtype=torch.long))[0]
        w = (v - v.mean()) * torch.rsqrt(v.var() + 1e-8)
        expected = released_closed_form(w[len(p) - 1:].tolist(), kl_like_rewards(alone_r)[0].tolist(), len(x), 0.95)
        assert alone[0, :len(x)].tolist() == pytest.approx(expected, abs=1e-5)


def test_learned_critic_advantages_line_up_with_each_response_whatever_the_padding(tiny_gvm):
    rm, tok, _ = gvm.load_value_model(str(tiny_gvm))
    critic = ppo_baseline.LearnedCritic(ppo_baseline.Args(gamma=1.0, lam=0.9), rm, gvm.load_value_model(str(tiny_gvm))[0], "cpu")
    rows = world_rows(tok)
    r = rollout_of(tok, rows)
    together, returns = critic.advantages(r, kl_like_rewards(r)), critic.returns
    for i, (p, x) in enumerate(rows):
        with torch.no_grad():  # by hand on the unpadded sequence: V(s_t) at position P-1+t, the score at EOS
            v = critic.critic(torch.tensor([p + x]), torch.ones(1, len(p + x), dtype=torch.long))[0, len(p) - 1:]
        rewards = kl_like_rewards(rollout_of(tok, [(p, x)]))[0]
        rewards[-1] += v[-1]  # the critic starts as the reward model: its V(s_T) is the score
        adv, ret, last = [0.0] * len(x), [0.0] * len(x), 0.0
        for t in reversed(range(len(x))):
            nxt = v[t + 1].item() if t + 1 < len(x) else 0.0
            last = rewards[t].item() + nxt - v[t].item() + 0.9 * last
            adv[t], ret[t] = last, last + v[t].item()
        assert together[i, :len(x)].tolist() == pytest.approx(adv, abs=1e-5)
        assert returns[i, :len(x)].tolist() == pytest.approx(ret, abs=1e-5)
        assert (together[i, len(x):] == 0).all() and (returns[i, len(x):] == 0).all()


def test_world_pairs_concatenate_to_the_text_the_project_encodes(tiny_world):
    """TRL (and every peer taking prompt/chosen/rejected text) encodes prompt + chosen as one text."""
    _, tok = data.load_pretrained(str(tiny_world / "sft"))
    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("chosen", "rejected"):
            ours = data.prompt_ids(tok, row["prompt"]) + data.response_ids(tok, row[key])
            assert tok(row["prompt"] + row[key])["input_ids"] + [tok.eos_token_id] == ours, row


@pytest.mark.parametrize("kind", ["world", "gpt2", "qwen2"])
def test_sampled_texts_continue_their_prompts(tiny_world, families, kind):
    """A response's text is what follows the prompt: prompt + text re-encodes to the sampled tokens."""
    policy, tok = data.load_pretrained(str(tiny_world / "sft") if kind == "world" else str(families / kind))
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the plot was", "i"] * 4, max_new_tokens=10)
    for b in range(len(r.prompts)):
        n = int(r.response_mask[b].sum()) - int(r.ended[b])
        if kind == "world":  # a random BPE model samples token sequences that BPE would spell otherwise
            assert tok(r.prompts[b] + r.texts[b])["input_ids"][-n:] == r.response_ids[b, :n].tolist()
        assert tok.decode(tok(r.prompts[b])["input_ids"], skip_special_tokens=True) + r.texts[b] == \
            tok.decode(r.input_ids[b], skip_special_tokens=True)


def test_resume_restores_both_fp16_loss_scales(tiny_world, tiny_gvm, tmp_path):
    """PPO under --dtype fp16 has two GradScalers (policy, critic); their scales drop after overflows and must
    come back on --resume. The checkpoint is edited as if both had dropped."""
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "run", "--save-every", "1", "--dtype", "fp16")
    argv[argv.index("--gvm"):argv.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm")]
    ppo_baseline.main(argv + ["--steps", "1"])
    path = tmp_path / "run" / loop.STATE_FILE
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
    for extra, flag in ((["--batch-size", "4"], "--batch-size 8"), (["--lr", "0.1"], "--lr 0.0003"),
                        (["--advantage", "static"], "--advantage delta")):
        with pytest.raises(SystemExit) as e:
            dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--resume", *extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and f"was run with {flag}" in err, err
        assert files_digest(out) == before
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--resume", "--eval-every", "1",
                             "--micro-batch-size", "2", "--forward-batch-size", "4"))
    assert json.loads((out / "summary.json").read_text())["train/steps"] == 2


def test_dropout_read_from_the_config_at_forward_time_is_off_and_saved_as_it_was(tmp_path):
    """Falcon reads hidden_dropout and attention_dropout from its config inside forward."""
    from transformers import FalconConfig, FalconForCausalLM
    config = FalconConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          hidden_dropout=0.5, attention_dropout=0.5)
    model = data.disable_dropout(FalconForCausalLM(config)).train()
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(ids).logits, model(ids).logits), "dropout still active in train mode"
    data.save_pretrained(model, None, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["hidden_dropout"], saved["attention_dropout"]) == (0.5, 0.5)
    assert torch.equal(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- loop pieces
def test_adaptive_kl_update_by_hand():
    ctl = loop.AdaptiveKL(0.2, 6.0, 10_000)
    ctl.update(9.0, 64)  # error clipped to +0.2: beta * (1 + 0.2 * 64 / 10000)
    assert ctl.beta == pytest.approx(0.2 * 1.00128)
    ctl.update(5.4, 64)  # error 5.4 / 6 - 1 = -0.1
    assert ctl.beta == pytest.approx(0.2 * 1.00128 * (1 - 0.1 * 64 / 10_000))


def test_kl_rewards_with_the_missing_eos_penalty_by_hand():
    kl = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ended = torch.tensor([False, True])
    rewards = loop.kl_rewards(kl, mask, ended, beta=0.1, missing_eos_penalty=2.0)
    # -beta * kl per token; the response cut by the length budget loses 2.0 on its last token
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, -0.2 - 2.0, -0.1, 0.0, 0.0])


def test_fp16_skips_a_step_on_overflow_and_lowers_the_loss_scale():
    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    prec = rollout.Precision("fp16", "cpu")
    before, scale = layer.weight.detach().clone(), prec.scaler.get_scale()
    prec.backward(layer(torch.full((1, 3), float("inf"))).sum())
    norm = prec.step(opt, layer.parameters(), 1.0)
    assert not torch.isfinite(norm) and torch.equal(layer.weight, before) and prec.scaler.get_scale() == scale / 2
    opt.zero_grad()
    prec.backward(layer(torch.ones(1, 3)).sum())
    prec.step(opt, layer.parameters(), 1.0)
    assert not torch.equal(layer.weight, before)


# ---------------------------------------------------------------------------------------------- bad input and faults
def one_line_error(capsys, call):
    """call() must exit 2 with one line on stderr, 'error: ...', and no traceback: that line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_every_numeric_flag_is_checked_before_any_work(tiny_world, tiny_gvm, tmp_path, capsys):
    import compare
    import evaluate
    sft, pairs = str(tiny_world / "sft"), str(tiny_world / "data" / "pairs_train.jsonl")
    gvm_argv = ["--model", sft, "--data", pairs, "--eval-data", pairs, "--out", str(tmp_path / "out")]
    cases = [(gvm.main, gvm_argv + flags, message) for flags, message in [
        (["--lr", "nan"], "--lr nan: must be a finite number"), (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--max-len", "1"], "--max-len 1: must be >= 2"), (["--seed", "-1"], "--seed -1: must lie in"),
        (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"), (["--max-steps", "0"], "--max-steps 0")]]
    cases += [(dvpo.main, tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", *flags), message) for flags, message in [
        (["--lr", "-1"], "--lr -1.0: must be > 0"), (["--kl-horizon", "0"], "--kl-horizon 0: must be >= 1"),
        (["--adaptive-kl", "--target-kl", "0"], "--target-kl 0.0: must be > 0"),
        (["--cliprange", "-1"], "--cliprange -1.0"), (["--max-grad-norm", "-1"], "--max-grad-norm -1.0"),
        (["--temperature", "inf"], "--temperature inf: must be a finite number"), (["--bogus"], "unrecognized")]]
    rm_argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out")[2:]
    cases += [(ppo_baseline.main, rm_argv + flags, message) for flags, message in [
        (["--critic-lr", "-1"], "--critic-lr -1.0"), (["--rm-lr", "nan"], "--rm-lr nan"), (["--vf-coef", "-1"], "--vf-coef -1.0")]]
    import dpo_baseline
    import grpo_baseline
    import remax_baseline
    cases += [(grpo_baseline.main, rm_argv + flags, message) for flags, message in [
        (["--group-size", "1"], "--group-size 1: must be >= 2"), (["--kl-coef", "-1"], "--kl-coef -1.0")]]
    cases += [(remax_baseline.main, rm_argv + ["--minibatch-size", "3"], "--minibatch-size 3 does not divide --batch-size 8")]
    cases += [(dpo_baseline.main, ["--policy", sft, "--data", pairs, "--out", str(tmp_path / "out"), *flags], message)
              for flags, message in [(["--beta", "0"], "--beta 0.0: must be > 0"), (["--epochs", "0"], "--epochs 0"),
                                     (["--gold", "x"], "--gold x: choose one of")]]
    cases += [(evaluate.main, [sft, "--json", str(tmp_path / "out" / "e.json"), *flags], message) for flags, message in [
        (["--temperature", "0"], "--temperature 0.0: must be > 0"), (["--max-new-tokens", "0"], "--max-new-tokens 0")]]
    cases += [(compare.main, ["--root", str(tmp_path / "out"), *flags], message) for flags, message in [
        (["--seeds", "a"], "--seeds a"), (["--extra", "--bogus 1"], "unrecognized arguments: --bogus"),
        (["--methods", "dvpo,trpo"], "--methods dvpo,trpo: choose from")]]
    cases += [(world.main, ["--out", str(tmp_path / "out"), "--label-flip", "2"], "--label-flip 2.0: must lie in [0, 1]")]
    for main, argv, message in cases:
        err = one_line_error(capsys, lambda: main(argv))
        assert message in err, (argv, err)
        assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == [], argv


def test_output_paths_are_checked_before_any_work_and_no_user_file_is_moved(tiny_world, tiny_gvm, tmp_path, capsys):
    import compare
    import evaluate
    user_file, user_dir = tmp_path / "notes.txt", tmp_path / "mine"
    user_file.write_text("mine")
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("mine")
    sft, pairs = str(tiny_world / "sft"), str(tiny_world / "data" / "pairs_train.jsonl")
    runs = [lambda out: gvm.main(["--model", sft, "--data", pairs, "--eval-data", pairs, "--out", out]),
            lambda out: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out))]
    for run in runs:
        for out, message in ((user_file, "notes.txt: is a file"), (user_dir, "mine: a folder these scripts did not write"),
                             (user_file / "run", "notes.txt is a file, not a folder"),
                             ("/proc/dvpo-run", "cannot write in /proc")):
            assert message in one_line_error(capsys, lambda: run(str(out)))
    assert user_file.read_text() == "mine" and (user_dir / "thesis.tex").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]  # nothing moved aside, nothing left behind
    for main, argv, message in ((evaluate.main, [sft, "--json", "/proc/x/eval.json"], "--json /proc/x/eval.json: cannot write"),
                                (evaluate.main, [sft, "--json", str(user_dir)], "is a folder; name a file"),
                                (compare.main, ["--root", "/proc/bench"], "--root /proc/bench: cannot write"),
                                (compare.main, ["--root", str(tmp_path / "b"), "--json", "/proc/c.json"], "--json /proc/c.json")):
        assert message in one_line_error(capsys, lambda: main(argv))
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]
    evaluate.main([sft, "--n-prompts", "4", "--json", str(tmp_path / "new" / "dir" / "eval.json")])  # a missing folder is made
    assert json.loads((tmp_path / "new" / "dir" / "eval.json").read_text())["results"][0]["n"] == 4


def short_gpt2(families, folder, positions):
    """The GPT-2 family's tokenizer on a GPT-2 with only `positions` positions: longer inputs crash its embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = data.load_tokenizer(str(families / "gpt2"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_sequences_longer_than_the_model_positions_are_dropped_or_refused(families, tiny_world, tmp_path, capsys):
    model = short_gpt2(families, tmp_path / "short", 64)
    hh = pair_files(tiny_world, tmp_path)["hh"]  # "\n\nHuman: ... \n\nAssistant: ..." transcripts of 20 to 190 tokens
    gvm.main(["--model", model, "--data", hh, "--eval-data", hh, "--out", str(tmp_path / "gvm"), "--max-steps", "2"])
    out = capsys.readouterr().out
    assert "whose prompt + response exceed the model's 64 positions" in out and "dropped" in out
    dvpo.main(["--gvm", str(tmp_path / "gvm"), "--policy", model, "--prompts", hh, "--eval-prompts", hh,
               "--out", str(tmp_path / "dvpo"), "--steps", "1", "--batch-size", "2", "--minibatch-size", "2",
               "--eval-every", "1", "--eval-n", "2", "--max-new-tokens", "24"])
    assert "whose prompt leaves fewer than --max-new-tokens 24 of the model's 64 positions" in capsys.readouterr().out
    err = one_line_error(capsys, lambda: gvm.main(["--model", model, "--data", hh, "--eval-data", hh, "--strict",
                                                   "--out", str(tmp_path / "gvm2")]))
    assert "bad rows (--strict)" in err and "its prompt + response exceed the model's 64 positions" in err
    err = one_line_error(capsys, lambda: dvpo.main(["--gvm", str(tmp_path / "gvm"), "--policy", model, "--prompts", hh,
                                                    "--out", str(tmp_path / "dvpo2"), "--max-new-tokens", "64"]))
    assert "--max-new-tokens 64: --policy" in err and "has only 64 positions" in err


def test_inputs_are_checked_before_any_expensive_step(tiny_world, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    trained = []
    monkeypatch.setattr(gvm, "train", lambda *a, **k: trained.append(a))
    argv = ["--policy", str(tiny_world / "sft"), "--data", str(tiny_world / "data" / "pairs_train.jsonl"),
            "--prompts", str(empty), "--rm-out", str(tmp_path / "rm"), "--out", str(tmp_path / "ppo")]
    assert "empty.jsonl" in one_line_error(capsys, lambda: ppo_baseline.main(argv))
    assert not trained and not (tmp_path / "rm").exists()  # stage A never started
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "gvm.py"), "--data", str(broken)], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "row 2 is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()  # the default --model's world was not built for a bad --data


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_half_written_output(tiny_world, tiny_gvm, tmp_path):
    import signal
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "dvpo.py"),
                             *tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1000", "--save-every", "2")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT, and a child would inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("step 3/"):  # a checkpoint at step 2 exists; the next save is under way soon
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: the output folder holds the last complete save, if any"], err
    assert json.loads((out / "summary.json").read_text())["train/steps"] >= 2
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder left


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.run(["true"]).args and subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".run-tmp-{dead.pid}-abc", tmp_path / f".run-tmp-{os.getpid()}-xyz"
    stale.mkdir()
    live.mkdir()
    with runtime.atomic_dir(str(tmp_path / "run")) as tmp:
        open(os.path.join(tmp, "model"), "w").write("ok")
    assert not stale.exists() and live.exists() and (tmp_path / "run" / "model").read_text() == "ok"


def test_a_damaged_checkpoint_is_named_in_one_line(tiny_world, tiny_gvm, tmp_path, capsys):
    out = tmp_path / "run"
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1", "--save-every", "1"))
    capsys.readouterr()
    for name, message in ((loop.STATE_FILE, f"{loop.STATE_FILE} is damaged"), ("model.safetensors", "gave no model")):
        backup = (out / name).read_bytes()
        for damaged in (b"", backup[:len(backup) // 2]):
            (out / name).write_bytes(damaged)
            err = one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2",
                                                                          "--save-every", "1", "--resume")))
            assert message in err and str(out) in err, err
        (out / name).write_bytes(backup)


def test_evaluate_checks_a_gvms_tokenizer_and_builds_no_world_for_it(families, tiny_world, tmp_path, capsys):
    import evaluate
    files = pair_files(tiny_world, tmp_path)
    gvm.main(["--model", str(families / "gpt2"), "--data", files["strings"], "--eval-data", files["strings"],
              "--out", str(tmp_path / "gvm"), "--max-steps", "1"])
    err = one_line_error(capsys, lambda: evaluate.main([str(families / "llama"), "--prompts", files["strings"],
                                                        "--gvm", str(tmp_path / "gvm")]))
    assert "with another tokenizer than" in err
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # no --pairs, a GVM trained on other data: no accuracy on the world's movie-review pairs, no world built
        evaluate.main([str(families / "gpt2"), "--prompts", files["strings"], "--gvm", str(tmp_path / "gvm"),
                       "--n-prompts", "2", "--max-new-tokens", "4"])
    finally:
        os.chdir(cwd)
    assert "no held-out pairs for its accuracy" in capsys.readouterr().out and not (tmp_path / "ckpt").exists()


def test_a_malformed_jsonl_line_is_named_by_its_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n{"prompt": "a", "chosen": "b",\n')
    with pytest.raises(runtime.UsageError, match=r"p.jsonl: cannot read it \(row 3 is not valid JSON"):
        data.load_rows(str(path))


def test_the_world_build_logs_progress_lines_when_not_on_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "world.py"), "--out", str(tmp_path / "w"),
                           "--n-train-prompts", "40", "--n-eval-prompts", "10", "--sft-steps", "20", "--sft-batch", "8"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("world: SFT policy: ") and ", loss " in line for line in lines) == 10
    assert any(line.startswith("world: pairs (2/2): 1/1") for line in lines)


# ---------------------------------------------------------------------------------------------- LoRA and 8-bit AdamW
def randomise_adapters(model, seed=0):
    """A trained-looking adapter: LoRA's B starts at zero, so the adapted model would equal its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_reference_is_the_base_and_the_merged_checkpoint_is_the_adapted_model(families, tmp_path, kind):
    path = str(families / kind)
    base, tok = data.load_pretrained(path)
    policy = lora.add_lora(data.load_model(path, tok), 4, 8.0, 0.0)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
        {n for n, _ in policy.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    ref = lora.WithoutAdapters(policy)
    assert list(ref.parameters()) == []  # no second copy of the base weights
    assert (step0_kl(policy, ref, tok) == 0).all()  # B = 0: the adapted model starts as its base, exactly
    randomise_adapters(policy)
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i"] * 2, max_new_tokens=8)
    assert torch.equal(rollout.response_logprobs(ref, r), rollout.response_logprobs(base, r))
    assert not torch.equal(rollout.response_logprobs(policy, r), rollout.response_logprobs(base, r))
    data.save_pretrained(policy, tok, str(tmp_path / "out"))
    merged, _ = data.load_pretrained(str(tmp_path / "out"))  # a plain folder: no adapter, no project code needed
    assert torch.allclose(rollout.response_logprobs(merged, r), rollout.response_logprobs(policy, r), atol=1e-5)
    assert (tmp_path / "out" / lora.ADAPTER_DIR / "adapter_config.json").exists()


def test_a_lora_dvpo_run_keeps_the_base_and_the_gvm_bit_identical(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    seen = {}
    real_train = loop.rl_train

    def spy(args, algo, policy, ref, *rest):
        seen["base"] = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
        seen["policy"], seen["ref"] = policy, ref
        return real_train(args, algo, policy, ref, *rest)

    monkeypatch.setattr(loop, "rl_train", spy)
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--lora-r", "4", "--lr", "3e-3",
                             "--lora-targets", "q_proj,v_proj,down_proj"))
    policy = seen["policy"]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in policy.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj", "down_proj"}
    after = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    assert after.keys() == seen["base"].keys() and all(torch.equal(after[n], seen["base"][n]) for n in after)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in policy.named_parameters() if "lora_B" in n)
    assert list(seen["ref"].parameters()) == []
    steps = training_records(tmp_path / "out" / "metrics.jsonl")
    assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps if "objective/kl" in m)
    assert steps[0]["eval/kl"] == 0.0  # policy = reference before the first update
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert summary["params/trained"] == trained and summary["params/frozen"] == \
        sum(p.numel() for p in after.values()) + sum(p.numel() for p in gvm.load_value_model(str(tiny_gvm))[0].parameters())


def test_lora_value_models_train_the_head_in_full_and_ppo_holds_one_base_per_backbone(tiny_world, tiny_gvm, tmp_path):
    pairs = str(tiny_world / "data" / "pairs_train.jsonl")
    gvm.main(["--model", str(tiny_world / "sft"), "--data", pairs, "--eval-data", pairs, "--out", str(tmp_path / "gvm"),
              "--max-steps", "3", "--lora-r", "4", "--lr", "1e-2"])
    summary = json.loads((tmp_path / "gvm" / "summary.json").read_text())
    model, tok, _ = gvm.load_value_model(str(tmp_path / "gvm"))  # merged: a plain backbone and its head
    assert summary["params/trained"] < summary["params"] / 5 and model.head.weight.abs().sum() > 0
    rm, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(rm, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    args = ppo_baseline.Args(policy=str(tiny_world / "sft"), lora_r=4)
    reward_model, critic = ppo_baseline.reward_model_and_critic(str(tmp_path / "rm"), args, tok, "cpu",
                                                                rollout.Precision("fp32", "cpu"))
    assert list(reward_model.backbone.parameters()) == []  # the reward model is the critic's base, adapters off
    assert {n for n, p in critic.named_parameters() if p.requires_grad} == \
        {n for n, _ in critic.named_parameters() if ".lora_" in n or n.startswith("head.")}
    randomise_adapters(critic)
    ids = torch.tensor([tok("the plot was very good .")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reward_model(ids, torch.ones_like(ids)), rm(ids, torch.ones_like(ids)))
        assert not torch.equal(critic(ids, torch.ones_like(ids)), rm(ids, torch.ones_like(ids)))


def test_8bit_adamw_trains_only_what_trains_and_its_absence_is_one_line(tiny_world, tiny_gvm, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--optim", "adamw8bit", "--lora-r", "4",
                          "--steps", "1", "--lr", "1e-2")
    seen = {}
    real_train = loop.rl_train

    def spy(args, algo, policy, ref, *rest):
        seen["before"] = {n: p.detach().clone() for n, p in policy.named_parameters()}
        seen["policy"] = policy
        return real_train(args, algo, policy, ref, *rest)

    monkeypatch.setattr(loop, "rl_train", spy)
    dvpo.main(argv)
    changed = {n for n, p in seen["policy"].named_parameters() if not torch.equal(p, seen["before"][n])}
    assert changed and changed <= {n for n, p in seen["policy"].named_parameters() if p.requires_grad}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    err = one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out2", "--optim", "adamw8bit")))
    assert "--optim adamw8bit: needs bitsandbytes" in err and not (tmp_path / "out2").exists()


def test_lora_model_states_follow_the_byte_rule_with_one_base_per_backbone(tiny_world, tiny_gvm, tmp_path):
    """Measured tally = 16 B per trained (adapter, critic head) and 2 B per frozen parameter under bf16, where
    the frozen ones are one base per backbone: DVPO the policy's (shared by the reference) and the GVM, PPO
    the policy's and the reward model's (shared by the critic)."""
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    n_backbone = sum(p.numel() for p in model.parameters())
    for script in ("dvpo", "ppo"):
        argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / script, "--lora-r", "4", "--dtype", "bf16", "--steps", "1")
        if script == "ppo":
            argv[argv.index("--gvm"):argv.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm")]
        (ppo_baseline if script == "ppo" else dvpo).main(argv)
        s = json.loads((tmp_path / script / "summary.json").read_text())
        step = [m for m in training_records(tmp_path / script / "metrics.jsonl") if "objective/kl" in m][0]
        assert step["memory/update_state_bytes"] == pytest.approx(16 * s["params/trained"] + 2 * s["params/frozen"], rel=1e-3)
        policy_base = sum(p.numel() for p in data.load_pretrained(str(tiny_world / "sft"))[0].parameters())
        assert s["params/frozen"] == policy_base + n_backbone  # two bases, whatever the method


def test_a_lora_dvpo_run_raises_held_out_gold(default_world):
    cwd, gvm_proc = default_world
    assert gvm_proc.returncode == 0
    # lr 1e-3, as the README's LoRA run: at 3e-3 the fixture's 400-step GVM is over-optimised (gold +0.19 at step 10,
    # back to +0.02 at KL 7.8 by step 20)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dvpo.py"), "--gvm", "ckpt/gvm", "--steps", "30",
                           "--eval-every", "15", "--eval-n", "400", "--lora-r", "8", "--lr", "1e-3", "--out", "ckpt/dvpo-lora"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(line) for line in (cwd / "ckpt" / "dvpo-lora" / "metrics.jsonl").read_text().splitlines()
             if "eval/gold" in line]
    first, last = evals[0], evals[-1]
    assert last["eval/gold"] - last["eval/gold_ci95"] > first["eval/gold"] + first["eval/gold_ci95"], (first, last)


# ---------------------------------------------------------------------------------------------- GRPO, ReMax, DPO
def test_group_advantages_by_hand():
    import grpo_baseline
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])  # a group with a tie, a group of equal rewards
    adv = grpo_baseline.group_advantages(scores, 4)
    std = torch.tensor([1.0, 3.0, 2.0, 2.0]).std().item()  # unbiased: sqrt(2/3)
    assert adv.tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert grpo_baseline.group_advantages(scores, 4, divide_by_std=False).tolist() == pytest.approx([-1, 1, 0, 0, 0, 0, 0, 0])


def test_loss_weights_and_the_kl_term_by_hand(tiny_policy):
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert rollout.loss_weights(mask, "token", 4).flatten().tolist() == pytest.approx([0.25, 0.25, 0.25, 0, 0.25, 0, 0, 0])
    assert rollout.loss_weights(mask, "sequence", 4).flatten().tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0, 0.5, 0, 0, 0])
    assert rollout.loss_weights(mask, "constant", 4).flatten().tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8, 0, 1 / 8, 0, 0, 0])
    policy, tok = tiny_policy
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the plot was", "i"], max_new_tokens=8)
    args = dvpo.Args(max_grad_norm=1e9)
    old = rollout.old_logprobs(policy, r, [torch.arange(2)], args, rollout.Precision("fp32", "cpu"))
    for aggregation in ("token", "sequence"):
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        s = rollout.policy_step(policy, opt, rollout.Precision("fp32", "cpu"), r, old, torch.zeros_like(old), args,
                                old - 0.1 * r.response_mask, 2.0, aggregation)
        # every token's k1 to the reference is 0.1: k3 = e^-0.1 - 1 + 0.1, and any average of it is the same
        assert s["loss/kl"] == pytest.approx(math.exp(-0.1) - 0.9, abs=1e-6) and s["loss/policy"] == 0.0
        assert s["policy/grad_norm"] > 0  # zero advantages: the whole gradient is the KL term's


def test_remax_advantage_is_the_return_against_the_greedy_reward(monkeypatch):
    import remax_baseline
    critic = remax_baseline.GreedyBaseline(remax_baseline.Args(), torch.nn.Linear(1, 1))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = rollout.Rollout(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), mask, 1,
                        torch.tensor([True, True]), ["a", "b"], ["", ""])
    critic.greedy = "the greedy rollout"
    monkeypatch.setattr(reward, "reward_scores", lambda model, x, chunk=0:
                        torch.tensor([0.5, 0.5]) if isinstance(x, str) else torch.tensor([2.0, -1.0]))
    adv = critic.advantages(r, torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]))
    # last token: + (2.0 - 0.5) and + (-1.0 - 0.5); each token's advantage is the sum of the rewards still to come
    assert adv.flatten().tolist() == pytest.approx([0.9, 1.0, 1.2, -1.9, 0.0, 0.0])
    assert critic.score.tolist() == [2.0, -1.0]


def test_dpo_loss_and_implicit_rewards_by_hand():
    import dpo_baseline
    loss, chosen, rejected = dpo_baseline.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                                   torch.tensor([-1.5]), 0.5)
    # beta * log-ratios: 0.5 * 0.5 and 0.5 * -0.5; loss = -log sigmoid(0.5) = 0.474077
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25)) and loss.item() == pytest.approx(0.474077, abs=1e-6)


def test_dpo_logprobs_are_the_trainers_response_logprobs_on_the_pair_tokens(tiny_policy):
    import dpo_baseline
    policy, tok = tiny_policy
    samples = gvm.pair_samples(PAIRS, tok, 64, "test")
    got = dpo_baseline.sequence_logprobs(policy, tok, samples)
    for i, (p, x, _) in enumerate(samples):  # reference: each sequence alone, no padding
        seq = torch.tensor([p + x])
        logp = torch.log_softmax(policy(seq).logits[0, len(p) - 1:-1], -1).gather(-1, seq[0, len(p):, None]).sum()
        assert got[i].item() == pytest.approx(logp.item(), abs=1e-4)


def test_grpo_samples_each_group_independently_from_one_prompt(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    import grpo_baseline
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    seen, real = [], grpo_baseline.GroupBaseline.advantages
    monkeypatch.setattr(grpo_baseline.GroupBaseline, "advantages", lambda self, r, rw: seen.append((r, rw)) or real(self, r, rw))
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--steps", "2")
    argv[argv.index("--gvm"):argv.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm")]
    grpo_baseline.main(argv + ["--group-size", "4"])
    (r, _), (_, rewards) = seen
    steps = training_records(tmp_path / "out" / "metrics.jsonl")
    assert [m for m in steps if "objective/kl" in m][1]["objective/kl"] != 0  # the policy has left its reference
    assert not rewards.any()  # and yet no per-token KL reward: GRPO's KL is in the loss
    assert len(r.prompts) == 8 * 4 and all(len(set(r.prompts[i:i + 4])) == 1 for i in range(0, 32, 4))
    groups = [{tuple(r.response_ids[i + j].tolist()) for j in range(4)} for i in range(0, 32, 4)]
    assert sum(len(g) for g in groups) > 8 * 2  # sampled, not copied: most groups hold different responses
    assert "loss/kl" in [m for m in steps if "objective/kl" in m][0]


@pytest.mark.parametrize("script", ["grpo", "remax", "dpo"])
def test_each_baseline_raises_held_out_gold(default_world, script):
    cwd, gvm_proc = default_world
    assert gvm_proc.returncode == 0
    if not (cwd / "ckpt" / "rm").exists():  # stage A once, shared by the reward-model baselines
        subprocess.run([sys.executable, os.path.join(REPO, "ppo_baseline.py"), "--steps", "1", "--rm-epochs", "1",
                        "--eval-prompts", "", "--out", "ckpt/stage-a"], cwd=cwd, env=ENV, check=True, capture_output=True)
    flags = {"grpo": ["--rm", "ckpt/rm", "--steps", "20", "--eval-every", "10"],
             "remax": ["--rm", "ckpt/rm", "--steps", "20", "--eval-every", "10"],
             "dpo": ["--epochs", "1", "--eval-every", "50"]}[script]
    proc = subprocess.run([sys.executable, os.path.join(REPO, f"{script}_baseline.py"), *flags, "--out", f"ckpt/{script}"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(x) for x in (cwd / "ckpt" / script / "metrics.jsonl").read_text().splitlines() if "eval/gold" in x]
    first, last = evals[0], evals[-1]
    assert last["eval/gold"] - last["eval/gold_ci95"] > first["eval/gold"] + first["eval/gold_ci95"], (first, last)


# ---------------------------------------------------------------------------------------------- torchrun
# The 2-process runs below use gloo on CPU, as a GPU node would use NCCL: the same code. Each launch is
# `python -m torch.distributed.run` (torchrun) with one thread per process.
def torchrun(*argv, nproc=2, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                           *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def ppo_case(sft, fsdp=False, ranks=1, rank=None):
    """A PPO update the equivalence tests compare: the policy's and the critic's steps on 8 sampled responses,
    2 epochs of minibatches of 4, gradients clipped at norm 1. rank None: the whole batch in this process;
    else, under torchrun, this rank's share. (policy state, critic state, statistics), whole on rank 0."""
    import distributed
    policy, tok = data.load_pretrained(sft)
    critic = gvm.ValueModel(gvm.load_backbone(sft)[0])
    torch.manual_seed(0)  # every rank samples the same batch and takes its share of it
    r = rollout.generate(policy, tok, ["the plot was", "i", "overall ,", "the acting"] * 2, max_new_tokens=12)
    lengths = r.response_mask.sum(1)
    assert lengths[:4].sum() != lengths[4:].sum()  # so a rank's own token count would weigh its loss wrongly
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    reward_model = copy.deepcopy(critic).requires_grad_(False)
    rewards = kl_like_rewards(r)
    plans = rollout.minibatches(8, 4, 2, torch.Generator().manual_seed(0), ranks, rank)
    if rank is not None:
        rows = torch.arange(8).view(ranks, -1)[rank]
        r, rewards = r.index(rows), rewards[rows]
    args = ppo_baseline.Args(fsdp=fsdp, lr=1e-2, critic_lr=1e-2)
    prec = rollout.Precision("fp32", "cpu")
    trained = distributed.wrap(policy.train(), fsdp)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    algo = ppo_baseline.LearnedCritic(args, reward_model, critic, "cpu")
    old = rollout.old_logprobs(policy, r, plans[0], args, prec)
    adv = rollout.masked_whiten(algo.advantages(r, rewards), r.response_mask)
    stats = rollout.ppo_update(trained, opt, prec, r, old, adv, plans, args, algo.minibatch_step)
    def whole(m):  # as distributed.full_state_dict gives it: a tied weight once
        names = {n for n, _ in m.named_parameters()}
        return distributed.full_state_dict(m) or {k: v.clone() for k, v in m.state_dict().items() if k in names}
    return whole(policy), whole(critic), stats


def distributed_worker(out, sft, pairs, pairs_eval):
    """Under torchrun: ppo_case under DDP and FSDP2, and 3 steps of GVM training under both, into `out`."""
    import distributed
    runtime.pick_device("cpu")
    results = {mode: ppo_case(sft, mode == "fsdp", distributed.world(), distributed.rank()) for mode in ("ddp", "fsdp")}
    if distributed.is_main():
        torch.save(results, os.path.join(out, "ppo.pt"))
    for mode in ("ddp", "fsdp"):
        gvm.train(gvm.Args(model=sft, data=pairs, eval_data=pairs_eval, out=os.path.join(out, f"gvm-{mode}"), max_steps=3,
                           batch_size=8, eval_every=3, log_every=1, fsdp=mode == "fsdp", device="cpu"))


@pytest.fixture(scope="session")
def two_process_results(tiny_world, tmp_path_factory):
    """distributed_worker's results: one torchrun launch of 2 processes for every equivalence test."""
    out = tmp_path_factory.mktemp("torchrun_worker")
    proc = torchrun(os.path.join(REPO, "test_dvpo.py"), "distributed-worker", str(out), str(tiny_world / "sft"),
                    str(tiny_world / "data" / "pairs_train.jsonl"), str(tiny_world / "data" / "pairs_eval.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_minibatches_split_over_ranks_are_the_whole_minibatches():
    whole = rollout.minibatches(12, 6, 2, torch.Generator().manual_seed(0), ranks=3)
    parts = [rollout.minibatches(12, 6, 2, torch.Generator().manual_seed(0), ranks=3, rank=k) for k in range(3)]
    for e, epoch in enumerate(whole):
        assert sorted(torch.cat(epoch).tolist()) == list(range(12))
        for j, idx in enumerate(epoch):  # 2 rows of each rank's 4, in rank order
            assert idx.tolist() == [i + 4 * k for k in range(3) for i in parts[k][e][j].tolist()]
    one = rollout.minibatches(8, 4, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # one process: the permutation of the whole batch, as before
    assert [[i.tolist() for i in ep] for ep in one] == [[i.tolist() for i in torch.randperm(8, generator=g).split(4)]
                                                         for _ in range(2)]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_ppo_update_split_over_two_processes_is_the_one_process_update(tiny_world, two_process_results, mode):
    """Policy and critic after 2 epochs x 2 minibatches at lr 1e-2 (every weight moves by ~0.04): each rank
    computed on its half of every minibatch, with globally whitened advantages and the global token count."""
    policy, critic, stats = ppo_case(str(tiny_world / "sft"), ranks=2)
    got_policy, got_critic, got_stats = torch.load(two_process_results / "ppo.pt", weights_only=False)[mode]
    initial = data.load_pretrained(str(tiny_world / "sft"))[0].state_dict()
    assert max_difference(policy, {k: initial[k] for k in policy}) > 1e-2
    assert max_difference(policy, got_policy) < 5e-5
    assert max_difference(critic, got_critic) < 5e-5
    assert got_stats == pytest.approx(stats, rel=1e-4, abs=1e-5)
    assert got_stats["val/ratio_first_max_dev"] == 0.0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gvm_training_on_two_processes_is_the_one_process_training(tiny_world, two_process_results, tmp_path, mode):
    from safetensors.torch import load_file
    summary = gvm.train(gvm.Args(model=str(tiny_world / "sft"), data=str(tiny_world / "data" / "pairs_train.jsonl"),
                                 eval_data=str(tiny_world / "data" / "pairs_eval.jsonl"), out=str(tmp_path / "gvm"),
                                 max_steps=3, batch_size=8, eval_every=3, log_every=1, device="cpu"))
    got = two_process_results / f"gvm-{mode}"
    for f in ("model.safetensors", gvm.HEAD_FILE):
        assert max_difference(load_file(tmp_path / "gvm" / f), load_file(got / f)) < 1e-6
    assert json.loads((got / "summary.json").read_text())["eval/pairwise_acc_final"] == summary["eval/pairwise_acc_final"]
    lines = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 3]  # written once, by rank 0
    assert lines[2]["loss/value"] == pytest.approx(json.loads((tmp_path / "gvm" / "metrics.jsonl").read_text().splitlines()[2])["loss/value"], rel=1e-5)


def test_torchrun_dvpo_saves_once_resumes_and_fsdp_trains_as_ddp(tiny_world, tiny_gvm, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 dvpo.py` under DDP and under --fsdp --shard-frozen: 2 steps with a checkpoint each, then
    --resume to 3. Rank 0 alone prints and writes, the output loads with from_pretrained and holds the keys a
    one-process save holds, and the two engines end at the same weights (same data, same update)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    for mode in ("ddp", "fsdp"):
        out, flags = tmp_path / mode, ["--fsdp", "--shard-frozen"] if mode == "fsdp" else []
        for more in (["--steps", "2"], ["--steps", "3", "--resume"]):
            proc = torchrun(os.path.join(REPO, "dvpo.py"), *tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--save-every", "1",
                                                                          *flags, *more))
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("saved ") == 1 and proc.stdout.count(f"step {more[1]}/{more[1]} |") == 1
        records = training_records(out / "metrics.jsonl")
        assert [r["step"] for r in records if "objective/kl" in r] == [1, 2, 3]
        assert [r["step"] for r in records if "eval/kl" in r] == [0, 2, 3]
        assert torch.load(out / loop.STATE_FILE, weights_only=False)["world_size"] == 2
        summary = json.loads((out / "summary.json").read_text())  # model states per rank: 16 and 4 bytes a parameter,
        whole = 16 * summary["params/trained"] + 4 * summary["params/frozen"]  # all of them under FSDP2 split 2 ways
        assert [r for r in records if "objective/kl" in r][-1]["memory/update_state_bytes"] == pytest.approx(whole / (2 if mode == "fsdp" else 1), rel=1e-3)
        AutoModelForCausalLM.from_pretrained(str(out))
        assert load_file(out / "model.safetensors").keys() == load_file(tiny_world / "sft" / "model.safetensors").keys()
    assert max_difference(load_file(tmp_path / "ddp" / "model.safetensors"),
                          load_file(tmp_path / "fsdp" / "model.safetensors")) < 1e-5
    err = one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "ddp", "--steps", "4",
                                                                  "--resume")))
    assert "trained by 2 process(es), not 1" in err


def test_a_bad_flag_under_torchrun_is_one_line_and_every_rank_exits_2(tiny_world, tiny_gvm, tmp_path):
    """Both ranks started by hand with the environment torchrun gives them, so each one's exit code and
    output are seen (torchrun stops the others once one fails, and reports only some)."""
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    argv = [sys.executable, os.path.join(REPO, "dvpo.py"),
            *tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--batch-size", "7", "--minibatch-size", "7")]
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(k), "LOCAL_RANK": str(k)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in ranks)
    assert [p.returncode for p in ranks] == [2, 2]
    assert err0 == "error: --batch-size 7: must split evenly over the 2 processes (a multiple of 2)\n" and err1 == ""
    assert out0 == out1 == "" and os.listdir(tmp_path) == []


def test_sharding_flags_that_do_not_go_together_are_one_line(tiny_world, tiny_gvm, tmp_path, capsys):
    for flags, says in ((["--shard-frozen"], "add --fsdp"), (["--fsdp", "--lora-r", "4"], "use one or the other"),
                        (["--fsdp", "--optim", "adamw8bit"], "8-bit AdamW does not take FSDP2")):
        assert says in one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "o", *flags)))
    assert "8-bit AdamW" in one_line_error(capsys, lambda: gvm.main(["--model", str(tiny_world / "sft"), "--fsdp", "--optim",
                                                                      "adamw8bit", "--out", str(tmp_path / "g")]))
    assert os.listdir(tmp_path) == []


if __name__ == "__main__" and sys.argv[1:2] == ["distributed-worker"]:
    distributed_worker(*sys.argv[2:])
