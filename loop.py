"""The RL loop every online method shares (dvpo.py, ppo_baseline.py, grpo_baseline.py, remax_baseline.py):
their common flags, model loading, the step (sample -> score -> advantages -> PPO epochs), periodic held-out
evaluation, and atomic checkpoints that --resume continues exactly. What differs between the algorithms is
passed in as `algo` (see rl_train).
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
import distributed
import lora
import rollout
import runtime
import world
from rollout import (Probe, generate, in_chunks, kl_k1, kl_k3, masked_whiten, minibatches,
                     old_logprobs, ppo_update, response_logprobs)
from runtime import UsageError, arg

STATE_FILE = "trainer_state.pt"


@dataclass
class RLArgs:
    """Flags shared by the online methods, with the same meaning and defaults in each."""
    policy: str = arg(world.SFT_DIR, "initial policy: a local folder or hub name of a causal LM; the default is the world's SFT policy")
    ref: str = arg("", "reference policy for the KL penalty; empty: the initial policy")
    prompts: str = arg(world.PROMPTS_TRAIN, "RL prompts: 'prompt' (text or messages), 'messages', or preference rows (data.py); the default is the world's")
    eval_prompts: str = arg(world.PROMPTS_EVAL, "held-out prompts for the periodic gold evaluation; empty: none")
    split: str = arg("train", "split to read when a data or prompts path is a hub dataset or a DatasetDict folder")
    eval_split: str = arg("", "split of --eval-prompts (and of --eval-data); empty: --split")
    max_prompt_len: int = arg(256, "prompts longer than this many tokens (after the chat template) are dropped, with a count", ">= 0")
    strict: bool = arg(False, "stop at the first bad row instead of skipping bad rows with a report")
    out: str = arg("ckpt/rl", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")
    lam: float = arg(0.95, "GAE lambda", "[0, 1]")
    gamma: float = arg(1.0, "discount", "(0, 1]")
    kl_coef: float = arg(0.05, "beta of the per-token KL penalty r_t = -beta * (log pi - log pi_ref); initial value if adaptive", ">= 0")
    adaptive_kl: bool = arg(False, "adapt beta towards --target-kl (Ziegler et al.; the released code's choice)")
    target_kl: float = arg(6.0, "adaptive KL target, nats per sequence", "> 0")
    kl_horizon: int = arg(10000, "adaptive KL horizon, in samples", ">= 1")
    steps: int = arg(100, "RL steps (one batch of prompts each)", ">= 1")
    batch_size: int = arg(64, "prompts per step, one response each", ">= 1")
    minibatch_size: int = arg(16, "responses per PPO minibatch (one optimizer step); must divide --batch-size", ">= 1")
    micro_batch_size: int = arg(0, "responses per forward/backward; gradients accumulate over a minibatch (0: the whole minibatch)", ">= 0")
    forward_batch_size: int = arg(0, "responses per generate call and per no-grad forward (0: the whole batch)", ">= 0")
    logprob_chunk: int = arg(0, "token positions per fp32 log-softmax chunk, so [batch, length, vocab] fp32 logits never exist (0: off)", ">= 0")
    dtype: str = arg("fp32", "fp32 | bf16 | fp16: frozen models stored in it; trained ones keep fp32 weights under autocast")
    gradient_checkpointing: bool = arg(False, "recompute the trained models' activations in backward instead of storing them")
    lora_r: int = arg(0, "LoRA rank: the trained models train adapters on every linear layer, their base weights frozen in --dtype, and the reference is the policy with its adapters off (0: full fine-tuning)", ">= 0")
    lora_alpha: float = arg(16.0, "LoRA alpha: the adapters' update is scaled by alpha / r", "> 0")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input (0 keeps the first PPO ratio exactly 1)", "[0, 1)")
    lora_targets: str = arg("all-linear", "modules that get adapters: all-linear (every linear layer but the LM head) or comma-separated names, e.g. q_proj,v_proj")
    optim: str = arg("adamw", "adamw | adamw8bit: AdamW, or bitsandbytes' 8-bit AdamW (pip install bitsandbytes)")
    fsdp: bool = arg(False, "under torchrun: shard the trained models' parameters, gradients and AdamW state over the processes (FSDP2) instead of a full replica on each (DDP)")
    shard_frozen: bool = arg(False, "with --fsdp: shard the frozen models too (reference, GVM or reward model), gathered layer by layer in each forward")
    ppo_epochs: int = arg(4, "PPO epochs over each batch", ">= 1")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon", "> 0")
    lr: float = arg(3e-4, "AdamW learning rate of the policy (constant)", "> 0")
    max_grad_norm: float = arg(1.0, "gradient-norm clip", "> 0")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same (§5.3)", "> 0")
    max_new_tokens: int = arg(48, "sampling budget per response", ">= 1")
    missing_eos_penalty: float = arg(0.0, "subtracted from the last token's reward of a response without EOS (§5.2)", ">= 0")
    eval_every: int = arg(25, "steps between held-out gold evaluations (and one at the start and the end)", ">= 1")
    eval_n: int = arg(200, "held-out prompts per periodic evaluation", ">= 1")
    table_every: int = arg(50, "steps between printed tables of prompt, response, gold and the critic's score", ">= 1")
    gold: str = arg("auto", "vader | none | auto: score responses with the world's gold judge (VADER sentiment); auto: when --prompts lie in a world's data folder, as it means nothing on other data")
    save_every: int = arg(0, "steps between resumable checkpoints written atomically to --out (0: only the final policy)", ">= 0")
    resume: bool = arg(False, "continue the run checkpointed in --out (same flags; raise --steps to train longer)")
    seed: int = arg(0, "seed for python, numpy and torch", "[0, 4294967295]")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


def validate_rl(args):
    """Every flag of an online method's run checked before anything loads."""
    runtime.check_args(args)
    if args.batch_size % args.minibatch_size:
        raise UsageError(f"--minibatch-size {args.minibatch_size} does not divide --batch-size {args.batch_size}")
    for problem in (distributed.check_divides(args.batch_size, "--batch-size"),
                    distributed.check_divides(args.minibatch_size, "--minibatch-size")):
        if problem:
            raise UsageError(problem)
    share = args.minibatch_size // distributed.world()  # the responses of a minibatch each process computes on
    if args.micro_batch_size and share % args.micro_batch_size:
        raise UsageError(f"--micro-batch-size {args.micro_batch_size} does not divide --minibatch-size {args.minibatch_size}"
                         + (f" over {distributed.world()} processes ({share} each)" if distributed.world() > 1 else ""))
    problem = distributed.check_flags(args.fsdp, args.lora_r, args.optim, args.shard_frozen)
    if problem:
        raise UsageError(problem)
    if args.gold not in ("auto", "vader", "none"):
        raise UsageError(f"--gold {args.gold}: choose one of auto, vader, none")
    rollout.check_optimizer(args.optim)
    runtime.check_output_dir(args.out)
    if args.resume:
        check_resume(args)


# flags a resumed run may change: they set the length of the run, its logging, evaluation and memory use, not
# the update it computes (micro-batches and chunks compute the same update, up to float rounding)
RESUME_MAY_CHANGE = ("steps", "epochs", "resume", "save_every", "eval_every", "eval_n", "eval_prompts", "eval_split",
                     "table_every", "device", "micro_batch_size", "forward_batch_size", "logprob_chunk",
                     "gradient_checkpointing", "strict", "out")


def flag_text(name, value):
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value if value != '' else repr(value)}"


def check_resume(args):
    """--resume continues the run checkpointed in --out, so every flag that shapes its updates must be as that
    run had it (its summary.json); the others are RESUME_MAY_CHANGE."""
    runtime.restore_interrupted(args.out)
    if not os.path.isfile(os.path.join(args.out, STATE_FILE)):
        raise UsageError(f"--resume: {args.out} holds no resumable checkpoint (write one with --save-every)")
    path = os.path.join(args.out, "summary.json")
    try:
        with open(path) as f:
            before = json.load(f)["args"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--resume: {path} is unreadable ({type(e).__name__}); the checkpoint is damaged") from None
    changed = [k for k, v in asdict(args).items() if k not in RESUME_MAY_CHANGE and k in before and before[k] != v]
    if changed:
        raise UsageError(f"--resume: {args.out} was run with " + ", ".join(flag_text(k, before[k]) for k in changed)
                         + "; a resumed run may change only " + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE
                                                                         if k not in ("resume", "out")))


def load_state(args, name):
    """trainer_state.pt of the run in --out, onto the CPU (wherever it was written), checked to be a `name` run."""
    path = os.path.join(args.out, STATE_FILE)
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or empty: zipfile, pickle and EOF errors alike
        raise UsageError(f"--resume: {path} is damaged ({type(e).__name__}); resume from an earlier copy or start again") from None
    if st["algo"] != name:
        raise UsageError(f"--resume: {args.out} holds a {st['algo']} run, not a {name} one")
    return st


def load_rl_data(args):
    """The policy's tokenizer and the prompt sets encoded by it, [(prompt, ids)], read and checked before any
    model loads. Prompts that leave a response fewer of the model's positions than --max-new-tokens are
    dropped with a count."""
    if world.SFT_DIR in (args.policy, args.ref) or args.prompts == world.PROMPTS_TRAIN or \
            args.eval_prompts == world.PROMPTS_EVAL:
        world.ensure_world()
    tok = data.load_tokenizer(args.policy, "--policy")
    positions = data.position_limit(args.policy, "--policy")
    if positions and args.max_new_tokens >= positions:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: --policy {args.policy} has only {positions} positions")
    room = (positions, args.max_new_tokens)
    prompts = data.load_prompts(args.prompts, args.split, "--prompts", tok, args.max_prompt_len, args.strict, room)
    eval_prompts = data.load_prompts(args.eval_prompts, args.eval_split or args.split, "--eval-prompts", tok,
                                     args.max_prompt_len, args.strict, room)[:args.eval_n] if args.eval_prompts else []
    return tok, prompts, eval_prompts


def load_rl_models(args, tok, device, prec):
    """Policy (trained; from --out when resuming) and reference (frozen, in --dtype), both for tok. Full
    fine-tuning: the policy in fp32, the reference a second copy. --lora-r: one copy of the base weights in
    --dtype, the policy's adapters on it, and the reference is the policy with its adapters off."""
    if data.tokenizer_fingerprint(data.load_tokenizer(args.ref or args.policy, "--ref")) != data.tokenizer_fingerprint(tok):
        raise UsageError(f"--ref {args.ref}: its tokenizer differs from the policy's ({args.policy})")
    if args.lora_r:
        base = data.load_model(args.policy, tok, "--policy", dtype=prec.dtype)
        policy = (lora.load_lora(base, os.path.join(args.out, lora.ADAPTER_DIR)) if args.resume else
                  lora.add_lora(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets))
    else:
        policy = data.load_model(args.out if args.resume else args.policy, tok, "--policy")
    if args.lora_r and not args.ref:
        ref = lora.WithoutAdapters(policy)
    else:
        ref = data.load_model(args.ref or args.policy, tok, "--ref" if args.ref else "--policy", dtype=prec.dtype)
    ref.requires_grad_(False).eval()
    if args.gradient_checkpointing:
        data.enable_checkpointing(policy)
    return policy.to(device).train(), ref.to(device)


def kl_rewards(kl, mask, ended, beta, missing_eos_penalty=0.0):
    """Per-token rewards r_t = -beta * kl_t (§3), and -missing_eos_penalty on the last token of a response
    the length budget cut before its EOS (§5.2, TRL's missing_eos_penalty)."""
    return rollout.add_at_last_token(-beta * kl * mask, mask, -missing_eos_penalty * (~ended).float())


class AdaptiveKL:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + err * n / self.horizon


class PromptSampler:
    """Endless epoch-shuffled prompt indices, with a state to checkpoint and resume from."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order, self.pos = n, random.Random(seed), [], 0

    def take(self, k):
        out = []
        for _ in range(k):
            if self.pos == len(self.order):
                self.order, self.pos = list(range(self.n)), 0
                self.rng.shuffle(self.order)
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self):
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, s):
        self.rng.setstate(s["rng"])
        self.order, self.pos = s["order"], s["pos"]


def held_out_eval(policy, ref, tok, prompts, args, seed, use_gold):
    """KL, length, EOS rate and (with use_gold) gold reward on held-out prompts, sampled with a fixed seed
    that leaves training's RNG alone. Under torchrun each rank samples its share and all see the whole."""
    import evaluate
    states = runtime.rng_states()
    torch.manual_seed(seed + distributed.rank())
    part, n_real = distributed.padded_share(prompts)
    mine = evaluate.score_policy(policy, ref, tok, part, args.forward_batch_size or 250, args.max_new_tokens,
                                 args.temperature)
    s = {k: distributed.gather_shares(mine[k], n_real) for k in ("gold", "kl", "ended", "length")}
    runtime.set_rng_states(states)
    gold, ci = evaluate.mean_ci(s["gold"])
    return {**({"eval/gold": gold, "eval/gold_ci95": ci} if use_gold else {}), "eval/kl": sum(s["kl"]) / len(s["kl"]),
            "eval/eos_rate": sum(s["ended"]) / len(s["ended"]), "eval/length": sum(s["length"]) / len(s["length"])}


def gold_text(m, key, ci_key=None):
    """The gold score (with its interval) as printed text; empty when the run has no gold judge."""
    if key not in m:
        return ""
    return f"{m[key]:+.3f}" + (f" ± {m[ci_key]:.3f}" if ci_key else "")


def eval_text(ev):
    """A held-out evaluation (held_out_eval) as the printed line's text."""
    gold = gold_text(ev, "eval/gold", "eval/gold_ci95")
    return ((f"held-out gold {gold} | " if gold else "") +
            f"kl {ev['eval/kl']:.2f} | eos {ev['eval/eos_rate']:.2f} | length {ev['eval/length']:.1f}")


def save_run(args, summary, policy, tok, records, state):
    """Write --out atomically: the policy (save_pretrained), metrics.jsonl, summary.json and, with a state,
    trainer_state.pt for --resume. An interrupted save leaves the last good one (runtime.atomic_dir). Under
    torchrun every rank calls it (a sharded policy is gathered) and rank 0 writes."""
    weights = distributed.full_state_dict(policy)
    with runtime.atomic_dir(args.out) as tmp:
        if tmp is None:
            return
        data.save_pretrained(policy, tok, tmp, weights)
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(tmp, STATE_FILE))


def rl_train(args, algo, policy, ref, tok, prompts, eval_prompts, device, prec):
    """The loop the online methods share: sample prompts -> generate -> old and reference log-probs -> KL-penalty
    rewards -> algo.advantages -> PPO epochs (the policy's clipped step, then algo.minibatch_step if any) ->
    log -> periodic held-out gold evaluation -> checkpoint. `algo` holds what differs between the methods:
    its critic, `advantages(r, rewards) -> [B, R]`, `score` (the critic's V(s_T) or RM score, [B]), `name`,
    `describe` (for the first printed line), `score_name`, `models` and `optimizers` (for the memory tally),
    and optionally `minibatch_step`, `state_dict` and `load_state_dict` (a trained critic);
    `samples_per_prompt` (a group of responses per prompt; minibatches then hold as many groups' worth),
    `kl_in_loss` (beta * k3 to the reference in the loss instead of the per-token reward), `whiten` (False:
    the advantages are used as computed), `loss_aggregation` (rollout.loss_weights) and
    `after_generate(policy, tok, r)` (more generation, timed with the generate phase). Under torchrun each rank
    samples its share of every batch's prompts and trains on its share of every minibatch; the policy trains
    as distributed.wrap makes it (DDP or FSDP2), and every logged number is the global batch's."""
    G, kl_in_loss = getattr(algo, "samples_per_prompt", 1), getattr(algo, "kl_in_loss", False)
    trained = distributed.wrap(policy, args.fsdp)  # before the optimizer: FSDP2 replaces the parameters
    if args.shard_frozen:
        for m in {id(m): m for m in (ref, *algo.models)}.values():
            if not any(p.requires_grad for p in m.parameters()) and not distributed.is_sharded(m):
                distributed.wrap(m, fsdp=True)
    opt = rollout.make_optimizer(policy.parameters(), args.lr, args.optim, eps=1e-5)
    params = {id(p): p for m in (policy, ref, *algo.models) for p in m.parameters()}  # a shared base counted once
    frozen = {i for i, p in params.items() if not p.requires_grad}
    assert not frozen & {id(p) for o in (opt, *algo.optimizers) for g in o.param_groups for p in g["params"]}
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    probe = Probe(device, models=(policy, ref, *algo.models), optimizers=(opt, *algo.optimizers))
    sampler = PromptSampler(len(prompts), args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    records, ev, start, elapsed = [], {}, 0, 0.0
    use_gold = args.gold == "vader" or args.gold == "auto" and world.is_world_data(args.prompts)
    if distributed.world() > 1:  # the same weights everywhere so far; from here each rank samples its own responses
        runtime.seed_everything(args.seed + distributed.rank())
    if args.resume:
        st = load_state(args, algo.name)
        if st["step"] >= args.steps:
            raise UsageError(f"--resume: {args.out} has done {st['step']} steps already; raise --steps above that")
        if st.get("world_size", 1) != distributed.world():
            raise UsageError(f"--resume: {args.out} was trained by {st.get('world_size', 1)} process(es), not "
                             f"{distributed.world()}; resume it with as many (torchrun --nproc-per-node)")
        distributed.load_optimizer_state(trained, opt, st["optimizer"])
        prec.scaler.load_state_dict(st["scaler"])
        kl_ctl.beta = st["kl_coef"]
        sampler.load_state_dict(st["sampler"])
        gen.set_state(st["generator"])
        if st.get("algo_state") is not None:
            algo.load_state_dict(st["algo_state"])
        runtime.set_rng_states(st["rng"][distributed.rank()] if st.get("world_size", 1) > 1 else st["rng"])
        records, ev, start, elapsed = st["records"], st["eval"], st["step"], st["elapsed"]

    def checkpoint(step, with_state):
        summary = {**ev, "train/steps": step, "time/wall_seconds": time.time() - t0,
                   "params/trained": sum(p.numel() for p in params.values() if p.requires_grad),
                   "params/frozen": sum(p.numel() for p in params.values() if not p.requires_grad),
                   "device": str(device), "processes": distributed.world(), "args": asdict(args)}
        state = None if not with_state else {
            "algo": algo.name, "step": step, "optimizer": distributed.optimizer_state(trained, opt),
            "scaler": prec.scaler.state_dict(), "kl_coef": kl_ctl.beta, "sampler": sampler.state_dict(),
            "generator": gen.get_state(), "algo_state": algo.state_dict() if hasattr(algo, "state_dict") else None,
            "rng": runtime.rng_states() if distributed.world() == 1 else distributed.gather_objects(runtime.rng_states()),
            "world_size": distributed.world(), "records": records, "eval": ev, "elapsed": time.time() - t0}
        save_run(args, summary, policy, tok, records, state)
        return summary

    print(f"{algo.name}: {algo.describe}, lam={args.lam} beta={args.kl_coef}{' (adaptive)' if args.adaptive_kl else ''}, "
          f"{args.steps} steps of {args.batch_size} prompts on {device} ({args.dtype}), {len(prompts)} prompts"
          + (f", resumed at step {start}" if start else ""), flush=True)
    t0 = time.time() - elapsed
    for step in tqdm(range(start, args.steps + 1), desc=algo.name, leave=False, disable=None if distributed.is_main() else True):
        done_here = any(rec["step"] == step and "eval/kl" in rec for rec in records)
        if eval_prompts and (step % args.eval_every == 0 or step == args.steps) and not done_here:
            with prec.autocast():
                ev = held_out_eval(policy, ref, tok, eval_prompts, args, args.seed + 10_000, use_gold)
            records.append({"step": step, **ev, "time/elapsed": time.time() - t0})
            tqdm.write(f"eval step {step} | " + eval_text(ev))
        if step == args.steps:
            break
        batch = [prompts[i] for i in distributed.my_share(sampler.take(args.batch_size)) for _ in range(G)]
        with probe.phase("generate"), prec.autocast():
            r = generate(policy, tok, [p for p, _ in batch], args.max_new_tokens, args.temperature,
                         ids=[ids for _, ids in batch], chunk=args.forward_batch_size)
            if hasattr(algo, "after_generate"):
                algo.after_generate(policy, tok, r)
        with probe.phase("score"):
            plans = minibatches(args.batch_size * G, args.minibatch_size * G, args.ppo_epochs, gen, distributed.world(),
                                distributed.rank())
            old_logp = old_logprobs(policy, r, plans[0], args, prec)
            with prec.autocast():
                ref_logp = in_chunks(lambda x: response_logprobs(ref, x, args.temperature, chunk=args.logprob_chunk),
                                     r, args.forward_batch_size)
            kl = kl_k1(old_logp, ref_logp) * r.response_mask
            rewards = kl_rewards(kl, r.response_mask, r.ended, 0.0 if kl_in_loss else kl_ctl.beta, args.missing_eos_penalty)
            T = r.response_mask.sum(1).long()
            with prec.autocast():
                adv = algo.advantages(r, rewards)
                adv = masked_whiten(adv, r.response_mask) if getattr(algo, "whiten", True) else adv
        with probe.phase("update"):
            stats = ppo_update(trained, opt, prec, r, old_logp, adv, plans, args, getattr(algo, "minibatch_step", None),
                               ref_logp if kl_in_loss else None, kl_ctl.beta, getattr(algo, "loss_aggregation", "token"))
        for o in (opt, *algo.optimizers):  # gradients are not held through the next generation
            o.zero_grad(set_to_none=True)
        gold = world.gold_scores(r.texts) if use_gold else None
        m = distributed.mean_over_ranks({  # each rank's share is equal, so the mean of means is the batch's
            "objective/kl": kl.sum(1).mean().item(), **({"objective/gold": sum(gold) / len(gold)} if use_gold else {}),
            f"objective/{algo.score_name}": algo.score.mean().item(),
            "objective/kl_k3": (kl_k3(old_logp, ref_logp) * r.response_mask).sum(1).mean().item(),
            "objective/length": T.float().mean().item(), "objective/eos_rate": r.ended.float().mean().item()})
        probed = probe.pop()  # memory and time of the rank that needed most
        m = {**m, "objective/kl_coef": kl_ctl.beta, **stats, **distributed.mean_over_ranks(probed, maxima=probed),
             "time/elapsed": time.time() - t0}
        seq_kl = m["objective/kl"]
        records.append({"step": step + 1, **m})
        if args.adaptive_kl:
            kl_ctl.update(seq_kl, args.batch_size * G)
        tqdm.write(f"step {step + 1}/{args.steps} | " + (f"gold {gold_text(m, 'objective/gold')} | " if use_gold else "") +
                   f"kl {seq_kl:.2f} | "
                   f"{algo.score_name} {m[f'objective/{algo.score_name}']:+.3f} | clipfrac {m['policy/clipfrac']:.3f} | "
                   f"ent {m['policy/entropy']:.2f} | gen {m['time/generate']:.2f}s score {m['time/score']:.2f}s "
                   f"update {m['time/update']:.2f}s")
        if (step + 1) % args.table_every == 0:
            tqdm.write(f"| prompt | response | gold | {algo.score_name} |\n| --- | --- | --- | --- |")
            for i in range(min(4, len(r.texts))):
                tqdm.write(f"| {data.show(r.prompts[i])} | {r.texts[i]} | {f'{gold[i]:+.3f}' if use_gold else '-'} "
                           f"| {algo.score[i].item():+.3f} |")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1, with_state=True)
            tqdm.write(f"checkpoint step {step + 1} -> {args.out}")
    summary = checkpoint(args.steps, with_state=args.save_every > 0)
    gold = gold_text(ev, "eval/gold", "eval/gold_ci95")
    print(f"saved {args.out}" + (": " + (f"held-out gold {gold}, " if gold else "") + f"KL {ev['eval/kl']:.2f}" if ev else "")
          + f", {summary['time/wall_seconds']:.0f}s", flush=True)
    return summary
