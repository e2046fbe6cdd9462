"""Kronecker eigendecompositions and the vectors built from them, all through kronegp's ops.

For symmetric factors ``K_k = Q_k diag(λ_k) Q_kᵀ`` the product ``K = K_1 ⊗ … ⊗ K_d`` has
eigenvectors ``Q = Q_1 ⊗ … ⊗ Q_d`` and eigenvalues ``λ = λ_1 ⊗ … ⊗ λ_d``; applying
``Q`` or ``Qᵀ`` to a grid vector is one Kronecker matmul.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from kronegp.linalg import kron_bilinear_grads, kron_vector, symmetric_eig
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["KronEigen", "bilinear_form", "factor_eigs"]


class _BilinearForm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left: Tensor, right: Tensor, *factors: Tensor) -> Tensor:
        # G_1 is always computed: the value is ⟨F_1, G_1⟩ (the form is linear in F_1).
        needs = [True] + list(ctx.needs_input_grad[3:])
        with torch.no_grad():
            grads = kron_bilinear_grads(list(factors), left, right, needs)
        ctx.save_for_backward(*grads)
        return (factors[0] * grads[0]).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = [grad * g if g is not None and need else None for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        return (None, None, *out)


def bilinear_form(left: Tensor, right: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``Σ_c left_cᵀ (F_1 ⊗ … ⊗ F_d) right_c`` (0-dim), differentiable in the factors only.

    The factor gradients are the bilinear derivative (shared prefix/suffix products, one
    contraction GEMM per factor: :func:`kronegp.linalg.kron_bilinear_grads`),
    computed in the forward; the value is ``⟨F_1, ∂/∂F_1⟩``. No Kronecker product of the
    columns themselves is formed. ``left`` and ``right``: ``(N, c)``, taken as constants.
    """
    return _BilinearForm.apply(left.detach(), right.detach(), *factors)


def factor_eigs(factors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(λ_k, Q_k)`` of each symmetric factor ``K_k = Q_k diag(λ_k) Q_kᵀ`` (no autograd), the
    eigenvalues clipped at 0 (round-off makes tiny ones negative).

    Through :func:`kronegp.linalg.symmetric_eig` (small CUDA factors by the GPU Jacobi kernel,
    warm-started from the previous step; others by LAPACK in float64), cached per factor tensor:
    a training step asks several times."""
    with torch.no_grad():
        pairs = symmetric_eig([f.detach() for f in factors])
        return [lam.clamp_min(0) for lam, _ in pairs], [q for _, q in pairs]


class KronEigen:
    """Eigendecomposition of ``K_1 ⊗ … ⊗ K_d`` from those of the factors (no autograd).

    Attributes:
        vecs: ``Q_k`` per dimension.
        vals: ``λ_k`` per dimension, clipped at 0 (round-off makes tiny ones negative).
    """

    def __init__(self, factors: Sequence[Tensor]):
        self.vals, self.vecs = factor_eigs(factors)
        self.sizes = [q.shape[0] for q in self.vecs]
        self.size = math.prod(self.sizes)

    def eigvals(self) -> Tensor:
        """``λ_1 ⊗ … ⊗ λ_d`` (length ``N``)."""
        return kron_vector(self.vals)

    def to_eigbasis(self, x: Tensor) -> Tensor:
        """``Qᵀ x`` for ``x`` of shape ``(..., N, t)``."""
        return kron_matmul([q.mT for q in self.vecs], x)

    def from_eigbasis(self, x: Tensor) -> Tensor:
        """``Q x`` for ``x`` of shape ``(..., N, t)``."""
        return kron_matmul(self.vecs, x)

    def to_eigbasis_rows(self, x: Tensor) -> Tensor:
        """``x Q`` for rows ``x`` of shape ``(..., t, N)``: each row is ``(Qᵀ v)ᵀ`` of its vector
        ``v``, through :func:`kronegp.matmul_kron` (no transpose of the block)."""
        return matmul_kron(x, self.vecs)

    def from_eigbasis_rows(self, x: Tensor) -> Tensor:
        """``x Qᵀ`` for rows ``x`` of shape ``(..., t, N)`` (each row ``(Q v)ᵀ``)."""
        return matmul_kron(x, [q.mT for q in self.vecs])

    def apply_function_rows(self, diag: Tensor, x: Tensor) -> Tensor:
        """:meth:`apply_function` on rows ``(..., t, N)`` (scaled in place: one block fewer alive
        during the second product)."""
        return self.from_eigbasis_rows(self.to_eigbasis_rows(x).mul_(diag))

    def apply_function(self, diag: Tensor, x: Tensor) -> Tensor:
        """``Q diag(g) Qᵀ x`` for ``g`` of length ``N`` (e.g. ``(λ + σ²)⁻¹``)."""
        return self.from_eigbasis(diag.unsqueeze(-1) * self.to_eigbasis(x))

    def diag_of(self, diag: Tensor) -> Tensor:
        """``diag(Q diag(g) Qᵀ) = (Q∘Q) g`` with ``Q∘Q = ⊗(Q_k∘Q_k)``, length ``N``."""
        return kron_matmul([q * q for q in self.vecs], diag.reshape(-1, 1)).reshape(-1)


# ---------------------------------------------------------------------- chunked, in-place forms
#
# On a 1024³ float32 grid one grid vector is 4 GiB. The functions below work on a grid vector in
# slabs of the first axis (rows of its ``(n_1, N/n_1)`` view) or column blocks of that view, so
# every temporary they create is at most ``chunk`` elements (a slab when one slab is larger):
# a training step or a prediction then holds a handful of grid vectors, whatever the grid
# (:mod:`kronegp.models.memory` counts them).


def slab_rows(sizes: Sequence[int], chunk: int) -> int:
    """Rows of the first axis per slab: as many as keep a slab within ``chunk`` elements (≥ 1)."""
    rest = math.prod(sizes[1:])
    return max(1, min(sizes[0], chunk // max(rest, 1)))


def slabs(sizes: Sequence[int], chunk: int):
    """``(start, stop)`` ranges of first-axis rows, each slab at most ``chunk`` elements (≥ 1 row)."""
    rows = slab_rows(sizes, chunk)
    for start in range(0, sizes[0], rows):
        yield start, min(sizes[0], start + rows)


def kron_vector_slab(vectors: Sequence[Tensor], start: int, stop: int) -> Tensor:
    """Entries of ``v_1 ⊗ … ⊗ v_N`` whose first index lies in ``[start, stop)`` (a slab of the
    first axis, contiguous in the flattened vector), always a new tensor (callers update it in place)."""
    if len(vectors) == 1:
        return vectors[0][start:stop].clone()
    return kron_vector([vectors[0][start:stop], *vectors[1:]])


def kron_apply_into(mats: Sequence[Tensor], src: Tensor, out: Tensor, chunk: int) -> Tensor:
    """``out ← (A_1 ⊗ … ⊗ A_d) src`` for square ``A_k`` (``n_k × n_k``) and grid vectors ``src``,
    ``out`` (contiguous, length ``N``; ``out`` may be ``src``: in place), with temporaries of at
    most about ``3·chunk`` elements.

    Two stages on the ``(n_1, R)`` view (``R = N/n_1``): (1) each slab of first-axis rows gets
    ``(A_2 ⊗ … ⊗ A_d)`` applied by :func:`kronegp.matmul_kron` (rows times ``⊗A_kᵀ``), the
    result copied into ``out``'s slab (a slab larger than ``chunk`` recurses on its own grid);
    (2) ``A_1`` multiplies column blocks of ``out`` (one GEMM each, through a reused buffer).
    Slabs and column blocks are disjoint, so ``out`` can be ``src``. One extra read and write of
    the grid per stage over :func:`kronegp.kron_matmul`, which instead allocates its result and
    up to two grid-sized intermediates.
    """
    sizes = [int(a.shape[-1]) for a in mats]
    n0, rest = sizes[0], math.prod(sizes[1:])
    src2, out2 = src.view(n0, rest), out.view(n0, rest)
    if len(mats) > 1:
        inner_t = [a.mT for a in mats[1:]]
        for start, stop in slabs(sizes, chunk):
            if stop - start == 1 and rest > chunk and len(mats) > 2:
                kron_apply_into(mats[1:], src2[start], out2[start], chunk)
            else:
                out2[start:stop] = matmul_kron(src2[start:stop], inner_t)
    elif out.data_ptr() != src.data_ptr():
        out.copy_(src)
    if rest == 1:
        out2.copy_(mats[0] @ out2)
        return out
    cols = max(1, min(rest, chunk // n0))
    buf = torch.empty(n0 * cols, dtype=out.dtype, device=out.device)
    for start in range(0, rest, cols):
        stop = min(rest, start + cols)
        tmp = buf[: n0 * (stop - start)].view(n0, stop - start)
        torch.mm(mats[0], out2[:, start:stop], out=tmp)
        out2[:, start:stop] = tmp
    return out
