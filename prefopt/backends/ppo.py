"""PPO for language models, ours (trl 1.x has none), on a LoRA adapter + value head of the shared base.

Follows Ziegler et al. 2019 and Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"):
per-token KL penalty in the reward with a named estimator, the score added at the last response token, an
optional penalty for responses that never emit EOS, GAE (gamma=1, lambda=0.95), advantage whitening, clipped
policy and value losses, several epochs over minibatches, the sampling temperature applied wherever log-probs
are computed, dropout off. The reference is the base with adapters off. The value head sits on the policy's
trunk, so one forward gives log-probs and values.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from prefopt.backends._common import StepCallback, adamw, check_config, minibatches, no_op
from prefopt.backends.losses import KL_ESTIMATORS, gae, kl_per_token, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from prefopt.models.ops import (
    SeqBatch,
    entropy_from_logits,
    gather_logprobs,
    hidden_states,
    make_batch,
    response_hidden,
    response_logits,
    response_logprobs,
    sample,
)
from prefopt.models.shared import SharedBase

# score_fn(prompt_ids, response_ids) -> (B,) scores: a reward model, a gold judge, any Python function.
ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]


@dataclass
class PPOConfig:
    steps: int = field(default=12, metadata={"help": "PPO iterations (rollout + update).", "positive": True})
    batch_size: int = field(default=32, metadata={"help": "Rollouts (prompts) per iteration.", "positive": True})
    mini_batch_size: int = field(default=16, metadata={"help": "Rollouts per gradient step in the update.", "positive": True})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each iteration's rollouts.", "positive": True})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (adapter + value head).", "positive": True})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: weight of the per-token KL penalty in the reward."})
    kl_estimator: str = field(default="k1", metadata={"help": f"Per-token KL estimator in the reward, one of {KL_ESTIMATORS}."})
    gamma: float = field(default=1.0, metadata={"help": "Discount (1.0 for RLHF: one episode per response)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_range: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon.", "positive": True})
    vf_clip_range: float = field(default=0.2, metadata={"help": "Value clip around the rollout values.", "positive": True})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (shared trunk).", "positive": True})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; log-probs use the same.", "positive": True})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Score given to responses that never emit EOS (None: no penalty)."}
    )
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages per iteration."})
    role: str = field(default="ppo", metadata={"help": "Adapter name of this policy on the shared base."})
    seed: int = field(default=0, metadata={"help": "Seed for prompt order and sampling."})

    def __post_init__(self):
        check_config(self)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0:
            raise ValueError(f"PPOConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"PPOConfig.mini_batch_size ({self.mini_batch_size}) > batch_size ({self.batch_size})")


def _policy_forward(shared: SharedBase, lm, batch: SeqBatch, role: str, temperature: float):
    """One trunk pass -> (logits (B, R, V), values (B, R)). Values read the states that predict each token."""
    hidden = hidden_states(lm, batch)
    logits = response_logits(lm, hidden, batch, temperature)
    values = shared.heads[role](response_hidden(hidden, batch).float()).squeeze(-1)
    return logits, values


def kl_penalised_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token reward: -beta * kl_t everywhere, plus the score at the last real response token. (B, R)"""
    rewards = -kl_coef * kl * mask
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores
    return rewards


def apply_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Responses that never emitted EOS get ``penalty`` as their score (N+ details #23); others keep theirs."""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def train(
    shared: SharedBase,
    prompt_ids: Sequence[Sequence[int]],
    score_fn: ScoreFn,
    cfg: PPOConfig,
    *,
    on_step: StepCallback = no_op,
) -> None:
    if cfg.role not in shared.roles:
        shared.add_role(cfg.role, head=True)
    tok, device = shared.tokenizer, shared.device
    eos = tok.eos_token_id
    params = shared.adapter_parameters(cfg.role)
    opt = adamw(params, cfg.learning_rate)
    rng = random.Random(cfg.seed)
    order: list[int] = []

    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        # 1. rollout: the next batch of prompts (reshuffled every pass over the prompt set)
        while len(order) < cfg.batch_size:
            more = list(range(len(prompt_ids)))
            rng.shuffle(more)
            order += more
        batch_prompts = [list(prompt_ids[i])[-cfg.max_prompt_tokens :] for i in order[: cfg.batch_size]]
        order = order[cfg.batch_size :]
        with shared.role(cfg.role) as lm:
            responses = sample(
                lm, tok, batch_prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                seed=cfg.seed * 100_003 + step, batch_size=cfg.batch_size,
            )
        t_gen = time.perf_counter() - t0
        batch = make_batch(batch_prompts, responses, tok.pad_token_id, device)
        mask, lengths = batch.response_mask, batch.response_lengths  # (B, R), (B,)
        ended = torch.tensor([len(r) > 0 and r[-1] == eos for r in responses], device=device)

        # 2. score the rollouts (reward model, judge or function), EOS penalty for unterminated ones
        raw_scores = score_fn(batch_prompts, responses).to(device).float()  # (B,)
        scores = apply_eos_penalty(raw_scores, ended, cfg.missing_eos_penalty)

        # 3. log-probs and values of the rollout; reference log-probs; KL-penalised per-token reward
        with torch.no_grad():
            with shared.role(cfg.role) as lm:
                logits, old_values = _policy_forward(shared, lm, batch, cfg.role, cfg.temperature)
                old_logprobs = gather_logprobs(logits, batch.response_ids)  # (B, R)
                entropy = masked_mean(entropy_from_logits(logits), mask)
                del logits
            with shared.reference() as lm:
                ref_logprobs = response_logprobs(lm, batch, cfg.temperature)  # (B, R)
            kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, R)
            rewards = kl_penalised_rewards(scores, kl, mask, lengths, cfg.kl_coef)

            # 4. advantages (GAE over response tokens) and value targets
            advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask)

        # 5. update: ppo_epochs passes of minibatches, clipped policy + value losses
        stats = {"loss": [], "pg": [], "vf": [], "clipfrac": [], "approx_kl": [], "vf_clipfrac": []}
        with shared.role(cfg.role) as lm:
            for _ in range(cfg.ppo_epochs):
                for idx in minibatches(len(batch_prompts), cfg.mini_batch_size, rng):
                    mb = make_batch([batch_prompts[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id, device)
                    R = mb.response_ids.shape[1]  # minibatch may be narrower than the rollout batch
                    logits, values = _policy_forward(shared, lm, mb, cfg.role, cfg.temperature)
                    logprobs = gather_logprobs(logits, mb.response_ids)
                    m = mb.response_mask
                    pg_loss, clipfrac, approx_kl = ppo_policy_loss(
                        logprobs, old_logprobs[idx, :R], advantages[idx, :R], m, cfg.clip_range
                    )
                    vf_loss, vf_clipfrac = ppo_value_loss(values, old_values[idx, :R], returns[idx, :R], m, cfg.vf_clip_range)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    for k, v in (("loss", loss), ("pg", pg_loss), ("vf", vf_loss), ("clipfrac", clipfrac),
                                 ("approx_kl", approx_kl), ("vf_clipfrac", vf_clipfrac)):
                        stats[k].append(v.item())

        # 6. log (names from DESIGN.md)
        seq_kl = (kl.sum(-1)).mean().item()
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        on_step(step, {
            "train/loss": mean(stats["loss"]),
            "train/policy_loss": mean(stats["pg"]),
            "train/value_loss": mean(stats["vf"]),
            "train/score": raw_scores.mean().item(),
            "train/reward": rewards.sum(-1).mean().item(),
            "train/kl": seq_kl,
            "train/kl_negative_frac": masked_mean((kl < 0).float(), mask).item(),
            "train/entropy": entropy.item(),
            "train/clipfrac": mean(stats["clipfrac"]),
            "train/approx_kl": mean(stats["approx_kl"]),
            "train/vf_clipfrac": mean(stats["vf_clipfrac"]),
            "train/length": lengths.float().mean().item(),
            "train/eos_rate": ended.float().mean().item(),
            "time/rollout_s": t_gen,
            "time/step_s": time.perf_counter() - t0,
        })
