import dataclasses
import json
import math
import os

import pytest
import torch

import gvm
import reward
from helpers import PAIRS, batch_for
from infra import cli, data, models, precision, world


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
    assert m["eval/td_loss"] == pytest.approx(
        0.5 * (5.65 + 0.81 + 1.21 + 1 + 1) / 10
    )  # lambda = 1: label targets, s_0 too
    # p = (1 + V_T) / 2 = 0.95, 0.4, 0.25, 0.75 against chosen = 1, 0, 1, 0, each alone in its bin
    assert m["eval/ece"] == pytest.approx((0.05 + 0.4 + 0.75 + 0.75) / 4, abs=1e-6)
    assert gvm.calibration_error(torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, -1.0, 1.0, -1.0])) == 0.0


def test_select_saves_the_best_evaluated_checkpoint(tiny_world, tmp_path):
    """--select keeps the checkpoint with the best held-out metric among the evaluations, not the last one; the
    saved folder reproduces that evaluation's numbers."""
    base = dict(
        model=str(tiny_world / "sft"),
        data=str(tiny_world / "data" / "pairs_train.jsonl"),
        eval_data=str(tiny_world / "data" / "pairs_eval.jsonl"),
        lr=0.03,
        max_steps=12,
        eval_every=2,
        batch_size=8,
    )
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
            best = (max if higher else min)(
                evals, key=lambda r: r[key]
            )  # the first of equals, as strict improvement keeps
            assert [r["step"] for r in evals if r["eval/selected"]][-1] == best["step"]
        assert (
            summary["train/selected_step"] == best["step"]
            and summary["last"]["eval/td_loss"] == evals[-1]["eval/td_loss"]
        )
        model, tok, meta = gvm.load_value_model(str(out))
        samples = gvm.pair_samples(data.load_pairs(base["eval_data"], "train", "--data"), tok, 512, "eval")
        again = gvm.heldout_metrics(model, samples, tok.pad_token_id, "cpu")
        for k in ("eval/terminal_mse", "eval/pairwise_acc_mean", "eval/td_loss"):
            assert again[k] == pytest.approx(best[k], abs=1e-6) and summary[k] == pytest.approx(best[k], abs=1e-6)


def test_head_is_zero_at_init_and_dropout_is_off(tiny_backbone):
    from transformers import GPT2Config, GPT2Model

    backbone, tok = gvm.load_backbone(tiny_backbone)
    model = gvm.ValueModel(backbone)
    _, batch = batch_for(tok, PAIRS)
    assert torch.count_nonzero(gvm.state_values(model, batch)) == 0
    gpt2 = models.disable_dropout(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))))
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
        backbone = models.disable_dropout(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))))
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
    left = model(ids, mask)[0, L - len(r) - 1 :]
    assert torch.allclose(left, together[0, : len(r) + 1], atol=1e-5)


def test_save_load_round_trip(tiny_backbone, tmp_path):
    backbone, tok = gvm.load_backbone(tiny_backbone)
    model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(model.head.weight)
    _, batch = batch_for(tok, PAIRS)
    gvm.save_value_model(model, tok, str(tmp_path), {"kind": "gvm"})
    loaded, tok2, meta = gvm.load_value_model(str(tmp_path))
    assert torch.equal(gvm.state_values(model.eval(), batch), gvm.state_values(loaded.eval(), batch))
    assert meta["tokenizer_fingerprint"] == models.tokenizer_fingerprint(tok2) == models.tokenizer_fingerprint(tok)
    with pytest.raises(cli.UsageError, match="not a 'reward-model' one"):
        gvm.load_value_model(str(tmp_path), kind="reward-model")


def test_pair_samples_layout(tiny_backbone):
    _, tok = gvm.load_backbone(tiny_backbone)
    samples, batch = batch_for(tok, PAIRS[:1])
    (p, r, lab_c), (_, r2, lab_r) = samples
    assert (lab_c, lab_r) == (1.0, -1.0)
    assert p[0] == tok.bos_token_id and r[-1] == tok.eos_token_id and len(r) == 4  # very good . EOS
    assert batch["state_pos"][0, : len(r) + 1].tolist() == list(range(len(p) - 1, len(p) + len(r)))
    assert batch["state_mask"][0].sum() == len(r) + 1


def test_a_gvm_learns_from_noisy_labels(noisy_world, tmp_path):
    """The GVM reads V(s_T) at EOS, a position the SFT model never had to make informative; under 25% flips
    the +-1 regression's gradient is mostly noise, and with a pair's two samples in different batches the
    GVM often never leaves the label mean (every V near 0). Kept in one batch (the default), it learns."""

    def agreement(name):
        rows = [json.loads(x) for x in (noisy_world / "data" / name).read_text().splitlines()]
        return sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows)

    assert agreement("pairs_train.jsonl") < 0.75 < 0.85 < agreement("pairs_eval.jsonl")  # held-out labels unflipped
    for seed in range(3):
        summary = gvm.train(
            gvm.Args(
                model=str(noisy_world / "sft"),
                data=str(noisy_world / "data" / "pairs_train.jsonl"),
                eval_data=str(noisy_world / "data" / "pairs_eval.jsonl"),
                epochs=5,
                seed=seed,
                out=str(tmp_path / f"gvm{seed}"),
            )
        )
        assert summary["eval/pairwise_acc_final"] > 0.62, (seed, summary["eval/pairwise_acc_final"])


def test_first_use_builds_world_and_trains_a_gvm_above_chance(default_world):
    cwd, proc = default_world
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "copying the embedded world" in proc.stdout  # shipped: the same bytes on every clone
    for name in ("sft", "data"):
        for f in os.listdir(os.path.join(world.SHIPPED, name)):
            if f != world.MARKER:
                assert (cwd / "ckpt" / name / f).read_bytes() == open(os.path.join(world.SHIPPED, name, f), "rb").read()
    assert world.shipped_config() == dataclasses.asdict(world.WorldConfig())  # python -m infra.world rebuilds it
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
            gvm.train_step(
                m, samples, objective, opt, precision.Precision("fp32", "cpu"), tok.pad_token_id, "cpu", micro
            )
            grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_step_lines_show_the_rate_each_step_used_and_eval_lines_the_objectives_metrics(tiny_world, tmp_path, capsys):
    """Linear warmup over 2 steps, then linear decay to 0 at step 6: the steps use 0.5, 1, 1, 0.75, 0.5, 0.25 of
    --lr (the rate after the last step, 0, is never used). The reward model's lines show its own metrics."""
    import reward

    base = dict(
        model=str(tiny_world / "sft"),
        data=str(tiny_world / "data" / "pairs_train.jsonl"),
        eval_data=str(tiny_world / "data" / "pairs_eval.jsonl"),
        lr=1e-3,
        max_steps=6,
        warmup_steps=2,
        log_every=1,
        eval_every=6,
        batch_size=8,
    )
    gvm.train(gvm.Args(**base, out=str(tmp_path / "gvm")))
    records = [json.loads(x) for x in (tmp_path / "gvm" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    out = capsys.readouterr().out
    assert "| lr 2.50e-04 |" in out and "acc(mean)" in out
    gvm.train(gvm.Args(**base, out=str(tmp_path / "rm")), reward.BradleyTerry())
    out = capsys.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith(("eval step", "saved"))]
    assert len(evals) == 3 and all("accuracy" in e and "bt loss" in e and "acc(mean)" not in e for e in evals), out
