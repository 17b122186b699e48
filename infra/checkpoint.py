"""Outputs and checkpoints: output paths checked before any work, folders written atomically (a crash or a bad
input never leaves a half-written one), metrics.jsonl, and the resumable state of a trainer's run (--resume).
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import torch

from infra import cli, distributed, models
from infra.cli import UsageError


def check_writable(folder, flag, shown=None):
    """The nearest existing folder at or above `folder` must take new files (we may create the rest); errors
    name `flag shown`."""
    shown, parent = shown or folder, os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {shown}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot write in {parent} ({e.strerror})") from None


def check_output_dir(path, flag="--out"):
    """Before any work: path can become this run's output folder. A file there, or a non-empty folder that no
    run of these scripts wrote (no summary.json), would be replaced, so both are refused."""
    restore_interrupted(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path}: is a file; name a folder (it is created, or replaced if an earlier run wrote it)"
        )
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "summary.json")):
        raise UsageError(
            f"{flag} {path}: a folder these scripts did not write (no summary.json); it would be "
            "replaced, so name another"
        )
    check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def check_output_file(path, flag):
    """Before any work: path can be written at the end (its folder is created if missing)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name a file")
    check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def write_json(path, obj):
    """Write a JSON file atomically (temp file, then rename), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_tmp_dir(parent, name):
    """A fresh folder `.name-tmp-<pid>-*` in parent, after removing those a killed process left behind."""
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}-tmp-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix) :].split("-")[0]
        if entry.startswith(prefix) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    return tmp


def backup_path(out):
    return os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}-old")


def restore_interrupted(out):
    """A save interrupted between atomic_dir's two renames leaves the last good output at its backup path:
    put it back (or drop the backup when the new output made it)."""
    old = backup_path(out)
    if os.path.isdir(old):
        if os.path.exists(out):
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(old, out)
            except FileNotFoundError:  # another process of the same torchrun run put it back first
                pass


@contextlib.contextmanager
def atomic_dir(out):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed, so a
    crash or a bad input never leaves a half-written checkpoint. The old output is renamed to a fixed backup
    path before the new one takes its name, and restore_interrupted undoes a crash between the two. Under
    torchrun, rank 0 alone writes: the others get None, and every rank leaves once the output is in place."""
    if not distributed.is_main():
        yield None
        distributed.barrier()
        return
    restore_interrupted(out)
    tmp = make_tmp_dir(os.path.dirname(os.path.abspath(out)), os.path.basename(os.path.abspath(out)))
    try:
        yield tmp
        if os.path.exists(out):
            os.rename(out, backup_path(out))
        os.rename(tmp, out)
        restore_interrupted(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()


class MetricsLog:
    """Appends one JSON object per logged step to <out>/metrics.jsonl; a path of None (a rank other than 0)
    writes nothing."""

    def __init__(self, path):
        self.f = open(path, "w") if path else None

    def write(self, step, metrics):
        if self.f:
            self.f.write(json.dumps({"step": step, **metrics}) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


# ---------------------------------------------------------------------------------------------- a trainer's run
STATE_FILE = "trainer_state.pt"
# flags a resumed run may change: they set the length of the run, its logging, evaluation and memory use, not
# the update it computes (micro-batches and chunks compute the same update, up to float rounding)
RESUME_MAY_CHANGE = (
    "steps",
    "epochs",
    "resume",
    "save_every",
    "eval_every",
    "eval_n",
    "eval_prompts",
    "eval_split",
    "table_every",
    "device",
    "micro_batch_size",
    "forward_batch_size",
    "logprob_chunk",
    "gradient_checkpointing",
    "strict",
    "out",
)


def flag_text(name, value):
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value if value != '' else repr(value)}"


def check_resume(args):
    """--resume continues the run checkpointed in --out, so every flag that shapes its updates must be as that
    run had it (its summary.json); the others are RESUME_MAY_CHANGE."""
    restore_interrupted(args.out)
    if not os.path.isfile(os.path.join(args.out, STATE_FILE)):
        raise UsageError(f"--resume: {args.out} holds no resumable checkpoint (write one with --save-every)")
    path = os.path.join(args.out, "summary.json")
    try:
        with open(path) as f:
            before = json.load(f)["args"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--resume: {path} is unreadable ({type(e).__name__}); the checkpoint is damaged") from None
    changed = [
        k for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_CHANGE and k in before and before[k] != v
    ]
    if changed:
        raise UsageError(
            f"--resume: {args.out} was run with "
            + ", ".join(flag_text(k, before[k]) for k in changed)
            + "; a resumed run may change only "
            + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE if k not in ("resume", "out"))
        )


def load_state(args, name):
    """trainer_state.pt of the run in --out, onto the CPU (wherever it was written), checked to be a `name` run."""
    path = os.path.join(args.out, STATE_FILE)
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or empty: zipfile, pickle and EOF errors alike
        raise UsageError(
            f"--resume: {path} is damaged ({type(e).__name__}); resume from an earlier copy or start again"
        ) from None
    if st["algo"] != name:
        raise UsageError(f"--resume: {args.out} holds a {st['algo']} run, not a {name} one")
    return st


def resume_state(args, name, steps, longer="--steps"):
    """The state of the `name` run checkpointed in --out (trainer_state), checked to have steps left and to have
    run on as many processes; every RNG of this process is restored from it."""
    st = load_state(args, name)
    if st["step"] >= steps:
        raise UsageError(f"--resume: {args.out} has done {st['step']} steps already; raise {longer} above that")
    if st.get("world_size", 1) != distributed.world():
        raise UsageError(
            f"--resume: {args.out} was trained by {st.get('world_size', 1)} process(es), not "
            f"{distributed.world()}; resume it with as many (torchrun --nproc-per-node)"
        )
    cli.set_rng_states(st["rng"][distributed.rank()] if st.get("world_size", 1) > 1 else st["rng"])
    return st


def trainer_state(name, step, records, ev, elapsed, **states):
    """What --resume needs besides the weights: the method's own states (optimizer, loss scale, KL coefficient,
    prompt order, ...), every RNG of every rank (gathered: every rank must call it), the records so far."""
    rng = cli.rng_states() if distributed.world() == 1 else distributed.gather_objects(cli.rng_states())
    return {
        "algo": name,
        "step": step,
        **states,
        "rng": rng,
        "world_size": distributed.world(),
        "records": records,
        "eval": ev,
        "elapsed": elapsed,
    }


def save_run(out, summary, policy, tok, records, state):
    """Write out atomically: the policy (save_pretrained), metrics.jsonl, summary.json and, with a state,
    trainer_state.pt for --resume. An interrupted save leaves the last good one (atomic_dir). Under torchrun
    every rank calls it (a sharded policy is gathered) and rank 0 writes."""
    weights = distributed.full_state_dict(policy)
    with atomic_dir(out) as tmp:
        if tmp is None:
            return
        models.save_pretrained(policy, tok, tmp, weights)
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE_FILE))
