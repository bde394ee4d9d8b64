"""Reports: turn result data into tables, plots and result folders; pool runs into comparisons.

Reads plain JSON-shaped data only (summary / samples / metrics rows); it must never import torch, so
``prefopt report`` works on a machine without it.
"""

from prefopt.reports.plots import plot_frontier, plot_overoptimisation, plot_reward_kl, plot_win_rates
from prefopt.reports.run import (
    FILES,
    MARKER,
    SCHEMA_VERSION,
    RunFolder,
    find_runs,
    load_run,
    read_marker,
    to_jsonable,
    write_reports,
    write_run,
)
from prefopt.reports.tables import (
    comparison_frame,
    comparison_markdown,
    console_table,
    format_estimate,
    head_to_head_markdown,
    markdown_table,
    samples_frame,
    samples_markdown,
    summary_frame,
)

__all__ = [
    "FILES",
    "MARKER",
    "SCHEMA_VERSION",
    "RunFolder",
    "comparison_frame",
    "comparison_markdown",
    "console_table",
    "find_runs",
    "format_estimate",
    "head_to_head_markdown",
    "load_run",
    "markdown_table",
    "plot_frontier",
    "plot_overoptimisation",
    "plot_reward_kl",
    "plot_win_rates",
    "read_marker",
    "samples_frame",
    "samples_markdown",
    "summary_frame",
    "to_jsonable",
    "write_reports",
    "write_run",
]
