"""Which kernel runs the frozen base's fp32 matrix products on CPU: ATen's (MKL's sgemm) or oneDNN's.

PyTorch's CPU ``F.linear`` in fp32 calls MKL. On a CPU with AVX-512 that MKL does not dispatch to (AMD EPYC:
MKL picks its AVX2 code there), oneDNN's matmul -- ``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own
compiler emits for frozen CPU linears -- runs the same products in fp32 at about twice the rate.
Measured on this project's 2-core AMD EPYC (AVX-512, 2 threads; ``benchmarks/linear_kernels.py``,
results/linear_kernels.json): a 1024^3 product 184 -> 402 GFLOP/s (MKL's stays at 186-197 whatever
``MKL_ENABLE_INSTRUCTIONS`` says); SmolLM2-135M's gate/up matrix at a decoding step's 16 rows 0.45 -> 0.18 ms,
at a training micro-batch's 200 rows 166 -> 376 GFLOP/s forward and 164 -> 339 for the input gradient; the LM
head at 16 rows 15.4 -> 5.9 ms. Only the smallest products lose (the 192 x 576 k/v projections at one row:
0.013 -> 0.026 ms). Products differ from MKL's by float rounding (another summation order), not more.

:func:`use_onednn_linears` gives every frozen fp32 ``nn.Linear`` of a model on CPU (the decoder's projections,
the LM head) a forward through oneDNN, with a backward whose input gradient (``grad @ W``) is the same oneDNN
product with ``W``'s transpose; trainable weights (LoRA, heads) keep ATen's. :func:`linear` is the same choice
for code that multiplies by a weight itself (the fused log-prob head).

``PREFOPT_LINEAR`` chooses: ``auto`` (the default: oneDNN where the CPU has AVX-512, ATen elsewhere -- on AVX2
machines MKL is the one that was measured and tuned for), ``onednn`` (wherever the op exists: an error where it
does not) or ``aten``. The choice is fixed per machine (the CPU's features, never a timing), so the same
command on the same machine computes the same numbers; ``summary.json`` records it (``meta.linear_kernel``).
The op is checked once per process against ``F.linear`` on a small product (forward and input gradient); one
that is missing or disagrees (a PyTorch whose internal op changed) leaves ATen in charge.
"""

from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.errors import PrefoptError

KERNEL_ENV = "PREFOPT_LINEAR"
_CHOICES = ("auto", "onednn", "aten")


class KernelError(PrefoptError, ValueError):
    """PREFOPT_LINEAR names something this machine cannot do (a one-line error at the entry point)."""


def _op():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _dnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _agrees() -> bool:
    """oneDNN's product and input gradient against ATen's on a small problem (both layouts of the weight)."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 3, 24, generator=g)
        w = torch.randn(40, 24, generator=g)
        dy = torch.randn(5, 3, 40, generator=g)
        for weight in (w, w.t().contiguous().t()):
            if not torch.allclose(_dnn(x, weight), F.linear(x, weight), rtol=1e-4, atol=1e-4):
                return False
            if not torch.allclose(_dnn(dy, weight.t()), dy @ weight, rtol=1e-4, atol=1e-4):
                return False
        return True
    except Exception:  # a changed or broken internal op: ATen's kernels, nothing else changes
        return False


def usable() -> bool:
    """This PyTorch has oneDNN's linear and it agrees with ATen's (:func:`_agrees`)."""
    return _op() is not None and torch.backends.mkldnn.is_available() and _agrees()


def _choose(environ=os.environ) -> str:
    choice = (environ.get(KERNEL_ENV) or "auto").strip().lower()
    if choice not in _CHOICES:
        raise KernelError(f"{KERNEL_ENV}={environ.get(KERNEL_ENV)!r}: expected auto, onednn or aten")
    if choice == "onednn":
        if not usable():
            raise KernelError(f"{KERNEL_ENV}=onednn: this PyTorch has no working oneDNN linear "
                              f"(torch {torch.__version__}); unset {KERNEL_ENV} or set it to aten")
        return "onednn"
    if choice == "auto" and torch.backends.cpu.get_cpu_capability().startswith("AVX512") and usable():
        return "onednn"
    return "aten"


_CHOSEN: str | None = None


def linear_kernel() -> str:
    """"onednn" or "aten": this process's kernel for frozen fp32 CPU linears (decided once)."""
    global _CHOSEN
    if _CHOSEN is None:
        _CHOSEN = _choose()
    return _CHOSEN


class _FrozenLinear(torch.autograd.Function):
    """``x @ W.T + b`` by oneDNN, for a weight and bias that take no gradient; backward: ``grad @ W``, the same
    oneDNN product with the transpose."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _dnn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return _dnn(grad, weight.t()), None, None


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.dim() == 2
            and not weight.requires_grad and (bias is None or not bias.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by oneDNN where :func:`linear_kernel` chose it and the weight is a frozen
    fp32 CPU tensor; ATen's otherwise. Differentiable in ``x``."""
    if not _takes(x, weight, bias) or linear_kernel() != "onednn":
        return F.linear(x, weight, bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _FrozenLinear.apply(x, weight, bias)
    return _dnn(x, weight, bias)


def _frozen_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_onednn_linears(lm: nn.Module) -> int:
    """Route every ``nn.Linear`` of ``lm`` through :func:`linear` when this process's kernel is oneDNN (an
    instance forward; the class is untouched) and return how many; 0 where it is ATen or ``lm`` is not on CPU.
    A layer whose weight takes a gradient at call time runs ATen's ``F.linear`` as before."""
    if linear_kernel() != "onednn":
        return 0
    n = 0
    for mod in lm.modules():
        if type(mod) is nn.Linear and mod.weight.device.type == "cpu" and "forward" not in vars(mod):
            mod.forward = types.MethodType(_frozen_forward, mod)
            n += 1
    return n
