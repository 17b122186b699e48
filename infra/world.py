"""The embedded offline world: every script's default when no hub is reachable.

A seeded, deterministic stand-in for "a pretrained LM plus human preference data" (Gao et al. 2022; the DPO
paper's IMDB setup, docs/DVPO.md §6):
  corpus     short movie reviews from a small grammar (negation, intensifiers, "but" contrast), built from
             words that VADER's lexicon knows, so sentiment depends on how tokens interact;
  tokenizer  word-level, `tokenizers` wrapped as a transformers fast tokenizer, distinct BOS/EOS/PAD;
  SFT policy a tiny Llama trained on the corpus, saved with `save_pretrained` (ckpt/sft);
  prompts    review openings, split into RL-train and held-out (ckpt/data/prompts_*.jsonl);
  gold judge VADER's compound score of the decoded response: a real scorer nobody here wrote;
  pairs      two SFT samples per prompt, labelled by Bradley–Terry sampling on the gold score, optionally
             with a fraction of labels flipped (ckpt/data/pairs_*.jsonl: prompt / chosen / rejected).

    python -m infra.world                      # build into ckpt/ (any script also does this on first use)
    python -m infra.world --label-flip 0.25    # AlpacaFarm-style label noise

The same world around any causal LM (a local folder, a .gguf, or a hub name): the SFT policy is the model itself
(copied into OUT/sft as it came), the prompts are short English requests for a review or an opinion (REQUESTS,
shipped; a system turn asking for one short sentence and the request as the user's for a model with a chat
template, "Question: ...\nAnswer:" text otherwise), and the pairs
are two samples of the model per prompt, labelled by the same gold judge. A pair is kept only when both responses
ended (EOS) within --max-new-tokens: a response cut by the budget is never labelled or trained as finished.

    python -m infra.world --model ckpt/smollm2 --out ckpt/smol --max-new-tokens 64
"""

import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import infra.sigint  # noqa: F401  (first: a Ctrl-C while torch loads is one line, exit 130)

import torch

from infra import checkpoint, cli, distributed, gguf, models
from infra.cli import arg, parse_args, run_main

ROOT = "ckpt"
SFT_DIR = os.path.join(ROOT, "sft")
DATA_DIR = os.path.join(ROOT, "data")
PAIRS_TRAIN = os.path.join(DATA_DIR, "pairs_train.jsonl")
PAIRS_EVAL = os.path.join(DATA_DIR, "pairs_eval.jsonl")
PROMPTS_TRAIN = os.path.join(DATA_DIR, "prompts_train.jsonl")
PROMPTS_EVAL = os.path.join(DATA_DIR, "prompts_eval.jsonl")
MARKER = "world.json"  # written last: a data folder without it is an interrupted build


def is_world_data(path):
    """True for a file in a built world's data folder (its marker beside it): the gold judge applies."""
    return os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), MARKER))


def is_grammar_world(path):
    """True for a file in the data folder of a world this module's grammar wrote (the embedded world or one
    like it, not a world around a real model): its reviews can be checked against the grammar."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), MARKER)) as f:
            return "model" not in json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class WorldConfig:
    seed: int = arg(
        0, "seed of the grammar, the SFT policy's init and training, and the sampled pairs", "[0, 4294967295]"
    )
    n_train_prompts: int = arg(4000, "RL-train prompts; one preference pair is sampled on each", ">= 1")
    n_eval_prompts: int = arg(500, "held-out prompts; one preference pair is sampled on each", ">= 1")
    sft_steps: int = arg(1200, "SFT optimizer steps on freshly generated reviews", ">= 1")
    sft_batch: int = arg(64, "reviews per SFT step", ">= 1")
    sft_lr: float = arg(3e-3, "SFT AdamW peak learning rate (warmup, then cosine to a tenth)", "> 0")
    hidden: int = arg(64, "width of the SFT Llama", ">= 1")
    layers: int = arg(2, "layers of the SFT Llama", ">= 1")
    heads: int = arg(4, "attention heads of the SFT Llama", ">= 1")
    max_new_tokens: int = arg(
        48, "sampling budget of a pair's response; longer than any review the grammar writes", ">= 1"
    )
    bt_beta: float = arg(
        10.0, "Bradley-Terry sharpness: P(a preferred to b) = sigmoid(bt_beta * (gold_a - gold_b))", ">= 0"
    )
    label_flip: float = arg(
        0.0,
        "fraction of training preference labels flipped after sampling (AlpacaFarm-style noise; try 0.25); "
        "held-out labels stay unflipped",
        "[0, 1]",
    )
    gen_batch: int = arg(250, "prompts per generate() call while sampling pairs", ">= 1")


# ---------------------------------------------------------------------------------------------- lexicon
# Candidate words; the polar ones are kept and signed by VADER's own lexicon, the neutral ones must be absent.
ADJECTIVES = """good great excellent wonderful brilliant beautiful charming delightful enjoyable fantastic fun
funny gorgeous impressive lovely perfect powerful superb clever engaging fresh smart strong sweet thrilling
amazing awesome inspiring nice solid outstanding bad awful terrible boring dull horrible weak stupid silly
annoying painful poor ugly messy lame pathetic dreadful disappointing worthless confusing""".split()
NEUTRAL_ADJECTIVES = "long short slow loud quiet simple familiar dark old new different typical modern".split()
VERBS = [
    ("loved", "love"),
    ("liked", "like"),
    ("enjoyed", "enjoy"),
    ("admired", "admire"),
    ("hated", "hate"),
    ("disliked", "dislike"),
]
NOUNS = """movie film plot story acting script ending soundtrack music dialogue pacing cinematography lead
finale premise sequel screenplay editing direction cast camera lighting twist climax""".split()
INTENSIFIERS = "very really extremely incredibly so quite totally absolutely somewhat slightly".split()
NEGATIONS = ["not", "never"]
OPENERS = ["overall ,", "in short ,", "to me ,"]
WHEN = ["on sunday", "last night", "at home", "twice", "in the theater", "yesterday", "with my brother"]
FUNCTION_WORDS = "the was felt seemed it a an i did and but watched saw this as expected .".split()
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


@functools.lru_cache(maxsize=None)
def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_scores(texts):
    """The gold judge: VADER compound sentiment in [-1, 1] of each decoded response."""
    analyzer = vader()
    return [analyzer.polarity_scores(t)["compound"] for t in texts]


def lexicon_classes():
    lex = vader().lexicon
    classes = {
        "pos": [w for w in ADJECTIVES if lex.get(w, 0) > 0],
        "neg": [w for w in ADJECTIVES if lex.get(w, 0) < 0],
        "pos_verb": [v for v in VERBS if lex.get(v[0], 0) > 0],
        "neg_verb": [v for v in VERBS if lex.get(v[0], 0) < 0],
    }
    polar_in_neutral = [w for w in NEUTRAL_ADJECTIVES + NOUNS + FUNCTION_WORDS if w in lex]
    assert not polar_in_neutral, f"neutral words VADER scores: {polar_in_neutral}"
    return classes


# ---------------------------------------------------------------------------------------------- grammar
def article(next_word):
    return "an" if next_word[0] in "aeiou" else "a"


class Grammar:
    """Reviews of 1–3 sentences; a clause's polarity comes from its adjective or verb, flipped by "not",
    scaled by an intensifier, and "but" joins clauses of opposite polarity (VADER weighs the part after it)."""

    def __init__(self, rng: random.Random):
        self.rng, self.c = rng, lexicon_classes()

    def clause(self, polarity):
        r, c = self.rng, self.c
        if polarity == 0:
            return r.choice(
                [
                    f"the {r.choice(NOUNS)} was {r.choice(NEUTRAL_ADJECTIVES)}",
                    f"i watched it {r.choice(WHEN)}",
                    f"i saw this {r.choice(NOUNS)} {r.choice(WHEN)}",
                    f"it was {article(adj := r.choice(NEUTRAL_ADJECTIVES))} {adj} {r.choice(NOUNS)}",
                ]
            )
        negate = r.random() < 0.2  # "not bad" carries positive polarity
        sign = -polarity if negate else polarity
        adj = r.choice(c["pos"] if sign > 0 else c["neg"])
        past, base = r.choice(c["pos_verb"] if sign > 0 else c["neg_verb"])
        mod = f"{r.choice(INTENSIFIERS)} " if r.random() < 0.3 else ""
        noun = r.choice(NOUNS)
        kind = r.randrange(4)
        if kind == 0:
            verb, negation = r.choice(["was", "felt", "seemed"]), r.choice(NEGATIONS) + " " if negate else ""
            return f"the {noun} {verb} {negation}{mod}{adj}"
        if kind == 1 and not negate:
            return f"it was {article(mod or adj)} {mod}{adj} {noun}"
        if negate:
            return f"i did not {base} the {noun}"
        return f"i {'really ' if mod else ''}{past} the {noun}"

    def sentence(self):
        r = self.rng
        pol = r.choice([1, 1, -1, -1, 0])
        s = self.clause(pol)
        u = r.random()
        if u < 0.3 and pol != 0:
            s += " but " + self.clause(-pol if r.random() < 0.8 else pol)
        elif u < 0.45:
            s += " and " + self.clause(pol)
        return s

    def review(self):
        r = self.rng
        sents = [self.sentence() for _ in range(r.choice([1, 1, 2, 2, 3]))]
        text = " . ".join(sents) + " ."
        if r.random() < 0.15:
            text = f"{r.choice(OPENERS)} {text}"
        return text if len(text.split()) <= 40 else self.review()

    def prompt(self):
        """A review opening: the first 1–8 words of a review, never ending on a negation."""
        words = self.review().split()
        while True:
            k = self.rng.randint(1, min(8, len(words) - 2))
            if words[k - 1] not in NEGATIONS + ["did"]:
                return " ".join(words[:k])


@functools.lru_cache(maxsize=None)
def grammar_regex():
    """A regular expression for every review the grammar writes (slightly looser), to measure fluency."""

    def alt(words):
        return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"

    noun, adj, mod = alt(NOUNS), alt(ADJECTIVES + NEUTRAL_ADJECTIVES), alt(INTENSIFIERS)
    when = alt(WHEN)
    clause = (
        f"the {noun} (?:was|felt|seemed) (?:{alt(NEGATIONS)} )?(?:{mod} )?{adj}"
        f"|it was an? (?:{mod} )?{adj} {noun}|i did not {alt(v[1] for v in VERBS)} the {noun}"
        f"|i (?:really )?{alt(v[0] for v in VERBS)} the {noun}|i watched it {when}|i saw this {noun} {when}"
    )
    sentence = f"(?:{clause})(?: (?:but|and) (?:{clause}))?"
    return re.compile(f"(?:{alt(OPENERS)} )?{sentence}(?: \\. {sentence})* \\.")


def is_grammatical(text):
    """Whether a whole review (prompt + response) is one the grammar could have written."""
    return grammar_regex().fullmatch(text) is not None


def vocabulary():
    c = lexicon_classes()
    words = (
        c["pos"]
        + c["neg"]
        + NEUTRAL_ADJECTIVES
        + NOUNS
        + INTENSIFIERS
        + NEGATIONS
        + FUNCTION_WORDS
        + [w for v in VERBS for w in v]
        + " ".join(OPENERS + WHEN).split()
        + ["really"]
    )
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=128,
    )


# ---------------------------------------------------------------------------------------------- SFT policy
def build_sft(tok, grammar, cfg: WorldConfig, progress=True):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        top_k=0,
        top_p=1.0,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, cfg.sft_steps) / cfg.sft_steps)))
        ),
    )
    model.train()
    loss = torch.tensor(0.0)
    for _ in cli.progress(range(cfg.sft_steps), "world: SFT policy", progress, lambda: f"loss {loss.item():.3f}"):
        texts = [grammar.review() + f" {EOS}" for _ in range(cfg.sft_batch)]
        enc = tok(texts, padding=True, return_tensors="pt", padding_side="right")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model, loss.item()


@torch.no_grad()
def sample_responses(model, tok, prompts, max_new_tokens, batch_size, progress=True, desc="sampling"):
    """One response per prompt, sampled as the trainers sample (models.sample: temperature 1, no other logits
    processor). Returns (texts, ended_with_eos); a text continues its prompt, leading space included."""
    texts, ended = [], []
    for i in cli.progress(range(0, len(prompts), batch_size), desc, progress):
        enc = tok(prompts[i : i + batch_size], padding=True, return_tensors="pt", padding_side="left")
        response = models.sample(model, tok, enc.input_ids, enc.attention_mask, max_new_tokens)[
            :, enc.input_ids.shape[1] :
        ]
        texts += models.continuations(tok, enc.input_ids, response)  # generate pads a finished response
        ended += (response == tok.eos_token_id).any(1).tolist()
    return texts, ended


# ---------------------------------------------------------------------------------------------- pairs
def label_pairs(prompts, a, b, cfg: WorldConfig, rng: random.Random, flip):
    """Bradley–Terry labels from the gold judge; ties in gold and identical responses are dropped, as in
    binarized preference sets. A fraction `flip` of labels is flipped (annotator noise)."""
    ga, gb = gold_scores(a), gold_scores(b)
    rows = []
    for p, x, y, sx, sy in zip(prompts, a, b, ga, gb):
        if not x.strip() or not y.strip() or x == y or sx == sy:
            continue
        x_wins = rng.random() < 0.5 * (1 + math.tanh(cfg.bt_beta * (sx - sy) / 2))  # sigmoid, overflow-free
        if rng.random() < flip:
            x_wins = not x_wins
        (c, sc), (r, sr) = ((x, sx), (y, sy)) if x_wins else ((y, sy), (x, sx))
        rows.append({"prompt": p, "chosen": c, "rejected": r, "score_chosen": sc, "score_rejected": sr})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_world(root=ROOT, cfg: WorldConfig = None, progress=True):
    """Build the whole world into root/sft and root/data, atomically (temp folder, then rename)."""
    cfg = cfg or WorldConfig()
    if cfg.hidden % cfg.heads:
        raise cli.UsageError(f"--heads {cfg.heads} does not divide --hidden {cfg.hidden}")
    refuse_foreign_folders(root)
    t0 = time.time()
    print(
        f"building the embedded world into {root}/ (seed {cfg.seed}): corpus, tokenizer, SFT policy, "
        f"prompts, preference pairs",
        flush=True,
    )
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    grammar = Grammar(rng)
    tok = build_tokenizer(vocabulary())
    model, sft_loss = build_sft(tok, grammar, cfg, progress)

    prompts = []
    seen = set()
    while len(prompts) < cfg.n_train_prompts + cfg.n_eval_prompts:
        p = grammar.prompt()
        if p not in seen:
            seen.add(p)
            prompts.append(p)
    train_prompts, eval_prompts = prompts[: cfg.n_train_prompts], prompts[cfg.n_train_prompts :]

    torch.manual_seed(cfg.seed + 1)
    both = train_prompts + eval_prompts
    a, a_eos = sample_responses(model, tok, both, cfg.max_new_tokens, cfg.gen_batch, progress, "world: pairs (1/2)")
    b, b_eos = sample_responses(model, tok, both, cfg.max_new_tokens, cfg.gen_batch, progress, "world: pairs (2/2)")
    keep = [ea and eb for ea, eb in zip(a_eos, b_eos)]  # a response cut by max_new_tokens is not a review
    n = cfg.n_train_prompts

    def kept(lo, hi):
        return [[x for x, k in zip(xs[lo:hi], keep[lo:hi]) if k] for xs in (both, a, b)]

    pairs_train = label_pairs(*kept(0, n), cfg, rng, cfg.label_flip)
    pairs_eval = label_pairs(*kept(n, None), cfg, rng, 0.0)  # noise is in the training labels, not the test set

    gold = gold_scores(a)
    stats = {
        "vocab_size": len(tok),
        "sft_params": sum(p.numel() for p in model.parameters()),
        "sft_final_loss": round(sft_loss, 4),
        "sft_eos_rate": sum(a_eos) / len(a_eos),
        "sft_grammatical_rate": sum(is_grammatical(p + x) for p, x in zip(both, a)) / len(a),
        "sft_gold_mean": sum(gold) / len(gold),
        "sft_gold_frac_pos": sum(g > 0.05 for g in gold) / len(gold),
        "sft_gold_frac_neg": sum(g < -0.05 for g in gold) / len(gold),
        "n_prompts_train": len(train_prompts),
        "n_prompts_eval": len(eval_prompts),
        "n_pairs_train": len(pairs_train),
        "n_pairs_eval": len(pairs_eval),
        "label_agrees_with_gold": sum(r["score_chosen"] > r["score_rejected"] for r in pairs_train)
        / max(1, len(pairs_train)),
        "samples": [p + " |" + x for p, x in zip(both[:5], a[:5])],
        "build_seconds": round(time.time() - t0, 1),
    }

    os.makedirs(root, exist_ok=True)
    tmp = checkpoint.make_tmp_dir(root, "world")
    try:
        model.save_pretrained(os.path.join(tmp, "sft"))
        tok.save_pretrained(os.path.join(tmp, "sft"))
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        write_jsonl(os.path.join(data, "prompts_train.jsonl"), [{"prompt": p} for p in train_prompts])
        write_jsonl(os.path.join(data, "prompts_eval.jsonl"), [{"prompt": p} for p in eval_prompts])
        write_jsonl(os.path.join(data, "pairs_train.jsonl"), pairs_train)
        write_jsonl(os.path.join(data, "pairs_eval.jsonl"), pairs_eval)
        with open(os.path.join(data, MARKER), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "stats": stats}, f, indent=2)
        install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"world ready in {stats['build_seconds']}s: vocab {stats['vocab_size']}, SFT {stats['sft_params']:,} params "
        f"(loss {stats['sft_final_loss']}), pairs {stats['n_pairs_train']} train / {stats['n_pairs_eval']} held-out",
        flush=True,
    )
    return stats


# ---------------------------------------------------------------------------------------------- any causal LM
REQUESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requests.txt")  # experiments/make_requests.py
EMBEDDED_ONLY = ("sft_steps", "sft_batch", "sft_lr", "hidden", "layers", "heads")  # the tiny SFT Llama's


SYSTEM = "Answer in one short sentence."  # SmolLM2-135M: 72% of answers end within 64 tokens, 44% without it


def model_prompts(tok, n, seed):
    """n shipped requests in a seeded order, as the model is prompted: a system message asking for a short answer
    and the request as the user's (where the tokenizer has a chat template, and the template takes a system turn),
    "Question: ...\nAnswer:" text otherwise."""
    with open(REQUESTS) as f:
        requests = [line.strip() for line in f if line.strip()]
    if n > len(requests):
        raise cli.UsageError(f"--n-train-prompts + --n-eval-prompts = {n}: {REQUESTS} ships {len(requests)} requests")
    random.Random(seed).shuffle(requests)
    if not tok.chat_template:
        return [f"Question: {r}\nAnswer:" for r in requests[:n]]
    system = [{"role": "system", "content": SYSTEM}]
    try:
        tok.apply_chat_template(system + [{"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # a template without a system role (Gemma's raises)
        system = []
    return [system + [{"role": "user", "content": r}] for r in requests[:n]]


@torch.no_grad()
def sample_encoded(model, tok, prompts, max_new_tokens, batch_size, progress=True, desc="sampling"):
    """sample_responses for prompts in any shape data.prompt_ids reads (text or a message list): (texts, ended),
    ended meaning the response reached one of the model's EOS ids within max_new_tokens."""
    from infra import data  # data imports this module

    ids = [data.prompt_ids(tok, p) for p in prompts]
    eos = torch.tensor(models.eos_ids(tok, model))
    texts, ended = [], []
    for i in cli.progress(range(0, len(ids), batch_size), desc, progress):
        part = ids[i : i + batch_size]
        P = max(map(len, part))
        input_ids = torch.tensor([[tok.pad_token_id] * (P - len(x)) + x for x in part])
        mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in part])
        response = models.sample(model, tok, input_ids, mask, max_new_tokens)[:, P:]
        texts += models.continuations(tok, input_ids, response)
        ended += torch.isin(response, eos).any(1).tolist()
    return texts, ended


def copy_model_files(name, dst):
    """The model's own files into dst, as they came: a local folder's top-level files (a .gguf's converted folder),
    or a hub model's snapshot."""
    src = gguf.plain_folder(name, "--model") if gguf.is_gguf(name) else name
    if not os.path.isdir(src):
        from huggingface_hub import snapshot_download

        src = snapshot_download(name)
    os.makedirs(dst)
    for f in sorted(os.listdir(src)):
        if os.path.isfile(os.path.join(src, f)) and not f.endswith(".gguf") and f != gguf.MARKER:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


def build_model_world(name, root, cfg: WorldConfig, progress=True):
    """The world around causal LM `name`: root/sft (the model, as it came) and root/data (prompts and gold-labelled
    pairs of its own samples), atomically as build_world writes the embedded one."""
    from infra import data  # data imports this module

    refuse_foreign_folders(root)
    t0 = time.time()
    print(
        f"building a world around {name} into {root}/ (seed {cfg.seed}): {cfg.n_train_prompts} + "
        f"{cfg.n_eval_prompts} prompts, two samples each of at most {cfg.max_new_tokens} tokens",
        flush=True,
    )
    tok = models.load_tokenizer(name, "--model")
    positions = models.position_limit(name, "--model")
    model = models.load_model(name, tok, "--model").eval()
    prompts = model_prompts(tok, cfg.n_train_prompts + cfg.n_eval_prompts, cfg.seed)
    longest = max(len(data.prompt_ids(tok, p)) for p in prompts)
    if positions and longest + cfg.max_new_tokens > positions:
        raise cli.UsageError(f"--max-new-tokens {cfg.max_new_tokens}: --model {name} has only {positions} positions")
    torch.manual_seed(cfg.seed + 1)
    a, a_end = sample_encoded(model, tok, prompts, cfg.max_new_tokens, cfg.gen_batch, progress, "world: pairs (1/2)")
    b, b_end = sample_encoded(model, tok, prompts, cfg.max_new_tokens, cfg.gen_batch, progress, "world: pairs (2/2)")
    rng, n = random.Random(cfg.seed), cfg.n_train_prompts
    keep = [x and y for x, y in zip(a_end, b_end)]  # a response cut by the budget is not a finished one

    def kept(lo, hi):
        return [[x for x, k in zip(xs[lo:hi], keep[lo:hi]) if k] for xs in (prompts, a, b)]

    pairs_train = label_pairs(*kept(0, n), cfg, rng, cfg.label_flip)
    pairs_eval = label_pairs(*kept(n, None), cfg, rng, 0.0)
    if not pairs_train or not pairs_eval:
        raise cli.UsageError(
            f"--max-new-tokens {cfg.max_new_tokens}: {sum(keep)} of {len(keep)} prompts had both responses end within "
            "it, leaving no train or no held-out pair; raise it"
        )
    gold = gold_scores(a)
    stats = {
        "model": name,
        "chat": bool(tok.chat_template),
        "model_params": sum(p.numel() for p in model.parameters()),
        "eos_rate": (sum(a_end) + sum(b_end)) / (2 * len(prompts)),
        "pairs_dropped_truncated": len(keep) - sum(keep),
        "gold_mean": sum(gold) / len(gold),
        "gold_mean_ended": sum(g for g, e in zip(gold, a_end) if e) / max(1, sum(a_end)),
        "n_prompts_train": n,
        "n_prompts_eval": cfg.n_eval_prompts,
        "n_pairs_train": len(pairs_train),
        "n_pairs_eval": len(pairs_eval),
        "label_agrees_with_gold": sum(r["score_chosen"] > r["score_rejected"] for r in pairs_train) / len(pairs_train),
        "samples": [{"prompt": data.show(p), "response": x, "ended": e} for p, x, e in zip(prompts[:5], a, a_end)],
        "build_seconds": round(time.time() - t0, 1),
    }
    os.makedirs(root, exist_ok=True)
    tmp = checkpoint.make_tmp_dir(root, "world")
    try:
        copy_model_files(name, os.path.join(tmp, "sft"))
        folder = os.path.join(tmp, "data")
        os.makedirs(folder)
        write_jsonl(os.path.join(folder, "prompts_train.jsonl"), [{"prompt": p} for p in prompts[:n]])
        write_jsonl(os.path.join(folder, "prompts_eval.jsonl"), [{"prompt": p} for p in prompts[n:]])
        write_jsonl(os.path.join(folder, "pairs_train.jsonl"), pairs_train)
        write_jsonl(os.path.join(folder, "pairs_eval.jsonl"), pairs_eval)
        config = {"model": name, **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in EMBEDDED_ONLY}}
        with open(os.path.join(folder, MARKER), "w") as f:
            json.dump({"config": config, "stats": stats}, f, indent=2)
        install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"world ready in {stats['build_seconds']}s: {stats['model_params']:,} params, EOS within the budget "
        f"{stats['eos_rate']:.1%}, pairs {len(pairs_train)} train / {len(pairs_eval)} held-out "
        f"({stats['pairs_dropped_truncated']} prompts dropped for a truncated response)",
        flush=True,
    )
    return stats


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded_world")  # the default world, built here


def refuse_foreign_folders(root):
    """Never replace what a world build did not write: root/sft and root/data must be absent, empty or a world's."""
    for name, mine in (("sft", "config.json"), ("data", MARKER)):
        folder = os.path.join(root, name)
        if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, mine)):
            raise cli.UsageError(
                f"{folder}: exists and is not a world's {name} folder (no {mine}); build the world in another folder"
            )


def install(tmp, root):
    """Move a complete world from tmp into root, sft first and data last: data's marker says it is complete."""
    for name in ("sft", "data"):
        dst = os.path.join(root, name)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(os.path.join(tmp, name), dst)


def ensure_world(root=ROOT, progress=True):
    """Make the default world in root unless root/data holds a complete one: a copy of the one shipped with the
    code (SHIPPED: WorldConfig()'s world as this module builds it, so every clone starts from the same bytes,
    whatever its library versions), or, without it, a build from the seed. Under torchrun rank 0 makes it while
    the others wait."""
    if distributed.is_main() and not (
        os.path.exists(os.path.join(root, "data", MARKER)) and os.path.isdir(os.path.join(root, "sft"))
    ):
        if shipped_config() == dataclasses.asdict(WorldConfig()):
            copy_shipped_world(root)
        else:
            build_world(root, WorldConfig(), progress)
    distributed.barrier()


def shipped_config():
    """The WorldConfig the shipped world was built with, or None when there is none."""
    try:
        with open(os.path.join(SHIPPED, "data", MARKER)) as f:
            return json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return None


def copy_shipped_world(root):
    """Copy the shipped world into root/sft and root/data, atomically as build_world writes it (data last: its
    marker says the world is complete), never over folders a world did not write."""
    refuse_foreign_folders(root)
    print(
        f"copying the embedded world into {root}/ (shipped with the code; python -m infra.world rebuilds it "
        "from its seed)",
        flush=True,
    )
    os.makedirs(root, exist_ok=True)
    tmp = checkpoint.make_tmp_dir(root, "world")
    try:
        for name in ("sft", "data"):
            shutil.copytree(os.path.join(SHIPPED, name), os.path.join(tmp, name))
        install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class BuildArgs(WorldConfig):
    out: str = arg(ROOT, "folder that receives sft/ and data/")
    model: str = arg(
        "", "a causal LM (folder, .gguf or hub name) to build the world around; empty: the embedded tiny world"
    )


def main(argv=None):
    args = parse_args(BuildArgs, argv, __doc__)
    cfg = WorldConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WorldConfig)})

    def build():
        cli.check_args(args)
        checkpoint.check_writable(args.out, "--out")
        if not args.model:
            print(json.dumps(build_world(args.out, cfg), indent=2))
            return
        for name in EMBEDDED_ONLY:
            if getattr(args, name) != getattr(WorldConfig, name):
                flag = "--" + name.replace("_", "-")
                raise cli.UsageError(f"{flag}: sizes the embedded world's SFT Llama; with --model the model is the SFT")
        source, out = os.path.abspath(args.model), os.path.abspath(args.out)
        if os.path.exists(args.model) and (source == out or source.startswith(out + os.sep)):
            raise cli.UsageError(f"--out {args.out}: holds --model {args.model}; build the world in another folder")
        print(json.dumps(build_model_world(args.model, args.out, cfg), indent=2))

    run_main(build)


if __name__ == "__main__":
    main()
