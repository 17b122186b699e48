"""The PPO baseline (docs/DVPO.md §4): a Bradley–Terry reward model trained on the same preference pairs as the
GVM (stage A, reward.py), then PPO whose critic starts as a copy of the reward model and keeps learning.

Per step: sample prompts -> one response each -> log-probs under the policy (old) and the reference -> per-token
KL-penalty rewards -> reward-model score and critic values -> GAE advantages -> --ppo-epochs of clipped policy
updates, each followed by a clipped value update of the critic. Four models in memory, two of them trained.
The skeleton is dvpo.py's: `diff dvpo.py ppo_baseline.py` shows the algorithmic difference.

    python ppo_baseline.py                    # stage A into ckpt/rm, then PPO into ckpt/ppo
    python ppo_baseline.py --rm ckpt/rm       # reuse a reward model
"""

import copy
import time
from dataclasses import asdict, dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch
from tqdm import tqdm

import evaluate
import gvm
import reward
import rollout
from infra import checkpoint, cli, data, distributed, lora, memory, models, precision, report, world
from infra.cli import arg
from infra.flags import RLFlags, check_rl_flags


@dataclass
class Args(reward.RewardFlags, RLFlags):
    critic_lr: float = arg(3e-4, "AdamW learning rate of the critic, which has its own optimizer", "> 0")
    vf_coef: float = arg(0.1, "coefficient of the critic's clipped value loss", "> 0")
    cliprange_value: float = arg(0.2, "clip epsilon of the critic's value change", "> 0")
    freeze_critic: bool = arg(
        False, "keep the critic at the reward model's weights, untrained (the reward model serves as both)"
    )
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
    out: str = arg("ckpt/ppo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


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


def clipped_value_loss(vpred, old_values, returns, mask, cliprange_value, n=None):
    """The critic's loss: 1/2 * sum over response tokens of max((V - R)^2, (V_clip - R)^2) / n, with
    V_clip = V_old + clip(V - V_old, -eps, eps); n defaults to the token count (the mean)."""
    n = mask.sum().clamp(min=1) if n is None else n
    vclipped = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    loss = 0.5 * (torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2) * mask).sum() / n
    with torch.no_grad():
        clipfrac = (((vclipped - returns) ** 2 > (vpred - returns) ** 2).float() * mask).sum() / n
    return loss, clipfrac


@torch.no_grad()
def critic_advantages(reward_model, critic, r, rewards, args):
    """A rollout's GAE advantages and returns (§4): the reward model's score of each response at its last token
    added to the last token's reward, the critic's V(s_0 .. s_{R-1}) as the baseline. (advantages, returns,
    values, score)"""
    score = reward.reward_scores(reward_model, r, args.forward_batch_size)
    values = rollout.response_state_values(critic, r, args.forward_batch_size)[:, :-1] * r.response_mask
    adv, returns = rollout.gae(
        rollout.add_at_last_token(rewards, r.response_mask, score), values, r.response_mask, args.gamma, args.lam
    )
    return adv, returns, values, score


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


def ppo_epochs(policy, opt, prec, critic, critic_opt, critic_prec, r, old_logp, adv, old_values, returns, plans, args):
    """--ppo-epochs over the batch (plans: minibatch indices per epoch): per minibatch one clipped policy step,
    then (unless the critic is frozen: critic_opt None) one clipped value step of the critic, each accumulated
    over micro-batches of --micro-batch-size responses, each micro-batch's token sum divided by the whole
    minibatch's token count n, so each step is the whole minibatch's. Under torchrun n is the global
    minibatch's count over the ranks, so DDP's average of the ranks' gradients is the global one.
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
            if critic_opt is None:
                continue
            # the critic's clipped value step on the same minibatch: V(s_0 .. s_{R-1}) regressed on the GAE returns
            critic_opt.zero_grad(set_to_none=True)
            total = {}
            for micro in rollout.micro_batches(len(idx), args.micro_batch_size):
                x, rows = mb.index(micro), idx[micro]
                # on a shared base the critic's adapter stays active through its backward (gradient checkpointing
                # recomputes the forward there)
                with lora.adapter_active(critic):
                    with critic_prec.autocast():
                        vpred = critic(x.input_ids, x.attention_mask)[:, x.prompt_len - 1 : -1]
                        loss, clipfrac = clipped_value_loss(
                            vpred, old_values[rows], returns[rows], x.response_mask, args.cliprange_value, n
                        )
                        s = {
                            "loss/value": loss,
                            "val/clipfrac": clipfrac,
                            "val/vpred": (vpred.detach() * x.response_mask).sum() / n,
                        }
                    critic_prec.backward(args.vf_coef * loss)
                rollout.accumulate(total, s)
            critic_prec.step(critic_opt, args.max_grad_norm)
            stats[-1].update({**{k: float(v) for k, v in total.items()}, **critic_prec.loss_scale("val")})
    for s, top in zip(stats, distributed.max_over_ranks([s["val/ratio_max_dev"] for s in stats])):
        s["val/ratio_max_dev"] = top  # each minibatch's largest |ratio - 1| over all ranks' rows
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["val/ratio_first_max_dev"] = stats[0]["val/ratio_max_dev"]
    return distributed.mean_over_ranks(out, maxima=("val/ratio_max_dev", "val/ratio_first_max_dev"))


def load_reward_model_and_critic(path, args, tok, device, prec, policy):
    """(frozen reward model, critic initialised from it). Full fine-tuning: two copies, the reward model in
    --dtype and the critic in fp32, trained. --lora-r: one copy of the reward model's backbone in --dtype with
    the critic's adapters on it and a trained fp32 copy of the head; the reward model is that backbone with
    its adapters off and the original head. --lora-r with a reward model that gvm.py --lora-r trained on the
    policy's base (reward.load_reward_model): both are adapters on the policy's own base, the critic's a trained
    copy of the reward model's, so one copy of the base serves all four models. --freeze-critic: the reward
    model is the critic."""
    one_base = args.freeze_critic or distributed.world() == 1
    if args.lora_r and args.share_base and not one_base:
        print("ppo: under torchrun the critic trains in its own DDP, so it and the reward model keep a second base")
    rm = reward.load_reward_model(path, args, tok, device, prec.dtype, policy if one_base else None)
    if args.freeze_critic:
        return rm, rm
    if isinstance(rm.backbone, lora.Adapter):
        return rm, gvm.shared_value_model(path, policy, "critic", "reward-model", "--rm", trainable=True)[0].to(device)
    if not args.lora_r:
        critic = reward.load_reward_model(path, args, tok, device, torch.float32).requires_grad_(True)
    else:
        backbone = lora.add_lora(rm.backbone, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
        critic = gvm.ValueModel(backbone, head=copy.deepcopy(rm.head).float().requires_grad_(True))
        rm = gvm.ValueModel(lora.WithoutAdapters(backbone), head=rm.head)
    if args.gradient_checkpointing:
        models.enable_checkpointing(critic.backbone)
    return rm, critic


# ---------------------------------------------------------------------------------------------- the loop
def train(args: Args):
    check_rl_flags(args, "ppo")
    reward.check_output(args)
    device = cli.pick_device(args.device)  # under torchrun: joins the process group, this rank's device
    prec = precision.Precision(args.dtype, device)
    cli.seed_everything(args.seed)
    tok, prompts, eval_prompts = data.load_rl_prompts(args)
    rm_path = reward.reward_model_path(args)  # stage A first, unless --rm names a reward model
    policy, ref = models.load_policy_and_reference(args, tok, device, prec)
    trained = distributed.wrap(policy, args.fsdp)  # DDP or FSDP2 under torchrun; before the optimizer
    # the policy's optimizer before the critic's adapter may join the policy's base: it holds the policy's own
    opt = precision.make_optimizer(policy.parameters(), args.lr, args.optim, eps=1e-5)
    reward_model, critic = load_reward_model_and_critic(rm_path, args, tok, device, prec, policy)
    critic_opt = critic_prec = None  # --freeze-critic: the critic is the reward model, and nothing of it trains
    if critic is not reward_model:  # the critic trains in fp32 with its own optimizer and loss scale
        critic.train()
        trained_critic = distributed.wrap(critic, args.fsdp)  # DDP or FSDP2 under torchrun; before the optimizer
        critic_opt = precision.make_optimizer(critic.parameters(), args.critic_lr, args.optim, eps=1e-5)
        critic_prec = precision.Precision(args.dtype, device)
    if args.shard_frozen:
        distributed.shard_frozen(ref, reward_model, critic)
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    probe = memory.Probe(
        device,
        models=(policy, ref, reward_model) + ((critic,) if critic_opt else ()),
        optimizers=(opt,) + ((critic_opt,) if critic_opt else ()),
    )
    sampler = data.PromptSampler(len(prompts), args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # draws the minibatches
    use_gold = args.gold == "vader" or args.gold == "auto" and world.is_world_data(args.prompts)
    if distributed.world() > 1:  # the same weights everywhere so far; from here each rank samples its own responses
        cli.seed_everything(args.seed + distributed.rank())
    records, ev, start, elapsed = [], {}, 0, 0.0
    if args.resume:  # continue exactly: every state the next step reads, restored
        st = checkpoint.resume_state(args, "ppo", args.steps)
        distributed.load_optimizer_state(trained, opt, st["optimizer"])
        prec.scaler.load_state_dict(st["scaler"])
        kl_ctl.beta = st["kl_coef"]
        sampler.load_state_dict(st["sampler"])
        gen.set_state(st["generator"])
        if critic_opt:  # what of the critic trains (all of it, or under LoRA its adapters and head)
            missing, unexpected = distributed.load_trained_state(critic, st["algo_state"]["critic"])
            assert not unexpected and all(not p.requires_grad for n, p in critic.named_parameters() if n in missing)
            distributed.load_optimizer_state(critic, critic_opt, st["algo_state"]["optimizer"])
            critic_prec.scaler.load_state_dict(st["algo_state"]["scaler"])
        records, ev, start, elapsed = st["records"], st["eval"], st["step"], st["elapsed"]

    def save(step, resumable):  # --out, atomically: the policy, metrics.jsonl, summary.json (and what --resume reads)
        summary = {**ev, "train/steps": step, "time/wall_seconds": time.time() - t0, "device": str(device)}
        summary.update(
            memory.parameter_counts(policy, ref, reward_model, critic), processes=distributed.world(), args=asdict(args)
        )
        state = None
        if resumable:  # every state the next step reads, on every rank
            resume = {"optimizer": distributed.optimizer_state(trained, opt), "scaler": prec.scaler.state_dict()}
            resume.update(kl_coef=kl_ctl.beta, sampler=sampler.state_dict(), generator=gen.get_state())
            if critic_opt:  # what of the critic trains, its optimizer and its loss scale
                critic_state = {"critic": distributed.trained_state(critic), "scaler": critic_prec.scaler.state_dict()}
                resume["algo_state"] = {**critic_state, "optimizer": distributed.optimizer_state(critic, critic_opt)}
            state = checkpoint.trainer_state("ppo", step, records, ev, time.time() - t0, **resume)
        checkpoint.save_run(args.out, summary, policy, tok, records, state)
        return summary

    print(
        f"ppo: critic {'trained from' if critic_opt else 'frozen at'} the reward model, "
        f"lam={args.lam} beta={args.kl_coef}"
        f"{' (adaptive)' if args.adaptive_kl else ''}, {args.steps} steps of {args.batch_size} prompts on {device} "
        f"({args.dtype}), {len(prompts)} prompts" + (f", resumed at step {start}" if start else ""),
        flush=True,
    )
    t0 = time.time() - elapsed
    for step in tqdm(range(start, args.steps + 1), desc="ppo", leave=False, disable=not distributed.is_main() or None):
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
                # 4. the reward model's score at each response's last token, the critic's values;
                # 5. GAE advantages and returns (critic_advantages, above), whitened over the global batch
                adv, returns, old_values, score = critic_advantages(reward_model, critic, r, rewards, args)
                adv = rollout.masked_whiten(adv, r.response_mask, total=distributed.all_reduce)
        # 6. PPO epochs of the clipped objective and the critic's value loss, micro-batches accumulated
        with probe.phase("update"):
            stats = ppo_epochs(
                trained,
                opt,
                prec,
                trained_critic if critic_opt else critic,
                critic_opt,
                critic_prec,
                r,
                old_logp,
                adv,
                old_values,
                returns,
                plans,
                args,
            )
        for o in (opt, critic_opt) if critic_opt else (opt,):  # gradients are not held through the next generation
            o.zero_grad(set_to_none=True)

        # 7. log (every number the global batch's), evaluate (above), checkpoint
        gold = world.gold_scores(r.texts) if use_gold else None
        m = distributed.mean_over_ranks(
            {  # each rank's share is equal, so the mean of means is the batch's
                "objective/kl": kl.sum(1).mean().item(),
                **({"objective/gold": sum(gold) / len(gold)} if use_gold else {}),
                "objective/rm_score": score.mean().item(),
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
        tqdm.write(report.step_text(step + 1, args.steps, m, "rm_score", use_gold))
        if (step + 1) % args.table_every == 0:
            tqdm.write(report.sample_table(r, gold, score, "rm_score"))
    summary = save(args.steps, resumable=args.save_every > 0)
    print(report.saved_text(args.out, ev, summary), flush=True)
    return summary


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
