"""LoRA adapters (peft) for the trained models, so that the paper's 3B and 8B sizes fit one GPU.

A trained model keeps its base weights frozen (in --dtype) and trains low-rank adapters on every linear layer
of its decoder (peft's "all-linear": the output layer excluded). The policy's reference is the same model with
its adapters off, and PPO's reward model the critic's backbone with its adapters off, so neither costs a
second copy of the base weights. A value model that gvm.py --lora-r trained on the same base (the GVM; PPO's
reward model, and the critic that starts as it) can be one more named adapter on that base (Adapter): then one
copy of the base weights serves every model of a run. A checkpoint is written merged, W + (alpha / r) B A, as a plain
save_pretrained folder that the next stage and AutoModelForCausalLM.from_pretrained load with no project code,
with the adapter alone beside it in adapter/ (what --resume reads).
"""

import contextlib
import hashlib
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


@contextlib.contextmanager
def requires_grad_kept(model):
    """peft's adapter switches (set_adapter, disable_adapter) also set which adapters train: the active one alone.
    With other models' adapters on the same base (a trained critic's), every parameter's flag is put back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


class WithoutAdapters(torch.nn.Module):
    """The frozen twin of a LoRA model: the same base weights with the adapters off. It owns no parameters
    (the model is held outside the module tree), so it costs nothing and is counted once, in the model."""

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        with requires_grad_kept(self.model), self.model.disable_adapter():
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
    # only the policy's own adapter: a GVM's, reward model's or critic's on the same base is theirs to save
    model.save_pretrained(
        f"{folder}/{ADAPTER_DIR}", save_embedding_layers=False, selected_adapters=[model.active_adapter]
    )


# ---------------------------------------------------------------------------------------------- one shared base
def base_fingerprint(model):
    """Hash of a backbone's weights (names, sizes, values rounded to bf16), adapters left out: a value model's
    adapter goes onto a policy's base only if the two match. Rounded, so that a GVM trained on the fp32 weights
    fits the same weights loaded in bf16 (its separate copy would be rounded to bf16 too). model: a backbone (a
    value model's), a causal LM (its backbone is hashed, not its LM head), either with LoRA adapters. Cached: a
    base never trains."""
    if "base_fingerprint" not in model.__dict__:
        backbone = (model.get_base_model() if is_lora(model) else model).base_model  # a causal LM's backbone
        h = hashlib.sha256()
        for key, t in sorted(backbone.state_dict().items()):
            if ".lora_" not in key:
                t = t.detach().reshape(-1).to("cpu", torch.bfloat16 if t.is_floating_point() else t.dtype)
                h.update(f"{key.replace('.base_layer.', '.')} {t.numel()}".encode())
                h.update(memoryview(t.contiguous().view(torch.uint8).numpy()))
        model.__dict__["base_fingerprint"] = h.hexdigest()[:16]
    return model.__dict__["base_fingerprint"]


def load_adapter(model, name, folder, trainable=False):
    """The adapter a value model saved in folder (gvm.py --lora-r: its backbone's adapter) added to the LoRA causal
    LM `model` as adapter `name`, on the same layers: the backbone's keys gain the causal LM's prefix
    (layers.0... -> model.layers.0...). Frozen unless trainable; the policy's adapter stays the active one."""
    p = peft()
    config = p.LoraConfig.from_pretrained(folder)
    config.inference_mode = not trainable
    prefix = model.get_base_model().base_model_prefix
    weights = {
        k.replace("base_model.model.", f"base_model.model.{prefix}.", 1): v
        for k, v in p.utils.load_peft_weights(folder, device="cpu").items()
    }
    # fork_rng: the new adapter's random initialisation, overwritten below, leaves the run's random stream as it was
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)
        model.add_adapter(name, config)
    loaded = p.set_peft_model_state_dict(model, weights, adapter_name=name)
    missing = [k for k in loaded.missing_keys if f".{name}." in k]
    if loaded.unexpected_keys or missing:
        raise UsageError(
            f"{folder}: the adapter does not fit the policy's layers "
            f"({len(missing)} missing, {len(loaded.unexpected_keys)} unexpected weights)"
        )
    dtype = model.get_base_model().dtype
    for _, param in adapter_parameters(model, name):
        if not trainable:  # a frozen adapter is stored as its base is (--dtype), a trained one in fp32 (peft's)
            param.data = param.data.to(dtype)
        param.requires_grad_(trainable)


def adapter_parameters(model, name):
    """[(name, parameter)] of the LoRA model's adapter `name` (peft names them ...lora_A.<name>.weight)."""
    return [(n, p) for n, p in model.named_parameters() if f".{name}." in n]


@contextlib.contextmanager
def active(model, name):
    """Forward passes of the LoRA model through its adapter `name` alone, then its previous adapter again."""
    before = model.active_adapter
    with requires_grad_kept(model):
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(before)


class Adapter(torch.nn.Module):
    """A value model's backbone as the named adapter `name` on a LoRA causal LM's base: the base's backbone (no LM
    head) run with that adapter alone. It owns the adapter's parameters (the very tensors the model holds, so an
    optimizer, a checkpoint and a tally see them once) and no base weight."""

    def __init__(self, model, name):
        super().__init__()
        self.__dict__["model"] = model  # held outside the module tree, as WithoutAdapters holds it
        self.name, self.config = name, model.config
        self.weights = torch.nn.ParameterDict({n.replace(".", "-"): p for n, p in adapter_parameters(model, name)})

    def active(self):
        return active(self.model, self.name)

    def forward(self, **kwargs):
        with self.active():
            return self.model.get_base_model().base_model(**kwargs)


def adapter_active(value_model):
    """Through a value model's backward as well as its forward: its adapter active if it is one on a shared base
    (gradient checkpointing recomputes the forward in backward), else nothing to do."""
    backbone = getattr(value_model, "backbone", None)
    return backbone.active() if isinstance(backbone, Adapter) else contextlib.nullcontext()
