"""Memory bounds are exact rewrites of the naive computation: log-probs via logsumexp, the LM head in chunks
without grad, and minibatches split into token-bounded micro-batches whose summed gradients are the minibatch's.
Each is checked against its naive form on the tiny model."""

import copy
import os
import random

import pytest

import torch

from prefopt.backends import dpo, ppo, rloo, rm, sft
from prefopt.backends._common import TrainData, micro_batches
from prefopt.data.records import Demonstration, PreferencePair
from prefopt.models import ops
from prefopt.models.shared import LoraSettings, SharedBase


def test_gather_logprobs_equals_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 4
    tokens = torch.randint(0, 50, (3, 5), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ops.gather_logprobs(logits, tokens), naive, rtol=0, atol=1e-5)


def test_chunked_head_equals_one_shot(tiny, monkeypatch):
    lm, tok = tiny
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randrange(1, 6))] for _ in range(7)]
    responses = [[rng.randrange(3, 60) for _ in range(rng.randrange(0, 9))] for _ in range(7)]
    batch = ops.make_batch(prompts, responses, tok.pad_token_id, "cpu")
    with torch.no_grad():
        hidden = ops.hidden_states(lm, batch)
        logits = ops.response_logits(lm, hidden, batch, 0.7)
        naive_lp = ops.gather_logprobs(logits, batch.response_ids)
        naive_ent = ops.entropy_from_logits(logits)
        one = ops.logprob_stats(lm, hidden, batch, 0.7, entropy=True, full=True)  # one chunk: the same ops in place
        for got, want in zip(one, (naive_lp, naive_ent, torch.log_softmax(logits, -1)), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        monkeypatch.setattr(ops, "LOGIT_POSITIONS", 10)  # 10 // 8 positions = 1 row per chunk
        lp, ent, full = ops.logprob_stats(lm, hidden, batch, 0.7, entropy=True, full=True)
        torch.testing.assert_close(lp, naive_lp)
        torch.testing.assert_close(ent, naive_ent)
        torch.testing.assert_close(full, torch.log_softmax(logits, -1))
        torch.testing.assert_close(ops.response_logprobs(lm, batch, 0.7), naive_lp * batch.response_mask)


def _padded(g, lengths, rows):
    return rows * len(g) * (max(lengths[i][0] for i in g) + max(max(lengths[i][1], 1) for i in g))


def test_micro_batches_respect_the_token_budget():
    lengths = {0: (3, 5), 1: (2, 2), 2: (4, 1), 3: (10, 10), 4: (1, 1)}
    f = lengths.__getitem__
    assert micro_batches([0, 1, 2, 3, 4], f, None) == [[0, 1, 2, 3, 4]]
    # by length: 4 (2), 1 (4), 2 (5), 0 (8), 3 (20); {4,1,2}: 3 x (4+2) = 18 > 16, {4,1}: 2 x 4 = 8, {2,0}: 2 x 9
    # = 18 > 16: four runs are the fewest (3 alone: 20, over budget by itself)
    assert micro_batches([0, 1, 2, 3, 4], f, 16) == [[4, 1], [2], [0], [3]]
    assert micro_batches([0, 1, 2, 3, 4], f, 24, rows_per_item=2) == [[4, 1], [2], [0], [3]]
    assert micro_batches([], f, 16) == []
    # 16 rollouts of 50 tokens under 256: 4 x 4, not the greedy 5 + 5 + 5 + 1
    assert [len(g) for g in micro_batches(list(range(16)), lambda i: (18, 32), 256)] == [4, 4, 4, 4]


def test_micro_batches_are_the_fewest_balanced_runs_of_the_length_order():
    """Against brute force: every contiguous cut of the length-sorted order into runs within budget (a lone item
    may exceed it); the function gives the fewest runs and, among those, the smallest largest run."""
    import itertools

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randrange(1, 8)
        lengths = {10 + k: (rng.randrange(1, 9), rng.randrange(0, 9)) for k in range(n)}
        idx = list(lengths)
        rng.shuffle(idx)
        budget, rows = rng.choice((4, 10, 20, 40, 80)), rng.choice((1, 2))
        groups = micro_batches(idx, lengths.__getitem__, budget, rows_per_item=rows)
        assert sorted(i for g in groups for i in g) == sorted(idx)  # every item once
        order = sorted(idx, key=lambda i: sum(lengths[i]))
        assert [i for g in groups for i in g] == order
        best = None
        for k in range(1, n + 1):
            for cuts in itertools.combinations(range(1, n), k - 1):
                runs = [order[a:b] for a, b in zip((0, *cuts), (*cuts, n))]
                if all(len(g) == 1 or _padded(g, lengths, rows) <= budget for g in runs):
                    cost = max(_padded(g, lengths, rows) for g in runs)
                    best = cost if best is None or cost < best else best
            if best is not None:
                break
        assert len(groups) == k, (trial, groups)
        assert max(_padded(g, lengths, rows) for g in groups) == best, (trial, groups)


def _pairs(n=10, seed=0):
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 14)))  # noqa: E731
    return [PreferencePair(prompt=word() + "?", chosen=word(), rejected=word(), margin=None) for _ in range(n)]


def _first_gradient(tiny, train, monkeypatch, checkpoint_activations=False):
    """The gradient of the first optimisation step of train(shared), from identical starts (captured where it is
    clipped; later steps are not compared: Adam's first steps turn rounding-level differences of near-zero
    gradient entries into lr-sized ones)."""
    lm, tok = tiny
    shared = SharedBase(copy.deepcopy(lm), tok, LoraSettings(r=4, alpha=8), checkpoint_activations)
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def capture(params, *args, **kwargs):
        params = list(params)
        if not grads:
            grads.append([p.grad.clone() for p in params])
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    train(shared)
    assert grads and any(g.abs().max() > 0 for g in grads[0])
    return grads[0]


def _assert_same(a, b):
    """Equal up to float rounding: padding differs between the two (each micro-batch is padded to its own
    width), so sums run in other orders; a wrong weighting of the micro-batches is off by 10s of percent."""
    assert len(a) == len(b)
    scale = max(float(x.abs().max()) for x in a)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", ["rm", "rm-mean", "rm-content", "dpo", "ipo", "simpo", "sft"])
def test_micro_batched_training_equals_one_pass(tiny, backend, monkeypatch):
    """Every pair (demonstration) in its own micro-batch gives the gradient of one pass over the minibatch."""
    pairs = _pairs()

    def run(micro):
        if backend.startswith("rm"):
            cfg = rm.RewardConfig(batch_size=5, epochs=1, learning_rate=1e-2, normalize_on=0, micro_batch_tokens=micro,
                                  pooling=backend[3:] or "last")
            return _first_gradient(tiny, lambda s: rm.train(s, pairs, cfg), monkeypatch)
        if backend == "sft":
            cfg = sft.SFTConfig(batch_size=5, learning_rate=1e-2, micro_batch_tokens=micro)
            demos = [Demonstration(p.prompt, p.chosen, {}) for p in pairs]
            return _first_gradient(tiny, lambda s: sft.train(s, cfg, TrainData(demos=demos)), monkeypatch)
        loss = {"dpo": "sigmoid"}.get(backend, backend)
        cfg = dpo.DPOConfig(batch_size=5, learning_rate=1e-2, loss_type=loss, micro_batch_tokens=micro)
        return _first_gradient(tiny, lambda s: dpo.train(s, cfg, TrainData(pairs=pairs)), monkeypatch)

    _assert_same(run(None), run(1))


def _score(prompt_ids, response_ids):
    return torch.tensor([float(sum(t % 7 == 0 for t in r)) for r in response_ids])


def test_micro_batched_rloo_equals_one_pass(tiny, monkeypatch):
    prompts = [[5 + i, 9, 11 + i] for i in range(6)]

    def run(micro):
        cfg = rloo.RLOOConfig(steps=1, batch_size=3, k=3, max_new_tokens=5, learning_rate=1e-2, micro_batch_tokens=micro)
        return _first_gradient(tiny, lambda s: rloo.train(s, cfg, TrainData(prompts=prompts, score_fn=_score)), monkeypatch)

    _assert_same(run(None), run(1))


def test_ppo_grad_accumulation_equals_one_pass(tiny, monkeypatch):
    """Micro-batches weighted by their share of the minibatch's tokens: exactly the one-pass gradient, also when
    the micro-batches hold different numbers of response tokens."""
    prompts = [[5 + i, 9, 11 + i] for i in range(8)]

    def run(accum, micro=None):
        cfg = ppo.PPOConfig(steps=1, batch_size=4, mini_batch_size=4, grad_accum=accum, ppo_epochs=1, max_new_tokens=6,
                            learning_rate=1e-2, seed=0, micro_batch_tokens=micro)
        return _first_gradient(tiny, lambda s: ppo.train(s, cfg, TrainData(prompts=prompts, score_fn=_score)), monkeypatch)

    one_pass = run(1)
    _assert_same(one_pass, run(4))
    _assert_same(one_pass, run(1, micro=1))  # token-budgeted: one rollout per micro-batch
    _assert_same(one_pass, run(2, micro=12))


@pytest.mark.parametrize("backend", ["rm", "dpo", "ppo"])
def test_activation_checkpointing_gives_the_same_gradients(tiny, backend, monkeypatch):
    """Recomputing each layer's activations in the backward pass is the same computation: the same gradient."""
    pairs = _pairs()
    prompts = [[5 + i, 9, 11 + i] for i in range(8)]
    train = {
        "rm": lambda s: rm.train(s, pairs, rm.RewardConfig(batch_size=5, epochs=1, learning_rate=1e-2, normalize_on=0)),
        "dpo": lambda s: dpo.train(s, dpo.DPOConfig(batch_size=5, learning_rate=1e-2), TrainData(pairs=pairs)),
        "ppo": lambda s: ppo.train(s, ppo.PPOConfig(steps=1, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                                                    learning_rate=1e-2, seed=0), TrainData(prompts=prompts, score_fn=_score)),
    }[backend]
    plain = _first_gradient(tiny, train, monkeypatch)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    recomputed = _first_gradient(tiny, train, monkeypatch, checkpoint_activations=True)
    assert calls  # the layers did run checkpointed
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bounded_heap_fixes_the_glibc_mmap_threshold(monkeypatch):
    """``bounded_heap`` sets glibc's mmap threshold (glibc here: CI and the machines this project runs on)."""
    from prefopt._alloc import bound_heap

    assert bound_heap() is True
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own setting wins
    assert bound_heap() is False


def test_keep_heap_reuses_freed_blocks_instead_of_faulting_in_fresh_pages():
    """prefopt's default (keep_heap): 24 tensors of 64 MiB allocated and freed in turn fault in fewer than half
    the pages they do under glibc's defaults (which unmap each one on free, so the next is faulted in and zeroed
    again); a stage's end still hands the kept pages back (release_heap(force=True)); the user's own malloc
    settings win. Each case in a fresh process: malloc settings are process-wide."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
from prefopt._alloc import keep_heap, release_heap
def rss():
    return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))
if sys.argv[1] == 'keep':
    assert keep_heap() is True
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(24):
    a = torch.ones(16 * 2**20)  # 64 MiB
    del a
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
held = rss()
release_heap(force=True)
print(faults, held - rss())
"""
    run = lambda mode, env=None: subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,  # noqa: E731
                                                check=True, env=env).stdout.split()
    kept_faults, given_back = map(float, run("keep"))
    plain_faults, _ = map(float, run("plain"))
    assert plain_faults > 24 * 16_384 * 0.9, plain_faults  # every 64 MiB block faulted in afresh (4 KiB pages)
    assert kept_faults < 0.5 * plain_faults, (kept_faults, plain_faults)
    assert given_back > 48, given_back  # what the heap kept goes back at a stage's end
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    user = subprocess.run([sys.executable, "-c", "from prefopt._alloc import keep_heap; print(keep_heap())"],
                          capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert user == "False"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def test_release_heap_returns_freed_heap_pages_to_the_os():
    """What every micro-batch, sampling batch and PPO update calls with ``trim_heap`` on: 256 MiB of small tensors
    freed under a block that stays alive (so free() alone cannot shrink the heap) stay resident until
    release_heap()."""
    from prefopt._alloc import release_heap, trim_heap

    trim_heap(True)  # the config's trim_heap: off by default
    blocks = [torch.ones(8192) for _ in range(8192)]  # 32 KiB each: below any mmap threshold, on the heap
    pin = torch.ones(8192)  # allocated after them: the heap's top stays in use
    del blocks
    before = _rss_mib()
    release_heap()
    after = _rss_mib()
    trim_heap(False)
    assert before - after > 128, (before, after)
    del pin


def test_a_run_holds_one_copy_of_the_base_and_a_sweep_worker_keeps_one_more(tmp_path):
    """``prefopt bench`` loads its own base and keeps no pristine copy (the weights are in memory once); inside
    keep_bases (a sweep worker) each run gets a copy of one kept base, equal to a fresh load but not shared."""
    from prefopt.pipeline import bench

    dev = torch.device("cpu")
    lm, _ = bench.base_model("tiny", dev)
    assert bench._BASES == {}
    with bench.keep_bases():
        a, _ = bench.base_model("tiny", dev)
        b, _ = bench.base_model("tiny", dev)
        assert len(bench._BASES) == 1
        for (n, p), q, r in zip(a.named_parameters(), b.parameters(), lm.parameters(), strict=True):
            assert torch.equal(p, q) and torch.equal(p, r), n
            assert p.data_ptr() != q.data_ptr()
    assert bench._BASES == {}
