"""The separable-mask path (issue 22, item 3): a mask constant along some axes, against a dense Cholesky.

References (:func:`test_gaps.dense_lml`, :func:`test_gaps.dense_grid_posterior`) form ``C_OO``
densely from the model's kernel modules and differentiate by autograd.
"""

import warnings

import pytest
import torch

import kronegp.models._separable_mask as separable_mask
from kronegp import GridGP
from test_gaps import dense_grid_posterior, dense_lml, field, lml_and_grads, rel


def constant_mask(shape, masked_axes, frac=0.3, seed=2):
    """An observed-cell grid that depends only on ``masked_axes`` (about ``frac`` of their points missing)."""
    g = torch.Generator().manual_seed(seed)
    sub = [n if k in masked_axes else 1 for k, n in enumerate(shape)]
    missing = torch.rand(sub, generator=g) < frac
    missing.view(-1)[0] = True  # at least one missing point
    missing.view(-1)[-1] = False  # at least one observed
    return (~missing).expand(shape).clone()


def model(shape, masked_axes, dtype=torch.float64, path="separable-mask", **kw):
    v, axes = field(shape, dtype=dtype)
    mask = constant_mask(shape, masked_axes)
    hyp = {"lengthscales": [1.5 + 0.5 * k for k in range(len(shape))], "noise": 0.05}
    return GridGP(v, axes, mask=mask, path=path, hyperparameters=hyp, **kw)


CASES = [
    ((5, 6, 7), [0, 1]),  # land mask, constant in time
    ((5, 6, 7), [2]),  # whole time slices missing (an outage)
    ((5, 6, 7), [1]),  # one masked axis in the middle
    ((4, 3, 5, 2), [1, 3]),  # masked axes interleaved with free ones
    ((4, 3, 5, 2), [0, 1, 2]),
]


@pytest.mark.parametrize("shape,masked", CASES)
def test_likelihood_gradient_posterior_match_dense(shape, masked):
    gp = model(shape, masked)
    assert gp.path == "separable-mask"
    assert gp.inference.masked_axes == masked
    a, ga = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    b, gb = lml_and_grads(gp, dense_lml)
    assert abs(a - b) <= 1e-10 * abs(b)
    assert rel(ga, gb) <= 1e-10
    info = gp.last_solve
    assert (info.path, info.iterations, info.probes) == ("separable-mask", 0, 0)
    mean, var = gp.predict(as_xarray=False)
    ref_mean, ref_var = dense_grid_posterior(gp)
    assert rel(mean.reshape(-1), ref_mean) <= 1e-10
    assert rel(var.reshape(-1), ref_var) <= 1e-10
    # at points (the grid's own, masked-out cells included): the same posterior
    pts = gp.layout.grid_points(gp.axes)[::3]
    pm, pv = gp.predict(pts, as_xarray=False)
    assert rel(pm, ref_mean[::3]) <= 1e-10
    assert rel(pv, ref_var[::3]) <= 1e-10


def test_gradient_with_a_user_mean():
    shape, masked = (5, 6, 7), [0, 1]
    v, axes = field(shape)
    mean = __import__("gpytorch").means.LinearMean(3).double()
    gp = GridGP(v, axes, mask=constant_mask(shape, masked), mean=mean, path="separable-mask",
                hyperparameters={"lengthscales": [1.5, 2.0, 2.5], "noise": 0.05})
    a, ga = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    b, gb = lml_and_grads(gp, dense_lml)
    assert abs(a - b) <= 1e-10 * abs(b)
    assert rel(ga, gb) <= 1e-10


def test_samples_mean_and_covariance():
    gp = model((4, 3, 5), [0, 1])
    torch.manual_seed(0)
    s = gp.sample(4000).reshape(4000, -1)
    mean, var = dense_grid_posterior(gp)
    sd = var.sqrt()
    # 4000 draws: the sample mean is within ~5 standard errors, the variance within ~15 %
    assert float(((s.mean(0) - mean).abs() / sd).max()) < 5 * 4000 ** -0.5 * 1.0 + 1e-12
    assert float((s.var(0) / var - 1).abs().max()) < 0.15
    # the covariance, against the dense posterior's
    with torch.no_grad():
        from test_gaps import _dense_parts

        K, obs, C, _ = _dense_parts(gp)
        cov = (K - K[:, obs] @ torch.linalg.solve(C, K[obs])) * gp.scale**2
    emp = torch.cov(s.mT)
    assert float((emp - cov).abs().max() / cov.diagonal().max()) < 0.1


def test_auto_detects_a_mask_constant_in_time():
    gp = model((5, 6, 7), [0, 1], path="auto")  # 30 % land × 7 times: more missing cells than points
    assert gp.path == "separable-mask"
    assert gp.hyperparameters()["path"] == "separable-mask"
    gp.log_marginal_likelihood()
    assert gp.last_solve.path == "separable-mask"


def test_auto_prefers_exact_missing_for_a_tiny_mask():
    v, axes = field((5, 6, 7))
    mask = torch.ones(5, 6, 7, dtype=torch.bool)
    mask[2, 3] = False  # one land point: 7 missing cells < 29 observed points
    assert GridGP(v, axes, mask=mask).path == "exact-missing"
    assert GridGP(v, axes, mask=mask, path="separable-mask").path == "separable-mask"


def test_a_varying_mask_is_not_separable():
    v, axes = field((5, 6, 7))
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 6, 7, generator=g) > 0.3  # depends on every axis
    assert GridGP(v, axes, mask=mask).path != "separable-mask"
    with pytest.raises(ValueError, match="depends on every axis"):
        GridGP(v, axes, mask=mask, path="separable-mask")


def test_a_length_one_axis_does_not_make_a_mask_separable():
    v, axes = field((6, 7, 1))
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, 1, generator=g) > 0.6  # more missing than observed: separable-mask would win
    assert GridGP(v, axes, mask=mask).path != "separable-mask"
    with pytest.raises(ValueError, match="depends on every axis"):
        GridGP(v, axes, mask=mask, path="separable-mask")


def test_two_dimensional_outage():
    v, axes = field((8, 9))
    mask = torch.ones(8, 9, dtype=torch.bool)
    mask[:, 2:6] = False  # four whole columns missing
    gp = GridGP(v, axes, mask=mask, hyperparameters={"lengthscales": [1.5, 2.0], "noise": 0.05})
    assert gp.path == "separable-mask" and gp.inference.masked_axes == [1]
    a, ga = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    b, gb = lml_and_grads(gp, dense_lml)
    assert abs(a - b) <= 1e-10 * abs(b) and rel(ga, gb) <= 1e-10
    mean, var = gp.predict(as_xarray=False)
    ref_mean, ref_var = dense_grid_posterior(gp)
    assert rel(mean.reshape(-1), ref_mean) <= 1e-10 and rel(var.reshape(-1), ref_var) <= 1e-10


def test_forcing_errors():
    v, axes = field((5, 6, 7))
    with pytest.raises(ValueError, match="no missing cells"):
        GridGP(v, axes, path="separable-mask")
    mask = constant_mask((5, 6, 7), [0, 1])
    with pytest.raises(ValueError, match="per-cell noise"):
        GridGP(v, axes, mask=mask, noise=torch.full((5, 6, 7), 0.1, dtype=v.dtype), path="separable-mask")
    with pytest.raises(ValueError, match="'separable-mask'"):
        GridGP(v, axes, mask=mask, path="separable")


def test_point_limit(monkeypatch):
    import kronegp.models.paths as paths

    monkeypatch.setattr(separable_mask, "MAX_POINTS_CPU", 10)
    v, axes = field((5, 6, 7))
    mask = constant_mask((5, 6, 7), [0, 1])  # ~21 observed points > 10
    assert GridGP(v, axes, mask=mask).path == "exact-missing"  # auto: past the limit (the small grid falls back to it)
    assert GridGP(v, axes, mask=mask, path="separable-mask").path == "separable-mask"  # forced past it
    monkeypatch.setattr(paths, "MAX_POINTS_ANY", 10)
    with pytest.raises(ValueError, match="> 10"):
        GridGP(v, axes, mask=mask, path="separable-mask")


def test_float32():
    gp64 = model((5, 6, 7), [0, 1])
    gp32 = model((5, 6, 7), [0, 1], dtype=torch.float32)
    assert gp32.path == "separable-mask"
    a, ga = lml_and_grads(gp32, lambda m: m.log_marginal_likelihood())
    b, gb = lml_and_grads(gp64, lambda m: m.log_marginal_likelihood())
    assert abs(a - b) <= 1e-4 * abs(b)
    assert rel(ga.double(), gb) <= 1e-3
    mean, var = gp32.predict(as_xarray=False)
    assert mean.dtype == torch.float32 and bool(torch.isfinite(var).all())
    assert gp32.sample(2).shape == (2, 5, 6, 7)
    before = gp32.loss_backward()
    gp32.fit(iters=5)
    assert gp32.history[-1] < float(before)


@pytest.mark.parametrize("lengthscale", [3.0, 4.5])
def test_float32_small_noise_decomposes_the_masked_gram_in_float64(lengthscale):
    """``K_S``'s eigenvalues come from a float64 decomposition (of the float32 matrix): a float32 ``eigh``
    misplaced the small ones by ~eps·‖K_S‖, which a noise of 1e-5 magnified: the float32 likelihood was
    9.5e-4 / 2.0e-3 off a float64 model given the same float32 factors (lengthscale 3 / 4.5), 1.8e-5 /
    1.0e-6 after. (At 6, 1.2e-3 → 3.9e-4: the float32 eigenvectors' own rounding, which no eigh removes;
    the model's representation warning fires there.)"""
    shape = (8, 9, 10)
    v, axes = field(shape, dtype=torch.float64)
    mask = constant_mask(shape, [0, 1], frac=0.2)
    hyp = {"lengthscales": [lengthscale] * 3, "noise": 1e-5, "outputscale": 1.0}
    gp32 = GridGP(v.float(), [a.float() for a in axes], mask=mask, hyperparameters=hyp, standardize=False)
    gp64 = GridGP(v, axes, mask=mask, hyperparameters=hyp, standardize=False)
    assert gp32.path == gp64.path == "separable-mask"
    with torch.no_grad():
        widened = [f.detach().double() for f in gp32._factors()]
        gp64._factors = lambda *a, **k: widened
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the float32 model's representation warning
            a = float(gp32.log_marginal_likelihood())
        b = float(gp64.log_marginal_likelihood())
    assert abs(a - b) <= 1e-4 * abs(b), (a, b)
