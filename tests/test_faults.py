import json
import os
import subprocess
import sys
import time

import pytest

import compare
import dpo_baseline
import dvpo
import grpo_baseline
import gvm
import ppo_baseline
import remax_baseline
from helpers import ENV, REPO, bad_input_cases, one_line_error, other_tokenizer_gvm, pair_files, tiny_dvpo_argv
from infra import checkpoint, cli, world


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
    with checkpoint.atomic_dir(str(out)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("good")
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "model"), "w").write("half")
            raise RuntimeError("crash mid-save")
    assert (out / "model").read_text() == "good"
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left behind


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "gvm.py"),
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


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


def test_every_numeric_flag_is_checked_before_any_work(tiny_world, tiny_gvm, tmp_path, capsys):
    import evaluate

    sft, pairs = str(tiny_world / "sft"), str(tiny_world / "data" / "pairs_train.jsonl")
    gvm_argv = ["--model", sft, "--data", pairs, "--eval-data", pairs, "--out", str(tmp_path / "out")]
    cases = [
        (gvm.main, gvm_argv + flags, message)
        for flags, message in [
            (["--lr", "nan"], "--lr nan: must be a finite number"),
            (["--lr", "-1"], "--lr -1.0: must be > 0"),
            (["--max-len", "1"], "--max-len 1: must be >= 2"),
            (["--seed", "-1"], "--seed -1: must lie in"),
            (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
            (["--max-steps", "0"], "--max-steps 0"),
        ]
    ]
    cases += [
        (dvpo.main, tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", *flags), message)
        for flags, message in [
            (["--lr", "-1"], "--lr -1.0: must be > 0"),
            (["--kl-horizon", "0"], "--kl-horizon 0: must be >= 1"),
            (["--adaptive-kl", "--target-kl", "0"], "--target-kl 0.0: must be > 0"),
            (["--cliprange", "-1"], "--cliprange -1.0"),
            (["--max-grad-norm", "-1"], "--max-grad-norm -1.0"),
            (["--temperature", "inf"], "--temperature inf: must be a finite number"),
            (["--bogus"], "unrecognized"),
        ]
    ]
    rm_argv = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out")[2:]
    cases += [
        (ppo_baseline.main, rm_argv + flags, message)
        for flags, message in [
            (["--critic-lr", "-1"], "--critic-lr -1.0"),
            (["--rm-lr", "nan"], "--rm-lr nan"),
            (["--vf-coef", "-1"], "--vf-coef -1.0"),
        ]
    ]
    cases += [
        (grpo_baseline.main, rm_argv + flags, message)
        for flags, message in [
            (["--group-size", "1"], "--group-size 1: must be >= 2"),
            (["--kl-coef", "-1"], "--kl-coef -1.0"),
        ]
    ]
    cases += [
        (remax_baseline.main, rm_argv + ["--minibatch-size", "3"], "--minibatch-size 3 does not divide --batch-size 8")
    ]
    cases += [
        (dpo_baseline.main, ["--policy", sft, "--data", pairs, "--out", str(tmp_path / "out"), *flags], message)
        for flags, message in [
            (["--beta", "0"], "--beta 0.0: must be > 0"),
            (["--epochs", "0"], "--epochs 0"),
            (["--gold", "x"], "--gold x: choose one of"),
        ]
    ]
    cases += [
        (evaluate.main, [sft, "--json", str(tmp_path / "out" / "e.json"), *flags], message)
        for flags, message in [
            (["--temperature", "0"], "--temperature 0.0: must be > 0"),
            (["--max-new-tokens", "0"], "--max-new-tokens 0"),
        ]
    ]
    cases += [
        (compare.main, ["--root", str(tmp_path / "out"), *flags], message)
        for flags, message in [
            (["--seeds", "a"], "--seeds a"),
            (["--extra", "--bogus 1"], "unrecognized arguments: --bogus"),
            (["--methods", "dvpo,trpo"], "--methods dvpo,trpo: choose from"),
        ]
    ]
    cases += [
        (world.main, ["--out", str(tmp_path / "out"), "--label-flip", "2"], "--label-flip 2.0: must lie in [0, 1]")
    ]
    for main, argv, message in cases:
        err = one_line_error(capsys, lambda: main(argv))
        assert message in err, (argv, err)
        assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == [], argv


def test_output_paths_are_checked_before_any_work_and_no_user_file_is_moved(tiny_world, tiny_gvm, tmp_path, capsys):
    import evaluate

    user_file, user_dir = tmp_path / "notes.txt", tmp_path / "mine"
    user_file.write_text("mine")
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("mine")
    sft, pairs = str(tiny_world / "sft"), str(tiny_world / "data" / "pairs_train.jsonl")
    runs = [
        lambda out: gvm.main(["--model", sft, "--data", pairs, "--eval-data", pairs, "--out", out]),
        lambda out: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out)),
    ]
    for run in runs:
        for out, message in (
            (user_file, "notes.txt: is a file"),
            (user_dir, "mine: a folder these scripts did not write"),
            (user_file / "run", "notes.txt is a file, not a folder"),
            ("/proc/dvpo-run", "cannot write in /proc"),
        ):
            assert message in one_line_error(capsys, lambda: run(str(out)))
    assert user_file.read_text() == "mine" and (user_dir / "thesis.tex").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]  # nothing moved aside, nothing left behind
    for main, argv, message in (
        (evaluate.main, [sft, "--json", "/proc/x/eval.json"], "--json /proc/x/eval.json: cannot write"),
        (evaluate.main, [sft, "--json", str(user_dir)], "is a folder; name a file"),
        (compare.main, ["--root", "/proc/bench"], "--root /proc/bench: cannot write"),
        (compare.main, ["--root", str(tmp_path / "b"), "--json", "/proc/c.json"], "--json /proc/c.json"),
    ):
        assert message in one_line_error(capsys, lambda: main(argv))
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]
    prompts = str(tiny_world / "data" / "prompts_eval.jsonl")
    evaluate.main(
        [sft, "--prompts", prompts, "--n-prompts", "4", "--json", str(tmp_path / "new" / "dir" / "eval.json")]
    )
    assert json.loads((tmp_path / "new" / "dir" / "eval.json").read_text())["results"][0]["n"] == 4


def test_inputs_are_checked_before_any_expensive_step(tiny_world, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    trained = []
    monkeypatch.setattr(gvm, "train", lambda *a, **k: trained.append(a))
    argv = [
        "--policy",
        str(tiny_world / "sft"),
        "--data",
        str(tiny_world / "data" / "pairs_train.jsonl"),
        "--prompts",
        str(empty),
        "--rm-out",
        str(tmp_path / "rm"),
        "--out",
        str(tmp_path / "ppo"),
    ]
    assert "empty.jsonl" in one_line_error(capsys, lambda: ppo_baseline.main(argv))
    assert not trained and not (tmp_path / "rm").exists()  # stage A never started
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "gvm.py"), "--data", str(broken)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "row 2 is not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()  # the default --model's world was not built for a bad --data


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_half_written_output(tiny_world, tiny_gvm, tmp_path):
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "dvpo.py"),
            *tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1000", "--save-every", "2"),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stdout:
        if line.startswith("step 3/"):  # a checkpoint at step 2 exists; the next save is under way soon
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: the output folder holds the last complete save, if any"
    ], err
    assert json.loads((out / "summary.json").read_text())["train/steps"] >= 2
    assert os.listdir(tmp_path) == ["run"]  # no temporary folder left


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2, 1.6, 2.2])
def test_ctrl_c_while_libraries_and_models_load_is_one_line_exit_130(tiny_world, tiny_gvm, tmp_path, delay):
    """The moments before the first step: imports (torch, transformers' lazy modules), flag checks, model loading."""
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "dvpo.py"), *tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1000")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "|" not in line]  # tqdm bars aside
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert not out.exists() or "summary.json" not in os.listdir(out)


def test_a_ctrl_c_a_library_turned_into_another_error_is_still_an_interrupt(capsys):
    """transformers' lazy import catches the KeyboardInterrupt and raises ModuleNotFoundError; our loader then
    says 'no tokenizer'. run_main knows a SIGINT arrived and reports the interrupt, exit 130."""
    import signal

    def swallowed():
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt as e:
            raise cli.UsageError("ckpt/sft: the folder gave no tokenizer (ModuleNotFoundError: ...)") from e

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under `pytest &`
    try:
        with pytest.raises(SystemExit) as e:
            cli.run_main(swallowed)
        assert e.value.code == 130
        assert capsys.readouterr().err.strip().splitlines() == [
            "interrupted: the output folder holds the last complete save, if any"
        ]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own Ctrl-C restored
        # started with Ctrl-C ignored (`cmd &` in a script, nohup), a run keeps ignoring it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert cli.run_main(lambda: signal.raise_signal(signal.SIGINT) or "finished") == "finished"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_killed_saves_temporary_folder_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.run(["true"]).args and subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".run-tmp-{dead.pid}-abc", tmp_path / f".run-tmp-{os.getpid()}-xyz"
    stale.mkdir()
    live.mkdir()
    with checkpoint.atomic_dir(str(tmp_path / "run")) as tmp:
        open(os.path.join(tmp, "model"), "w").write("ok")
    assert not stale.exists() and live.exists() and (tmp_path / "run" / "model").read_text() == "ok"


def test_a_damaged_checkpoint_is_named_in_one_line(tiny_world, tiny_gvm, tmp_path, capsys):
    out = tmp_path / "run"
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1", "--save-every", "1"))
    capsys.readouterr()
    for name, message in (
        (checkpoint.STATE_FILE, f"{checkpoint.STATE_FILE} is damaged"),
        ("model.safetensors", "gave no model"),
    ):
        backup = (out / name).read_bytes()
        for damaged in (b"", backup[: len(backup) // 2]):
            (out / name).write_bytes(damaged)
            err = one_line_error(
                capsys,
                lambda: dvpo.main(
                    tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--save-every", "1", "--resume")
                ),
            )
            assert message in err and str(out) in err, err
        (out / name).write_bytes(backup)


def test_evaluate_checks_a_gvms_tokenizer_and_builds_no_world_for_it(families, tiny_world, tmp_path, capsys):
    import evaluate

    files = pair_files(tiny_world, tmp_path)
    gvm.main(
        [
            "--model",
            str(families / "gpt2"),
            "--data",
            files["strings"],
            "--eval-data",
            files["strings"],
            "--out",
            str(tmp_path / "gvm"),
            "--max-steps",
            "1",
        ]
    )
    err = one_line_error(
        capsys,
        lambda: evaluate.main([str(families / "llama"), "--prompts", files["strings"], "--gvm", str(tmp_path / "gvm")]),
    )
    assert "with another tokenizer than" in err
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # no --pairs, a GVM trained on other data: no accuracy on the world's movie-review pairs, no world built
        evaluate.main(
            [
                str(families / "gpt2"),
                "--prompts",
                files["strings"],
                "--gvm",
                str(tmp_path / "gvm"),
                "--n-prompts",
                "2",
                "--max-new-tokens",
                "4",
            ]
        )
    finally:
        os.chdir(cwd)
    assert "no held-out pairs for its accuracy" in capsys.readouterr().out and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------- data never lost
def tree(root):
    """{relative path: bytes} of every file under root: what a refusal must leave exactly as it was."""
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_an_input_folder_is_never_an_output(tiny_world, tiny_gvm, tmp_path, capsys):
    """--out may not be, hold, or lie inside any folder the run reads: the output replaces its whole folder."""
    gvm_copy = tmp_path / "gvm"
    gvm_copy.mkdir()
    for f in os.listdir(tiny_gvm):
        (gvm_copy / f).write_bytes((tiny_gvm / f).read_bytes())
    (gvm_copy / "summary.json").write_text("{}")  # as gvm.py writes one: a folder these scripts may replace
    before, sft = tree(tmp_path), tree(tiny_world / "sft")
    argv = tiny_dvpo_argv(tiny_world, gvm_copy, tmp_path / "unused")
    argv[argv.index("--gvm") + 1] = str(gvm_copy)
    cases = [
        (lambda out: dvpo.main([*argv, "--out", out]), str(gvm_copy), "is --gvm"),
        (lambda out: dvpo.main([*argv, "--out", out]), str(tmp_path), "holds --gvm"),
        (lambda out: dvpo.main([*argv, "--out", out]), str(tiny_world / "sft" / "sub"), "lies inside --policy"),
        (
            lambda out: gvm.main(["--model", str(tiny_world / "sft"), "--out", out]),
            str(tiny_world / "sft"),
            "is --model",
        ),
        (lambda out: dvpo.main([*argv, "--out", out]), "", "name an output folder"),
    ]
    for run, out, message in cases:
        assert message in one_line_error(capsys, lambda: run(out)), out
    ppo = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "ppo")
    ppo[ppo.index("--gvm") : ppo.index("--gvm") + 2] = ["--rm-out", str(tmp_path / "ppo")]
    assert "--rm-out" in one_line_error(capsys, lambda: ppo_baseline.main(ppo)) and not (tmp_path / "ppo").exists()
    assert tree(tmp_path) == before and tree(tiny_world / "sft") == sft  # nothing touched, nothing written


def test_a_folder_these_scripts_did_not_write_is_never_moved(tiny_world, tiny_gvm, tmp_path, capsys):
    """A user's `.target-old` (the name atomic saves use for the last good output) and a symbolic link as --out
    are refused before any work, and stay exactly as they were."""
    (tmp_path / ".target-old").mkdir()
    (tmp_path / ".target-old" / "thesis.tex").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    before = tree(tmp_path)
    for out, message in ((tmp_path / "target", "in the way of its atomic saves"), (tmp_path / "link", "symbolic link")):
        assert message in one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out)))
    assert tree(tmp_path) == before and os.path.islink(tmp_path / "link")
    assert sorted(os.listdir(tmp_path)) == [".target-old", "elsewhere", "link"]


def test_a_second_run_on_a_busy_output_is_refused_and_a_stale_lock_taken_over(tiny_world, tiny_gvm, tmp_path, capsys):
    out = tmp_path / "out"
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(os.path.dirname(checkpoint.lock_path(out)), exist_ok=True)
        with open(checkpoint.lock_path(out), "w") as f:
            f.write(str(busy.pid))  # a live run holds it
        err = one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1")))
        assert f"another run (pid {busy.pid}) is writing it" in err and not out.exists()
    finally:
        busy.kill()
        busy.wait()
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "1"))  # its owner is gone: the lock is stale
    assert (out / "summary.json").exists() and sorted(os.listdir(tmp_path)) == ["out"]
    assert not os.path.exists(checkpoint.lock_path(out))  # released at the end


def test_evaluate_json_replaces_only_its_own_report(tiny_world, tmp_path, capsys):
    import evaluate

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    sft, prompts = str(tiny_world / "sft"), str(tiny_world / "data" / "prompts_eval.jsonl")
    argv = [sft, "--prompts", prompts, "--n-prompts", "2", "--max-new-tokens", "8"]
    assert "is not a report these scripts wrote" in one_line_error(
        capsys, lambda: evaluate.main([*argv, "--json", str(notes)])
    )
    assert "is --prompts" in one_line_error(capsys, lambda: evaluate.main([*argv, "--json", prompts]))
    assert notes.read_text() == "mine"
    report = tmp_path / "eval.json"
    evaluate.main([*argv, "--json", str(report)])
    evaluate.main([*argv, "--json", str(report)])  # its own report: replaced
    assert json.loads(report.read_text())["results"][0]["n"] == 2


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_resumes(
    tiny_world, tiny_gvm, tmp_path, capsys, monkeypatch
):
    import torch

    out = tmp_path / "out"
    argv = tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "4", "--save-every", "2")
    real_save, saves = torch.save, []

    def full_disk(obj, f, *a, **k):
        saves.append(f)
        if len(saves) > 1:  # the second save: the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    err = one_line_error(capsys, lambda: dvpo.main(argv))
    assert str(out) in err and "MiB free" in err and "the last complete save is kept" in err
    assert json.loads((out / "summary.json").read_text())["train/steps"] == 2  # the step-2 checkpoint survived
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written folder, no lock left
    monkeypatch.setattr(torch, "save", real_save)
    dvpo.main([*argv, "--resume"])
    assert json.loads((out / "summary.json").read_text())["train/steps"] == 4


def test_inputs_that_crashed_or_passed_silently_are_one_line(tiny_world, tiny_gvm, tmp_path, capsys):
    """--device other than auto/cpu/cuda[:N], an --optim with a stray space, --fsdp without torchrun, a diverging
    --lr, a damaged value_model.json or trainer state, and a data file that is not UTF-8: each one line, exit 2."""
    import torch

    out = tmp_path / "out"
    for extra, says in (
        (["--device", "mps"], "--device mps: use auto, cpu, cuda or cuda:N"),
        (["--device", "meta"], "--device meta: use auto"),
        (["--optim", " adamw8bit"], "--optim ' adamw8bit': choose one of adamw, adamw8bit"),
        (["--fsdp"], "start the script with torchrun"),
        (["--lr", "1e10"], "the update diverged (lower --lr)"),
        (["--kl-coef", "1e30"], "--kl-coef 1e+30: must lie in [0, 1e6]"),  # its rewards overflowed the whitening
    ):
        assert says in one_line_error(capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, *extra)))
        assert not out.exists()
    damaged = tmp_path / "gvm"
    damaged.mkdir()
    for f in os.listdir(tiny_gvm):
        (damaged / f).write_bytes((tiny_gvm / f).read_bytes())
    (damaged / gvm.META_FILE).write_text("[]")
    argv = tiny_dvpo_argv(tiny_world, damaged, out)
    assert "damaged (a JSON list, not an object)" in one_line_error(capsys, lambda: dvpo.main(argv))
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--save-every", "1"))
    torch.save([1, 2], out / checkpoint.STATE_FILE)
    resume = tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "3", "--save-every", "1", "--resume")
    assert "is damaged (not a trainer state)" in one_line_error(capsys, lambda: dvpo.main(resume))
    latin = tmp_path / "pairs.jsonl"
    latin.write_bytes(
        b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}\n'
    )
    err = one_line_error(
        capsys,
        lambda: gvm.main(["--model", str(tiny_world / "sft"), "--data", str(latin), "--out", str(tmp_path / "g")]),
    )
    assert "pairs.jsonl: row 2 is not UTF-8 text" in err and not (tmp_path / "g").exists()


def test_a_value_model_or_an_encoder_where_a_policy_is_expected_is_refused(tiny_world, tiny_gvm, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    for f in os.listdir(tiny_world / "sft"):  # the world's tokenizer beside the encoder
        if f.startswith(("tokenizer", "special")):
            (bert / f).write_bytes((tiny_world / "sft" / f).read_bytes())
    out = tmp_path / "out"
    for run, says in (
        (
            lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--policy", str(tiny_gvm))),
            "holds a value model",
        ),
        (lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--ref", str(tiny_gvm))), "--ref"),
        (lambda: gvm.main(["--model", str(bert), "--out", str(out)]), "a BertModel, not a causal LM"),
        (lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tmp_path / "bert" / "config.json", out)), "a file, not a folder"),
    ):
        assert says in one_line_error(capsys, run)
    assert not out.exists()


def test_pass_through_flags_are_checked_against_their_script_before_any_work(tmp_path, capsys):
    import evaluate

    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import gvm_sweep

    root = tmp_path / "bench"
    err = one_line_error(
        capsys, lambda: compare.main(["--root", str(root), "--methods", "dvpo,ppo", "--extra", "--bogus"])
    )
    assert "--extra for dvpo.py: unrecognized arguments: --bogus" in err
    err = one_line_error(capsys, lambda: compare.main(["--root", str(root), "--methods", "dvpo", "--extra", "--lr -1"]))
    assert "--extra for dvpo.py: --lr -1.0: must be > 0" in err
    # a one-word pass-through flag is --extra's value, not compare.py's own: it reaches the check of --json
    err = one_line_error(
        capsys,
        lambda: compare.main(["--root", str(root), "--extra", "--gradient-checkpointing", "--json", "/proc/c.json"]),
    )
    assert "--json /proc/c.json" in err
    err = one_line_error(capsys, lambda: gvm_sweep.main(["--root", str(root), "--rl-extra", "--advantage released"]))
    assert "--rl-extra for ppo_baseline.py: unrecognized arguments: --advantage released" in err
    assert not root.exists()
    assert evaluate.mean_ci([0.5])[0] == 0.5 and evaluate.mean_ci([0.5])[1] != evaluate.mean_ci([0.5])[1]  # nan


def test_analytic_stage_a_and_resume_mistakes_are_named(tiny_world, tiny_gvm, tmp_path, capsys):
    config = os.path.join(REPO, "docs", "model-configs", "qwen2.5-0.5b-instruct")
    for argv, says in (
        (["--analytic", config, "--gpus", "abc"], "--gpus abc: name numbers of GPUs"),
        (["--analytic", config, "--gpus", "0"], "--gpus 0: name numbers of GPUs"),
        (["--analytic", config, "--batch-size", "-1"], "--batch-size -1: must be >= 1"),
        (["--analytic", config, "--response-len", "0"], "--response-len 0: must be >= 1"),
        (["--analytic", ","], "--analytic ',': name config folders"),
    ):
        assert says in one_line_error(capsys, lambda: compare.main(argv))
    compare.main(["--analytic", config, "--json", str(tmp_path / "analytic.json")])  # --json is written, not ignored
    assert config in json.loads((tmp_path / "analytic.json").read_text())["models"]
    ppo = tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "ppo", "--rm-batch-size", "3")
    ppo[ppo.index("--gvm") : ppo.index("--gvm") + 2] = ["--rm-out", str(tmp_path / "rm")]
    assert "--rm-batch-size 3: must be even" in one_line_error(capsys, lambda: ppo_baseline.main(ppo))
    out = tmp_path / "dvpo"
    dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "2", "--save-every", "1"))
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm-model"), {"kind": "reward-model"})
    grpo = tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--steps", "3", "--resume")
    grpo[grpo.index("--gvm") : grpo.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm-model")]
    assert "holds a dvpo run, not a grpo one" in one_line_error(capsys, lambda: grpo_baseline.main(grpo))
