"""GridProductKernel and its grid helpers, against GPyTorch's dense ProductKernel over
active_dims (an independent reference) on small grids."""

from __future__ import annotations

import gpytorch
import pytest
import torch
from gpytorch.kernels import MaternKernel, PeriodicKernel, ProductKernel, RBFKernel

from kronegp import ops
from kronegp.kernels import GridProductKernel, grid_axes, grid_points
from kronegp.operators import KroneckerOperator
from _helpers import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_axes(sizes, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    # sorted random coordinates: uneven spacing, distinct values
    return [torch.sort(torch.rand(n, generator=gen, dtype=dtype))[0].to(device) * 3 for n in sizes]


def base_kernels(with_lengthscales=True):
    kernels = [RBFKernel(), MaternKernel(nu=1.5), PeriodicKernel()]
    if with_lengthscales:
        kernels[0].lengthscale = 0.7
        kernels[1].lengthscale = 1.3
        kernels[2].lengthscale = 0.9
    return kernels


def copy_hyperparameters(source, target):
    """Load ``source``'s hyperparameters into ``target`` (which differs only by active_dims)."""
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"active_dims"}


def active_dims_clone(kernel, dim):
    clone = type(kernel)(**({"nu": kernel.nu} if isinstance(kernel, MaternKernel) else {}), active_dims=[dim])
    copy_hyperparameters(kernel, clone)
    return clone


def dense_reference(kernels, x1, x2):
    """The same product kernel without grid structure: ProductKernel over active_dims."""
    clones = [active_dims_clone(k, i).to(x1) for i, k in enumerate(kernels)]
    return ProductKernel(*clones)(x1, x2).to_dense()


# ------------------------------------------------------------------ helpers


@pytest.mark.parametrize("sizes", [(3,), (3, 1, 12), (2, 5, 1, 4), (61, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_points_and_axes_round_trip(sizes, dtype):
    axes = make_axes(sizes, dtype)
    x = grid_points(axes)
    assert x.shape == (torch.Size(sizes).numel(), len(sizes)) and x.dtype == dtype
    # Kronecker order: the last dimension varies fastest
    last = sizes[-1]
    assert torch.equal(x[:last, -1], axes[-1])
    recovered = grid_axes(x)
    assert len(recovered) == len(axes)
    for got, want in zip(recovered, axes):
        assert torch.equal(got, want)


def test_grid_points_rejects_bad_axes():
    with pytest.raises(TypeError, match="list or tuple"):
        grid_points(torch.rand(3))
    with pytest.raises(ValueError, match=r"axes\[1\].*1-D"):
        grid_points([torch.rand(3), torch.rand(2, 2)])
    with pytest.raises(TypeError, match=r"axes\[1\] is torch.float64"):
        grid_points([torch.rand(3), torch.rand(2, dtype=torch.float64)])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda x: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))], "not a full grid"),
        (lambda x: x[:-1], "not a full grid"),
        (lambda x: torch.cat([x, x[:3]]), "not a full grid"),
        (lambda x: x.flip(0)[:, [1, 0, 2]], "not a full grid"),
        (lambda x: torch.where(torch.arange(len(x))[:, None] == 7, x + 0.01, x), "not a full grid"),
        (lambda x: torch.where(torch.arange(len(x))[:, None] == 5, torch.nan, x), "NaN"),
    ],
)
def test_off_grid_inputs_raise(corrupt, message):
    axes = make_axes((3, 4, 5))
    x = corrupt(grid_points(axes))
    kernel = GridProductKernel(*base_kernels()).double()
    with pytest.raises(ValueError, match=message):
        grid_axes(x)
    with pytest.raises(ValueError, match=message):
        kernel(x).to_dense()


# ------------------------------------------------------------------ the kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_dense_product_kernel(dtype, device):
    kernel = GridProductKernel(*base_kernels()).to(device=device, dtype=dtype)
    x = grid_points(make_axes((3, 12, 5), dtype, device))
    covar = kernel(x).evaluate_kernel()
    assert type(covar) is KroneckerOperator
    assert covar.factor_shapes == [(3, 3), (12, 12), (5, 5)]
    expected = dense_reference(kernel.base_kernels, x, x)
    assert rel_err(covar.to_dense(), expected) < TOL[dtype] * 10
    rhs = torch.randn(180, 4, dtype=dtype, device=device)
    assert rel_err(covar @ rhs, expected @ rhs) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_different_grids_give_a_rectangular_kronecker(dtype):
    kernel = GridProductKernel(*base_kernels()).to(dtype=dtype)
    x1 = grid_points(make_axes((3, 4, 2), dtype, seed=1))
    x2 = grid_points(make_axes((5, 1, 3), dtype, seed=2))
    covar = kernel(x1, x2).evaluate_kernel()
    assert type(covar) is KroneckerOperator and covar.shape == (24, 15)
    assert rel_err(covar.to_dense(), dense_reference(kernel.base_kernels, x1, x2)) < TOL[dtype] * 10


@pytest.mark.parametrize("dtype", DTYPES)
def test_diag_works_for_any_points(dtype):
    kernel = GridProductKernel(*base_kernels()).to(dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.rand(17, 3, generator=gen, dtype=dtype), torch.rand(17, 3, generator=gen, dtype=dtype)
    got = kernel(x1, x2, diag=True)
    assert rel_err(got, torch.diagonal(dense_reference(kernel.base_kernels, x1, x2))) < TOL[dtype] * 10


def test_batched_hyperparameters_and_inputs():
    kernels = [RBFKernel(batch_shape=torch.Size([2])), RBFKernel(batch_shape=torch.Size([2]))]
    kernels[0].lengthscale = torch.tensor([0.5, 2.0]).view(2, 1, 1)
    kernel = GridProductKernel(*kernels, batch_shape=torch.Size([2])).double()
    x = grid_points(make_axes((4, 3)))
    covar = kernel(x).evaluate_kernel()
    assert covar.shape == (2, 12, 12)
    for b in range(2):
        k0 = RBFKernel().double()
        k0.lengthscale = kernel.base_kernels[0].lengthscale[b].detach()
        ref = k0(x[:, :1]).to_dense() * RBFKernel().double()(x[:, 1:]).to_dense()
        assert rel_err(covar.to_dense()[b], ref) < 1e-12
    xb = x.expand(3, 1, 12, 2)  # batch of identical grids broadcasts with the kernel batch
    assert kernel(xb).evaluate_kernel().shape == (3, 2, 12, 12)
    other = grid_points(make_axes((4, 3), seed=5))
    with pytest.raises(ValueError, match="same grid"):
        kernel(torch.stack([x, other])).to_dense()


def test_constructor_checks():
    with pytest.raises(ValueError, match="one base kernel per grid dimension"):
        GridProductKernel()
    with pytest.raises(TypeError, match=r"base_kernels\[1\]"):
        GridProductKernel(RBFKernel(), "rbf")
    with pytest.raises(ValueError, match="active_dims"):
        GridProductKernel(RBFKernel(active_dims=[0]), RBFKernel())
    with pytest.raises(ValueError, match="ard_num_dims"):
        GridProductKernel(RBFKernel(ard_num_dims=2))
    kernel = GridProductKernel([RBFKernel(), RBFKernel()])  # a list works as well
    assert kernel.num_dims == 2
    with pytest.raises(ValueError, match=r"\(\*batch, n, 2\)"):
        kernel(torch.rand(6, 3)).to_dense()


# ------------------------------------------------------------------ in a GPyTorch model


class GridProductModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_gp_loss_and_gradients_match_dense_product_kernel(dtype, device, monkeypatch):
    calls = {"n": 0}
    real = ops.kron_matmul

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ops, "kron_matmul", counting)
    axes = make_axes((5, 7, 3), dtype, device)
    x = grid_points(axes)
    gen = torch.Generator().manual_seed(9)
    y = (torch.sin(2 * x.sum(-1).cpu()) + 0.1 * torch.randn(len(x), generator=gen, dtype=dtype)).to(device)

    results = []
    dense_product = ProductKernel(*(active_dims_clone(k, i) for i, k in enumerate(base_kernels())))
    for covar in (GridProductKernel(*base_kernels()), dense_product):
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = GridProductModel(x, y, likelihood, covar).to(device=device, dtype=dtype)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        model.train()
        # the grid model takes the Kronecker eigen path; the dense one a Cholesky
        with gpytorch.settings.max_cholesky_size(0 if isinstance(covar, GridProductKernel) else 10**6):
            loss = -mll(model(x), y)
        loss.backward()
        grads = [p.grad for _, p in sorted(model.covar_module.named_parameters(), key=lambda t: t[0].split(".")[-1])]
        results.append((loss.detach(), [g.detach().clone() for g in grads], likelihood.noise_covar.raw_noise.grad.clone()))
    assert calls["n"] > 0
    (l0, g0, n0), (l1, g1, n1) = results
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert abs(l0.item() - l1.item()) <= tol * abs(l1.item())
    assert rel_err(n0, n1) < tol * 10
    for a, b in zip(g0, g1):
        assert rel_err(a, b) < tol * 10
