"""Command lines and process plumbing every stage shares: dataclass flags with checked ranges, one-line user
errors, the device, seeding and RNG states, progress lines. Nothing here knows about models, data or algorithms.
"""

import argparse
import dataclasses
import math
import random
import re
import signal
import sys
import time

import torch
from tqdm import tqdm

from infra import distributed


class UsageError(Exception):
    """A user mistake (bad flag, file, row): reported as one line and exit code 2, never a traceback."""


_at_end = []


def at_end(fn):
    """Register fn() to run when run_main ends, however it ends (infra/checkpoint.py releases its locks)."""
    _at_end.append(fn)
    return fn


def run_main(fn):
    """Call fn(); turn a UsageError into 'error: ...' on stderr and exit 2, and Ctrl-C into one line and exit
    130 (what was being saved is removed by atomic_dir; the last complete output stays). Under torchrun every
    rank meets the same mistake and exits so; rank 0 alone says it. A Ctrl-C that a library caught and turned
    into another error (transformers' lazy imports do: "no tokenizer (ModuleNotFoundError ...)") is still
    reported as the interrupt it was."""
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(True)
        raise KeyboardInterrupt

    # a process started with Ctrl-C ignored (`cmd &` in a script, nohup) keeps ignoring it, as Python does
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    previous = None if ignored else signal.signal(signal.SIGINT, on_sigint)
    try:
        out = fn()
        distributed.close()
        return out
    except KeyboardInterrupt:
        _say_interrupted()
    except UsageError as e:
        if interrupted:
            _say_interrupted()
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        if interrupted:
            _say_interrupted()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for end in _at_end:
            end()


def _say_interrupted():
    if distributed.is_main():
        print("interrupted: the output folder holds the last complete save, if any", file=sys.stderr)
    sys.exit(130)


def single_process(script):
    """For the scripts that run as one process (evaluation, DPO, the comparisons): refuse torchrun."""
    if distributed.world() > 1:
        raise UsageError(f"{script} runs as one process; start it with python, not torchrun")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, 'abc' for a number) are one line, like every other user error; with
    `owner` (flags passed on to another script) they raise UsageError naming that script instead."""

    owner = None

    def error(self, message):
        if self.owner:
            raise UsageError(f"{self.owner}: {message}")
        if distributed.is_main():
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(cls, argv=None, description=None, owner=None):
    """argparse built from a dataclass: --flag-name per field, help from field metadata; the class's own fields are
    listed before those it inherits (infra/flags.py's blocks). A text flag takes the next word whatever it looks
    like (`--extra --fsdp`). owner: the script whose flags these are, for checking pass-through flags."""
    ap = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.owner = owner
    order = [name for c in cls.__mro__ for name in c.__dict__.get("__annotations__", {})]  # own first, then blocks
    for f in sorted(dataclasses.fields(cls), key=lambda f: order.index(f.name)):
        name, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if "nargs" in f.metadata:  # a positional list, e.g. evaluate.py's policies
            ap.add_argument(f.name, nargs=f.metadata["nargs"], help=help_)
        elif f.type in (bool, "bool"):
            ap.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            check = f" {f.metadata['check']}" if "check" in f.metadata else ""
            ap.add_argument(
                name,
                type=type(f.default),
                default=f.default,
                help=f"{help_} (default: {f.default!r}{';' + check if check else ''})",
            )
    text = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.type in (str, "str")}
    argv, joined = list(sys.argv[1:] if argv is None else argv), []
    while argv:  # `--extra --fsdp` is --extra's value, not a flag of this script
        word = argv.pop(0)
        joined.append(f"{word}={argv.pop(0)}" if word in text and argv else word)
    args = cls(**vars(ap.parse_args(joined)))
    if owner:  # pass-through flags: their ranges too, before the work that precedes the target script's run
        try:
            check_args(args)
        except UsageError as e:
            raise UsageError(f"{owner}: {e}") from None
    return args


def arg(default, help, check=None):  # noqa: A002 (dataclass field with a help line, CleanRL-style)
    """A flag: its default, a one-line help, and optionally its range ('> 0', '>= 1', '[0, 1]', '(0, 1]', ...),
    which check_args enforces."""
    return dataclasses.field(default=default, metadata={"help": help, **({"check": check} if check else {})})


def in_range(value, check):
    if check[0] in "<>":
        op, bound = check.split()
        return {
            ">": value > float(bound),
            ">=": value >= float(bound),
            "<": value < float(bound),
            "<=": value <= float(bound),
        }[op]
    lo, hi = (float(x) for x in check[1:-1].split(","))
    return (lo < value if check[0] == "(" else lo <= value) and (value < hi if check[-1] == ")" else value <= hi)


def check_args(args):
    """Every number a finite one, and in its flag's range: a bad flag stops the run before any work."""
    for f in dataclasses.fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} {value}: must be a finite number")
        if f.name == "device" and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise UsageError(f"--device {value}: use auto, cpu, cuda or cuda:N")
        check = f.metadata.get("check")
        if check and not in_range(value, check):
            raise UsageError(
                f"{flag} {value}: must be {check}" if check[0] in "<>" else f"{flag} {value}: must lie in {check}"
            )


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

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(s):
    import numpy as np

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
