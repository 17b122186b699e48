"""What a trainer prints: the line of each step, of each held-out evaluation, of the final save, a table of
samples, and the one line a diverged update stops the run with. The numbers themselves go to metrics.jsonl."""

import math

from infra import data
from infra.cli import UsageError


def gold_text(m, key, ci_key=None):
    """The gold score (with its interval) as printed text; empty when the run has no gold judge."""
    if key not in m:
        return ""
    return f"{m[key]:+.3f}" + (f" ± {m[ci_key]:.3f}" if ci_key else "")


def eval_text(ev):
    """A held-out evaluation (evaluate.held_out) as the printed line's text."""
    gold = gold_text(ev, "eval/gold", "eval/gold_ci95")
    return (
        f"held-out gold {gold} | " if gold else ""
    ) + f"kl {ev['eval/kl']:.2f} | eos {ev['eval/eos_rate']:.2f} | length {ev['eval/length']:.1f}"


def step_text(step, steps, m, score_name, use_gold):
    """One RL step's line: gold, KL, the critic's score, clip fraction, entropy and the time of each phase."""
    return (
        f"step {step}/{steps} | "
        + (f"gold {gold_text(m, 'objective/gold')} | " if use_gold else "")
        + f"kl {m['objective/kl']:.2f} | {score_name} {m[f'objective/{score_name}']:+.3f} | "
        f"clipfrac {m['policy/clipfrac']:.3f} | ent {m['policy/entropy']:.2f} | gen {m['time/generate']:.2f}s "
        f"score {m['time/score']:.2f}s update {m['time/update']:.2f}s"
    )


def sample_table(r, gold, score, score_name, rows=4):
    """The first responses of a rollout with their gold and the critic's score, as a markdown table."""
    lines = [f"| prompt | response | gold | {score_name} |", "| --- | --- | --- | --- |"]
    for i in range(min(rows, len(r.texts))):
        lines.append(
            f"| {data.show(r.prompts[i])} | {r.texts[i]} | {f'{gold[i]:+.3f}' if gold is not None else '-'} "
            f"| {score[i].item():+.3f} |"
        )
    return "\n".join(lines)


def saved_text(out, ev, summary):
    """The last line of a run: where it saved, its held-out gold and KL, its wall-clock time."""
    gold = gold_text(ev, "eval/gold", "eval/gold_ci95")
    return (
        f"saved {out}"
        + (": " + (f"held-out gold {gold}, " if gold else "") + f"KL {ev['eval/kl']:.2f}" if ev else "")
        + f", {summary['time/wall_seconds']:.0f}s"
    )


def check_finite(step, m, flags="--lr"):
    """Stop the run with one line when a step's loss or entropy is not finite: the update diverged, and its
    weights would make the next samples NaN. Nothing of this step is saved; --out keeps the last checkpoint."""
    names = ("loss/policy", "loss/kl", "loss/value", "loss/dpo", "policy/entropy")
    bad = [f"{k} {m[k]}" for k in names if k in m and not math.isfinite(m[k])]
    if bad:
        raise UsageError(
            f"step {step}: {', '.join(bad)}: the update diverged (lower {flags}); --out keeps its last checkpoint"
        )
