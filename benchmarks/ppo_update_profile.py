"""A torch.profiler table of the PPO update on the peer benchmark's work (SmolLM2-135M, LoRA, 16 rollouts x 32
new tokens, 4 epochs, fp32, 2 threads): two PPO steps in this process, the four update epochs of the second one
profiled (``accumulated_step`` calls 5-8), the first epoch's table by self time and the four epochs' self-time
totals per operator. Usage (about 1 minute):

    python benchmarks/ppo_update_profile.py > results/ppo_update_profile.txt
"""

import collections
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo_memory  # noqa: E402
import ppo_peer  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import prefopt.backends.ppo as P  # noqa: E402

calls, profs = [0], []
plain = P.accumulated_step


@functools.wraps(plain)
def profiled(*a, **k):
    calls[0] += 1
    if calls[0] in (5, 6, 7, 8):  # the second step's four epochs (one minibatch an epoch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = plain(*a, **k)
        profs.append(prof)
        return out
    return plain(*a, **k)


P.accumulated_step = profiled
row = ppo_memory.run_layout("shared", ppo_peer.MODEL, 2, ppo_peer.THREADS, ppo_overrides=dict(ppo_peer.SAME_WORK))
print("step times (s):", [round(t, 2) for t in row["step_times_s"]], "(the second one under the profiler)")
print(profs[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
total = collections.Counter()
for prof in profs:
    for e in prof.key_averages():
        total[e.key] += e.self_cpu_time_total
print("self time over the 4 epochs (s):")
for k, v in total.most_common(25):
    print(f"{v / 1e6:8.3f} {k}")
