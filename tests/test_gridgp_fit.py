"""GridGP fits: hyperparameter recovery on data from a known GP, calibrated held-out
intervals on a masked grid, and the GPU variants (marker ``cuda``)."""

import math

import gpytorch
import pytest
import torch

from kronegp.models import GridGP
from kronegp.models._kron import KronEigen


def gp_draw(shape, lengthscales, outputscale, noise, seed=0, dtype=torch.float64):
    """A draw of f ~ GP(0, s² Π Matérn-5/2) on an integer grid plus N(0, noise) noise."""
    g = torch.Generator().manual_seed(seed)
    factors = []
    for n, ls in zip(shape, lengthscales):
        k = gpytorch.kernels.MaternKernel(nu=2.5).double()
        k.lengthscale = ls
        x = torch.arange(n, dtype=torch.float64)[:, None]
        factors.append(k(x, x).to_dense().detach())
    eig = KronEigen(factors)
    xi = torch.randn(math.prod(shape), 1, generator=g, dtype=torch.float64)
    f = eig.apply_function((outputscale * eig.eigvals()).sqrt(), xi).reshape(shape)
    y = f + math.sqrt(noise) * torch.randn(shape, generator=g, dtype=torch.float64)
    return f.to(dtype), y.to(dtype)


def test_fit_recovers_lengthscales_and_noise():
    true_ls, true_s2, true_noise = (3.0, 6.0, 2.0), 2.0, 0.05
    _, y = gp_draw((30, 28, 24), true_ls, true_s2, true_noise, seed=3)
    model = GridGP(y)
    model.fit(iters=20, optimizer="lbfgs", progress=False)
    hp = model.hyperparameters()
    for est, true in zip(hp["lengthscales"], true_ls):
        assert abs(est - true) / true < 0.15, (hp["lengthscales"], true_ls)
    assert abs(hp["noise"] - true_noise) / true_noise < 0.1, hp["noise"]
    # The output scale of one draw is poorly determined at these lengthscales: a factor 2.
    assert true_s2 / 2 < hp["outputscale"] < true_s2 * 2


@pytest.mark.slow
def test_masked_heldout_intervals_are_calibrated():
    shape = (24, 22, 12)
    f, y = gp_draw(shape, (4.0, 3.0, 2.0), 1.0, 0.04, seed=5)
    g = torch.Generator().manual_seed(6)
    held = torch.rand(shape, generator=g) < 0.2
    y_obs = y.clone()
    y_obs[held] = float("nan")
    model = GridGP(y_obs)
    assert model.path == "cg"  # 1267 missing cells: more than the exact-missing path takes on a CPU
    model.fit(iters=8, optimizer="lbfgs", progress=False)
    pts = torch.stack([a.reshape(-1) for a in torch.meshgrid(*model.axes, indexing="ij")], -1)[held.reshape(-1)]
    mean, var = model.predict(pts, include_noise=True)
    z = (y[held] - mean) / var.sqrt()
    coverage = float((z.abs() < 1.96).double().mean())
    n = int(held.sum())
    # Binomial standard error at 95 %: √(0.95·0.05/n) ≈ 0.8 % for ~1260 cells; allow 4 of them.
    assert abs(coverage - 0.95) < 4 * math.sqrt(0.95 * 0.05 / n), coverage
    assert 0.8 < float(z.std()) < 1.2


# ----------------------------------------------------------------------------- GPU


def _cuda_problem(kind, dtype):
    _, y = gp_draw((12, 10, 8), (3.0, 4.0, 2.0), 1.0, 0.05, seed=7)
    kw = {}
    if kind in ("mask", "both"):
        y = y.clone()
        y[torch.rand(y.shape, generator=torch.Generator().manual_seed(8)) < 0.2] = float("nan")
    if kind in ("noise", "both"):
        kw["noise"] = 0.02 + 0.05 * torch.rand(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return y.to(dtype), kw


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["exact", "mask", "noise", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_cpu(kind, dtype):
    y, kw = _cuda_problem(kind, dtype)
    # Unit probes on every cell (exact traces): the CPU and the GPU draw random probes from
    # different generators, so only deterministic traces can be compared this tightly.
    kw["exact_trace_limit"] = y.numel()
    cpu = GridGP(y, **{k: v.to(dtype) if torch.is_tensor(v) else v for k, v in kw.items()})
    gpu = GridGP(y.cuda(), **{k: v.to(dtype).cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert gpu.y.is_cuda and gpu.path == cpu.path
    lc, lg = cpu.log_marginal_likelihood(), gpu.log_marginal_likelihood()
    # float32 CG (default tol) is accurate to ~1e-3 relative, the CG path's documented bound;
    # the exact path has no iteration and meets 1e-4.
    bound = (1e-4 if kind == "exact" else 1e-3) if dtype == torch.float32 else 1e-8
    assert abs(float(lc) - float(lg)) / abs(float(lc)) < bound
    lc.backward()
    lg.backward()
    gc = torch.cat([p.grad.reshape(-1) for p in cpu.parameters()])
    gg = torch.cat([p.grad.reshape(-1).cpu() for p in gpu.parameters()])
    assert float((gc - gg).norm() / gc.norm()) < (1e-3 if dtype == torch.float32 else 1e-7)
    pts = torch.rand(30, 3, dtype=dtype) * 15
    mc, vc = cpu.predict(pts)
    mg, vg = gpu.predict(pts.cuda())
    assert float((mc - mg.cpu()).norm() / mc.norm()) < (1e-3 if dtype == torch.float32 else 1e-7)
    # A posterior variance is prior − reduction: its rounding error scales with the prior
    # variance, not with the (possibly tiny) difference, so compare against the largest.
    scale = vc.abs().max()
    assert float(((vc - vg.cpu()).abs() / scale).max()) < (1e-3 if dtype == torch.float32 else 1e-7)
    s = gpu.sample(3)
    assert s.is_cuda and s.shape == (3, *y.shape)


@pytest.mark.cuda
def test_gpu_to_moves_model_and_fit_runs():
    y, _ = _cuda_problem("mask", torch.float32)
    model = GridGP(y).to("cuda")
    assert model.y.is_cuda and model.raw_outputscale.is_cuda
    hist = model.fit(iters=5, optimizer="adam", progress=False)
    assert hist[-1] < hist[0]
    mean, var = model.predict()
    assert mean.is_cuda and torch.isfinite(var).all()
