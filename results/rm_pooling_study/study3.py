"""RM study 3: pooling last / mean / content (mean over non-EOS response tokens; empty -> the prompt's last state).
Adds: how often the RM ranks the empty response ([EOS]) above a held-out reference sample of the same prompt,
against how often gold does."""
import copy, json, sys, time
import torch
from scipy.stats import spearmanr
from prefopt.backends import rm
import prefopt.models.ops as ops
from prefopt.data.io import load_pairs
from prefopt.data.judges import load_judge
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase

torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
D = "/work/probe/rmstudy"
seeds = [int(s) for s in sys.argv[1].split(",")]
variants = json.loads(sys.argv[2])
out = sys.argv[3]
lm, tok = load_base("smollm2-135m-instruct", device=torch.device("cpu"), seed=0)
EOS = tok.eos_token_id

def content_hidden(hidden, batch):
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    mask = (batch.response_mask * (batch.response_ids != EOS)).to(hidden.dtype).unsqueeze(-1)
    summed = (hidden[:, P:P+R] * mask).sum(1); count = mask.sum(1)
    return torch.where(count > 0, summed / count.clamp(min=1), hidden[:, P - 1])

def eos_out_hidden(hidden, batch):  # mean over all response tokens, but empty ([EOS]) -> prompt's last state
    P, R = batch.prompt_width, batch.response_ids.shape[1]
    mask = (batch.response_mask * (batch.response_ids != EOS)).to(hidden.dtype).unsqueeze(-1)
    full = batch.response_mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden[:, P:P+R] * full).sum(1); count = mask.sum(1)
    return torch.where(count > 0, summed / full.sum(1).clamp(min=1), hidden[:, P - 1])

orig = rm._scores
def scores(head, lm_, batch, pooling="last"):
    if pooling in ("content", "mean_nonempty"):
        hidden = ops.hidden_states(lm_, batch)
        h = content_hidden(hidden, batch) if pooling == "content" else eos_out_hidden(hidden, batch)
        return head(h.float()).squeeze(-1)
    return orig(head, lm_, batch, pooling)
rm._scores = scores
rm.RM_POOLING = ("last", "mean", "content", "mean_nonempty")

ev = load_pairs(f"{D}/eval.jsonl")
resp = {}
for p in ev:
    resp[(p.prompt, p.chosen)] = p.meta["score_chosen"]
    resp[(p.prompt, p.rejected)] = p.meta["score_rejected"]
keys = list(resp); gold = [resp[k] for k in keys]
judge = load_judge("vader")
prompt_set = sorted({k[0] for k in keys}, key=str)
g_empty = dict(zip(prompt_set, [float(x) for x in judge.score([ops.render_prompt(p, tok) for p in prompt_set], [""] * len(prompt_set))]))
gold_empty_wins = sum(g_empty[k[0]] > resp[k] for k in keys) / len(keys)
rows = []
for s in seeds:
    pairs = load_pairs(f"{D}/train-s{s}.jsonl")
    for name, over in variants.items():
        cfg = rm.RewardConfig(**{"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "normalize_on": 64,
                                 "micro_batch_tokens": 256, "seed": s, **over})
        shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=16, alpha=32))
        t = time.perf_counter(); model = rm.train(shared, pairs, cfg); secs = time.perf_counter() - t
        sc = model.score([k[0] for k in keys], [k[1] for k in keys])
        by = dict(zip(keys, sc))
        pi = ops.encode_prompts(prompt_set, tok, 64)
        emp = dict(zip(prompt_set, model.score_ids(pi, [[EOS]] * len(pi)).tolist()))
        strict = [p for p in ev if p.meta["score_chosen"] != p.meta["score_rejected"]]
        acc = sum((by[(p.prompt, p.chosen)] - by[(p.prompt, p.rejected)]) * (p.meta["score_chosen"] - p.meta["score_rejected"]) > 0 for p in strict) / len(strict)
        row = {"seed": s, "variant": name, "acc": round(acc, 3), "n": len(strict),
               "spearman": round(float(spearmanr(sc, gold).statistic), 3), "sd": round(float(torch.tensor(sc).std()), 3),
               "empty_mean": round(sum(emp.values()) / len(emp), 3),
               "empty_wins": round(sum(emp[k[0]] > by[k] for k in keys) / len(keys), 3),
               "gold_empty_wins": round(gold_empty_wins, 3), "secs": round(secs, 1)}
        print(json.dumps(row), flush=True); rows.append(row)
        del shared, model
json.dump(rows, open(out, "w"), indent=1)
