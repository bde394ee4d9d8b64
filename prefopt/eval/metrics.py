"""Pure-numpy evaluation statistics shared by every policy comparison.

Every policy (reference, PPO, DPO) is scored by the *same* functions here so that a
difference in a reported number can only come from the policy, never from a different
estimator. Nothing in this module knows about models or tokenizers: callers hand in
plain arrays of per-sample scores and get back an :class:`Estimate` with an interval,
because a single mean over a few hundred prompts is not evidence of anything without one.

Quantiles come from scipy (``scipy.stats.t``), not from hand-written numerics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "Estimate",
    "MetricSpec",
    "METRICS",
    "bootstrap_ci",
    "distinct_n",
    "mean_ci",
    "metric_spec",
    "metric_versions",
    "normal_ppf",
    "t_ppf",
    "win_outcomes",
    "win_rate",
]


# ---------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval.

    Fields are plain Python floats/ints so an Estimate serialises to JSON as-is.
    ``se`` is the standard error the interval was built from (for the bootstrap: the
    standard deviation of the bootstrap means), kept so readers can recompute
    intervals at other confidence levels or pool runs.
    """

    mean: float
    lo: float
    hi: float
    n: int
    se: float

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        """Flatten into ``{prefix: mean, prefix_lo, prefix_hi, prefix_se, prefix_n}``.

        This is the shape logged to metric trackers, which only accept flat scalar keys.
        """
        return {
            prefix: self.mean,
            f"{prefix}_lo": self.lo,
            f"{prefix}_hi": self.hi,
            f"{prefix}_se": self.se,
            f"{prefix}_n": self.n,
        }

    def summary_row(self, policy: str, metric: str) -> dict[str, str | float | int]:
        """One row of the ``summary`` list that :mod:`prefopt.reports` consumes."""
        return {
            "policy": policy,
            "metric": metric,
            "mean": self.mean,
            "lo": self.lo,
            "hi": self.hi,
            "se": self.se,
            "n": self.n,
        }


# ---------------------------------------------------------------------------
# Quantiles (scipy)
# ---------------------------------------------------------------------------


def _check_prob(q: float) -> None:
    if not (0.0 < q < 1.0):
        raise ValueError(f"probability must be in (0, 1), got {q!r}")


def _check_confidence(confidence: float) -> None:
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _scipy_stats():
    """scipy.stats, imported on first use: a training process that never asks for an interval does not carry it
    (scipy.stats is ~20 MiB of resident code, part of what the default bench's peak RSS was cut by)."""
    from scipy import stats

    return stats


def normal_ppf(q: float) -> float:
    """Standard normal quantile (inverse CDF)."""
    _check_prob(q)
    return float(_scipy_stats().norm.ppf(q))


def t_ppf(q: float, df: float) -> float:
    """Student-t quantile with ``df`` degrees of freedom (``math.inf`` gives the normal)."""
    _check_prob(q)
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if math.isinf(df):
        return normal_ppf(q)
    return float(_scipy_stats().t.ppf(q, df))


# ---------------------------------------------------------------------------
# Intervals
# ---------------------------------------------------------------------------


def _as_1d(values: ArrayLike, name: str = "values") -> np.ndarray:
    """Validate a 1-D finite float array.

    Non-finite scores are rejected instead of dropped: a NaN gold score or an infinite
    KL means something upstream broke, and silently averaging around it would hide that.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} non-finite value(s)")
    return arr


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> Estimate:
    """Mean with a Student-t confidence interval.

    The t interval (not the normal one) is used because eval sets in quick runs can be
    tiny, where the normal interval is noticeably too narrow.

    With ``n == 1`` there is no spread to estimate: ``se`` is reported as ``0.0`` and
    ``lo == hi == mean`` (a degenerate, not a confident, interval) so downstream JSON
    never carries NaN. ``n == 0`` raises ``ValueError``.
    """
    _check_confidence(confidence)
    arr = _as_1d(values)
    n = int(arr.size)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(arr.mean())
    if n == 1:
        return Estimate(mean=mean, lo=mean, hi=mean, n=1, se=0.0)
    se = float(arr.std(ddof=1) / math.sqrt(n))
    half = t_ppf(0.5 + confidence / 2.0, n - 1) * se
    return Estimate(mean=mean, lo=mean - half, hi=mean + half, n=n, se=se)


_BOOT_CHUNK_ELEMS = 1 << 22  # bound the resample-index matrix to ~32 MiB


def bootstrap_ci(
    values: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Estimate:
    """Mean with a percentile-bootstrap interval.

    Used where the t interval's normality assumption is poor (bounded or heavily skewed
    per-sample scores). The generator is ``numpy.random.default_rng(seed)`` so a rerun
    of an evaluation reproduces its interval exactly. ``mean`` is the sample mean, not
    the mean of the bootstrap means; ``se`` is the std of the bootstrap means.
    """
    _check_confidence(confidence)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    arr = _as_1d(values)
    n = int(arr.size)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    boot_means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _BOOT_CHUNK_ELEMS // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot_means[start:stop] = arr[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot_means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Estimate(
        mean=float(arr.mean()),
        lo=float(lo),
        hi=float(hi),
        n=n,
        se=float(boot_means.std(ddof=1)),
    )


# ---------------------------------------------------------------------------
# Paired comparisons
# ---------------------------------------------------------------------------


def win_outcomes(a: ArrayLike, b: ArrayLike, *, tie_tol: float = 0.0) -> np.ndarray:
    """Per-pair outcome of ``a`` vs ``b``: 1.0 win, 0.0 loss, 0.5 tie.

    Pairs must be aligned (same prompt at the same index). ``tie_tol`` makes scores
    within ``tie_tol`` of each other a tie, so judge noise at the last decimal does not
    count as a win; ties count half so the win rate of a policy against itself is 0.5.
    """
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    a_arr = _as_1d(a, "a")
    b_arr = _as_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired inputs differ in length: {a_arr.size} vs {b_arr.size}")
    return np.where(a_arr > b_arr + tie_tol, 1.0, np.where(a_arr < b_arr - tie_tol, 0.0, 0.5))


def win_rate(
    a: ArrayLike,
    b: ArrayLike,
    *,
    tie_tol: float = 0.0,
    confidence: float = 0.95,
) -> Estimate:
    """Paired win rate of ``a`` over ``b`` (ties half) with a t interval on the outcomes."""
    outcomes = win_outcomes(a, b, tie_tol=tie_tol)
    if outcomes.size == 0:
        raise ValueError("win_rate needs at least one pair")
    return mean_ci(outcomes, confidence=confidence)


# ---------------------------------------------------------------------------
# Diversity
# ---------------------------------------------------------------------------


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over whitespace tokens, pooled over all texts.

    N-grams never span two texts. Pooling (rather than averaging per text) is what
    exposes mode collapse: a policy that says the same thing to every prompt scores low
    even if each single response is internally varied. Returns 0.0 when there are no
    n-grams at all (e.g. every response shorter than ``n`` tokens).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        for i in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


# ---------------------------------------------------------------------------
# Metric registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """Display and direction metadata for one stable metric name.

    ``higher_is_better`` is ``None`` for diagnostics that are not goals in themselves
    (KL, length, EOS rate): reports must not crown a "best" policy on those.
    """

    name: str
    higher_is_better: bool | None
    description: str
    fmt: str = "{:.3f}"
    version: int = 1  # bump when the estimator changes: reports refuse to pool numbers of different versions

    def format(self, value: float) -> str:
        return self.fmt.format(value)


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {spec.name: spec for spec in specs}


METRICS: dict[str, MetricSpec] = _specs(
    # -- evaluation (same prompts, same judge, same estimators for every policy) --
    MetricSpec("eval/gold_reward", True, "Mean gold-judge score of the policy's samples."),
    MetricSpec("eval/proxy_reward", True, "Mean learned reward-model score of the policy's samples."),
    MetricSpec(
        "eval/kl_to_ref",
        None,
        "Sequence-level KL(pi || pi_ref) estimated on the policy's own samples "
        "(same estimator for every policy).",
    ),
    MetricSpec(
        "eval/win_rate_vs_ref",
        True,
        "Paired gold-judge win rate against the reference policy's sample for the same "
        "prompt; ties count half.",
    ),
    MetricSpec(
        "eval/win_rate_vs_",
        True,
        "Head-to-head: paired gold-judge win rate against the named policy's sample for the same prompt; "
        "ties count half (a prefix: one metric per opponent).",
    ),
    MetricSpec(
        "eval/gold_proxy_gap",
        None,
        "Proxy minus gold reward, each standardised by the reference's samples; > 0: the reward model "
        "overrates the policy's gain (over-optimisation).",
    ),
    MetricSpec(
        "eval/implicit_reward_accuracy",
        True,
        "On held-out gold-labelled pairs: how often log pi/pi_ref ranks the chosen response first.",
    ),
    MetricSpec(
        "eval/proxy_accuracy",
        True,
        "On held-out gold-labelled pairs: how often the reward model ranks the chosen response first.",
    ),
    MetricSpec("eval/length", None, "Mean response length in tokens.", fmt="{:.1f}"),
    MetricSpec("eval/distinct_2", True, "Distinct bigrams / total bigrams over all responses."),
    MetricSpec("eval/eos_rate", None, "Fraction of responses that ended with EOS."),
    # -- training logs --
    MetricSpec("train/loss", False, "Training loss of the current stage."),
    MetricSpec("train/kl", None, "KL to the reference policy during training."),
    MetricSpec("train/score", True, "Mean reward-model score of the training rollouts (PPO)."),
    MetricSpec("train/reward", True, "Mean shaped reward (score minus KL penalty) of the rollouts."),
    MetricSpec("train/entropy", None, "Mean per-token policy entropy."),
    MetricSpec("train/clipfrac", None, "Fraction of PPO policy updates that hit the clip range."),
    MetricSpec("train/approx_kl", None, "Approximate KL between consecutive PPO policies."),
    MetricSpec("train/value_loss", False, "PPO value-head loss."),
    MetricSpec(
        "train/reward_margin",
        True,
        "Mean implicit (DPO) or learned (RM) reward margin of chosen over rejected.",
    ),
    MetricSpec(
        "train/reward_accuracy",
        True,
        "Fraction of preference pairs where chosen gets the higher (implicit) reward.",
    ),
)


def metric_spec(name: str) -> MetricSpec | None:
    """The spec of a metric name; ``eval/win_rate_vs_<policy>`` resolves to the head-to-head prefix spec."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith("eval/win_rate_vs_"):
        return METRICS["eval/win_rate_vs_"]
    return None


def metric_versions() -> dict[str, int]:
    """Every metric's estimator version (recorded in each run's summary.json)."""
    return {name: spec.version for name, spec in METRICS.items()}
