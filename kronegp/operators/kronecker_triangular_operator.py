"""``KroneckerTriangularOperator``: a Kronecker product of triangular factors on kronegp's products.

``L = L_1 ⊗ … ⊗ L_N`` with every ``L_i`` lower (or every one upper) triangular is itself
triangular, and ``L⁻¹ = L_1⁻¹ ⊗ … ⊗ L_N⁻¹``, so a solve is ``N`` small triangular solves.
This is what :meth:`KroneckerOperator.cholesky` returns
(``chol(F_1 ⊗ … ⊗ F_N) = chol(F_1) ⊗ … ⊗ chol(F_N)``): linear_operator's
:class:`~linear_operator.operators.KroneckerProductTriangularLinearOperator` supplies the
triangular algebra (solves, inverse, Cholesky solves), :class:`KroneckerOperator` the
products.
"""

from __future__ import annotations

from linear_operator.operators import KroneckerProductTriangularLinearOperator

from kronegp.operators.kronecker_operator import KroneckerOperator

__all__ = ["KroneckerTriangularOperator"]


class KroneckerTriangularOperator(KroneckerOperator, KroneckerProductTriangularLinearOperator):
    r"""``L_1 ⊗ … ⊗ L_N`` of :class:`~linear_operator.operators.TriangularLinearOperator` factors.

    :param factors: triangular factors, all lower (``upper=False``) or all upper.
    :param upper: whether the factors (hence the product) are upper triangular.

    Products go through kronegp (inherited from :class:`KroneckerOperator`); ``solve``,
    ``inverse`` and ``_cholesky_solve`` are the triangular ones of linear_operator.
    """

    def __init__(self, *factors, upper: bool = False):
        KroneckerProductTriangularLinearOperator.__init__(self, *factors, upper=upper)

    # A triangular operator has no Cholesky factor of its own; KroneckerOperator's override
    # (which builds one) must not shadow the triangular class's refusal.
    _cholesky = KroneckerProductTriangularLinearOperator._cholesky

    def _transpose_nonbatch(self):
        r"""``(L_1 ⊗ … ⊗ L_N)ᵀ = L_1ᵀ ⊗ … ⊗ L_Nᵀ``: lower becomes upper and back."""
        return KroneckerTriangularOperator(
            *(f._transpose_nonbatch() for f in self.linear_ops), upper=not self.upper
        )

    def _expand_batch(self, batch_shape):
        return KroneckerTriangularOperator(
            *(f._expand_batch(batch_shape) for f in self.linear_ops), upper=self.upper
        )
