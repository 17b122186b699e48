"""GRPO (Shao et al. 2024, "DeepSeekMath", outcome supervision) on the shared loop: a group of G responses per
prompt, each scored by the Bradley–Terry reward model of stage A (reward.py); the advantage of every token of a
response is its reward normalised within its group, (r - mean) / (std + eps); the clipped surrogate averages
each response's tokens, then the responses; the KL to the reference is GRPO's, beta * k3(pi || pi_ref) in the
loss, not a per-token reward. No critic: in memory the policy (trained), reference and reward model (frozen).
--dr-grpo gives Dr. GRPO's correction (Liu et al. 2025): no division by the group's std, and token sums over
a fixed length (--max-new-tokens) instead of each response's mean.

    python grpo_baseline.py --rm ckpt/rm              # reuse stage A's reward model
    python grpo_baseline.py --group-size 8 --dr-grpo
"""
from dataclasses import dataclass

import torch

import reward
import runtime
from runtime import arg


@dataclass
class Args(reward.RewardArgs):
    group_size: int = arg(4, "G responses sampled per prompt; --batch-size and --minibatch-size count prompts, so a step generates G times as many responses", ">= 2")
    kl_coef: float = arg(0.04, "beta of GRPO's KL term beta * k3(pi || pi_ref) in the loss (DeepSeekMath: 0.04); initial value if adaptive", ">= 0")
    dr_grpo: bool = arg(False, "Dr. GRPO: advantages r - group mean without the std division, token sums over --max-new-tokens")
    out: str = arg("ckpt/grpo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- advantages
def group_advantages(scores, group_size, divide_by_std=True, eps=1e-4):
    """(r - mean) / (std + eps) within each group of consecutive responses to one prompt, [B * G] (unbiased std,
    as TRL's GRPOTrainer); a group of equal rewards gets 0 everywhere. Dr. GRPO: r - mean."""
    groups = scores.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    return (centred / (groups.std(1, keepdim=True) + eps) if divide_by_std else centred).view(-1)


# ---------------------------------------------------------------------------------------------- the critic
class GroupBaseline:
    """GRPO's critic is the group: no value model, the reward model scores each response once."""
    name, score_name, optimizers, kl_in_loss, whiten = "grpo", "rm_score", (), True, False

    def __init__(self, args, reward_model):
        self.args, self.reward_model, self.models = args, reward_model.eval(), (reward_model,)
        self.samples_per_prompt = args.group_size
        self.loss_aggregation = "constant" if args.dr_grpo else "sequence"
        self.describe = f"group of {args.group_size}, reward model" + (", Dr. GRPO" if args.dr_grpo else "")

    @torch.no_grad()
    def advantages(self, r, rewards):
        self.score = reward.reward_scores(self.reward_model, r, self.args.forward_batch_size)
        outcome = self.score + rewards.sum(1)  # rewards hold only --missing-eos-penalty: the KL is in the loss
        return group_advantages(outcome, self.args.group_size, not self.args.dr_grpo)[:, None] * r.response_mask


def train(args: Args):
    return reward.train(args, lambda path, tok, device, prec:
                        GroupBaseline(args, reward.load_reward_model(path, args, tok, device, prec.dtype)))


def main(argv=None):
    args = runtime.parse_args(Args, argv, __doc__)
    runtime.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
