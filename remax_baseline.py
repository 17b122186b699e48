"""ReMax (Li et al. 2023) on the shared loop: REINFORCE whose baseline is the reward of the greedy response to
the same prompt. Per token the KL penalty of DVPO's reward; on the last token the Bradley–Terry reward model's
score of the sampled response minus that of the greedy one; each token's advantage is its return-to-go
(gamma = 1), whitened over the batch like every method's here (the paper uses raw returns at a learning rate
of 1e-6; at this loop's rates they move the policy far too fast). No critic: in memory the policy (trained), reference and reward model
(frozen); each step pays one extra, greedy, generation per prompt (timed with the generate phase).
The clipped update with --ppo-epochs 1 and --minibatch-size = --batch-size is the paper's single REINFORCE
step (the ratio is 1, so nothing is clipped); the defaults give it the schedule DVPO and PPO run.

    python remax_baseline.py --rm ckpt/rm             # reuse stage A's reward model
"""
from dataclasses import dataclass

import torch

import reward
import rollout
import runtime
from runtime import arg


@dataclass
class Args(reward.RewardArgs):
    out: str = arg("ckpt/remax", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- the critic
class GreedyBaseline:
    """ReMax's critic is the greedy response: its reward is the baseline of the sampled one."""
    name, score_name, optimizers = "remax", "rm_score", ()
    describe = "greedy-response baseline, reward model"

    def __init__(self, args, reward_model):
        self.args, self.reward_model, self.models = args, reward_model.eval(), (reward_model,)

    def after_generate(self, policy, tok, r):
        self.greedy = rollout.generate(policy, tok, r.prompts, self.args.max_new_tokens,
                                       chunk=self.args.forward_batch_size, greedy=True)

    @torch.no_grad()
    def advantages(self, r, rewards):
        self.score = reward.reward_scores(self.reward_model, r, self.args.forward_batch_size)
        baseline = reward.reward_scores(self.reward_model, self.greedy, self.args.forward_batch_size)
        rewards = rollout.add_at_last_token(rewards, r.response_mask, self.score - baseline)
        return rollout.gae(rewards, torch.zeros_like(rewards), r.response_mask, self.args.gamma, 1.0)[0]  # return-to-go


def train(args: Args):
    return reward.train(args, lambda path, tok, device, prec:
                        GreedyBaseline(args, reward.load_reward_model(path, args, tok, device, prec.dtype)))


def main(argv=None):
    args = runtime.parse_args(Args, argv, __doc__)
    runtime.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
