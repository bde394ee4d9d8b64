"""Result folders: built in a staging sibling, renamed into place only when complete, marked as prefopt's.

A run folder is the durable output of a command: everything needed to rebuild its reports (``prefopt report``)
without a model, plus the trained artifacts (PEFT adapter folders) written by the pipeline. Layout::

    prefopt-run.json   the marker: {"kind": "run" | "eval" | "sweep" | "report", "schema_version", "complete", ...}
    config.json        resolved config (loads back with --config)
    summary.json       {"schema_version", "meta", "policies", "eval_settings", "metric_versions", "summary", "path"}
    metrics.jsonl      training log rows
    samples.jsonl      every (prompt, policy) sample, lossless
    comparison.md/.csv, head_to_head.md, samples.md/.csv, reward_kl.png    (derived, regenerable)

Safety rules, each tested:

- the output location is checked (created, written) before any compute: :meth:`RunFolder.create` makes the
  staging folder ``<name>.tmp-<host>-<pid>`` next to the target, so a read-only or invalid ``--out`` fails at once;
- ``overwrite`` replaces only a folder that carries prefopt's marker (of the same kind); a folder of other files
  is never deleted;
- a staging folder left by a killed process is never a run (its marker says ``complete: false``) and is removed
  by the next write next to it when its process (same host) is gone.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import math
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from prefopt.errors import RunError

__all__ = [
    "FILES",
    "MARKER",
    "SCHEMA_VERSION",
    "RunFolder",
    "find_runs",
    "load_run",
    "read_marker",
    "to_jsonable",
    "write_reports",
    "write_run",
]

SCHEMA_VERSION = 2
MARKER = "prefopt-run.json"
KINDS = ("run", "eval", "sweep", "report")

FILES: dict[str, str] = {
    "marker": MARKER,
    "config": "config.json",
    "metrics": "metrics.jsonl",
    "summary": "summary.json",
    "samples": "samples.jsonl",
    "pairs": "pairs.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "comparison_md": "comparison.md",
    "comparison_csv": "comparison.csv",
    "head_to_head_md": "head_to_head.md",
    "samples_md": "samples.md",
    "samples_csv": "samples.csv",
    "reward_kl": "reward_kl.png",
    "data_report": "data_report.json",
    "annotators_md": "annotators.md",
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


def dump_json(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def dump_jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


# ---------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------


def read_marker(folder: str | PathLike[str]) -> dict | None:
    """The marker of a prefopt folder, or None when ``folder`` is not one (or the marker is unreadable)."""
    path = Path(folder) / MARKER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") in KINDS else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _staging_owner(p: Path) -> tuple[str, int] | None:
    """(host, pid) of a staging / swap folder named ``<name>.tmp-<host>-<pid>`` (or ``.old-``); None otherwise."""
    stem, dot, tail = p.name.rpartition(".")
    kind, _, rest = tail.partition("-")
    host, _, pid = rest.rpartition("-")
    if not dot or kind not in ("tmp", "old") or not pid.isdigit():
        return None
    return host, int(pid)


def being_written(p: Path) -> bool:
    """True for a staging folder whose process is still running on this host (not a leftover of a killed one)."""
    owner = _staging_owner(Path(p))
    return owner is not None and owner[0] == _host() and _pid_alive(owner[1])


def clean_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove staging / swap folders (``<name>.tmp-<host>-<pid>``, ``.old-``) whose process on this host is gone."""
    removed = []
    if not parent.is_dir():
        return removed
    pattern = f"{name}.*-*" if name else "*.*-*"
    for p in parent.glob(pattern):
        owner = _staging_owner(p)
        if owner is None or not p.is_dir() or owner[0] != _host() or _pid_alive(owner[1]):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class RunFolder:
    """A result folder under construction. Create it before any compute; write into :attr:`path`; :meth:`finish`
    renames it into place (replacing an old prefopt folder of the same kind only when ``overwrite``)."""

    def __init__(self, final: Path, staging: Path, kind: str, overwrite: bool):
        self.final, self.path, self.kind, self.overwrite = final, staging, kind, overwrite

    @classmethod
    def create(cls, out: str | PathLike[str], *, kind: str = "run", overwrite: bool = False) -> "RunFolder":
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        final = Path(out)
        check_target(final, kind=kind, overwrite=overwrite)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(final.parent, final.name)
            staging = final.with_name(f"{final.name}.tmp-{_host()}-{os.getpid()}")
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            (staging / MARKER).write_text(dump_json(_marker(kind, complete=False)), encoding="utf-8")
        except OSError as e:
            raise RunError(f"{final}: cannot write the output folder ({e.strerror or e}): choose a writable --out") from None
        return cls(final, staging, kind, overwrite)

    @classmethod
    def scratch(cls, kind: str = "run") -> "RunFolder":
        """A private folder that never becomes a result (the caller aborts it instead of finishing): the
        other ranks of a multi-process run compute along with rank 0, which alone writes the run folder."""
        import tempfile

        return cls(None, Path(tempfile.mkdtemp(prefix="prefopt-rank-")), kind, False)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, dump_json(obj))

    def write_jsonl(self, name: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        return self.write_text(name, dump_jsonl(rows))

    def finish(self, **marker: Any) -> Path:
        """Mark complete and rename into place; on any failure the staging folder is removed."""
        try:
            (self.path / MARKER).write_text(dump_json(_marker(self.kind, complete=True, **marker)), encoding="utf-8")
            check_target(self.final, kind=self.kind, overwrite=self.overwrite)  # nothing appeared meanwhile
            _swap_into_place(self.path, self.final)
        except BaseException:
            self.abort()
            raise
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _marker(kind: str, *, complete: bool, **extra: Any) -> dict:
    import prefopt

    return {"kind": kind, "schema_version": SCHEMA_VERSION, "complete": complete, "prefopt": prefopt.__version__,
            "host": socket.gethostname(), "pid": os.getpid(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"), **extra}


def check_target(final: Path, *, kind: str, overwrite: bool) -> None:
    """Refuse to write over anything but an empty folder or (with ``overwrite``) a prefopt folder of this kind."""
    if not final.exists():
        return
    if not final.is_dir():
        raise RunError(f"{final}: exists and is not a folder: choose another --out")
    if not any(final.iterdir()):
        return
    marker = read_marker(final)
    if marker is None:
        also = "; --overwrite only replaces prefopt's own folders" if kind != "report" else ""
        raise RunError(f"{final}: exists and is not a prefopt {kind} folder (no {MARKER}){also}: choose another --out")
    if marker["kind"] != kind:
        raise RunError(f"{final}: is a prefopt {marker['kind']} folder, not a {kind} folder: choose another --out")
    if not overwrite:
        raise RunError(f"{final}: a prefopt {kind} folder already exists there: pass --overwrite to replace it or "
                       "choose another --out")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, replacing an old ``out`` only now."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{_host()}-{os.getpid()}")
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
# Writing reports
# ---------------------------------------------------------------------------


def write_reports(
    directory: str | PathLike[str],
    *,
    summary: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    policies: Sequence[str],
    path: Sequence[Mapping[str, Any]] = (),
    title: str | None = None,
    n_samples: int = 12,
) -> list[Path]:
    """Write the derived, human-facing files (tables, CSVs, plot) into ``directory``."""
    from prefopt.reports import plots, tables  # pandas and matplotlib: loaded when a report is written, not before

    out = Path(directory)
    summary = to_jsonable(list(summary))
    samples = to_jsonable(list(samples))
    written = []

    main = [r for r in summary if not tables.is_head_to_head(r["metric"])]
    p = out / FILES["comparison_md"]
    p.write_text(tables.comparison_markdown(main, policies=policies), encoding="utf-8")
    written.append(p)

    p = out / FILES["comparison_csv"]
    tables.summary_frame(summary).to_csv(p, index=False)
    written.append(p)

    if any(tables.is_head_to_head(r["metric"]) for r in summary):
        p = out / FILES["head_to_head_md"]
        p.write_text(tables.head_to_head_markdown(summary, policies), encoding="utf-8")
        written.append(p)

    if samples:
        p = out / FILES["samples_md"]
        p.write_text(tables.samples_markdown(samples, policies, n=n_samples), encoding="utf-8")
        written.append(p)
        p = out / FILES["samples_csv"]
        tables.samples_frame(samples).to_csv(p, index=False)
        written.append(p)

    written.append(plots.plot_reward_kl(summary, out / FILES["reward_kl"], title=title, policies=policies,
                                        path_rows=to_jsonable(list(path))))
    return written


def write_run(out_dir: str | PathLike[str], *, overwrite: bool = False, kind: str = "run", **contents: Any) -> Path:
    """Write a complete result folder in one go (atomic): ``contents`` are :func:`fill_run`'s arguments."""
    folder = RunFolder.create(out_dir, kind=kind, overwrite=overwrite)
    try:
        fill_run(folder, **contents)
    except BaseException:
        folder.abort()
        raise
    return folder.finish(evaluated=bool(contents.get("summary")))


def fill_run(
    folder: RunFolder,
    *,
    config: Any,
    metrics: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    policies: Sequence[str],
    pairs: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    path: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Write the result files of a run into a :class:`RunFolder` under construction."""
    folder.write_json(FILES["config"], config)
    folder.write_jsonl(FILES["metrics"], metrics)
    folder.write_jsonl(FILES["samples"], samples)
    if pairs is not None:
        folder.write_jsonl(FILES["pairs"], pairs)
    doc = {"schema_version": SCHEMA_VERSION, "meta": meta, "policies": list(policies), **(extra or {}),
           "summary": list(summary), "path": list(path)}
    folder.write_json(FILES["summary"], doc)
    if meta.get("annotators"):
        from prefopt.reports import tables

        folder.write_text(FILES["annotators_md"], "# Training pairs by annotator\n\n"
                          + tables.annotators_markdown(to_jsonable(meta["annotators"])))
    if summary:
        write_reports(folder.path, summary=summary, samples=samples, policies=policies, path=path,
                      title=f"Gold reward vs KL to reference: {folder.final.name}")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RunError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None


def _read_jsonl(path: Path, *, required: bool = True) -> list[dict[str, Any]]:
    if not path.is_file():
        if required:
            raise RunError(f"{path}: missing")
        return []
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RunError(f"{path}: not valid UTF-8 ({exc.reason})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise RunError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_run(run_dir: str | PathLike[str], *, samples: bool = True) -> dict[str, Any]:
    """Read a complete result folder back: ``config``, ``metrics``, ``summary``, ``samples``, ``meta``,
    ``policies``, ``path`` and the rest of summary.json. Every problem is a one-line :class:`RunError`."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"{root}: not a folder")
    marker = read_marker(root)
    if marker is None:
        raise RunError(f"{root}: not a prefopt result folder (no {MARKER})")
    if not marker.get("complete"):
        raise RunError(f"{root}: incomplete (its process was stopped before it finished): it is not a result")
    summary_path = root / FILES["summary"]
    doc = _read_json(summary_path)
    if not isinstance(doc, dict):
        raise RunError(f"{summary_path}: expected a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise RunError(f"{summary_path}: unsupported schema_version {doc.get('schema_version')!r} "
                       f"(this prefopt reads {SCHEMA_VERSION}): re-run it or use the prefopt that wrote it")
    summary = doc.get("summary")
    if not isinstance(summary, list) or not all(isinstance(r, dict) for r in summary):
        raise RunError(f"{summary_path}: 'summary' must be a list of objects")
    if not isinstance(doc.get("meta"), dict):
        raise RunError(f"{summary_path}: 'meta' must be an object")
    policies = doc.get("policies")
    if policies is None:
        policies = list(dict.fromkeys(str(r.get("policy")) for r in summary))
    elif not isinstance(policies, list):
        raise RunError(f"{summary_path}: 'policies' must be a list")
    out = dict(doc)
    out.update({
        "dir": root,
        "marker": marker,
        "config": _read_json(root / FILES["config"]),
        "metrics": _read_jsonl(root / FILES["metrics"], required=False),
        "summary": summary,
        "samples": _read_jsonl(root / FILES["samples"], required=False) if samples else [],
        "policies": policies,
        "path": doc.get("path") or [],
    })
    return out


def find_runs(root: str | PathLike[str], kinds: Sequence[str] = ("run", "eval")) -> tuple[list[Path], list[Path]]:
    """Complete result folders of ``kinds`` at or under ``root`` (sorted), and the incomplete ones skipped."""
    root = Path(root)
    found: list[Path] = []
    skipped: list[Path] = []

    def visit(p: Path) -> None:
        marker = read_marker(p)
        if marker is not None:
            if not marker.get("complete"):
                skipped.append(p)
                return
            if marker["kind"] in kinds:
                found.append(p)
                return
        for child in sorted(c for c in p.iterdir() if c.is_dir()):
            visit(child)

    if root.is_dir():
        visit(root)
    return found, skipped
