"""The CLI end to end on the tiny model, and its error paths (one line, exit 1, nothing written)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO
from typer.testing import CliRunner

from prefopt.cli import app

runner = CliRunner()


def _sets(*extra: str) -> list[str]:
    out = []
    for s in (*MICRO, *extra):
        out += ["--set", s]
    return out


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / "summary.json").read_text())["summary"]


def _get(rows, policy, metric):
    return next(r for r in rows if r["policy"] == policy and r["metric"] == metric)


def test_smoke_comparison_can_fail(tmp_path):
    """The smoke preset as it ships: its judge is learnable by the tiny model, so a broken algorithm shows.
    Both methods must beat the reference on the gold judge with win-rate intervals above 0.5."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", "threads=1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    ref = _get(rows, "reference", "eval/gold_reward")
    for policy in ("ppo", "dpo"):
        win = _get(rows, policy, "eval/win_rate_vs_ref")
        gold = _get(rows, policy, "eval/gold_reward")
        assert win["lo"] > 0.5, (policy, win)
        assert gold["mean"] > ref["mean"], (policy, gold, ref)
    assert _get(rows, "reference", "eval/kl_to_ref")["mean"] == 0.0
    for name in ("config.json", "metrics.jsonl", "comparison.md", "comparison.csv", "head_to_head.md", "samples.md",
                 "samples.csv", "summary.json", "reward_kl.png", "pairs.jsonl", "samples.jsonl", "eval_prompts.jsonl",
                 "prefopt-run.json", "policies/ppo/adapter_model.safetensors", "rm/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    # the console table fits 80 columns without cutting anything
    assert "…" not in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0 and "dpo" in rep.output


def test_variants_of_one_backend_share_one_table(tmp_path):
    """`--set dpo.loss_type=ipo` runs; two DPO variants and a PPO variant train on one base into one table."""
    out = tmp_path / "ipo"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets("dpo.loss_type=ipo", "policies=dpo"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "policies" / "dpo" / "policy.json").read_text())["config"]["loss_type"] == "ipo"
    cfg = tmp_path / "three.yaml"
    cfg.write_text("preset: smoke\npolicies:\n  dpo-b0.05: {backend: dpo, beta: 0.05}\n  ipo: {backend: dpo, loss_type: ipo}\n"
                   "  ppo-gt: {backend: ppo, reward: gold}\n")
    out = tmp_path / "three"
    res = runner.invoke(app, ["bench", "--config", str(cfg), *_sets(), "--out", str(out)])
    assert res.exit_code == 0, res.output
    policies = {r["policy"] for r in _rows(out)}
    assert policies == {"reference", "dpo-b0.05", "ipo", "ppo-gt"}
    metrics = {r["metric"] for r in _rows(out) if r["policy"] == "ipo"}
    assert {"eval/win_rate_vs_dpo-b0.05", "eval/win_rate_vs_ppo-gt", "eval/implicit_reward_accuracy"} <= metrics
    assert not (out / "rm").exists()  # no policy needed a reward model


def test_train_then_eval_saved_runs_head_to_head(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(app, ["train", "--preset", "smoke", *_sets("policies=dpo"), "--out", str(a)]).exit_code == 0
    assert not (a / "comparison.md").exists()  # trained, not evaluated
    rep = runner.invoke(app, ["report", str(a)])
    assert rep.exit_code == 1 and "prefopt eval" in rep.output
    assert runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo", "seed=1"), "--out", str(b)]).exit_code == 0
    ev = tmp_path / "ev"
    res = runner.invoke(app, ["eval", str(a), str(b), "--out", str(ev)])
    assert res.exit_code == 0, res.output
    rows = _rows(ev)
    assert {r["policy"] for r in rows} == {"reference", "a/dpo", "b/dpo"}
    assert {"eval/win_rate_vs_b/dpo"} <= {r["metric"] for r in rows if r["policy"] == "a/dpo"}
    wa = _get(rows, "a/dpo", "eval/win_rate_vs_b/dpo")["mean"]
    wb = _get(rows, "b/dpo", "eval/win_rate_vs_a/dpo")["mean"]
    assert wa + wb == pytest.approx(1.0)  # paired by prompt, ties half: the two directions are complementary
    # the same saved run evaluated again, alone, reproduces its policies' numbers exactly (identical decoding)
    ev2 = tmp_path / "ev2"
    assert runner.invoke(app, ["eval", str(b), "--out", str(ev2)]).exit_code == 0
    bench_gold = _get(_rows(b), "dpo", "eval/gold_reward")["mean"]
    assert _get(_rows(ev2), "dpo", "eval/gold_reward")["mean"] == pytest.approx(bench_gold, abs=1e-9)


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets(), "--out", str(mine), "--overwrite"])
    assert res.exit_code == 1
    assert "not a prefopt run folder" in _one_error_line(res.output)
    assert (mine / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-files"]


def test_existing_run_needs_overwrite_and_is_replaced(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "--preset", "smoke", *_sets("policies=dpo"), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["train", "--preset", "smoke", *_sets("policies=dpo"), "--out", str(out)])
    assert res.exit_code == 1 and "--overwrite" in _one_error_line(res.output)
    res = runner.invoke(app, ["train", "--preset", "smoke", *_sets("policies=dpo", "seed=2"), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unwritable_out_fails_before_compute_readonly(tmp_path):
    """A folder the user may not write into. Root writes anywhere, so as root (CI) the command runs without the
    capabilities that let root ignore permissions (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:
            res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets(), "--out", str(ro / "run")])
            assert res.exit_code == 1 and "cannot write" in _one_error_line(res.output)
            return
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to run this check as root"
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "prefopt.cli",
               "bench", "--preset", "smoke", *_sets(), "--out", str(ro / "run")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 1, (res.stdout, res.stderr)
        lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "cannot write" in lines[0], lines
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_invalid_out_fails_before_compute(tmp_path, monkeypatch):
    """An output place that cannot be a folder fails at once, before any model is loaded."""
    import prefopt.pipeline.bench as bench

    def no_compute(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(bench, "base_model", no_compute)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets(), "--out", str(blocker / "run")])
    assert res.exit_code == 1 and "cannot write" in _one_error_line(res.output)
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets(), "--out", str(blocker)])
    assert res.exit_code == 1 and "not a folder" in _one_error_line(res.output)


def test_killed_staging_folder_is_not_a_run_and_is_cleaned(tmp_path):
    """A folder left by a killed write is never reported as a run and is removed by the next write there."""
    import socket

    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f"run.tmp-{host}-999999"
    stale.mkdir()
    (stale / "prefopt-run.json").write_text(json.dumps({"kind": "run", "complete": False}))
    live = tmp_path / f"other.tmp-{host}-{os.getpid()}"  # this process is alive: a run being written, not a leftover
    live.mkdir()
    (live / "prefopt-run.json").write_text(json.dumps({"kind": "run", "complete": False}))
    res = runner.invoke(app, ["report", str(tmp_path)])
    line = _one_error_line(res.output)
    assert res.exit_code == 1 and "1 still being written by a running process" in line
    assert "1 incomplete, left by stopped processes" in line
    assert runner.invoke(app, ["train", "--preset", "smoke", *_sets("policies=dpo"), "--out", str(tmp_path / "run")]).exit_code == 0
    assert not stale.exists() and live.exists()


def test_malformed_pairs_file_one_line_error_no_output(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": "d", "chosen": "e", "rejected": "f"}\n'
        '{"prompt": "g", "chosen": "h"}\n'
    )
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", f"data.pairs={bad}", "--out", str(out)])
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "pairs.jsonl:3" in line and "rejected" in line
    assert not list(tmp_path.glob("run*"))


def test_skip_invalid_trains_on_what_it_reports(tmp_path):
    """--skip-invalid: bad rows are dropped, reported in the console and data_report.json, and the run trains
    on exactly the rows it kept; strict, the same file stops the run with one line naming the first bad row."""
    import gzip

    rows = [json.dumps({"prompt": f"say {c}", "chosen": c * 3, "rejected": c.upper() * 3}) for c in "abcdefghijklmnop"]
    rows[3] = '{"prompt": "x", "chosen": "y"}'          # line 4: missing field
    rows[9] = '{"prompt": "x", "chosen": "y", "rej'     # line 10: invalid JSON
    bad = tmp_path / "pairs.jsonl.gz"
    bad.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    sets = _sets("policies=dpo", f"data.pairs={bad}", "data.n_eval=4")
    res = runner.invoke(app, ["bench", "--preset", "smoke", *sets, "--out", str(tmp_path / "strict")])
    assert res.exit_code == 1 and "pairs.jsonl.gz:4: field 'rejected' is missing" in _one_error_line(res.output)
    assert not (tmp_path / "strict").exists()
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *sets, "--skip-invalid", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "kept 14 of 16 rows, dropped 2" in " ".join(res.output.split())
    report = json.loads((out / "data_report.json").read_text())
    assert report[0]["data"] == "pairs" and (report[0]["rows"], report[0]["kept"]) == (16, 14)
    assert {k["kind"]: k["first"] for k in report[0]["kinds"]} == {"field 'rejected' is missing": ["line 4"],
                                                                     "invalid JSON": ["line 10"]}
    summary = json.loads((out / "summary.json").read_text())
    trained = sum(1 for line in (out / "pairs.jsonl").read_text().splitlines() if line.strip())
    assert trained == summary["meta"]["n_pairs"] == 14 - summary["meta"]["n_pairs_held_out"]
    assert summary["meta"]["data_reports"] == report


def test_bad_json_line_names_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b",\n')
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", f"data.prompts={bad}", "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    line = _one_error_line(res.output)
    assert "prompts.jsonl:2" in line and "JSON" in line
    assert not (tmp_path / "run").exists()


def test_bad_option_values(tmp_path):
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", "data.k=1", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "data.k" in _one_error_line(res.output)
    res = runner.invoke(app, ["bench", "--preset", "nope"])
    assert res.exit_code == 1 and "unknown preset" in res.output
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", "model=/nowhere/x.gguf", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "GGUF file not found" in _one_error_line(res.output)
    res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", "judge=nope", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "unknown judge" in _one_error_line(res.output)
    assert not (tmp_path / "r").exists()


def test_config_command_lists_every_field_with_help():
    res = runner.invoke(app, ["config", "--preset", "smoke", "--set", "dpo.beta=0.3"])
    assert res.exit_code == 0
    assert "dpo.beta = 0.3" in res.output and "KL strength" in res.output and "policy dpo: backend dpo" in res.output
    res = runner.invoke(app, ["config", "--json"])  # the default preset's value, not the field's (0.05)
    assert json.loads(res.output)["ppo"]["kl_coef"] == 0.02


def test_help_texts():
    for args in (["--help"], ["bench", "--help"], ["train", "--help"], ["eval", "--help"], ["sweep", "--help"],
                 ["report", "--help"], ["config", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and "Usage" in res.output


def test_reward_sources_are_resolved_before_compute(tmp_path, monkeypatch):
    """A reward source that cannot be loaded fails in step 0 with one line, not after the reward model trained."""
    import prefopt.pipeline.bench as bench

    def no_compute(*a, **k):
        raise AssertionError("compute started")

    monkeypatch.setattr(bench, "base_model", no_compute)
    for spec, expected in (("hf:/nowhere/classifier", "could not load reward model"),
                           ("py:no_such_module_xyz:f", "could not import judge module"),
                           ("nope", "PPOConfig.reward must be")):
        res = runner.invoke(app, ["bench", "--preset", "smoke", "--set", f"ppo.reward={spec}", "--out", str(tmp_path / "r")])
        assert res.exit_code == 1 and expected in _one_error_line(res.output), res.output
    assert not list(tmp_path.iterdir())


def test_preferred_ft_is_a_policy_like_any_other(tmp_path):
    """Preferred-FT (SFT on the chosen responses) trains on the same base and pairs and lands in the same table."""
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo", "policies.pft.backend=sft",
                                                                   "pft.epochs=2"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert {r["policy"] for r in summary["summary"]} == {"reference", "dpo", "pft"}
    info = json.loads((out / "policies" / "pft" / "policy.json").read_text())
    assert info["backend"] == "sft" and info["config"]["epochs"] == 2
    assert any(m["stage"] == "pft" and "train/perplexity" in m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


def test_sft_stage_makes_the_sft_model_the_reference(tmp_path):
    """data.demos: an SFT stage first; its adapter is saved in the run and merged into the base, so the
    reference (and the pairs sampled from it) is the SFT model; `prefopt eval` rebuilds that base; the stage is
    cached like the others."""
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Review: Film number {i}. It was", "completion": "zzzzzzzz"}) + "\n"
                             for i in range(32)), encoding="utf-8")
    sets = _sets("policies=dpo", f"data.demos={demos}", "sft.epochs=10", "sft.learning_rate=3e-2", "sft.batch_size=8")
    out, cache = tmp_path / "run", tmp_path / "cache"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *sets, "--out", str(out), "--cache", str(cache)])
    assert res.exit_code == 0, res.output
    assert "demos: " in res.output and "prompt-completion (32 rows)" in " ".join(res.output.split())
    assert (out / "sft" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["sft"]["demos"] == 32 and summary["eval_settings"]["sft"] == summary["meta"]["sft"]["adapter"]

    def z_share(folder):
        rows = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
        text = "".join(r["response"] for r in rows if r["policy"] == "reference")
        return text.count("z") / max(len(text), 1)

    plain = tmp_path / "plain"
    assert runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo"), "--out", str(plain)]).exit_code == 0
    # the reference is the SFT model: other samples than the plain base's from the same seeds, leaning to 'z'
    # (the tiny model's bounded logits let LoRA move p('z') from ~1% to a few %, no further: 2.1% -> 4.2% of the
    # reference's characters in one run; the exact check of merged = base + adapter is tests/test_models.py)
    ref = lambda f: [r["response"] for r in map(json.loads, (f / "samples.jsonl").read_text().splitlines()) if r["policy"] == "reference"]  # noqa: E731
    assert ref(out) != ref(plain) and z_share(out) > 1.5 * z_share(plain)

    again = tmp_path / "again"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *sets, "--out", str(again), "--cache", str(cache)])
    assert res.exit_code == 0 and "from the cache: sft, pairs" in " ".join(res.output.split())
    assert json.loads((again / "summary.json").read_text())["summary"] == summary["summary"]

    ev = tmp_path / "ev"
    res = runner.invoke(app, ["eval", str(out), "--out", str(ev)])
    assert res.exit_code == 0, res.output
    assert ref(ev) == ref(out)  # the same SFT reference, rebuilt from the run folder
    res = runner.invoke(app, ["eval", str(out), str(plain), "--out", str(tmp_path / "mixed")])
    assert res.exit_code == 1 and "different SFT bases" in _one_error_line(res.output)


def test_rloo_is_a_policy_like_any_other(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo", "policies.rloo-gt.backend=rloo",
                                                                   "rloo-gt.reward=gold", "rloo-gt.steps=2",
                                                                   "rloo-gt.max_new_tokens=6", "policies.rloo.backend=rloo",
                                                                   "rloo.steps=2", "rloo.max_new_tokens=6"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert {r["policy"] for r in summary["summary"]} == {"reference", "dpo", "rloo-gt", "rloo"}
    assert (out / "rm").is_dir()  # the 'rloo' policy (reward: rm) needed the reward model
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if m["stage"] == "rloo-gt"] == [1, 2] and all("train/kl" in m for m in steps if m["stage"] == "rloo")


def test_offline_and_online_dpo_differ_in_one_switch(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo", "policies.dpo-online.backend=dpo",
                                                                   "dpo-online.reward=gold", "dpo-online.online_rounds=2",
                                                                   "dpo-online.online_prompts=4"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    online = [m for m in steps if m["stage"] == "dpo-online"]
    assert [m["round"] for m in online] == [0, 1] and all("train/score" in m for m in online)
    cfg = json.loads((out / "policies" / "dpo-online" / "policy.json").read_text())["config"]
    offline = json.loads((out / "policies" / "dpo" / "policy.json").read_text())["config"]
    assert {k for k in cfg if cfg[k] != offline[k]} == {"reward", "online_rounds", "online_prompts"}


def test_best_of_n_is_evaluated_like_any_policy(tmp_path):
    """Best-of-n trains nothing; with n = 1 it is the reference exactly; its KL is the analytic log n - (n-1)/n."""
    import math

    out = tmp_path / "run"
    res = runner.invoke(app, ["bench", "--preset", "smoke", *_sets("policies=dpo", "policies.bon1.backend=bon", "bon1.n=1",
                                                                   "policies.bon4.backend=bon", "bon4.n=4",
                                                                   "bon4.reward=gold"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    resp = lambda p: [r["response"] for r in rows if r["policy"] == p]  # noqa: E731
    assert resp("bon1") == resp("reference")
    gold = lambda p: [r["gold"] for r in rows if r["policy"] == p]  # noqa: E731
    assert all(b >= r for b, r in zip(gold("bon4"), gold("reference")))  # the best of 4 by gold includes the reference's
    summary = {(r["policy"], r["metric"]): r for r in json.loads((out / "summary.json").read_text())["summary"]}
    assert math.isclose(summary[("bon4", "eval/kl_to_ref")]["mean"], math.log(4) - 3 / 4)
    assert summary[("bon1", "eval/kl_to_ref")]["mean"] == 0.0
    assert not (out / "policies" / "bon4" / "adapter_model.safetensors").exists()
    # prefopt eval rebuilds best-of-n from its n and its reward source: the same samples and metrics as the run's
    res = runner.invoke(app, ["eval", str(out), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    again = {(r["policy"], r["metric"]): r for r in json.loads((tmp_path / "ev" / "summary.json").read_text())["summary"]}
    for key in [("bon4", "eval/gold_reward"), ("bon4", "eval/kl_to_ref"), ("bon1", "eval/gold_reward"),
                ("dpo", "eval/gold_reward"), ("bon4", "eval/win_rate_vs_ref")]:
        assert again[key]["mean"] == summary[key]["mean"], key


def test_same_command_and_seed_give_identical_metrics(tmp_path):
    """Determinism on CPU: the same command twice gives the same summary metrics and training metrics exactly."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert runner.invoke(app, ["bench", "--preset", "smoke", *_sets(), "--out", str(out)]).exit_code == 0
        outs.append(out)
    a, b = (json.loads((o / "summary.json").read_text()) for o in outs)
    assert a["summary"] == b["summary"] and a.get("path") == b.get("path")
    strip = lambda o: [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")}  # noqa: E731
                       for x in (o / "metrics.jsonl").read_text().splitlines()]
    assert strip(outs[0]) == strip(outs[1])
    assert (outs[0] / "samples.jsonl").read_bytes() == (outs[1] / "samples.jsonl").read_bytes()


def test_python_dash_m_prefopt_runs_the_cli():
    """`python -m prefopt` (what `accelerate launch -m prefopt` starts) is the same CLI."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "prefopt", "config", "--preset", "smoke", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["model"] == "tiny"
