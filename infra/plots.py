"""Figures: compare.py's gold-against-KL plots (the frontier, docs/DVPO.md §6) and the learning curves of any runs,
drawn from what the runs wrote (metrics.jsonl, summary.json). Plumbing a reader of the algorithm can skip.

    python -m infra.plots ckpt/dvpo ckpt/ppo --out ckpt/curves.png   # held-out gold and KL against step and time
"""

import json
import os
import statistics
from dataclasses import dataclass, field

import infra.sigint  # noqa: F401  (first: a Ctrl-C while matplotlib loads is one line, exit 130)

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from infra import checkpoint, cli
from infra.cli import UsageError, arg

COLORS = {
    "dvpo": "tab:blue",
    "ppo": "tab:orange",
    "grpo": "tab:green",
    "remax": "tab:red",
    "dpo": "tab:purple",
    "ppo-frozen": "tab:brown",
    "dvpo-lam1": "tab:cyan",
}


def color(method, i=0):
    return COLORS.get(method, f"C{i % 10}")


def save(fig, path):
    """Write the figure through a temporary file in the same folder, so that an interrupted write leaves no
    half-written PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_png(path, flag):
    """Before any work: path can take a figure, a .png that is new or one a figure was written to before."""
    if not path.lower().endswith(".png"):
        raise UsageError(f"{flag} {path}: name a .png file")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder; name a .png file")
    if os.path.lexists(path) and not is_png(path):
        raise UsageError(f"{flag} {path}: exists and is not a PNG; name a new file")
    checkpoint.check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def is_png(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def evaluations(folder):
    """A run's held-out evaluations from its metrics.jsonl: the records holding eval/kl, in step order."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{folder}: no metrics.jsonl, so not a finished or running training run")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                raise UsageError(f"{path}: line {n} is not JSON") from None
            if isinstance(rec, dict) and "eval/kl" in rec and "step" in rec:
                rows.append(rec)
    return sorted(rows, key=lambda r: r["step"])


# ---------------------------------------------------------------------------------------------- learning curves
def learning_curves(folders, path, labels=None):
    """Held-out gold and KL against step and against wall-clock seconds, one line per run (a run without gold,
    e.g. on your own data, gets the KL panels only)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for i, folder in enumerate(folders):
        ev = evaluations(folder)
        if not ev:
            raise UsageError(f"{folder}: its metrics.jsonl holds no held-out evaluation (eval/kl); nothing to draw")
        label = labels[i] if labels else folder
        c = f"C{i % 10}"
        for col, x in ((0, "step"), (1, "time/elapsed")):
            xs = [e.get(x, float("nan")) for e in ev]
            if any("eval/gold" in e for e in ev):
                axes[0, col].plot(xs, [e.get("eval/gold", float("nan")) for e in ev], "o-", color=c, label=label)
            axes[1, col].plot(xs, [e["eval/kl"] for e in ev], "o-", color=c, label=label)
    axes[0, 0].set_ylabel("held-out gold reward")
    axes[1, 0].set_ylabel("KL(π‖π_ref), nats per sequence")
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("wall-clock seconds since the run started")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------------------------------------- compare.py's figures
def gold_vs_kl(res, path):
    """compare.py's plot: held-out gold against KL at each evaluation, per method and seed."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, m in enumerate(res):
        for j, curve in enumerate(res[m]["curve"]):
            ax.plot(*zip(*curve), "o-", color=color(m, i), alpha=0.6, label=res[m]["label"] if j == 0 else None)
    ax.set_xlabel("KL(π‖π_ref), nats per sequence")
    ax.set_ylabel("held-out gold reward (VADER)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def frontier(records, sft, path, middle):
    """The frontier (compare.py --frontier). Left: held-out gold against KL to the reference, one colour per
    method, each run a point with its 95% interval, the mean over seeds per budget joined, the SFT policy at the
    origin. Right: held-out gold against wall-clock seconds of the runs at the middle budget (`middle`, per
    method), from their in-run evaluations: the equal-compute view."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax.errorbar([0.0], [sft["gold"]], yerr=[sft["gold_ci95"]], fmt="k*", ms=10, capsize=3, label="SFT")
    methods = list(dict.fromkeys(r["method"] for r in records))
    for i, m in enumerate(methods):
        mine = [r for r in records if r["method"] == m]
        c = color(m, i)
        ax.errorbar(
            [r["kl"] for r in mine],
            [r["gold"] for r in mine],
            yerr=[r["gold_ci95"] for r in mine],
            fmt="o",
            color=c,
            alpha=0.45,
            ms=4,
            capsize=2,
        )
        budgets = {}
        for r in mine:
            budgets.setdefault(r["budget"], []).append(r)
        means = sorted(
            (statistics.mean(r["kl"] for r in rs), statistics.mean(r["gold"] for r in rs)) for rs in budgets.values()
        )
        ax.plot(*zip(*means), "-", color=c, lw=2, label=mine[0]["label"])
        for j, r in enumerate(x for x in mine if x["budget"] == middle.get(m)):
            curve = r["curve"]
            if curve:
                bx.plot(
                    [p["elapsed"] for p in curve],
                    [p["gold"] for p in curve],
                    "o-",
                    color=c,
                    alpha=0.7,
                    ms=3,
                    label=f"{mine[0]['label']} ({r['budget']})" if j == 0 else None,
                )
    ax.set_xlabel("KL(π‖π_ref), nats per sequence (held-out)")
    ax.set_ylabel("held-out gold reward (VADER), 95% CI")
    ax.set_title("gold against KL: points are runs, lines join the mean per budget", fontsize=10)
    ax.legend(fontsize=8)
    bx.axhline(sft["gold"], color="k", lw=0.8, ls=":")
    bx.set_xlabel("wall-clock seconds since the run started")
    bx.set_ylabel("held-out gold reward (in-run evaluations)")
    bx.set_title("equal compute: the middle budget of each method", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)


@dataclass
class Args:
    runs: list = field(
        default_factory=list, metadata={"nargs": "*", "help": "run folders (each holding metrics.jsonl)"}
    )
    out: str = arg("curves.png", "the PNG to write (a new file, or one this command wrote)")
    labels: str = arg("", "comma-separated legend labels, one per run; empty: the folders")


def curves_main(args: Args):
    if not args.runs:
        raise UsageError("name at least one run folder, e.g. python -m infra.plots ckpt/dvpo ckpt/ppo")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if labels and len(labels) != len(args.runs):
        raise UsageError(f"--labels {args.labels}: {len(labels)} labels for {len(args.runs)} runs")
    check_png(args.out, "--out")
    for run in args.runs:  # a run folder is an input: a save there would be replaced by the run's next one
        folder, inputs = os.path.realpath(os.path.dirname(os.path.abspath(args.out))), os.path.realpath(run)
        if folder == inputs or checkpoint.within(folder, inputs):
            raise UsageError(f"--out {args.out}: inside the run {run}, an input; name a file outside it")
    path = learning_curves(args.runs, args.out, labels)
    print(f"wrote {path}")
    return path


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    return cli.run_main(lambda: curves_main(args))


if __name__ == "__main__":
    main()
