"""Run plumbing every stage shares: dataclass command lines, one-line user errors, device, seeding, RNG
states, atomic output folders, metrics.jsonl. Nothing here knows about models, data or algorithms.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import tempfile

import torch


class UsageError(Exception):
    """A user mistake (bad flag, file, row): reported as one line and exit code 2, never a traceback."""


def run_main(fn):
    """Call fn(); turn a UsageError into 'error: ...' on stderr and exit 2."""
    try:
        return fn()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(cls, argv=None, description=None):
    """argparse built from a dataclass: --flag-name per field, help from field metadata."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if "nargs" in f.metadata:  # a positional list, e.g. evaluate.py's policies
            ap.add_argument(f.name, nargs=f.metadata["nargs"], help=help_)
        elif f.type in (bool, "bool"):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            ap.add_argument(name, type=type(f.default), default=f.default,
                            help=f"{help_} (default: {f.default!r})")
    return cls(**vars(ap.parse_args(argv)))


def arg(default, help):  # noqa: A002 (dataclass field with a help line, CleanRL-style)
    return dataclasses.field(default=default, metadata={"help": help})


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None


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


def backup_path(out):
    return os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}-old")


def restore_interrupted(out):
    """A save interrupted between atomic_dir's two renames leaves the last good output at its backup path:
    put it back (or drop the backup when the new output made it)."""
    old = backup_path(out)
    if os.path.isdir(old):
        if os.path.exists(out):
            shutil.rmtree(old)
        else:
            os.rename(old, out)


@contextlib.contextmanager
def atomic_dir(out):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed, so a
    crash or a bad input never leaves a half-written checkpoint. The old output is renamed to a fixed backup
    path before the new one takes its name, and restore_interrupted undoes a crash between the two."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    restore_interrupted(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}-tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        if os.path.exists(out):
            os.rename(out, backup_path(out))
        os.rename(tmp, out)
        restore_interrupted(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class MetricsLog:
    """Appends one JSON object per logged step to <out>/metrics.jsonl."""

    def __init__(self, path):
        self.f = open(path, "w")

    def write(self, step, metrics):
        self.f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()
