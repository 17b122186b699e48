"""Held-out measurement of a policy: sample one response per prompt, score it with the gold judge, its KL to the
reference, length and EOS (docs/DVPO.md §6). evaluate.py reports it; the trainers run it every --eval-every steps.
"""

import math

import torch

import rollout
from infra import cli, distributed, world


@torch.no_grad()
def score_policy(policy, ref, tok, prompts, batch_size, max_new_tokens, temperature=1.0, value_model=None):
    """Sample one response per (prompt, ids) and score it: gold (VADER), sequence KL to ref (sum of k1 over
    the response, at the sampling temperature), length, EOS, and the value model's V(s_T) when given."""
    out = {"gold": [], "kl": [], "length": [], "ended": [], "texts": [], "value": []}
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        r = rollout.generate(policy, tok, [p for p, _ in batch], max_new_tokens, temperature, ids=[x for _, x in batch])
        logp = rollout.response_logprobs(policy, r, temperature)
        ref_logp = rollout.response_logprobs(ref, r, temperature)
        out["kl"] += rollout.kl_k1(logp, ref_logp).sum(1).tolist()
        out["gold"] += world.gold_scores(r.texts)
        out["length"] += r.response_mask.sum(1).tolist()
        out["ended"] += r.ended.float().tolist()
        out["texts"] += r.texts
        if value_model is not None:
            out["value"] += rollout.final_value(rollout.response_state_values(value_model, r), r.response_mask).tolist()
    return out


def mean_ci(xs):
    """Mean and the half-width of its normal 95% confidence interval."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def evaluate(policy, ref, tok, prompts, args, use_gold):
    """KL, length, EOS rate and (with use_gold) gold reward on held-out prompts, sampled with a fixed seed
    (--seed + 10000) that leaves training's RNG alone. Under torchrun each rank samples its share and all see
    the whole."""
    states = cli.rng_states()
    torch.manual_seed(args.seed + 10_000 + distributed.rank())
    part, n_real = distributed.padded_share(prompts)
    mine = score_policy(policy, ref, tok, part, args.forward_batch_size or 250, args.max_new_tokens, args.temperature)
    s = {k: distributed.gather_shares(mine[k], n_real) for k in ("gold", "kl", "ended", "length")}
    cli.set_rng_states(states)
    gold, ci = mean_ci(s["gold"])
    return {
        **({"eval/gold": gold, "eval/gold_ci95": ci} if use_gold else {}),
        "eval/kl": sum(s["kl"]) / len(s["kl"]),
        "eval/eos_rate": sum(s["ended"]) / len(s["ended"]),
        "eval/length": sum(s["length"]) / len(s["length"]),
    }


def done(records, step):
    """Whether the run's records hold a held-out evaluation at this step (a resumed run does not repeat it)."""
    return any(rec["step"] == step and "eval/kl" in rec for rec in records)
