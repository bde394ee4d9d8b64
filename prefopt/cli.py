"""``prefopt``: thin typer commands over library functions.

User errors (bad input file, unknown model, bad option value) print one line and exit 1; usage errors exit 2
(typer's own). Nothing is written for a run that fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Compare preference-optimisation algorithms (PPO with a reward model vs DPO) on identical LoRA bases, "
    "one data layer and one gold-judged evaluation harness.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(x) for x in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise typer.BadParameter(f"expected N or LO-HI, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise typer.BadParameter(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


@app.command()
def bench(
    preset: str = typer.Option("default", help="Starting config: 'default' (SmolLM2-135M, < 20 min on 2 CPU cores) or 'smoke' (tiny model, < 1 min)."),
    model: Optional[str] = typer.Option(None, help="Base model: 'smollm2-135m-instruct', 'tiny', a hub id, a local dir or a .gguf file."),
    prompts: Optional[str] = typer.Option(None, help="Prompts: 'embedded:sentiment', a .jsonl/.csv/.parquet file, or a hub dataset name."),
    prompt_field: Optional[str] = typer.Option(None, help="Column holding the prompt (default 'prompt')."),
    prefix_words: Optional[str] = typer.Option(None, help="Use the first LO-HI words of --prompt-field's text as the prompt (e.g. 2-8 for IMDb reviews)."),
    pairs: Optional[str] = typer.Option(None, help="Preference pairs (file or hub dataset) instead of synthetic pairs."),
    judge: Optional[str] = typer.Option(None, help="Gold judge: 'vader', 'hf:<model>' or 'py:module:function'."),
    algorithms: Optional[str] = typer.Option(None, help="Comma-separated subset of: ppo,dpo."),
    n_eval: Optional[int] = typer.Option(None, help="Held-out evaluation prompts."),
    n_train: Optional[int] = typer.Option(None, help="Training prompts (synthetic pairs and PPO)."),
    k: Optional[int] = typer.Option(None, help="Responses per prompt for synthetic pairs."),
    ppo_steps: Optional[int] = typer.Option(None, help="PPO iterations."),
    rm_epochs: Optional[int] = typer.Option(None, help="Reward-model epochs over the pairs."),
    dpo_epochs: Optional[int] = typer.Option(None, help="DPO epochs over the pairs."),
    dpo_beta: Optional[float] = typer.Option(None, help="DPO beta."),
    kl_coef: Optional[float] = typer.Option(None, help="PPO KL penalty coefficient."),
    kl_target: Optional[float] = typer.Option(None, help="PPO adaptive KL controller target (sequence KL in nats)."),
    ppo_reward: Optional[str] = typer.Option(None, help="PPO's reward: 'rm', 'gold' (PPO-GT), 'hf:<classifier>', 'py:module:function'."),
    seed: Optional[int] = typer.Option(None, help="Master seed."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/bench-<time>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder (only after the new run succeeded)."),
) -> None:
    """Run the whole comparison: pairs -> reward model -> PPO, DPO -> held-out evaluation -> report."""
    import warnings

    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: noise, not news
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from prefopt.bench import PRESETS, run_bench
    from prefopt.bench import preset as make_preset
    from prefopt.data.records import DataError
    from prefopt.models.base import ModelError

    try:
        if preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="--preset")
        cfg = make_preset(preset)
        d = cfg.data
        overrides = [
            (cfg, "model", model), (cfg, "judge", judge), (cfg, "seed", seed), (cfg, "threads", threads),
            (cfg, "device", device), (d, "prompts", prompts), (d, "prompt_field", prompt_field),
            (d, "prefix_words", _parse_range(prefix_words)), (d, "pairs", pairs), (d, "n_eval", n_eval),
            (d, "n_train", n_train), (d, "k", k), (cfg.ppo, "steps", ppo_steps), (cfg.rm, "epochs", rm_epochs),
            (cfg.dpo, "epochs", dpo_epochs), (cfg.dpo, "beta", dpo_beta), (cfg.ppo, "kl_coef", kl_coef),
            (cfg.ppo, "kl_target", kl_target), (cfg, "ppo_reward", ppo_reward),
        ]
        for obj, name, value in overrides:
            if value is not None:
                setattr(obj, name, value)
        if algorithms is not None:
            cfg.algorithms = tuple(a.strip() for a in algorithms.split(",") if a.strip())
        # re-run every config's validation after the overrides
        for c in (cfg, cfg.data, cfg.data.annotator, cfg.lora, cfg.rm, cfg.ppo, cfg.dpo):
            if hasattr(c, "__post_init__"):
                c.__post_init__()
        if seed is not None:  # one master seed drives every stage
            for c in (cfg.rm, cfg.ppo, cfg.dpo):
                c.seed = seed
    except ValueError as e:
        if isinstance(e, typer.BadParameter):
            raise
        _fail(str(e))

    try:
        result = run_bench(cfg, out_dir, console=err, overwrite=overwrite)
    except (DataError, ModelError, FileExistsError) as e:
        _fail(str(e))
    from prefopt.reports import console_table

    out.print(console_table(result.summary))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result.timings.items())
    out.print(f"run folder: {result.out_dir}\ntimings: {stages}", highlight=False)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run folder written by `prefopt bench`.")) -> None:
    """Print a finished run's comparison table (from its files; no model is loaded)."""
    from prefopt.reports import console_table, load_run

    if not run_dir.is_dir():
        _fail(f"{run_dir}: no such run folder")
    try:
        run = load_run(run_dir)
    except ValueError as e:
        _fail(str(e))
    out.print(console_table(run["summary"]))
    timings = run["meta"].get("timings_s", {})
    if timings:
        out.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), highlight=False)


@app.command()
def config(preset: str = typer.Option("default", help="Preset to show.")) -> None:
    """Print a preset's resolved config as JSON (every field of every stage)."""
    import json

    from prefopt.bench import PRESETS
    from prefopt.bench import preset as make_preset

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="--preset")
    out.print_json(json.dumps(dataclasses.asdict(make_preset(preset))))


if __name__ == "__main__":
    app()
