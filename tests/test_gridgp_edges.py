"""GridGP's public edges: hyperparameters in data units, xarray out, overflow-safe
standardisation, unfitted predictions, settings checked at construction."""

from __future__ import annotations

import math
import warnings

import gpytorch
import numpy as np
import pytest
import torch

from kronegp.models import GridGP, copy_hyperparameters

DTYPES = [torch.float32, torch.float64]


def field(shape, dtype=torch.float64, seed=0, missing=0.0):
    """A smooth random field on uneven axes (+ noise), optionally with missing cells."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.cumsum(0.5 + torch.rand(n, generator=gen, dtype=torch.float64), 0) for n in shape]
    values = torch.ones(shape, dtype=torch.float64)
    for k, ax in enumerate(axes):
        view = [1] * len(shape)
        view[k] = -1
        values = values * torch.sin(ax / (1.5 + k)).reshape(view)
    values = 3.0 + 2.0 * values + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    if missing:
        values[torch.rand(shape, generator=gen) < missing] = float("nan")
    return values.to(dtype), [a.to(dtype) for a in axes]


def _close(a, b, rel):
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).norm() / b.norm()) <= rel


HYPER = {"lengthscales": [1.7, 0.9, 2.3], "outputscale": 3.1, "noise": 0.037, "mean": 2.6}


# ----------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_set_hyperparameters_round_trips_in_data_units(missing):
    values, axes = field((5, 6, 4), missing=missing)
    gp = GridGP(values * 40.0 + 100.0, axes)  # far from standardised units
    gp.set_hyperparameters(lengthscales=HYPER["lengthscales"], outputscale=HYPER["outputscale"] * 1600,
                           noise=HYPER["noise"] * 1600, mean=HYPER["mean"] * 40 + 100)
    got = gp.hyperparameters()
    for k in range(3):
        assert got["lengthscales"][k] == pytest.approx(HYPER["lengthscales"][k], rel=1e-12)
    assert got["outputscale"] == pytest.approx(HYPER["outputscale"] * 1600, rel=1e-12)
    assert got["noise"] == pytest.approx(HYPER["noise"] * 1600, rel=1e-12)
    assert got["mean"] == pytest.approx(HYPER["mean"] * 40 + 100, rel=1e-12)


@pytest.mark.parametrize("missing", [0.0, 0.2])
def test_warm_start_from_another_model_in_one_call(missing):
    """A model on other data (other shift and scale) hands its hyperparameters over: the
    values read back agree to 1e-12, and the likelihood equals that of a model built with
    those values in its constructor."""
    values, axes = field((5, 6, 4), seed=1, missing=missing)
    source = GridGP(values, axes, cg_tol=1e-10)
    with torch.no_grad():  # hyperparameters nobody would guess: perturbed raw values
        for p in source.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=p.dtype))
    hyper = source.hyperparameters()
    other = values * 7.0 - 20.0
    built = GridGP(other, axes, hyperparameters=hyper, cg_tol=1e-10)
    later = GridGP(other, axes, cg_tol=1e-10)
    later.set_hyperparameters(**hyper)
    for gp in (built, later):
        got = gp.hyperparameters()
        for key in ("outputscale", "noise", "mean"):
            assert got[key] == pytest.approx(hyper[key], rel=1e-12), key
        assert np.allclose(got["lengthscales"], hyper["lengthscales"], rtol=1e-12, atol=0)
        for a, b in zip(got["kernels"], hyper["kernels"]):
            assert a == pytest.approx(b, rel=1e-12)
    with torch.no_grad():
        assert float(built.log_marginal_likelihood()) == pytest.approx(
            float(later.log_marginal_likelihood()), rel=1e-10)
    # and on the same data the likelihood is the source's own
    same = GridGP(values, axes, hyperparameters=hyper, cg_tol=1e-10)
    with torch.no_grad():
        assert float(same.log_marginal_likelihood()) == pytest.approx(
            float(source.log_marginal_likelihood()), rel=1e-9)


def test_copy_hyperparameters_and_other_kernel_parameters():
    values, axes = field((6, 5))
    kernels = [gpytorch.kernels.PeriodicKernel(), gpytorch.kernels.RBFKernel()]
    source = GridGP(values, axes, kernels=kernels)
    source.set_hyperparameters(kernels=[{"lengthscale": 0.8, "period_length": 2.5}, None])
    target = GridGP(values[:4], [axes[0][:4], axes[1]],
                    kernels=[gpytorch.kernels.PeriodicKernel(), gpytorch.kernels.RBFKernel()])
    copy_hyperparameters(source, target)
    assert target.hyperparameters()["kernels"][0]["period_length"] == pytest.approx(2.5, rel=1e-12)
    assert target.hyperparameters()["lengthscales"] == pytest.approx(source.hyperparameters()["lengthscales"],
                                                                     rel=1e-12)


def test_per_cell_noise_models_round_trip_without_noise():
    values, axes = field((5, 4))
    gp = GridGP(values, axes, noise=0.05)
    hyper = gp.hyperparameters()
    assert hyper["noise"] == "per-cell (fixed)"
    gp.set_hyperparameters(hyper)  # the string is skipped: nothing to set
    with pytest.raises(ValueError, match="noise: this model has fixed per-cell noise"):
        gp.set_hyperparameters(noise=0.1)


@pytest.mark.parametrize("bad, error, match", [
    ({"lengthscales": [1.0]}, ValueError, r"lengthscales must hold one entry per dimension \(2\)"),
    ({"lengthscales": [1.0, -2.0]}, ValueError, r"lengthscales\[1\] must be positive"),
    ({"lengthscales": [1.0, float("nan")]}, ValueError, r"lengthscales\[1\] must be finite"),
    ({"outputscale": 0.0}, ValueError, "outputscale must be positive"),
    ({"outputscale": "big"}, TypeError, "outputscale must be a number"),
    ({"noise": 1e-30}, ValueError, "noise must be above the model's floor"),
    ({"mean": float("inf")}, ValueError, "mean must be finite"),
    ({"lengthscale": 1.0}, TypeError, r"unknown hyperparameter\(s\) \['lengthscale'\]"),
    ({"kernels": [{"period": 1.0}, None]}, ValueError, r"kernels\[0\] \(MaternKernel\) has no parameter"),
])
def test_set_hyperparameters_rejects_bad_values(bad, error, match):
    values, axes = field((5, 4))
    gp = GridGP(values, axes)
    before = gp.hyperparameters()
    with pytest.raises(error, match=match):
        gp.set_hyperparameters(**bad)
    assert gp.hyperparameters()["outputscale"] == before["outputscale"]


# ----------------------------------------------------------------------------- predictions


def test_predict_before_fit_warns_once():
    values, axes = field((5, 4))
    gp = GridGP(values, axes)
    with pytest.warns(UserWarning, match="never fitted, so it predicts with its initial hyperparameters"):
        gp.predict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.predict()  # once per model
        chosen = GridGP(values, axes, hyperparameters={"noise": 0.01})
        chosen.predict()  # the user chose them: no warning
        fitted = GridGP(values, axes)
        fitted.fit(iters=2, progress=False)
        fitted.predict()


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_values_predict_like_scaled_ones(dtype):
    """Values whose squares overflow (1e150 in float64, 1e16 in float32, squares above
    float32's range) standardise without overflow and predict the scaled-down model's
    predictions scaled up."""
    big = 1e150 if dtype == torch.float64 else 1e16
    values, axes = field((6, 5), dtype=dtype, missing=0.1)
    hyper = {"lengthscales": [1.3, 0.7], "noise": 0.01, "outputscale": 2.0, "mean": 3.0}
    small = GridGP(values, axes, hyperparameters=hyper)
    large = GridGP(values * big, axes, hyperparameters={**hyper, "noise": 0.01 * big**2,
                                                        "outputscale": 2.0 * big**2, "mean": 3.0 * big})
    m0, v0 = small.predict()
    m1, v1 = large.predict()
    assert torch.isfinite(m1).all() and torch.isfinite(v1).all()
    rel = 1e-9 if dtype == torch.float64 else 1e-3
    assert _close(m1.double() / big, m0.double(), rel)
    assert _close(v1.double() / big**2, v0.double(), 100 * rel)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_whose_variance_cannot_be_held_are_rejected(dtype):
    big = 1e154 if dtype == torch.float64 else 1e19
    values, axes = field((4, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match="too large for variances in data units"):
        GridGP((values * big).to(dtype), axes)
    if dtype == torch.float32:
        with pytest.raises(ValueError, match="beyond the largest torch.float32"):
            GridGP(values * 1e39, axes, dtype=torch.float32)


def test_xarray_in_dataset_out_on_the_grid_and_at_points():
    xr = pytest.importorskip("xarray")
    values, axes = field((5, 6, 4), missing=0.2)
    times = np.array("2020-01-01", dtype="datetime64[D]") + np.arange(4) * 30
    da = xr.DataArray(values.numpy(), dims=("lat", "lon", "time"), name="t2m",
                      coords={"lat": axes[0].numpy(), "lon": axes[1].numpy(), "time": times},
                      attrs={"units": "K", "history": "made in a test"})
    gp = GridGP(da, hyperparameters={"noise": 0.02})
    ds = gp.predict()
    assert isinstance(ds, xr.Dataset)
    assert set(ds.data_vars) == {"mean", "sd", "sd_observation", "observed"}
    assert ds["mean"].dims == ("lat", "lon", "time")
    np.testing.assert_array_equal(ds["time"].values, times)  # the input's own coordinates
    assert ds.attrs["history"] == "made in a test" and ds["mean"].attrs["units"] == "K"
    mean, var = gp.predict(as_xarray=False)  # the arrays, as for any other input
    np.testing.assert_allclose(ds["mean"].values, mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ds["sd"].values, np.sqrt(var.numpy()), rtol=1e-12)
    _, var_y = gp.predict(as_xarray=False, include_noise=True)
    np.testing.assert_allclose(ds["sd_observation"].values, np.sqrt(var_y.numpy()), rtol=1e-12)
    np.testing.assert_array_equal(ds["observed"].values, (~torch.isnan(values)).numpy().astype(np.int8))
    pts = torch.stack([axes[0][:3] + 0.1, axes[1][:3], torch.tensor([3.0, 40.0, 61.0], dtype=torch.float64)], -1)
    at = gp.predict(pts)
    m_pts, v_pts = gp.predict(pts, as_xarray=False)
    assert at["mean"].dims == ("point",) and set(at.coords) == {"lat", "lon", "time"}
    np.testing.assert_allclose(at["mean"].values, m_pts.numpy(), rtol=1e-12)
    np.testing.assert_allclose(at["sd"].values, np.sqrt(v_pts.numpy()), rtol=1e-12)
    with pytest.raises(ValueError, match="include_noise=True applies to the"):
        gp.predict(include_noise=True)


def test_nan_prediction_points_are_rejected():
    values, axes = field((5, 4))
    gp = GridGP(values, axes, hyperparameters={"noise": 0.02})
    pts = torch.tensor([[1.0, 2.0], [float("nan"), 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"points holds NaN or inf coordinates \(1 rows, e.g. rows \[1\]\)"):
        gp.predict(pts)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("setting, value, error, match", [
    ("cg_max_iters", 0, ValueError, "cg_max_iters must be an integer >= 1, got 0"),
    ("cg_max_iters", 2.5, TypeError, "cg_max_iters must be an integer"),
    ("cg_tol", -1, ValueError, r"cg_tol must be a relative residual in \(0, 1\), got -1"),
    ("cg_tol", 0.0, ValueError, r"cg_tol must be a relative residual in \(0, 1\)"),
    ("cg_tol", float("nan"), ValueError, "cg_tol must be a relative residual"),
    ("cg_tol", "1e-5", TypeError, "cg_tol must be a number"),
    ("num_probes", 0, ValueError, "num_probes must be an integer >= 1"),
    ("variance_samples", 0, ValueError, "variance_samples must be an integer >= 1"),
    ("exact_variance_limit", -1, ValueError, "exact_variance_limit must be an integer >= 0"),
    ("exact_trace_limit", -5, ValueError, "exact_trace_limit must be an integer >= 0"),
    ("seed", -1, ValueError, "seed must be an integer >= 0"),
    ("standardize", "yes", TypeError, "standardize must be True or False"),
    ("precondition", 1, TypeError, "precondition must be True or False"),
])
def test_settings_are_checked_at_construction(setting, value, error, match):
    values, axes = field((4, 3))
    with pytest.raises(error, match=match):
        GridGP(values, axes, **{setting: value})


def test_settings_at_their_limits_work():
    values, axes = field((4, 3), missing=0.2)
    gp = GridGP(values, axes, cg_max_iters=1, num_probes=1, variance_samples=1, exact_variance_limit=0,
                exact_trace_limit=0, hyperparameters={"noise": 0.05}, path="cg")  # the CG settings are what is tested
    with pytest.warns(RuntimeWarning):
        mean, var = gp.predict()
    assert math.isfinite(float(mean.sum()))


def test_last_solve_reports_the_two_level_coarse_modes_of_a_hole_only():
    """``last_solve.coarse_modes``: the coarse space the cg path built for a hole (a public number the
    benchmarks read), ``None`` for scattered cells and on the exact paths."""
    v, axes = field((16, 16, 16))
    hole = v.clone()
    hole[5:11, 5:11, 5:11] = float("nan")
    gp = GridGP(hole, axes, path="cg", num_probes=4, exact_trace_limit=0)
    assert gp.last_solve.coarse_modes is None  # nothing computed yet
    gp.log_marginal_likelihood()
    modes = gp.last_solve.coarse_modes
    assert isinstance(modes, int) and 0 < modes <= 6**3, gp.last_solve
    scatter = v.clone()
    scatter.view(-1)[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(1))[:216]] = float("nan")
    for model in (GridGP(scatter, axes, path="cg", num_probes=4, exact_trace_limit=0), GridGP(v, axes),
                  GridGP(hole, axes, path="exact-missing")):
        model.log_marginal_likelihood()
        assert model.last_solve.coarse_modes is None, (model.path, model.last_solve)


def test_benchmarks_read_no_private_attribute_of_a_model():
    """benchmarks/gaps.py reads the model through its public report (``last_solve``, ``memory_plan``,
    ``path``...), not its private attributes (issue 25): no ``x._name`` attribute in its source."""
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parent.parent / "benchmarks" / "gaps.py"
    private = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(ast.parse(source.read_text()))
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not private, private


# ----------------------------------------------------------------------------- the mask changed in place


def _lml_grads_predict(gp):
    """Likelihood (data units), its gradients and the grid prediction at ``HYPER``."""
    gp.set_hyperparameters(HYPER)
    value = gp.log_marginal_likelihood()
    params = [p for p in gp.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, var = gp.predict(as_xarray=False)
    return float(value), grads, mean, var


def _dense_lml(gp) -> float:
    """``log p(y_O)`` in data units by a dense Cholesky of the observed cells (float64)."""
    from functools import reduce

    with torch.no_grad():
        fs = [k(a.unsqueeze(-1), a.unsqueeze(-1)).to_dense().double() for k, a in zip(gp.kernels, gp.axes)]
        obs = gp.observed
        cov = float(gp.outputscale) * reduce(torch.kron, fs)[obs][:, obs] + float(gp.noise) * torch.eye(int(obs.sum()),
                                                                                                        dtype=torch.float64)
        r = (gp.y.double() * gp.scale + gp.shift - gp.hyperparameters()["mean"])[obs]
        cov = cov * gp.scale**2
        chol = torch.linalg.cholesky(cov)
        a = torch.cholesky_solve(r.unsqueeze(-1), chol).squeeze(-1)
        return float(-0.5 * (r * a).sum() - torch.log(chol.diagonal()).sum() - 0.5 * r.numel() * math.log(2 * math.pi))


@pytest.mark.parametrize("path,hide", [("exact-missing", [3, 17, 40]), ("cg", [3, 17, 40, 41, 42, 60, 61])])
def test_hiding_observed_cells_in_place_matches_a_fresh_model(path, hide):
    """``gp.observed[i] = False`` after the model has run: the next likelihood, gradients and
    prediction are a fresh model's with those cells missing (and the dense Cholesky's), not the old
    mask's (its complement, box, count and plan were derived once)."""
    values, axes = field((6, 7, 5), missing=0.05, seed=3)
    gp = GridGP(values, axes, path=path, cg_tol=1e-10, standardize=False)  # the same parameters as fresh's
    before = _lml_grads_predict(gp)  # caches filled from the old mask
    flat = gp.observed.nonzero().reshape(-1)[hide]
    gp.observed[flat] = False
    hidden = values.clone().reshape(-1)
    hidden[flat] = float("nan")
    fresh = GridGP(hidden.reshape(values.shape), axes, path=path, cg_tol=1e-10, standardize=False)
    got, ref = _lml_grads_predict(gp), _lml_grads_predict(fresh)
    assert gp.n_observed == fresh.n_observed == int(gp.observed.sum())
    assert abs(before[0] - ref[0]) > 1e-4 * abs(ref[0])  # the old mask's likelihood is far outside the bound
    assert abs(got[0] - ref[0]) <= 1e-8 * abs(ref[0])
    assert abs(got[0] - _dense_lml(gp)) <= 1e-8 * abs(ref[0])
    for a, b in zip(got[1], ref[1]):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-9
    for a, b in zip(got[2:], ref[2:]):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm())
    assert gp.memory_plan("step").peak_bytes == fresh.memory_plan("step").peak_bytes


def test_marking_a_missing_cell_observed_in_place_is_a_clear_error():
    values, axes = field((6, 7, 5), missing=0.1, seed=4)
    gp = GridGP(values, axes)
    gp.log_marginal_likelihood()
    gp.observed[int((~gp.observed).nonzero()[0])] = True
    for call in (gp.log_marginal_likelihood, gp.predict, lambda: gp.loss_backward(cuda_graph=False)):
        with pytest.raises(ValueError, match="1 missing cells are marked observed.*new GridGP"):
            call()


def test_a_mask_change_that_would_choose_another_path_is_a_clear_error():
    """A land mask repeated along the last axis (separable-mask) loses its structure when one cell
    is hidden: the model's path is not the one its mask would now get, so it says so."""
    values, axes = field((8, 7, 6), seed=5)
    land = torch.rand(8, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    values[land] = float("nan")
    gp = GridGP(values, axes)
    assert gp.path == "separable-mask"
    gp.log_marginal_likelihood()
    gp.observed[int(gp.observed.nonzero()[5])] = False
    with pytest.raises(ValueError, match=r"hide 1 observed cells; the model's path is SeparableMaskPath.*would now "
                                         r"choose .*Build a new GridGP"):
        gp.log_marginal_likelihood()
    forced = GridGP(values, axes, path="separable-mask")
    forced.observed[int(forced.observed.nonzero()[5])] = False
    with pytest.raises(ValueError, match="path='separable-mask' no longer applies .*mask constant along"):
        forced.predict(as_xarray=False)


def test_values_changed_in_place_match_a_fresh_model():
    """Nothing is derived from the (standardised) values once: an in-place change of ``gp.y`` gives the
    likelihood of a fresh model built from the changed values (same hyperparameters, data units)."""
    values, axes = field((6, 7, 5), missing=0.1, seed=6)
    gp = GridGP(values, axes)
    _lml_grads_predict(gp)
    with torch.no_grad():
        gp.y[gp.observed] += 0.3 * torch.linspace(-1, 1, gp.n_observed, dtype=gp.y.dtype)
    changed = (gp.y * gp.scale + gp.shift).reshape(values.shape).clone()
    changed[~gp.observed.reshape(values.shape)] = float("nan")
    got, ref = _lml_grads_predict(gp), _lml_grads_predict(GridGP(changed, axes))
    assert abs(got[0] - ref[0]) <= 1e-9 * abs(ref[0])
    for a, b in zip(got[2:], ref[2:]):
        assert float((a - b).norm()) <= 1e-8 * float(b.norm())


@pytest.mark.cuda
def test_hiding_cells_after_a_recorded_cuda_graph_replays_a_fresh_step():
    """A CUDA graph of the training step holds the old observed count: hiding cells in place drops it
    and the next step's loss is a fresh model's."""
    values, axes = field((12, 10, 8), missing=0.2, seed=7)
    gp = GridGP(values, axes, path="cg", device="cuda", exact_trace_limit=0, cg_tol=1e-8)
    gp.set_hyperparameters(HYPER)
    for _ in range(2):
        gp.loss_backward(cuda_graph=True)
    flat = gp.observed.nonzero().reshape(-1)[:50]
    gp.observed[flat] = False
    hidden = values.clone().reshape(-1)
    hidden[flat.cpu()] = float("nan")
    fresh = GridGP(hidden.reshape(values.shape), axes, path="cg", device="cuda", exact_trace_limit=0, cg_tol=1e-8)
    fresh.set_hyperparameters(HYPER)
    a, b = float(gp.loss_backward(cuda_graph=True)), float(fresh.loss_backward(cuda_graph=True))
    assert abs(a - b) <= 1e-5 * abs(b)
