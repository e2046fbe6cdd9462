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

__all__ = ["KronEigen", "kron_vector", "contract_all_but"]


def kron_vector(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ⊗ … ⊗ v_d`` as a flat vector of length ``Π n_k`` (a Kronecker matmul of columns)."""
    cols = [v.reshape(-1, 1) for v in vectors]
    one = cols[0].new_ones(1, 1)
    return kron_matmul(cols, one).reshape(-1)


def contract_all_but(grid_vector: Tensor, row_vectors: Sequence[Tensor], keep: int) -> Tensor:
    """``Σ_{j, j_keep fixed} x[j] Π_{k≠keep} r_k[j_k]`` → a vector of length ``n_keep``.

    The contraction of a grid vector with one row vector per dimension except ``keep``:
    ``(r_1ᵀ ⊗ … ⊗ I ⊗ … ⊗ r_dᵀ) · x``.
    """
    n_keep = row_vectors[keep].shape[-1]
    factors = [
        torch.eye(n_keep, dtype=grid_vector.dtype, device=grid_vector.device) if k == keep else r.reshape(1, -1)
        for k, r in enumerate(row_vectors)
    ]
    return kron_matmul(factors, grid_vector.reshape(-1, 1)).reshape(-1)


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
