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

from kronegp.linalg import symmetric_eig
from kronegp.ops import kron_matmul

__all__ = ["KronEigen", "kron_vector", "contract_all_but", "bilinear_form"]


def kron_vector(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ⊗ … ⊗ v_d`` as a flat vector of length ``Π n_k`` (last index fastest).

    Broadcast outer products: a vector Kronecker product has no contraction, so it is
    ``d − 1`` element-wise products rather than a Kronecker matmul call.
    """
    out = vectors[0].reshape(-1)
    for v in vectors[1:]:
        out = (out.unsqueeze(-1) * v.reshape(-1)).reshape(-1)
    return out


def contract_all_but(grid_vector: Tensor, row_vectors: Sequence[Tensor], keep: int) -> Tensor:
    """``Σ_{j, j_keep fixed} x[j] Π_{k≠keep} r_k[j_k]`` → a vector of length ``n_keep``.

    The contraction of a grid vector with one row vector per dimension except ``keep``:
    ``(r_1ᵀ ⊗ … ⊗ I ⊗ … ⊗ r_dᵀ) · x``, as matrix-vector products on views of ``x`` (the
    trailing dimensions first, then the leading ones).
    """
    sizes = [r.shape[-1] for r in row_vectors]
    x = grid_vector.reshape(sizes)
    for k in range(len(sizes) - 1, keep, -1):  # trailing: x (…, n_k) @ r_k
        x = x @ row_vectors[k]
    for k in range(keep):  # leading: r_k @ x (n_k, …)
        x = (row_vectors[k] @ x.reshape(sizes[k], -1)).reshape(x.shape[1:])
    return x.reshape(-1)


class _BilinearForm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left: Tensor, right: Tensor, *factors: Tensor) -> Tensor:
        from kronegp.operators.kronecker_operator import kron_bilinear_grads

        # G_1 is always computed: the value is ⟨F_1, G_1⟩ (the form is linear in F_1).
        needs = [True] + list(ctx.needs_input_grad[3:])
        with torch.no_grad():
            grads = kron_bilinear_grads(list(factors), left, right, needs)
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.has = [g is not None for g in grads]
        return (factors[0] * grads[0]).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grads = ctx.saved_tensors
        out = [grad * g if has and need else None for g, has, need in zip(grads, ctx.has, ctx.needs_input_grad[2:])]
        return (None, None, *out)


def bilinear_form(left: Tensor, right: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``Σ_c left_cᵀ (F_1 ⊗ … ⊗ F_d) right_c`` (0-dim), differentiable in the factors only.

    The factor gradients are the bilinear derivative (shared prefix/suffix products, one
    contraction GEMM per factor: :func:`kronegp.operators.kronecker_operator.kron_bilinear_grads`),
    computed in the forward; the value is ``⟨F_1, ∂/∂F_1⟩``. No Kronecker product of the
    columns themselves is formed. ``left`` and ``right``: ``(N, c)``, taken as constants.
    """
    return _BilinearForm.apply(left.detach(), right.detach(), *factors)


class KronEigen:
    """Eigendecomposition of ``K_1 ⊗ … ⊗ K_d`` from those of the factors (no autograd).

    Attributes:
        vecs: ``Q_k`` per dimension.
        vals: ``λ_k`` per dimension, clipped at 0 (round-off makes tiny ones negative).
    """

    def __init__(self, factors: Sequence[Tensor]):
        self.vecs: list[Tensor] = []
        self.vals: list[Tensor] = []
        with torch.no_grad():
            # Host LAPACK in float64 for small factors, cached per factor tensor
            # (kronegp.linalg.symmetric_eig): a training step asks several times.
            for lam, q in symmetric_eig([f.detach() for f in factors]):
                self.vals.append(lam.clamp_min(0))
                self.vecs.append(q)
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

    def apply_function(self, diag: Tensor, x: Tensor) -> Tensor:
        """``Q diag(g) Qᵀ x`` for ``g`` of length ``N`` (e.g. ``(λ + σ²)⁻¹``)."""
        return self.from_eigbasis(diag.unsqueeze(-1) * self.to_eigbasis(x))

    def diag_of(self, diag: Tensor) -> Tensor:
        """``diag(Q diag(g) Qᵀ) = (Q∘Q) g`` with ``Q∘Q = ⊗(Q_k∘Q_k)``, length ``N``."""
        return kron_matmul([q * q for q in self.vecs], diag.reshape(-1, 1)).reshape(-1)
