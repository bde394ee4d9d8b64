"""Comparisons across runs: pool over seeds, the reward–KL frontier, and a verdict at matched KL.

Input: evaluated run folders (a bench, a sweep's cells, ``prefopt eval`` outputs). Every (run, policy) is a
**cell**. Cells of the same policy name are one **algorithm**; cells whose settings agree except for the seed are
one **variant** (a sweep's grid point), labelled by the settings that tell it apart from the algorithm's other
variants. Pooling is over seeds: a variant's number is the mean of its runs' means, with a t-interval over runs
(n = seeds) when there are at least two, else the run's own interval over samples (n = samples).

Matched KL (Rafailov et al. 2023, Fig. 2; Tang et al. 2024): for each algorithm and seed, its cells' points (KL,
gold) — final evaluations and evaluations during training, plus the reference point (0, gold of pi_ref), which
every algorithm starts from — give a frontier: the points no other point beats with less KL, joined linearly.
Read at a KL budget it says how much gold reward the algorithm reached with at most that much KL. The per-seed
values are pooled with a t-interval over seeds; a verdict is given at a budget only where one algorithm's
interval lies above every other's ("cannot tell" otherwise). Budgets beyond a seed's largest KL are not
extrapolated. Taking the best points is an upward selection effect that grows with the number of points an
algorithm has; compare algorithms with similar numbers of cells.

Nothing here imports torch; every statistic comes from the runs' summary rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from prefopt.errors import RunError
from prefopt.eval.metrics import mean_ci, t_ppf

REFERENCE = "reference"
GOLD, KL, WIN, PROXY = "eval/gold_reward", "eval/kl_to_ref", "eval/win_rate_vs_ref", "eval/proxy_reward"
_SEEDLIKE = {"seed", "threads", "device"}


# ------------------------------------------------------------------------------------------------ cells
@dataclass
class Cell:
    """One evaluated policy of one run."""

    run: str
    policy: str
    seed: int
    settings: dict[str, Any]  # everything that defines the variant (flattened), seed excluded
    rows: dict[str, dict]  # metric -> summary row
    path: list[dict] = field(default_factory=list)  # evaluations during training: {"step", metric: row}
    variant: str = ""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(obj, sort_keys=True) if isinstance(obj, list) else obj}


def _cell_settings(run: Mapping[str, Any], policy: str) -> dict[str, Any]:
    """Run config (minus seeds, device, the policy list and backend sections) + the policy's resolved config."""
    config = {k: v for k, v in run["config"].items() if k not in _SEEDLIKE and k != "policies"}
    info = run.get("policy_info", {}).get(policy)
    for backend in run.get("backends", []):
        config.pop(backend, None)  # they reach the variant through the resolved policy config below
    flat = {f"run.{k}": v for k, v in _flatten(config).items() if k.split(".")[-1] not in _SEEDLIKE}
    if info is not None:
        flat["backend"] = info.get("backend")
        flat.update({k: v for k, v in _flatten(info.get("config", {})).items() if k.split(".")[-1] not in _SEEDLIKE})
    return flat


def cells_of(runs: Sequence[Mapping[str, Any]]) -> list[Cell]:
    """Every (run, policy) with its summary rows and path, grouped later into variants."""
    cells = []
    for run in runs:
        seed = int(run["config"].get("seed", 0))
        path_by_policy: dict[str, dict[Any, dict]] = defaultdict(dict)
        for r in run.get("path", []):
            point = path_by_policy[str(r["policy"])].setdefault(r.get("step"), {"step": r.get("step")})
            point[str(r["metric"])] = r
        for policy in run["policies"]:
            rows = {str(r["metric"]): r for r in run["summary"] if r.get("policy") == policy}
            if not rows:
                continue
            settings = {} if policy == REFERENCE else _cell_settings(run, policy)
            path = sorted(path_by_policy.get(policy, {}).values(), key=lambda p: p["step"])
            cells.append(Cell(str(run["dir"]), policy, seed, settings, rows, path))
    _label_variants(cells)
    return cells


def _label_variants(cells: list[Cell]) -> None:
    """Label each cell's variant by the settings that differ among its algorithm's variants."""
    by_alg: dict[str, list[Cell]] = defaultdict(list)
    for c in cells:
        by_alg[c.policy].append(c)
    for alg, group in by_alg.items():
        keys = sorted({k for c in group for k in c.settings})
        varying = [k for k in keys if len({json.dumps(c.settings.get(k), sort_keys=True, default=str) for c in group}) > 1]
        for c in group:
            if not varying:
                c.variant = alg
                continue
            short = _short_names(varying)
            parts = [f"{short[k]}={_show(c.settings.get(k))}" for k in varying]
            c.variant = f"{alg} " + " ".join(parts)


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last path component, or more where two keys would share it."""
    out = {}
    for k in keys:
        parts = k.split(".")
        depth = 1
        while depth < len(parts) and sum(1 for o in keys if o.split(".")[-depth:] == parts[-depth:]) > 1:
            depth += 1
        out[k] = ".".join(parts[-depth:])
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ------------------------------------------------------------------------------------------------ comparability
def check_comparable(runs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to put runs with different evaluation settings or estimator versions in one table."""
    if not runs:
        return
    first = runs[0]
    base_settings = _flatten(first.get("eval_settings", {}))
    base_versions = first.get("metric_versions", {})
    for other in runs[1:]:
        settings = _flatten(other.get("eval_settings", {}))
        for key in sorted(set(base_settings) | set(settings)):
            if base_settings.get(key) != settings.get(key):
                raise RunError(
                    f"cannot pool {first['dir']} and {other['dir']}: eval setting '{key}' differs "
                    f"({base_settings.get(key)!r} vs {settings.get(key)!r}): evaluate them with the same settings "
                    "(prefopt eval) or report them separately")
        versions = other.get("metric_versions", {})
        for key in sorted(set(base_versions) & set(versions)):
            if base_versions[key] != versions[key]:
                raise RunError(
                    f"cannot pool {first['dir']} and {other['dir']}: metric '{key}' was computed by estimator "
                    f"version {base_versions[key]} vs {versions[key]}: re-evaluate the older run")


# ------------------------------------------------------------------------------------------------ pooling
@dataclass
class Pooled:
    algorithm: str
    variant: str
    metric: str
    mean: float
    lo: float | None
    hi: float | None
    se: float | None
    n_seeds: int
    n_samples: int

    def row(self) -> dict:
        return self.__dict__.copy()


def pool_rows(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int] | None = None):
    """(mean, lo, hi, se, n_seeds, n_samples) of one metric over a variant's runs.

    Runs of the same seed are averaged first; over >= 2 seeds whose values differ, a t-interval over seeds; when
    every seed gives the same number (the reference: it does not depend on the training seed) or there is one
    seed, the run's own interval over samples.
    """
    rows = [r for r in rows if r.get("mean") is not None]
    if not rows:
        return math.nan, None, None, None, 0, 0
    seeds = list(seeds) if seeds is not None else list(range(len(rows)))
    by_seed: dict[int, list[float]] = defaultdict(list)
    for seed, r in zip(seeds, rows):
        by_seed[seed].append(float(r["mean"]))
    means = [sum(v) / len(v) for v in by_seed.values()]
    n_samples = sum(int(r.get("n") or 0) for r in rows) // max(1, len(rows) // len(by_seed))
    if len(means) >= 2 and len(set(means)) > 1:
        est = mean_ci(means)
        return est.mean, est.lo, est.hi, est.se, len(means), n_samples
    r = rows[0]
    return float(r["mean"]), r.get("lo"), r.get("hi"), r.get("se"), 1, int(r.get("n") or 0)


def pool(cells: Sequence[Cell]) -> list[Pooled]:
    """Every variant's metrics pooled over its runs (seeds)."""
    groups: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for c in cells:
        groups[(c.policy, c.variant)].append(c)
    out = []
    for (alg, variant), group in groups.items():
        metrics = list(dict.fromkeys(m for c in group for m in c.rows))
        for metric in metrics:
            have = [c for c in group if metric in c.rows]
            mean, lo, hi, se, n_seeds, n_samples = pool_rows([c.rows[metric] for c in have], [c.seed for c in have])
            out.append(Pooled(alg, variant, metric, mean, lo, hi, se, n_seeds, n_samples))
    return out


def pooled_summary(pooled: Sequence[Pooled]) -> list[dict]:
    """Pooled rows in the (policy, metric, mean, lo, hi, se, n) shape the table helpers read (n = seeds)."""
    return [{"policy": p.variant, "metric": p.metric, "mean": p.mean, "lo": p.lo, "hi": p.hi, "se": p.se,
             "n": p.n_seeds} for p in pooled]


# ------------------------------------------------------------------------------------------------ frontier
def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the frontier points sorted by KL: a point stays if no point with KL <= its KL has a higher
    gold reward (ties in KL keep the higher gold). ``points`` are (kl, gold)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    keep, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            keep.append(i)
            best = points[i][1]
    return keep


def interpolation_weights(points: Sequence[tuple[float, float]], budget: float) -> list[tuple[int, float]] | None:
    """Where KL ``budget`` falls on the frontier through ``points`` = (kl, gold): the (index, weight) pairs whose
    weighted sum gives any value there (linear between frontier points, flat after the last one); None beyond
    the largest KL any point reached (no extrapolation) or below the smallest."""
    if not points:
        return None
    idx = frontier(points)
    if budget > max(p[0] for p in points) + 1e-12 or budget < points[idx[0]][0] - 1e-12:
        return None
    for a, b in zip(idx, idx[1:]):
        if points[a][0] <= budget <= points[b][0]:
            span = points[b][0] - points[a][0]
            w = 0.0 if span <= 0 else (budget - points[a][0]) / span
            return [(a, 1.0 - w), (b, w)]
    return [(idx[-1], 1.0)]  # past the best point, up to the largest KL reached: the best stays the best


@dataclass
class Point:
    """One evaluated policy in (KL, gold) space, with its win rate vs the reference and standard errors."""

    kl: float
    gold: float
    win: float
    gold_se: float
    win_se: float


@dataclass
class MatchedRow:
    budget: float
    algorithm: str
    metric: str
    mean: float | None
    lo: float | None
    hi: float | None
    n_seeds: int

    def row(self) -> dict:
        return self.__dict__.copy()


def _se(row: Mapping[str, Any] | None) -> float:
    return float(row["se"]) if row is not None and row.get("se") is not None else math.nan


def _points(cells: Sequence[Cell]) -> dict[str, dict[int, list[Point]]]:
    """algorithm -> seed -> points from final and path evaluations, plus the reference point of that seed."""
    ref = {c.seed: c.rows[GOLD] for c in cells if c.policy == REFERENCE and GOLD in c.rows}
    out: dict[str, dict[int, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        if c.policy == REFERENCE:
            continue
        pts = out[c.policy][c.seed]
        if not pts and c.seed in ref:
            pts.append(Point(0.0, float(ref[c.seed]["mean"]), 0.5, _se(ref[c.seed]), 0.0))
        for source in [c.rows, *c.path]:
            kl, gold, win = source.get(KL), source.get(GOLD), source.get(WIN)
            if kl is None or gold is None:
                continue
            pts.append(Point(float(kl["mean"]), float(gold["mean"]), float(win["mean"]) if win else math.nan,
                             _se(gold), _se(win)))
    return out


def default_budgets(cells: Sequence[Cell], k: int = 4) -> list[float]:
    """``k`` budgets up to the largest KL every algorithm reached in every seed (so all can be read there)."""
    reach: dict[str, list[float]] = defaultdict(list)
    by: dict[tuple[str, int], float] = defaultdict(float)
    for c in cells:
        if c.policy == REFERENCE:
            continue
        for source in [c.rows, *c.path]:
            if KL in source:
                by[(c.policy, c.seed)] = max(by[(c.policy, c.seed)], float(source[KL]["mean"]))
    for (alg, _), v in by.items():
        reach[alg].append(v)
    if not reach:
        return []
    top = min(min(v) for v in reach.values())
    if top <= 0:
        return []
    return [float(f"{top * (i + 1) / k:.2g}") for i in range(k)]


def matched_kl(cells: Sequence[Cell], budgets: Sequence[float], confidence: float = 0.95) -> list[MatchedRow]:
    """Gold reward and win rate vs the reference of every algorithm at each KL budget.

    Per seed the value is read off that seed's frontier; over >= 2 seeds the interval is a t-interval over
    seeds. With one seed it comes from the interpolated points' standard errors (samples, normal quantile).
    A budget any seed does not reach is left empty (None).
    """
    out = []
    z = t_ppf(0.5 + confidence / 2, math.inf)
    for budget in budgets:
        for alg, seeds in _points(cells).items():
            per_seed: dict[str, list[tuple[float, float]]] = {GOLD: [], WIN: []}
            for pts in seeds.values():
                weights = interpolation_weights([(p.kl, p.gold) for p in pts], budget)
                if weights is None:
                    per_seed = {}
                    break
                for metric, val, se in ((GOLD, "gold", "gold_se"), (WIN, "win", "win_se")):
                    v = sum(w * getattr(pts[i], val) for i, w in weights)
                    s = math.sqrt(sum((w * getattr(pts[i], se)) ** 2 for i, w in weights))
                    per_seed[metric].append((v, s))
            for metric in (GOLD, WIN):
                vals = per_seed.get(metric, [])
                if not vals or any(math.isnan(v) for v, _ in vals):
                    out.append(MatchedRow(budget, alg, metric, None, None, None, len(seeds)))
                elif len(vals) >= 2:
                    est = mean_ci([v for v, _ in vals], confidence=confidence)
                    out.append(MatchedRow(budget, alg, metric, est.mean, est.lo, est.hi, len(vals)))
                else:
                    v, s = vals[0]
                    lo, hi = (v - z * s, v + z * s) if math.isfinite(s) else (None, None)
                    out.append(MatchedRow(budget, alg, metric, v, lo, hi, 1))
    return out


def verdicts(rows: Sequence[MatchedRow], metric: str = GOLD) -> dict[float, str]:
    """At each budget: the algorithm whose interval lies above every other's, else 'cannot tell'."""
    out = {}
    by_budget: dict[float, list[MatchedRow]] = defaultdict(list)
    for r in rows:
        if r.metric == metric:
            by_budget[r.budget].append(r)
    for budget, group in by_budget.items():
        ok = [r for r in group if r.mean is not None]
        verdict = "cannot tell"
        if len(ok) >= 2 and all(r.lo is not None for r in ok):
            for r in ok:
                if all(r.lo > o.hi for o in ok if o is not r):
                    verdict = r.algorithm
                    break
        elif len(ok) < 2:
            verdict = "cannot tell" if ok else "no data"
        out[budget] = verdict
    return out


# ------------------------------------------------------------------------------------------------ the report
TABLE_METRICS = (GOLD, WIN, KL, PROXY, "eval/gold_proxy_gap", "eval/implicit_reward_accuracy", "eval/length")


@dataclass
class Comparison:
    runs: list[dict]
    cells: list[Cell]
    pooled: list[Pooled]
    budgets: list[float]
    matched: list[MatchedRow]
    verdicts: dict[float, str]
    win_verdicts: dict[float, str]

    @property
    def variants(self) -> list[str]:
        order = sorted({(c.policy != REFERENCE, c.policy, _kl_of(self.pooled, c.variant), c.variant) for c in self.cells})
        return list(dict.fromkeys(v for *_, v in order))

    def variant_data(self) -> dict[str, dict]:
        """variant -> {"algorithm", "rows": pooled final rows, "path": pooled path points} (for the plots)."""
        out = {}
        for v in self.variants:
            cells = [c for c in self.cells if c.variant == v]
            rows = {p.metric: p.row() for p in self.pooled if p.variant == v}
            steps: dict[Any, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for c in cells:
                for point in c.path:
                    for metric, row in point.items():
                        if metric != "step":
                            steps[point["step"]][metric].append((c.seed, row))
            path = []
            for step in sorted(steps):
                path.append({m: dict(zip(("mean", "lo", "hi", "se", "n_seeds", "n_samples"),
                                         pool_rows([r for _, r in rs], [s for s, _ in rs])))
                             for m, rs in steps[step].items()})
            out[v] = {"algorithm": cells[0].policy, "rows": rows, "path": path}
        return out


def _kl_of(pooled: Sequence[Pooled], variant: str) -> float:
    return next((p.mean for p in pooled if p.variant == variant and p.metric == KL), 0.0)


def compare(runs: Sequence[Mapping[str, Any]], budgets: Sequence[float] | None = None) -> Comparison:
    """Pool the runs' cells over seeds and read every algorithm's frontier at common KL budgets."""
    runs = list(runs)
    if not runs:
        raise RunError("no evaluated runs to report")
    check_comparable(runs)
    cells = cells_of(runs)
    pooled = pool(cells)
    budgets = list(budgets) if budgets else default_budgets(cells)
    matched = matched_kl(cells, budgets)
    return Comparison(runs, cells, pooled, budgets, matched, verdicts(matched, GOLD), verdicts(matched, WIN))


def frontier_curves(cmp: Comparison, n: int = 25) -> dict[str, list[dict]]:
    """Each algorithm's frontier on a grid of KL budgets (pooled over seeds), for the frontier plot."""
    out = {}
    for alg in dict.fromkeys(c.policy for c in cmp.cells if c.policy != REFERENCE):
        cells = [c for c in cmp.cells if c.policy in (alg, REFERENCE)]
        top = default_budgets([c for c in cells], k=1)
        if not top:
            continue
        grid = [top[0] * i / (n - 1) for i in range(n)]
        out[alg] = [{"budget": r.budget, "mean": r.mean, "lo": r.lo, "hi": r.hi}
                    for r in matched_kl(cells, grid) if r.metric == GOLD]
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    from prefopt.reports.tables import fmt_number

    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt_number(f"{{:.{digits}f}}", v)


def _matched_grid(cmp: Comparison, metric: str):
    """(algorithms, {(budget, algorithm): row}, verdict per budget) of one metric's matched-KL table."""
    algs = list(dict.fromkeys(r.algorithm for r in cmp.matched))
    by = {(r.budget, r.algorithm): r for r in cmp.matched if r.metric == metric}
    return algs, by, (cmp.verdicts if metric == GOLD else cmp.win_verdicts)


def matched_markdown(cmp: Comparison, metric: str = GOLD) -> str:
    from prefopt.reports.tables import markdown_table

    algs, by, verdict = _matched_grid(cmp, metric)
    body = []
    for b in cmp.budgets:
        cells = []
        for a in algs:
            r = by.get((b, a))
            if r is None or r.mean is None:
                cells.append("— (not reached)")
            else:
                ci = f" [{_fmt(r.lo)}, {_fmt(r.hi)}]" if r.lo is not None else ""
                cells.append(f"{_fmt(r.mean)}{ci} (n={r.n_seeds})")
        body.append([f"{b:g}", *cells, verdict.get(b, "")])
    return markdown_table(["KL budget", *algs, "verdict"], body)


def matched_console(cmp: Comparison, metric: str = GOLD, title: str | None = None):
    """The matched-KL table for an 80-column console: each cell the mean over ±half-width."""
    from rich import box
    from rich.table import Table

    algs, by, verdict = _matched_grid(cmp, metric)
    table = Table(title=title or f"{metric.removeprefix('eval/')} at matched KL (mean, ±95% CI, n seeds)",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("KL ≤", justify="right", overflow="fold")
    for a in algs:
        table.add_column(a, justify="right", overflow="fold")
    table.add_column("verdict", overflow="fold")
    for b in cmp.budgets:
        cells = []
        for a in algs:
            r = by.get((b, a))
            if r is None or r.mean is None:
                cells.append("—")
            else:
                hw = None if r.lo is None else max(r.hi - r.mean, r.mean - r.lo)
                show = hw is not None and _fmt(hw) != _fmt(0.0)
                cells.append(_fmt(r.mean) + (f"\n[dim]±{_fmt(hw)}[/]" if show else "") + f"\n[dim]n={r.n_seeds}[/]")
        table.add_row(f"{b:g}", *cells, verdict.get(b, ""))
    return table


def write_comparison(cmp: Comparison, folder: str | Path, *, command: str | None = None) -> list[Path]:
    """Tables (Markdown, CSV, JSON) and plots (frontier, over-optimisation, win rates) into ``folder``, atomically
    (built next to it, renamed into place; an older report there is replaced, any other folder refused)."""
    from prefopt.reports.run import RunFolder

    report = RunFolder.create(folder, kind="report", overwrite=True)  # derived files: a new report replaces the old
    try:
        _write_comparison(cmp, report.path, command)
    except BaseException:
        report.abort()
        raise
    report.finish()
    return sorted(Path(folder).iterdir())


def annotators_over_seeds(runs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """meta.annotators of the runs, one run per seed (its pairs and reward model), averaged over seeds."""
    per_seed: dict[Any, list[dict]] = {}
    for run in runs:
        rows = (run.get("meta") or {}).get("annotators") or []
        seed = (run.get("config") or {}).get("seed")
        if rows and seed not in per_seed:
            per_seed[seed] = rows
    by: dict[Any, list[dict]] = defaultdict(list)
    for rows in per_seed.values():
        for r in rows:
            by[r["annotator"]].append(r)
    out = []
    for who in sorted(by, key=str):
        rs = by[who]
        row = {"annotator": who, "n": len(rs)}
        for key in {k for r in rs for k in r} - {"annotator"}:
            xs = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
            row[key] = sum(xs) / len(xs) if xs else None
        out.append(row)
    return out


def _write_comparison(cmp: Comparison, out: Path, command: str | None) -> None:
    import pandas as pd

    from prefopt.reports import plots
    from prefopt.reports.run import dump_json
    from prefopt.reports.tables import annotators_markdown, comparison_markdown

    variants = cmp.variants
    pooled_rows = [p.row() for p in cmp.pooled]
    summary = pooled_summary(cmp.pooled)
    metrics = [m for m in TABLE_METRICS if any(r["metric"] == m for r in summary)]

    pd.DataFrame(pooled_rows).to_csv(out / "pooled.csv", index=False)
    pd.DataFrame([r.row() for r in cmp.matched]).to_csv(out / "matched_kl.csv", index=False)
    cells = [{"run": c.run, "policy": c.policy, "variant": c.variant, "seed": c.seed, "metric": m, **{
        k: r.get(k) for k in ("mean", "lo", "hi", "se", "n")}} for c in cmp.cells for m, r in c.rows.items()]
    pd.DataFrame(cells).to_csv(out / "cells.csv", index=False)
    (out / "comparison.json").write_text(dump_json({
        "schema_version": 1, "runs": [str(r["dir"]) for r in cmp.runs], "eval_settings": cmp.runs[0].get("eval_settings"),
        "metric_versions": cmp.runs[0].get("metric_versions"), "pooled": pooled_rows,
        "budgets": cmp.budgets, "matched_kl": [r.row() for r in cmp.matched],
        "verdicts": {f"{b:g}": v for b, v in cmp.verdicts.items()},
        "win_rate_verdicts": {f"{b:g}": v for b, v in cmp.win_verdicts.items()},
    }), encoding="utf-8")

    data = cmp.variant_data()
    plots.plot_frontier(data, frontier_curves(cmp), out / "frontier.png")
    if any(PROXY in d["rows"] for d in data.values()):
        plots.plot_overoptimisation({k: v for k, v in data.items() if PROXY in v["rows"]}, out / "overoptimisation.png",
                                    start=data.get(REFERENCE, {}).get("rows"))
    win_rows = [r for r in summary if r["metric"] == WIN and r["policy"] != REFERENCE]
    plots.plot_win_rates(sorted(win_rows, key=lambda r: variants.index(r["policy"])), out / "win_rates.png")

    n_runs, seeds = len(cmp.runs), sorted({c.seed for c in cmp.cells})
    lines = ["# Comparison report", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"{n_runs} run(s), seeds {seeds}; n = number of seeds pooled (t-interval over seeds when n >= 2, "
              "else the run's own interval over samples). Evaluation settings (identical in every run): "
              f"`{json.dumps(cmp.runs[0].get('eval_settings'), sort_keys=True)}`.", "",
              "## Pooled over seeds", "", comparison_markdown(summary, metrics, policies=variants), "",
              "## Gold reward at matched KL", "",
              "Each algorithm's frontier (best gold reward reached with at most that much KL, joined linearly, "
              "including evaluations during training and the reference point) read at common KL budgets; "
              "verdict only where one interval lies above all others.", "",
              matched_markdown(cmp, GOLD), "", "## Win rate vs the reference at matched KL", "",
              matched_markdown(cmp, WIN), "", "## Plots", "",
              "![frontier](frontier.png)", ""]
    if (out / "overoptimisation.png").exists():
        lines += ["![over-optimisation](overoptimisation.png)", ""]
    lines += ["![win rates](win_rates.png)", ""]
    pool_rows_ = annotators_over_seeds(cmp.runs)
    if pool_rows_:
        lines += ["## Training pairs by annotator", "",
                  "Each seed's pairs and reward model once (cells of one seed share them), mean over the n seeds.", "",
                  annotators_markdown(pool_rows_), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
