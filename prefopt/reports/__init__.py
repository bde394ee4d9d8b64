"""Reports: turn result data into tables, plots and result folders; pool runs into comparisons.

Reads plain JSON-shaped data only (summary / samples / metrics rows); it must never import torch, so
``prefopt report`` works on a machine without it.

The names below load their module on first use (PEP 562): ``prefopt.reports.run`` -- what a training run needs to
lay out its folder -- comes without pandas and matplotlib, whose resident code would otherwise sit under every
training stage's peak.
"""

import importlib

_WHERE = {
    "plot_frontier": "plots", "plot_overoptimisation": "plots", "plot_reward_kl": "plots", "plot_win_rates": "plots",
    "FILES": "run", "MARKER": "run", "SCHEMA_VERSION": "run", "RunFolder": "run", "find_runs": "run",
    "load_run": "run", "read_marker": "run", "to_jsonable": "run", "write_reports": "run", "write_run": "run",
    "comparison_frame": "tables", "comparison_markdown": "tables", "console_table": "tables",
    "format_estimate": "tables", "head_to_head_markdown": "tables", "markdown_table": "tables",
    "samples_frame": "tables", "samples_markdown": "tables", "summary_frame": "tables",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"prefopt.reports.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'prefopt.reports' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE])
