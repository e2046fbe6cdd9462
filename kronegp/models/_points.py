"""Prediction at arbitrary points ``x*`` (``(n, d)``) of a grid GP: the checks of the points and
the row-wise Kronecker products that give ``k*ᵀ = s² ⊗_k k_k(x*_k, axis_k)`` against grid
vectors without forming it (never an ``n × N`` dense matrix beyond one chunk of points)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from kronegp.ops import kron_matmul, matmul_kron

#: Points per chunk in predictions at arbitrary points and in exact CG variances: bounds
#: the (chunk × N / n_k) temporaries of the row-wise Kronecker products.
CHUNK_ELEMENTS = 1 << 24


def check_points(points: Any, ndim: int, like: Tensor) -> Tensor:
    """``points`` as an ``(n, ndim)`` tensor of ``like``'s dtype and device, or a clear error."""
    pts = points if isinstance(points, Tensor) else torch.as_tensor(points)
    if pts.dim() != 2 or pts.shape[1] != ndim:
        raise ValueError(f"points must have shape (n, {ndim}) (one coordinate per grid dimension), got {tuple(pts.shape)}")
    if not (pts.is_floating_point() or pts.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"points must be real-valued, got dtype {pts.dtype}")
    if pts.is_floating_point() and pts.dtype != like.dtype:
        raise TypeError(f"points has dtype {pts.dtype} but the model is {like.dtype}; cast them (nothing is promoted silently)")
    if pts.device != like.device and isinstance(points, Tensor):
        raise ValueError(f"points is on {pts.device} but the model is on {like.device}; move one of them")
    if pts.is_floating_point():
        bad = ~torch.isfinite(pts).all(dim=-1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).reshape(-1)[:5].tolist()
            raise ValueError(f"points holds NaN or inf coordinates ({int(bad.sum())} rows, e.g. rows {rows})")
    return pts.to(dtype=like.dtype, device=like.device)


def point_chunks(n: int, shape: tuple) -> Iterator[slice]:
    """Slices of at most ``CHUNK_ELEMENTS / (N / max n_k)`` points."""
    n_cells = 1
    for s in shape:
        n_cells *= s
    per_point = max(1, n_cells // max(shape))
    size = max(1, CHUNK_ELEMENTS // per_point)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def cross_factors(kernels, axes: list[Tensor], points: Tensor) -> tuple[list[Tensor], Tensor]:
    """``a_k = k_k(x*_k, axis_k)`` (``n × n_k`` each) and the prior variance ``Π_k k_k(x*_k, x*_k)``."""
    cross, prior = [], None
    for k, (kern, ax) in enumerate(zip(kernels, axes)):
        xk = points[:, k : k + 1]
        cross.append(kern(xk, ax.unsqueeze(-1)).to_dense())
        dk = kern(xk, xk, diag=True)
        prior = dk if prior is None else prior * dk
    return cross, prior


def rowwise_kron_dot(grid_vec: Tensor, rows: list[Tensor]) -> Tensor:
    """``out_i = Σ_j g_j Π_k rows_k[i, j_k]``: ``g`` against row ``i`` of ``⊙``-Kronecker rows.

    One batched :func:`matmul_kron` with factors ``rows_k[i]ᵀ`` (``n_k × 1``), batch ``i``.
    """
    factors = [r.unsqueeze(-1) for r in rows]
    return matmul_kron(grid_vec.reshape(1, 1, -1), factors).reshape(-1)


def rowwise_kron_columns(rows: list[Tensor]) -> Tensor:
    """The grid vectors ``⊗_k rows_k[i]`` as columns of an ``(N, n)`` matrix."""
    factors = [r.unsqueeze(-1) for r in rows]
    one = rows[0].new_ones(1, 1)
    return kron_matmul(factors, one).squeeze(-1).mT
