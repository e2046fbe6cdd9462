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
  kronegp's preconditioned block CG (:func:`kronegp.solvers.block_cg`) with the Kronecker
  eigen preconditioner ``P = K + d̄ I = Q (Λ + d̄)⁻¹ Qᵀ`` (``d̄`` the geometric mean of
  ``d``: the spectrum of ``P⁻¹(K + D)`` then lies within ``[min d, max d] / d̄`` whatever
  the kernel, as in :class:`kronegp.models.GridGP`'s CG path); every CG iteration is one
  Kronecker product and one preconditioner application (two more). The log-determinant
  is linear_operator's stochastic Lanczos quadrature, fed with the Lanczos tridiagonals
  that :func:`iterative_solve` rebuilds from block CG's coefficients, probes drawn from
  ``N(0, P)`` and ``log det P = Σ log(λ + d̄)`` exact. All of it goes through
  :func:`iterative_solve`, the one place where the solver is chosen.

The eigendecompositions come from :meth:`KroneckerOperator._symeig
<kronegp.operators.KroneckerOperator._symeig>` (one ``symmetric_eig`` call for all
factors, cached), so the forward solve, the log-determinant and the backward of a step
decompose each factor once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from linear_operator import settings
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    KroneckerProductAddedDiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    LinearOperator,
)
from linear_operator.utils.memoize import cached
from torch import Tensor

from kronegp.operators.kronecker_operator import KroneckerOperator
from kronegp.solvers import block_cg, tridiagonal_bands

__all__ = ["KroneckerAddedDiagOperator", "iterative_solve"]


def _cg_settings(num_rows: int, num_tridiag: int) -> tuple[float, int, int]:
    """``(tol, max_iters, min_iters)`` from linear_operator's settings, as its CG reads them:
    ``cg_tolerance``, ``max_cg_iterations`` (capped at
    the size when ``terminate_cg_by_size``), at least ``min(10, max − 1)`` iterations and,
    when tridiagonals are wanted, ``max_lanczos_quadrature_iterations`` of them."""
    tol = settings.cg_tolerance.value()
    max_iters = settings.max_cg_iterations.value()
    if settings.terminate_cg_by_size.on():
        max_iters = min(max_iters, num_rows)
    min_iters = min(10, max_iters - 1)
    if num_tridiag:
        min_iters = max(min_iters, min(settings.max_lanczos_quadrature_iterations.value(), num_rows, max_iters))
    return float(tol), max(int(max_iters), 1), max(int(min_iters), 0)


def _tridiagonals(alphas: Tensor, betas: Tensor, steps: Tensor, size: int) -> Tensor:
    r"""The Lanczos tridiagonals of CG columns, padded to one size, shaped as linear_operator wants.

    Column ``j`` ran ``steps[j]`` iterations with coefficients ``α_k, β_k`` (``alphas``/``betas``
    of shape ``(K, *batch, t)``); the bands and their padding are
    :func:`kronegp.solvers.tridiagonal_bands`'. Returns ``(t, *batch, size, size)`` for
    ``size ≤ K`` leading iterations.
    """
    diag, off, _ = tridiagonal_bands(alphas[:size], betas[:size], steps)
    # (size, *batch, t) → (t, *batch, size)
    diag = diag.movedim(0, -1).movedim(-2, 0)
    off = off.movedim(0, -1).movedim(-2, 0)
    return torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)


def iterative_solve(
    operator: LinearOperator,
    rhs: Tensor,
    preconditioner: Optional[Callable[[Tensor], Tensor]] = None,
    num_tridiag: int = 0,
):
    r"""Solve ``(K + D) X = rhs`` iteratively: the single switch point for the solver.

    Returns ``X`` (and, when ``num_tridiag > 0``, the Lanczos tridiagonals of the first
    ``num_tridiag`` columns, ``(num_tridiag, *batch, k, k)``, as linear_operator's
    ``_solve`` contract asks: its stochastic Lanczos quadrature turns them into the
    log-determinant).

    The solver is :func:`kronegp.solvers.block_cg` on ``operator._matmul`` (kronegp's
    products), every column at once, with ``preconditioner`` (``r ↦ P⁻¹ r``) as given —
    for :class:`KroneckerAddedDiagOperator` the Kronecker eigen preconditioner of its
    ``_preconditioner``. Tolerance and iteration limits follow linear_operator's settings
    (:func:`_cg_settings`); each column stops at relative residual ``‖b − A x‖/‖b‖ ≤ tol``.
    """
    vector = rhs.dim() == 1
    b = rhs.unsqueeze(-1) if vector else rhs
    tol, max_iters, min_iters = _cg_settings(b.size(-2), num_tridiag)
    result = block_cg(
        operator._matmul,
        b,
        preconditioner,
        tol=tol,
        max_iters=max_iters,
        min_iters=min_iters,
        record_lanczos=num_tridiag > 0,
    )
    x = result.solution.squeeze(-1) if vector else result.solution
    if not num_tridiag:
        return x
    size = min(result.iterations, settings.max_lanczos_quadrature_iterations.value())
    idx = slice(0, num_tridiag)
    t_mat = _tridiagonals(
        result.alphas[..., idx], result.betas[..., idx], result.column_iterations[..., idx], max(size, 1)
    )
    return x, t_mat


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
        r"""``(K + D)⁻¹ rhs``.

        * constant ``D = σ² I``: ``Q (Λ + σ²)⁻¹ Qᵀ rhs`` in float64
          (:meth:`KroneckerOperator.eigen_solve`), as linear_operator does it but on the
          cached factor decompositions, without rebuilding the operator in float64;
        * Kronecker ``D``: linear_operator's exact solve;
        * otherwise :func:`iterative_solve`.
        """
        if self._diag_is_constant and isinstance(self.linear_op, KroneckerOperator):
            x = self.linear_op.eigen_solve(rhs if rhs.dim() > 1 else rhs.unsqueeze(-1), self.diag_tensor.diag_values)
            x = x.to(rhs.dtype)
            return x if rhs.dim() > 1 else x.squeeze(-1)
        if self.has_exact_solve:
            return super()._solve(rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)
        return iterative_solve(self, rhs, preconditioner=preconditioner, num_tridiag=num_tridiag)

    def _preconditioner(self):
        r"""``(P⁻¹·, P, log det P)`` for the iterative path; ``(None, None, None)`` for exact solves.

        ``P = K + d̄ I`` with ``d̄ = exp(mean log d)`` (the geometric mean of the diagonal):
        ``P⁻¹ r = Q (Λ + d̄)⁻¹ Qᵀ r`` through the factor eigendecompositions,
        ``log det P = Σ log(λ + d̄)`` exact and differentiable, ``P`` itself a
        :class:`KroneckerAddedDiagOperator` (linear_operator samples the SLQ probes from
        ``N(0, P)`` through its root decomposition and differentiates through ``P``).
        Off when linear_operator's ``max_preconditioner_size`` is 0.
        """
        if self.has_exact_solve or settings.max_preconditioner_size.value() == 0:
            return None, None, None
        if not isinstance(self.linear_op, KroneckerOperator):
            return super()._preconditioner()
        return self._kronecker_preconditioner()

    @cached(name="kronegp_kronecker_preconditioner")
    def _kronecker_preconditioner(self):
        diag = self.diag_tensor._diagonal()
        shift = diag.clamp_min(torch.finfo(diag.dtype).tiny).log().mean(-1, keepdim=True).exp()
        precond_lt = KroneckerAddedDiagOperator(
            self.linear_op, ConstantDiagLinearOperator(shift, diag_shape=self.size(-1))
        )
        # In the operator's dtype: a preconditioner need not be exact, and CG's vectors are.
        apply = self.linear_op.eigen_inverse(shift, self.dtype)
        return apply, precond_lt, precond_lt._logdet()

    def __add__(self, other):
        r"""``(K + D) + D'`` with a constant ``D'`` stays in this class (``D + D'`` is diagonal)."""
        if isinstance(other, ConstantDiagLinearOperator) and self._diag_is_constant:
            return KroneckerAddedDiagOperator(self.linear_op, self.diag_tensor + other)
        return super().__add__(other)
