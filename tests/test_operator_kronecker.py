"""KroneckerOperator beyond the conformance suite: the bilinear derivative against autograd
through the dense matrix, structured factors, sums with diagonals, products, routing.

References are independent: dense Kronecker products from ``torch.kron`` and plain
``torch.linalg`` on them (tiny sizes only).
"""

from __future__ import annotations

import math

import pytest
import torch
from linear_operator import settings as lo_settings
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    ToeplitzLinearOperator,
)

import kronegp
from kronegp import ops
from kronegp.operators import (
    KroneckerAddedDiagOperator,
    KroneckerOperator,
    KroneckerTriangularOperator,
    apply_along_axes,
)
from kronegp.operators import kronecker_added_diag_operator as added_diag_module
from kronegp.operators import kronecker_operator as ko_module
from _helpers import dense_kron, rel_err

TOL = {torch.float32: 2e-4, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def sum_to(g, shape):
    """Sum a gradient of a broadcast (expanded) tensor back onto the original's shape."""
    while g.dim() > len(shape):
        g = g.sum(0)
    dims = [i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def spd(n, *batch, dtype=torch.float64, gen=None):
    a = torch.randn(*batch, n, n, dtype=dtype, generator=gen)
    return a @ a.mT / n + torch.eye(n, dtype=dtype)


@pytest.fixture
def count_kron_calls(monkeypatch):
    """Count calls of the public ops that KroneckerOperator goes through."""
    counts = {"kron_matmul": 0, "matmul_kron": 0}
    real_km, real_mk = ops.kron_matmul, ops.matmul_kron

    def km(*a, **k):
        counts["kron_matmul"] += 1
        return real_km(*a, **k)

    def mk(*a, **k):
        counts["matmul_kron"] += 1
        return real_mk(*a, **k)

    monkeypatch.setattr(ops, "kron_matmul", km)
    monkeypatch.setattr(ops, "matmul_kron", mk)
    return counts


# ------------------------------------------------------------------ bilinear derivative

BILINEAR_CASES = [
    # (factor shapes, factor batch shapes, vector batch, probe count D)
    ([(3, 3), (12, 12)], [(), ()], (), 4),
    ([(3, 4), (5, 2), (2, 3)], [(), (), ()], (), 1),  # P ≠ Q, one probe
    ([(61, 61)], [()], (), 3),  # a single factor
    ([(3, 2), (1, 4), (4, 4), (2, 3)], [(2,), (), (2,), ()], (2,), 2),  # batched, mixed, M = 1 axis
    ([(4, 3), (3, 5)], [(2, 1), (3,)], (2, 3), 2),  # broadcast batch shapes
]


# Odd sizes for the shared-prefix/suffix path (3, 12, 61; P ≠ Q; batches; T = 1, given as a
# vector or as one column), each against autograd through the dense Kronecker matrix.
ODD_BILINEAR_CASES = [
    # (factor shapes, factor batch shapes, vector batch, probe count D; 0 = a vector)
    ([(3, 3), (12, 12), (61, 61)], [(), (), ()], (), 11),
    ([(61, 12), (3, 5), (12, 3)], [(), (), ()], (), 1),  # P ≠ Q everywhere, one column
    ([(12, 3), (5, 61)], [(), ()], (), 0),  # P ≠ Q, vectors
    ([(3, 12), (12, 12), (1, 1), (3, 2)], [(2,), (), (), (2,)], (2,), 3),  # batched, a 1×1 axis
    ([(12, 12), (3, 61)], [(3, 1), ()], (3, 2), 1),  # broadcast batches, T = 1
    ([(3, 3), (12, 12), (1, 1)], [(), (), ()], (), 1),  # middle contraction through einsum
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes,batches,vbatch,d", BILINEAR_CASES + ODD_BILINEAR_CASES)
def test_bilinear_derivative_matches_autograd_through_dense(shapes, batches, vbatch, d, dtype, device):
    gen = torch.Generator().manual_seed(7)
    factors = [
        torch.randn(*b, p, q, dtype=dtype, generator=gen).to(device).requires_grad_(True)
        for (p, q), b in zip(shapes, batches)
    ]
    op = KroneckerOperator(*factors)
    batch = torch.broadcast_shapes(vbatch, *batches)
    cols = () if d == 0 else (d,)
    left = torch.randn(*batch, op.size(-2), *cols, dtype=dtype, generator=gen).to(device)
    right = torch.randn(*batch, op.size(-1), *cols, dtype=dtype, generator=gen).to(device)

    ours = op._bilinear_derivative(left, right)

    dense = dense_kron(factors)
    lv, rv = (left, right) if d else (left.unsqueeze(-1), right.unsqueeze(-1))
    expected = torch.autograd.grad((lv * (dense @ rv)).sum(), factors)
    # The operator's representation is the (batch-expanded) factors; gradients of the
    # expanded tensors sum back onto the originals.
    assert len(ours) == len(op.representation()) == len(factors)
    for ours_g, exp_g, f in zip(ours, expected, factors):
        assert ours_g.dtype == dtype and ours_g.device == f.device
        assert not ours_g.requires_grad  # like linear_operator's default: no graph
        assert rel_err(sum_to(ours_g, f.shape), exp_g) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wanted", [(0,), (1,), (3,), (1, 2), (0, 3)])
def test_bilinear_derivative_some_factors_constant(wanted, dtype, count_kron_calls):
    """Only the factors that require grad get one; the chains stop where no later factor needs one."""
    gen = torch.Generator().manual_seed(23)
    shapes = [(3, 4), (12, 12), (5, 3), (4, 6)]
    factors = [
        torch.randn(p, q, dtype=dtype, generator=gen).requires_grad_(i in wanted)
        for i, (p, q) in enumerate(shapes)
    ]
    op = KroneckerOperator(*factors)
    left = torch.randn(op.size(-2), 5, dtype=dtype, generator=gen)
    right = torch.randn(op.size(-1), 5, dtype=dtype, generator=gen)
    ours = op._bilinear_derivative(left, right)
    lo, hi = min(wanted), max(wanted)
    # Ũ for j ≤ hi costs hi products, Ṽ for j ≥ lo costs N-1-lo
    assert count_kron_calls["kron_matmul"] + count_kron_calls["matmul_kron"] == hi + (len(shapes) - 1 - lo)
    expected = torch.autograd.grad((left * (dense_kron(factors) @ right)).sum(), [factors[i] for i in wanted])
    for i, g in enumerate(ours):
        if i in wanted:
            assert rel_err(g, expected[wanted.index(i)]) < TOL[dtype]
        else:
            assert g is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_derivative_counts_public_products(dtype, count_kron_calls):
    """2(N−1) public Kronecker products (shared prefix and suffix), never N(N−1) or a dense K."""
    gen = torch.Generator().manual_seed(29)
    factors = [torch.randn(n, n, dtype=dtype, generator=gen).requires_grad_(True) for n in (3, 12, 5, 4)]
    op = KroneckerOperator(*factors)
    left = torch.randn(op.size(-2), 11, dtype=dtype, generator=gen)
    right = torch.randn(op.size(-1), 11, dtype=dtype, generator=gen)
    op._bilinear_derivative(left, right)
    assert count_kron_calls["kron_matmul"] + count_kron_calls["matmul_kron"] == 2 * (len(factors) - 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_derivative_nested_and_structured_leaves(dtype):
    """A nested Kronecker factor (its own factors, one of them Toeplitz) next to a diagonal
    factor and a dense one: gradients reach every leaf's own tensors."""
    gen = torch.Generator().manual_seed(31)
    column = torch.tensor([1.5, 0.4, 0.2], dtype=dtype).requires_grad_(True)
    inner = torch.randn(4, 2, dtype=dtype, generator=gen).requires_grad_(True)
    diag = (torch.rand(5, dtype=dtype, generator=gen) + 0.5).requires_grad_(True)
    outer = torch.randn(3, 12, dtype=dtype, generator=gen).requires_grad_(True)
    nested = KroneckerProductLinearOperator(ToeplitzLinearOperator(column), DenseLinearOperator(inner))
    op = KroneckerOperator(nested, DiagLinearOperator(diag), outer)
    assert len(op.representation()) == 4
    left = torch.randn(op.size(-2), 3, dtype=dtype, generator=gen)
    right = torch.randn(op.size(-1), 3, dtype=dtype, generator=gen)
    ours = op._bilinear_derivative(left, right)

    idx = (torch.arange(3)[:, None] - torch.arange(3)[None, :]).abs()
    dense = dense_kron([column[idx], inner, torch.diag(diag), outer])
    expected = torch.autograd.grad((left * (dense @ right)).sum(), [column, inner, diag, outer])
    for ours_g, exp_g in zip(ours, expected):
        assert rel_err(ours_g, exp_g) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_derivative_structured_factor_kept_structured(dtype, monkeypatch):
    """A factor too large to densify takes the general path; it agrees with the dense path."""
    gen = torch.Generator().manual_seed(37)
    column = torch.tensor([1.2, 0.5, 0.3, 0.1, 0.05], dtype=dtype).requires_grad_(True)
    a = torch.randn(3, 4, dtype=dtype, generator=gen).requires_grad_(True)
    b = torch.randn(12, 2, dtype=dtype, generator=gen).requires_grad_(True)
    op = KroneckerOperator(a, ToeplitzLinearOperator(column), b)
    left = torch.randn(2, op.size(-2), 3, dtype=dtype, generator=gen)
    right = torch.randn(2, op.size(-1), 3, dtype=dtype, generator=gen)
    dense_path = op._bilinear_derivative(left, right)
    monkeypatch.setattr(ko_module, "DENSE_FACTOR_MAX_NUMEL", 20)  # the 5×5 Toeplitz stays structured
    assert not isinstance(op.factor_matrices()[1], torch.Tensor)
    structured_path = op._bilinear_derivative(left, right)
    idx = (torch.arange(5)[:, None] - torch.arange(5)[None, :]).abs()
    dense = dense_kron([a, column[idx], b])
    expected = torch.autograd.grad((left * (dense @ right)).sum(), [a, column, b])
    for g1, g2, e in zip(dense_path, structured_path, expected):
        assert rel_err(g1, e) < TOL[dtype] and rel_err(g2, e) < TOL[dtype]


def test_bilinear_derivative_errors_name_the_argument():
    op = KroneckerOperator(torch.randn(3, 3, requires_grad=True), torch.randn(4, 4, requires_grad=True))
    with pytest.raises(TypeError, match="dtype"):
        op._bilinear_derivative(torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_derivative_structured_factors(dtype):
    """Toeplitz and diagonal factors: gradients reach their own parameters (column, diagonal)."""
    gen = torch.Generator().manual_seed(3)
    column = torch.tensor([1.5, 0.4, 0.2, 0.05, 0.01], dtype=dtype).requires_grad_(True)
    diag = (torch.rand(3, dtype=dtype, generator=gen) + 0.5).requires_grad_(True)
    dense_f = torch.randn(2, 4, dtype=dtype, generator=gen).requires_grad_(True)
    op = KroneckerOperator(ToeplitzLinearOperator(column), DiagLinearOperator(diag), dense_f)
    left = torch.randn(op.size(-2), 3, dtype=dtype, generator=gen)
    right = torch.randn(op.size(-1), 3, dtype=dtype, generator=gen)
    ours = op._bilinear_derivative(left, right)

    n = column.numel()
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    dense = dense_kron([column[idx], torch.diag(diag), dense_f])
    expected = torch.autograd.grad((left * (dense @ right)).sum(), [column, diag, dense_f])
    for ours_g, exp_g in zip(ours, expected):
        assert rel_err(ours_g, exp_g) < TOL[dtype]


def test_bilinear_derivative_skips_factors_without_grad():
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 4, dtype=torch.float64)  # constant
    op = KroneckerOperator(a, b)
    left, right = torch.randn(12, 2, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    grads = op._bilinear_derivative(left, right)
    assert grads[1] is None and grads[0] is not None


def test_matmul_backward_uses_bilinear_derivative(monkeypatch):
    """``op @ x`` differentiates through ``_bilinear_derivative`` (not autograd on the loop)."""
    calls = []
    real = KroneckerOperator._bilinear_derivative

    def spy(self, left, right):
        calls.append(left.shape)
        return real(self, left, right)

    monkeypatch.setattr(KroneckerOperator, "_bilinear_derivative", spy)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 3, dtype=torch.float64)
    (KroneckerOperator(a, b) @ x).square().sum().backward()
    assert len(calls) == 1
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    (dense_kron([a, b]) @ x).square().sum().backward()
    assert rel_err(ga, a.grad) < 1e-12 and rel_err(gb, b.grad) < 1e-12


# ------------------------------------------------------------------ products and routing


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_products_route_through_kronegp_ops(dtype, device, count_kron_calls):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen).to(device)

    fs = [randn(3, 4), randn(12, 5)]
    op, dense = KroneckerOperator(*fs), dense_kron(fs)
    x, y, z = randn(20, 11), randn(36, 2), randn(7, 36)
    assert rel_err(op @ x, dense @ x) < TOL[dtype]
    assert count_kron_calls["kron_matmul"] == 1
    assert rel_err(op._t_matmul(y), dense.mT @ y) < TOL[dtype]
    assert count_kron_calls["kron_matmul"] == 2
    assert rel_err(z @ op, z @ dense) < TOL[dtype]
    assert count_kron_calls["matmul_kron"] == 1
    v, w = randn(20), randn(36)
    assert rel_err(op @ v, dense @ v) < TOL[dtype]
    assert rel_err(w @ op, w @ dense) < TOL[dtype]
    assert (op @ x).device == x.device


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmatmul_gradients(dtype):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 3, 4, dtype=dtype, generator=gen).requires_grad_(True)
    b = torch.randn(5, 3, dtype=dtype, generator=gen).requires_grad_(True)
    z = torch.randn(2, 6, 15, dtype=dtype, generator=gen).requires_grad_(True)
    out = z @ KroneckerOperator(a, b)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [a, b, z], g)
    expected = torch.autograd.grad(z @ dense_kron([a, b]), [a, b, z], g)
    for x, e in zip(grads, expected):
        assert rel_err(x, e) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_along_axes_mixed_identity_and_structured(dtype):
    """Identity axes (None), dense runs and a structured factor, against the dense product."""
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 2, dtype=dtype, generator=gen)
    column = torch.tensor([1.0, 0.3, 0.1, 0.0, 0.2], dtype=dtype)
    toe = ToeplitzLinearOperator(column)
    c = torch.randn(2, 4, 4, dtype=dtype, generator=gen)
    sizes = [2, 5, 7, 4]
    x = torch.randn(2, math.prod(sizes), 3, dtype=dtype, generator=gen)
    out = apply_along_axes([a, toe, None, c], sizes, x)
    eye7 = torch.eye(7, dtype=dtype)
    expected = dense_kron([a, toe.to_dense(), eye7, c]) @ x
    assert out.shape == expected.shape
    assert rel_err(out, expected) < TOL[dtype]


def test_densification_rule(monkeypatch):
    toe = ToeplitzLinearOperator(torch.tensor([2.0, 0.5, 0.1]))
    dense = DenseLinearOperator(torch.randn(4, 4))
    op = KroneckerOperator(toe, dense, DiagLinearOperator(torch.rand(2) + 1))
    mats = op.factor_matrices()
    assert all(isinstance(m, torch.Tensor) for m in mats)
    assert mats[1] is dense.tensor  # dense factors are used as they are, never copied
    monkeypatch.setattr(ko_module, "DENSE_FACTOR_MAX_NUMEL", 8)
    kinds = [type(m) for m in op.factor_matrices()]
    assert kinds == [ToeplitzLinearOperator, torch.Tensor, torch.Tensor]  # 9 > 8, 16 dense, 4 ≤ 8
    x = torch.randn(24, 2)
    assert rel_err(op @ x, dense_kron([toe.to_dense(), dense.tensor, op.linear_ops[2].to_dense()]) @ x) < 1e-5


# ------------------------------------------------------------------ sums, products, solves


def _square_op(dtype, gen, batch=()):
    return KroneckerOperator(spd(3, *batch, dtype=dtype, gen=gen), spd(4, *batch, dtype=dtype, gen=gen), spd(2, dtype=dtype, gen=gen))


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_diagonal_gives_exact_eigen_solve(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    op = _square_op(dtype, gen)
    noise = torch.tensor(0.3, dtype=dtype)
    total = op + ConstantDiagLinearOperator(noise.view(1), diag_shape=op.size(-1))
    assert type(total) is KroneckerAddedDiagOperator and total.has_exact_solve
    assert type(op.add_diagonal(noise)) is KroneckerAddedDiagOperator

    def no_cg(*a, **k):
        raise AssertionError("a constant diagonal must not go through the iterative solver")

    monkeypatch.setattr(added_diag_module, "iterative_solve", no_cg)
    dense = dense_kron([f.to_dense() for f in op.linear_ops]) + noise * torch.eye(24, dtype=dtype)
    rhs = torch.randn(24, 3, dtype=dtype, generator=gen)
    with lo_settings.max_cholesky_size(0):
        sol = total.solve(rhs)
        logdet = total.logdet()
    assert rel_err(sol, torch.linalg.solve(dense, rhs)) < 10 * TOL[dtype]
    assert rel_err(logdet, torch.logdet(dense)) < 10 * TOL[dtype]


CG_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_general_diagonal_goes_through_the_iterative_solver(dtype, batch, monkeypatch):
    """A per-entry diagonal is solved by kronegp's block CG (through ``iterative_solve``),
    to the CG tolerance: ‖x − x*‖/‖x*‖ ≤ κ(A) · tol for a relative residual ≤ tol."""
    gen = torch.Generator().manual_seed(2)
    op = _square_op(dtype, gen, batch)
    d = torch.rand(*batch, 24, dtype=dtype, generator=gen) * 3 + 0.05  # d spans 60x
    total = op + DiagLinearOperator(d)
    assert type(total) is KroneckerAddedDiagOperator and not total.has_exact_solve
    calls = []
    real_solve, real_cg = added_diag_module.iterative_solve, added_diag_module.block_cg

    def spy(*a, **k):
        calls.append("iterative_solve")
        return real_solve(*a, **k)

    def spy_cg(*a, **k):
        result = real_cg(*a, **k)
        calls.append(result.iterations)
        return result

    monkeypatch.setattr(added_diag_module, "iterative_solve", spy)
    monkeypatch.setattr(added_diag_module, "block_cg", spy_cg)
    dense = dense_kron([f.to_dense() for f in op.linear_ops]) + torch.diag_embed(d)
    rhs = torch.randn(*batch, 24, 3, dtype=dtype, generator=gen)
    tol = CG_TOL[dtype]
    with lo_settings.max_cholesky_size(0), lo_settings.cg_tolerance(tol), lo_settings.max_cg_iterations(200):
        sol = total.solve(rhs)
    assert calls and calls[0] == "iterative_solve", "the non-constant diagonal must be solved by iterative_solve"
    # the Kronecker eigen preconditioner makes CG converge well before the size (24)
    assert 0 < calls[1] < 24
    expected = torch.linalg.solve(dense.double(), rhs.double())
    cond = torch.linalg.cond(dense.double()).max().item()
    assert cond > 3  # not a trivially conditioned system
    assert rel_err(sol, expected) < cond * tol * 10
    residual = (dense.double() @ sol.double() - rhs.double()).norm(dim=-2) / rhs.double().norm(dim=-2)
    assert residual.max().item() < tol * 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_general_diagonal_logdet_and_gradients(dtype):
    """The iterative path's log-determinant (SLQ on the tridiagonals rebuilt from block CG,
    probes from the Kronecker eigen preconditioner) and its gradient, against the dense
    matrix. With ``P = K + d̄ I`` close to ``K + D`` the estimate's variance is small."""
    gen = torch.Generator().manual_seed(9)
    a = spd(3, dtype=dtype, gen=gen).requires_grad_(True)
    b = spd(5, dtype=dtype, gen=gen).requires_grad_(True)
    d = (torch.rand(15, dtype=dtype, generator=gen) * 0.4 + 0.3).requires_grad_(True)
    y = torch.randn(15, dtype=dtype, generator=gen)
    total = KroneckerOperator(a, b) + DiagLinearOperator(d)
    assert not total.has_exact_solve
    torch.manual_seed(0)
    with lo_settings.max_cholesky_size(0), lo_settings.cg_tolerance(CG_TOL[dtype]), lo_settings.num_trace_samples(
        400
    ):
        inv_quad, logdet = total.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
    dense = torch.kron(a, b) + torch.diag(d)
    exp_quad = y @ torch.linalg.solve(dense, y)
    exp_logdet = torch.logdet(dense)
    assert rel_err(inv_quad, exp_quad) < 1e-4
    assert abs(logdet.item() - exp_logdet.item()) < 0.02 * abs(exp_logdet.item()) + 0.02
    grads = torch.autograd.grad(inv_quad + logdet, [a, b, d])
    expected = torch.autograd.grad(exp_quad + exp_logdet, [a, b, d])
    # factor gradients pool every probe; the per-entry noise gradient ([A⁻¹]_ii from a
    # Hutchinson diagonal estimate) is noisier entry by entry, exact-ish in total
    assert rel_err(grads[0], expected[0]) < 0.05
    assert rel_err(grads[1], expected[1]) < 0.05
    assert rel_err(grads[2].sum(), expected[2].sum()) < 0.05
    assert rel_err(grads[2], expected[2]) < 0.2


def test_iterative_solve_tridiagonals_match_dense_lanczos_quadrature():
    """``iterative_solve``'s tridiagonals (one size for all probes, padded with decoupled
    unit rows) give ``e₁ᵀ log(T) e₁`` equal to the exact quadratic form ``qᵀ log(H) q`` once
    CG has run to the size of the system (Lanczos is then exact)."""
    gen = torch.Generator().manual_seed(12)
    op = KroneckerOperator(spd(3, gen=gen), spd(4, gen=gen))
    d = torch.rand(12, dtype=torch.float64, generator=gen) + 0.1
    total = op + DiagLinearOperator(d)
    probes = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    with lo_settings.cg_tolerance(1e-12), lo_settings.max_cg_iterations(40), lo_settings.terminate_cg_by_size(False):
        x, t_mat = added_diag_module.iterative_solve(total, probes, None, num_tridiag=2)
    dense = total.to_dense()
    assert rel_err(x, torch.linalg.solve(dense, probes)) < 1e-8
    assert t_mat.shape[0] == 2 and t_mat.shape[-1] == t_mat.shape[-2]
    evals, evecs = torch.linalg.eigh(dense)
    log_h = evecs @ torch.diag(evals.log()) @ evecs.mT
    for j in range(2):
        q = probes[:, j] / probes[:, j].norm()
        theta, v = torch.linalg.eigh(t_mat[j])
        quad = (v[0] ** 2 * theta.log()).sum()
        assert abs(quad.item() - (q @ log_h @ q).item()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_kronecker_diagonal_solve_is_exact(dtype):
    gen = torch.Generator().manual_seed(4)
    a, b = spd(3, dtype=dtype, gen=gen), spd(5, dtype=dtype, gen=gen)
    da, db = torch.rand(3, dtype=dtype, generator=gen) + 0.5, torch.rand(5, dtype=dtype, generator=gen) + 0.5
    op = KroneckerOperator(a, b)
    total = op + KroneckerProductDiagLinearOperator(DiagLinearOperator(da), DiagLinearOperator(db))
    assert type(total) is KroneckerAddedDiagOperator and total.has_exact_solve
    dense = torch.kron(a, b) + torch.diag(torch.kron(da, db))
    rhs = torch.randn(15, 2, dtype=dtype, generator=gen)
    with lo_settings.max_cholesky_size(0):
        sol = total.solve(rhs)
    assert rel_err(sol, torch.linalg.solve(dense, rhs)) < 10 * TOL[dtype]


def test_constant_mul_and_kronecker_products_stay_kronecker():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(5, 2, generator=gen)
    c, d = torch.randn(4, 2, generator=gen), torch.randn(2, 6, generator=gen)
    left, right = KroneckerOperator(a, b), KroneckerOperator(c, d)
    prod = left @ right
    assert type(prod) is KroneckerOperator
    assert rel_err(prod.to_dense(), torch.kron(a, b) @ torch.kron(c, d)) < 1e-5
    scaled = left * -2.5
    assert type(scaled) is KroneckerOperator
    assert rel_err(scaled.to_dense(), -2.5 * torch.kron(a, b)) < 1e-6
    mixed = left @ KroneckerOperator(torch.randn(8, 3, generator=gen))  # incompatible split: generic
    assert not isinstance(mixed, KroneckerOperator)
    assert rel_err(mixed.to_dense(), torch.kron(a, b) @ mixed.right_linear_op.to_dense()) < 1e-5


def test_cholesky_is_triangular_kronecker_on_kronegp():
    gen = torch.Generator().manual_seed(8)
    a, b = spd(3, gen=gen), spd(4, gen=gen)
    chol = KroneckerOperator(a, b).cholesky()
    assert type(chol) is KroneckerTriangularOperator
    assert isinstance(chol, KroneckerProductLinearOperator)
    dense_l = torch.kron(torch.linalg.cholesky(a), torch.linalg.cholesky(b))
    assert rel_err(chol.to_dense(), dense_l) < 1e-12
    rhs = torch.randn(12, 2, dtype=torch.float64, generator=gen)
    assert rel_err(chol.solve(rhs), torch.linalg.solve_triangular(dense_l, rhs, upper=False)) < 1e-12
    assert chol.mT.upper and rel_err(chol.mT.to_dense(), dense_l.mT) < 1e-12


def test_constructor_errors():
    with pytest.raises(ValueError, match="at least one factor"):
        KroneckerOperator()
    with pytest.raises(TypeError, match=r"factors\[1\]"):
        KroneckerOperator(torch.randn(2, 2), [[1.0]])
    with pytest.raises(ValueError, match=r"factors\[0\].*\(\*batch, P, Q\)"):
        KroneckerOperator(torch.randn(3))
    op = KroneckerOperator(torch.randn(2, 2), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"diag must have shape"):
        op.add_diagonal(torch.randn(5))
    with pytest.raises(TypeError, match="dtype"):  # no silent promotion: the ops refuse
        op @ torch.randn(6, 1, dtype=torch.float64)


def test_kronegp_exports_operator():
    assert kronegp.KroneckerOperator is KroneckerOperator


# ------------------------------------------------------------------ eigendecompositions (symmetric_eig)

EIG_CASES = [
    # (factor sizes, batch shape of each factor)
    ([3, 12, 61], [(), (), ()]),  # mixed odd sizes
    ([5, 4], [(2,), ()]),  # a batched factor next to an unbatched one
    ([7], [(3, 2)]),  # one factor, two batch dims
]


def _toeplitz_dense(column):
    n = column.size(-1)
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    return column[..., idx]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes,batches", EIG_CASES)
def test_symeig_agrees_with_torch_eigh(sizes, batches, dtype, device):
    """``KroneckerOperator._symeig`` (factors through ``symmetric_eig``) against
    ``torch.linalg.eigh`` of each dense factor: Kronecker eigenvalues equal, eigenvectors
    reconstruct the dense product, dtypes/devices/types as linear_operator returns them."""
    from kronegp.linalg import clear_eig_cache

    clear_eig_cache()
    gen = torch.Generator().manual_seed(21)
    factors = [spd(n, *b, dtype=torch.float64, gen=gen).to(dtype).to(device) for n, b in zip(sizes, batches)]
    op = KroneckerOperator(*factors)
    evals, evecs = op._symeig(eigenvectors=True)
    assert evals.dtype == dtype and evals.device.type == torch.device(device).type
    assert isinstance(evecs, KroneckerOperator)
    ref = [torch.linalg.eigh(f.double().cpu())[0] for f in op.linear_ops]
    ref_evals = ref[0]
    for r in ref[1:]:
        ref_evals = (ref_evals.unsqueeze(-1) * r.unsqueeze(-2)).reshape(*torch.broadcast_shapes(ref_evals.shape[:-1], r.shape[:-1]), -1)
    assert evals.shape == ref_evals.shape
    assert rel_err(evals.cpu(), ref_evals) < TOL[dtype]
    # Q diag(λ) Qᵀ rebuilds the operator (checked on the dense form for these small sizes)
    if math.prod(sizes) <= 2300:
        q = evecs.to_dense().double().cpu()
        rebuilt = q @ torch.diag_embed(evals.double().cpu()) @ q.mT
        assert rel_err(rebuilt, op.to_dense().double().cpu()) < 10 * TOL[dtype]
    lazy, _ = op._symeig(eigenvectors=False, return_evals_as_lazy=True)
    assert isinstance(lazy, KroneckerProductDiagLinearOperator)
    assert rel_err(lazy._diagonal().cpu(), evals.cpu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_symeig_structured_and_nested_factors_and_clamping(dtype):
    """Toeplitz, diagonal and nested Kronecker factors; negative eigenvalues clamped at zero
    as linear_operator's dense ``_symeig`` clamps them."""
    gen = torch.Generator().manual_seed(22)
    column = torch.tensor([1.0, 0.6, 0.2, -0.3, 0.1], dtype=dtype)  # indefinite Toeplitz
    toe = ToeplitzLinearOperator(column)
    diag = DiagLinearOperator(torch.rand(3, dtype=dtype, generator=gen) + 0.5)
    inner = KroneckerOperator(spd(4, dtype=dtype, gen=gen), spd(2, dtype=dtype, gen=gen))
    op = KroneckerOperator(toe, diag, inner)
    evals, evecs = op._symeig(eigenvectors=True)
    ref = KroneckerProductLinearOperator(toe, diag, KroneckerProductLinearOperator(*inner.linear_ops))
    ref_evals, _ = ref._symeig(eigenvectors=True)
    assert (torch.linalg.eigvalsh(_toeplitz_dense(column).double()) < 0).any()  # clamping is exercised
    assert rel_err(evals, ref_evals) < TOL[dtype]
    assert (evals >= 0).all()
    q = evecs.to_dense()
    assert rel_err(q.mT @ q, torch.eye(q.size(-1), dtype=dtype)) < 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_symeig_gradient_matches_torch_eigh(dtype):
    """Gradients through the eigenvalues (what the log-determinant uses) and through the
    eigenvectors, against autograd through ``torch.linalg.eigh``."""
    gen = torch.Generator().manual_seed(23)
    base = [spd(n, dtype=torch.float64, gen=gen).to(dtype) for n in (3, 5)]
    column = torch.tensor([2.0, 0.7, 0.3, 0.1], dtype=dtype)
    w = torch.randn(3 * 5 * 4, dtype=dtype, generator=gen)

    def loss(factors, col, ours):
        if ours:
            evals, evecs = KroneckerOperator(*factors, ToeplitzLinearOperator(col))._symeig(eigenvectors=True)
            vec_term = sum((q.to_dense() ** 3).sum() for q in evecs.linear_ops[:1])
        else:
            pairs = [torch.linalg.eigh(f.double()) for f in (*factors, _toeplitz_dense(col))]
            evals = pairs[0][0]
            for lam, _ in pairs[1:]:
                evals = (evals.unsqueeze(-1) * lam.unsqueeze(-2)).reshape(-1)
            evals = evals.to(dtype)
            vec_term = (pairs[0][1].to(dtype) ** 3).sum()
        return (w * evals.clamp_min(0).log1p()).sum() + vec_term

    inputs = [b.clone().requires_grad_(True) for b in base] + [column.clone().requires_grad_(True)]
    g_ours = torch.autograd.grad(loss(inputs[:2], inputs[2], True), inputs)
    inputs_ref = [b.clone().requires_grad_(True) for b in base] + [column.clone().requires_grad_(True)]
    g_ref = torch.autograd.grad(loss(inputs_ref[:2], inputs_ref[2], False), inputs_ref)
    for a, b in zip(g_ours, g_ref):
        assert rel_err(a, b) < 50 * TOL[dtype]


def test_one_decomposition_per_factor_per_step(monkeypatch):
    """Solve, log-determinant and backward of one constant-diagonal likelihood decompose
    each factor once (symmetric_eig's cache by tensor identity does the rest), and the
    Toeplitz factors are never densified through linear_operator's FFT product."""
    from kronegp import linalg

    linalg.clear_eig_cache()
    ko_module.clear_dense_factor_cache()
    calls = []
    real_eigh = torch.linalg.eigh

    def counting_eigh(m, *a, **k):
        calls.append(tuple(m.shape))
        return real_eigh(m, *a, **k)

    def no_fft_densify(*a, **k):
        raise AssertionError("Toeplitz factors must be densified by a gather, not FFT products")

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    monkeypatch.setattr(ko_module.ToeplitzLinearOperator, "to_dense", no_fft_densify)
    cols = [torch.exp(-torch.linspace(0, 2, n, dtype=torch.float64) ** 2).requires_grad_(True) for n in (5, 6, 7)]
    noise = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    y = torch.randn(5 * 6 * 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    op = KroneckerOperator(*(ToeplitzLinearOperator(c) for c in cols))
    total = op + ConstantDiagLinearOperator(noise, diag_shape=op.size(-1))
    with lo_settings.max_cholesky_size(0):
        inv_quad, logdet = total.inv_quad_logdet(y.unsqueeze(-1), logdet=True)
    (inv_quad + logdet).backward()
    assert sorted(calls) == [(5, 5), (6, 6), (7, 7)]
    dense = dense_kron([_toeplitz_dense(c.detach()) for c in cols]) + noise.detach() * torch.eye(210, dtype=torch.float64)
    assert rel_err(logdet.detach(), torch.logdet(dense)) < 1e-10
    assert rel_err(inv_quad.detach(), y @ torch.linalg.solve(dense, y)) < 1e-10
    cols_ref = [c.detach().clone().requires_grad_(True) for c in cols]
    noise_ref = noise.detach().clone().requires_grad_(True)
    dense_ref = dense_kron([_toeplitz_dense(c) for c in cols_ref]) + noise_ref * torch.eye(210, dtype=torch.float64)
    (y @ torch.linalg.solve(dense_ref, y) + torch.logdet(dense_ref)).backward()
    for c, r in zip(cols, cols_ref):
        assert rel_err(c.grad, r.grad) < 1e-8
    assert rel_err(noise.grad, noise_ref.grad) < 1e-8
