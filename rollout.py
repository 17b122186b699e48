"""What every trainer shares: data loading, generation, log-probs, masked statistics, KL estimators, GAE,
and per-phase time and memory probes. dvpo.py and ppo_baseline.py import these, so the two trainers differ
only where the algorithms differ. Numbers like §5.2 refer to DVPO.md.
"""
import contextlib
import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import world
from world import UsageError, arg


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
        self.param_ptrs = {p.untyped_storage().data_ptr() for m in self.models for p in m.parameters()}
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


# ---------------------------------------------------------------------------------------------- the RL loop
@dataclass
class RLArgs:
    """Flags shared by dvpo.py and ppo_baseline.py, with the same meaning and defaults in both."""
    policy: str = arg(world.SFT_DIR, "initial policy: a local folder or hub name of a causal LM; the default is the world's SFT policy")
    ref: str = arg("", "reference policy for the KL penalty; empty: the initial policy")
    prompts: str = arg(world.PROMPTS_TRAIN, "RL prompts, a dataset with a 'prompt' column; the default is the world's RL-train prompts")
    eval_prompts: str = arg(world.PROMPTS_EVAL, "held-out prompts for the periodic gold evaluation; empty: none")
    split: str = arg("train", "split to read when a data or prompts path is a hub dataset")
    out: str = arg("ckpt/rl", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")
    lam: float = arg(0.95, "GAE lambda")
    gamma: float = arg(1.0, "discount")
    kl_coef: float = arg(0.05, "beta of the per-token KL penalty r_t = -beta * (log pi - log pi_ref); initial value if adaptive")
    adaptive_kl: bool = arg(False, "adapt beta towards --target-kl (Ziegler et al.; the released code's choice)")
    target_kl: float = arg(6.0, "adaptive KL target, nats per sequence")
    kl_horizon: int = arg(10000, "adaptive KL horizon, in samples")
    steps: int = arg(100, "RL steps (one batch of prompts each)")
    batch_size: int = arg(64, "prompts per step, one response each")
    minibatch_size: int = arg(16, "responses per PPO minibatch; must divide --batch-size")
    ppo_epochs: int = arg(4, "PPO epochs over each batch")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon")
    lr: float = arg(3e-4, "AdamW learning rate of the policy (constant)")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same (§5.3)")
    max_new_tokens: int = arg(48, "sampling budget per response")
    missing_eos_penalty: float = arg(0.0, "subtracted from the last token's reward of a response without EOS (§5.2)")
    eval_every: int = arg(25, "steps between held-out gold evaluations (and one at the start and the end)")
    eval_n: int = arg(200, "held-out prompts per periodic evaluation")
    table_every: int = arg(50, "steps between printed tables of prompt, response, gold and the critic's score")
    seed: int = arg(0, "seed for python, numpy and torch")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


def validate_rl(args):
    for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "eval_every",
                 "eval_n", "table_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.batch_size % args.minibatch_size:
        raise UsageError(f"--minibatch-size {args.minibatch_size} does not divide --batch-size {args.batch_size}")
    if not (0 <= args.lam <= 1 and 0 < args.gamma <= 1 and args.temperature > 0 and args.kl_coef >= 0):
        raise UsageError("--lam must lie in [0, 1], --gamma in (0, 1], --temperature above 0, --kl-coef at least 0")


def load_rl_models(args, device):
    """Policy (trained) and reference (frozen) with one tokenizer; the prompt sets."""
    if world.SFT_DIR in (args.policy, args.ref) or args.prompts == world.PROMPTS_TRAIN or \
            args.eval_prompts == world.PROMPTS_EVAL:
        world.ensure_world()
    prompts = load_prompts(args.prompts, args.split, "--prompts")
    eval_prompts = load_prompts(args.eval_prompts, args.split, "--eval-prompts")[:args.eval_n] if args.eval_prompts else []
    policy, tok = load_pretrained(args.policy, "--policy")
    ref, ref_tok = load_pretrained(args.ref or args.policy, "--ref" if args.ref else "--policy")
    ref.requires_grad_(False).eval()
    if world.tokenizer_fingerprint(ref_tok) != world.tokenizer_fingerprint(tok):
        raise UsageError(f"--ref {args.ref}: its tokenizer differs from --policy {args.policy}'s")
    return policy.to(device).train(), ref.to(device), tok, prompts, eval_prompts


def ppo_loss(new_logp, old_logp, adv, mask, cliprange):
    """Clipped surrogate: mean over response tokens of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))."""
    ratio = torch.exp(new_logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {"policy/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
             "policy/approxkl": 0.5 * masked_mean((new_logp - old_logp) ** 2, mask),
             "val/ratio": masked_mean(ratio, mask),
             "val/ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return masked_mean(loss, mask), stats


def minibatches(batch_size, minibatch_size, epochs, generator):
    """One permutation per epoch, split into minibatches: [[idx, ...] per epoch]."""
    return [torch.randperm(batch_size, generator=generator).split(minibatch_size) for _ in range(epochs)]


@torch.no_grad()
def old_logprobs(policy, r, plan, temperature):
    """Log-probs of the sampled tokens before the update, computed on exactly the minibatches of the first
    epoch, so the first minibatch's ratio is exactly 1 (§5.4), whatever the kernels do with batch shape."""
    out = torch.zeros_like(r.response_mask)
    for idx in plan:
        out[idx] = response_logprobs(policy, r.index(idx), temperature)
    return out


def policy_step(policy, opt, mb, old_logp, adv, args):
    """One clipped policy-gradient step on a minibatch; its statistics as floats."""
    new_logp, entropy = response_logprobs(policy, mb, args.temperature, with_entropy=True)
    loss, s = ppo_loss(new_logp, old_logp, adv, mb.response_mask, args.cliprange)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    opt.step()
    s.update({"loss/policy": loss, "policy/entropy": masked_mean(entropy, mb.response_mask),
              "policy/grad_norm": grad_norm})
    return {k: float(v.detach()) for k, v in s.items()}


def ppo_update(policy, opt, r, old_logp, adv, plans, args, extra_step=None):
    """--ppo-epochs of minibatch steps: the policy's, then extra_step(idx, mb) (PPO's critic) on the same
    minibatch. The mean of each statistic, and the largest |ratio - 1| of the very first minibatch."""
    stats = []
    for epoch_plan in plans:
        for idx in epoch_plan:
            mb = r.index(idx)
            s = policy_step(policy, opt, mb, old_logp[idx], adv[idx], args)
            if extra_step is not None:
                s.update(extra_step(idx, mb))
            stats.append(s)
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["val/ratio_first_max_dev"] = stats[0]["val/ratio_max_dev"]
    return out


class AdaptiveKL:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + err * n / self.horizon


def prompt_stream(prompts, seed):
    """Endless epoch-shuffled prompts."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        yield from (prompts[i] for i in order)


def held_out_eval(policy, ref, tok, prompts, args, seed):
    """Gold reward and KL on held-out prompts, sampled with a fixed seed that leaves training's RNG alone."""
    import evaluate
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    s = evaluate.score_policy(policy, ref, tok, prompts, 250, args.max_new_tokens, args.temperature)
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    gold, ci = evaluate.mean_ci(s["gold"])
    return {"eval/gold": gold, "eval/gold_ci95": ci, "eval/kl": sum(s["kl"]) / len(s["kl"]),
            "eval/eos_rate": sum(s["ended"]) / len(s["ended"]), "eval/length": sum(s["length"]) / len(s["length"])}


def rl_train(args, algo, policy, ref, tok, prompts, eval_prompts, device):
    """The loop DVPO and PPO share: sample prompts -> generate -> old and reference log-probs -> KL-penalty
    rewards -> algo.advantages -> PPO epochs (the policy's clipped step, then algo.minibatch_step if any) ->
    log -> periodic held-out gold evaluation -> save. `algo` holds what differs between the two methods:
    its critic, `advantages(r, rewards) -> [B, R]`, `score` (the critic's V(s_T) or RM score, [B]), `name`,
    `describe` (for the first printed line), `score_name`, `models` and `optimizers` (for the memory tally), and optionally `minibatch_step`."""
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    frozen = {id(p) for m in (ref, *algo.models) for p in m.parameters() if not p.requires_grad}
    assert not frozen & {id(p) for o in (opt, *algo.optimizers) for g in o.param_groups for p in g["params"]}
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    probe = Probe(device, models=(policy, ref, *algo.models), optimizers=(opt, *algo.optimizers))
    stream = prompt_stream(prompts, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{algo.name}: {algo.describe}, lam={args.lam} beta={args.kl_coef}{' (adaptive)' if args.adaptive_kl else ''}, "
          f"{args.steps} steps of {args.batch_size} prompts on {device}, {len(prompts)} prompts", flush=True)
    t0 = time.time()
    with world.atomic_dir(args.out) as tmp:
        log = world.MetricsLog(os.path.join(tmp, "metrics.jsonl"))
        ev = {}
        for step in tqdm(range(args.steps + 1), desc=algo.name, leave=False, disable=None):
            if eval_prompts and (step % args.eval_every == 0 or step == args.steps):
                ev = held_out_eval(policy, ref, tok, eval_prompts, args, args.seed + 10_000)
                log.write(step, ev)
                tqdm.write(f"eval step {step} | held-out gold {ev['eval/gold']:+.3f} ± {ev['eval/gold_ci95']:.3f} | "
                           f"kl {ev['eval/kl']:.2f} | eos {ev['eval/eos_rate']:.2f}")
            if step == args.steps:
                break
            batch_prompts = [next(stream) for _ in range(args.batch_size)]
            with probe.phase("generate"):
                r = generate(policy, tok, batch_prompts, args.max_new_tokens, args.temperature)
            with probe.phase("score"):
                plans = minibatches(args.batch_size, args.minibatch_size, args.ppo_epochs, gen)
                old_logp = old_logprobs(policy, r, plans[0], args.temperature)
                with torch.no_grad():
                    ref_logp = response_logprobs(ref, r, args.temperature)
                kl = kl_k1(old_logp, ref_logp) * r.response_mask
                rewards = -kl_ctl.beta * kl
                T = r.response_mask.sum(1).long()
                if args.missing_eos_penalty:
                    rewards[torch.arange(len(T)), T - 1] -= args.missing_eos_penalty * (~r.ended).float()
                adv = masked_whiten(algo.advantages(r, rewards), r.response_mask)
            with probe.phase("update"):
                stats = ppo_update(policy, opt, r, old_logp, adv, plans, args, getattr(algo, "minibatch_step", None))
            gold = world.gold_scores(r.texts)
            seq_kl = kl.sum(1).mean().item()
            m = {"objective/kl": seq_kl, "objective/kl_coef": kl_ctl.beta, "objective/gold": sum(gold) / len(gold),
                 f"objective/{algo.score_name}": algo.score.mean().item(),
                 "objective/kl_k3": (kl_k3(old_logp, ref_logp) * r.response_mask).sum(1).mean().item(),
                 "objective/length": T.float().mean().item(), "objective/eos_rate": r.ended.float().mean().item(),
                 **stats, **probe.pop(), "time/elapsed": time.time() - t0}
            log.write(step + 1, m)
            if args.adaptive_kl:
                kl_ctl.update(seq_kl, args.batch_size)
            tqdm.write(f"step {step + 1}/{args.steps} | gold {m['objective/gold']:+.3f} | kl {seq_kl:.2f} | "
                       f"{algo.score_name} {m[f'objective/{algo.score_name}']:+.3f} | clipfrac {m['policy/clipfrac']:.3f} | "
                       f"ent {m['policy/entropy']:.2f} | gen {m['time/generate']:.2f}s score {m['time/score']:.2f}s "
                       f"update {m['time/update']:.2f}s")
            if (step + 1) % args.table_every == 0:
                tqdm.write(f"| prompt | response | gold | {algo.score_name} |\n| --- | --- | --- | --- |")
                for i in range(4):
                    tqdm.write(f"| {r.prompts[i]} | {r.texts[i]} | {gold[i]:+.3f} | {algo.score[i].item():+.3f} |")
        log.close()
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        summary = {**ev, "train/steps": args.steps, "time/wall_seconds": time.time() - t0,
                   "params/trained": sum(p.numel() for m in (policy, *algo.models) for p in m.parameters() if p.requires_grad),
                   "params/frozen": sum(p.numel() for m in (ref, *algo.models) for p in m.parameters() if not p.requires_grad),
                   "device": str(device), "args": asdict(args)}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(f"saved {args.out}" + (f": held-out gold {ev['eval/gold']:+.3f} ± {ev['eval/gold_ci95']:.3f}, "
                                 f"KL {ev['eval/kl']:.2f}" if ev else "") + f", {summary['time/wall_seconds']:.0f}s", flush=True)
    return summary
