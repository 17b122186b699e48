import json
import random
import subprocess
import sys

import pytest

from helpers import ENV, REPO, TINY_WORLD, files_digest
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
