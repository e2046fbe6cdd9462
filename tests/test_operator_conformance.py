"""KroneckerOperator against linear_operator's own conformance suite.

``LinearOperatorTestCase`` / ``RectangularLinearOperatorTestCase`` are the test-case classes
linear_operator runs on each of its operators (matmul and its gradients, solves, logdet,
eigen/root decompositions, indexing, batching, ``_bilinear_derivative`` against autograd,
…). Each class below plugs ``KroneckerOperator`` into them with a different factor layout:
square and rectangular, batched, mixed sizes (P ≠ Q, odd sizes), structured factors
(Toeplitz, diagonal) both densified and kept structured, in float32 and float64.
The reference (``evaluate_linear_op``) is the dense Kronecker product from ``torch.kron``.
"""

from __future__ import annotations

import unittest

import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator, ToeplitzLinearOperator
from linear_operator.test.linear_operator_test_case import (
    LinearOperatorTestCase,
    RectangularLinearOperatorTestCase,
)

from kronegp.operators import KroneckerOperator, KroneckerTriangularOperator
from kronegp.operators import kronecker_operator as ko_module
from _helpers import dense_kron


def spd(n, *batch, dtype=None):
    """A well-conditioned symmetric positive-definite (batch of) n × n matrix."""
    a = torch.randn(*batch, n, n, dtype=dtype)
    return a @ a.mT / n + torch.eye(n, dtype=dtype)


class _EvaluateDense:
    def evaluate_linear_op(self, linear_op):
        return dense_kron([f.to_dense() for f in linear_op.linear_ops])


class _Float64:
    """Run the whole inherited suite in float64 (the suite draws its vectors with the default dtype)."""

    def setUp(self):
        self._old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        super().setUp()

    def tearDown(self):
        super().tearDown()
        torch.set_default_dtype(self._old_dtype)


# ------------------------------------------------------------------ square (solves, logdet, …)


class TestKroneckerOperatorSquare(_EvaluateDense, LinearOperatorTestCase, unittest.TestCase):
    """Three square SPD factors of odd, different sizes (3, 2, 4): a 24 × 24 operator."""

    seed = 0
    should_call_lanczos = True
    should_call_lanczos_diagonalization = False

    def create_linear_op(self):
        factors = [spd(3).requires_grad_(True), spd(2).requires_grad_(True), spd(4).requires_grad_(True)]
        return KroneckerOperator(*(DenseLinearOperator(f) for f in factors))

    def test_is_kronecker_operator(self):
        op = self.create_linear_op()
        self.assertTrue(type(op) is KroneckerOperator)
        self.assertTrue(type(op.cholesky()) is KroneckerTriangularOperator)
        self.assertTrue(type(op.mT) is KroneckerOperator)
        self.assertTrue(type(op * 2.5) is KroneckerOperator)


class TestKroneckerOperatorSquareFloat64(_Float64, TestKroneckerOperatorSquare):
    pass


class TestKroneckerOperatorSquareBatch(TestKroneckerOperatorSquare):
    """Batched factors (batch 2), one factor unbatched so that batch shapes broadcast."""

    def create_linear_op(self):
        factors = [spd(3, 2), spd(2), spd(5, 2)]
        return KroneckerOperator(*(DenseLinearOperator(f.requires_grad_(True)) for f in factors))


class TestKroneckerOperatorSquareBatchFloat64(_Float64, TestKroneckerOperatorSquareBatch):
    pass


class TestKroneckerOperatorStructuredFactors(TestKroneckerOperatorSquare):
    """Toeplitz, diagonal and dense factors: the LinearOperator factors get densified."""

    def create_linear_op(self):
        column = torch.tensor([2.0, 0.5, 0.25, 0.1]).requires_grad_(True)
        diag = (torch.rand(3) + 0.5).requires_grad_(True)
        return KroneckerOperator(
            ToeplitzLinearOperator(column),
            DiagLinearOperator(diag),
            DenseLinearOperator(spd(2).requires_grad_(True)),
        )

    def test_is_kronecker_operator(self):
        op = self.create_linear_op()
        self.assertTrue(all(isinstance(m, torch.Tensor) for m in op.factor_matrices()))


class TestKroneckerOperatorStructuredKept(TestKroneckerOperatorStructuredFactors):
    """The same factors with the densification threshold at 0: every structured factor is
    applied with its own ``_matmul`` between kronegp products of the dense ones."""

    def setUp(self):
        self._old_limit = ko_module.DENSE_FACTOR_MAX_NUMEL
        ko_module.DENSE_FACTOR_MAX_NUMEL = 0
        super().setUp()

    def tearDown(self):
        super().tearDown()
        ko_module.DENSE_FACTOR_MAX_NUMEL = self._old_limit

    def test_is_kronecker_operator(self):
        op = self.create_linear_op()
        kinds = [type(m) for m in op.factor_matrices()]
        self.assertEqual(kinds, [ToeplitzLinearOperator, DiagLinearOperator, torch.Tensor])


class TestKroneckerOperatorStructuredKeptFloat64(_Float64, TestKroneckerOperatorStructuredKept):
    pass


class TestKroneckerOperatorNestedKronecker(TestKroneckerOperatorSquare):
    """A Kronecker factor inside a Kronecker product (GPyTorch's MultitaskKernel over a
    GridKernel): the inner product is flattened into the outer one and its gradient comes
    from its own ``_bilinear_derivative``."""

    def create_linear_op(self):
        inner = KroneckerOperator(spd(3).requires_grad_(True), spd(2).requires_grad_(True))
        return KroneckerOperator(inner, DenseLinearOperator(spd(4).requires_grad_(True)))

    def evaluate_linear_op(self, linear_op):
        inner, outer = linear_op.linear_ops
        return dense_kron([f.to_dense() for f in inner.linear_ops] + [outer.to_dense()])

    def test_is_kronecker_operator(self):
        op = self.create_linear_op()
        mats, owners = op._flat_matrices()
        self.assertEqual(owners, [0, 0, 1])
        self.assertTrue(all(isinstance(m, torch.Tensor) for m in mats))


class TestKroneckerOperatorNestedKroneckerFloat64(_Float64, TestKroneckerOperatorNestedKronecker):
    pass


# ------------------------------------------------------------------ rectangular


class TestKroneckerOperatorRectangular(_EvaluateDense, RectangularLinearOperatorTestCase, unittest.TestCase):
    """Mixed rectangular factors, P ≠ Q: (2×3) ⊗ (5×2) ⊗ (6×4) = 60 × 24."""

    seed = 0

    def create_linear_op(self):
        return KroneckerOperator(
            DenseLinearOperator(torch.randn(2, 3, requires_grad=True)),
            DenseLinearOperator(torch.randn(5, 2, requires_grad=True)),
            DenseLinearOperator(torch.randn(6, 4, requires_grad=True)),
        )


class TestKroneckerOperatorRectangularFloat64(_Float64, TestKroneckerOperatorRectangular):
    pass


class TestKroneckerOperatorRectangularMultiBatch(TestKroneckerOperatorRectangular):
    """Two batch dimensions (3, 4) on every factor."""

    def create_linear_op(self):
        return KroneckerOperator(
            DenseLinearOperator(torch.randn(3, 4, 2, 3, requires_grad=True)),
            DenseLinearOperator(torch.randn(3, 4, 5, 2, requires_grad=True)),
            DenseLinearOperator(torch.randn(3, 4, 3, 1, requires_grad=True)),
        )


class TestKroneckerOperatorRectangularMultiBatchFloat64(_Float64, TestKroneckerOperatorRectangularMultiBatch):
    pass


class TestKroneckerOperatorRectangularTwoFactors(TestKroneckerOperatorRectangular):
    """Two factors only, one of them a single row (M = 1 on that axis)."""

    def create_linear_op(self):
        return KroneckerOperator(
            DenseLinearOperator(torch.randn(1, 7, requires_grad=True)),
            DenseLinearOperator(torch.randn(12, 3, requires_grad=True)),
        )


# ------------------------------------------------------------------ on the GPU


@pytest.mark.cuda
class TestKroneckerOperatorSquareCuda(TestKroneckerOperatorSquare):
    """The square suite with every tensor the suite creates on the GPU (default device)."""

    def setUp(self):
        self._old_device = torch.get_default_device()
        torch.set_default_device("cuda")
        super().setUp()

    def tearDown(self):
        super().tearDown()
        torch.set_default_device(self._old_device)


@pytest.mark.cuda
class TestKroneckerOperatorRectangularMultiBatchCuda(TestKroneckerOperatorRectangularMultiBatch):
    def setUp(self):
        self._old_device = torch.get_default_device()
        torch.set_default_device("cuda")
        super().setUp()

    def tearDown(self):
        super().tearDown()
        torch.set_default_device(self._old_device)


if __name__ == "__main__":
    unittest.main()
