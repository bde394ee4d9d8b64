"""Peak memory and time of reward-model and DPO steps on long pairs, by micro-batch token budget.

The issue's case: Anthropic-HH-like pairs (prompts of 128 tokens, responses of 64, 16 pairs a step) on
SmolLM2-135M. Each (stage, budget) runs in a fresh subprocess (peak RSS is per process; the counter is reset after
loading, so the peak is the steps'), same pairs, same seed; micro-batching changes only float summation order.
Reported per row: peak RSS (MiB) of the steps, RSS of the loaded base, seconds per step (mean after the first),
the achieved model FLOP rate of the steps (2 x non-embedding params x tokens forward, x2 for the backward's
activation gradients; LM head counted on response positions) and, measured in the same process, this CPU's fp32
GEMM rate. A budget with ``+ckpt`` (e.g. ``1024+ckpt``) also recomputes each decoder layer's activations in the
backward pass (``checkpoint_activations``; the FLOP rate counts the model's FLOPs, not the recomputation); with
``+heap`` the child fixes glibc's mmap threshold first (``bounded_heap``, ``prefopt/_alloc.py``); with ``+trim`` it
returns the heap's free pages to the OS after every micro-batch's backward pass (``trim_heap``); with ``+keep`` it
keeps freed blocks in the heap for reuse (``keep_heap``: what ``prefopt bench`` does by default). Suffixes combine
(``384+ckpt+trim``). Usage:

    python benchmarks/step_memory.py --out results/step_memory.json
    python benchmarks/step_memory.py --model tiny --steps 2 --out /tmp/s.json   # quick check
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import subprocess
import sys
import time

BUDGETS = ("none", "1024", "384", "1024+ckpt", "1024+heap")
STAGES = ("rm", "dpo")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def gemm_gflops(threads: int, n: int = 1024, reps: int = 20, kernel: str = "aten") -> float:
    """This process's fp32 n^3 GEMM rate: ATen's ``a @ b`` (MKL), or with ``kernel="onednn"`` the oneDNN product
    prefopt routes the frozen base's linears through (prefopt/models/kernels.py)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    if kernel == "onednn":
        from prefopt.models.kernels import _dnn

        f = lambda: _dnn(a, b)  # noqa: E731
    else:
        f = lambda: a @ b  # noqa: E731
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def gemm_rates(threads: int) -> dict:
    """Both GEMM rates, and the one of the kernel this process's linears use (the floor's reference)."""
    from prefopt.models.kernels import linear_kernel

    rates = {"aten": gemm_gflops(threads)}
    if linear_kernel() == "onednn":
        rates["onednn"] = gemm_gflops(threads, kernel="onednn")
    return {"gemm_gflops_1024": {k: round(v, 1) for k, v in rates.items()}, "linear_kernel": linear_kernel(),
            "reference_gflops": round(rates[linear_kernel()], 1)}


def run_child(stage: str, budget: str, model: str, steps: int, threads: int, prompt_tokens: int,
              response_tokens: int, batch: int) -> dict:
    import torch

    from prefopt.backends import dpo, rm
    from prefopt.backends._common import TrainData
    from prefopt.data.records import PreferencePair
    from prefopt.models.base import load_base
    from prefopt.models.shared import LoraSettings, SharedBase

    torch.set_num_threads(threads)
    lm, tok = load_base(model, device=torch.device("cpu"), seed=0)
    bounded = "+heap" in budget  # the config's bounded_heap: a fixed glibc mmap threshold
    recompute = "+ckpt" in budget
    trimmed = "+trim" in budget  # the config's trim_heap: malloc_trim after every micro-batch's backward pass
    kept = "+keep" in budget  # what `prefopt bench` does unless bounded_heap: freed blocks kept in the heap
    budget = budget.split("+")[0]
    if kept:
        from prefopt._alloc import keep_heap

        keep_heap()
    if bounded:
        from prefopt._alloc import bound_heap

        bound_heap()
    if trimmed:
        from prefopt._alloc import trim_heap

        trim_heap(True)
    shared = SharedBase(lm, tok, LoraSettings(), checkpoint_activations=recompute)
    rng = random.Random(0)
    vocab = list(range(min(200, tok.vocab_size // 4), min(tok.vocab_size, 20000)))

    def text(n: int) -> str:  # exactly n tokens once re-encoded is not guaranteed; the limits cut the rest
        return tok.decode([rng.choice(vocab) for _ in range(n)])

    pairs = [PreferencePair(prompt=text(2 * prompt_tokens), chosen=text(2 * response_tokens),
                            rejected=text(2 * response_tokens), margin=None) for _ in range(batch * steps)]
    micro = None if budget == "none" else int(budget)
    times: list[float] = []
    on_step = lambda s, m: times.append(m["time/step_s"])  # noqa: E731
    gc.collect()
    base_rss = _status("VmRSS")
    _reset_peak()
    if stage == "rm":
        cfg = rm.RewardConfig(epochs=1, batch_size=batch, max_prompt_tokens=prompt_tokens,
                              max_response_tokens=response_tokens, normalize_on=0, micro_batch_tokens=micro)
        rm.train(shared, pairs, cfg, on_step=on_step)
    else:
        cfg = dpo.DPOConfig(batch_size=batch, max_prompt_tokens=prompt_tokens, max_response_tokens=response_tokens,
                            micro_batch_tokens=micro)
        dpo.train(shared, cfg, TrainData(pairs=pairs), on_step=on_step)
    peak = _status("VmHWM")
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and "lora" not in n)
    head = lm.get_output_embeddings().weight.numel()
    tokens = batch * 2 * (prompt_tokens + response_tokens + 1)  # the widths every pair is cut/padded to (+EOS)
    flops = 2 * 2 * params * tokens + (2 * 2 * head * batch * 2 * (response_tokens + 1) if stage == "dpo" else 0)
    after = times[1:] or times
    s = sum(after) / len(after)
    return {"stage": stage, "micro_batch_tokens": micro, "checkpoint_activations": recompute,
            "bounded_heap": bounded, "trim_heap": trimmed, "keep_heap": kept, "model": model, "threads": threads, "steps": steps,
            "pairs_per_step": batch, "prompt_tokens": prompt_tokens, "response_tokens": response_tokens,
            "rss_base_mib": base_rss, "peak_rss_mib": peak, "s_per_step": s, "step_times_s": times,
            "model_gflop_per_step": flops / 1e9, "achieved_gflops": flops / s / 1e9,
            **gemm_rates(threads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    common = (args.model, args.steps, args.threads, args.prompt_tokens, args.response_tokens, args.batch)
    if args.child:
        stage, budget = args.child.split(":")
        print(json.dumps(run_child(stage, budget, *common)))
        return
    rows = []
    for stage in args.stages.split(","):
        for budget in args.budgets.split(","):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--child", f"{stage}:{budget}", *sys.argv[1:]],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{stage} budget {budget} failed:\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(f"{stage:4s} micro_batch_tokens {budget:>5s}: peak RSS {row['peak_rss_mib']:7.0f} MiB "
                  f"(base {row['rss_base_mib']:.0f})  {row['s_per_step']:6.1f} s/step  "
                  f"{row['achieved_gflops']:5.1f} of {row['reference_gflops']:.0f} GFLOP/s ({row['linear_kernel']})", flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "step_memory", "command": "python benchmarks/step_memory.py " + " ".join(sys.argv[1:]),
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
