"""Unmodified GPyTorch models per training step, with and without ``kronegp.patch_gpytorch()``.

Cases (each in the chosen dtypes):

* ``grid``      exact GP, ``GridKernel(RBFKernel)`` on a full 3-D grid (default 128³), Gaussian
                noise: Kronecker eigendecomposition solves and log-determinants.
* ``multitask`` exact multitask GP, ``MultitaskKernel(GridKernel(RBFKernel) on a 2-D grid,
                num_tasks)`` (default 64 tasks × 400·250 = 10⁵ points), one noise level:
                a Kronecker product whose first factor is itself a Kronecker product.
* ``kiss``      KISS-GP, ``ScaleKernel(GridInterpolationKernel(RBFKernel))`` on a 3-D grid
                (default 64³ inducing points, 10⁵ scattered points): CG and stochastic
                Lanczos quadrature, every iteration a Kronecker product. The pivoted
                Cholesky preconditioner is off in both variants (its backward needs
                ``rank × n × 64 × 64`` index tensors, out of memory at this size).
* ``bilinear``  ``_bilinear_derivative`` alone for 3-D Kronecker products with ``T = 11``
                probe columns (GP-shaped): kronegp's closed form against
                linear_operator's autograd through its matmul loop.

A training step is ``loss = -mll(model(x), y); loss.backward()`` with
``gpytorch.settings.max_cholesky_size(0)`` (the structured path). Both runs of a model
start from the same parameters and the same random probes; the loss difference between
them is reported as a correctness check. Times are medians over ``--repeats`` timed runs
after ``--warmup`` runs (CUDA events on a GPU, ``perf_counter`` on the CPU).

    python benchmarks/gpytorch_models.py --out results.json               # GPU, full sizes
    python benchmarks/gpytorch_models.py --device cpu --small --out s.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import warnings

import gpytorch
import linear_operator
import torch
from linear_operator.operators import KroneckerProductLinearOperator, LinearOperator

import kronegp
from kronegp.operators import KroneckerOperator
from timing import time_call

SIZES = {
    "full": {
        "grid": (128, 128, 128),
        "multitask": {"grid": (400, 250), "tasks": 64},
        "kiss": {"grid": 64, "points": 100_000},
        "bilinear": [(64, 64, 64), (128, 128, 128), (64, 128, 365), (24, 24, 72)],
        "probes": 11,
    },
    "small": {
        "grid": (12, 9, 10),
        "multitask": {"grid": (20, 15), "tasks": 8},
        "kiss": {"grid": 12, "points": 2000},
        "bilinear": [(12, 9, 10), (24, 24, 7)],
        "probes": 11,
    },
}


# ------------------------------------------------------------------ models (unmodified GPyTorch)


class GridModel(gpytorch.models.ExactGP):
    def __init__(self, grid, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.GridKernel(gpytorch.kernels.RBFKernel(), grid=grid)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MultitaskGridModel(gpytorch.models.ExactGP):
    def __init__(self, grid, x, y, likelihood, tasks):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=tasks)
        data_kernel = gpytorch.kernels.GridKernel(gpytorch.kernels.RBFKernel(), grid=grid)
        self.covar_module = gpytorch.kernels.MultitaskKernel(data_kernel, num_tasks=tasks, rank=1)

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


class KissModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, grid_size):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.GridInterpolationKernel(
                gpytorch.kernels.RBFKernel(), grid_size=grid_size, num_dims=3, grid_bounds=((0.0, 1.0),) * 3
            )
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


# ------------------------------------------------------------------ a GridGP problem as GPyTorch models
#
# One home for the GPyTorch anchors of ``gp_training.py`` and ``gaps.py``: a grid of values with
# missing cells and/or per-cell noise, as GPyTorch can take it. Each ``*_setting`` returns a
# ``Setting``: the training step (``loss = -mll; loss.backward()``, GPyTorch's default solver
# settings), ``lml()`` (log p(y_O) as that step estimates it, data units) and a cost estimate
# made before any step runs.

MISSING_VARIANCE = 1e4
"""Fixed noise variance on missing cells for ``GridKernel``, which needs every grid point as an
input: the missing cells then barely inform the rest (times the signal variance ``outputscale +
noise`` where hyperparameters are given)."""

STEP_MATMULS = 30
"""Products with the training covariance per GPyTorch CG training step, for the estimate: at
its default settings the forward runs ``max_lanczos_quadrature_iterations`` (20) CG iterations
on the targets and ``num_trace_samples`` (10) probes together, plus the preconditioner, the
bilinear derivative and margin."""


class MaternGridModel(gpytorch.models.ExactGP):
    """``[ScaleKernel](GridKernel(MaternKernel(ν=5/2, ARD)))`` on a full grid: ``⊗_k Matérn_1d(ℓ_k)``
    (GridKernel evaluates the base kernel per dimension), GridGP's default kernel."""

    def __init__(self, grid, x, y, likelihood, scale: bool):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        kern = gpytorch.kernels.GridKernel(gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=len(grid)), grid=grid)
        self.covar_module = gpytorch.kernels.ScaleKernel(kern) if scale else kern

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MaternPointsModel(gpytorch.models.ExactGP):
    """``ScaleKernel(∏_k MaternKernel(ν=5/2, active_dims=[k]))`` on scattered points (the observed
    cells): the same covariance as ``MaternGridModel`` restricted to them."""

    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        parts = [gpytorch.kernels.MaternKernel(nu=2.5, active_dims=[k]) for k in range(x.shape[-1])]
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.ProductKernel(*parts))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class Setting:
    """One GPyTorch setting on one problem: ``step()``, ``lml()``, ``estimate() -> (s, bytes)``."""

    def __init__(self, name, step, lml, estimate, context):
        self.name, self.step, self.lml, self.estimate, self.context = name, step, lml, estimate, context


def _set_hyper(model, likelihood, hyper: dict, unit: float, scale: bool, learned_noise: float | None) -> None:
    """GridGP's hyperparameters (data units) on a GPyTorch model whose data were divided by ``unit``."""
    base = model.covar_module.base_kernel if scale else model.covar_module
    if isinstance(base, gpytorch.kernels.GridKernel):
        raw = base.base_kernel.raw_lengthscale  # the constraint's bounds live on its device
        base.base_kernel.lengthscale = torch.tensor(hyper["lengthscales"], dtype=raw.dtype, device=raw.device)
    else:  # ProductKernel of one Matérn per dimension
        for kern, ls in zip(base.kernels, hyper["lengthscales"]):
            kern.lengthscale = ls
    if scale:
        model.covar_module.outputscale = hyper["outputscale"] / unit**2
    model.mean_module.constant = hyper["mean"] / unit
    if learned_noise is not None:
        if isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
            likelihood.second_noise = learned_noise / unit**2
        else:
            likelihood.noise = learned_noise / unit**2


def _matmul_seconds(op, cols: int, device: torch.device) -> float:
    rhs = torch.randn(op.shape[-1], cols, dtype=op.dtype, device=device)
    with torch.no_grad():
        op @ rhs  # warm-up (caches, kernels)
        return statistics.median(time_call(lambda: op @ rhs, device, repeats=2, warmup=0))


def grid_setting(y, axes, *, noise=None, observed=None, hyper=None, scale=True, toeplitz=True,
                 dtype=torch.float64, device=torch.device("cpu")) -> Setting:
    """GPyTorch's ``GridKernel`` ExactGP on the full grid (its Kronecker structure plus a diagonal,
    solved by CG and stochastic Lanczos quadrature at its default settings; grids of at most
    ``max_cholesky_size``, 800 cells, are factored densely there).

    ``y`` (grid), ``noise`` (per-cell variances or ``None``), ``observed`` (bool grid or ``None``),
    data units. Missing cells get a fixed noise variance ``MISSING_VARIANCE`` (× the signal
    variance) on top of the learned one (``FixedNoiseGaussianLikelihood(...,
    learn_additional_noise=True)``); per-cell noise is ``FixedNoiseGaussianLikelihood``.
    ``hyper``: GridGP's ``hyperparameters()`` to set (else GPyTorch's initial values).
    ``scale=False``: ``GridKernel`` alone, so linear_operator keeps its Kronecker eigen-solve
    where the noise is homoskedastic; with ``hyper`` the data are divided by ``√outputscale`` to
    keep the same model. ``lml()``: the full grid's estimate, plus ``½ Σ_M log 2πv_M`` (the
    missing cells' marginal at their fake variance ``v_M``, up to ``O(1/MISSING_VARIANCE)`` per
    missing cell), in ``y``'s units."""
    from gpytorch.utils.grid import create_data_from_grid

    unit = math.sqrt(hyper["outputscale"]) if hyper is not None and not scale else 1.0
    grid = [a.to(device, dtype) for a in axes]
    train_x = create_data_from_grid(grid)
    obs = None if observed is None else observed.reshape(-1).to(device)
    fill = hyper["mean"] if hyper is not None else 0.0
    train_y = torch.nan_to_num(y.reshape(-1).to(device, dtype), nan=fill) / unit
    if obs is not None:
        train_y = torch.where(obs, train_y, torch.full_like(train_y, fill / unit))
    learned = hyper["noise"] if hyper is not None and noise is None else None
    signal = (hyper["outputscale"] + (learned or 0.0)) / unit**2 if hyper is not None else 1.0
    big = MISSING_VARIANCE * signal
    with gpytorch.settings.min_fixed_noise(float_value=1e-30, double_value=1e-30):
        if noise is not None:
            fixed = noise.reshape(-1).to(device, dtype) / unit**2
            if obs is not None:
                fixed = torch.where(obs, fixed, torch.full_like(fixed, big))
            lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=fixed)
        elif obs is not None:
            fixed = torch.where(obs, torch.zeros_like(train_y), torch.full_like(train_y, big))
            lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=fixed.clamp_min(1e-4 if hyper is None else 1e-30),
                                                                   learn_additional_noise=True)
        else:
            lik = gpytorch.likelihoods.GaussianLikelihood()
    model = MaternGridModel(grid, train_x, train_y, lik, scale).to(device=device, dtype=dtype)
    lik = lik.to(device=device, dtype=dtype)
    if hyper is not None:
        _set_hyper(model, lik, hyper, unit, scale, learned)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
    model.train()
    lik.train()
    n_obs = len(train_y) if obs is None else int(obs.sum())

    def context():
        return gpytorch.settings.use_toeplitz(toeplitz)

    def step():
        model.zero_grad(set_to_none=True)
        with context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = -mll(model(train_x), train_y)
            loss.backward()

    def lml() -> float:
        with torch.no_grad(), context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            value = float(mll(model(train_x), train_y)) * len(train_y)
            if obs is not None:
                v_m = lik.noise[~obs].double()
                value += 0.5 * float(torch.log(2 * math.pi * v_m).sum())
        return value - n_obs * math.log(unit)

    def estimate():
        with torch.no_grad(), context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = lik(model(train_x)).lazy_covariance_matrix
            t = _matmul_seconds(op, gpytorch.settings.num_trace_samples.value() + 1, device)
        itemsize = torch.finfo(dtype).bits // 8
        return STEP_MATMULS * t, 16 * len(train_y) * (gpytorch.settings.num_trace_samples.value() + 1) * itemsize

    def loss_error() -> float:
        """Relative error of the training loss at GPyTorch's default CG settings (tolerance 1,
        20 Lanczos steps, 10 probes) against the same model with tight ones."""
        with torch.no_grad(), context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            default = float(-mll(model(train_x), train_y))
            with gpytorch.settings.cg_tolerance(1e-6), gpytorch.settings.max_cg_iterations(20000), \
                    gpytorch.settings.max_lanczos_quadrature_iterations(300), gpytorch.settings.num_trace_samples(64):
                tight = float(-mll(model(train_x), train_y))
        return abs(default - tight) / abs(tight)

    s = Setting(f"{'scale' if scale else 'noscale'}_toeplitz_{'on' if toeplitz else 'off'}", step, lml, estimate, context)
    s.loss_error = loss_error
    return s


DENSE_PROBE_POINTS = 1000
"""Points in the Cholesky setting's trial step; its estimate scales that step's time by n³."""


def dense_setting(y, axes, *, noise=None, observed=None, hyper=None, dtype=torch.float64,
                  device=torch.device("cpu")) -> Setting:
    """GPyTorch's ExactGP on the observed cells only (no grid structure), solved by Cholesky
    (``max_cholesky_size`` above their count): exact, ``O(n_O³)`` time and ``O(n_O²)`` memory.
    Its estimate times one step on the first ``DENSE_PROBE_POINTS`` observed cells, × (n_O/that)³."""
    grid = [a.to(device, dtype) for a in axes]
    mesh = torch.meshgrid(*grid, indexing="ij")
    x = torch.stack([m.reshape(-1) for m in mesh], -1)
    yv = y.reshape(-1).to(device, dtype)
    obs = torch.isfinite(yv) if observed is None else observed.reshape(-1).to(device)
    x, yv = x[obs], yv[obs]
    d = None if noise is None else noise.reshape(-1).to(device, dtype)[obs]

    def build(k: int):
        if d is not None:
            with gpytorch.settings.min_fixed_noise(float_value=1e-30, double_value=1e-30):
                lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=d[:k])
        else:
            lik = gpytorch.likelihoods.GaussianLikelihood()
        model = MaternPointsModel(x[:k], yv[:k], lik).to(device=device, dtype=dtype)
        lik = lik.to(device=device, dtype=dtype)
        if hyper is not None:
            _set_hyper(model, lik, hyper, 1.0, True, hyper["noise"] if d is None else None)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        model.train()
        lik.train()

        def step():
            model.zero_grad(set_to_none=True)
            with gpytorch.settings.max_cholesky_size(k + 1), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = -mll(model(x[:k]), yv[:k])
                loss.backward()

        def lml() -> float:
            with torch.no_grad(), gpytorch.settings.max_cholesky_size(k + 1):
                return float(mll(model(x[:k]), yv[:k])) * k

        return step, lml

    n = len(yv)
    step, lml = build(n)

    def estimate():
        k = min(n, DENSE_PROBE_POINTS)
        trial = build(k)[0] if k < n else step
        t = statistics.median(time_call(trial, device, repeats=1, warmup=1))
        itemsize = torch.finfo(dtype).bits // 8
        return t * (n / k) ** 3, 6 * n * n * itemsize  # kernel matrices, factor, their gradients

    return Setting("dense_cholesky", step, lml, estimate, lambda: gpytorch.settings.max_cholesky_size(n + 1))


def fastest_setting(settings, device: torch.device, repeats: int, *, budget_s: float | None = None,
                    memory_bytes: float | None = None, lml_ref: float | None = None) -> dict:
    """Time each setting, given as ``(name, build)`` pairs (so a failing build is reported too);
    skip by estimate those that would not fit ``memory_bytes`` or would not finish their warm-up
    and ``repeats`` steps in ``budget_s``. The warm-up step is timed too: where it shows that the
    repeats would overrun ``budget_s`` (the estimate, one covariance product × the products per step,
    missed GPyTorch's own per-step work: ``ScaleKernel`` settings at 128³ on an H100 ran 18–21 s a step
    against 0.04–0.2 s estimated), that one step is the setting's ``step_s``, with a ``note`` saying so.
    Returns the fastest's name (``best``, ``None`` if none ran) and per setting: ``step_s`` (median), or
    ``skipped`` / ``failed`` with the reason; with ``lml_ref`` also its ``lml`` and ``lml_rel_err``."""
    out: dict = {"settings": {}, "best": None}
    for name, make in settings:
        rec: dict = out["settings"].setdefault(name, {})
        try:
            s = make()
            est_s, est_bytes = s.estimate()
            rec.update(estimate_step_s=est_s, estimate_bytes=est_bytes)
            if memory_bytes is not None and est_bytes > memory_bytes:
                rec["skipped"] = f"est. {est_bytes / 2**30:.3g} GiB > {memory_bytes / 2**30:.3g} GiB budget"
                continue
            if budget_s is not None and est_s * (1 + repeats) > budget_s:
                rec["skipped"] = f"est. {est_s:.3g} s/step x {1 + repeats} > {budget_s:g} s budget"
                continue
            first = time_call(s.step, device, repeats=1, warmup=0)[0]  # the warm-up step, timed
            if budget_s is not None and first * (1 + repeats) > budget_s:
                rec["step_s"] = first
                rec["note"] = f"one step only (the first: {first:.3g} s x {1 + repeats} > {budget_s:g} s budget)"
            else:
                rec["step_s"] = statistics.median(time_call(s.step, device, repeats=repeats, warmup=0))
            if lml_ref is not None:
                rec["lml"] = s.lml()
                rec["lml_rel_err"] = abs(rec["lml"] - lml_ref) / abs(lml_ref)
        except Exception as err:  # an anchor that fails (out of memory, a constraint) is reported
            rec["failed"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        finally:
            s = None  # free the model before the next setting is built
        best = out["best"]
        if best is None or rec["step_s"] < out["settings"][best]["step_s"]:
            out["best"] = name
    return out


def build(kind: str, sizes: dict, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)  # parameter initialisation (e.g. IndexKernel's covar_factor)
    gen = torch.Generator().manual_seed(0)
    if kind == "grid":
        grid = [torch.linspace(0, 1, n, dtype=dtype) for n in sizes["grid"]]
        x = gpytorch.utils.grid.create_data_from_grid(grid)
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(len(x), generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = GridModel([g.to(device) for g in grid], x, y, likelihood)
        shape = f"grid {'x'.join(map(str, sizes['grid']))} = {len(x)} points"
    elif kind == "multitask":
        cfg = sizes["multitask"]
        grid = [torch.linspace(0, 1, n, dtype=dtype) for n in cfg["grid"]]
        x = gpytorch.utils.grid.create_data_from_grid(grid)
        base = torch.sin(6 * x.sum(-1))
        y = torch.stack([base * math.cos(k) for k in range(cfg["tasks"])], -1)
        y = y + 0.1 * torch.randn(*y.shape, generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=cfg["tasks"], rank=0, has_task_noise=False)
        model = MultitaskGridModel([g.to(device) for g in grid], x, y, likelihood, cfg["tasks"])
        shape = f"{cfg['tasks']} tasks x grid {'x'.join(map(str, cfg['grid']))} = {len(x)} points"
    elif kind == "kiss":
        cfg = sizes["kiss"]
        x = torch.rand(cfg["points"], 3, generator=gen, dtype=dtype) * 0.9 + 0.05
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(len(x), generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = KissModel(x, y, likelihood, cfg["grid"])
        shape = f"{cfg['points']} points, inducing grid {cfg['grid']}^3"
    else:
        raise ValueError(kind)
    model = model.to(device=device, dtype=dtype)
    likelihood = likelihood.to(device=device, dtype=dtype)
    return model, likelihood, x.to(device), y.to(device), shape


def training_step_case(kind, sizes, dtype, device, timer, warmup, repeats):
    model, likelihood, x, y, shape = build(kind, sizes, dtype, device)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # KISS-GP: linear_operator's pivoted-Cholesky preconditioner differentiates through
    # rows of the interpolated operator, (rank × n × 4^d × 4^d) index tensors — 1 GB at
    # n = 2000, far beyond any GPU at 10^5 — so it is switched off, in both variants.
    precond_rank = 0 if kind == "kiss" else gpytorch.settings.max_preconditioner_size.value()

    def step():
        model.zero_grad()
        torch.manual_seed(0)  # the same SLQ probes for both variants
        with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.max_preconditioner_size(precond_rank):
            loss = -mll(model(x), y)
        loss.backward()
        return loss.detach()

    row = {"case": kind, "shape": shape, "dtype": str(dtype).replace("torch.", "")}
    for variant in ("gpytorch", "kronegp"):
        model.load_state_dict(state)
        handle = kronegp.patch_gpytorch() if variant == "kronegp" else None
        try:
            loss = step()
            times = timer(step, warmup, repeats)
        except torch.cuda.OutOfMemoryError as err:  # report, keep going with the other cases
            row[variant] = {"error": f"out of memory: {err}".splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        finally:
            if handle is not None:
                handle.undo()
        row[variant] = {"median_s": statistics.median(times), "times_s": times, "loss": loss.item()}
    if "median_s" in row["gpytorch"] and "median_s" in row["kronegp"]:
        row["speedup"] = row["gpytorch"]["median_s"] / row["kronegp"]["median_s"]
        lg, lk = row["gpytorch"]["loss"], row["kronegp"]["loss"]
        row["loss_rel_diff"] = abs(lg - lk) / max(abs(lg), 1e-30)
    return row


def bilinear_case(sizes3, probes, dtype, device, timer, warmup, repeats):
    gen = torch.Generator().manual_seed(1)
    factors = [
        torch.randn(n, n, generator=gen, dtype=dtype).to(device).requires_grad_(True) for n in sizes3
    ]
    n_total = math.prod(sizes3)
    left = torch.randn(n_total, probes, generator=gen, dtype=dtype).to(device)
    right = torch.randn(n_total, probes, generator=gen, dtype=dtype).to(device)
    ours = KroneckerOperator(*factors)
    theirs = KroneckerProductLinearOperator(*factors)
    assert type(theirs) is KroneckerProductLinearOperator  # no patch active here

    g_ours = ours._bilinear_derivative(left, right)
    g_theirs = LinearOperator._bilinear_derivative(theirs, left, right)
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_ours, g_theirs))
    row = {
        "case": "bilinear",
        "shape": f"{'x'.join(map(str, sizes3))}, T={probes}",
        "dtype": str(dtype).replace("torch.", ""),
        "grad_rel_diff": err,
    }
    for name, fn in (
        ("gpytorch", lambda: LinearOperator._bilinear_derivative(theirs, left, right)),
        ("kronegp", lambda: ours._bilinear_derivative(left, right)),
    ):
        try:
            times = timer(fn, warmup, repeats)
            row[name] = {"median_s": statistics.median(times), "times_s": times}
        except torch.cuda.OutOfMemoryError as err_oom:
            row[name] = {"error": f"out of memory: {err_oom}".splitlines()[0]}
            torch.cuda.empty_cache()
    if "median_s" in row["gpytorch"] and "median_s" in row["kronegp"]:
        row["speedup"] = row["gpytorch"]["median_s"] / row["kronegp"]["median_s"]
    return row


def _fmt(entry):
    if "median_s" in entry:
        return f"{entry['median_s'] * 1e3:10.2f}"
    return f"{'OOM' if 'memory' in entry.get('error', '') else 'error':>10}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU smoke test)")
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--cases", default="grid,multitask,kiss,bilinear", help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible; use --device cpu --small for a smoke test")
    sizes = SIZES["small" if args.small else "full"]
    dtypes = {"float32": [torch.float32], "float64": [torch.float64], "both": [torch.float32, torch.float64]}[args.dtype]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"grid", "multitask", "kiss", "bilinear"}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    def timer(fn, warmup, repeats):
        return time_call(fn, device, repeats, warmup)


    rows = []
    for dtype in dtypes:
        for case in cases:
            if case == "bilinear":
                for sizes3 in sizes["bilinear"]:
                    rows.append(bilinear_case(sizes3, sizes["probes"], dtype, device, timer, args.warmup, args.repeats))
                    print(_row_line(rows[-1]), flush=True)
            else:
                rows.append(training_step_case(case, sizes, dtype, device, timer, args.warmup, args.repeats))
                print(_row_line(rows[-1]), flush=True)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "backend": kronegp.backend_info(),
        "torch": torch.__version__,
        "gpytorch": gpytorch.__version__,
        "linear_operator": linear_operator.__version__,
        "python": sys.version.split()[0],
        "small": args.small,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "note": "times are per training step (forward + backward of -mll) or per _bilinear_derivative call",
    }
    print(f"\ndevice: {meta['device']}   backend: {meta['backend'].get('cuda')} ({meta['backend'].get('cuda_reason')})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
        print(f"wrote {args.out}")


def _row_line(row):
    head = f"{row['case']:<10} {row['dtype']:<8} {row['shape']:<46}"
    g, k = _fmt(row["gpytorch"]), _fmt(row["kronegp"])
    speed = f"{row['speedup']:7.2f}x" if "speedup" in row else "      - "
    check = row.get("loss_rel_diff", row.get("grad_rel_diff"))
    check = f"{check:9.1e}" if check is not None else "        -"
    if not hasattr(_row_line, "printed"):
        _row_line.printed = True
        print(f"{'case':<10} {'dtype':<8} {'shape':<46} {'gpytorch ms':>11} {'kronegp ms':>11} {'speedup':>8} {'rel diff':>9}")
    return f"{head} {g:>11} {k:>11} {speed} {check}"


if __name__ == "__main__":
    main()
