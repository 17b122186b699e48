"""The PPO baseline (docs/DVPO.md §4): a Bradley–Terry reward model trained on the same preference pairs as the
GVM (stage A), then PPO whose critic starts as a copy of the reward model and keeps learning (stage B).
Same loop, flags, logs and outputs as dvpo.py: diff the two files to see the algorithmic difference. In
memory: policy and critic (trained, each with its optimizer), reference and reward model (frozen).

    python ppo_baseline.py                    # stage A into ckpt/rm, then stage B into ckpt/ppo
    python ppo_baseline.py --rm ckpt/rm       # reuse a reward model
"""
import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import gvm
import loop
import lora
import rollout
import runtime
import world
from runtime import arg


@dataclass
class Args(loop.RLArgs):
    rm: str = arg("", "a reward model from an earlier run (ckpt/rm); empty: train one first (stage A)")
    data: str = arg(world.PAIRS_TRAIN, "stage A's preference pairs, the same default as gvm.py's --data")
    eval_data: str = arg("", "stage A's held-out pairs, as gvm.py's --eval-data")
    rm_out: str = arg("ckpt/rm", "stage A's output folder")
    rm_epochs: int = arg(3, "stage A's passes over the pairs (gvm.py's --epochs)", ">= 1")
    rm_lr: float = arg(1e-3, "stage A's AdamW learning rate (gvm.py's --lr)", "> 0")
    rm_batch_size: int = arg(32, "stage A's samples per step, two per pair (gvm.py's --batch-size)", ">= 2")
    critic_lr: float = arg(3e-4, "AdamW learning rate of the critic, which has its own optimizer", "> 0")
    vf_coef: float = arg(0.1, "coefficient of the critic's clipped value loss", "> 0")
    cliprange_value: float = arg(0.2, "clip epsilon of the critic's value change", "> 0")
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

    def weight(self, batch):
        """What the loss averages over: pairs."""
        return len(batch["labels"]) // 2

    def meta(self):
        return {"loss": "bradley-terry", "score": "value head at the last response token"}


def reward_model_path(args):
    """--rm, or a reward model trained on --data with gvm.py's loop and the Bradley-Terry loss (stage A)."""
    if args.rm:
        return args.rm
    if args.resume and os.path.isfile(os.path.join(args.rm_out, gvm.META_FILE)):
        return args.rm_out  # stage A of the run being resumed
    gvm.train(gvm.Args(model=args.policy, data=args.data, eval_data=args.eval_data, split=args.split,
                       eval_split=args.eval_split, max_prompt_len=args.max_prompt_len, strict=args.strict,
                       out=args.rm_out, epochs=args.rm_epochs, lr=args.rm_lr, batch_size=args.rm_batch_size,
                       micro_batch_size=args.micro_batch_size, dtype=args.dtype,
                       gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, optim=args.optim, seed=args.seed, device=args.device),
              BradleyTerry())
    return args.rm_out


def load_reward_model(path, args, tok, device, dtype):
    gvm.check_tokenizer(gvm.read_meta(path, "reward-model", "--rm"), tok, f"--rm {path}", args.policy,
                        "python ppo_baseline.py --policy")
    return gvm.load_value_model(path, device, kind="reward-model", flag="--rm", dtype=dtype)[0]


def reward_model_and_critic(path, args, tok, device, prec):
    """(frozen reward model, trainable critic initialised from it). Full fine-tuning: two copies, the reward
    model in --dtype and the critic in fp32. --lora-r: one copy of the reward model's backbone in --dtype with
    the critic's adapters on it and a trained fp32 copy of the head; the reward model is that backbone with
    its adapters off and the original head."""
    rm = load_reward_model(path, args, tok, device, prec.dtype).requires_grad_(False)
    if not args.lora_r:
        return rm, load_reward_model(path, args, tok, device, torch.float32).requires_grad_(True)
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
    clipped value loss; the frozen reward model (in --dtype) scores each response at its last token."""
    name, score_name, describe = "ppo", "rm_score", "critic trained from the reward model"

    def __init__(self, args, reward_model, critic, device):
        self.args, self.reward_model, self.critic = args, reward_model.eval(), critic.train()
        if args.gradient_checkpointing:
            data.enable_checkpointing(self.critic.backbone)
        self.opt = rollout.make_optimizer(self.critic.parameters(), args.critic_lr, args.optim, eps=1e-5)
        self.prec = rollout.Precision(args.dtype, device)
        self.models, self.optimizers = (self.reward_model, self.critic), (self.opt,)

    @torch.no_grad()
    def advantages(self, r, rewards):
        P, T = r.prompt_len, r.response_mask.sum(1).long()
        chunk = self.args.forward_batch_size
        scores = rollout.in_chunks(lambda x: self.reward_model(x.input_ids, x.attention_mask), r, chunk)
        self.score = scores[:, P - 1:].gather(1, T[:, None]).squeeze(1)
        last = F.one_hot(T - 1, rewards.shape[1]).to(rewards.dtype)
        values = rollout.in_chunks(lambda x: self.critic(x.input_ids, x.attention_mask), r, chunk)
        self.old_values = values[:, P - 1:-1] * r.response_mask  # V(s_0..s_{R-1})
        adv, self.returns = rollout.gae(rewards + self.score[:, None] * last, self.old_values, r.response_mask,
                                        self.args.gamma, self.args.lam)
        return adv

    def minibatch_step(self, idx, mb):
        """One clipped value step, accumulated over micro-batches like the policy's (rollout.accumulated_step)."""
        def micro_loss(micro_idx, micro, n):
            rows = idx[micro_idx]
            vpred = self.critic(micro.input_ids, micro.attention_mask)[:, micro.prompt_len - 1:-1]
            loss, clipfrac = clipped_value_loss(vpred, self.old_values[rows], self.returns[rows], micro.response_mask,
                                                self.args.cliprange_value, n)
            return self.args.vf_coef * loss, {"loss/value": loss, "val/clipfrac": clipfrac,
                                              "val/vpred": (vpred.detach() * micro.response_mask).sum() / n}

        total, _ = rollout.accumulated_step(self.opt, self.prec, self.critic.parameters(), self.args.max_grad_norm,
                                            mb, self.args.micro_batch_size, micro_loss)
        return {**{k: float(v) for k, v in total.items()}, **self.prec.loss_scale("val")}

    def state_dict(self):
        """What trains (all of the critic, or under LoRA its adapters and head), its optimizer and loss scale."""
        trained = {n: p.detach() for n, p in self.critic.named_parameters() if p.requires_grad}
        return {"critic": trained, "optimizer": self.opt.state_dict(), "scaler": self.prec.scaler.state_dict()}

    def load_state_dict(self, s):
        missing, unexpected = self.critic.load_state_dict(s["critic"], strict=False)
        assert not unexpected and all(not p.requires_grad for n, p in self.critic.named_parameters() if n in missing)
        self.opt.load_state_dict(s["optimizer"])
        self.prec.scaler.load_state_dict(s["scaler"])


def train(args: Args):
    loop.validate_rl(args)
    if not args.rm:
        runtime.check_output_dir(args.rm_out, "--rm-out")
    device = runtime.pick_device(args.device)
    prec = rollout.Precision(args.dtype, device)
    runtime.seed_everything(args.seed)
    tok, prompts, eval_prompts = loop.load_rl_data(args)
    path = reward_model_path(args)
    critic = LearnedCritic(args, *reward_model_and_critic(path, args, tok, device, prec), device)
    policy, ref = loop.load_rl_models(args, tok, device, prec)
    return loop.rl_train(args, critic, policy, ref, tok, prompts, eval_prompts, device, prec)


def main(argv=None):
    args = runtime.parse_args(Args, argv, __doc__)
    runtime.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
