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

Memory on CUDA is torch.cuda.max_memory_allocated per phase; on CPU it is the tally of parameter, gradient and
optimizer-state bytes plus the peak bytes of activations saved for backward, with process RSS beside it.
"""

import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import gvm
import reward
from infra import checkpoint, cli, world
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


@dataclass
class Args:
    root: str = arg("ckpt/bench", "folder for the benchmark world, the value models and every run")
    world: str = arg(
        "",
        "an existing world folder (sft/ and data/, e.g. from python -m infra.world --model M) instead of building "
        "the benchmark world; the world's size flags then do not apply",
    )
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
    methods: str = arg(",".join(METHODS), "comma-separated, run in this order for each seed: " + ", ".join(METHODS))
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
        "gvm": gvm.train(gvm.Args(out=os.path.join(args.root, "gvm"), **common)),
        "rm": reward.train_reward_model(os.path.join(args.root, "rm"), **common),
    }


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


def memory(steps, cuda):
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
    mems = [memory(st, cuda) for st, _, _ in runs]
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


def plot(res, path):
    """Gold reward against KL at each evaluation, per method and seed (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, color in zip(res, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray")):
        for i, curve in enumerate(res[m]["curve"]):
            ax.plot(*zip(*curve), "o-", color=color, alpha=0.6, label=res[m]["label"] if i == 0 else None)
    ax.set_xlabel("KL(π‖π_ref), nats per sequence")
    ax.set_ylabel("held-out gold reward (VADER)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


CARDS_GIB, HEADROOM = (24, 40, 80), 0.9  # a card "fits" when the estimate is under 90% of its memory


def model_sizes(name):
    """(config, policy parameters, value-model parameters, [(in, out) of every linear layer LoRA adapts], parameters
    of one decoder layer), from a config alone: the model is instantiated on the meta device, so nothing is
    allocated or downloaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"--analytic {name}: no model config there ({str(e).splitlines()[0][:160]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    v = n + config.hidden_size + 1  # a value model: the backbone and its scalar head (lm_head is tied or dropped)
    if not config.tie_word_embeddings:
        v -= model.get_output_embeddings().weight.numel()
    head = model.get_output_embeddings()
    linears = [
        (m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    layer = next(m for m in model.modules() if type(m).__name__ in model._no_split_modules)
    return config, n, v, linears, sum(p.numel() for p in layer.parameters())


def states_bytes(method, n, v, adapters, head, trained, frozen):
    """§7's model states of DVPO (policy, reference, GVM) or PPO (policy, critic, reference, reward model). Full
    fine-tuning: trained bytes per policy (and critic) parameter, frozen bytes per reference (and GVM or reward
    model) parameter. LoRA: one base per backbone in frozen bytes (the reference shares the policy's, the
    reward model the critic's) plus trained bytes per adapter (and critic head) parameter."""
    if adapters is None:
        return trained * n + frozen * (n + v) + (trained * v if method == "ppo" else 0)
    return frozen * (n + v) + trained * adapters + (trained * (adapters + head) if method == "ppo" else 0)


def analytic_memory(args):
    """§7's memory model for real models' configs (--analytic, comma-separated): model states of DVPO and PPO,
    full fine-tuning and LoRA (--lora-r), frozen models in fp32 or bf16, AdamW (16 B per trained parameter: fp32
    weight, gradient, two moments) or 8-bit AdamW (10 B); the largest activations for --batch-size
    prompts of --prompt-len tokens and responses of --response-len (generation's KV cache; the update's logits
    of a --micro-batch-size with --logprob-chunk, and the layer inputs gradient checkpointing keeps); and
    which cards of 24, 40 and 80 GiB the total fits."""
    gib = lambda x: x / 2**30  # noqa: E731
    setups = [
        ("full, fp32", None, 16, 4),
        ("full, bf16 frozen", None, 16, 2),
        ("full, bf16 frozen, 8-bit AdamW", None, 10, 2),
        (f"LoRA r={args.lora_r}, bf16 frozen", args.lora_r, 16, 2),
        (f"LoRA r={args.lora_r}, bf16 frozen, 8-bit AdamW", args.lora_r, 10, 2),
    ]
    lines, out = [], {}
    for name in [x.strip() for x in args.analytic.split(",") if x.strip()]:
        config, n, v, linears, layer = model_sizes(name)
        adapters = sum(args.lora_r * (i + o) for i, o in linears)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = 2 * config.num_hidden_layers * (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        tokens = args.prompt_len + args.response_len
        lines += [
            f"### {name}: {n:,} parameters, value models {v:,}, LoRA r={args.lora_r} adapters {adapters:,}, "
            f"vocabulary {config.vocab_size:,}",
            "",
            "| setup | model states, GiB: DVPO | PPO | DVPO/PPO | + activations, GiB | total: DVPO | PPO | "
            "cards DVPO fits | cards PPO fits |",
            "| --- " * 9 + "|",
        ]
        for setup, r, trained, frozen in setups:
            half = 4 if frozen == 4 else 2  # activations in the frozen models' dtype
            kv_cache = half * args.batch_size * tokens * kv
            update = (
                half
                * args.micro_batch_size
                * ((args.response_len + 1) * config.vocab_size + config.num_hidden_layers * tokens * config.hidden_size)
            )
            act = max(kv_cache, update)
            d, p = (
                states_bytes(m, n, v, adapters if r else None, config.hidden_size + 1, trained, frozen)
                for m in ("dvpo", "ppo")
            )
            fits = lambda b: ", ".join(f"{c}" for c in CARDS_GIB if gib(b + act) <= HEADROOM * c) or "none"  # noqa: E731
            lines.append(
                f"| {setup} | {gib(d):.2f} | {gib(p):.2f} | {d / p:.2f} | {gib(act):.2f} | {gib(d + act):.2f} "
                f"| {gib(p + act):.2f} | {fits(d)} | {fits(p)} |"
            )
            out.setdefault(name, {})[setup] = {"dvpo": d, "ppo": p, "activations": act}
        lines.append("")
        out[name].update(params=n, value_model_params=v, adapters=adapters)
        if args.gpus:
            more, out[name]["gpus"] = multi_gpu_rows(args, config, n, v, layer, kv, tokens)
            lines += more
    lines.append(
        f"Activations: the larger of the generation KV cache ({args.batch_size} prompts of {args.prompt_len} + "
        f"{args.response_len} tokens) and one update micro-batch ({args.micro_batch_size} responses: logits of "
        "the response positions with --logprob-chunk, plus each layer's input under --gradient-checkpointing), "
        f"in the frozen models' dtype. A card fits when the total is under {HEADROOM:.0%} of it."
    )
    table = "\n".join(lines)
    print(table)
    return {**(out[name] if len(out) == 1 else {}), "models": out, "table": table}


def multi_gpu_rows(args, config, n, v, layer, kv, tokens):
    """Per-GPU memory of full fine-tuning with bf16 frozen models (AdamW: 16 bytes per trained parameter) on
    each number of GPUs in --gpus, each GPU taking 1/N of --batch-size. DDP: every GPU holds every model whole.
    FSDP2 (--fsdp): a GPU holds 1/N of each trained model's 16 bytes, the frozen models whole in 2 bytes, and
    while a trained model runs its gathered fp32 parameters and gradients for the root group (embeddings, LM
    head, final norm) and one decoder layer. --shard-frozen: the frozen models' 2 bytes split N ways too."""
    gib = lambda x: x / 2**30  # noqa: E731
    root = n - config.num_hidden_layers * layer  # the policy's parameters outside its decoder layers
    gathered = 8 * (root + layer)
    head = ["DDP", "FSDP2", "FSDP2 + --shard-frozen"]
    lines = [
        "Per GPU, full fine-tuning, bf16 frozen models, AdamW (GiB: model states + gathered + activations):",
        "",
        "| GPUs | " + " | ".join(f"{h}: DVPO | PPO" for h in head) + " |",
        "| --- " * 7 + "|",
    ]
    rows = {}
    for N in [int(x) for x in args.gpus.split(",") if x.strip()]:
        act = max(
            2 * -(-args.batch_size // N) * tokens * kv,
            2
            * args.micro_batch_size
            * ((args.response_len + 1) * config.vocab_size + config.num_hidden_layers * tokens * config.hidden_size),
        )
        cells = []
        for shard_trained, shard_frozen in ((1, 1), (N, 1), (N, N)):
            for trained in (n, n + v):  # DVPO trains the policy; PPO the policy and the critic
                frozen = n + v  # DVPO: reference and GVM; PPO: reference and reward model
                extra = gathered if shard_trained > 1 else 0
                cells.append(gib(16 * trained / shard_trained + 2 * frozen / shard_frozen + extra + act))
        rows[N] = dict(zip([f"{h} {m}" for h in ("ddp", "fsdp", "fsdp+frozen") for m in ("dvpo", "ppo")], cells))
        lines.append(f"| {N} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += [
        "",
        f"(decoder layer {layer:,} parameters, root group {root:,}; activations: the larger of the KV cache of "
        f"{args.batch_size} / N prompts and one update micro-batch)",
        "",
    ]
    return lines, rows


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
        result = analytic_memory(args)
        if args.json:
            checkpoint.write_json(args.json, {**result, "args": asdict(args)})
        return result
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
    device_name = (
        f"CUDA ({__import__('torch').cuda.get_device_name(device)})" if cuda else f"CPU ({os.cpu_count()} cores)"
    ) + (f", {args.nproc} processes per run" if args.nproc > 1 else "")
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
    png = plot(res, os.path.splitext(path)[0] + ".png")
    print(f"\nwrote {path}" + (f" and {png}" if png else " (pip install matplotlib for the gold-vs-KL plot)"))
    return results


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    return cli.run_main(lambda: compare(args))


if __name__ == "__main__":
    main()
