"""Tests for the simulated Bradley–Terry annotator (prefopt.data.synthetic)."""

from __future__ import annotations

import math
import random

import pytest

from prefopt.data import AnnotatorConfig, PreferencePair, simulate_preferences


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def noisy_inputs(n_prompts: int = 40, k: int = 4, seed: int = 123):
    """Random prompts with k responses each and close-together scores (labels are uncertain)."""
    rng = random.Random(seed)
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    responses = [[f"response {i}.{j}" for j in range(k)] for i in range(n_prompts)]
    scores = [[rng.uniform(-1, 1) for _ in range(k)] for _ in range(n_prompts)]
    return prompts, responses, scores


def labels(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    return [(p.chosen, p.rejected) for p in pairs]


def test_same_seed_gives_identical_pairs() -> None:
    prompts, responses, scores = noisy_inputs()
    annotator = AnnotatorConfig(temperature=1.0, flip_rate=0.2, length_bias=0.1)
    first = simulate_preferences(prompts, responses, scores, annotator=annotator, pairs_per_prompt=3, seed=7)
    second = simulate_preferences(prompts, responses, scores, annotator=annotator, pairs_per_prompt=3, seed=7)
    assert first == second and len(first) == 120


def test_different_seed_gives_different_labels() -> None:
    prompts, responses, scores = noisy_inputs()
    annotator = AnnotatorConfig(temperature=1.0)
    a = simulate_preferences(prompts, responses, scores, annotator=annotator, pairs_per_prompt=2, seed=0)
    b = simulate_preferences(prompts, responses, scores, annotator=annotator, pairs_per_prompt=2, seed=1)
    assert labels(a) != labels(b)


def test_zero_temperature_limit_always_prefers_higher_utility() -> None:
    prompts, responses, scores = noisy_inputs(n_prompts=60, k=5)
    pairs = simulate_preferences(
        prompts, responses, scores, annotator=AnnotatorConfig(temperature=1e-9), pairs_per_prompt=10, seed=0
    )
    assert len(pairs) == 600
    for pair in pairs:
        assert pair.meta["score_chosen"] > pair.meta["score_rejected"]
        assert pair.meta["p_chosen"] == 1.0 and pair.meta["flipped"] is False


def test_flip_rate_half_flips_about_half() -> None:
    prompts, responses, scores = noisy_inputs(n_prompts=500, k=3)
    pairs = simulate_preferences(
        prompts,
        responses,
        scores,
        annotator=AnnotatorConfig(temperature=1e-9, flip_rate=0.5),
        pairs_per_prompt=3,
        seed=0,
    )
    flipped = [p.meta["flipped"] for p in pairs]
    assert len(flipped) == 1500
    assert 0.45 < sum(flipped) / len(flipped) < 0.55  # sd ~ 0.013
    for pair in pairs:  # a flipped label is exactly a wrong label at T -> 0
        assert (pair.meta["score_chosen"] < pair.meta["score_rejected"]) == pair.meta["flipped"]
        assert pair.meta["p_chosen"] == (0.0 if pair.meta["flipped"] else 1.0)


def test_empirical_preference_matches_bradley_terry() -> None:
    annotator = AnnotatorConfig(temperature=0.5)
    gap = 0.3
    n_seeds = 3000
    wins = 0
    for seed in range(n_seeds):
        [pair] = simulate_preferences(
            ["p"], [["a", "b"]], [[gap, 0.0]], annotator=annotator, pairs_per_prompt=1, seed=seed
        )
        wins += pair.chosen == "a"
    expected = sigmoid(gap / annotator.temperature)  # 0.646
    assert abs(wins / n_seeds - expected) < 0.03  # sd ~ 0.009


def test_pairs_per_prompt_keeps_largest_gaps() -> None:
    texts = ["s0", "s1", "s3", "s7"]
    scores = [0.0, 1.0, 3.0, 7.0]  # gaps: 7, 6, 4, 3, 2, 1
    pairs = simulate_preferences(
        ["p", "q"], [texts, texts], [scores, scores], annotator=AnnotatorConfig(), pairs_per_prompt=3, seed=0
    )
    assert len(pairs) == 6
    for prompt in ("p", "q"):
        chosen = {frozenset((x.chosen, x.rejected)) for x in pairs if x.prompt == prompt}
        assert chosen == {frozenset({"s0", "s7"}), frozenset({"s1", "s7"}), frozenset({"s3", "s7"})}
    everything = simulate_preferences(
        ["p"], [texts], [scores], annotator=AnnotatorConfig(), pairs_per_prompt=100, seed=0
    )
    assert len(everything) == 6  # all unordered pairs, no more


def test_ties_are_broken_by_the_seed() -> None:
    texts = ["a", "b", "c", "d"]
    picked = set()
    for seed in range(30):
        run = [
            simulate_preferences(
                ["p"], [texts], [[0.5] * 4], annotator=AnnotatorConfig(), pairs_per_prompt=1, seed=seed
            )
            for _ in range(2)
        ]
        assert run[0] == run[1]
        picked.add(frozenset((run[0][0].chosen, run[0][0].rejected)))
    assert len(picked) > 3


def test_length_bias_favours_longer_responses() -> None:
    short, long = "ok", "x" * 200
    annotator = AnnotatorConfig(temperature=0.01, length_bias=0.5)  # +1.0 utility for 200 chars
    pairs = simulate_preferences(
        [f"p{i}" for i in range(50)],
        [[short, long]] * 50,
        [[0.5, 0.0]] * 50,
        annotator=annotator,
        pairs_per_prompt=1,
        seed=0,
    )
    assert all(p.chosen == long for p in pairs)
    # At a moderate temperature the recorded probability reflects the per-100-character bonus.
    warm = AnnotatorConfig(temperature=0.5, length_bias=0.5)
    p_long = sigmoid(((0.0 + 0.5 * 200 / 100) - (0.5 + 0.5 * 2 / 100)) / 0.5)  # 0.727
    for seed in range(10):
        [pair] = simulate_preferences(
            ["p"], [[short, long]], [[0.5, 0.0]], annotator=warm, pairs_per_prompt=1, seed=seed
        )
        expected = p_long if pair.chosen == long else 1.0 - p_long
        assert pair.meta["p_chosen"] == pytest.approx(expected)


def test_meta_and_record_fields() -> None:
    prompt = [{"role": "user", "content": "hi"}]
    [pair] = simulate_preferences(
        [prompt],
        [["good", "bad"]],
        [[0.9, -0.4]],
        annotator=AnnotatorConfig(temperature=0.5),
        pairs_per_prompt=1,
        seed=3,
    )
    assert pair.prompt == prompt and pair.margin is None
    if pair.chosen == "good":
        assert (pair.rejected, pair.meta["score_chosen"], pair.meta["score_rejected"]) == ("bad", 0.9, -0.4)
        assert pair.meta["p_chosen"] == pytest.approx(sigmoid(1.3 / 0.5))
    else:
        assert (pair.rejected, pair.meta["score_chosen"], pair.meta["score_rejected"]) == ("good", -0.4, 0.9)
        assert pair.meta["p_chosen"] == pytest.approx(sigmoid(-1.3 / 0.5))
    assert pair.meta["flipped"] is False and pair.meta["source"] == "synthetic"
    assert set(pair.meta) == {"score_chosen", "score_rejected", "p_chosen", "flipped", "source"}


def test_prompts_without_two_distinct_responses_give_no_pairs() -> None:
    pairs = simulate_preferences(
        ["one", "dup", "two"],
        [["a"], ["same", "same"], ["x", "y"]],
        [[1.0], [0.1, 0.2], [1.0, 0.0]],
        annotator=AnnotatorConfig(),
        pairs_per_prompt=2,
        seed=0,
    )
    assert [p.prompt for p in pairs] == ["two"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"flip_rate": 0.6}, "flip_rate"),
        ({"flip_rate": -0.1}, "flip_rate"),
        ({"length_bias": math.inf}, "length_bias"),
    ],
)
def test_annotator_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AnnotatorConfig(**kwargs)


def test_shape_validation() -> None:
    annotator = AnnotatorConfig()
    with pytest.raises(ValueError, match="same length"):
        simulate_preferences(
            ["p", "q"], [["a", "b"]], [[1.0, 0.0]], annotator=annotator, pairs_per_prompt=1, seed=0
        )
    with pytest.raises(ValueError, match="prompt 0: 2 responses but 1 scores"):
        simulate_preferences(["p"], [["a", "b"]], [[1.0]], annotator=annotator, pairs_per_prompt=1, seed=0)
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        simulate_preferences(
            ["p"], [["a", "b"]], [[1.0, 0.0]], annotator=annotator, pairs_per_prompt=0, seed=0
        )
    with pytest.raises(ValueError, match="not finite"):
        simulate_preferences(
            ["p"], [["a", "b"]], [[1.0, math.nan]], annotator=annotator, pairs_per_prompt=1, seed=0
        )


def test_annotator_pool_records_who_labelled_each_pair() -> None:
    """A pool of a clean and a noisy annotator: each pair says who labelled it, and the labels agree with the gold
    score at each annotator's own rate."""
    prompts, responses, scores = noisy_inputs(n_prompts=600, k=3)
    pool = [AnnotatorConfig(temperature=1e-9), AnnotatorConfig(temperature=1e-9, flip_rate=0.3)]
    pairs = simulate_preferences(prompts, responses, scores, annotator=pool, pairs_per_prompt=2, seed=0)
    again = simulate_preferences(prompts, responses, scores, annotator=pool, pairs_per_prompt=2, seed=0)
    assert pairs == again
    by = {0: [], 1: []}
    for p in pairs:
        by[p.meta["annotator"]].append(p.meta["score_chosen"] > p.meta["score_rejected"])
    assert 0.4 < len(by[0]) / len(pairs) < 0.6  # drawn uniformly (sd ~ 0.014)
    assert all(by[0])                            # the clean one is always right at T -> 0
    assert 0.65 < sum(by[1]) / len(by[1]) < 0.75  # the noisy one is right 70% of the time (sd ~ 0.019)
    # the same pairs are chosen for labelling whoever labels them: the pool changes labels, not the candidates
    single = simulate_preferences(prompts, responses, scores, annotator=pool[0], pairs_per_prompt=2, seed=0)
    assert {frozenset((p.chosen, p.rejected)) for p in pairs} == {frozenset((p.chosen, p.rejected)) for p in single}


def test_position_bias_favours_the_response_shown_first() -> None:
    prompts, responses, scores = noisy_inputs(n_prompts=500, k=2)
    biased = AnnotatorConfig(temperature=0.1, position_bias=100.0)  # overwhelms any gold difference in [-2, 2]
    pairs = simulate_preferences(prompts, responses, scores, annotator=biased, pairs_per_prompt=1, seed=0)
    assert all(p.meta["shown_first"] == "chosen" for p in pairs)
    right = sum(p.meta["score_chosen"] > p.meta["score_rejected"] for p in pairs) / len(pairs)
    assert 0.4 < right < 0.6  # which one is shown first is a coin flip, so gold no longer decides
    fair = simulate_preferences(prompts, responses, scores, annotator=AnnotatorConfig(temperature=1e-9),
                                pairs_per_prompt=1, seed=0)
    assert "shown_first" not in fair[0].meta and "annotator" not in fair[0].meta


def test_annotator_summary_stratifies_pairs_by_annotator() -> None:
    from prefopt.data.synthetic import annotator_summary

    prompts, responses, scores = noisy_inputs(n_prompts=400, k=3)
    pool = [AnnotatorConfig(temperature=1e-9), AnnotatorConfig(temperature=1e-9, flip_rate=0.5)]
    pairs = simulate_preferences(prompts, responses, scores, annotator=pool, pairs_per_prompt=2, seed=0)
    rows = annotator_summary(pairs)
    assert [r["annotator"] for r in rows] == [0, 1] and sum(r["pairs"] for r in rows) == len(pairs)
    assert rows[0]["gold_agreement"] == 1.0 and 0.4 < rows[1]["gold_agreement"] < 0.6
    assert rows[0]["flipped"] == 0.0 and 0.4 < rows[1]["flipped"] < 0.6 and rows[0]["chosen_first"] is None
    assert rows[0]["pairs"] + rows[1]["pairs"] == len(pairs) and "proxy_agreement" not in rows[0]
    # a proxy that prefers the gold winner agrees with annotator 0 always, with the noisy one half the time
    gold = [(p.meta["score_chosen"], p.meta["score_rejected"]) for p in pairs]
    rows = annotator_summary(pairs, proxy=gold)
    assert rows[0]["proxy_agreement"] == 1.0 and rows[1]["proxy_agreement"] == rows[1]["gold_agreement"]
    # verbosity and position biases show in their own columns (responses of different lengths)
    responses = [[f"response {i}.{j}" + "!" * rng_len for j, rng_len in enumerate(random.Random(i).sample(range(40), len(rs)))]
                 for i, rs in enumerate(responses)]
    biased = [AnnotatorConfig(temperature=1e-9, length_bias=1e4), AnnotatorConfig(temperature=0.1, position_bias=100.0)]
    rows = annotator_summary(simulate_preferences(prompts, responses, scores, annotator=biased, pairs_per_prompt=2, seed=0))
    assert rows[0]["chosen_longer"] == 1.0 and rows[0]["chosen_first"] is None
    assert rows[1]["chosen_first"] == 1.0 and 0.35 < rows[1]["chosen_longer"] < 0.65
    assert annotator_summary(simulate_preferences(prompts, responses, scores, annotator=pool[0],
                                                  pairs_per_prompt=1, seed=0)) == []
