"""The PPO baseline (docs/DVPO.md §4): a Bradley–Terry reward model trained on the same preference pairs as the
GVM (stage A), then PPO whose critic starts as a copy of the reward model and keeps learning (stage B).
Same loop, flags, logs and outputs as dvpo.py: diff the two files to see the algorithmic difference. In
memory: policy and critic (trained, each with its optimizer), reference and reward model (frozen).

    python ppo_baseline.py                    # stage A into ckpt/rm, then stage B into ckpt/ppo
    python ppo_baseline.py --rm ckpt/rm       # reuse a reward model
"""
import copy
from dataclasses import dataclass

import torch

import data
import distributed
import gvm
import lora
import reward
import rollout
import runtime
from runtime import arg


@dataclass
class Args(reward.RewardArgs):
    critic_lr: float = arg(3e-4, "AdamW learning rate of the critic, which has its own optimizer", "> 0")
    vf_coef: float = arg(0.1, "coefficient of the critic's clipped value loss", "> 0")
    cliprange_value: float = arg(0.2, "clip epsilon of the critic's value change", "> 0")
    freeze_critic: bool = arg(False, "keep the critic at the reward model's weights, untrained (the reward model serves as both): PPO with a frozen critic, to compare with DVPO's frozen GVM")
    out: str = arg("ckpt/ppo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


def reward_model_and_critic(path, args, tok, device, prec):
    """(frozen reward model, trainable critic initialised from it). Full fine-tuning: two copies, the reward
    model in --dtype and the critic in fp32. --lora-r: one copy of the reward model's backbone in --dtype with
    the critic's adapters on it and a trained fp32 copy of the head; the reward model is that backbone with
    its adapters off and the original head."""
    rm = reward.load_reward_model(path, args, tok, device, prec.dtype)
    if args.freeze_critic:
        return rm, rm
    if not args.lora_r:
        return rm, reward.load_reward_model(path, args, tok, device, torch.float32).requires_grad_(True)
    backbone = lora.add_lora(rm.backbone, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
    critic = gvm.ValueModel(backbone, head=copy.deepcopy(rm.head).float().requires_grad_(True))
    return gvm.ValueModel(lora.WithoutAdapters(backbone), head=rm.head), critic


# ---------------------------------------------------------------------------------------------- the critic
def clipped_value_loss(vpred, old_values, returns, mask, cliprange_value, n=None):
    """1/2 * sum over response tokens of max((V - R)^2, (V_clip - R)^2) / n, V_clip = V_old + clip(V - V_old);
    n defaults to the token count (the mean), as in rollout.ppo_loss."""
    n = mask.sum().clamp(min=1) if n is None else n
    vclipped = old_values + (vpred - old_values).clamp(-cliprange_value, cliprange_value)
    loss = 0.5 * (torch.max((vpred - returns) ** 2, (vclipped - returns) ** 2) * mask).sum() / n
    with torch.no_grad():
        clipfrac = (((vclipped - returns) ** 2 > (vpred - returns) ** 2).float() * mask).sum() / n
    return loss, clipfrac


class LearnedCritic:
    """PPO's critic (§4): the reward model's weights, in fp32, trained online by its own optimizer on a
    clipped value loss; the frozen reward model (in --dtype) scores each response at its last token. With
    --freeze-critic the critic is the reward model itself and nothing trains."""
    name, score_name, describe = "ppo", "rm_score", "critic trained from the reward model"

    def __init__(self, args, reward_model, critic, device):
        self.args, self.reward_model, self.critic = args, reward_model.eval(), critic
        self.frozen = critic is reward_model
        if self.frozen:
            self.describe, self.models, self.optimizers = "critic frozen at the reward model", (reward_model,), ()
            return
        self.critic.train()
        if args.gradient_checkpointing:
            data.enable_checkpointing(self.critic.backbone)
        self.trained = distributed.wrap(self.critic, args.fsdp)  # DDP or FSDP2 under torchrun; before the optimizer
        self.opt = rollout.make_optimizer(self.critic.parameters(), args.critic_lr, args.optim, eps=1e-5)
        self.prec = rollout.Precision(args.dtype, device)
        self.models, self.optimizers = (self.reward_model, self.critic), (self.opt,)

    @torch.no_grad()
    def advantages(self, r, rewards):
        self.score = reward.reward_scores(self.reward_model, r, self.args.forward_batch_size)
        values = rollout.in_chunks(lambda x: self.critic(x.input_ids, x.attention_mask), r, self.args.forward_batch_size)
        self.old_values = values[:, r.prompt_len - 1:-1] * r.response_mask  # V(s_0..s_{R-1})
        adv, self.returns = rollout.gae(rollout.add_at_last_token(rewards, r.response_mask, self.score),
                                        self.old_values, r.response_mask, self.args.gamma, self.args.lam)
        return adv

    def minibatch_step(self, idx, mb):
        """One clipped value step, accumulated over micro-batches like the policy's (rollout.accumulated_step)."""
        if self.frozen:
            return {}

        def micro_loss(micro_idx, micro, n):
            rows = idx[micro_idx]
            vpred = self.trained(micro.input_ids, micro.attention_mask)[:, micro.prompt_len - 1:-1]
            loss, clipfrac = clipped_value_loss(vpred, self.old_values[rows], self.returns[rows], micro.response_mask,
                                                self.args.cliprange_value, n)
            return self.args.vf_coef * loss, {"loss/value": loss, "val/clipfrac": clipfrac,
                                              "val/vpred": (vpred.detach() * micro.response_mask).sum() / n}

        total, _ = rollout.accumulated_step(self.opt, self.prec, self.critic.parameters(), self.args.max_grad_norm,
                                            mb, self.args.micro_batch_size, micro_loss)
        return {**{k: float(v) for k, v in total.items()}, **self.prec.loss_scale("val")}

    def state_dict(self):
        """What trains (all of the critic, or under LoRA its adapters and head), its optimizer and loss scale."""
        if self.frozen:
            return None
        return {"critic": distributed.trained_state(self.critic),
                "optimizer": distributed.optimizer_state(self.critic, self.opt), "scaler": self.prec.scaler.state_dict()}

    def load_state_dict(self, s):
        missing, unexpected = distributed.load_trained_state(self.critic, s["critic"])
        assert not unexpected and all(not p.requires_grad for n, p in self.critic.named_parameters() if n in missing)
        distributed.load_optimizer_state(self.critic, self.opt, s["optimizer"])
        self.prec.scaler.load_state_dict(s["scaler"])


def train(args: Args):
    return reward.train(args, lambda path, tok, device, prec:
                        LearnedCritic(args, *reward_model_and_critic(path, args, tok, device, prec), device))


def main(argv=None):
    args = runtime.parse_args(Args, argv, __doc__)
    runtime.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
