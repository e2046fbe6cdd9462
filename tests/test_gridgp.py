"""GridGP against a dense GPyTorch ExactGP (same kernels, likelihood, hyperparameters).

The reference is an ``ExactGP`` on the observed cells whose covariance is
``ScaleKernel(Π_k kernel_k(x_k, x_k'))`` (deep copies of GridGP's own kernel modules),
with ``GaussianLikelihood`` (or ``FixedNoiseGaussianLikelihood`` for per-cell noise),
evaluated by dense Cholesky (``max_cholesky_size`` raised above the problem size).
Gradients are compared parameter by parameter (raw parameters, identical constraints).
"""

import copy
import math
import warnings

import gpytorch
import numpy as np
import pytest
import torch
from gpytorch.constraints import GreaterThan

from kronegp.models import GridGP

# ----------------------------------------------------------------------------- reference


class _PerDimProduct(gpytorch.kernels.Kernel):
    def __init__(self, kernels):
        super().__init__()
        self.kernels = torch.nn.ModuleList(kernels)

    def forward(self, x1, x2, diag=False, **params):
        out = None
        for k, kern in enumerate(self.kernels):
            kk = kern(x1[..., k : k + 1], x2[..., k : k + 1], diag=diag)
            kk = kk if diag else kk.to_dense()
            out = kk if out is None else out * kk
        return out


class _DenseGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernels):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(_PerDimProduct(kernels))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _dense(model):
    pts = model.layout.grid_points(model.axes)
    obs = model.observed if model.observed is not None else torch.ones_like(model.y, dtype=torch.bool)
    if model.learn_noise:
        lik = gpytorch.likelihoods.GaussianLikelihood(noise_constraint=GreaterThan(1e-6))
    else:
        lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=model.cell_noise[obs].clone())
    ref = _DenseGP(pts[obs], model.y[obs], lik, [copy.deepcopy(k) for k in model.kernels]).to(model.y.dtype)
    lik = lik.to(model.y.dtype)
    with torch.no_grad():
        ref.covar_module.raw_outputscale.copy_(model.raw_outputscale)
        if model.learn_noise:
            lik.noise_covar.raw_noise.copy_(model.raw_noise.reshape(1))
        ref.mean_module.raw_constant.copy_(model.mean_module.raw_constant)
    pairs = [
        (kk.raw_lengthscale, rk.raw_lengthscale)
        for kk, rk in zip(model.kernels, ref.covar_module.base_kernel.kernels)
    ]
    pairs.append((model.raw_outputscale, ref.covar_module.raw_outputscale))
    pairs.append((model.mean_module.raw_constant, ref.mean_module.raw_constant))
    if model.learn_noise:
        pairs.append((model.raw_noise, lik.noise_covar.raw_noise))
    return ref, lik, pairs


def _dense_settings():
    return (
        gpytorch.settings.max_cholesky_size(10**9),
        gpytorch.settings.fast_computations(False, False, False),
        gpytorch.settings.fast_pred_var(False),
    )


def reference_lml_and_grads(model):
    ref, lik, pairs = _dense(model)
    ref.train(), lik.train()
    a, b, c = _dense_settings()
    with a, b, c:
        out = ref(*ref.train_inputs)
        lml = gpytorch.mlls.ExactMarginalLogLikelihood(lik, ref)(out, ref.train_targets) * ref.train_targets.numel()
    grads = torch.autograd.grad(lml, [p[1] for p in pairs])
    # GridGP reports data units; with standardize=False those are the model's units.
    return lml.detach(), torch.cat([g.reshape(-1) for g in grads])


def model_lml_and_grads(model):
    _, _, pairs = _dense(model)
    lml = model.log_marginal_likelihood()
    grads = torch.autograd.grad(lml, [p[0] for p in pairs])
    return lml.detach(), torch.cat([g.reshape(-1) for g in grads])


def reference_predict(model, points):
    ref, lik, _ = _dense(model)
    ref.eval(), lik.eval()
    a, b, c = _dense_settings()
    with torch.no_grad(), a, b, c, warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.GPInputWarning)
        post = ref(points)
        return post.mean, post.variance


def rel(a, b):
    return float((a - b).norm() / b.norm())


def max_rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


# ----------------------------------------------------------------------------- data


def smooth_field(shape, dtype, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    axes = [torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * n).values for n in shape]
    axes = [a + torch.arange(len(a), dtype=torch.float64) * 0.3 for a in axes]  # strictly increasing
    mesh = torch.meshgrid(*axes, indexing="ij")
    field = sum(torch.sin(m / (2.0 + k)) for k, m in enumerate(mesh)) + 1.5
    field = field + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return field.to(dtype), [a.to(dtype) for a in axes]


def random_points(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = []
    for ax in model.axes:
        lo, hi = float(ax.min()), float(ax.max())
        cols.append(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(cols, -1).to(model.y.dtype)


# ----------------------------------------------------------------------------- exact path


@pytest.mark.parametrize(
    "shape",
    [(7, 12, 3), (61,), (12, 5), (3, 4, 2, 5), (6, 5, 6), (5, 5, 5)],
    ids=["7x12x3", "61", "12x5", "3x4x2x5", "6x5x6", "5x5x5"],  # equal sizes: batched factor gradients
)
def test_exact_path_matches_dense_float64(shape):
    values, axes = smooth_field(shape, torch.float64)
    axes[0] = axes[0].flip(0)  # a decreasing axis (latitude 90 → −90) is fine
    model = GridGP(values, axes, standardize=False)
    assert model.path == "exact"
    with torch.no_grad():  # move off the initial values so every gradient term matters
        for k, kern in enumerate(model.kernels):
            kern.lengthscale = kern.lengthscale * (0.7 + 0.2 * k)
        model.raw_noise.add_(-1.0)
    lml, grads = model_lml_and_grads(model)
    ref_lml, ref_grads = reference_lml_and_grads(model)
    assert abs(float(lml - ref_lml)) / abs(float(ref_lml)) < 1e-8
    assert rel(grads, ref_grads) < 1e-8
    assert max_rel(grads, ref_grads) < 1e-6

    mean, var = model.predict()
    ref_mean, ref_var = reference_predict(model, model.layout.grid_points(model.axes))
    assert mean.shape == shape and var.shape == shape
    assert rel(mean.reshape(-1), ref_mean) < 1e-8
    assert max_rel(var.reshape(-1), ref_var) < 1e-8

    pts = random_points(model, 17)
    mean, var = model.predict(pts)
    ref_mean, ref_var = reference_predict(model, pts)
    assert mean.shape == (17,)
    assert rel(mean, ref_mean) < 1e-8
    assert max_rel(var, ref_var) < 1e-8
    _, var_y = model.predict(pts, include_noise=True)
    assert max_rel(var_y, ref_var + model.noise.detach()) < 1e-8


def test_exact_path_float32():
    values, axes = smooth_field((12, 9, 5), torch.float64)
    m64 = GridGP(values, axes, standardize=False)
    m32 = GridGP(values.float(), [a.float() for a in axes], standardize=False)
    assert m32.y.dtype == torch.float32
    ref_lml, ref_grads = reference_lml_and_grads(m64)
    lml, grads = model_lml_and_grads(m32)
    assert abs(float(lml) - float(ref_lml)) / abs(float(ref_lml)) < 1e-5
    assert rel(grads.double(), ref_grads) < 1e-4
    mean, var = m32.predict()
    ref_mean, ref_var = reference_predict(m64, m64.layout.grid_points(m64.axes))
    assert rel(mean.reshape(-1).double(), ref_mean) < 1e-5
    assert max_rel(var.reshape(-1).double(), ref_var) < 1e-3


def test_standardize_reports_data_units():
    values, axes = smooth_field((6, 8, 5), torch.float64)
    values = 250.0 + 30.0 * values  # e.g. kelvin
    std = GridGP(values, axes)
    raw = GridGP(values, axes, standardize=False)
    with torch.no_grad():  # give the raw model the standardised model's hyperparameters in data units
        for ks, kr in zip(std.kernels, raw.kernels):
            kr.raw_lengthscale.copy_(ks.raw_lengthscale)
        hp = std.hyperparameters()
        raw.raw_outputscale.copy_(raw.outputscale_constraint.inverse_transform(torch.tensor(hp["outputscale"], dtype=torch.float64)))
        raw.raw_noise.copy_(raw.noise_constraint.inverse_transform(torch.tensor(hp["noise"], dtype=torch.float64)))
        raw.mean_module.constant.fill_(hp["mean"])
    assert abs(float(std.log_marginal_likelihood() - raw.log_marginal_likelihood())) < 1e-8 * abs(float(raw.log_marginal_likelihood()))
    for a, b in zip(std.predict(), raw.predict()):
        assert rel(a, b) < 1e-10
    assert hp["path"] == "exact" and len(hp["lengthscales"]) == 3


# ----------------------------------------------------------------------------- cg path


def cg_problem(kind, dtype=torch.float64, shape=(15, 16, 13), **kw):
    values, axes = smooth_field(shape, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    if kind in ("mask", "both"):
        values = values.clone()
        values[torch.rand(shape, generator=g) < 0.2] = float("nan")
    if kind in ("noise", "both"):
        kw["noise"] = (0.01 + 0.05 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    kw.setdefault("path", "cg")  # (the default path of few missing cells is exact-missing: tests/test_gaps.py)
    return GridGP(values, axes, standardize=False, **kw)


# Per-cell noise makes every cell enter the trace: a grid of ≤ exact_trace_limit (1024)
# cells keeps the default settings exact; the masked grid has ~620 missing cells.
CG_SHAPES = {"mask": (15, 16, 13), "noise": (10, 12, 8), "both": (10, 12, 8)}


def assert_cg_matches_dense(model, n_points, lml_tol, grad_tol, mean_tol, var_tol):
    """Likelihood, gradients and prediction at random points against the dense reference."""
    assert model.path == "cg"
    lml, grads = model_lml_and_grads(model)
    ref_lml, ref_grads = reference_lml_and_grads(model)
    assert abs(float(lml - ref_lml)) / abs(float(ref_lml)) < lml_tol
    assert rel(grads, ref_grads) < grad_tol
    pts = random_points(model, n_points)
    mean, var = model.predict(pts)
    ref_mean, ref_var = reference_predict(model, pts)
    assert rel(mean, ref_mean) < mean_tol
    assert max_rel(var, ref_var) < var_tol


@pytest.mark.parametrize("kind", [pytest.param("mask", marks=pytest.mark.slow), "noise",
                                  pytest.param("both", marks=pytest.mark.slow)])
def test_cg_path_matches_dense_default_settings(kind):
    model = cg_problem(kind, shape=CG_SHAPES[kind])
    assert_cg_matches_dense(model, 40, lml_tol=1e-3, grad_tol=1e-3, mean_tol=1e-3, var_tol=1e-3)


@pytest.mark.parametrize("kind", ["mask", "noise", pytest.param("both", marks=pytest.mark.slow)])
@pytest.mark.parametrize("probes", ["exact", "random"])
def test_cg_path_row_and_column_layouts_agree(kind, probes, monkeypatch):
    """The local solves hold their vectors as rows (cov.rows); the sharded model uses the
    column layout. Same likelihood and gradients either way (same probes)."""
    limit = {} if probes == "exact" else {"exact_trace_limit": 0}
    model = cg_problem(kind, shape=CG_SHAPES[kind], **limit)
    torch.manual_seed(0)
    lml_rows, grads_rows = model_lml_and_grads(model)
    from kronegp.models.paths import CGPath

    full_cov = CGPath.covariance

    def columns_cov(self, gp, factors):
        cov = full_cov(self, gp, factors)
        assert cov.rows
        cov.rows = False
        return cov

    monkeypatch.setattr(CGPath, "covariance", columns_cov)
    torch.manual_seed(0)
    lml_cols, grads_cols = model_lml_and_grads(model)
    assert abs(float(lml_rows - lml_cols)) <= 1e-9 * abs(float(lml_cols))
    assert rel(grads_rows, grads_cols) < 1e-7


@pytest.mark.parametrize("probes", ["exact", "random"])
def test_missing_cell_pairs_in_eigen_coordinates_match_grid_pairs(probes, monkeypatch):
    """With homoskedastic noise the missing-cell gradient pairs stay in eigen-coordinates
    (``eigen_bilinear_form``); on the same solves they must give the gradient of the grid-
    coordinate pairs (``bilinear_form`` + noise term), which the dense tests check."""
    from kronegp.models import _masked, paths

    limit = {} if probes == "exact" else {"exact_trace_limit": 0}
    model = cg_problem("mask", shape=CG_SHAPES["mask"], **limit)
    calls = []
    real = paths.eigen_bilinear_form
    monkeypatch.setattr(paths, "eigen_bilinear_form", lambda *a: calls.append(1) or real(*a))
    lml_eig, grads_eig = model_lml_and_grads(model)
    assert calls, "the eigen-coordinate pairs were not used"
    monkeypatch.setattr(_masked, "_EIGEN_PAIRS", False)
    n_calls = len(calls)
    lml_grid, grads_grid = model_lml_and_grads(model)
    assert len(calls) == n_calls
    assert abs(float(lml_eig - lml_grid)) <= 1e-12 * abs(float(lml_grid))
    assert rel(grads_eig, grads_grid) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mask", "noise"])
def test_cg_path_stochastic_estimates(kind):
    """Random probes (forced): SLQ and trace estimates within their statistical error.

    The log-likelihood error is bounded per observed cell (the likelihood of data that
    the model fits well can be near 0, where a relative bound says nothing).
    """
    model = cg_problem(kind, exact_trace_limit=0)
    lml, grads = model_lml_and_grads(model)
    ref_lml, ref_grads = reference_lml_and_grads(model)
    assert abs(float(lml - ref_lml)) / model.n_observed < 1e-3
    # 16 probes: per-cell noise's gradient estimate is off by 1.5–4.7 % over probe seeds 0–5
    # (1.0–1.8 % with 64 probes: Monte Carlo's 1/√probes), the masked grid's by 0.1–0.6 %
    assert rel(grads, ref_grads) < (6e-2 if kind == "noise" else 2e-2)


@pytest.mark.slow
def test_cg_path_grid_prediction_matches_dense():
    model = cg_problem("mask")
    mean, var = model.predict()  # 3120 cells ≤ exact_variance_limit: one solve per cell
    ref_mean, ref_var = reference_predict(model, model.layout.grid_points(model.axes))
    assert rel(mean.reshape(-1), ref_mean) < 1e-3
    assert max_rel(var.reshape(-1), ref_var) < 1e-3
    # The Monte Carlo estimate is unbiased with error ∝ 1/√samples: loose, but it must be close.
    _, var_mc = model.predict(variance="mc")
    assert float(((var_mc - var).abs() / var).median()) < 0.1


@pytest.mark.parametrize("kind", [pytest.param("mask", marks=pytest.mark.slow), "noise",
                                  pytest.param("both", marks=pytest.mark.slow)])
def test_cg_path_tighter_settings_are_tighter(kind):
    """With exact traces (≤ 1024 cells concerned) and a tight CG tolerance the CG path —
    the Schur complement for missing cells, CG in eigen-coordinates for per-cell noise,
    both nested — agrees with the dense reference to near float64 rounding."""
    model = cg_problem(kind, shape=CG_SHAPES[kind], cg_tol=1e-10)
    assert_cg_matches_dense(model, 20, lml_tol=1e-8, grad_tol=1e-7, mean_tol=1e-7, var_tol=1e-6)


def test_preconditioner_cuts_cg_iterations():
    for kind in ("mask", "noise"):
        with_pc = cg_problem(kind, exact_trace_limit=0)
        without = cg_problem(kind, precondition=False, exact_trace_limit=0)
        a = float(with_pc.log_marginal_likelihood())
        b = float(without.log_marginal_likelihood())
        assert with_pc.cg_iterations * 4 <= without.cg_iterations, (kind, with_pc.cg_iterations, without.cg_iterations)
        # Both estimate the same likelihood, within their SLQ errors (per observed cell;
        # unpreconditioned SLQ has the larger variance).
        assert abs(a - b) / with_pc.n_observed < 1e-2


def test_cg_path_float32_runs_and_agrees():
    m64 = cg_problem("mask")
    m32 = cg_problem("mask", dtype=torch.float32)
    a, b = float(m32.log_marginal_likelihood()), float(m64.log_marginal_likelihood())
    assert abs(a - b) < 1e-3 * abs(b)
    pts = random_points(m64, 10)
    mean32, var32 = m32.predict(pts.float())
    mean64, var64 = m64.predict(pts)
    assert rel(mean32.double(), mean64) < 1e-3
    assert max_rel(var32.double(), var64) < 1e-2


# ----------------------------------------------------------------------------- API


def test_samples_match_posterior_moments():
    values, axes = smooth_field((6, 5, 4), torch.float64)
    for model in (GridGP(values, axes), cg_problem("mask", shape=(8, 7, 6))):
        mean, var = model.predict()
        torch.manual_seed(0)
        n = 3000
        s = model.sample(n)
        assert s.shape == (n, *model.shape)
        se = (var / n).sqrt()
        assert float(((s.mean(0) - mean).abs() / se).max()) < 5.5
        # Sample variance: relative standard error √(2/n) ≈ 2.6%; max over ≤ 336 cells.
        assert float(((s.var(0) - var).abs() / var).max()) < 0.15


def test_fit_adam_and_lbfgs_decrease_loss():
    values, axes = smooth_field((10, 9, 6), torch.float64)
    for opt in ("adam", "lbfgs"):
        model = GridGP(values, axes)
        hist = model.fit(iters=15, optimizer=opt, progress=False)
        assert hist is model.history and len(hist) >= 3
        assert hist[-1] < hist[0]
        assert all(math.isfinite(h) for h in hist)
    model = cg_problem("mask", shape=(9, 8, 7))
    start = float(-model.log_marginal_likelihood().detach()) / model.n_observed
    hist = model.fit(iters=2, optimizer="lbfgs", progress=False)
    assert hist[-1] < start


def test_fit_stops_early_and_shows_progress(capsys):
    values, axes = smooth_field((8, 7), torch.float64)
    model = GridGP(values, axes)
    model.fit(iters=500, optimizer="lbfgs", progress=True)
    assert len(model.history) < 500
    err = capsys.readouterr().err
    assert "loss=" in err


def test_hyperparameters_in_data_units():
    values, axes = smooth_field((8, 7, 5), torch.float64)
    scaled = GridGP(100 * values, [10 * a for a in axes])
    base = GridGP(values, axes)
    hs, hb = scaled.hyperparameters(), base.hyperparameters()
    for a, b in zip(hs["lengthscales"], hb["lengthscales"]):
        assert abs(a - 10 * b) < 1e-6 * a
    assert abs(hs["outputscale"] - 1e4 * hb["outputscale"]) < 1e-6 * hs["outputscale"]
    assert abs(hs["noise"] - 1e4 * hb["noise"]) < 1e-6 * hs["noise"]
    assert abs(hs["mean"] - 100 * hb["mean"]) < 1e-6 * abs(hs["mean"])
    assert cg_problem("noise").hyperparameters()["noise"] == "per-cell (fixed)"


def test_to_dtype_and_numpy_input():
    values, axes = smooth_field((6, 7, 3), torch.float64)
    model = GridGP(values.numpy(), [a.numpy() for a in axes])
    assert model.y.dtype == torch.float64
    m32 = GridGP(values.numpy(), [a.numpy() for a in axes]).to(dtype=torch.float32)
    assert m32.y.dtype == torch.float32 and m32.raw_outputscale.dtype == torch.float32
    a, b = model.predict(), m32.predict()
    assert rel(b[0].double(), a[0]) < 1e-5


def test_mask_argument_and_nan():
    values, axes = smooth_field((6, 7, 3), torch.float64)
    mask = torch.ones(values.shape, dtype=torch.bool)
    mask[0, 0, 0] = False
    mask[1, 1, 1] = False
    v = values.clone()
    v[1, 1, 1] = float("nan")  # NaN where the mask says missing: consistent
    model = GridGP(v, axes, mask=mask)
    assert model.n_observed == values.numel() - 2 and model.path == "exact-missing"
    v[2, 2, 2] = float("nan")  # NaN where the mask says observed: ambiguous, refused
    with pytest.raises(ValueError, match="values is NaN at cells that mask marks observed"):
        GridGP(v, axes, mask=mask)


def test_xarray_input_reads_coordinates():
    xr = pytest.importorskip("xarray")
    values, axes = smooth_field((5, 6, 4), torch.float64)
    times = np.array("2020-01-01", dtype="datetime64[D]") + np.arange(4) * 2
    da = xr.DataArray(values.numpy(), dims=("lat", "lon", "time"),
                      coords={"lat": axes[0].numpy(), "lon": axes[1].numpy(), "time": times})
    model = GridGP(da)
    assert model.axis_names == ["lat", "lon", "time"]
    assert torch.allclose(model.axes[0], axes[0])
    assert torch.allclose(model.axes[2], torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64))
    assert model.axis_units[2] == "days"


# ----------------------------------------------------------------------------- errors


def test_bad_input_errors():
    values, axes = smooth_field((5, 6), torch.float64)
    with pytest.raises(ValueError, match=r"axes\[1\] has length 5 but values has 6"):
        GridGP(values, [axes[0], axes[1][:5]])
    with pytest.raises(ValueError, match="one 1-D array per dimension"):
        GridGP(values, [axes[0]])
    bad = axes[1].clone()
    bad[3] = bad[1]
    with pytest.raises(ValueError, match=r"axes\[1\] must be strictly monotone"):
        GridGP(values, [axes[0], bad])
    with pytest.raises(ValueError, match="every cell is missing"):
        GridGP(torch.full((5, 6), float("nan"), dtype=torch.float64), axes)
    with pytest.raises(ValueError, match="noise variances must be positive"):
        GridGP(values, axes, noise=-torch.ones(5, 6, dtype=torch.float64))
    noise = torch.ones(5, 6, dtype=torch.float64)
    noise[2, 2] = float("nan")
    with pytest.raises(ValueError, match="noise must be finite"):
        GridGP(values, axes, noise=noise)
    with pytest.raises(ValueError, match="noise must be a scalar or broadcast to the grid shape"):
        GridGP(values, axes, noise=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"kernels\[0\] has ard_num_dims=2"):
        GridGP(values, axes, kernels=[gpytorch.kernels.RBFKernel(ard_num_dims=2), gpytorch.kernels.RBFKernel()])
    with pytest.raises(ValueError, match=r"kernels\[1\] .* does not accept 1-D inputs"):
        GridGP(values, axes, kernels=[gpytorch.kernels.RBFKernel(), gpytorch.kernels.RBFKernel(active_dims=[2])])
    with pytest.raises(ValueError, match="one kernel per dimension"):
        GridGP(values, axes, kernels=[gpytorch.kernels.RBFKernel()])
    with pytest.raises(TypeError, match="mask must be a boolean"):
        GridGP(values, axes, mask=torch.ones(5, 6))
    with pytest.raises(ValueError, match="mask must have the grid shape"):
        GridGP(values, axes, mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="values must be a real-valued"):
        GridGP(np.array([["a", "b"]]))
    model = GridGP(values, axes)
    with pytest.raises(ValueError, match=r"points must have shape \(n, 2\)"):
        model.predict(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="points has dtype torch.float32"):
        model.predict(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'lbfgs'"):
        model.fit(optimizer="sgd")


def test_cg_warns_when_not_converged():
    model = cg_problem("noise", cg_max_iters=2)
    with pytest.warns(RuntimeWarning, match="relative residual"):
        model.log_marginal_likelihood()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_bilinear_form_value_and_factor_gradients_match_dense(dtype, tol):
    from kronegp.models._kron import bilinear_form

    g = torch.Generator().manual_seed(5)
    sizes = [3, 12, 7]
    factors = [torch.randn(n, n, dtype=dtype, generator=g).requires_grad_(i != 1) for i, n in enumerate(sizes)]
    n = math.prod(sizes)
    left = torch.randn(n, 4, dtype=dtype, generator=g)
    right = torch.randn(n, 4, dtype=dtype, generator=g)
    value = bilinear_form(left, right, factors)
    dense = factors[0]
    for f in factors[1:]:
        dense = torch.kron(dense, f)
    expected = (left * (dense @ right)).sum()
    assert abs(float(value) - float(expected)) <= tol * float((left.abs() * (dense.abs() @ right.abs())).sum())
    ours = torch.autograd.grad(value, [factors[0], factors[2]])
    want = torch.autograd.grad(expected, [factors[0], factors[2]])
    for a, b in zip(ours, want):
        assert (a - b).norm() / b.norm() < tol


@pytest.mark.parametrize("sizes", [[3, 12, 7], [5, 4], [6, 6, 6], [9]])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_eigen_bilinear_form_value_and_factor_gradients_match_dense(sizes, dtype, tol):
    """The form of vectors given in eigen-coordinates: value and factor gradients of
    Σ_c a_cᵀ (⊗K_k) b_c with a = Q ã, b = Q b̃, against a dense Kronecker product."""
    from kronegp.models._exact import eigen_bilinear_form
    from kronegp.models._kron import KronEigen

    g = torch.Generator().manual_seed(6)
    factors = []
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64, generator=g)
        factors.append((a @ a.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype).requires_grad_(True))
    eig = KronEigen(factors)
    n = math.prod(sizes)
    at = torch.randn(3, n, dtype=dtype, generator=g)
    bt = torch.randn(3, n, dtype=dtype, generator=g)
    value = eigen_bilinear_form(at, bt, eig, factors)
    q = eig.vecs[0]
    for v in eig.vecs[1:]:
        q = torch.kron(q, v)
    left, right = q @ at.mT, q @ bt.mT  # grid vectors (n, 3)
    dense = factors[0]
    for f in factors[1:]:
        dense = torch.kron(dense, f)
    expected = (left * (dense @ right)).sum()
    scale = float((left.abs() * (dense.abs() @ right.abs())).sum())
    assert abs(float(value) - float(expected)) <= 10 * tol * scale
    ours = torch.autograd.grad(value, factors)
    want = torch.autograd.grad(expected, factors)
    for a, b in zip(ours, want):
        assert (a - b).norm() / b.norm() < 10 * tol


def test_k_split_cuts_long_contractions_into_equal_chunks():
    from kronegp.models._exact import _k_split

    for length in (1, 7, 511, 1024, 1200, 2112, 16384, 46720, 7919 * 2, 2**20):
        s, k = _k_split(length)
        assert s * k == length and 1 <= s <= 32
        assert s == 1 or k >= 512
    assert _k_split(16384) == (32, 512)
    assert _k_split(1000) == (1, 1000)  # too short to cut into chunks of 512


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("sizes", [[8, 33, 64], [3, 40, 30], [1100, 2], [6, 5, 4]])
def test_off_axis_gram_matches_its_definition(sizes, split):
    """Σ_c Σ a[c, j] w[j∖i] b[c, j'] over pairs equal off axis i, on every axis, with the first
    axis's contraction whole or cut into chunks (long enough to cut in the first two shapes)."""
    from kronegp.models._exact import _off_axis_gram

    g = torch.Generator().manual_seed(11)
    n_all, c = math.prod(sizes), 3
    a = torch.randn(c, n_all, dtype=torch.float64, generator=g)
    b = torch.randn(c, n_all, dtype=torch.float64, generator=g)
    for i, n in enumerate(sizes):
        weight = torch.rand(n_all // n, dtype=torch.float64, generator=g) + 0.5
        ai = a.view(c, *sizes).movedim(1 + i, 1).reshape(c, n, -1)
        bi = b.view(c, *sizes).movedim(1 + i, 1).reshape(c, n, -1)
        want = torch.einsum("cpr,r,cqr->pq", ai, weight, bi)
        got = _off_axis_gram(a, b, sizes, i, weight, split=split)
        assert (got - want).norm() / want.norm() < 1e-13


@pytest.mark.parametrize("sizes", [[32, 32, 32], [40, 30, 20], [6, 5, 4, 3]])
@pytest.mark.parametrize("chunk", [1, 700, 10**7])
def test_eigen_factor_gradients_match_their_definition(sizes, chunk):
    """M_i = X_i diag(L_i) X_iᵀ and v_i = W_i L_i (module docstring of kronegp.models._exact) as
    the chunked slab sums compute them, against einsums (w = 1/(s²λ + σ²))."""
    from kronegp.linalg import kron_vector
    from kronegp.models._exact import _slab_sums
    from kronegp.models._kron import KronEigen

    g = torch.Generator().manual_seed(12)
    factors = []
    for n in sizes:
        m = torch.randn(n, n, dtype=torch.float64, generator=g)
        factors.append(m @ m.mT / n + 0.1 * torch.eye(n, dtype=torch.float64))
    eig = KronEigen(factors)
    n_all = math.prod(sizes)
    alpha_t = torch.randn(n_all, dtype=torch.float64, generator=g)
    s2, noise = torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    lam = eig.eigvals()
    w = 1 / (s2 * lam + noise)
    got = _slab_sums(eig, alpha_t, noise, s2, list(range(len(sizes))), chunk)
    assert abs(float(got["w"] - w.sum())) < 1e-12 * float(w.sum())
    assert abs(float(got["qform"] - (lam * alpha_t**2).sum())) < 1e-12 * float((lam * alpha_t**2).sum())
    for i, n in enumerate(sizes):
        others = kron_vector(eig.vals[:i] + eig.vals[i + 1 :])
        x = alpha_t.view(sizes).movedim(i, 0).reshape(n, -1)
        wi = w.view(sizes).movedim(i, 0).reshape(n, -1)
        gram = torch.einsum("pr,r,qr->pq", x, others, x)
        assert (got["gram"][i] - gram).norm() / gram.norm() < 1e-12
        assert (got["v"][i] - wi @ others).norm() / (wi @ others).norm() < 1e-12
