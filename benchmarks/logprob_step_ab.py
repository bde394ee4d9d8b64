"""A/B of one training forward+backward and one no-grad log-prob pass (SmolLM2-135M, LoRA, 16 x (prompt + 32)
tokens, 1 thread) between two checkouts of prefopt, run one after the other:

    git worktree add /tmp/old <commit>
    for root in /tmp/old .; do python benchmarks/logprob_step_ab.py $root; done

Measured 2026-12-01 (e1a25b1 vs 123d6b2, the other core running CI): fwd+bwd 5.45 vs 4.99 s, no-grad 2.40 vs 2.21 s.
"""
import sys
import time

import torch
sys.path.insert(0, sys.argv[1])
import prefopt; print(prefopt.__file__)
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase
from prefopt.models.ops import encode_prompts, make_batch, response_logprobs
from prefopt.data.tasks import sentiment_prompts
torch.set_num_threads(1)
lm, tok = load_base("smollm2-135m-instruct", device=torch.device("cpu"), seed=0)
shared = SharedBase(lm, tok, LoraSettings()); shared.add_role("policy", head=True)
prompts = encode_prompts([p.prompt for p in sentiment_prompts()[:16]], tok, 64)
resp = [[100 + i] * 32 for i in range(16)]
b = make_batch(prompts, resp, tok.pad_token_id, "cpu")
def step(m):
    lp = response_logprobs(m, b); lp.sum().backward()
with shared.role("policy") as m:
    step(m); ts = []
    for _ in range(3):
        t = time.perf_counter(); step(m); ts.append(time.perf_counter() - t)
    print("fwd+bwd 16x(P+32):", [round(x, 2) for x in ts])
    with torch.no_grad():
        ts = []
        for _ in range(3):
            t = time.perf_counter(); response_logprobs(m, b); ts.append(time.perf_counter() - t)
        print("no-grad logprobs 16:", [round(x, 2) for x in ts])
