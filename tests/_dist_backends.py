"""Run by tests/test_distributed.py: the reward model, DPO, SFT and RLOO trained on the tiny model, as one process
(`python _dist_backends.py OUT`) or under `accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun, gloo).
Each rank writes its final weights, its first step's gradient (captured where it is clipped) and its metrics."""

import copy
import json
import random
import sys

import torch

from prefopt.backends import dpo, rloo, rm, sft
from prefopt.backends._common import TrainData, dist_state
from prefopt.data.records import Demonstration, PreferencePair
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase

torch.set_num_threads(1)
out = sys.argv[1]
state = dist_state()
base, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
rng = random.Random(0)
word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 12)))  # noqa: E731
pairs = [PreferencePair(prompt=word() + "?", chosen=word(), rejected=word(), margin=None) for _ in range(12)]
demos = [Demonstration(p.prompt, p.chosen, {}) for p in pairs]
target = tok("e", add_special_tokens=False).input_ids[0]
rollouts = []


def score_fn(p, r):
    rollouts.append([list(x) for x in r])
    return torch.tensor([sum(x == target for x in resp) / max(len(resp), 1) for resp in r])


RUNS = {
    "rm": (rm.ROLE, lambda s, cb: rm.train(s, pairs, rm.RewardConfig(batch_size=6, epochs=2, learning_rate=1e-2,
                                                                         normalize_on=0, micro_batch_tokens=40), on_step=cb)),
    "dpo": ("dpo", lambda s, cb: dpo.train(s, dpo.DPOConfig(batch_size=6, epochs=2, learning_rate=1e-2, micro_batch_tokens=40),
                                           TrainData(pairs=pairs), on_step=cb)),
    "sft": ("sft", lambda s, cb: sft.train(s, sft.SFTConfig(batch_size=6, epochs=2, learning_rate=1e-2),
                                           TrainData(demos=demos), on_step=cb)),
    "online-dpo": ("dpo", lambda s, cb: dpo.train(s, dpo.DPOConfig(reward="gold", online_rounds=2, online_prompts=6, batch_size=2,
                                                                   max_response_tokens=5, learning_rate=1e-2),
                                                  TrainData(prompts=[p.prompt for p in pairs], score_fn=score_fn), on_step=cb)),
    "rloo": ("rloo", lambda s, cb: rloo.train(s, rloo.RLOOConfig(steps=2, batch_size=2, k=2, max_new_tokens=5, learning_rate=1e-2),
                                              TrainData(prompts=[p.prompt for p in pairs], score_fn=score_fn), on_step=cb)),
}
result = {"rank": state.process_index, "world": state.num_processes}
clip = torch.nn.utils.clip_grad_norm_
for name, (role, train) in RUNS.items():
    shared = SharedBase(copy.deepcopy(base), tok, LoraSettings(r=4, alpha=8))
    grads, log = [], []

    def capture(params, *a, **k):
        params = list(params)
        if not grads:
            grads.append([p.grad.flatten().tolist() for p in params])
        return clip(params, *a, **k)

    torch.nn.utils.clip_grad_norm_ = capture
    rollouts.clear()
    train(shared, lambda s, m: log.append({k: v for k, v in m.items() if k.startswith("train/")}))
    torch.nn.utils.clip_grad_norm_ = clip
    result[name] = {"weights": {k: v.flatten().tolist() for k, v in shared.adapter_state(role).items()},
                    "first_grad": grads[0], "metrics": log, "rollouts": list(rollouts)}
with open(f"{out}/{state.num_processes}-rank{state.process_index}.json", "w") as f:
    json.dump(result, f)
