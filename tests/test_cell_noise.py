"""Per-cell noise on the cg path: the two-level preconditioner of :mod:`kronegp.models._cell_noise`
against a dense solve, and the iterations it saves (float64, CPU)."""

import pytest
import torch

import kronegp.models._cell_noise as cell_noise
from _helpers import dense_kron
from kronegp.models._masked import FullGridCovariance
from kronegp.solvers import block_cg


def _factors(shape, lengthscale=0.2):
    out = []
    for n in shape:
        x = torch.linspace(0, 1, n, dtype=torch.float64)
        d = (x[:, None] - x[None, :]).abs() / lengthscale
        out.append((1 + 5**0.5 * d + 5 / 3 * d * d) * torch.exp(-(5**0.5) * d))  # Matérn-5/2
    return out


def _covariance(shape=(9, 10, 11), spread=4.0, seed=0, lengthscale=0.2):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    noise = 0.01 * 10 ** (spread * torch.rand(n, generator=g, dtype=torch.float64) - spread / 2)
    cov = FullGridCovariance(_factors(shape, lengthscale), torch.tensor(1.3, dtype=torch.float64), noise, homoskedastic=False,
                             tol=1e-11, max_iters=5000)
    dense = 1.3 * dense_kron(cov.factors) + torch.diag(noise)
    return cov, dense


def test_two_level_preconditioner_is_symmetric_positive_definite():
    cov, _ = _covariance((5, 6, 7))
    n = cov.lam.numel()
    m = cell_noise.two_level_preconditioner(cov.eig, cov.lam, cov.fill_noise, cov.sigma_bar2, rows=False)
    M = m(torch.eye(n, dtype=torch.float64))
    assert float((M - M.mT).abs().max()) <= 1e-12 * float(M.abs().max())
    assert float(torch.linalg.eigvalsh(M).min()) > 0
    rows = cell_noise.two_level_preconditioner(cov.eig, cov.lam, cov.fill_noise, cov.sigma_bar2, rows=True)
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert float((rows(x.mT.contiguous()).mT - m(x)).norm() / m(x).norm()) <= 1e-12


def test_two_level_preconditioner_is_the_kronecker_one_for_one_noise_level():
    cov, _ = _covariance((5, 6, 7), spread=0.0)
    m = cell_noise.two_level_preconditioner(cov.eig, cov.lam, cov.fill_noise, cov.sigma_bar2, rows=True)
    x = torch.randn(4, cov.lam.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert float((m(x) - cov.p_inv * x).norm() / (cov.p_inv * x).norm()) <= 1e-12


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("two_level", [True, False])
def test_solves_with_per_cell_noise_match_a_dense_solve(layout, two_level, monkeypatch):
    monkeypatch.setattr(cell_noise, "SIGNAL_FRACTION", 1.0 if two_level else 0.0)
    cov, dense = _covariance()
    cov.rows = layout == "rows"
    b = torch.randn(dense.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = cov.solve(b)
    ref = torch.linalg.solve(dense, b)
    assert float((x - ref).norm() / ref.norm()) <= 1e-8
    assert cov._two_level is two_level


def test_two_level_preconditioner_cuts_the_iterations(monkeypatch):
    cov, _ = _covariance((20, 20, 20))  # 20 % of the eigenvalues above σ̄²
    b = torch.randn(4, cov.lam.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bt = cov.eig.to_eigbasis_rows(b)

    def iterations(precond):
        return int(block_cg(cov.eig_matvec_rows, bt, precond, tol=1e-6, max_iters=5000, rows=True).iterations_needed)

    plain = iterations(cov.p_inv)
    two_level = cov.solve_precond(rows=True)
    assert two_level is not cov.p_inv  # chosen: the signal's share is under SIGNAL_FRACTION
    two = iterations(two_level)
    # it costs two Kronecker products more per iteration than P alone: it must at least halve them
    assert two <= 0.5 * plain, (two, plain)
    monkeypatch.setattr(cell_noise, "TWO_LEVEL", False)
    cov._two_level = None
    assert cov.solve_precond(rows=True) is cov.p_inv


def test_two_level_preconditioner_is_not_chosen_where_the_signal_fills_the_grid():
    cov, _ = _covariance((12, 13, 14), lengthscale=0.1)  # ~60 % above σ̄²: P alone needs as few
    assert cov.solve_precond(rows=True) is cov.p_inv


@pytest.mark.cuda
def test_two_level_solve_on_the_gpu_matches_a_dense_solve():
    # the callable preconditioner runs block CG's torch iteration there (not the fused diagonal step)
    cov, dense = _covariance((20, 20, 20))
    dev = torch.device("cuda")
    gpu = FullGridCovariance([f.to(dev) for f in cov.factors], torch.tensor(1.3, dtype=torch.float64, device=dev),
                             cov.fill_noise.to(dev), homoskedastic=False, tol=1e-11, max_iters=5000)
    assert gpu.solve_precond(rows=True) is not gpu.p_inv
    b = torch.randn(dense.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.solve(dense, b)
    x = gpu.solve(b.to(dev)).cpu()
    assert float((x - ref).norm() / ref.norm()) <= 1e-8
