"""Stage A of the baselines: the Bradley–Terry reward model that PPO, GRPO and ReMax score responses with
(docs/DVPO.md §4). It trains on the same preference pairs as the GVM, with gvm.py's loop and data, and
reward_scores reads it at each response's last token. ppo_baseline.py, grpo_baseline.py and remax_baseline.py
share the flags in RewardFlags, so `--rm ckpt/rm` reuses one stage A for all of them.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gvm
import rollout
from infra import checkpoint, world
from infra.cli import UsageError, arg


@dataclass
class RewardFlags:
    """Stage A's flags, shared by the baselines that score with a reward model."""

    rm: str = arg("", "a reward model from an earlier run (ckpt/rm); empty: train one first (stage A)")
    data: str = arg(world.PAIRS_TRAIN, "stage A's preference pairs, the same default as gvm.py's --data")
    eval_data: str = arg("", "stage A's held-out pairs, as gvm.py's --eval-data")
    rm_out: str = arg("ckpt/rm", "stage A's output folder")
    rm_epochs: int = arg(3, "stage A's passes over the pairs (gvm.py's --epochs)", ">= 1")
    rm_lr: float = arg(1e-3, "stage A's AdamW learning rate (gvm.py's --lr)", "> 0")
    rm_batch_size: int = arg(32, "stage A's samples per step, two per pair (gvm.py's --batch-size)", ">= 2")


def bradley_terry_loss(chosen, rejected):
    """-log sigmoid(r_chosen - r_rejected), mean over pairs."""
    return -F.logsigmoid(chosen - rejected).mean()


class BradleyTerry(gvm.Objective):
    """The reward model's objective for gvm.train: the score is read at the last response token (EOS), the
    state s_T, and pairs stay together in a batch (chosen, rejected, chosen, ...)."""

    kind, pair_batches = "reward-model", True
    shown = {"accuracy": "eval/pairwise_acc_final", "margin": "eval/margin", "bt loss": "eval/bt_loss"}

    def loss(self, values, batch):
        T = batch["state_mask"].sum(1).long() - 1
        score = values[torch.arange(len(T)), T]
        chosen, rejected = score[0::2], score[1::2]
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {
            "loss/rm": loss.item(),
            "rm/accuracy": (chosen > rejected).float().mean().item(),
            "rm/margin": (chosen - rejected).mean().item(),
        }

    def weight(self, batch):
        """What the loss averages over: pairs."""
        return len(batch["labels"]) // 2

    def meta(self):
        return {"loss": "bradley-terry", "score": "value head at the last response token"}


def train_reward_model(out, device="auto", **flags):
    """Stage A: a Bradley-Terry reward model trained into `out` by gvm.py's loop (reward_model_args)."""
    return gvm.train(reward_model_args(out, device, **flags), BradleyTerry())


def reward_model_args(out, device="auto", **flags):
    """gvm.py's flags for stage A: its defaults (RewardFlags' --rm-epochs, --rm-lr, --rm-batch-size, the last
    checkpoint) where `flags` (gvm.Args fields) are silent."""
    defaults = {
        "epochs": RewardFlags.rm_epochs,
        "lr": RewardFlags.rm_lr,
        "batch_size": RewardFlags.rm_batch_size,
        "select": "last",
    }
    return gvm.Args(out=out, device=device, **{**defaults, **flags})


def reward_model_path(args):
    """--rm, or a reward model trained on --data with gvm.py's loop and the Bradley-Terry loss (stage A)."""
    if args.rm:
        return args.rm
    if args.resume and os.path.isfile(os.path.join(args.rm_out, gvm.META_FILE)):
        return args.rm_out  # stage A of the run being resumed
    train_reward_model(
        args.rm_out,
        args.device,
        model=args.policy,
        data=args.data,
        eval_data=args.eval_data,
        split=args.split,
        eval_split=args.eval_split,
        max_prompt_len=args.max_prompt_len,
        strict=args.strict,
        epochs=args.rm_epochs,
        lr=args.rm_lr,
        batch_size=args.rm_batch_size,
        micro_batch_size=args.micro_batch_size,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        optim=args.optim,
        fsdp=args.fsdp,
        seed=args.seed,
    )
    return args.rm_out


def load_reward_model(path, args, tok, device, dtype, policy=None):
    """The reward model in `path`, frozen, checked to share the policy's tokenizer. Given the LoRA policy, one that
    gvm.py --lora-r trained on the policy's base weights is a frozen adapter on the policy's own base
    (gvm.shared_value_model; not with --no-share-base); any other is a second copy of the base."""
    gvm.check_tokenizer(gvm.read_meta(path, "reward-model", "--rm"), tok, f"--rm {path}", args.policy, "--policy")
    return gvm.frozen_value_model(path, args, policy, device, dtype, "reward", "reward-model", "--rm")


def check_output(args):
    """Before any work: stage A's flags fit its pair batches, and its --rm-out can be written, unless --rm names a
    reward model."""
    if not args.rm and args.rm_batch_size % 2:
        raise UsageError(f"--rm-batch-size {args.rm_batch_size}: must be even (a pair's two samples share a batch)")
    if not args.rm:
        checkpoint.check_output_dir(args.rm_out, "--rm-out", args, also=[("--out", args.out)])


def reward_scores(reward_model, r, chunk=0):
    """The reward model's score of each response of a rollout, read at its last token (the state s_T), [B]."""
    return rollout.final_value(rollout.response_state_values(reward_model, r, chunk), r.response_mask)
