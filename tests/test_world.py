import json
import random
import subprocess
import sys

import pytest

from helpers import ENV, REPO, TINY_WORLD, files_digest, tiny_dvpo_argv
from infra import data, models, world


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
    good, not_good, but = world.gold_scores(
        ["the plot was good .", "the plot was not good .", "the plot was good but the acting was awful ."]
    )
    assert good > 0 > not_good and but < 0


def test_label_flip_flips_labels():
    cfg = world.WorldConfig(bt_beta=1000.0)
    rows = world.label_pairs(
        ["p"] * 3, ["good .", "bad .", "great ."], ["awful .", "nice .", "dull ."], cfg, random.Random(0), flip=1.0
    )
    assert all(r["score_chosen"] < r["score_rejected"] for r in rows)


def test_world_pairs_concatenate_to_the_text_the_project_encodes(tiny_world):
    """TRL (and every peer taking prompt/chosen/rejected text) encodes prompt + chosen as one text."""
    _, tok = models.load_pretrained(str(tiny_world / "sft"))
    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("chosen", "rejected"):
            ours = data.prompt_ids(tok, row["prompt"]) + data.response_ids(tok, row[key])
            assert tok(row["prompt"] + row[key])["input_ids"] + [tok.eos_token_id] == ours, row


def test_the_world_build_logs_progress_lines_when_not_on_a_terminal(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.world",
            "--out",
            str(tmp_path / "w"),
            "--n-train-prompts",
            "40",
            "--n-eval-prompts",
            "10",
            "--sft-steps",
            "20",
            "--sft-batch",
            "8",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("world: SFT policy: ") and ", loss " in line for line in lines) == 10
    assert any(line.startswith("world: pairs (2/2): 1/1") for line in lines)


def model_with_template(tiny_world, folder, template):
    """The tiny world's SFT policy as 'a user's causal LM', with or without a chat template."""
    import shutil

    shutil.copytree(tiny_world / "sft", folder)
    if template:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return str(folder)


@pytest.mark.parametrize("chat", [True, False])
def test_a_world_around_any_causal_lm(tiny_world, tmp_path, chat, capsys):
    """Layout, prompts in the model's form, pairs of its own samples labelled by the gold judge, and no response
    cut by --max-new-tokens in any pair: with a budget of 12 tokens, an ended response has at most 11 words (the
    word-level tokenizer: one token a word) and a cut one 12."""
    import dvpo
    import gvm

    template = "{% for m in messages %}{{ m.content }}{% endfor %}" if chat else ""
    model = model_with_template(tiny_world, tmp_path / "model", template)
    out = tmp_path / "w"
    world.main(
        ["--model", model, "--out", str(out), "--n-train-prompts", "60", "--n-eval-prompts", "20"]
        + ["--max-new-tokens", "12", "--gen-batch", "40"]
    )
    assert files_digest(out / "sft") == files_digest(tmp_path / "model")  # the model as it came
    marker = json.loads((out / "data" / world.MARKER).read_text())
    stats = marker["config"]["model"] == model and marker["stats"]
    assert stats["pairs_dropped_truncated"] > 0 and stats["chat"] == chat
    prompts = [json.loads(x)["prompt"] for x in (out / "data" / "prompts_train.jsonl").read_text().splitlines()]
    requests = set(open(world.REQUESTS).read().splitlines())
    if chat:
        assert all(p[0] == {"role": "system", "content": world.SYSTEM} for p in prompts)
        assert all(p[1]["role"] == "user" and p[1]["content"] in requests for p in prompts)
    else:
        assert all(p.startswith("Question: ") and p.endswith("\nAnswer:") and p[10:-8] in requests for p in prompts)
    pairs = [json.loads(x) for x in (out / "data" / "pairs_train.jsonl").read_text().splitlines()]
    n_eval = len((out / "data" / "pairs_eval.jsonl").read_text().splitlines())
    assert (
        len(pairs) == stats["n_pairs_train"] and pairs and len(pairs) + n_eval <= 80 - stats["pairs_dropped_truncated"]
    )
    for row in pairs:
        assert world.gold_scores([row["chosen"], row["rejected"]]) == [row["score_chosen"], row["score_rejected"]]
        assert max(len(row["chosen"].split()), len(row["rejected"].split())) <= 11  # every response ended
    # the chain runs on it unchanged, with the gold judge on
    gvm.main(
        [
            "--model",
            str(out / "sft"),
            "--data",
            str(out / "data" / "pairs_train.jsonl"),
            "--eval-data",
            str(out / "data" / "pairs_eval.jsonl"),
            "--out",
            str(tmp_path / "gvm"),
            "--max-steps",
            "2",
        ]
    )
    extra = ["--steps", "1", "--batch-size", "4", "--minibatch-size", "2", "--eval-n", "4", "--max-new-tokens", "12"]
    dvpo.main(tiny_dvpo_argv(out, tmp_path / "gvm", tmp_path / "dvpo", *extra))  # any world's layout
    assert "eval/gold" in json.loads((tmp_path / "dvpo" / "summary.json").read_text())


def test_a_model_world_refuses_embedded_only_flags_and_its_own_model_as_out(tiny_world, tmp_path, capsys):
    from helpers import one_line_error

    model = model_with_template(tiny_world, tmp_path / "model", "")
    cases = [
        (["--sft-steps", "5"], "--sft-steps: sizes the embedded world's SFT Llama; with --model the model is the SFT"),
        (["--out", model], f"--out {model}: holds --model {model}; build the world in another folder"),
        (["--out", str(tmp_path)], f"--out {tmp_path}: holds --model {model}; build the world in another folder"),
        (
            ["--n-train-prompts", "5000"],
            f"--n-train-prompts + --n-eval-prompts = 5500: {world.REQUESTS} ships 4150 requests",
        ),
    ]
    for extra, message in cases:
        argv = ["--model", model, "--out", str(tmp_path / "w"), *extra]
        assert one_line_error(capsys, lambda: world.main(argv)) == f"error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
