"""Kronecker-structured LinearOperators whose products run through :mod:`kronegp.ops`.

One operator per module, as in linear_operator:

* :class:`KroneckerOperator` — ``F_1 ⊗ … ⊗ F_N`` (a ``KroneckerProductLinearOperator``);
* :class:`KroneckerAddedDiagOperator` — ``K + D``: exact eigen solves for constant or
  Kronecker diagonals, kronegp's block CG (Kronecker eigen preconditioner) otherwise;
* :class:`KroneckerTriangularOperator` — Kronecker product of triangular factors (what
  ``KroneckerOperator.cholesky()`` returns).
"""

from kronegp.operators.kronecker_added_diag_operator import KroneckerAddedDiagOperator, iterative_solve
from kronegp.operators.kronecker_operator import (
    DENSE_FACTOR_MAX_NUMEL,
    KroneckerOperator,
    apply_along_axes,
    clear_dense_factor_cache,
    factor_as_matrix,
    flat_factor_matrices,
    leaf_eigendecompositions,
)
from kronegp.operators.kronecker_triangular_operator import KroneckerTriangularOperator

__all__ = [
    "DENSE_FACTOR_MAX_NUMEL",
    "KroneckerAddedDiagOperator",
    "KroneckerOperator",
    "KroneckerTriangularOperator",
    "apply_along_axes",
    "clear_dense_factor_cache",
    "factor_as_matrix",
    "flat_factor_matrices",
    "iterative_solve",
    "leaf_eigendecompositions",
]
