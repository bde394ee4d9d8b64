"""Tests for prefopt.reports: tables, plot, atomic result folders, no torch import."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from rich.table import Table

import prefopt.reports as reports
from prefopt.errors import RunError
from prefopt.reports import (
    comparison_frame,
    comparison_markdown,
    console_table,
    load_run,
    plot_reward_kl,
    samples_markdown,
    to_jsonable,
    write_run,
)

REPO = Path(__file__).resolve().parents[1]
POLICIES = ["reference", "ppo", "dpo"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_MEANS = {
    "reference": {"eval/gold_reward": 0.30, "eval/kl_to_ref": 0.00, "eval/distinct_2": 0.71},
    "ppo": {"eval/gold_reward": 0.62, "eval/kl_to_ref": 3.20, "eval/distinct_2": 0.55},
    "dpo": {"eval/gold_reward": 0.55, "eval/kl_to_ref": 1.40, "eval/distinct_2": 0.66},
}


def make_summary() -> list[dict]:
    rows = []
    for policy in POLICIES:
        for metric, mean in _MEANS[policy].items():
            has_ci = metric != "eval/distinct_2"
            rows.append(
                {
                    "policy": policy,
                    "metric": metric,
                    "mean": mean,
                    "lo": round(mean - 0.05, 4) if has_ci else None,
                    "hi": round(mean + 0.07, 4) if has_ci else None,
                    "se": 0.03 if has_ci else None,
                    "n": 8,
                }
            )
    return rows


def make_samples(n_prompts: int = 4) -> list[dict]:
    return [
        {
            "prompt_id": pid,
            "prompt": f"prompt {pid}",
            "policy": policy,
            "response": f"{policy} says | hi\nthere {pid}",
            "gold": 0.1 * pid + POLICIES.index(policy),
            "proxy": 1.5,
            "kl": 0.25,
            "length": 7,
            "eos": pid % 2 == 0,
        }
        for pid in range(n_prompts)
        for policy in POLICIES
    ]


def make_run_kwargs() -> dict:
    return {
        "config": {"seed": 1, "out": Path("runs/x"), "lr": np.float32(1e-5)},
        "metrics": [
            {"stage": "dpo", "step": 1, "train/loss": 0.69},
            {"stage": "dpo", "step": 2, "train/loss": 0.61, "train/reward_accuracy": 0.75},
        ],
        "summary": make_summary(),
        "samples": make_samples(),
        "meta": {"seed": 1, "git": "abc123", "timings": {"train_s": 1.5}},
        "policies": POLICIES,
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def test_comparison_frame_shape_order_and_format() -> None:
    frame = comparison_frame(make_summary())
    assert list(frame["policy"]) == POLICIES
    assert list(frame.columns) == [
        "policy",
        "eval/gold_reward",
        "eval/kl_to_ref",
        "eval/distinct_2",
        "n",
    ]
    ppo = frame.set_index("policy").loc["ppo"]
    assert ppo["eval/gold_reward"] == "0.620 [0.570, 0.690]"
    assert ppo["eval/distinct_2"] == "0.550"  # no CI -> plain mean
    assert ppo["n"] == 8


def test_comparison_frame_metric_selection_and_policy_order() -> None:
    frame = comparison_frame(make_summary(), ["eval/kl_to_ref"], policies=["dpo"])
    assert list(frame.columns) == ["policy", "eval/kl_to_ref", "n"]
    assert list(frame["policy"]) == ["dpo", "reference", "ppo"]
    with pytest.raises(ValueError, match="eval/nope"):
        comparison_frame(make_summary(), ["eval/nope"])


def test_comparison_frame_missing_cell_and_duplicates() -> None:
    summary = make_summary() + [{"policy": "ppo", "metric": "eval/length", "mean": 31.0}]
    frame = comparison_frame(summary).set_index("policy")
    assert frame.loc["ppo", "eval/length"] == "31.0"  # length is shown with one decimal
    assert frame.loc["dpo", "eval/length"] == reports.tables.MISSING
    with pytest.raises(ValueError, match="more than one row"):
        comparison_frame(make_summary() + make_summary()[:1])


def test_comparison_markdown_rows_in_order() -> None:
    md = comparison_markdown(make_summary())
    lines = md.strip().splitlines()
    assert lines[0].startswith("| policy | eval/gold_reward ↑ | eval/kl_to_ref |")
    assert set(lines[1].replace("|", "").split()) == {"---"}
    assert [line.split("|")[1].strip() for line in lines[2:]] == POLICIES
    assert "| 0.620 [0.570, 0.690] |" in lines[3]


def test_samples_markdown_escapes_and_limits() -> None:
    md = samples_markdown(make_samples(5), POLICIES, n=3)
    lines = md.strip().splitlines()
    assert lines[0] == (
        "| prompt | reference response | reference gold | ppo response | ppo gold"
        " | dpo response | dpo gold |"
    )
    assert len(lines) == 2 + 3  # header, rule, first 3 prompts
    assert "ppo says \\| hi<br>there 0" in lines[2]
    assert lines[2].endswith("| 2.000 |")  # dpo gold for prompt 0
    # Every data row has exactly as many unescaped separators as the header.
    n_sep = lines[0].count("|")
    for line in lines[2:]:
        assert line.replace("\\|", "").count("|") == n_sep


def test_samples_markdown_missing_policy_sample() -> None:
    samples = [s for s in make_samples(2) if not (s["policy"] == "dpo" and s["prompt_id"] == 1)]
    last = samples_markdown(samples, POLICIES).strip().splitlines()[-1]
    assert last.endswith("|  |  |")


def test_console_table_renders_ci() -> None:
    table = console_table(make_summary())
    assert isinstance(table, Table)
    assert table.row_count == 3
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    text = console.export_text()
    assert "0.620" in text and "±0.070" in text  # mean over the larger side of its interval
    assert text.index("reference") < text.index("ppo") < text.index("dpo")


def test_console_table_fits_80_columns_without_cutting() -> None:
    """Long names and every console metric at 80 columns (a terminal or a log): nothing is cut to '…'."""
    summary = []
    for policy in ("reference", "ppo-gt-long-name", "dpo-b0.05", "ipo"):
        for metric in ("eval/gold_reward", "eval/win_rate_vs_ref", "eval/kl_to_ref", "eval/proxy_reward",
                       "eval/gold_proxy_gap", "eval/length"):
            summary.append({"policy": policy, "metric": metric, "mean": -12.345, "lo": -14.5, "hi": -10.2, "se": 1.1, "n": 128})
    console = Console(width=80, record=True, color_system=None)
    console.print(console_table(summary))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for needle in ("-12.345", "±2.155", "ppo-gt-long-", "dpo-b0.05", "gold", "win/ref", "proxy", "gap", "128"):  # folded, not cut
        assert needle in text, needle


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------


def test_plot_reward_kl_writes_png(tmp_path: Path) -> None:
    out = plot_reward_kl(make_summary(), tmp_path / "p.png", title="t")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_reward_kl_without_data_still_writes(tmp_path: Path) -> None:
    summary = [{"policy": "ppo", "metric": "eval/length", "mean": 3.0}]
    out = plot_reward_kl(summary, tmp_path / "empty.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------------------
# to_jsonable
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Cfg:
    path: Path
    values: tuple[int, ...]
    scale: np.float64


def test_to_jsonable() -> None:
    obj = {
        "cfg": _Cfg(Path("a/b"), (1, 2), np.float64(0.5)),
        "arr": np.arange(3),
        "i": np.int64(4),
        "flag": np.bool_(True),
        "nan": float("nan"),
        "tags": {"b", "a"},
        1: "int key",
    }
    out = to_jsonable(obj)
    assert out == {
        "cfg": {"path": "a/b", "values": [1, 2], "scale": 0.5},
        "arr": [0, 1, 2],
        "i": 4,
        "flag": True,
        "nan": None,
        "tags": ["a", "b"],
        "1": "int key",
    }
    assert type(out["i"]) is int and type(out["flag"]) is bool
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------------
# write_run / load_run
# ---------------------------------------------------------------------------

EXPECTED_FILES = {
    "prefopt-run.json",
    "config.json",
    "metrics.jsonl",
    "comparison.md",
    "comparison.csv",
    "samples.md",
    "samples.csv",
    "samples.jsonl",
    "summary.json",
    "reward_kl.png",
}


def test_write_run_writes_everything(tmp_path: Path) -> None:
    out = write_run(tmp_path / "run", **make_run_kwargs())
    assert out == tmp_path / "run"
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert leftovers(tmp_path) == []

    md = (out / "comparison.md").read_text(encoding="utf-8").strip().splitlines()
    assert [line.split("|")[1].strip() for line in md[2:]] == POLICIES

    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv.columns) == ["policy", "metric", "mean", "lo", "hi", "se", "n"]
    expected = pd.DataFrame(make_summary())
    assert list(csv["policy"]) == list(expected["policy"])
    assert list(csv["metric"]) == list(expected["metric"])
    for col in ("mean", "lo", "hi", "se"):
        np.testing.assert_allclose(csv[col], expected[col].astype(float), equal_nan=True)
    assert list(csv["n"]) == [8] * len(expected)

    samples_csv = pd.read_csv(out / "samples.csv")
    assert len(samples_csv) == len(make_samples())
    assert samples_csv.loc[1, "response"] == "ppo says | hi\nthere 0"

    assert (out / "reward_kl.png").read_bytes()[:8] == PNG_MAGIC

    doc = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert doc["schema_version"] == 2
    assert doc["meta"] == {"seed": 1, "git": "abc123", "timings": {"train_s": 1.5}}
    assert doc["summary"] == make_summary()

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["out"] == "runs/x"
    assert config["lr"] == pytest.approx(1e-5)

    metric_lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in metric_lines] == [1, 2]


def test_load_run_round_trip(tmp_path: Path) -> None:
    kwargs = make_run_kwargs()
    out = write_run(tmp_path / "run", **kwargs)
    run = load_run(out)
    assert set(run) >= {"config", "metrics", "summary", "samples", "meta"}
    assert run["summary"] == kwargs["summary"]
    assert run["samples"] == kwargs["samples"]
    assert run["metrics"] == kwargs["metrics"]
    assert run["meta"] == kwargs["meta"]
    assert run["policies"] == POLICIES
    assert run["config"]["seed"] == 1


def test_load_run_reports_missing_and_corrupt_files(tmp_path: Path) -> None:
    out = write_run(tmp_path / "run", **make_run_kwargs())
    (out / "metrics.jsonl").write_text('{"step": 1}\n{broken\n', encoding="utf-8")
    with pytest.raises(RunError, match=r"metrics\.jsonl:2"):
        load_run(out)
    (out / "summary.json").unlink()
    with pytest.raises(RunError, match=r"summary\.json"):
        load_run(out)
    with pytest.raises(RunError):
        load_run(tmp_path / "does-not-exist")
    (out / "prefopt-run.json").unlink()
    with pytest.raises(RunError, match="not a prefopt result folder"):
        load_run(out)


def test_load_run_rejects_unknown_schema(tmp_path: Path) -> None:
    out = write_run(tmp_path / "run", **make_run_kwargs())
    doc = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    doc["schema_version"] = 99
    (out / "summary.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(RunError, match="schema_version"):
        load_run(out)


def test_write_run_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(reports.plots, "plot_reward_kl", boom)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_run(tmp_path / "run", **make_run_kwargs())
    assert list(tmp_path.iterdir()) == []


def test_write_run_refuses_existing_nonempty_dir(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("old", encoding="utf-8")
    for overwrite in (False, True):  # a folder that is not prefopt's is never replaced, even with overwrite
        with pytest.raises(RunError, match="not a prefopt run folder"):
            write_run(target, overwrite=overwrite, **make_run_kwargs())
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_write_run_accepts_existing_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    out = write_run(tmp_path / "run", **make_run_kwargs())
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_write_run_overwrite_replaces_old(tmp_path: Path) -> None:
    target = write_run(tmp_path / "run", **make_run_kwargs())
    (target / "stale.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RunError, match="--overwrite"):
        write_run(target, **make_run_kwargs())
    write_run(target, overwrite=True, **make_run_kwargs())
    assert {p.name for p in target.iterdir()} == EXPECTED_FILES
    assert leftovers(tmp_path) == []


def _old_run(tmp_path: Path) -> Path:
    target = write_run(tmp_path / "run", **make_run_kwargs())
    (target / "stale.txt").write_text("old", encoding="utf-8")
    return target


def test_write_run_overwrite_keeps_old_when_new_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _old_run(tmp_path)
    before = sorted(p.name for p in target.iterdir())

    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(reports.plots, "plot_reward_kl", boom)
    with pytest.raises(RuntimeError):
        write_run(target, overwrite=True, **make_run_kwargs())
    assert sorted(p.name for p in target.iterdir()) == before
    assert leftovers(tmp_path) == []


def test_write_run_overwrite_rolls_back_when_final_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _old_run(tmp_path)
    before = sorted(p.name for p in target.iterdir())
    real_replace = os.replace

    def flaky_replace(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_run(target, overwrite=True, **make_run_kwargs())
    assert sorted(p.name for p in target.iterdir()) == before
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------


def test_reports_and_metrics_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import prefopt.reports, prefopt.eval.metrics\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr

