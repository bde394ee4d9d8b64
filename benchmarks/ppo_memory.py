"""Memory and speed of a PPO step: four roles on one base (prefopt) vs a naive four-copies layout.

Each layout runs in a fresh subprocess (peak RSS is per process), same PPO settings, same prompts:

  shared          one base: policy adapter + value head on its trunk, reward-model adapter + head, reference =
                  adapters off (prefopt's default)
  shared-vadapter one base, but the value function gets its own LoRA adapter + head (one more forward per step)
  copies          four full copies of the base: policy (LoRA), value model (LoRA + head), reference (frozen),
                  reward model (LoRA + head) — the roles of trl <= 0.29's PPOTrainer, which goes further and
                  trains its whole value model (benchmarks/ppo_peer.py runs trl itself)

Reported: bytes of resident model weights (unique tensor storages), peak RSS after loading and after the PPO
steps (the counter is reset after loading, so the step peak excludes GGUF dequantisation), seconds per PPO
step (mean of the steps after the first). Usage:

    python benchmarks/ppo_memory.py --out results/ppo_memory.json            # all layouts, SmolLM2-135M
    python benchmarks/ppo_memory.py --model tiny --steps 2 --out /tmp/m.json  # quick check
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

LAYOUTS = ("shared", "shared-vadapter", "copies")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    """Peak RSS since the last _reset_peak() (VmHWM); the process-lifetime peak if it could not be reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0), so the PPO steps' peak is not the model loading's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS so RSS reflects live memory
    except OSError:
        pass


def _weight_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def run_layout(layout: str, model: str, steps: int, threads: int, ppo_overrides: dict | None = None,
               checkpoint_activations: bool = False, bounded_heap: bool = False) -> dict:
    """One layout's PPO steps in this process; ``ppo_overrides``: PPOConfig fields other than the defaults;
    ``bounded_heap``: the config's fixed glibc mmap threshold (prefopt/_alloc.py)."""
    if bounded_heap:
        from prefopt._alloc import bound_heap

        bound_heap()
    import torch

    from prefopt.backends import ppo
    from prefopt.backends._common import TrainData
    from prefopt.backends.rm import RewardConfig, RewardModel
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.models.base import load_base
    from prefopt.models.ops import encode_prompts
    from prefopt.models.shared import LoraSettings, SharedBase

    torch.set_num_threads(threads)
    lm, tok = load_base(model, device=torch.device("cpu"), seed=0)
    _trim()
    rss_base = _rss_mib()
    lora = LoraSettings()
    cfg = ppo.PPOConfig(**{**(ppo_overrides or {}), "steps": steps, "value_adapter": layout != "shared", "seed": 0})
    if layout == "copies":
        policy = SharedBase(lm, tok, lora, checkpoint_activations)
        value = SharedBase(copy.deepcopy(lm), tok, lora)
        reference = SharedBase(copy.deepcopy(lm), tok, lora)
        reward = SharedBase(copy.deepcopy(lm), tok, lora)
        bases = [policy, value, reference, reward]
    else:
        policy = value = reference = reward = SharedBase(lm, tok, lora, checkpoint_activations)
        bases = [policy]
    reward.add_role("rm", head=True)
    rm = RewardModel(reward, RewardConfig())
    _trim()
    loaded = {"rss_after_load_mib": _rss_mib(), "rss_base_model_mib": rss_base,
              "load_peak_rss_mib": _peak_rss_mib(), "peak_reset": _reset_peak()}
    prompts = encode_prompts([p.prompt for p in sentiment_prompts()[:64]], tok, cfg.max_prompt_tokens)
    times: list[float] = []
    ppo.train(policy, cfg, TrainData(prompts=prompts, score_fn=rm.score_ids),
              reference=reference if layout == "copies" else None,
              value_base=value if layout == "copies" else None,
              on_step=lambda s, m: times.append(m["time/step_s"]))
    modules = [b.lm for b in bases] + [h for b in bases for h in b.heads.values()]
    after = times[1:] or times
    return {
        "layout": layout, "model": model, "threads": threads, "steps": steps,
        "checkpoint_activations": checkpoint_activations, "bounded_heap": bounded_heap,
        "ppo": {k: getattr(cfg, k) for k in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                                             "micro_batch_tokens")},
        "weight_bytes": _weight_bytes(*modules),
        **loaded,
        "peak_rss_mib": _peak_rss_mib(),  # of the PPO steps (since the reset)
        "s_per_step": sum(after) / len(after),
        "step_times_s": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_layout(args.child, args.model, args.steps, args.threads)))
        return
    rows = []
    for layout in args.layouts.split(","):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, __file__, "--child", layout, "--model", args.model, "--steps", str(args.steps),
             "--threads", str(args.threads), "--out", args.out],
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            sys.exit(f"layout {layout} failed:\n{res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{layout:16s} weights {row['weight_bytes'] / 2**20:8.1f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
              f"{row['s_per_step']:6.1f} s/step", flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "ppo_memory", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
