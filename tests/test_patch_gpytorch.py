"""patch_gpytorch(): unmodified GPyTorch models give the same loss, gradients and optimiser
trajectory with and without the patch, really run through kronegp while patched, and
linear_operator is left exactly as it was afterwards."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from linear_operator.operators import (
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    KroneckerProductTriangularLinearOperator,
    TriangularLinearOperator,
)

import kronegp
from kronegp import ops
from kronegp.operators import KroneckerOperator
from kronegp.patch import is_patched

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
# loss / gradient agreement; float32 runs the same maths in a different order
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
# KISS-GP solves by CG, whose iterations amplify the round-off of a reordered product
KISS_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}


@pytest.fixture
def kron_calls(monkeypatch):
    counts = {"n": 0}
    real_km, real_mk = ops.kron_matmul, ops.matmul_kron

    def km(*a, **k):
        counts["n"] += 1
        return real_km(*a, **k)

    def mk(*a, **k):
        counts["n"] += 1
        return real_mk(*a, **k)

    monkeypatch.setattr(ops, "kron_matmul", km)
    monkeypatch.setattr(ops, "matmul_kron", mk)
    return counts


# ------------------------------------------------------------------ the patch itself


def test_context_manager_routes_and_undoes():
    original_init = KroneckerProductLinearOperator.__dict__["__init__"]
    a, b = torch.randn(3, 3), torch.randn(2, 2)
    assert type(KroneckerProductLinearOperator(a, b)) is KroneckerProductLinearOperator
    with kronegp.patch_gpytorch() as handle:
        assert handle.active and is_patched()
        op = KroneckerProductLinearOperator(a, b)
        assert type(op) is KroneckerOperator
        assert isinstance(op, KroneckerProductLinearOperator)
        # linear_operator's own module-level name builds ours too (user code spelling)
        import linear_operator.operators as lo_ops

        assert type(lo_ops.KroneckerProductLinearOperator(a, b)) is KroneckerOperator
        # subclasses are constructed untouched, and isinstance checks still hold
        kd = KroneckerProductDiagLinearOperator(DiagLinearOperator(torch.rand(3)), DiagLinearOperator(torch.rand(2)))
        assert type(kd) is KroneckerProductDiagLinearOperator and isinstance(kd, KroneckerProductLinearOperator)
        tri = KroneckerProductTriangularLinearOperator(
            TriangularLinearOperator(torch.tril(torch.rand(3, 3) + 1)),
            TriangularLinearOperator(torch.tril(torch.rand(2, 2) + 1)),
        )
        assert type(tri) is KroneckerProductTriangularLinearOperator
        # an operator built while patched matches the unpatched one numerically
        x = torch.randn(6, 4)
        assert torch.allclose(op @ x, torch.kron(a, b) @ x, rtol=1e-5, atol=1e-6)
    assert not handle.active and not is_patched()
    assert KroneckerProductLinearOperator.__dict__["__init__"] is original_init
    assert type(KroneckerProductLinearOperator(a, b)) is KroneckerProductLinearOperator


def test_plain_call_handle_nesting_and_exceptions():
    original_init = KroneckerProductLinearOperator.__dict__["__init__"]
    a = torch.randn(2, 2)
    outer = kronegp.patch_gpytorch()
    try:
        with kronegp.patch_gpytorch():
            assert type(KroneckerProductLinearOperator(a, a)) is KroneckerOperator
        # the inner patch ended, the outer one is still active
        assert is_patched() and type(KroneckerProductLinearOperator(a, a)) is KroneckerOperator
    finally:
        outer.undo()
    outer.undo()  # idempotent
    assert not is_patched()
    assert KroneckerProductLinearOperator.__dict__["__init__"] is original_init

    with pytest.raises(RuntimeError, match="boom"):
        with kronegp.patch_gpytorch():
            raise RuntimeError("boom")
    assert not is_patched()
    assert type(KroneckerProductLinearOperator(a, a)) is KroneckerProductLinearOperator

    handle = kronegp.patch_gpytorch()
    with handle:  # a plain-call handle also works as a context manager
        assert is_patched()
    assert not is_patched()


# ------------------------------------------------------------------ unmodified GPyTorch models


class GridModel(gpytorch.models.ExactGP):
    def __init__(self, grid, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.GridKernel(gpytorch.kernels.RBFKernel(), grid=grid)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MultitaskModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, num_tasks):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=num_tasks)
        self.covar_module = gpytorch.kernels.MultitaskKernel(
            gpytorch.kernels.MaternKernel(nu=2.5), num_tasks=num_tasks, rank=1
        )

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


class KissModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.GridInterpolationKernel(gpytorch.kernels.RBFKernel(), grid_size=[12, 9], num_dims=2)
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build_model(kind, dtype, device):
    """A small model of each kind with fresh, seeded data (odd grid sizes, P ≠ between axes)."""
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=dtype)
    if kind == "grid":
        grid = [torch.linspace(0, 1, n, **kw) for n in (7, 5, 6)]
        x = gpytorch.utils.grid.create_data_from_grid(grid)
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(len(x), generator=gen, **kw)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = GridModel([g.to(device) for g in grid], x, y, likelihood)
    elif kind == "multitask":
        tasks = 4
        x = torch.rand(30, 1, generator=gen, **kw)
        y = torch.stack([torch.sin(6 * x[:, 0] + k) for k in range(tasks)], -1)
        y = y + 0.1 * torch.randn(30, tasks, generator=gen, **kw)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks, rank=0)
        model = MultitaskModel(x, y, likelihood, tasks)
    else:
        x = torch.rand(60, 2, generator=gen, **kw)
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(60, generator=gen, **kw)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = KissModel(x, y, likelihood)
    model, likelihood = model.to(device=device, dtype=dtype), likelihood.to(device=device, dtype=dtype)
    return model, likelihood, x.to(device), y.to(device)


def train(kind, dtype, device, patched, steps=3):
    """Loss of each step, gradients of the first, parameters after ``steps`` Adam steps."""
    model, likelihood, x, y = build_model(kind, dtype, device)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    losses, first_grads = [], None
    handle = kronegp.patch_gpytorch() if patched else None
    try:
        for step in range(steps):
            optimizer.zero_grad()
            torch.manual_seed(1000 + step)  # the same SLQ probe vectors in both runs
            # max_cholesky_size(0): the Kronecker algebra, not a dense Cholesky, does the work
            with gpytorch.settings.max_cholesky_size(0):
                loss = -mll(model(x), y)
            loss.backward()
            if step == 0:
                first_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            losses.append(loss.detach())
            optimizer.step()
    finally:
        if handle is not None:
            handle.undo()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return torch.stack(losses), first_grads, params


def _close(a, b, tol):
    scale = max(b.abs().max().item(), 1e-3)
    return (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["grid", "multitask", "kiss"])
def test_unmodified_model_same_loss_gradients_and_trajectory(kind, dtype, device, kron_calls):
    losses0, grads0, params0 = train(kind, dtype, device, patched=False)
    assert kron_calls["n"] == 0, "without the patch nothing may go through kronegp"
    losses1, grads1, params1 = train(kind, dtype, device, patched=True)
    assert kron_calls["n"] > 0, "with the patch the Kronecker products must go through kronegp"
    assert not is_patched()

    tol = KISS_TOL[dtype] if kind == "kiss" else TOL[dtype]
    assert _close(losses1, losses0, tol), (losses1, losses0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert _close(grads1[name], grads0[name], tol), name
    for name in params0:
        assert _close(params1[name], params0[name], 10 * tol), name
    # the model learnt something, so the comparison is not between constants
    assert not torch.equal(losses0[0], losses0[-1])


@pytest.mark.parametrize("device", DEVICES)
def test_patched_grid_model_predicts_like_unpatched(device, kron_calls):
    """Evaluation mode (posterior through the Kronecker eigendecomposition) agrees too."""
    outs = []
    for patched in (False, True):
        assert kron_calls["n"] == 0
        model, likelihood, x, y = build_model("grid", torch.float64, device)
        model.eval()
        likelihood.eval()
        handle = kronegp.patch_gpytorch() if patched else None
        try:
            with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), gpytorch.settings.fast_pred_var():
                pred = likelihood(model(x))
                outs.append((pred.mean.clone(), pred.variance.clone()))
        finally:
            if handle is not None:
                handle.undo()
    assert kron_calls["n"] > 0
    assert _close(outs[1][0], outs[0][0], 1e-8)
    assert _close(outs[1][1], outs[0][1], 1e-6)


@pytest.mark.cuda
def test_patched_operators_stay_on_gpu():
    with kronegp.patch_gpytorch():
        a = torch.randn(5, 5, device="cuda")
        op = KroneckerProductLinearOperator(a, a.T.contiguous())
        assert type(op) is KroneckerOperator
        out = op @ torch.randn(25, 3, device="cuda")
    assert out.device.type == "cuda"


class ScaledGridModel(GridModel):
    def __init__(self, grid, x, y, likelihood):
        super().__init__(grid, x, y, likelihood)
        self.covar_module = gpytorch.kernels.ScaleKernel(self.covar_module)


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_grid_kernel_is_exact_under_the_patch(device):
    """``ScaleKernel(GridKernel)``: GPyTorch wraps the Kronecker product in a
    ConstantMulLinearOperator and falls back to CG + stochastic Lanczos (an estimate);
    under the patch ``c·(F_1 ⊗ …) = (c F_1) ⊗ …`` stays Kronecker and the loss and
    gradients are exact: they match a dense Cholesky to float tolerance."""
    results = {}
    for label, patched, max_chol in (("dense", False, 10**6), ("patched", True, 0)):
        model, likelihood, x, y = build_model("grid", torch.float64, device)
        model = ScaledGridModel(model.covar_module.grid, x, y, likelihood).to(device=device, dtype=torch.float64)
        model.covar_module.outputscale = 1.7
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        handle = kronegp.patch_gpytorch() if patched else None
        try:
            with gpytorch.settings.max_cholesky_size(max_chol):
                covar = likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
                loss = -mll(model(x), y)
            loss.backward()
        finally:
            if handle is not None:
                handle.undo()
        results[label] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, type(covar))
    assert results["patched"][2].__name__ == "KroneckerAddedDiagOperator"
    assert _close(results["patched"][0], results["dense"][0], 1e-9)
    for name, grad in results["dense"][1].items():
        assert _close(results["patched"][1][name], grad, 1e-7), name
