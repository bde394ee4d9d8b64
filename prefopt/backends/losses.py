"""Every loss and RL estimator as a pure function of tensors (shapes in the docstrings).

Nothing here touches a model, so each function is tested against hand-computed values and limit cases.
References: DPO (Rafailov et al. 2023, eq. 7); IPO (Azar et al. 2023, eq. 17); Bradley–Terry reward modelling
(Ouyang et al. 2022, eq. 1); PPO (Schulman et al. 2017); GAE (Schulman et al. 2016); KL estimators k1/k2/k3
(Schulman, "Approximating KL divergence", 2020); RLHF details (Huang et al. 2024, "The N+ implementation
details of RLHF with PPO").
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (padding may hold anything, even NaN)."""
    m = mask.bool()
    x = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return x.sum() / m.sum().clamp(min=1)
    return x.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten_scaled(
    x: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8, sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit (unbiased) variance over masked positions; padding -> 0. Returns (whitened, 1/std).

    ``sum_across`` all-reduces partial sums, so the statistics span every process's positions (several ranks).
    """
    m = mask.bool()
    total = sum_across or (lambda t: t)
    s = total(torch.stack([torch.where(m, x, torch.zeros_like(x)).sum(), m.sum().to(x.dtype)]))
    mean, n = s[0] / s[1].clamp(min=1), s[1]
    sq = total(torch.where(m, (x - mean) ** 2, torch.zeros_like(x)).sum())  # two passes: stable
    scale = torch.rsqrt(sq / (n - 1).clamp(min=1) + eps)
    return torch.where(m, (x - mean) * scale, torch.zeros_like(x)), scale


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over masked positions; padding -> 0."""
    return whiten_scaled(x, mask, eps=eps)[0]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family losses from sequence log-probs, all (B,).

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
      sigmoid (DPO):  -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)   (e = label_smoothing: conservative DPO)
      ipo:            (h - 1/(2 beta))^2
      hinge (SLiC):   relu(1 - beta h)
      simpo:          -log sigmoid(beta h - gamma), reference-free (Meng et al. 2024): the caller passes
                      length-normalised log-probs (mean over response tokens) and zeros for the reference
    Returns (losses, chosen_rewards, rejected_rewards) with implicit rewards beta * (log pi - log pi_ref).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * h - gamma)
    else:
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss -log sigmoid(s_w - s_l - margin): (B,) -> (B,). Margin as in Llama 2 (optional)."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens *sampled from pi*: (B, T) -> (B, T).

    With log r = log pi_ref(y) - log pi(y):
      k1 = -log r           (unbiased, can be negative per token)
      k2 = (log r)^2 / 2    (biased, low variance)
      k3 = (r - 1) - log r  (unbiased, always >= 0)
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: (B, T) each -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; V and A are 0 past the last
    real token (the episode ends there). Returns = A + V (the value targets).
    """
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    values = values * m
    rewards = rewards * m
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate: mean over tokens of max(-A ratio, -A clip(ratio, 1-c, 1+c)).

    Returns (loss, clipfrac, approx_kl) where approx_kl = mean((ratio - 1) - log ratio) (k3, old -> new).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)); returns (loss, clipfrac)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, masked_mean((l2 > l1).float(), mask).detach()


# ------------------------------------------------------------------------ estimators shared by online methods
def kl_penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: -beta * kl_t everywhere, plus the score at the last real response token. (B, R)"""
    rewards = -kl_coef * kl * mask
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards


def exact_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi(.|s_t) || pi_ref(.|s_t)) over the whole vocabulary from log-probs: (B, T, V) each -> (B, T)."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def future_kl_rewards(
    scores: torch.Tensor, state_kl: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward when the exact KL is in the loss: the score at the last real token, and at each token
    -beta * KL(next state), the exact KL of the distribution that the token's choice leads to. (B, R)

    d/dθ E[sum_t KL(s_t)] = E[sum_t dKL(s_t)/dθ] (what the loss term gives) + E[sum_t ∇log pi(y_t|s_t) sum_{t'>t} KL(s_t')]
    (how earlier tokens change later states: a policy-gradient term, which these rewards supply through the return).
    """
    m = mask.to(state_kl.dtype)
    rewards = torch.zeros_like(state_kl)
    rewards[:, :-1] = -kl_coef * (state_kl * m)[:, 1:]
    rewards = rewards * m
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages: rows come in groups of ``k`` samples of one prompt; each sample's baseline is the
    mean return of the other k-1. (B*k,) -> (B*k,); equal to k/(k-1) * (R_i - mean of the group)."""
    if k < 2 or returns.numel() % k:
        raise ValueError(f"rloo_advantages needs k >= 2 dividing the batch, got k={k} for {returns.numel()} returns")
    g = returns.view(-1, k)
    others = (g.sum(-1, keepdim=True) - g) / (k - 1)
    return (g - others).reshape(-1)


def apply_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Responses that never ended get ``penalty`` as their score (N+ details); others keep theirs. (B,)"""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def truncate_at(responses: Sequence[Sequence[int]], stop_id: int | None) -> list[list[int]]:
    """Cut each response after its first ``stop_id`` (kept); unchanged if None or absent."""
    if stop_id is None:
        return [list(r) for r in responses]
    return [list(r[: r.index(stop_id) + 1]) if stop_id in r else list(r) for r in responses]


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens (1 = perfect critic, <= 0 = useless)."""
    var_ret = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_ret.clamp(min=1e-8))


class KLController:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, eq. 2):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n / horizon), n = rollouts this step."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
