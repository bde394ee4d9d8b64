"""Plumbing shared by the backends (not a backend: backends never import each other, only this)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from accelerate import PartialState

from prefopt._alloc import release_heap
from prefopt.data.records import PreferencePair
from prefopt.models.ops import encode_prompts, encode_responses

# on_step(step, metrics): called once per optimisation step with that step's metrics (stable names).
StepCallback = Callable[[int, dict], None]
# score_fn(prompt_ids, response_ids) -> (B,) scores: a reward model, a gold judge, any Python function.
ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]
REWARD_SOURCES = ("rm", "gold")  # plus 'hf:<classifier>' and 'py:module:function'


@dataclass
class TrainData:
    """What a backend may train on; the pipeline fills it once per policy from the shared data layer.

    ``pairs``: the preference pairs (offline methods); ``prompts``: training prompts (plain text, message lists or
    PromptRecords; online methods encode them with their own length limit); ``score_fn``: the reward source the
    policy's config names (online methods); ``reward_model``: the trained reward model, if one was trained.
    """

    pairs: Sequence[PreferencePair] = ()
    prompts: Sequence = ()
    demos: Sequence = ()  # Demonstrations (the SFT stage); SFT as a policy (Preferred-FT) uses the pairs' chosen
    score_fn: "ScoreFn | None" = None
    reward_model: object | None = None
    reference_id: str | None = None  # names this run's pi_ref: pairs' recorded reference log-probs must carry it


# ------------------------------------------------------------------------------------------------ reference log-probs
REF_LOGPS = "ref_logps"
"""The ``meta`` key of a pair whose responses were sampled from the reference: ``{"reference": <id>, "chosen":
[logp, digest], "rejected": [logp, digest]}``, each side's sum_t log pi_ref(y_t | .) recorded while sampling (at
temperature 1) and the digest of the exact (prompt ids, response ids) it belongs to. DPO takes it instead of a
forward pass when the reference and the ids it encodes match; anything else is computed."""


def ids_digest(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([list(prompt_ids), list(response_ids)]).encode()).hexdigest()[:16]


def ref_logps_record(reference_id: str, chosen: tuple[Sequence[int], Sequence[int], float],
                     rejected: tuple[Sequence[int], Sequence[int], float]) -> dict:
    """The :data:`REF_LOGPS` value for a pair from (prompt ids, response ids, recorded log-prob) of each side."""
    return {"reference": reference_id,
            **{side: [float(lp), ids_digest(p, r)] for side, (p, r, lp) in (("chosen", chosen), ("rejected", rejected))}}


def recorded_ref_logp(pair: PreferencePair, side: str, prompt_ids: Sequence[int], response_ids: Sequence[int],
                      reference_id: str | None) -> float | None:
    """The recorded log pi_ref of ``pair``'s ``side`` if it was recorded under ``reference_id`` for exactly these
    ids (a pair from a file made with another model, another length limit or other text gets None)."""
    rec = pair.meta.get(REF_LOGPS)
    if reference_id is None or not isinstance(rec, dict) or rec.get("reference") != reference_id:
        return None
    got = rec.get(side)
    if not (isinstance(got, list) and len(got) == 2 and isinstance(got[0], (int, float)) and isinstance(got[1], str)):
        return None
    return float(got[0]) if got[1] == ids_digest(prompt_ids, response_ids) else None


def encode_training_prompts(prompts: Sequence, tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids of training prompts: PromptRecords, text, message lists, or token-id lists (kept as they are)."""
    out = []
    for p in prompts:
        p = getattr(p, "prompt", p)
        if isinstance(p, (list, tuple)) and p and all(isinstance(x, int) for x in p):
            out.append(list(p)[-max_tokens:])
        else:
            out.append(encode_prompts([p], tokenizer, max_tokens)[0])
    return out


def check_reward_source(owner: str, spec: str) -> None:
    if not (spec in REWARD_SOURCES or (spec.startswith(("hf:", "py:")) and len(spec) > 3)):
        raise ValueError(f"{owner}.reward must be 'rm', 'gold', 'hf:<classifier>' or 'py:module:function', got {spec!r}")


def no_op(step: int, metrics: dict) -> None:
    pass


@dataclass
class EncodedPairs:
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: list[float | None]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer, max_prompt_tokens: int, max_response_tokens: int):
    """Tokenise pairs once. A response gets EOS appended unless its record says it was cut (meta *_eos False)."""
    prompts = encode_prompts([p.prompt for p in pairs], tokenizer, max_prompt_tokens)
    chosen = encode_responses(
        [p.chosen for p in pairs], tokenizer, max_response_tokens,
        add_eos=[p.meta.get("chosen_eos", True) for p in pairs],
    )
    rejected = encode_responses(
        [p.rejected for p in pairs], tokenizer, max_response_tokens,
        add_eos=[p.meta.get("rejected_eos", True) for p in pairs],
    )
    return EncodedPairs(prompts, chosen, rejected, [p.margin for p in pairs])


def dist_state() -> PartialState:
    """accelerate's process state. Without CUDA it must be built with cpu=True, else a multi-process launch
    (torchrun / `accelerate launch --multi_gpu`) on CPU is not recognised and every rank thinks it is alone."""
    return PartialState(cpu=not torch.cuda.is_available())


def minibatches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled index batches covering 0..n-1 once (the last one may be smaller)."""
    idx = list(range(n))
    rng.shuffle(idx)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


def epoch_schedule(n: int, batch_size: int, epochs: int, rng: random.Random) -> list[tuple[int, list[int]]]:
    """Every (epoch, minibatch) of an offline loop, drawn up front: a function of the seed alone, so a resumed
    loop skips the steps it already took (``schedule[step:]``) and sees the same minibatches."""
    return [(epoch, idx) for epoch in range(epochs) for idx in minibatches(n, batch_size, rng)]


MICRO_BATCH_TOKENS = 1024
MICRO_BATCH_TOKENS_HELP = ("Tokens (rows x padded length) per forward pass with gradients: a minibatch is split "
                           "into micro-batches of at most this many and their gradients summed, exactly the "
                           "minibatch's gradient; peak memory is bounded by this, not by the data's lengths "
                           "(SmolLM2-135M: about 2.5 MB per token). None: one pass per minibatch.")


def micro_batches(idx: Sequence[int], lengths: Callable[[int], tuple[int, int]], max_tokens: int | None,
                  rows_per_item: int = 1) -> list[list[int]]:
    """Split minibatch ``idx`` into micro-batches whose padded forward -- ``rows_per_item`` rows per item (2 for a
    pair: chosen and rejected), each (longest prompt + longest response) wide, as
    :func:`~prefopt.models.ops.make_batch` pads them -- holds at most ``max_tokens`` tokens; an item that alone
    exceeds the budget is a micro-batch by itself. ``lengths(i)`` = (prompt tokens, response tokens) of item i.

    The items are ordered by length (shortest first, ties in the order given), which keeps padding low, and cut
    into consecutive runs: as few as the budget allows, then balanced -- the largest micro-batch as small as
    possible for that many -- so no tail micro-batch of one short row runs at a fraction of the matmul rate (a
    minibatch of 16 rollouts of ~50 tokens under a budget of 256 is 4 x 4, not 5 + 5 + 5 + 1). The gradient is
    the sum over micro-batches, so neither the order nor the cut changes it beyond float rounding."""
    if max_tokens is None:
        return [list(idx)] if len(idx) else []
    sizes = {i: lengths(i) for i in idx}
    ordered = sorted(idx, key=lambda i: sum(sizes[i]))  # stable: equal lengths keep their order

    def cut(cap: int) -> list[list[int]]:  # greedy runs of at most cap padded tokens (fewest runs for this cap)
        groups: list[list[int]] = []
        cur: list[int] = []
        P = R = 0
        for i in ordered:
            p, r = sizes[i]
            p2, r2 = max(P, p), max(R, max(r, 1))
            if cur and rows_per_item * (len(cur) + 1) * (p2 + r2) > cap:
                groups.append(cur)
                cur, p2, r2 = [], p, max(r, 1)
            cur.append(i)
            P, R = p2, r2
        if cur:
            groups.append(cur)
        return groups

    fewest = cut(max_tokens)
    lo, hi = 1, max_tokens  # the smallest cap that still needs no more runs than the budget does
    while lo < hi:
        mid = (lo + hi) // 2
        if len(cut(mid)) <= len(fewest):
            hi = mid
        else:
            lo = mid + 1
    return cut(lo)


def pair_micro_batches(enc: "EncodedPairs", idx: Sequence[int], max_tokens: int | None,
                       dist: PartialState | None) -> list[list[int]]:
    """This rank's shard of a minibatch of pairs in micro-batches of at most ``max_tokens`` padded tokens, chosen
    and rejected of a pair in the same one (their loss couples them)."""
    return micro_batches(shard(idx, dist), lambda i: (len(enc.prompt_ids[i]), max(len(enc.chosen_ids[i]), len(enc.rejected_ids[i]))),
                         max_tokens, rows_per_item=2)


def accumulated_step(groups: Sequence[Sequence[int]], loss_of: Callable[[Sequence[int]], torch.Tensor],
                     params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, max_grad_norm: float,
                     sched=None, dist: PartialState | None = None, reduction: str = "sum") -> None:
    """One optimisation step over micro-batches: ``loss_of(group)`` returns that group's share of the minibatch
    loss (e.g. the sum of its per-pair losses / pairs in the minibatch), backpropagated group by group (peak
    memory: one group's activations); then clip the gradient norm and step.

    Data-parallel (``dist`` with several processes): each rank passes the groups of its own shard of the
    minibatch (:func:`shard`) and the gradients are summed across ranks before clipping -- exactly the one-process
    gradient, so every rank takes the same step and the weights stay identical. ``reduction="mean"``: each rank's
    loss is a whole batch of its own (PPO/RLOO rollouts), and the gradients are averaged."""
    opt.zero_grad(set_to_none=True)
    for group in groups:
        loss_of(group).backward()
        release_heap()  # this group's activations are freed: their pages go back before the next group's
    reduce_grads(params, dist, reduction)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    if sched is not None:
        sched.step()


def shard(idx: Sequence[int], dist: PartialState | None) -> list[int]:
    """This rank's items of a minibatch (every rank draws the same minibatches from the same seed)."""
    if dist is None or dist.num_processes == 1:
        return list(idx)
    return list(idx)[dist.process_index :: dist.num_processes]


def reduce_grads(params: list[torch.nn.Parameter], dist: PartialState | None, reduction: str = "sum") -> None:
    """All-reduce the parameters' gradients across ranks in one flat tensor (a parameter without a gradient on
    some rank counts as zeros there)."""
    if dist is None or dist.num_processes == 1:
        return
    from accelerate.utils import reduce as all_reduce

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), reduction=reduction)  # one all-reduce, not hundreds
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def pair_stats(seen: Sequence[torch.Tensor], n: int, dist: PartialState | None) -> tuple[float, float, float]:
    """(mean loss, accuracy, mean margin) of a minibatch of ``n`` pairs from each micro-batch's (2, b) tensor of
    per-pair (loss, margin), summed over ranks."""
    local = torch.cat(list(seen), dim=1) if seen else torch.zeros(2, 0)
    sums = torch.stack([local[0].sum(), (local[1] > 0).float().sum(), local[1].sum()]).double()
    loss, correct, margin = (sum_across(sums, dist) / max(n, 1)).tolist()
    return loss, correct, margin


def sum_across(t: torch.Tensor, dist: PartialState | None) -> torch.Tensor:
    """Sum of a tensor over ranks (itself with one process)."""
    if dist is None or dist.num_processes == 1:
        return t
    from accelerate.utils import reduce as all_reduce

    return all_reduce(t, reduction="sum")


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


LR_SCHEDULES = ("constant", "linear")


def set_iteration_lr(opt: torch.optim.Optimizer, base_lr: float, schedule: str, step: int, steps: int) -> float:
    """The rate of iteration ``step`` (1-based) of an online method: constant, or 'linear' = base * (1 - (step-1)/steps)
    (annealing as in cleanrl and trl's PPO); a function of the step alone, so nothing needs checkpointing."""
    lr = base_lr * (1.0 - (step - 1) / steps if schedule == "linear" else 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def lr_scheduler(opt: torch.optim.Optimizer, kind: str, total_steps: int):
    """'constant', or 'linear' decay to 0 over ``total_steps`` (trl/transformers' default shape)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(total_steps, 1)))


def check_config(cfg) -> None:
    """Positive-number checks shared by the backend configs; the message names the field and value."""
    micro = getattr(cfg, "micro_batch_tokens", None)
    if micro is not None and not (isinstance(micro, int) and micro >= 1):
        raise ValueError(f"{type(cfg).__name__}.micro_batch_tokens must be a positive number of tokens or None, got {micro!r}")
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("positive") and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be > 0, got {v!r}")
