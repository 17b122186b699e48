"""Stage 2 of DVPO: policy-only PPO with the frozen global value model as critic (docs/DVPO.md §3).

Per step: sample prompts -> one response each -> log-probs under the policy (old) and the reference -> per-token
KL-penalty rewards -> frozen-GVM values -> advantages (--advantage) -> --ppo-epochs of clipped policy updates.
No reward model, no critic training: three models in memory, one of them trained.

    python dvpo.py --gvm ckpt/gvm
    python dvpo.py --gvm ckpt/gvm --advantage released    # the authors' code: each sequence's values whitened alone
"""

import os
import time
from dataclasses import asdict, dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch
from tqdm import tqdm

import evaluate
import gvm
import rollout
from infra import checkpoint, cli, data, distributed, memory, models, precision, report, world
from infra.cli import UsageError, arg
from infra.flags import RLFlags, check_rl_flags

ADVANTAGES = ("released", "delta", "static")


@dataclass
class Args(RLFlags):
    gvm: str = arg("ckpt/gvm", "the global value model from gvm.py (frozen here)")
    advantage: str = arg("delta", "released | delta | static: how GVM values become advantages (docs/DVPO.md §3)")
    lam: float = arg(0.95, "GAE lambda", "[0, 1]")
    gamma: float = arg(1.0, "discount", "(0, 1]")
    kl_coef: float = arg(
        0.05,
        "beta of the per-token KL penalty r_t = -beta * (log pi - log pi_ref); initial value if adaptive",
        "[0, 1e6]",
    )
    adaptive_kl: bool = arg(False, "adapt beta towards --target-kl (Ziegler et al.; the released code's choice)")
    target_kl: float = arg(6.0, "adaptive KL target, nats per sequence", "> 0")
    kl_horizon: int = arg(10000, "adaptive KL horizon, in samples", ">= 1")
    steps: int = arg(100, "RL steps (one batch of prompts each)", ">= 1")
    batch_size: int = arg(64, "prompts per step, one response each", ">= 1")
    minibatch_size: int = arg(16, "responses per PPO minibatch (one optimizer step); must divide --batch-size", ">= 1")
    ppo_epochs: int = arg(4, "PPO epochs over each batch", ">= 1")
    cliprange: float = arg(0.2, "PPO ratio clip epsilon", "> 0")
    lr: float = arg(3e-4, "AdamW learning rate of the policy (constant)", "> 0")
    max_grad_norm: float = arg(1.0, "gradient-norm clip", "> 0")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same (§5.3)", "> 0")
    max_new_tokens: int = arg(48, "sampling budget per response", ">= 1")
    missing_eos_penalty: float = arg(
        0.0, "subtracted from the last token's reward of a response without EOS (§5.2)", ">= 0"
    )
    out: str = arg("ckpt/dvpo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- the algorithm
class AdaptiveKL:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + err * n / self.horizon


def kl_rewards(kl, mask, ended, beta, missing_eos_penalty=0.0):
    """Per-token rewards r_t = -beta * kl_t (§3), and -missing_eos_penalty on the last token of a response
    the length budget cut before its EOS (§5.2, TRL's missing_eos_penalty)."""
    return rollout.add_at_last_token(-beta * kl * mask, mask, -missing_eos_penalty * (~ended).float())


def whiten_each_sequence(values, attention_mask):
    """The released code's value whitening: its batched_forward_pass applies trl.core.whiten (mean, unbiased
    variance, rsqrt(var + 1e-8), no mask) per forward minibatch, and its launch uses minibatches of one, so
    each sequence is whitened over its own unpadded tokens, prompt and response (docs/DVPO.md §3)."""
    m = attention_mask.to(values.dtype)
    n = m.sum(1, keepdim=True)
    mean = (values * m).sum(1, keepdim=True) / n
    var = ((values - mean) ** 2 * m).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * m


def compute_advantages(variant, values, smask, rewards, gamma, lam):
    """Advantages before the final whitening (§3). values: V(s_0..s_R) [B, R+1], zero past s_T; smask: 1 on
    s_0..s_T; rewards: per-token rewards [B, R] (the KL penalty), zero past the response."""
    amask = smask[:, 1:]  # action t, from s_t to s_{t+1}, exists for t < T
    T = amask.sum(1).long()
    values = values * smask
    if variant == "released":
        # V(s_T) := 0 and no terminal score: with gamma = 1 the value terms telescope at lam = 1
        adv, _ = rollout.gae(rewards, values[:, :-1], amask, gamma, lam)
    elif variant == "delta":
        # the value of the complete response as terminal reward, GVM as baseline: potential-based shaping
        terminal = values.gather(1, T[:, None]).squeeze(1)
        adv, _ = rollout.gae(rollout.add_at_last_token(rewards, amask, terminal), values[:, :-1], amask, gamma, lam)
    elif variant == "static":
        # the v2 paper's static advantage Q(s_t, y_t) = V(s_{t+1}), plus the token's own KL reward
        adv = (values[:, 1:] + rewards) * amask
    else:
        raise UsageError(f"--advantage {variant}: choose one of {', '.join(ADVANTAGES)}")
    return adv * amask


@torch.no_grad()
def gvm_advantages(value_model, r, rewards, args):
    """A rollout's advantages before whitening, and V(s_T) of each response: the frozen GVM's values
    V(s_0 .. s_R), read at positions P-1 .. P-1+R (§2), through compute_advantages; for --advantage released
    each sequence's values whitened first, as the authors' code does (§3)."""
    full = rollout.in_chunks(lambda x: value_model(x.input_ids, x.attention_mask), r, args.forward_batch_size)
    values = full[:, r.prompt_len - 1 :]
    score = rollout.final_value(values, r.response_mask)
    if args.advantage == "released":
        values = whiten_each_sequence(full, r.attention_mask)[:, r.prompt_len - 1 :]
    return compute_advantages(args.advantage, values, rollout.state_mask(r), rewards, args.gamma, args.lam), score


def clipped_policy_loss(new_logp, old_logp, adv, mask, cliprange, n=None):
    """The clipped surrogate: sum over response tokens of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) / n,
    rho = pi / pi_old. n defaults to the token count (the mean); a micro-batch passes its minibatch's count."""
    n = mask.sum().clamp(min=1) if n is None else n
    ratio = torch.exp(new_logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    with torch.no_grad():  # statistics keep no graph (and save no tensors the memory probe would count)
        stats = {
            "policy/clipfrac": (((ratio - 1).abs() > cliprange).float() * mask).sum() / n,
            "policy/approxkl": (0.5 * (new_logp - old_logp) ** 2 * mask).sum() / n,
            "val/ratio": (ratio * mask).sum() / n,
            "val/ratio_max_dev": ((ratio - 1).abs() * mask).max(),
        }
    return (loss * mask).sum() / n, stats


def ppo_epochs(policy, opt, prec, r, old_logp, adv, plans, args):
    """--ppo-epochs over the batch (plans: minibatch indices per epoch): one clipped policy step per minibatch,
    its gradient accumulated over micro-batches of --micro-batch-size responses, each micro-batch's token sum
    divided by the whole minibatch's token count n, so the step is the whole minibatch's. Under torchrun n is
    the global minibatch's count over the ranks, so DDP's average of the ranks' gradients is the global one.
    Returns the mean of each statistic over the minibatches, the largest |ratio - 1| of the first (§5.4: 0)."""
    stats = []
    for epoch in plans:
        for idx in epoch:
            mb = r.index(idx)
            n = distributed.all_reduce(mb.response_mask.sum()).clamp(min=1) / distributed.world()
            opt.zero_grad(set_to_none=True)
            total = {}
            for micro in rollout.micro_batches(len(idx), args.micro_batch_size):
                x, rows = mb.index(micro), idx[micro]
                with prec.autocast():
                    new_logp, entropy = rollout.response_logprobs(
                        policy, x, args.temperature, with_entropy=True, chunk=args.logprob_chunk
                    )
                    loss, s = clipped_policy_loss(
                        new_logp, old_logp[rows], adv[rows], x.response_mask, args.cliprange, n
                    )
                    s = {**s, "loss/policy": loss, "policy/entropy": (entropy.detach() * x.response_mask).sum() / n}
                prec.backward(loss)
                rollout.accumulate(total, s)
            grad_norm = prec.step(opt, args.max_grad_norm)
            stats.append(
                {
                    **{k: float(v) for k, v in total.items()},
                    "policy/grad_norm": float(grad_norm),
                    **prec.loss_scale("policy"),
                }
            )
    for s, top in zip(stats, distributed.max_over_ranks([s["val/ratio_max_dev"] for s in stats])):
        s["val/ratio_max_dev"] = top  # each minibatch's largest |ratio - 1| over all ranks' rows
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["val/ratio_first_max_dev"] = stats[0]["val/ratio_max_dev"]
    return distributed.mean_over_ranks(out, maxima=("val/ratio_max_dev", "val/ratio_first_max_dev"))


def load_gvm(args, tok, device, dtype, policy):
    """The GVM in --dtype, checked to share the policy's tokenizer and chat template, frozen for real (§3). Under
    --lora-r, a GVM that gvm.py --lora-r trained on the policy's base weights is a frozen adapter on the policy's
    own base (one copy of the base for policy, reference and GVM, §7); any other GVM is a second copy."""
    if not os.path.isdir(args.gvm):
        what = "a file, not a folder" if os.path.isfile(args.gvm) else "no such folder"
        raise UsageError(f"--gvm {args.gvm}: {what} (train one: python gvm.py --out FOLDER)")
    gvm.check_tokenizer(gvm.read_meta(args.gvm), tok, f"--gvm {args.gvm}", args.policy, "python gvm.py --model")
    return gvm.frozen_value_model(args.gvm, args, policy, device, dtype)


# ---------------------------------------------------------------------------------------------- the loop
def train(args: Args):
    if args.advantage not in ADVANTAGES:
        raise UsageError(f"--advantage {args.advantage}: choose one of {', '.join(ADVANTAGES)}")
    check_rl_flags(args, "dvpo")
    device = cli.pick_device(args.device)  # under torchrun: joins the process group, this rank's device
    prec = precision.Precision(args.dtype, device)
    cli.seed_everything(args.seed)
    tok, prompts, eval_prompts = data.load_rl_prompts(args)
    policy, ref = models.load_policy_and_reference(args, tok, device, prec)
    value_model = load_gvm(args, tok, device, prec.dtype, policy)  # the critic: frozen, in no optimizer (§3)
    trained = distributed.wrap(policy, args.fsdp)  # DDP or FSDP2 under torchrun; before the optimizer
    if args.shard_frozen:
        distributed.shard_frozen(ref, value_model)
    opt = precision.make_optimizer(policy.parameters(), args.lr, args.optim, eps=1e-5)
    assert not any(p.requires_grad for p in value_model.parameters())
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    probe = memory.Probe(device, models=(policy, ref, value_model), optimizers=(opt,))
    sampler = data.PromptSampler(len(prompts), args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # draws the minibatches
    use_gold = args.gold == "vader" or args.gold == "auto" and world.is_world_data(args.prompts)
    if distributed.world() > 1:  # the same weights everywhere so far; from here each rank samples its own responses
        cli.seed_everything(args.seed + distributed.rank())
    records, ev, start, elapsed = [], {}, 0, 0.0
    if args.resume:  # continue exactly: every state the next step reads, restored
        st = checkpoint.resume_state(args, "dvpo", args.steps)
        distributed.load_optimizer_state(trained, opt, st["optimizer"])
        prec.scaler.load_state_dict(st["scaler"])
        kl_ctl.beta = st["kl_coef"]
        sampler.load_state_dict(st["sampler"])
        gen.set_state(st["generator"])
        records, ev, start, elapsed = st["records"], st["eval"], st["step"], st["elapsed"]

    def save(step, resumable):  # --out, atomically: the policy, metrics.jsonl, summary.json (and what --resume reads)
        summary = {**ev, "train/steps": step, "time/wall_seconds": time.time() - t0, "device": str(device)}
        summary.update(
            memory.parameter_counts(policy, ref, value_model), processes=distributed.world(), args=asdict(args)
        )
        state = None
        if resumable:  # every state the next step reads, on every rank
            resume = {"optimizer": distributed.optimizer_state(trained, opt), "scaler": prec.scaler.state_dict()}
            resume.update(kl_coef=kl_ctl.beta, sampler=sampler.state_dict(), generator=gen.get_state())
            state = checkpoint.trainer_state("dvpo", step, records, ev, time.time() - t0, **resume)
        checkpoint.save_run(args.out, summary, policy, tok, records, state)
        return summary

    print(
        f"dvpo: frozen GVM, advantage={args.advantage}, lam={args.lam} beta={args.kl_coef}"
        f"{' (adaptive)' if args.adaptive_kl else ''}, {args.steps} steps of {args.batch_size} prompts on {device} "
        f"({args.dtype}), {len(prompts)} prompts" + (f", resumed at step {start}" if start else ""),
        flush=True,
    )
    t0 = time.time() - elapsed
    for step in tqdm(range(start, args.steps + 1), desc="dvpo", leave=False, disable=not distributed.is_main() or None):
        if eval_prompts and (step % args.eval_every == 0 or step == args.steps) and not evaluate.done(records, step):
            with prec.autocast():
                ev = evaluate.held_out(policy, ref, tok, eval_prompts, args, use_gold)
            records.append({"step": step, **ev, "time/elapsed": time.time() - t0})
            tqdm.write(f"eval step {step} | " + report.eval_text(ev))
        if args.save_every and step % args.save_every == 0 and start < step < args.steps:  # with its evaluation
            save(step, resumable=True)
            tqdm.write(f"checkpoint step {step} -> {args.out}")
        if step == args.steps:
            break

        # 1. sample: this rank's share of the batch's prompts, one response each from the policy itself (§3)
        batch = [prompts[i] for i in distributed.my_share(sampler.take(args.batch_size))]
        with probe.phase("generate"), prec.autocast():
            texts, ids = zip(*batch)
            r = rollout.generate(
                policy, tok, texts, args.max_new_tokens, args.temperature, ids=ids, chunk=args.forward_batch_size
            )
        with probe.phase("score"), torch.no_grad():
            # 2. old and reference log-probs; the old ones on exactly the first epoch's micro-batches, so the
            # first minibatch's ratio is exactly 1 (§5.4)
            plans = rollout.minibatches(
                args.batch_size, args.minibatch_size, args.ppo_epochs, gen, distributed.world(), distributed.rank()
            )
            old_logp = torch.zeros_like(r.response_mask)
            for idx in plans[0]:
                for micro in idx.split(args.micro_batch_size or len(idx)):
                    with prec.autocast():
                        old_logp[micro] = rollout.response_logprobs(
                            policy, r.index(micro), args.temperature, chunk=args.logprob_chunk
                        )
            with prec.autocast():
                ref_logp = rollout.in_chunks(
                    lambda x: rollout.response_logprobs(ref, x, args.temperature, chunk=args.logprob_chunk),
                    r,
                    args.forward_batch_size,
                )
            # 3. per-token KL-penalty rewards r_t = -beta * (log pi - log pi_ref) (§3)
            kl = rollout.kl_k1(old_logp, ref_logp) * r.response_mask
            rewards = kl_rewards(kl, r.response_mask, r.ended, kl_ctl.beta, args.missing_eos_penalty)
            with prec.autocast():
                # 4. the frozen GVM's values V(s_0 .. s_R); V(s_T), the complete response's value, is logged;
                # 5. the advantages (gvm_advantages, above), whitened over the global batch (moments over all ranks)
                adv, score = gvm_advantages(value_model, r, rewards, args)
                adv = rollout.masked_whiten(adv, r.response_mask, total=distributed.all_reduce)
        # 6. PPO epochs of the clipped objective, micro-batches accumulated into each minibatch's step
        with probe.phase("update"):
            stats = ppo_epochs(trained, opt, prec, r, old_logp, adv, plans, args)
        opt.zero_grad(set_to_none=True)  # gradients are not held through the next generation

        # 7. log (every number the global batch's), evaluate (above), checkpoint
        gold = world.gold_scores(r.texts) if use_gold else None
        m = distributed.mean_over_ranks(
            {  # each rank's share is equal, so the mean of means is the batch's
                "objective/kl": kl.sum(1).mean().item(),
                **({"objective/gold": sum(gold) / len(gold)} if use_gold else {}),
                "objective/gvm_value": score.mean().item(),
                "objective/kl_k3": (rollout.kl_k3(old_logp, ref_logp) * r.response_mask).sum(1).mean().item(),
                "objective/length": r.response_mask.sum(1).mean().item(),
                "objective/eos_rate": r.ended.float().mean().item(),
            }
        )
        probed = probe.pop()  # memory and time of the rank that needed most
        m = {
            **m,
            "objective/kl_coef": kl_ctl.beta,
            **stats,
            **distributed.mean_over_ranks(probed, maxima=probed),
            "time/elapsed": time.time() - t0,
        }
        report.check_finite(step + 1, m)
        records.append({"step": step + 1, **m})
        if args.adaptive_kl:
            kl_ctl.update(m["objective/kl"], args.batch_size)
        tqdm.write(report.step_text(step + 1, args.steps, m, "gvm_value", use_gold))
        if (step + 1) % args.table_every == 0:
            tqdm.write(report.sample_table(r, gold, score, "gvm_value"))
    summary = save(args.steps, resumable=args.save_every > 0)
    print(report.saved_text(args.out, ev, summary), flush=True)
    return summary


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
