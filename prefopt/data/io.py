"""Load preference pairs and prompts from local files or the Hugging Face hub.

Every row is adapted into a :class:`PreferencePair` / :class:`PromptRecord` by one small
function per source format, picked per row from its keys, so mixed files work and a new format
is one more adapter.  Rows are never dropped silently: anything unusable raises a
:class:`DataError` whose message is a single line naming the file, the line (JSONL/CSV, 1-based
physical lines) or row (JSON arrays, parquet, hub; 1-based), the field and what to do.  Only
blank lines of a JSONL file, and empty lines of a CSV file, are skipped: they hold no row.

This module deliberately avoids torch; ``datasets`` and ``pyarrow`` are imported only when a
hub dataset or a parquet file is actually read, to keep ``import prefopt.data`` cheap.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import json
import logging
import lzma
import math
import os
import random
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.records import DataError, Demonstration, Message, PreferencePair, Prompt, PromptRecord

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""Local file types understood by the loaders (matched case-insensitively)."""

TEXT_COLUMNS = ("text", "review", "content", "document")
"""Columns of a text corpus: without a 'prompt' column (and no field given), prompts are their first words."""
DEFAULT_PREFIX_WORDS = (2, 8)
"""The DPO paper's IMDb prompts: the first 2-8 words of a review."""

COMPRESSIONS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}
"""Compressed files (``data.jsonl.gz``, ``train.csv.xz``...) are read whole and decompressed in memory."""

ASSISTANT_MARKER = "\n\nAssistant:"
"""Turn marker of Anthropic-HH-style transcripts; the prompt ends with the last shared one."""
HUMAN_MARKER = "\n\nHuman:"
_HH_TURN = re.compile(r"(\n\nHuman:|\n\nAssistant:)")


def hh_turns(text: str) -> list[Message] | None:
    """An Anthropic-HH prompt ('\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:') as chat turns, ending with
    the user's last message; None if ``text`` is not such a transcript. :func:`hh_text` gives the text back."""
    if not (text.startswith(HUMAN_MARKER) and text.endswith(ASSISTANT_MARKER)):
        return None
    parts = _HH_TURN.split(text[: -len(ASSISTANT_MARKER)])  # ['', marker, content, marker, content, ...]
    turns: list[Message] = []
    for marker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if marker == HUMAN_MARKER else "assistant"
        if turns and turns[-1]["role"] == role or not content.startswith(" "):
            return None  # two turns of one speaker in a row, or no space after the marker: not a clean transcript
        turns.append({"role": role, "content": content[1:]})
    return turns if turns and turns[-1]["role"] == "user" else None


def hh_text(turns: list[Message]) -> str:
    """The HH transcript of chat turns, ready for the assistant's reply (inverse of :func:`hh_turns`)."""
    marker = {"user": HUMAN_MARKER, "assistant": ASSISTANT_MARKER}
    return "".join(f"{marker[t['role']]} {t['content']}" for t in turns) + ASSISTANT_MARKER


def plain_template(turns: list[Message]) -> str:
    """Chat turns for a base model without a chat template (StackLLaMA's 'Question: ...\n\nAnswer: ...' form)."""
    label = {"user": "Question", "assistant": "Answer", "system": "System"}
    body = "\n\n".join(f"{label.get(t['role'], t['role'].title())}: {t['content']}" for t in turns)
    return body + "\n\nAnswer:"

_PAIR_FIELDS = ("prompt", "chosen", "rejected", "margin")
_PAIR_HINT = "each row needs prompt/chosen/rejected (or chosen/rejected sharing a prompt prefix)"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.=-]+)?(@[\w.\[\]:%+-]+)?$")
"""A hub dataset: ``owner/name``, then optionally ``:subset`` (a config name, or ``data_dir=<folder>`` as
Anthropic/hh-rlhf's ``harmless-base``) and ``@split`` (overrides the ``split`` argument)."""
_HTML_TAG = re.compile(r"<[^>]*>")

Row = dict[str, Any]
Located = tuple[str, "Row | DataError"]
"""A row with its location prefix for error messages, e.g. ``"data.jsonl:7"``; a line that could not be parsed
into a row carries its DataError instead, so strict loading stops at the first bad row in file order and lenient
loading can drop it."""


# --------------------------------------------------------------------------- public API


@dataclass
class DropReport:
    """What a lenient load dropped: per kind of problem, how many rows and where the first ones are."""

    source: str
    rows: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # kind -> locations (all of them, in file order)
    formats: dict[str, int] = field(default_factory=dict)  # detected row format -> rows
    notes: dict[str, int] = field(default_factory=dict)  # what a format's rule left out on purpose (e.g. tied answers)
    records: int = 0  # records made (a row of ranked answers gives several pairs)

    def saw(self, fmt: str) -> None:
        self.formats[fmt] = self.formats.get(fmt, 0) + 1

    def note(self, what: str, n: int = 1) -> None:
        if n:
            self.notes[what] = self.notes.get(what, 0) + n

    @property
    def n_dropped(self) -> int:
        return sum(len(v) for v in self.dropped.values())

    @property
    def kept(self) -> int:
        return self.rows - self.n_dropped

    def add(self, loc: str, error: DataError) -> None:
        kind, where = _error_kind(str(error), loc)
        self.dropped.setdefault(kind, []).append(where)

    def format_line(self) -> str:
        """The detected format(s) and what their rules left out, e.g. 'stack-exchange answers (2 rows -> 7 pairs;
        3 tied answer pairs dropped)'."""
        fmts = ", ".join(f"{k} ({v} rows)" for k, v in sorted(self.formats.items(), key=lambda kv: -kv[1]))
        notes = "; ".join(f"{v} {k}" for k, v in self.notes.items())
        return f"{self.source}: {fmts or 'no rows'} -> {self.records} records" + (f"; {notes}" if notes else "")

    def line(self, first: int = 3) -> str:
        """One line for the console: kept/total, then each kind with its count and first locations."""
        if not self.dropped:
            return f"{self.source}: kept all {self.rows} rows"
        kinds = sorted(self.dropped.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        parts = [f"{len(locs)} × {kind} ({', '.join(locs[:first])}{', ...' if len(locs) > first else ''})"
                 for kind, locs in kinds]
        return f"{self.source}: kept {self.kept} of {self.rows} rows, dropped {self.n_dropped}: " + "; ".join(parts)

    def to_dict(self, first: int = 20) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "dropped": self.n_dropped,
                "records": self.records, "formats": dict(self.formats), "notes": dict(self.notes),
                "kinds": [{"kind": k, "count": len(v), "first": v[:first]} for k, v in
                          sorted(self.dropped.items(), key=lambda kv: (-len(kv[1]), kv[0]))]}


def _error_kind(message: str, loc: str) -> tuple[str, str]:
    """(kind, short location) of a row error: the message's first clause without the values that vary."""
    rest = message[len(loc) + 2:] if message.startswith(loc + ": ") else message
    kind = re.split(r": | \(|, got ", rest, maxsplit=1)[0]
    where = loc[len(loc.split(":")[0]) + 1:] if ":" in loc and loc.rsplit(":", 1)[-1].isdigit() else loc
    if where.isdigit():
        where = f"line {where}"
    elif " row " in where:
        where = "row " + where.rsplit(" row ", 1)[1]
    return kind, where


def read_pairs(
    source: str | os.PathLike[str], *, split: str = "train", encoding_errors: str = "strict", skip_invalid: bool = False
) -> tuple[list[PreferencePair], DropReport]:
    """:func:`load_pairs` with the report of what was dropped (``skip_invalid``; empty when strict)."""
    return _adapt(_read_rows(source, split, encoding_errors), _pair_from_row, skip_invalid, source)


def load_pairs(
    source: str | os.PathLike[str], *, split: str = "train", encoding_errors: str = "strict", skip_invalid: bool = False
) -> list[PreferencePair]:
    """Load preference pairs from a .jsonl/.json/.csv/.parquet file (optionally .gz/.bz2/.xz) or a hub dataset name.

    Accepted row shapes (decided per row by its keys):

    * explicit prompt: ``{"prompt", "chosen", "rejected"}`` with strings (TRL standard) or
      message lists (TRL conversational; the responses become the content of the last
      assistant message of ``chosen`` / ``rejected``);
    * implicit prompt: ``{"chosen", "rejected"}`` holding two full Anthropic-HH transcripts or
      two message lists that differ only in the final assistant message.

    An optional numeric ``margin`` becomes :attr:`PreferencePair.margin`; every other column is
    kept in ``meta``.  ``split`` only matters for hub datasets.  Strict (default): the first bad
    row raises its one-line :class:`DataError`. ``skip_invalid``: bad rows are dropped and the
    drop report is logged (use :func:`read_pairs` to get it).
    """
    pairs, report = read_pairs(source, split=split, encoding_errors=encoding_errors, skip_invalid=skip_invalid)
    if report.dropped:
        log.warning(report.line())
    return pairs


def read_prompts(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    field: str | None = None,
    prefix_words: tuple[int, int] | None = None,
    seed: int = 0,
    encoding_errors: str = "strict",
    skip_invalid: bool = False,
) -> tuple[list[PromptRecord], DropReport]:
    """:func:`load_prompts` with the report of what was dropped (``skip_invalid``; empty when strict)."""
    if prefix_words is not None:
        lo, hi = prefix_words
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"prefix_words must be (lo, hi) with 1 <= lo <= hi, got {prefix_words!r}")
    rows = _read_rows(source, split, encoding_errors)
    name = field or "prompt"
    if field is None and prefix_words is None:  # a text corpus (IMDb reviews...): detected by its columns
        first = next((row for _, row in rows if isinstance(row, dict)), {})
        corpus = next((c for c in TEXT_COLUMNS if c in first), None)
        if "prompt" not in first and corpus is not None:
            name, prefix_words = corpus, DEFAULT_PREFIX_WORDS
    rng = random.Random(seed)
    fmt = f"text prefixes of '{name}' ({prefix_words[0]}-{prefix_words[1]} words)" if prefix_words else f"prompts in '{name}'"

    def adapt(row: Row, loc: str, report: DropReport) -> list[PromptRecord]:
        if row.get(name) is None:
            columns = ", ".join(str(key) for key in row) or "none"
            raise DataError(
                f"{loc}: field '{name}' is missing (columns: {columns}): "
                "name the column that holds the prompt with `field`"
            )
        meta = {key: value for key, value in row.items() if key != name}
        if isinstance(meta.get("meta"), dict):  # written by write_prompts
            meta.update(meta.pop("meta"))
        if prefix_words is None:
            prompt: Prompt = _prompt(row[name], name, loc)
        else:
            prompt = _text_prefix(row[name], name, loc, prefix_words, rng)
        report.saw(fmt)
        return [PromptRecord(prompt=prompt, meta=meta)]

    return _adapt(rows, adapt, skip_invalid, source)


def load_prompts(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    field: str | None = None,
    prefix_words: tuple[int, int] | None = None,
    seed: int = 0,
    encoding_errors: str = "strict",
    skip_invalid: bool = False,
) -> list[PromptRecord]:
    """Load prompts from a file or hub dataset (same sources as :func:`load_pairs`).

    The prompt is read from column ``field`` (default ``"prompt"``).  With
    ``prefix_words=(lo, hi)`` the column is treated as a text corpus instead, as in the DPO
    paper's IMDb task: HTML tags are stripped, whitespace collapsed, and the prompt is the first
    ``n`` words with ``n ~ Uniform{lo..hi}`` drawn from one ``random.Random(seed)`` per row in
    file order, so the same seed always yields the same prompts.  Other columns go to ``meta``.  Without ``field``
    and ``prefix_words``, a source with no ``prompt`` column but a text column (``text``, ``review``, ``content``,
    ``document``) is read as a corpus: the first 2-8 words of that column (the detected format says so).
    """
    prompts, report = read_prompts(source, split=split, field=field, prefix_words=prefix_words, seed=seed,
                                   encoding_errors=encoding_errors, skip_invalid=skip_invalid)
    if report.dropped:
        log.warning(report.line())
    return prompts


def read_demos(
    source: str | os.PathLike[str], *, split: str = "train", encoding_errors: str = "strict", skip_invalid: bool = False,
    prefix_words: tuple[int, int] = DEFAULT_PREFIX_WORDS, seed: int = 0, max_words: int = 48,
) -> tuple[list[Demonstration], DropReport]:
    """Demonstrations for the SFT stage, detected per row: ``messages`` (a conversation whose last message is
    the assistant's reply), ``prompt`` + ``completion`` (TRL prompt-completion, text or messages), ``prompt`` +
    ``response``, preference pairs (their ``chosen`` response), Stack Exchange ``question`` + ``answers`` (the best
    answer by the StackLLaMA score), or a text corpus (a ``text``/``review``/... column and nothing else that
    names a prompt: the first ``prefix_words`` words are the prompt, exactly as :func:`read_prompts` cuts them with
    the same ``seed``, and the next ``max_words`` words the response — the DPO paper's SFT on IMDb reviews)."""
    rows = _read_rows(source, split, encoding_errors)
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    corpus = next((c for c in TEXT_COLUMNS if c in first), None)
    if corpus is not None and not {"messages", "prompt", "chosen", "question"} & set(first):
        rng = random.Random(seed)

        def adapt(row: Row, loc: str, report: DropReport) -> list[Demonstration]:
            report.saw(f"text corpus '{corpus}' ({prefix_words[0]}-{prefix_words[1]} words, then up to {max_words})")
            _require(row, corpus, loc)
            if not isinstance(row[corpus], str):
                raise DataError(f"{loc}: field '{corpus}' must be a string, got {type(row[corpus]).__name__}")
            words = clean_text(row[corpus]).split(" ")
            n = rng.randint(*prefix_words)
            if len(words) <= n:
                raise DataError(f"{loc}: field '{corpus}' has {len(words)} words: nothing is left to imitate after "
                                f"the prompt's {n}")
            meta = {k: v for k, v in row.items() if k != corpus}
            return [Demonstration(" ".join(words[:n]), " " + " ".join(words[n : n + max_words]),
                                  {**meta, "response_eos": len(words) <= n + max_words})]

        return _adapt(rows, adapt, skip_invalid, source)
    return _adapt(rows, _demo_from_row, skip_invalid, source)


def _demo_from_row(row: Row, loc: str, report: DropReport) -> list[Demonstration]:
    if "answers" in row and "chosen" not in row:
        report.saw("stack-exchange answers (the best one)")
        pairs = _answer_pairs(row, loc, DropReport(""))
        if not pairs:
            raise DataError(f"{loc}: field 'answers' has no answer scored above another: no best answer to imitate")
        best = pairs[0]  # the largest score gap first: its chosen answer has the top score
        return [Demonstration(best.prompt, best.chosen, {k: v for k, v in best.meta.items() if k != "rejected_score"})]
    if "messages" in row:
        report.saw("conversational messages")
        msgs = _messages(row["messages"] or [], "messages", loc)
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise DataError(f"{loc}: field 'messages' must end with an assistant reply after the prompt's turns")
        prompt: Prompt = msgs[:-1]
        response = msgs[-1]["content"]
    elif "completion" in row or "response" in row:
        name = "completion" if "completion" in row else "response"
        report.saw(f"prompt-{name}")
        _require(row, "prompt", loc)
        prompt, response = _prompt(row["prompt"], "prompt", loc), _response(row[name], name, loc)
    elif "chosen" in row:
        report.saw("pairs (their chosen responses)")
        pair = _pair_from_row(row, loc, DropReport(""))[0]
        prompt, response = pair.prompt, pair.chosen
    else:
        columns = ", ".join(map(str, row)) or "none"
        raise DataError(f"{loc}: not a demonstration (columns: {columns}): give 'messages', 'prompt' + 'completion' "
                        "(or 'response'), or preference pairs")
    if not response.strip():
        raise DataError(f"{loc}: the response is empty: a demonstration needs a response to imitate")
    meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion", "response", "chosen", "rejected")}
    return [Demonstration(prompt, response, meta)]


def _adapt(rows: list[Located], adapter, skip_invalid: bool, source) -> tuple[list, DropReport]:
    """Adapt rows in file order. Strict: the first bad row (unparseable or unusable) raises. Lenient: it is
    dropped and counted; a source with no usable row at all still raises."""
    report = DropReport(os.fspath(source), rows=len(rows))
    out = []
    for loc, row in rows:
        try:
            if isinstance(row, DataError):  # a line that could not be parsed into a row
                raise row
            out += adapter(row, loc, report)
        except DataError as exc:
            if not skip_invalid:
                raise
            report.add(loc, exc)
    if not out:
        if report.notes and not report.dropped:
            raise DataError(f"{report.format_line()}: no record is left: check the rows")
        raise DataError(f"{report.line()}: no usable row is left: fix the file")
    report.records = len(out)
    return out, report


def pair_to_row(pair: PreferencePair) -> Row:
    """The JSON row :func:`load_pairs` reads back into an equal pair (TRL standard fields + ``margin`` + ``meta``)."""
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "margin": pair.margin,
            "meta": dict(pair.meta)}


def write_pairs(path: str | os.PathLike[str], pairs: Iterable[PreferencePair], *, format: str = "jsonl") -> Path:
    """Write pairs as JSON lines (or ``format="parquet"``) that :func:`load_pairs` turns back into exactly these
    pairs."""
    return _write_rows(Path(path), (pair_to_row(pair) for pair in pairs), format)


def write_prompts(path: str | os.PathLike[str], prompts: Iterable[PromptRecord], *, format: str = "jsonl") -> Path:
    """Write prompt records (``prompt`` + ``meta``) as JSON lines or parquet that :func:`load_prompts` reads back."""
    return _write_rows(Path(path), ({"prompt": r.prompt, "meta": dict(r.meta)} for r in prompts), format)


PARQUET_KEY = b"prefopt"
"""Schema metadata of a parquet file prefopt wrote: which columns hold JSON text (read back decoded)."""


def _write_rows(out: Path, rows: Iterable[Row], format: str) -> Path:
    if format == "jsonl":
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        return out
    if format != "parquet":
        raise ValueError(f"format must be 'jsonl' or 'parquet', got {format!r}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(rows)
    # ``meta`` differs in keys from row to row and a prompt may be a conversation: a parquet column needs one
    # type, so both travel as JSON text, named in the schema metadata so the reader restores them exactly.
    json_columns = ["meta"] + (["prompt"] if any(not isinstance(r["prompt"], str) for r in rows) else [])
    columns = {key: [json.dumps(r[key], ensure_ascii=False, allow_nan=False) if key in json_columns else r[key]
                     for r in rows] for key in (rows[0] if rows else {"prompt": None, "meta": None})}
    table = pa.table(columns).replace_schema_metadata({PARQUET_KEY: json.dumps({"json_columns": json_columns})})
    pq.write_table(table, out)
    return out


# --------------------------------------------------------------------------- sources


def _read_rows(source: str | os.PathLike[str], split: str, encoding_errors: str = "strict") -> list[Located]:
    """Read all rows of ``source`` with their location labels; never returns an empty list."""
    label = os.fspath(source)
    path = _local_path(source)
    if path is None:
        name, subset, split = parse_hub_name(label, split)
        rows = _hub_rows(name, subset, split, label)
        where = f"dataset '{label}' (split '{split}')"
    else:
        suffix = _data_suffix(path)
        raw = _read_bytes(path, label)
        if suffix == ".parquet":
            rows = _parquet_rows(raw, label)
        else:
            text = _decode_text(raw, label, encoding_errors)
            if suffix == ".csv":
                rows = _csv_rows(text, label)
            elif suffix == ".json" and text.lstrip().startswith("["):
                rows = _json_array_rows(text, label)
            else:  # .jsonl, or a .json file holding JSON lines
                rows = _jsonl_rows(text, label)
        where = label
    if not rows:
        raise DataError(f"{where}: no rows: the source is empty, add at least one row")
    return rows


def _local_path(source: str | os.PathLike[str]) -> Path | None:
    """Return the file to read, or ``None`` when ``source`` names a hub dataset.

    Anything that is not an existing path is a hub name unless it *looks* like a path (a known
    suffix, a leading ``.``/``/``/``~``, a backslash or more than one ``/``): hub ids are
    ``name`` or ``owner/name``, so a mistyped local path gets "file not found" instead of a
    confusing hub error.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(f"{text}: is a directory: pass a .jsonl/.json/.csv/.parquet file")
        if _data_suffix(path) not in SUFFIXES:
            raise DataError(
                f"{text}: unsupported file type '{_shown_suffix(path)}': use .jsonl, .json, "
                ".csv or .parquet, optionally compressed (.gz, .bz2, .xz)"
            )
        return path
    looks_like_path = (
        not isinstance(source, str)
        or _data_suffix(path) in SUFFIXES
        or path.suffix.lower() in COMPRESSIONS
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or not _HUB_ID.match(text)
    )
    if looks_like_path:
        raise DataError(f"{text}: file not found: check the path (supported: .jsonl, .json, .csv, .parquet, "
                        "optionally .gz/.bz2/.xz)")
    return None


def parse_hub_name(spec: str, split: str = "train") -> tuple[str, str | None, str]:
    """``owner/name[:subset][@split]`` -> (name, subset, split); ``split`` is the default when none is given."""
    rest, at, named_split = spec.partition("@")
    name, colon, subset = rest.partition(":")
    return name, (subset or None), (named_split if at else split)


def _hub_rows(name: str, subset: str | None, split: str, label: str) -> list[Located]:
    """Load a hub dataset; every failure (offline, unknown name, bad split) becomes a DataError."""
    try:
        import datasets

        if subset is None:
            dataset = datasets.load_dataset(name, split=split)
        elif subset.startswith("data_dir="):
            dataset = datasets.load_dataset(name, data_dir=subset.split("=", 1)[1], split=split)
        else:
            dataset = datasets.load_dataset(name, subset, split=split)
        return [(f"{label} row {i}", dict(row)) for i, row in enumerate(dataset, 1)]
    except Exception as exc:  # any hub failure has the same remedy
        raise DataError(
            f"could not load dataset '{label}' from the hub ({_one_line(exc)}): "
            "pass a local .jsonl/.csv/.parquet file instead"
        ) from exc


ENCODING_ERRORS = ("strict", "replace")
log = logging.getLogger("prefopt.data")


def _data_suffix(path: Path) -> str:
    """The data format's suffix, under a compression suffix if there is one: 'a.jsonl.gz' -> '.jsonl'."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _shown_suffix(path: Path) -> str:
    compressed = path.suffix.lower() in COMPRESSIONS and len(path.suffixes) > 1
    return "".join(path.suffixes[-2:]) if compressed else (path.suffix or path.name)


def _read_bytes(path: Path, label: str) -> bytes:
    """The file's bytes, decompressed when it ends in .gz/.bz2/.xz (a truncated or corrupt archive is one line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{label}: cannot read the file ({exc.strerror or exc}): check its permissions") from None
    decompress = COMPRESSIONS.get(path.suffix.lower())
    if decompress is None:
        return raw
    try:
        return decompress(raw)
    except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise DataError(
            f"{label}: not a complete {path.suffix.lower()[1:]} archive ({_one_line(exc)}): the file is truncated or "
            "corrupt; download or compress it again"
        ) from None


def _decode_text(raw: bytes, label: str, errors: str = "strict") -> str:
    """Decode UTF-8 (a leading BOM, as Excel writes, is dropped).

    ``errors="strict"`` refuses invalid UTF-8 with the line of the first bad byte; ``"replace"`` turns each invalid
    byte sequence into U+FFFD and logs how many and on which lines (nothing is dropped silently).
    """
    if errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {ENCODING_ERRORS}, got {errors!r}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{label}: the file is UTF-16 (it starts with a UTF-16 byte-order mark): re-save it as "
                            "UTF-8") from None
        if errors == "strict":
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{label}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start}): re-save the file as UTF-8, "
                "or set data.encoding_errors=replace to read bad bytes as U+FFFD"
            ) from None
    text = raw.decode("utf-8-sig", errors="replace")
    lines = [i + 1 for i, line in enumerate(text.split("\n")) if "\ufffd" in line]
    count = text.count("\ufffd") - raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
    shown = ", ".join(map(str, lines[:8])) + (" ..." if len(lines) > 8 else "")
    log.warning(f"{label}: {count} invalid UTF-8 byte sequence(s) read as U+FFFD on {len(lines)} line(s): {shown}")
    return text


def _jsonl_rows(text: str, label: str) -> list[Located]:
    """Parse JSON lines; labels carry the 1-based physical line number."""
    rows: list[Located] = []
    # StringIO splits on "\n" only, unlike str.splitlines(), which would also split inside JSON
    # strings holding U+2028 and shift every later line number.
    for lineno, line in enumerate(io.StringIO(text), 1):
        if not line.strip():
            continue
        loc = f"{label}:{lineno}"
        try:
            rows.append((loc, _as_object(json.loads(line), loc)))
        except json.JSONDecodeError as exc:
            rows.append((loc, DataError(f"{loc}: invalid JSON ({exc.msg} at column {exc.colno}): fix or remove the line")))
        except DataError as exc:
            rows.append((loc, exc))
    return rows


def _json_array_rows(text: str, label: str) -> list[Located]:
    """Parse a ``.json`` file holding one array of objects; labels are 1-based item numbers."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{label}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}): fix the file"
        ) from exc
    if not isinstance(items, list):
        raise DataError(f"{label}: expected a JSON array of objects or JSON lines, got {type(items).__name__}")
    rows: list[Located] = []
    for i, obj in enumerate(items, 1):
        loc = f"{label} row {i}"
        try:
            rows.append((loc, _as_object(obj, loc)))
        except DataError as exc:
            rows.append((loc, exc))
    return rows


def _as_object(obj: Any, loc: str) -> Row:
    if not isinstance(obj, dict):
        raise DataError(f"{loc}: expected a JSON object with named fields, got {type(obj).__name__}")
    return obj


def _csv_rows(text: str, label: str) -> list[Located]:
    """Parse CSV with a header; labels carry the physical line where each record starts.

    All cells are text, so an empty ``margin`` cell means "no margin" and a numeric one is
    converted here; a row with a different number of cells than the header is an error rather
    than being padded or truncated.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Located] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{label}:{start}: malformed CSV ({_one_line(exc)}): fix the quoting") from exc
        if not cells:
            continue
        if header is None:
            header = cells
            if len(cells) == 1:
                sep = next((c for c in (";", "\t", "|") if c in cells[0]), None)
                if sep is not None:
                    raise DataError(f"{label}:{start}: the header is one column {_short(cells[0])}: the file looks "
                                    f"{sep!r}-separated; save it comma-separated")
            continue
        loc = f"{label}:{start}"
        if len(cells) != len(header):
            rows.append((loc, DataError(
                f"{loc}: row has {len(cells)} cells but the header has {len(header)} "
                f"({', '.join(header)}): fix the quoting or the row"
            )))
            continue
        row: Row = dict(zip(header, cells, strict=True))
        if "margin" in row:
            row["margin"] = _csv_number(row["margin"])
        rows.append((loc, row))
    return rows


def _csv_number(cell: str) -> float | str | None:
    """Convert a CSV cell to a float; an empty cell is ``None``, anything else stays for errors."""
    if not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return cell


def _parquet_rows(raw: bytes, label: str) -> list[Located]:
    """Read a parquet file into plain Python rows (``to_pylist`` avoids numpy scalars/arrays)."""
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # corrupt file, wrong format, missing pyarrow
        raise DataError(f"{label}: could not read parquet ({_one_line(exc)}): check the file") from exc
    rows = table.to_pylist()
    written = (table.schema.metadata or {}).get(PARQUET_KEY)
    if written:  # written by prefopt (write_pairs/write_prompts): restore its JSON columns
        json_columns = json.loads(written)["json_columns"]
        for i, row in enumerate(rows, 1):
            for key in json_columns:
                try:
                    row[key] = json.loads(row[key])
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{label} row {i}, field '{key}': not the JSON text prefopt wrote "
                                    f"({_one_line(exc)}): rewrite the file with prefopt data convert") from None
    return [(f"{label} row {i}", row) for i, row in enumerate(rows, 1)]


# --------------------------------------------------------------------------- pair adapters


MAX_PAIRS_PER_QUESTION = 10
"""StackLLaMA: at most ten pairs of answers per question."""


def _pair_from_row(row: Row, loc: str, report: DropReport) -> list[PreferencePair]:
    """Pick the adapter for one row from its keys (the format is counted in the report)."""
    if "answers" in row and "chosen" not in row:
        report.saw("stack-exchange answers")
        return _answer_pairs(row, loc, report)
    if "responses" in row and "chosen" not in row:
        report.saw("ranked responses")
        return _ranked_pairs(row, loc, report)
    if "prompt" in row:
        report.saw("trl conversational" if isinstance(row.get("chosen"), list) else "trl standard")
        return [_explicit_pair(row, loc)]
    report.saw("conversational, implicit prompt" if isinstance(row.get("chosen"), list) else "hh transcripts")
    return [_implicit_pair(row, loc)]


def stack_exchange_score(upvotes: int, accepted: bool) -> int:
    """The StackLLaMA rule (Beeching et al. 2023, after Askell et al. 2021): round(log2(1 + upvotes)), +1 if the
    answer was accepted; -1 for an answer with negative votes."""
    if upvotes < 0:
        return -1
    return round(math.log2(1 + upvotes)) + (1 if accepted else 0)


def _ranked(scored: list[tuple[str, float]], prompt: Prompt, row: Row, loc: str, report: DropReport,
            limit: int | None) -> list[PreferencePair]:
    """Pairs (higher score chosen) from responses with scores: the largest gaps first, ties dropped and counted,
    identical texts never paired, at most ``limit`` pairs."""
    candidates, ties = [], 0
    for i in range(len(scored)):
        for j in range(i + 1, len(scored)):
            (a, sa), (b, sb) = scored[i], scored[j]
            if a == b:
                continue
            if sa == sb:
                ties += 1
                continue
            hi, lo = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
            candidates.append((-(hi[1] - lo[1]), i, j, hi, lo))
    candidates.sort(key=lambda c: c[:3])
    kept = candidates if limit is None else candidates[:limit]
    report.note("tied pairs dropped", ties)
    report.note(f"pairs over the limit of {limit} per prompt dropped", len(candidates) - len(kept))
    meta = {k: v for k, v in row.items() if k not in ("prompt", "question", "answers", "responses", "scores", "ranks")}
    return [_make_pair(prompt, hi[0], lo[0], {**meta, "chosen_score": hi[1], "rejected_score": lo[1]}, loc)
            for _, _, _, hi, lo in kept]


def _answer_pairs(row: Row, loc: str, report: DropReport) -> list[PreferencePair]:
    """A question with scored answers (Stack Exchange): each answer is scored by the StackLLaMA rule from
    ``upvotes`` (or ``score``) and ``accepted`` (or ``selected``), or carries ``pm_score`` already."""
    key = "question" if "question" in row else "prompt"
    _require(row, key, loc)
    prompt = _prompt(row[key], key, loc)
    answers = row["answers"]
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{loc}: field 'answers' must be a non-empty list of answers, got {_short(answers)}")
    scored = []
    for i, ans in enumerate(answers, 1):
        where = f"field 'answers' item {i}"
        if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) or not ans["text"].strip():
            raise DataError(f"{loc}: {where} needs a non-empty 'text', got {_short(ans)}")
        if "pm_score" in ans:
            score = ans["pm_score"]
        else:
            votes = ans.get("upvotes", ans.get("score"))
            if isinstance(votes, bool) or not isinstance(votes, (int, float)) or not math.isfinite(votes):
                raise DataError(f"{loc}: {where} needs numeric 'upvotes' (or 'score') or a 'pm_score', got "
                                f"{_short(votes)}")
            accepted = ans.get("accepted", ans.get("selected", False))
            if not isinstance(accepted, bool):
                raise DataError(f"{loc}: {where} field 'accepted' must be true or false, got {_short(accepted)}")
            score = stack_exchange_score(int(votes), accepted)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise DataError(f"{loc}: {where} field 'pm_score' must be a finite number, got {_short(score)}")
        scored.append((ans["text"], float(score)))
    return _ranked(scored, prompt, row, loc, report, MAX_PAIRS_PER_QUESTION)


def _ranked_pairs(row: Row, loc: str, report: DropReport) -> list[PreferencePair]:
    """k responses with ``scores`` (higher is better) or ``ranks`` (1 is best) -> every pair that differs."""
    _require(row, "prompt", loc)
    prompt = _prompt(row["prompt"], "prompt", loc)
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) and r.strip() for r in responses):
        raise DataError(f"{loc}: field 'responses' must be a list of 2 or more non-empty strings, got {_short(responses)}")
    key = "scores" if "scores" in row else "ranks" if "ranks" in row else None
    if key is None:
        raise DataError(f"{loc}: field 'scores' (or 'ranks') is missing: ranked responses need one per response")
    values = row[key]
    if (not isinstance(values, list) or len(values) != len(responses)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise DataError(f"{loc}: field '{key}' must be {len(responses)} finite numbers (one per response), got "
                        f"{_short(values)}")
    scores = [float(v) if key == "scores" else -float(v) for v in values]  # rank 1 is the best
    return _ranked(list(zip(responses, scores)), prompt, row, loc, report, None)


def _explicit_pair(row: Row, loc: str) -> PreferencePair:
    """TRL standard (strings) or conversational (message lists) rows with a ``prompt`` field."""
    for name in ("prompt", "chosen", "rejected"):
        _require(row, name, loc)
    prompt = _prompt(row["prompt"], "prompt", loc)
    chosen = _response(row["chosen"], "chosen", loc)
    rejected = _response(row["rejected"], "rejected", loc)
    return _make_pair(prompt, chosen, rejected, row, loc)


def _implicit_pair(row: Row, loc: str) -> PreferencePair:
    """Rows whose prompt is the shared beginning of ``chosen`` and ``rejected``."""
    for name in ("chosen", "rejected"):
        _require(row, name, loc)
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen_text, rejected_text = _split_transcripts(chosen, rejected, loc)
        return _make_pair(prompt, chosen_text, rejected_text, row, loc)
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt_msgs, chosen_text, rejected_text = _split_conversations(chosen, rejected, loc)
        return _make_pair(prompt_msgs, chosen_text, rejected_text, row, loc)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise _type_error(name, value, loc)
    raise DataError(
        f"{loc}: fields 'chosen' and 'rejected' must both be strings or both message lists: "
        "make them the same kind"
    )


def _split_transcripts(chosen: str, rejected: str, loc: str) -> tuple[str, str, str]:
    """Split two Anthropic-HH transcripts at the last assistant marker they share."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(
            f"{loc}: fields 'chosen' and 'rejected' share no prompt prefix ending in "
            "'\\n\\nAssistant:': add an explicit 'prompt' field"
        )
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:].lstrip(), rejected[end:].lstrip()


def _split_conversations(chosen: list, rejected: list, loc: str) -> tuple[list[Message], str, str]:
    """Split two message lists that must differ only in their final assistant message."""
    chosen_msgs = _messages(chosen, "chosen", loc)
    rejected_msgs = _messages(rejected, "rejected", loc)
    for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{loc}: field '{name}' must end with an assistant message: fix the row")
    prompt = chosen_msgs[:-1]
    if not prompt or prompt != rejected_msgs[:-1]:
        raise DataError(
            f"{loc}: fields 'chosen' and 'rejected' must be the same non-empty conversation except "
            "for the final assistant message: add an explicit 'prompt' field"
        )
    return prompt, chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]


def _make_pair(prompt: Prompt, chosen: str, rejected: str, row: Row, loc: str) -> PreferencePair:
    """Final checks shared by all adapters, then build the pair with margin and meta."""
    meta = {key: value for key, value in row.items() if key not in _PAIR_FIELDS}
    if isinstance(meta.get("meta"), dict):  # a file prefopt wrote (write_pairs): its meta nests under "meta"
        nested = meta.pop("meta")
        meta.update(nested)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        # a blank response is data only when the row records how the sampler ended it (synthetic pairs carry
        # '<name>_eos'); elsewhere it is a broken row
        if not text.strip() and not isinstance(meta.get(f"{name}_eos"), bool):
            raise DataError(f"{loc}: field '{name}' is empty: every pair needs two non-empty responses "
                            f"(a sampled blank response needs '{name}_eos': true/false)")
    if chosen == rejected:
        raise DataError(
            f"{loc}: fields 'chosen' and 'rejected' are identical: a pair needs two different responses"
        )
    return PreferencePair(prompt, chosen, rejected, margin=_margin(row, loc), meta=meta)


def _margin(row: Row, loc: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(
            f"{loc}: field 'margin' must be a finite number, got {_short(value)}: fix or remove it"
        )
    return float(value)


# --------------------------------------------------------------------------- field helpers


def _require(row: Row, name: str, loc: str) -> None:
    if row.get(name) is None:
        raise DataError(f"{loc}: field '{name}' is missing: {_PAIR_HINT}")


def _type_error(name: str, value: Any, loc: str) -> DataError:
    return DataError(
        f"{loc}: field '{name}' must be a string or a list of messages, got {type(value).__name__}"
    )


def _prompt(value: Any, name: str, loc: str) -> Prompt:
    """A prompt: non-empty text or a non-empty message list."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{loc}: field '{name}' is empty: every row needs a prompt")
        return value
    if isinstance(value, list):
        return _messages(value, name, loc)
    raise _type_error(name, value, loc)


def _response(value: Any, name: str, loc: str) -> str:
    """A response: the text itself, or the content of the last assistant message of a list."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _type_error(name, value, loc)
    for message in reversed(_messages(value, name, loc)):
        if message["role"] == "assistant":
            return message["content"]
    raise DataError(f"{loc}: field '{name}' has no assistant message: add the response as one")


def _messages(value: Iterable[Any], name: str, loc: str) -> list[Message]:
    """Validate a message list and keep only ``role``/``content`` (stable prompt keys)."""
    messages: list[Message] = []
    for i, message in enumerate(value, 1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{loc}: field '{name}' message {i} must be an object with string 'role' and "
                f"'content', got {_short(message)}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if not messages:
        raise DataError(f"{loc}: field '{name}' is empty: it needs at least one message")
    return messages


def _text_prefix(value: Any, name: str, loc: str, prefix_words: tuple[int, int], rng: random.Random) -> str:
    """The first n words (n drawn from ``rng``) of a cleaned-up text such as an IMDb review."""
    if not isinstance(value, str):
        raise DataError(
            f"{loc}: field '{name}' must be a string to cut word prefixes from, got {type(value).__name__}"
        )
    words = clean_text(value).split(" ")
    if words == [""]:
        raise DataError(
            f"{loc}: field '{name}' is empty (no words after removing HTML): fix or remove the row"
        )
    n = rng.randint(*prefix_words)
    return " ".join(words[:n])


def clean_text(text: str) -> str:
    """Strip HTML tags (IMDb reviews contain ``<br />``), unescape entities, collapse whitespace."""
    return " ".join(html.unescape(_HTML_TAG.sub(" ", text)).split())


def _short(value: Any, limit: int = 60) -> str:
    """A one-line, bounded repr for error messages (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """Condense an exception to one bounded line so wrapped errors keep DataError's contract."""
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
