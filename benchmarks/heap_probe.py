"""What a `prefopt` command's resident memory is made of at its peak: live heap blocks, free heap blocks glibc
keeps, mapped blocks, and the rest (code, libraries, stacks).

Runs the command in this process (`prefopt.cli.app`) while a thread samples RSS (``/proc/self/statm``) every
``--interval`` ms; at every new RSS high it also reads glibc's ``mallinfo2`` (summed over all arenas): ``arena``
(heap bytes obtained with brk/sbrk and arena mappings), ``in_use`` (``uordblks``: bytes in allocated heap
blocks), ``free`` (``fordblks``: bytes in free heap blocks still resident or at least reserved) and ``mapped``
(``hblkhd``: blocks above the mmap threshold, each its own mapping). ``other`` = RSS - arena - mapped. The JSON
holds the sample at the peak and a trace (one sample per ``--trace`` seconds). glibc only. Usage:

    python benchmarks/heap_probe.py --out results/heap_probe_ppo.json -- \
        bench --set policies=ppo --cache /tmp/c --out /tmp/run --overwrite
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _sampler(interval: float, trace_every: float, stop: threading.Event, state: dict) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    statm = open("/proc/self/statm", "rb")
    t0, last_trace = time.perf_counter(), -1e9

    def read(rss: int, t: float) -> dict:
        m = libc.mallinfo2()
        return {"t_s": round(t, 2), "rss_mib": round(rss / MIB, 1), "arena_mib": round(m.arena / MIB, 1),
                "in_use_mib": round(m.uordblks / MIB, 1), "free_mib": round(m.fordblks / MIB, 1),
                "mapped_mib": round(m.hblkhd / MIB, 1),
                "other_mib": round((rss - m.arena - m.hblkhd) / MIB, 1)}

    while not stop.wait(interval):
        statm.seek(0)
        rss = int(statm.read().split()[1]) * page
        t = time.perf_counter() - t0
        if rss > state["peak_bytes"]:
            state["peak_bytes"] = rss
            state["peak"] = read(rss, t)
        if t - last_trace >= trace_every:
            state["trace"].append(read(rss, t))
            last_trace = t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=5.0, help="Sampling period in ms.")
    ap.add_argument("--trace", type=float, default=2.0, help="Seconds between trace samples.")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the prefopt command's arguments.")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        sys.exit("give the prefopt command after --")
    state: dict = {"peak_bytes": 0, "peak": None, "trace": []}
    stop = threading.Event()
    th = threading.Thread(target=_sampler, args=(args.interval / 1000, args.trace, stop, state), daemon=True)
    th.start()
    from prefopt.cli import app
    t0 = time.perf_counter()
    try:  # not standalone: click returns an Exit's code instead of raising it
        code = app(args=cmd, prog_name="prefopt", standalone_mode=False) or 0
    except SystemExit as e:
        code = e.code or 0
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    doc = {"benchmark": "heap_probe", "command": "python benchmarks/heap_probe.py " + " ".join(sys.argv[1:]),
           "exit_code": code, "wall_s": round(wall, 1), "env": {k: os.environ[k] for k in os.environ
                                                                if k.startswith(("MALLOC_", "GLIBC_", "LD_PRELOAD"))},
           "peak": state["peak"], "trace": state["trace"]}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    p = state["peak"]
    if p is None:
        sys.exit(f"no sample taken (exit code {code})")
    print(f"peak RSS {p['rss_mib']} MiB at {p['t_s']} s: heap {p['arena_mib']} MiB (in use {p['in_use_mib']}, "
          f"free {p['free_mib']}), mapped {p['mapped_mib']}, other {p['other_mib']}")


if __name__ == "__main__":
    main()
