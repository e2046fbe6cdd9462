"""kronegp.solvers against dense linear algebra: block CG, Lanczos tridiagonals, SLQ."""

import math

import pytest
import torch

from kronegp.solvers import block_cg, cg_tridiagonals, local_inner, slq_logdet_correction, solve_with_logdet

DTYPES = [torch.float32, torch.float64]


def _spd(n, dtype, cond=100.0, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    a = (q * eig) @ q.mT
    return (0.5 * (a + a.mT)).to(dtype)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,t", [(61, 3), (12, 1), (3, 5)])
def test_block_cg_matches_dense_solve(dtype, n, t):
    a = _spd(n, dtype)
    b = torch.randn(n, t, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    res = block_cg(lambda v: a @ v, b, tol=tol, max_iters=10 * n)
    ref = torch.linalg.solve(a.double(), b.double())
    assert res.converged
    assert res.solution.dtype == dtype
    bound = 1e-3 if dtype == torch.float32 else 1e-8
    assert _rel(res.solution.double(), ref) < bound
    assert float(res.residual.max()) <= tol


def test_block_cg_batch_dims_and_preconditioner_cut_iterations():
    dtype = torch.float64
    a = _spd(40, dtype, cond=1e4, batch=(2,))
    # A badly scaled diagonal that Jacobi preconditioning removes.
    s = torch.logspace(-2, 2, 40, dtype=dtype)
    a = s[:, None] * a * s[None, :]
    b = torch.randn(2, 40, 4, dtype=dtype)
    diag = torch.diagonal(a, dim1=-2, dim2=-1).unsqueeze(-1)
    plain = block_cg(lambda v: a @ v, b, tol=1e-9, max_iters=2000, warn=False)
    pre = block_cg(lambda v: a @ v, b, lambda r: r / diag, tol=1e-9, max_iters=2000)
    ref = torch.linalg.solve(a, b)
    assert _rel(pre.solution, ref) < 1e-6
    assert pre.column_iterations.shape == (2, 4)
    assert pre.iterations < plain.iterations


def test_block_cg_zero_column_and_x0():
    a = _spd(20, torch.float64)
    b = torch.randn(20, 3, dtype=torch.float64)
    b[:, 1] = 0
    res = block_cg(lambda v: a @ v, b, tol=1e-10)
    assert torch.isfinite(res.solution).all()
    assert float(res.solution[:, 1].abs().max()) == 0.0
    ref = torch.linalg.solve(a, b)
    warm = block_cg(lambda v: a @ v, b, tol=1e-10, x0=ref + 1e-3 * torch.randn_like(ref))
    assert _rel(warm.solution, ref) < 1e-8
    assert warm.iterations <= res.iterations


def test_block_cg_custom_inner_sharded_like():
    """A reduction that sums two 'shards' separately gives the same answer as the local one."""
    a = _spd(30, torch.float64)
    b = torch.randn(30, 2, dtype=torch.float64)
    calls = []

    def sharded_inner(x, y):
        calls.append(1)
        return local_inner(x[:17], y[:17]) + local_inner(x[17:], y[17:])

    res = block_cg(lambda v: a @ v, b, inner=sharded_inner, tol=1e-10)
    assert calls
    assert _rel(res.solution, torch.linalg.solve(a, b)) < 1e-8


def test_block_cg_warns_with_residual_when_not_converged():
    a = _spd(50, torch.float64, cond=1e6)
    b = torch.randn(50, 1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"relative residual [0-9.e+-]+ > tol"):
        res = block_cg(lambda v: a @ v, b, tol=1e-12, max_iters=3)
    assert not res.converged
    assert res.iterations == 3


def test_block_cg_rejects_bad_input():
    a = _spd(5, torch.float64)
    with pytest.raises(ValueError, match="rhs must have shape"):
        block_cg(lambda v: a @ v, torch.randn(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="rhs must be a torch.Tensor"):
        block_cg(lambda v: a @ v, [[1.0]])
    with pytest.raises(TypeError, match="matvec must be callable"):
        block_cg(a, torch.randn(5, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol must be a positive"):
        block_cg(lambda v: a @ v, torch.randn(5, 1, dtype=torch.float64), tol=0)
    with pytest.raises(ValueError, match="x0 must have the shape"):
        block_cg(lambda v: a @ v, torch.randn(5, 2, dtype=torch.float64), x0=torch.zeros(5, 1, dtype=torch.float64))


def test_tridiagonal_holds_the_spectrum_after_n_steps():
    """After n iterations on an n×n matrix, T's eigenvalues are A's (Lanczos is exact)."""
    n = 12
    a = _spd(n, torch.float64, cond=50.0)
    b = torch.randn(n, 2, dtype=torch.float64)
    res = block_cg(lambda v: a @ v, b, tol=1e-14, max_iters=n, min_iters=n, record_lanczos=True, warn=False)
    (t0, t1) = cg_tridiagonals(res.alphas, res.betas, res.column_iterations)
    assert t0.shape[0] >= n - 1
    ev_a = torch.linalg.eigvalsh(a)
    for t in (t0, t1):
        ev_t = torch.linalg.eigvalsh(t)
        # Extreme Ritz values converge first: both ends must match A's.
        assert abs(float(ev_t[-1] - ev_a[-1])) / float(ev_a[-1]) < 1e-8
        assert abs(float(ev_t[0] - ev_a[0])) / float(ev_a[0]) < 1e-6


def test_tridiagonal_quadrature_matches_quadratic_form():
    """e₁ᵀ f(T) e₁ · ‖b‖² ≈ bᵀ f(A) b for f = log with a few steps on a well-conditioned A."""
    n = 61
    a = _spd(n, torch.float64, cond=10.0)
    b = torch.randn(n, 1, dtype=torch.float64)
    res = block_cg(lambda v: a @ v, b, tol=1e-12, record_lanczos=True)
    (t,) = cg_tridiagonals(res.alphas, res.betas, res.column_iterations)
    theta, v = torch.linalg.eigh(t)
    quad = float((b * b).sum()) * float((v[0] ** 2 * theta.log()).sum())
    ev, q = torch.linalg.eigh(a)
    exact = float(b[:, 0] @ (q * ev.log()) @ q.mT @ b[:, 0])
    assert abs(quad - exact) / abs(exact) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("precondition", [False, True])
def test_slq_logdet_estimates_logdet(precondition):
    n, s = 200, 400
    a = _spd(n, torch.float64, cond=1e3, seed=3)
    d = torch.diagonal(a)
    g = torch.Generator().manual_seed(4)
    xi = torch.randn(n, s, generator=g, dtype=torch.float64)
    probes = xi * d.sqrt()[:, None] if precondition else xi
    rhs = torch.randn(n, 1, dtype=torch.float64, generator=g)
    out = solve_with_logdet(
        lambda v: a @ v,
        rhs,
        probes,
        precond=(lambda r: r / d[:, None]) if precondition else None,
        precond_logdet=d.log().sum() if precondition else None,
        tol=1e-10,
    )
    exact = float(torch.logdet(a))
    # Hutchinson's standard error is √(2 Σ log²μ / S); 4 standard errors is a safe bound.
    ev = torch.linalg.eigvalsh((a / d.sqrt()[:, None] / d.sqrt()[None, :]) if precondition else a)
    se = math.sqrt(2 * float((ev.log() ** 2).sum()) / s)
    assert abs(float(out.logdet) - exact) < 4 * se + 1e-6
    assert _rel(out.solution, torch.linalg.solve(a, rhs)) < 1e-8


def test_solve_with_logdet_trace_pairs_estimate_trace():
    """E[(A⁻¹z)ᵀ G (P⁻¹z)] = tr(A⁻¹G) for z ~ N(0, P)."""
    n, s = 40, 4000
    a = _spd(n, torch.float64, cond=20.0, seed=5)
    gmat = _spd(n, torch.float64, cond=5.0, seed=6)
    d = torch.diagonal(a)
    probes = torch.randn(n, s, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * d.sqrt()[:, None]
    out = solve_with_logdet(
        lambda v: a @ v, torch.randn(n, 1, dtype=torch.float64), probes,
        precond=lambda r: r / d[:, None], precond_logdet=d.log().sum(), tol=1e-10,
    )
    est = float((out.probe_solves * (gmat @ out.probe_precond)).sum() / s)
    exact = float(torch.trace(torch.linalg.solve(a, gmat)))
    assert abs(est - exact) / abs(exact) < 0.05


def test_slq_needs_lanczos_record():
    a = _spd(5, torch.float64)
    res = block_cg(lambda v: a @ v, torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="record_lanczos=True"):
        slq_logdet_correction(res)
    with pytest.raises(ValueError, match="precond_logdet"):
        solve_with_logdet(lambda v: a @ v, torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), precond=lambda r: r)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_slq_from_a_queued_host_copy_matches(device):
    """LanczosOnHost (the copy queued before later GPU work) gives the same SLQ estimate and
    residual as the direct call; it refuses a different column selection."""
    from kronegp.solvers.lanczos import LanczosOnHost

    a = _spd(40, torch.float64, cond=50.0, seed=3).to(device)
    rhs = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device)
    res = block_cg(lambda v: a @ v, rhs, tol=1e-10, record_lanczos=True)
    host = LanczosOnHost(res, columns=slice(1, None))
    _ = a @ rhs  # more GPU work queued after the copy
    direct = float(slq_logdet_correction(res, columns=slice(1, None)))
    assert float(slq_logdet_correction(res, columns=slice(1, None), host=host)) == pytest.approx(direct, rel=1e-14)
    assert host.residual_max() == pytest.approx(float(res.residual.max()), rel=1e-12)
    with pytest.raises(ValueError, match="holds columns"):
        slq_logdet_correction(res, columns=slice(2, None), host=host)


def test_block_cg_diagonal_tensor_preconditioner_equals_callable():
    dtype = torch.float64
    a = _spd(30, dtype, cond=1e3)
    s = torch.logspace(-1, 1, 30, dtype=dtype)
    a = s[:, None] * a * s[None, :]
    b = torch.randn(30, 3, dtype=dtype, generator=torch.Generator().manual_seed(4))
    d = 1.0 / torch.diagonal(a)
    as_tensor = block_cg(lambda v: a @ v, b, d, tol=1e-10, max_iters=500, record_lanczos=True)
    as_callable = block_cg(lambda v: a @ v, b, lambda r: d.unsqueeze(-1) * r, tol=1e-10, max_iters=500, record_lanczos=True)
    assert as_tensor.iterations == as_callable.iterations
    assert torch.allclose(as_tensor.solution, as_callable.solution, rtol=1e-12, atol=0)
    assert torch.allclose(as_tensor.alphas, as_callable.alphas, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"precond given as a diagonal must have shape \(30,\)"):
        block_cg(lambda v: a @ v, b, d[:5])
    with pytest.raises(ValueError, match="dtype and device"):
        block_cg(lambda v: a @ v, b, d.float())


@pytest.mark.parametrize("rows", [False, True])
def test_block_cg_overwrite_rhs_solves_the_same_and_uses_the_block_as_residual(rows):
    """A handed-over right-hand side gives the same solve (bit for bit) and ends as the residual
    ``b − A x``; a non-contiguous one is copied as before (left untouched)."""
    a = _spd(40, torch.float64, cond=1e3, seed=2)
    b = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    d = 1.0 / torch.diagonal(a)
    if rows:
        mv, rhs = (lambda v: v @ a), b.mT.contiguous()
    else:
        mv, rhs = (lambda v: a @ v), b.clone()
    ref = block_cg(mv, rhs.clone(), d, tol=1e-10, max_iters=500, record_lanczos=True, rows=rows)
    given = rhs.clone()
    out = block_cg(mv, given, d, tol=1e-10, max_iters=500, record_lanczos=True, rows=rows, overwrite_rhs=True)
    assert torch.equal(out.solution, ref.solution) and torch.equal(out.alphas, ref.alphas)
    # the recursive residual: small, and the true one up to round-off
    assert float(given.norm()) < 1e-8 * float(rhs.norm())
    assert float((given - (rhs - mv(out.solution))).norm()) < 1e-12 * float(rhs.norm())
    strided = torch.cat([rhs, rhs], dim=-1)[..., ::2] if not rows else torch.cat([rhs, rhs], dim=0)[::2]
    before = strided.clone()
    block_cg(mv, strided, d, tol=1e-10, max_iters=500, rows=rows, overwrite_rhs=True)
    assert torch.equal(strided, before)


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("diagonal", [True, False])
def test_block_cg_rows_layout_equals_columns(batch, diagonal):
    """rows=True on the transposed block runs the same iterations as the column layout."""
    dtype = torch.float64
    a = _spd(60, dtype, cond=10.0, batch=batch)
    b = torch.randn(*batch, 60, 4, dtype=dtype, generator=torch.Generator().manual_seed(6))
    d = 1.0 / torch.diagonal(a, dim1=-2, dim2=-1)
    pre_c = d if diagonal else (lambda r: d.unsqueeze(-1) * r)
    pre_r = d if diagonal else (lambda r: d.unsqueeze(-2) * r)
    cols = block_cg(lambda v: a @ v, b, pre_c, tol=1e-9, max_iters=500, record_lanczos=True)
    rows = block_cg(lambda v: v @ a.mT, b.mT.contiguous(), pre_r, tol=1e-9, max_iters=500, record_lanczos=True, rows=True)
    assert 5 < cols.iterations < 40
    # the products sum in another order: a column at the tolerance may take one step more
    assert abs(rows.iterations - cols.iterations) <= 1
    assert int((rows.column_iterations - cols.column_iterations).abs().max()) <= 1
    assert torch.allclose(rows.solution.mT, cols.solution, rtol=1e-8, atol=1e-10)
    assert torch.allclose(rows.alphas[:10], cols.alphas[:10], rtol=1e-9, atol=0)
    assert float(rows.residual.max()) <= 1e-9
    with pytest.raises(ValueError, match=r"rhs without its row dimension"):
        block_cg(lambda v: v @ a.mT, b.mT.contiguous(), d[..., :3], rows=True)


def _cg_problem(n, t, dtype, seed):
    """A diagonal-plus-low-rank SPD operator (cheap for large n) and a badly scaled diagonal
    that Jacobi preconditioning fixes."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 4, generator=g, dtype=torch.float64) / math.sqrt(n)
    diag = torch.logspace(-1, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    b = torch.randn(n, t, generator=g, dtype=torch.float64)
    return u, diag, b


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,t", [(1, 1), (7, 3), (1000, 17), (100_003, 5), (4099, 300), (20_000, 1)])
@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("rows", [False, True])
def test_block_cg_fused_iteration_matches_torch_path_and_dense(dtype, n, t, precondition, rows, monkeypatch):
    """The fused CUDA iteration (kronegp._cuda.cg) against the same algebra in torch (FUSED
    off) and against the exact solution, on a side stream; NaN-poisoned caching allocator
    blocks must not leak into the result."""
    import kronegp.solvers.cg as cg_mod

    u64, d64, b64 = _cg_problem(n, t, dtype, seed=n + t)
    dev = torch.device("cuda")
    u, diag, b = (v.to(dev, dtype) for v in (u64, d64, b64))
    u64, d64, b64 = (v.to(dev) for v in (u64, d64, b64))
    torch.empty(4 * n * t + 4096, dtype=dtype, device=dev).fill_(float("nan"))  # poison freed memory

    def matvec(v):
        if rows:
            return diag * v + (v @ u) @ u.mT
        return diag.unsqueeze(-1) * v + u @ (u.mT @ v)

    tol = 1e-5 if dtype == torch.float32 else 1e-10
    pre = (1.0 / diag) if precondition else None
    rhs = b.mT.contiguous() if rows else b
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fused = block_cg(matvec, rhs, pre, tol=tol, max_iters=3000, record_lanczos=True, rows=rows)
        monkeypatch.setattr(cg_mod, "FUSED", False)
        plain = block_cg(matvec, rhs, pre, tol=tol, max_iters=3000, record_lanczos=True, rows=rows)
    torch.cuda.synchronize()
    assert fused.solution.is_contiguous()
    if rows:
        fused.solution, plain.solution = fused.solution.mT, plain.solution.mT
    assert fused.converged and plain.converged
    assert fused.solution.dtype == dtype
    assert abs(fused.iterations - plain.iterations) <= max(2, plain.iterations // 10)
    # exact solution of (diag + u uᵀ) x = b by Woodbury, in float64
    dinv_b = b64 / d64.unsqueeze(-1)
    dinv_u = u64 / d64.unsqueeze(-1)
    cap = torch.eye(4, dtype=torch.float64, device=dev) + u64.mT @ dinv_u
    exact = dinv_b - dinv_u @ torch.linalg.solve(cap, u64.mT @ dinv_b)
    bound = 2e-3 if dtype == torch.float32 else 1e-7
    assert _rel(fused.solution.double(), exact) < bound
    assert _rel(plain.solution.double(), exact) < bound
    assert float(fused.residual.max()) <= tol
    k = min(fused.iterations, plain.iterations, 3)
    coef_tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert torch.allclose(fused.alphas[:k], plain.alphas[:k], rtol=coef_tol, atol=0)
    # β of the last iteration is the ratio of two round-off-sized residuals: not compared
    kb = min(k, fused.iterations - 1, plain.iterations - 1)
    assert torch.allclose(fused.betas[:kb], plain.betas[:kb], rtol=coef_tol, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [False, True])
def test_block_cg_fused_state_zero_column_min_iters_and_long_record(dtype, rows, monkeypatch):
    """The device-side bookkeeping of the fused iteration (coefficients, per-column iteration
    counts, residuals, the min_iters rule, a zero right-hand side) against the torch path, on a
    solve longer than the first Lanczos record buffer (64 rows), so that the buffer grows."""
    import kronegp.solvers.cg as cg_mod

    n, t = 3001, 4
    dev = torch.device("cuda")
    a = _spd(60, torch.float64, cond=1e3, seed=3)
    g = torch.Generator().manual_seed(7)
    # block-diagonal operator: the 60×60 SPD matrix on the first rows, a spread diagonal after
    diag = torch.logspace(0, 3, n - 60, dtype=torch.float64)[torch.randperm(n - 60, generator=g)]
    b = torch.randn(n, t, generator=g, dtype=torch.float64)
    b[:, 1] = 0
    b[100:103, 1] = 1.0  # a Krylov space of dimension 3: converged before min_iters
    b[:, 2] = 0  # a zero column: solved by 0, never iterated, residual 0
    a, diag, b = a.to(dev, dtype), diag.to(dev, dtype), b.to(dev, dtype)

    def matvec(v):
        if rows:
            return torch.cat([v[:, :60] @ a, diag * v[:, 60:]], 1)
        return torch.cat([a @ v[:60], diag.unsqueeze(-1) * v[60:]], 0)

    rhs = b.mT.contiguous() if rows else b
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    kw = dict(tol=tol, max_iters=600, min_iters=5, record_lanczos=True, rows=rows)
    torch.empty(8 * n * t, dtype=dtype, device=dev).fill_(float("nan"))  # poison freed memory
    fused = block_cg(matvec, rhs, **kw)
    monkeypatch.setattr(cg_mod, "FUSED", False)
    plain = block_cg(matvec, rhs, **kw)
    assert fused.iterations > 64 and plain.iterations > 64  # the record buffer grew
    assert fused.converged and plain.converged
    assert abs(fused.iterations - plain.iterations) <= max(2, plain.iterations // 10)
    its = fused.column_iterations
    assert its.dtype == torch.long and its.is_cuda
    assert int(its[2]) == 0 and float(fused.residual[2]) == 0.0
    assert int(its[1]) == int(plain.column_iterations[1]) == 5  # min_iters, then frozen
    assert int((its - plain.column_iterations).abs().max()) <= max(2, plain.iterations // 10)
    sol = fused.solution.mT if rows else fused.solution
    assert torch.isfinite(sol).all() and float(sol[:, 2].abs().max()) == 0.0
    assert fused.alphas.shape == (fused.iterations, t) and fused.betas.shape == (fused.iterations, t)
    assert torch.isfinite(fused.alphas).all() and torch.isfinite(fused.betas).all()
    k = min(fused.iterations, plain.iterations, 3)
    coef_tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert torch.allclose(fused.alphas[:k], plain.alphas[:k], rtol=coef_tol, atol=0)
    assert torch.allclose(fused.betas[: k - 1], plain.betas[: k - 1], rtol=coef_tol, atol=0)
    # a column's coefficients are zero once it stopped (and always for the zero column)
    for c in range(t):
        assert float(fused.alphas[int(its[c]) :, c].abs().sum()) == 0.0
    assert float(fused.residual.max()) <= tol
    assert _rel(fused.solution.double(), plain.solution.double()) < (1e-3 if dtype == torch.float32 else 1e-7)


def test_tridiagonal_bands_numpy_and_torch_agree():
    """The host quadrature's NumPy bands equal the torch ones, including a column cut short by
    an exact solution (α = 0) and columns of different lengths."""
    import numpy as np

    from kronegp.solvers import tridiagonal_bands

    g = torch.Generator().manual_seed(0)
    alphas = torch.rand(9, 16, dtype=torch.float64, generator=g) + 0.1
    betas = torch.rand(9, 16, dtype=torch.float64, generator=g)
    alphas[5, 3] = 0.0
    steps = torch.randint(1, 10, (16,), generator=g)
    got = tridiagonal_bands(alphas.numpy(), betas.numpy(), steps.numpy())
    want = tridiagonal_bands(alphas, betas, steps)
    assert all(isinstance(x, np.ndarray) for x in got)
    assert got[2][3] == min(5, int(steps[3]))
    for x, y in zip(got, want):
        assert x.shape == tuple(y.shape)
        np.testing.assert_allclose(x, y.numpy(), rtol=1e-15, atol=0)


# ---------------------------------------------------------------- fixed CG schedules (CUDA graphs)


def _nested_solves(a, b, rhs, schedule):
    """CG on ``A + B⁻¹`` whose operator solves with ``B`` by CG (nested runs, like the
    missing-cell path with per-cell noise)."""
    from kronegp.solvers import cg_schedule

    with cg_schedule(schedule):
        inner = lambda v: block_cg(lambda w: b @ w, v, tol=1e-12, max_iters=200).solution  # noqa: E731
        return block_cg(lambda v: a @ v + inner(v), rhs, tol=1e-10, max_iters=200, record_lanczos=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_schedule_runs_the_recorded_counts_and_matches(device, dtype):
    """A recorded schedule lists each run's iterations in the order the runs start; a fixed one
    with extra iterations returns the same solutions, Lanczos coefficients of the needed
    iterations (zero after) and per-run checks, without knowing on the host that it converged."""
    from kronegp.solvers import CGSchedule, cg_schedule

    a = _spd(30, dtype, cond=50.0, seed=1).to(device)
    rhs = torch.randn(30, 4, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(device)
    rec = CGSchedule.record()
    with cg_schedule(rec):
        ref = block_cg(lambda v: a @ v, rhs, tol=1e-6, max_iters=100, record_lanczos=True)
        ref2 = block_cg(lambda v: a @ v, rhs[:, :1], tol=1e-3, max_iters=100)
    assert rec.counts == [ref.iterations, ref2.iterations] and ref.iterations > ref2.iterations > 0
    fixed = CGSchedule.fixed([c + 3 for c in rec.counts])
    with cg_schedule(fixed):
        out = block_cg(lambda v: a @ v, rhs, tol=1e-6, max_iters=100, record_lanczos=True)
        out2 = block_cg(lambda v: a @ v, rhs[:, :1], tol=1e-3, max_iters=100)
    assert out.converged is None and out.iterations == ref.iterations + 3
    assert int(out.iterations_needed) == ref.iterations
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel(out.solution, ref.solution) < tol and _rel(out2.solution, ref2.solution) < tol
    k = ref.iterations
    assert _rel(out.alphas[:k], ref.alphas) < tol and _rel(out.betas[:k], ref.betas) < tol
    assert bool((out.alphas[k:] == 0).all())  # frozen columns record α = 0
    checks = fixed.check()
    assert [c[0] for c in checks] == rec.counts and all(c[1] for c in checks)
    assert checks[0][2] == pytest.approx(float(ref.residual.max()), rel=1e-3)
    # too few iterations: the check says so
    short = CGSchedule.fixed([2, 1])
    with cg_schedule(short):
        block_cg(lambda v: a @ v, rhs, tol=1e-6, max_iters=100)
        block_cg(lambda v: a @ v, rhs[:, :1], tol=1e-3, max_iters=100)
    assert [c[1] for c in short.check()] == [False, False]
    # a run more than recorded is an error, naming the counts
    with cg_schedule(CGSchedule.fixed([3])), pytest.raises(RuntimeError, match="run 2 of a schedule of 1"):
        block_cg(lambda v: a @ v, rhs, max_iters=100)
        block_cg(lambda v: a @ v, rhs, max_iters=100)


def test_recorded_schedule_orders_nested_runs_by_start():
    from kronegp.solvers import CGSchedule

    a = _spd(20, torch.float64, cond=10.0, seed=3)
    b = _spd(20, torch.float64, cond=1000.0, seed=4)
    rhs = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rec = CGSchedule.record()
    outer = _nested_solves(a, b, rhs, rec)
    # the outer run starts first (it ends last); then one inner run per outer iteration
    assert rec.counts[0] == outer.iterations and len(rec.counts) == 1 + outer.iterations
    assert all(c > 1 for c in rec.counts[1:]) and outer.converged
    fixed = CGSchedule.fixed(rec.counts)
    again = _nested_solves(a, b, rhs, fixed)
    assert _rel(again.solution, outer.solution) < 1e-12
    assert [c[0] for c in fixed.check()] == rec.counts


def test_a_fixed_schedule_follows_the_recorded_plans_and_checks_device_values():
    """Host decisions besides the iteration counts (kronegp.models._masked.refine_observed's rounds):
    noted while recording, handed back in order by a fixed schedule, and its checks read with the
    runs' (tol, met, value), after them."""
    from kronegp.solvers import CGSchedule

    rec = CGSchedule.record()
    rec.note_plan("rounds", [1e-6, 1e-7])
    with pytest.raises(RuntimeError, match="no plans to follow"):
        rec.next_plan("rounds")
    with pytest.raises(RuntimeError, match="only a fixed schedule"):
        rec.add_check(torch.tensor(1.0), 1.0, final=False, warn=lambda value, stacklevel: None)
    fixed = CGSchedule.fixed([], rec.plans)
    with pytest.raises(RuntimeError, match="plan 1 asked for 'other'.*noted 'rounds'"):
        fixed.next_plan("other")
    assert fixed.next_plan("rounds") == [1e-6, 1e-7]
    with pytest.raises(RuntimeError, match="plan 2 asked for 'rounds'.*noted none"):
        fixed.next_plan("rounds")
    with pytest.raises(RuntimeError, match="fixed schedule follows plans"):
        fixed.note_plan("rounds", [])
    fixed.add_check(torch.tensor(3e-5, dtype=torch.float64), 1e-5, final=False, warn=lambda value, stacklevel: None)
    fixed.add_check(torch.tensor(2e-6, dtype=torch.float32), 1e-5, final=True, warn=lambda value, stacklevel: None)
    checks = fixed.check()
    assert [c[:2] for c in checks] == [(1e-5, False), (1e-5, True)]
    assert checks[0][2] == pytest.approx(3e-5, rel=1e-12) and checks[1][2] == pytest.approx(2e-6, rel=1e-6)
    assert [c.final for c in fixed.checks] == [False, True]


def test_block_cg_takes_a_device_tolerance_in_a_fixed_run():
    """A fixed run may stop its columns at a tolerance held on the device (0-dim tensor, not read):
    the same solution as the number; anywhere else a tensor tolerance is an error."""
    from kronegp.solvers import CGSchedule, cg_schedule

    a = _spd(30, torch.float64, cond=50.0, seed=1)
    rhs = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = block_cg(lambda v: a @ v, rhs, tol=1e-7, max_iters=100, x0=x0)
    with cg_schedule(CGSchedule.fixed([ref.iterations + 2])):
        out = block_cg(lambda v: a @ v, rhs, tol=torch.tensor(1e-7, dtype=torch.float64), max_iters=100, x0=x0)
    assert int(out.iterations_needed) == ref.iterations and _rel(out.solution, ref.solution) < 1e-13
    with pytest.raises(ValueError, match="tol may be a tensor only.*no schedule"):
        block_cg(lambda v: a @ v, rhs, tol=torch.tensor(1e-7))
    with cg_schedule(CGSchedule.record()), pytest.raises(ValueError, match="tol may be a tensor only.*recording"):
        block_cg(lambda v: a @ v, rhs, tol=torch.tensor(1e-7))
    with cg_schedule(CGSchedule.fixed([3])), pytest.raises(ValueError, match="0-dim one.*shape \\(1,\\)"):
        block_cg(lambda v: a @ v, rhs, tol=torch.tensor([1e-7]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slq_on_device_matches_host_quadrature(device, dtype):
    """The on-device quadrature (padded tridiagonals, batched eigh: LAPACK on the CPU, the
    Jacobi kernel on CUDA) equals the host's banded LAPACK one, with columns of different
    lengths (one converged at the first iteration, one exactly zero)."""
    from kronegp.solvers import CGSchedule, cg_schedule
    from kronegp.solvers.lanczos import slq_logdet_on_device

    a = _spd(60, torch.float64, cond=300.0, seed=6)
    rhs = torch.randn(60, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rhs[:, 4] = 0
    rhs[:, 5] = torch.linalg.eigh(a)[1][:, 3]  # an eigenvector: CG ends after one step
    a, rhs = a.to(device, dtype), rhs.to(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    res = block_cg(lambda v: a @ v, rhs, tol=tol, max_iters=200, record_lanczos=True)
    host = float(slq_logdet_correction(res, columns=slice(1, None)))
    for pad in (1, 16, 64):
        dev = slq_logdet_on_device(res, columns=slice(1, None), pad_to=pad)
        assert dev.device == rhs.device and dev.dtype == dtype
        assert float(dev) == pytest.approx(host, rel=1e-5 if dtype == torch.float32 else 1e-11)
    # a fixed-schedule run takes this path by itself
    with cg_schedule(CGSchedule.fixed([res.iterations + 2])):
        fixed = block_cg(lambda v: a @ v, rhs, tol=tol, max_iters=200, record_lanczos=True)
    assert float(slq_logdet_correction(fixed, columns=slice(1, None))) == pytest.approx(
        host, rel=1e-5 if dtype == torch.float32 else 1e-11)
    with pytest.raises(ValueError, match="contiguous range"):
        slq_logdet_on_device(res, columns=[1, 3])
