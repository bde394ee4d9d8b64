"""Reward model: a LoRA adapter + scalar score head on the shared base, trained with the Bradley–Terry loss.

The score of (prompt, response) is the head applied to the hidden state of the last response token
(Ouyang et al. 2022; Stiennon et al. 2020). It trains on exactly the pairs DPO trains on.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from prefopt.backends._common import (
    MICRO_BATCH_TOKENS,
    MICRO_BATCH_TOKENS_HELP,
    StepCallback,
    accumulated_step,
    adamw,
    check_config,
    dist_state,
    encode_pairs,
    epoch_schedule,
    no_op,
    pair_micro_batches,
    pair_stats,
)
from prefopt.backends.checkpoint import StepCheckpoint, resume
from prefopt.backends.losses import bradley_terry_loss
from prefopt.data.records import PreferencePair, Prompt
from prefopt.models.ops import (
    encode_prompts,
    encode_responses,
    hidden_states,
    last_token_hidden,
    make_batch,
    mean_response_hidden,
)
from prefopt.models.shared import SharedBase


RM_WHEN = ("auto", "always")
RM_POOLING = ("last", "mean", "content")
ROLE = "rm"  # the reward model's adapter name on the shared base (no policy may take it)
META_FILE = "reward_model.json"


@dataclass
class RewardConfig:
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate for the LoRA adapter and head (LoRA takes ~10x a full fine-tune's rate; 1e-3 measured best of 3e-4/1e-3 on the default task).", "positive": True})
    epochs: int = field(default=2, metadata={"help": "Passes over the preference pairs.", "positive": True})
    batch_size: int = field(default=16, metadata={"help": "Pairs per optimisation step.", "positive": True})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    max_response_tokens: int = field(default=64, metadata={"help": "Responses are cut to N tokens.", "positive": True})
    normalize_on: int = field(default=256, metadata={"help": "Shift scores so reference responses average 0, estimated on up to N training responses (0 = off; N+ details)."})
    pooling: str = field(default="last", metadata={"help": "What the score head reads: 'last' (the last real token's "
                                                    "hidden state, as in InstructGPT), 'mean' (the mean of the states "
                                                    "at the response's tokens) or 'content' (the mean over its tokens "
                                                    "other than EOS: the score reads the text a judge reads, and an "
                                                    "empty response scores the prompt's last state)."})
    normalize_scale: bool = field(default=False, metadata={"help": "With normalize_on: also divide by their standard deviation, so "
                                                           "reference responses score mean 0 and std 1 (Ziegler et al. 2019) and "
                                                           "a KL coefficient means the same for every reward model."})
    when: str = field(default="auto", metadata={"help": "'auto': train the reward model when a policy needs it (reward 'rm'); 'always': "
                                                "also for runs without one, so every policy gets a proxy reward and the gold-proxy gap."})
    seed: int | None = field(default=None, metadata={"help": "Seed for shuffling (None: the run's master seed)."})
    micro_batch_tokens: int | None = field(default=MICRO_BATCH_TOKENS, metadata={"help": MICRO_BATCH_TOKENS_HELP})

    def __post_init__(self):
        check_config(self)
        if self.when not in RM_WHEN:
            raise ValueError(f"RewardConfig.when must be one of {RM_WHEN}, got {self.when!r}")
        if self.normalize_on < 0:
            raise ValueError(f"RewardConfig.normalize_on must be >= 0, got {self.normalize_on}")
        if self.pooling not in RM_POOLING:
            raise ValueError(f"RewardConfig.pooling must be one of {RM_POOLING}, got {self.pooling!r}")
        if self.normalize_scale and self.normalize_on < 2:
            raise ValueError("RewardConfig.normalize_scale needs normalize_on >= 2 (the responses whose spread it divides by)")


class RewardModel:
    """A trained reward model: scores token ids (fast path, same tokenizer) or text (re-tokenised)."""

    def __init__(self, shared: SharedBase, cfg: RewardConfig, role: str = ROLE, batch_size: int = 32):
        self.shared, self.cfg, self.role, self.batch_size = shared, cfg, role, batch_size
        self.offset = 0.0  # subtracted from every score (reward normalisation, set by normalize())
        self.scale = 1.0  # then divided into it (normalize(scale=True))
        self.name = f"rm:{role}"

    @property
    def head(self) -> torch.nn.Linear:
        return self.shared.heads[self.role]

    def save(self, folder: str | Path) -> Path:
        """A PEFT adapter folder (+ the score head in safetensors; the offset, scale and config in JSON)."""
        folder = self.shared.save_role(self.role, folder)
        (Path(folder) / META_FILE).write_text(json.dumps({"offset": self.offset, "scale": self.scale, "role": self.role,
                                                          "config": asdict(self.cfg)}, indent=2) + "\n")
        return Path(folder)

    @classmethod
    def load(cls, shared: SharedBase, folder: str | Path, role: str = ROLE) -> "RewardModel":
        """Put a saved reward model on ``shared`` as adapter ``role``."""
        meta = json.loads((Path(folder) / META_FILE).read_text())
        shared.load_role(role, folder)
        cfg = RewardConfig(**{k: v for k, v in meta["config"].items() if k in RewardConfig.__dataclass_fields__})
        rm = cls(shared, cfg, role)
        rm.offset = float(meta["offset"])
        rm.scale = float(meta.get("scale", 1.0))  # folders written before the scale existed
        return rm

    def normalize(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  scale: bool = False) -> float:
        """Set the offset so these (reference) responses score 0 on average and, with ``scale``, the scale so their
        scores have standard deviation 1 (sample std; needs two responses); returns the offset."""
        self.offset, self.scale = 0.0, 1.0
        raw = self.score_ids(prompt_ids, response_ids).double()
        self.offset = float(raw.mean())
        if scale:
            if len(raw) < 2 or float(raw.std()) <= 0:
                raise ValueError(f"RewardConfig.normalize_scale: the {len(raw)} reference responses' scores have no "
                                 "spread to divide by; raise normalize_on or set normalize_scale=false")
            self.scale = float(raw.std())
        return self.offset

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        out = []
        pad = self.shared.tokenizer.pad_token_id
        with self.shared.role(self.role) as lm:
            for i in range(0, len(prompt_ids), self.batch_size):
                batch = make_batch(prompt_ids[i : i + self.batch_size], response_ids[i : i + self.batch_size], pad, self.shared.device)
                scores = _scores(self.head, lm, batch, self.cfg.pooling, self.shared.tokenizer.eos_token_id)
                out.append(scores.float().cpu())
        return ((torch.cat(out) - self.offset) / self.scale) if out else torch.zeros(0)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Text interface (any tokenizer upstream): (prompts, responses) -> scores."""
        tok = self.shared.tokenizer
        p = encode_prompts(prompts, tok, self.cfg.max_prompt_tokens)
        r = encode_responses(responses, tok, self.cfg.max_response_tokens, add_eos=False)
        return self.score_ids(p, r).tolist()


def score_pairs(rm: RewardModel, pairs: Sequence[PreferencePair]) -> list[tuple[float, float]]:
    """The reward model's (chosen, rejected) scores of ``pairs``, tokenised exactly as it was trained on them."""
    data = encode_pairs(pairs, rm.shared.tokenizer, rm.cfg.max_prompt_tokens, rm.cfg.max_response_tokens)
    chosen = rm.score_ids(data.prompt_ids, data.chosen_ids).tolist()
    return list(zip(chosen, rm.score_ids(data.prompt_ids, data.rejected_ids).tolist()))


def _scores(head: torch.nn.Module, lm, batch, pooling: str = "last", eos_id: int | None = None) -> torch.Tensor:
    """(B,) scores: the score head on the last real token's hidden state ('last'), the mean of the states at the
    response's tokens ('mean') or at its tokens other than ``eos_id`` ('content')."""
    hidden = hidden_states(lm, batch)
    if pooling == "last":
        h = last_token_hidden(hidden, batch)  # (B, H)
    else:
        h = mean_response_hidden(hidden, batch, exclude=eos_id if pooling == "content" else None)
    return head(h.float()).squeeze(-1)


def total_steps(cfg: RewardConfig, pairs: Sequence[PreferencePair]) -> int:
    return cfg.epochs * -(-len(pairs) // cfg.batch_size)


def train(
    shared: SharedBase, pairs: Sequence[PreferencePair], cfg: RewardConfig, *, role: str = ROLE,
    on_step: StepCallback = no_op, checkpoint: StepCheckpoint | None = None,
) -> RewardModel:
    """Bradley-Terry training of adapter + score head ``role``; ``checkpoint`` saves the state after every step and
    continues from the newest one found."""
    seed = 0 if cfg.seed is None else cfg.seed
    if role not in shared.roles:
        shared.add_role(role, head=True, seed=seed)
    tok = shared.tokenizer
    data = encode_pairs(pairs, tok, cfg.max_prompt_tokens, cfg.max_response_tokens)
    params = shared.adapter_parameters(role)
    opt = adamw(params, cfg.learning_rate)
    rng = random.Random(seed)
    schedule = epoch_schedule(len(data), cfg.batch_size, cfg.epochs, rng)
    dist = dist_state()  # under `accelerate launch`: each rank takes a shard of every minibatch
    saved = resume(checkpoint, shared, role, opt)
    step = saved.step if saved is not None else 0
    with shared.role(role) as lm:
        for epoch, idx in schedule[step:]:
            t0 = time.perf_counter()
            seen: list[torch.Tensor] = []  # per micro-batch: (loss, chosen - rejected) per pair

            def loss_of(sub):
                # chosen and rejected in one forward: rows [0, b) chosen, [b, 2b) rejected
                prompts = [data.prompt_ids[i] for i in sub] * 2
                responses = [data.chosen_ids[i] for i in sub] + [data.rejected_ids[i] for i in sub]
                batch = make_batch(prompts, responses, tok.pad_token_id, shared.device)
                scores = _scores(shared.heads[role], lm, batch, cfg.pooling, tok.eos_token_id)  # (2b,)
                chosen, rejected = scores[: len(sub)], scores[len(sub) :]
                margin = None
                if any(data.margins[i] is not None for i in idx):
                    margin = torch.tensor([data.margins[i] or 0.0 for i in sub], device=scores.device)
                losses = bradley_terry_loss(chosen, rejected, margin)
                seen.append(torch.stack([losses.detach(), (chosen - rejected).detach()]))
                return losses.sum() / len(idx)

            groups = pair_micro_batches(data, idx, cfg.micro_batch_tokens, dist)
            accumulated_step(groups, loss_of, params, opt, cfg.max_grad_norm, dist=dist)
            loss, accuracy, margin = pair_stats(seen, len(idx), dist)
            step += 1
            on_step(step, {
                "train/loss": loss,
                "train/reward_accuracy": accuracy,
                "train/reward_margin": margin,
                "epoch": epoch,
                "time/step_s": time.perf_counter() - t0,
            })
            if checkpoint is not None and checkpoint.due(step, len(schedule)):
                checkpoint.save(step, weights=shared.adapter_state(role), opt=opt)
    rm = RewardModel(shared, cfg, role)
    if cfg.normalize_on:
        # the pairs' responses are samples of the reference policy (synthetic pairs) or the data PPO starts
        # from: shift so they average 0, so the KL penalty and the score start on the same footing
        n = min(cfg.normalize_on, 2 * len(data))
        all_prompts, all_responses = data.prompt_ids * 2, data.chosen_ids + data.rejected_ids
        sel = random.Random(seed).sample(range(len(all_responses)), n)
        rm.normalize([all_prompts[i] for i in sel], [all_responses[i] for i in sel], scale=cfg.normalize_scale)
    return rm
