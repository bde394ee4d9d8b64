"""``prefopt``: thin typer commands over library functions.

Every command takes its config the same way: ``--preset`` (a named start), ``--config FILE`` (YAML, TOML or JSON),
then ``--set section.field=value`` overrides (repeatable), validated once before any compute; ``prefopt config``
prints every field with its help text. User errors (any :class:`~prefopt.errors.PrefoptError`: bad input file,
config, model, judge, output folder) print one line and exit 1; usage errors exit 2 (typer's own); Ctrl-C exits
130. Nothing is written for a run that fails; a run killed or interrupted mid-way keeps only its progress
(``<out>.resume``), which the same command continues.
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

if not sys.stderr.isatty():  # libraries' tqdm bars (GGUF loading) flood logs; read by tqdm when first imported
    os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from rich.console import Console

app = typer.Typer(
    help="Compare preference-optimisation algorithms (PPO with a reward model, DPO and relatives) on identical "
    "LoRA bases, one data layer and one gold-judged evaluation harness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

PRESET = typer.Option("default", help="Starting config: 'default' (SmolLM2-135M, sentiment, ~4-6 min on 2 cores), 'full' "
                      "(the same at 4x the work, ~26 min) or 'smoke' (tiny model, seconds).")
CONFIG = typer.Option(None, "--config", help="Config file (YAML, TOML or JSON); `prefopt config --json` writes one.")
SET = typer.Option(None, "--set", help="Override a field: --set ppo.kl_coef=0.1 (repeatable; `prefopt config` lists fields).")
OVERWRITE = typer.Option(False, help="Replace an existing prefopt folder at --out (only after the new one is complete).")


def _fail(msg: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    """One error root, mapped once: a PrefoptError is one line and exit 1; Ctrl-C is exit 130."""
    from prefopt.errors import PrefoptError

    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: noise, not news
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        yield
    except PrefoptError as e:
        _fail(" ".join(str(e).split()))
    except KeyboardInterrupt as e:
        kept = getattr(e, "kept", None)  # a run's progress: the same command continues it
        _fail(f"interrupted: the same command continues from {kept}" if kept else "interrupted: nothing was written", 130)


def _command_line() -> str:
    return "prefopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _load(preset: str, config: Optional[Path], sets: Optional[List[str]]):
    from prefopt.pipeline.config import load_config

    return load_config(preset, str(config) if config else None, tuple(sets or ()))


def _print_result(result) -> None:
    from prefopt.reports import console_table

    if result.out_dir is None:  # a rank > 0 of `accelerate launch -m prefopt ...`: rank 0 reports
        return

    if result.summary:
        out.print(console_table(result.summary))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    hits = f" (from the cache: {', '.join(result.cache_hits)})" if result.cache_hits else ""
    out.print(f"run folder: {result.out_dir}\ntimings: {stages}{hits}", highlight=False, markup=False)


def _train(preset, config, sets, out_dir, overwrite, cache, evaluate: bool, skip_invalid: bool = False) -> None:
    with _user_errors():
        from prefopt.pipeline.bench import run

        cfg = _load(preset, config, [*(sets or ()), *(["data.skip_invalid=true"] if skip_invalid else [])])
        result = run(cfg, out_dir, evaluate_policies=evaluate, cache_dir=cache, console=err, overwrite=overwrite,
                     extra_meta={"command": _command_line()})
    _print_result(result)


OUT = typer.Option(None, "--out", help="Run folder (default runs/bench-<time>).")
SKIP_INVALID = typer.Option(False, "--skip-invalid", help="Drop unusable rows of data files and report each kind "
                            "(count, first lines) in the console and data_report.json, instead of stopping at the first.")
CACHE = typer.Option(None, help="Reuse synthetic pairs and reward models from this folder across runs.")


@app.command()
def bench(preset: str = PRESET, config: Optional[Path] = CONFIG, set_: Optional[List[str]] = SET,
          out_dir: Optional[Path] = OUT, overwrite: bool = OVERWRITE, cache: Optional[Path] = CACHE,
          skip_invalid: bool = SKIP_INVALID) -> None:
    """Run the whole comparison: pairs -> reward model -> every policy -> held-out evaluation -> report."""
    _train(preset, config, set_, out_dir, overwrite, cache, evaluate=True, skip_invalid=skip_invalid)


@app.command()
def train(preset: str = PRESET, config: Optional[Path] = CONFIG, set_: Optional[List[str]] = SET,
          out_dir: Optional[Path] = OUT, overwrite: bool = OVERWRITE, cache: Optional[Path] = CACHE,
          skip_invalid: bool = SKIP_INVALID) -> None:
    """Train every policy and save it (PEFT adapter folders), without the final evaluation (`prefopt eval` does it)."""
    _train(preset, config, set_, out_dir, overwrite, cache, evaluate=False, skip_invalid=skip_invalid)


@app.command("eval")
def eval_(
    runs: List[Path] = typer.Argument(..., help="Run folders written by `prefopt bench` or `prefopt train`."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Change eval.* or judge, e.g. --set eval.max_new_tokens=48."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Result folder (default runs/eval-<time>)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Evaluate saved policies and the reference together: every eval metric and every head-to-head win rate."""
    with _user_errors():
        from prefopt.pipeline.evaluate import evaluate_runs
        from prefopt.reports.tables import head_to_head_markdown

        result = evaluate_runs(runs, out_dir, sets=tuple(set_ or ()), console=err, overwrite=overwrite)
    _print_result(result)
    if any(r["metric"].startswith("eval/win_rate_vs_") and r["metric"] != "eval/win_rate_vs_ref" for r in result.summary):
        out.print("head to head (row vs column, gold win rate, ties half):")
        out.print(head_to_head_markdown(result.summary, []), highlight=False, soft_wrap=True, markup=False)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep file (YAML, TOML or JSON): arms, grids, seeds; see the README."),
    out_dir: Path = typer.Option(..., "--out", help="Sweep folder: cells/, cache/ and the study (sweep.db)."),
    set_: Optional[List[str]] = SET,
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL shared by all workers (default sqlite:///<out>/sweep.db)."),
    heartbeat: int = typer.Option(30, help="Seconds between a worker's heartbeats."),
    grace: Optional[int] = typer.Option(None, help="Seconds without a heartbeat before a cell counts as killed and is re-queued (default 3x heartbeat)."),
) -> None:
    """Run (or continue) a sweep; start it again, or on more machines, to add workers. Ends when every cell is done."""
    with _user_errors():
        from prefopt.pipeline.sweep import load_sweep, run_sweep

        spec = load_sweep(sweep_file, sets=tuple(set_ or ()))
        err.log(f"sweep '{spec.name}': {len(spec.cells)} cells")
        result = run_sweep(spec, out_dir, storage=storage, heartbeat=heartbeat, grace=grace, console=err)
    out.print(f"sweep folder: {result.out_dir} ({len(result.done)} cells complete, {len(result.ran)} run by this worker)\n"
              f"report: prefopt report {result.out_dir}", highlight=False, markup=False)


@app.command()
def report(
    dirs: List[Path] = typer.Argument(..., help="Run folders, eval folders, a sweep folder, or folders holding runs."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the comparison report (default: <DIR>/report "
                                           "for a sweep or a folder of runs; a single run is only printed)."),
    kl: Optional[str] = typer.Option(None, help="KL budgets for the matched-KL table, e.g. 2,5,10 (default: 4 up to the "
                                     "largest KL every algorithm reached)."),
) -> None:
    """Pool runs over seeds: tables, reward–KL frontier, over-optimisation and win-rate plots, matched-KL verdicts."""
    with _user_errors():
        from prefopt.errors import RunError
        from prefopt.reports import console_table
        from prefopt.reports.compare import compare, matched_console, pooled_summary, write_comparison
        from prefopt.reports.run import being_written, find_runs, load_run, read_marker

        budgets = None
        if kl is not None:
            try:
                budgets = sorted({float(x) for x in kl.split(",") if x.strip()})
            except ValueError:
                raise typer.BadParameter(f"expected numbers like 2,5,10, got {kl!r}", param_hint="--kl") from None
        paths, skipped = [], []
        for d in dirs:
            if not d.is_dir():
                raise RunError(f"{d}: no such folder")
            found, incomplete = find_runs(d)
            paths += found
            skipped += incomplete
        running = [p for p in skipped if being_written(p)]
        stale = len(skipped) - len(running)
        skipped_note = ", ".join(x for x in (f"{len(running)} still being written by a running process" if running else "",
                                             f"{stale} incomplete, left by stopped processes" if stale else "") if x)
        if not paths:
            raise RunError(f"no complete prefopt runs under {', '.join(map(str, dirs))}"
                           + (f" ({skipped_note})" if skipped else ""))
        runs = [load_run(p, samples=False) for p in paths]
        unevaluated = [str(r["dir"]) for r in runs if not r["summary"]]
        if unevaluated:
            raise RunError(f"{unevaluated[0]}: trained but not evaluated: run `prefopt eval {unevaluated[0]}` first")
        if skipped:
            err.log(f"skipped {len(skipped)} folder(s) that are not results: {skipped_note}")
        single = len(runs) == 1
        cmp = compare(runs, budgets)
        if single:
            out.print(console_table(runs[0]["summary"], policies=runs[0]["policies"]))
        else:
            out.print(console_table(pooled_summary(cmp.pooled), policies=cmp.variants,
                                    title="Pooled over seeds (mean, ±95% CI; n = seeds)"))
        if cmp.budgets and any(c.policy != "reference" for c in cmp.cells):
            out.print(matched_console(cmp))
        target = out_dir
        if target is None and not (single and read_marker(dirs[0]) is not None and read_marker(dirs[0])["kind"] != "sweep"):
            target = dirs[0] / "report"
        if target is not None:
            write_comparison(cmp, target, command=_command_line())
            out.print(f"report: {target}/report.md", highlight=False, markup=False)
        timings = runs[0]["meta"].get("timings_s", {}) if single else {}
        if timings:
            out.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), highlight=False)


@app.command("config")
def config_(
    preset: str = PRESET,
    config: Optional[Path] = CONFIG,
    set_: Optional[List[str]] = SET,
    as_json: bool = typer.Option(False, "--json", help="Print the resolved config as JSON (a valid --config file)."),
) -> None:
    """Print every config field: its path (for --set and config files), current value and help text."""
    import json
    import textwrap

    from rich.markup import escape

    with _user_errors():
        from prefopt import config as C

        cfg = _load(preset, config, set_)
        if as_json:
            out.print_json(json.dumps(C.to_dict(cfg)))
            return
        width = max(40, min(out.width, 100))
        for doc in C.walk(cfg):
            out.print(f"[bold]{escape(doc.path)}[/] = {escape(json.dumps(doc.value))}  [dim]({escape(doc.type)})[/]",
                      highlight=False, soft_wrap=True)
            for line in textwrap.wrap(doc.help, width=width - 4):
                out.print("    " + escape(line), highlight=False)
        for name, pol in cfg.resolved_policies().items():
            own = {k: v for k, v in cfg.policies[name].items() if k != "backend"}
            out.print(f"[bold]policy {escape(name)}[/]: backend {pol.backend}" + (f", {escape(json.dumps(own))}" if own else ""),
                      highlight=False, soft_wrap=True)


data_app = typer.Typer(help="Inspect a data source as a run will use it; convert it; write synthetic pairs.",
                       no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")

AS = typer.Option("pairs", "--as", help="What the source holds: 'pairs' (preference pairs, any supported shape) or 'prompts'.")
FIELD = typer.Option(None, "--field", help="Prompts: the column holding the prompt (default 'prompt').")
PREFIX = typer.Option(None, "--prefix-words", help="Prompts: the first LO-HI words of the text column, e.g. 2-8 (IMDb task).")
SPLIT_SEED = typer.Option(0, "--seed", help="Prompts: seed of the word-prefix lengths (a run uses data.split_seed, default 0).")
ENC = typer.Option("strict", "--encoding-errors", help="'strict' stops at invalid UTF-8; 'replace' reads it as U+FFFD and reports it.")


def _prefix(text: Optional[str]):
    if text is None:
        return None
    from prefopt import config as C

    return C.coerce(text, tuple[int, int], where="--prefix-words", path="prefix_words")


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="A .jsonl/.json/.csv/.parquet file (optionally .gz/.bz2/.xz) or a hub dataset."),
    as_: str = AS, field: Optional[str] = FIELD, prefix_words: Optional[str] = PREFIX, seed: int = SPLIT_SEED,
    encoding_errors: Optional[str] = typer.Option(None, "--encoding-errors", help="Default: strict, and if the file has "
                                                  "invalid UTF-8, read it as U+FFFD and say so. 'strict' or 'replace' to choose."),
    skip_invalid: bool = SKIP_INVALID,
    model: str = typer.Option("smollm2-135m-instruct", help="Tokenizer for the token lengths and the rendering (no weights are loaded)."),
    examples: int = typer.Option(3, help="Examples to show exactly as the model sees them."),
) -> None:
    """The detected format, counts, dropped rows with reasons, token lengths and examples as the model sees them."""
    from rich.table import Table

    with _user_errors():
        from prefopt.models.base import load_tokenizer
        from prefopt.pipeline.datatools import inspect_source

        ins = inspect_source(source, as_, load_tokenizer(model), n_examples=examples, field_name=field,
                             prefix_words=_prefix(prefix_words), seed=seed, encoding_errors=encoding_errors,
                             skip_invalid=skip_invalid)
    plain = {"highlight": False, "markup": False, "soft_wrap": True}
    for note in ins.notes:
        out.print(f"note: {note}", **plain)
    out.print(f"format: {ins.report.format_line()}", **plain)
    out.print(f"rows: {ins.report.line()}", **plain)
    table = Table(title=f"tokens ({model})", title_justify="left")
    for col in ("part", "n", "min", "p50", "p90", "p99", "max", "mean"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for row in ins.length_table():
        table.add_row(*(str(row[c]) for c in ("part", "n", "min", "p50", "p90", "p99", "max", "mean")))
    out.print(table)
    for i, ex in enumerate(ins.examples, 1):
        out.print(f"--- example {i}: prompt as the model sees it ---", **plain)
        out.print(ex["prompt"], **plain)
        for part in ("chosen", "rejected"):
            if part in ex:
                out.print(f"--- example {i}: {part} ---", **plain)
                out.print(ex[part], **plain)


@data_app.command("convert")
def data_convert(
    source: str = typer.Argument(..., help="Any source `prefopt data inspect` reads."),
    target: Path = typer.Argument(..., help="Output .jsonl or .parquet: canonical records that load back unchanged."),
    as_: str = AS, field: Optional[str] = FIELD, prefix_words: Optional[str] = PREFIX, seed: int = SPLIT_SEED,
    encoding_errors: str = ENC, skip_invalid: bool = SKIP_INVALID, overwrite: bool = OVERWRITE,
) -> None:
    """Write a source's canonical records (pairs or prompts) as JSON lines or parquet (by the suffix)."""
    with _user_errors():
        from prefopt.pipeline.datatools import convert_source

        path, report = convert_source(source, target, as_, overwrite=overwrite, field_name=field,
                                      prefix_words=_prefix(prefix_words), seed=seed,
                                      encoding_errors=encoding_errors, skip_invalid=skip_invalid)
    out.print(f"format: {report.format_line()}\nrows: {report.line()}\nwrote {report.records} {as_} to {path}",
              highlight=False, markup=False, soft_wrap=True)


@data_app.command("synth")
def data_synth(
    target: Path = typer.Argument(..., help="Output .jsonl of synthetic preference pairs."),
    preset: str = PRESET, config: Optional[Path] = CONFIG, set_: Optional[List[str]] = SET, overwrite: bool = OVERWRITE,
) -> None:
    """Write the synthetic pairs a run would train on (reference samples, gold judge, simulated annotators)."""
    with _user_errors():
        from prefopt.pipeline.datatools import synth_pairs

        path, n, secs = synth_pairs(_load(preset, config, set_), target, overwrite=overwrite, console=err)
    out.print(f"wrote {n} pairs to {path} in {secs:.0f}s", highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    from prefopt.__main__ import main as entry  # the allocator re-exec, then app

    entry()


if __name__ == "__main__":
    main()
