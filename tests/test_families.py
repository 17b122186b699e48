import copy
import json

import pytest
import torch

import dvpo
import evaluate
import gvm
import rollout
from helpers import FAMILIES, pair_files, pollute, step0_kl, training_records
from infra import data, lora, models, precision, world


def test_families_get_a_pad_token_that_is_not_eos_and_never_sample_it(families):
    for kind in FAMILIES:
        policy, tok = models.load_pretrained(str(families / kind))
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id, kind
        assert (
            policy.get_input_embeddings().num_embeddings >= len(tok) and policy.config.pad_token_id == tok.pad_token_id
        )
        added, unk = models.PAD_TOKEN, "<|endoftext|>"
        assert tok.pad_token == {"gpt2": added, "llama": added, "qwen2": unk, "smollm2": unk}[kind]
    policy, tok = models.load_pretrained(str(families / "gpt2"))
    with torch.no_grad():  # make the new, untrained pad token the likeliest next token everywhere
        policy.get_output_embeddings().weight[tok.pad_token_id] = 50 * policy.get_output_embeddings().weight.mean(0)
        policy.lm_head.bias = None
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was"] * 4, max_new_tokens=20)
    assert not (r.response_ids[r.response_mask.bool()] == tok.pad_token_id).any()
    # log-probs, like sampling, leave the pad token out of the softmax, or the ratio and the KL would use a
    # distribution the samples were not drawn from
    logits = rollout.logits_at_responses(policy, r)
    keep = torch.arange(logits.shape[-1]) != tok.pad_token_id
    ids = r.response_ids.masked_fill(r.response_mask == 0, 0)
    ref = torch.log_softmax(logits[..., keep], -1).gather(-1, (ids - (ids > tok.pad_token_id).long())[..., None])
    for chunk in (0, 7):
        logp, entropy = rollout.response_logprobs(policy, r, with_entropy=True, chunk=chunk)
        assert torch.allclose(logp, ref.squeeze(-1) * r.response_mask, atol=1e-5) and torch.isfinite(entropy).all()


def test_a_reused_real_token_as_pad_is_a_token_where_sampled_and_masked_only_where_it_pads(families):
    """SmolLM2's pad is its UNK, the base model's trained end-of-text: the policy may sample it, and then it is a
    response token like any other (in the mask, in the softmax); only the positions that pad are masked."""
    policy, tok = models.load_pretrained(str(families / "smollm2"))
    assert tok.pad_token == "<|endoftext|>" and models.suppressed_ids(tok) == []
    favoured = [tok.pad_token_id, tok.eos_token_id]  # likely, equally: responses sample the pad and end unevenly
    policy.get_output_embeddings().register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor(favoured), torch.full((*out.shape[:-1], 2), 4.0))
    )
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was"] * 8, max_new_tokens=12)
    sampled = (r.response_ids == tok.pad_token_id) & r.response_mask.bool()
    assert sampled.any() and (r.response_mask == 0).any()  # the pad both sampled and padding
    lengths = r.response_mask.sum(1)
    assert torch.equal(r.response_mask, (torch.arange(12)[None] < lengths[:, None]).float())  # masks by position
    logits = rollout.logits_at_responses(policy, r)
    full = torch.log_softmax(logits.float(), -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(rollout.response_logprobs(policy, r), full * r.response_mask, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("shape", ["strings", "messages", "hh"])
def test_families_round_trip_through_gvm_and_dvpo(families, tiny_world, tmp_path, kind, shape, capsys):
    files = pair_files(tiny_world, tmp_path)
    model = str(families / kind)
    gvm_argv = [
        "--model",
        model,
        "--data",
        files[shape],
        "--eval-data",
        files[shape],
        "--out",
        str(tmp_path / "gvm"),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--eval-every",
        "3",
    ]
    if shape == "messages" and kind == "gpt2":  # a conversation needs a chat template, which GPT-2 has not
        with pytest.raises(SystemExit) as e:
            gvm.main(gvm_argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "gvm").exists()
        assert "no usable rows (row 1: is a conversation, but the tokenizer has no chat template" in err
        return
    gvm.main(gvm_argv)
    meta = json.loads((tmp_path / "gvm" / gvm.META_FILE).read_text())
    assert meta["base_model"] == model
    # the GVM saw each prompt exactly as the RL scripts encode it (chat template, BOS, no double BOS)
    _, tok = models.load_pretrained(model)
    pairs = data.load_pairs(files[shape], "train", "--data")
    samples = gvm.pair_samples(pairs, tok, 512, "test")
    prompts = data.load_prompts(files[shape], "train", "--prompts", tok)
    assert [s[0] for s in samples[0::2]] == [ids for _, ids in prompts]
    first = tok.decode(prompts[0][1])
    if shape == "messages":
        assert first.endswith(
            {
                "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                "qwen2": "<|im_start|>assistant\n",
                "smollm2": "<|im_start|>assistant\n",
            }[kind]
        )
        assert not first.startswith(2 * (tok.bos_token or "<none>"))  # the template's BOS, not one more before it
    if shape == "hh":
        assert first.endswith("Assistant:")
    dvpo.main(
        [
            "--gvm",
            str(tmp_path / "gvm"),
            "--policy",
            model,
            "--prompts",
            files[shape],
            "--eval-prompts",
            files[shape],
            "--out",
            str(tmp_path / "dvpo"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--minibatch-size",
            "2",
            "--ppo-epochs",
            "1",
            "--eval-every",
            "2",
            "--eval-n",
            "4",
            "--max-new-tokens",
            "8",
        ]
    )
    steps = training_records(tmp_path / "dvpo" / "metrics.jsonl")
    assert [m["step"] for m in steps if "objective/kl" in m] == [1, 2]
    assert not any("objective/gold" in m or "eval/gold" in m for m in steps)  # VADER means nothing off the world
    assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps if "objective/kl" in m)
    _, saved_tok = models.load_pretrained(str(tmp_path / "dvpo"))
    assert models.tokenizer_fingerprint(saved_tok) == meta["tokenizer_fingerprint"]
    # the user's tokenizer, pad and generation_config, as they came (a GVM's backbone has no generation_config)
    assert as_saved(tmp_path / "dvpo") == as_saved(families / kind)
    assert as_saved(tmp_path / "gvm", generation=False) == as_saved(families / kind, generation=False)


def as_saved(folder, generation=True):
    """What a checkpoint declares about its tokens: the tokenizer's special tokens and size, the config's pad id
    and the generation_config."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    declared = {}
    if generation:
        declared = json.loads((folder / "generation_config.json").read_text())
        declared.pop("transformers_version", None)
    return tok.special_tokens_map, len(tok), config.get("pad_token_id"), declared


def test_a_value_model_from_another_tokenizer_or_template_is_refused(families, tiny_world, tmp_path, capsys):
    files = pair_files(tiny_world, tmp_path)
    gvm.main(
        [
            "--model",
            str(families / "gpt2"),
            "--data",
            files["strings"],
            "--eval-data",
            files["strings"],
            "--out",
            str(tmp_path / "gvm"),
            "--max-steps",
            "1",
        ]
    )
    model, tok = models.load_pretrained(str(families / "qwen2"))
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    model.save_pretrained(tmp_path / "qwen2-other-template")
    tok.save_pretrained(tmp_path / "qwen2-other-template")
    gvm.main(
        [
            "--model",
            str(families / "qwen2"),
            "--data",
            files["messages"],
            "--eval-data",
            files["messages"],
            "--out",
            str(tmp_path / "gvm-qwen2"),
            "--max-steps",
            "1",
        ]
    )
    capsys.readouterr()
    for gvm_dir, policy in (
        (tmp_path / "gvm", families / "llama"),
        (tmp_path / "gvm-qwen2", tmp_path / "qwen2-other-template"),
    ):
        with pytest.raises(SystemExit) as e:
            dvpo.main(
                [
                    "--gvm",
                    str(gvm_dir),
                    "--policy",
                    str(policy),
                    "--prompts",
                    files["strings"],
                    "--eval-prompts",
                    "",
                    "--out",
                    str(tmp_path / "out"),
                    "--steps",
                    "1",
                ]
            )
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "with another tokenizer than --policy" in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["world", "qwen2", "qwen2-lora"])
def test_a_polluted_generation_config_samples_exactly_as_a_clean_one(tiny_world, families, tmp_path, kind):
    path = str(tiny_world / "sft") if kind == "world" else str(families / "qwen2")
    prompts = ["the plot was", "i", "overall , it was a", "the acting"] * 3
    clean, tok = models.load_pretrained(path)
    if kind != "world":  # a random model's near-uniform next-token distribution hardly feels a penalty: sharpen it
        with torch.no_grad():
            clean.get_output_embeddings().weight.mul_(30)
    dirty = copy.deepcopy(clean)
    pollute(dirty, tok).save_pretrained(tmp_path / "dirty")
    tok.save_pretrained(tmp_path / "dirty")
    dirty, _ = models.load_pretrained(str(tmp_path / "dirty"))
    assert dirty.generation_config.repetition_penalty == 1.3  # the checkpoint really carries it
    runs = []
    for model in (clean, dirty):
        if kind.endswith("lora"):  # a LoRA policy: generate() runs on the base model inside the peft wrapper
            model = lora.add_lora(model, 4, 8.0, 0.0)
        torch.manual_seed(0)
        runs.append(rollout.generate(model, tok, prompts, max_new_tokens=16, temperature=0.9))
    assert torch.equal(runs[0].input_ids, runs[1].input_ids) and torch.equal(
        runs[0].response_mask, runs[1].response_mask
    )
    assert dirty.generation_config.repetition_penalty == 1.3  # and it is left as the checkpoint has it
    if kind == "world":  # the world's own pair sampling
        texts = []
        for model in (clean, pollute(clean, tok)):
            torch.manual_seed(0)
            texts.append(world.sample_responses(model, tok, prompts, 16, 5, progress=False))
        assert texts[0] == texts[1]


def test_generation_stops_on_every_eos_id_the_model_declares(families):
    """Llama-3-Instruct declares [<|end_of_text|>, <|eom_id|>, <|eot_id|>]: a response ends at the first of any."""
    policy, tok = models.load_pretrained(str(families / "llama"))
    other = tok.convert_tokens_to_ids("<|end_of_text|>")
    policy.generation_config.eos_token_id = [other, tok.eos_token_id]
    policy.lm_head.bias = torch.nn.Parameter(torch.zeros(policy.lm_head.out_features))
    with torch.no_grad():
        policy.lm_head.bias[other] = 4.0  # the second EOS id ends many responses early, not all
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i"] * 16, max_new_tokens=12)
    eos = torch.tensor([other, tok.eos_token_id])
    ends_on_other = 0
    for b in range(len(r.prompts)):
        n = int(r.response_mask[b].sum())
        ids = r.response_ids[b, :n]
        is_eos = torch.isin(ids, eos)
        assert not is_eos[:-1].any(), "an EOS id inside a response: generation or truncation ignored it"
        assert bool(r.ended[b]) == bool(is_eos[-1]) and (bool(is_eos[-1]) or n == 12)
        ends_on_other += int(ids[-1] == other)
    assert 0 < ends_on_other < len(r.prompts)


@pytest.mark.parametrize("kind", FAMILIES)
def test_policy_equal_to_its_reference_has_kl_exactly_zero(families, kind):
    """Policy and reference are loaded separately, as the trainers do; a pad token added to both (GPT-2,
    Llama 3) must give them the same rows and stay out of the softmax."""
    path = str(families / kind)
    policy, tok = models.load_pretrained(path)
    torch.randn(1000)  # whatever the RNG did in between
    ref, _ = models.load_pretrained(path)
    assert torch.equal(policy.get_input_embeddings().weight, ref.get_input_embeddings().weight)
    assert (step0_kl(policy, ref, tok) == 0).all()
    ref16, _ = models.load_pretrained(path, dtype=torch.bfloat16)  # --dtype bf16: the frozen copy in bf16
    kl = step0_kl(policy, ref16, tok, precision.Precision("bf16", "cpu"))
    assert kl.abs().max() < 0.05  # only bf16 rounding is left (docs/scaling.md, Reproduce on one GPU)


@pytest.mark.parametrize("kind", ["world", "gpt2", "qwen2"])
def test_sampled_texts_continue_their_prompts(tiny_world, families, kind):
    """A response's text is what follows the prompt: prompt + text re-encodes to the sampled tokens."""
    policy, tok = models.load_pretrained(str(tiny_world / "sft") if kind == "world" else str(families / kind))
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the plot was", "i"] * 4, max_new_tokens=10)
    for b in range(len(r.prompts)):
        n = int(r.response_mask[b].sum()) - int(r.ended[b])
        if kind == "world":  # a random BPE model samples token sequences that BPE would spell otherwise
            assert tok(r.prompts[b] + r.texts[b])["input_ids"][-n:] == r.response_ids[b, :n].tolist()
        assert tok.decode(tok(r.prompts[b])["input_ids"], skip_special_tokens=True) + r.texts[b] == tok.decode(
            r.input_ids[b], skip_special_tokens=True
        )


def test_dropout_read_from_the_config_at_forward_time_is_off_and_saved_as_it_was(tmp_path):
    """Falcon reads hidden_dropout and attention_dropout from its config inside forward."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_dropout=0.5,
        attention_dropout=0.5,
    )
    model = models.disable_dropout(FalconForCausalLM(config)).train()
    ids = torch.randint(0, 50, (2, 9))
    assert torch.equal(model(ids).logits, model(ids).logits), "dropout still active in train mode"
    models.save_pretrained(model, None, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["hidden_dropout"], saved["attention_dropout"]) == (0.5, 0.5)
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_the_per_token_view_shows_text_not_byte_level_pieces(families):
    tok = models.load_tokenizer(str(families / "qwen2"))
    ids = tok(" the movie was great\n", add_special_tokens=False).input_ids
    assert any(p.startswith("Ġ") for p in tok.convert_ids_to_tokens(ids))  # what it used to print
    shown = [evaluate.token_text(tok, i) for i in ids]
    assert "".join(s for s in shown if s != "'\\n'") == " the movie was great" and shown[-1] == "'\\n'", shown
