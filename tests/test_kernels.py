"""The frozen base's matrix products by oneDNN (prefopt.models.kernels) against ATen's F.linear: the same
function to float rounding, forward and input gradient, on every layout the base uses; trainable weights keep
ATen's; the choice is fixed by the CPU and PREFOPT_LINEAR, and a bad value is a one-line error."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from prefopt.models import kernels
from prefopt.models.kernels import KERNEL_ENV, KernelError, linear, use_onednn_linears

HAS_ONEDNN = kernels.usable()


@pytest.fixture
def onednn(monkeypatch):
    """This process's kernel forced to oneDNN (where the op works) or ATen (where it does not: the fallback)."""
    monkeypatch.setattr(kernels, "_CHOSEN", "onednn" if HAS_ONEDNN else "aten")
    return HAS_ONEDNN


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_equals_f_linear_forward_and_input_gradient(onednn, monkeypatch, layout, with_bias):
    calls, dnn = [0], kernels._dnn

    def counted(*a):
        calls[0] += 1
        return dnn(*a)

    monkeypatch.setattr(kernels, "_dnn", counted)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g) / 6
    if layout == "column-major":  # how column_major_weights stores the base's matrices on CPU
        w = w.t().contiguous().t()
    b = torch.randn(48, generator=g) if with_bias else None
    for shape in [(7, 32), (3, 5, 32), (0, 32), (1, 1, 32)]:
        x = torch.randn(*shape, generator=g)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = linear(x1, w, b), F.linear(x2, w, b)
        assert y1.shape == y2.shape
        _close(y1, y2)
        dy = torch.randn(y1.shape, generator=g)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        _close(x1.grad, x2.grad)
        with torch.no_grad():  # the sampling path: no graph
            _close(linear(x, w, b), F.linear(x, w, b))
    assert calls[0] > 0 if onednn else calls[0] == 0  # oneDNN ran (or, without it, ATen alone)


def test_a_trainable_weight_keeps_aten_bit_for_bit_and_gets_its_gradient(onednn):
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    y = linear(x, w)
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones(4, 16).t() @ x.detach())


def test_a_model_routed_through_onednn_computes_the_same_logits_and_lora_gradients(onednn, tiny):
    """The tiny model with its frozen linears routed (and a LoRA role on top): logits and the LoRA gradients equal
    the unrouted copy's to float rounding; the LoRA and head layers, trainable, are not routed."""
    from prefopt.models.ops import encode_prompts, hidden_states, make_batch, response_logprobs
    from prefopt.models.shared import LoraSettings, SharedBase

    lm, tok = tiny
    plain_lm = copy.deepcopy(lm)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_CHOSEN", "aten")
        plain = SharedBase(plain_lm, tok, LoraSettings())
        plain.add_role("p", seed=0)
    routed = SharedBase(copy.deepcopy(lm), tok, LoraSettings())
    routed.add_role("p", seed=0)
    frozen = [m for m in routed.lm.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    patched = [m for m in routed.lm.modules() if "forward" in vars(m) and type(m) is torch.nn.Linear]
    assert len(patched) == (len(frozen) if onednn else 0) and frozen
    assert all(not m.weight.requires_grad for m in patched)
    prompts = encode_prompts(["ab", "a longer prompt"], tok, 32)
    batch = make_batch(prompts, [[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    grads = []
    for shared in (plain, routed):
        with torch.no_grad():
            for n, p in shared.peft.named_parameters():
                if "lora_B" in n:  # B != 0: the LoRA path carries values
                    p.copy_(torch.full_like(p, 0.01))
        with shared.role("p") as m:
            h = hidden_states(m, batch)
            lp = response_logprobs(m, batch)
            (lp.sum() + h.pow(2).mean()).backward()
        params = shared.adapter_parameters("p")
        grads.append((h.detach(), lp.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (h0, lp0, g0), (h1, lp1, g1) = grads
    _close(h0, h1)
    _close(lp0, lp1)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_choice_follows_the_environment_and_the_cpu(monkeypatch):
    assert kernels._choose({KERNEL_ENV: "aten"}) == "aten"
    with pytest.raises(KernelError, match="expected auto, onednn or aten"):
        kernels._choose({KERNEL_ENV: "mkl"})
    for cap, expected in (("AVX2", "aten"), ("AVX512", "onednn" if HAS_ONEDNN else "aten"), ("DEFAULT", "aten")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda cap=cap: cap)
        assert kernels._choose({}) == expected
    if HAS_ONEDNN:
        assert kernels._choose({KERNEL_ENV: "onednn"}) == "onednn"
    monkeypatch.setattr(kernels, "_agrees", lambda: False)  # an op that disagrees with F.linear is never used
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels._choose({}) == "aten"
    with pytest.raises(KernelError, match="no working oneDNN linear"):
        kernels._choose({KERNEL_ENV: "onednn"})


def test_use_onednn_linears_routes_nothing_under_aten(monkeypatch, tiny):
    monkeypatch.setattr(kernels, "_CHOSEN", "aten")
    lm, _ = tiny
    assert use_onednn_linears(copy.deepcopy(lm)) == 0


def test_a_bad_kernel_choice_is_one_line_and_exit_1(tmp_path):
    env = {**os.environ, KERNEL_ENV: "fast"}
    res = subprocess.run([sys.executable, "-m", "prefopt", "bench", "--preset", "smoke", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {KERNEL_ENV}='fast': expected auto, onednn or aten"]
    assert not (tmp_path / "o").exists()
