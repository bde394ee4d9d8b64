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

# torchrun's rendezvous port (29500) is one per machine: these tests run one after another, on one xdist worker
pytestmark = pytest.mark.xdist_group("torchrun")


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


def _close(a, b, rel=1e-5):
    """Equal up to float rounding (a different summation order), relative to the largest entry."""
    scale = max(max((abs(x) for x in row), default=0.0) for row in a) or 1.0
    return all(len(x) == len(y) and all(abs(u - v) <= rel * scale for u, v in zip(x, y)) for x, y in zip(a, b))


def test_two_process_rm_dpo_sft_rloo_ranks_agree_and_match_one_process(tmp_path):
    """Every other backend data-parallel: the ranks end with identical weights; the reward model, DPO and SFT
    (no sampling) take exactly the one-process steps (first gradients and every step's loss agree up to float
    rounding); online DPO's ranks share each round's sampling exactly; RLOO's ranks sample different rollouts and
    average their gradients."""
    script = Path(__file__).with_name("_dist_backends.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "1-rank0.json").read_text())
    r0, r1 = (json.loads((tmp_path / f"2-rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and one["world"] == 1
    for name in ("rm", "dpo", "sft", "online-dpo", "rloo"):
        for k in r0[name]["weights"]:  # identical steps on both ranks
            assert r0[name]["weights"][k] == pytest.approx(r1[name]["weights"][k], abs=1e-7), (name, k)
        assert r0[name]["metrics"] == r1[name]["metrics"], name
    for name in ("rm", "dpo", "sft"):  # each rank half of every minibatch, gradients summed: the one-process step
        assert _close(one[name]["first_grad"], r0[name]["first_grad"]), name
        for m1, m2 in zip(one[name]["metrics"], r0[name]["metrics"], strict=True):
            assert m1["train/loss"] == pytest.approx(m2["train/loss"], rel=1e-4), name
    assert r0["rloo"]["rollouts"] != r1["rloo"]["rollouts"]  # each rank its own prompts and samples
    # online DPO: the ranks share each round's sampling, every rank labels all of it: the one-process pairs
    assert r0["online-dpo"]["rollouts"] == r1["online-dpo"]["rollouts"] == one["online-dpo"]["rollouts"]
    for m1, m2 in zip(one["online-dpo"]["metrics"], r0["online-dpo"]["metrics"], strict=True):
        assert m1["train/loss"] == pytest.approx(m2["train/loss"], rel=1e-4)


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def test_accelerate_launch_runs_the_whole_bench_on_two_processes(tmp_path):
    """`accelerate launch -m prefopt bench`: every stage on both ranks, rank 0 alone writes one run folder and
    prints one table; sampling is shared exactly (the synthetic pairs and the reference's evaluation are the
    one-process run's, bit for bit); the trained policies agree with one process within sampling noise."""
    from conftest import MICRO

    sets = [a for s in MICRO for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    one = subprocess.run([sys.executable, "-m", "prefopt", "bench", "--preset", "smoke", *sets, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*LAUNCH, "-m", "prefopt", "bench", "--preset", "smoke", *sets, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no second folder, no progress left
    assert two.stdout.count("run folder:") == 1 and two.stderr.count("reward model: ") == 1  # rank 0 speaks
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert a["meta"]["processes"] == 1 and b["meta"]["processes"] == 2
    from prefopt._alloc import find_jemalloc
    assert a["meta"]["allocator"] == b["meta"]["allocator"] == ("jemalloc" if find_jemalloc() else "system")
    assert (tmp_path / "one" / "pairs.jsonl").read_bytes() == (tmp_path / "two" / "pairs.jsonl").read_bytes()
    rows = lambda doc, pol: {r["metric"]: r for r in doc["summary"] if r["policy"] == pol}  # noqa: E731
    ref_a, ref_b = rows(a, "reference"), rows(b, "reference")
    # the reference's own samples are exact; its win rates against a trained policy follow that policy, whose samples
    # agree with one process's only within noise (checked below, as the policy's win rate against the reference)
    own = [m for m in ref_a if not m.startswith("eval/win_rate_vs_") or m == "eval/win_rate_vs_ref"]
    exact = [m for m in own if "proxy" not in m]  # proxy metrics: the reward model's steps differ by rounding
    assert len(exact) >= 6 and {m: ref_a[m] for m in exact} == {m: ref_b[m] for m in exact}
    for m in set(own) - set(exact):
        assert ref_a[m]["mean"] == pytest.approx(ref_b[m]["mean"], rel=1e-3, abs=1e-3), m
    for pol in ("ppo", "dpo"):
        for metric in ("eval/gold_reward", "eval/win_rate_vs_ref"):
            x, y = rows(a, pol)[metric], rows(b, pol)[metric]
            assert abs(x["mean"] - y["mean"]) <= 3 * (x["se"] + y["se"]) + 1e-9, (pol, metric, x, y)
    assert sorted(p.name for p in (tmp_path / "two" / "policies").iterdir()) == ["dpo", "ppo"]
