"""Comparisons across runs: pooling over seeds, variant labels, the frontier and matched-KL interpolation against
hand-worked numbers, verdicts, and the refusal to pool runs evaluated differently."""

import math

import pytest
import torch

from prefopt.errors import RunError
from prefopt.reports.compare import (
    GOLD,
    KL,
    WIN,
    Cell,
    compare,
    frontier,
    interpolation_weights,
    matched_kl,
    verdicts,
    write_comparison,
)


def row(mean, se=0.01, n=100):
    return {"mean": mean, "lo": mean - 2 * se, "hi": mean + 2 * se, "se": se, "n": n}


def point(kl, gold, win):
    return {KL: row(kl), GOLD: row(gold), WIN: row(win)}


def test_frontier_and_interpolation_hand_worked():
    pts = [(0.0, 0.2), (4.0, 0.4), (2.0, 0.5), (6.0, 0.8)]
    assert frontier(pts) == [0, 2, 3]  # (4, 0.4) is beaten by (2, 0.5) at less KL
    assert interpolation_weights(pts, 1.0) == [(0, 0.5), (2, 0.5)]
    assert interpolation_weights(pts, 4.0) == [(2, 0.5), (3, 0.5)]
    assert interpolation_weights(pts, 6.0) == [(2, 0.0), (3, 1.0)]
    assert interpolation_weights(pts, 7.0) is None  # no extrapolation


def _cells():
    ref = {GOLD: row(0.2), KL: row(0.0), WIN: row(0.5)}
    return [
        Cell("r0", "reference", 0, {}, ref), Cell("r1", "reference", 1, {}, ref),
        # seed 0: a path through (2, .5) and (4, .4), ending at (6, .8)
        Cell("r0", "a", 0, {}, point(6.0, 0.8, 0.9), [{"step": 1, **point(2.0, 0.5, 0.7)}, {"step": 2, **point(4.0, 0.4, 0.6)}]),
        # seed 1: (3, .6) during training, ending at (6, .7)
        Cell("r1", "a", 1, {}, point(6.0, 0.7, 0.85), [{"step": 1, **point(3.0, 0.6, 0.8)}]),
        Cell("r0", "b", 0, {}, point(2.0, 0.3, 0.55)), Cell("r1", "b", 1, {}, point(2.0, 0.31, 0.56)),
    ]


def test_matched_kl_hand_worked():
    rows = {(r.budget, r.algorithm, r.metric): r for r in matched_kl(_cells(), [1.0, 4.0, 7.0])}
    # budget 1: seed 0 -> 0.2 + 0.5 * 0.3 = 0.35; seed 1 -> 0.2 + (1/3) * 0.4 = 0.3333
    g = rows[(1.0, "a", GOLD)]
    assert g.mean == pytest.approx((0.35 + 0.2 + 0.4 / 3) / 2)
    half = 12.7062 * abs(0.35 - (0.2 + 0.4 / 3)) / math.sqrt(2) / math.sqrt(2)
    assert g.hi - g.mean == pytest.approx(half, rel=1e-4) and g.n_seeds == 2
    # win rate along the same frontier: seed 0 -> 0.6, seed 1 -> 0.5 + (1/3) * 0.3 = 0.6
    assert rows[(1.0, "a", WIN)].mean == pytest.approx(0.6)
    # budget 4: seed 0 -> between (2, .5) and (6, .8): 0.65; seed 1 -> between (3, .6) and (6, .7): 0.6333
    assert rows[(4.0, "a", GOLD)].mean == pytest.approx((0.65 + 0.6 + 0.1 / 3) / 2)
    # beyond the largest KL: not read
    assert rows[(7.0, "a", GOLD)].mean is None
    assert rows[(4.0, "b", GOLD)].mean is None  # b never went past KL 2
    assert rows[(1.0, "b", GOLD)].mean == pytest.approx((0.25 + 0.255) / 2)


def test_verdict_only_where_intervals_separate():
    v = verdicts(matched_kl(_cells(), [1.0, 2.0]))
    assert v[1.0] == "cannot tell"  # a 0.342 [..] vs b 0.2525: two seeds, wide t-intervals overlap
    one_seed = [c for c in _cells() if c.seed == 0]
    rows = matched_kl(one_seed, [2.0])
    assert {r.algorithm: r.n_seeds for r in rows} == {"a": 1, "b": 1}
    assert verdicts(rows)[2.0] == "a"  # 0.5 vs 0.3 with sample-level intervals of +-0.02


def _run(dir, seed, beta, gold, kl=2.0, settings=None):
    return {
        "dir": dir, "config": {"seed": seed, "model": "tiny", "dpo": {"beta": 99}, "policies": {"dpo": {"backend": "dpo"}}},
        "policies": ["reference", "dpo"], "backends": ["ppo", "dpo"],
        "policy_info": {"dpo": {"backend": "dpo", "config": {"beta": beta, "seed": seed}}},
        "eval_settings": settings or {"eval": {"max_new_tokens": 32}, "judge": "vader"},
        "metric_versions": {GOLD: 1},
        "summary": [{"policy": "reference", "metric": GOLD, **row(0.2)}, {"policy": "reference", "metric": KL, **row(0.0)},
                    {"policy": "dpo", "metric": GOLD, **row(gold)}, {"policy": "dpo", "metric": KL, **row(kl)},
                    {"policy": "dpo", "metric": WIN, **row(0.7)}],
        "path": [], "meta": {},
    }


def test_pooling_over_seeds_and_variant_labels(tmp_path):
    runs = [_run("s0b1", 0, 0.1, 0.5), _run("s1b1", 1, 0.1, 0.7), _run("s0b5", 0, 0.5, 0.4, kl=1.0)]
    cmp = compare(runs)
    pooled = {(p.variant, p.metric): p for p in cmp.pooled}
    p = pooled[("dpo beta=0.1", GOLD)]
    assert p.mean == pytest.approx(0.6) and p.n_seeds == 2 and p.n_samples == 200
    assert p.hi - p.mean == pytest.approx(12.7062 * 0.1, rel=1e-4)  # t(1 df) x sd 0.1414 / sqrt(2)
    single = pooled[("dpo beta=0.5", GOLD)]
    assert single.n_seeds == 1 and single.lo == pytest.approx(0.38)  # one seed: the run's own interval
    ref = pooled[("reference", GOLD)]  # identical in every run (it does not depend on the seed): its own interval,
    assert ref.n_seeds == 1 and ref.lo == pytest.approx(0.18)  # not a zero-width one over three equal values
    written = write_comparison(cmp, tmp_path / "rep")
    names = {w.name for w in written}
    assert {"frontier.png", "win_rates.png", "pooled.csv", "matched_kl.csv", "comparison.json", "report.md"} <= names
    assert (tmp_path / "rep" / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_runs_evaluated_differently():
    a = _run("a", 0, 0.1, 0.5)
    b = _run("b", 1, 0.1, 0.7, settings={"eval": {"max_new_tokens": 64}, "judge": "vader"})
    with pytest.raises(RunError) as info:
        compare([a, b])
    msg = str(info.value)
    assert "\n" not in msg and "eval.max_new_tokens" in msg and "32" in msg and "64" in msg
    c = _run("c", 1, 0.1, 0.7)
    c["metric_versions"] = {GOLD: 2}
    with pytest.raises(RunError, match="estimator version"):
        compare([a, c])


def test_harness_self_win_rate_is_half_and_reference_kl_is_zero(tiny):
    """The same policy under two names: identical decoding -> every pair ties -> 0.5; KL of pi_ref is exactly 0."""
    from prefopt.data.judges import CharFrequencyJudge
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.eval.harness import EvalConfig, evaluate
    from prefopt.models.shared import LoraSettings, SharedBase

    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    shared.add_role("pol", seed=0)
    with torch.no_grad():
        for n, p in shared.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    cfg = EvalConfig(max_new_tokens=8, batch_size=16)
    result = evaluate(shared, {"reference": None, "one": "pol", "two": "pol"}, sentiment_prompts()[:16],
                      CharFrequencyJudge(), cfg)
    rows = {(r["policy"], r["metric"]): r for r in result.summary}
    assert rows[("one", "eval/win_rate_vs_two")]["mean"] == 0.5
    assert rows[("one", "eval/win_rate_vs_two")]["lo"] <= 0.5 <= rows[("one", "eval/win_rate_vs_two")]["hi"]
    assert rows[("reference", "eval/kl_to_ref")]["mean"] == 0.0 and rows[("reference", "eval/kl_to_ref")]["hi"] == 0.0
    assert rows[("one", "eval/kl_to_ref")]["mean"] != 0.0
    assert result.n_held_out_pairs > 0 and ("one", "eval/implicit_reward_accuracy") in rows


def test_an_evaluation_continued_from_its_stored_policies_equals_one_run_through(tiny, tmp_path):
    """A kill during the evaluation: the policies already stored (JSON in the progress folder) are taken back,
    not sampled again, and the result equals an evaluation run through in one go -- summary and samples."""
    from prefopt.data.judges import CharFrequencyJudge
    from prefopt.data.tasks import sentiment_prompts
    from prefopt.eval import harness
    from prefopt.models.shared import LoraSettings, SharedBase
    from prefopt.pipeline.resume import EvalSamples

    lm, tok = tiny
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    for role in ("a", "b"):
        shared.add_role(role, seed=1 if role == "a" else 2)
    with torch.no_grad():
        for n, p in shared.peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    policies, prompts = {"reference": None, "a": "a", "b": "b"}, sentiment_prompts()[:12]
    cfg = harness.EvalConfig(max_new_tokens=6, batch_size=8, held_out_pairs=True)
    proxy = lambda p, r: torch.tensor([float(len(x)) for x in r])  # noqa: E731
    whole = harness.evaluate(shared, policies, prompts, CharFrequencyJudge(), cfg, proxies={"a": proxy})

    seen = []
    store = EvalSamples(tmp_path / "eval", True, on_put=seen.append)
    first = harness.evaluate(shared, {"reference": None, "a": "a"}, prompts, CharFrequencyJudge(), cfg,
                             proxies={"a": proxy}, store=store)  # "killed" after two of the three policies
    assert seen == ["reference", "a"] and first.summary != whole.summary
    restored, sampled = [], []
    real = harness.evaluate_policy

    def counting(shared_, role, *a, **k):
        sampled.append(role)
        return real(shared_, role, *a, **k)

    harness.evaluate_policy = counting
    try:
        again = harness.evaluate(shared, policies, prompts, CharFrequencyJudge(), cfg, proxies={"a": proxy},
                                 store=EvalSamples(tmp_path / "eval", True, on_restore=restored.append))
    finally:
        harness.evaluate_policy = real
    assert restored == ["reference", "a"] and sampled == ["b"]  # only the policy left is evaluated
    assert again.summary == whole.summary and again.samples == whole.samples
    (tmp_path / "eval" / "b.json").write_text('{"responses": [[1, 2')  # torn by a kill while writing: redone
    assert EvalSamples(tmp_path / "eval", True).get("b") is None
