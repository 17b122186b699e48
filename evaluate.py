"""Stage 3: measure policies on held-out prompts with the gold judge (docs/DVPO.md §6). The trainers run the same
measurement (held_out) every --eval-every steps.

For each policy: mean gold reward with a 95% confidence interval, KL(pi || pi_ref) in nats per sequence
against the first policy (or --ref), win rate against the first policy by the gold judge, mean response
length, EOS rate and distinct-2. Every policy samples with the same seed, so a policy compared with itself
gets KL 0 and win rate 0.5 exactly.

    python evaluate.py ckpt/sft ckpt/dvpo
    python evaluate.py ckpt/sft ckpt/dvpo --gvm ckpt/gvm --json ckpt/eval.json
"""

import math
import os
import sys
from dataclasses import asdict, dataclass, field

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch

import gvm
import rollout
from infra import checkpoint, cli, data, distributed, models, world
from infra.cli import UsageError, arg
from infra.flags import DataFlags, RunFlags


@dataclass
class Args(DataFlags, RunFlags):
    policies: list = field(
        default_factory=list, metadata={"nargs": "*", "help": "policy folders or hub names; the first is the baseline"}
    )
    ref: str = arg("", "reference policy for the KL; empty: the first policy")
    prompts: str = arg(
        world.PROMPTS_EVAL, "held-out prompts, any shape infra/data.py reads; the default is the world's"
    )
    n_prompts: int = arg(0, "use only the first N prompts (0: all)", ">= 0")
    samples_per_prompt: int = arg(1, "responses sampled per prompt", ">= 1")
    batch_size: int = arg(250, "prompts per generate() call", ">= 1")
    max_new_tokens: int = arg(48, "sampling budget per response", ">= 1")
    temperature: float = arg(1.0, "sampling temperature (log-probs and KL use the same temperature)", "> 0")
    gvm: str = arg("", "a GVM checkpoint: report its held-out pairwise accuracy and print per-token values")
    pairs: str = arg(
        "",
        "held-out preference pairs for --gvm's accuracy; empty: the held-out pairs of the world the GVM was "
        "trained on, if it was",
    )
    show_values: int = arg(3, "with --gvm: responses of the last policy printed token by token with V(s_t)", ">= 0")
    json: str = arg("", "also write the results to this JSON file")


# ---------------------------------------------------------------------------------------------- measurement
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
    """Mean and the half-width of its normal 95% confidence interval (nan, printed as such, for fewer than two
    samples: one sample has no spread to measure)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def held_out(policy, ref, tok, prompts, args, use_gold):
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


# ---------------------------------------------------------------------------------------------- the report
def distinct_n(texts, n=2):
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def win_rate(gold, base_gold):
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, base_gold)) / len(gold)


def summarize(name, s, base, prompts=None):
    """One table row. With the world's prompts, also the fraction of reviews (prompt + response) that its
    grammar could have written: fluency, which the gold judge does not check."""
    gold, ci = mean_ci(s["gold"])
    kl, kl_ci = mean_ci(s["kl"])
    row = {
        "policy": name,
        "gold": gold,
        "gold_ci95": ci,
        "kl": kl,
        "kl_ci95": kl_ci,
        "win_rate": win_rate(s["gold"], base["gold"]),
        "length": sum(s["length"]) / len(s["length"]),
        "eos_rate": sum(s["ended"]) / len(s["ended"]),
        "distinct2": distinct_n(s["texts"]),
        "n": len(s["gold"]),
    }
    if s["value"]:
        row["gvm_value"] = sum(s["value"]) / len(s["value"])
    if prompts is not None:
        row["grammatical"] = sum(world.is_grammatical(p + t) for p, t in zip(prompts, s["texts"])) / len(prompts)
    return row


def markdown_table(rows):
    extra = [(k, title) for k, title in (("grammatical", "grammatical"), ("gvm_value", "GVM V(s_T)")) if k in rows[0]]
    lines = [
        "| policy | gold (95% CI) | KL vs ref, nats/seq | win rate vs first | length | EOS rate | distinct-2 |"
        + "".join(f" {title} |" for _, title in extra),
        "| --- " * (7 + len(extra)) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['gold']:+.3f} ± {r['gold_ci95']:.3f} | {r['kl']:.2f} ± {r['kl_ci95']:.2f} "
            f"| {r['win_rate']:.3f} | {r['length']:.1f} | {r['eos_rate']:.3f} | {r['distinct2']:.3f} |"
            + "".join(f" {r[k]:+.3f} |" if k == "gvm_value" else f" {r[k]:.3f} |" for k, _ in extra)
        )
    return "\n".join(lines)


def print_token_values(value_model, tok, prompts, texts, k):
    """The GVM's value after each response token, so a reader sees where it jumps."""
    for prompt, text in list(zip(prompts, texts))[:k]:
        p, r = data.prompt_ids(tok, prompt), data.response_ids(tok, text)
        ids = torch.tensor([p + r], device=next(value_model.parameters()).device)
        v = value_model(ids, torch.ones_like(ids))[0, len(p) - 1 :].tolist()
        print(f"\n{data.show(prompt)!r} -> {text!r}\n  {'(prompt)':>12} V(s_0) = {v[0]:+.3f}")
        for t, tid in enumerate(r):
            print(f"  {token_text(tok, tid):>12} V = {v[t + 1]:+.3f}  ({v[t + 1] - v[t]:+.3f})")


def token_text(tok, tid):
    """A token as the text it adds (" festivities", not byte-level BPE's "Ġfestivities"); repr'd when it holds a
    newline or another character that would not print."""
    text = tok.decode([tid])
    return text if text.isprintable() else repr(text)


def gvm_pairs(args, meta):
    """--pairs, or, for a GVM trained on a world's pairs, that world's held-out pairs; else none."""
    if args.pairs:
        return args.pairs
    trained_on = meta.get("data", "")
    held_out = os.path.join(os.path.dirname(trained_on), os.path.basename(world.PAIRS_EVAL))
    return held_out if trained_on and world.is_world_data(trained_on) and os.path.isfile(held_out) else ""


def run(args: Args):
    cli.single_process("evaluate.py")
    cli.check_args(args)
    if not args.policies:
        raise UsageError("name at least one policy, e.g. python evaluate.py ckpt/sft ckpt/dvpo")
    if args.json:
        checkpoint.check_output_file(args.json, "--json", args)
    device = cli.pick_device(args.device)
    if args.prompts == world.PROMPTS_EVAL:
        world.ensure_world()
    first = args.ref or args.policies[0]
    ref_tok = models.load_tokenizer(first, "--ref" if args.ref else "policy")
    positions = models.position_limit(first, "--ref" if args.ref else "policy")
    if positions and args.max_new_tokens >= positions:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: {first} has only {positions} positions")
    prompts = data.load_prompts(
        args.prompts,
        args.split,
        "--prompts",
        ref_tok,
        args.max_prompt_len,
        args.strict,
        (positions, args.max_new_tokens),
    )
    prompts = (prompts[: args.n_prompts] if args.n_prompts else prompts) * args.samples_per_prompt
    value_model, samples = None, []
    if args.gvm:
        meta = gvm.read_meta(args.gvm)
        gvm.check_tokenizer(meta, ref_tok, f"--gvm {args.gvm}", first, "python gvm.py --model")
        pairs_path = gvm_pairs(args, meta)
        if pairs_path:
            pairs = data.load_pairs(pairs_path, args.eval_split or args.split, "--pairs", args.strict)
            samples = gvm.pair_samples(
                pairs,
                ref_tok,
                10**9,
                f"--pairs {pairs_path}",
                args.max_prompt_len,
                args.strict,
                models.position_limit(args.gvm, "--gvm", causal_lm=False),
            )
        value_model = gvm.load_value_model(args.gvm, device)[0].eval()
    ref = models.load_model(first, ref_tok, "--ref" if args.ref else "policy").to(device).eval()
    results, scored = [], {}
    for name in args.policies:
        tok = models.load_tokenizer(name, "policy")
        models.position_limit(name, "policy")  # a causal LM, not a value model
        if models.tokenizer_fingerprint(tok) != models.tokenizer_fingerprint(ref_tok):
            raise UsageError(f"policy {name}: its tokenizer differs from the reference's; KL needs shared token ids")
        policy = models.load_model(name, tok, "policy").to(device).eval()
        cli.seed_everything(args.seed)
        scored[name] = score_policy(
            policy, ref, tok, prompts, args.batch_size, args.max_new_tokens, args.temperature, value_model
        )
        results.append(
            summarize(
                name,
                scored[name],
                scored[args.policies[0]],
                [p for p, _ in prompts] if world.is_grammar_world(args.prompts) else None,
            )
        )
        print(
            f"{name}: gold {results[-1]['gold']:+.3f} ± {results[-1]['gold_ci95']:.3f}, KL {results[-1]['kl']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"\n{len(prompts)} held-out samples per policy from {args.prompts}, KL against "
        f"{first}, temperature {args.temperature}\n"
    )
    print(markdown_table(results))
    report = {"results": results, "args": asdict(args)}
    if args.gvm:
        if samples:
            acc = gvm.heldout_metrics(value_model, samples, ref_tok.pad_token_id, device)
            report["gvm"] = {"path": args.gvm, "pairs": pairs_path, **acc}
            print(
                f"\nGVM {args.gvm}: held-out pairwise accuracy {acc['eval/pairwise_acc_final']:.3f} (final value), "
                f"{acc['eval/pairwise_acc_mean']:.3f} (mean value) on {len(samples) // 2} pairs of {pairs_path}"
            )
        else:
            print(
                f"\nGVM {args.gvm}: no held-out pairs for its accuracy (it was not trained on a world's pairs; "
                "name them with --pairs)"
            )
        last = scored[args.policies[-1]]
        print_token_values(value_model, ref_tok, [p for p, _ in prompts], last["texts"], args.show_values)
    if args.json:
        checkpoint.write_json(args.json, report)
    return report


def main(argv=None):
    args = cli.parse_args(Args, argv, __doc__)
    cli.run_main(lambda: run(args))


if __name__ == "__main__":
    main()
