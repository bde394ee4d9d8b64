"""Wall time and peak memory of `prefopt bench`, side by side in one invocation: each configuration runs as its own
`prefopt bench` process (peak RSS is that process's, read from the kernel's rusage of the child), one after the
other on the same machine, so their ratio is measured under the same conditions.

Give the presets to compare (the first is "after"), and --set overrides applied to every run. Writes the stage
timings, the peak RSS, the comparison tables of every run and the wall-time ratio of the first two to --out.
Usage:

    python benchmarks/bench_speed.py --presets default --out results/bench_speed.json     # one default run (~26 min)
    python benchmarks/bench_speed.py --presets smoke,smoke --out /tmp/b.json              # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(preset: str, sets: list[str], work: Path) -> dict:
    out = work / f"run-{preset}"
    cmd = [sys.executable, "-m", "prefopt", "bench", "--preset", preset, "--out", str(out), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{preset}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    doc = json.loads((out / "summary.json").read_text())
    rows = {(r["policy"], r["metric"]): r for r in doc["summary"]}
    table = {p: {m.split("/")[1]: [round(rows[(p, m)][k], 3) for k in ("mean", "lo", "hi")]
                 for m in ("eval/gold_reward", "eval/kl_to_ref", "eval/win_rate_vs_ref") if (p, m) in rows}
             for p in doc["policies"]}
    return {"preset": preset, "sets": sets, "command": "prefopt " + " ".join(cmd[3:]), "wall_s": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "stage_s": doc["meta"]["timings_s"], "table": table,
            "comparison_md": (out / "comparison.md").read_text()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="default", help="Presets to run, in order (the first is 'after').")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="An override for every run.")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    rows = []
    try:
        for preset in args.presets.split(","):
            row = run_one(preset, args.sets, work)
            rows.append(row)
            print(f"{preset:8s} {row['wall_s']:7.1f} s wall, peak RSS {row['peak_rss_mib']} MiB, stages {row['stage_s']}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "bench_speed", "command": "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:]),
           "threads": os.cpu_count(), "rows": rows}
    if len(rows) > 1:
        doc["wall_ratio"] = round(rows[0]["wall_s"] / rows[1]["wall_s"], 3)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
