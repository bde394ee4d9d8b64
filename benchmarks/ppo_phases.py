"""Where a PPO step's time goes: the peer benchmark's work (SmolLM2-135M, LoRA, 16 rollouts x 32 new tokens, 4
epochs, fp32) in this process, each phase timed by wrapping prefopt's functions (outermost call only, so nested
calls are not counted twice): rollout sampling, reward-model scoring, the no-gradient scoring passes (policy
log-probs and values, reference log-probs), and the update (every accumulated forward + backward + step). Usage:

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

PHASES = {"sample": "rollout sampling", "rm_score": "reward-model scoring",
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

    for name in ("sample", "hidden_states", "logprob_stats", "accumulated_step"):
        timed(P, name, name)
    timed(RM.RewardModel, "score_ids", "rm_score")
    row = ppo_memory.run_layout("shared", ppo_peer.MODEL, args.steps, args.threads, ppo_overrides=dict(ppo_peer.SAME_WORK))
    total = sum(row["step_times_s"])
    phases = {PHASES[k]: {"s_per_step": round(v / args.steps, 2), "share": round(v / total, 3)} for k, v in spent.items()}
    other = total - sum(spent.values())
    phases["other (advantages, bookkeeping)"] = {"s_per_step": round(other / args.steps, 2), "share": round(other / total, 3)}
    doc = {"benchmark": "ppo_phases", "command": "python benchmarks/ppo_phases.py " + " ".join(sys.argv[1:]),
           "work": ppo_peer.SAME_WORK, "threads": args.threads, "step_times_s": row["step_times_s"], "phases": phases}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for k, v in phases.items():
        print(f"{k:36s} {v['s_per_step']:6.2f} s/step  {100 * v['share']:5.1f}%")


if __name__ == "__main__":
    main()
