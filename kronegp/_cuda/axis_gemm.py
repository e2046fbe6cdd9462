"""Kronecker products as one vendor GEMM per factor on copy-free axis views (cuBLAS via torch).

**Natural order** (:func:`axis_products`). Applying one factor to axis ``i`` of a contiguous
tensor of axis sizes ``(lead, d_0, …, d_{N-1}, trail)`` is, with ``A = lead·Π_{j<i} d_j`` and
``C = Π_{j>i} d_j·trail``, the batched product

    y[a, o, c] = Σ_k W[o, k] · x[a, k, c]        (x viewed (A, I, C), y (A, O, C), W (O, I))

and ``y`` is again contiguous in natural order, so no transpose pass runs. Three shapes of
that product map onto cuBLAS without a copy:

* ``C = 1`` (the last axis): one GEMM ``y(A, O) = x(A, I) · Wᵀ``;
* ``A = 1`` (the first axis): one GEMM ``y(O, C) = W · x(I, C)``;
* otherwise a strided-batched GEMM over ``a`` with ``W`` broadcast (batch stride 0).

``W`` may be any strided view (``F.mT`` included): cuBLAS reads transposed operands natively.

**Rotating form** (:func:`rotated_products`, ``kron_matmul`` with few columns). In natural
order the axis next to a short trailing ``T`` gives the batched product a ``C = T`` side (a
256³ product with ``T = 11`` ran at 0.24 of the GEMM rate). Instead, always contract the
*first* axis and write the result with the new axis *last*, ``y(R, O) = x(I, R)ᵀ · Wᵀ`` (one
GEMM, ``R`` everything else): ``(d_0, …, d_{N-1}, T)`` becomes ``(d_1, …, T, O_0)``, and after
``N`` such GEMMs ``(T, O_0, …, O_{N-1})``, the transpose of the result, which one transpose pass
puts back. Every GEMM has the long side ``R``; the cost is that one pass.

**Precision** (:mod:`kronegp.precision`). float64 is IEEE on the DMMA tensor cores. float32
``"highest"`` runs cuBLAS with TF32 off (exactly what the fused kernels compute, at the vendor's
FFMA rate); ``"medium"`` with TF32 on; ``"high"`` as split TF32: each GEMM ``W·X`` becomes
``W_hi·X_lo + W_lo·X_hi + W_hi·X_hi`` (``hi`` = rounded to TF32, ``lo`` = the float32 rest), three
TF32 GEMMs accumulated in place into one float32 output, each operand split by two elementwise
passes. The TF32 flag is torch's global one, switched around the call
(:class:`kronegp.precision.cublas_tf32`). :func:`kronegp._cuda.plan.choose_path` picks these paths
for compute-bound factors.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from kronegp.precision import cublas_tf32

__all__ = ["axis_products", "axis_steps", "rotated_products", "axis_order", "axis_gemm_allowed", "tf32_split"]


def axis_gemm_allowed(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """The axis-GEMM path takes contiguous ``x`` and unbatched factors."""
    return x.is_contiguous() and all(f.dim() == 2 for f in factors)


_TF32_ROUND = 1 << 12  # half a TF32 unit in the last place, in float32 bits
_TF32_MASK = -(1 << 13)  # keeps sign, exponent and the top 10 mantissa bits


def tf32_split(t: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi`` = ``t`` rounded to the nearest TF32 value (ties away from zero,
    as the tensor cores' own ``cvt.rna``) and ``lo = t − hi`` exactly, both float32 of ``t``'s
    shape (``t`` contiguous float32). ``|lo| ≤ 2⁻¹¹·|t|``; values within half a TF32 step of
    the float32 maximum round to infinity in ``hi``."""
    hi = torch.bitwise_and(t.view(torch.int32) + _TF32_ROUND, _TF32_MASK).view(torch.float32)
    return hi, t - hi


def _split_mats(mats: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [tf32_split(w.contiguous()) for w in mats]


def axis_order(sizes_in: Sequence[int], sizes_out: Sequence[int]) -> list[int]:
    """Which axis to apply first: shrinking factors first (smaller intermediates), then from the
    last axis to the first. For square factors this is simply last to first."""
    n = len(sizes_in)
    return sorted(range(n), key=lambda i: (sizes_out[i] / sizes_in[i], -i))


def _axis_gemm(w: Tensor, x: Tensor, a: int, i: int, c: int) -> Tensor:
    """``y(a, o, c) = W(o, i) · x(a, i, c)`` for contiguous ``x``; ``y`` is a new contiguous tensor
    (torch allocates it: one Python call fewer than an ``out=`` buffer, host time on small calls)."""
    if c == 1:
        return torch.mm(x.view(a, i), w.mT)
    if a == 1:
        return torch.mm(w, x.view(i, c))
    return torch.bmm(w.expand(a, w.shape[0], i), x.view(a, i, c))  # W broadcast: batch stride 0


def _axis_gemm_split(w: tuple[Tensor, Tensor], x: Tensor, a: int, i: int, c: int) -> Tensor:
    """:func:`_axis_gemm` in split TF32 (``w`` = ``(W_hi, W_lo)``): the small cross terms first,
    then the main one, accumulated in place (TF32 on: the caller's :class:`cublas_tf32`)."""
    (w_hi, w_lo), (x_hi, x_lo) = w, tf32_split(x)
    y = _axis_gemm(w_hi, x_lo, a, i, c)
    if c == 1:
        y.addmm_(x_hi.view(a, i), w_lo.mT).addmm_(x_hi.view(a, i), w_hi.mT)
    elif a == 1:
        y.addmm_(w_lo, x_hi.view(i, c)).addmm_(w_hi, x_hi.view(i, c))
    else:
        o = w_hi.shape[0]
        y.baddbmm_(w_lo.expand(a, o, i), x_hi.view(a, i, c)).baddbmm_(w_hi.expand(a, o, i), x_hi.view(a, i, c))
    return y


@lru_cache(maxsize=4096)
def _axis_steps(lead: int, dims: tuple, outs: tuple, trail: int) -> tuple:
    """``(axis, A, I, C)`` per step, in :func:`axis_order` (cached: host time)."""
    cur = list(dims)
    steps = []
    for ax in axis_order(dims, outs):
        steps.append((ax, lead * math.prod(cur[:ax]), cur[ax], math.prod(cur[ax + 1 :]) * trail))
        cur[ax] = outs[ax]
    return tuple(steps)


def axis_steps(lead: int, dims: Sequence[int], outs: Sequence[int], trail: int) -> tuple:
    """The GEMMs of :func:`axis_products` for factors of shapes ``(outs[i], dims[i])``: ``(axis, A,
    I, C)`` each, in :func:`axis_order`. A caller that repeats a signature computes them once."""
    return _axis_steps(lead, tuple(dims), tuple(outs), trail)


def axis_products(x: Tensor, lead: int, dims: Sequence[int], trail: int, mats: Sequence[Tensor],
                  precision: str = "highest", steps: tuple | None = None) -> Tensor:
    """Apply ``mats[i]`` (shape ``(O_i, dims[i])``) to axis ``i`` of contiguous ``x`` viewed as
    ``(lead, *dims, trail)``; returns the result as a new contiguous tensor of ``lead·ΠO_i·trail``
    elements (its shape is the last GEMM's: the caller views it). Intermediates come from torch's
    caching allocator (stream-ordered). ``precision`` (float32): the module docstring. ``steps``:
    :func:`axis_steps` of these shapes, if the caller has them."""
    if steps is None:
        steps = _axis_steps(lead, tuple(dims), tuple(int(w.shape[0]) for w in mats), trail)
    cur = x
    if x.dtype != torch.float32:
        for ax, a, i, c in steps:
            cur = _axis_gemm(mats[ax], cur, a, i, c)
        return cur
    with cublas_tf32(precision != "highest"):
        if precision == "high":
            split = _split_mats(mats)
            for ax, a, i, c in steps:
                cur = _axis_gemm_split(split[ax], cur, a, i, c)
        else:
            for ax, a, i, c in steps:
                cur = _axis_gemm(mats[ax], cur, a, i, c)
    return cur


def _rotated_gemm(w: Tensor, cur: Tensor, lead: int, i: int, rest: int) -> Tensor:
    if lead == 1:
        return torch.mm(cur.view(i, rest).mT, w.mT)
    # per leading batch; W broadcast with batch stride 0 (torch.matmul would copy)
    return torch.bmm(cur.view(lead, i, rest).mT, w.mT.expand(lead, i, w.shape[0]))


def _rotated_gemm_split(w: tuple[Tensor, Tensor], cur: Tensor, lead: int, i: int, rest: int) -> Tensor:
    (w_hi, w_lo), (x_hi, x_lo) = w, tf32_split(cur)
    y = _rotated_gemm(w_hi, x_lo, lead, i, rest)
    if lead == 1:
        xt = x_hi.view(i, rest).mT
        return y.addmm_(xt, w_lo.mT).addmm_(xt, w_hi.mT)
    xt, o = x_hi.view(lead, i, rest).mT, w_hi.shape[0]
    return y.baddbmm_(xt, w_lo.mT.expand(lead, i, o)).baddbmm_(xt, w_hi.mT.expand(lead, i, o))


def rotated_products(x: Tensor, lead: int, dims: Sequence[int], trail: int, mats: Sequence[Tensor],
                     precision: str = "highest") -> Tensor:
    """Apply ``mats[i]`` (shape ``(O_i, dims[i])``) to axis ``i`` of contiguous ``x`` viewed as
    ``(lead, *dims, trail)`` by the rotating form (module docstring): one GEMM per factor, each
    contracting the current first axis and appending its output axis last. Returns the result
    *transposed*, a new contiguous tensor viewed ``(lead, trail, ΠO_i)``; the caller transposes
    it back (one pass). ``precision`` as in :func:`axis_products`."""
    cur = x
    if x.dtype != torch.float32:
        for w, i in zip(mats, dims):
            cur = _rotated_gemm(w, cur, lead, i, cur.numel() // (lead * i))
    else:
        with cublas_tf32(precision != "highest"):
            split = _split_mats(mats) if precision == "high" else None
            for g, (w, i) in enumerate(zip(mats, dims)):
                rest = cur.numel() // (lead * i)
                if split is None:
                    cur = _rotated_gemm(w, cur, lead, i, rest)
                else:
                    cur = _rotated_gemm_split(split[g], cur, lead, i, rest)
    return cur.view(lead, trail, cur.numel() // (lead * trail))
