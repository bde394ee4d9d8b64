"""Seeded train/eval splits and leakage control.

PPO vs DPO comparisons are only meaningful if both methods are evaluated on prompts neither was
trained on; these helpers make the split reproducible from a seed and let callers remove (and
report) preference pairs whose prompt belongs to the evaluation set.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prefopt.data.records import DataError, PreferencePair, Prompt, PromptRecord, prompt_key


@dataclass(frozen=True)
class Split:
    """Disjoint (by :func:`prompt_key`) training and evaluation prompts."""

    train: list[PromptRecord]
    eval: list[PromptRecord]


def split_prompts(
    prompts: Sequence[PromptRecord], *, n_eval: int, n_train: int | None = None, seed: int = 0
) -> Split:
    """Deduplicate ``prompts`` (first occurrence wins), shuffle with ``seed`` and split.

    Evaluation takes the first ``n_eval`` shuffled prompts and training the next ``n_train``
    (all the rest when ``None``), so growing ``n_train`` never changes the evaluation set.
    Raises :class:`DataError` when there are too few unique prompts for the request.
    """
    if n_eval < 0 or (n_train is not None and n_train < 0):
        raise ValueError(f"n_eval and n_train must be >= 0, got n_eval={n_eval}, n_train={n_train}")
    unique = _unique(prompts)
    needed = n_eval + (n_train or 1)  # at least one training prompt
    if len(unique) < needed:
        raise DataError(
            f"need at least {needed} unique prompts (n_eval={n_eval}, n_train={n_train}) but got "
            f"{len(unique)} ({len(prompts)} before deduplication): lower n_eval/n_train or add prompts"
        )
    random.Random(seed).shuffle(unique)
    rest = unique[n_eval:]
    return Split(train=rest if n_train is None else rest[:n_train], eval=unique[:n_eval])


def holdout_pairs(
    pairs: Iterable[PreferencePair], eval_prompts: Iterable[PromptRecord | Prompt]
) -> tuple[list[PreferencePair], int]:
    """Drop pairs whose prompt is an evaluation prompt; return ``(kept, n_removed)``.

    The count is returned rather than logged so the caller can report it: silently shrinking a
    user's preference data would make results hard to interpret.
    """
    held_out = {prompt_key(p.prompt if isinstance(p, PromptRecord) else p) for p in eval_prompts}
    kept: list[PreferencePair] = []
    removed = 0
    for pair in pairs:
        if prompt_key(pair.prompt) in held_out:
            removed += 1
        else:
            kept.append(pair)
    return kept, removed


def prompts_from_pairs(pairs: Iterable[PreferencePair]) -> list[PromptRecord]:
    """The unique prompts of ``pairs`` in first-seen order (e.g. to split a pair dataset)."""
    return _unique(PromptRecord(prompt=pair.prompt) for pair in pairs)


def _unique(prompts: Iterable[PromptRecord]) -> list[PromptRecord]:
    seen: set[str] = set()
    unique: list[PromptRecord] = []
    for record in prompts:
        key = prompt_key(record.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique
