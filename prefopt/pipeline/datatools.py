"""``prefopt data``: look at a data source as prefopt will use it, and convert it to canonical records.

``inspect`` reads a pairs or prompts source through the same loaders a run uses (formats detected per row, strict
or ``skip_invalid``), tokenises it with the run's tokenizer and shows the token lengths and a few examples exactly
as the model will see them (chat template included). ``convert`` writes the canonical records as JSONL or parquet, which :func:`~prefopt.data.io.load_pairs` / ``load_prompts`` read back unchanged.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.io import DropReport, read_pairs, read_prompts, write_pairs, write_prompts
from prefopt.data.records import DataError, PreferencePair, PromptRecord
from prefopt.errors import PrefoptError
from prefopt.pipeline.config import EMBEDDED_PROMPTS

KINDS = ("pairs", "prompts")


@dataclass
class Inspection:
    kind: str
    report: DropReport
    records: list
    lengths: dict[str, list[int]] = field(default_factory=dict)  # part -> token counts
    examples: list[dict[str, str]] = field(default_factory=list)  # part -> text exactly as the model sees it
    notes: list[str] = field(default_factory=list)

    def length_table(self) -> list[dict[str, Any]]:
        rows = []
        for part, xs in self.lengths.items():
            q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else [xs[0]] * 99
            rows.append({"part": part, "n": len(xs), "min": min(xs), "p50": round(q[49]), "p90": round(q[89]),
                         "p99": round(q[98]), "max": max(xs), "mean": round(sum(xs) / len(xs), 1)})
        return rows


def read_source(source: str, kind: str, *, field_name: str | None = None, prefix_words=None, seed: int = 0,
                encoding_errors: str = "strict", skip_invalid: bool = False) -> tuple[list, DropReport]:
    if kind not in KINDS:
        raise PrefoptError(f"--as must be one of {', '.join(KINDS)}, got {kind!r}")
    if source == EMBEDDED_PROMPTS:  # the run's default prompt source is a name, not a file or hub dataset
        if kind != "prompts" or field_name or prefix_words:
            raise PrefoptError(f"{source}: the embedded sentiment prompts: read it with --as prompts alone")
        from prefopt.data.tasks import sentiment_prompts

        records = sentiment_prompts()
        report = DropReport(source, rows=len(records), formats={"embedded sentiment task": len(records)},
                            records=len(records))
        return records, report
    if kind == "pairs":
        if field_name or prefix_words:
            raise PrefoptError("--field and --prefix-words apply to --as prompts only")
        return read_pairs(source, encoding_errors=encoding_errors, skip_invalid=skip_invalid)
    return read_prompts(source, field=field_name, prefix_words=prefix_words, seed=seed,
                        encoding_errors=encoding_errors, skip_invalid=skip_invalid)


def inspect_source(source: str, kind: str, tokenizer, *, n_examples: int = 3, encoding_errors: str | None = None,
                   **read) -> Inspection:
    """Read ``source`` as a run would and measure it with ``tokenizer`` (``None``: no token statistics).

    ``encoding_errors=None`` (a look, not a run): strict UTF-8, and if the file has invalid bytes, read them as
    U+FFFD instead and say so in :attr:`Inspection.notes` (a run then needs data.encoding_errors=replace)."""
    from prefopt.models.ops import render_prompt

    notes = []
    try:
        records, report = read_source(source, kind, encoding_errors=encoding_errors or "strict", **read)
    except DataError as e:
        if encoding_errors is not None or "not valid UTF-8" not in str(e):
            raise
        records, report = read_source(source, kind, encoding_errors="replace", **read)
        where = str(e).split(": not valid UTF-8")[0]
        notes.append(f"{where}: invalid UTF-8 (the first bad byte is on that line), read as U+FFFD here; a run needs "
                     "--set data.encoding_errors=replace")
    out = Inspection(kind, report, records, notes=notes)
    if tokenizer is None:
        return out

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    rendered = [render_prompt(r.prompt, tokenizer) for r in records]
    out.lengths["prompt"] = [n_tokens(t) for t in rendered]
    if kind == "pairs":
        out.lengths["chosen"] = [n_tokens(p.chosen) for p in records]
        out.lengths["rejected"] = [n_tokens(p.rejected) for p in records]
    for i, r in enumerate(records[:n_examples]):
        ex = {"prompt": rendered[i]}
        if isinstance(r, PreferencePair):
            ex.update(chosen=r.chosen, rejected=r.rejected)
        out.examples.append(ex)
    return out


def convert_source(source: str, out: str | os.PathLike, kind: str, *, overwrite: bool = False, **read) -> tuple[Path, DropReport]:
    """Write the canonical records of ``source`` to ``out`` (.jsonl or .parquet, by its suffix), atomically."""
    target = Path(out)
    format = target.suffix.lower()[1:]
    if format not in ("jsonl", "parquet"):
        raise PrefoptError(f"{target}: name a .jsonl or .parquet file (canonical records: what load_pairs/"
                           "load_prompts read back unchanged)")
    if target.exists() and not overwrite:
        raise PrefoptError(f"{target}: exists: pass --overwrite to replace it")
    if target.is_dir():
        raise PrefoptError(f"{target}: is a folder: name a file")
    records, report = read_source(source, kind, **read)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        (write_pairs if kind == "pairs" else write_prompts)(tmp, records, format=format)
        os.replace(tmp, target)
    except OSError as e:
        raise PrefoptError(f"{target}: cannot write ({e.strerror or e}): choose a writable path") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target, report


__all__ = ["Inspection", "PromptRecord", "convert_source", "inspect_source", "read_source"]


def synth_pairs(cfg, out: str | os.PathLike, *, overwrite: bool = False, console=None) -> tuple[Path, int, float]:
    """Write the synthetic pairs a run with ``cfg`` would train on (reference samples, gold judge, simulated
    annotators) as canonical JSONL; returns (path, pairs, seconds). Inputs are validated before any compute."""
    import time

    import torch

    from prefopt.models.base import pick_device
    from prefopt.models.shared import SharedBase
    from prefopt.pipeline.bench import Stages, base_model, load_inputs, synthesize_pairs

    target = Path(out)
    if target.suffix.lower() != ".jsonl":
        raise PrefoptError(f"{target}: name a .jsonl file")
    if target.exists() and not overwrite:
        raise PrefoptError(f"{target}: exists: pass --overwrite to replace it")
    if cfg.data.pairs:
        raise PrefoptError("data.pairs is set: synthetic pairs come from the reference policy, unset it")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("")  # the output place is checked before any compute
    except OSError as e:
        raise PrefoptError(f"{target}: cannot write ({e.strerror or e}): choose a writable path") from None
    try:
        inputs = load_inputs(cfg)
        t0 = time.perf_counter()
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        stages = Stages(console)
        with stages.stage("load base"):
            lm, tok = base_model(cfg.model, pick_device(cfg.device))
        shared = SharedBase(lm, tok, cfg.lora)
        with stages.stage("synthetic pairs", total=len(inputs.train) * cfg.data.k) as advance:
            pairs = synthesize_pairs(shared, inputs.judge, inputs.train, cfg, advance)  # no SFT stage here
        write_pairs(tmp, pairs)
        os.replace(tmp, target)
        return target, len(pairs), time.perf_counter() - t0
    finally:
        if tmp.exists():
            tmp.unlink()
