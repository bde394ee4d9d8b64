"""The pipeline on the tiny model: synthetic pairs are a pure function of the seed, the master seed reaches every
stage, cached stages give exactly what computing them gives, runs are artifacts."""

import dataclasses
import json

import pytest
import torch
from conftest import micro

from prefopt.data.io import load_pairs
from prefopt.data.judges import VaderJudge
from prefopt.data.tasks import sentiment_prompts
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase
from prefopt.pipeline.bench import checkpoint_steps, run, synthesize_pairs
from prefopt.pipeline.config import PRESETS, BenchConfig, preset


def _pairs(seed):
    lm, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    cfg = preset("smoke")
    cfg.seed = seed
    cfg.data.k = 3
    cfg.data.pairs_per_prompt = 2
    return synthesize_pairs(shared, VaderJudge(), sentiment_prompts()[:6], cfg, advance=lambda n: None)


def test_synthetic_pairs_deterministic_by_seed():
    a, b, c = _pairs(0), _pairs(0), _pairs(1)
    assert len(a) == 12
    assert [dataclasses.astuple(p) for p in a] == [dataclasses.astuple(p) for p in b]
    assert [(p.chosen, p.rejected) for p in a] != [(p.chosen, p.rejected) for p in c]
    for p in a:
        assert p.chosen != p.rejected
        assert isinstance(p.meta["chosen_eos"], bool) and isinstance(p.meta["rejected_eos"], bool)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    cfg = preset(name)
    assert isinstance(cfg, BenchConfig)
    assert set(cfg.policies) == {"ppo", "dpo"}
    assert cfg.ppo.mini_batch_size <= cfg.ppo.batch_size
    # every method samples what the evaluation samples: the online backends train at the length they are judged at
    lengths = {cfg.data.max_new_tokens, cfg.ppo.max_new_tokens, cfg.rloo.max_new_tokens, cfg.eval.max_new_tokens}
    assert len(lengths) == 1, lengths


def test_checkpoint_steps_are_inside_training():
    assert checkpoint_steps(12, 2) == {4, 8, 12}
    assert checkpoint_steps(3, 5) == {1, 2, 3}
    assert checkpoint_steps(10, 0) == set()


def test_master_seed_reaches_every_stage():
    cfg = micro("seed=3")
    for pol in cfg.resolved_policies().values():
        assert pol.config.seed == 3
    assert micro("seed=3", "dpo.seed=9").resolved_policies()["dpo"].config.seed == 9


def _run(tmp_path, name, *sets, cache=None):
    return run(micro(*sets), tmp_path / name, cache_dir=cache, console=None)


def test_cached_stages_give_identical_results_and_runs_are_artifacts(tmp_path):
    cache = tmp_path / "cache"
    first = _run(tmp_path, "a", cache=cache)
    second = _run(tmp_path, "b", cache=cache)
    assert first.cache_hits == [] and second.cache_hits == ["pairs", "rm"]
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(first.summary) == strip(second.summary)  # a cached stage is exactly the computed one
    a, b = tmp_path / "a", tmp_path / "b"
    assert load_pairs(a / "pairs.jsonl") == load_pairs(b / "pairs.jsonl")
    for folder in (a / "policies" / "ppo", a / "policies" / "dpo", a / "rm"):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    info = json.loads((a / "policies" / "dpo" / "policy.json").read_text())
    assert info["backend"] == "dpo" and info["config"]["seed"] == 0
    doc = json.loads((a / "summary.json").read_text())
    assert doc["eval_settings"]["eval"]["seed"] == 1234 and doc["metric_versions"]["eval/kl_to_ref"] == 1
    steps = {(r["policy"], r["step"]) for r in doc["path"]}
    assert ("reference", 0) in steps and ("ppo", 1) in steps  # evaluations during training draw a path
    assert json.loads((a / "prefopt-run.json").read_text())["complete"] is True
    peaks = doc["meta"]["peak_rss_mib_after"]  # which stage set the process's peak memory
    assert list(peaks) == [k for k in doc["meta"]["timings_s"] if k in peaks] and {"ppo", "dpo", "eval"} <= set(peaks)
    assert list(peaks.values()) == sorted(peaks.values()) and all(v > 50 for v in peaks.values())
    from prefopt.models.kernels import linear_kernel

    assert doc["meta"]["linear_kernel"] == linear_kernel() in ("onednn", "aten")  # what the base's products ran on


def test_seed_changes_pairs_and_weights(tmp_path):
    _run(tmp_path, "s0")
    _run(tmp_path, "s1", "seed=1")
    assert load_pairs(tmp_path / "s0" / "pairs.jsonl") != load_pairs(tmp_path / "s1" / "pairs.jsonl")
    from safetensors.torch import load_file

    w0 = load_file(str(tmp_path / "s0" / "policies" / "dpo" / "adapter_model.safetensors"))
    w1 = load_file(str(tmp_path / "s1" / "policies" / "dpo" / "adapter_model.safetensors"))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_dpo_reference_logps_recorded_while_sampling_equal_a_forward_pass(monkeypatch):
    """Synthetic pairs carry the reference's log-probs of both responses from the sampling steps; DPO takes them
    instead of its pass over every pair. The naive form: that pass (dpo._reference_logps without them). A pair
    recorded under another reference, or whose ids no longer match what DPO encodes, gets the forward pass."""
    from prefopt.backends import dpo
    from prefopt.backends._common import REF_LOGPS, encode_pairs
    from prefopt.pipeline.stages import reference_id

    lm, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    cfg = preset("smoke")
    cfg.data.k, cfg.data.pairs_per_prompt = 3, 2
    pairs = synthesize_pairs(shared, VaderJudge(), sentiment_prompts()[:8], cfg, advance=lambda n: None)
    ref = reference_id(cfg, shared.device)
    assert len(pairs) == 16 and all(p.meta[REF_LOGPS]["reference"] == ref for p in pairs)
    enc = encode_pairs(pairs, tok, cfg.dpo.max_prompt_tokens, cfg.dpo.max_response_tokens)
    known = dpo._recorded(pairs, enc, ref)
    # a response whose text does not re-encode to the ids it was sampled as (the character tokenizer folds some
    # whitespace; SmolLM2's BPE: 13 of 256 in the default run) is computed; the rest are taken
    todo = [i for i in range(16) if known[0][i] is None or known[1][i] is None]
    assert 0 < len(todo) <= 4
    naive = dpo._reference_logps(shared, cfg.dpo, enc, shared.device)

    calls = []
    real = dpo._sequence_logps
    monkeypatch.setattr(dpo, "_sequence_logps", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    fast = dpo._reference_logps(shared, cfg.dpo, enc, shared.device, known)
    assert calls == [len(todo), len(todo)]  # one pass over those pairs only, chosen and rejected
    for a, b in zip(fast, naive):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
        assert not torch.equal(a, torch.zeros_like(a))

    # another reference, or ids that changed (a longer prompt limit, edited text): those pairs are computed
    assert dpo._recorded(pairs, enc, "another-reference") == ([None] * 16, [None] * 16)
    j = next(i for i in range(16) if i not in todo)
    enc.chosen_ids[j] = enc.chosen_ids[j][:-1] + [enc.chosen_ids[j][-1] % 50 + 1]
    assert dpo._recorded(pairs, enc, ref)[0][j] is None
    calls.clear()
    mixed = dpo._reference_logps(shared, cfg.dpo, enc, shared.device, dpo._recorded(pairs, enc, ref))
    assert calls == [len(todo) + 1] * 2
    kept = [i for i in range(16) if i not in todo and i != j]
    assert torch.equal(mixed[0][kept], fast[0][kept]) and torch.equal(mixed[1][kept], fast[1][kept])
    again = dpo._reference_logps(shared, cfg.dpo, enc, shared.device)
    assert torch.allclose(mixed[0][j], again[0][j], rtol=1e-5, atol=1e-5) and not torch.isclose(mixed[0][j], fast[0][j])

    # sampled at another temperature, the recorded log-probs are not the reference's: none are kept
    cfg.data.temperature = 0.7
    assert not any(REF_LOGPS in p.meta for p in synthesize_pairs(shared, VaderJudge(), sentiment_prompts()[:4], cfg,
                                                                 advance=lambda n: None))


def test_synthetic_pairs_round_trip_through_their_file(tmp_path):
    """What the cache and run folders store loads back as exactly the pairs that were synthesised, blank and
    whitespace responses of a tiny model included."""
    from prefopt.data.io import write_pairs

    lm, tok = load_base("tiny", device=torch.device("cpu"))
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    cfg = preset("smoke")
    cfg.data.k = 8
    pairs = synthesize_pairs(shared, VaderJudge(), sentiment_prompts()[:64], cfg, advance=lambda n: None)
    assert len(pairs) > 200
    assert load_pairs(write_pairs(tmp_path / "pairs.jsonl", pairs)) == pairs


def test_annotator_pool_is_stratified_in_the_run_and_the_report(tmp_path):
    """A pool's pairs are stratified by annotator in summary.json (with the reward model's agreement with each
    annotator's labels), in the run's annotators.md and in `prefopt report`; one seed counts once."""
    from prefopt.reports.compare import annotators_over_seeds, compare, write_comparison
    from prefopt.reports.run import load_run

    pool = 'data.annotators=[{"temperature": 1e-9}, {"temperature": 1e-9, "flip_rate": 0.5}]'
    res = _run(tmp_path, "pool", pool)
    doc = json.loads((tmp_path / "pool" / "summary.json").read_text())
    rows = doc["meta"]["annotators"]
    pairs = load_pairs(tmp_path / "pool" / "pairs.jsonl")
    assert [r["annotator"] for r in rows] == [0, 1] and sum(r["pairs"] for r in rows) == len(pairs)
    assert rows[0]["gold_agreement"] == 1.0 and rows[0]["flipped"] == 0.0  # a noiseless annotator
    assert all(0.0 <= r["proxy_agreement"] <= 1.0 for r in rows)
    table = (tmp_path / "pool" / "annotators.md").read_text()
    assert "| annotator | pairs | agrees with gold | RM agrees | flipped |" in table
    assert res.summary
    run = load_run(tmp_path / "pool", samples=False)
    assert annotators_over_seeds([run, run]) == [{**r, "n": 1} for r in rows]
    write_comparison(compare([run]), tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Training pairs by annotator" in report and "| 1 | " in report
