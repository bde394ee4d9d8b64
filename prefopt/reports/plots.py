"""The reward-vs-KL frontier plot: the one picture that compares PPO and DPO fairly.

Gold reward alone rewards a policy for drifting arbitrarily far from the reference;
plotting it against the KL each policy paid for it (same estimator for every policy)
shows the trade-off that RLHF methods actually differ on.

The figure is drawn on an explicit Agg canvas instead of through ``pyplot`` so that
importing or calling this never touches matplotlib's global backend or figure registry
(safe on headless machines and inside test runs, and no figure leaks between calls).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["KL_METRIC", "REWARD_METRIC", "plot_reward_kl"]

KL_METRIC = "eval/kl_to_ref"
REWARD_METRIC = "eval/gold_reward"
DPI = 120


def _finite(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _point(row: Mapping[str, Any] | None) -> tuple[float, tuple[float, float] | None] | None:
    """(mean, (err_below, err_above)) of one summary row; no error bar without a CI."""
    if row is None:
        return None
    mean = _finite(row.get("mean"))
    if mean is None:
        return None
    lo, hi = _finite(row.get("lo")), _finite(row.get("hi"))
    if lo is None or hi is None:
        return mean, None
    # A percentile interval need not contain the mean; clamp so matplotlib accepts it.
    return mean, (max(0.0, mean - lo), max(0.0, hi - mean))


def plot_reward_kl(
    summary: Sequence[Mapping[str, Any]],
    path: str | PathLike[str],
    *,
    title: str | None = None,
    policies: Sequence[str] | None = None,
) -> Path:
    """Write a PNG: x = KL to reference, y = gold reward, one labelled point per policy.

    Points are labelled in place (no legend to cross-reference). Error bars show each
    row's [lo, hi] where present. Policies lacking either metric
    are left out; if none has both, the image still gets written with a note, so a run
    folder always has the same files.
    """
    rows = {(str(r["policy"]), str(r["metric"])): r for r in summary}
    order = list(dict.fromkeys([*(policies or []), *(p for p, _ in rows)]))

    fig = Figure(figsize=(6.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    plotted = 0
    for i, policy in enumerate(order):
        x = _point(rows.get((policy, KL_METRIC)))
        y = _point(rows.get((policy, REWARD_METRIC)))
        if x is None or y is None:
            continue
        (x_mean, x_err), (y_mean, y_err) = x, y
        ax.errorbar(
            [x_mean],
            [y_mean],
            xerr=None if x_err is None else [[x_err[0]], [x_err[1]]],
            yerr=None if y_err is None else [[y_err[0]], [y_err[1]]],
            fmt="o",
            markersize=7,
            capsize=4,
            color=f"C{i % 10}",  # colour follows policy position, stable across runs
            label=policy,
        )
        ax.annotate(
            policy,
            (x_mean, y_mean),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=9,
        )
        plotted += 1

    if plotted:
        ax.margins(0.15)  # room for the text labels next to the outermost points
    else:
        ax.text(
            0.5,
            0.5,
            f"no policy has both {KL_METRIC} and {REWARD_METRIC}",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(f"{KL_METRIC}  (sequence KL(pi || pi_ref))")
    ax.set_ylabel(REWARD_METRIC)
    ax.set_title(title or "Gold reward vs KL to reference")
    ax.grid(True, alpha=0.3)

    out = Path(path)
    fig.savefig(out, dpi=DPI, format="png")
    return out
