"""--dtype and --optim: mixed precision with fp32 master weights (and fp16 loss scaling), AdamW or 8-bit AdamW."""

import torch

from infra import lora
from infra.cli import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """--dtype. fp32: every model in fp32. bf16 / fp16: frozen models are stored in that dtype (2 bytes a
    parameter, not 4); trained models keep fp32 master weights and AdamW state (16 bytes a parameter) and
    run forward and backward under autocast; fp16 also scales the loss against gradient underflow. One
    Precision per optimizer, since each loss scale follows its own gradients."""

    def __init__(self, name, device):
        if name not in DTYPES:
            raise UsageError(f"--dtype {name}: choose one of {', '.join(DTYPES)}")
        self.name, self.dtype, self.device = name, DTYPES[name], torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def loss_scale(self, prefix):
        """{prefix/loss_scale: the fp16 loss scale} for the step's metrics; nothing in fp32 and bf16."""
        return {f"{prefix}/loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}

    def step(self, opt, max_norm):
        """Unscale, clip the gradients of the parameters opt steps to max_norm, step (skipped by the scaler on
        inf/NaN gradients); the norm before clipping. Only opt's own: a shared base holds other models' adapters."""
        self.scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], max_norm)
        self.scaler.step(opt)
        self.scaler.update()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor of the global norm


OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params, lr, name="adamw", **kwargs):
    """AdamW over the parameters that train (requires_grad). --optim adamw8bit: bitsandbytes' 8-bit AdamW, both
    moments in 8 bits (2 bytes a parameter instead of 8; tensors under 4096 entries stay in fp32)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw8bit":
        return bitsandbytes(f"--optim {name}").optim.AdamW8bit(params, lr=lr, **kwargs)
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def bitsandbytes(flag):
    """The optional bitsandbytes package, or one line saying how to get it."""
    if flag.split()[-1] not in OPTIMIZERS:
        raise UsageError(f"{flag}: choose one of {', '.join(OPTIMIZERS)}")
    try:
        with lora.without_hub_kernels():
            import bitsandbytes as bnb
    except ImportError:
        raise UsageError(f"{flag}: needs bitsandbytes, an optional package (pip install bitsandbytes)") from None
    return bnb


def check_optimizer(name):
    """--optim names one of OPTIMIZERS exactly (and adamw8bit's package is installed)."""
    if name not in OPTIMIZERS:
        raise UsageError(f"--optim {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name != "adamw":
        bitsandbytes(f"--optim {name}")
