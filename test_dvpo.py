"""DVPO's math and invariants, each against a hand-computed value or a slow reference: TD(lambda) targets, GAE,
the three advantages, whitening, the KL estimators, every loss, chunked log-probs against autograd, gradient
accumulation against one batch, the first PPO ratio exactly 1, KL exactly 0 while the policy is the reference,
and the frozen GVM. Self-contained (random 2-layer models, no world), well under a minute on 2 cores. The
end-to-end, data, resume, fault and torchrun tests are in tests/.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest -q test_dvpo.py tests/
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/datasets import: a stray hub call hangs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import json
import math
import random

import pytest
import torch

import dpo_baseline
import dvpo
import grpo_baseline
import gvm
import ppo_baseline
import remax_baseline
import reward
import rollout
from infra import models, precision, world

PROMPTS = [
    "the plot was",
    "i",
    "overall , it was a",
    "the acting",
    "i watched it",
    "the music was very",
    "it was an",
    "the ending",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """What dvpo.py needs, built in a second: a random 2-layer Llama policy on the world's word-level tokenizer, a
    GPT-2 policy whose config asks for dropout 0.1, a GVM on the Llama backbone with a random head, and prompts."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok = world.build_tokenizer(world.vocabulary())
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            **ids,
        )
    )
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=len(tok),
            n_positions=64,
            resid_pdrop=0.1,
            embd_pdrop=0.1,
            attn_pdrop=0.1,
            **ids,
        )
    )
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    backbone, tok = gvm.load_backbone(str(root / "llama"))
    value_model = gvm.ValueModel(backbone)
    torch.nn.init.normal_(value_model.head.weight, std=0.5)  # values that move the advantages
    gvm.save_value_model(value_model, tok, str(root / "gvm"), {"kind": "gvm"})
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def dvpo_argv(tiny, out, *extra, policy="llama"):
    return [
        "--policy",
        str(tiny / policy),
        "--gvm",
        str(tiny / "gvm"),
        "--prompts",
        str(tiny / "prompts.jsonl"),
        "--eval-prompts",
        "",
        "--gold",
        "none",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--minibatch-size",
        "4",
        "--ppo-epochs",
        "2",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        *extra,
    ]


def step_records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "objective/kl" in x]


# ---------------------------------------------------------------------------------------------- TD(lambda) targets
def random_states(B=5, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, S + 1, (B,), generator=g)  # T + 1 states, T >= 1
    mask = (torch.arange(S)[None] < lengths[:, None]).float()
    values = torch.randn(B, S, generator=g)
    labels = torch.tensor([random.Random(seed + b).choice([1.0, -1.0]) for b in range(B)])
    return values, mask, labels


def lambda_return_reference(v, label, gamma, lam):
    """Slow reference from the definition of the lambda-return (Sutton & Barto 12.1): a (1-lam)-weighted
    mixture of n-step returns, the Monte Carlo return taking the remaining weight. v = V(s_0..s_T)."""
    T = len(v) - 1
    r = [0.0] * T
    r[T - 1] = label

    def n_step(t, n):  # G_t^(n); the state after the last token is terminal, worth 0
        g = sum(gamma**k * r[t + k] for k in range(min(n, T - t)))
        return g + (gamma**n * v[t + n] if t + n < T else 0.0)

    out = []
    for t in range(T):
        horizon = T - t
        g = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, horizon))
        out.append(g + lam ** (horizon - 1) * n_step(t, horizon))
    return out + [label]  # the value of the complete response regresses on the label


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.9, 0.7), (0.99, 0.5)])
def test_td_lambda_targets_match_lambda_return_definition(gamma, lam):
    values, mask, labels = random_states(seed=int(lam * 100))
    got = gvm.td_lambda_targets(values, mask, labels, gamma, lam)
    for b in range(len(values)):
        n = int(mask[b].sum())
        ref = lambda_return_reference(values[b, :n].tolist(), labels[b].item(), gamma, lam)
        assert got[b, :n].tolist() == pytest.approx(ref, abs=1e-5)
        assert (got[b, n:] == 0).all()


def test_monte_carlo_targets_are_the_label_everywhere():
    values, mask, labels = random_states()
    got = gvm.td_lambda_targets(values, mask, labels, gamma=1.0, lam=1.0)
    assert torch.allclose(got, labels[:, None] * mask, atol=1e-6)


def test_lambda_zero_is_one_step_bootstrap():
    values, mask, labels = random_states()
    got = gvm.td_lambda_targets(values, mask, labels, gamma=1.0, lam=0.0)
    for b in range(len(values)):
        T = int(mask[b].sum()) - 1
        expected = values[b, 1:T].tolist() + [labels[b].item(), labels[b].item()]  # R_t = V(s_{t+1}); R_{T-1} = label
        assert got[b, : T + 1].tolist() == pytest.approx(expected, abs=1e-6)


def test_masked_positions_change_neither_targets_nor_loss():
    values, mask, labels = random_states()
    garbage = values + 100.0 * torch.randn_like(values) * (1 - mask)
    t1 = gvm.td_lambda_targets(values, mask, labels)
    t2 = gvm.td_lambda_targets(garbage, mask, labels)
    assert torch.equal(t1 * mask, t2 * mask)
    assert gvm.value_loss(values, t1, mask).item() == pytest.approx(gvm.value_loss(garbage, t2, mask).item(), abs=1e-6)


def test_value_loss_by_hand():
    values = torch.tensor([[0.5, -1.0, 3.0], [2.0, 0.0, 7.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # 1/2 * mean(0.25, 4, 4, 1) = 1.15625
    assert gvm.value_loss(values, targets, mask).item() == pytest.approx(1.15625)


def test_gae_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([6, 1, 3, 4])[:, None]).float()
    adv, ret = rollout.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(4):
        n = int(mask[b].sum())
        for t in range(n):
            a = sum(
                (0.9 * 0.8) ** k
                * (rewards[b, t + k] + 0.9 * (values[b, t + k + 1] if t + k + 1 < n else 0) - values[b, t + k])
                for k in range(n - t)
            )
            assert adv[b, t].item() == pytest.approx(float(a), abs=1e-5)
            assert ret[b, t].item() == pytest.approx(float(a + values[b, t]), abs=1e-5)
        assert (adv[b, n:] == 0).all()


# ---------------------------------------------------------------------------------------------- advantages
def random_rollout_tensors(B=4, R=7, seed=0):
    """State values V(s_0..s_R), a state mask with T in [1, R], and KL rewards on the T actions."""
    g = torch.Generator().manual_seed(seed)
    T = torch.tensor([R, 1, 3, 5][:B])
    smask = (torch.arange(R + 1)[None] <= T[:, None]).float()
    values = torch.randn(B, R + 1, generator=g) * smask
    rewards = -0.1 * torch.randn(B, R, generator=g) * smask[:, 1:]
    return values, smask, rewards, T


def released_closed_form(v, r, T, lam):
    """docs/DVPO.md §3 (gamma = 1), V_T := 0:
    A_t = -V_t + (1-lam) sum_{k>=1} lam^{k-1} V_{t+k} + sum_l lam^l r_{t+l}."""
    v = v[:T] + [0.0]
    return [
        -v[t]
        + (1 - lam) * sum(lam ** (k - 1) * v[t + k] for k in range(1, T - t + 1))
        + sum(lam**i * r[t + i] for i in range(T - t))
        for t in range(T)
    ]


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.5])
def test_released_advantage_closed_form_and_telescoping(lam):
    values, smask, rewards, T = random_rollout_tensors()
    adv = dvpo.compute_advantages("released", values, smask, rewards, 1.0, lam)
    for b in range(len(T)):
        n = int(T[b])
        ref = released_closed_form(values[b].tolist(), rewards[b].tolist(), n, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref, abs=1e-5)
        if lam == 1.0:  # the value terms telescope to -V_t: a pure baseline
            expected = [-values[b, t].item() + rewards[b, t:n].sum().item() for t in range(n)]
            assert adv[b, :n].tolist() == pytest.approx(expected, abs=1e-5)


def test_delta_advantage_closed_forms():
    values, smask, rewards, T = random_rollout_tensors()
    a0 = dvpo.compute_advantages("delta", values, smask, rewards, 1.0, 0.0)
    a1 = dvpo.compute_advantages("delta", values, smask, rewards, 1.0, 1.0)
    for b in range(len(T)):
        n = int(T[b])
        # lam = 0: V(s_{t+1}) - V(s_t) - beta * kl_t, with V(s_T) the value of the complete response
        assert a0[b, :n].tolist() == pytest.approx(
            (values[b, 1 : n + 1] - values[b, :n] + rewards[b, :n]).tolist(), abs=1e-5
        )
        # lam = 1: V(s_T) - V(s_t) + the KL rewards still to come
        tail = rewards[b, :n].flip(0).cumsum(0).flip(0)
        assert a1[b, :n].tolist() == pytest.approx((values[b, n] - values[b, :n] + tail).tolist(), abs=1e-5)


def test_static_advantage_by_hand():
    # responses of 3 and 1 tokens: V(s_0..s_3) and V(s_0..s_1), then padding that must not matter
    values = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, -2.0, 7.0, 7.0]])
    smask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[-0.1, 0.2, -0.3], [-0.5, 0.0, 0.0]])
    adv = dvpo.compute_advantages("static", values, smask, rewards, 1.0, 0.95)
    # A_t = V(s_{t+1}) + r_t: -1.0 - 0.1, 2.0 + 0.2, 0.25 - 0.3; -2.0 - 0.5
    assert adv.flatten().tolist() == pytest.approx([-1.1, 2.2, -0.05, -2.5, 0.0, 0.0])


@pytest.mark.parametrize("variant", dvpo.ADVANTAGES)
def test_values_at_masked_positions_change_no_advantage(variant):
    values, smask, rewards, _ = random_rollout_tensors()
    garbage = values + 50.0 * (1 - smask)
    a = dvpo.compute_advantages(variant, values, smask, rewards, 1.0, 0.95)
    b = dvpo.compute_advantages(variant, garbage, smask, rewards, 1.0, 0.95)
    assert torch.equal(a, b)
    assert (a * (1 - smask[:, 1:]) == 0).all()


def test_released_whitens_each_sequence_over_its_own_unpadded_tokens():
    """trl.core.whiten per sequence (the released launch's minibatches of one): mean and unbiased variance of the
    unpadded tokens, so a row's whitened values do not depend on the other rows or on the padding."""
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0], [4.0, 6.0, 5.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    w = dvpo.whiten_each_sequence(values, mask)
    assert w[0].tolist() == pytest.approx([0.0, -1.0, 0.0, 1.0], abs=1e-6)  # mean 2, unbiased variance 1
    std = torch.tensor([4.0, 6.0, 5.0, 7.0]).std().item()
    assert w[1].tolist() == pytest.approx([(x - 5.5) / std for x in (4.0, 6.0, 5.0, 7.0)], abs=1e-5)


def test_remax_advantage_is_the_return_against_the_greedy_reward():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]])
    adv = remax_baseline.returns_to_go(rewards, mask, torch.tensor([2.0, -1.0]) - 0.5, 1.0)
    # last token: + (2.0 - 0.5) and + (-1.0 - 0.5); each token's advantage is the sum of the rewards still to come
    assert adv.flatten().tolist() == pytest.approx([0.9, 1.0, 1.2, -1.9, 0.0, 0.0])


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])  # a group with a tie, a group of equal rewards
    adv = grpo_baseline.group_advantages(scores, 4)
    std = torch.tensor([1.0, 3.0, 2.0, 2.0]).std().item()  # unbiased: sqrt(2/3)
    assert adv.tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    assert grpo_baseline.group_advantages(scores, 4, divide_by_std=False).tolist() == pytest.approx(
        [-1, 1, 0, 0, 0, 0, 0, 0]
    )


# ---------------------------------------------------------------------------------------------- whitening, KL
def test_masked_whitening():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = rollout.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask.bool()] == 0).all()
    one = rollout.masked_whiten(x, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    none = rollout.masked_whiten(x, torch.zeros_like(x))
    assert torch.isfinite(one).all() and torch.isfinite(none).all() and (none == 0).all()


def test_whitening_with_moments_summed_over_parts_is_the_whole_batchs():
    """What torchrun does with total=distributed.all_reduce: each rank's part, whitened with every part's sums,
    equals that part of the whole batch whitened at once."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float()
    whole, mean = rollout.masked_whiten(x, mask), (x * mask).sum() / mask.sum()
    for part, rest in ((slice(0, 2), slice(2, None)), (slice(2, None), slice(0, 2))):
        xo, mo = x[rest], mask[rest]
        others = iter([mo.sum(), (xo * mo).sum(), (((xo - mean) * mo) ** 2).sum()])  # the other rank's sums
        got = rollout.masked_whiten(x[part], mask[part], total=lambda t: t + next(others))
        assert torch.allclose(got, whole[part], atol=1e-6)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert rollout.kl_k1(logp, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    # k3 = e^{-k1} - 1 + k1: e^{-0.5} - 0.5 = 0.1065307, e^{1} - 2 = 0.7182818, 0
    assert rollout.kl_k3(logp, ref).tolist() == pytest.approx([0.1065307, 0.7182818, 0.0], abs=1e-6)


def test_kl_rewards_with_the_missing_eos_penalty_by_hand():
    kl = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = dvpo.kl_rewards(kl, mask, torch.tensor([False, True]), beta=0.1, missing_eos_penalty=2.0)
    # -beta * kl per token; the response cut by the length budget loses 2.0 on its last token
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, -0.2 - 2.0, -0.1, 0.0, 0.0])


def test_adaptive_kl_update_by_hand():
    ctl = dvpo.AdaptiveKL(0.2, 6.0, 10_000)
    ctl.update(9.0, 64)  # error clipped to +0.2: beta * (1 + 0.2 * 64 / 10000)
    assert ctl.beta == pytest.approx(0.2 * 1.00128)
    ctl.update(5.4, 64)  # error 5.4 / 6 - 1 = -0.1
    assert ctl.beta == pytest.approx(0.2 * 1.00128 * (1 - 0.1 * 64 / 10_000))


def test_truncation_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 3, 2, 9]])
    out, mask, ended = rollout.truncate_after_eos(
        ids, eos_ids=[2, 3], pad_id=0
    )  # two EOS ids, as instruct models declare
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 3, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


# ---------------------------------------------------------------------------------------------- losses by hand
def test_clipped_policy_loss_by_hand():
    new, old = torch.log(torch.tensor([[1.5, 0.5, 1.0]])), torch.zeros(1, 3)
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = dvpo.clipped_policy_loss(new, old, adv, mask, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(-0.5, -0.8) = -0.5; token 2 masked
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert stats["policy/clipfrac"].item() == pytest.approx(1.0)
    assert stats["val/ratio_max_dev"].item() == pytest.approx(0.5)


def test_clipped_value_loss_by_hand():
    vpred, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    loss, clipfrac = ppo_baseline.clipped_value_loss(vpred, old, returns, torch.ones(1, 2), 0.2)
    # clipped values 0.7 and 0.3: max((1-2)^2, (0.7-2)^2) = 1.69, max(0^2, 0.3^2) = 0.09; half their mean
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert clipfrac.item() == pytest.approx(1.0)


def test_bradley_terry_loss_by_hand():
    loss = reward.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    # (-log sigmoid(1) - log sigmoid(-2)) / 2 = (0.31326 + 2.12693) / 2
    assert loss.item() == pytest.approx((0.313262 + 2.126928) / 2, abs=1e-5)


def test_reward_model_objective_reads_the_last_token_of_each_pair():
    values = torch.tensor([[0.0, 9.0, 2.0, 0.0], [0.0, 1.0, 9.0, 9.0]])  # chosen T=2, rejected T=1
    batch = {"state_mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])}
    loss, m = reward.BradleyTerry().loss(values, batch)
    assert loss.item() == pytest.approx(reward.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0])).item())
    assert m["rm/accuracy"] == 1.0 and m["rm/margin"] == pytest.approx(1.0)


def test_dpo_loss_and_implicit_rewards_by_hand():
    loss, chosen, rejected = dpo_baseline.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), 0.5
    )
    # beta * log-ratios: 0.5 * 0.5 and 0.5 * -0.5; loss = -log sigmoid(0.5) = 0.474077
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25)) and loss.item() == pytest.approx(
        0.474077, abs=1e-6
    )


def test_grpo_loss_weights_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert grpo_baseline.loss_weights(mask, "sequence", 4).flatten().tolist() == pytest.approx(
        [1 / 6, 1 / 6, 1 / 6, 0, 0.5, 0, 0, 0]
    )
    assert grpo_baseline.loss_weights(mask, "constant", 4).flatten().tolist() == pytest.approx(
        [1 / 8, 1 / 8, 1 / 8, 0, 1 / 8, 0, 0, 0]
    )


# ---------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("suppressed", [None, [3, 10]])
def test_chunked_logprobs_and_entropy_match_autograd_in_value_and_gradient(suppressed):
    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    ids = torch.randint(0, 11, (7,))
    keep = torch.ones(11, dtype=torch.bool)
    if suppressed is not None:  # never sampled; the reference softmax runs over the other columns only
        ids = torch.tensor([0, 1, 2, 4, 5, 9, 8])
        keep[suppressed] = False
        suppressed = torch.tensor(suppressed)
    g1, g2 = torch.randn(7) * 3, torch.randn(7) * 3
    lp, ent = rollout.ChunkedLogprobEntropy.apply(logits, ids, 0.7, 3, suppressed)
    ref_all = torch.log_softmax(logits[:, keep] / 0.7, -1)
    ref_lp = ref_all.gather(-1, (ids - (~keep).cumsum(0)[ids])[:, None]).squeeze(-1)
    ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    (grad,) = torch.autograd.grad((lp * g1 + ent * g2).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_lp * g1 + ref_ent * g2).sum(), logits)
    assert torch.allclose(grad, ref_grad, atol=1e-6)


def test_logprobs_at_temperature_match_each_sequence_alone_and_chunked(tiny):
    policy, tok = models.load_pretrained(str(tiny / "llama"))
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, PROMPTS[:3], max_new_tokens=8, temperature=0.7)
    got = rollout.response_logprobs(policy, r, 0.7)
    for b, prompt in enumerate(r.prompts):  # reference: each sample alone, no padding, log_softmax(logits / T)
        p = tok(prompt)["input_ids"]
        n = int(r.response_mask[b].sum())
        seq = torch.tensor([p + r.response_ids[b, :n].tolist()])
        logits = policy(seq).logits[0, len(p) - 1 : -1]
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, seq[0, len(p) :, None]).squeeze(-1)
        assert got[b, :n].tolist() == pytest.approx(ref.tolist(), abs=1e-5)
        assert (got[b, n:] == 0).all()
    plain = rollout.response_logprobs(policy, r, 0.7, with_entropy=True)
    chunked = rollout.response_logprobs(policy, r, 0.7, with_entropy=True, chunk=3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, chunked))


# ---------------------------------------------------------------------------------------------- the PPO update
@pytest.mark.parametrize("chunk", [0, 5])
def test_gradient_accumulation_gives_the_update_of_one_big_batch(tiny, chunk):
    """dvpo.ppo_epochs on one minibatch of 8, accumulated over micro-batches of 2 and 1, gives the gradient and
    the statistics of the whole minibatch at once (ratio != 1, so the clip is exercised)."""
    base, tok = models.load_pretrained(str(tiny / "llama"))
    torch.manual_seed(0)
    r = rollout.generate(base, tok, PROMPTS, max_new_tokens=8)
    adv = rollout.masked_whiten(torch.randn_like(r.response_mask), r.response_mask)
    old = rollout.response_logprobs(base, r).detach() - 0.1 * r.response_mask
    grads, stats = [], []
    for micro in (0, 2, 1):
        policy = copy.deepcopy(base).train()
        args = dvpo.Args(micro_batch_size=micro, logprob_chunk=chunk, max_grad_norm=1e9)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        stats.append(
            dvpo.ppo_epochs(policy, opt, precision.Precision("fp32", "cpu"), r, old, adv, [[torch.arange(8)]], args)
        )
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    for g, s in zip(grads[1:], stats[1:]):
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-4)
        assert s == pytest.approx(stats[0], rel=1e-4, abs=1e-6)


def test_grpo_kl_term_by_hand(tiny):
    """Every token's k1 to the reference is 0.1: k3 = e^-0.1 - 1 + 0.1 per token, and any weighted average of it
    is the same; with zero advantages the whole gradient is the KL term's."""
    policy, tok = models.load_pretrained(str(tiny / "llama"))
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, PROMPTS[:2], max_new_tokens=8)
    old = rollout.response_logprobs(policy, r).detach()
    for dr_grpo in (False, True):
        args = grpo_baseline.Args(max_grad_norm=1e9, dr_grpo=dr_grpo, max_new_tokens=8)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        s = grpo_baseline.ppo_epochs(
            policy,
            opt,
            precision.Precision("fp32", "cpu"),
            r,
            old,
            old - 0.1 * r.response_mask,
            torch.zeros_like(old),
            [[torch.arange(2)]],
            args,
            2.0,
        )
        weights = grpo_baseline.loss_weights(r.response_mask, "constant" if dr_grpo else "sequence", 8)
        assert s["loss/kl"] == pytest.approx((math.exp(-0.1) - 0.9) * weights.sum().item(), abs=1e-6)
        assert s["loss/policy"] == 0.0 and s["policy/grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- invariants of a run
def test_policy_equal_to_its_reference_has_kl_exactly_zero(tiny):
    """Policy and reference loaded apart, as the trainers do: on the same rollout their log-probs agree exactly."""
    policy, tok = models.load_pretrained(str(tiny / "gpt2"))
    torch.randn(1000)  # whatever the RNG did in between
    ref, _ = models.load_pretrained(str(tiny / "gpt2"))
    torch.manual_seed(0)
    r = rollout.generate(policy, tok, PROMPTS, max_new_tokens=8)
    kl = rollout.kl_k1(rollout.response_logprobs(policy, r), rollout.response_logprobs(ref, r)) * r.response_mask
    assert (kl == 0).all()


@pytest.mark.parametrize("extra", [[], ["--micro-batch-size", "2", "--logprob-chunk", "3", "--temperature", "0.7"]])
def test_first_ratio_is_exactly_one_and_first_kl_zero_in_a_run(tiny, tmp_path, extra):
    """A GPT-2 policy whose config asks for dropout 0.1: loaded with dropout off and scored at the sampling
    temperature, the first minibatch of every step has ratio exactly 1 (§5.4), however it is micro-batched,
    and the first step's KL to the reference (the same weights) is 0."""
    dvpo.main(dvpo_argv(tiny, tmp_path / "out", *extra, policy="gpt2"))
    steps = step_records(tmp_path / "out")
    assert len(steps) == 2 and all(m["val/ratio_first_max_dev"] == 0.0 for m in steps)
    assert steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5) and steps[1]["objective/kl"] != 0.0
    assert all(m["val/ratio_max_dev"] > 0 for m in steps)  # later minibatches see an updated policy


def test_gvm_stays_frozen_and_outside_every_optimizer(tiny, tmp_path, monkeypatch):
    loaded, optimizers = [], []
    real_load, real_adamw = gvm.load_value_model, torch.optim.AdamW

    def spy_load(*a, **k):
        out = real_load(*a, **k)
        loaded.append((out[0], {n: p.detach().clone() for n, p in out[0].state_dict().items()}))
        return out

    class SpyAdamW(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            optimizers.append(self)

    monkeypatch.setattr(gvm, "load_value_model", spy_load)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    dvpo.main(dvpo_argv(tiny, tmp_path / "out"))
    ((model, before),) = loaded
    after, on_disk = model.state_dict(), real_load(str(tiny / "gvm"))[0].state_dict()
    assert all(torch.equal(before[n], after[n]) and torch.equal(on_disk[n], after[n]) for n in before), (
        "GVM weights changed"
    )
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()), "a gradient reached the GVM"
    in_opt = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    assert optimizers and not in_opt & {id(p) for p in model.parameters()}
    steps = step_records(tmp_path / "out")
    assert len(steps) == 2 and all(m["objective/gvm_value"] != 0.0 for m in steps)
    for key in (
        "policy/clipfrac",
        "policy/approxkl",
        "policy/entropy",
        "val/ratio",
        "time/generate",
        "time/score",
        "time/update",
        "memory/update_state_bytes",
    ):
        assert key in steps[0], key
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train/steps"] == 2
