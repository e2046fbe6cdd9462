"""float32 solves on the observed cells by mixed-precision iterative refinement
(kronegp.models._masked.refine_observed): the residual b − C x in float64, the corrections solved
in float32. Before it, a float32 model's observed residual stalled at 1e-4–7e-2 (the float32
application of C⁻¹ and product C x), and its posterior mean was off by as much."""

import warnings

import numpy as np
import pytest
import torch

import kronegp.models._masked as masked
from _helpers import dense_kron
from kronegp import GridGP


def _field(n, seed=0):
    """A smooth field plus noise on an n³ grid, half the cells missing (NaN) at random."""
    g = np.random.default_rng(seed)
    axes = [np.linspace(0, 1, n)] * 3
    x = np.stack(np.meshgrid(*axes, indexing="ij"))
    v = np.sin(6 * x[0]) * np.cos(5 * x[1]) + np.sin(4 * x[2]) + 0.1 * g.standard_normal((n, n, n))
    v[g.random(v.shape) < 0.5] = np.nan
    return v, axes


def _model(dtype, *, n=16, lengthscale=0.5, noise=1e-3, **kw):
    v, axes = _field(n)
    m = GridGP(v, axes, dtype=dtype, path="cg", seed=0, **kw)
    # noise 1e-3 of the signal variance, long lengthscales: cond(C_OO)·eps32 ~ 1e-2, where the
    # float32 solve stalled at a relative residual of 7e-2
    m.set_hyperparameters(outputscale=1.0, noise=noise, lengthscales=[lengthscale] * 3, mean=0.0)
    return m


def _dense(cov, observed):
    """``(C_OO, K)`` in float64 from the covariance's own (float32) factors, widened exactly."""
    k = float(cov.outputscale) * dense_kron([f.double() for f in cov.factors])
    o = observed
    return k[o][:, o] + torch.diag(cov.fill_noise.double()[o]), k


def test_float32_observed_solve_reaches_tol_and_the_mean_a_dense_solve():
    m = _model(torch.float32)
    o = m.observed
    with torch.no_grad():
        cov = m.inference.covariance(m, m._factors())
        c_oo, k = _dense(cov, o)
        rhs = (o * (m.y - m._mean_grid())).unsqueeze(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # it reaches tol: no warning
            ref = masked.refine_observed(cov, rhs, o, None, tol=1e-5, max_iters=1000)
    b = rhs[o, 0].double()
    x = ref.solution[:, 0].double()
    assert float((x[~o]).abs().max()) == 0  # zero-filled at the missing cells
    assert ref.reached <= 1e-5  # the refined (float64) x's residual: 7.4e-2 with float32 residuals
    # the float32 x returned is that x rounded: its residual is what rounding the exact solution
    # to float32 leaves (here ~5e-5 = cond·eps32-ish), no more
    alpha = torch.linalg.solve(c_oo, b)
    dense_res = float((c_oo @ x[o] - b).norm() / b.norm())
    rounded = float((c_oo @ alpha.float().double() - b).norm() / b.norm())
    assert dense_res <= 2 * rounded + 1e-5, (dense_res, rounded)
    assert float((x[o] - alpha).norm() / alpha.norm()) < 1e-5
    # the posterior mean (data units) against a dense float64 solve with the same factors
    dense_mean = m.shift + m.scale * (m._mean_grid().detach().double() + k[:, o] @ alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, _ = m.predict(variance="mc")
    err = float((mean.reshape(-1).double() - dense_mean).norm() / dense_mean.norm())
    # 7.5e-2 before; now the float32 product K α itself limits it: ‖α‖ = 2900 against ‖K α‖ = 64
    # (noise 1e-3), so its rounding leaves 1.2e-4 even with the exact α rounded to float32
    assert err < 5e-4, err


def test_float32_likelihood_data_column_reaches_tol():
    """The training likelihood's data column goes through the same refinement (its observed
    residual, ``last_solve.observed_residual``, was 7e-2 here) and its value matches float64's."""
    m32, m64 = _model(torch.float32), _model(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lml32 = float(m32.log_marginal_likelihood().detach())
    lml64 = float(m64.log_marginal_likelihood().detach())
    assert m32.last_solve.observed_residual <= m32.cg_tol
    assert lml32 == pytest.approx(lml64, rel=1e-3)  # both stochastic (SLQ, same seed): their error


def test_refinement_that_cannot_converge_warns_with_numbers():
    """cond(C_OO)·eps32 > 1 (noise 1e-6 of the signal variance, lengthscale as long as the grid):
    the rounds cannot gain; the warning gives the residual of each round and the condition."""
    m = _model(torch.float32, n=12, lengthscale=1.0, noise=1e-6)
    with torch.no_grad():
        cov = m.inference.covariance(m, m._factors())
        rhs = (m.observed * (m.y - m._mean_grid())).unsqueeze(-1)
        with pytest.warns(RuntimeWarning, match=r"relative residual of (\S+), not tol=1e-05 \(torch.float32 solves, "
                                                r"residuals in float64: \S+ → \S+ in [1-9] rounds?\); mixed-precision "
                                                r"refinement converges only where cond\(C_OO\)·eps < 1") as rec:
            ref = masked.refine_observed(cov, rhs, m.observed, None, tol=1e-5, max_iters=1000)
    assert ref.reached > 1e-5 and f"{ref.reached:.1e}" in str(rec[0].message)


def test_float64_keeps_its_own_refinement(monkeypatch):
    """float64 refines by solving G again (no mixed rounds, none needed)."""
    calls = []
    monkeypatch.setattr(masked._MixedRounds, "eager", lambda self, x: calls.append(x))
    m = _model(torch.float64)
    with torch.no_grad():
        cov = m.inference.covariance(m, m._factors())
        rhs = (m.observed * (m.y - m._mean_grid())).unsqueeze(-1)
        ref = masked.refine_observed(cov, rhs, m.observed, None, tol=1e-5, max_iters=1000)
    assert not calls and ref.reached <= 1e-5


def test_mixed_rounds_run_only_where_their_float64_vectors_fit(monkeypatch):
    """The rounds' float64 vectors are not in the memory plan: on a CUDA device they run only when
    CG_REFINE_MIXED float64 grid vectors per column fit the free memory (at 896³ they would add
    ~30 GiB to a 61 GiB plan on an 80 GiB card)."""
    from types import SimpleNamespace

    from kronegp.models import _masked, memory

    rhs = SimpleNamespace(device=torch.device("cuda", 0), numel=lambda: 1000)
    need = memory.CG_REFINE_MIXED * 1000 * 8
    monkeypatch.setattr(memory, "free_memory", lambda device: int(need / memory.HEADROOM) + 8)
    assert _masked._mixed_fits(rhs)
    monkeypatch.setattr(memory, "free_memory", lambda device: need)
    assert not _masked._mixed_fits(rhs)
    assert _masked._mixed_fits(torch.zeros(1000, 1))  # the CPU: no limit planned for


def _cell_noise_model(dtype, *, n=16, lengthscale=0.5, spread=4.0, level=0.01, seed=0):
    """A full n³ grid with per-cell noise over ``10**spread`` around ``level`` (gaps.py's cell-noise)."""
    g = np.random.default_rng(seed)
    axes = [np.linspace(0, 1, n)] * 3
    x = np.stack(np.meshgrid(*axes, indexing="ij"))
    noise = level * 10 ** (spread * g.random((n, n, n)) - spread / 2)
    v = np.sin(6 * x[0]) * np.cos(5 * x[1]) + np.sin(4 * x[2]) + np.sqrt(noise) * g.standard_normal(x[0].shape)
    m = GridGP(v, axes, noise=torch.tensor(noise), dtype=dtype, path="cg", seed=0)
    m.set_hyperparameters(outputscale=1.0, lengthscales=[lengthscale] * 3, mean=0.0)
    return m


def _full_grid_system(m):
    cov = m.inference.covariance(m, m._factors())
    rhs = (m.y - m._mean_grid()).reshape(-1, 1)
    c = float(cov.outputscale) * dense_kron([f.double() for f in cov.factors]) + torch.diag(cov.fill_noise.double())
    return cov, rhs, c


def test_float32_per_cell_noise_solve_is_checked_by_its_true_residual():
    """Per-cell noise on a full grid, float32: CG's recursive residual meets tol while the true one is 8× it
    (cond(C) ~ 1e7); refine_full measures it in float64 and refines, and the solution then matches a dense
    float64 solve of the same (float32) C to 1e-6, where CG's own answer was 3e-5 off."""
    m = _cell_noise_model(torch.float32)
    with torch.no_grad():
        cov, rhs, c = _full_grid_system(m)
        exact = torch.linalg.solve(c, rhs.double())
        x0 = cov.solve(rhs, tol=1e-5)
        true0 = float((c @ x0.double() - rhs.double()).norm() / rhs.double().norm())
        assert true0 > 2e-5  # the case this guards: CG said 1e-5
        ref = masked.refine_full(cov, rhs, x0, tol=1e-5)
        assert ref.reached <= 1e-5 and ref.rounds >= 1
        assert float((c @ ref.solution.double() - rhs.double()).norm() / rhs.double().norm()) <= 1e-5
        assert float((ref.solution.double() - exact).norm() / exact.norm()) <= 1e-6
        # predictions go through the same check (solve_observed with every cell observed)
        x, _ = masked.solve_observed(cov, rhs, None, tol=1e-5, max_iters=1000)
        assert float((x.double() - exact).norm() / exact.norm()) <= 1e-6


def test_float32_per_cell_noise_likelihood_reports_its_true_residual():
    """The likelihood's data column goes through refine_full: ``last_solve.observed_residual`` is the true
    residual (≤ tol, no warning) and ``lml_error`` its first-order data-term error."""
    m = _cell_noise_model(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            m.log_marginal_likelihood()
    info = m.last_solve
    assert info.observed_residual is not None and info.observed_residual <= m.cg_tol
    assert info.lml_error is not None and 0 <= info.lml_error < 1e-2


def test_per_cell_noise_refinement_that_cannot_converge_warns():
    """cond(C)·eps32 ≫ 1 (cond 1.5e13: noise down to 1e-10 of the signal, lengthscale 4× the grid): float32 CG
    said it converged where the true residual is ~1e2; the rounds cannot gain and the warning gives each round's
    residual (before refine_full the likelihood used that solution silently)."""
    m = _cell_noise_model(torch.float32, n=12, lengthscale=4.0, spread=4.0, level=1e-8)
    with torch.no_grad():
        cov, rhs, _ = _full_grid_system(m)
        x0 = cov.solve(rhs, tol=1e-5)
        with pytest.warns(RuntimeWarning, match=r"relative residual of (\S+), not tol=1e-05 \(torch.float32 solves, "
                                                r"residuals in float64: \S+( → \S+)* in \d+ rounds?\)") as rec:
            ref = masked.refine_full(cov, rhs, x0, tol=1e-5)
    assert ref.reached > 1e-5 and f"{ref.reached:.1e}" in str(rec[0].message)


def test_per_cell_noise_refinement_under_a_cg_schedule_matches_the_eager_step():
    """A CUDA graph's step (CGSchedule, here on the CPU): the recording notes the rounds, the fixed pass
    makes as many without reading the device and leaves the residual to the schedule's checks; all three
    likelihoods agree (same probes)."""
    from kronegp.solvers import CGSchedule, cg_schedule

    m = _cell_noise_model(torch.float32, n=12)
    with torch.no_grad():
        a = float(m.log_marginal_likelihood())
        rec = CGSchedule.record()
        with cg_schedule(rec):
            b = float(m.log_marginal_likelihood())
        made = [plan for key, plan in rec.plans if key == "refine_full"]
        assert len(made) == 1 and made[0][0] >= 1 and made[0][1] is False
        fixed = CGSchedule.fixed(rec.counts, rec.plans)
        with cg_schedule(fixed):
            c = m.log_marginal_likelihood()
        assert isinstance(m._last_extra["observed_residual"], torch.Tensor)  # not read under the schedule
        assert all(ok for _, ok, _ in fixed.check())
    assert abs(a - b) <= 1e-6 * abs(a) and abs(a - float(c)) <= 1e-6 * abs(a)
