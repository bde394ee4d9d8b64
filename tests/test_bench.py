"""Pipeline pieces on the tiny model: synthetic pairs are a pure function of the seed; configs validate."""

import dataclasses

import pytest
import torch

from prefopt.bench import BenchConfig, preset, synthesize_pairs
from prefopt.data.judges import VaderJudge
from prefopt.data.tasks import sentiment_prompts
from prefopt.models.base import load_base
from prefopt.models.shared import LoraSettings, SharedBase


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


@pytest.mark.parametrize("name", ["default", "smoke"])
def test_presets_are_valid(name):
    cfg = preset(name)
    assert isinstance(cfg, BenchConfig)
    assert set(cfg.algorithms) == {"ppo", "dpo"}
    assert cfg.ppo.mini_batch_size <= cfg.ppo.batch_size


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="algorithms"):
        BenchConfig(algorithms=("ppo", "grpo"))
    from prefopt.backends.ppo import PPOConfig

    with pytest.raises(ValueError, match="PPOConfig.kl_estimator"):
        PPOConfig(kl_estimator="k7")
    with pytest.raises(ValueError, match="PPOConfig.steps"):
        PPOConfig(steps=0)
