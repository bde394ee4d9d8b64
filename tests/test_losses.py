"""Losses and RL estimators against hand-computed values and naive reference implementations."""

import math

import pytest
import torch

from prefopt.backends.losses import (
    bradley_terry_loss,
    dpo_loss,
    exact_kl,
    future_kl_rewards,
    gae,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
    whiten_scaled,
)

t = torch.tensor


def test_dpo_loss_at_zero_logratio_is_log2():
    z = torch.zeros(3)
    losses, rc, rr = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.all(rc == 0) and torch.all(rr == 0)


def test_dpo_loss_hand_computed():
    # h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5 ; beta h = 0.15 ; loss = -log sigmoid(0.15)
    losses, rc, rr = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), beta=0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.05)


def test_dpo_loss_label_smoothing_and_variants():
    pc, pr, rc, rr = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5])  # h = 1.5
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    assert cdpo.item() == pytest.approx(expected, rel=1e-6)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.5 - 5.0) ** 2)
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    assert hinge.item() == pytest.approx(1 - 0.15)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")


def test_dpo_loss_limits():
    # a very confident correct preference -> loss -> 0; a very wrong one -> loss ~ beta * |h|
    big = t([100.0])
    loss, _, _ = dpo_loss(big, -big, t([0.0]), t([0.0]), beta=0.1)
    assert loss.item() < 1e-8
    loss, _, _ = dpo_loss(-big, big, t([0.0]), t([0.0]), beta=0.1)
    assert loss.item() == pytest.approx(20.0, rel=1e-6)


def test_bradley_terry_hand_computed():
    # s_w - s_l = 2 -> -log sigmoid(2) = log(1 + e^-2)
    loss = bradley_terry_loss(t([1.0, 0.0]), t([-1.0, 0.0]))
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert loss[1].item() == pytest.approx(math.log(2), rel=1e-6)
    with_margin = bradley_terry_loss(t([1.0]), t([-1.0]), margin=t([2.0]))
    assert with_margin.item() == pytest.approx(math.log(2), rel=1e-6)


def test_kl_estimators_hand_computed():
    lp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    # log r = ref - lp = [-0.5, 1.0]
    assert torch.allclose(kl_per_token(lp, ref, "k1"), t([[0.5, -1.0]]))
    assert torch.allclose(kl_per_token(lp, ref, "k2"), t([[0.125, 0.5]]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert torch.allclose(kl_per_token(lp, ref, "k3"), t([k3]))
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(lp, ref, "k9")


def test_kl_estimators_unbiased_on_samples():
    # sample from p, estimate KL(p || q) with k1 and k3 and compare with the exact value
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = (p * (p / q).log()).sum().item()
    y = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[y], q.log()[y]
    for est in ("k1", "k3"):
        assert kl_per_token(lp, lq, est).mean().item() == pytest.approx(exact, abs=0.01)
    assert (kl_per_token(lp, lq, "k3") >= 0).all()


def naive_gae(rewards, values, lengths, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        for t_ in range(n):
            a = 0.0
            for l in range(t_, n):
                v_next = values[b][l + 1] if l + 1 < n else 0.0
                delta = rewards[b][l] + gamma * v_next - values[b][l]
                a += (gamma * lam) ** (l - t_) * delta
            adv[b][t_] = a
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_loop(gamma, lam):
    torch.manual_seed(1)
    B, T = 4, 7
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = [7, 3, 1, 5]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.tensor(naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-5)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.2, 0.4, 0.6]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(ret, t([[1.0, 1.0, 1.0]]))
    assert torch.allclose(adv, t([[0.8, 0.6, 0.4]]))


def test_whiten_and_masked_mean_ignore_padding():
    x = t([[1.0, 2.0, 3.0, float("nan")]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    w = whiten(x, mask)
    assert torch.allclose(w[0, :3], t([-1.0, 0.0, 1.0]), atol=1e-6)  # unbiased std of [1,2,3] is 1
    assert w[0, 3].item() == 0.0


def naive_policy_loss(lp, old, adv, mask, clip):
    num, den, clipped_n = 0.0, 0.0, 0.0
    for a, b, c, m in zip(lp, old, adv, mask):
        if not m:
            continue
        ratio = math.exp(a - b)
        u, cl = -c * ratio, -c * min(max(ratio, 1 - clip), 1 + clip)
        num += max(u, cl)
        clipped_n += cl > u
        den += 1
    return num / den, clipped_n / den


def test_ppo_policy_loss_matches_naive():
    torch.manual_seed(2)
    lp, old, adv = torch.randn(12) * 0.3, torch.randn(12) * 0.3, torch.randn(12)
    mask = torch.ones(12)
    mask[-3:] = 0
    loss, clipfrac, approx_kl = ppo_policy_loss(lp, old, adv, mask, 0.2)
    exp_loss, exp_clip = naive_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    assert clipfrac.item() == pytest.approx(exp_clip)
    r = (lp - old)[:9]
    assert approx_kl.item() == pytest.approx((torch.expm1(r) - r).mean().item(), rel=1e-5)


def test_ppo_policy_loss_gradient_zero_when_clipped():
    # positive advantage and ratio above 1 + clip: the clipped branch is taken, no gradient flows
    lp = t([1.0], requires_grad=True)
    loss, clipfrac, _ = ppo_policy_loss(lp, t([0.0]), t([1.0]), t([1.0]), 0.2)
    loss.backward()
    assert lp.grad.item() == 0.0 and clipfrac.item() == 1.0


def test_ppo_value_loss_hand_computed():
    # V = 2, V_old = 0, R = 1, clip 0.5 -> clipped V = 0.5: max((2-1)^2, (0.5-1)^2) = 1 -> 0.5
    loss, vf_clip = ppo_value_loss(t([2.0]), t([0.0]), t([1.0]), t([1.0]), 0.5)
    assert loss.item() == pytest.approx(0.5) and vf_clip.item() == 0.0
    # V = 2, V_old = 0, R = 3: clipped 0.5 -> (0.5-3)^2 = 6.25 > 1 -> 3.125, clipped branch
    loss, vf_clip = ppo_value_loss(t([2.0]), t([0.0]), t([3.0]), t([1.0]), 0.5)
    assert loss.item() == pytest.approx(3.125) and vf_clip.item() == 1.0


def test_whiten_across_ranks_equals_whitening_the_pooled_data():
    # two ranks holding identical data: all-reducing partial sums doubles them; the result must equal whitening
    # both copies together, and the returned scale is 1 / (unbiased std) of the pooled data
    torch.manual_seed(3)
    x = torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    out, scale = whiten_scaled(x, mask, sum_across=lambda t: 2 * t)
    pooled = whiten(torch.cat([x, x]), torch.cat([mask, mask]))
    assert torch.allclose(out, pooled[:3], atol=1e-6)
    vals = torch.cat([x[mask.bool()], x[mask.bool()]])
    assert scale.item() == pytest.approx(1 / vals.std(unbiased=True).item(), rel=1e-5)


def test_exact_kl_hand_computed():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    want = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    got = exact_kl(p.log()[None, None], q.log()[None, None])
    assert got.shape == (1, 1) and math.isclose(got.item(), want, rel_tol=1e-6)
    assert exact_kl(q.log()[None], q.log()[None]).abs().item() < 1e-7


def test_future_kl_rewards_hand_computed():
    # two responses of lengths 3 and 1; state KLs per position (the second row's padding holds junk)
    state_kl = torch.tensor([[0.1, 0.2, 0.4], [0.3, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    lengths = torch.tensor([3, 1])
    got = future_kl_rewards(torch.tensor([1.0, -2.0]), state_kl, mask, lengths, kl_coef=0.5)
    # token t is charged the KL of state t+1; the last real token gets the score and no KL
    want = torch.tensor([[-0.1, -0.2, 1.0], [-2.0, 0.0, 0.0]])
    assert torch.allclose(got, want)


def test_simpo_loss_hand_computed():
    # mean log-probs -1.0 (chosen) and -2.0 (rejected), no reference: -log sigmoid(beta * 1 - gamma)
    c, r, z = t([-1.0]), t([-2.0]), t([0.0])
    losses, rc, rr = dpo_loss(c, r, z, z, beta=2.0, loss_type="simpo", gamma=0.5)
    assert math.isclose(losses.item(), -math.log(1 / (1 + math.exp(-(2.0 - 0.5)))), rel_tol=1e-6)
    assert torch.allclose(rc, t([-2.0])) and torch.allclose(rr, t([-4.0]))


def test_rloo_advantages_against_the_naive_loop():
    returns = t([1.0, 2.0, 6.0, -1.0, 0.0, 4.0])  # two prompts, k = 3
    naive = []
    for g in range(2):
        group = returns[3 * g : 3 * g + 3].tolist()
        for i in range(3):
            naive.append(group[i] - sum(x for j, x in enumerate(group) if j != i) / 2)
    assert torch.allclose(rloo_advantages(returns, 3), t(naive))
    assert torch.allclose(rloo_advantages(returns, 3).view(2, 3).sum(-1), t([0.0, 0.0]))
    with pytest.raises(ValueError):
        rloo_advantages(returns, 4)
