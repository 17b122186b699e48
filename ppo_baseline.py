"""The PPO baseline (DVPO.md §4): a Bradley–Terry reward model trained on the same preference pairs as the
GVM (stage A), then PPO whose critic starts as a copy of the reward model and keeps learning (stage B).
Same loop, flags, logs and outputs as dvpo.py: diff the two files to see the algorithmic difference. In
memory: policy and critic (trained, each with its optimizer), reference and reward model (frozen).

    python ppo_baseline.py                    # stage A into ckpt/rm, then stage B into ckpt/ppo
    python ppo_baseline.py --rm ckpt/rm       # reuse a reward model
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gvm
import rollout
import world
from world import UsageError, arg


@dataclass
class Args(rollout.RLArgs):
    rm: str = arg("", "a reward model from an earlier run (ckpt/rm); empty: train one first (stage A)")
    data: str = arg(world.PAIRS_TRAIN, "stage A's preference pairs, the same default as gvm.py's --data")
    eval_data: str = arg("", "stage A's held-out pairs, as gvm.py's --eval-data")
    rm_out: str = arg("ckpt/rm", "stage A's output folder")
    rm_epochs: int = arg(3, "stage A's passes over the pairs (gvm.py's --epochs)")
    rm_lr: float = arg(1e-3, "stage A's AdamW learning rate (gvm.py's --lr)")
    rm_batch_size: int = arg(32, "stage A's samples per step, two per pair (gvm.py's --batch-size)")
    critic_lr: float = arg(3e-4, "AdamW learning rate of the critic, which has its own optimizer")
    vf_coef: float = arg(0.1, "coefficient of the critic's clipped value loss")
    cliprange_value: float = arg(0.2, "clip epsilon of the critic's value change")
    out: str = arg("ckpt/ppo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- stage A
def bradley_terry_loss(chosen, rejected):
    """-log sigmoid(r_chosen - r_rejected), mean over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


class BradleyTerry:
    """The reward model's objective for gvm.train: the score is read at the last response token (EOS), the
    state s_T, and pairs stay together in a batch (chosen, rejected, chosen, ...)."""
    kind, pair_batches = "reward-model", True

    def loss(self, values, batch):
        T = batch["state_mask"].sum(1).long() - 1
        score = values[torch.arange(len(T)), T]
        chosen, rejected = score[0::2], score[1::2]
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {"loss/rm": loss.item(), "rm/accuracy": (chosen > rejected).float().mean().item(),
                      "rm/margin": (chosen - rejected).mean().item()}

    def meta(self):
        return {"loss": "bradley-terry", "score": "value head at the last response token"}


def reward_model(args, tok, device):
    """Load --rm, or train one on --data with gvm.py's loop and the Bradley-Terry loss (stage A)."""
    path = args.rm
    if not path:
        gvm.train(gvm.Args(model=args.policy, data=args.data, eval_data=args.eval_data, split=args.split,
                           out=args.rm_out, epochs=args.rm_epochs, lr=args.rm_lr, batch_size=args.rm_batch_size,
                           seed=args.seed, device=args.device), BradleyTerry())
        path = args.rm_out
    model, _, meta = gvm.load_value_model(path, device, kind="reward-model", flag="--rm")
    if meta.get("tokenizer_fingerprint") != world.tokenizer_fingerprint(tok):
        raise UsageError(f"--rm {path}: trained with another tokenizer than --policy {args.policy}")
    return model


# ---------------------------------------------------------------------------------------------- the critic
def clipped_value_loss(vpred, old_values, returns, mask, cliprange_value):
    """1/2 * mean over response tokens of max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old)."""
    vclipped = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    loss = 0.5 * rollout.masked_mean(torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2), mask)
    clipfrac = rollout.masked_mean(((vclipped - returns) ** 2 > (vpred - returns) ** 2).float(), mask)
    return loss, clipfrac


class LearnedCritic:
    """PPO's critic (§4): a copy of the reward model, trained online by its own optimizer on a clipped value
    loss; the frozen reward model scores each response at its last token."""
    name, score_name, describe = "ppo", "rm_score", "critic trained from the reward model"

    def __init__(self, args, reward_model):
        self.args, self.reward_model = args, reward_model.requires_grad_(False).eval()
        self.critic = copy.deepcopy(reward_model).requires_grad_(True).train()
        self.opt = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr, eps=1e-5)
        self.models, self.optimizers = (self.reward_model, self.critic), (self.opt,)

    @torch.no_grad()
    def advantages(self, r, rewards):
        P, T = r.prompt_len, r.response_mask.sum(1).long()
        self.score = self.reward_model(r.input_ids, r.attention_mask)[:, P - 1:].gather(1, T[:, None]).squeeze(1)
        last = F.one_hot(T - 1, rewards.shape[1]).to(rewards.dtype)
        self.old_values = self.critic(r.input_ids, r.attention_mask)[:, P - 1:-1] * r.response_mask  # V(s_0..s_{R-1})
        adv, self.returns = rollout.gae(rewards + self.score[:, None] * last, self.old_values, r.response_mask,
                                        self.args.gamma, self.args.lam)
        return adv

    def minibatch_step(self, idx, mb):
        vpred = self.critic(mb.input_ids, mb.attention_mask)[:, mb.prompt_len - 1:-1]
        loss, clipfrac = clipped_value_loss(vpred, self.old_values[idx], self.returns[idx], mb.response_mask,
                                            self.args.cliprange_value)
        self.opt.zero_grad(set_to_none=True)
        (self.args.vf_coef * loss).backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.args.max_grad_norm)
        self.opt.step()
        return {"loss/value": loss.item(), "val/clipfrac": clipfrac.item(),
                "val/vpred": rollout.masked_mean(vpred, mb.response_mask).item()}


def train(args: Args):
    rollout.validate_rl(args)
    device = world.pick_device(args.device)
    world.seed_everything(args.seed)
    policy, ref, tok, prompts, eval_prompts = rollout.load_rl_models(args, device)
    critic = LearnedCritic(args, reward_model(args, tok, device))
    return rollout.rl_train(args, critic, policy, ref, tok, prompts, eval_prompts, device)


def main(argv=None):
    args = world.parse_args(Args, argv, __doc__)
    world.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
