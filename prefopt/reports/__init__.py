"""Reports: turn a run's result data into tables, a plot and a result folder.

Reads plain JSON-shaped data only (summary / samples / metrics rows); it must never
import torch, so ``prefopt report <run_dir>`` works on a machine without it.
"""

from prefopt.reports.plots import plot_reward_kl
from prefopt.reports.run import FILES, SCHEMA_VERSION, load_run, to_jsonable, write_reports, write_run
from prefopt.reports.tables import (
    comparison_frame,
    comparison_markdown,
    console_table,
    format_estimate,
    markdown_table,
    samples_frame,
    samples_markdown,
    summary_frame,
)

__all__ = [
    "FILES",
    "SCHEMA_VERSION",
    "comparison_frame",
    "comparison_markdown",
    "console_table",
    "format_estimate",
    "load_run",
    "markdown_table",
    "plot_reward_kl",
    "samples_frame",
    "samples_markdown",
    "summary_frame",
    "to_jsonable",
    "write_reports",
    "write_run",
]
