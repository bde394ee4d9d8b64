"""The CLI end to end on the smoke preset, and its error paths (one line, exit 1, nothing written)."""

import json

from typer.testing import CliRunner

from prefopt.cli import app

runner = CliRunner()


def test_bench_smoke_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("config.json", "metrics.jsonl", "comparison.md", "comparison.csv", "samples.md", "samples.csv",
                 "summary.json", "reward_kl.png", "pairs.jsonl", "samples.jsonl"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["summary"] if isinstance(summary, dict) else summary
    policies = {r["policy"] for r in rows}
    assert policies == {"reference", "ppo", "dpo"}
    metrics = {r["metric"] for r in rows}
    assert {"eval/gold_reward", "eval/kl_to_ref", "eval/win_rate_vs_ref", "eval/proxy_reward", "eval/length"} <= metrics
    ref_kl = next(r for r in rows if r["policy"] == "reference" and r["metric"] == "eval/kl_to_ref")
    assert ref_kl["mean"] == 0.0
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"rm", "ppo", "dpo"}
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny" and config["ppo"]["steps"] == 2
    # `prefopt report` reads it back without a model
    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0 and "dpo" in rep.output


def test_bench_refuses_existing_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--out", str(out)])
    assert res.exit_code == 1
    assert "--overwrite" in res.output
    assert (out / "keep.txt").exists()


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_malformed_pairs_file_one_line_error_no_output(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "d", "chosen": "e", "rejected": "f"}\n'
        '{"prompt": "g", "chosen": "h"}\n'
    )
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--pairs", str(bad), "--out", str(out)])
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "pairs.jsonl:3" in line and "rejected" in line
    assert not out.exists()
    assert not list(tmp_path.glob("run*"))


def test_bad_json_line_names_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--prompts", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "prompts.jsonl:2" in line and "JSON" in line
    assert not (tmp_path / "run").exists()


def test_missing_prompt_field_in_csv(tmp_path):
    bad = tmp_path / "prompts.csv"
    bad.write_text("text,label\nhello,1\n")
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--prompts", str(bad), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "prompts.csv" in line and "prompt" in line


def test_bad_option_values(tmp_path):
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--k", "1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "data.k" in res.output
    res = runner.invoke(app, ["bench", "--preset", "nope"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--model", "/nowhere/x.gguf", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "GGUF file not found" in res.output
    assert not (tmp_path / "r").exists()


def test_help_texts():
    for args in (["--help"], ["bench", "--help"], ["report", "--help"], ["config", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Usage" in res.output
