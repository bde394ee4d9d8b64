"""ATen's fp32 linear (MKL) against oneDNN's (``torch.ops.mkldnn._linear_pointwise``, what prefopt/models/kernels.py
routes the frozen base through), on SmolLM2-135M's matrix shapes at the row counts prefopt runs: a decoding step
(1, 16 rows), a scoring chunk (64), training micro-batches (200, 700); forward ``x @ W.T`` and the input gradient
``grad @ W``, the weight stored column-major as the shared base stores it. Each product is timed over a set of
distinct weights (no cache reuse across calls), the two kernels taking turns, round after round. Also the
1024^3 GEMM rate of each, the CPU's capability as torch reads it, and the largest difference between the two
kernels' outputs. Usage (about 2 minutes):

    python benchmarks/linear_kernels.py --out results/linear_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_memory  # noqa: E402
from prefopt.models.kernels import _dnn  # noqa: E402

SHAPES = {"q/o proj": (576, 576), "k/v proj": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
          "LM head": (49152, 576)}
ROWS = (1, 16, 64, 200, 700)


def timed(f, reps: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for name, (n, k) in SHAPES.items():
        count = 2 if n > 10_000 else 24  # distinct weights: each call reads its weight from memory
        ws = [(torch.randn(n, k, generator=g) / k**0.5).t().contiguous().t() for _ in range(count)]
        for m in ROWS:
            if n > 10_000 and m > 200:
                continue
            x = torch.randn(m, k, generator=g)
            dy = torch.randn(m, n, generator=g)
            runs = {
                ("forward", "aten"): lambda: [F.linear(x, w) for w in ws],
                ("forward", "onednn"): lambda: [_dnn(x, w) for w in ws],
                ("input grad", "aten"): lambda: [dy @ w for w in ws],
                ("input grad", "onednn"): lambda: [_dnn(dy, w.t()) for w in ws],
            }
            times = {key: [] for key in runs}
            for r in range(args.rounds):
                for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    times[key].append(timed(runs[key], 2) / count)
            flop = 2 * m * n * k
            for way in ("forward", "input grad"):
                a = statistics.median(times[(way, "aten")])
                o = statistics.median(times[(way, "onednn")])
                diff = ((_dnn(x, ws[0]) - F.linear(x, ws[0])) if way == "forward" else
                        (_dnn(dy, ws[0].t()) - dy @ ws[0])).abs().max().item()
                row = {"matrix": name, "out": n, "in": k, "rows": m, "pass": way, "aten_ms": round(a * 1e3, 4),
                       "onednn_ms": round(o * 1e3, 4), "aten_gflops": round(flop / a / 1e9, 1),
                       "onednn_gflops": round(flop / o / 1e9, 1), "onednn_vs_aten": round(o / a, 3),
                       "max_abs_diff": diff}
                rows_out.append(row)
                print(f"{name:9s} {n:5d}x{k:4d} rows {m:4d} {way:10s} aten {a * 1e3:8.3f} ms "
                      f"({row['aten_gflops']:5.0f} GFLOP/s)  onednn {o * 1e3:8.3f} ms ({row['onednn_gflops']:5.0f})  "
                      f"x{row['onednn_vs_aten']:.2f}  diff {diff:.1e}", flush=True)
    gemm = {k: step_memory.gemm_gflops(args.threads, kernel=k) for k in ("aten", "onednn")}
    print("1024^3 GEMM GFLOP/s:", {k: round(v, 1) for k, v in gemm.items()})
    doc = {"benchmark": "linear_kernels", "command": "python benchmarks/linear_kernels.py " + " ".join(sys.argv[1:]),
           "threads": args.threads, "rounds": args.rounds, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "torch": torch.__version__, "gemm_gflops_1024": {k: round(v, 1) for k, v in gemm.items()}, "rows": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
