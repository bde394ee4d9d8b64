"""Where a PPO step's time goes: the peer benchmark's work (SmolLM2-135M, LoRA, 16 rollouts x 32 new tokens, 4
epochs, fp32) in this process, each phase timed by wrapping prefopt's functions (outermost call only, so nested
calls are not counted twice): rollout sampling, reward-model scoring, the no-gradient scoring passes (reference
log-probs; the policy's come from the sampling pass's states), and the update (every accumulated forward +
backward + step).

Then the floor. One more step runs under torch's ``FlopCounterMode`` (untimed: the counter's dispatch would slow
it), which counts every matmul's FLOPs, forward and backward, by phase; attention scores are not counted (CPU
flash attention has no formula; under 3% here). Each phase's achieved rate is its FLOPs over its measured seconds,
printed beside this process's 1024^3 fp32 GEMM rate by the kernel the base's linears ran (MKL's through ATen, or
oneDNN's where prefopt/models/kernels.py chose it; both rates are recorded), and the step's floor is its FLOPs at
that rate: what this algorithm's arithmetic costs on this CPU if every matmul ran as fast as a large square one. With
``--peer results/ppo_peer.json`` the floor is also given as a fraction of trl's measured step. Usage:

    python benchmarks/ppo_phases.py --steps 3 --peer results/ppo_peer.json --out /tmp/ppo_phases.json
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
          "head_stats": "scoring passes (LM head)",
          "accumulated_step": "update (forward + backward + step)"}


def count_onednn_linears() -> None:
    """Teach FlopCounterMode oneDNN's linear (prefopt/models/kernels.py): 2 * rows * out * in, like its mm."""
    import torch
    from torch.utils.flop_counter import register_flop_formula

    op = torch.ops.mkldnn._linear_pointwise
    if getattr(count_onednn_linears, "done", False) or not hasattr(op, "default"):
        return

    @register_flop_formula(op)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for d in x_shape[:-1]:
            rows *= d
        return 2 * rows * w_shape[0] * w_shape[1]

    count_onednn_linears.done = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=ppo_peer.THREADS)
    ap.add_argument("--peer", help="a ppo_peer.py result: the floor as a fraction of its trl step")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import prefopt.backends.ppo as P
    from prefopt.backends import rm as RM

    spent: dict[str, float] = collections.defaultdict(float)
    flops: dict[str, int] = collections.defaultdict(int)
    depth = [0]
    counter: list = []  # the FlopCounterMode of the counted (last, untimed) step, once entered
    steps_begun = [0]

    def timed(owner, name, label):
        f = getattr(owner, name)

        @functools.wraps(f)
        def g(*a, **k):
            if depth[0] == 0 and label == PHASES["sample"]:  # one rollout per step: a new step begins
                steps_begun[0] += 1
                if steps_begun[0] == args.steps + 1:
                    from torch.utils.flop_counter import FlopCounterMode

                    count_onednn_linears()
                    counter.append(FlopCounterMode(display=False))
                    counter[0].__enter__()
            depth[0] += 1
            t = time.perf_counter()
            f0 = counter[0].get_total_flops() if counter and depth[0] == 1 else 0
            try:
                return f(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    if counter:
                        flops[label] += counter[0].get_total_flops() - f0
                    else:
                        spent[label] += time.perf_counter() - t

        setattr(owner, name, g)

    for name in ("sample", "sample_states", "hidden_states", "logprob_stats", "head_stats", "accumulated_step"):
        timed(P, name, PHASES[name])
    timed(RM.RewardModel, "score_ids", PHASES["rm_score"])
    row = ppo_memory.run_layout("shared", ppo_peer.MODEL, args.steps + 1, args.threads,
                                ppo_overrides=dict(ppo_peer.SAME_WORK))
    step_flop = counter[0].get_total_flops()  # the counted step's, everything in it
    counter[0].__exit__(None, None, None)
    times = row["step_times_s"][: args.steps]  # the last step ran under the counter: not timed
    total = sum(times)
    phases = {k: {"s_per_step": round(v / args.steps, 2), "share": round(v / total, 3)} for k, v in spent.items()}
    other = total - sum(spent.values())
    phases["other (advantages, bookkeeping)"] = {"s_per_step": round(other / args.steps, 2), "share": round(other / total, 3)}
    rates = step_memory.gemm_rates(args.threads)
    gemm = rates["reference_gflops"]  # the rate of the kernel the base's linears ran
    for k, v in phases.items():
        f = flops.get(k, 0)
        v["gflop"] = round(f / 1e9, 1)
        v["achieved_gflops"] = round(f / 1e9 / v["s_per_step"], 1) if f and v["s_per_step"] > 0 else None
        v["floor_s"] = round(f / 1e9 / gemm, 2)
    step_s = total / args.steps
    floor = {"step_gflop": round(step_flop / 1e9, 1), "gemm_gflops_1024": round(gemm, 1),
             "linear_kernel": rates["linear_kernel"], "gemm_gflops_1024_by_kernel": rates["gemm_gflops_1024"],
             "step_s": round(step_s, 2), "floor_s": round(step_flop / 1e9 / gemm, 2),
             "achieved_gflops": round(step_flop / 1e9 / step_s, 1),
             "fraction_of_gemm": round(step_flop / 1e9 / step_s / gemm, 3),
             "counted": "FlopCounterMode over one extra step: every mm/addmm/bmm, forward and backward; not attention"}
    if args.peer:
        peer = json.loads(Path(args.peer).read_text())
        trl_s = peer["rows"]["trl"]["s_per_step"]
        floor.update({"trl_s_per_step": round(trl_s, 2), "floor_vs_trl": round(floor["floor_s"] / trl_s, 3),
                      "measured_vs_trl_here": round(step_s / trl_s, 3),
                      "target_vs_trl": peer.get("targets", {}).get("time"),
                      "fraction_of_gemm_the_target_needs": round(floor["floor_s"] / (peer["targets"]["time"] * trl_s), 3)
                      if peer.get("targets", {}).get("time") else None,
                      "peer_file": args.peer})
    import torch

    from prefopt.models.base import load_base  # the parameter counts of the model the row ran

    lm, _ = load_base(ppo_peer.MODEL, device=torch.device("cpu"), seed=0)
    n_params = sum(p.numel() for n, p in lm.named_parameters() if "embed" not in n and "lora" not in n)
    head = lm.get_output_embeddings().weight.numel()
    del lm
    update = phases[PHASES["accumulated_step"]]
    flop_rate = {"update_gflop_per_step": update["gflop"], "update_achieved_gflops": update["achieved_gflops"],
                 "gemm_gflops_1024": round(gemm, 1), "gemm_gflops_1024_by_kernel": rates["gemm_gflops_1024"],
                 "linear_kernel": rates["linear_kernel"], "non_embedding_params": n_params, "lm_head_params": head}
    doc = {"benchmark": "ppo_phases", "command": "python benchmarks/ppo_phases.py " + " ".join(sys.argv[1:]),
           "work": ppo_peer.SAME_WORK, "threads": args.threads, "step_times_s": times, "phases": phases,
           "flop_rate": flop_rate, "floor": floor}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'phase':34s} {'s/step':>7s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'floor s':>8s}")
    for k, v in phases.items():
        rate = f"{v['achieved_gflops']:8.1f}" if v["achieved_gflops"] else f"{'-':>8s}"
        print(f"{k:34s} {v['s_per_step']:7.2f} {100 * v['share']:5.1f}% {v['gflop']:7.1f} {rate} {v['floor_s']:8.2f}")
    print(f"step: {floor['step_gflop']} GFLOP in {floor['step_s']} s = {floor['achieved_gflops']} GFLOP/s; this "
          f"process's 1024^3 fp32 GEMM ({floor['linear_kernel']}, the kernel the base ran): "
          f"{floor['gemm_gflops_1024']} GFLOP/s -> floor {floor['floor_s']} s; by kernel: "
          f"{floor['gemm_gflops_1024_by_kernel']}")
    if args.peer:
        print(f"vs trl's {floor['trl_s_per_step']} s step: measured {floor['measured_vs_trl_here']}, floor "
              f"{floor['floor_vs_trl']}; the {floor['target_vs_trl']} target needs "
              f"{floor['fraction_of_gemm_the_target_needs']} of the GEMM rate over the whole step")

if __name__ == "__main__":
    main()
