"""Stage 2 of DVPO: policy-only PPO with the frozen global value model as critic (docs/DVPO.md §3).

Per step: sample prompts -> generate one response each -> log-probs under the policy (old) and the reference
-> frozen GVM values -> per-token KL-penalty rewards -> advantages (--advantage) -> --ppo-epochs of clipped
policy updates. No reward model, no critic training: three models in memory, one of them trained.

    python dvpo.py --gvm ckpt/gvm
    python dvpo.py --gvm ckpt/gvm --advantage released --lam 1.0    # the authors' code: the GVM is a pure baseline
"""
import os
from dataclasses import dataclass

import torch

import gvm
import loop
import rollout
import runtime
from runtime import UsageError, arg

ADVANTAGES = ("released", "delta", "static")


@dataclass
class Args(loop.RLArgs):
    gvm: str = arg("ckpt/gvm", "the global value model from gvm.py (frozen here)")
    advantage: str = arg("delta", "released | delta | static: how GVM values become advantages (README, docs/DVPO.md §3)")
    out: str = arg("ckpt/dvpo", "output folder: the policy (save_pretrained), metrics.jsonl, summary.json")


# ---------------------------------------------------------------------------------------------- advantages
def whiten_each_sequence(values, attention_mask):
    """The released code's value whitening: its batched_forward_pass applies trl.core.whiten (mean, unbiased
    variance, rsqrt(var + 1e-8), no mask) per forward minibatch, and its launch uses minibatches of one, so
    each sequence is whitened over its own unpadded tokens, prompt and response (docs/DVPO.md §3)."""
    m = attention_mask.to(values.dtype)
    n = m.sum(1, keepdim=True)
    mean = (values * m).sum(1, keepdim=True) / n
    var = ((values - mean) ** 2 * m).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * m


def compute_advantages(variant, values, smask, rewards, gamma, lam):
    """Advantages before the final whitening (§3). values: V(s_0..s_R) [B, R+1], zero past s_T; smask: 1 on
    s_0..s_T; rewards: per-token rewards [B, R] (the KL penalty), zero past the response."""
    amask = smask[:, 1:]  # action t, from s_t to s_{t+1}, exists for t < T
    T = amask.sum(1).long()
    values = values * smask
    if variant == "released":
        # V(s_T) := 0 and no terminal score: with gamma = 1 the value terms telescope at lam = 1
        adv, _ = rollout.gae(rewards, values[:, :-1], amask, gamma, lam)
    elif variant == "delta":
        # the value of the complete response as terminal reward, GVM as baseline: potential-based shaping
        terminal = values.gather(1, T[:, None]).squeeze(1)
        adv, _ = rollout.gae(rollout.add_at_last_token(rewards, amask, terminal), values[:, :-1], amask, gamma, lam)
    elif variant == "static":
        # the v2 paper's static advantage Q(s_t, y_t) = V(s_{t+1}), plus the token's own KL reward
        adv = (values[:, 1:] + rewards) * amask
    else:
        raise UsageError(f"--advantage {variant}: choose one of {', '.join(ADVANTAGES)}")
    return adv * amask


# ---------------------------------------------------------------------------------------------- the critic
class FrozenGVM:
    """DVPO's critic: the pretrained GVM, frozen, in no optimizer (§3); nothing of it is trained."""
    name, score_name, optimizers = "dvpo", "gvm_value", ()

    def __init__(self, args, value_model):
        self.args, self.value_model, self.models = args, value_model, (value_model,)
        self.describe = f"frozen GVM, advantage={args.advantage}"

    @torch.no_grad()
    def advantages(self, r, rewards):
        full = rollout.in_chunks(lambda x: self.value_model(x.input_ids, x.attention_mask), r,
                                 self.args.forward_batch_size)
        values = full[:, r.prompt_len - 1:]  # V(s_0 .. s_R)
        T = r.response_mask.sum(1).long()
        self.score = values.gather(1, T[:, None]).squeeze(1)  # V(s_T), logged
        if self.args.advantage == "released":
            values = whiten_each_sequence(full, r.attention_mask)[:, r.prompt_len - 1:]
        return compute_advantages(self.args.advantage, values, rollout.state_mask(r), rewards,
                                  self.args.gamma, self.args.lam)


def load_gvm(args, tok, device, dtype):
    """The frozen GVM in --dtype, checked to share the policy's tokenizer and chat template."""
    if not os.path.isdir(args.gvm):
        raise UsageError(f"--gvm {args.gvm}: no such folder (train one first: python gvm.py --out {args.gvm})")
    gvm.check_tokenizer(gvm.read_meta(args.gvm), tok, f"--gvm {args.gvm}", args.policy, "python gvm.py --model")
    value_model, _, _ = gvm.load_value_model(args.gvm, device, dtype=dtype)
    return value_model.requires_grad_(False).eval()  # §3: frozen for real


def train(args: Args):
    if args.advantage not in ADVANTAGES:
        raise UsageError(f"--advantage {args.advantage}: choose one of {', '.join(ADVANTAGES)}")
    loop.validate_rl(args)
    device = runtime.pick_device(args.device)
    prec = rollout.Precision(args.dtype, device)
    runtime.seed_everything(args.seed)
    tok, prompts, eval_prompts = loop.load_rl_data(args)
    critic = FrozenGVM(args, load_gvm(args, tok, device, prec.dtype))
    policy, ref = loop.load_rl_models(args, tok, device, prec)
    return loop.rl_train(args, critic, policy, ref, tok, prompts, eval_prompts, device, prec)


def main(argv=None):
    args = runtime.parse_args(Args, argv, __doc__)
    runtime.run_main(lambda: train(args))


if __name__ == "__main__":
    main()
