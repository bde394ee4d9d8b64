"""Where a PPO step's time goes: the peer benchmark's work (SmolLM2-135M, LoRA, 16 rollouts x 32 new tokens, 4
epochs, fp32) in this process, each phase timed by wrapping prefopt's functions (outermost call only, so nested
calls are not counted twice): rollout sampling, reward-model scoring, the no-gradient scoring passes (policy
log-probs and values, reference log-probs), and the update (every accumulated forward + backward + step). For the
update -- the training part of the step -- it also counts the model FLOPs of the micro-batches it ran (per padded
token 2 x non-embedding parameters forward and as many for the backward's input gradient: the frozen base gets no
weight gradient; per response position 2 x 2 x the LM head's V x H; attention scores and LoRA left out, under 3%
here) and prints the achieved rate beside this process's 1024^3 fp32 GEMM rate. Usage:

    python benchmarks/ppo_phases.py --steps 3 --out /tmp/ppo_phases.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo_memory  # noqa: E402
import ppo_peer  # noqa: E402
import step_memory  # noqa: E402

PHASES = {"sample": "rollout sampling", "sample_states": "rollout sampling", "rm_score": "reward-model scoring",
          "hidden_states": "scoring passes (trunk)", "logprob_stats": "scoring passes (LM head)",
          "accumulated_step": "update (forward + backward + step)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=ppo_peer.THREADS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import prefopt.backends.ppo as P
    from prefopt.backends import rm as RM

    spent: dict[str, float] = collections.defaultdict(float)
    depth = [0]

    def timed(owner, name, label):
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*a, **k):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[label] += time.perf_counter() - t

        setattr(owner, name, g)

    for name in ("sample", "sample_states", "hidden_states", "logprob_stats", "accumulated_step"):
        timed(P, name, PHASES[name])
    counted = {"padded_tokens": 0, "response_positions": 0}
    plain_batch = P.make_batch

    def counting_batch(*a, **k):  # the update's micro-batches are built inside accumulated_step (depth > 0)
        b = plain_batch(*a, **k)
        if depth[0] > 0:
            counted["padded_tokens"] += b.input_ids.numel()
            counted["response_positions"] += b.response_ids.numel()
        return b

    P.make_batch = counting_batch
    timed(RM.RewardModel, "score_ids", PHASES["rm_score"])
    row = ppo_memory.run_layout("shared", ppo_peer.MODEL, args.steps, args.threads, ppo_overrides=dict(ppo_peer.SAME_WORK))
    total = sum(row["step_times_s"])
    phases = {k: {"s_per_step": round(v / args.steps, 2), "share": round(v / total, 3)} for k, v in spent.items()}
    other = total - sum(spent.values())
    phases["other (advantages, bookkeeping)"] = {"s_per_step": round(other / args.steps, 2), "share": round(other / total, 3)}
    import torch

    from prefopt.models.base import load_base  # the parameter counts of the model the row ran

    lm, _ = load_base(ppo_peer.MODEL, device=torch.device("cpu"), seed=0)
    n_params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and "lora" not in n)
    head = lm.get_output_embeddings().weight.numel()
    del lm
    flops = 4 * n_params * counted["padded_tokens"] + 4 * head * counted["response_positions"]
    update_s = spent[PHASES["accumulated_step"]]
    flop_rate = {"update_gflop_per_step": round(flops / args.steps / 1e9, 1),
                 "update_achieved_gflops": round(flops / update_s / 1e9, 1),
                 "gemm_gflops_1024": round(step_memory.gemm_gflops(args.threads), 1),
                 "padded_tokens_per_step": counted["padded_tokens"] / args.steps,
                 "response_positions_per_step": counted["response_positions"] / args.steps,
                 "non_embedding_params": n_params, "lm_head_params": head}
    doc = {"benchmark": "ppo_phases", "command": "python benchmarks/ppo_phases.py " + " ".join(sys.argv[1:]),
           "work": ppo_peer.SAME_WORK, "threads": args.threads, "step_times_s": row["step_times_s"], "phases": phases,
           "flop_rate": flop_rate}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for k, v in phases.items():
        print(f"{k:36s} {v['s_per_step']:6.2f} s/step  {100 * v['share']:5.1f}%")
    print(f"update: {flop_rate['update_gflop_per_step']} GFLOP a step at {flop_rate['update_achieved_gflops']} GFLOP/s; "
          f"this process's 1024^3 fp32 GEMM: {flop_rate['gemm_gflops_1024']} GFLOP/s")


if __name__ == "__main__":
    main()
