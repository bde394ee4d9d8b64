"""DPO and its relatives (IPO, hinge/SLiC, conservative DPO, SimPO), offline or online, on a LoRA adapter of the
shared base.

The reference is the same base with adapters disabled; its sequence log-probs are computed once before training
(the reference never changes), which halves the forward passes per step. The loss is the pure function
:func:`prefopt.backends.losses.dpo_loss`.
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
    check_reward_source,
    dist_state,
    encode_pairs,
    epoch_schedule,
    lr_scheduler,
    minibatches,
    no_op,
    pair_micro_batches,
    pair_stats,
    recorded_ref_logp,
    shard,
    sum_across,
)
from prefopt.backends.checkpoint import StepCheckpoint, resume
from prefopt.backends.losses import DPO_LOSS_TYPES, REFERENCE_FREE, dpo_loss
from prefopt.models.ops import make_batch, response_logprobs
from prefopt.models.shared import SharedBase


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata={"help": "sigmoid: the KL strength beta (DPO paper: 0.1; optimum pi_ref exp(r/beta)); "
                                                "ipo: tau (optimum pi_ref exp(p(y > mu)/tau)); hinge: 1/margin; simpo: the scale of "
                                                "the mean log-prob reward (no reference).", "positive": True})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {DPO_LOSS_TYPES}: DPO, IPO, SLiC hinge, SimPO (each trained to its "
                                                         "population optimum in tests/test_closed_form.py)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO: assumed label-flip rate in [0, 0.5)."})
    simpo_gamma: float = field(default=0.0, metadata={"help": "SimPO's target reward margin gamma (paper: 0.5-1.5, with beta 2-2.5); "
                                                      "loss_type='simpo' only."})
    reward: str | None = field(default=None, metadata={"help": "None: offline, on the run's pairs. A reward source ('gold', 'rm', "
                                                       "'hf:..', 'py:..'): online DPO, pairs sampled from the current policy "
                                                       "each round and labelled by it (the one switch between the two)."})
    online_rounds: int = field(default=8, metadata={"help": "Online DPO: sampling rounds (each: sample, label, one pass of steps).", "positive": True})
    online_prompts: int = field(default=48, metadata={"help": "Online DPO: prompts per round (two samples each = one pair).", "positive": True})
    online_label_temperature: float = field(default=0.1, metadata={"help": "Online DPO: Bradley–Terry temperature of the labels on "
                                                                   "score differences (as data.annotator's).", "positive": True})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate for the LoRA adapter (LoRA takes ~10x a full fine-tune's rate).", "positive": True})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant', or 'linear' decay to 0 over training."})
    epochs: int = field(default=1, metadata={"help": "Passes over the preference pairs.", "positive": True})
    batch_size: int = field(default=16, metadata={"help": "Pairs per optimisation step.", "positive": True})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm.", "positive": True})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens.", "positive": True})
    max_response_tokens: int = field(default=64, metadata={"help": "Responses are cut to N tokens.", "positive": True})
    seed: int | None = field(default=None, metadata={"help": "Seed for shuffling (None: the run's master seed)."})
    micro_batch_tokens: int | None = field(default=MICRO_BATCH_TOKENS, metadata={"help": MICRO_BATCH_TOKENS_HELP})

    def __post_init__(self):
        check_config(self)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"DPOConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"DPOConfig.loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.reward is not None:
            check_reward_source("DPOConfig", self.reward)
        if self.simpo_gamma and self.loss_type != "simpo":
            raise ValueError(f"DPOConfig.simpo_gamma applies to loss_type='simpo' only; with loss_type={self.loss_type!r} "
                             "it would change nothing: leave it at 0")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"DPOConfig.label_smoothing applies to loss_type='sigmoid' only (conservative DPO); "
                             f"with loss_type={self.loss_type!r} it would change nothing: leave it at 0")


    def needs_reward_model(self) -> bool:
        return self.reward == "rm"


Config = DPOConfig


def total_steps(cfg: DPOConfig, data: TrainData) -> int:
    """Optimisation steps ``train`` will run (the pipeline places checkpoint evaluations on these)."""
    if cfg.reward is not None:  # online: a pass over each round's fresh pairs
        return cfg.online_rounds * -(-cfg.online_prompts // cfg.batch_size)
    return cfg.epochs * -(-len(data.pairs) // cfg.batch_size)


def _sequence_logps(lm, prompts, responses, pad_id, device, mean: bool = False) -> torch.Tensor:
    """Sum (or with ``mean``, the per-token mean: SimPO's length normalisation) of response-token log-probs: (B,)."""
    batch = make_batch(prompts, responses, pad_id, device)
    total = response_logprobs(lm, batch).sum(-1)
    return total / batch.response_lengths.clamp(min=1) if mean else total


def _reference_logps(shared: SharedBase, cfg: DPOConfig, enc, device, known=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected under pi_ref (base, adapters off), once; zeros for SimPO.

    ``known``: (chosen, rejected) lists of log-probs already recorded (None where not): what the reference computed
    while it sampled these very responses (:func:`recorded_ref_logp`); only the rest take a forward pass."""
    n, tok = len(enc), shared.tokenizer
    ref_chosen, ref_rejected = torch.zeros(n), torch.zeros(n)
    if cfg.loss_type in REFERENCE_FREE:
        return ref_chosen, ref_rejected
    known_c, known_r = known if known is not None else ([None] * n, [None] * n)
    todo = [i for i in range(n) if known_c[i] is None or known_r[i] is None]
    dist = dist_state()
    chunks = shard(range(0, len(todo), 2 * cfg.batch_size), dist)  # each rank its share of the chunks, then summed
    with torch.no_grad(), shared.reference() as lm:
        for i in chunks:
            rows = todo[i : i + 2 * cfg.batch_size]
            prompts = [enc.prompt_ids[k] for k in rows]
            ref_chosen[rows] = _sequence_logps(lm, prompts, [enc.chosen_ids[k] for k in rows], tok.pad_token_id, device).float().cpu()
            ref_rejected[rows] = _sequence_logps(lm, prompts, [enc.rejected_ids[k] for k in rows], tok.pad_token_id, device).float().cpu()
    if dist.num_processes > 1:
        both = sum_across(torch.stack([ref_chosen, ref_rejected]).to(device), dist).cpu()
        ref_chosen, ref_rejected = both[0], both[1]
    done = set(todo)
    for i in range(n):  # after the sum: every rank holds the recorded values once
        if i not in done:
            ref_chosen[i], ref_rejected[i] = known_c[i], known_r[i]
    return ref_chosen, ref_rejected


def _recorded(pairs, enc, reference_id: str | None):
    """Each pair's recorded reference log-probs for its encoded ids (None where there are none or they do not fit)."""
    return ([recorded_ref_logp(p, "chosen", enc.prompt_ids[i], enc.chosen_ids[i], reference_id) for i, p in enumerate(pairs)],
            [recorded_ref_logp(p, "rejected", enc.prompt_ids[i], enc.rejected_ids[i], reference_id) for i, p in enumerate(pairs)])


def _steps(lm, cfg: DPOConfig, enc, ref, params, opt, sched, batches, on_step, step: int, epoch_of, device, pad_id,
           extra: dict | None = None, after=None) -> int:
    """Minibatch steps over encoded pairs, one per index batch in ``batches`` (``epoch_of(j)``: the epoch of the
    j-th); returns the last step number, ``after(step)`` runs after each. Under ``accelerate launch`` each rank takes
    a shard of every minibatch and the gradients are summed: the one-process step on every rank."""
    ref_chosen, ref_rejected = ref
    dist = dist_state()
    for j, idx in batches:
        t0 = time.perf_counter()
        seen: list[torch.Tensor] = []  # per micro-batch: (loss, implicit reward margin) per pair

        def loss_of(sub):
            # policy log-probs: chosen and rejected in one forward, rows [0, b) chosen, [b, 2b) rejected
            prompts = [enc.prompt_ids[i] for i in sub] * 2
            responses = [enc.chosen_ids[i] for i in sub] + [enc.rejected_ids[i] for i in sub]
            logps = _sequence_logps(lm, prompts, responses, pad_id, device, mean=cfg.loss_type in REFERENCE_FREE).float()
            losses, r_chosen, r_rejected = dpo_loss(
                logps[: len(sub)], logps[len(sub) :], ref_chosen[sub].to(device), ref_rejected[sub].to(device),
                beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma,
            )
            seen.append(torch.stack([losses.detach(), (r_chosen - r_rejected).detach()]))
            return losses.sum() / len(idx)

        groups = pair_micro_batches(enc, idx, cfg.micro_batch_tokens, dist)
        accumulated_step(groups, loss_of, params, opt, cfg.max_grad_norm, sched, dist=dist)
        loss, accuracy, margin = pair_stats(seen, len(idx), dist)
        step += 1
        on_step(step, {
            "train/loss": loss,
            "train/reward_margin": margin,
            "train/reward_accuracy": accuracy,
            "epoch": epoch_of(j),
            **(extra or {}),
            "time/step_s": time.perf_counter() - t0,
        })
        if after is not None:
            after(step, j)
    return step


def train(
    shared: SharedBase, cfg: DPOConfig, data: TrainData, *, role: str = "dpo", on_step: StepCallback = no_op,
    checkpoint: StepCheckpoint | None = None,
) -> None:
    """Train adapter ``role`` with the configured DPO-family loss: on ``data.pairs`` (offline), or with
    ``cfg.reward`` set, on pairs sampled from the current policy every round and labelled by ``data.score_fn``.
    ``checkpoint`` saves the state after every step and continues from the newest one found."""
    seed = 0 if cfg.seed is None else cfg.seed
    if role not in shared.roles:
        shared.add_role(role, seed=seed)
    tok, device = shared.tokenizer, shared.device
    params = shared.adapter_parameters(role)
    opt = adamw(params, cfg.learning_rate)
    sched = lr_scheduler(opt, cfg.lr_schedule, total_steps(cfg, data))
    rng = random.Random(seed)
    saved = resume(checkpoint, shared, role, opt, sched, {"rng": rng} if cfg.reward is not None else None)
    if cfg.reward is not None:
        _train_online(shared, cfg, data, role, params, opt, sched, rng, seed, on_step, checkpoint, saved)
        return
    enc = encode_pairs(data.pairs, tok, cfg.max_prompt_tokens, cfg.max_response_tokens)
    schedule = epoch_schedule(len(enc), cfg.batch_size, cfg.epochs, rng)
    if saved is not None:  # the reference log-probs come with the checkpoint, not from another pass
        ref, step = (saved.tensors["ref_chosen"], saved.tensors["ref_rejected"]), saved.step
    else:
        ref, step = _reference_logps(shared, cfg, enc, device, _recorded(data.pairs, enc, data.reference_id)), 0

    def save(step: int, j: int) -> None:
        if checkpoint is not None and checkpoint.due(step, len(schedule)):
            checkpoint.save(step, weights=shared.adapter_state(role), opt=opt, sched=sched,
                            tensors={"ref_chosen": ref[0], "ref_rejected": ref[1]})

    with shared.role(role) as lm:
        _steps(lm, cfg, enc, ref, params, opt, sched, [(j, idx) for j, (_, idx) in enumerate(schedule)][step:], on_step,
               step, lambda j: schedule[j][0], device, tok.pad_token_id, after=save)


def _train_online(shared, cfg: DPOConfig, data: TrainData, role: str, params, opt, sched, rng, seed, on_step,
                  checkpoint: StepCheckpoint | None = None, saved=None) -> None:
    """Online (iterative) DPO: each round samples two responses per prompt from the current policy, labels them
    with the reward source through a Bradley–Terry annotator at ``online_label_temperature``, and takes one pass
    of DPO steps on them; the reference stays pi_ref. A checkpoint holds the round's pairs, its minibatches and
    reference log-probs, so a resumed round continues on the same pairs."""
    from prefopt.backends._common import EncodedPairs, encode_training_prompts
    from prefopt.models.ops import sample

    if data.score_fn is None:
        raise ValueError("online DPO needs a reward source to label its pairs: TrainData.score_fn is None")
    tok, device = shared.tokenizer, shared.device
    prompt_ids = encode_training_prompts(data.prompts, tok, cfg.max_prompt_tokens)
    total = total_steps(cfg, data)
    order: list[int] = []
    step, first, resumed = 0, 0, None
    if saved is not None:
        st = saved.state
        order, step, first = st["order"], saved.step, st["round"]
        if st["done"] < len(st["batches"]):
            resumed = st  # continue this round on its own pairs
        else:
            first += 1
    for rnd in range(first, cfg.online_rounds):
        if resumed is not None:
            mine, chosen, rejected, batches, score = (resumed[k] for k in ("mine", "chosen", "rejected", "batches", "score"))
            ref, done = (saved.tensors["ref_chosen"], saved.tensors["ref_rejected"]), resumed["done"]
            enc = EncodedPairs([prompt_ids[i] for i in mine], chosen, rejected, [None] * len(mine))
            resumed = None
        else:
            while len(order) < cfg.online_prompts:
                more = list(range(len(prompt_ids)))
                rng.shuffle(more)
                order += more
            mine, order = order[: cfg.online_prompts], order[cfg.online_prompts :]
            prompts = [prompt_ids[i] for i in mine for _ in range(2)]
            with torch.no_grad(), shared.role(role) as lm:  # batches of 2 x batch_size rows, shared by the ranks
                responses = sample(lm, tok, prompts, max_new_tokens=cfg.max_response_tokens, temperature=1.0,
                                   seed=seed * 100_003 + rnd, batch_size=2 * cfg.batch_size, dist=dist_state())
            scores = data.score_fn(prompts, responses).float().cpu()
            a, b = scores[0::2], scores[1::2]
            gen = torch.Generator().manual_seed(seed * 7919 + rnd)
            a_wins = torch.rand(len(a), generator=gen) < torch.sigmoid((a - b) / cfg.online_label_temperature)
            chosen = [responses[2 * i] if w else responses[2 * i + 1] for i, w in enumerate(a_wins.tolist())]
            rejected = [responses[2 * i + 1] if w else responses[2 * i] for i, w in enumerate(a_wins.tolist())]
            enc = EncodedPairs([prompt_ids[i] for i in mine], chosen, rejected, [None] * len(mine))
            ref, done, score = _reference_logps(shared, cfg, enc, device), 0, scores.mean().item()
            batches = minibatches(len(enc), cfg.batch_size, rng)

        def save(step: int, j: int, rnd=rnd, mine=mine, chosen=chosen, rejected=rejected, batches=batches,
                 score=score, ref=ref) -> None:
            if checkpoint is not None and checkpoint.due(step, total):
                checkpoint.save(step, weights=shared.adapter_state(role), opt=opt, sched=sched, rngs={"rng": rng},
                                tensors={"ref_chosen": ref[0], "ref_rejected": ref[1]},
                                state={"round": rnd, "order": order, "mine": mine, "chosen": chosen,
                                       "rejected": rejected, "batches": batches, "score": score, "done": j + 1})

        with shared.role(role) as lm:
            step = _steps(lm, cfg, enc, ref, params, opt, sched, list(enumerate(batches))[done:], on_step, step,
                          lambda j, rnd=rnd: rnd, device, tok.pad_token_id,
                          extra={"train/score": score, "round": rnd}, after=save)
