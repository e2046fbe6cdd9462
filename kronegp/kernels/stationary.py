"""Kernel matrices of the common stationary kernels on one grid axis, in one fused step.

A grid GP evaluates ``K_k = k(x_k, x_k)`` for every axis at every training step. GPyTorch's
``MaternKernel``/``RBFKernel`` get there through mean-centring, a squared-distance GEMM, a
clamp, a square root, an ``x1 == x2`` test that synchronises with the GPU, and the
polynomial; forward and backward are ~30 small kernels per factor, host-bound on a GPU
(~0.45 ms of host time per 128-point factor forward on the device tool's H100 host).

On a 1-D axis the distance matrix ``d_ij = |x_i − x_j|`` is exact and symmetric, and the
kernel is a function of ``r = c · d / ℓ`` alone, so :func:`stationary_factor` computes it
in a few element-wise kernels with a closed-form derivative in ``ℓ`` (``∂K/∂ℓ =
−(r/ℓ) ∂K/∂r``), for all axes of one kind and size at once (:func:`stationary_factors`):

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
other kernel goes through its ``forward`` (:class:`kronegp.models.GridHyperparameters`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import gpytorch
import torch
from torch import Tensor

__all__ = ["stationary_factor", "stationary_factors"]

_MATERN_SCALE = {0.5: 1.0, 1.5: math.sqrt(3.0), 2.5: math.sqrt(5.0)}
#: Largest scaled distance ``r`` evaluated: ``K(r)`` and ``r ∂K/∂r`` are 0 (underflow) there.
R_MAX = 1e4


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


class _StationaryFactors(torch.autograd.Function):
    """``g`` factors of one kernel kind and size from stacked distances ``(g, n, n)`` and
    lengthscales ``(g,)``: one set of element-wise kernels for all of them."""

    @staticmethod
    def forward(ctx, dist: Tensor, lengthscale: Tensor, kind: str, scale: float):
        # Divided last, so the diagonal stays 0 however small ℓ gets; capped at R_MAX, where
        # every profile is 0 in both dtypes but r² and r³ are still finite (uncapped, an
        # optimiser's trial ℓ = 1e-25 gave r² = inf in float32, and inf · e^{−r} = NaN).
        r = (dist * scale / lengthscale.reshape(-1, 1, 1)).clamp_(max=R_MAX)
        k, minus_r_dk = _profile(kind, r)
        ctx.save_for_backward(minus_r_dk, lengthscale)
        return tuple(k.unbind(0))

    @staticmethod
    def backward(ctx, *grads: Tensor):
        minus_r_dk, lengthscale = ctx.saved_tensors
        # ∂K/∂ℓ = −(r/ℓ) ∂K/∂r
        g = (torch.stack(grads) * minus_r_dk).sum(dim=(-2, -1)) / lengthscale
        return None, g, None, None


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


def stationary_factors(kernels: Sequence, axes: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """``k_i(axis_i, axis_i)`` (``n_i × n_i``, exactly symmetric, differentiable in the
    lengthscales) for each plain ``MaternKernel`` (ν = ½, 3⁄2, 5⁄2) or ``RBFKernel`` with one
    lengthscale; ``None`` at the positions of any other kernel.

    Factors of the same kind and size (the common case: one Matérn kernel per axis of a cube)
    are computed together, one set of element-wise kernels for the group (host time: each
    small kernel launch costs ~10-30 µs on a GPU host, more than its work).

    Args:
        kernels: GPyTorch kernels, one per axis.
        axes: the grid axes, shapes ``(n_i,)``.
    """
    out: list[Optional[Tensor]] = [None] * len(kernels)
    groups: dict = {}
    for i, (kern, axis) in enumerate(zip(kernels, axes)):
        kind = _kind(kern)
        if kind is None or kern.raw_lengthscale.numel() != 1:
            continue
        groups.setdefault((kind, axis.shape[0], axis.dtype, axis.device), []).append(i)
    for (kind, _, _, _), members in groups.items():
        with torch.no_grad():
            ax = torch.stack([axes[i] for i in members])
            dist = (ax.unsqueeze(-1) - ax.unsqueeze(-2)).abs()
        lengthscale = torch.cat([kernels[i].lengthscale.reshape(1) for i in members])
        for i, k in zip(members, _StationaryFactors.apply(dist, lengthscale, *kind)):
            out[i] = k
    return out


def stationary_factor(kern, axis: Tensor) -> Optional[Tensor]:
    """:func:`stationary_factors` for one kernel and axis."""
    return stationary_factors([kern], [axis])[0]
