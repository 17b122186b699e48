"""LoRA adapters (peft) for the trained models, so that the paper's 3B and 8B sizes fit one GPU.

A trained model keeps its base weights frozen (in --dtype) and trains low-rank adapters on every linear layer
of its decoder (peft's "all-linear": the output layer excluded). The policy's reference is the same model with
its adapters off, and PPO's reward model the critic's backbone with its adapters off, so neither costs a
second copy of the base weights. A checkpoint is written merged, W + (alpha / r) B A, as a plain
save_pretrained folder that the next stage and AutoModelForCausalLM.from_pretrained load with no project code,
with the adapter alone beside it in adapter/ (what --resume reads).
"""

import contextlib
import logging
import sys
import warnings

import torch

from infra.cli import UsageError

ADAPTER_DIR = "adapter"


@contextlib.contextmanager
def without_hub_kernels():
    """Import peft or bitsandbytes with no network call. On a CPU with AVX512-BF16, importing bitsandbytes (8-bit
    AdamW; peft imports it when installed) fetches a 4-bit kernel from the hub (kernels-community/quantization-
    bitsandbytes) when the `kernels` package is installed: a hub call that hangs where the network is unreachable.
    This project never runs 4-bit kernels, so `kernels` is unimportable for the duration (bitsandbytes falls back
    to its own code) and bitsandbytes' warning about it is silenced."""
    blocked = "kernels" not in sys.modules
    if blocked:
        sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        yield
    finally:
        if blocked:
            del sys.modules["kernels"]


def peft():
    with without_hub_kernels():
        import peft as module

    return module


def add_lora(model, r, alpha, dropout, targets="all-linear"):
    """model with LoRA adapters (B zero-initialised, so it starts as the base model exactly); only they train."""
    p = peft()
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores its linear layers transposed
    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = p.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings():  # peft calls a gradient-checkpointing query that transformers 5 renamed
            warnings.simplefilter("ignore", FutureWarning)
            return p.get_peft_model(model, config)
    except ValueError as e:  # no module of that name
        raise UsageError(f"--lora-targets {targets}: {str(e).splitlines()[0][:200]}") from None


def load_lora(model, folder):
    """model with the trainable adapter saved in folder (by a run being resumed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft().PeftModel.from_pretrained(model, folder, is_trainable=True)


def is_lora(model):
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class WithoutAdapters(torch.nn.Module):
    """The frozen twin of a LoRA model: the same base weights with the adapters off. It owns no parameters
    (the model is held outside the module tree), so it costs nothing and is counted once, in the model."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


def merged_state_dict(model):
    """The base model's state dict with each adapter merged into its layer, W + get_delta_weight, in the base's
    dtype, computed beside the model and leaving it as it is (merging in place and unmerging would round the
    frozen base that the reference still uses)."""
    layers = {
        name: m for name, m in model.get_base_model().named_modules() if isinstance(m, peft().tuners.lora.LoraLayer)
    }
    merged = {}
    with torch.no_grad():
        for key, value in model.get_base_model().state_dict().items():
            if ".lora_" in key:
                continue
            owner, _, leaf = key.rpartition(".base_layer.")
            if owner and leaf == "weight":
                delta = sum(layers[owner].get_delta_weight(a) for a in layers[owner].active_adapters)
                value = (value.float() + delta.float()).to(value.dtype)
            merged[key.replace(".base_layer.", ".")] = value
    return merged


def save(model, folder):
    """The merged model (save_pretrained) in folder, and the adapter in folder/adapter."""
    model.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(model))
    # the adapter alone: an embedding grown for a new pad token is in the merged folder, and data.load_model
    # grows a base's the same way
    model.save_pretrained(f"{folder}/{ADAPTER_DIR}", save_embedding_layers=False)
