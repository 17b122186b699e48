"""The flag blocks every stage shares, each declared once: data, memory, run, and the policy trainers' system flags.
A script's Args lists its algorithm's flags and inherits these (`--help` shows the script's own flags first).
"""

from dataclasses import dataclass

from infra import checkpoint, distributed, precision, world
from infra.cli import UsageError, arg, check_args


@dataclass
class DataFlags:
    split: str = arg("train", "split to read when a data or prompts path is a hub dataset or a DatasetDict folder")
    eval_split: str = arg(
        "", "split of the held-out data (--eval-data, --eval-prompts, evaluate.py's --pairs); empty: --split"
    )
    max_prompt_len: int = arg(
        256, "prompts longer than this many tokens (after the chat template) are dropped, with a count", ">= 0"
    )
    strict: bool = arg(False, "stop at the first bad row instead of skipping bad rows with a report")


@dataclass
class MemoryFlags:
    micro_batch_size: int = arg(
        0, "rows per forward/backward; gradients accumulate over the batch or minibatch (0: all of it)", ">= 0"
    )
    dtype: str = arg(
        "fp32", "fp32 | bf16 | fp16: frozen models stored in it; trained ones keep fp32 weights under autocast"
    )
    gradient_checkpointing: bool = arg(
        False, "recompute the trained models' activations in backward instead of storing them"
    )
    lora_r: int = arg(
        0,
        "LoRA rank: trained models train adapters, their base weights frozen in --dtype (0: full fine-tuning)",
        ">= 0",
    )
    lora_alpha: float = arg(16.0, "LoRA alpha: the adapters' update is scaled by alpha / r", "> 0")
    lora_dropout: float = arg(0.0, "dropout on the adapters' input (0 keeps the first PPO ratio exactly 1)", "[0, 1)")
    lora_targets: str = arg(
        "all-linear",
        "modules that get adapters: all-linear (every linear layer but the LM head) or comma-separated names, "
        "e.g. q_proj,v_proj",
    )
    optim: str = arg("adamw", "adamw | adamw8bit: AdamW, or bitsandbytes' 8-bit AdamW (pip install bitsandbytes)")


@dataclass
class RunFlags:
    seed: int = arg(0, "seed for python, numpy and torch", "[0, 4294967295]")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class PolicyFlags(DataFlags, MemoryFlags, RunFlags):
    """The system flags of every policy trainer (the online methods and DPO)."""

    policy: str = arg(
        world.SFT_DIR,
        "initial policy: a local folder or hub name of a causal LM; the default is the world's SFT policy",
    )
    ref: str = arg(
        "", "reference policy for the KL; empty: the initial policy (under --lora-r, the policy with its adapters off)"
    )
    eval_prompts: str = arg(world.PROMPTS_EVAL, "held-out prompts for the periodic gold evaluation; empty: none")
    forward_batch_size: int = arg(0, "responses per generate call and per no-grad forward (0: the whole batch)", ">= 0")
    logprob_chunk: int = arg(
        0,
        "token positions per fp32 log-softmax chunk, so [batch, length, vocab] fp32 logits never exist (0: off)",
        ">= 0",
    )
    eval_every: int = arg(25, "steps between held-out gold evaluations (and one at the start and the end)", ">= 1")
    eval_n: int = arg(200, "held-out prompts per evaluation", ">= 1")
    gold: str = arg(
        "auto",
        "vader | none | auto: score responses with the world's gold judge (VADER sentiment); auto: when the "
        "training data lie in a world's data folder, as it means nothing on other data",
    )
    save_every: int = arg(
        0, "steps between resumable checkpoints written atomically to --out (0: only the final policy)", ">= 0"
    )
    resume: bool = arg(
        False, "continue the run checkpointed in --out (same flags; raise --steps or --epochs to train longer)"
    )


@dataclass
class RLFlags(PolicyFlags):
    """The system flags of the online methods (dvpo.py, ppo_baseline.py, grpo_baseline.py, remax_baseline.py)."""

    prompts: str = arg(
        world.PROMPTS_TRAIN,
        "RL prompts: 'prompt' (text or messages), 'messages', or preference rows (infra/data.py); the default "
        "is the world's",
    )
    table_every: int = arg(50, "steps between printed tables of prompt, response, gold and the critic's score", ">= 1")
    fsdp: bool = arg(
        False,
        "under torchrun: shard the trained models' parameters, gradients and AdamW state over the processes "
        "(FSDP2) instead of a full replica on each (DDP)",
    )
    shard_frozen: bool = arg(
        False,
        "with --fsdp: shard the frozen models too (reference, GVM or reward model), gathered layer by layer in "
        "each forward",
    )
    share_base: bool = arg(
        True,
        "under --lora-r: a GVM or reward model that gvm.py --lora-r trained on the policy's base weights runs as an "
        "adapter on the policy's own base (PPO's critic too), not as a second copy",
    )


def check_policy_flags(args, method):
    """Before any work: every number in range, --gold and --optim known, --out writable and, with --resume, the
    run in --out a `method` run continued with the flags it was started with."""
    check_args(args)
    if args.gold not in ("auto", "vader", "none"):
        raise UsageError(f"--gold {args.gold}: choose one of auto, vader, none")
    precision.check_optimizer(args.optim)
    checkpoint.check_output_dir(args.out, "--out", args)
    if args.resume:
        checkpoint.check_resume(args, method)
        checkpoint.restore_interrupted(args.out)  # accepted: an interrupted save's last good output goes back


def check_rl_flags(args, method):
    """check_policy_flags, and the batch schedule: minibatches divide the batch, split evenly over the torchrun
    processes, and micro-batches divide each process's share of a minibatch."""
    check_args(args)
    if args.batch_size % args.minibatch_size:
        raise UsageError(f"--minibatch-size {args.minibatch_size} does not divide --batch-size {args.batch_size}")
    for problem in (
        distributed.check_divides(args.batch_size, "--batch-size"),
        distributed.check_divides(args.minibatch_size, "--minibatch-size"),
    ):
        if problem:
            raise UsageError(problem)
    share = args.minibatch_size // distributed.world()  # the responses of a minibatch each process computes on
    if args.micro_batch_size and share % args.micro_batch_size:
        raise UsageError(
            f"--micro-batch-size {args.micro_batch_size} does not divide --minibatch-size {args.minibatch_size}"
            + (f" over {distributed.world()} processes ({share} each)" if distributed.world() > 1 else "")
        )
    problem = distributed.check_flags(args.fsdp, args.lora_r, args.optim, args.shard_frozen)
    if problem:
        raise UsageError(problem)
    check_policy_flags(args, method)
