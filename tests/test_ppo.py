"""PPO recipe details one by one, reward sources, warnings, and checkpoint/resume."""

import logging

import pytest
import torch
from conftest import Killed, killed_after

from prefopt.backends import losses, ppo
from prefopt.backends.checkpoint import StepCheckpoint
from prefopt.backends._common import TrainData
from prefopt.models.base import load_base
from prefopt.models.ops import encode_prompts, hidden_states, make_batch, response_logits, response_logprobs
from prefopt.models.rewards import SequenceClassifierReward, text_score_fn
from prefopt.models.shared import LoraSettings, SharedBase

t = torch.tensor


def test_eos_penalty_only_for_unterminated():
    scores = t([1.0, 2.0, 3.0])
    ended = t([True, False, True])
    assert losses.apply_eos_penalty(scores, ended, -1.0).tolist() == [1.0, -1.0, 3.0]
    assert losses.apply_eos_penalty(scores, ended, None).tolist() == [1.0, 2.0, 3.0]


def test_score_lands_on_last_real_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = losses.kl_penalised_rewards(t([10.0, 20.0]), kl, mask, t([3, 1]), kl_coef=0.5)
    expected = t([[-0.05, -0.1, 10.0 - 0.15], [20.0 - 0.25, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_truncate_at_stop_token():
    assert losses.truncate_at([[5, 9, 7, 9], [1, 2]], 9) == [[5, 9], [1, 2]]
    assert losses.truncate_at([[5, 9]], None) == [[5, 9]]


def test_adaptive_kl_controller_hand_computed():
    ctl = losses.KLController(0.1, target=6.0, horizon=10_000)
    ctl.update(kl=9.0, n=100)  # error = clip(9/6 - 1) = 0.2 -> beta * (1 + 0.2 * 100/10000)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl.update(kl=5.4, n=1000)  # error = -0.1 -> * (1 - 0.01)
    assert ctl.value == pytest.approx(0.1 * 1.002 * 0.99)
    fixed = losses.KLController(0.1)
    fixed.update(kl=100.0, n=100)
    assert fixed.value == 0.1


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert losses.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert losses.explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0)


def test_logprobs_use_the_sampling_temperature(tiny):
    """Sampling at temperature T draws from softmax(logits / T): our log-probs at T must match the sampler."""
    lm, tok = tiny
    prompt = encode_prompts(["ab"], tok, 64)
    from prefopt.models.ops import sample

    with torch.no_grad():
        lm.model.norm.weight.mul_(6.0)  # a peaked distribution, so T=0.5 and T=1 differ clearly
    T, n = 0.5, 20_000
    draws = sample(lm, tok, prompt * n, max_new_tokens=1, temperature=T, seed=0, batch_size=n)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=len(tok)).float() / n
    batch = make_batch(prompt, [[0]], tok.pad_token_id, "cpu")
    probs_T = response_logits(lm, hidden_states(lm, batch), batch, temperature=T)[0, 0].softmax(-1)
    probs_1 = response_logits(lm, hidden_states(lm, batch), batch, temperature=1.0)[0, 0].softmax(-1)
    tv_T = 0.5 * (counts - probs_T).abs().sum().item()
    tv_1 = 0.5 * (counts - probs_1).abs().sum().item()
    assert tv_T < 0.03 and tv_1 > 0.1, (tv_T, tv_1)
    # and response_logprobs applies T the same way
    lp = response_logprobs(lm, make_batch(prompt, [[5]], tok.pad_token_id, "cpu"), temperature=T)
    assert lp[0, 0].item() == pytest.approx(probs_T[5].log().item(), abs=1e-5)


def test_text_score_fn_decodes_and_validates(tiny):
    _, tok = tiny
    fn = text_score_fn(lambda ps, rs: [float(len(r)) for r in rs], tok, name="len")
    ids = [tok("hello", add_special_tokens=False).input_ids]
    assert fn(ids, [tok("abc", add_special_tokens=False).input_ids]).tolist() == [3.0]
    bad = text_score_fn(lambda ps, rs: [float("nan")] * len(rs), tok, name="nan")
    with pytest.raises(ValueError, match="non-finite"):
        bad(ids, ids)


def test_reward_model_with_another_tokenizer(tiny):
    """A classifier with its own vocabulary scores the policy's decoded text (re-tokenised)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, policy_tok = tiny
    vocab = {"[pad]": 0, "[unk]": 1, **{w: i + 2 for i, w in enumerate(["good", "bad", "movie", "the"])}}
    wtk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    wtk.pre_tokenizer = pre_tokenizers.Whitespace()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=wtk, pad_token="[pad]", unk_token="[unk]")
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_labels=2,
                                                     pad_token_id=0))
    reward = SequenceClassifierReward(clf, other_tok)
    fn = text_score_fn(reward.score, policy_tok)
    prompt = [policy_tok("the movie ", add_special_tokens=False).input_ids] * 2
    resp = [policy_tok(w, add_special_tokens=False).input_ids for w in ("good", "bad")]
    got = fn(prompt, resp)
    with torch.no_grad():
        enc = other_tok(["the movie good", "the movie bad"], return_tensors="pt", padding=True)
        expected = clf(**enc).logits[:, 1]
    assert torch.allclose(got, expected, atol=1e-5)


def test_negative_kl_warning(caplog):
    w = ppo._Watch()
    base = {"train/kl": 0.5, "train/eos_rate": 0.5, "train/length": 10.0}
    w.check(1, base)
    with caplog.at_level(logging.WARNING, logger="prefopt.ppo"):
        w.check(2, {**base, "train/kl": -0.2, "train/eos_rate": 0.1, "train/length": 25.0})
        w.check(3, {**base, "train/kl": -0.2})
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("negative" in m for m in msgs) == 1  # said once, not every step
    assert any("EOS rate collapsed" in m for m in msgs)
    assert any("length drifted" in m for m in msgs)


def _run_ppo(tmp_path, steps, stop_after=None, resume=False):
    lm, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
    shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
    prompts = encode_prompts([f"prompt {i}" for i in range(6)], tok, 32)
    target = tok("e", add_special_tokens=False).input_ids[0]

    def score_fn(p, r):  # reward: fraction of 'e' characters
        return t([sum(x == target for x in resp) / max(len(resp), 1) for resp in r])

    cfg = ppo.PPOConfig(steps=steps, batch_size=6, mini_batch_size=3, grad_accum=3, ppo_epochs=2,
                        max_new_tokens=6, learning_rate=1e-2, kl_target=1.0, seed=3, reward="gold",
                        save_every=1, checkpoint_dir=str(tmp_path / "ckpt"))
    log = []
    ckpt = killed_after(stop_after)(cfg.checkpoint_dir) if stop_after is not None else None
    try:
        ppo.train(shared, cfg, TrainData(prompts=prompts, score_fn=score_fn), on_step=lambda s, m: log.append((s, m)),
                  resume=resume, checkpoint=ckpt)
    except Killed:
        pass
    return log, shared.adapter_state("ppo")


def test_resume_continues_exactly_like_uninterrupted_run(tmp_path):
    full, weights = _run_ppo(tmp_path / "a", steps=4)
    _run_ppo(tmp_path / "b", steps=4, stop_after=2)
    resumed, resumed_weights = _run_ppo(tmp_path / "b", steps=4, resume=True)
    assert [s for s, _ in resumed] == [3, 4]
    for (s1, m1), (s2, m2) in zip(full[2:], resumed):
        assert s1 == s2
        assert {k: v for k, v in m1.items() if not k.startswith("time/")} == {k: v for k, v in m2.items() if not k.startswith("time/")}
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)  # bit for bit


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no PPO checkpoint"):
        _run_ppo(tmp_path, steps=2, resume=True)


def test_ppo_config_validation():
    with pytest.raises(ValueError, match="grad_accum"):
        ppo.PPOConfig(mini_batch_size=16, grad_accum=3)
    with pytest.raises(ValueError, match="kl_in"):
        ppo.PPOConfig(kl_in="both")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ppo.PPOConfig(save_every=2)
    with pytest.raises(ValueError, match="PPOConfig.reward"):
        ppo.PPOConfig(reward="nope")


def test_checkpoint_holds_no_pickles_and_survives_a_torn_write(tmp_path):
    import random as pyrandom

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / 10)
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    rng = pyrandom.Random(5)
    ckpt = StepCheckpoint(tmp_path, extra=lambda: {"rows": [1, 2]})
    kw = dict(weights={"w": torch.arange(4.0)}, opt=opt, sched=sched, rngs={"rng": rng}, state={"order": [3, 1]})
    ckpt.save(2, **kw)
    ckpt.save(4, **kw)
    files = sorted(str(q.relative_to(tmp_path)) for q in tmp_path.rglob("*") if q.is_file())
    assert files == ["latest.json", "step-000004/state.json", "step-000004/tensors.safetensors"]  # old slot gone
    (tmp_path / "step-000006").mkdir()  # a kill while writing the next slot: the pointer still names step 4
    (tmp_path / "step-000006" / "state.json").write_text("{trunc")
    back = StepCheckpoint(tmp_path).load()
    assert back.step == 4 and torch.equal(back.weights["w"], torch.arange(4.0))
    assert back.state == {"order": [3, 1]} and back.extra == {"rows": [1, 2]}
    q = torch.nn.Parameter(torch.ones(3))
    fresh = torch.optim.AdamW([q], lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda k: 1.0 - k / 10)
    fresh_rng = pyrandom.Random(0)
    torch.manual_seed(123)  # moved on since the save: restore puts torch's RNG back too
    back.restore(fresh, fresh_sched, {"rng": fresh_rng})
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and fresh_sched.last_epoch == sched.last_epoch
    assert fresh_rng.random() == rng.random()


def test_rollout_states_from_sampling_train_like_a_second_forward(tmp_path):
    """rollout_states (log-probs, entropies and values of the rollout from the sampling pass) against the naive
    form, a separate forward over every rollout: the same responses, metrics and weights to float rounding."""
    runs = {}
    for flag in (True, False):
        lm, tok = load_base("tiny", device=torch.device("cpu"), seed=0)
        shared = SharedBase(lm, tok, LoraSettings(r=4, alpha=8))
        prompts = encode_prompts([f"prompt {i}" for i in range(6)], tok, 32)
        target = tok("e", add_special_tokens=False).input_ids[0]
        score_fn = lambda p, r: t([sum(x == target for x in resp) / max(len(resp), 1) for resp in r])  # noqa: E731
        cfg = ppo.PPOConfig(steps=3, batch_size=6, mini_batch_size=3, ppo_epochs=2, max_new_tokens=6,
                            learning_rate=1e-2, seed=3, reward="gold", rollout_states=flag)
        log = []
        ppo.train(shared, cfg, TrainData(prompts=prompts, score_fn=score_fn), on_step=lambda s, m: log.append(m))
        runs[flag] = log, shared.adapter_state("ppo")
    (fast, w_fast), (naive, w_naive) = runs[True], runs[False]
    for a, b in zip(fast, naive):
        assert a["train/score"] == b["train/score"] and a["train/length"] == b["train/length"]  # the same rollouts
        for k in ("train/kl", "train/entropy", "train/loss", "train/value_loss", "train/approx_kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
    assert all(torch.allclose(w_fast[k], w_naive[k], atol=1e-5) for k in w_fast)


def test_reward_normalisation_gives_reference_mean_0_std_1_and_survives_save_load(tiny, tmp_path):
    """normalize_scale: the reference responses score mean 0, std 1 (Ziegler et al. 2019); every score is the raw
    score shifted and divided by the same two numbers; a saved model keeps them; value_from_rm's head predicts
    the normalised score."""
    import copy
    import random

    from prefopt.backends import rm
    from prefopt.data.records import PreferencePair

    rng = random.Random(0)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 10)))  # noqa: E731
    pairs = [PreferencePair(prompt=word() + "?", chosen=word(), rejected=word(), margin=None) for _ in range(12)]
    lm, tok = tiny
    shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=4, alpha=8))
    model = rm.train(shared, pairs, rm.RewardConfig(batch_size=4, epochs=1, learning_rate=1e-2, normalize_on=24,
                                                    normalize_scale=True))
    data = rm.encode_pairs(pairs, tok, 64, 64)
    prompts, responses = data.prompt_ids * 2, data.chosen_ids + data.rejected_ids
    got = model.score_ids(prompts, responses).double()
    assert abs(float(got.mean())) < 1e-5 and abs(float(got.std()) - 1) < 1e-5  # normalize_on covers all 24
    offset, scale = model.offset, model.scale
    assert scale != 1.0
    model.offset, model.scale = 0.0, 1.0
    raw = model.score_ids(prompts, responses).double()
    torch.testing.assert_close(got, (raw - offset) / scale, rtol=0, atol=1e-5)
    assert abs(float(raw.std()) - scale) < 1e-5
    model.offset, model.scale = offset, scale
    folder = model.save(tmp_path / "rm")
    other = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=4, alpha=8))
    loaded = rm.RewardModel.load(other, folder)
    assert (loaded.offset, loaded.scale) == (offset, scale)
    torch.testing.assert_close(loaded.score_ids(prompts, responses).double(), got, rtol=0, atol=1e-5)
    # the value head value_from_rm starts from predicts the normalised score of the same hidden state
    h = torch.randn(3, model.head.in_features)
    value_head = torch.nn.Linear(model.head.in_features, 1)
    ppo.init_value_head_from_rm(value_head, model)
    with torch.no_grad():
        torch.testing.assert_close(value_head(h), (model.head(h) - offset) / scale)
    with pytest.raises(ValueError, match="normalize_on >= 2"):
        rm.RewardConfig(normalize_on=0, normalize_scale=True)
    with pytest.raises(ValueError, match="pooling must be one of"):
        rm.RewardConfig(pooling="max")


def test_content_pooling_scores_the_text_not_its_end(tiny):
    """rm.pooling='content': a response scores the same with or without its closing EOS (the score reads the text,
    as the judge does); an empty response -- [EOS] or [] -- scores the prompt alone, one number per prompt; 'mean'
    differs on both counts."""
    import copy
    import random

    from prefopt.backends import rm
    from prefopt.data.records import PreferencePair

    rng = random.Random(1)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 10)))  # noqa: E731
    pairs = [PreferencePair(prompt=word() + "?", chosen=word(), rejected=word(), margin=None) for _ in range(12)]
    lm, tok = tiny
    eos = tok.eos_token_id
    models = {}
    for pooling in ("content", "mean"):
        shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=4, alpha=8))
        models[pooling] = rm.train(shared, pairs, rm.RewardConfig(batch_size=4, epochs=1, learning_rate=1e-2,
                                                                  normalize_on=24, pooling=pooling))
    data = rm.encode_pairs(pairs, tok, 64, 64)
    texts = [[t for t in r if t != eos] for r in data.chosen_ids]
    assert all(texts) and any(r[-1] == eos for r in data.chosen_ids)
    ended = [r + [eos] for r in texts]
    content, mean = models["content"], models["mean"]
    torch.testing.assert_close(content.score_ids(data.prompt_ids, ended), content.score_ids(data.prompt_ids, texts),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(mean.score_ids(data.prompt_ids, ended), mean.score_ids(data.prompt_ids, texts), atol=1e-4)
    empty_eos = content.score_ids(data.prompt_ids, [[eos]] * len(texts))
    torch.testing.assert_close(empty_eos, content.score_ids(data.prompt_ids, [[]] * len(texts)), rtol=0, atol=1e-5)
    assert not torch.allclose(mean.score_ids(data.prompt_ids, [[eos]] * len(texts)),
                              mean.score_ids(data.prompt_ids, [[]] * len(texts)), atol=1e-4)
