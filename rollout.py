"""What every trainer shares: data loading, generation, log-probs, masked statistics, KL estimators, GAE,
and per-phase time and memory probes. dvpo.py and ppo_baseline.py import these, so the two trainers differ
only where the algorithms differ. Numbers like §5.2 refer to DVPO.md.
"""
import contextlib
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import world
from world import UsageError


# ---------------------------------------------------------------------------------------------- data
def load_rows(path, split="train", flag="--data"):
    """Rows of a local json/jsonl/parquet/csv/arrow file, a saved dataset folder, or a hub dataset."""
    import datasets
    datasets.disable_progress_bars()
    builders = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}
    try:
        if os.path.isfile(path):
            ext = path.rsplit(".", 1)[-1].lower()
            if ext not in builders:
                raise UsageError(f"{flag} {path}: unsupported file type (use json, jsonl, parquet, csv or arrow)")
            if os.path.getsize(path) == 0:
                raise UsageError(f"{flag} {path}: the file is empty")
            ds = datasets.load_dataset(builders[ext], data_files=path, split="train")
        elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                         ("dataset_info.json", "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif os.path.isdir(path) or not world.looks_local(path):
            ds = datasets.load_dataset(path, split=split)
        else:
            raise UsageError(f"{flag} {path}: no such file")
    except UsageError:
        raise
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise UsageError(f"{flag} {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return list(ds)


def load_prompts(path, split="train", flag="--prompts"):
    """Non-empty prompt strings from a dataset with a `prompt` column."""
    rows = load_rows(path, split, flag)
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    if "prompt" not in rows[0]:
        raise UsageError(f"{flag} {path}: no 'prompt' column (columns: {', '.join(rows[0])})")
    for i, row in enumerate(rows, 1):
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise UsageError(f"{flag} {path} row {i}: 'prompt' is missing or empty")
    return [row["prompt"] for row in rows]


def load_pretrained(name, flag="--policy", causal_lm=True):
    """Any Hugging Face causal LM (local folder or hub name), with its tokenizer and dropout off (§5.4);
    causal_lm=False gives the headless backbone (AutoModel) that value models sit on."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if not os.path.isdir(name) and world.looks_local(name):
        raise UsageError(f"{flag} {name}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_pretrained(name)
    except (OSError, ValueError) as e:
        where = "the folder" if os.path.isdir(name) else "no such folder, and the hub"
        raise UsageError(f"{flag} {name}: {where} gave no model ({str(e).splitlines()[0][:160]})") from None
    if tok.eos_token_id is None:
        raise UsageError(f"{flag} {name}: the tokenizer has no EOS token")
    return disable_dropout(model), tok


def disable_dropout(model):
    """§5.4: dropout off everywhere, including attention-probability dropout stored as a float."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    return model


# ---------------------------------------------------------------------------------------------- masked statistics
def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance over valid entries; 0 (not NaN) when fewer than two entries are valid (§5.5)."""
    n = mask.sum()
    centred = (x - masked_mean(x, mask)) * mask
    return (centred ** 2).sum() / (n - 1).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over valid entries, 0 elsewhere; finite for masks holding 0 or 1 entry."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps) * mask


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
    texts: list  # decoded responses, special tokens removed

    @property
    def response_ids(self):
        return self.input_ids[:, self.prompt_len:]

    def index(self, idx):
        """The rows idx, as a Rollout (a minibatch)."""
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx], self.prompt_len,
                       self.ended[idx], [self.prompts[i] for i in idx.tolist()], [self.texts[i] for i in idx.tolist()])


def truncate_after_eos(response_ids, eos_id, pad_id):
    """(ids with everything after the first EOS set to pad, float mask up to and including that EOS, ended)."""
    is_eos = response_ids == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = (~after).float()
    return response_ids.masked_fill(after, pad_id), mask, is_eos.any(1)


@torch.no_grad()
def generate(policy, tok, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0):
    """Sample one response per prompt with a KV cache (transformers generate); §5.1–5.2."""
    device = next(policy.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = tok(prompts, padding=True, return_tensors="pt", padding_side="left").to(device)
    was_training = policy.training
    policy.eval()
    out = policy.generate(**enc, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                          max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tok.eos_token_id)
    policy.train(was_training)
    P = enc.input_ids.shape[1]
    response, mask, ended = truncate_after_eos(out[:, P:], tok.eos_token_id, pad_id)
    input_ids = torch.cat([enc.input_ids, response], 1)
    attention_mask = torch.cat([enc.attention_mask, mask.long()], 1)
    texts = tok.batch_decode(response * mask.long() + pad_id * (1 - mask.long()), skip_special_tokens=True)
    return Rollout(input_ids, attention_mask, mask, P, ended, list(prompts), [t.strip() for t in texts])


def logits_at_responses(model, rollout):
    """Logits predicting each response token: positions P-1 .. P+R-2. Position ids come from the mask."""
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=position_ids).logits
    return logits[:, rollout.prompt_len - 1:-1]


def response_logprobs(model, rollout, temperature=1.0, with_entropy=False):
    """log pi(y_t | s_t) of the sampled tokens at the sampling temperature (§5.3), [B, R]; masked entries are
    0. With with_entropy, also the per-token entropy of the tempered distribution."""
    logits = logits_at_responses(model, rollout).float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1) * rollout.response_mask
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * rollout.response_mask
    return logp, entropy


def response_state_values(value_model, rollout):
    """V(s_0 .. s_R) per sample, [B, R + 1]: s_t is read at position P-1+t (DVPO.md §2). The state mask is
    1 for t <= T, where T is the response length."""
    return value_model(rollout.input_ids, rollout.attention_mask)[:, rollout.prompt_len - 1:]


def state_mask(rollout):
    """[B, R + 1]: 1 for the states s_0 .. s_T of each response."""
    return torch.cat([torch.ones_like(rollout.response_mask[:, :1]), rollout.response_mask], 1)


# ---------------------------------------------------------------------------------------------- probes
def state_bytes(models=(), optimizers=()):
    """Bytes of parameters, gradients and optimizer state held by these models and optimizers."""
    params = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for m in models for p in m.parameters() if p.grad is not None)
    opt = sum(v.numel() * v.element_size() for o in optimizers for s in o.state.values() for v in s.values()
              if torch.is_tensor(v))
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
    optimizer-state bytes at the phase's end, with process RSS beside it."""

    def __init__(self, device, models=(), optimizers=()):
        self.device, self.models, self.optimizers = torch.device(device), models, optimizers
        self.metrics = {}

    @contextlib.contextmanager
    def phase(self, name):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.metrics[f"memory/{name}_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        else:
            self.metrics[f"memory/{name}_state_bytes"] = sum(state_bytes(self.models, self.optimizers).values())
            self.metrics[f"memory/{name}_rss_bytes"] = rss_bytes()
        self.metrics[f"time/{name}"] = time.perf_counter() - t0

    def pop(self):
        out, self.metrics = self.metrics, {}
        return out
