"""Simulated annotators: turn gold-scored responses into preference pairs.

The controlled experiments need preference data whose generating process is *known*, so the
learned reward model and DPO's implicit reward can be checked against the truth.  This module
is pure (no model calls): responses are sampled and gold-scored elsewhere, and here a
Bradley–Terry annotator with optional label noise (as in AlpacaFarm's simulated annotators) and
a simulated verbosity bias turns them into labelled pairs.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

from prefopt.data.records import PreferencePair, Prompt


@dataclass(frozen=True)
class AnnotatorConfig:
    """How the simulated annotator turns gold scores into a binary preference.

    ``temperature`` scales gold-score differences in the Bradley–Terry model (→ 0: always the
    higher score); ``flip_rate`` flips a sampled label (annotator noise; 0.5 makes labels pure
    noise, so larger values are refused); ``length_bias`` adds utility per 100 characters to
    mimic judges that prefer longer answers.
    """

    temperature: float = field(default=0.1, metadata={"help": "Bradley–Terry temperature on gold-score differences (-> 0: always the higher score)."})
    flip_rate: float = field(default=0.0, metadata={"help": "Probability of flipping a sampled label (annotator noise), in [0, 0.5]."})
    length_bias: float = field(default=0.0, metadata={"help": "Utility added per 100 characters (a verbosity-biased annotator)."})
    position_bias: float = field(default=0.0, metadata={"help": "Utility added to the response shown first (pairs are shown in "
                                                        "a random order; a position-biased judge)."})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"AnnotatorConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.flip_rate <= 0.5:
            raise ValueError(f"AnnotatorConfig.flip_rate must be in [0, 0.5], got {self.flip_rate}")
        for name in ("length_bias", "position_bias"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"AnnotatorConfig.{name} must be finite, got {getattr(self, name)}")

    def utility(self, score: float, text: str) -> float:
        """The annotator's utility for a response: gold score plus the verbosity bonus."""
        return score + self.length_bias * len(text) / 100.0


def simulate_preferences(
    prompts: Sequence[Prompt],
    responses: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    annotator: AnnotatorConfig | Sequence[AnnotatorConfig],
    pairs_per_prompt: int,
    seed: int,
) -> list[PreferencePair]:
    """Label up to ``pairs_per_prompt`` response pairs per prompt with a simulated annotator.

    For each prompt with at least two distinct responses (duplicates keep their first score),
    the candidate pairs are all unordered pairs; the ones with the largest utility gap are kept
    (ties broken by a seeded shuffle) because near-ties carry almost no preference signal.  Each
    kept pair ``(a, b)`` is labelled ``a ≻ b`` with probability
    ``sigmoid((u_a - u_b) / temperature)`` and then flipped with probability ``flip_rate``.

    ``annotator`` may be a pool (AlpacaFarm-style): each kept pair is labelled by one annotator drawn at
    random, whose index goes into ``meta["annotator"]`` so reports can stratify by it.  An annotator with a
    ``position_bias`` sees the pair in a random order (``meta["shown_first"]``: "chosen" or "rejected") and adds
    the bias to the first one's utility.

    A single ``random.Random(seed)`` drives every draw in a fixed order, so the same inputs and
    seed give bit-identical pairs.  ``meta`` records the gold scores, the Bradley–Terry
    probability of the final chosen response, whether the label was flipped and the source.
    """
    pool = None if isinstance(annotator, AnnotatorConfig) else list(annotator)
    if pool is not None and not pool:
        raise ValueError("an annotator pool needs at least one annotator")
    if not len(prompts) == len(responses) == len(scores):
        raise ValueError(
            f"prompts, responses and scores must have the same length, got "
            f"{len(prompts)}, {len(responses)} and {len(scores)}"
        )
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    for i, (prompt, texts, gold) in enumerate(zip(prompts, responses, scores, strict=True)):
        if len(texts) != len(gold):
            raise ValueError(f"prompt {i}: {len(texts)} responses but {len(gold)} scores")
        scored = _distinct(texts, gold, i)
        if len(scored) < 2:
            continue
        # which pairs to label is decided on gold scores alone (the same for every annotator of a pool)
        ranker = annotator if pool is None else AnnotatorConfig()
        candidates = [
            (ranker.utility(a[1], a[0]) - ranker.utility(b[1], b[0]), a, b)
            for a, b in combinations(scored, 2)
        ]
        rng.shuffle(candidates)  # random tie-break: the sort below is stable
        candidates.sort(key=lambda c: -abs(c[0]))
        for _, (text_a, score_a), (text_b, score_b) in candidates[:pairs_per_prompt]:
            who = None if pool is None else rng.randrange(len(pool))
            judge = annotator if pool is None else pool[who]
            diff = judge.utility(score_a, text_a) - judge.utility(score_b, text_b)
            a_first = None
            if judge.position_bias:
                a_first = rng.random() < 0.5
                diff += judge.position_bias if a_first else -judge.position_bias
            p_a = _sigmoid(diff / judge.temperature)
            a_wins = rng.random() < p_a
            flipped = rng.random() < judge.flip_rate
            if flipped:
                a_wins = not a_wins
            if a_wins:
                chosen, rejected, p_chosen = (text_a, score_a), (text_b, score_b), p_a
            else:
                chosen, rejected, p_chosen = (text_b, score_b), (text_a, score_a), 1.0 - p_a
            pairs.append(
                PreferencePair(
                    prompt=prompt,
                    chosen=chosen[0],
                    rejected=rejected[0],
                    margin=None,
                    meta={
                        "score_chosen": chosen[1],
                        "score_rejected": rejected[1],
                        "p_chosen": p_chosen,
                        "flipped": flipped,
                        "source": "synthetic",
                        **({} if who is None else {"annotator": who}),
                        **({} if a_first is None else {"shown_first": "chosen" if a_first == a_wins else "rejected"}),
                    },
                )
            )
    return pairs


def _distinct(texts: Sequence[str], gold: Sequence[float], index: int) -> list[tuple[str, float]]:
    """Distinct response texts with their (finite) scores, first occurrence first."""
    seen: dict[str, float] = {}
    for text, score in zip(texts, gold, strict=True):
        if not math.isfinite(score):
            raise ValueError(f"prompt {index}: score {score} for a response is not finite")
        seen.setdefault(text, float(score))
    return list(seen.items())


def _sigmoid(x: float) -> float:
    """Numerically stable logistic function (tiny temperatures give huge arguments)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def annotator_summary(pairs: Sequence[PreferencePair], proxy: Sequence[tuple[float, float]] | None = None) -> list[dict]:
    """Stratify the pairs of a pool by who labelled them (``meta["annotator"]``); empty when no pair names one.

    Per annotator: ``pairs``; ``gold_agreement`` (chosen has the higher gold score, among pairs whose gold
    scores differ); ``flipped`` (labels the annotator flipped); ``chosen_longer`` (chosen has more characters,
    among pairs of unequal length: a verbosity bias shows as > 0.5); ``chosen_first`` (the chosen response was
    the one shown first, for position-biased annotators; None otherwise); with ``proxy`` (the reward model's
    (chosen, rejected) scores, one per pair) ``proxy_agreement``: how often the reward model ranks that
    annotator's chosen response higher, i.e. whose labels (and biases) it learned."""
    if proxy is not None and len(proxy) != len(pairs):
        raise ValueError(f"proxy has {len(proxy)} score pairs for {len(pairs)} pairs")
    by: dict = {}

    def rate(row, name, hit) -> None:
        row["_n"][name] = row["_n"].get(name, 0) + 1
        row[name] = row.get(name, 0.0) + float(hit)

    for i, p in enumerate(pairs):
        who = p.meta.get("annotator")
        if who is None:
            continue
        if not isinstance(who, (str, int)):  # a pairs file may name annotators by anything JSON holds
            who = json.dumps(who, sort_keys=True)
        row = by.setdefault(who, {"annotator": who, "pairs": 0, "_n": {}})
        row["pairs"] += 1
        sc, sr = p.meta.get("score_chosen"), p.meta.get("score_rejected")
        if isinstance(sc, (int, float)) and isinstance(sr, (int, float)) and sc != sr:
            rate(row, "gold_agreement", sc > sr)
        if isinstance(p.meta.get("flipped"), bool):
            rate(row, "flipped", p.meta["flipped"])
        if len(p.chosen) != len(p.rejected):
            rate(row, "chosen_longer", len(p.chosen) > len(p.rejected))
        if p.meta.get("shown_first") in ("chosen", "rejected"):
            rate(row, "chosen_first", p.meta["shown_first"] == "chosen")
        if proxy is not None and proxy[i][0] != proxy[i][1]:
            rate(row, "proxy_agreement", proxy[i][0] > proxy[i][1])
    names = ["gold_agreement", "flipped", "chosen_longer", "chosen_first"] + (["proxy_agreement"] if proxy is not None else [])
    out = []
    for who in sorted(by, key=str):
        row, n = by[who], by[who].pop("_n")
        out.append({"annotator": who, "pairs": row["pairs"],
                    **{k: (row[k] / n[k] if n.get(k) else None) for k in names}})
    return out
