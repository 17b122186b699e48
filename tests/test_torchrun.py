import copy
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a torchrun worker too

import pytest
import torch

import dvpo
import gvm
import ppo_baseline
import rollout
from helpers import ENV, REPO, kl_like_rewards, one_line_error, tiny_dvpo_argv, training_records
from infra import checkpoint, cli, distributed, models, precision


# The 2-process runs below use gloo on CPU, as a GPU node would use NCCL: the same code. Each launch is
# `python -m torch.distributed.run` (torchrun) with one thread per process.
def torchrun(*argv, nproc=2, timeout=600, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *argv],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ppo_case(sft, fsdp=False, ranks=1, rank=None):
    """A PPO update the equivalence tests compare: the policy's and the critic's steps on 8 sampled responses,
    2 epochs of minibatches of 4, gradients clipped at norm 1. rank None: the whole batch in this process;
    else, under torchrun, this rank's share. (policy state, critic state, statistics), whole on rank 0."""
    policy, tok = models.load_pretrained(sft)
    critic = gvm.ValueModel(gvm.load_backbone(sft)[0])
    torch.manual_seed(0)  # every rank samples the same batch and takes its share of it
    r = rollout.generate(policy, tok, ["the plot was", "i", "overall ,", "the acting"] * 2, max_new_tokens=12)
    lengths = r.response_mask.sum(1)
    assert lengths[:4].sum() != lengths[4:].sum()  # so a rank's own token count would weigh its loss wrongly
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    reward_model = copy.deepcopy(critic).requires_grad_(False)
    rewards = kl_like_rewards(r)
    plans = rollout.minibatches(8, 4, 2, torch.Generator().manual_seed(0), ranks, rank)
    if rank is not None:
        rows = torch.arange(8).view(ranks, -1)[rank]
        r, rewards = r.index(rows), rewards[rows]
    args = ppo_baseline.Args(fsdp=fsdp, lr=1e-2, critic_lr=1e-2)
    prec = precision.Precision("fp32", "cpu")
    trained = distributed.wrap(policy.train(), fsdp)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    trained_critic = distributed.wrap(critic.train(), fsdp)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    with torch.no_grad():  # as ppo_baseline.train's steps 2 to 5 compute them
        old = torch.zeros_like(r.response_mask)
        for idx in plans[0]:
            old[idx] = rollout.response_logprobs(policy, r.index(idx))
        adv, returns, values, _ = ppo_baseline.critic_advantages(reward_model, critic, r, rewards, args)
        adv = rollout.masked_whiten(adv, r.response_mask, total=distributed.all_reduce)
    stats = ppo_baseline.ppo_epochs(
        trained,
        opt,
        prec,
        trained_critic,
        critic_opt,
        precision.Precision("fp32", "cpu"),
        r,
        old,
        adv,
        values,
        returns,
        plans,
        args,
    )

    def whole(m):  # as distributed.full_state_dict gives it: a tied weight once
        names = {n for n, _ in m.named_parameters()}
        return distributed.full_state_dict(m) or {k: v.clone() for k, v in m.state_dict().items() if k in names}

    return whole(policy), whole(critic), stats


def distributed_worker(out, sft, pairs, pairs_eval):
    """Under torchrun: ppo_case under DDP and FSDP2, and 3 steps of GVM training under both, into `out`."""
    cli.pick_device("cpu")
    results = {mode: ppo_case(sft, mode == "fsdp", distributed.world(), distributed.rank()) for mode in ("ddp", "fsdp")}
    if distributed.is_main():
        torch.save(results, os.path.join(out, "ppo.pt"))
    for mode in ("ddp", "fsdp"):
        gvm.train(
            gvm.Args(
                model=sft,
                data=pairs,
                eval_data=pairs_eval,
                out=os.path.join(out, f"gvm-{mode}"),
                max_steps=3,
                batch_size=8,
                eval_every=3,
                log_every=1,
                fsdp=mode == "fsdp",
                device="cpu",
            )
        )


@pytest.fixture(scope="session")
def two_process_results(tiny_world, tmp_path_factory):
    """distributed_worker's results: one torchrun launch of 2 processes for every equivalence test."""
    out = tmp_path_factory.mktemp("torchrun_worker")
    proc = torchrun(
        os.path.join(REPO, "tests", "test_torchrun.py"),
        "distributed-worker",
        str(out),
        str(tiny_world / "sft"),
        str(tiny_world / "data" / "pairs_train.jsonl"),
        str(tiny_world / "data" / "pairs_eval.jsonl"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_minibatches_split_over_ranks_are_the_whole_minibatches():
    whole = rollout.minibatches(12, 6, 2, torch.Generator().manual_seed(0), ranks=3)
    parts = [rollout.minibatches(12, 6, 2, torch.Generator().manual_seed(0), ranks=3, rank=k) for k in range(3)]
    for e, epoch in enumerate(whole):
        assert sorted(torch.cat(epoch).tolist()) == list(range(12))
        for j, idx in enumerate(epoch):  # 2 rows of each rank's 4, in rank order
            assert idx.tolist() == [i + 4 * k for k in range(3) for i in parts[k][e][j].tolist()]
    one = rollout.minibatches(8, 4, 2, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # one process: the permutation of the whole batch, as before
    assert [[i.tolist() for i in ep] for ep in one] == [
        [i.tolist() for i in torch.randperm(8, generator=g).split(4)] for _ in range(2)
    ]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_ppo_update_split_over_two_processes_is_the_one_process_update(tiny_world, two_process_results, mode):
    """Policy and critic after 2 epochs x 2 minibatches at lr 1e-2 (every weight moves by ~0.04): each rank
    computed on its half of every minibatch, with globally whitened advantages and the global token count."""
    policy, critic, stats = ppo_case(str(tiny_world / "sft"), ranks=2)
    got_policy, got_critic, got_stats = torch.load(two_process_results / "ppo.pt", weights_only=False)[mode]
    initial = models.load_pretrained(str(tiny_world / "sft"))[0].state_dict()
    assert max_difference(policy, {k: initial[k] for k in policy}) > 1e-2
    assert max_difference(policy, got_policy) < 5e-5
    assert max_difference(critic, got_critic) < 5e-5
    assert got_stats == pytest.approx(stats, rel=1e-4, abs=1e-5)
    assert got_stats["val/ratio_first_max_dev"] == 0.0


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_gvm_training_on_two_processes_is_the_one_process_training(tiny_world, two_process_results, tmp_path, mode):
    from safetensors.torch import load_file

    summary = gvm.train(
        gvm.Args(
            model=str(tiny_world / "sft"),
            data=str(tiny_world / "data" / "pairs_train.jsonl"),
            eval_data=str(tiny_world / "data" / "pairs_eval.jsonl"),
            out=str(tmp_path / "gvm"),
            max_steps=3,
            batch_size=8,
            eval_every=3,
            log_every=1,
            device="cpu",
        )
    )
    got = two_process_results / f"gvm-{mode}"
    for f in ("model.safetensors", gvm.HEAD_FILE):
        assert max_difference(load_file(tmp_path / "gvm" / f), load_file(got / f)) < 1e-6
    assert (
        json.loads((got / "summary.json").read_text())["eval/pairwise_acc_final"] == summary["eval/pairwise_acc_final"]
    )
    lines = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 3]  # written once, by rank 0
    assert lines[2]["loss/value"] == pytest.approx(
        json.loads((tmp_path / "gvm" / "metrics.jsonl").read_text().splitlines()[2])["loss/value"], rel=1e-5
    )


def test_torchrun_dvpo_saves_once_resumes_and_fsdp_trains_as_ddp(tiny_world, tiny_gvm, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 dvpo.py` under DDP and under --fsdp --shard-frozen: 2 steps with a checkpoint
    each, then --resume to 3. Rank 0 alone prints and writes, the output loads with from_pretrained and holds the keys a
    one-process save holds, and the two engines end at the same weights (same data, same update)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for mode in ("ddp", "fsdp"):
        out, flags = tmp_path / mode, ["--fsdp", "--shard-frozen"] if mode == "fsdp" else []
        for more in (["--steps", "2"], ["--steps", "3", "--resume"]):
            proc = torchrun(
                os.path.join(REPO, "dvpo.py"),
                *tiny_dvpo_argv(tiny_world, tiny_gvm, out, "--save-every", "1", *flags, *more),
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("saved ") == 1 and proc.stdout.count(f"step {more[1]}/{more[1]} |") == 1
        records = training_records(out / "metrics.jsonl")
        assert [r["step"] for r in records if "objective/kl" in r] == [1, 2, 3]
        assert [r["step"] for r in records if "eval/kl" in r] == [0, 2, 3]
        assert torch.load(out / checkpoint.STATE_FILE, weights_only=False)["world_size"] == 2
        summary = json.loads((out / "summary.json").read_text())  # model states per rank: 16 and 4 bytes a parameter,
        whole = 16 * summary["params/trained"] + 4 * summary["params/frozen"]  # all of them under FSDP2 split 2 ways
        assert [r for r in records if "objective/kl" in r][-1]["memory/update_state_bytes"] == pytest.approx(
            whole / (2 if mode == "fsdp" else 1), rel=1e-3
        )
        AutoModelForCausalLM.from_pretrained(str(out))
        assert load_file(out / "model.safetensors").keys() == load_file(tiny_world / "sft" / "model.safetensors").keys()
    assert (
        max_difference(
            load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
        )
        < 1e-5
    )
    err = one_line_error(
        capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "ddp", "--steps", "4", "--resume"))
    )
    assert "trained by 2 process(es), not 1" in err


def test_torchrun_dvpo_runs_the_gvm_as_an_adapter_on_the_ddp_policys_base(tiny_world, tiny_lora_gvm, tmp_path):
    """Under DDP the GVM's adapter sits on the wrapped policy's base, outside what DDP averages (it is frozen): one
    base per rank, 16 bytes per trained and 4 per frozen parameter."""
    out = tmp_path / "shared"
    proc = torchrun(
        os.path.join(REPO, "dvpo.py"), *tiny_dvpo_argv(tiny_world, tiny_lora_gvm, out, "--lora-r", "4", "--steps", "2")
    )
    assert proc.returncode == 0 and "second copy" not in proc.stdout, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    backbone = gvm.load_backbone(str(tiny_world / "sft"))[0]
    base, head = sum(p.numel() for p in backbone.parameters()), backbone.config.hidden_size + 1
    assert summary["params/frozen"] == base + summary["params/trained"] + head  # its adapter (the same rank), head
    step = [r for r in training_records(out / "metrics.jsonl") if "objective/kl" in r][-1]
    whole = 16 * summary["params/trained"] + 4 * summary["params/frozen"]
    assert step["memory/update_state_bytes"] == pytest.approx(whole, rel=1e-3) and step["objective/kl"] > 0


def test_a_bad_flag_under_torchrun_is_one_line_and_every_rank_exits_2(tiny_world, tiny_gvm, tmp_path):
    """Both ranks started by hand with the environment torchrun gives them, so each one's exit code and
    output are seen (torchrun stops the others once one fails, and reports only some)."""
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    argv = [
        sys.executable,
        os.path.join(REPO, "dvpo.py"),
        *tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "out", "--batch-size", "7", "--minibatch-size", "7"),
    ]
    ranks = [
        subprocess.Popen(
            argv,
            env={**env, "RANK": str(k), "LOCAL_RANK": str(k)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in ranks)
    assert [p.returncode for p in ranks] == [2, 2]
    assert err0 == "error: --batch-size 7: must split evenly over the 2 processes (a multiple of 2)\n" and err1 == ""
    assert out0 == out1 == "" and os.listdir(tmp_path) == []


def test_sharding_flags_that_do_not_go_together_are_one_line(tiny_world, tiny_gvm, tmp_path, capsys):
    for flags, says in (
        (["--shard-frozen"], "add --fsdp"),
        (["--fsdp", "--lora-r", "4"], "use one or the other"),
        (["--fsdp", "--optim", "adamw8bit"], "8-bit AdamW does not take FSDP2"),
    ):
        assert says in one_line_error(
            capsys, lambda: dvpo.main(tiny_dvpo_argv(tiny_world, tiny_gvm, tmp_path / "o", *flags))
        )
    assert "8-bit AdamW" in one_line_error(
        capsys,
        lambda: gvm.main(
            ["--model", str(tiny_world / "sft"), "--fsdp", "--optim", "adamw8bit", "--out", str(tmp_path / "g")]
        ),
    )
    assert os.listdir(tmp_path) == []


if __name__ == "__main__" and sys.argv[1:2] == ["distributed-worker"]:
    distributed_worker(*sys.argv[2:])
