"""Constants and small builders the tests share (fixtures are in conftest.py)."""

import hashlib
import itertools
import json
import os

import pytest
import torch

import gvm
import rollout
from infra import data, models, precision, world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


TINY_WORLD = world.WorldConfig(n_train_prompts=60, n_eval_prompts=20, sft_steps=150, sft_batch=32, gen_batch=40)


def files_digest(root):
    h = {}
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if f == world.MARKER:
                continue  # holds the build time
            p = os.path.join(dirpath, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def batch_for(tok, pairs, max_len=64):
    samples = gvm.pair_samples(pairs, tok, max_len, "test")
    return samples, gvm.collate(samples, tok.pad_token_id)


PAIRS = [("the plot was", "very good .", "not good ."), ("i", "loved the film but the ending was dull .", "hated it .")]


def write_jsonl(path, rows):
    world.write_jsonl(path, rows)
    return str(path)


def bad_input_cases(tmp_path, sft):
    good = {"prompt": "the plot was", "chosen": "good .", "rejected": "bad ."}
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"prompt": "the plot was", "chosen": \n')
    return [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(malformed)], "malformed.jsonl: cannot read it"),
        (
            [
                "--strict",
                "--data",
                write_jsonl(tmp_path / "nochosen.jsonl", [good, {"prompt": "i", "rejected": "bad ."}]),
            ],
            "nochosen.jsonl: 1 bad rows (--strict): row 2: 'chosen' is missing or empty",
        ),
        (
            ["--strict", "--data", write_jsonl(tmp_path / "empty.jsonl", [good, {**good, "rejected": "  "}])],
            "empty.jsonl: 1 bad rows (--strict): row 2: 'rejected' is missing or empty",
        ),
        (["--data", write_jsonl(tmp_path / "allbad.jsonl", [{**good, "chosen": ""}])], "allbad.jsonl: no usable rows"),
        (
            ["--data", write_jsonl(tmp_path / "nocol.jsonl", [{"question": "x", "answer": "a"}])],
            "nocol.jsonl: needs columns chosen/rejected",
        ),
        (["--model", str(tmp_path / "no_model")], "--model"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--lam", "1.5"], "--lam"),
        (["--select", "accuracy"], "--select accuracy: must be last or one of acc_final, acc_mean, margin"),
    ]


def tiny_dvpo_argv(tiny_world, tiny_gvm, out, *extra):
    return [
        "--gvm",
        str(tiny_gvm),
        "--policy",
        str(tiny_world / "sft"),
        "--prompts",
        str(tiny_world / "data" / "prompts_train.jsonl"),
        "--eval-prompts",
        str(tiny_world / "data" / "prompts_eval.jsonl"),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--minibatch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--eval-every",
        "3",
        "--eval-n",
        "8",
        "--max-new-tokens",
        "16",
        *extra,
    ]


def other_tokenizer_gvm(tiny_world, folder):
    """A GVM whose tokenizer has one word fewer: token ids no longer line up with the policy's."""
    from transformers import LlamaConfig, LlamaModel

    tok = world.build_tokenizer(world.vocabulary()[:-1])
    model = gvm.ValueModel(
        LlamaModel(
            LlamaConfig(
                vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
            )
        )
    )
    gvm.save_value_model(model, tok, str(folder), {"kind": "gvm"})
    return str(folder)


def training_records(path):
    """metrics.jsonl without what depends on the clock or the process (time/*, RSS)."""
    return [
        {k: v for k, v in json.loads(x).items() if not k.startswith("time/") and not k.endswith("rss_bytes")}
        for x in path.read_text().splitlines()
    ]


# Tiny random-init GPT-2 / Llama / Qwen2 checkpoints with their own tokenizers, built here: nothing is downloaded.
_SUBJECTS = ["the movie", "the film", "this show", "the plot", "the acting", "the ending", "the story", "the music"]


_VERBS = ["was", "is", "felt", "seemed"]


_ADJS = ["good", "bad", "great", "dull", "boring", "funny", "slow", "brilliant", "awful", "fine"]


_JOINS = ["but", "and", "because", "although"]


# a few hundred deterministic review-like sentences, plus some punctuation / digits / newlines
CORPUS = [
    f"{s} {v} {a} {j} {s2} {v} {a2} ."
    for (s, v, a, j), s2, a2 in zip(
        itertools.product(_SUBJECTS, _VERBS, _ADJS, _JOINS),
        itertools.cycle(reversed(_SUBJECTS)),
        itertools.cycle(_ADJS[3:] + _ADJS[:3]),
    )
][:400]


CORPUS += ["I liked it!\nWould watch again: 10/10.", "Not my thing, sorry?\n\nRating: 3/10."]


LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# kind -> (special tokens, PreTrainedTokenizerFast kwargs, chat template)
_TOKENIZER_SPECS = {
    "gpt2": (
        ["<|endoftext|>"],
        dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
        None,
    ),
    "llama": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        LLAMA_TEMPLATE,
    ),
    "qwen2": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None),
        CHATML_TEMPLATE,
    ),
    "smollm2": (  # SmolLM2-Instruct: pad == EOS, and UNK is the base model's trained end-of-text
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"),
        CHATML_TEMPLATE,
    ),
}


# transformers 5's AutoTokenizer always re-creates a qwen2 folder's tokenizer as Qwen2Tokenizer, rebuilt from
# vocab+merges with this regex split + NFC; train with the same pipeline so the saved tokenizer.json is what loads.
QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_hf_tokenizer(kind, vocab_size=500):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, token_kwargs, chat_template = _TOKENIZER_SPECS[kind]
    tok = Tokenizer(models.BPE())
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)  # also registers `specials` as special added tokens
    if kind == "llama":  # prepend BOS when add_special_tokens=True, like Llama-3
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        **token_kwargs,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_tiny_model(kind, folder, seed=0):
    """A random-init GPT-2, Llama or Qwen2 with a byte-level BPE tokenizer that mimics the real family's special
    tokens and chat template (GPT-2: no pad, no template; Llama-3: no pad; Qwen2.5: pad, ChatML; SmolLM2: pad
    = EOS, a trained UNK, ChatML), saved to folder."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    tok = build_hf_tokenizer(kind)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=True, **ids
        )
        model_cls = GPT2LMHeadModel
    elif kind == "smollm2":
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **sizes, **ids)
        model_cls = LlamaForCausalLM
    elif kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **sizes, **ids)
        model_cls = LlamaForCausalLM
    elif kind == "qwen2":  # real Qwen has spare embedding rows beyond the tokenizer
        config = Qwen2Config(vocab_size=-(-len(tok) // 64) * 64, tie_word_embeddings=True, **sizes, **ids)
        model_cls = Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown kind {kind!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


FAMILIES = ("gpt2", "llama", "qwen2", "smollm2")


def pair_files(tiny_world, folder):
    """The tiny world's pairs in the three shapes people have: strings, UltraFeedback-style message lists and
    HH-RLHF transcripts."""
    rows = [json.loads(x) for x in (tiny_world / "data" / "pairs_train.jsonl").read_text().splitlines()][:24]

    def turns(p, a):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": a}]

    shapes = {
        "strings": rows,
        "messages": [
            {
                "prompt": r["prompt"],
                "chosen": turns(r["prompt"], r["chosen"]),
                "rejected": turns(r["prompt"], r["rejected"]),
            }
            for r in rows
        ],
        "hh": [
            {
                "chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['chosen']}",
                "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['rejected']}",
            }
            for r in rows
        ],
    }
    return {name: write_jsonl(folder / f"{name}.jsonl", r) for name, r in shapes.items()}


def rollout_of(tok, rows, pad_left=0, pad_right=0):
    """A Rollout of (prompt ids, response ids) rows in rollout.generate's layout: prompts left-padded to the
    longest + pad_left, responses right-padded to the longest + pad_right, cut after their first EOS."""
    P, R = max(len(p) for p, _ in rows) + pad_left, max(len(r) for _, r in rows) + pad_right
    ids = torch.full((len(rows), P + R), tok.pad_token_id)
    attention = torch.zeros(len(rows), P + R, dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        ids[b, P - len(p) : P + len(r)] = torch.tensor(p + r)
        attention[b, P - len(p) : P + len(r)] = 1
    response_mask = attention[:, P:].float()
    ended = torch.tensor([r[-1] == tok.eos_token_id for _, r in rows])
    return rollout.Rollout(ids, attention, response_mask, P, ended, ["?"] * len(rows), [""] * len(rows))


def kl_like_rewards(r):
    """Deterministic per-token rewards -0.01 * (t + 1) on each response's tokens."""
    return -0.01 * torch.arange(1, r.response_mask.shape[1] + 1).float()[None] * r.response_mask


def world_rows(tok):
    texts = [
        ("the plot was", " very good ."),
        ("i", " loved the film but the ending was dull ."),
        ("overall ,", " bad"),
    ]
    return [(data.prompt_ids(tok, p), data.response_ids(tok, x)[: -1 if x == " bad" else None]) for p, x in texts]


def pollute(model, tok):
    """Settings real checkpoints ship in generation_config.json (Qwen2.5-Instruct: repetition_penalty), and
    others a checkpoint may carry: each one would make samples differ from softmax(logits / T)."""
    model.generation_config.update(
        do_sample=True,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=4,
        top_k=3,
        top_p=0.5,
        temperature=0.2,
        max_new_tokens=2,
        bad_words_ids=[[tok.convert_tokens_to_ids(tok.tokenize(" the")[0])]],
    )
    return model


def step0_kl(policy, ref, tok, prec=None):
    prec = prec or precision.Precision("fp32", "cpu")
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i", "the ending was good but"] * 4, max_new_tokens=12)
    with prec.autocast():
        return (
            rollout.kl_k1(rollout.response_logprobs(policy, r), rollout.response_logprobs(ref, r)) * r.response_mask
        ).sum(1)


def one_line_error(capsys, call):
    """call() must exit 2 with one line on stderr, 'error: ...', and no traceback: that line."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def short_gpt2(families, folder, positions):
    """The GPT-2 family's tokenizer on a GPT-2 with only `positions` positions: longer inputs crash its embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = models.load_tokenizer(str(families / "gpt2"))
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=positions,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def randomise_adapters(model, seed=0):
    """A trained-looking adapter: LoRA's B starts at zero, so the adapted model would equal its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def lora_value_model(world_root, folder, kind):
    """A value model (kind gvm or reward-model) trained with --lora-r 4 on the world's SFT backbone: 6 steps at a
    high rate, enough for its adapter to differ from zero. Its adapter can sit on a LoRA policy's own base."""
    import reward

    pairs = str(world_root / "data" / "pairs_train.jsonl")
    flags = dict(model=str(world_root / "sft"), data=pairs, eval_data=pairs, max_steps=6, lr=1e-2, warmup_steps=0)
    flags.update(lora_r=4, eval_every=6, log_every=6)
    if kind == "gvm":
        gvm.train(gvm.Args(out=str(folder), **flags))
    else:
        reward.train_reward_model(str(folder), **flags)
    return folder
