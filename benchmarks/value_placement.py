"""Where should PPO's value function live: a head on the policy's trunk, or its own LoRA adapter + head?

Runs PPO-GT (the gold judge as reward, so no reward model is trained first) on the embedded sentiment task with
each placement, same seed, same prompts, same settings, one process at a time, and reports per step the score,
KL, explained variance and seconds. Usage:

    python benchmarks/value_placement.py --out results/value_placement.json            # SmolLM2-135M, 8 steps
    python benchmarks/value_placement.py --model tiny --steps 3 --out /tmp/vp.json      # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(placement: str, model: str, steps: int, seed: int) -> dict:
    import torch

    from prefopt.backends import ppo
    from prefopt.backends._common import TrainData
    from prefopt.data.judges import VaderJudge
    from prefopt.data.split import split_prompts
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.models.base import load_base
    from prefopt.models.ops import encode_prompts
    from prefopt.models.rewards import text_score_fn
    from prefopt.models.shared import LoraSettings, SharedBase

    lm, tok = load_base(model, device=torch.device("cpu"), seed=seed)
    shared = SharedBase(lm, tok, LoraSettings())
    split = split_prompts(sentiment_prompts(), n_eval=128, n_train=128, seed=seed)  # the bench's split
    cfg = ppo.PPOConfig(steps=steps, value_adapter=placement == "adapter", seed=seed, reward="gold")
    prompts = encode_prompts([p.prompt for p in split.train], tok, cfg.max_prompt_tokens)
    judge = VaderJudge()
    log: list[dict] = []
    t0 = time.perf_counter()
    ppo.train(shared, cfg, TrainData(prompts=prompts, score_fn=text_score_fn(judge.score, tok, name="vader")),
              on_step=lambda s, m: log.append({"step": s, **m}))
    keys = ("train/score", "train/kl", "train/explained_variance", "train/value_loss", "time/step_s")
    return {"placement": placement, "wall_s": round(time.perf_counter() - t0, 1),
            "steps": [{k: row[k] for k in ("step", *keys)} for row in log]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for placement in ("trunk", "adapter"):
        r = run(placement, args.model, args.steps, args.seed)
        rows.append(r)
        last = r["steps"][len(r["steps"]) // 2 :]  # second half of training
        mean = lambda k: sum(x[k] for x in last) / len(last)  # noqa: E731
        print(f"{placement:8s} score {mean('train/score'):.3f}  kl {mean('train/kl'):.2f}  "
              f"explained var {mean('train/explained_variance'):.3f}  {mean('time/step_s'):.1f} s/step "
              f"(means over steps {last[0]['step']}-{last[-1]['step']})", flush=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "value_placement", "model": args.model, "seed": args.seed, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
