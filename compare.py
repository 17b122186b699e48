"""The methods side by side on one world, with the same seeds, loop, flags and budget: memory and time per
phase, held-out gold and KL per seed, gold at equal wall-clock time (docs/DVPO.md §7). For each seed every
method runs in its own process (so RSS and CUDA peaks are its own), after the GVM and the reward model are
trained on the same preference pairs: DVPO, PPO, GRPO and ReMax online, DPO offline on the pairs, and two
rows that isolate what a frozen critic costs, PPO with its critic frozen and DVPO at lambda = 1. The online
methods adapt their beta towards one KL target, so that quality compares at comparable KL.

    python compare.py                                   # benchmark world (4-layer Llama), every method, 3 seeds
    python compare.py --methods dvpo,ppo --target-kl 0  # DVPO and PPO alone, each at its fixed beta
    python compare.py --seeds 0 --steps 2 --eval-n 20   # a smoke run
    python compare.py --analytic docs/model-configs/llama-3-8b  # the memory model (§7) for a real model's config only
    python compare.py --frontier                        # gold against KL: every method at 4 KL budgets, 3 seeds
    python compare.py --frontier --quick                # the same figure in minutes (2 budgets, 1 seed, short runs)

--frontier (docs/usage.md, "Comparing methods") judges every method at several KL budgets, the way the field
compares RLHF methods (Gao et al. 2022; the DPO paper's Figure 2): each run evaluated on the same held-out prompts,
finished runs reused, a JSON, a table per method and a PNG.

Memory on CUDA is torch.cuda.max_memory_allocated per phase; on CPU it is the tally of parameter, gradient and
optimizer-state bytes plus the peak bytes of activations saved for backward, with process RSS beside it.
"""

import importlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import evaluate
import gvm
import reward
from infra import checkpoint, cli, memory, plots, world
from infra.cli import UsageError, arg

REPO = os.path.dirname(os.path.abspath(__file__))
PHASES = ("generate", "score", "update")
# name -> (script, label, its flags beyond the shared ones): the five methods, and two rows that isolate what a
# frozen critic costs (PPO's critic frozen at the reward model; DVPO with the GVM's shaping off, lambda = 1)
METHODS = {
    "dvpo": ("dvpo.py", "DVPO", lambda a: ["--gvm", os.path.join(a.root, "gvm")]),
    "ppo": ("ppo_baseline.py", "PPO", lambda a: ["--rm", os.path.join(a.root, "rm")]),
    "grpo": (
        "grpo_baseline.py",
        "GRPO",
        lambda a: ["--rm", os.path.join(a.root, "rm"), "--group-size", str(a.group_size)],
    ),
    "remax": ("remax_baseline.py", "ReMax", lambda a: ["--rm", os.path.join(a.root, "rm")]),
    "dpo": ("dpo_baseline.py", "DPO", None),
    "ppo-frozen": (
        "ppo_baseline.py",
        "PPO, critic frozen",
        lambda a: ["--rm", os.path.join(a.root, "rm"), "--freeze-critic"],
    ),
    "dvpo-lam1": ("dvpo.py", "DVPO, λ = 1", lambda a: ["--gvm", os.path.join(a.root, "gvm"), "--lam", "1.0"]),
}

FRONTIER_METHODS = "dvpo,ppo,grpo,remax,dpo"  # --frontier's default: the paper's five methods


@dataclass
class Args:
    root: str = arg(
        "",
        "folder for the value models and every run (and the benchmark world); empty: ckpt/bench, ckpt/frontier "
        "with --frontier, ckpt/frontier-quick with --quick",
    )
    world: str = arg(
        "",
        "an existing world folder (sft/ and data/, e.g. from python -m infra.world --model M) instead of building "
        "the benchmark world (--frontier: instead of the embedded world in ckpt/); the world's size flags then do "
        "not apply",
    )
    frontier: bool = arg(
        False,
        "the gold-KL frontier: every method at each KL budget in --targets (DPO at betas spanning them) and each "
        "seed, each run evaluated on the same held-out prompts; a JSON, a table per method and a PNG",
    )
    targets: str = arg(
        "1.5,3,6,12", "with --frontier: KL budgets (nats/seq), the online methods' adaptive-beta targets"
    )
    dpo_betas: str = arg(
        "",
        "with --frontier: DPO's betas (comma-separated); empty: chosen to span --targets from two seed-0 pilot "
        "runs (at --dpo-beta and 4x it)",
    )
    quick: bool = arg(
        False,
        "with --frontier: a budget that runs in minutes on 2 CPU cores (2 targets, 1 seed, 40 steps of 32 "
        "prompts, 200 held-out prompts, DPO 1 epoch); it sets those flags",
    )
    plot: str = arg("", "with --frontier: the PNG to write; empty: next to the JSON")
    hidden: int = arg(
        128, "width of the benchmark world's Llama (the model-state share of memory grows with it)", ">= 1"
    )
    layers: int = arg(4, "layers of the benchmark world's Llama", ">= 1")
    heads: int = arg(4, "attention heads of the benchmark world's Llama", ">= 1")
    sft_steps: int = arg(600, "SFT steps of the benchmark world", ">= 1")
    sft_lr: float = arg(2e-3, "SFT learning rate of the benchmark world", "> 0")
    n_train_prompts: int = arg(
        4000, "RL-train prompts of the benchmark world, one preference pair sampled on each", ">= 1"
    )
    n_eval_prompts: int = arg(
        500, "held-out prompts of the benchmark world, one preference pair sampled on each", ">= 1"
    )
    methods: str = arg(
        "",
        "comma-separated, run in this order for each seed: " + ", ".join(METHODS) + "; empty: all of them, "
        f"or with --frontier the five methods ({FRONTIER_METHODS})",
    )
    seeds: str = arg("0,1,2", "comma-separated seeds; each runs every method")
    steps: int = arg(100, "RL steps of every online run", ">= 1")
    batch_size: int = arg(64, "prompts per RL step (GRPO samples --group-size responses to each)", ">= 1")
    minibatch_size: int = arg(16, "prompts' responses per PPO minibatch", ">= 1")
    group_size: int = arg(4, "GRPO's responses per prompt", ">= 2")
    target_kl: float = arg(
        6.0,
        "every online method adapts its beta towards this KL (nats/seq) with --kl-horizon, so quality compares "
        "at comparable KL; 0: each method's fixed beta",
        ">= 0",
    )
    kl_horizon: int = arg(640, "the adaptive KL controller's horizon, in samples, with --target-kl", ">= 1")
    dpo_epochs: int = arg(3, "DPO's passes over the preference pairs", ">= 1")
    dpo_beta: float = arg(0.1, "DPO's beta", "> 0")
    value_epochs: int = arg(
        0,
        "epochs of GVM and reward-model training; 0: each one's default (gvm.py's --epochs and --select, "
        "stage A's --rm-epochs)",
        ">= 0",
    )
    value_lr: float = arg(
        0.0, "learning rate of GVM and reward-model training; 0: each one's default (--lr, --rm-lr)", ">= 0"
    )
    eval_n: int = arg(500, "held-out prompts of each run's evaluations", ">= 1")
    extra: str = arg("", "more flags for every trainer, e.g. '--dtype bf16 --micro-batch-size 4'")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    json: str = arg("", "results file; empty: <root>/compare.json")
    analytic: str = arg(
        "",
        "only print the analytic memory of DVPO and PPO for these models (config folders or hub names, "
        "comma-separated)",
    )
    response_len: int = arg(256, "with --analytic: response tokens, for the logits and KV-cache rows", ">= 1")
    prompt_len: int = arg(512, "with --analytic: prompt tokens, for the KV-cache row", ">= 1")
    micro_batch_size: int = arg(
        4, "with --analytic: responses per update micro-batch, for the logits and checkpointed-inputs row", ">= 1"
    )
    lora_r: int = arg(8, "with --analytic: the LoRA rank of its LoRA rows", ">= 1")
    gpus: str = arg(
        "",
        "with --analytic: also the per-GPU model states on these numbers of GPUs (comma-separated, e.g. 8,16) "
        "under DDP and FSDP2",
    )
    nproc: int = arg(
        1,
        "processes per run: above 1, every online method runs under torchrun (DDP; add --extra --fsdp for FSDP2) "
        "and memory is the largest rank's",
        ">= 1",
    )


def bench_world(args):
    """The benchmark world in args.root, built unless one with the same settings is there; or --world's."""
    if args.world:
        if not os.path.isfile(os.path.join(args.world, "data", world.MARKER)):
            raise UsageError(f"--world {args.world}: no data/{world.MARKER}, so not a world (python -m infra.world)")
        return world_paths(args.world)
    cfg = world.WorldConfig(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        sft_steps=args.sft_steps,
        sft_lr=args.sft_lr,
        n_train_prompts=args.n_train_prompts,
        n_eval_prompts=args.n_eval_prompts,
    )
    marker = os.path.join(args.root, "data", world.MARKER)
    built = None
    if os.path.exists(marker):
        with open(marker) as f:
            built = json.load(f)["config"]
    if built != asdict(cfg):
        world.build_world(args.root, cfg)
    return world_paths(args.root)


def world_paths(root):
    return {
        name: os.path.join(root, *parts)
        for name, parts in (
            ("sft", ("sft",)),
            ("pairs", ("data", "pairs_train.jsonl")),
            ("pairs_eval", ("data", "pairs_eval.jsonl")),
            ("prompts", ("data", "prompts_train.jsonl")),
            ("prompts_eval", ("data", "prompts_eval.jsonl")),
        )
    }


def value_models(args, paths):
    """GVM (TD(lambda)) and reward model (Bradley-Terry) from one loop, one backbone and the same pairs, each with its
    own script's defaults unless --value-epochs sets both."""
    common = {
        "model": paths["sft"],
        "data": paths["pairs"],
        "eval_data": paths["pairs_eval"],
        "device": args.device,
        **({"epochs": args.value_epochs} if args.value_epochs else {}),
        **({"lr": args.value_lr} if args.value_lr else {}),
    }
    return {
        "gvm": trained_or_reused(gvm.Args(out=os.path.join(args.root, "gvm"), **common)),
        "rm": trained_or_reused(
            reward.reward_model_args(os.path.join(args.root, "rm"), **common), reward.BradleyTerry()
        ),
    }


def trained_or_reused(a: gvm.Args, objective=None):
    """gvm.train(a, objective), unless a.out already holds a value model trained with exactly these flags."""
    done = os.path.join(a.out, "summary.json")
    if os.path.isfile(done) and json.load(open(done)).get("args") == json.loads(json.dumps(asdict(a))):
        print(f"compare: reusing {a.out} (trained with the same flags)", flush=True)
        return json.load(open(done))
    return gvm.train(a, objective)


def run(script, flags, log_path, nproc=1):
    """One training run in its own process (under torchrun with nproc processes); its output goes to log_path."""
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        if nproc > 1
        else [sys.executable]
    )
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [*launch, os.path.join(REPO, script), *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if proc.returncode != 0:
        raise UsageError(f"{script} failed (exit {proc.returncode}); its log: {log_path}")


def read_run(folder):
    """(step records, evaluation records, summary) of one run."""
    lines = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]
    return (
        [m for m in lines if "time/update" in m],
        [m for m in lines if "eval/gold" in m],
        json.load(open(os.path.join(folder, "summary.json"))),
    )


def peak_memory(steps, cuda):
    """Peak bytes per phase and overall, the model-state tally, and RSS, over a run's steps (DPO has no
    generate or score phase)."""
    out = {}
    phases = [p for p in PHASES if f"time/{p}" in steps[0]]
    for p in phases:
        if cuda:
            out[p] = max(m[f"memory/{p}_peak_bytes"] for m in steps)
        else:
            out[p] = max(m[f"memory/{p}_state_bytes"] + m[f"memory/{p}_activation_bytes"] for m in steps)
        out[f"{p}_activations"] = max(m[f"memory/{p}_activation_bytes"] for m in steps)
    out["overall"] = max(out[p] for p in phases)
    if not cuda:
        out["states_measured"] = max(m["memory/update_state_bytes"] for m in steps)
        out["rss"] = max(m[f"memory/{p}_rss_bytes"] for m in steps for p in phases)
    return out


def at_time(evals, seconds):
    """The last evaluation record done within `seconds` of a run's start (None if none was)."""
    done = [e for e in evals if e.get("time/elapsed", 0.0) <= seconds]
    return done[-1] if done else None


def summarize(method, runs, cuda):
    """Medians of per-step times over all steps but each run's first (warm-up) over all seeds; worst-case
    memory over seeds; quality per seed."""
    steps = [m for st, _, _ in runs for m in (st[1:] if len(st) > 1 else st)]
    phases = [p for p in PHASES if f"time/{p}" in steps[0]]
    times = {p: statistics.median(m[f"time/{p}"] for m in steps) for p in phases}
    times["step"] = statistics.median(sum(m[f"time/{p}"] for p in phases) for m in steps)
    times["run"] = statistics.median(s["time/wall_seconds"] for _, _, s in runs)
    mems = [peak_memory(st, cuda) for st, _, _ in runs]
    mem = {k: max(m[k] for m in mems) for k in mems[0]}
    s0 = runs[0][2]
    frozen_bytes = 4 if s0["args"]["dtype"] == "fp32" else 2  # --dtype stores frozen models in 2 bytes
    trained_bytes = 10 if s0["args"].get("optim") == "adamw8bit" else 16  # fp32 weight and gradient; moments 8 or 2 B
    n, a = s0.get("processes", 1), s0["args"]  # per rank: FSDP2 holds 1/n of what it shards
    mem["states_analytic"] = trained_bytes * s0["params/trained"] / (n if a.get("fsdp") else 1) + frozen_bytes * s0[
        "params/frozen"
    ] / (n if a.get("shard_frozen") else 1)  # §7
    quality = [
        {"seed": s["args"]["seed"], "gold": s["eval/gold"], "gold_ci95": s["eval/gold_ci95"], "kl": s["eval/kl"]}
        for _, _, s in runs
    ]
    curve = [[(e["eval/kl"], e["eval/gold"]) for e in ev] for _, ev, _ in runs]
    return {
        "method": method,
        "label": METHODS[method][1],
        "time": times,
        "memory": mem,
        "quality": quality,
        "curve": curve,
        "evals": [ev for _, ev, _ in runs],
        "params_trained": s0["params/trained"],
        "params_frozen": s0["params/frozen"],
    }


def machine(device, nproc):
    """The machine the runs ran on, as the tables name it."""
    import torch

    name = f"CUDA ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return name + (f", {nproc} processes per run" if nproc > 1 else "")


def mib(x):
    return f"{x / 2**20:.1f}"


def report(res, vm, args, cuda, device_name, n_pairs):
    """Markdown tables: memory and time per phase (one column per method, its ratio to PPO's beside it),
    held-out gold and KL per seed, gold at equal wall-clock time, and the value models."""
    ms = list(res)
    base = res.get("ppo")

    def cells(get, fmt):
        out = []
        for m in ms:
            v, b = get(res[m]), (get(base) if base else None)
            out.append("—" if v is None else fmt(v) + (f" ({v / b:.2f})" if b and m != "ppo" else ""))
        return " | ".join(out)

    kind = (
        "peak allocated (torch.cuda.max_memory_allocated)"
        if cuda
        else "model states (params + grads + optimizer) + activations saved for backward"
    )
    head = "| " + " | ".join(res[m]["label"] for m in ms) + " |"
    sep = "| --- " * (len(ms) + 1) + "|"
    target = (
        f"β adapted towards KL {args.target_kl} (horizon {args.kl_horizon})"
        if args.target_kl
        else "each method's fixed β"
    )
    lines = [
        f"## {len(ms)} methods on {device_name}, seeds {args.seeds}",
        "",
        f"Online methods: {args.steps} steps of {args.batch_size} prompts (GRPO: {args.group_size} responses each), "
        f"minibatches of {args.minibatch_size} prompts, {target}. DPO: {args.dpo_epochs} epoch(s) over the "
        f"{n_pairs} preference pairs, β = {args.dpo_beta}. Memory in MiB, {kind}; in brackets the ratio to PPO.",
        "",
        f"| memory {head}",
        sep,
    ]
    rows = [(f"{ph} phase", ph) for ph in PHASES] + [
        ("overall peak", "overall"),
        ("model states, analytic", "states_analytic"),
    ]
    if not cuda:
        rows += [
            ("model states, measured tally", "states_measured"),
            ("activations, update phase", "update_activations"),
            ("process RSS (max, for reference)", "rss"),
        ]
    for label, k in rows:
        lines.append(f"| {label} | " + cells(lambda r: r["memory"].get(k), mib) + " |")
    lines += ["", f"| median time per step, s {head}", sep]
    for k in (*PHASES, "step"):
        lines.append(f"| {k} | " + cells(lambda r: r["time"].get(k), lambda v: f"{v:.3f}") + " |")
    lines.append(
        "| whole run (median over seeds), s | " + cells(lambda r: r["time"]["run"], lambda v: f"{v:.1f}") + " |"
    )
    equal = res["dvpo"]["time"]["run"] if "dvpo" in res else min(res[m]["time"]["run"] for m in ms)  # DVPO's time
    lines += [
        "",
        f"| held-out gold ({args.eval_n} prompts, ± 95% CI) | per seed (KL, nats/seq) | mean | KL, nats/seq "
        f"| gold within {equal:.1f} s (DVPO's run) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in ms:
        r = res[m]
        per = " / ".join(f"{q['gold']:+.3f} ± {q['gold_ci95']:.3f} ({q['kl']:.1f})" for q in r["quality"])
        timed = [e for e in (at_time(ev, equal) for ev in r["evals"]) if e is not None]
        lines.append(
            f"| {r['label']} | {per} | {statistics.mean(q['gold'] for q in r['quality']):+.3f} "
            f"| {statistics.mean(q['kl'] for q in r['quality']):.2f} | "
            + (
                f"{statistics.mean(e['eval/gold'] for e in timed):+.3f} "
                f"(step {'/'.join(str(e['step']) for e in timed)}) |"
                if timed
                else "— |"
            )
        )
    lines += [
        "",
        "| value model (same backbone, same pairs) | held-out acc, final value | held-out acc, mean value "
        "| training s |",
        "| --- | --- | --- | --- |",
    ]
    for name, k in (("GVM (TD(λ), ±1 labels)", "gvm"), ("reward model (Bradley–Terry)", "rm")):
        s = vm[k]
        lines.append(
            f"| {name} | {s['eval/pairwise_acc_final']:.3f} | {s['eval/pairwise_acc_mean']:.3f} "
            f"| {s['time/wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def method_flags(args, method, paths, device, extra, n_pairs):
    """The command line of one method's run: the online methods share theirs; DPO trains on the pairs."""
    if method == "dpo":
        steps = -(-n_pairs // 32) * args.dpo_epochs
        return [
            "--policy",
            paths["sft"],
            "--data",
            paths["pairs"],
            "--eval-data",
            paths["pairs_eval"],
            "--eval-prompts",
            paths["prompts_eval"],
            "--eval-n",
            str(args.eval_n),
            "--epochs",
            str(args.dpo_epochs),
            "--beta",
            str(args.dpo_beta),
            "--eval-every",
            str(max(1, steps // 4)),
            "--device",
            str(device),
            *extra,
        ]
    kl = (
        ["--adaptive-kl", "--target-kl", str(args.target_kl), "--kl-horizon", str(args.kl_horizon)]
        if args.target_kl
        else []
    )
    return [
        "--policy",
        paths["sft"],
        "--prompts",
        paths["prompts"],
        "--eval-prompts",
        paths["prompts_eval"],
        "--eval-n",
        str(args.eval_n),
        "--steps",
        str(args.steps),
        "--eval-every",
        str(max(1, args.steps // 4)),
        "--batch-size",
        str(args.batch_size),
        "--minibatch-size",
        str(args.minibatch_size),
        "--table-every",
        str(10**9),
        "--device",
        str(device),
        *kl,
        *METHODS[method][2](args),
        *extra,
    ]


# ---------------------------------------------------------------------------------------------- the frontier
# --frontier: the field's comparison of RLHF methods (Gao et al. 2022; the DPO paper's Figure 2): held-out gold
# against KL to the reference, every method at several KL budgets, so that each is judged at every budget
QUICK = {
    "targets": "2,6",
    "seeds": "0",
    "steps": 40,
    "batch_size": 32,
    "kl_horizon": 320,
    "eval_n": 200,
    "dpo_epochs": 1,
}
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def initial_beta(target):
    """The online methods' starting beta for a KL target: KL roughly inversely proportional to beta, 0.05 at 6
    nats (the fixed-beta sweep in docs/results.md); the adaptive controller does the rest."""
    return 0.3 / target


def dpo_betas(pilots, targets):
    """DPO's betas for the KL targets, from pilot runs [(beta, KL), ...]: a power law KL = c * beta^-p fitted
    through the pilots (p = 1 with one pilot), solved for each target; p is held within [0.5, 2] and beta within
    32x of the first pilot's, so that pilots that barely moved cannot send beta far away."""
    (b0, k0), rest = pilots[0], pilots[1:]
    p = 1.0
    if rest:
        b1, k1 = rest[0]
        p = min(2.0, max(0.5, -(math.log(k1) - math.log(k0)) / (math.log(b1) - math.log(b0))))
    return [float(f"{min(32 * b0, max(b0 / 32, b0 * (k0 / t) ** (1 / p))):.3g}") for t in targets]


def numbers(text, flag):
    try:
        xs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        xs = []
    if not xs or any(x <= 0 for x in xs):
        raise UsageError(f"{flag} {text}: name numbers above 0, comma-separated")
    return xs


def fresh_or_reused(script, args_cls, flags, out, who="compare"):
    """Run `script flags --out out` unless `out` already holds a finished run with the same flags; its summary."""
    planned = asdict(cli.parse_args(args_cls, [*flags, "--out", out]))
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done) and {k: json.load(open(done))["args"].get(k) for k in planned} == planned:
        print(f"{who}: reusing {out}", flush=True)
    else:
        print(f"{who}: {script} -> {out} (its flags: {out}/summary.json, its output: {out}.log)", flush=True)
        run(script, [*flags, "--out", out], out + ".log")
    return json.load(open(done))


def evaluated(policy, paths, args, device, out):
    """One evaluate.py call on the held-out prompts (KL against the SFT policy), reused when `out` holds one with
    the same flags written after the policy's run finished."""
    flags = [policy, "--ref", paths["sft"], "--prompts", paths["prompts_eval"], "--n-prompts", str(args.eval_n)]
    planned = asdict(cli.parse_args(evaluate.Args, [*flags, "--show-values", "0", "--device", str(device)]))
    summary = os.path.join(policy, "summary.json")
    if os.path.isfile(out) and (not os.path.isfile(summary) or os.path.getmtime(out) > os.path.getmtime(summary)):
        old = json.load(open(out))
        if {k: old["args"].get(k) for k in planned if k != "json"} == {k: v for k, v in planned.items() if k != "json"}:
            return old["results"][0]
    return evaluate.run(evaluate.Args(**{**planned, "json": out}))["results"][0]


def frontier_runs(args, paths, device, extra, n_pairs, methods, targets, seeds):
    """Every (method, budget, seed) run, trained or reused, then evaluated: one record each."""
    runs_dir = os.path.join(args.root, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    records = []

    def one(method, budget, value, a, seed, more=()):
        out = os.path.join(runs_dir, f"{method}-{'b' if method == 'dpo' else 'kl'}{value:g}-s{seed}")
        script = METHODS[method][0]
        flags = [*method_flags(a, method, paths, device, extra, n_pairs), *more, "--seed", str(seed)]
        fresh_or_reused(script, importlib.import_module(script[:-3]).Args, flags, out)
        ev = evaluated(out, paths, args, device, out + ".eval.json")
        steps, evals, summary = read_run(out)
        s = summarize(method, [(steps, evals, summary)], device.type == "cuda")
        rec = {
            "method": method,
            "label": METHODS[method][1],
            "budget": budget,
            ("beta" if method == "dpo" else "target"): value,
            "seed": seed,
            "run": out,
            **{k: ev[k] for k in ("gold", "gold_ci95", "kl", "kl_ci95", "length", "eos_rate", "distinct2")},
            "grammatical": ev.get("grammatical"),
            "wall_seconds": summary["time/wall_seconds"],
            "step_seconds": s["time"]["step"],
            "peak_bytes": s["memory"]["overall"],
            "states_bytes": s["memory"]["states_analytic"],
            "curve": [
                {"step": e["step"], "elapsed": e.get("time/elapsed", 0.0), "gold": e["eval/gold"], "kl": e["eval/kl"]}
                for e in evals
            ],
        }
        records.append(rec)
        return rec

    for seed in seeds:  # a seed's runs back to back, so that every method meets the same machine load
        for method in methods:
            if method == "dpo":
                continue
            for t in targets:
                a = replace(args, target_kl=t)
                one(method, f"KL {t:g}", t, a, seed, ["--kl-coef", f"{initial_beta(t):.4g}"])
    if "dpo" in methods:
        betas = numbers(args.dpo_betas, "--dpo-betas") if args.dpo_betas else None
        if betas is None:  # two pilots at seed 0 place DPO's betas; they stay on the figure as runs of their own
            pilots = [
                one("dpo", f"β {b:g}", b, replace(args, dpo_beta=b), seeds[0])
                for b in (args.dpo_beta, 4 * args.dpo_beta)
            ]
            betas = dpo_betas([(r["beta"], max(r["kl"], 1e-3)) for r in pilots], targets)
            print(
                f"compare: DPO's pilots (beta, KL) {[(r['beta'], round(r['kl'], 2)) for r in pilots]} place its "
                f"betas at {betas}",
                flush=True,
            )
        for seed in seeds:
            for b in dict.fromkeys(betas):  # targets past the clamp share a beta: one run
                if not any(r["method"] == "dpo" and r["beta"] == b and r["seed"] == seed for r in records):
                    one("dpo", f"β {b:g}", b, replace(args, dpo_beta=b), seed)
    return records


def welch(a, b):
    """Difference of the mean gold of two groups of runs and the half-width of its 95% interval: Welch's t over
    the seeds, or with one run on a side the runs' own evaluation intervals combined (sampling noise only)."""
    ga, gb = [r["gold"] for r in a], [r["gold"] for r in b]
    d = statistics.mean(ga) - statistics.mean(gb)
    if len(a) < 2 or len(b) < 2:
        return d, math.sqrt(sum(r["gold_ci95"] ** 2 / len(x) ** 2 for x in (a, b) for r in x))
    va, vb = statistics.variance(ga) / len(a), statistics.variance(gb) / len(b)
    if va + vb == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return d, T_975.get(int(df), 2.23 if df < 30 else 1.96) * math.sqrt(va + vb)  # 2.23 >= t for 10 < df < 30


def by_budget(records, method):
    out = {}
    for r in records:
        if r["method"] == method:
            out.setdefault(r["budget"], []).append(r)
    return out


def frontier_at(records, method, kl, origin=None):
    """A method's frontier (its mean gold and KL per budget, joined by straight lines, from `origin`, the SFT
    policy's (0, gold), when given) read at `kl`; None outside its KL range."""
    pts = sorted(
        [
            *([origin] if origin else []),
            *(
                (statistics.mean(r["kl"] for r in rs), statistics.mean(r["gold"] for r in rs))
                for rs in by_budget(records, method).values()
            ),
        ]
    )
    if len(pts) == 1 and abs(pts[0][0] - kl) < 1e-9:
        return pts[0][1]
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 + (g1 - g0) * (kl - k0) / (k1 - k0) if k1 > k0 else (g0 + g1) / 2
    return None


def frontier_report(records, sft, args, device_name, middle):
    """Markdown: a table per method, DVPO against every method at its budgets, and memory and time at the
    middle budget."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    label = {r["method"]: r["label"] for r in records}
    g = lambda rs, k: statistics.mean(r[k] for r in rs)  # noqa: E731
    lines = [f"## The gold-KL frontier on {device_name}: {len(records)} runs, seeds {args.seeds}", ""]
    lines.append(
        f"Online methods: {args.steps} steps of {args.batch_size} prompts (GRPO: {args.group_size} responses each), "
        f"β adapted towards each KL target (horizon {args.kl_horizon} samples, starting at 0.3 / target); DPO: "
        f"{args.dpo_epochs} epoch(s) over the preference pairs at each β. Every run evaluated by evaluate.py on the "
        f"same {args.eval_n} held-out prompts (KL against the SFT policy). SFT: gold {sft['gold']:+.3f} ± "
        f"{sft['gold_ci95']:.3f}."
    )
    for m in methods:
        lines += [
            "",
            f"| {label[m]}: budget | gold ± 95% CI per seed (KL) | mean gold | mean KL | length | distinct-2 "
            "| grammatical | run s | step s | peak MiB |",
            "| --- " * 10 + "|",
        ]
        for budget, rs in by_budget(records, m).items():
            gram = [r["grammatical"] for r in rs if r["grammatical"] is not None]
            lines.append(
                f"| {budget} | "
                + " / ".join(f"{r['gold']:+.3f} ± {r['gold_ci95']:.3f} ({r['kl']:.1f})" for r in rs)
                + f" | {g(rs, 'gold'):+.3f} | {g(rs, 'kl'):.2f} | {g(rs, 'length'):.1f} | {g(rs, 'distinct2'):.3f} | "
                + (f"{statistics.mean(gram):.3f}" if gram else "—")
                + f" | {g(rs, 'wall_seconds'):.0f} | {statistics.median(r['step_seconds'] for r in rs):.3f} "
                f"| {max(r['peak_bytes'] for r in rs) / 2**20:.1f} |"
            )
    if "dvpo" in methods and len(methods) > 1:
        others = [m for m in methods if m != "dvpo"]
        lines += [
            "",
            "| DVPO's budget | DVPO gold (KL) | "
            + " | ".join(
                f"{label[m]} at the same target: difference ± 95% CI (its KL)"
                if m != "dpo"
                else f"{label[m]}'s frontier at DVPO's KL"
                for m in others
            )
            + " |",
            "| --- " * (2 + len(others)) + "|",
        ]
        for budget, rs in by_budget(records, "dvpo").items():
            cells = []
            for m in others:
                theirs = by_budget(records, m).get(budget)
                if theirs:
                    d, ci = welch(rs, theirs)
                    cells.append(f"{d:+.3f} ± {ci:.3f} ({g(theirs, 'kl'):.2f})")
                else:
                    at = frontier_at(records, m, g(rs, "kl"), (0.0, sft["gold"]))
                    cells.append("— (outside its KLs)" if at is None else f"{at:+.3f} (DVPO {g(rs, 'gold') - at:+.3f})")
            lines.append(f"| {budget} | {g(rs, 'gold'):+.3f} ({g(rs, 'kl'):.2f}) | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "A difference is DVPO's mean gold minus the other method's at the same KL target, with Welch's 95% "
            "interval over seeds (with one seed: the two evaluations' intervals combined, sampling noise only); "
            "a frontier is a method's per-budget means joined by straight lines, read at DVPO's mean KL."
        )
    targets = numbers(args.targets, "--targets")
    lines += [
        "",
        "| every method's frontier read at KL | " + " | ".join(label[m] for m in methods) + " |",
        "| --- " * (1 + len(methods)) + "|",
    ]
    for t in sorted(targets):
        at = [frontier_at(records, m, t, (0.0, sft["gold"])) for m in methods]
        best = max((a for a in at if a is not None), default=None)
        lines.append(
            f"| {t:g} | "
            + " | ".join("—" if a is None else f"**{a:+.3f}**" if a == best else f"{a:+.3f}" for a in at)
            + " |"
        )
    lines += [
        "",
        "(each method's mean gold and KL per budget joined by straight lines from the SFT policy at KL 0, read at "
        "each KL; — beyond a method's largest KL; the highest in bold)",
    ]
    base = by_budget(records, "ppo").get(middle.get("ppo"))
    lines += [
        "",
        "| at the middle budget | budget | median step s | peak MiB | model states MiB | run s | gold (KL) |",
        "| --- " * 7 + "|",
    ]
    for m in methods:
        rs = by_budget(records, m).get(middle.get(m), [])
        if not rs:
            continue
        ratio = lambda v, k: f" ({v / k:.2f})" if base and m != "ppo" and k else ""  # noqa: E731
        step = statistics.median(r["step_seconds"] for r in rs)
        peak, states = max(r["peak_bytes"] for r in rs), max(r["states_bytes"] for r in rs)
        pb = base and statistics.median(r["step_seconds"] for r in base)
        lines.append(
            f"| {label[m]} | {middle[m]} | {step:.3f}{ratio(step, pb)} "
            f"| {peak / 2**20:.1f}{ratio(peak, base and max(r['peak_bytes'] for r in base))} "
            f"| {states / 2**20:.1f}{ratio(states, base and max(r['states_bytes'] for r in base))} "
            f"| {g(rs, 'wall_seconds'):.0f} | {g(rs, 'gold'):+.3f} ({g(rs, 'kl'):.2f}) |"
        )
    return "\n".join(lines)


def run_frontier(args, methods, seeds, extra):
    """compare.py --frontier: the world (the embedded one unless --world), the GVM and the reward model (reused
    when their folders hold the same training), every run, the table and the figure."""
    targets = numbers(args.targets, "--targets")
    if args.dpo_betas:
        numbers(args.dpo_betas, "--dpo-betas")
    path = args.json or os.path.join(args.root, "frontier.json")
    png = args.plot or os.path.splitext(path)[0] + ".png"
    checkpoint.check_writable(args.root, "--root")
    checkpoint.check_output_file(path, "--json")
    plots.check_png(png, "--plot")
    world_root = args.world or world.ROOT
    for flag, out in (("--json", path), ("--plot", png)):  # the world's files are inputs of every run
        for name in ("sft", "data"):
            folder, inputs = (
                os.path.realpath(os.path.dirname(os.path.abspath(out))),
                os.path.realpath(os.path.join(world_root, name)),
            )
            if folder == inputs or checkpoint.within(folder, inputs):
                raise UsageError(f"{flag} {out}: inside the world's {name}/, an input; name a file elsewhere")
    device = cli.pick_device(args.device)
    t0 = time.time()
    if args.world:
        paths = bench_world(args)
    else:
        world.ensure_world()
        paths = world_paths(world.ROOT)
    vm = value_models(args, paths)
    n_pairs = sum(1 for _ in open(paths["pairs"]))
    records = frontier_runs(args, paths, device, extra, n_pairs, methods, targets, seeds)
    sft = evaluated(paths["sft"], paths, args, device, os.path.join(args.root, "sft.eval.json"))
    middle = {m: list(by_budget(records, m))[len(by_budget(records, m)) // 2] for m in methods}
    if "dpo" in methods:  # of DPO's budgets run on every seed, the nearest in KL to the middle target
        mid_t = sorted(targets)[len(targets) // 2]
        dpo = by_budget(records, "dpo")
        middle["dpo"] = min(
            [kv for kv in dpo.items() if len(kv[1]) == max(len(rs) for rs in dpo.values())],
            key=lambda kv: abs(math.log(max(statistics.mean(r["kl"] for r in kv[1]), 1e-3) / mid_t)),
        )[0]
    device_name = machine(device, args.nproc)
    table = frontier_report(records, sft, args, device_name, middle)
    print("\n" + table)
    result = {
        "records": records,
        "sft": {k: sft[k] for k in ("gold", "gold_ci95", "kl", "length", "eos_rate", "distinct2")},
        "middle": middle,
        "value_models": {k: {kk: v for kk, v in s.items() if kk != "args"} for k, s in vm.items()},
        "device": device_name,
        "wall_seconds": time.time() - t0,
        "args": asdict(args),
        "table": table,
    }
    checkpoint.write_json(path, result)
    plots.frontier(records, sft, png, middle)
    print(f"\nwrote {path} and {png} ({time.time() - t0:.0f} s)")
    return result


def compare(args: Args):
    cli.single_process("compare.py")
    cli.check_args(args)
    if args.analytic:
        if not [x for x in args.analytic.split(",") if x.strip()]:
            raise UsageError(f"--analytic {args.analytic!r}: name config folders or hub names, comma-separated")
        if args.gpus and not all(x.strip().isdigit() and int(x) > 0 for x in args.gpus.split(",")):
            raise UsageError(f"--gpus {args.gpus}: name numbers of GPUs as whole numbers above 0, e.g. 8,16")
        if args.json:
            checkpoint.check_output_file(args.json, "--json")
        result = memory.analytic_memory(args)
        if args.json:
            checkpoint.write_json(args.json, {**result, "args": asdict(args)})
        return result
    if args.quick and not args.frontier:
        raise UsageError("--quick: goes with --frontier")
    if args.quick:  # the flags the user left at their defaults
        args = replace(args, **{k: v for k, v in QUICK.items() if getattr(args, k) == getattr(Args, k)})
    if not args.methods:
        args = replace(args, methods=FRONTIER_METHODS if args.frontier else ",".join(METHODS))
    default_root = "ckpt/frontier-quick" if args.quick else "ckpt/frontier" if args.frontier else "ckpt/bench"
    args = replace(args, root=args.root or default_root)
    seeds = [s.strip() for s in args.seeds.split(",") if s.strip()]
    if not seeds or not all(s.isdigit() for s in seeds):
        raise UsageError(f"--seeds {args.seeds}: name seeds as comma-separated whole numbers, e.g. 0,1,2")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise UsageError(f"--methods {args.methods}: choose from {', '.join(METHODS)}")
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        raise UsageError(f"--extra {args.extra}: {e}") from None
    for m in methods:  # an unknown or malformed flag stops here, not after the world is built
        cli.parse_args(importlib.import_module(METHODS[m][0][:-3]).Args, extra, owner=f"--extra for {METHODS[m][0]}")
    if args.nproc > 1 and "dpo" in methods:
        raise UsageError(f"--nproc {args.nproc}: dpo_baseline.py runs as one process; leave dpo out of --methods")
    for flag, n in (("--batch-size", args.batch_size), ("--minibatch-size", args.minibatch_size)):
        if n % args.nproc:
            raise UsageError(f"{flag} {n}: must split evenly over --nproc {args.nproc} processes")
    if args.frontier:
        if args.nproc > 1:
            raise UsageError(f"--nproc {args.nproc}: --frontier runs one process per run")
        return run_frontier(args, methods, seeds, extra)
    path = args.json or os.path.join(args.root, "compare.json")
    checkpoint.check_writable(args.root, "--root")
    checkpoint.check_output_file(path, "--json")
    device = cli.pick_device(args.device)
    t0 = time.time()
    paths = bench_world(args)
    vm = value_models(args, paths)
    n_pairs = sum(1 for _ in open(paths["pairs"]))
    runs = {m: [] for m in methods}
    for seed in seeds:  # back to back, so that every method meets the same machine load
        for method in methods:
            out = os.path.join(args.root, f"{method}-s{seed}")
            print(f"compare: {method} seed {seed} -> {out}", flush=True)
            run(
                METHODS[method][0],
                [*method_flags(args, method, paths, device, extra, n_pairs), "--seed", seed, "--out", out],
                out + ".log",
                args.nproc,
            )
            runs[method].append(read_run(out))
    cuda = device.type == "cuda"
    device_name = machine(device, args.nproc)
    res = {m: summarize(m, runs[m], cuda) for m in runs}
    table = report(res, vm, args, cuda, device_name, n_pairs)
    print("\n" + table)
    results = {
        **res,
        "value_models": {k: {kk: v for kk, v in s.items() if kk != "args"} for k, s in vm.items()},
        "device": device_name,
        "wall_seconds": time.time() - t0,
        "args": asdict(args),
        "table": table,
    }
    checkpoint.write_json(path, results)
    png = plots.gold_vs_kl(res, os.path.splitext(path)[0] + ".png")
    print(f"\nwrote {path} and {png}")
    return results


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    return cli.run_main(lambda: compare(args))


if __name__ == "__main__":
    main()
