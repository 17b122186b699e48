"""DPO (Rafailov et al. 2023), offline: the policy learns from the same preference pairs as the GVM and the
reward model, with no sampling, no reward model and no critic. For each pair the loss is
    -log sigmoid(beta * [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))]),
log-probs summed over each response's tokens (EOS included, the prompt masked), encoded as every stage encodes
them (gvm.pair_samples) and scored by the trainers' own rollout.response_logprobs. In memory: the policy
(trained) and the reference (frozen, or the policy with its LoRA adapters off). Held-out evaluation, logs,
checkpoints, --resume and every knob are the RL scripts'; the loop is its own (offline, epochs over pairs).

    python dpo_baseline.py                     # the world's pairs, 3 epochs, into ckpt/dpo
    python dpo_baseline.py --beta 0.3 --epochs 1
"""

import math
import random
import time
from dataclasses import asdict, dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch
import torch.nn.functional as F

import evaluate
import gvm
import rollout
from infra import checkpoint, cli, data, memory, models, precision, report, world
from infra.cli import arg
from infra.flags import PolicyFlags, check_policy_flags


@dataclass
class Args(PolicyFlags):
    data: str = arg(
        world.PAIRS_TRAIN,
        "preference pairs in any shape infra/data.py reads (the GVM's and the reward model's default)",
    )
    eval_data: str = arg(
        "",
        "held-out pairs for the implicit reward's accuracy; empty: the world's held-out pairs for the default "
        "--data, else none",
    )
    max_len: int = arg(
        512,
        "pairs with a prompt + response longer than this (or than the model's positions) are dropped, with a count",
        ">= 2",
    )
    beta: float = arg(0.1, "DPO's beta: the strength of the implicit KL constraint", "> 0")
    epochs: int = arg(3, "passes over the pairs", ">= 1")
    batch_size: int = arg(32, "pairs per optimizer step", ">= 1")
    lr: float = arg(3e-4, "AdamW learning rate of the policy (constant)", "> 0")
    max_grad_norm: float = arg(1.0, "gradient-norm clip", "> 0")
    temperature: float = arg(1.0, "sampling temperature of the held-out evaluation", "> 0")
    max_new_tokens: int = arg(48, "sampling budget per response in the held-out evaluation", ">= 1")
    out: str = arg("ckpt/dpo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- the loss
def sequence_logprobs(model, tok, samples, chunk=0):
    """Sum of log pi(y_t | s_t) over each response's tokens (EOS included), [N]: the trainers' response_logprobs
    on the samples laid out as a rollout, at temperature 1."""
    r = rollout.rollout_of(tok, [(p, x) for p, x, _ in samples])
    return rollout.response_logprobs(model, r, 1.0, chunk=chunk).sum(1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """-log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)), mean over pairs, and the implicit
    rewards beta * log(pi / pi_ref) of chosen and rejected."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def dpo_step(policy, ref, tok, opt, prec, samples, args):
    """One optimizer step on a batch of pairs (samples alternate chosen, rejected), accumulated over
    micro-batches of --micro-batch-size pairs, each weighted by its share of the pairs."""
    pairs = len(samples) // 2
    micro = 2 * (args.micro_batch_size or pairs)
    opt.zero_grad(set_to_none=True)
    stats = {}
    for i in range(0, len(samples), micro):
        part = samples[i : i + micro]
        with prec.autocast():
            with torch.no_grad():
                ref_logp = sequence_logprobs(ref, tok, part, args.logprob_chunk)
            logp = sequence_logprobs(policy, tok, part, args.logprob_chunk)
            loss, chosen, rejected = dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], args.beta)
        share = len(part) / len(samples)
        prec.backward(loss * share)
        for k, v in {
            "loss/dpo": loss.detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracy": (chosen > rejected).float().mean(),
            "rewards/margin": (chosen - rejected).mean(),
        }.items():
            stats[k] = stats.get(k, 0.0) + float(v) * share
    norm = prec.step(opt, args.max_grad_norm)
    return {**stats, "policy/grad_norm": float(norm), **prec.loss_scale("policy")}


@torch.no_grad()
def implicit_accuracy(policy, ref, tok, samples, args, prec):
    """Held-out fraction of pairs whose implicit reward ranks chosen above rejected (ties count half)."""
    hits, size = [], 2 * (args.micro_batch_size or 16)  # samples per forward: whole pairs
    for i in range(0, len(samples), size):
        part = samples[i : i + size]
        with prec.autocast():
            margin = sequence_logprobs(policy, tok, part, args.logprob_chunk) - sequence_logprobs(
                ref, tok, part, args.logprob_chunk
            )
        hits += ((margin[0::2] > margin[1::2]).float() + 0.5 * (margin[0::2] == margin[1::2]).float()).tolist()
    return sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- main
def train(args: Args):
    cli.single_process("dpo_baseline.py")
    check_policy_flags(args, "dpo")
    device = cli.pick_device(args.device)
    prec = precision.Precision(args.dtype, device)
    cli.seed_everything(args.seed)
    if (
        world.SFT_DIR in (args.policy, args.ref)
        or args.data == world.PAIRS_TRAIN
        or args.eval_prompts == world.PROMPTS_EVAL
    ):
        world.ensure_world()
    train_rows = data.load_pairs(args.data, args.split, "--data", args.strict)
    eval_data = args.eval_data or (world.PAIRS_EVAL if args.data == world.PAIRS_TRAIN else "")
    eval_rows = (
        data.load_pairs(eval_data, args.eval_split or args.split, "--eval-data", args.strict) if eval_data else []
    )
    tok, positions = models.load_tokenizer(args.policy), models.position_limit(args.policy)
    samples = gvm.pair_samples(
        train_rows, tok, args.max_len, f"--data {args.data}", args.max_prompt_len, args.strict, positions
    )
    held = (
        gvm.pair_samples(
            eval_rows, tok, args.max_len, f"--eval-data {eval_data}", args.max_prompt_len, args.strict, positions
        )
        if eval_rows
        else []
    )
    eval_prompts = (
        data.load_prompts(
            args.eval_prompts,
            args.eval_split or args.split,
            "--eval-prompts",
            tok,
            args.max_prompt_len,
            args.strict,
            (positions, args.max_new_tokens),
        )[: args.eval_n]
        if args.eval_prompts
        else []
    )
    policy, ref = models.load_policy_and_reference(args, tok, device, prec)
    opt = precision.make_optimizer(policy.parameters(), args.lr, args.optim)
    probe = memory.Probe(device, models=(policy, ref), optimizers=(opt,))
    use_gold = args.gold == "vader" or args.gold == "auto" and world.is_world_data(args.data)
    steps_per_epoch = math.ceil(len(samples) / 2 / args.batch_size)
    total = steps_per_epoch * args.epochs
    records, ev, start, elapsed = [], {}, 0, 0.0
    if args.resume:
        st = checkpoint.resume_state(args, "dpo", total, "--epochs")
        opt.load_state_dict(st["optimizer"])
        prec.scaler.load_state_dict(st["scaler"])
        records, ev, start, elapsed = st["records"], st["eval"], st["step"], st["elapsed"]
    print(
        f"dpo: beta={args.beta}, {len(samples) // 2} pairs, {args.epochs} epochs = {total} steps of {args.batch_size} "
        f"pairs on {device} ({args.dtype})" + (f", resumed at step {start}" if start else ""),
        flush=True,
    )
    t0 = time.time() - elapsed

    def evaluate_at(step):
        nonlocal ev
        if eval_prompts:
            with prec.autocast():
                ev = evaluate.held_out(policy, ref, tok, eval_prompts, args, use_gold)
        if held:
            ev["eval/rewards_accuracy"] = implicit_accuracy(policy, ref, tok, held, args, prec)
        if ev:
            records.append({"step": step, **ev, "time/elapsed": time.time() - t0})
            print(
                f"eval step {step} | "
                + " | ".join(
                    ([report.eval_text(ev)] if "eval/kl" in ev else [])
                    + ([f"pair accuracy {ev['eval/rewards_accuracy']:.3f}"] if held else [])
                ),
                flush=True,
            )

    def save(step, with_state):
        summary = {
            **ev,
            "train/steps": step,
            "time/wall_seconds": time.time() - t0,
            "device": str(device),
            "args": asdict(args),
            **memory.parameter_counts(policy, ref),
        }
        state = (
            checkpoint.trainer_state(
                "dpo", step, records, ev, time.time() - t0, optimizer=opt.state_dict(), scaler=prec.scaler.state_dict()
            )
            if with_state
            else None
        )
        checkpoint.save_run(args.out, summary, policy, tok, records, state)
        return summary

    if start == 0:
        evaluate_at(0)
    for step in range(start, total):
        epoch, i = divmod(step, steps_per_epoch)
        order = list(range(len(samples) // 2))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        batch = [s for j in order[i * args.batch_size : (i + 1) * args.batch_size] for s in samples[2 * j : 2 * j + 2]]
        with probe.phase("update"):
            m = dpo_step(policy, ref, tok, opt, prec, batch, args)
        opt.zero_grad(set_to_none=True)
        m.update(probe.pop())
        report.check_finite(step + 1, m)
        records.append(
            {"step": step + 1, **m, "train/epoch": (step + 1) / steps_per_epoch, "time/elapsed": time.time() - t0}
        )
        print(
            f"step {step + 1}/{total} | loss {m['loss/dpo']:.4f} | margin {m['rewards/margin']:+.3f} | "
            f"accuracy {m['rewards/accuracy']:.2f} | {m['time/update']:.2f}s",
            flush=True,
        )
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            evaluate_at(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save(step + 1, with_state=True)
    summary = save(total, with_state=args.save_every > 0)
    gold = report.gold_text(ev, "eval/gold", "eval/gold_ci95")
    print(
        f"saved {args.out}"
        + (f": held-out gold {gold}" if gold else "")
        + (f", KL {ev['eval/kl']:.2f}" if "eval/kl" in ev else "")
        + f", {summary['time/wall_seconds']:.0f}s",
        flush=True,
    )
    return summary


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
