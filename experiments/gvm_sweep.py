"""What makes a good GVM (docs/results.md): train the GVM under several pretraining settings, a few seeds each, run
DVPO from every one of them with the same flags, and ask which held-out GVM metric, measured without a gold
judge, predicts the held-out gold DVPO then reaches. PPO runs beside them with the same RL flags, so the gap
that remains is measured in the same sweep. Every run is its own process; a run whose folder already holds a
summary with the same flags is reused, so an interrupted sweep continues where it stopped.

    python experiments/gvm_sweep.py                        # every variant, seeds 0,1,2, on the embedded world
    python experiments/gvm_sweep.py --variants e3,e10 --seeds 0,1      # some of them
    python experiments/gvm_sweep.py --variants e3 --seeds 0 --steps 2 --eval-n 20 --no-ppo   # a smoke run
"""

import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's own modules
import infra.sigint  # noqa: F401  (first: a Ctrl-C while numpy and torch load is one line, exit 130)

import numpy as np

import compare
import dvpo
import gvm
import ppo_baseline
import reward
from infra import checkpoint, cli, world
from infra.cli import UsageError, arg

# name -> gvm.py flags; every other flag keeps gvm.py's default
VARIANTS = {
    "e3": "--epochs 3 --select last",
    "e10": "--epochs 10 --select last",
    "e20": "--epochs 20 --select last",
    "e10-lr3e-4": "--epochs 10 --lr 3e-4 --select last",
    "e10-lr3e-3": "--epochs 10 --lr 3e-3 --select last",
    "e10-lam1": "--epochs 10 --lam 1.0 --select last",
    "e10-lam0.8": "--epochs 10 --lam 0.8 --select last",
    "e10-bs64": "--epochs 10 --batch-size 64 --select last",
    "e10-acc": "--epochs 10 --select acc_final",
    "e10-margin": "--epochs 10 --select margin",
    "e20-margin": "--epochs 20 --select margin",
}
# held-out GVM metrics (gvm.heldout_metrics) whose correlation with DVPO's gold is reported
CRITERIA = (
    "pairwise_acc_final",
    "pairwise_acc_mean",
    "margin",
    "bt_loss",
    "terminal_mse",
    "value_mse",
    "td_loss",
    "ece",
)


@dataclass
class Args:
    root: str = arg("ckpt/sweep", "folder for every GVM and RL run of the sweep")
    variants: str = arg(
        ",".join(VARIANTS), "comma-separated GVM variants: " + ", ".join(f"{k} ({v})" for k, v in VARIANTS.items())
    )
    seeds: str = arg("0,1,2", "comma-separated seeds; seed s trains the GVM and runs DVPO (and PPO) with seed s")
    ppo: bool = arg(
        True, "also run PPO with the same RL flags, its reward model trained once by gvm.py's loop (<root>/rm)"
    )
    steps: int = arg(100, "RL steps of every DVPO and PPO run", ">= 1")
    target_kl: float = arg(
        6.0,
        "every RL run adapts beta towards this KL (nats/seq), so gold compares at comparable KL; 0: fixed beta",
        ">= 0",
    )
    kl_horizon: int = arg(640, "the adaptive KL controller's horizon, in samples", ">= 1")
    eval_n: int = arg(500, "held-out prompts of each RL run's final evaluation", ">= 1")
    gvm_extra: str = arg("", "more gvm.py flags for every variant, e.g. '--eval-every 50'")
    rl_extra: str = arg("", "more flags for every DVPO and PPO run (flags both take), e.g. '--lr 1e-4'")
    json: str = arg("", "where to write every number (default: <root>/sweep.json)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


def split(text, flag):
    try:
        return shlex.split(text)
    except ValueError as e:
        raise UsageError(f"{flag} {text}: {e}") from None


def rl_flags(args):
    kl = (
        ["--adaptive-kl", "--target-kl", str(args.target_kl), "--kl-horizon", str(args.kl_horizon)]
        if args.target_kl
        else []
    )
    return [
        "--steps",
        str(args.steps),
        "--eval-n",
        str(args.eval_n),
        "--eval-every",
        str(args.steps),
        "--table-every",
        str(10**9),
        "--device",
        args.device,
        *kl,
        *split(args.rl_extra, "--rl-extra"),
    ]


def ranks(x):
    """Ranks 1..n, ties sharing their mean rank (for Spearman's rho)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def partial(x, y, z):
    """Correlation of x and y with z's linear effect removed from both (for gold, the run's final KL)."""
    rx, ry = (np.asarray(a) - np.polyval(np.polyfit(z, a, 1), z) for a in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def correlations(runs):
    """Pearson's r and Spearman's rho of each held-out GVM metric with DVPO's held-out gold over all runs, and
    the partial r with each run's final KL held fixed (the adaptive controller leaves KLs spread around the
    target, and gold rises with KL)."""
    gold, kl = [r["gold"] for r in runs], [r["kl"] for r in runs]
    out = {}
    for c in CRITERIA:
        x = [r["gvm"][f"eval/{c}"] for r in runs]
        if len(set(x)) < 2 or len(set(gold)) < 2 or len(set(kl)) < 2:
            out[c] = {"pearson": float("nan"), "spearman": float("nan"), "partial_kl": float("nan")}
            continue
        out[c] = {
            "pearson": float(np.corrcoef(x, gold)[0, 1]),
            "spearman": float(np.corrcoef(ranks(x), ranks(gold))[0, 1]),
            "partial_kl": partial(x, gold, kl),
        }
    return out


def report(res, args):
    lines = [
        f"GVM variants, DVPO from each ({args.steps} steps, "
        + (f"beta adapted towards KL {args.target_kl}, horizon {args.kl_horizon}" if args.target_kl else "fixed beta")
        + f"), held-out gold on {args.eval_n} prompts, seeds {args.seeds}",
        "",
        "| GVM variant | gvm.py flags | acc, final | acc, mean | margin | terminal MSE | TD loss | ECE | GVM s "
        "| DVPO gold per seed (KL) | mean gold | mean KL |",
        "| " + " | ".join(["---"] * 12) + " |",
    ]
    for name, v in res["variants"].items():
        g = lambda k: statistics.mean(r["gvm"][f"eval/{k}"] for r in v)  # noqa: E731
        per_seed = " / ".join(f"{r['gold']:+.3f} ({r['kl']:.1f})" for r in v)
        lines.append(
            f"| {name} | `{VARIANTS[name]}` | {g('pairwise_acc_final'):.3f} | {g('pairwise_acc_mean'):.3f} "
            f"| {g('margin'):.3f} | {g('terminal_mse'):.3f} | {g('td_loss'):.4f} | {g('ece'):.3f} "
            f"| {statistics.median(r['gvm']['time/wall_seconds'] for r in v):.0f} | {per_seed} "
            f"| {statistics.mean(r['gold'] for r in v):+.3f} | {statistics.mean(r['kl'] for r in v):.2f} |"
        )
    if res.get("ppo"):
        p = res["ppo"]
        per_seed = " / ".join(f"{r['gold']:+.3f} ({r['kl']:.1f})" for r in p)
        lines.append(
            f"| PPO (reward model) | | | | | | | | | {per_seed} "
            f"| {statistics.mean(r['gold'] for r in p):+.3f} | {statistics.mean(r['kl'] for r in p):.2f} |"
        )
    n = sum(len(v) for v in res["variants"].values())
    lines += [
        "",
        f"| held-out GVM metric | Pearson r with DVPO gold ({n} runs) | Spearman rho | partial r, KL held fixed |",
        "| --- | --- | --- | --- |",
    ]
    for c, r in res["correlations"].items():
        lines.append(f"| {c} | {r['pearson']:+.2f} | {r['spearman']:+.2f} | {r['partial_kl']:+.2f} |")
    return "\n".join(lines)


def sweep(args: Args):
    cli.single_process("gvm_sweep.py")
    cli.check_args(args)
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UsageError(f"--seeds {args.seeds}: name seeds as comma-separated whole numbers, e.g. 0,1,2")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        raise UsageError(f"--variants {args.variants}: choose from {', '.join(VARIANTS)}")
    cli.parse_args(gvm.Args, split(args.gvm_extra, "--gvm-extra"), owner="--gvm-extra for gvm.py")  # before any run
    cli.parse_args(dvpo.Args, rl_flags(args), owner="--rl-extra for dvpo.py")
    if args.ppo:
        cli.parse_args(ppo_baseline.Args, rl_flags(args), owner="--rl-extra for ppo_baseline.py")
    path = args.json or os.path.join(args.root, "sweep.json")
    checkpoint.check_writable(args.root, "--root")
    checkpoint.check_output_file(path, "--json")
    world.ensure_world()
    os.makedirs(args.root, exist_ok=True)
    t0 = time.time()
    res = {"variants": {}}
    rm = os.path.join(args.root, "rm")
    for name in variants:
        res["variants"][name] = []
        for seed in seeds:
            g_out = os.path.join(args.root, f"gvm-{name}-s{seed}")
            g = compare.fresh_or_reused(
                "gvm.py",
                gvm.Args,
                [
                    *split(VARIANTS[name], name),
                    *split(args.gvm_extra, "--gvm-extra"),
                    "--seed",
                    seed,
                    "--device",
                    args.device,
                ],
                g_out,
                who="gvm_sweep",
            )
            d = compare.fresh_or_reused(
                "dvpo.py",
                dvpo.Args,
                [*rl_flags(args), "--gvm", g_out, "--seed", seed],
                os.path.join(args.root, f"dvpo-{name}-s{seed}"),
                who="gvm_sweep",
            )
            res["variants"][name].append(
                {
                    "seed": int(seed),
                    "gvm": {k: v for k, v in g.items() if k != "args"},
                    "gold": d["eval/gold"],
                    "gold_ci95": d["eval/gold_ci95"],
                    "kl": d["eval/kl"],
                }
            )
    if args.ppo:
        if not os.path.isfile(os.path.join(rm, "summary.json")):  # stage A once, as ppo_baseline.py would train it
            reward.train_reward_model(rm, args.device)
        res["ppo"] = []
        for seed in seeds:
            p = compare.fresh_or_reused(
                "ppo_baseline.py",
                ppo_baseline.Args,
                [*rl_flags(args), "--rm", rm, "--seed", seed],
                os.path.join(args.root, f"ppo-s{seed}"),
                who="gvm_sweep",
            )
            res["ppo"].append(
                {"seed": int(seed), "gold": p["eval/gold"], "gold_ci95": p["eval/gold_ci95"], "kl": p["eval/kl"]}
            )
    res["correlations"] = correlations([r for v in res["variants"].values() for r in v])
    res["table"] = report(res, args)
    res.update(args=asdict(args), wall_seconds=time.time() - t0)
    print("\n" + res["table"])
    checkpoint.write_json(path, res)
    print(f"\nwrote {path}")
    return res


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: sweep(args))


if __name__ == "__main__":
    main()
