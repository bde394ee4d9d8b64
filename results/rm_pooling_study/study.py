"""RM quality study: train the default reward model on each seed's pairs under variants, score held-out
reference-sample pairs (same prompts, fresh samples, seed 10), report accuracy vs the gold order and Spearman."""
import copy, json, sys, time
import torch
from scipy.stats import spearmanr
from prefopt.backends import rm
from prefopt.data.io import load_pairs
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase

torch.set_num_threads(2)
D = "/work/probe/rmstudy"
seeds = [int(s) for s in sys.argv[1].split(",")]
variants = json.loads(sys.argv[2])  # name -> RewardConfig overrides
out = sys.argv[3]
lm, tok = load_base("smollm2-135m-instruct", device=torch.device("cpu"), seed=0)
ev = load_pairs(f"{D}/eval.jsonl")
resp = {}
for p in ev:
    resp[(p.prompt, p.chosen)] = p.meta["score_chosen"]
    resp[(p.prompt, p.rejected)] = p.meta["score_rejected"]
keys = list(resp)
gold = [resp[k] for k in keys]
rows = []
for s in seeds:
    pairs = load_pairs(f"{D}/train-s{s}.jsonl")
    for name, over in variants.items():
        cfg = rm.RewardConfig(**{"epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "normalize_on": 64,
                                 "micro_batch_tokens": 256, "seed": s, **over})
        shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=16, alpha=32))
        t = time.perf_counter()
        model = rm.train(shared, pairs, cfg)
        secs = time.perf_counter() - t
        sc = model.score([k[0] for k in keys], [k[1] for k in keys])
        by = dict(zip(keys, sc))
        strict = [p for p in ev if p.meta["score_chosen"] != p.meta["score_rejected"]]
        big = [p for p in strict if abs(p.meta["score_chosen"] - p.meta["score_rejected"]) >= 0.3]
        acc = lambda ps: sum((by[(p.prompt, p.chosen)] - by[(p.prompt, p.rejected)]) * (p.meta["score_chosen"] - p.meta["score_rejected"]) > 0 for p in ps) / len(ps)
        row = {"seed": s, "variant": name, "acc": round(acc(strict), 3), "acc_big": round(acc(big), 3), "n": len(strict),
               "n_big": len(big), "spearman": round(float(spearmanr(sc, gold).statistic), 3), "secs": round(secs, 1),
               "sd": round(float(torch.tensor(sc).std()), 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del shared, model
json.dump(rows, open(out, "w"), indent=1)
