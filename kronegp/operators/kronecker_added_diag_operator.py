"""``KroneckerAddedDiagOperator``: ``K + D`` for a Kronecker ``K`` and a diagonal ``D``.

Which solve runs depends on ``D`` (``K = F_1 ⊗ … ⊗ F_N``, ``F_i = Q_i Λ_i Q_iᵀ``):

* ``D = σ² I`` (constant): exact. ``K + σ² I = Q (Λ + σ² I) Qᵀ`` with ``Q = ⊗Q_i`` and
  ``Λ = ⊗Λ_i``, so ``(K + σ² I)⁻¹ b = Q (Λ + σ²)⁻¹ Qᵀ b`` (two Kronecker products) and
  ``log det = Σ log(λ + σ²)``. Inherited from linear_operator's
  :class:`~linear_operator.operators.KroneckerProductAddedDiagLinearOperator`; the
  products with ``Q`` run through kronegp because ``Q`` is a :class:`KroneckerOperator`
  while kronegp's patch or operator built it.
* ``D = D_1 ⊗ … ⊗ D_N`` (a Kronecker product of diagonals): also exact,
  ``K + D = D^{½} (⊗ D_i^{-½} F_i D_i^{-½} + I) D^{½}`` (Rakitsch et al. 2013), inherited.
* any other diagonal (per-cell noise, masked cells): no closed form. The solve is
  preconditioned conjugate gradients with the partial pivoted Cholesky preconditioner of
  :class:`~linear_operator.operators.AddedDiagLinearOperator`; every CG iteration is one
  Kronecker product. The log-determinant is linear_operator's stochastic Lanczos
  quadrature on the same iterations. All of it goes through :func:`iterative_solve`,
  the one place where the solver is chosen.
"""

from __future__ import annotations

from typing import Callable, Optional

from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    KroneckerProductAddedDiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    LinearOperator,
)
from torch import Tensor

__all__ = ["KroneckerAddedDiagOperator", "iterative_solve"]


def iterative_solve(
    operator: AddedDiagLinearOperator,
    rhs: Tensor,
    preconditioner: Optional[Callable[[Tensor], Tensor]] = None,
    num_tridiag: int = 0,
):
    r"""Solve ``(K + D) X = rhs`` iteratively: the single switch point for the solver.

    Returns ``X`` (and, when ``num_tridiag > 0``, the Lanczos tridiagonals of the first
    ``num_tridiag`` columns, as linear_operator's ``_solve`` contract asks).

    SOLVER SWITCH: this is linear_operator's own preconditioned CG
    (``LinearOperator._solve`` → ``linear_operator.utils.linear_cg``, with ``operator._matmul``
    running kronegp's products). When kronegp's block CG (``kronegp.solvers``) is ready,
    call it here — it must honour the same return contract — and nothing else changes.
    """
    return LinearOperator._solve(operator, rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)


class KroneckerAddedDiagOperator(KroneckerProductAddedDiagLinearOperator):
    r"""``(F_1 ⊗ … ⊗ F_N) + D``, ``D`` diagonal (constant, Kronecker-of-diagonals, or general).

    :param linear_ops: a :class:`~kronegp.operators.KroneckerOperator` and a
        :class:`~linear_operator.operators.DiagLinearOperator`, in either order.

    ``_matmul(X) = K X + d ∘ X`` (the Kronecker part through kronegp). See the module
    docstring for which solve and log-determinant run for which ``D``.
    """

    @property
    def has_exact_solve(self) -> bool:
        """Whether solves use eigendecompositions (constant or Kronecker-of-diagonals ``D``)
        rather than :func:`iterative_solve`."""
        if self._diag_is_constant:
            return True
        dlt = self.diag_tensor
        ops = self.linear_op.linear_ops
        return (
            isinstance(dlt, KroneckerProductDiagLinearOperator)
            and len(ops) == len(dlt.linear_ops)
            and all(a.shape == b.shape for a, b in zip(ops, dlt.linear_ops))
        )

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0):
        r"""``(K + D)⁻¹ rhs``: exact for constant / Kronecker ``D``, else :func:`iterative_solve`."""
        if self.has_exact_solve:
            return super()._solve(rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)
        return iterative_solve(self, rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)

    def _preconditioner(self):
        r"""None for exact solves (no CG runs); for a general diagonal, the partial pivoted
        Cholesky preconditioner ``(L Lᵀ + D)⁻¹`` of :class:`AddedDiagLinearOperator`, with
        ``L`` a low-rank pivoted Cholesky factor of ``K`` (rows of ``K`` come from
        ``_get_indices``; the Kronecker matrix is never formed)."""
        if self.has_exact_solve:
            return None, None, None
        return AddedDiagLinearOperator._preconditioner(self)

    def __add__(self, other):
        r"""``(K + D) + D'`` with a constant ``D'`` stays in this class (``D + D'`` is diagonal)."""
        if isinstance(other, ConstantDiagLinearOperator) and self._diag_is_constant:
            return KroneckerAddedDiagOperator(self.linear_op, self.diag_tensor + other)
        return super().__add__(other)
