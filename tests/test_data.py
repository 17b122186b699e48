import json

import pytest

import dvpo
import gvm
from helpers import one_line_error, pair_files, short_gpt2, write_jsonl
from infra import cli, data


def test_the_three_preference_shapes_normalise_to_the_same_pair():
    conv = [{"role": "user", "content": "rate the film"}]
    assert data.normalise_pair({"prompt": "rate the film", "chosen": "good .", "rejected": "bad ."}) == (
        "rate the film",
        "good .",
        "bad .",
    )
    ultra = {
        "prompt": "rate the film",
        "chosen": conv + [{"role": "assistant", "content": "good ."}],
        "rejected": conv + [{"role": "assistant", "content": "bad ."}],
    }
    assert data.normalise_pair(ultra) == (conv, "good .", "bad .")
    trl = {
        "prompt": conv,
        "chosen": [{"role": "assistant", "content": "good ."}],
        "rejected": [{"role": "assistant", "content": "bad ."}],
    }
    assert data.normalise_pair(trl) == (conv, "good .", "bad .")
    hh = {
        "chosen": "\n\nHuman: rate the film\n\nAssistant: it was good .",
        "rejected": "\n\nHuman: rate the film\n\nAssistant: it was bad .",
    }
    # the common prefix ends inside "it was "; the cut goes back to the last "Assistant:"
    assert data.normalise_pair(hh) == ("\n\nHuman: rate the film\n\nAssistant:", " it was good .", " it was bad .")
    assert data.split_common_prefix("the plot was good", "the plot was great") == ("the plot was", " good", " great")
    assert data.normalise_prompt(ultra) == conv and data.normalise_prompt({"prompt": "x"}) == "x"
    assert data.normalise_prompt({"messages": conv + [{"role": "assistant", "content": "ok"}]}) == conv


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is missing or empty"),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "'chosen' is missing or empty"),
        (
            {"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"}]},
            "'chosen' has no assistant turn at its end",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            "different conversations",
        ),
        ({"chosen": "same", "rejected": "same and more"}, "share no prompt prefix"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' is a int, not text"),
        ({"prompt": "p", "chosen": "b", "rejected": {"text": "b"}}, "'rejected' is a dict, not text"),
        ({"prompt": "p", "chosen": " good .", "rejected": " good ."}, "the same response: a tie teaches no preference"),
    ],
)
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
    with pytest.raises(cli.UsageError, match=r"p.jsonl: 2 bad rows \(--strict\): row 2"):
        data.load_pairs(path, "train", "--data", strict=True)


def test_long_prompts_are_dropped_with_a_count(tiny_policy, tmp_path, capsys):
    _, tok = tiny_policy
    path = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "the plot was"}, {"prompt": "the plot was very very good"}]
    )
    kept = data.load_prompts(path, "train", "--prompts", tok, max_prompt_len=4)
    assert [p for p, _ in kept] == ["the plot was"] and kept[0][1] == tok("the plot was")["input_ids"]
    assert "dropped 1 of 2 rows: 1 whose prompt exceeds --max-prompt-len 4 tokens" in capsys.readouterr().out


def test_a_datasetdict_folder_with_named_splits_feeds_gvm_and_dvpo(families, tiny_world, tmp_path):
    """The one-GPU commands of docs/scaling.md in miniature: UltraFeedback-shaped rows in a save_to_disk DatasetDict
    with train_prefs / test_prefs splits, --split and --eval-split, a Qwen2-style model."""
    import datasets

    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()][:24]

    def conv(r):
        u = {"role": "user", "content": r["prompt"]}
        chosen, rejected = (
            [u, {"role": "assistant", "content": r["chosen"]}],
            [u, {"role": "assistant", "content": r["rejected"]}],
        )
        return {"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "messages": chosen}

    datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list([conv(r) for r in rows[:16]]),
            "test_prefs": datasets.Dataset.from_list([conv(r) for r in rows[16:]]),
        }
    ).save_to_disk(tmp_path / "uf")
    D, M = str(tmp_path / "uf"), str(families / "qwen2")
    summary = gvm.train(
        gvm.Args(
            model=M,
            data=D,
            split="train_prefs",
            eval_data=D,
            eval_split="test_prefs",
            max_steps=1,
            out=str(tmp_path / "gvm"),
            dtype="bf16",
            micro_batch_size=4,
        )
    )
    assert (summary["train/pairs"], summary["eval/pairs"]) == (16, 8)
    dvpo.main(
        [
            "--gvm",
            str(tmp_path / "gvm"),
            "--policy",
            M,
            "--prompts",
            D,
            "--split",
            "train_prefs",
            "--eval-prompts",
            D,
            "--eval-split",
            "test_prefs",
            "--out",
            str(tmp_path / "dvpo"),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--minibatch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--eval-every",
            "1",
            "--eval-n",
            "4",
            "--max-new-tokens",
            "8",
            "--dtype",
            "bf16",
            "--logprob-chunk",
            "4",
        ]
    )
    assert json.loads((tmp_path / "dvpo" / "summary.json").read_text())["train/steps"] == 1
    with pytest.raises(cli.UsageError, match="no split 'nope' \\(splits: train_prefs, test_prefs\\)"):
        data.load_rows(D, "nope")


def test_sequences_longer_than_the_model_positions_are_dropped_or_refused(families, tiny_world, tmp_path, capsys):
    model = short_gpt2(families, tmp_path / "short", 64)
    hh = pair_files(tiny_world, tmp_path)["hh"]  # "\n\nHuman: ... \n\nAssistant: ..." transcripts of 20 to 190 tokens
    gvm.main(["--model", model, "--data", hh, "--eval-data", hh, "--out", str(tmp_path / "gvm"), "--max-steps", "2"])
    out = capsys.readouterr().out
    assert "whose prompt + response exceed the model's 64 positions" in out and "dropped" in out
    dvpo.main(
        [
            "--gvm",
            str(tmp_path / "gvm"),
            "--policy",
            model,
            "--prompts",
            hh,
            "--eval-prompts",
            hh,
            "--out",
            str(tmp_path / "dvpo"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--minibatch-size",
            "2",
            "--eval-every",
            "1",
            "--eval-n",
            "2",
            "--max-new-tokens",
            "24",
        ]
    )
    assert "whose prompt leaves fewer than --max-new-tokens 24 of the model's 64 positions" in capsys.readouterr().out
    err = one_line_error(
        capsys,
        lambda: gvm.main(
            ["--model", model, "--data", hh, "--eval-data", hh, "--strict", "--out", str(tmp_path / "gvm2")]
        ),
    )
    assert "bad rows (--strict)" in err and "its prompt + response exceed the model's 64 positions" in err
    err = one_line_error(
        capsys,
        lambda: dvpo.main(
            [
                "--gvm",
                str(tmp_path / "gvm"),
                "--policy",
                model,
                "--prompts",
                hh,
                "--out",
                str(tmp_path / "dvpo2"),
                "--max-new-tokens",
                "64",
            ]
        ),
    )
    assert "--max-new-tokens 64: --policy" in err and "has only 64 positions" in err


def test_a_malformed_jsonl_line_is_named_by_its_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n{"prompt": "a", "chosen": "b",\n'
    )
    with pytest.raises(cli.UsageError, match=r"p.jsonl: cannot read it \(row 3 is not valid JSON"):
        data.load_rows(str(path))


def test_a_data_folder_of_mixed_formats_is_named_not_half_read(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (folder / "b.csv").write_text("prompt,chosen,rejected\nq,c,d\n")
    with pytest.raises(cli.UsageError, match="a folder of csv, jsonl files; name one file"):
        data.load_rows(str(folder))
    (folder / "b.csv").unlink()
    assert [r["prompt"] for r in data.load_rows(str(folder))] == ["p"]  # one format: read as before
