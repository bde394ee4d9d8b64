"""Resume from any kill. Each backend's loop, stopped right after any step's checkpoint and started again, ends
bit for bit where the uninterrupted loop ends, with the same per-step metrics; the pipeline (``prefopt bench`` /
``train`` / ``sweep``), SIGKILLed as a real process at several points and started again with the same command,
writes the same ``summary.json`` metrics as an uninterrupted run without redoing finished stages."""

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MICRO, Killed, killed_after

from prefopt.backends import dpo, ppo, rloo, rm, sft
from prefopt.backends._common import TrainData
from prefopt.backends.checkpoint import StepCheckpoint
from prefopt.data.records import PreferencePair
from prefopt.models.ops import encode_prompts
from prefopt.models.shared import LoraSettings, SharedBase


def _pairs(n=10, seed=0):
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 14)))  # noqa: E731
    return [PreferencePair(prompt=word() + "?", chosen=word(), rejected=word(), margin=None) for _ in range(n)]


def _score(tok):
    target = tok("e", add_special_tokens=False).input_ids[0]
    return lambda p, r: torch.tensor([sum(x == target for x in resp) / max(len(resp), 1) for resp in r])


# backend name -> (module, config, role, head?, data builder); each runs 4-6 steps on the tiny model
CASES = {
    "rm": (rm, rm.RewardConfig(epochs=2, batch_size=4, learning_rate=1e-2, normalize_on=0), "rm"),
    "sft": (sft, sft.SFTConfig(epochs=2, batch_size=4, learning_rate=1e-2, lr_schedule="linear"), "sft"),
    "dpo": (dpo, dpo.DPOConfig(epochs=2, batch_size=4, learning_rate=1e-2, lr_schedule="linear"), "dpo"),
    "online-dpo": (dpo, dpo.DPOConfig(reward="gold", online_rounds=2, online_prompts=6, batch_size=4,
                                      max_response_tokens=5, learning_rate=1e-2), "dpo"),
    "rloo": (rloo, rloo.RLOOConfig(reward="gold", steps=4, batch_size=3, k=2, max_new_tokens=5, learning_rate=1e-2), "rloo"),
    "ppo": (ppo, ppo.PPOConfig(reward="gold", steps=4, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=5,
                               learning_rate=1e-2, kl_target=1.0), "ppo"),
}


def _train(tiny, case, checkpoint):
    module, cfg, role = CASES[case]
    lm, tok = tiny
    shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=4, alpha=8))
    pairs = _pairs()
    prompts = [p.prompt for p in pairs]
    data = TrainData(pairs=pairs, prompts=encode_prompts(prompts, tok, 16) if case in ("rloo", "ppo") else None,
                     score_fn=_score(tok))
    if case == "online-dpo":
        data = TrainData(prompts=encode_prompts(prompts, tok, 16), score_fn=_score(tok))
    log = []
    on_step = lambda s, m: log.append((s, {k: v for k, v in m.items() if not k.startswith("time/")}))  # noqa: E731
    try:
        if module is rm:
            rm.train(shared, pairs, copy.deepcopy(cfg), role=role, on_step=on_step, checkpoint=checkpoint)
        else:
            module.train(shared, copy.deepcopy(cfg), data, role=role, on_step=on_step, checkpoint=checkpoint)
    except Killed:
        pass
    return log, shared.adapter_state(role)


@pytest.mark.parametrize("case", list(CASES))
def test_backend_resumed_after_any_step_ends_bit_for_bit_like_uninterrupted(tiny, tmp_path, case):
    full, weights = _train(tiny, case, None)
    steps = len(full)
    assert steps >= 4
    for kill_at in sorted({1, steps // 2 + 1, steps - 1}):  # early, mid-epoch / mid-round, last-but-one
        folder = tmp_path / f"at{kill_at}"
        first, _ = _train(tiny, case, killed_after(kill_at)(folder))
        assert [s for s, _ in first] == list(range(1, kill_at + 1))
        rest, resumed = _train(tiny, case, StepCheckpoint(folder))
        assert [s for s, _ in rest] == list(range(kill_at + 1, steps + 1)), kill_at  # no step redone or skipped
        assert first + rest == full, kill_at
        assert all(torch.equal(weights[k], resumed[k]) for k in weights), kill_at


def test_a_finished_loop_resumed_does_nothing(tiny, tmp_path):
    full, weights = _train(tiny, "dpo", StepCheckpoint(tmp_path))
    again, same = _train(tiny, "dpo", StepCheckpoint(tmp_path))
    assert again == [] and all(torch.equal(weights[k], same[k]) for k in weights)


# ------------------------------------------------------------------------------------------------ real processes
KILL_MICRO = (*MICRO, "rm.epochs=2", "rm.batch_size=4", "ppo.steps=4", "dpo.epochs=2", "eval.path_points=2")


# `python -m prefopt`, except that once the process has written a line matching $HOLD_AT to stderr it goes no
# further (it sleeps) until the test kills it: the kill lands at that line however far behind the test's reading is
# (the pipe would otherwise let a busy machine's child run on, past the point meant, before the test reads the line)
HOLD = """
import os, re, sys, time
pat = os.environ.get("HOLD_AT")
if pat:
    class Hold:
        def __init__(self, f):
            self.f = f
        def write(self, s):
            n = self.f.write(s)
            if re.search(pat, s):
                self.f.flush()
                time.sleep(3600)
            return n
        def __getattr__(self, k):
            return getattr(self.f, k)
    sys.stderr = Hold(sys.stderr)
from prefopt.__main__ import main
main()
"""


def _bench(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", HOLD, *extra, "--preset", "smoke", *[a for s in KILL_MICRO for a in ("--set", s)],
            "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def _run_until(cmd: list[str], trigger: str | None, cwd: Path) -> tuple[int, str]:
    """Run ``cmd``; SIGKILL it at the first line matching regex ``trigger`` on its stderr (None: to the end); the
    child holds at that line (:data:`HOLD`) until the signal lands."""
    env = _env() | ({"HOLD_AT": trigger} if trigger is not None else {})
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if trigger is not None and re.search(trigger, line):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stderr.close()
    return proc.wait(timeout=300), "".join(lines)


def _results(out: Path) -> tuple:
    doc = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    adapters = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("policies/*/*.safetensors"))}
    return doc["summary"], doc["path"], metrics, adapters


@pytest.mark.parametrize("command", ["bench", "train"])
def test_killed_run_continues_where_it_was_and_ends_like_an_uninterrupted_one(tmp_path, command):
    rc, log = _run_until(_bench(tmp_path / "whole", command), None, tmp_path)
    assert rc == 0, log[-3000:]
    want = _results(tmp_path / "whole")
    out = tmp_path / "killed"
    # SIGKILL mid reward model, mid PPO (after a path evaluation), mid DPO, after the last policy, and (bench: train
    # does not evaluate) in the evaluation once two of its three policies (reference, ppo, dpo) are evaluated
    points = ["reward model 2/", "ppo 3/", "dpo 2/", r"dpo: [\d.]+s"] + (["eval: ppo evaluated"] if command == "bench" else [])
    logs = []
    for trigger in points:
        rc, log = _run_until(_bench(out, command), trigger, tmp_path)
        assert rc == -signal.SIGKILL, (trigger, log[-3000:])
        assert not out.exists() and (tmp_path / "killed.resume").is_dir()  # no partial result, progress kept
        logs.append(log)
    rc, log = _run_until(_bench(out, command), None, tmp_path)
    assert rc == 0, log[-3000:]
    logs.append(log)
    # each start took what the one before had finished (nothing finished was redone) and went on from there
    assert "pairs finished before the restart" in logs[1] and "reward model: continuing after step" in logs[1]
    assert "reward model 1/" not in logs[1]
    assert "reward model: finished before the restart" in logs[2] and "ppo: continuing after step" in logs[2]
    assert "ppo 1/" not in logs[2]
    assert "ppo: finished before the restart" in logs[3] and "dpo: continuing after step 1" in logs[3]
    assert "dpo 1/" not in logs[3]
    # killed as DPO ended (its last step saved, perhaps not yet recorded as done): no DPO step is taken again
    assert "ppo: finished before the restart" in logs[4] and not re.search(r"(dpo|ppo|reward model) \d+/", logs[4])
    if command == "bench":  # killed in the evaluation: the policies evaluated before are not evaluated again
        assert "eval: reference evaluated before the restart" in logs[5] and "eval: ppo evaluated before the restart" in logs[5]
        assert "eval: dpo evaluated" in logs[5] and not re.search("eval: (reference|ppo) evaluated(?! before)", logs[5])
    assert _results(out) == want
    assert not (tmp_path / "killed.resume").exists()  # the complete run leaves no progress behind
    assert json.loads((out / "summary.json").read_text())["meta"]["resumed"]


def test_progress_of_another_config_is_refused_and_overwrite_discards_it(tmp_path):
    out = tmp_path / "o"
    rc, log = _run_until(_bench(out, "train"), "ppo 2/", tmp_path)
    assert rc == -signal.SIGKILL
    changed = [*_bench(out, "train"), "--set", "ppo.kl_coef=0.3"]
    res = subprocess.run(changed, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "holds an unfinished run of a different config" in res.stderr.strip().splitlines()[-1]
    res = subprocess.run([*changed, "--overwrite"], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "finished before the restart" not in res.stderr and "continuing" not in res.stderr
    assert json.loads((out / "config.json").read_text())["ppo"]["kl_coef"] == 0.3


def test_default_out_finds_the_killed_run(tmp_path):
    cmd = [a for a in _bench(tmp_path / "x", "train") if a not in ("--out", str(tmp_path / "x"))]
    rc, _ = _run_until(cmd, "ppo 2/", tmp_path)
    assert rc == -signal.SIGKILL
    (progress,) = (tmp_path / "runs").glob("bench-*.resume")
    rc, log = _run_until(cmd, None, tmp_path)
    assert rc == 0 and "continuing the run started" in log
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [progress.name[: -len(".resume")]]


def test_one_process_per_run_and_a_torn_start_is_a_fresh_start(tmp_path):
    from prefopt.errors import RunError
    from prefopt.pipeline.resume import Progress

    out = tmp_path / "o"
    first = Progress.open(out, {"a": 1})
    with pytest.raises(RunError, match="another prefopt process is running this run"):
        Progress.open(out, {"a": 1})
    first.release()
    again = Progress.open(out, {"a": 1})
    assert again.resumed
    again.release()
    (tmp_path / "o.resume" / "resume.json").write_text('{"fingerp')  # killed while writing its first file
    (tmp_path / "o.resume" / "done").mkdir()
    fresh = Progress.open(out, {"a": 1})
    assert not fresh.resumed and not (tmp_path / "o.resume" / "done").exists()
    fresh.remove()
    assert not (tmp_path / "o.resume").exists()


def test_checkpoint_tensors_file_reads_back_with_safetensors_as_the_same_tensors(tmp_path):
    """The streaming writer against safetensors' own reader (and its writer, the naive form): every dtype a
    checkpoint holds, empty and 0-d tensors, torch's RNG state; the same names, dtypes, shapes and values."""
    from safetensors.torch import load_file, save_file

    from prefopt.backends.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"weights/a": torch.randn(3, 5, generator=g), "opt/0/step": torch.tensor(4.0),
               "ids": torch.arange(7), "rng": torch.get_rng_state(), "empty": torch.zeros(0, 3),
               "f64": torch.randn(4, generator=g, dtype=torch.float64), "mask": torch.tensor([True, False]),
               "half": torch.randn(6, generator=g).to(torch.bfloat16), "i32": torch.tensor([1, -2], dtype=torch.int32)}
    write_safetensors(tensors, tmp_path / "ours.safetensors")
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours, theirs = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    assert sorted(ours) == sorted(theirs) == sorted(tensors)
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and ours[k].shape == t.shape and torch.equal(ours[k], t), k
        assert torch.equal(ours[k], theirs[k])
    with pytest.raises(TypeError, match="complex"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_checkpoint_tensors_file_on_a_big_endian_host_goes_through_safetensors_own_writer(tmp_path, monkeypatch):
    """The streaming writer copies each tensor's memory as the file's bytes, which are little-endian: on a
    big-endian host safetensors' writer (which converts) writes the file instead, read back as the same tensors."""
    from types import SimpleNamespace

    import safetensors.torch as st

    from prefopt.backends import checkpoint

    calls = []
    real = st.save_file
    monkeypatch.setattr(st, "save_file", lambda t, p, **kw: calls.append(p) or real(t, p, **kw))
    monkeypatch.setattr(checkpoint, "sys", SimpleNamespace(byteorder="big"))
    tensors = {"w": torch.arange(6.0).reshape(2, 3).t(), "ids": torch.arange(3)}  # one not contiguous
    checkpoint.write_safetensors(tensors, tmp_path / "b.safetensors")
    assert calls == [str(tmp_path / "b.safetensors")]
    back = st.load_file(str(tmp_path / "b.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
