"""Run plumbing every stage shares: dataclass command lines with checked ranges, one-line user errors, device,
seeding, RNG states, output paths checked before any work, atomic output folders, progress lines,
metrics.jsonl. Nothing here knows about models, data or algorithms.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import torch
from tqdm import tqdm

import distributed


class UsageError(Exception):
    """A user mistake (bad flag, file, row): reported as one line and exit code 2, never a traceback."""


def run_main(fn):
    """Call fn(); turn a UsageError into 'error: ...' on stderr and exit 2, and Ctrl-C into one line and exit
    130 (what was being saved is removed by atomic_dir; the last complete output stays). Under torchrun every
    rank meets the same mistake and exits so; rank 0 alone says it."""
    try:
        out = fn()
        distributed.close()
        return out
    except UsageError as e:
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if distributed.is_main():
            print("interrupted: the output folder holds the last complete save, if any", file=sys.stderr)
        sys.exit(130)


def single_process(script):
    """For the scripts that run as one process (evaluation, DPO, the comparisons): refuse torchrun."""
    if distributed.world() > 1:
        raise UsageError(f"{script} runs as one process; start it with python, not torchrun")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, 'abc' for a number) are one line, like every other user error."""

    def error(self, message):
        if distributed.is_main():
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(cls, argv=None, description=None):
    """argparse built from a dataclass: --flag-name per field, help from field metadata."""
    ap = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if "nargs" in f.metadata:  # a positional list, e.g. evaluate.py's policies
            ap.add_argument(f.name, nargs=f.metadata["nargs"], help=help_)
        elif f.type in (bool, "bool"):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            check = f" {f.metadata['check']}" if "check" in f.metadata else ""
            ap.add_argument(name, type=type(f.default), default=f.default,
                            help=f"{help_} (default: {f.default!r}{';' + check if check else ''})")
    return cls(**vars(ap.parse_args(argv)))


def arg(default, help, check=None):  # noqa: A002 (dataclass field with a help line, CleanRL-style)
    """A flag: its default, a one-line help, and optionally its range ('> 0', '>= 1', '[0, 1]', '(0, 1]', ...),
    which check_args enforces."""
    return dataclasses.field(default=default, metadata={"help": help, **({"check": check} if check else {})})


def in_range(value, check):
    if check[0] in "<>":
        op, bound = check.split()
        return {">": value > float(bound), ">=": value >= float(bound), "<": value < float(bound),
                "<=": value <= float(bound)}[op]
    lo, hi = (float(x) for x in check[1:-1].split(","))
    return (lo < value if check[0] == "(" else lo <= value) and (value < hi if check[-1] == ")" else value <= hi)


def check_args(args):
    """Every number a finite one, and in its flag's range: a bad flag stops the run before any work."""
    for f in dataclasses.fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {value}: must be a finite number")
        check = f.metadata.get("check")
        if check and not in_range(value, check):
            raise UsageError(f"{flag} {value}: must be {check}" if check[0] in "<>" else f"{flag} {value}: must lie in {check}")


def pick_device(name):
    """--device as a torch.device; under torchrun, this rank's (cuda:LOCAL_RANK), once the process group is joined."""
    if name == "auto":
        return distributed.init(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    return distributed.init(device)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def rng_states():
    """Every RNG a run draws from: python, numpy, torch CPU and CUDA."""
    import numpy as np
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s):
    import numpy as np
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------- outputs
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
        raise UsageError(f"{flag} {path}: is a file; name a folder (it is created, or replaced if an earlier run wrote it)")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "summary.json")):
        raise UsageError(f"{flag} {path}: a folder these scripts did not write (no summary.json); it would be "
                         "replaced, so name another")
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
        pid = entry[len(prefix):].split("-")[0]
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


def progress(items, desc, enabled=True, info=None):
    """Iterate items with a progress bar on a terminal; elsewhere (a log file, CI) print a line at every tenth
    of the way, so a long build is seen advancing. info() adds a short status (e.g. the loss)."""
    if not enabled or not distributed.is_main():
        yield from items
        return
    if sys.stderr.isatty():
        bar = tqdm(items, desc=desc, leave=False)
        for x in bar:
            yield x
            if info:
                bar.set_postfix_str(info())
        return
    n, t0 = len(items), time.time()
    for i, x in enumerate(items, 1):
        yield x
        if i % max(1, n // 10) == 0 or i == n:
            print(f"{desc}: {i}/{n}" + (f", {info()}" if info else "") + f", {time.time() - t0:.0f}s", flush=True)


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
