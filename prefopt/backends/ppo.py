"""PPO for language models, ours (trl 1.x has none), on a LoRA adapter + value head of the shared base.

Follows Ziegler et al. 2019 and Huang et al. 2024 ("The N+ implementation details of RLHF with PPO"):
per-token KL penalty in the reward with a named estimator (or the exact KL in the loss), the score added at the
last response token, an optional penalty for responses that never end (EOS or a stop token), optional truncation
at a stop token, GAE (gamma=1, lambda=0.95), advantage whitening, clipped policy and value losses, several epochs
over minibatches with gradient accumulation, the sampling temperature applied wherever log-probs are computed,
dropout off, an optional adaptive KL controller, a value head initialisable from the reward model's head.
The reference is the base with adapters off. The value head sits on the policy's trunk, so one forward gives
log-probs and values.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from accelerate.utils import reduce as all_reduce

from prefopt._alloc import release_heap
from prefopt.backends._common import (
    LR_SCHEDULES,
    MICRO_BATCH_TOKENS_HELP,
    StepCallback,
    TrainData,
    accumulated_step,
    adamw,
    check_config,
    check_reward_source,
    dist_state,
    encode_training_prompts,
    micro_batches,
    minibatches,
    no_op,
    set_iteration_lr,
)
from prefopt.backends.checkpoint import StepCheckpoint
from prefopt.backends.losses import (
    KL_ESTIMATORS,
    KLController,
    apply_eos_penalty,
    exact_kl,
    explained_variance,
    future_kl_rewards,
    gae,
    kl_penalised_rewards,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_at,
    whiten_scaled,
)
from prefopt.models.ops import (
    SeqBatch,
    gather_logprobs,
    head_stats,
    hidden_states,
    logprob_stats,
    make_batch,
    response_hidden,
    response_logits,
    response_token_logprobs,
    sample,
    sample_states,
)
from prefopt.models.shared import SharedBase

log = logging.getLogger("prefopt.ppo")

KL_PLACEMENTS = ("reward", "loss")
# Checked in tests/test_closed_form.py: the expected gradient of each combination against the exact gradient of
# E[score] - beta KL(pi || pi_ref) on a two-token problem, and training to the closed-form optimum.
REFUSED_ESTIMATORS = {
    est: f"as a detached per-token reward only k1 gives a policy gradient equal to the KL's gradient ({est} moves the "
         "optimum away from pi_ref*exp(r/beta): Tang & Munos 2025); use k1, or kl_in='loss' for the exact KL"
    for est in ("k2", "k3")
}


PPO_MICRO_BATCH_TOKENS = 256


@dataclass
class PPOConfig:
    steps: int = field(default=12, metadata={"help": "PPO iterations (rollout + update).", "positive": True})
    batch_size: int = field(default=32, metadata={"help": "Rollouts (prompts) per iteration.", "positive": True})
    mini_batch_size: int = field(default=16, metadata={"help": "Rollouts per optimiser step in the update.", "positive": True})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per minibatch (memory: mini_batch_size / grad_accum rows per forward).", "positive": True})
    # 256, not the 1024 of the pair-based backends: a PPO step of 16 rollouts x 32 tokens (4 epochs, 2 threads)
    # peaks at 3328 MiB with 1024, 2575 with 512, 2020 with 256, at the same ~21 s a step (benchmarks/ppo_peer.py)
    micro_batch_tokens: int | None = field(default=PPO_MICRO_BATCH_TOKENS, metadata={"help": MICRO_BATCH_TOKENS_HELP})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each iteration's rollouts.", "positive": True})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (adapter + value head); the same LoRA rate as DPO.", "positive": True})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant', or 'linear': the rate of iteration i is "
                                                           "learning_rate * (1 - (i-1)/steps) (annealing, as in cleanrl and trl's PPO)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    kl_coef: float = field(default=0.05, metadata={"help": "beta: weight of the KL penalty (initial value if kl_target is set)."})
    kl_estimator: str = field(default="k1", metadata={"help": "Per-token KL estimator in the reward and in train/kl: 'k1' "
                                                       "(k2 and k3 are refused: as rewards their gradient is not the KL's)."})
    kl_in: str = field(default="reward", metadata={"help": "'reward': -kl_coef * k1_t in each token's reward (Ziegler et al. 2019); "
                                                     "'loss': exact full-vocabulary KL(pi || pi_ref) of each sampled state in the "
                                                     "loss, and the exact KL of the next state charged to each token's reward "
                                                     "(the gradient through later states)."})
    kl_target: float | None = field(default=None, metadata={"help": "Adaptive KL controller target (sequence KL, nats); None = fixed kl_coef."})
    kl_horizon: int = field(default=10_000, metadata={"help": "Adaptive KL controller horizon (Ziegler et al.: 10000).", "positive": True})
    gamma: float = field(default=1.0, metadata={"help": "Discount (1.0 for RLHF: one episode per response)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_range: float = field(default=0.2, metadata={"help": "Policy ratio clip epsilon.", "positive": True})
    vf_clip_range: float = field(default=0.2, metadata={"help": "Value clip around the rollout values.", "positive": True})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss (shared trunk).", "positive": True})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; log-probs use the same.", "positive": True})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    stop_token_id: int | None = field(default=None, metadata={"help": "Cut each response after its first occurrence of this token (N+ details: truncation)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Score given to responses that end with neither EOS nor the stop token (None: no penalty)."}
    )
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages per iteration."})
    value_adapter: bool = field(default=False, metadata={"help": "False: value head on the policy's trunk (one forward gives "
                                                          "log-probs and values); True: the value function gets its own LoRA adapter + head."})
    reward: str = field(default="rm", metadata={"help": "Reward source: 'rm' (the reward model trained on the pairs), 'gold' (the gold "
                                                 "judge itself: PPO-GT), 'hf:<classifier>' or 'py:module:function'."})
    rollout_states: bool = field(default=True, metadata={"help": "Take the rollout's log-probs, entropies and values from "
                                                         "the trunk states the sampling pass computed (KV-cached); False: a "
                                                         "second forward over prompt + response (the same to float rounding)."})
    value_from_rm: bool = field(default=False, metadata={"help": "Initialise the value head from the reward model's score head (N+ details)."})
    seed: int | None = field(default=None, metadata={"help": "Seed for prompt order and sampling (None: the run's master seed)."})
    save_every: int | None = field(default=None, metadata={"help": "Write a resumable checkpoint every N steps (needs checkpoint_dir)."})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "Folder for the resumable checkpoint."})

    def __post_init__(self):
        check_config(self)
        check_reward_source("PPOConfig", self.reward)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"PPOConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_in not in KL_PLACEMENTS:
            raise ValueError(f"PPOConfig.kl_in must be one of {KL_PLACEMENTS}, got {self.kl_in!r}")
        if self.kl_estimator in REFUSED_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator={self.kl_estimator!r} is refused: {REFUSED_ESTIMATORS[self.kl_estimator]}")
        if self.kl_coef < 0:
            raise ValueError(f"PPOConfig.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError(f"PPOConfig.kl_target must be > 0 or None, got {self.kl_target}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"PPOConfig.gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.mini_batch_size > self.batch_size:
            raise ValueError(f"PPOConfig.mini_batch_size ({self.mini_batch_size}) > batch_size ({self.batch_size})")
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(f"PPOConfig.grad_accum ({self.grad_accum}) must divide mini_batch_size ({self.mini_batch_size})")
        if self.save_every is not None and (self.save_every <= 0 or not self.checkpoint_dir):
            raise ValueError("PPOConfig.save_every needs a positive value and a checkpoint_dir")

    def needs_reward_model(self) -> bool:
        return self.reward == "rm" or self.value_from_rm


Config = PPOConfig


def total_steps(cfg: PPOConfig, data: TrainData) -> int:
    """Optimisation iterations ``train`` will run (the pipeline places checkpoint evaluations on these)."""
    return cfg.steps


def rollout_states(drawn: list[torch.Tensor], batch: SeqBatch) -> torch.Tensor:
    """The sampling pass's per-response states (len_i, H) laid out like ``batch``'s responses: (B, R, H), zero past
    each response's end (a stop token may have cut it shorter than it was sampled)."""
    B, R = batch.response_ids.shape
    out = torch.zeros(B, R, drawn[0].shape[-1], dtype=drawn[0].dtype, device=batch.response_ids.device)
    for i, (st, n) in enumerate(zip(drawn, batch.response_lengths.tolist())):
        out[i, :n] = st[:n]
    return out


def init_value_head_from_rm(value_head: torch.nn.Linear, rm) -> None:
    """Copy the reward model's score head into ``value_head``, in the reward model's normalised units
    ((score - offset) / scale), so the value starts out predicting the reward PPO is given."""
    with torch.no_grad():
        value_head.weight.copy_(rm.head.weight / rm.scale)
        value_head.bias.copy_((rm.head.bias - rm.offset) / rm.scale)


class _Roles:
    """Where PPO's roles live. Default: policy adapter (+ value head on its trunk) on ``shared``, reference =
    ``shared`` with adapters off. ``value_adapter`` moves the value function to its own adapter + head; the
    ``reference``/``value_base`` arguments put roles on other bases (the naive many-copies layout, for benchmarks).
    """

    def __init__(self, shared: SharedBase, cfg: PPOConfig, role: str, reference: SharedBase | None,
                 value_base: SharedBase | None, seed: int):
        self.shared, self.cfg, self.role = shared, cfg, role
        self.ref_base = reference or shared
        self.value_base = value_base or shared
        self.value_role = f"{role}_value" if cfg.value_adapter else role
        if role not in shared.roles:
            shared.add_role(role, head=not cfg.value_adapter, seed=seed)
        if cfg.value_adapter and self.value_role not in self.value_base.roles:
            self.value_base.add_role(self.value_role, head=True, seed=seed)

    @property
    def value_head(self) -> torch.nn.Linear:
        return self.value_base.heads[self.value_role]

    def parameters(self) -> list[torch.nn.Parameter]:
        params = self.shared.adapter_parameters(self.role)
        if self.cfg.value_adapter:
            params += self.value_base.adapter_parameters(self.value_role)
        return params

    def forward(self, lm, batch: SeqBatch, temperature: float, full: bool = False):
        """(log-probs (B, R), the whole log-softmax (B, R, V) with ``full`` else None, values (B, R)) with the
        policy adapter active in ``lm``. Values read the states that predict each token: one trunk pass when the
        value head sits on the policy trunk."""
        hidden = hidden_states(lm, batch)
        if full:
            logits = response_logits(lm, hidden, batch, temperature)
            logprobs, logp_full = gather_logprobs(logits, batch.response_ids), torch.log_softmax(logits, -1)
        else:  # no (B, R, V) tensor kept beyond the one the backward pass reuses
            logprobs, logp_full = response_token_logprobs(lm, hidden, batch, temperature), None
        return logprobs, logp_full, self.values(hidden, batch)

    def values(self, hidden: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        """Values (B, R) from the policy trunk's hidden states (B, P+R, H) (or the value adapter's own pass)."""
        return self.values_at(response_hidden(hidden, batch), batch)

    def values_at(self, states: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        """Values (B, R) from the policy trunk's states that predict each token, (B, R, H) (with a value adapter:
        its own pass over ``batch``)."""
        if self.cfg.value_adapter:
            with self.value_base.role(self.value_role) as vlm:
                states = response_hidden(hidden_states(vlm, batch), batch)
        return self.value_head(states.float()).squeeze(-1)

    def state(self) -> dict[str, torch.Tensor]:
        state = dict(self.shared.adapter_state(self.role))
        if self.cfg.value_adapter:
            state.update({f"value::{k}": v for k, v in self.value_base.adapter_state(self.value_role).items()})
        return state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.shared.load_adapter_state(self.role, {k: v for k, v in state.items() if not k.startswith("value::")})
        if self.cfg.value_adapter:
            self.value_base.load_adapter_state(self.value_role,
                                               {k.split("::", 1)[1]: v for k, v in state.items() if k.startswith("value::")})


class _Watch:
    """Warnings for the failure modes users report most: negative KL, EOS collapse, length drift."""

    def __init__(self):
        self.first: dict | None = None
        self.said: set[str] = set()

    def check(self, step: int, m: dict) -> None:
        if self.first is None:
            self.first = m
            return
        if m["train/kl"] < 0:
            self._say("kl", f"step {step}: mean sequence KL is negative ({m['train/kl']:.3f}); with k1 this means "
                      "log-probs disagree with the sampler (temperature, padding or dropout mismatch)")
        e0 = self.first["train/eos_rate"]
        if e0 >= 0.2 and m["train/eos_rate"] < 0.5 * e0:
            self._say("eos", f"step {step}: EOS rate collapsed from {e0:.2f} to {m['train/eos_rate']:.2f}; "
                      "consider missing_eos_penalty")
        l0, l = self.first["train/length"], m["train/length"]
        if l0 > 0 and (l > 2 * l0 or l < 0.5 * l0):
            self._say("length", f"step {step}: mean response length drifted from {l0:.1f} to {l:.1f} tokens")

    def _say(self, key: str, msg: str) -> None:
        if key not in self.said:
            self.said.add(key)
            log.warning(msg)


# --------------------------------------------------------------------------------------- several processes (DDP)
# Under `accelerate launch` every rank samples its own rollouts; whitening uses statistics over all ranks, and
# gradients are averaged across ranks before every optimiser step (what DDP does), so the ranks stay identical.
def _mean_over_ranks(metrics: dict, dist: PartialState) -> dict:
    if dist.num_processes == 1:
        return metrics
    keys = [k for k in metrics if k.startswith("train/")]
    vals = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), reduction="mean")
    return {**metrics, **dict(zip(keys, vals.tolist()))}


def train(
    shared: SharedBase,
    cfg: PPOConfig,
    data: TrainData,
    *,
    role: str = "ppo",
    on_step: StepCallback = no_op,
    resume: bool = False,
    reference: SharedBase | None = None,
    value_base: SharedBase | None = None,
    checkpoint: StepCheckpoint | None = None,
) -> None:
    """Run ``cfg.steps`` PPO iterations on ``data.prompts`` against ``data.score_fn``, training adapter ``role``.

    ``checkpoint`` (or ``cfg.save_every`` + ``cfg.checkpoint_dir``) saves the loop's state after every step (every
    N) and continues from the newest one found; ``resume`` demands one. ``reference`` / ``value_base`` put those roles
    on other bases (the many-copies layout, for benchmarks only).
    """
    if data.score_fn is None:
        raise ValueError("PPO needs a reward source: TrainData.score_fn is None")
    seed = 0 if cfg.seed is None else cfg.seed
    roles = _Roles(shared, cfg, role, reference, value_base, seed)
    if cfg.value_from_rm:  # value head starts as the reward model's score head (N+ details)
        rm = data.reward_model
        if rm is None:
            raise ValueError("PPOConfig.value_from_rm needs a trained reward model")
        init_value_head_from_rm(roles.value_head, rm)
    score_fn = data.score_fn
    tok, device = shared.tokenizer, shared.device
    prompt_ids = encode_training_prompts(data.prompts, tok, cfg.max_prompt_tokens)
    eos, stop = tok.eos_token_id, cfg.stop_token_id
    dist = dist_state()  # one process unless started by `accelerate launch` / torchrun
    world, rank = dist.num_processes, dist.process_index
    params = roles.parameters()
    opt = adamw(params, cfg.learning_rate)
    rng = random.Random(seed)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    watch = _Watch()
    order: list[int] = []
    start = 1
    if checkpoint is None and cfg.save_every:
        checkpoint = StepCheckpoint(cfg.checkpoint_dir, cfg.save_every)
    if resume and checkpoint is None:
        raise ValueError("resume needs PPOConfig.checkpoint_dir")
    saved = checkpoint.load() if checkpoint is not None else None
    if resume and saved is None:
        raise ValueError(f"resume: no PPO checkpoint in {checkpoint.folder}")
    if saved is not None:
        roles.load(saved.weights)
        saved.restore(opt, rngs={"rng": rng})
        st = saved.state
        order, kl_ctl.value, watch.first, start = st["order"], st["kl_coef"], st["watch_first"], saved.step + 1

    for step in range(start, cfg.steps + 1):
        t0 = time.perf_counter()
        lr = set_iteration_lr(opt, cfg.learning_rate, cfg.lr_schedule, step, cfg.steps)
        # 1. rollout: the next batch of prompts (reshuffled every pass over the prompt set); rank r takes the
        #    r-th slice, so `batch_size` is per process
        while len(order) < cfg.batch_size * world:
            more = list(range(len(prompt_ids)))
            rng.shuffle(more)
            order += more
        mine = order[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        batch_prompts = [list(prompt_ids[i])[-cfg.max_prompt_tokens :] for i in mine]
        order = order[cfg.batch_size * world :]
        draw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    seed=seed * 100_003 + step + 1_000_003 * rank, batch_size=cfg.batch_size)
        with shared.role(role) as lm:
            if cfg.rollout_states:  # the same responses, and the trunk states that predicted their tokens
                responses, drawn_states = sample_states(lm, tok, batch_prompts, **draw)
            else:
                responses = sample(lm, tok, batch_prompts, **draw)
        responses = truncate_at(responses, stop)
        t_gen = time.perf_counter() - t0
        batch = make_batch(batch_prompts, responses, tok.pad_token_id, device)
        mask, lengths = batch.response_mask, batch.response_lengths  # (B, R), (B,)
        ended = torch.tensor([len(r) > 0 and r[-1] in (eos, stop) for r in responses], device=device)

        # 2. score the rollouts (reward model, judge or function); penalty for responses that never ended
        raw_scores = score_fn(batch_prompts, responses).to(device).float()  # (B,)
        scores = apply_eos_penalty(raw_scores, ended, cfg.missing_eos_penalty)

        # 3. log-probs and values of the rollout; reference log-probs; KL-penalised per-token reward
        # (the LM head runs on a bounded number of positions at a time: no (B, R, V) logits of the whole rollout,
        # except the full distributions that the exact KL in the loss needs)
        with torch.no_grad():
            with shared.role(role) as lm:
                if cfg.rollout_states:  # no second pass over the rollout: the sampling pass's states, (B, R, H)
                    states = rollout_states(drawn_states, batch)
                else:
                    states = response_hidden(hidden_states(lm, batch), batch)
                old_values = roles.values_at(states, batch)
                old_logprobs, token_entropy, old_logp_full = head_stats(
                    lm, states, batch.response_ids, cfg.temperature, entropy=True, full=cfg.kl_in == "loss")  # (B, R) ...
                entropy = masked_mean(token_entropy, mask)
                del states
            with roles.ref_base.reference() as lm:
                ref_logprobs, _, ref_logp_full = logprob_stats(lm, hidden_states(lm, batch), batch, cfg.temperature,
                                                               full=cfg.kl_in == "loss")
            kl = kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask  # (B, R)
            beta = kl_ctl.value
            if cfg.kl_in == "reward":
                rewards = kl_penalised_rewards(scores, kl, mask, lengths, beta)
            else:
                # the loss term differentiates each token's KL at the states sampled; how an action changes the
                # KL of the states after it is a policy-gradient term: each action is charged the exact KL of
                # the next state (and, through the return, of every later one)
                state_kl = exact_kl(old_logp_full, ref_logp_full) * mask  # (B, R)
                del old_logp_full
                rewards = future_kl_rewards(scores, state_kl, mask, lengths, beta)

            # 4. advantages (GAE over response tokens) and value targets
            advantages, returns = gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam)
            adv_scale = torch.ones((), device=device)
            if cfg.whiten_advantages:  # statistics over every rank's rollouts
                sum_across = (lambda t: all_reduce(t, reduction="sum")) if world > 1 else None
                advantages, adv_scale = whiten_scaled(advantages, mask, sum_across=sum_across)

        release_heap()  # the scoring passes' activations are freed: their pages go back before the update's
        # 5. update: ppo_epochs passes of minibatches, each accumulated over grad_accum micro-batches of at most
        #    micro_batch_tokens padded tokens
        stats: dict[str, list[float]] = {k: [] for k in ("loss", "pg", "vf", "clipfrac", "approx_kl", "vf_clipfrac")}
        micro = cfg.mini_batch_size // cfg.grad_accum
        with shared.role(role) as lm:
            for _ in range(cfg.ppo_epochs):
                for idx in minibatches(len(batch_prompts), cfg.mini_batch_size, rng):
                    n_tokens = mask[idx].sum()

                    def loss_of(sub):
                        mb = make_batch([batch_prompts[i] for i in sub], [responses[i] for i in sub], tok.pad_token_id, device)
                        R = mb.response_ids.shape[1]  # a micro-batch may be narrower than the rollout batch
                        logprobs, logp_full, values = roles.forward(lm, mb, cfg.temperature, full=ref_logp_full is not None)
                        m = mb.response_mask
                        pg_loss, clipfrac, approx_kl = ppo_policy_loss(
                            logprobs, old_logprobs[sub, :R], advantages[sub, :R], m, cfg.clip_range
                        )
                        vf_loss, vf_clipfrac = ppo_value_loss(values, old_values[sub, :R], returns[sub, :R], m, cfg.vf_clip_range)
                        loss = pg_loss + cfg.vf_coef * vf_loss
                        if ref_logp_full is not None:  # exact KL(pi || pi_ref) per token, differentiable
                            kl_exact = exact_kl(logp_full, ref_logp_full[sub, :R])  # (b, R)
                            # whitening divided the policy-gradient term by std(A); the KL term gets the same
                            # factor, else the effective coefficient becomes beta * std(A) and the optimum moves
                            loss = loss + beta * adv_scale * masked_mean(kl_exact, m)
                        for k, v in (("loss", loss), ("pg", pg_loss), ("vf", vf_loss), ("clipfrac", clipfrac),
                                     ("approx_kl", approx_kl), ("vf_clipfrac", vf_clipfrac)):
                            stats[k].append(v.item())
                        # each micro-batch's token means weighted by its share of the minibatch's tokens: the
                        # accumulated gradient is exactly the one of the minibatch in one pass
                        return loss * m.sum() / n_tokens

                    groups = [g for j in range(0, len(idx), micro)
                              for g in micro_batches(idx[j : j + micro], lambda i: (len(batch_prompts[i]), len(responses[i])),
                                                     cfg.micro_batch_tokens)]
                    accumulated_step(groups, loss_of, params, opt, cfg.max_grad_norm, dist=dist, reduction="mean")

        # 6. KL controller, diagnostics (names from DESIGN.md), warnings, checkpoint
        seq_kl = kl.sum(-1).mean()
        seq_kl = (all_reduce(seq_kl, reduction="mean") if world > 1 else seq_kl).item()
        kl_ctl.update(seq_kl, cfg.batch_size * world)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        metrics = {
            "train/loss": mean(stats["loss"]),
            "train/policy_loss": mean(stats["pg"]),
            "train/value_loss": mean(stats["vf"]),
            "train/score": raw_scores.mean().item(),
            "train/reward": rewards.sum(-1).mean().item(),
            "train/kl": seq_kl,
            "train/kl_negative_frac": masked_mean((kl < 0).float(), mask).item(),
            "train/kl_coef": beta,
            "train/lr": lr,
            "train/entropy": entropy.item(),
            "train/clipfrac": mean(stats["clipfrac"]),
            "train/approx_kl": mean(stats["approx_kl"]),
            "train/vf_clipfrac": mean(stats["vf_clipfrac"]),
            "train/explained_variance": explained_variance(old_values, returns, mask),
            "train/length": lengths.float().mean().item(),
            "train/eos_rate": ended.float().mean().item(),
            "time/rollout_s": t_gen,
            "time/step_s": time.perf_counter() - t0,
        }
        metrics = _mean_over_ranks(metrics, dist)
        if dist.is_main_process:
            watch.check(step, metrics)
        on_step(step, metrics)
        if checkpoint is not None and checkpoint.due(step, cfg.steps):
            checkpoint.save(step, weights=roles.state(), opt=opt, rngs={"rng": rng},
                            state={"order": order, "kl_coef": kl_ctl.value, "watch_first": watch.first, "role": role})
