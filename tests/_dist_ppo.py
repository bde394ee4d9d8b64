"""Run by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun, gloo)."""

import json
import sys

import torch
from prefopt.backends import ppo
from prefopt.backends._common import TrainData
from prefopt.backends._common import dist_state
from prefopt.models.base import load_base
from prefopt.models.ops import encode_prompts
from prefopt.models.shared import LoraSettings, SharedBase

torch.set_num_threads(1)
out = sys.argv[1]
state = dist_state()
lm, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
prompts = encode_prompts([f"prompt {i}" for i in range(8)], tok, 32)
target = tok("e", add_special_tokens=False).input_ids[0]
seen = []


def score_fn(p, r):
    seen.append([list(x) for x in r])
    return torch.tensor([sum(x == target for x in resp) / max(len(resp), 1) for resp in r])


log = []
cfg = ppo.PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, learning_rate=1e-2, seed=0)
shared.add_role("ppo", head=True)
before = {k: v.clone() for k, v in shared.adapter_state("ppo").items()}
ppo.train(shared, cfg, TrainData(prompts=prompts, score_fn=score_fn), on_step=lambda s, m: log.append(m))
after = shared.adapter_state("ppo")
with open(f"{out}/rank{state.process_index}.json", "w") as f:
    json.dump({
        "rank": state.process_index,
        "world": state.num_processes,
        "params": {k: v.flatten().tolist() for k, v in after.items()},
        "moved": any(not torch.equal(before[k], after[k]) for k in after),
        "metrics": log,
        "rollouts": seen,
    }, f)
