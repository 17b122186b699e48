"""Outputs and checkpoints: output paths checked before any work, folders written atomically (a crash or a bad
input never leaves a half-written one), metrics.jsonl, and the resumable state of a trainer's run (--resume).
"""

import contextlib
import dataclasses
import errno
import hashlib
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


def check_output_dir(path, flag="--out", args=None, also=()):
    """Before any work: path can become this run's output folder, and no other run is writing it. Refused: an
    empty path, a symbolic link, a file, a non-empty folder that no run of these scripts wrote (no
    summary.json), and a folder that is, holds or lies inside one of the run's inputs (inputs_of(args), and
    the (flag, path) pairs in `also`), since the output replaces the whole folder. Then it is locked (lock)."""
    if not path.strip():
        raise UsageError(f"{flag} {path!r}: name an output folder")
    out = os.path.realpath(path)
    for name, value in [*(inputs_of(args) if args is not None else []), *also]:
        src = os.path.realpath(value)
        relation = "is" if out == src else "holds" if within(src, out) else "lies inside" if within(out, src) else ""
        if relation:
            raise UsageError(f"{flag} {path}: {relation} {name} {value}, an input of this run; name another folder")
    if os.path.islink(path):
        raise UsageError(f"{flag} {path}: is a symbolic link; name the folder itself (the link would be replaced)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(
            f"{flag} {path}: is a file; name a folder (it is created, or replaced if an earlier run wrote it)"
        )
    if os.path.isdir(path) and os.listdir(path) and not is_ours(path):
        raise UsageError(
            f"{flag} {path}: a folder these scripts did not write (no summary.json); it would be "
            "replaced, so name another"
        )
    old = backup_path(path)
    if os.path.lexists(old) and not (os.path.isdir(old) and not os.path.islink(old) and is_ours(old)):
        raise UsageError(
            f"{flag} {path}: {old} is in the way of its atomic saves and was not written by these scripts; move it away"
        )
    check_writable(os.path.dirname(os.path.abspath(path)), flag, path)
    lock(path, flag)


def check_output_file(path, flag, args=None):
    """Before any work: path can be written at the end (its folder is created if missing). An existing file is
    replaced only if it is a JSON report these scripts wrote (an object with "args"); any other file, or one of
    the run's inputs, is refused."""
    if not path.strip():
        raise UsageError(f"{flag} {path!r}: name an output file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name a file")
    for name, value in inputs_of(args) if args is not None else []:
        if os.path.realpath(value) == os.path.realpath(path):
            raise UsageError(f"{flag} {path}: is {name} {value}, an input of this run; name another file")
    if os.path.lexists(path):
        try:
            with open(path) as f:
                ours = "args" in json.load(f)
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise UsageError(f"{flag} {path}: exists and is not a report these scripts wrote; name a new file")
    check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


# flags that name what a run reads: an output may be none of them, nor inside one, nor hold one
INPUT_FLAGS = (
    "policy",
    "ref",
    "gvm",
    "rm",
    "model",
    "data",
    "eval_data",
    "prompts",
    "eval_prompts",
    "pairs",
    "policies",
)


def inputs_of(args):
    """[(--flag, path)] of the inputs a run's flags name, each taken as the local path it names (a path not made
    yet, as the world's before its first use, included; a hub name is compared as the folder that would shadow it)."""
    found = []
    for f in dataclasses.fields(args):
        values = getattr(args, f.name) if f.name in INPUT_FLAGS else []
        for value in values if isinstance(values, list) else [values]:
            if value:
                found.append(("--" + f.name.replace("_", "-") if f.name != "policies" else "policy", value))
    return found


def within(inner, outer):
    """Whether real path `inner` lies strictly inside real path `outer`."""
    return inner != outer and os.path.commonpath([inner, outer]) == outer


def is_ours(folder):
    """A folder these scripts wrote: it holds their summary.json."""
    return os.path.isfile(os.path.join(folder, "summary.json"))


_locks = []  # (lock file, owner) this process created, released by release_locks


def lock_path(path):
    """Where the lock of an output folder lives: in the machine's temporary folder, named by the folder's real
    path, so that nothing is written beside the user's files and a folder not yet made has a lock too."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), "dvpo-locks", f"{digest}.lock")


def lock(path, flag):
    """One run at a time per output folder: its lock file (lock_path) holds its owner's pid (under torchrun, the
    launcher's, so every rank of one run shares it), made atomically with a hard link. A lock whose owner is
    gone is stale and taken over; another live owner's is refused in one line. cli.run_main releases it."""
    lock_file, owner = lock_path(path), os.getppid() if distributed.world() > 1 else os.getpid()
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    mine = f"{lock_file}.{os.getpid()}"
    with open(mine, "w") as f:
        f.write(str(owner))
    try:
        for _ in range(3):
            try:
                os.link(mine, lock_file)
                _locks.append((lock_file, owner))
                return
            except FileExistsError:
                try:
                    with open(lock_file) as f:
                        held = int(f.read().strip())
                except (OSError, ValueError):
                    held = 0
                if held == owner:
                    return
                if held and pid_alive(held):
                    raise UsageError(
                        f"{flag} {path}: another run (pid {held}) is writing it; wait for it to end or "
                        "name another folder"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock_file)  # stale: its owner is gone
    finally:
        os.remove(mine)


@cli.at_end
def release_locks():
    """Remove the output locks this process made (at the end of a run, whatever its end)."""
    while _locks:
        lock_file, owner = _locks.pop()
        with contextlib.suppress(OSError, ValueError):
            with open(lock_file) as f:
                if int(f.read().strip()) == owner:
                    os.remove(lock_file)


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
    """A save interrupted between atomic_dir's two renames leaves the last good output at its backup path: put
    it back (or drop the backup when the new output made it). Only a backup these scripts wrote (is_ours) is
    touched: a user's folder of that name stays as it is."""
    old = backup_path(out)
    if os.path.isdir(old) and not os.path.islink(old) and is_ours(old):
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
    parent = os.path.dirname(os.path.abspath(out))
    tmp = make_tmp_dir(parent, os.path.basename(os.path.abspath(out)))
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            if not (
                isinstance(e, OSError)
                and e.errno == errno.ENOSPC
                or "inline_container" in str(e)
                or "write" in str(e).lower()
                and shutil.disk_usage(parent).free < 2**30
            ):
                raise
            raise UsageError(
                f"{out}: the save failed, {shutil.disk_usage(parent).free / 2**20:.0f} MiB free in "
                f"{parent} ({type(e).__name__}); the last complete save is kept"
            ) from None
        moved = os.path.exists(out)
        if moved:
            os.rename(out, backup_path(out))
        os.rename(tmp, out)
        if moved:
            shutil.rmtree(backup_path(out), ignore_errors=True)
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


_checked = {}  # --out -> the trainer state check_resume read, for resume_state: a large state is loaded once


def check_resume(args, method):
    """--resume continues the run checkpointed in --out, so every flag that shapes its updates must be as that
    run had it (its summary.json); the others are RESUME_MAY_CHANGE."""
    folder = args.out  # or, after a save interrupted between its renames, the last good one (restored once accepted)
    if not os.path.isdir(folder) and is_ours(backup_path(args.out)):
        folder = backup_path(args.out)
    if not os.path.isfile(os.path.join(folder, STATE_FILE)):
        raise UsageError(f"--resume: {args.out} holds no resumable checkpoint (write one with --save-every)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError(
            f"--resume: {args.out} has no config.json, so no policy to continue: the checkpoint is "
            "damaged; resume from an earlier copy or start again"
        )
    _checked[args.out] = load_state(folder, method, args.out)  # a run of this method; resume_state takes it
    path = os.path.join(folder, "summary.json")
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


def load_state(folder, name, out):
    """trainer_state.pt in `folder` (--out, or its last good save) onto the CPU, wherever it was written, checked
    to be a trainer's state and a `name` run."""
    path = os.path.join(folder, STATE_FILE)
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or empty: zipfile, pickle and EOF errors alike
        raise UsageError(
            f"--resume: {path} is damaged ({type(e).__name__}); resume from an earlier copy or start again"
        ) from None
    needed = {"algo", "step", "records", "eval", "elapsed", "rng"}
    if not isinstance(st, dict) or not needed <= set(st):
        raise UsageError(
            f"--resume: {path} is damaged (not a trainer state); resume from an earlier copy or start again"
        )
    if st["algo"] != name:
        raise UsageError(f"--resume: {out} holds a {st['algo']} run, not a {name} one")
    return st


def resume_state(args, name, steps, longer="--steps"):
    """The state of the `name` run checkpointed in --out (trainer_state), checked to have steps left and to have
    run on as many processes; every RNG of this process is restored from it."""
    st = _checked.pop(args.out, None) or load_state(args.out, name, args.out)  # read once, by check_resume
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
