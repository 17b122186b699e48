"""Many processes under torchrun, on PyTorch's own engine (torch.distributed): the process group, this rank's
share of a batch or an evaluation, statistics over the global batch, and the trained models wrapped in DDP or
sharded by FSDP2. Started plainly (no WORLD_SIZE in the environment), every function here is the identity and
a script runs as one process, as before.

    torchrun --nproc-per-node 8 dvpo.py --gvm ckpt/gvm              # 8 processes, one GPU each, DDP
    torchrun --nproc-per-node 8 dvpo.py --gvm ckpt/gvm --fsdp       # trained states sharded over the 8 (FSDP2)

Flags stay global: --batch-size and --minibatch-size count the responses of all ranks, and each rank takes
1/N of every batch and minibatch, so N processes compute the update one process would (docs/scaling.md, Multi-GPU).
The trainers call these where they need the global batch, so the math (rollout.py) holds no process group.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a rank that died or hangs, then fails
_device = None  # this rank's device, once init has run


def world():
    """Number of processes: torchrun's WORLD_SIZE, readable before the process group exists (argument errors)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank():
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main():
    """Rank 0 alone prints, writes metrics and saves."""
    return rank() == 0


def init(device):
    """Join torchrun's process group (NCCL on CUDA, one device per local rank; gloo on CPU) and return this
    rank's device; ranks other than 0 print nothing to stdout. One process: `device` itself."""
    global _device
    if _device is not None or world() == 1:
        return _device or device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    _device = device
    return device


def close():
    """Tear the process group down once every rank got here: a rank that destroys it while another still has
    collectives in flight can take gloo's worker threads down with an abort."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------- global statistics
def all_reduce(x, op="sum"):
    """A tensor summed (or maxed: op="max") over ranks, as a new tensor."""
    if world() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return y


def mean_over_ranks(stats, maxima=()):
    """A dict of floats, each averaged over ranks (those named in `maxima` maxed): a metric of the global batch
    when every rank holds an equal share."""
    if world() == 1 or not stats:
        return stats
    sums = all_reduce(torch.tensor([float(v) for v in stats.values()], dtype=torch.float64, device=_device)).tolist()
    tops = [k for k in stats if k in maxima]  # the same order on every rank: the same code built the dict
    tops = dict(zip(tops, max_over_ranks([float(stats[k]) for k in tops])))
    return {k: tops[k] if k in tops else total / world() for k, total in zip(stats, sums)}


def max_over_ranks(values):
    """A list of floats, each the largest over ranks."""
    if world() == 1 or not values:
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=_device), "max").tolist()


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable Python objects)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- shares
def check_flags(fsdp, lora_r, optim, shard_frozen=False):
    """None, or why these flags do not go together."""
    if shard_frozen and not fsdp:
        return "--shard-frozen shards with FSDP2: add --fsdp"
    if fsdp and lora_r:
        return "--fsdp with --lora-r: LoRA trains too few parameters to need sharding; use one or the other"
    if fsdp and optim != "adamw":
        return (
            f"--fsdp with --optim {optim}: bitsandbytes' 8-bit AdamW does not take FSDP2's sharded parameters; "
            "use adamw"
        )
    if fsdp and world() == 1:
        return "--fsdp shards over torchrun's processes: start the script with torchrun, or leave --fsdp out"
    return None


def check_divides(n, flag, unit=1):
    """None if n splits into world() equal shares of whole `unit`s, else the message saying why not."""
    if n % (world() * unit):
        return f"{flag} {n}: must split evenly over the {world()} processes" + (
            f" in whole pairs (a multiple of {world() * unit})" if unit > 1 else f" (a multiple of {world()})"
        )
    return None


def my_share(items):
    """This rank's consecutive 1/world() of items (their count divisible by world())."""
    n = len(items) // world()
    return items[rank() * n : (rank() + 1) * n]


def padded_share(items, unit=1):
    """This rank's consecutive part of items (in whole units, e.g. pairs), padded by repeating its last unit to
    the length of the longest rank's part, so every rank runs the same number of forward passes (FSDP2 needs
    it); (part, number of real items). gather_shares undoes it."""
    units, k = len(items) // unit, world()
    per = -(-units // k)
    lo, hi = min(units, rank() * per), min(units, (rank() + 1) * per)
    part = items[lo * unit : hi * unit]
    last = part[-unit:] if part else items[:unit]
    return part + last * (per - (hi - lo)), (hi - lo) * unit


def gather_shares(part, n_real):
    """Every rank's real items of a padded_share, concatenated in rank order, on every rank."""
    return [x for p in gather_objects(list(part[:n_real])) for x in p]


# ---------------------------------------------------------------------------------------------- trained models
def wrap(model, fsdp=False):
    """A model that trains, as every rank trains it: DDP (a replica per rank, gradients averaged), or with
    fsdp FSDP2 (fully_shard on each decoder layer, then on the root: parameters, gradients and AdamW state
    sharded over the ranks, gathered layer by layer in forward and backward). FSDP2 shards in place, so build
    the optimizer after this. A frozen model is only ever sharded (--shard-frozen), and gives its gathered
    parameters back after each forward. One process: the model itself."""
    if world() == 1:
        return model
    if not fsdp:
        # gradient_as_bucket_view: gradients live in DDP's buckets, not in a second copy (16 bytes a parameter, not 20)
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[_device.index] if _device.type == "cuda" else None, gradient_as_bucket_view=True
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_device.type, (world(),))  # explicit: a mesh on the default accelerator breaks gloo
    layers = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    for m in model.modules():
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not any(p.requires_grad for p in model.parameters()):  # frozen: no backward comes to reshard the root group
        model.register_forward_hook(lambda module, args, output: module.reshard())
    return model


def shard_frozen(*models):
    """--shard-frozen: each frozen model not yet sharded (a LoRA reference shares the policy's) sharded by FSDP2."""
    for m in {id(m): m for m in models}.values():
        if not any(p.requires_grad for p in m.parameters()) and not is_sharded(m):
            wrap(m, fsdp=True)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model):
    """Put an FSDP2 model's parameters back into their shards: a forward without backward (generation,
    evaluation) leaves the root's gathered, and state dicts read the sharded ones. True if the model is sharded."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.reshard()
    return bool(sharded)


def full_state_dict(model):
    """A sharded model's full state dict on rank 0's CPU (every rank must call it: it gathers), None on the
    others; None for a model that is not sharded (save the model itself)."""
    if not reshard(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if k in names} if is_main() else None  # a tied weight once, as saved unsharded


def optimizer_state(model, opt):
    """The optimizer's state to checkpoint: as it is (it is the same on every rank under DDP), or under FSDP2
    gathered to full tensors (every rank must call it)."""
    if not reshard(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state):
    """Undo optimizer_state: under FSDP2, each rank keeps its shard of the full tensors."""
    if not reshard(model):
        return opt.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def trained_state(model):
    """{name: tensor} of the parameters that train, whole: gathered under FSDP2 (every rank must call it; the
    tensors are whole on rank 0, the one that saves)."""
    full = full_state_dict(model)
    return {n: full[n] if full is not None else p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trained_state(model, state):
    """Load trained_state's tensors into the model (each rank keeps its shard under FSDP2); (missing, unexpected)."""
    if not reshard(model):
        return model.load_state_dict(state, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
