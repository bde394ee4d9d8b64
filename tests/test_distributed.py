"""PPO on two CPU processes under `accelerate launch`: ranks sample different rollouts and stay in sync.

accelerate 1.x's `--cpu` launcher starts one process unless an MPI hostfile is given; `--multi_gpu` starts
torchrun workers, which on a machine without CUDA run as MULTI_CPU over gloo (prefopt builds accelerate's
state with cpu=True there).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_process_ppo_ranks_stay_in_sync(tmp_path):
    script = Path(__file__).with_name("_dist_ppo.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["moved"] and r1["moved"]
    assert r0["rollouts"] != r1["rollouts"]  # each rank samples its own rollouts...
    for k in r0["params"]:  # ...and gradients are averaged, so the weights stay identical
        assert r0["params"][k] == pytest.approx(r1["params"][k], abs=1e-6), k
    for m0, m1 in zip(r0["metrics"], r1["metrics"]):
        assert m0["train/kl"] == pytest.approx(m1["train/kl"]) and m0["train/score"] == pytest.approx(m1["train/score"])
