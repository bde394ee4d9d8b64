"""Writing and reading a run's result folder.

A result folder is the durable output of a comparison: everything needed to rebuild
every report (``prefopt report <run_dir>``) without a model or a GPU. Layout::

    config.json      resolved config (to_jsonable)
    metrics.jsonl    training log rows, one JSON object per line
    summary.json     {"schema_version": 1, "meta": ..., "policies": [...], "summary": [...]}
    samples.jsonl    every (prompt, policy) sample, lossless (what load_run reads)
    pairs.jsonl      the preference pairs the reward model and DPO trained on (when given)
    comparison.md    wide policy x metric table, "mean [lo, hi]"
    comparison.csv   numeric long form: policy, metric, mean, lo, hi, se, n
    samples.md       side-by-side responses for the first prompts
    samples.csv      every sample, for spreadsheets
    reward_kl.png    gold reward vs KL to reference

Writes are atomic: the folder is built under ``<out_dir>.tmp-<pid>`` and renamed into
place only once complete, so a crash (or a failing plot) never leaves a half-written
folder that later looks like a valid result.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from prefopt.reports import plots, tables

__all__ = [
    "FILES",
    "SCHEMA_VERSION",
    "load_run",
    "to_jsonable",
    "write_reports",
    "write_run",
]

SCHEMA_VERSION = 1

FILES: dict[str, str] = {
    "config": "config.json",
    "metrics": "metrics.jsonl",
    "summary": "summary.json",
    "samples": "samples.jsonl",
    "pairs": "pairs.jsonl",
    "comparison_md": "comparison.md",
    "comparison_csv": "comparison.csv",
    "samples_md": "samples.md",
    "samples_csv": "samples.csv",
    "reward_kl": "reward_kl.png",
}


# ---------------------------------------------------------------------------
# JSON conversion
# ---------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into something ``json.dumps(..., allow_nan=False)`` accepts.

    Handles dataclasses, mappings, sequences/sets, Paths, Enums, dates and numpy
    scalars/arrays. NaN and ±inf become ``None`` because strict JSON has no spelling
    for them. Unknown objects (e.g. a ``torch.dtype`` left in a config) fall back to
    ``str(obj)``: a long training run must not die at its very last step because a
    config held an exotic value, and a readable repr is what a human needs anyway.
    """
    if obj is None or (isinstance(obj, (bool, str, int)) and not isinstance(obj, enum.Enum)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)  # deterministic output for the same config
        except TypeError:
            return items
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return str(obj)


def _dump_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _dump_jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(
        json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows
    )


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_reports(
    directory: str | PathLike[str],
    *,
    summary: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    policies: Sequence[str],
    title: str | None = None,
    n_samples: int = 12,
) -> list[Path]:
    """Write the derived, human-facing files (tables, CSVs, plot) into ``directory``.

    Not atomic on its own; :func:`write_run` calls it inside its temp folder, and
    ``prefopt report`` can call it to regenerate reports from :func:`load_run` output.
    """
    out = Path(directory)
    summary = to_jsonable(list(summary))
    samples = to_jsonable(list(samples))
    written = []

    path = out / FILES["comparison_md"]
    path.write_text(tables.comparison_markdown(summary, policies=policies), encoding="utf-8")
    written.append(path)

    path = out / FILES["comparison_csv"]
    tables.summary_frame(summary).to_csv(path, index=False)
    written.append(path)

    path = out / FILES["samples_md"]
    path.write_text(tables.samples_markdown(samples, policies, n=n_samples), encoding="utf-8")
    written.append(path)

    path = out / FILES["samples_csv"]
    tables.samples_frame(samples).to_csv(path, index=False)
    written.append(path)

    written.append(
        plots.plot_reward_kl(summary, out / FILES["reward_kl"], title=title, policies=policies)
    )
    return written


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_run(
    out_dir: str | PathLike[str],
    *,
    config: Any,
    metrics: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    policies: Sequence[str],
    pairs: Sequence[Mapping[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically write a complete result folder and return its path.

    ``config`` is a dict or a dataclass (the resolved config); it goes through
    :func:`to_jsonable`. Everything is written to the sibling ``<out_dir>.tmp-<pid>`` and renamed to
    ``out_dir`` at the end; on any error the temp folder is removed and the error
    re-raised. An existing non-empty ``out_dir`` raises ``FileExistsError`` unless
    ``overwrite`` is set, in which case the old folder is removed only after the new
    one is complete (it is first moved aside, so a failed swap can be rolled back).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (use overwrite to replace it)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a crashed earlier process that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / FILES["config"]).write_text(_dump_json(config), encoding="utf-8")
        (tmp / FILES["metrics"]).write_text(_dump_jsonl(metrics), encoding="utf-8")
        (tmp / FILES["samples"]).write_text(_dump_jsonl(samples), encoding="utf-8")
        if pairs is not None:
            (tmp / FILES["pairs"]).write_text(_dump_jsonl(pairs), encoding="utf-8")
        summary_doc = {
            "schema_version": SCHEMA_VERSION,
            "meta": meta,
            "policies": list(policies),
            "summary": list(summary),
        }
        (tmp / FILES["summary"]).write_text(_dump_json(summary_doc), encoding="utf-8")
        write_reports(
            tmp,
            summary=summary,
            samples=samples,
            policies=policies,
            title=f"Gold reward vs KL to reference: {out.name}",
        )
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an old ``out`` only now."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous result back
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc})") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_run(run_dir: str | PathLike[str]) -> dict[str, Any]:
    """Read a result folder back: keys ``config``, ``metrics``, ``summary``, ``samples``,
    ``meta`` and ``policies``.

    Only the machine-readable files are read (the Markdown/CSV/PNG are derived and can
    be regenerated with :func:`write_reports`). A missing or corrupt file raises
    ``ValueError`` naming that file, so ``prefopt report`` can print one clear line.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a run directory")
    config = _read_json(root / FILES["config"])
    doc = _read_json(root / FILES["summary"])
    summary_path = root / FILES["summary"]
    if not isinstance(doc, dict):
        raise ValueError(f"{summary_path}: expected a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{summary_path}: unsupported schema_version {doc.get('schema_version')!r} "
            f"(expected {SCHEMA_VERSION})"
        )
    summary = doc.get("summary")
    if not isinstance(summary, list) or not all(isinstance(r, dict) for r in summary):
        raise ValueError(f"{summary_path}: 'summary' must be a list of objects")
    meta = doc.get("meta")
    if not isinstance(meta, dict):
        raise ValueError(f"{summary_path}: 'meta' must be an object")
    policies = doc.get("policies")
    if policies is None:
        policies = list(dict.fromkeys(str(r.get("policy")) for r in summary))
    elif not isinstance(policies, list):
        raise ValueError(f"{summary_path}: 'policies' must be a list")
    return {
        "config": config,
        "metrics": _read_jsonl(root / FILES["metrics"]),
        "summary": summary,
        "samples": _read_jsonl(root / FILES["samples"]),
        "meta": meta,
        "policies": policies,
    }
