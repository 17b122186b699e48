"""infra/gguf.py: a GGUF checkpoint becomes a plain Hugging Face folder once, that folder loads with plain
from_pretrained and gives the GGUF-loaded model's logits exactly, with the tokenizer's special tokens, vocabulary and
chat template as the file declares them; a changed file is reconverted, a damaged one is one line and leaves nothing.

The GGUF files are written here with gguf.GGUFWriter from a tiny random Llama, the way llama.cpp's
convert_hf_to_gguf.py writes one: llama tensor names, q/k rows permuted for its rope layout, a byte-level BPE ("gpt2")
vocabulary with merges, and F32 or Q8_0 weights."""

import json
import os
import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from helpers import ENV, REPO
from infra import gguf as ingguf
from infra.cli import UsageError

SPECIALS = {"unk_token": "<|endoftext|>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}
UNK, BOS, EOS, PAD = range(4)  # their ids, in that order: all distinct
WORDS = ["Ġthe", "Ġplot", "Ġwas", "Ġgood", "Ġnot", "Ġfilm", "the", "hello", "Ġworld"]  # byte-level spelled
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
IDS = torch.tensor([[BOS, 7, 270, 42, 250, 99, EOS, 123]])
TEXT = "<|im_start|>hello the plot was not good, 12345 world!<|im_end|>"


def vocabulary():
    """Special tokens, the 256 byte-level symbols, then the tokens of left-to-right merges spelling WORDS."""
    tokens, merges = list(SPECIALS.values()) + list(bytes_to_unicode().values()), []
    for word in WORDS:
        left = word[0]
        for ch in word[1:]:
            if f"{left} {ch}" not in merges:
                merges.append(f"{left} {ch}")
                tokens.append(left + ch)
            left += ch
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def tiny_llama(seed=0, tied=True):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocabulary()[0]),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped: q and k are permuted with different head counts
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=2**-17,  # exact in float32, as GGUF stores it
        rope_theta=10000.0,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # logits far from zero, so a wrong weight shows
    return model


def permute(w, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: q/k rows reordered for its rope layout (transformers'
    GGUF loader undoes it)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype=gguf.GGMLQuantizationType.F32):
    """Write model and the vocabulary as a llama GGUF file at path; 2-D weights in qtype (F32 or Q8_0)."""
    c = model.config
    tokens, types, merges = vocabulary()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    w.add_pad_token_id(PAD)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        base, suffix = name.rsplit(".", 1)
        data = t.numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, c.num_attention_heads, c.num_key_value_heads)
        gname = f"{names.get_name(base)}.{suffix}"
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def gguf_loaded(path):
    folder, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def check_same(folder, gguf_path):
    """The plain folder loads with plain from_pretrained and is the GGUF-loaded model and tokenizer: the same logits
    to the bit, special tokens, vocabulary, tokenization, chat template and generation ids."""
    want, want_tok = gguf_loaded(gguf_path)
    got = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    config = json.load(open(os.path.join(folder, "config.json")))
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    assert getattr(got.config, "quantization_config", None) is None and got.dtype == torch.float32
    assert torch.equal(logits(got), logits(want))
    assert {name: getattr(tok, name) for name in SPECIALS} == {name: getattr(want_tok, name) for name in SPECIALS}
    assert {name: getattr(tok, name) for name in SPECIALS} == SPECIALS
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK, BOS, EOS, PAD)
    assert tok.get_vocab() == want_tok.get_vocab() and len(tok) == len(vocabulary()[0])
    assert tok(TEXT)["input_ids"] == want_tok(TEXT)["input_ids"]
    assert tok.chat_template == want_tok.chat_template == TEMPLATE
    gen = json.load(open(os.path.join(folder, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (BOS, EOS, PAD)
    return got


def mtimes(folder):
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def converting(path, folder):
    return [f"converting {path} into a plain folder {folder} (once; later runs use it)"]


def test_is_gguf_and_what_passes_through(tmp_path):
    one, other = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    other.mkdir()
    (one / "m.gguf").write_bytes(b"GGUF")
    (other / "a.gguf").write_bytes(b"GGUF")
    (other / "b.gguf").write_bytes(b"GGUF")
    (tmp_path / "m.bin").write_bytes(b"")
    assert ingguf.is_gguf(one / "m.gguf") and ingguf.is_gguf(str(one))
    assert not ingguf.is_gguf(other) and not ingguf.is_gguf(tmp_path / "m.bin")
    assert not ingguf.is_gguf(tmp_path / "missing.gguf") and not ingguf.is_gguf(tmp_path / "empty")
    for path in (str(other), "HuggingFaceTB/SmolLM2-135M-Instruct", str(tmp_path / "missing.gguf")):
        assert ingguf.plain_folder(path) == path
    (one / "config.json").write_text("{}")  # a Hugging Face folder, whatever else it holds
    assert not ingguf.is_gguf(one) and ingguf.plain_folder(str(one)) == str(one)
    (one / "m-hf").mkdir()
    (one / "m-hf" / "notes.txt").write_text("mine")  # not a conversion: never replaced
    with pytest.raises(UsageError, match=r"^--policy .*m\.gguf: .*m-hf is in the way"):
        ingguf.plain_folder(str(one / "m.gguf"), flag="--policy")
    assert os.listdir(one / "m-hf") == ["notes.txt"]


def test_converts_once_into_a_plain_folder(tmp_path, capsys):
    model = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", model)
    folder = ingguf.plain_folder(path)
    assert folder == str(tmp_path / "tiny-hf")
    assert capsys.readouterr().out.splitlines() == converting(path, folder)
    got = check_same(folder, path)
    assert torch.equal(logits(got), logits(model))  # F32 and the rope permutation undone: the model written
    before = mtimes(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", ingguf.MARKER} <= set(
        before
    )
    assert ingguf.plain_folder(path) == folder and capsys.readouterr().out == ""
    assert mtimes(folder) == before and sorted(os.listdir(tmp_path)) == ["tiny-hf", "tiny.gguf"]


def test_a_folder_holding_the_gguf_works_the_same(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    path = write_gguf(ckpt / "policy.gguf", tiny_llama())
    folder = ingguf.plain_folder(str(ckpt))
    assert folder == str(ckpt / "policy-hf") and capsys.readouterr().out.splitlines() == converting(path, folder)
    check_same(folder, path)
    assert ingguf.is_gguf(ckpt)  # the plain folder beside the file changes nothing
    assert ingguf.plain_folder(str(ckpt)) == folder and capsys.readouterr().out == ""


def test_a_changed_gguf_is_reconverted(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama(seed=0))
    folder = ingguf.plain_folder(path)
    old = logits(AutoModelForCausalLM.from_pretrained(folder))
    new_model = tiny_llama(seed=1)
    write_gguf(path, new_model)  # same size: only the modification time tells
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert ingguf.plain_folder(path) == folder and capsys.readouterr().out.splitlines() == converting(path, folder)
    got = check_same(folder, path)
    assert torch.equal(logits(got), logits(new_model)) and not torch.equal(logits(got), old)
    assert sorted(os.listdir(tmp_path)) == ["m-hf", "m.gguf"]  # the old conversion moved aside, then removed


def test_a_quantised_gguf_is_dequantised(tmp_path):
    model = tiny_llama(tied=False)
    path = write_gguf(tmp_path / "q8.gguf", model, gguf.GGMLQuantizationType.Q8_0)
    got = check_same(ingguf.plain_folder(path), path)
    assert got.config.tie_word_embeddings is False
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.layers.1.self_attn.k_proj.weight"):
        w, w0 = got.state_dict()[name], model.state_dict()[name]
        assert not torch.equal(w, w0) and torch.allclose(w, w0, atol=0.02)  # Q8_0: one byte a weight, close


def test_a_damaged_gguf_is_one_line_and_leaves_nothing(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama())
    data = open(path, "rb").read()
    for damaged in (data[: len(data) // 2], data[:200], b"not a gguf file at all"):
        open(path, "wb").write(damaged)
        with pytest.raises(UsageError) as e:
            ingguf.plain_folder(path)
        assert str(e.value).startswith(f"--model {path}: cannot read it as a GGUF checkpoint (")
        assert "\n" not in str(e.value)
        assert os.listdir(tmp_path) == ["m.gguf"]


def test_without_the_gguf_package_it_says_what_to_install(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama())
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(UsageError) as e:
        ingguf.plain_folder(path, flag="--policy")
    assert str(e.value) == f"--policy {path}: a GGUF file; install the gguf package to convert it (pip install gguf)"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_a_read_only_folder_converts_into_the_cache(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    path = write_gguf(ro / "m.gguf", tiny_llama())
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(ro) else access(p, mode))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = ingguf.plain_folder(path)
    assert capsys.readouterr().out.splitlines() == converting(path, folder)
    assert os.path.dirname(folder) == str(tmp_path / "home" / ".cache" / "dvpo" / "gguf")
    assert re.fullmatch(r"[0-9a-f]{16}", os.path.basename(folder))
    check_same(folder, path)
    assert ingguf.plain_folder(path) == folder and capsys.readouterr().out == ""
    assert os.listdir(ro) == ["m.gguf"]


def test_the_source_may_be_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "tiny_gguf_models"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    path = write_gguf(pkg / "weights" / "tiny.Q8_0.gguf", tiny_llama(), gguf.GGMLQuantizationType.Q8_0)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert ingguf.find_source("tiny_gguf_models") == path
    assert ingguf.find_source(str(pkg / "weights")) == path
    with pytest.raises(UsageError, match=r"^json: the installed package ships no \.gguf file"):
        ingguf.find_source("json")
    with pytest.raises(UsageError, match=r"^no_such_package_here: no such file, folder or installed Python package$"):
        ingguf.find_source("no_such_package_here")
    with pytest.raises(UsageError, match=r"tiny_gguf_models: not a \.gguf file"):
        ingguf.find_source(str(pkg))


def test_cli_writes_the_folder_and_refuses_a_non_empty_out(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_llama())
    out = tmp_path / "plain"
    cmd = [sys.executable, "-m", "infra.gguf", path, "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"converting {path} into a plain folder {out}", str(out)]
    check_same(str(out), path)
    before = mtimes(out)
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.splitlines() == [f"error: --out {out}: exists and is not empty; name a new or empty folder"]
    assert mtimes(out) == before


def test_every_script_takes_a_gguf_where_it_takes_a_model(tmp_path, capsys):
    """models.from_pretrained converts a GGUF --model/--policy once; the run then loads the plain folder."""
    from infra import models

    model = tiny_llama()
    path = write_gguf(tmp_path / "tiny.gguf", model)
    policy, tok = models.load_pretrained(path, "--policy")
    assert capsys.readouterr().out.splitlines() == converting(path, str(tmp_path / "tiny-hf"))
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(policy(ids).logits[..., : model.config.vocab_size], model(ids).logits)
    assert models.position_limit(path, "--policy") == model.config.max_position_embeddings
    assert capsys.readouterr().out == ""  # converted once
