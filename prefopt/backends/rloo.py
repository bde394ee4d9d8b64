"""RLOO (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024): an on-policy, critic-free method.

Each prompt gets ``k`` samples from the current policy. A sample's return is its score minus ``kl_coef`` times
its sequence KL to the reference (k1: sum of log pi - log pi_ref over its tokens, the only estimator whose
policy gradient as a detached reward is the KL's); its baseline is the mean return of the prompt's other k-1
samples, so the gradient is unbiased without a value function. One optimiser step per rollout batch on
-mean(A_i * log pi(y_i)), exactly on-policy (no ratio, no clipping). Same reward sources as PPO; the reference is
the base with adapters off.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from prefopt.backends._common import (
    LR_SCHEDULES,
    StepCallback,
    TrainData,
    adamw,
    check_config,
    check_reward_source,
    encode_training_prompts,
    MICRO_BATCH_TOKENS,
    MICRO_BATCH_TOKENS_HELP,
    accumulated_step,
    dist_state,
    micro_batches,
    no_op,
    set_iteration_lr,
    sum_across,
)
from prefopt.backends.checkpoint import StepCheckpoint, resume
from prefopt.backends.losses import apply_eos_penalty, kl_per_token, rloo_advantages
from prefopt.models.ops import hidden_states, logprob_stats, make_batch, response_token_logprobs, sample
from prefopt.models.shared import SharedBase


@dataclass
class RLOOConfig:
    steps: int = field(default=24, metadata={"help": "Iterations (rollout + one update).", "positive": True})
    batch_size: int = field(default=8, metadata={"help": "Prompts per iteration.", "positive": True})
    k: int = field(default=4, metadata={"help": "Samples per prompt (>= 2: each one's baseline is the mean of the others)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate for the LoRA adapter.", "positive": True})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant', or 'linear': learning_rate * (1 - (i-1)/steps) at iteration i."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: weight of the sequence KL (k1) subtracted from each sample's score."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; log-probs use the same.", "positive": True})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "Score given to responses that never end (None: no penalty)."})
    reward: str = field(default="rm", metadata={"help": "Reward source: 'rm', 'gold', 'hf:<classifier>' or 'py:module:function' (as PPO)."})
    seed: int | None = field(default=None, metadata={"help": "Seed for prompt order and sampling (None: the run's master seed)."})
    micro_batch_tokens: int | None = field(default=MICRO_BATCH_TOKENS, metadata={"help": MICRO_BATCH_TOKENS_HELP})

    def __post_init__(self):
        check_config(self)
        check_reward_source("RLOOConfig", self.reward)
        if self.k < 2:
            raise ValueError(f"RLOOConfig.k must be >= 2 (the leave-one-out baseline needs another sample), got {self.k}")
        if self.kl_coef < 0:
            raise ValueError(f"RLOOConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"RLOOConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    def needs_reward_model(self) -> bool:
        return self.reward == "rm"


Config = RLOOConfig


def total_steps(cfg: RLOOConfig, data: TrainData) -> int:
    return cfg.steps


def train(
    shared: SharedBase, cfg: RLOOConfig, data: TrainData, *, role: str = "rloo", on_step: StepCallback = no_op,
    checkpoint: StepCheckpoint | None = None,
) -> None:
    """Run ``cfg.steps`` RLOO iterations on ``data.prompts`` against ``data.score_fn``, training adapter ``role``;
    ``checkpoint`` saves the state after every step and continues from the newest one found."""
    if data.score_fn is None:
        raise ValueError("RLOO needs a reward source: TrainData.score_fn is None")
    seed = 0 if cfg.seed is None else cfg.seed
    if role not in shared.roles:
        shared.add_role(role, seed=seed)
    tok, device = shared.tokenizer, shared.device
    prompt_ids = encode_training_prompts(data.prompts, tok, cfg.max_prompt_tokens)
    params = shared.adapter_parameters(role)
    opt = adamw(params, cfg.learning_rate)
    rng = random.Random(seed)
    dist = dist_state()  # under `accelerate launch`: each rank samples its own batch_size prompts, grads averaged
    world, rank = dist.num_processes, dist.process_index
    order: list[int] = []
    start = 1
    saved = resume(checkpoint, shared, role, opt, rngs={"rng": rng})
    if saved is not None:
        order, start = saved.state["order"], saved.step + 1
    for step in range(start, cfg.steps + 1):
        t0 = time.perf_counter()
        lr = set_iteration_lr(opt, cfg.learning_rate, cfg.lr_schedule, step, cfg.steps)
        while len(order) < cfg.batch_size * world:  # reshuffled every pass over the prompts
            more = list(range(len(prompt_ids)))
            rng.shuffle(more)
            order += more
        mine = order[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        order = order[cfg.batch_size * world :]
        prompts = [prompt_ids[i] for i in mine for _ in range(cfg.k)]  # prompt i's samples are rows i*k .. i*k+k-1
        with shared.role(role) as lm:
            responses = sample(lm, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               seed=seed * 100_003 + step + 1_000_003 * rank, batch_size=len(prompts))
        batch = make_batch(prompts, responses, tok.pad_token_id, device)
        ended = torch.tensor([len(r) > 0 and r[-1] == tok.eos_token_id for r in responses], device=device)
        raw = data.score_fn(prompts, responses).to(device).float()
        scores = apply_eos_penalty(raw, ended, cfg.missing_eos_penalty)
        with torch.no_grad(), shared.reference() as ref_lm:
            ref_logprobs = logprob_stats(ref_lm, hidden_states(ref_lm, batch), batch, cfg.temperature)[0]
        k, n = cfg.k, len(prompts)
        seq_kl, returns, advantages = (torch.zeros(n, device=device) for _ in range(3))
        shares: list[torch.Tensor] = []

        def loss_of(group):  # prompts of this micro-batch (each with its k samples): their share of the loss
            rows = [g * k + j for g in group for j in range(k)]
            mb = make_batch([prompts[i] for i in rows], [responses[i] for i in rows], tok.pad_token_id, device)
            logprobs = response_token_logprobs(lm, hidden_states(lm, mb), mb, cfg.temperature)
            R = mb.response_ids.shape[1]
            kl = (kl_per_token(logprobs.detach(), ref_logprobs[rows, :R], "k1") * mb.response_mask).sum(-1)
            seq_kl[rows] = kl
            returns[rows] = scores[rows] - cfg.kl_coef * kl
            advantages[rows] = rloo_advantages(returns[rows], k)  # a prompt's samples are all in this group
            share = -(advantages[rows] * (logprobs * mb.response_mask).sum(-1)).sum() / n
            shares.append(share.detach())
            return share

        with shared.role(role) as lm:
            groups = micro_batches(range(len(mine)), lambda g: (len(prompts[g * k]), max(len(responses[g * k + j]) for j in range(k))),
                                   cfg.micro_batch_tokens, rows_per_item=k)
            accumulated_step(groups, loss_of, params, opt, cfg.max_grad_norm, dist=dist, reduction="mean")
        stats = torch.stack([torch.stack(shares).sum(), raw.mean(), returns.mean(), seq_kl.mean(),
                             batch.response_lengths.float().mean(), ended.float().mean(), advantages.abs().mean()])
        stats = (sum_across(stats.double(), dist) / world).tolist()  # means over every rank's rollouts
        on_step(step, {
            **dict(zip(("train/loss", "train/score", "train/reward", "train/kl", "train/length", "train/eos_rate",
                        "train/advantage_abs"), stats)),
            "train/lr": lr,
            "time/step_s": time.perf_counter() - t0,
        })
        if checkpoint is not None and checkpoint.due(step, cfg.steps):
            checkpoint.save(step, weights=shared.adapter_state(role), opt=opt, rngs={"rng": rng}, state={"order": order})
