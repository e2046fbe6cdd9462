"""Kernel matrices of the common stationary kernels on one grid axis, in one fused step.

A grid GP evaluates ``K_k = k(x_k, x_k)`` for every axis at every training step. GPyTorch's
``MaternKernel``/``RBFKernel`` get there through mean-centring, a squared-distance GEMM, a
clamp, a square root, an ``x1 == x2`` test that synchronises with the GPU, and the
polynomial; forward and backward are ~30 small kernels per factor, host-bound on a GPU
(~0.45 ms of host time per 128-point factor forward on the device tool's H100 host).

On a 1-D axis the distance matrix ``d_ij = |x_i − x_j|`` is exact and symmetric, and the
kernel is a function of ``r = c · d / ℓ`` alone, so :func:`stationary_factor` computes it
in a few element-wise kernels with a closed-form derivative in ``ℓ`` (``∂K/∂ℓ =
−(r/ℓ) ∂K/∂r``):

========  ==========================  ==============================
kernel    ``K(r)``                    ``−r ∂K/∂r``
========  ==========================  ==============================
Matérn ½  ``e^{−r}``, ``r = d/ℓ``     ``r e^{−r}``
Matérn 3⁄2 ``(1 + r) e^{−r}``, ``r = √3 d/ℓ``   ``r² e^{−r}``
Matérn 5⁄2 ``(1 + r + r²/3) e^{−r}``, ``r = √5 d/ℓ``   ``r² (1 + r) e^{−r} / 3``
RBF       ``e^{−r²/2}``, ``r = d/ℓ``  ``r² e^{−r²/2}``
========  ==========================  ==============================

It applies only where the result is the kernel's own: the exact classes (not subclasses,
which may override ``forward``), one lengthscale, no batch shape, no ``active_dims``. Every
other kernel goes through its ``forward`` (:meth:`GridHyperparameters._factors`).
"""

from __future__ import annotations

import math
from typing import Optional

import gpytorch
import torch
from torch import Tensor

__all__ = ["stationary_factor"]

_MATERN_SCALE = {0.5: 1.0, 1.5: math.sqrt(3.0), 2.5: math.sqrt(5.0)}


def _profile(kind: str, r: Tensor) -> tuple[Tensor, Tensor]:
    """``K(r)`` and ``−r ∂K/∂r`` for the kernel ``kind``."""
    if kind == "rbf":
        r2 = r * r
        k = torch.exp(-0.5 * r2)
        return k, r2 * k
    e = torch.exp(-r)
    if kind == "matern0.5":
        return e, r * e
    if kind == "matern1.5":
        return (1.0 + r) * e, r * r * e
    # Matérn 5/2
    return torch.addcmul(1.0 + r, r, r, value=1.0 / 3.0) * e, (r * r) * (1.0 + r) * e / 3.0


class _StationaryFactor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dist: Tensor, lengthscale: Tensor, kind: str, scale: float) -> Tensor:
        r = dist * (scale / lengthscale.reshape(()))
        k, minus_r_dk = _profile(kind, r)
        ctx.save_for_backward(minus_r_dk, lengthscale)
        return k

    @staticmethod
    def backward(ctx, grad: Tensor):
        minus_r_dk, lengthscale = ctx.saved_tensors
        # ∂K/∂ℓ = −(r/ℓ) ∂K/∂r
        g = (grad * minus_r_dk).sum() / lengthscale.reshape(())
        return None, g.reshape(lengthscale.shape), None, None


def _kind(kern) -> Optional[tuple[str, float]]:
    if getattr(kern, "active_dims", None) is not None or kern.batch_shape != torch.Size([]):
        return None
    if getattr(kern, "ard_num_dims", None) not in (None, 1):
        return None
    if type(kern) is gpytorch.kernels.RBFKernel:
        return "rbf", 1.0
    if type(kern) is gpytorch.kernels.MaternKernel and kern.nu in _MATERN_SCALE:
        return f"matern{kern.nu}", _MATERN_SCALE[kern.nu]
    return None


def stationary_factor(kern, axis: Tensor) -> Optional[Tensor]:
    """``k(axis, axis)`` (``n × n``, exactly symmetric, differentiable in the lengthscale)
    for a plain ``MaternKernel`` (ν = ½, 3⁄2, 5⁄2) or ``RBFKernel`` with one lengthscale;
    ``None`` for any other kernel.

    Args:
        kern: a GPyTorch kernel.
        axis: the grid axis, shape ``(n,)``.
    """
    kind = _kind(kern)
    if kind is None:
        return None
    lengthscale = kern.lengthscale
    if lengthscale.numel() != 1:
        return None
    with torch.no_grad():
        dist = (axis.unsqueeze(-1) - axis.unsqueeze(-2)).abs()
    return _StationaryFactor.apply(dist, lengthscale, *kind)
