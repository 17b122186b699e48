"""Imported first by every script, before torch: a Ctrl-C while the libraries load (seconds on a cold disk) is one
line and exit 130 instead of a 58-line KeyboardInterrupt traceback. Nothing has been written yet, so the process
just ends; cli.run_main takes Ctrl-C over once the run starts. Imported as a library (pytest, compare.py importing
gvm) it changes nothing."""

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _while_loading(signum, frame):
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; one says so
        print("interrupted while loading the libraries; nothing was written", file=sys.stderr, flush=True)
    os._exit(130)  # not an exception: import machinery and lazy loaders cannot turn it into another error


_main = getattr(sys.modules.get("__main__"), "__file__", None)
if _main and Path(_main).resolve().parent in (REPO, REPO / "experiments", REPO / "infra"):
    signal.signal(signal.SIGINT, _while_loading)
