"""Tables built from a run's ``summary`` and ``samples`` rows.

The summary is a *long* list of ``{"policy", "metric", "mean", "lo", "hi", "se", "n"}``
rows because that is what the evaluation loop naturally produces and what a CSV should
hold; people, however, read a *wide* table (one row per policy). Everything here turns
the former into the latter without recomputing any statistic: reports only present
numbers, they never derive them, so a report can be regenerated from a saved run.

Markdown is rendered by hand (not ``DataFrame.to_markdown``) to avoid pandas' optional
``tabulate`` dependency.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from rich import box
from rich.markup import escape
from rich.table import Table

from prefopt.eval.metrics import metric_spec

HEAD_TO_HEAD = "eval/win_rate_vs_"

__all__ = [
    "MISSING",
    "SUMMARY_COLUMNS",
    "comparison_frame",
    "comparison_markdown",
    "console_cell",
    "console_table",
    "format_estimate",
    "head_to_head_markdown",
    "is_head_to_head",
    "markdown_table",
    "samples_frame",
    "samples_markdown",
    "summary_frame",
]

SUMMARY_COLUMNS: tuple[str, ...] = ("policy", "metric", "mean", "lo", "hi", "se", "n")
SAMPLE_COLUMNS: tuple[str, ...] = (
    "prompt_id",
    "prompt",
    "policy",
    "response",
    "gold",
    "proxy",
    "kl",
    "length",
    "eos",
)
MISSING = "—"  # shown where a policy has no value for a metric

_ARROWS = {True: " ↑", False: " ↓", None: ""}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """A finite real (numpy scalars included); bools are not numbers here."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _fmt(metric: str) -> str:
    spec = metric_spec(metric)
    return spec.fmt if spec is not None else "{:.3f}"


def is_head_to_head(metric: str) -> bool:
    """``eval/win_rate_vs_<policy>`` (but not ``..._vs_ref``, which is in the main table)."""
    return metric.startswith(HEAD_TO_HEAD) and metric != "eval/win_rate_vs_ref"


def fmt_number(fmt: str, value: float) -> str:
    """``fmt.format(value)`` without a minus sign on a number that rounds to zero ("-0.000" -> "0.000")."""
    text = fmt.format(float(value))
    if text.startswith("-") and float(text) == 0:
        text = text[1:]
    return text


def format_estimate(metric: str, mean: Any, lo: Any = None, hi: Any = None) -> str:
    """``"mean [lo, hi]"``, or just ``"mean"`` when the row carries no (finite) interval."""
    if mean is None:
        return MISSING
    fmt = _fmt(metric)
    text = fmt_number(fmt, mean)
    if _is_number(lo) and _is_number(hi):
        text += f" [{fmt_number(fmt, lo)}, {fmt_number(fmt, hi)}]"
    return text


def _validated_summary(summary: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise rows to exactly SUMMARY_COLUMNS and reject duplicate (policy, metric).

    A duplicate would make the wide table silently show whichever row came last, so it
    is an error rather than something to resolve here.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(summary):
        missing = [key for key in ("policy", "metric", "mean") if key not in row]
        if missing:
            raise ValueError(f"summary row {i} lacks {', '.join(missing)}: {dict(row)!r}")
        key = (str(row["policy"]), str(row["metric"]))
        if key in seen:
            raise ValueError(f"summary has more than one row for policy={key[0]!r} metric={key[1]!r}")
        seen.add(key)
        rows.append({col: row.get(col) for col in SUMMARY_COLUMNS})
    return rows


def _ordered(names: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    """``preferred`` first (those present), then the rest in order of first appearance."""
    unique = list(dict.fromkeys(names))
    if preferred is None:
        return unique
    head = [name for name in dict.fromkeys(preferred) if name in unique]
    return head + [name for name in unique if name not in head]


def _select_metrics(rows: list[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(row["metric"] for row in rows))
    if metrics is None:
        return present
    unknown = [m for m in metrics if m not in present]
    if unknown:
        raise ValueError(f"metric(s) not in summary: {', '.join(unknown)}")
    return list(dict.fromkeys(metrics))


def _escape_cell(value: Any) -> str:
    """Make any value safe inside one Markdown table cell (pipes, line breaks)."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "<br>").replace("\r", "<br>").replace("\n", "<br>")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; every cell is escaped."""
    lines = [
        "| " + " | ".join(_escape_cell(h) for h in header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row has {len(row)} cells, header has {len(header)}")
        lines.append("| " + " | ".join(_escape_cell(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


ANNOTATOR_COLUMNS = {"pairs": "pairs", "gold_agreement": "agrees with gold", "proxy_agreement": "RM agrees",
                     "flipped": "flipped", "chosen_longer": "chosen longer", "chosen_first": "chosen shown first"}


def annotators_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A pool's training pairs stratified by annotator (:func:`prefopt.data.synthetic.annotator_summary` rows,
    or their means over seeds with ``n``): who labelled what, how often with the gold score, how often the
    reward model agrees, and the bias diagnostics (chosen longer, chosen shown first)."""
    columns = [k for k in ANNOTATOR_COLUMNS if any(r.get(k) is not None for r in rows)]
    extra = ["n"] if any("n" in r for r in rows) else []

    def cell(key, value):
        if value is None:
            return "n/a"
        return f"{value:.0f}" if key == "pairs" else f"{value:.3f}"

    return markdown_table(["annotator", *(ANNOTATOR_COLUMNS[k] for k in columns), *extra],
                          [[r["annotator"], *(cell(k, r.get(k)) for k in columns), *(r.get("n") for _ in extra)]
                           for r in rows])


# ---------------------------------------------------------------------------
# Summary tables
# ---------------------------------------------------------------------------


def summary_frame(summary: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The numeric long form (policy, metric, mean, lo, hi, se, n) written to CSV."""
    rows = _validated_summary(summary)
    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for col in ("mean", "lo", "hi", "se"):
        frame[col] = pd.to_numeric(frame[col], errors="raise").astype("float64")
    frame["n"] = pd.to_numeric(frame["n"], errors="raise").astype("Int64")
    return frame


def comparison_frame(
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    policies: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Wide, display-ready table: one row per policy, one string column per metric.

    Cells read ``"mean [lo, hi]"`` (plain mean when the row has no interval). ``metrics``
    selects and orders columns (default: order of first appearance); ``policies`` puts
    those policies first (default: order of first appearance, which the pipeline sets).
    The ``n`` column is the largest per-metric ``n`` of the policy, i.e. the number of
    evaluated samples (some metrics, e.g. distinct_2, are single pooled numbers).
    """
    rows = _validated_summary(summary)
    metric_names = _select_metrics(rows, metrics)
    policy_names = _ordered([row["policy"] for row in rows], policies)
    by_key = {(row["policy"], row["metric"]): row for row in rows}

    records = []
    for policy in policy_names:
        record: dict[str, Any] = {"policy": policy}
        ns = []
        for metric in metric_names:
            row = by_key.get((policy, metric))
            if row is None:
                record[metric] = MISSING
                continue
            record[metric] = format_estimate(metric, row["mean"], row["lo"], row["hi"])
            if row["n"] is not None:
                ns.append(int(row["n"]))
        record["n"] = max(ns) if ns else None
        records.append(record)
    frame = pd.DataFrame(records, columns=["policy", *metric_names, "n"])
    frame["n"] = frame["n"].astype("Int64")
    return frame


def comparison_markdown(
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    policies: Sequence[str] | None = None,
) -> str:
    """The comparison table as GitHub Markdown; headers carry ↑/↓ for goal metrics."""
    frame = comparison_frame(summary, metrics, policies=policies)
    header = [
        col + (_ARROWS[metric_spec(col).higher_is_better] if metric_spec(col) is not None else "")
        for col in frame.columns
    ]
    body = [
        ["" if pd.isna(value) else value for value in record]
        for record in frame.itertuples(index=False, name=None)
    ]
    return markdown_table(header, body)


CONSOLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("eval/gold_reward", "gold ↑"),
    ("eval/win_rate_vs_ref", "win/ref ↑"),
    ("eval/kl_to_ref", "KL"),
    ("eval/proxy_reward", "proxy ↑"),
    ("eval/gold_proxy_gap", "gap"),
    ("eval/length", "len"),
)
"""What the console shows (every metric is in the files): short headers, so a table of a few policies fits
an 80-column terminal or log without cutting a header or a number."""


def half_width(row: Mapping[str, Any]) -> float | None:
    """The half-width of a row's interval (the larger side, for asymmetric ones), or None without one."""
    if not (_is_number(row.get("lo")) and _is_number(row.get("hi")) and _is_number(row.get("mean"))):
        return None
    return max(float(row["hi"]) - float(row["mean"]), float(row["mean"]) - float(row["lo"]))


def console_cell(metric: str, row: Mapping[str, Any] | None) -> str:
    """``mean`` over ``±half-width`` on a second line (plain text)."""
    if row is None or not _is_number(row.get("mean")):
        return MISSING
    fmt = _fmt(metric)
    text = fmt_number(fmt, row["mean"])
    hw = half_width(row)
    if hw is not None and fmt_number(fmt, hw) != fmt_number(fmt, 0.0):
        text += "\n±" + fmt_number(fmt, hw)
    return text


def console_table(
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    policies: Sequence[str] | None = None,
    title: str | None = "Policy comparison (mean, ±95% CI)",
) -> Table:
    """A rich table for the console: one row per policy, each cell the mean over ``±`` its CI half-width.

    Columns fold rather than truncate, so nothing is ever shown as ``…``. The best policy on each goal metric
    (``higher_is_better`` not None) is bolded; ties and diagnostics (KL, length) are left plain on purpose.
    """
    rows = _validated_summary(summary)
    present = {r["metric"] for r in rows}
    columns = [(m, h) for m, h in CONSOLE_COLUMNS if m in present] if metrics is None else [
        (m, m.removeprefix("eval/")) for m in metrics]
    policy_names = _ordered([r["policy"] for r in rows], policies)
    by_key = {(r["policy"], r["metric"]): r for r in rows}

    best: dict[str, str] = {}
    for metric, _ in columns:
        spec = metric_spec(metric)
        if spec is None or spec.higher_is_better is None:
            continue
        scored = [(float(by_key[(p, metric)]["mean"]), p) for p in policy_names
                  if (p, metric) in by_key and _is_number(by_key[(p, metric)]["mean"])]
        if len(scored) < 2:
            continue
        top = (max if spec.higher_is_better else min)(v for v, _ in scored)
        winners = [p for v, p in scored if v == top]
        if len(winners) == 1:
            best[metric] = winners[0]

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("policy", style="bold", overflow="fold")
    for _, header in columns:
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("n", justify="right", overflow="fold")
    for policy in policy_names:
        cells = [escape(str(policy))]
        ns = []
        for metric, _ in columns:
            row = by_key.get((policy, metric))
            text = escape(console_cell(metric, row))
            if row is not None and row.get("n") is not None:
                ns.append(int(row["n"]))
            if best.get(metric) == policy:
                first, _, rest = text.partition("\n")
                text = f"[bold green]{first}[/]" + (f"\n[dim]{rest}[/]" if rest else "")
            elif "\n" in text:
                first, _, rest = text.partition("\n")
                text = f"{first}\n[dim]{rest}[/]"
            cells.append(text)
        cells.append(str(max(ns)) if ns else "")
        table.add_row(*cells)
    return table


def head_to_head_markdown(summary: Sequence[Mapping[str, Any]], policies: Sequence[str]) -> str:
    """Row policy's gold win rate against each column policy (paired by prompt, ties half), with 95% CI."""
    rows = _validated_summary(summary)
    by_key = {(r["policy"], r["metric"]): r for r in rows}
    names = [p for p in _ordered([r["policy"] for r in rows], policies)]
    opponents = [p for p in names if any((q, HEAD_TO_HEAD + p) in by_key for q in names)]
    header = ["win rate of ↓ vs →", *opponents]
    body = []
    for p in names:
        cells: list[Any] = [p]
        for q in opponents:
            row = by_key.get((p, HEAD_TO_HEAD + q))
            cells.append(MISSING if p == q or row is None else
                         format_estimate("eval/win_rate_vs_ref", row["mean"], row["lo"], row["hi"]))
        body.append(cells)
    return markdown_table(header, body)


# ---------------------------------------------------------------------------
# Sample tables
# ---------------------------------------------------------------------------


def samples_frame(samples: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """All samples, one row per (prompt, policy), known columns first."""
    extra = [k for k in dict.fromkeys(k for s in samples for k in s) if k not in SAMPLE_COLUMNS]
    return pd.DataFrame([dict(s) for s in samples], columns=[*SAMPLE_COLUMNS, *extra])


def samples_markdown(
    samples: Sequence[Mapping[str, Any]],
    policies: Sequence[str],
    n: int = 12,
) -> str:
    """Side-by-side responses for the first ``n`` prompts (a "before / after" table).

    Columns: ``prompt | <policy> response | <policy> gold`` for each policy, so the
    reference's completion sits next to PPO's and DPO's for the same prompt. Prompts are
    taken in order of first appearance; a policy without a sample for a prompt gets
    empty cells rather than shifting the row.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    prompts: dict[Any, str] = {}
    by_key: dict[tuple[Any, str], Mapping[str, Any]] = {}
    for i, sample in enumerate(samples):
        for key in ("prompt_id", "policy"):
            if key not in sample:
                raise ValueError(f"sample {i} lacks {key!r}")
        pid = sample["prompt_id"]
        prompts.setdefault(pid, str(sample.get("prompt", "")))
        by_key.setdefault((pid, str(sample["policy"])), sample)

    header = ["prompt"]
    for policy in policies:
        header += [f"{policy} response", f"{policy} gold"]
    body = []
    for pid in list(prompts)[:n]:
        row: list[Any] = [prompts[pid]]
        for policy in policies:
            sample = by_key.get((pid, policy))
            if sample is None:
                row += ["", ""]
                continue
            gold = sample.get("gold")
            row += [sample.get("response", ""), f"{float(gold):.3f}" if _is_number(gold) else ""]
        body.append(row)
    return markdown_table(header, body)
