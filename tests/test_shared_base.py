"""One copy of the base weights under LoRA (docs/scaling.md, One shared base): a GVM or reward model that gvm.py
--lora-r trained on the policy's base runs as an adapter on the policy's own base, and nothing else changes."""

import json
import shutil

import pytest
import torch

import dvpo
import grpo_baseline
import gvm
import ppo_baseline
import remax_baseline
import rollout
from helpers import FAMILIES, lora_value_model, randomise_adapters, tiny_dvpo_argv, training_records
from infra import lora, memory, models, precision


def lora_policy(tiny_world, script=dvpo, **flags):
    args = script.Args(policy=str(tiny_world / "sft"), lora_r=4, **flags)
    tok = models.load_tokenizer(args.policy)
    policy, ref = models.load_policy_and_reference(args, tok, "cpu", precision.Precision(args.dtype, "cpu"))
    return args, tok, policy, ref


def numel(named, part):
    return sum(p.numel() for n, p in named if part in n)


def test_the_gvm_on_the_policys_base_is_the_merged_gvm_and_the_policy_and_reference_stay_as_they_were(
    tiny_world, tiny_lora_gvm
):
    _, tok, policy, ref = lora_policy(tiny_world)
    randomise_adapters(policy)  # the policy's adapter is not zero: running it in the GVM's place would show
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i", "the ending was good but"] * 2, max_new_tokens=10)
    before = rollout.response_logprobs(policy, r)
    shared, why = gvm.shared_value_model(str(tiny_lora_gvm), policy, "gvm")
    assert why is None and isinstance(shared.backbone, lora.Adapter)
    merged = gvm.load_value_model(str(tiny_lora_gvm))[0]  # the separate copy: gvm.py merged its adapter
    base_only = gvm.ValueModel(gvm.load_backbone(str(tiny_world / "sft"))[0], head=shared.head)
    with torch.no_grad():
        values = shared(r.input_ids, r.attention_mask)
        assert torch.allclose(values, merged(r.input_ids, r.attention_mask), atol=1e-5)  # to float rounding
        assert (values - base_only(r.input_ids, r.attention_mask)).abs().max() > 1e-3  # its adapter is what ran
    assert torch.equal(rollout.response_logprobs(policy, r), before)  # the policy's adapter active again
    base, _ = models.load_pretrained(str(tiny_world / "sft"))
    assert torch.equal(rollout.response_logprobs(ref, r), rollout.response_logprobs(base, r))  # every adapter off
    named = list(policy.named_parameters())
    assert {n for n, p in named if p.requires_grad} == {n for n, _ in named if ".default." in n}
    counts = memory.parameter_counts(policy, ref, shared)
    n_base = sum(p.numel() for p in base.parameters())
    assert counts == {
        "params/trained": numel(named, ".default."),
        "params/frozen": n_base + numel(named, ".gvm.") + shared.head.weight.numel() + 1,  # one base
    }


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_familys_lora_gvm_fits_its_policys_layers(families, tiny_world, tmp_path, kind):
    """The value model's adapter keys gain the causal LM's own prefix (model., transformer.): every layer found,
    GPT-2's transposed Conv1D layers too, and the values those of the merged copy."""
    world = tmp_path / "world"
    (world / "data").mkdir(parents=True)
    (world / "data" / "pairs_train.jsonl").write_text((tiny_world / "data" / "pairs_train.jsonl").read_text())
    shutil.copytree(families / kind, world / "sft")
    folder = lora_value_model(world, tmp_path / "gvm", "gvm")
    _, tok, policy, _ = lora_policy(world)
    shared, why = gvm.shared_value_model(str(folder), policy, "gvm")
    assert why is None
    ids = torch.tensor([tok("the plot was very good .")["input_ids"]])
    with torch.no_grad():
        merged = gvm.load_value_model(str(folder))[0](ids, torch.ones_like(ids))
        assert torch.allclose(shared(ids, torch.ones_like(ids)), merged, atol=1e-5) and merged.abs().max() > 0


def test_a_value_model_from_another_base_or_trained_in_full_is_a_second_copy_with_the_reason(
    tiny_world, tiny_lora_gvm, tiny_gvm, tmp_path, capsys
):
    args, tok, policy, _ = lora_policy(tiny_world)
    other = tmp_path / "other"
    shutil.copytree(tiny_lora_gvm, other)
    meta = json.loads((other / gvm.META_FILE).read_text())
    (other / gvm.META_FILE).write_text(json.dumps({**meta, "lora_base": "0" * 16}))  # as if from other weights
    for folder, why in ((other, "are not the policy's"), (tiny_gvm, "trained in full, not with --lora-r")):
        args.gvm = str(folder)
        value_model = dvpo.load_gvm(args, tok, "cpu", torch.float32, policy)
        assert not isinstance(value_model.backbone, lora.Adapter)
        out = capsys.readouterr().out
        assert out.startswith(f"--gvm {folder}: a second copy of the base weights: ") and why in out
    assert {n.split(".")[-2] for n, _ in policy.named_parameters() if ".lora_A." in n} == {"default"}
    _, _, bf16_policy, _ = lora_policy(tiny_world, dtype="bf16")  # the same weights in bf16: the same base
    shared, why = gvm.shared_value_model(str(tiny_lora_gvm), bf16_policy, "gvm")
    assert why is None and {p.dtype for p in shared.parameters()} == {torch.bfloat16}


def test_a_shared_base_dvpo_run_holds_one_base_keeps_it_and_the_gvm_bit_identical_and_equals_two_copies(
    tiny_world, tiny_lora_gvm, tmp_path, monkeypatch, capsys
):
    seen = {}
    real_load, real_shared = models.load_policy_and_reference, gvm.shared_value_model

    def load(*a, **k):
        seen["policy"], ref = real_load(*a, **k)
        return seen["policy"], ref

    def shared(*a, **k):
        seen["gvm"], why = real_shared(*a, **k)
        seen["frozen"] = {n: p.detach().clone() for n, p in seen["policy"].named_parameters() if not p.requires_grad}
        seen["head"] = {n: p.detach().clone() for n, p in seen["gvm"].head.named_parameters()}
        return seen["gvm"], why

    monkeypatch.setattr(models, "load_policy_and_reference", load)
    monkeypatch.setattr(gvm, "shared_value_model", shared)
    runs = {}
    for name, extra in (("two", ["--no-share-base"]), ("shared", [])):  # the spies keep the shared run's models
        dvpo.main(tiny_dvpo_argv(tiny_world, tiny_lora_gvm, tmp_path / name, "--lora-r", "4", "--lr", "3e-3", *extra))
        runs[name] = training_records(tmp_path / name / "metrics.jsonl")
    assert "second copy of the base weights: --no-share-base" in capsys.readouterr().out
    named = list(seen["policy"].named_parameters())
    after = {n: p for n, p in named if not p.requires_grad}  # the base and the GVM's adapter, through training
    assert after.keys() == seen["frozen"].keys() and all(torch.equal(after[n], seen["frozen"][n]) for n in after)
    assert numel(after.items(), ".gvm.") > 0
    assert all(torch.equal(p, seen["head"][n]) for n, p in seen["gvm"].head.named_parameters())
    assert any(p.abs().sum() > 0 for n, p in named if "lora_B.default" in n)  # the policy's adapter trained
    saved = sorted(f.name for f in (tmp_path / "shared" / lora.ADAPTER_DIR).iterdir())  # the policy's adapter alone
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"], saved
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in runs}
    n_base = sum(p.numel() for n, p in named if ".lora_" not in n)
    n_backbone = sum(p.numel() for p in gvm.load_backbone(str(tiny_world / "sft"))[0].parameters())
    head = seen["gvm"].head.weight.numel() + 1
    assert summaries["shared"]["params/frozen"] == n_base + numel(named, ".gvm.") + head  # one base
    assert summaries["two"]["params/frozen"] == n_base + n_backbone + head  # the policy's base and the GVM's
    for name, s in summaries.items():
        assert s["params/trained"] == numel(named, ".default.")
        steps = [m for m in runs[name] if "objective/kl" in m]
        assert steps[0]["memory/update_state_bytes"] == pytest.approx(
            16 * s["params/trained"] + 4 * s["params/frozen"],
            rel=1e-3,  # AdamW's step counters aside
        )
        assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps) and runs[name][0]["eval/kl"] == 0.0
    # the same run: values from the adapter on the shared base, or from the merged copy, equal to float rounding
    for a, b in zip(runs["shared"], runs["two"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("memory/")} == pytest.approx(
            {k: v for k, v in b.items() if not k.startswith("memory/")}, rel=1e-4, abs=1e-6
        )


def test_a_shared_base_ppo_run_holds_one_base_for_four_models_and_trains_only_the_policy_and_critic(
    tiny_world, tiny_lora_rm, tmp_path, monkeypatch
):
    seen = {}
    real = ppo_baseline.load_reward_model_and_critic

    def load(path, args, tok, device, prec, policy):
        seen["rm"], seen["critic"] = real(path, args, tok, device, prec, policy)
        seen["policy"] = policy
        seen["frozen"] = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
        seen["critic_before"] = {n: p.detach().clone() for n, p in policy.named_parameters() if ".critic." in n}
        return seen["rm"], seen["critic"]

    monkeypatch.setattr(ppo_baseline, "load_reward_model_and_critic", load)
    argv = tiny_dvpo_argv(tiny_world, "", tmp_path / "ppo", "--lora-r", "4", "--lr", "3e-3", "--critic-lr", "3e-3")
    argv[argv.index("--gvm") : argv.index("--gvm") + 2] = ["--rm", str(tiny_lora_rm)]
    ppo_baseline.main(argv)
    assert isinstance(seen["rm"].backbone, lora.Adapter) and isinstance(seen["critic"].backbone, lora.Adapter)
    named = list(seen["policy"].named_parameters())
    after = {n: p for n, p in named if not p.requires_grad}  # the base and the reward model's adapter
    assert after.keys() == seen["frozen"].keys() and all(torch.equal(after[n], seen["frozen"][n]) for n in after)
    critic = {n: p for n, p in named if ".critic." in n}
    assert critic and all(p.requires_grad for p in critic.values())  # the reference's adapters-off pass kept it
    assert all(torch.equal(seen["critic_before"][n], after[n.replace(".critic.", ".reward.")]) for n in critic)
    assert any(not torch.equal(p, seen["critic_before"][n]) for n, p in critic.items())  # it started as the RM's
    s = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    head = seen["rm"].head.weight.numel() + 1
    n_base = sum(p.numel() for n, p in named if ".lora_" not in n)
    assert s["params/frozen"] == n_base + numel(named, ".reward.") + head  # one base for all four models
    assert s["params/trained"] == numel(named, ".default.") + numel(named, ".critic.") + head
    steps = [m for m in training_records(tmp_path / "ppo" / "metrics.jsonl") if "objective/kl" in m]
    # each trained parameter in exactly one optimizer: 16 bytes each (weight, gradient, two moments), 4 per frozen
    assert steps[0]["memory/update_state_bytes"] == pytest.approx(
        16 * s["params/trained"] + 4 * s["params/frozen"], rel=1e-3
    )
    assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps)


def test_the_shared_critic_gets_its_own_gradient_under_gradient_checkpointing(tiny_world, tiny_lora_rm):
    """Gradient checkpointing recomputes each layer's forward in backward: on a shared base the critic's adapter
    must be the active one then too (lora.adapter_active), or the policy's would silently stand in for it."""
    ids = torch.tensor([[3, 5, 7, 9, 11, 4]])
    grads = []
    for checkpointing, keep_active in ((False, False), (True, True), (True, False)):
        args, tok, policy, _ = lora_policy(tiny_world, ppo_baseline, gradient_checkpointing=checkpointing)
        randomise_adapters(policy)
        _, critic = ppo_baseline.load_reward_model_and_critic(
            str(tiny_lora_rm), args, tok, "cpu", precision.Precision("fp32", "cpu"), policy
        )
        with lora.adapter_active(critic) if keep_active else torch.enable_grad():
            critic(ids, torch.ones_like(ids)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in critic.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert not torch.allclose(grads[0], grads[2], atol=1e-3)  # what the context prevents


@pytest.mark.parametrize("script", [grpo_baseline, remax_baseline])
def test_grpo_and_remax_score_with_the_reward_models_adapter_on_the_policys_base(
    tiny_world, tiny_lora_rm, tmp_path, script
):
    argv = tiny_dvpo_argv(tiny_world, "", tmp_path / "out", "--lora-r", "4", "--steps", "1")
    argv[argv.index("--gvm") : argv.index("--gvm") + 2] = ["--rm", str(tiny_lora_rm)]
    script.main(argv + (["--group-size", "2"] if script is grpo_baseline else []))
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    base = models.load_pretrained(str(tiny_world / "sft"))[0]
    head = base.config.hidden_size + 1
    # one base; the reward model's adapter (the policy's rank and layers, so as many as it trains) and head on it
    assert s["params/frozen"] == sum(p.numel() for p in base.parameters()) + s["params/trained"] + head
