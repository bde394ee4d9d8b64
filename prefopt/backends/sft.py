"""Supervised fine-tuning on a LoRA adapter: maximum likelihood of response tokens given the prompt.

As a policy backend it is **Preferred-FT** (the DPO paper's baseline): fine-tuning on the *chosen* responses of
the preference pairs, evaluated like every other policy. The same loop trains the SFT stage of the InstructGPT /
StackLLaMA recipe on demonstrations (``TrainData.pairs`` whose ``chosen`` is the demonstration); merged into the
base (:meth:`~prefopt.models.shared.SharedBase.merge_role`), that adapter makes the SFT model the base and the
reference of every later stage. Loss: mean negative log-likelihood over response tokens only (prompt tokens and
padding carry no loss); a response gets EOS appended unless its record says it was cut, so the model learns to stop.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from prefopt.backends._common import (
    LR_SCHEDULES,
    MICRO_BATCH_TOKENS,
    MICRO_BATCH_TOKENS_HELP,
    StepCallback,
    TrainData,
    accumulated_step,
    adamw,
    check_config,
    dist_state,
    epoch_schedule,
    lr_scheduler,
    micro_batches,
    no_op,
    shard,
    sum_across,
)
from prefopt.backends.checkpoint import StepCheckpoint, resume
from prefopt.backends.losses import masked_mean
from prefopt.models.ops import encode_prompts, encode_responses, make_batch, response_logprobs
from prefopt.models.shared import SharedBase


@dataclass
class SFTConfig:
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate for the LoRA adapter (as DPO's).", "positive": True})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant', or 'linear' decay to 0 over training."})
    epochs: int = field(default=1, metadata={"help": "Passes over the demonstrations (the pairs' chosen responses for Preferred-FT).", "positive": True})
    batch_size: int = field(default=16, metadata={"help": "Demonstrations per optimisation step.", "positive": True})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    max_response_tokens: int = field(default=64, metadata={"help": "Responses are cut to N tokens.", "positive": True})
    seed: int | None = field(default=None, metadata={"help": "Seed for shuffling and the adapter's start (None: the run's master seed)."})
    micro_batch_tokens: int | None = field(default=MICRO_BATCH_TOKENS, metadata={"help": MICRO_BATCH_TOKENS_HELP})

    def __post_init__(self):
        check_config(self)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SFTConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")

    def needs_reward_model(self) -> bool:
        return False


Config = SFTConfig


def total_steps(cfg: SFTConfig, data: TrainData) -> int:
    """Optimisation steps ``train`` will run (the pipeline places checkpoint evaluations on these)."""
    return cfg.epochs * -(-len(data.demos or data.pairs) // cfg.batch_size)


def sft_loss(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over real response tokens: (B, R) log-probs and mask -> scalar."""
    return -masked_mean(token_logprobs, mask)


def train(
    shared: SharedBase, cfg: SFTConfig, data: TrainData, *, role: str = "sft", on_step: StepCallback = no_op,
    checkpoint: StepCheckpoint | None = None,
) -> None:
    """Train adapter ``role`` to maximise the likelihood of each demonstration's response given its prompt (the
    pairs' ``chosen`` responses when there are no demonstrations: Preferred-FT). ``checkpoint`` saves the state
    after every step and continues from the newest one found."""
    if data.demos:
        items = [(d.prompt, d.response, d.meta.get("response_eos", True)) for d in data.demos]
    else:  # Preferred-FT: the chosen responses of the pairs
        items = [(p.prompt, p.chosen, p.meta.get("chosen_eos", True)) for p in data.pairs]
    if not items:
        raise ValueError("SFT needs demonstrations: TrainData.demos and TrainData.pairs are empty")
    seed = 0 if cfg.seed is None else cfg.seed
    if role not in shared.roles:
        shared.add_role(role, seed=seed)
    tok, device = shared.tokenizer, shared.device
    prompt_ids = encode_prompts([x[0] for x in items], tok, cfg.max_prompt_tokens)
    response_ids = encode_responses([x[1] for x in items], tok, cfg.max_response_tokens, add_eos=[x[2] for x in items])
    n = len(items)
    params = shared.adapter_parameters(role)
    opt = adamw(params, cfg.learning_rate)
    sched = lr_scheduler(opt, cfg.lr_schedule, total_steps(cfg, data))
    rng = random.Random(seed)
    schedule = epoch_schedule(n, cfg.batch_size, cfg.epochs, rng)
    dist = dist_state()  # under `accelerate launch`: each rank takes a shard of every minibatch
    saved = resume(checkpoint, shared, role, opt, sched)
    step = saved.step if saved is not None else 0
    with shared.role(role) as lm:
        for _, idx in schedule[step:]:
            t0 = time.perf_counter()
            n_tokens = sum(len(response_ids[i]) for i in idx)
            nll = []

            def loss_of(sub):
                # the minibatch's mean NLL per response token, this micro-batch's share of it
                batch = make_batch([prompt_ids[i] for i in sub], [response_ids[i] for i in sub], tok.pad_token_id, device)
                logps = response_logprobs(lm, batch).float()
                share = sft_loss(logps, batch.response_mask) * batch.response_mask.sum() / max(n_tokens, 1)
                nll.append(share.detach())
                return share

            groups = micro_batches(shard(idx, dist), lambda i: (len(prompt_ids[i]), len(response_ids[i])), cfg.micro_batch_tokens)
            accumulated_step(groups, loss_of, params, opt, cfg.max_grad_norm, sched, dist=dist)
            loss = sum_across(torch.stack(nll).sum() if nll else torch.zeros(()), dist)
            step += 1
            on_step(step, {
                "train/loss": loss.item(),
                "train/perplexity": float(torch.exp(loss)),
                "train/tokens": n_tokens,
                "time/step_s": time.perf_counter() - t0,
            })
            if checkpoint is not None and checkpoint.due(step, len(schedule)):
                checkpoint.save(step, weights=shared.adapter_state(role), opt=opt, sched=sched)
