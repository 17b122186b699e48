"""Stage 1 of DVPO: pretrain the global value model (GVM) on preference pairs (docs/DVPO.md §2).

Each pair (x, y_chosen, y_rejected) becomes two samples with terminal labels +1 and -1. A causal-LM backbone
with a zero-initialised Linear(hidden, 1) head reads V(s_t) for every state s_t = (x, y_<t), t = 0..T, and
regresses it on TD(lambda) return-to-go targets (gamma = 1 by default) bootstrapped from the current model.

    python gvm.py                                   # the embedded world's SFT policy and pairs
    python gvm.py --lam 1.0                         # Monte Carlo: every state's target is the label
    python gvm.py --model Qwen/Qwen2.5-0.5B --data my_pairs.jsonl --out ckpt/gvm-qwen
"""

import abc
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch
import torch.nn as nn
from tqdm import tqdm

from infra import checkpoint, cli, data, distributed, lora, models, world
from infra.cli import UsageError, arg
from infra.flags import DataFlags, MemoryFlags, RunFlags
from infra.precision import Precision, check_optimizer, make_optimizer
from rollout import gae, masked_mean

# held-out metrics a checkpoint can be selected by (docs/results.md, What makes a good GVM); whether higher is better
SELECT = {
    "acc_final": True,
    "acc_mean": True,
    "margin": True,
    "terminal_mse": False,
    "value_mse": False,
    "td_loss": False,
    "bt_loss": False,
    "ece": False,
}


@dataclass
class Args(DataFlags, MemoryFlags, RunFlags):
    model: str = arg(
        world.SFT_DIR, "backbone: a local folder or hub name of a causal LM; the default is the world's SFT policy"
    )
    data: str = arg(
        world.PAIRS_TRAIN,
        "preference pairs in any shape infra/data.py reads: json, jsonl, parquet, csv, a saved dataset folder "
        "or a hub name",
    )
    eval_data: str = arg(
        "", "held-out pairs; empty: the world's held-out pairs for the default --data, else --eval-frac of --data"
    )
    eval_frac: float = arg(
        0.05, "fraction of --data held out when --eval-data is empty and --data is not the world's", "(0, 1)"
    )
    out: str = arg(
        "ckpt/gvm", "output folder: backbone, head, tokenizer, value_model.json, metrics.jsonl, summary.json"
    )
    lam: float = arg(
        0.95,
        "TD(lambda) of the return-to-go targets; 1 = Monte Carlo (label everywhere), 0 = one-step bootstrap",
        "[0, 1]",
    )
    gamma: float = arg(1.0, "discount of the return-to-go", "(0, 1]")
    epochs: int = arg(10, "passes over the training pairs", ">= 1")
    max_steps: int = arg(-1, "stop after this many optimizer steps (-1: run all epochs)", ">= -1")
    batch_size: int = arg(32, "samples per optimizer step (a pair gives two samples)", ">= 1")
    lr: float = arg(1e-3, "AdamW learning rate, linear warmup then linear decay to 0", "> 0")
    pair_batches: bool = arg(
        True, "keep each pair's two samples in one batch, so what they share (the prompt) cancels in the gradient"
    )
    warmup_steps: int = arg(20, "steps of linear learning-rate warmup", ">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", ">= 0")
    max_len: int = arg(
        512,
        "pairs with a prompt + response longer than this many tokens (or than the model's positions) are "
        "dropped, with a count",
        ">= 2",
    )
    fsdp: bool = arg(
        False,
        "under torchrun: shard the model's parameters, gradients and AdamW state over the processes (FSDP2) "
        "instead of a full replica on each (DDP)",
    )
    log_every: int = arg(20, "steps between printed and logged training lines", ">= 1")
    eval_every: int = arg(100, "steps between held-out evaluations (and one at the end)", ">= 1")
    eval_batch_size: int = arg(128, "samples per forward pass during evaluation", ">= 1")
    select: str = arg(
        "last", "which evaluated checkpoint to save: last, or the best by a held-out metric: " + ", ".join(SELECT)
    )


# ---------------------------------------------------------------------------------------------- model
class ValueModel(nn.Module):
    """Backbone + Linear(hidden, 1) on every position, zero-initialised (§2). The reward model and critic of
    the PPO baseline have the same shape."""

    def __init__(self, backbone, head=None, dtype=None):
        super().__init__()
        self.backbone = backbone
        self.head = (
            head if head is not None else nn.Linear(backbone.config.hidden_size, 1, dtype=dtype or backbone.dtype)
        )
        if head is None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        # §5.1: position ids from the mask, so left and right padding give the same values
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.head(hidden).squeeze(-1).float().clone()  # not a view: FSDP2 hooks a module's output for backward


def load_backbone(name, flag="--model", dtype=torch.float32):
    """Any Hugging Face causal LM (local folder or hub name) as a headless backbone, with its tokenizer."""
    return models.load_pretrained(name, flag, causal_lm=False, dtype=dtype)


HEAD_FILE, META_FILE = "value_head.safetensors", "value_model.json"


def save_value_model(model, tok, folder, meta):
    """The backbone (save_pretrained), the head and value_model.json in folder. Under torchrun every rank calls
    it (a sharded model is gathered) and rank 0, whose folder is not None, writes."""
    from safetensors.torch import save_file

    full = distributed.full_state_dict(model)
    if folder is None:
        return
    part = lambda prefix: (
        None if full is None else {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    )  # noqa: E731
    models.save_pretrained(model.backbone, tok, folder, part("backbone."))
    head = part("head.") or model.head.state_dict()
    save_file({k: v.contiguous() for k, v in head.items()}, os.path.join(folder, HEAD_FILE))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({**meta, "tokenizer_fingerprint": models.tokenizer_fingerprint(tok)}, f, indent=2)


def read_meta(folder, kind="gvm", flag="--gvm"):
    """value_model.json of a checkpoint written by save_value_model, checked to be of this kind."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder}: no such folder")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {folder}: not a {kind} checkpoint (no {META_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: damaged ({e})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{flag} {path}: damaged (a JSON {type(meta).__name__}, not an object)")
    if meta.get("kind") != kind:
        raise UsageError(f"{flag} {folder}: holds a {meta.get('kind')!r} checkpoint, not a {kind!r} one")
    return meta


def load_head(head, folder, flag):
    """The value head saved in folder loaded into `head` (in head's dtype); missing or damaged is one line."""
    from safetensors.torch import load_file

    path = os.path.join(folder, HEAD_FILE)
    try:
        head.load_state_dict(load_file(path))
    except Exception as e:  # missing, truncated or of another shape
        raise UsageError(f"{flag} {path}: damaged or missing ({type(e).__name__})") from None
    return head


def load_value_model(folder, device="cpu", kind="gvm", flag="--gvm", dtype=torch.float32):
    """Load a checkpoint written by save_value_model: (ValueModel, tokenizer, meta). Later stages use this."""
    meta = read_meta(folder, kind, flag)
    backbone, tok = load_backbone(folder, flag, dtype)
    model = ValueModel(backbone)
    load_head(model.head, folder, flag)
    return model.to(device), tok, meta


def shared_value_model(folder, policy, name, kind="gvm", flag="--gvm", trainable=False):
    """The value model in folder as adapter `name` on the LoRA policy's own base, so that one copy of the base
    weights serves both (docs/DVPO.md §7): a ValueModel of lora.Adapter(policy, name) and the saved head, in the
    base's dtype (trainable: the adapter trains and the head is an fp32 copy). (None, why) when folder's model was
    not trained with --lora-r on the same base weights; load_value_model then loads it as a second copy."""
    meta = read_meta(folder, kind, flag)
    if "lora_base" not in meta:
        return None, "it was trained in full, not with --lora-r"
    if meta["lora_base"] != lora.base_fingerprint(policy):
        return None, f"its base weights ({meta['base_model']}) are not the policy's"
    lora.load_adapter(policy, name, os.path.join(folder, lora.ADAPTER_DIR), trainable)
    dtype = torch.float32 if trainable else policy.get_base_model().dtype
    head = load_head(nn.Linear(policy.config.hidden_size, 1, dtype=dtype), folder, flag)
    return ValueModel(lora.Adapter(policy, name), head.requires_grad_(trainable)), None


def frozen_value_model(folder, args, policy, device, dtype, name="gvm", kind="gvm", flag="--gvm"):
    """The value model a trainer scores with, frozen for real (in no optimizer, requires_grad off, eval mode).
    Given the LoRA policy (--lora-r, --share-base): an adapter on its own base if it was trained on it
    (shared_value_model); else its own copy in --dtype, with one line saying why under --lora-r."""
    model, why = None, "--no-share-base"
    if args.lora_r and args.share_base and policy is not None:
        model, why = shared_value_model(folder, policy, name, kind, flag)
    if model is None:
        model = load_value_model(folder, device, kind, flag, dtype)[0]
        if args.lora_r and policy is not None:
            print(f"{flag} {folder}: a second copy of the base weights: {why}", flush=True)
    return model.to(device).requires_grad_(False).eval()


def check_tokenizer(meta, tok, where, policy, hint):
    """Refuse a value model whose tokenizer (vocabulary, special tokens, chat template) is not the policy's."""
    if meta.get("tokenizer_fingerprint") != models.tokenizer_fingerprint(tok):
        raise UsageError(
            f"{where}: built from {meta.get('base_model')} with another tokenizer than --policy {policy}; "
            f"train one on this policy's backbone ({hint} {policy})"
        )


# ---------------------------------------------------------------------------------------------- data
def encode(tok, prompt, response, max_len, max_prompt_len=0, positions=0):
    """(prompt ids, response ids + EOS), encoded as the RL scripts encode them (infra/data.py). data.TooLong for a
    prompt over max_prompt_len, or a prompt + response over max_len tokens or the model's positions: a cut
    response would lose its EOS and be valued as a complete one."""
    p, r = data.encode_prompt(tok, prompt, max_prompt_len), data.response_ids(tok, response)
    if len(p) + len(r) > max_len:
        raise data.TooLong(f"prompt + response exceed --max-len {max_len} tokens")
    if positions and len(p) + len(r) > positions:
        raise data.TooLong(f"prompt + response exceed the model's {positions} positions")
    return p, r


def pair_samples(pairs, tok, max_len, where, max_prompt_len=0, strict=False, positions=0):
    """Two samples per (prompt, chosen, rejected): (prompt ids, response ids, label), chosen -> +1 first."""

    def both(pair):
        prompt, chosen, rejected = pair
        return [
            (*encode(tok, prompt, chosen, max_len, max_prompt_len, positions), 1.0),
            (*encode(tok, prompt, rejected, max_len, max_prompt_len, positions), -1.0),
        ]

    return [s for two in data.encode_all(pairs, both, where, strict) for s in two]


def collate(samples, pad_id):
    """Right-padded batch. States s_0..s_T of a sample are read at positions P-1 .. P-1+T (§2)."""
    L = max(len(p) + len(r) for p, r, _ in samples)
    S = max(len(r) for _, r, _ in samples) + 1
    B = len(samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    state_pos = torch.zeros(B, S, dtype=torch.long)
    state_mask = torch.zeros(B, S)
    for b, (p, r, _) in enumerate(samples):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(p + r)
        attention_mask[b, :n] = 1
        state_pos[b, : len(r) + 1] = torch.arange(len(p) - 1, n)
        state_mask[b, : len(r) + 1] = 1
    labels = torch.tensor([lab for _, _, lab in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "state_pos": state_pos,
        "state_mask": state_mask,
        "labels": labels,
    }


def state_values(model, batch):
    """V(s_0..s_T) per sample, [B, S], zero where state_mask is 0."""
    v = model(batch["input_ids"], batch["attention_mask"])
    return v.gather(1, batch["state_pos"]) * batch["state_mask"]


# ---------------------------------------------------------------------------------------------- targets
def td_lambda_targets(values, state_mask, labels, gamma=1.0, lam=0.95):
    """Return-to-go targets R(s_0..s_T) (§2): reward 0 on every token but the last, whose reward is the
    label; R_t = A_t + V(s_t) with TD(lambda) advantages for t < T; the target of V(s_T) is the label."""
    values = values.detach()
    T = state_mask.sum(1).long() - 1  # index of the terminal state s_T
    action_mask = state_mask[:, 1:]  # action t leads from s_t to s_{t+1}, valid for t < T
    t = torch.arange(action_mask.shape[1], device=values.device)
    rewards = labels[:, None] * (t[None] == (T - 1)[:, None])
    _, returns = gae(rewards, values[:, :-1], action_mask, gamma, lam)
    targets = torch.cat([returns, torch.zeros_like(returns[:, :1])], 1)
    targets[torch.arange(len(T)), T] = labels
    return targets


def value_loss(values, targets, state_mask):
    """1/2 * mean over valid states of (V - R)^2 (§2)."""
    return 0.5 * masked_mean((values - targets) ** 2, state_mask)


# ---------------------------------------------------------------------------------------------- evaluation
def calibration_error(final, labels, bins=10):
    """Expected calibration error of p = (1 + V(s_T)) / 2, clipped to [0, 1], read as the probability that a
    sample is the chosen one: sum over equal-width bins of |mean p - fraction chosen| weighted by the bin's share."""
    p = ((1 + final) / 2).clamp(0, 1)
    y = (labels > 0).float()
    idx = (p * bins).long().clamp(max=bins - 1)
    err = torch.zeros(())
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.float().mean() * (p[m].mean() - y[m].mean()).abs()
    return err.item()


@torch.no_grad()
def heldout_metrics(model, samples, pad_id, device, batch_size=128, gamma=1.0, lam=0.95):
    """What a user can measure on held-out pairs without a gold judge (`samples` alternate chosen/rejected):
    pairwise accuracy by V(s_T) and by the mean of V(s_1..s_T) (ties count half), the mean margin
    V_T(chosen) - V_T(rejected) and its Bradley-Terry loss -log sigmoid(margin), the terminal MSE (V(s_T) - label)^2,
    the Monte Carlo MSE of every response state against the label, the TD(lambda) loss the GVM trains on, and the
    calibration error of V(s_T) read as a probability (calibration_error). Under torchrun each rank values its
    share of the pairs and all get the metrics of the whole."""
    was_training = model.training
    model.eval()
    part, n_real = distributed.padded_share(samples, unit=2)
    final, mean, mc, td, n_states = [], [], 0.0, 0.0, 0.0
    for i in range(0, len(part), batch_size):
        batch = {k: v.to(device) for k, v in collate(part[i : i + batch_size], pad_id).items()}
        real = (torch.arange(i, i + len(batch["labels"]), device=device) < n_real).float()[:, None]  # not padding
        v = state_values(model, batch).float()
        sm = batch["state_mask"]
        m = sm.clone()
        m[:, 0] = 0
        T = sm.sum(1).long() - 1
        final.append(v[torch.arange(len(T)), T].cpu())
        mean.append(((v * m).sum(1) / m.sum(1)).cpu())
        mc += (((v - batch["labels"][:, None]) ** 2) * m * real).sum().item()
        targets = td_lambda_targets(v, sm, batch["labels"], gamma, lam)
        td += (0.5 * (v - targets) ** 2 * sm * real).sum().item()
        n_states += (sm * real).sum().item()
    model.train(was_training)
    final, mean = (torch.tensor(distributed.gather_shares(torch.cat(x).tolist(), n_real)) for x in (final, mean))
    mc, td, n_states = distributed.all_reduce(
        torch.tensor([mc, td, n_states], dtype=torch.float64, device=device)
    ).tolist()
    labels = torch.tensor([s[2] for s in samples])

    def acc(x):
        c, r = x[0::2], x[1::2]
        return ((c > r).float() + 0.5 * (c == r).float()).mean().item()

    margin = final[0::2] - final[1::2]
    n_response = n_states - len(samples)
    return {
        "eval/pairwise_acc_final": acc(final),
        "eval/pairwise_acc_mean": acc(mean),
        "eval/margin": margin.mean().item(),
        "eval/bt_loss": -torch.nn.functional.logsigmoid(margin).mean().item(),
        "eval/terminal_mse": ((final - labels) ** 2).mean().item(),
        "eval/value_mse": mc / n_response,
        "eval/td_loss": td / n_states,
        "eval/ece": calibration_error(final, labels),
    }


# ---------------------------------------------------------------------------------------------- main
def load_data(args):
    """Training rows and held-out rows, with the file names used in messages."""
    default_data = args.data == world.PAIRS_TRAIN
    if default_data:
        world.ensure_world()
    train = data.load_pairs(args.data, args.split, "--data", args.strict)  # bad data fails before any world is built
    if args.eval_data:
        held = data.load_pairs(args.eval_data, args.eval_split or args.split, "--eval-data", args.strict)
        return train, held, f"--eval-data {args.eval_data}"
    if default_data:
        return (
            train,
            data.load_pairs(world.PAIRS_EVAL, "train", "--eval-data", args.strict),
            f"--eval-data {world.PAIRS_EVAL}",
        )
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    n_eval = max(1, int(len(train) * args.eval_frac))
    if len(train) - n_eval < 1:
        raise UsageError(f"--data {args.data}: too few rows ({len(train)}) to hold out {args.eval_frac:.0%}")
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]], f"--data {args.data} (held-out part)"


class Objective(abc.ABC):
    """What train() fits a value model to: TDObjective (the GVM) or reward.BradleyTerry (the baselines' reward
    model). Both see the same pairs through the same loop."""

    kind: str  # the checkpoint's kind in value_model.json: "gvm" or "reward-model"
    pair_batches: bool  # a pair's two samples always in one batch, chosen first
    shown: dict  # the held-out metrics its eval lines print: {label: heldout_metrics key}

    @abc.abstractmethod
    def loss(self, values, batch):
        """(the mean loss over what weight() counts, {name: float} statistics) of values V(s_0..s_T) [B, S]."""

    @abc.abstractmethod
    def weight(self, batch):
        """What the loss averages over in a batch (states, pairs): micro-batches are weighted by it."""

    @abc.abstractmethod
    def meta(self):
        """What value_model.json records of the objective."""


class TDObjective(Objective):
    """The GVM's objective (§2): 1/2 MSE against TD(lambda) return-to-go targets with +-1 terminal labels.
    A pair's two samples share a batch (--pair-batches): the same loss, but its gradient along what the two
    share, the prompt, whose targets are +1 and -1, cancels within the batch instead of adding noise."""

    kind = "gvm"
    shown = {
        "acc(final)": "eval/pairwise_acc_final",
        "acc(mean)": "eval/pairwise_acc_mean",
        "margin": "eval/margin",
        "terminal mse": "eval/terminal_mse",
    }

    def __init__(self, args):
        self.args, self.pair_batches = args, args.pair_batches

    def loss(self, values, batch):
        # targets from the current model without gradient; dropout is off, so the detached values of this
        # forward equal the released code's separate no-grad pass
        targets = td_lambda_targets(values, batch["state_mask"], batch["labels"], self.args.gamma, self.args.lam)
        loss = value_loss(values, targets, batch["state_mask"])
        return loss, {
            "loss/value": loss.item(),
            "val/mean": masked_mean(values, batch["state_mask"]).item(),
            "val/target_mean": masked_mean(targets, batch["state_mask"]).item(),
        }

    def weight(self, batch):
        """What the loss averages over: states."""
        return batch["state_mask"].sum().item()

    def meta(self):
        return {"lam": self.args.lam, "gamma": self.args.gamma, "label": "+1 chosen / -1 rejected"}


def batch_order(n_samples, pair_batches, rng):
    """A shuffled order of sample indices; with pair_batches, each pair's two samples stay side by side."""
    if not pair_batches:
        order = list(range(n_samples))
        rng.shuffle(order)
        return order
    pairs = list(range(n_samples // 2))
    rng.shuffle(pairs)
    return [j for i in pairs for j in (2 * i, 2 * i + 1)]


def train_step(model, samples, objective, opt, prec, pad_id, device, micro_batch_size=0):
    """One optimizer step on a batch of samples, accumulated over micro-batches: each micro-batch's mean
    loss is weighted by its share of what the objective averages over (states or pairs), so the gradient
    equals the whole batch's. Under torchrun `samples` are this rank's share of the batch and the weights are
    over the global batch, times the number of ranks, so DDP's average of the ranks' gradients is the whole
    batch's, and so is the mean over ranks of each statistic. (statistics, gradient norm before clipping)"""
    micro = micro_batch_size or len(samples)
    parts = [collate(samples[i : i + micro], pad_id) for i in range(0, len(samples), micro)]
    weights = [objective.weight(b) for b in parts]
    total = distributed.all_reduce(torch.tensor(sum(weights), dtype=torch.float64, device=device)).item()
    share = [w / (total / distributed.world()) for w in weights]
    opt.zero_grad(set_to_none=True)
    stats = {}
    for batch, f in zip(parts, share):
        batch = {k: v.to(device) for k, v in batch.items()}
        with prec.autocast():
            values = state_values(model, batch)
        loss, m = objective.loss(values, batch)
        prec.backward(loss * f)
        for k, v in m.items():
            stats[k] = stats.get(k, 0.0) + v * f
    return distributed.mean_over_ranks(stats), prec.step(opt, 1.0)


def train(args: Args, objective=None):
    """Train a value model on preference pairs. The objective defaults to the GVM's; the PPO baseline passes
    its Bradley-Terry reward-model objective, so both models see the same data through the same loop."""
    objective = objective or TDObjective(args)
    cli.check_args(args)
    if args.max_steps == 0:
        raise UsageError("--max-steps 0: must be -1 (all epochs) or at least 1")
    if objective.pair_batches and (args.batch_size % 2 or args.micro_batch_size % 2):
        raise UsageError("--batch-size and --micro-batch-size must be even: a pair's two samples stay together")
    unit = 2 if objective.pair_batches else 1  # a batch's share on each rank holds whole pairs
    problem = distributed.check_divides(args.batch_size, "--batch-size", unit)
    if problem:
        raise UsageError(problem)
    problem = distributed.check_flags(args.fsdp, args.lora_r, args.optim)
    if problem:
        raise UsageError(problem)
    if args.select != "last" and args.select not in SELECT:
        raise UsageError(f"--select {args.select}: must be last or one of {', '.join(SELECT)}")
    check_optimizer(args.optim)
    checkpoint.check_output_dir(args.out, "--out", args)
    device = cli.pick_device(args.device)
    prec = Precision(args.dtype, device)
    cli.seed_everything(args.seed)
    if args.model != world.SFT_DIR:  # a user's model is checked before a world is built for the default data
        models.position_limit(args.model, "--model")
    train_rows, eval_rows, eval_name = load_data(args)
    if args.model == world.SFT_DIR:
        world.ensure_world()
    tok, positions = models.load_tokenizer(args.model, "--model"), models.position_limit(args.model, "--model")
    pad_id = tok.pad_token_id  # masked everywhere; data.load_tokenizer makes it differ from EOS
    train_samples = pair_samples(
        train_rows, tok, args.max_len, f"--data {args.data}", args.max_prompt_len, args.strict, positions
    )
    eval_samples = pair_samples(eval_rows, tok, args.max_len, eval_name, args.max_prompt_len, args.strict, positions)
    if args.lora_r:  # the backbone frozen in --dtype with adapters, the head trained in full and in fp32
        backbone = lora.add_lora(
            models.load_model(args.model, tok, "--model", causal_lm=False, dtype=prec.dtype),
            args.lora_r,
            args.lora_alpha,
            args.lora_dropout,
            args.lora_targets,
        )
    else:
        backbone = models.load_model(args.model, tok, "--model", causal_lm=False)
    model = ValueModel(backbone, dtype=torch.float32).to(device)
    if args.gradient_checkpointing:
        models.enable_checkpointing(backbone)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = distributed.wrap(model, args.fsdp)  # DDP or FSDP2 under torchrun; before the optimizer

    # under torchrun every batch, the epoch's last too, splits into equal shares: up to unit * ranks - 1 samples
    # of each epoch's order are left out (none in one process)
    n_used = len(train_samples) - len(train_samples) % (unit * distributed.world())
    steps_per_epoch = math.ceil(n_used / args.batch_size)
    total = steps_per_epoch * args.epochs if args.max_steps < 0 else args.max_steps
    opt = make_optimizer(model.parameters(), args.lr, args.optim, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / max(1, args.warmup_steps), max(0.0, (total - s) / max(1, total - args.warmup_steps))),
    )
    print(
        f"{objective.kind}: {n_params:,} params ({n_trained:,} trained) on {device} ({args.dtype}), "
        f"{len(train_samples) // 2} train pairs, {len(eval_samples) // 2} "
        f"held-out pairs, {total} steps of {args.batch_size} samples, {objective.meta()}",
        flush=True,
    )

    t0 = time.time()
    meta = {"kind": objective.kind, "base_model": args.model, "data": args.data, **objective.meta()}
    if args.lora_r:  # which base weights the adapter was trained on: a policy with the same runs it on its own
        meta.update(lora_base=lora.base_fingerprint(backbone))

    def shown(metrics):
        return " | ".join(
            f"{label} {metrics[k]:{'+.3f' if 'margin' in k else '.3f'}}" for label, k in objective.shown.items()
        )

    key = None if args.select == "last" else "eval/" + args.select.replace("acc_", "pairwise_acc_")
    best = None  # (step, metrics) of the checkpoint saved so far under --select
    with checkpoint.atomic_dir(args.out) as tmp:
        log = checkpoint.MetricsLog(tmp and os.path.join(tmp, "metrics.jsonl"))  # rank 0 writes

        def evaluate(step):
            nonlocal best
            with prec.autocast():
                metrics = heldout_metrics(
                    model, eval_samples, pad_id, device, args.eval_batch_size, args.gamma, args.lam
                )
            better = (
                key
                and step
                and (
                    best is None
                    or (metrics[key] > best[1][key] if SELECT[args.select] else metrics[key] < best[1][key])
                )
            )
            if better:  # the best so far by --select is what the folder holds
                best = (step, metrics)
                save_value_model(model, tok, tmp, meta)
            log.write(step, {**metrics, **({"eval/selected": float(bool(better))} if key else {})})
            tqdm.write(f"eval step {step} | {shown(metrics)}" + (" | best" if better else ""))
            return metrics

        evaluate(0)
        rng = random.Random(args.seed)
        step, bar = (
            0,
            tqdm(total=total, desc=objective.kind, leave=False, disable=None if distributed.is_main() else True),
        )
        while step < total:
            order = batch_order(len(train_samples), objective.pair_batches, rng)[:n_used]
            for i in range(0, len(order), args.batch_size):
                if step >= total:
                    break
                t_step = time.time()
                m, grad_norm = train_step(
                    trained,
                    [train_samples[j] for j in distributed.my_share(order[i : i + args.batch_size])],
                    objective,
                    opt,
                    prec,
                    pad_id,
                    device,
                    args.micro_batch_size,
                )
                lr = sched.get_last_lr()[0]  # the rate this step used; sched.step() sets the next one
                sched.step()
                step += 1
                bar.update(1)
                if step % args.log_every == 0 or step == total:
                    m.update(
                        {
                            "train/grad_norm": grad_norm.item(),
                            "train/lr": lr,
                            "train/epoch": step / steps_per_epoch,
                            "time/step": time.time() - t_step,
                            "time/elapsed": time.time() - t0,
                        }
                    )
                    log.write(step, m)
                    tqdm.write(
                        f"step {step}/{total} | "
                        + " | ".join(f"{k} {v:+.4f}" for k, v in list(m.items())[:3])
                        + f" | lr {m['train/lr']:.2e} | {m['time/elapsed']:.0f}s"
                    )
                if step % args.eval_every == 0 or step == total:
                    metrics = evaluate(step)
        bar.close()
        log.close()
        wall = time.time() - t0
        if best is None:  # --select last
            best = (step, metrics)
            save_value_model(model, tok, tmp, meta)
        summary = {
            **best[1],
            "train/selected_step": best[0],
            "train/steps": step,
            "last": metrics,
            "train/pairs": len(train_samples) // 2,
            "eval/pairs": len(eval_samples) // 2,
            "params": n_params,
            "params/trained": n_trained,
            "time/wall_seconds": wall,
            "device": str(device),
            "args": asdict(args),
        }
        if tmp is not None:
            with open(os.path.join(tmp, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
    chosen = "" if key is None else f" (step {best[0]} of {step}, best by {args.select})"
    print(f"saved {args.out}{chosen}: held-out {shown(best[1])} | {wall:.0f}s", flush=True)
    return summary


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
