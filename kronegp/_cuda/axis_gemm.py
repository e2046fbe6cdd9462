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

Both compute exactly what the fused kernels compute, at the vendor GEMM's rate — fp64 on the
DMMA tensor cores, fp32 on FFMA (TF32 only if the user enabled it globally, which
:func:`axis_gemm_allowed` refuses). :func:`kronegp._cuda.plan.choose_path` picks them for
compute-bound factors.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["axis_products", "rotated_products", "axis_order", "axis_gemm_allowed", "tf32_enabled"]


def tf32_enabled() -> bool:
    """Whether torch's float32 GEMMs may use TF32 (then they are not exact float32)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception:  # an API change must not silently turn TF32 on: assume it might be
        return True


def axis_gemm_allowed(x: Tensor, factors: Sequence[Tensor]) -> bool:
    """The axis-GEMM path takes contiguous ``x`` and unbatched factors, in exact precision."""
    if not x.is_contiguous():
        return False
    if any(f.dim() != 2 for f in factors):
        return False
    return x.dtype == torch.float64 or not tf32_enabled()


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


@lru_cache(maxsize=4096)
def _axis_steps(lead: int, dims: tuple, outs: tuple, trail: int) -> tuple:
    """``(axis, A, I, C)`` per step, in :func:`axis_order` (cached: host time)."""
    cur = list(dims)
    steps = []
    for ax in axis_order(dims, outs):
        steps.append((ax, lead * math.prod(cur[:ax]), cur[ax], math.prod(cur[ax + 1 :]) * trail))
        cur[ax] = outs[ax]
    return tuple(steps)


def axis_products(x: Tensor, lead: int, dims: Sequence[int], trail: int, mats: Sequence[Tensor]) -> Tensor:
    """Apply ``mats[i]`` (shape ``(O_i, dims[i])``) to axis ``i`` of contiguous ``x`` viewed as
    ``(lead, *dims, trail)``; returns the result as a new contiguous tensor of ``lead·ΠO_i·trail``
    elements (its shape is the last GEMM's: the caller views it). Intermediates come from torch's
    caching allocator (stream-ordered)."""
    steps = _axis_steps(lead, tuple(dims), tuple(int(w.shape[0]) for w in mats), trail)
    cur = x
    for ax, a, i, c in steps:
        cur = _axis_gemm(mats[ax], cur, a, i, c)
    return cur


def rotated_products(x: Tensor, lead: int, dims: Sequence[int], trail: int, mats: Sequence[Tensor]) -> Tensor:
    """Apply ``mats[i]`` (shape ``(O_i, dims[i])``) to axis ``i`` of contiguous ``x`` viewed as
    ``(lead, *dims, trail)`` by the rotating form (module docstring): one GEMM per factor, each
    contracting the current first axis and appending its output axis last. Returns the result
    *transposed*, a new contiguous tensor viewed ``(lead, trail, ΠO_i)``; the caller transposes
    it back (one pass)."""
    cur = x
    for w, i in zip(mats, dims):
        rest = cur.numel() // (lead * i)
        if lead == 1:
            cur = torch.mm(cur.view(i, rest).mT, w.mT)
        else:  # per leading batch; W broadcast with batch stride 0 (torch.matmul would copy)
            cur = torch.bmm(cur.view(lead, i, rest).mT, w.mT.expand(lead, i, w.shape[0]))
    return cur.view(lead, trail, cur.numel() // (lead * trail))
