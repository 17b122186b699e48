"""Models and tokenizers from local folders or the hub, loaded, sampled and saved the same way by every stage:
a pad token that is not EOS, dropout off, sampling from the policy itself (docs/DVPO.md §5.1-5.4).
"""

import copy
import hashlib
import json
import os

import torch

from infra import distributed, gguf, lora
from infra.cli import UsageError

PAD_TOKEN = "<|pad|>"  # added when a tokenizer has no pad token distinct from EOS; never sampled


# ---------------------------------------------------------------------------------------------- models
def looks_local(path):
    """True for what can only be a local path (so a missing one is an error, not a hub lookup)."""
    return (
        path.startswith((".", "/", "~"))
        or path.count("/") > 1
        or os.path.exists(path)
        or os.path.isdir(path.split("/")[0])
        and "/" in path  # ckpt/missing, when ckpt/ exists here
        or path.rsplit(".", 1)[-1].lower() in ("json", "jsonl", "parquet", "csv", "arrow")
    )


def tokenizer_fingerprint(tok):
    """Hash of the vocabulary, special tokens and chat template: two checkpoints may share token ids only if this
    matches."""
    vocab = sorted(tok.get_vocab().items())
    special = [tok.bos_token, tok.eos_token, tok.pad_token] + ([tok.chat_template] if tok.chat_template else [])
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def from_pretrained(load, name, flag, what):
    """load(name), with a missing folder, an unreachable hub or a damaged file as one line naming it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if gguf.is_gguf(name):  # converted once into a plain folder beside it; under torchrun rank 0 converts
        if distributed.is_main():
            gguf.plain_folder(name, flag)
        distributed.barrier()
        name = gguf.plain_folder(name, flag)
    if not os.path.isdir(name) and looks_local(name):
        raise UsageError(f"{flag} {name}: no such folder")
    try:
        return load(name)
    except Exception as e:  # OSError, ValueError, safetensors' and json's errors on a truncated file alike
        where = "the folder" if os.path.isdir(name) else "no such folder, and the hub"
        raise UsageError(
            f"{flag} {name}: {where} gave no {what} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
        ) from None


def load_tokenizer(name, flag="--policy"):
    """A Hugging Face tokenizer with a pad token that is not EOS (§5.1): its UNK token when that differs from
    EOS, else a new PAD_TOKEN (load_model grows the embeddings for it). The choice stays inside the run:
    save_pretrained writes the tokenizer as it was loaded (tok.as_loaded). Cheap: load it first to check data."""
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer.from_pretrained, name, flag, "tokenizer")
    if tok.eos_token_id is None:
        raise UsageError(f"{flag} {name}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        as_loaded = copy.deepcopy(tok)
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token  # a real token: padding is masked by position, never by id
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        tok.as_loaded = as_loaded
    return tok


def position_limit(name, flag="--policy", causal_lm=True):
    """The most positions a causal LM's config allows (max_position_embeddings, n_positions, ...); 0 if it names
    none. Where a causal LM is expected (causal_lm), a value model's folder (gvm.py's, stage A's) or a config whose
    architectures hold no causal LM (a BERT encoder) is refused in one line."""
    from transformers import AutoConfig

    if causal_lm and os.path.isfile(os.path.join(name, "value_model.json")):
        raise UsageError(f"{flag} {name}: holds a value model (value_model.json), not a policy; name a causal LM")
    config = from_pretrained(AutoConfig.from_pretrained, name, flag, "config")
    architectures = getattr(config, "architectures", None) or []
    if causal_lm and architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UsageError(
            f"{flag} {name}: a {', '.join(architectures)}, not a causal LM "
            "(an architecture ending in ForCausalLM or LMHeadModel)"
        )
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def load_model(name, tok, flag="--policy", causal_lm=True, dtype=torch.float32):
    """Any Hugging Face causal LM (local folder or hub name) in `dtype`, fitted to load_tokenizer's pad token
    and with dropout off (§5.4); causal_lm=False gives the headless backbone (AutoModel) value models sit on."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if causal_lm else AutoModel
    # use_kernels=False: with the `kernels` package installed, transformers 5.x defaults to swapping layers' forwards
    # for kernels it may fetch from the hub; we keep the plain PyTorch forwards our log-probs are tested against
    load = lambda n: auto.from_pretrained(n, dtype=dtype, use_kernels=False)
    model = from_pretrained(load, name, flag, "model")
    grow_for_pad(tok, model)
    return disable_dropout(model)


def load_pretrained(name, flag="--policy", causal_lm=True, dtype=torch.float32):
    """load_tokenizer and load_model: (model, tokenizer)."""
    tok = load_tokenizer(name, flag)
    return load_model(name, tok, flag, causal_lm, dtype), tok


def grow_for_pad(tok, model):
    """§5.1: pad != EOS, or masking padding would also mask the EOS the policy must learn to emit. The
    embedding matrix grows only when load_tokenizer added a pad token whose id does not fit in the rows the
    model has. A grown row is the mean of the existing rows, not a random draw, so every copy of a model
    (policy, reference, a resumed run) gets the same one; the new token stays out of sampling and of the
    softmax (suppressed_ids). The configs' pad ids are the run's; save_pretrained writes the loaded ones."""
    n = model.get_input_embeddings().num_embeddings
    if len(tok) > n:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                emb.weight[n:] = emb.weight[:n].mean(0)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            set_for_run(model, config, "pad_token_id", tok.pad_token_id)


def set_for_run(model, config, name, value):
    """config.name = value while we train; save_pretrained writes back the value the checkpoint came with."""
    loaded = model.__dict__.setdefault("config_as_loaded", {})
    loaded.setdefault((id(config), name), (config, name, getattr(config, name, None)))
    setattr(config, name, value)


def eos_ids(tok, model):
    """Every EOS id the tokenizer and the model declare (Llama-3-Instruct: [128001, 128008, 128009];
    Qwen2.5-Instruct: [151645, 151643]): a response ends at the first of any of them."""
    ids = {tok.eos_token_id}
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        declared = getattr(config, "eos_token_id", None)
        ids.update(declared if isinstance(declared, (list, tuple)) else [declared])
    return sorted(i for i in ids if i is not None)


def suppressed_ids(tok):
    """Token ids the policy never samples and its softmax leaves out: the pad token load_tokenizer added. A reused
    UNK is a real token the policy may sample; it is masked only where it pads (by position)."""
    return [tok.pad_token_id] if tok.pad_token == PAD_TOKEN else []


def enable_checkpointing(model):
    """--gradient-checkpointing: recompute each layer's activations in backward (non-reentrant);
    transformers >= 5.x names it activation checkpointing, earlier releases gradient checkpointing."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def is_dropout(name, value):
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop")


def disable_dropout(model):
    """§5.4: dropout off everywhere: nn.Dropout modules, rates stored as floats on modules, and rates that
    some models read from their config inside forward (Falcon: hidden_dropout, attention_dropout). The
    config's rates are set for the run only (set_for_run): save_pretrained writes them back."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if is_dropout(name, value):
                setattr(m, name, 0.0)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        for name, value in list(vars(config).items()):
            if is_dropout(name, value) and value:
                set_for_run(model, config, name, 0.0)
    return model


def save_pretrained(model, tok, folder, state_dict=None):
    """model.save_pretrained (and the tokenizer's) as the checkpoint came: its tokenizer, pad ids and dropout
    rates as loaded (dropout is off and the pad is ours while we train, not in the checkpoint a user fine-tunes
    next). A LoRA model is written merged, with its adapter in folder/adapter (lora.save). state_dict: the
    weights to write instead of the model's own (an FSDP2 model's, gathered by distributed.full_state_dict)."""
    loaded = list(getattr(model, "config_as_loaded", {}).values())
    for_run = [(config, name, getattr(config, name)) for config, name, _ in loaded]
    for config, name, value in loaded:
        setattr(config, name, value)
    try:
        if lora.is_lora(model):
            lora.save(model, folder)
        else:
            model.save_pretrained(folder, state_dict=state_dict)
        if tok is not None:
            getattr(tok, "as_loaded", tok).save_pretrained(folder)
    finally:
        for config, name, value in for_run:
            setattr(config, name, value)


@torch.no_grad()
def sample(model, tok, input_ids, attention_mask, max_new_tokens, temperature=1.0, greedy=False):
    """Continuations of left-padded prompts sampled from softmax(logits / temperature) itself (docs/DVPO.md §3), the
    policy whose log-probs the trainers compute. The model's generation_config is set aside for the call:
    generate() fills every setting left unset from it, so a checkpoint's repetition_penalty (Qwen2.5-Instruct),
    no_repeat_ngram_size, min_new_tokens or bad_words_ids would otherwise make samples off-policy. Stops on
    every EOS id the model declares; never samples suppressed_ids. greedy: the argmax continuation instead
    (ReMax's baseline). Returns prompt + continuation ids."""
    from transformers import GenerationConfig

    sampling = (
        {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    )
    config = GenerationConfig(
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids(tok, model),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        suppress_tokens=suppressed_ids(tok) or None,
    )
    owner = model.get_base_model() if lora.is_lora(model) else model  # whose generate() reads generation_config
    declared, owner.generation_config = owner.generation_config, config
    try:
        # synced_gpus: under FSDP2 every rank must run as many forward passes as the longest rank's generation
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=distributed.is_sharded(model),
        )
    finally:
        owner.generation_config = declared


def continuations(tok, prompt_ids, response_ids):
    """The text each response adds to its prompt, so that prompt text + response text is the decoded whole
    (TRL's convention for prompt/chosen/rejected text: " music was long", not "music was long")."""
    prompts = tok.batch_decode(prompt_ids, skip_special_tokens=True)
    wholes = tok.batch_decode(torch.cat([prompt_ids, response_ids], 1), skip_special_tokens=True)
    alone = tok.batch_decode(response_ids, skip_special_tokens=True)
    return [w[len(p) :] if w.startswith(p) else a for p, w, a in zip(prompts, wholes, alone)]


# ---------------------------------------------------------------------------------------------- a trainer's models
def load_policy_and_reference(args, tok, device, prec):
    """Policy (trained; from --out when resuming) and reference (frozen, in --dtype), both for tok. Full
    fine-tuning: the policy in fp32, the reference a second copy. --lora-r: one copy of the base weights in
    --dtype, the policy's adapters on it, and the reference is the policy with its adapters off."""
    if tokenizer_fingerprint(load_tokenizer(args.ref or args.policy, "--ref")) != tokenizer_fingerprint(tok):
        raise UsageError(f"--ref {args.ref}: its tokenizer differs from the policy's ({args.policy})")
    if args.lora_r:
        base = load_model(args.policy, tok, "--policy", dtype=prec.dtype)
        policy = (
            lora.load_lora(base, os.path.join(args.out, lora.ADAPTER_DIR))
            if args.resume
            else lora.add_lora(base, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets)
        )
    else:
        policy = load_model(args.out if args.resume else args.policy, tok, "--policy")
    if args.lora_r and not args.ref:
        ref = lora.WithoutAdapters(policy)
    else:
        ref = load_model(args.ref or args.policy, tok, "--ref" if args.ref else "--policy", dtype=prec.dtype)
    ref.requires_grad_(False).eval()
    if args.gradient_checkpointing:
        enable_checkpointing(policy)
    return policy.to(device).train(), ref.to(device)
