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

__all__ = ["KL_METRIC", "REWARD_METRIC", "plot_frontier", "plot_overoptimisation", "plot_reward_kl", "plot_win_rates"]

KL_METRIC = "eval/kl_to_ref"
REWARD_METRIC = "eval/gold_reward"
DPI = 120


def _finite(value: Any) -> float | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _point(row: Mapping[str, Any] | None, floor: float | None = None) -> tuple[float, tuple[float, float] | None] | None:
    """(mean, (err_below, err_above)) of one summary row; no error bar without a CI. ``floor``: the quantity's
    lower bound (KL >= 0): the interval is clipped to it (with 2 seeds a t-interval easily reaches below)."""
    if row is None:
        return None
    mean = _finite(row.get("mean"))
    if mean is None:
        return None
    lo, hi = _finite(row.get("lo")), _finite(row.get("hi"))
    if lo is None or hi is None:
        return mean, None
    if floor is not None:
        lo = max(lo, floor)
    # A percentile interval need not contain the mean; clamp so matplotlib accepts it.
    return mean, (max(0.0, mean - lo), max(0.0, hi - mean))


def _path_xy(path_rows: Sequence[Mapping[str, Any]], policy: str) -> tuple[list[float], list[float]]:
    """(KL, gold) of a policy's evaluations during training, in step order."""
    by_step: dict[Any, dict[str, float]] = {}
    for r in path_rows:
        if r.get("policy") == policy and _finite(r.get("mean")) is not None:
            by_step.setdefault(r.get("step"), {})[str(r.get("metric"))] = float(r["mean"])
    xs, ys = [], []
    for step in sorted(by_step, key=lambda s: (s is None, s)):
        d = by_step[step]
        if KL_METRIC in d and REWARD_METRIC in d:
            xs.append(d[KL_METRIC])
            ys.append(d[REWARD_METRIC])
    return xs, ys


def plot_reward_kl(
    summary: Sequence[Mapping[str, Any]],
    path: str | PathLike[str],
    *,
    title: str | None = None,
    policies: Sequence[str] | None = None,
    path_rows: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write a PNG: x = KL to reference, y = gold reward, one labelled point per policy.

    Dashed lines are each policy's path through its evaluations during training (``path_rows``).
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
        x = _point(rows.get((policy, KL_METRIC)), floor=0.0)
        y = _point(rows.get((policy, REWARD_METRIC)))
        if x is None or y is None:
            continue
        (x_mean, x_err), (y_mean, y_err) = x, y
        px, py = _path_xy(path_rows, policy) if policy != "reference" else ([], [])  # its row is a baseline
        ref_x = _point(rows.get(("reference", KL_METRIC)))
        ref_y = _point(rows.get(("reference", REWARD_METRIC)))
        if px and ref_x is not None and ref_y is not None:  # the run's path: reference -> evaluations in training
            ax.plot([ref_x[0], *px], [ref_y[0], *py], "--", lw=1, alpha=0.6, color=f"C{i % 10}",
                    marker=".", markersize=5)
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


# ---------------------------------------------------------------------------------------------- comparisons
PROXY_METRIC = "eval/proxy_reward"
WIN_METRIC = "eval/win_rate_vs_ref"


def _new_figure(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _errorbar(ax, x: Mapping[str, Any], y: Mapping[str, Any], color: str, label: str | None = None, **kw) -> None:
    px, py = _point(x, floor=0.0), _point(y)  # x is KL in every comparison plot
    if px is None or py is None:
        return
    ax.errorbar([px[0]], [py[0]], xerr=None if px[1] is None else [[px[1][0]], [px[1][1]]],
                yerr=None if py[1] is None else [[py[1][0]], [py[1][1]]], fmt="o", color=color, capsize=3,
                markersize=6, label=label, **kw)


def plot_frontier(
    variants: Mapping[str, Mapping[str, Any]],
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | PathLike[str],
    *,
    metric: str = REWARD_METRIC,
    title: str = "Gold reward vs KL to the reference, per algorithm",
) -> Path:
    """The frontier plot (DPO paper, Fig. 2 style). ``variants``: variant -> {"algorithm", "rows": {metric: row},
    "path": [{metric: row}, ...]}; ``curves``: algorithm -> [{"budget", "mean", "lo", "hi"}] (the frontier read at
    a grid of KL budgets, pooled over seeds, drawn as a line with its 95% band)."""
    fig, (ax,) = _new_figure(7.0, 5.0)
    algorithms = list(dict.fromkeys([*(v["algorithm"] for v in variants.values()), *curves]))
    colour = {a: f"C{i % 10}" for i, a in enumerate(algorithms)}
    labelled: set[str] = set()
    for name, v in variants.items():
        c = colour[v["algorithm"]]
        rows = v["rows"]
        label = None if v["algorithm"] in labelled else v["algorithm"]
        labelled.add(v["algorithm"])
        steps = [p for p in v.get("path", []) if KL_METRIC in p and metric in p]
        if steps:  # evaluations during training (on the path prompts), drawn thin
            ax.plot([float(p[KL_METRIC]["mean"]) for p in steps], [float(p[metric]["mean"]) for p in steps],
                    ":", color=c, lw=0.8, alpha=0.6)
        if KL_METRIC in rows and metric in rows:
            _errorbar(ax, rows[KL_METRIC], rows[metric], c, label=label, alpha=0.9)
    for alg, pts in curves.items():
        pts = [p for p in pts if _finite(p.get("mean")) is not None]
        if not pts:
            continue
        xs = [p["budget"] for p in pts]
        ax.plot(xs, [p["mean"] for p in pts], "-", color=colour[alg], lw=2)
        band = [p for p in pts if _finite(p.get("lo")) is not None and _finite(p.get("hi")) is not None]
        if band:
            ax.fill_between([p["budget"] for p in band], [p["lo"] for p in band], [p["hi"] for p in band],
                            color=colour[alg], alpha=0.15, lw=0)
    ax.set_xlabel("KL(pi || pi_ref), nats (sequence, on the policy's samples); 95% CIs over seeds, clipped at 0")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if labelled:
        ax.legend(loc="best", fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def plot_overoptimisation(variants: Mapping[str, Mapping[str, Any]], path: str | PathLike[str],
                          start: Mapping[str, Any] | None = None) -> Path:
    """Gold (left) and proxy (right) reward against KL for every variant, from ``start`` (the reference's rows:
    every policy starts there) through its evaluations during training (the same prompts at every step, the last
    one included; the final evaluation when there is no path): where the gold reward peaks while the proxy keeps
    rising, the policy is exploiting the reward model."""
    fig, axes = _new_figure(11.0, 4.6, ncols=2)
    variants = {k: v for k, v in variants.items() if v["algorithm"] != "reference"}
    algorithms = list(dict.fromkeys(v["algorithm"] for v in variants.values()))
    colour = {a: f"C{(i + 1) % 10}" for i, a in enumerate(algorithms)}  # C0 is the reference elsewhere
    labelled: set[str] = set()
    for ax, metric in zip(axes, (REWARD_METRIC, PROXY_METRIC)):
        if start and metric in start and _finite(start[metric].get("mean")) is not None:
            ax.plot([0.0], [float(start[metric]["mean"])], "o", color="C0", markersize=7, label="reference")
    for name, v in variants.items():
        c = colour[v["algorithm"]]
        label = None if v["algorithm"] in labelled else v["algorithm"]
        labelled.add(v["algorithm"])
        pts = [*([start] if start else []), *(v.get("path") or [v["rows"]])]  # the path ends at the last step
        for ax, metric in zip(axes, (REWARD_METRIC, PROXY_METRIC)):
            xy = [(float(p[KL_METRIC]["mean"]), float(p[metric]["mean"])) for p in pts
                  if KL_METRIC in p and metric in p and _finite(p[metric].get("mean")) is not None]
            if xy:
                ax.plot(*zip(*xy), "-o", color=c, lw=1.2, markersize=3, alpha=0.8, label=label)
    for ax, metric in zip(axes, (REWARD_METRIC, PROXY_METRIC)):
        ax.set_xlabel("KL(pi || pi_ref), nats")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("gold reward (what we want)")
    axes[1].set_title("proxy reward (the reward model: what PPO optimises)")
    if labelled:
        axes[0].legend(loc="best", fontsize=8)
    out = Path(path)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def plot_win_rates(rows: Sequence[Mapping[str, Any]], path: str | PathLike[str]) -> Path:
    """Horizontal bars: each variant's gold win rate against the reference, with its 95% CI; 0.5 = a tie."""
    rows = [r for r in rows if _finite(r.get("mean")) is not None]
    fig, (ax,) = _new_figure(7.0, max(2.0, 0.45 * len(rows) + 1.2))
    names = [f"{r['policy']} (n={r['n']})" if r.get("n") is not None else str(r["policy"]) for r in rows]
    means = [float(r["mean"]) for r in rows]
    lo = [min(max(_finite(r.get("lo")) if _finite(r.get("lo")) is not None else m, 0.0), m) for m, r in zip(means, rows)]
    hi = [max(min(_finite(r.get("hi")) if _finite(r.get("hi")) is not None else m, 1.0), m) for m, r in zip(means, rows)]
    errs = [[m - a for m, a in zip(means, lo)], [b - m for m, b in zip(means, hi)]]  # a win rate lives in [0, 1]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, means, xerr=errs, color=[f"C{i % 10}" for i in range(len(rows))], alpha=0.8, capsize=3)
    ax.axvline(0.5, color="k", lw=1, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("gold win rate vs the reference (ties half), 95% CI clipped to [0, 1]; n = seeds")
    ax.grid(True, axis="x", alpha=0.3)
    out = Path(path)
    fig.savefig(out, dpi=DPI, format="png")
    return out
