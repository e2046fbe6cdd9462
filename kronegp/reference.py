"""Pure-torch Kronecker matmuls: the definition of correct, and what every CPU user runs.

Both products reduce to one routine, :func:`per_axis_products` (not the operators' Kronecker
product along axes, which goes through the kernels and takes LinearOperators): view ``x`` as
``(*batch, L, I_1, …, I_N, R)`` and multiply axis ``i`` by a matrix ``A_i`` of shape
``(O_i, I_i)``::

    out[…, l, o_1, …, o_N, r] = Σ_{i_1…i_N} A_1[o_1, i_1] ⋯ A_N[o_N, i_N] · x[…, l, i_1, …, i_N, r]

* ``matmul_kron(x, F) = x · (F_1 ⊗ … ⊗ F_N)``: ``L = M``, ``R = 1``, ``A_i = F_iᵀ``.
* ``kron_matmul(F, x) = (F_1 ⊗ … ⊗ F_N) · x``: ``L = 1``, ``R = T``, ``A_i = F_i``.

Each factor costs one batched GEMM of ``A_i`` (``O_i × I_i``) against ``x`` viewed as
``(B, I_i, C)`` with ``B`` the product of the axes before ``i`` and ``C`` those after it.
That view needs no copy, and the GEMM writes the result already in axis order, so there
is no transpose pass at all (the classic "shuffle" algorithm pays one per factor). The
dense Kronecker matrix is never formed.

Factors are applied in the order that minimises FLOPs: a factor that shrinks its axis
(``O_i < I_i``) goes early, one that grows it goes late. Adjacent factors ``i, j``
should be swapped when ``1/O_j − 1/I_j > 1/O_i − 1/I_i``, so sorting by that key (stable,
so square factors keep their order) gives the optimum.

Precision: ``precision`` is accepted for the backend interface. On the CPU every mode is exact
float32 (more precise than ``"high"``/``"medium"`` ask, never less); on a GPU (the fallback when
the kernels cannot load) float32 GEMMs run with torch's TF32 flag off, or on for ``"medium"``.

No input checking happens here: :mod:`kronegp.ops` is the door and checks everything.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from kronegp.precision import cublas_tf32

__all__ = ["per_axis_products", "kron_matmul", "matmul_kron", "kron_dense"]


def _application_order(mats: Sequence[Tensor]) -> list[int]:
    def key(i: int) -> float:
        out_size, in_size = mats[i].shape[-2], mats[i].shape[-1]
        if out_size == 0 or in_size == 0:
            return math.inf  # empty axis: do it first, everything after is empty
        return -(1.0 / out_size - 1.0 / in_size)

    return sorted(range(len(mats)), key=key)


def per_axis_products(mats: Sequence[Tensor], x: Tensor, lead: int, trail: int) -> Tensor:
    """Multiply axis ``i`` of ``x`` (viewed as ``(*batch, lead, I_1…I_N, trail)``) by ``mats[i]``.

    ``mats[i]`` has shape ``(*batch_i, O_i, I_i)``; its batch dimensions broadcast with
    ``x``'s. ``x`` has shape ``(*batch, lead · ΠI_i · trail)``. Returns
    ``(*batch', lead · ΠO_i · trail)``, ``batch'`` being the broadcast batch shape.
    """
    dims = [m.shape[-1] for m in mats]
    cur = x
    for i in _application_order(mats):
        mat = mats[i]
        in_size, out_size = mat.shape[-1], mat.shape[-2]
        before = lead * math.prod(dims[:i])
        after = math.prod(dims[i + 1 :]) * trail
        batch = cur.shape[:-1]
        if after == 1:
            # (…, B, I) @ (…, I, O): the batch of x folds into the GEMM's rows.
            rows = cur.reshape(*batch, before, in_size)
            out = torch.matmul(rows, mat.mT)
            out_batch = out.shape[:-2]
        else:
            # (O, I) @ (…, B, I, C): one batched GEMM, A broadcast with stride 0.
            block = cur.reshape(*batch, before, in_size, after)
            out = torch.matmul(mat if mat.dim() == 2 else mat.unsqueeze(-3), block)
            out_batch = out.shape[:-3]
        # drop the views of the previous intermediate now, so that at most one intermediate
        # and the new product are alive at once (the memory plan counts a product that way)
        rows = block = None
        cur = out.reshape(*out_batch, before * out_size * after)
        out = None
        dims[i] = out_size
    return cur


def _apply(mats: Sequence[Tensor], x: Tensor, lead: int, trail: int, precision: str) -> Tensor:
    if x.device.type == "cuda" and x.dtype == torch.float32:
        with cublas_tf32(precision == "medium"):
            return per_axis_products(mats, x, lead, trail)
    return per_axis_products(mats, x, lead, trail)


def matmul_kron(x: Tensor, factors: Sequence[Tensor], precision: str = "highest") -> Tensor:
    """``x · (F_1 ⊗ … ⊗ F_N)`` for ``x`` of shape ``(..., M, ΠP_i)``; returns ``(..., M, ΠQ_i)``."""
    m, k = x.shape[-2], x.shape[-1]
    q_total = math.prod([f.shape[-1] for f in factors])
    flat = x.reshape(*x.shape[:-2], m * k)
    out = _apply([f.mT for f in factors], flat, m, 1, precision)
    return out.reshape(*out.shape[:-1], m, q_total)


def kron_matmul(factors: Sequence[Tensor], x: Tensor, precision: str = "highest") -> Tensor:
    """``(F_1 ⊗ … ⊗ F_N) · x`` for ``x`` of shape ``(..., ΠQ_i, T)``; returns ``(..., ΠP_i, T)``."""
    k, t = x.shape[-2], x.shape[-1]
    p_total = math.prod([f.shape[-2] for f in factors])
    flat = x.reshape(*x.shape[:-2], k * t)
    out = _apply(list(factors), flat, 1, t, precision)
    return out.reshape(*out.shape[:-1], p_total, t)


def kron_dense(factors: Sequence[Tensor]) -> Tensor:
    """The dense ``F_1 ⊗ … ⊗ F_N`` (tests and tiny problems only: it is ``ΠP_i × ΠQ_i``)."""
    out = factors[0]
    for f in factors[1:]:
        out = torch.kron(out, f) if out.dim() == 2 and f.dim() == 2 else _batched_kron(out, f)
    return out


def _batched_kron(a: Tensor, b: Tensor) -> Tensor:
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.expand(*batch, *out.shape[-4:]).reshape(
        *batch, a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1]
    )
