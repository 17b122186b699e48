import json
import sys

import pytest
import torch

import dvpo
import gvm
import ppo_baseline
import rollout
from helpers import FAMILIES, one_line_error, randomise_adapters, step0_kl, tiny_dvpo_argv, training_records
from infra import lora, models, precision


@pytest.mark.parametrize("kind", FAMILIES)
def test_lora_reference_is_the_base_and_the_merged_checkpoint_is_the_adapted_model(families, tmp_path, kind):
    path = str(families / kind)
    base, tok = models.load_pretrained(path)
    policy = lora.add_lora(models.load_model(path, tok), 4, 8.0, 0.0)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, _ in policy.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }
    ref = lora.WithoutAdapters(policy)
    assert list(ref.parameters()) == []  # no second copy of the base weights
    assert (step0_kl(policy, ref, tok) == 0).all()  # B = 0: the adapted model starts as its base, exactly
    randomise_adapters(policy)
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, ["the movie was", "i"] * 2, max_new_tokens=8)
    assert torch.equal(rollout.response_logprobs(ref, r), rollout.response_logprobs(base, r))
    assert not torch.equal(rollout.response_logprobs(policy, r), rollout.response_logprobs(base, r))
    models.save_pretrained(policy, tok, str(tmp_path / "out"))
    merged, _ = models.load_pretrained(str(tmp_path / "out"))  # a plain folder: no adapter, no project code needed
    assert torch.allclose(rollout.response_logprobs(merged, r), rollout.response_logprobs(policy, r), atol=1e-5)
    assert (tmp_path / "out" / lora.ADAPTER_DIR / "adapter_config.json").exists()


def test_a_lora_dvpo_run_keeps_the_base_and_the_gvm_bit_identical(tiny_world, tiny_gvm, tmp_path, monkeypatch):
    seen = {}
    real_load = models.load_policy_and_reference

    def spy(*a, **k):
        policy, ref = real_load(*a, **k)
        seen["base"] = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
        seen["policy"], seen["ref"] = policy, ref
        return policy, ref

    monkeypatch.setattr(models, "load_policy_and_reference", spy)
    dvpo.main(
        tiny_dvpo_argv(
            tiny_world,
            tiny_gvm,
            tmp_path / "out",
            "--lora-r",
            "4",
            "--lr",
            "3e-3",
            "--lora-targets",
            "q_proj,v_proj,down_proj",
        )
    )
    policy = seen["policy"]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in policy.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj", "down_proj"}
    after = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    assert after.keys() == seen["base"].keys() and all(torch.equal(after[n], seen["base"][n]) for n in after)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in policy.named_parameters() if "lora_B" in n)
    assert list(seen["ref"].parameters()) == []
    steps = training_records(tmp_path / "out" / "metrics.jsonl")
    assert all(m["val/ratio_first_max_dev"] == 0.0 for m in steps if "objective/kl" in m)
    assert steps[0]["eval/kl"] == 0.0  # policy = reference before the first update
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert summary["params/trained"] == trained and summary["params/frozen"] == sum(
        p.numel() for p in after.values()
    ) + sum(p.numel() for p in gvm.load_value_model(str(tiny_gvm))[0].parameters())


def test_lora_value_models_train_the_head_in_full_and_ppo_holds_one_base_per_backbone(tiny_world, tiny_gvm, tmp_path):
    pairs = str(tiny_world / "data" / "pairs_train.jsonl")
    gvm.main(
        [
            "--model",
            str(tiny_world / "sft"),
            "--data",
            pairs,
            "--eval-data",
            pairs,
            "--out",
            str(tmp_path / "gvm"),
            "--max-steps",
            "3",
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
        ]
    )
    summary = json.loads((tmp_path / "gvm" / "summary.json").read_text())
    model, tok, _ = gvm.load_value_model(str(tmp_path / "gvm"))  # merged: a plain backbone and its head
    assert summary["params/trained"] < summary["params"] / 5 and model.head.weight.abs().sum() > 0
    rm, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(rm, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    args = ppo_baseline.Args(policy=str(tiny_world / "sft"), lora_r=4)
    reward_model, critic = ppo_baseline.load_reward_model_and_critic(
        str(tmp_path / "rm"), args, tok, "cpu", precision.Precision("fp32", "cpu"), policy=None
    )
    assert list(reward_model.backbone.parameters()) == []  # the reward model is the critic's base, adapters off
    assert {n for n, p in critic.named_parameters() if p.requires_grad} == {
        n for n, _ in critic.named_parameters() if ".lora_" in n or n.startswith("head.")
    }
    randomise_adapters(critic)
    ids = torch.tensor([tok("the plot was very good .")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reward_model(ids, torch.ones_like(ids)), rm(ids, torch.ones_like(ids)))
        assert not torch.equal(critic(ids, torch.ones_like(ids)), rm(ids, torch.ones_like(ids)))


def test_8bit_adamw_trains_only_what_trains_and_its_absence_is_one_line(
    tiny_world, tiny_gvm, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("bitsandbytes")
    argv = tiny_dvpo_argv(
        tiny_world, tiny_gvm, tmp_path / "out", "--optim", "adamw8bit", "--lora-r", "4", "--steps", "1", "--lr", "1e-2"
    )
    seen = {}
    real_load = models.load_policy_and_reference

    def spy(*a, **k):
        policy, ref = real_load(*a, **k)
        seen["before"] = {n: p.detach().clone() for n, p in policy.named_parameters()}
        seen["policy"] = policy
        return policy, ref

    monkeypatch.setattr(models, "load_policy_and_reference", spy)
    dvpo.main(argv)
    changed = {n for n, p in seen["policy"].named_parameters() if not torch.equal(p, seen["before"][n])}
    assert changed and changed <= {n for n, p in seen["policy"].named_parameters() if p.requires_grad}
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    err = one_line_error(
        capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out2", "--optim", "adamw8bit"))
    )
    assert "--optim adamw8bit: needs bitsandbytes" in err and not (tmp_path / "out2").exists()


def test_lora_model_states_follow_the_byte_rule_with_one_base_per_backbone(tiny_world, tiny_gvm, tmp_path):
    """Measured tally = 16 B per trained (adapter, critic head) and 2 B per frozen parameter under bf16, where
    the frozen ones are one base per backbone: DVPO the policy's (shared by the reference) and the GVM, PPO
    the policy's and the reward model's (shared by the critic)."""
    model, tok, _ = gvm.load_value_model(str(tiny_gvm))
    gvm.save_value_model(model, tok, str(tmp_path / "rm"), {"kind": "reward-model"})
    n_backbone = sum(p.numel() for p in model.parameters())
    for script in ("dvpo", "ppo"):
        argv = tiny_dvpo_argv(
            tiny_world, tiny_gvm, tmp_path / script, "--lora-r", "4", "--dtype", "bf16", "--steps", "1"
        )
        if script == "ppo":
            argv[argv.index("--gvm") : argv.index("--gvm") + 2] = ["--rm", str(tmp_path / "rm")]
        (ppo_baseline if script == "ppo" else dvpo).main(argv)
        s = json.loads((tmp_path / script / "summary.json").read_text())
        step = [m for m in training_records(tmp_path / script / "metrics.jsonl") if "objective/kl" in m][0]
        assert step["memory/update_state_bytes"] == pytest.approx(
            16 * s["params/trained"] + 2 * s["params/frozen"], rel=1e-3
        )
        policy_base = sum(p.numel() for p in models.load_pretrained(str(tiny_world / "sft"))[0].parameters())
        assert s["params/frozen"] == policy_base + n_backbone  # two bases, whatever the method


NO_NETWORK = """
import socket, sys
calls = []
def refuse(*args, **kwargs):
    calls.append(args[1] if len(args) > 1 else args[0])
    raise OSError("network unreachable (test)")
socket.socket.connect = socket.getaddrinfo = refuse
import dvpo, gvm, ppo_baseline, evaluate
from infra import lora, models, precision
lora.peft()
precision.bitsandbytes("--optim adamw8bit")
lora.add_lora(models.load_pretrained(sys.argv[1])[0], 4, 8, 0.0)
print("network calls:", calls)
"""


def test_loading_the_libraries_makes_no_network_call_even_without_hf_hub_offline(tiny_world):
    """bitsandbytes, imported by peft, fetches a hub kernel at import on CPUs with AVX512-BF16 when `kernels` is
    installed; where the network is unreachable and HF_HUB_OFFLINE unset that hangs. Nothing may try."""
    import subprocess

    from helpers import ENV, REPO

    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(tiny_world / "sft")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "network calls: []", proc.stdout
    assert "kernels-community" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
