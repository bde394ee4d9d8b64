"""Wall time and peak memory of `prefopt bench`, side by side in one invocation: each configuration runs as its own
`prefopt bench` process (peak RSS is that process's, read from the kernel's rusage of the child), one after the
other on the same machine, so their ratio is measured under the same conditions.

Give the presets to compare (the first is "after"), or --run LABEL=PRESET[;KEY=VALUE...] for runs that differ in
their overrides, and --set overrides applied to every run. Writes the stage timings, the peak RSS, the comparison
tables of every run and the wall-time ratio of the first two to --out. Usage:

    python benchmarks/bench_speed.py --presets default --out results/bench_speed.json     # one default run (~5 min)
    python benchmarks/bench_speed.py --presets smoke,smoke --out /tmp/b.json              # quick check
    python benchmarks/bench_speed.py --run "small=default;ppo.micro_batch_tokens=128" --run base=default --out b.json
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


def run_one(label: str, preset: str, sets: list[str], work: Path, code: str | None = None) -> dict:
    out = work / f"run-{label}"
    # "env:VAR=VALUE" items set the run's environment (e.g. env:LD_PRELOAD=... to try another allocator)
    env = dict(os.environ) | {k: v for k, _, v in (s[4:].partition("=") for s in sets if s.startswith("env:"))}
    sets = [s for s in sets if not s.startswith("env:")]
    cmd = [sys.executable, "-m", "prefopt", "bench", "--preset", preset, "--out", str(out), "--overwrite"]
    # `python -m` puts the working directory first on the path: run in another checkout (e.g. a worktree of the
    # 'before' commit) to run its prefopt
    cwd = str(Path(code).resolve()) if code else None
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{label}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
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
    return {"label": label, "code": code or ".", "commit": _commit(code or "."), "preset": preset, "sets": sets,
            "env": {k: v for k, v in env.items() if os.environ.get(k) != v},
            "command": "prefopt " + " ".join(cmd[3:]), "wall_s": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "stage_s": doc["meta"]["timings_s"], "table": table,
            "comparison_md": (out / "comparison.md").read_text()}


def _commit(code: str) -> str:
    try:
        rev = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="default", help="Presets to run, in order (the first is 'after').")
    ap.add_argument("--run", dest="runs", action="append", default=[],
                    help="LABEL[@CODE_DIR]=PRESET[;KEY=VALUE...]: one run with its own overrides (env:VAR=VALUE sets "
                         "an environment variable of that run), optionally with the prefopt of another checkout "
                         "(repeatable; replaces --presets).")
    ap.add_argument("--keep", help="Copy every run's folder to KEEP/LABEL.")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="An override for every run.")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    plan = []
    for spec in args.runs:
        label, sep, rest = spec.partition("=")
        label, _, code = label.partition("@")
        if not sep or not label or not rest:
            sys.exit(f"--run {spec!r}: expected LABEL[@CODE_DIR]=PRESET[;KEY=VALUE...]")
        if code and not (Path(code) / "prefopt" / "__init__.py").is_file():
            sys.exit(f"--run {spec!r}: {code} holds no prefopt package")
        preset, *own = rest.split(";")
        plan.append((label, preset, own + args.sets, code or None))
    if not plan:
        plan = [(f"{p}-{i}" if args.presets.split(",").count(p) > 1 else p, p, args.sets, None)
                for i, p in enumerate(args.presets.split(","))]
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    rows = []
    try:
        for label, preset, sets, code in plan:
            row = run_one(label, preset, sets, work, code)
            rows.append(row)
            if args.keep:
                shutil.copytree(work / f"run-{label}", Path(args.keep) / label, dirs_exist_ok=True)
            print(f"{label:10s} {row['wall_s']:7.1f} s wall, peak RSS {row['peak_rss_mib']} MiB, stages {row['stage_s']}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("PREFOPT_BASE_CACHE",) if k in os.environ)
    doc = {"benchmark": "bench_speed",
           "command": (env + " " if env else "") + "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:]),
           "threads": os.cpu_count(), "rows": rows}
    if len(rows) > 1:
        doc["wall_ratio"] = round(rows[0]["wall_s"] / rows[1]["wall_s"], 3)
        doc["wall_vs_first"] = {r["label"]: round(r["wall_s"] / rows[0]["wall_s"], 3) for r in rows}
        doc["peak_rss_vs_first"] = {r["label"]: round(r["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3) for r in rows}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
