"""One evaluation harness for every policy: sample held-out prompts, score, compare.

Every policy is sampled with identical decoding settings and seeds; KL(pi || pi_ref) is the same
sequence-level k1 estimator for every policy, measured on the policy's own samples:
KL = E_{y ~ pi}[ sum_t log pi(y_t | .) - log pi_ref(y_t | .) ]. Win rate vs the reference pairs each policy's
response with the reference's response to the same prompt, judged by the gold judge (ties count half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from prefopt.data.judges import Judge
from prefopt.data.records import PromptRecord
from prefopt.eval.metrics import distinct_n, mean_ci, win_rate
from prefopt.models.ops import (
    decode_responses,
    encode_prompts,
    ends_with_eos,
    make_batch,
    render_prompt,
    response_logprobs,
    sample,
)
from prefopt.models.shared import SharedBase

REFERENCE = "reference"
ProxyFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], torch.Tensor]


@dataclass
class EvalConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap (same for every policy)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (same for every policy)."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens."})
    batch_size: int = field(default=64, metadata={"help": "Generation / scoring batch size."})
    seed: int = field(default=1234, metadata={"help": "Sampling seed, shared by every policy."})


@torch.no_grad()
def _sequence_kl(shared: SharedBase, role: str | None, prompt_ids, response_ids, cfg: EvalConfig) -> list[float]:
    """Per-sample sum_t (log pi - log pi_ref) on the policy's own samples (k1; exactly 0 for the reference)."""
    if role is None:
        return [0.0] * len(prompt_ids)
    pad = shared.tokenizer.pad_token_id
    out: list[float] = []
    for i in range(0, len(prompt_ids), cfg.batch_size):
        batch = make_batch(prompt_ids[i : i + cfg.batch_size], response_ids[i : i + cfg.batch_size], pad, shared.device)
        with shared.role(role) as lm:
            lp = response_logprobs(lm, batch, cfg.temperature)
        with shared.reference() as lm:
            ref = response_logprobs(lm, batch, cfg.temperature)
        out += (lp - ref).sum(-1).float().cpu().tolist()
    return out


def evaluate(
    shared: SharedBase,
    policies: dict[str, str | None],
    prompts: Sequence[PromptRecord],
    judge: Judge,
    cfg: EvalConfig,
    *,
    proxy: ProxyFn | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Evaluate ``policies`` (display name -> adapter role, None = reference) on held-out ``prompts``.

    Returns (summary rows, sample rows) in the shapes :mod:`prefopt.reports` writes.
    """
    if REFERENCE not in policies:
        raise ValueError("policies must include the reference (role None) to compute win rates and KL")
    tok = shared.tokenizer
    prompt_ids = encode_prompts([p.prompt for p in prompts], tok, cfg.max_prompt_tokens)
    prompt_texts = [render_prompt(p.prompt, tok) for p in prompts]
    per_policy: dict[str, dict] = {}
    for name, role in policies.items():
        ctx = shared.reference() if role is None else shared.role(role)
        with ctx as lm:
            responses = sample(
                lm, tok, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                seed=cfg.seed, batch_size=cfg.batch_size,
                on_batch=(lambda k, name=name: on_progress(name, k)) if on_progress else None,
            )
        texts = decode_responses(responses, tok)
        gold = [float(x) for x in judge.score(prompt_texts, texts)]
        bad = [i for i, g in enumerate(gold) if not math.isfinite(g)]
        if bad:
            raise ValueError(f"judge {judge.name!r} returned a non-finite score for sample {bad[0]}")
        per_policy[name] = {
            "responses": responses,
            "texts": texts,
            "gold": gold,
            "proxy": proxy(prompt_ids, responses).tolist() if proxy else [math.nan] * len(texts),
            "kl": _sequence_kl(shared, role, prompt_ids, responses, cfg),
            "length": [len(r) for r in responses],
            "eos": ends_with_eos(responses, tok.eos_token_id),
        }

    ref_gold = per_policy[REFERENCE]["gold"]
    summary: list[dict] = []
    samples: list[dict] = []
    for name, d in per_policy.items():
        summary.append(mean_ci(d["gold"]).summary_row(name, "eval/gold_reward"))
        if proxy:
            summary.append(mean_ci(d["proxy"]).summary_row(name, "eval/proxy_reward"))
        summary.append(mean_ci(d["kl"]).summary_row(name, "eval/kl_to_ref"))
        summary.append(win_rate(d["gold"], ref_gold).summary_row(name, "eval/win_rate_vs_ref"))
        summary.append(mean_ci(d["length"]).summary_row(name, "eval/length"))
        summary.append(mean_ci([float(e) for e in d["eos"]]).summary_row(name, "eval/eos_rate"))
        summary.append({"policy": name, "metric": "eval/distinct_2", "mean": distinct_n(d["texts"], 2),
                        "lo": None, "hi": None, "se": None, "n": len(d["texts"])})
        for i, text in enumerate(d["texts"]):
            samples.append({
                "prompt_id": i, "prompt": prompt_texts[i], "policy": name, "response": text,
                "gold": d["gold"][i], "proxy": d["proxy"][i], "kl": d["kl"][i],
                "length": d["length"][i], "eos": d["eos"][i],
            })
    return summary, samples
