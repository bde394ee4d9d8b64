"""RL and DPO on a problem whose answer is known in closed form.

One prompt, single-token responses over an 8-token vocabulary, a fixed reward vector r. The KL-regularised
objective  max_pi E_pi[r(y)] - beta KL(pi || pi_ref)  has the optimum  pi*(y) ∝ pi_ref(y) exp(r(y) / beta).
PPO (KL as a per-token penalty in the reward, or exact KL in the loss) must reach it, and so must DPO trained
on Bradley–Terry pairs sampled from r with the same beta (the DPO paper's equivalence).
"""

import pytest
import torch

from prefopt.backends import dpo, ppo
from prefopt.backends._common import TrainData
from prefopt.data.records import PreferencePair
from prefopt.models.base import char_tokenizer, tiny_causal_lm
from prefopt.models.ops import hidden_states, make_batch, response_logits
from prefopt.models.shared import LoraSettings, SharedBase

ACTIONS = "abcdefg"  # token ids 1..7; id 0 is <eos>, also an action
R = torch.tensor([1.0, 2.0, 0.0, -1.5, 1.5, 0.5, 2.0, -1.0])
BETA = 1.0
PROMPT = "abc"


def _setup():
    tok = char_tokenizer(ACTIONS, unk=False)  # <eos> = 0, 'a'..'g' = 1..7
    lm = tiny_causal_lm(len(tok), seed=0)
    with torch.no_grad():
        lm.model.norm.weight.mul_(4.0)  # peaked pi_ref, and logits large enough for the LoRA policy to reach pi*
    lm.requires_grad_(False)
    shared = SharedBase(lm, tok, LoraSettings(r=8, alpha=16))
    prompt_ids = [tok(PROMPT, add_special_tokens=False).input_ids]
    return shared, prompt_ids


def _probs(shared, role, prompt_ids):
    ctx = shared.reference() if role is None else shared.role(role)
    with torch.no_grad(), ctx as lm:
        batch = make_batch(prompt_ids, [[0]], shared.tokenizer.pad_token_id, shared.device)
        return response_logits(lm, hidden_states(lm, batch), batch)[0, 0].softmax(-1)


def _optimum(pi_ref):
    p = pi_ref * torch.exp(R / BETA)
    return p / p.sum()


def _tv(p, q) -> float:
    return 0.5 * (p - q).abs().sum().item()


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_ppo_reaches_kl_regularised_optimum(kl_in):
    torch.manual_seed(0)
    shared, prompt_ids = _setup()
    pi_ref = _probs(shared, None, prompt_ids)
    pi_star = _optimum(pi_ref)
    assert _tv(pi_ref, pi_star) > 0.3  # the problem is not trivially solved by pi_ref

    def score_fn(prompts, responses):
        return R[torch.tensor([r[0] for r in responses])]

    cfg = ppo.PPOConfig(
        steps=120, batch_size=256, mini_batch_size=256, ppo_epochs=4, learning_rate=1e-2,
        kl_coef=BETA, kl_in=kl_in, kl_estimator="k1", max_new_tokens=1, seed=0,
    )
    ppo.train(shared, cfg, TrainData(prompts=prompt_ids, score_fn=score_fn))
    pi = _probs(shared, "ppo", prompt_ids)
    assert _tv(pi, pi_star) < 0.05, (pi, pi_star)


def test_dpo_reaches_kl_regularised_optimum():
    torch.manual_seed(0)
    shared, prompt_ids = _setup()
    pi_star = _optimum(_probs(shared, None, prompt_ids))

    g = torch.Generator().manual_seed(0)
    n = 20_000
    a, b = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
    keep = a != b
    a, b = a[keep], b[keep]
    a_wins = torch.rand(len(a), generator=g) < torch.sigmoid(R[a] - R[b])  # Bradley–Terry labels from r
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)

    def text(t: int) -> str:
        return "" if t == 0 else ACTIONS[t - 1]  # "" + EOS is the single token 0

    pairs = [
        PreferencePair(prompt=PROMPT, chosen=text(c), rejected=text(r), meta={"chosen_eos": c == 0, "rejected_eos": r == 0})
        for c, r in zip(chosen.tolist(), rejected.tolist())
    ]
    cfg = dpo.DPOConfig(beta=BETA, learning_rate=3e-2, epochs=5, batch_size=1024, lr_schedule="linear", seed=0)
    dpo.train(shared, cfg, TrainData(pairs=pairs))
    pi = _probs(shared, "dpo", prompt_ids)
    assert _tv(pi, pi_star) < 0.05, (pi, pi_star)
