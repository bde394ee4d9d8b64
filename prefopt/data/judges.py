"""Gold judges: the fixed scorers that define "better" for simulated preferences and evaluation.

A judge maps (prompt, response) pairs to real scores.  It is kept separate from the learned
reward model on purpose: PPO optimises the learned model, and the gold judge measures whether
that optimisation actually helped (and how much reward hacking happened).  VADER is the
offline default; ``hf:`` wraps a local or hub text classifier; ``py:`` plugs in any function.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from prefopt.errors import PrefoptError


class JudgeError(PrefoptError, ValueError):
    """A judge that cannot be built, or that returned unusable scores (one line, names the judge)."""


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and a batched ``score(prompts, responses) -> list[float]``."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class VaderJudge:
    """VADER compound polarity of the response alone, in [-1, 1].

    Only the response is scored so a policy cannot gain reward from the prompt's wording, which
    it does not control.  Needs no network and no GPU, which makes it the default gold judge.
    """

    name = "vader"

    def __init__(self) -> None:
        # One analyzer per judge: it loads its lexicon once and is then cheap to call.
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(self.name, prompts, responses)
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in responses]


class PipelineJudge:
    """A ``transformers`` text-classification model: score = 2 * P(positive label) - 1.

    The mapping to [-1, 1] puts it on VADER's scale so thresholds and plots are comparable.
    ``transformers`` (and with it torch) is imported only here, and only when such a judge is
    built, so the rest of the data layer stays torch-free.
    """

    def __init__(
        self,
        model: str,
        *,
        positive_label: str = "POSITIVE",
        device: int | str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.name = f"hf:{model}"
        self.positive_label = positive_label
        self.batch_size = batch_size
        try:
            from transformers import pipeline

            self._pipe: Callable[..., Any] = pipeline("text-classification", model=model, device=device)
        except Exception as exc:  # any load failure has the same remedy
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise JudgeError(
                f"could not load judge model '{model}' ({detail}): needs internet or a local path"
            ) from exc

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(self.name, prompts, responses)
        if not responses:
            return []
        outputs: list[list[dict[str, Any]]] = self._pipe(
            list(responses), top_k=None, truncation=True, batch_size=self.batch_size
        )
        return [2.0 * self._positive_probability(labels) - 1.0 for labels in outputs]

    def _positive_probability(self, labels: list[dict[str, Any]]) -> float:
        wanted = self.positive_label.lower()
        for entry in labels:
            if str(entry["label"]).lower() == wanted:
                return float(entry["score"])
        found = ", ".join(str(entry["label"]) for entry in labels)
        raise JudgeError(
            f"judge '{self.name}' has no label '{self.positive_label}' (labels: {found}): "
            "set positive_label to the positive class"
        )


class FunctionJudge:
    """Wrap a plain callable ``(prompts, responses) -> list[float]`` as a judge.

    The output is validated (one finite number per response) because a silently misaligned or
    NaN score would corrupt every preference label and metric computed from it.
    """

    def __init__(
        self, fn: Callable[[list[str], list[str]], Sequence[float]], *, name: str | None = None
    ) -> None:
        self._fn = fn
        self.name = name or f"py:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(self.name, prompts, responses)
        raw = self._fn(list(prompts), list(responses))
        try:
            values = list(raw)
        except TypeError:
            raise JudgeError(
                f"judge '{self.name}' must return a list of numbers, got {type(raw).__name__}"
            ) from None
        if len(values) != len(responses):
            raise JudgeError(
                f"judge '{self.name}' returned {len(values)} scores for {len(responses)} responses"
            )
        scores: list[float] = []
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise JudgeError(
                    f"judge '{self.name}' returned a non-finite or non-numeric score {value!r} at index {i}"
                )
            scores.append(float(value))
        return scores


class CharFrequencyJudge:
    """Fraction of the response's characters that belong to ``chars`` (default: the vowels), in [0, 1].

    A judge a tiny character-level model can learn to please in seconds: what the smoke preset uses, so a smoke
    run can tell a working algorithm from a broken one (VADER scores a tiny model's random characters as 0).
    """

    def __init__(self, chars: str = "aeiou") -> None:
        if not chars:
            raise JudgeError("judge 'chars:' needs at least one character, e.g. 'chars:aeiou'")
        self.chars = frozenset(chars)
        self.name = "chars" if chars == "aeiou" else f"chars:{chars}"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        _check_lengths(self.name, prompts, responses)
        return [sum(c in self.chars for c in text) / len(text) if text else 0.0 for text in responses]


JUDGES: dict[str, Callable[[], Judge]] = {"vader": VaderJudge, "chars": CharFrequencyJudge}
"""Judges that need no argument, by name."""

_FORMS = "'" + "', '".join(JUDGES) + "', 'chars:<set>', 'hf:<model id or path>' or 'py:module.path:function'"


def load_judge(spec: str) -> Judge:
    """Build a judge from a spec: a name in :data:`JUDGES`, ``chars:<set>``, ``hf:<model>`` or ``py:module:function``."""
    if spec in JUDGES:
        return JUDGES[spec]()
    if spec.startswith("chars:"):
        return CharFrequencyJudge(spec[len("chars:"):])
    if spec.startswith("hf:") and spec[3:]:
        return PipelineJudge(spec[3:])
    if spec.startswith("py:"):
        return FunctionJudge(_import_function(spec), name=spec)
    raise JudgeError(f"unknown judge '{spec}': use {_FORMS}")


def _import_function(spec: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    module_name, _, attr = spec[3:].rpartition(":")
    if not module_name or not attr:
        raise JudgeError(f"judge '{spec}' must look like 'py:module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # report any import failure the same way
        raise JudgeError(
            f"could not import judge module '{module_name}' ({type(exc).__name__}: {exc})"
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise JudgeError(f"judge '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def _check_lengths(name: str, prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise JudgeError(f"judge '{name}': got {len(prompts)} prompts but {len(responses)} responses")
