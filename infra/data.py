"""Preference data and prompts from local files or the hub, in the shapes people have, read and encoded the same
way by every stage (docs/DVPO.md §5.1).

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
import json
import os
import random

from infra import models, world
from infra.cli import UsageError
from infra.models import looks_local

HH_ASSISTANT = "Assistant:"


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
        elif os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UsageError(f"{flag} {path}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        elif os.path.isdir(path) or not looks_local(path):
            formats = (
                {f.rsplit(".", 1)[-1].lower() for f in os.listdir(path) if "." in f} & set(builders)
                if os.path.isdir(path)
                else set()
            )
            if len(formats) > 1:  # the hub's loader would read the files of one format and drop the others unnamed
                raise UsageError(
                    f"{flag} {path}: a folder of {', '.join(sorted(formats))} files; name one file, "
                    "or keep one format in the folder"
                )
            ds = datasets.load_dataset(path, split=split)
        else:
            raise UsageError(f"{flag} {path}: no such file")
        rows = list(ds)  # in the try: a dataset can decode its rows lazily
    except UsageError:
        raise
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: {not_utf8(path) if os.path.isfile(path) else 'not UTF-8 text'}") from None
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise UsageError(
            f"{flag} {path}: cannot read it "
            f"({bad_json_line(path) or type(e).__name__ + ': ' + (str(e).splitlines() or [''])[0][:200]})"
        ) from None
    if not rows:
        raise UsageError(f"{flag} {path}: no rows")
    return rows


def not_utf8(path):
    """'row N is not UTF-8 text' for the first line of a file that does not decode (a text file must be UTF-8)."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"row {i} is not UTF-8 text (byte {line[e.start]:#04x}); save the file as UTF-8"
    return "not UTF-8 text; save the file as UTF-8"


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
    if x is not None and not isinstance(x, str):
        raise BadRow(f"'{name}' is a {type(x).__name__}, not text")
    if not x or not x.strip():
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
    prompt, chosen, rejected = _normalise_pair(row)
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' are the same response: a tie teaches no preference")
    return prompt, chosen, rejected


def _normalise_pair(row):
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
        raise UsageError(
            f"{flag} {path}: needs columns "
            + " or ".join("/".join(n) for n in needed)
            + f" (columns: {', '.join(rows[0])})"
        )


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


# ---------------------------------------------------------------------------------------------- a trainer's prompts
def load_rl_prompts(args):
    """The policy's tokenizer and the prompt sets encoded by it, [(prompt, ids)], read and checked before any
    model loads (the embedded world built first when a default path needs it). Prompts that leave a response
    fewer of the model's positions than --max-new-tokens are dropped with a count."""
    if world.SFT_DIR in (args.policy, args.ref):
        world.ensure_world()
    tok = models.load_tokenizer(args.policy, "--policy")
    positions = models.position_limit(args.policy, "--policy")
    if args.ref:
        models.position_limit(args.ref, "--ref")  # a causal LM too
    if positions and args.max_new_tokens >= positions:
        raise UsageError(
            f"--max-new-tokens {args.max_new_tokens}: --policy {args.policy} has only {positions} positions"
        )
    room = (positions, args.max_new_tokens)
    if args.prompts == world.PROMPTS_TRAIN:  # a world is built only when a default path needs it, and only after
        world.ensure_world()  # the user's own files have been read, so a mistake in them costs no build
    prompts = load_prompts(args.prompts, args.split, "--prompts", tok, args.max_prompt_len, args.strict, room)
    if args.eval_prompts == world.PROMPTS_EVAL:
        world.ensure_world()
    eval_prompts = (
        load_prompts(
            args.eval_prompts,
            args.eval_split or args.split,
            "--eval-prompts",
            tok,
            args.max_prompt_len,
            args.strict,
            room,
        )[: args.eval_n]
        if args.eval_prompts
        else []
    )
    return tok, prompts, eval_prompts


class PromptSampler:
    """Endless epoch-shuffled prompt indices, with a state to checkpoint and resume from."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order, self.pos = n, random.Random(seed), [], 0

    def take(self, k):
        out = []
        for _ in range(k):
            if self.pos == len(self.order):
                self.order, self.pos = list(range(self.n)), 0
                self.rng.shuffle(self.order)
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self):
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, s):
        self.rng.setstate(s["rng"])
        self.order, self.pos = s["order"], s["pos"]
