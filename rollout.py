"""The math every trainer shares: masked statistics, KL estimators, GAE, generation, log-probs (chunked or
not), per-phase time and memory probes, mixed precision, and the PPO update with gradient accumulation.
dvpo.py and ppo_baseline.py import these (through loop.py's shared loop), so the two trainers differ only
where the algorithms differ. Numbers like §5.2 refer to docs/DVPO.md.
"""
import contextlib
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import data
import distributed
import lora
from runtime import UsageError


# ---------------------------------------------------------------------------------------------- masked statistics
def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over valid entries, 0 elsewhere, with the unbiased variance (0, not NaN, for fewer than
    two valid entries: §5.5), so finite for masks holding 0 or 1 entry. Under torchrun the mean and variance are
    the global batch's: sums and counts all-reduced over ranks."""
    n = distributed.all_reduce(mask.sum())
    mean = distributed.all_reduce((x * mask).sum()) / n.clamp(min=1)
    var = distributed.all_reduce((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# ---------------------------------------------------------------------------------------------- KL and GAE
def kl_k1(logp, ref_logp):
    """log pi - log pi_ref per token: unbiased for KL, can be negative per token (§5.6)."""
    return logp - ref_logp


def kl_k3(logp, ref_logp):
    """e^{-k1} - 1 + k1 >= 0 per token (Schulman's k3)."""
    k1 = logp - ref_logp
    return torch.expm1(-k1) + k1


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over left-aligned actions: (advantages, returns), zero where masked.
    The state after the last valid action is terminal (value 0)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_v = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def add_at_last_token(rewards, mask, x):
    """rewards [B, R] with x [B] added at each response's last token (a terminal score or penalty)."""
    T = mask.sum(1).long().clamp(min=1)
    return rewards + F.one_hot(T - 1, rewards.shape[1]).to(rewards.dtype) * x[:, None].to(rewards.dtype)


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class Rollout:
    """A batch of prompts and sampled responses. Prompts are left-padded to P tokens, responses right-padded
    to R tokens and cut after their first EOS (§5.1, §5.2); input_ids = prompt ‖ response."""
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float, 1 up to and including the first EOS
    prompt_len: int  # P
    ended: torch.Tensor  # [B] bool: the response contains an EOS
    prompts: list
    texts: list  # what each response adds to its prompt's text (data.continuations)
    suppressed: list = field(default_factory=list)  # token ids outside the policy's softmax (data.suppressed_ids)

    @property
    def response_ids(self):
        return self.input_ids[:, self.prompt_len:]

    def index(self, idx):
        """The rows idx, as a Rollout (a minibatch)."""
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx], self.prompt_len,
                       self.ended[idx], [self.prompts[i] for i in idx.tolist()], [self.texts[i] for i in idx.tolist()],
                       self.suppressed)


def truncate_after_eos(response_ids, eos_ids, pad_id):
    """(ids with everything after the first EOS set to pad, float mask up to and including that EOS, ended);
    an EOS is any of eos_ids (data.eos_ids)."""
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_ids, device=response_ids.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).float()
    return response_ids.masked_fill(after, pad_id), mask, is_eos.any(1)


@torch.no_grad()
def generate(policy, tok, prompts, max_new_tokens, temperature=1.0, ids=None, chunk=0, greedy=False):
    """Sample one response per prompt from the policy itself (data.sample: no logits processor but the
    temperature, every declared EOS id), `chunk` prompts per call (0: all at once); §5.1–5.2. `ids` are the
    prompts' token ids (data.prompt_ids) when already computed. greedy: argmax decoding instead."""
    device = next(policy.parameters()).device
    pad_id, eos = tok.pad_token_id, data.eos_ids(tok, policy)
    ids = ids if ids is not None else [data.prompt_ids(tok, p) for p in prompts]
    B, P = len(ids), max(len(p) for p in ids)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(ids):  # §5.1: left padding
        prompt_ids[b, P - len(p):] = torch.tensor(p)
        prompt_mask[b, P - len(p):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = policy.training
    policy.eval()
    outs = [data.sample(policy, tok, prompt_ids[i:i + (chunk or B)], prompt_mask[i:i + (chunk or B)],
                        max_new_tokens, temperature, greedy)[:, P:] for i in range(0, B, chunk or B)]
    policy.train(was_training)
    R = max(o.shape[1] for o in outs)
    response = torch.cat([F.pad(o, (0, R - o.shape[1]), value=pad_id) for o in outs])
    response, mask, ended = truncate_after_eos(response, eos, pad_id)
    texts = data.continuations(tok, prompt_ids, response)
    return Rollout(torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, mask.long()], 1), mask, P, ended,
                   list(prompts), texts, data.suppressed_ids(tok))


def rollout_of(tok, rows, prompts=None):
    """A Rollout of given (prompt ids, response ids) rows, in generate's layout (prompts left-padded, responses
    right-padded, masked after their first EOS): scored with the same functions as sampled ones (DPO's pairs)."""
    P, R = max(len(p) for p, _ in rows), max(len(x) for _, x in rows)
    ids = torch.full((len(rows), P + R), tok.pad_token_id)
    attention = torch.zeros(len(rows), P + R, dtype=torch.long)
    for b, (p, x) in enumerate(rows):
        ids[b, P - len(p):P + len(x)] = torch.tensor(p + x)
        attention[b, P - len(p):P + len(x)] = 1
    ended = torch.tensor([bool(x) and x[-1] in data.eos_ids(tok, None) for _, x in rows])
    return Rollout(ids, attention, attention[:, P:].float(), P, ended, prompts or [""] * len(rows), [""] * len(rows),
                   data.suppressed_ids(tok))


def logits_at_responses(model, rollout):
    """Logits predicting each response token: positions P-1 .. P+R-2, in the model's (or autocast's) dtype.
    Position ids come from the mask (§5.1); the LM head runs on the last R+1 positions only."""
    R = rollout.response_mask.shape[1]
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=position_ids,
                   use_cache=False, logits_to_keep=R + 1).logits
    return logits[:, -(R + 1):-1]


def tempered_log_softmax(logits, temperature, suppressed=None):
    """log softmax(logits / temperature) in fp32 (§5.3) over the vocabulary the policy samples from: the
    `suppressed` ids get the lowest finite logit, so probability 0 and finite products p * log p."""
    z = logits.float() / temperature
    return F.log_softmax(z if suppressed is None else z.index_fill(-1, suppressed, torch.finfo(z.dtype).min), -1)


class ChunkedLogprobEntropy(torch.autograd.Function):
    """log p(y) and entropy of tempered_log_softmax over rows of [N, V] logits, in fp32, `chunk` rows at a
    time in forward and backward: only the logits, in their own dtype, are kept for backward, never an fp32
    [N, V] tensor. Backward: d log p(y)/dz = (onehot(y) - p) / temperature and
    dH/dz = -p (log p + H) / temperature (0 at suppressed ids, where p = 0)."""

    @staticmethod
    def forward(ctx, logits, ids, temperature, chunk, suppressed=None):
        logp, ent = [], []
        for s in range(0, len(logits), chunk):
            lp = tempered_log_softmax(logits[s:s + chunk], temperature, suppressed)
            logp.append(lp.gather(-1, ids[s:s + chunk, None]).squeeze(-1))
            ent.append(-(lp.exp() * lp).sum(-1))
        ctx.save_for_backward(logits, ids)
        ctx.temperature, ctx.chunk, ctx.suppressed = temperature, chunk, suppressed
        return torch.cat(logp), torch.cat(ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, ids = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, len(logits), ctx.chunk):
            lp = tempered_log_softmax(logits[s:s + ctx.chunk], ctx.temperature, ctx.suppressed)
            p = lp.exp()
            H = -(p * lp).sum(-1, keepdim=True)
            gl, ge = g_logp[s:s + ctx.chunk, None], g_ent[s:s + ctx.chunk, None]
            g = -(p * gl + ge * (p * (lp + H)))
            g.scatter_add_(-1, ids[s:s + ctx.chunk, None], gl)
            grad[s:s + ctx.chunk] = (g / ctx.temperature).to(grad.dtype)
        return grad, None, None, None, None


def response_logprobs(model, rollout, temperature=1.0, with_entropy=False, chunk=0):
    """log pi(y_t | s_t) of the sampled tokens at the sampling temperature (§5.3), over the vocabulary
    generate samples from (Rollout.suppressed left out), [B, R]; masked entries are 0. With with_entropy,
    also the per-token entropy of that distribution. chunk > 0 computes both `chunk` token positions at a
    time (ChunkedLogprobEntropy), so fp32 [B, R, vocab] tensors never exist."""
    logits = logits_at_responses(model, rollout)
    mask = rollout.response_mask
    suppressed = torch.tensor(rollout.suppressed, device=logits.device) if rollout.suppressed else None
    if chunk:
        B, R, V = logits.shape
        logp, entropy = ChunkedLogprobEntropy.apply(logits.reshape(B * R, V), rollout.response_ids.reshape(-1),
                                                    temperature, chunk, suppressed)
        logp, entropy = logp.view(B, R) * mask, entropy.view(B, R) * mask
        return (logp, entropy) if with_entropy else logp
    logp_all = tempered_log_softmax(logits, temperature, suppressed)
    logp = logp_all.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1) * mask
    if not with_entropy:
        return logp
    with torch.no_grad():  # logged, not optimised: keep no graph for it
        entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy


@torch.no_grad()
def in_chunks(fn, r, chunk):
    """fn(r) for a rollout, computed `chunk` rows at a time (0: all at once) and concatenated: the no-grad
    forward passes' memory is bounded by --forward-batch-size, not --batch-size."""
    if not chunk or chunk >= len(r.prompts):
        return fn(r)
    return torch.cat([fn(r.index(idx)) for idx in torch.arange(len(r.prompts)).split(chunk)])


def response_state_values(value_model, rollout):
    """V(s_0 .. s_R) per sample, [B, R + 1]: s_t is read at position P-1+t (docs/DVPO.md §2). The state mask is
    1 for t <= T, where T is the response length."""
    return value_model(rollout.input_ids, rollout.attention_mask)[:, rollout.prompt_len - 1:]


def state_mask(rollout):
    """[B, R + 1]: 1 for the states s_0 .. s_T of each response."""
    return torch.cat([torch.ones_like(rollout.response_mask[:, :1]), rollout.response_mask], 1)


# ---------------------------------------------------------------------------------------------- probes
def local(t):
    """This rank's part of a tensor FSDP2 shards (a DTensor), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(models=(), optimizers=()):
    """Bytes of parameters, gradients and optimizer state held by these models and optimizers (this rank's
    shards under FSDP2)."""
    nbytes = lambda t: local(t).numel() * t.element_size()  # noqa: E731
    params = sum(nbytes(p) for m in models for p in m.parameters())
    grads = sum(nbytes(p.grad) for m in models for p in m.parameters() if p.grad is not None)
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


# ---------------------------------------------------------------------------------------------- precision
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """--dtype. fp32: every model in fp32. bf16 / fp16: frozen models are stored in that dtype (2 bytes a
    parameter, not 4); trained models keep fp32 master weights and AdamW state (16 bytes a parameter) and
    run forward and backward under autocast; fp16 also scales the loss against gradient underflow. One
    Precision per optimizer, since each loss scale follows its own gradients."""

    def __init__(self, name, device):
        if name not in DTYPES:
            raise UsageError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
        self.name, self.dtype, self.device = name, DTYPES[name], torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def loss_scale(self, prefix):
        """{prefix/loss_scale: the fp16 loss scale} for the step's metrics; nothing in fp32 and bf16."""
        return {f"{prefix}/loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}

    def step(self, opt, params, max_norm):
        """Unscale, clip to max_norm, step (skipped by the scaler on inf/NaN gradients); the norm before clipping."""
        self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(opt)
        self.scaler.update()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor of the global norm


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params, lr, name="adamw", **kwargs):
    """AdamW over the parameters that train (requires_grad). --optim adamw8bit: bitsandbytes' 8-bit AdamW, both
    moments in 8 bits (2 bytes a parameter instead of 8; tensors under 4096 entries stay in fp32)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw8bit":
        return bitsandbytes(f"--optim {name}").optim.AdamW8bit(params, lr=lr, **kwargs)
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def bitsandbytes(flag):
    """The optional bitsandbytes package, or one line saying how to get it."""
    if flag.split()[-1] not in OPTIMIZERS:
        raise UsageError(f"{flag}: choose one of {', '.join(OPTIMIZERS)}")
    lora.quiet_bitsandbytes()
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError(f"{flag}: needs bitsandbytes, an optional package (pip install bitsandbytes)") from None
    return bnb


def check_optimizer(name):
    if name != "adamw":
        bitsandbytes(f"--optim {name}")


def micro_batches(n, size):
    """Index tensors splitting n rows into micro-batches of `size` (0: one batch)."""
    return torch.arange(n).split(size or n)


# ---------------------------------------------------------------------------------------------- the PPO update
def loss_weights(mask, aggregation, max_len):
    """Per-token weights of a minibatch's loss, [B, R]. "token": 1/n, every token of the minibatch alike (the
    default, as in TRL's PPO); "sequence": 1/(T_i * B), each response's token mean, then the mean over
    responses (GRPO, Shao et al. 2024); "constant": 1/(max_len * B), token sums over a fixed length (Dr. GRPO,
    Liu et al. 2025, which removes GRPO's length normalisation)."""
    B = mask.shape[0]
    if aggregation == "sequence":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1) * B)
    if aggregation == "constant":
        return mask / (max_len * B)
    return mask / mask.sum().clamp(min=1)


def ppo_loss(new_logp, old_logp, adv, mask, cliprange, n=None, weight=None):
    """Clipped surrogate: sum over response tokens of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) / n.
    n defaults to the token count (the mean); a micro-batch passes its minibatch's count (accumulation).
    `weight` (loss_weights) replaces mask / n in the loss, not in the statistics."""
    n = mask.sum().clamp(min=1) if n is None else n
    ratio = torch.exp(new_logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    with torch.no_grad():  # statistics keep no graph (and save no tensors the memory probe would count)
        stats = {"policy/clipfrac": (((ratio - 1).abs() > cliprange).float() * mask).sum() / n,
                 "policy/approxkl": (0.5 * (new_logp - old_logp) ** 2 * mask).sum() / n,
                 "val/ratio": (ratio * mask).sum() / n,
                 "val/ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return ((loss * mask).sum() / n if weight is None else (loss * weight).sum()), stats


def minibatches(batch_size, minibatch_size, epochs, generator, ranks=1, rank=None):
    """One permutation per epoch, split into minibatches: [[idx, ...] per epoch]. With `ranks` processes, each
    holding batch_size / ranks consecutive rows of the batch, each one's rows are permuted apart (all ranks draw
    every permutation, so they agree) and every minibatch holds minibatch_size / ranks rows of each: `rank`
    gets its own rows of each minibatch, indexed in its share; rank None, the whole minibatches (what one
    process computing the same update uses). One process: the permutation of the whole batch."""
    n, m = batch_size // ranks, minibatch_size // ranks
    plans = []
    for _ in range(epochs):
        perms = [torch.randperm(n, generator=generator) for _ in range(ranks)]
        if rank is not None:
            plans.append(perms[rank].split(m))
        else:
            plans.append([torch.cat(parts) for parts in zip(*((p + k * n).split(m) for k, p in enumerate(perms)))])
    return plans


@torch.no_grad()
def old_logprobs(policy, r, plan, args, prec):
    """Log-probs of the sampled tokens before the update, computed on exactly the micro-batches of the first
    epoch's minibatches, so the first minibatch's ratio is exactly 1 (§5.4), whatever kernels do with shape."""
    out = torch.zeros_like(r.response_mask)
    for idx in plan:
        for micro in idx.split(args.micro_batch_size or len(idx)):
            with prec.autocast():
                out[micro] = response_logprobs(policy, r.index(micro), args.temperature, chunk=args.logprob_chunk)
    return out


def accumulate(total, stats):
    """Sum per-micro-batch statistics (each already over the minibatch's count); maxima stay maxima."""
    for k, v in stats.items():
        v = v.detach()
        total[k] = v if k not in total else torch.max(total[k], v) if k.endswith("_max_dev") else total[k] + v


def accumulated_step(opt, prec, params, max_norm, mb, micro_batch_size, micro_loss):
    """One optimizer step on a minibatch, accumulated over micro-batches of --micro-batch-size rows.
    micro_loss(idx, micro, n) returns the micro-batch's loss as its token sum over the minibatch's token
    count n, so the gradients add up to the whole minibatch's, and its statistics on the same scale. Under
    torchrun n is the global minibatch's token count over the number of ranks, so DDP's (and FSDP2's) average
    of the ranks' gradients is the gradient of the whole minibatch's loss, and the mean over ranks of each
    statistic is the whole minibatch's. (summed statistics, gradient norm before clipping)"""
    n = distributed.all_reduce(mb.response_mask.sum()).clamp(min=1) / distributed.world()
    opt.zero_grad(set_to_none=True)
    total = {}
    for idx in micro_batches(len(mb.prompts), micro_batch_size):
        micro = mb.index(idx)
        with prec.autocast():
            loss, stats = micro_loss(idx, micro, n)
        prec.backward(loss)
        accumulate(total, stats)
    return total, prec.step(opt, params, max_norm)


def policy_step(policy, opt, prec, mb, old_logp, adv, args, ref_logp=None, kl_coef=0.0, aggregation="token"):
    """One clipped policy-gradient step on a minibatch; its statistics as floats. With ref_logp, the loss also
    holds kl_coef * k3(pi || pi_ref) per token (GRPO's KL term), weighted like the surrogate."""
    weight = None if aggregation == "token" else loss_weights(mb.response_mask, aggregation, args.max_new_tokens)

    def micro_loss(idx, micro, n):
        new_logp, entropy = response_logprobs(policy, micro, args.temperature, with_entropy=True,
                                              chunk=args.logprob_chunk)
        w = None if weight is None else weight[idx]
        loss, s = ppo_loss(new_logp, old_logp[idx], adv[idx], micro.response_mask, args.cliprange, n, w)
        s = {**s, "loss/policy": loss.detach()}
        if ref_logp is not None:
            k3 = kl_k3(new_logp, ref_logp[idx]) * micro.response_mask
            kl_loss = (k3 * w).sum() if w is not None else k3.sum() / n
            loss, s["loss/kl"] = loss + kl_coef * kl_loss, kl_loss.detach()
        return loss, {**s, "policy/entropy": (entropy.detach() * micro.response_mask).sum() / n}

    total, grad_norm = accumulated_step(opt, prec, policy.parameters(), args.max_grad_norm, mb,
                                        args.micro_batch_size, micro_loss)
    return {**{k: float(v) for k, v in total.items()}, "policy/grad_norm": float(grad_norm), **prec.loss_scale("policy")}


def ppo_update(policy, opt, prec, r, old_logp, adv, plans, args, extra_step=None, ref_logp=None, kl_coef=0.0,
               aggregation="token"):
    """--ppo-epochs of minibatch steps: the policy's, then extra_step(idx, mb) (PPO's critic) on the same
    minibatch. The mean of each statistic, and the largest |ratio - 1| of the very first minibatch."""
    stats = []
    for epoch_plan in plans:
        for idx in epoch_plan:
            mb = r.index(idx)
            s = policy_step(policy, opt, prec, mb, old_logp[idx], adv[idx], args,
                            None if ref_logp is None else ref_logp[idx], kl_coef, aggregation)
            if extra_step is not None:
                s.update(extra_step(idx, mb))
            stats.append(s)
    for s, top in zip(stats, distributed.max_over_ranks([s["val/ratio_max_dev"] for s in stats])):
        s["val/ratio_max_dev"] = top  # each minibatch's largest |ratio - 1| over all ranks' rows
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["val/ratio_first_max_dev"] = stats[0]["val/ratio_max_dev"]
    return distributed.mean_over_ranks(out, maxima=("val/ratio_max_dev", "val/ratio_first_max_dev"))
