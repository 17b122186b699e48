"""Models, tokenizers and preference data from local files or the hub, in the shapes people have, loaded the
same way by every stage (docs/DVPO.md §5.1).

Preference rows (gvm.py --data, ppo_baseline.py --data), one of:
  prompt / chosen / rejected as strings                      (the embedded world, TRL "standard")
  chosen / rejected as chat message lists, prompt optional    (UltraFeedback-binarized, TRL "conversational")
  chosen / rejected full transcripts, no prompt column        (HH-RLHF: split at the common prefix)
Prompt rows (--prompts, --eval-prompts): a `prompt` string or message list, a `messages` conversation, or
any preference rows above (their prompt part, so RL prompts are encoded exactly as the GVM saw them).

A prompt that is a message list goes through the tokenizer's chat template with the generation prompt
appended; a string prompt is tokenized as it is (TRL's rule). Responses are the assistant's text + EOS.
"""
import collections
import hashlib
import json
import os

import torch

import distributed
import lora
from runtime import UsageError

PAD_TOKEN = "<|pad|>"  # added when a tokenizer has no pad token distinct from EOS; never sampled
HH_ASSISTANT = "Assistant:"


# ---------------------------------------------------------------------------------------------- models
def looks_local(path):
    """True for what can only be a local path (so a missing one is an error, not a hub lookup)."""
    return (path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)
            or os.path.isdir(path.split("/")[0]) and "/" in path  # ckpt/missing, when ckpt/ exists here
            or path.rsplit(".", 1)[-1].lower() in ("json", "jsonl", "parquet", "csv", "arrow"))


def tokenizer_fingerprint(tok):
    """Hash of the vocabulary, special tokens and chat template: two checkpoints may share token ids only if this matches."""
    vocab = sorted(tok.get_vocab().items())
    special = [tok.bos_token, tok.eos_token, tok.pad_token] + ([tok.chat_template] if tok.chat_template else [])
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def from_pretrained(load, name, flag, what):
    """load(name), with a missing folder, an unreachable hub or a damaged file as one line naming it."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if not os.path.isdir(name) and looks_local(name):
        raise UsageError(f"{flag} {name}: no such folder")
    try:
        return load(name)
    except Exception as e:  # OSError, ValueError, safetensors' and json's errors on a truncated file alike
        where = "the folder" if os.path.isdir(name) else "no such folder, and the hub"
        raise UsageError(f"{flag} {name}: {where} gave no {what} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:160]})") from None


def load_tokenizer(name, flag="--policy"):
    """A Hugging Face tokenizer with a pad token that is not EOS (§5.1): its UNK token when that differs from
    EOS, else a new PAD_TOKEN (load_model grows the embeddings for it). Cheap: load it first to check data."""
    from transformers import AutoTokenizer
    tok = from_pretrained(AutoTokenizer.from_pretrained, name, flag, "tokenizer")
    if tok.eos_token_id is None:
        raise UsageError(f"{flag} {name}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def position_limit(name, flag="--policy"):
    """The most positions the model's config allows (max_position_embeddings, n_positions, ...); 0 if it names none."""
    from transformers import AutoConfig
    config = from_pretrained(AutoConfig.from_pretrained, name, flag, "config")
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def load_model(name, tok, flag="--policy", causal_lm=True, dtype=torch.float32):
    """Any Hugging Face causal LM (local folder or hub name) in `dtype`, fitted to load_tokenizer's pad token
    and with dropout off (§5.4); causal_lm=False gives the headless backbone (AutoModel) value models sit on."""
    from transformers import AutoModel, AutoModelForCausalLM
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    model = from_pretrained(lambda n: auto.from_pretrained(n, dtype=dtype), name, flag, "model")
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
    softmax (suppressed_ids)."""
    n = model.get_input_embeddings().num_embeddings
    if len(tok) > n:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                emb.weight[n:] = emb.weight[:n].mean(0)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id


def eos_ids(tok, model):
    """Every EOS id the tokenizer and the model declare (Llama-3-Instruct: [128001, 128008, 128009];
    Qwen2.5-Instruct: [151645, 151643]): a response ends at the first of any of them."""
    ids = {tok.eos_token_id}
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        declared = getattr(config, "eos_token_id", None)
        ids.update(declared if isinstance(declared, (list, tuple)) else [declared])
    return sorted(i for i in ids if i is not None)


def suppressed_ids(tok):
    """Token ids the policy never samples and its softmax leaves out: the pad token ensure_pad added."""
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
    config's rates are kept aside and written back by save_pretrained."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if is_dropout(name, value):
                setattr(m, name, 0.0)
    if not hasattr(model, "config_dropout"):
        model.config_dropout = {}
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            for name, value in list(vars(config).items()):
                if is_dropout(name, value) and value:
                    model.config_dropout[(id(config), name)] = (config, name, value)
                    setattr(config, name, 0.0)
    return model


def save_pretrained(model, tok, folder, state_dict=None):
    """model.save_pretrained (and the tokenizer's), with the config's dropout rates as they were loaded:
    dropout is off while we train, not in the checkpoint a user fine-tunes next. A LoRA model is written
    merged, with its adapter in folder/adapter (lora.save). state_dict: the weights to write instead of the
    model's own (an FSDP2 model's, gathered by distributed.full_state_dict)."""
    kept = getattr(model, "config_dropout", {}).values()
    for config, name, value in kept:
        setattr(config, name, value)
    try:
        if lora.is_lora(model):
            lora.save(model, folder)
        else:
            model.save_pretrained(folder, state_dict=state_dict)
        if tok is not None:
            tok.save_pretrained(folder)
    finally:
        for config, name, _ in kept:
            setattr(config, name, 0.0)


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, tok, input_ids, attention_mask, max_new_tokens, temperature=1.0, greedy=False):
    """Continuations of left-padded prompts sampled from softmax(logits / temperature) itself (docs/DVPO.md §3), the
    policy whose log-probs the trainers compute. The model's generation_config is set aside for the call:
    generate() fills every setting left unset from it, so a checkpoint's repetition_penalty (Qwen2.5-Instruct),
    no_repeat_ngram_size, min_new_tokens or bad_words_ids would otherwise make samples off-policy. Stops on
    every EOS id the model declares; never samples suppressed_ids. greedy: the argmax continuation instead
    (ReMax's baseline). Returns prompt + continuation ids."""
    from transformers import GenerationConfig
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_ids(tok, model),
                              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              suppress_tokens=suppressed_ids(tok) or None)
    owner = model.get_base_model() if lora.is_lora(model) else model  # whose generate() reads generation_config
    declared, owner.generation_config = owner.generation_config, config
    try:
        # synced_gpus: under FSDP2 every rank must run as many forward passes as the longest rank's generation
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              synced_gpus=distributed.is_sharded(model))
    finally:
        owner.generation_config = declared


def continuations(tok, prompt_ids, response_ids):
    """The text each response adds to its prompt, so that prompt text + response text is the decoded whole
    (TRL's convention for prompt/chosen/rejected text: " music was long", not "music was long")."""
    prompts = tok.batch_decode(prompt_ids, skip_special_tokens=True)
    wholes = tok.batch_decode(torch.cat([prompt_ids, response_ids], 1), skip_special_tokens=True)
    alone = tok.batch_decode(response_ids, skip_special_tokens=True)
    return [w[len(p):] if w.startswith(p) else a for p, w, a in zip(prompts, wholes, alone)]


# ---------------------------------------------------------------------------------------------- rows
def load_rows(path, split="train", flag="--data"):
    """Rows of a local json/jsonl/parquet/csv/arrow file, a saved dataset folder, or a hub dataset."""
    import logging

    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)  # a parse error is reported once, below, as one line
    builders = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "arrow": "arrow"}
    try:
        if os.path.isfile(path):
            ext = path.rsplit(".", 1)[-1].lower()
            if ext not in builders:
                raise UsageError(f"{flag} {path}: unsupported file type (use json, jsonl, parquet, csv or arrow)")
            if os.path.getsize(path) == 0:
                raise UsageError(f"{flag} {path}: the file is empty")
            ds = datasets.load_dataset(builders[ext], data_files=path, split="train")
        elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                         ("dataset_info.json", "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(f"{flag} {path}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        elif os.path.isdir(path) or not looks_local(path):
            ds = datasets.load_dataset(path, split=split)
        else:
            raise UsageError(f"{flag} {path}: no such file")
    except UsageError:
        raise
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise UsageError(f"{flag} {path}: cannot read it ({bad_json_line(path) or type(e).__name__ + ': ' + (str(e).splitlines() or [''])[0][:200]})") from None
    rows = list(ds)
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    return rows


def bad_json_line(path):
    """'row N is not valid JSON (...)' for the first line of a JSON-lines file that does not parse; '' if every
    line parses or the file is not JSON lines (a whole-file JSON array)."""
    if not os.path.isfile(path) or path.rsplit(".", 1)[-1].lower() not in ("json", "jsonl"):
        return ""
    with open(path, errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
            return ""
        except ValueError as e:
            return f"not valid JSON: {e}"
    for i, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except ValueError as e:
            return f"row {i} is not valid JSON: {e}"
    return ""


class BadRow(Exception):
    """One row the loader cannot use; the message says why (the caller adds the row number)."""


class TooLong(Exception):
    """A row over a length limit, the message saying which ("prompt exceeds --max-prompt-len 256 tokens"):
    dropped and counted, or under --strict an error."""


class Rows(list):
    """Rows kept from a file, with their 1-based row numbers in it, so later reports name the right rows."""

    def __init__(self, values, numbers):
        super().__init__(values)
        self.numbers = numbers


def keep_good_rows(rows, normalise, where, strict):
    """normalise(row) for every row. Rows it rejects are reported by 1-based row number and skipped with a
    count, or stop the run under --strict; never silently dropped."""
    good, numbers, bad = [], [], []
    for i, row in zip(getattr(rows, "numbers", range(1, len(rows) + 1)), rows):
        try:
            good.append(normalise(row))
            numbers.append(i)
        except BadRow as e:
            bad.append(f"row {i}: {e}")
    shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not good:
        raise UsageError(f"{where}: no usable rows ({shown})")
    if bad and strict:
        raise UsageError(f"{where}: {len(bad)} bad rows (--strict): {shown}")
    if bad:
        print(f"{where}: skipped {len(bad)} of {len(rows)} rows: {shown}", flush=True)
    return Rows(good, numbers)


# ---------------------------------------------------------------------------------------------- shapes
def is_messages(x):
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


def text_of(x, name):
    if not isinstance(x, str) or not x.strip():
        raise BadRow(f"'{name}' is missing or empty")
    return x


def split_conversation(messages, name):
    """(the messages before the final assistant turn, that turn's text)."""
    if messages[-1].get("role") != "assistant":
        raise BadRow(f"'{name}' has no assistant turn at its end")
    return messages[:-1], text_of(messages[-1].get("content"), f"{name}'s assistant turn")


def split_common_prefix(chosen, rejected):
    """HH-RLHF transcripts: the prompt is the common prefix, cut after its last 'Assistant:' or, if it has
    none, at its last whitespace, so that neither response starts in the middle of a word."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prefix = chosen[:n]
    cut = prefix.rfind(HH_ASSISTANT)
    cut = cut + len(HH_ASSISTANT) if cut >= 0 else max(prefix.rfind(" "), prefix.rfind("\n"), 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def normalise_pair(row):
    """(prompt, chosen text, rejected text) from any preference-row shape; the prompt is a string or a
    message list."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if is_messages(chosen) or is_messages(rejected):
        if not (is_messages(chosen) and is_messages(rejected)):
            raise BadRow("'chosen' and 'rejected' must both be message lists")
        before_c, chosen = split_conversation(chosen, "chosen")
        before_r, rejected = split_conversation(rejected, "rejected")
        if before_c != before_r:
            raise BadRow("'chosen' and 'rejected' continue different conversations")
        if before_c:
            prompt = before_c
        elif is_messages(prompt):
            pass
        elif isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]  # a conversational row's prompt is a user turn
        else:
            raise BadRow("no prompt: neither a 'prompt' column nor turns before the assistant's")
        return prompt, chosen, rejected
    chosen, rejected = text_of(chosen, "chosen"), text_of(rejected, "rejected")
    if prompt is None and "prompt" not in row:
        prompt, chosen, rejected = split_common_prefix(chosen, rejected)
        if not prompt.strip():
            raise BadRow("'chosen' and 'rejected' share no prompt prefix")
        return prompt, text_of(chosen, "chosen (after the prompt)"), text_of(rejected, "rejected (after the prompt)")
    if not (isinstance(prompt, str) or is_messages(prompt)):
        raise BadRow("'prompt' is missing or neither text nor a message list")
    return prompt, chosen, rejected


def normalise_prompt(row):
    """The prompt of a prompt row or of a preference row."""
    if "chosen" in row and "rejected" in row:
        return normalise_pair(row)[0]
    if "prompt" in row:
        p = row["prompt"]
        return p if is_messages(p) else text_of(p, "prompt")
    if is_messages(row.get("messages")):
        m = row["messages"]
        return split_conversation(m, "messages")[0] if m[-1].get("role") == "assistant" else m
    raise BadRow("has no 'prompt' and no 'messages' conversation")


def check_columns(rows, path, flag, needed):
    cols = set(rows[0])
    if not any(set(n) <= cols for n in needed):
        raise UsageError(f"{flag} {path}: needs columns " + " or ".join("/".join(n) for n in needed)
                         + f" (columns: {', '.join(rows[0])})")


# ---------------------------------------------------------------------------------------------- encoding
def prompt_ids(tok, prompt):
    """Token ids of a prompt: a message list through the chat template with the generation prompt (the
    template adds its own BOS), a string through the tokenizer with its special tokens."""
    if isinstance(prompt, list):
        if not tok.chat_template:
            raise BadRow("is a conversation, but the tokenizer has no chat template")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(prompt)["input_ids"]


def response_ids(tok, response):
    """The response's tokens + EOS: what the policy emits after the prompt."""
    return tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def encode_prompt(tok, prompt, max_prompt_len, room=None):
    """A prompt's ids; TooLong over --max-prompt-len or, with room = (the model's positions, --max-new-tokens),
    when it leaves the response fewer positions than --max-new-tokens."""
    ids = prompt_ids(tok, prompt)
    if not ids:
        raise BadRow("the prompt has no tokens and the tokenizer adds no BOS")
    if max_prompt_len and len(ids) > max_prompt_len:
        raise TooLong(f"prompt exceeds --max-prompt-len {max_prompt_len} tokens")
    if room and room[0] and len(ids) + room[1] > room[0]:
        raise TooLong(f"prompt leaves fewer than --max-new-tokens {room[1]} of the model's {room[0]} positions")
    return ids


def encode_all(items, encode, where, strict):
    """encode(item) for each item. Items over a length limit (TooLong) are dropped with a printed count, or
    stop the run under --strict; items it cannot encode are reported as keep_good_rows does."""
    dropped = collections.Counter()

    def one(item):
        try:
            return encode(item)
        except TooLong as e:
            if strict:
                raise BadRow(f"its {e}") from None
            dropped[str(e)] += 1
            return None

    out = [x for x in keep_good_rows(items, one, where, strict) if x is not None]
    shown = "; ".join(f"{n} whose {why}" for why, n in dropped.items())
    if not out:
        raise UsageError(f"{where}: every row was dropped ({shown})")
    if dropped:
        print(f"{where}: dropped {sum(dropped.values())} of {len(items)} rows: {shown}", flush=True)
    return out


def load_pairs(path, split, flag, strict=False):
    """Preference rows of any shape as (prompt, chosen, rejected)."""
    rows = load_rows(path, split, flag)
    check_columns(rows, path, flag, [("chosen", "rejected")])
    return keep_good_rows(rows, normalise_pair, f"{flag} {path}", strict)


def load_prompts(path, split, flag, tok, max_prompt_len=0, strict=False, room=None):
    """Prompts and their token ids, [(prompt, ids)]: prompts over max_prompt_len tokens, or leaving the
    response less than room = (positions, max_new_tokens), dropped and counted (encode_prompt)."""
    rows = load_rows(path, split, flag)
    check_columns(rows, path, flag, [("prompt",), ("messages",), ("chosen", "rejected")])
    prompts = keep_good_rows(rows, normalise_prompt, f"{flag} {path}", strict)
    return encode_all(prompts, lambda p: (p, encode_prompt(tok, p, max_prompt_len, room)), f"{flag} {path}", strict)


def show(prompt):
    """A prompt as one line of text, for printed tables."""
    return prompt if isinstance(prompt, str) else " | ".join(f"{m['role']}: {m.get('content', '')}" for m in prompt)
