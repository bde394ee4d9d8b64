"""Sweeps on Optuna: a cell killed with SIGKILL is redone cleanly and nothing finished is redone; two workers on
one storage share a sweep without running any cell twice. Real processes, the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO

from prefopt.pipeline.sweep import load_sweep
from prefopt.reports.run import read_marker

SWEEP = {
    "name": "t",
    "preset": "smoke",
    "set": list(MICRO),
    "seeds": [0, 1],
    "arms": {"dpo": {"backend": "dpo", "grid": {"beta": [0.1, 0.3]}}, "ppo-gt": {"backend": "ppo", "reward": "gold"}},
}
N_CELLS = 6


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    return path


def _start(sweep: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "prefopt.cli", "sweep", str(sweep), "--out", str(out), "--heartbeat", "1", "--grace", "3", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _trials(out: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'sweep.db'}")
    return study.get_trials(deepcopy=False)


def _complete_cells(out: Path) -> dict[str, dict]:
    cells = out / "cells"
    if not cells.is_dir():
        return {}
    done = {}
    for p in cells.iterdir():
        marker = read_marker(p)
        if marker is not None and marker.get("complete"):
            done[p.name] = marker
    return done


def test_sweep_file_builds_and_validates_every_cell(tmp_path):
    spec = load_sweep(_write(tmp_path))
    assert len(spec.cells) == N_CELLS
    assert {c.id for c in spec.cells} >= {"dpo__beta=0.1__seed=0", "ppo-gt__seed=1"}
    bad = dict(SWEEP, arms={"dpo": {"backend": "dpo", "grid": {"betta": [0.1]}}})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    from prefopt.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'policies.dpo.beta'"):
        load_sweep(tmp_path / "bad.json")


def test_sweep_killed_mid_cell_redoes_only_what_is_missing(tmp_path):
    sweep, out = _write(tmp_path), tmp_path / "out"
    proc = _start(sweep, out)
    deadline = time.time() + 240
    # wait until at least one cell is finished and another is being written
    while time.time() < deadline:
        staging = list((out / "cells").glob("*.tmp-*")) if (out / "cells").is_dir() else []
        if _complete_cells(out) and staging:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    else:
        pytest.fail("the sweep never got to a second cell")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _complete_cells(out)
    assert 1 <= len(before) < N_CELLS
    killed = [t for t in _trials(out) if t.state.name == "RUNNING"]
    assert len(killed) == 1  # the interrupted cell, still 'running' in the storage

    res = subprocess.run([*_start_cmd(sweep, out)], capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    after = _complete_cells(out)
    assert len(after) == N_CELLS
    for cell, marker in before.items():  # finished cells were not redone: same folder, same writer
        assert after[cell] == marker
    assert f"{N_CELLS - len(before)} run by this worker" in res.stdout
    trials = _trials(out)
    complete = [t.params["cell"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(after)  # every cell exactly once
    assert any(t.state.name == "FAIL" for t in trials)  # the killed one, failed by heartbeat and re-queued
    assert not list((out / "cells").glob("*.tmp-*"))  # the killed cell's half-written folder is gone
    assert not list((out / "cells").glob("*.resume"))  # its progress was continued, then removed


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _start_cmd(sweep, out):
    return [sys.executable, "-m", "prefopt.cli", "sweep", str(sweep), "--out", str(out), "--heartbeat", "1", "--grace", "3"]


def test_two_workers_share_a_sweep_without_duplicates(tmp_path):
    sweep, out = _write(tmp_path), tmp_path / "out"
    # no worker dies here, so a long grace: with the tests on every core, a live worker's heartbeat can lag 3 s, the
    # other worker then fails its trial as stale and runs its cell a second time (what follows the stale verdict in
    # the live worker is tested below)
    procs = [_start(sweep, out, "--grace", "60"), _start(sweep, out, "--grace", "60")]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    ran = [int(stdout.split("complete, ")[1].split(" run by")[0]) for stdout, _ in outputs]
    assert sum(ran) == N_CELLS and min(ran) >= 1  # both worked, no cell twice
    trials = _trials(out)
    complete = [t.params["cell"] for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == len(set(complete)) == N_CELLS
    assert len(_complete_cells(out)) == N_CELLS
    # stages shared across cells were computed once per seed: one pairs entry per seed
    assert len([p for p in (out / "cache" / "pairs").iterdir() if p.is_dir()]) == 2


def test_shipped_sweep_and_config_files_validate():
    """Every sweep file in benchmarks/ loads and builds every cell (data paths given as the README says)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    files = sorted(root.glob("*_sweep.yaml"))
    assert files
    shared = root.parent.parent / "shared" / "data" / "imdb_reviews_1999.csv"
    for f in files:
        sets = (f"data.prompts={shared}",) if "imdb" in f.name else ()
        spec = load_sweep(f, sets=sets)
        assert len(spec.cells) >= 10, f


def test_shipped_run_configs_validate_and_the_stackllama_recipe_runs(tmp_path):
    """The SFT configs in benchmarks/ build as the README says; the StackLLaMA one runs end to end (SFT -> RM ->
    PPO, plus Preferred-FT and DPO) on our Stack Exchange fixture, on the tiny model."""
    import json

    from conftest import MICRO
    from typer.testing import CliRunner

    from prefopt.cli import app
    from prefopt.pipeline.config import load_config

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    imdb = root.parent.parent / "shared" / "data" / "imdb_reviews_1999.csv"
    cfg = load_config("default", str(root / "imdb_sft_comparison.yaml"), (f"data.prompts={imdb}", f"data.demos={imdb}"))
    assert cfg.data.demos and sorted(cfg.policies) == ["dpo", "ppo"]
    se = tmp_path / "se.jsonl"
    se.write_text("".join(json.dumps({"question": f"How do I do thing {i}?", "answers": [
        {"text": f"Use tool {i}.", "upvotes": 7, "accepted": True}, {"text": "No idea.", "upvotes": 0},
        {"text": "Read the docs.", "upvotes": 2}]}) + "\n" for i in range(40)), encoding="utf-8")
    sets = [a for s in (*MICRO, "model=tiny", "judge=chars", "lora.r=4", f"data.demos={se}", f"data.pairs={se}",
                        "sft.batch_size=8", "pft.batch_size=8") for a in ("--set", s)]
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["bench", "--config", str(root / "stackllama_style.yaml"), *sets, "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert {r["policy"] for r in summary["summary"]} == {"reference", "ppo", "pft", "dpo"}
    assert summary["meta"]["sft"]["demos"] == 40 - summary["meta"]["data_reports"][1]["held_out_eval_prompts"]
    assert (out / "sft" / "adapter_model.safetensors").is_file() and (out / "rm").is_dir()


def test_a_sweep_folder_refuses_a_different_sweep(tmp_path):
    from prefopt.errors import RunError
    from prefopt.pipeline.sweep import _init_folder

    spec = load_sweep(_write(tmp_path))
    out = tmp_path / "out"
    _init_folder(out, spec)
    _init_folder(out, spec)  # the same sweep again: fine (a second worker, or a restart)
    changed = dict(SWEEP, seeds=[0, 1, 2])
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(RunError, match="holds a different sweep"):
        _init_folder(out, load_sweep(tmp_path / "changed.json"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(RunError, match="not a prefopt sweep folder"):
        _init_folder(mine, spec)


def test_a_trial_failed_as_stale_by_another_worker_while_it_ran_keeps_its_result(tmp_path, monkeypatch):
    """A worker starved of CPU misses heartbeats; another worker fails its running trial as stale. When its cell
    then finishes, optuna cannot tell the trial (and trips its own assert): the worker must go on and count the
    cell from disk, not end in a traceback. The other worker is simulated by failing the trial in the storage."""
    import optuna

    import prefopt.pipeline.bench as bench
    from prefopt.pipeline.sweep import run_sweep

    spec = {**SWEEP, "seeds": [0], "arms": {"dpo": {"backend": "dpo"}}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    real_run, failed = bench.run, []

    def run_and_get_failed_elsewhere(*args, **kwargs):
        result = real_run(*args, **kwargs)
        study = optuna.load_study(study_name="t", storage=f"sqlite:///{out / 'sweep.db'}")
        (running,) = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        study._storage.set_trial_state_values(running._trial_id, optuna.trial.TrialState.FAIL)
        failed.append(running.number)
        return result

    monkeypatch.setattr(bench, "run", run_and_get_failed_elsewhere)
    result = run_sweep(load_sweep(path), out, heartbeat=1)
    assert failed == [0] and result.ran == ["dpo__seed=0"]  # ran once; the re-queued trial took the cell from disk
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params["cell"] == "dpo__seed=0" and trials[1].value is not None
