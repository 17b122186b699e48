"""The math every stage shares: masked statistics, KL estimators, GAE, sampling a rollout, tempered and chunked
log-probs, and the split of a batch into PPO minibatches and micro-batches. Pure functions of tensors: no
process group, no optimizer, no file. Numbers like §5.2 refer to docs/DVPO.md.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from infra import data, models


# ---------------------------------------------------------------------------------------------- masked statistics
def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, total=lambda t: t, eps=1e-8):
    """(x - mean) / std over valid entries, 0 elsewhere, with the unbiased variance (0, not NaN, for fewer than
    two valid entries: §5.5), so finite for masks holding 0 or 1 entry. `total` sums each count and sum over
    the batch's parts: the identity for one process; distributed.all_reduce makes the moments the global
    batch's under torchrun."""
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)
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
    texts: list  # what each response adds to its prompt's text (models.continuations)
    suppressed: list = field(default_factory=list)  # token ids outside the policy's softmax (models.suppressed_ids)

    @property
    def response_ids(self):
        return self.input_ids[:, self.prompt_len :]

    def index(self, idx):
        """The rows idx, as a Rollout (a minibatch)."""
        return Rollout(
            self.input_ids[idx],
            self.attention_mask[idx],
            self.response_mask[idx],
            self.prompt_len,
            self.ended[idx],
            [self.prompts[i] for i in idx.tolist()],
            [self.texts[i] for i in idx.tolist()],
            self.suppressed,
        )


def truncate_after_eos(response_ids, eos_ids, pad_id):
    """(ids with everything after the first EOS set to pad, float mask up to and including that EOS, ended);
    an EOS is any of eos_ids (models.eos_ids)."""
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_ids, device=response_ids.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).float()
    return response_ids.masked_fill(after, pad_id), mask, is_eos.any(1)


@torch.no_grad()
def generate(policy, tok, prompts, max_new_tokens, temperature=1.0, ids=None, chunk=0, greedy=False):
    """Sample one response per prompt from the policy itself (models.sample: no logits processor but the
    temperature, every declared EOS id), `chunk` prompts per call (0: all at once); §5.1–5.2. `ids` are the
    prompts' token ids (data.prompt_ids) when already computed. greedy: argmax decoding instead."""
    device = next(policy.parameters()).device
    pad_id, eos = tok.pad_token_id, models.eos_ids(tok, policy)
    ids = ids if ids is not None else [data.prompt_ids(tok, p) for p in prompts]
    B, P = len(ids), max(len(p) for p in ids)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(ids):  # §5.1: left padding
        prompt_ids[b, P - len(p) :] = torch.tensor(p)
        prompt_mask[b, P - len(p) :] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = policy.training
    policy.eval()
    outs = [
        models.sample(
            policy,
            tok,
            prompt_ids[i : i + (chunk or B)],
            prompt_mask[i : i + (chunk or B)],
            max_new_tokens,
            temperature,
            greedy,
        )[:, P:]
        for i in range(0, B, chunk or B)
    ]
    policy.train(was_training)
    R = max(o.shape[1] for o in outs)
    response = torch.cat([F.pad(o, (0, R - o.shape[1]), value=pad_id) for o in outs])
    response, mask, ended = truncate_after_eos(response, eos, pad_id)
    texts = models.continuations(tok, prompt_ids, response)
    return Rollout(
        torch.cat([prompt_ids, response], 1),
        torch.cat([prompt_mask, mask.long()], 1),
        mask,
        P,
        ended,
        list(prompts),
        texts,
        models.suppressed_ids(tok),
    )


def rollout_of(tok, rows, prompts=None):
    """A Rollout of given (prompt ids, response ids) rows, in generate's layout (prompts left-padded, responses
    right-padded, masked after their first EOS): scored with the same functions as sampled ones (DPO's pairs)."""
    P, R = max(len(p) for p, _ in rows), max(len(x) for _, x in rows)
    ids = torch.full((len(rows), P + R), tok.pad_token_id)
    attention = torch.zeros(len(rows), P + R, dtype=torch.long)
    for b, (p, x) in enumerate(rows):
        ids[b, P - len(p) : P + len(x)] = torch.tensor(p + x)
        attention[b, P - len(p) : P + len(x)] = 1
    ended = torch.tensor([bool(x) and x[-1] in models.eos_ids(tok, None) for _, x in rows])
    return Rollout(
        ids,
        attention,
        attention[:, P:].float(),
        P,
        ended,
        prompts or [""] * len(rows),
        [""] * len(rows),
        models.suppressed_ids(tok),
    )


def logits_at_responses(model, rollout):
    """Logits predicting each response token: positions P-1 .. P+R-2, in the model's (or autocast's) dtype.
    Position ids come from the mask (§5.1); the LM head runs on the last R+1 positions only."""
    R = rollout.response_mask.shape[1]
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=R + 1,
    ).logits
    return logits[:, -(R + 1) : -1]


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
            lp = tempered_log_softmax(logits[s : s + chunk], temperature, suppressed)
            logp.append(lp.gather(-1, ids[s : s + chunk, None]).squeeze(-1))
            ent.append(-(lp.exp() * lp).sum(-1))
        ctx.save_for_backward(logits, ids)
        ctx.temperature, ctx.chunk, ctx.suppressed = temperature, chunk, suppressed
        return torch.cat(logp), torch.cat(ent)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, ids = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, len(logits), ctx.chunk):
            lp = tempered_log_softmax(logits[s : s + ctx.chunk], ctx.temperature, ctx.suppressed)
            p = lp.exp()
            H = -(p * lp).sum(-1, keepdim=True)
            gl, ge = g_logp[s : s + ctx.chunk, None], g_ent[s : s + ctx.chunk, None]
            g = -(p * gl + ge * (p * (lp + H)))
            g.scatter_add_(-1, ids[s : s + ctx.chunk, None], gl)
            grad[s : s + ctx.chunk] = (g / ctx.temperature).to(grad.dtype)
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
        logp, entropy = ChunkedLogprobEntropy.apply(
            logits.reshape(B * R, V), rollout.response_ids.reshape(-1), temperature, chunk, suppressed
        )
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


def response_state_values(value_model, rollout, chunk=0):
    """V(s_0 .. s_R) per sample, [B, R + 1], without gradient: s_t is read at position P-1+t (docs/DVPO.md §2),
    `chunk` rows per forward (in_chunks). The states s_0 .. s_T are valid (state_mask), T the response length."""
    return in_chunks(lambda x: value_model(x.input_ids, x.attention_mask), rollout, chunk)[:, rollout.prompt_len - 1 :]


def final_value(values, response_mask):
    """V(s_T) of each response, [B]: the value of the complete response (values: V(s_0 .. s_R), [B, R + 1])."""
    T = response_mask.sum(1).long()
    return values.gather(1, T[:, None]).squeeze(1)


def state_mask(rollout):
    """[B, R + 1]: 1 for the states s_0 .. s_T of each response."""
    return torch.cat([torch.ones_like(rollout.response_mask[:, :1]), rollout.response_mask], 1)


# ---------------------------------------------------------------------------------------------- batches
def accumulate(total, stats):
    """Sum per-micro-batch statistics into total (each already over its minibatch's count); maxima stay maxima."""
    for k, v in stats.items():
        v = v.detach()
        total[k] = v if k not in total else torch.max(total[k], v) if k.endswith("_max_dev") else total[k] + v


def micro_batches(n, size):
    """Index tensors splitting n rows into micro-batches of `size` (0: one batch)."""
    return torch.arange(n).split(size or n)


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
