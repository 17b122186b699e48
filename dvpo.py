"""Stage 2 of DVPO: policy-only PPO with the frozen global value model as critic (DVPO.md §3).

Per step: sample prompts -> generate one response each -> log-probs under the policy (old) and the reference
-> frozen GVM values -> per-token KL-penalty rewards -> advantages (--advantage) -> --ppo-epochs of clipped
policy updates. No reward model, no critic training: three models in memory, one of them trained.

    python dvpo.py --gvm ckpt/gvm
    python dvpo.py --gvm ckpt/gvm --advantage released --lam 1.0    # the authors' code: the GVM is a pure baseline
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import evaluate
import gvm
import rollout
import world
from world import UsageError, arg

ADVANTAGES = ("released", "delta", "static")


@dataclass
class Args:
    gvm: str = arg("ckpt/gvm", "the global value model from gvm.py (frozen here)")
    policy: str = arg(world.SFT_DIR, "initial policy: a local folder or hub name of a causal LM; the default is the world's SFT policy")
    ref: str = arg("", "reference policy for the KL penalty; empty: the initial policy")
    prompts: str = arg(world.PROMPTS_TRAIN, "RL prompts, a dataset with a 'prompt' column; the default is the world's RL-train prompts")
    eval_prompts: str = arg(world.PROMPTS_EVAL, "held-out prompts for the periodic gold evaluation; empty: none")
    split: str = arg("train", "split to read when a prompts path is a hub dataset")
    out: str = arg("ckpt/dvpo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")
    advantage: str = arg("delta", "released | delta | static: how GVM values become advantages (README, DVPO.md §3)")
    lam: float = arg(0.95, "GAE lambda of the released and delta advantages")
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
    table_every: int = arg(50, "steps between printed tables of prompt, response, gold and GVM value")
    seed: int = arg(0, "seed for python, numpy and torch")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


# ---------------------------------------------------------------------------------------------- advantages
def whiten_unmasked(values):
    """The released code whitens GVM values over the whole tensor, prompt and padding positions included."""
    return (values - values.mean()) / (values.std() + 1e-8)


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
        terminal = values.gather(1, T[:, None])
        last = torch.nn.functional.one_hot((T - 1).clamp(min=0), rewards.shape[1]).to(rewards.dtype)
        adv, _ = rollout.gae(rewards + terminal * last, values[:, :-1], amask, gamma, lam)
    elif variant == "static":
        # the v2 paper's static advantage Q(s_t, y_t) = V(s_{t+1}), plus the token's own KL reward
        adv = (values[:, 1:] + rewards) * amask
    else:
        raise UsageError(f"--advantage {variant}: choose one of {', '.join(ADVANTAGES)}")
    return adv * amask



# ---------------------------------------------------------------------------------------------- PPO
def ppo_loss(new_logp, old_logp, adv, mask, cliprange):
    """Clipped surrogate: mean over response tokens of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))."""
    ratio = torch.exp(new_logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    stats = {"policy/clipfrac": rollout.masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
             "policy/approxkl": 0.5 * rollout.masked_mean((new_logp - old_logp) ** 2, mask),
             "val/ratio": rollout.masked_mean(ratio, mask),
             "val/ratio_max_dev": ((ratio - 1).abs() * mask).max()}
    return rollout.masked_mean(loss, mask), stats


def minibatches(batch_size, minibatch_size, epochs, generator):
    """One permutation per epoch, split into minibatches: [[idx, ...] per epoch]."""
    return [torch.randperm(batch_size, generator=generator).split(minibatch_size) for _ in range(epochs)]


@torch.no_grad()
def old_logprobs(policy, r, plan, temperature):
    """Log-probs of the sampled tokens before the update, computed on exactly the minibatches of the first
    epoch, so the first minibatch's ratio is exactly 1 (§5.4)."""
    out = torch.zeros_like(r.response_mask)
    for idx in plan:
        out[idx] = rollout.response_logprobs(policy, r.index(idx), temperature)
    return out


def ppo_update(policy, opt, r, old_logp, adv, plans, args):
    """--ppo-epochs of clipped policy-gradient steps; the mean of each statistic over all minibatches, and the
    largest |ratio - 1| of the first minibatch."""
    stats, first = [], None
    for epoch_plan in plans:
        for idx in epoch_plan:
            mb = r.index(idx)
            new_logp, entropy = rollout.response_logprobs(policy, mb, args.temperature, with_entropy=True)
            loss, s = ppo_loss(new_logp, old_logp[idx], adv[idx], mb.response_mask, args.cliprange)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            opt.step()
            s.update({"loss/policy": loss, "policy/entropy": rollout.masked_mean(entropy, mb.response_mask),
                      "policy/grad_norm": grad_norm})
            stats.append({k: float(v.detach()) for k, v in s.items()})
            first = stats[0]["val/ratio_max_dev"] if first is None else first
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    out["val/ratio_first_max_dev"] = first
    return out


class AdaptiveKL:
    """Ziegler et al. 2019: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + err * n / self.horizon


# ---------------------------------------------------------------------------------------------- main
def validate(args):
    if args.advantage not in ADVANTAGES:
        raise UsageError(f"--advantage {args.advantage}: choose one of {', '.join(ADVANTAGES)}")
    for name in ("steps", "batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "eval_every",
                 "eval_n", "table_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.batch_size % args.minibatch_size:
        raise UsageError(f"--minibatch-size {args.minibatch_size} does not divide --batch-size {args.batch_size}")
    if not (0 <= args.lam <= 1 and 0 < args.gamma <= 1 and args.temperature > 0 and args.kl_coef >= 0):
        raise UsageError("--lam must lie in [0, 1], --gamma in (0, 1], --temperature above 0, --kl-coef at least 0")


def load_models(args, device):
    """Policy (trained), reference and GVM (both frozen), checked to share one tokenizer."""
    value_model, _, meta = gvm.load_value_model(args.gvm, device)
    value_model.requires_grad_(False).eval()  # §3: frozen for real
    policy, tok = rollout.load_pretrained(args.policy, "--policy")
    ref, ref_tok = rollout.load_pretrained(args.ref or args.policy, "--ref" if args.ref else "--policy")
    ref.requires_grad_(False).eval()
    fp = world.tokenizer_fingerprint(tok)
    if meta.get("tokenizer_fingerprint") != fp:
        raise UsageError(f"--gvm {args.gvm}: trained with another tokenizer than --policy {args.policy}; "
                         f"train a GVM on this policy's backbone (python gvm.py --model {args.policy})")
    if world.tokenizer_fingerprint(ref_tok) != fp:
        raise UsageError(f"--ref {args.ref}: its tokenizer differs from --policy {args.policy}'s")
    return policy.to(device), ref.to(device), value_model, tok


def prompt_stream(prompts, seed):
    """Endless epoch-shuffled prompts."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        yield from (prompts[i] for i in order)


def held_out_eval(policy, ref, tok, prompts, args, seed):
    """Gold reward and KL on held-out prompts, sampled with a fixed seed that leaves training's RNG alone."""
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


def train(args: Args):
    validate(args)
    device = world.pick_device(args.device)
    world.seed_everything(args.seed)
    if world.SFT_DIR in (args.policy, args.ref) or args.prompts == world.PROMPTS_TRAIN:
        world.ensure_world()
    if not os.path.isdir(args.gvm):
        raise UsageError(f"--gvm {args.gvm}: no such folder (train one first: python gvm.py --out {args.gvm})")
    prompts = rollout.load_prompts(args.prompts, args.split, "--prompts")
    eval_prompts = rollout.load_prompts(args.eval_prompts, args.split, "--eval-prompts")[:args.eval_n] \
        if args.eval_prompts else []
    policy, ref, value_model, tok = load_models(args, device)
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    assert not {id(p) for p in value_model.parameters()} & {id(p) for g in opt.param_groups for p in g["params"]}
    kl_ctl = AdaptiveKL(args.kl_coef, args.target_kl, args.kl_horizon)
    probe = rollout.Probe(device, models=(policy, ref, value_model), optimizers=(opt,))
    stream = prompt_stream(prompts, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"dvpo: advantage={args.advantage} lam={args.lam} beta={args.kl_coef}{' (adaptive)' if args.adaptive_kl else ''}, "
          f"{args.steps} steps of {args.batch_size} prompts on {device}, {len(prompts)} prompts", flush=True)

    t0 = time.time()
    with world.atomic_dir(args.out) as tmp:
        log = world.MetricsLog(os.path.join(tmp, "metrics.jsonl"))
        ev = {}
        for step in tqdm(range(args.steps + 1), desc="dvpo", leave=False):
            if eval_prompts and (step % args.eval_every == 0 or step == args.steps):
                ev = held_out_eval(policy, ref, tok, eval_prompts, args, args.seed + 10_000)
                log.write(step, ev)
                tqdm.write(f"eval step {step} | held-out gold {ev['eval/gold']:+.3f} ± {ev['eval/gold_ci95']:.3f} | "
                           f"kl {ev['eval/kl']:.2f} | eos {ev['eval/eos_rate']:.2f}")
            if step == args.steps:
                break
            batch_prompts = [next(stream) for _ in range(args.batch_size)]
            with probe.phase("generate"):
                r = rollout.generate(policy, tok, batch_prompts, args.max_new_tokens, args.temperature)
            with probe.phase("score"):
                plans = minibatches(args.batch_size, args.minibatch_size, args.ppo_epochs, gen)
                old_logp = old_logprobs(policy, r, plans[0], args.temperature)
                with torch.no_grad():
                    ref_logp = rollout.response_logprobs(ref, r, args.temperature)
                    full_values = value_model(r.input_ids, r.attention_mask)
                values = full_values[:, r.prompt_len - 1:]
                if args.advantage == "released":
                    values = whiten_unmasked(full_values)[:, r.prompt_len - 1:]
                smask = rollout.state_mask(r)
                kl = rollout.kl_k1(old_logp, ref_logp) * r.response_mask
                rewards = -kl_ctl.beta * kl
                if args.missing_eos_penalty:
                    T = r.response_mask.sum(1).long()
                    rewards[torch.arange(len(T)), T - 1] -= args.missing_eos_penalty * (~r.ended).float()
                adv = compute_advantages(args.advantage, values, smask, rewards, args.gamma, args.lam)
                adv = rollout.masked_whiten(adv, r.response_mask)
            with probe.phase("update"):
                stats = ppo_update(policy, opt, r, old_logp, adv, plans, args)
            gold = world.gold_scores(r.texts)
            T = r.response_mask.sum(1).long()
            terminal = full_values[:, r.prompt_len - 1:].gather(1, T[:, None]).squeeze(1)
            seq_kl = kl.sum(1).mean().item()
            m = {"objective/kl": seq_kl, "objective/kl_coef": kl_ctl.beta, "objective/gold": sum(gold) / len(gold),
                 "objective/gvm_value": terminal.mean().item(),
                 "objective/kl_k3": (rollout.kl_k3(old_logp, ref_logp) * r.response_mask).sum(1).mean().item(),
                 "objective/length": T.float().mean().item(), "objective/eos_rate": r.ended.float().mean().item(),
                 **stats, **probe.pop(), "time/elapsed": time.time() - t0}
            log.write(step + 1, m)
            if args.adaptive_kl:
                kl_ctl.update(seq_kl, args.batch_size)
            tqdm.write(f"step {step + 1}/{args.steps} | gold {m['objective/gold']:+.3f} | kl {seq_kl:.2f} | "
                       f"V(s_T) {m['objective/gvm_value']:+.3f} | clipfrac {m['policy/clipfrac']:.3f} | "
                       f"ent {m['policy/entropy']:.2f} | gen {m['time/generate']:.2f}s score {m['time/score']:.2f}s "
                       f"update {m['time/update']:.2f}s")
            if (step + 1) % args.table_every == 0:
                tqdm.write("| prompt | response | gold | V(s_T) |\n| --- | --- | --- | --- |")
                for i in range(4):
                    tqdm.write(f"| {r.prompts[i]} | {r.texts[i]} | {gold[i]:+.3f} | {terminal[i].item():+.3f} |")
        log.close()
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        summary = {**ev, "train/steps": args.steps, "time/wall_seconds": time.time() - t0,
                   "params/trained": sum(p.numel() for p in policy.parameters()),
                   "params/frozen": sum(p.numel() for m in (ref, value_model) for p in m.parameters()),
                   "device": str(device), "args": asdict(args)}
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(f"saved {args.out}" + (f": held-out gold {ev['eval/gold']:+.3f} ± {ev['eval/gold_ci95']:.3f}, "
                                 f"KL {ev['eval/kl']:.2f}" if ev else "") + f", {summary['time/wall_seconds']:.0f}s", flush=True)
    return summary


def main(argv=None):
    args = world.parse_args(Args, argv, __doc__)
    world.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
