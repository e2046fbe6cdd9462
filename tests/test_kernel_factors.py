"""The fused stationary kernel factors (kronegp.kernels.stationary) against GPyTorch's own
``forward``: values and lengthscale gradients, the kernels it must decline, and GridGP
giving the same likelihood and gradients through either path."""

import gpytorch
import pytest
import torch

import kronegp.models._params as params
from kronegp import GridGP
from kronegp.kernels.stationary import stationary_factor, stationary_factors

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,raw_tiny", [(torch.float32, -57.6), (torch.float64, -400.0)])
@pytest.mark.parametrize("name,make", KERNELS)
def test_extreme_lengthscales_give_the_limits_not_nan(name, make, dtype, raw_tiny, device):
    """An optimiser's line search tries such lengthscales (L-BFGS on a 230-year axis in float32
    tried ℓ = 1.7e-25, where r² overflowed and inf · e^{−r} made the factor NaN): the factor is
    its limit — the identity as ℓ → 0, all ones as ℓ → ∞ — and the gradient is finite. (Set
    through the raw parameter, as an optimiser does: ℓ = softplus(raw) = 1e-25 in float32,
    2e-174 in float64.)"""
    n = 50
    x = _axis(n, dtype, device, seed=3)
    eye = torch.eye(n, dtype=dtype, device=device)
    for raw, limit in ((raw_tiny, eye), (1e30, torch.ones_like(eye))):
        kern = make().to(dtype=dtype, device=device)
        with torch.no_grad():
            kern.raw_lengthscale.fill_(raw)
        assert 0 < float(kern.lengthscale) < 1e-24 or raw > 0
        k = stationary_factor(kern, x)
        assert torch.isfinite(k).all(), (name, raw)
        assert torch.allclose(k, limit, rtol=0, atol=1e-6), (name, raw)
        (grad,) = torch.autograd.grad((k * torch.randn_like(k)).sum(), kern.raw_lengthscale)
        assert torch.isfinite(grad).all(), (name, raw)


@pytest.mark.parametrize("device", DEVICES)
def test_factors_of_one_kind_and_size_computed_together(device):
    # Three Matérn 5/2 axes of one size (one group), one RBF of that size and one Matérn of
    # another size: each factor and each lengthscale gradient as when computed alone.
    n = 9
    kerns = [gpytorch.kernels.MaternKernel(nu=2.5) for _ in range(3)] + [gpytorch.kernels.RBFKernel(),
                                                                        gpytorch.kernels.MaternKernel(nu=2.5)]
    axes = [_axis(n, torch.float64, device, seed=i) for i in range(4)] + [_axis(5, torch.float64, device, seed=9)]
    for kern, ls in zip(kerns, (0.4, 1.3, 3.0, 0.9, 2.2)):
        kern.double().to(device).lengthscale = ls
    together = stationary_factors(kerns, axes)
    w = [torch.randn(a.shape[0], a.shape[0], generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(device)
         for i, a in enumerate(axes)]
    g_together = torch.autograd.grad(sum((k * wi).sum() for k, wi in zip(together, w)), [k.raw_lengthscale for k in kerns])
    for i, (kern, axis) in enumerate(zip(kerns, axes)):
        alone = stationary_factor(kern, axis)
        assert torch.allclose(together[i], alone, rtol=1e-14, atol=0)
        (g_alone,) = torch.autograd.grad((alone * w[i]).sum(), kern.raw_lengthscale)
        assert torch.allclose(g_together[i], g_alone, rtol=1e-12), i
    assert len({float(g) for g in g_together}) == len(kerns)  # distinct lengthscales, distinct gradients


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
@pytest.mark.parametrize("same_kind", [False, True])
def test_gridgp_same_through_either_path(missing, same_kind, device, monkeypatch):
    """GridGP's likelihood and every parameter gradient are the same whether the factors
    come from the fused path or from the kernels' forward (``same_kind``: a cube with one
    Matérn kernel per axis, the factors computed as one group)."""
    g = torch.Generator().manual_seed(3)
    shape = (6, 6, 6) if same_kind else (6, 7, 5)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    if missing:
        y[torch.rand(*shape, generator=g) < 0.2] = float("nan")
    axes = [_axis(n, torch.float64, "cpu", seed=i) for i, n in enumerate(shape)]
    if same_kind:
        kernels = [gpytorch.kernels.MaternKernel(nu=2.5) for _ in shape]
        for kern, ls in zip(kernels, (0.5, 1.5, 4.0)):
            kern.lengthscale = ls
    else:
        kernels = [gpytorch.kernels.MaternKernel(nu=2.5), gpytorch.kernels.RBFKernel(), gpytorch.kernels.MaternKernel(nu=1.5)]

    def lml_and_grads():
        torch.manual_seed(0)
        model = GridGP(y, axes, kernels=[k for k in kernels], dtype=torch.float64, device=device, exact_trace_limit=10**6)
        model.zero_grad()
        lml = model.log_marginal_likelihood()
        lml.backward()
        return lml.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_lml, fast_grads = lml_and_grads()
    monkeypatch.setattr(params, "stationary_factors", lambda kerns, axes: [None] * len(kerns))
    ref_lml, ref_grads = lml_and_grads()
    assert torch.allclose(fast_lml, ref_lml, rtol=1e-10)
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) >= 5
    for name in ref_grads:
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-7, atol=1e-10), name
