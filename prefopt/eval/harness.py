"""One evaluation harness for every policy: sample held-out prompts, score, compare.

Every policy is sampled with identical decoding settings and seeds (common random numbers: batch ``j`` of every
policy gets seed ``cfg.seed + j``), so paired comparisons by prompt are as tight as they can be. For each policy:

- ``eval/gold_reward``: the gold judge on the policy's samples;
- ``eval/proxy_reward``: the reward model the policy was trained against (when there is one);
- ``eval/gold_proxy_gap``: per sample, proxy minus gold, each standardised by the reference's samples under the
  same judge / reward model; > 0 means the proxy rates the policy's gain higher than the gold judge does
  (over-optimisation). 0 for the reference by construction;
- ``eval/kl_to_ref``: KL(pi || pi_ref) = E_{y ~ pi}[sum_t log pi(y_t | .) - log pi_ref(y_t | .)], the same sequence
  k1 estimator on the policy's own samples for every policy (exactly 0 for the reference);
- ``eval/win_rate_vs_ref`` and ``eval/win_rate_vs_<policy>``: paired by prompt, gold-judged, ties count half;
- ``eval/implicit_reward_accuracy``: on held-out gold-labelled pairs (two reference samples per eval prompt, the
  higher gold score chosen), how often log pi/pi_ref ranks chosen above rejected (DPO's implicit reward; for any
  policy the reward it implicitly optimised, up to beta); ``eval/proxy_accuracy``: the same for the reward model;
- ``eval/length``, ``eval/eos_rate``, ``eval/distinct_2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from prefopt.data.judges import Judge, JudgeError
from prefopt.data.records import PromptRecord
from prefopt.eval.metrics import distinct_n, mean_ci, win_outcomes, win_rate
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
HELD_OUT_SEED_OFFSET = 7919  # the second reference sample of each eval prompt (held-out pairs)


@dataclass
class EvalConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "Response length cap (same for every policy)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (same for every policy)."})
    max_prompt_tokens: int = field(default=64, metadata={"help": "Prompts keep their last N tokens."})
    batch_size: int = field(default=64, metadata={"help": "Generation / scoring batch size."})
    seed: int = field(default=1234, metadata={"help": "Sampling seed, shared by every policy (fixed across master seeds: the "
                                               "reference's samples are identical in every run)."})
    held_out_pairs: bool = field(default=True, metadata={"help": "Build gold-labelled pairs from two reference samples per eval prompt "
                                                          "and report implicit-reward and reward-model accuracy on them."})
    path_points: int = field(default=2, metadata={"help": "Evaluations of each policy during training on the path prompts: this many "
                                                   "evenly spaced, plus one after the last step (0 = none); every run draws a "
                                                   "path in (KL, gold) space."})
    path_prompts: int = field(default=64, metadata={"help": "Held-out prompts used by each evaluation during training."})

    def __post_init__(self):
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "path_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.path_points < 0:
            raise ValueError(f"eval.path_points must be >= 0, got {self.path_points}")
        if not self.temperature > 0:
            raise ValueError(f"eval.temperature must be > 0, got {self.temperature}")

    def settings(self) -> dict:
        """What makes two evaluations comparable (the report refuses to pool runs that differ here)."""
        return {k: getattr(self, k) for k in ("max_new_tokens", "temperature", "max_prompt_tokens", "seed", "held_out_pairs")}


# ------------------------------------------------------------------------------------------------ primitives
def _ctx(shared: SharedBase, role: str | None):
    return shared.reference() if role is None else shared.role(role)


def sample_policy(shared: SharedBase, role: str | None, prompt_ids, cfg: EvalConfig, *, seed: int | None = None,
                  on_batch=None, dist=None, logprobs: bool = False):
    """``dist``: several processes share the batches (exactly the one-process samples; see ``ops.sample``).
    ``logprobs``: (responses, each one's sequence log-prob under ``role`` recorded while sampling)."""
    with _ctx(shared, role) as lm:
        return sample(lm, shared.tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      seed=cfg.seed if seed is None else seed, batch_size=cfg.batch_size, on_batch=on_batch, dist=dist,
                      logprobs=logprobs)


@torch.no_grad()
def sequence_logps(shared: SharedBase, role: str | None, prompt_ids, response_ids, cfg: EvalConfig) -> np.ndarray:
    """Per-sample sum_t log pi(y_t | .) under ``role`` (None: the reference), at the sampling temperature. (N,)"""
    pad = shared.tokenizer.pad_token_id
    out: list[float] = []
    with _ctx(shared, role) as lm:
        for i in range(0, len(prompt_ids), cfg.batch_size):
            batch = make_batch(prompt_ids[i : i + cfg.batch_size], response_ids[i : i + cfg.batch_size], pad, shared.device)
            out += response_logprobs(lm, batch, cfg.temperature).sum(-1).float().cpu().tolist()
    return np.asarray(out, dtype=np.float64)


def _gold(judge: Judge, prompts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    gold = np.asarray([float(x) for x in judge.score(list(prompts), list(texts))], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(gold))
    if bad.size:
        raise JudgeError(f"judge {judge.name!r} returned a non-finite score for sample {int(bad[0])}: fix the judge")
    return gold


@dataclass
class PolicySamples:
    """One policy's evaluation samples and per-sample scores (all arrays (N,), aligned by prompt)."""

    responses: list[list[int]]
    texts: list[str]
    gold: np.ndarray
    kl: np.ndarray
    proxy: np.ndarray | None = None

    def to_json(self) -> dict:
        """Plain JSON (floats in repr, so float64 values come back exactly)."""
        return {"responses": self.responses, "texts": self.texts, "gold": self.gold.tolist(), "kl": self.kl.tolist(),
                "proxy": None if self.proxy is None else self.proxy.tolist()}

    @classmethod
    def from_json(cls, doc: dict) -> "PolicySamples":
        f64 = lambda x: np.asarray(x, dtype=np.float64)  # noqa: E731
        return cls([list(r) for r in doc["responses"]], list(doc["texts"]), f64(doc["gold"]), f64(doc["kl"]),
                   None if doc["proxy"] is None else f64(doc["proxy"]))


class SampleStore(Protocol):
    """Where :func:`evaluate` keeps each policy's samples as it finishes them (a run's progress folder), so an
    evaluation stopped part-way evaluates only the policies it had not finished."""

    def get(self, name: str) -> PolicySamples | None: ...

    def put(self, name: str, samples: PolicySamples) -> None: ...


BON_SEED_OFFSET = 7_919  # candidate j of best-of-n is sampled with eval seed + j * offset (candidate 0: the reference's)


@dataclass
class BestOfN:
    """A policy with no adapter: n reference samples per prompt, the one ``score_fn`` rates highest (first on ties)."""

    n: int
    score_fn: ProxyFn

    def sample(self, shared: SharedBase, prompt_ids, cfg: EvalConfig, on_batch=None, dist=None) -> list[list[int]]:
        candidates, scores = [], []
        for j in range(self.n):
            cand = sample_policy(shared, None, prompt_ids, cfg, seed=cfg.seed + j * BON_SEED_OFFSET,
                                 on_batch=on_batch if j == 0 else None, dist=dist)
            candidates.append(cand)
            scores.append(np.asarray(self.score_fn(prompt_ids, cand).tolist(), dtype=np.float64))
        best = np.argmax(np.stack(scores), axis=0)  # (N,): the first maximum on ties
        return [candidates[int(b)][i] for i, b in enumerate(best)]


def evaluate_policy(shared: SharedBase, role, prompt_ids, prompt_texts, judge: Judge, cfg: EvalConfig,
                    *, proxy: ProxyFn | None = None, on_batch=None, dist=None) -> PolicySamples:
    """Sample ``role`` (an adapter role, None = the reference, or a :class:`BestOfN`) on the prompts and score:
    gold, KL to the reference (k1, sequence; best-of-n: its analytic value), proxy."""
    if isinstance(role, BestOfN):
        responses = role.sample(shared, prompt_ids, cfg, on_batch=on_batch, dist=dist)
        kl = np.full(len(responses), math.log(role.n) - (role.n - 1) / role.n)
    elif role is None:
        responses = sample_policy(shared, role, prompt_ids, cfg, on_batch=on_batch, dist=dist)
        kl = np.zeros(len(responses))
    else:  # log pi(y) from the sampling steps themselves; log pi_ref(y) takes one forward pass
        responses, logps = sample_policy(shared, role, prompt_ids, cfg, on_batch=on_batch, dist=dist, logprobs=True)
        kl = np.asarray(logps, dtype=np.float64) - sequence_logps(shared, None, prompt_ids, responses, cfg)
    texts = decode_responses(responses, shared.tokenizer)
    gold = _gold(judge, prompt_texts, texts)
    scores = None
    if proxy is not None:
        scores = np.asarray(proxy(prompt_ids, responses).tolist(), dtype=np.float64)
    return PolicySamples(responses, texts, gold, kl, scores)


# ------------------------------------------------------------------------------------------------ held-out pairs
@dataclass
class HeldOutPairs:
    """Gold-labelled pairs on the eval prompts: two reference samples per prompt, the higher gold score chosen."""

    prompt_ids: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]


def held_out_pairs(shared: SharedBase, prompt_ids, first: PolicySamples, prompt_texts, judge: Judge,
                   cfg: EvalConfig, dist=None) -> HeldOutPairs:
    """Pair the reference's eval sample of each prompt with a second one; drop ties and identical responses."""
    second = sample_policy(shared, None, prompt_ids, cfg, seed=cfg.seed + HELD_OUT_SEED_OFFSET, dist=dist)
    gold2 = _gold(judge, prompt_texts, decode_responses(second, shared.tokenizer))
    out = HeldOutPairs([], [], [])
    for i, (a, b) in enumerate(zip(first.responses, second)):
        if a == b or first.gold[i] == gold2[i]:
            continue
        c, r = (a, b) if first.gold[i] > gold2[i] else (b, a)
        out.prompt_ids.append(prompt_ids[i])
        out.chosen.append(c)
        out.rejected.append(r)
    return out


def _accuracy(chosen_scores: np.ndarray, rejected_scores: np.ndarray):
    return mean_ci(win_outcomes(chosen_scores, rejected_scores))


# ------------------------------------------------------------------------------------------------ the harness
@dataclass
class EvalResult:
    summary: list[dict]
    samples: list[dict]
    n_held_out_pairs: int = 0


def evaluate(
    shared: SharedBase,
    policies: Mapping[str, str | None],
    prompts: Sequence[PromptRecord],
    judge: Judge,
    cfg: EvalConfig,
    *,
    proxies: Mapping[str, ProxyFn] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
    dist=None,
    store: SampleStore | None = None,
) -> EvalResult:
    """Evaluate ``policies`` (display name -> adapter role, None = the reference) on held-out ``prompts``.
    ``dist`` (accelerate's state): several processes share the sampling, every rank gets the whole result.

    ``proxies`` maps a policy name to the reward model that scores it (its own run's); the reference is scored by
    each distinct proxy so every gold-proxy gap is standardised against the reference under the same proxy.

    ``store`` keeps each policy's samples as they are finished and hands back the ones it has: every policy is
    sampled with the same fixed seeds whatever ran before it, so skipping the stored ones changes nothing.
    """
    if REFERENCE not in policies or policies[REFERENCE] is not None:
        raise ValueError("policies must include the reference (role None) to compute win rates and KL")
    proxies = dict(proxies or {})
    tok = shared.tokenizer
    prompt_ids = encode_prompts([p.prompt for p in prompts], tok, cfg.max_prompt_tokens)
    prompt_texts = [render_prompt(p.prompt, tok) for p in prompts]
    done: dict[str, PolicySamples] = {}
    for name, role in policies.items():
        cb = (lambda k, name=name: on_progress(name, k)) if on_progress else None
        got = store.get(name) if store is not None else None
        if got is not None and len(got.responses) == len(prompt_ids):
            done[name] = got
            if cb is not None:
                cb(len(prompt_ids))
            continue
        done[name] = evaluate_policy(shared, role, prompt_ids, prompt_texts, judge, cfg, proxy=proxies.get(name),
                                     on_batch=cb, dist=dist)
        if store is not None:
            store.put(name, done[name])
    ref = done[REFERENCE]
    # the reference under every distinct proxy (for the standardised gold-proxy gap)
    ref_proxy: dict[int, np.ndarray] = {}
    for name, fn in proxies.items():
        if id(fn) not in ref_proxy:
            ref_proxy[id(fn)] = done[name].proxy if name == REFERENCE else np.asarray(fn(prompt_ids, ref.responses).tolist())

    pairs = held_out_pairs(shared, prompt_ids, ref, prompt_texts, judge, cfg, dist) if cfg.held_out_pairs else None
    ref_pair_logps = None
    if pairs is not None and pairs.chosen:
        ref_pair_logps = (sequence_logps(shared, None, pairs.prompt_ids, pairs.chosen, cfg),
                          sequence_logps(shared, None, pairs.prompt_ids, pairs.rejected, cfg))

    summary: list[dict] = []
    samples: list[dict] = []
    for name, d in done.items():
        row = lambda est, metric: summary.append(est.summary_row(name, metric))  # noqa: E731
        row(mean_ci(d.gold), "eval/gold_reward")
        fn = proxies.get(name)
        if fn is not None and d.proxy is not None:
            row(mean_ci(d.proxy), "eval/proxy_reward")
            row(mean_ci(_standardised_gap(d, ref, ref_proxy[id(fn)])), "eval/gold_proxy_gap")
        row(mean_ci(d.kl), "eval/kl_to_ref")
        row(win_rate(d.gold, ref.gold), "eval/win_rate_vs_ref")
        for other, o in done.items():
            if other not in (name, REFERENCE):
                row(win_rate(d.gold, o.gold), f"eval/win_rate_vs_{other}")
        row(mean_ci([float(len(r)) for r in d.responses]), "eval/length")
        row(mean_ci([float(e) for e in ends_with_eos(d.responses, tok.eos_token_id)]), "eval/eos_rate")
        summary.append({"policy": name, "metric": "eval/distinct_2", "mean": distinct_n(d.texts, 2),
                        "lo": None, "hi": None, "se": None, "n": len(d.texts)})
        if ref_pair_logps is not None:
            role = policies[name]
            if isinstance(role, str):  # an adapter: log pi / pi_ref is its implicit reward
                c = sequence_logps(shared, role, pairs.prompt_ids, pairs.chosen, cfg) - ref_pair_logps[0]
                r = sequence_logps(shared, role, pairs.prompt_ids, pairs.rejected, cfg) - ref_pair_logps[1]
                row(_accuracy(c, r), "eval/implicit_reward_accuracy")
            if fn is not None:
                row(_accuracy(np.asarray(fn(pairs.prompt_ids, pairs.chosen).tolist()),
                              np.asarray(fn(pairs.prompt_ids, pairs.rejected).tolist())), "eval/proxy_accuracy")
        for i, text in enumerate(d.texts):
            samples.append({
                "prompt_id": i, "prompt": prompt_texts[i], "policy": name, "response": text,
                "gold": float(d.gold[i]), "proxy": float(d.proxy[i]) if d.proxy is not None else math.nan,
                "kl": float(d.kl[i]), "length": len(d.responses[i]),
                "eos": bool(d.responses[i] and d.responses[i][-1] == tok.eos_token_id),
            })
    return EvalResult(summary, samples, len(pairs.chosen) if pairs is not None else 0)


def _standardised_gap(d: PolicySamples, ref: PolicySamples, ref_proxy: np.ndarray) -> np.ndarray:
    """Per sample: proxy and gold each standardised by the reference's samples, proxy minus gold."""
    def z(x, base):
        sd = float(np.std(base, ddof=1)) if len(base) > 1 else 0.0
        return (x - float(np.mean(base))) / (sd if sd > 0 else 1.0)

    return z(d.proxy, ref_proxy) - z(d.gold, ref.gold)


def evaluate_point(shared: SharedBase, role: str | None, prompts: Sequence[PromptRecord], judge: Judge,
                   cfg: EvalConfig, *, proxy: ProxyFn | None = None, ref: PolicySamples | None = None, dist=None):
    """A light evaluation during training on ``prompts``: (samples, {metric: Estimate}) with gold reward, KL,
    proxy reward and the win rate against ``ref`` (the reference's samples of the same prompts)."""
    tok = shared.tokenizer
    prompt_ids = encode_prompts([p.prompt for p in prompts], tok, cfg.max_prompt_tokens)
    texts = [render_prompt(p.prompt, tok) for p in prompts]
    d = evaluate_policy(shared, role, prompt_ids, texts, judge, cfg, proxy=proxy, dist=dist)
    out = {"eval/gold_reward": mean_ci(d.gold), "eval/kl_to_ref": mean_ci(d.kl)}
    if d.proxy is not None:
        out["eval/proxy_reward"] = mean_ci(d.proxy)
    out["eval/win_rate_vs_ref"] = win_rate(d.gold, (ref or d).gold)
    return d, out
