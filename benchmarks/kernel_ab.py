"""The PPO step on the peer benchmark's work (SmolLM2-135M, LoRA, 16 rollouts x 32 new tokens, 4 epochs, fp32,
2 threads, jemalloc) with the frozen base's products by ATen (MKL) and by oneDNN (prefopt/models/kernels.py,
``PREFOPT_LINEAR``), each run in its own process, the two taking turns round after round so a slow spell of this
shared machine slows both alike. Seconds per step (the median step of each run) and peak RSS. Usage (about 5
minutes for 2 rounds):

    python benchmarks/kernel_ab.py --rounds 2 --out results/kernel_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = f"""
import json, sys
sys.path.insert(0, {str(HERE)!r})
import ppo_memory, ppo_peer
from prefopt.models.kernels import linear_kernel
row = ppo_memory.run_layout("shared", ppo_peer.MODEL, 3, ppo_peer.THREADS, ppo_overrides=dict(ppo_peer.SAME_WORK))
print("ROW " + json.dumps({{"linear_kernel": linear_kernel(), "step_times_s": row["step_times_s"],
                            "peak_rss_mib": row["peak_rss_mib"]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from prefopt._alloc import find_jemalloc

    jemalloc = find_jemalloc()
    runs: dict[str, list[dict]] = {"aten": [], "onednn": []}
    for r in range(args.rounds):
        for kernel in (("aten", "onednn") if r % 2 == 0 else ("onednn", "aten")):
            env = dict(os.environ, PREFOPT_LINEAR=kernel)
            if jemalloc and "jemalloc" not in env.get("LD_PRELOAD", ""):
                env["LD_PRELOAD"] = jemalloc  # what the prefopt command runs under where it is installed
            res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
            rows = [line[4:] for line in res.stdout.splitlines() if line.startswith("ROW ")]
            if res.returncode or not rows:
                sys.exit(f"{kernel} run failed:\n{res.stderr[-3000:]}")
            row = json.loads(rows[0])
            if row["linear_kernel"] != kernel:
                sys.exit(f"asked for {kernel}, the child ran {row['linear_kernel']} (PREFOPT_LINEAR=onednn needs AVX-512?)")
            row["s_per_step"] = statistics.median(row["step_times_s"])
            runs[kernel].append(row)
            print(f"round {r + 1} {kernel:6s} {row['s_per_step']:6.2f} s/step  peak {row['peak_rss_mib']:7.1f} MiB  "
                  f"steps {[round(t, 2) for t in row['step_times_s']]}", flush=True)
    med = {k: statistics.median(x["s_per_step"] for x in v) for k, v in runs.items()}
    doc = {"benchmark": "kernel_ab", "command": "python benchmarks/kernel_ab.py " + " ".join(sys.argv[1:]),
           "rounds": args.rounds, "s_per_step": {k: round(v, 2) for k, v in med.items()},
           "onednn_vs_aten": round(med["onednn"] / med["aten"], 3),
           "peak_rss_mib": {k: max(x["peak_rss_mib"] for x in v) for k, v in runs.items()}, "runs": runs}
    print(f"onednn / aten: {doc['onednn_vs_aten']} ({med['onednn']:.2f} / {med['aten']:.2f} s per step)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
