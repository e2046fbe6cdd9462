"""The fused stationary kernel factors (kronegp.models._stationary) against GPyTorch's own
``forward``: values and lengthscale gradients, the kernels it must decline, and GridGP
giving the same likelihood and gradients through either path."""

import gpytorch
import pytest
import torch

import kronegp.models._params as params
from kronegp import GridGP
from kronegp.models._stationary import stationary_factor

KERNELS = [
    ("matern0.5", lambda: gpytorch.kernels.MaternKernel(nu=0.5)),
    ("matern1.5", lambda: gpytorch.kernels.MaternKernel(nu=1.5)),
    ("matern2.5", lambda: gpytorch.kernels.MaternKernel(nu=2.5)),
    ("rbf", lambda: gpytorch.kernels.RBFKernel()),
]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _axis(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # irregular spacing, not centred, values well away from 0
    return (100.0 + torch.cumsum(0.2 + torch.rand(n, generator=g, dtype=torch.float64), 0)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("name,make", KERNELS)
@pytest.mark.parametrize("n,lengthscale", [(1, 0.7), (3, 0.3), (61, 2.5), (200, 17.0)])
def test_matches_gpytorch_forward(name, make, n, lengthscale, dtype, tol, device):
    kern = make().to(dtype=dtype, device=device)
    kern.lengthscale = lengthscale
    x = _axis(n, dtype, device, seed=n)
    got = stationary_factor(kern, x)
    assert got is not None and got.shape == (n, n)
    assert torch.equal(got, got.mT)  # exactly symmetric
    with torch.no_grad():
        ref64 = make().double().to(device)
        ref64.lengthscale = lengthscale
        expected = ref64.forward(x.double().unsqueeze(-1), x.double().unsqueeze(-1))
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < tol
    # lengthscale gradient of a random linear functional, against autograd through forward
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    (g_fast,) = torch.autograd.grad((got.double() * w).sum(), kern.raw_lengthscale)
    ref = make().double().to(device)
    ref.lengthscale = lengthscale
    xx = x.double().unsqueeze(-1)
    (g_ref,) = torch.autograd.grad((ref.forward(xx, xx) * w).sum(), ref.raw_lengthscale)
    assert g_fast.shape == kern.raw_lengthscale.shape
    assert torch.allclose(g_fast.double(), g_ref, rtol=max(tol, 1e-9) * 10, atol=1e-12 * float(w.abs().sum()))


def test_declines_other_kernels():
    x = _axis(5, torch.float64, "cpu", 0)

    class MyMatern(gpytorch.kernels.MaternKernel):
        pass

    declined = [
        gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()),
        gpytorch.kernels.PeriodicKernel(),
        gpytorch.kernels.MaternKernel(nu=2.5, batch_shape=torch.Size([2])),
        gpytorch.kernels.MaternKernel(nu=2.5, active_dims=[0]),
        gpytorch.kernels.RBFKernel(ard_num_dims=2),
        MyMatern(nu=2.5),
    ]
    for kern in declined:
        assert stationary_factor(kern.double(), x) is None, type(kern).__name__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("missing", [False, True])
def test_gridgp_same_through_either_path(missing, device, monkeypatch):
    """GridGP's likelihood and every parameter gradient are the same whether the factors
    come from the fused path or from the kernels' forward."""
    g = torch.Generator().manual_seed(3)
    shape = (6, 7, 5)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    if missing:
        y[torch.rand(*shape, generator=g) < 0.2] = float("nan")
    axes = [_axis(n, torch.float64, "cpu", seed=i) for i, n in enumerate(shape)]
    kernels = [gpytorch.kernels.MaternKernel(nu=2.5), gpytorch.kernels.RBFKernel(), gpytorch.kernels.MaternKernel(nu=1.5)]

    def lml_and_grads():
        torch.manual_seed(0)
        model = GridGP(y, axes, kernels=[k for k in kernels], dtype=torch.float64, device=device, exact_trace_limit=10**6)
        model.zero_grad()
        lml = model.log_marginal_likelihood()
        lml.backward()
        return lml.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_lml, fast_grads = lml_and_grads()
    monkeypatch.setattr(params, "stationary_factor", lambda kern, axis: None)
    ref_lml, ref_grads = lml_and_grads()
    assert torch.allclose(fast_lml, ref_lml, rtol=1e-10)
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) >= 5
    for name in ref_grads:
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-7, atol=1e-10), name
