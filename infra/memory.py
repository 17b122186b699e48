"""Memory, measured and computed. Measured: per-phase time and memory of a training step (generate, score,
update), CUDA peaks, or on CPU the tally of model states, the activations saved for backward and the process RSS.
Computed: docs/DVPO.md §7's memory model of DVPO and PPO for a real model's config (compare.py --analytic).
"""

import contextlib
import os
import resource
import time

import torch

from infra.cli import UsageError


def local(t):
    """This rank's part of a tensor FSDP2 shards (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(models=(), optimizers=()):
    """Bytes of parameters, gradients and optimizer state held by these models and optimizers (this rank's
    shards under FSDP2), a parameter two models share counted once."""
    nbytes = lambda t: local(t).numel() * t.element_size()  # noqa: E731
    unique = {id(p): p for m in models for p in m.parameters()}.values()  # a shared base or adapter once
    params = sum(nbytes(p) for p in unique)
    grads = sum(nbytes(p.grad) for p in unique if p.grad is not None)
    opt = sum(nbytes(v) for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": params, "grads": grads, "optimizer": opt}


def rss_bytes():
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Probe:
    """Per-phase wall time and memory. On CUDA: peak allocated bytes within each phase
    (torch.cuda.max_memory_allocated, reset at the phase's start). On CPU: the tally of parameter, gradient and
    optimizer-state bytes at the phase's end, with process RSS beside it. On both: the peak bytes of
    activations saved for backward (parameters excluded, shared storage counted once)."""

    def __init__(self, device, models=(), optimizers=()):
        self.device, self.models, self.optimizers = torch.device(device), models, optimizers
        self.metrics = {}
        self.live, self.peak, self.count = 0, 0, {}

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_ptrs:
            self.count[ptr] = self.count.get(ptr, 0) + 1
            if self.count[ptr] == 1:
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
        return t, ptr

    def _unpack(self, packed):
        t, ptr = packed
        if ptr in self.count:
            self.count[ptr] -= 1
            if self.count[ptr] == 0:
                del self.count[ptr]
                self.live -= t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def phase(self, name):
        """Time and memory of a phase; entering the same phase again within a step adds to its time."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.param_ptrs = {local(p).untyped_storage().data_ptr() for m in self.models for p in m.parameters()}
        self.live, self.peak, self.count = 0, 0, {}
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        m = self.metrics
        if cuda:
            torch.cuda.synchronize(self.device)
            key = f"memory/{name}_peak_bytes"
            m[key] = max(m.get(key, 0), torch.cuda.max_memory_allocated(self.device))
        else:
            m[f"memory/{name}_state_bytes"] = sum(state_bytes(self.models, self.optimizers).values())
            m[f"memory/{name}_rss_bytes"] = rss_bytes()
        key = f"memory/{name}_activation_bytes"
        m[key] = max(m.get(key, 0), self.peak)
        m[f"time/{name}"] = m.get(f"time/{name}", 0.0) + time.perf_counter() - t0

    def pop(self):
        out, self.metrics = self.metrics, {}
        return out


def parameter_counts(*models):
    """{"params/trained": ..., "params/frozen": ...} over these models, a parameter shared by two (a LoRA base) once."""
    params = {id(p): p for m in models for p in m.parameters()}
    return {
        "params/trained": sum(p.numel() for p in params.values() if p.requires_grad),
        "params/frozen": sum(p.numel() for p in params.values() if not p.requires_grad),
    }


# ---------------------------------------------------------------------------------------------- §7, computed
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


def states_bytes(method, n, v, adapters, head, trained, frozen, shared=False):
    """§7's model states of DVPO (policy, reference, GVM) or PPO (policy, critic, reference, reward model). Full
    fine-tuning: trained bytes per policy (and critic) parameter, frozen bytes per reference (and GVM or reward
    model) parameter. LoRA: one base per backbone in frozen bytes (the reference shares the policy's, the
    reward model the critic's) plus trained bytes per adapter (and critic head) parameter. LoRA on one shared
    base (--share-base): the policy's base alone; the GVM (PPO: the reward model) is a frozen adapter and head
    on it, PPO's critic a trained one."""
    if adapters is None:
        return trained * n + frozen * (n + v) + (trained * v if method == "ppo" else 0)
    bases = n + adapters + head if shared else n + v  # the value model's adapter and head on it, or its own base
    return frozen * bases + trained * adapters + (trained * (adapters + head) if method == "ppo" else 0)


def analytic_memory(args):
    """§7's memory model for real models' configs (--analytic, comma-separated): model states of DVPO and PPO,
    full fine-tuning and LoRA (--lora-r; two base copies, or one shared by every model), frozen models in fp32 or
    bf16, AdamW (16 B per trained parameter: fp32 weight, gradient, two moments) or 8-bit AdamW (10 B); the
    largest activations for --batch-size prompts of --prompt-len tokens and responses of --response-len
    (generation's KV cache; the update's logits of a --micro-batch-size with --logprob-chunk, and the layer inputs
    gradient checkpointing keeps); and which cards of 24, 40 and 80 GiB the total fits."""
    gib = lambda x: x / 2**30  # noqa: E731
    setups = [
        ("full, fp32", None, 16, 4, False),
        ("full, bf16 frozen", None, 16, 2, False),
        ("full, bf16 frozen, 8-bit AdamW", None, 10, 2, False),
        (f"LoRA r={args.lora_r}, bf16 frozen", args.lora_r, 16, 2, False),
        (f"LoRA r={args.lora_r}, bf16 frozen, 8-bit AdamW", args.lora_r, 10, 2, False),
        (f"LoRA r={args.lora_r}, bf16 frozen, one shared base", args.lora_r, 16, 2, True),
        (f"LoRA r={args.lora_r}, bf16 frozen, one shared base, 8-bit AdamW", args.lora_r, 10, 2, True),
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
        for setup, r, trained, frozen, shared in setups:
            half = 4 if frozen == 4 else 2  # activations in the frozen models' dtype
            kv_cache = half * args.batch_size * tokens * kv
            update = (
                half
                * args.micro_batch_size
                * ((args.response_len + 1) * config.vocab_size + config.num_hidden_layers * tokens * config.hidden_size)
            )
            act = max(kv_cache, update)
            d, p = (
                states_bytes(m, n, v, adapters if r else None, config.hidden_size + 1, trained, frozen, shared)
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
