"""Tests for dvpo: math against slow references and closed forms, invariants, and end-to-end runs.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_dvpo.py
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets import: a stray hub call hangs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hashlib
import json
import random
import subprocess
import sys

import pytest
import torch

import gvm
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
    adv, ret = gvm.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(4):
        n = int(mask[b].sum())
        for t in range(n):
            a = sum((0.9 * 0.8) ** k * (rewards[b, t + k] + 0.9 * (values[b, t + k + 1] if t + k + 1 < n else 0)
                                         - values[b, t + k]) for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(float(a), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(float(a + values[b, t]), abs=1e-5)
        assert (adv[b, n:] == 0).all()


# ---------------------------------------------------------------------------------------------- value model
def batch_for(tok, pairs, max_len=64):
    samples = gvm.pair_samples([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs], tok, max_len, "test")
    return samples, gvm.collate(samples, tok.pad_token_id)


PAIRS = [("the plot was", "very good .", "not good ."), ("i", "loved the film but the ending was dull .", "hated it .")]


def test_head_is_zero_at_init_and_dropout_is_off(tiny_backbone):
    from transformers import GPT2Config, GPT2Model
    backbone, tok = gvm.load_backbone(tiny_backbone)
    model = gvm.ValueModel(backbone)
    _, batch = batch_for(tok, PAIRS)
    assert torch.count_nonzero(gvm.state_values(model, batch)) == 0
    gpt2 = gvm.disable_dropout(GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))))
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
        backbone = gvm.disable_dropout(GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))))
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
    assert meta["tokenizer_fingerprint"] == world.tokenizer_fingerprint(tok2) == world.tokenizer_fingerprint(tok)
    with pytest.raises(world.UsageError, match="not a 'reward-model' one"):
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
    cfg = world.WorldConfig(bt_beta=1000.0, label_flip=1.0)
    rows = world.label_pairs(["p"] * 3, ["good .", "bad .", "great ."], ["awful .", "nice .", "dull ."],
                             cfg, random.Random(0))
    assert all(r["score_chosen"] < r["score_rejected"] for r in rows)


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
    samples = gvm.pair_samples(gvm.load_rows(str(cwd / world.PAIRS_EVAL)), tok, 512, "eval")
    again = gvm.pairwise_accuracy(model, samples, tok.pad_token_id, "cpu")
    assert again["eval/pairwise_acc_final"] == pytest.approx(summary["eval/pairwise_acc_final"], abs=1e-6)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def bad_input_cases(tmp_path, sft):
    good = {"prompt": "the plot was", "chosen": "good .", "rejected": "bad ."}
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "the plot was", "chosen": \n')
    return [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(malformed)], "malformed.jsonl: cannot read it"),
        (["--data", write_jsonl(tmp_path / "nochosen.jsonl", [good, {"prompt": "i", "rejected": "bad ."}])],
         "nochosen.jsonl row 2: 'chosen' is missing"),
        (["--data", write_jsonl(tmp_path / "empty.jsonl", [good, {**good, "rejected": "  "}])],
         "empty.jsonl row 2: 'rejected' is an empty response"),
        (["--data", write_jsonl(tmp_path / "nocol.jsonl", [{"question": "x", "chosen": "a", "rejected": "b"}])],
         "no 'prompt' column"),
        (["--model", str(tmp_path / "no_model")], "--model"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--lam", "1.5"], "--lam"),
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
    with world.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("good")
    with pytest.raises(RuntimeError):
        with world.atomic_dir(str(out)) as tmp:
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
