"""Tests for prefopt.eval.metrics against hand-computed and table values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prefopt.eval.metrics import (
    METRICS,
    Estimate,
    MetricSpec,
    bootstrap_ci,
    distinct_n,
    mean_ci,
    normal_ppf,
    t_ppf,
    win_outcomes,
    win_rate,
)

# ---------------------------------------------------------------------------
# Quantiles
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 3, 3.1824),
        (0.975, 5, 2.5706),
        (0.975, 10, 2.2281),
        (0.975, 30, 2.0423),
        (0.975, 120, 1.9799),
        (0.95, 5, 2.0150),
        (0.995, 10, 3.1693),
        (0.9, 20, 1.3253),
        (0.975, math.inf, 1.95996),
    ],
)
def test_t_ppf_matches_tables(q: float, df: float, expected: float) -> None:
    assert t_ppf(q, df) == pytest.approx(expected, abs=1e-4)


def test_t_ppf_symmetry_and_median() -> None:
    assert t_ppf(0.5, 7) == 0.0
    assert t_ppf(0.025, 5) == pytest.approx(-t_ppf(0.975, 5), rel=1e-12)


def test_t_ppf_approaches_normal_for_large_df() -> None:
    assert t_ppf(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    assert t_ppf(0.975, 1e9) == pytest.approx(normal_ppf(0.975), abs=1e-8)  # true gap ~2.4e-9


def test_normal_ppf_table_values() -> None:
    assert normal_ppf(0.975) == pytest.approx(1.959963985, abs=1e-8)
    assert normal_ppf(0.95) == pytest.approx(1.644853627, abs=1e-8)
    assert normal_ppf(0.001) == pytest.approx(-3.090232306, abs=1e-8)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_quantiles_reject_bad_probabilities(bad: float) -> None:
    with pytest.raises(ValueError):
        t_ppf(bad, 5)
    with pytest.raises(ValueError):
        normal_ppf(bad)


def test_t_ppf_rejects_bad_df() -> None:
    with pytest.raises(ValueError):
        t_ppf(0.975, 0)


# ---------------------------------------------------------------------------
# mean_ci
# ---------------------------------------------------------------------------


def test_mean_ci_hand_computed() -> None:
    est = mean_ci([1, 2, 3, 4])
    # sd = sqrt(5/3) = 1.29099, se = sd / 2 = 0.645497, t_{0.975,3} = 3.182446
    assert est.mean == 2.5
    assert est.n == 4
    assert est.se == pytest.approx(0.6454972, abs=1e-6)
    assert est.lo == pytest.approx(0.4457397, abs=1e-6)
    assert est.hi == pytest.approx(4.5542603, abs=1e-6)


def test_mean_ci_confidence_changes_width() -> None:
    wide = mean_ci([1, 2, 3, 4], confidence=0.99)
    narrow = mean_ci([1, 2, 3, 4], confidence=0.90)
    # t_{0.995,3} = 5.8409, t_{0.95,3} = 2.3534
    assert wide.hi - wide.mean == pytest.approx(5.8409 * 0.6454972, abs=1e-3)
    assert narrow.hi - narrow.mean == pytest.approx(2.3534 * 0.6454972, abs=1e-3)


def test_mean_ci_single_value_is_degenerate() -> None:
    est = mean_ci([3.5])
    assert est == Estimate(mean=3.5, lo=3.5, hi=3.5, n=1, se=0.0)


def test_mean_ci_constant_values_zero_width() -> None:
    est = mean_ci([2.0, 2.0, 2.0])
    assert (est.lo, est.mean, est.hi, est.se) == (2.0, 2.0, 2.0, 0.0)


def test_mean_ci_rejects_empty_nonfinite_and_2d() -> None:
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        mean_ci([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError):
        mean_ci([1.0, 2.0], confidence=1.0)


def test_estimate_fields_are_python_scalars() -> None:
    est = mean_ci(np.array([1.0, 2.0, 4.0], dtype=np.float32))
    assert all(type(v) is float for v in (est.mean, est.lo, est.hi, est.se))
    assert type(est.n) is int


def test_estimate_as_dict_and_summary_row() -> None:
    est = Estimate(mean=1.0, lo=0.5, hi=1.5, n=10, se=0.25)
    assert est.as_dict("eval/gold_reward") == {
        "eval/gold_reward": 1.0,
        "eval/gold_reward_lo": 0.5,
        "eval/gold_reward_hi": 1.5,
        "eval/gold_reward_se": 0.25,
        "eval/gold_reward_n": 10,
    }
    assert est.summary_row("ppo", "eval/gold_reward") == {
        "policy": "ppo",
        "metric": "eval/gold_reward",
        "mean": 1.0,
        "lo": 0.5,
        "hi": 1.5,
        "se": 0.25,
        "n": 10,
    }


# ---------------------------------------------------------------------------
# bootstrap_ci
# ---------------------------------------------------------------------------


def test_bootstrap_deterministic_by_seed() -> None:
    values = np.random.default_rng(123).normal(size=50)
    a = bootstrap_ci(values, n_boot=500, seed=7)
    b = bootstrap_ci(values, n_boot=500, seed=7)
    c = bootstrap_ci(values, n_boot=500, seed=8)
    assert a == b
    assert (a.lo, a.hi) != (c.lo, c.hi)


def test_bootstrap_brackets_mean_and_agrees_with_t() -> None:
    values = np.random.default_rng(0).normal(loc=2.0, scale=1.0, size=200)
    boot = bootstrap_ci(values, n_boot=2000, seed=0)
    t = mean_ci(values)
    assert boot.mean == pytest.approx(float(values.mean()))
    assert boot.lo < boot.mean < boot.hi
    assert boot.n == 200
    # For 200 normal draws the two intervals should nearly coincide.
    assert boot.lo == pytest.approx(t.lo, abs=0.03)
    assert boot.hi == pytest.approx(t.hi, abs=0.03)
    assert boot.se == pytest.approx(t.se, rel=0.15)


def test_bootstrap_single_and_constant_values() -> None:
    assert bootstrap_ci([4.0], n_boot=50) == Estimate(mean=4.0, lo=4.0, hi=4.0, n=1, se=0.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], n_boot=1)


def test_bootstrap_chunking_does_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefopt.eval.metrics as m

    values = np.arange(30, dtype=float)
    whole = bootstrap_ci(values, n_boot=100, seed=3)
    monkeypatch.setattr(m, "_BOOT_CHUNK_ELEMS", 30 * 7)  # 7 rows per chunk
    chunked = bootstrap_ci(values, n_boot=100, seed=3)
    assert chunked == whole


# ---------------------------------------------------------------------------
# Win rate
# ---------------------------------------------------------------------------


def test_win_outcomes_with_ties() -> None:
    out = win_outcomes([1, 0, 2, 2], [0, 0, 3, 1])
    np.testing.assert_array_equal(out, [1.0, 0.5, 0.0, 1.0])


def test_win_outcomes_tie_tol() -> None:
    a = [1.00, 1.05, 1.20, 0.80]
    b = [1.02, 1.00, 1.00, 1.00]
    np.testing.assert_array_equal(win_outcomes(a, b), [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(win_outcomes(a, b, tie_tol=0.1), [0.5, 0.5, 1.0, 0.0])
    with pytest.raises(ValueError):
        win_outcomes(a, b, tie_tol=-0.1)


def test_win_rate_hand_computed() -> None:
    est = win_rate([1, 0, 2, 2], [0, 0, 3, 1])
    assert est.mean == pytest.approx(0.625)
    assert est.n == 4
    # outcomes [1, .5, 0, 1]: sd = sqrt(0.229167) = 0.478714, se = 0.239357
    assert est.se == pytest.approx(0.2393568, abs=1e-6)
    assert est.hi - est.mean == pytest.approx(3.182446 * 0.2393568, abs=1e-5)


def test_win_rate_against_itself_is_half() -> None:
    x = np.random.default_rng(1).normal(size=20)
    assert win_rate(x, x).mean == 0.5


def test_win_rate_length_mismatch() -> None:
    with pytest.raises(ValueError):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        win_rate([], [])


# ---------------------------------------------------------------------------
# distinct_n
# ---------------------------------------------------------------------------


def test_distinct_2_hand_example() -> None:
    # "a b a b" -> (a,b) (b,a) (a,b); "a b c" -> (a,b) (b,c): 5 bigrams, 3 unique.
    assert distinct_n(["a b a b", "a b c"], n=2) == pytest.approx(3 / 5)


def test_distinct_n_does_not_cross_texts_and_handles_short() -> None:
    # Joining would create the bigram (b, c); per-text it must not exist.
    assert distinct_n(["a b", "c d"], n=2) == 1.0
    assert distinct_n(["a", "b"], n=2) == 0.0
    assert distinct_n([], n=2) == 0.0
    assert distinct_n(["x  y\n x"], n=1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        distinct_n(["a b"], n=0)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


EVAL_NAMES = {
    "eval/gold_reward": True,
    "eval/proxy_reward": True,
    "eval/kl_to_ref": None,
    "eval/win_rate_vs_ref": True,
    "eval/length": None,
    "eval/distinct_2": True,
    "eval/eos_rate": None,
    "eval/win_rate_vs_": True,
    "eval/gold_proxy_gap": None,
    "eval/implicit_reward_accuracy": True,
    "eval/proxy_accuracy": True,
}
TRAIN_NAMES = {
    "train/loss",
    "train/kl",
    "train/score",
    "train/reward",
    "train/entropy",
    "train/clipfrac",
    "train/approx_kl",
    "train/value_loss",
    "train/reward_margin",
    "train/reward_accuracy",
}


def test_metric_registry_names_and_directions() -> None:
    assert set(METRICS) == set(EVAL_NAMES) | TRAIN_NAMES
    for name, direction in EVAL_NAMES.items():
        assert METRICS[name].higher_is_better is direction, name
    for name, spec in METRICS.items():
        assert isinstance(spec, MetricSpec)
        assert spec.name == name
        assert spec.description
        assert spec.format(1.23456) == spec.fmt.format(1.23456)
