"""GridGP: Gaussian-process regression on a grid (n_1 × … × n_d), missing cells allowed.

Model (in standardised units when ``standardize=True``)::

    y_c = μ(x_c) + f(x_c) + ε_c,   f ~ GP(0, s² Π_k k_k(x_k, x_k')),   ε_c ~ N(0, d_c)

over the cells ``c`` of the grid ``x = (axes[0][i_1], …, axes[d-1][i_d])``. The covariance
of ``f`` on the grid is ``K = s² (K_1 ⊗ … ⊗ K_d)``, ``K_k`` the ``n_k × n_k`` matrix of the
kernel of dimension ``k`` on its axis. ``d_c = σ²`` (learned) unless per-cell noise is given.

Four inference paths, chosen once from the data when the model is built (``path``):

* **exact** (every cell observed, homoskedastic noise): eigendecompose each ``K_k``;
  the likelihood, its analytic gradients, the posterior mean and the exact posterior
  variance on the grid cost a few Kronecker matmuls (:mod:`kronegp.models._exact`).
* **exact-missing** (homoskedastic noise, at most
  :func:`~kronegp.models._few_missing.few_missing_limit` missing cells): the Schur complement
  ``G = [C⁻¹]_MM`` over the missing cells is formed and Cholesky-factored: exact likelihood,
  gradients and posterior, no iterations, no probes (:mod:`kronegp.models._few_missing`).
* **separable-mask** (homoskedastic noise, a mask constant along some axes, e.g. a land mask
  repeated at every time step): ``C_OO = s²(K_S ⊗ K_B) + σ²I`` with ``K_S`` dense over the
  observed points of the masked axes, diagonalised exactly (:mod:`kronegp.models._separable_mask`).
* **cg** (per-cell noise, or more missing cells): preconditioned block CG on
  ``B = I + W^{½} K W^{½}``, log-determinant by stochastic Lanczos quadrature, gradients
  by stochastic trace estimation (:mod:`kronegp.models._masked`).

No dense ``N × N`` matrix is ever formed: every product with ``K`` or its eigenvectors is
:func:`kronegp.kron_matmul` / :func:`kronegp.matmul_kron`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import gpytorch
import numpy as np
import torch
from gpytorch.constraints import GreaterThan, Positive
from torch import Tensor

from kronegp.models._data import check_settings, parse_grid_data, standardisation
from kronegp.models._exact import eigen_bilinear_form, exact_lml, exact_posterior_grid, exact_posterior_samples
from kronegp.models import memory
from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen, bilinear_form
from kronegp.models._params import GridHyperparameters
from kronegp.models._few_missing import MAX_FORM_ELEMENTS, FewMissing, few_missing_limit
from kronegp.models._separable_mask import (MAX_POINTS_ANY, SeparableMask, lml_surrogate, mask_axes,
                                            separable_mask_limit)
from kronegp.models._masked import (CGLMLPieces, FullGridCovariance, ProbeDraws, cg_lml_pieces, plain_cg_lml_pieces,
                                    solve_observed)
from kronegp.solvers.report import one_warning
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["GridGP", "SolveInfo"]

# Points per chunk in predictions at arbitrary points and in exact CG variances: bounds
# the (chunk × N / n_k) temporaries of the row-wise Kronecker products.
_CHUNK_ELEMENTS = 1 << 24


def _loaded_state(module: "GridGP", incompatible_keys: Any) -> None:
    """After ``load_state_dict`` the hyperparameters are the user's (no unfitted warning)."""
    module._hyperparameters_chosen = True


@dataclass(frozen=True)
class SolveInfo:
    """How a :class:`GridGP` computed its last likelihood (:attr:`GridGP.last_solve`).

    Attributes:
        path: ``"exact"``, ``"exact-missing"``, ``"separable-mask"`` or ``"cg"``.
        iterations: CG iterations of the outermost solve (0 on the exact paths; ``None`` before any).
        inner_iterations: CG iterations inside products with ``C`` (per-cell noise).
        residual: the outermost CG's largest final relative residual.
        observed_residual: the observed cells' system's relative residual after refinement
            (cg path with missing cells), else ``None``.
        lml_error: first-order estimate of the likelihood's error from that residual (nats,
            model units), else ``None``.
        probes: probe vectors of the stochastic estimates (0 on the exact paths).
    """

    path: str
    iterations: Optional[int]
    inner_iterations: int
    residual: Optional[float]
    observed_residual: Optional[float]
    lml_error: Optional[float]
    probes: int


def _warns_once(where: str):
    """Run the method inside :func:`kronegp.solvers.report.one_warning`: the solves that fall
    short of their tolerance during one call give one warning (the worst residual)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with one_warning(where, stacklevel=4):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def _nonfinite_message(where: str, value: float, hyperparameters: dict) -> str:
    return f"{where}: the loss became {value}; hyperparameters: {hyperparameters}"


class GridGP(GridHyperparameters, torch.nn.Module):
    """A Gaussian process on a grid, with a kernel per dimension.

    Args:
        values: grid-shaped data ``(n_1, …, n_d)``: numpy array, torch tensor, or
            ``xarray.DataArray`` (its coordinates become the axes; datetime coordinates
            become days since their first entry). NaN marks a missing cell.
        axes: one strictly monotone 1-D coordinate array per dimension (any spacing);
            default ``arange(n_k)``.
        mask: optional boolean grid, True = observed (combined with the NaNs of ``values``).
        noise: optional per-cell noise variances (scalar or grid-shaped, data units); fixed,
            not learned. Without it a homoskedastic noise variance is learned.
        kernels: one GPyTorch kernel per dimension, each taking 1-D inputs (default:
            Matérn-5/2 with the lengthscale initialised to ``√(spacing · extent)`` of its axis).
            Do not wrap them in ``ScaleKernel``: the model has one output scale ``s²``.
        mean: ``None`` (a learned constant), or a ``gpytorch.means.Mean`` evaluated on
            ``(n, d)`` coordinates, in data units.
        standardize: fit standardised values (``(y − mean) / std`` over observed cells);
            everything reported (likelihood, predictions, hyperparameters) is in data units.
        dtype, device: default: those of a float tensor ``values``, else float64 on CPU.
        num_probes: probe vectors of the stochastic estimates (cg path). Their cost is nearly
            proportional (each probe is one more column in every CG product); the estimates'
            spread falls as 1/√num_probes and, thanks to the preconditioner's control variates,
            is small: on a 128³ grid (float32, 6 seeds) the log likelihood's standard deviation
            was 1e-5 to 3e-5 of its value with 2–16 probes for 20 % missing cells, 2e-4 (16
            probes) to 5e-4 (4) for per-cell noise; L-BFGS fits of a 64³ grid with 20 % missing
            cells found the same hyperparameters with 4 and 16 probes (``benchmarks/RESULTS.md``).
            Fewer probes are a reasonable speed-up on large grids with missing cells; per-cell
            noise needs more.
        cg_tol, cg_max_iters: CG stopping rule (relative residual) for the cg path. Predictions
            reach it on the observed cells' system itself (solved again where the missing
            cells' system, on which the CG runs, leaves it short; a warning if the dtype cannot).
        precondition: use the Kronecker-eigendecomposition preconditioner (cg path).
        seed: seed of the probe vectors. The same probes are used at every evaluation, so
            the cg-path objective is a deterministic function of the hyperparameters
            (L-BFGS needs that); set ``resample_probes = True`` to draw fresh ones each time.
        exact_trace_limit: on the cg path, when at most this many cells enter a trace
            (the missing cells, or every cell with per-cell noise) the traces use one unit
            probe per cell instead of ``num_probes`` random ones: likelihood and gradient
            are then exact up to CG tolerance.
        exact_variance_limit: on the cg path, grid variances are exact (one CG solve per
            cell) for grids of at most this many cells, else a Monte Carlo estimate with
            ``variance_samples`` samples and a control variate (see :meth:`predict`).
        hyperparameters: initial hyperparameters in data units, as :meth:`set_hyperparameters`
            takes them (e.g. another model's :meth:`hyperparameters`, for a warm start, or
            ``{"lengthscales": [2.0, 0.5], "noise": 0.01}`` from physical knowledge); the
            others keep their defaults (kernel defaults, the data's variance as ``s²``, a tenth
            of it as noise, the observed mean).

        path: ``"auto"`` (default: the fastest exact path the data allow, else ``"cg"``), or
            force one of ``"exact"`` (full grid, homoskedastic noise), ``"exact-missing"``
            (homoskedastic noise, missing cells), ``"separable-mask"`` (homoskedastic noise, a mask
            constant along at least one axis) or ``"cg"`` (any data); a path the data do not
            allow raises ``ValueError``. Auto picks exact-missing when the missing cells are
            within its limit and no more than the observed points ``|S|`` of the masked axes
            (its ``m × m`` system is then no larger than separable-mask's ``|S| × |S|``
            eigenproblem), else separable-mask when the mask is constant along some axis and
            ``|S|`` is within :func:`~kronegp.models._separable_mask.separable_mask_limit` (2048 on
            a CPU; forced, up to ``MAX_POINTS_ANY`` = 16384), else cg.

    Attributes:
        path: ``"exact"``, ``"exact-missing"``, ``"separable-mask"`` or ``"cg"``.
        last_solve: how the last likelihood was computed (:class:`SolveInfo`).
        cg_iterations: iterations of the last CG run (``None`` before any, 0 on the exact path).
        history: loss (negative log marginal likelihood per observed cell, data units) at
            every optimiser step of every :meth:`fit`.
    """

    def __init__(
        self,
        values: Any,
        axes: Optional[Sequence[Any]] = None,
        *,
        mask: Any = None,
        noise: Any = None,
        kernels: Optional[Sequence[gpytorch.kernels.Kernel]] = None,
        mean: Optional[gpytorch.means.Mean] = None,
        standardize: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
        num_probes: int = 16,
        cg_tol: float = 1e-5,
        cg_max_iters: int = 1000,
        precondition: bool = True,
        seed: int = 0,
        exact_variance_limit: int = 4096,
        variance_samples: int = 64,
        exact_trace_limit: int = 1024,
        hyperparameters: Optional[Mapping[str, Any]] = None,
        path: str = "auto",
    ):
        super().__init__()
        settings = check_settings(
            standardize=standardize, num_probes=num_probes, cg_tol=cg_tol, cg_max_iters=cg_max_iters,
            precondition=precondition, seed=seed, exact_variance_limit=exact_variance_limit,
            variance_samples=variance_samples, exact_trace_limit=exact_trace_limit,
        )
        data = parse_grid_data(values, axes, mask=mask, noise=noise, dtype=dtype, device=device)
        self.shape = tuple(data.values.shape)
        self.ndim = len(self.shape)
        self.n_cells = math.prod(self.shape)
        self.axis_names = data.axis_names
        self.axis_units = data.axis_units
        self.axis_origins = data.axis_origins
        self._coords = data.coords  # an xarray input's coordinates: predictions come back as xarray
        self.num_probes = settings["num_probes"]
        self.cg_tol = settings["cg_tol"]
        self.cg_max_iters = settings["cg_max_iters"]
        self.precondition = settings["precondition"]
        self.seed = settings["seed"]
        self.resample_probes = False
        self.exact_variance_limit = settings["exact_variance_limit"]
        self.exact_trace_limit = settings["exact_trace_limit"]
        self.variance_samples = settings["variance_samples"]
        self.cg_iterations: Optional[int] = None
        self.cg_inner_iterations = 0
        self.cg_residual: Optional[float] = None
        self.history: list[float] = []
        self._probe_generator: Optional[torch.Generator] = None
        self._probe_store = None  # set while a CUDA graph of the training step is recorded
        self._graphed = None  # the CUDA graph of the training step (``loss_backward``)
        self._graph_failed: Optional[str] = None  # why recording it failed, once it has

        values_t = data.values.reshape(-1)
        observed = data.mask.reshape(-1) if data.mask is not None else None
        self.n_observed = int(observed.sum()) if observed is not None else self.n_cells
        obs_vals = values_t[observed] if observed is not None else values_t
        self.shift, self.scale = standardisation(obs_vals, settings["standardize"], values_t.dtype)
        y = (values_t - self.shift) / self.scale
        if observed is not None:
            y = torch.where(observed, y, torch.zeros_like(y))
        self.register_buffer("y", y)
        self.register_buffer("observed", observed)
        self._path = self._choose_path(path, observed, data.noise is not None, values_t.device)
        self._last_extra: dict = {}
        self.register_buffer(
            "cell_noise", data.noise.reshape(-1) / self.scale**2 if data.noise is not None else None
        )
        for k, ax in enumerate(data.axes):
            self.register_buffer(f"axis_{k}", ax)

        y_obs = y[observed] if observed is not None else y
        var0 = float(y_obs.var()) if y_obs.numel() > 1 else 1.0
        var0 = var0 if var0 > 0 else 1.0
        dt, dev = values_t.dtype, values_t.device

        # ---- kernels
        if kernels is None:
            kernels = [self._default_kernel(ax) for ax in data.axes]
        if isinstance(kernels, gpytorch.kernels.Kernel) or not isinstance(kernels, (list, tuple)):
            raise TypeError(
                f"kernels must be a list of {self.ndim} GPyTorch kernels (one per dimension), "
                f"got {type(kernels).__name__}"
            )
        if len(kernels) != self.ndim:
            raise ValueError(f"kernels must hold one kernel per dimension: {self.ndim} needed, got {len(kernels)}")
        for k, kern in enumerate(kernels):
            if not isinstance(kern, gpytorch.kernels.Kernel):
                raise TypeError(f"kernels[{k}] must be a gpytorch.kernels.Kernel, got {type(kern).__name__}")
        self.kernels = torch.nn.ModuleList([k.to(dtype=dt, device=dev) for k in kernels])
        for k, (kern, ax) in enumerate(zip(self.kernels, data.axes)):
            self._check_kernel(k, kern, ax)

        # ---- output scale, noise, mean
        self.outputscale_constraint = Positive()
        self.raw_outputscale = torch.nn.Parameter(
            self.outputscale_constraint.inverse_transform(torch.tensor(var0, dtype=dt, device=dev))
        )
        self.learn_noise = data.noise is None
        if self.learn_noise:
            self.noise_constraint = GreaterThan(1e-6)
            self.raw_noise = torch.nn.Parameter(
                self.noise_constraint.inverse_transform(torch.tensor(0.1 * var0, dtype=dt, device=dev))
            )
        self.user_mean = mean is not None
        if mean is None:
            mean = gpytorch.means.ConstantMean()
            with torch.no_grad():
                mean.constant.fill_(float(y_obs.mean()))
        elif not isinstance(mean, gpytorch.means.Mean):
            raise TypeError(f"mean must be a gpytorch.means.Mean or None, got {type(mean).__name__}")
        self.mean_module = mean.to(dtype=dt, device=dev)

        # ---- initial hyperparameters: chosen by the user (data units), else the defaults above
        self._hyperparameters_chosen = False  # set by set_hyperparameters and load_state_dict
        self._warned_unfitted = False
        self.register_load_state_dict_post_hook(_loaded_state)
        if hyperparameters is not None:
            self.set_hyperparameters(hyperparameters)

    # ------------------------------------------------------------------ construction helpers

    def _choose_path(self, path: str, observed: Optional[Tensor], per_cell: bool, device: torch.device) -> str:
        """The inference path, once (see the ``path`` argument)."""
        if path not in ("auto", "exact", "exact-missing", "separable-mask", "cg"):
            raise ValueError(f"path must be 'auto', 'exact', 'exact-missing', 'separable-mask' or 'cg', got {path!r}")
        n_missing = 0 if observed is None else self.n_cells - self.n_observed
        if path == "exact" and (n_missing or per_cell):
            raise ValueError(
                f"path='exact' needs every cell observed and one noise level; this grid has {n_missing} missing "
                f"cells{' and per-cell noise' if per_cell else ''} (use path='auto')")
        if path == "exact-missing" and (per_cell or not n_missing):
            raise ValueError(
                "path='exact-missing' needs missing cells and a homoskedastic (learned) noise; this grid has "
                f"{n_missing} missing cells{' and per-cell noise' if per_cell else ''} (use path='auto')")
        self._masked_axes, n_points = mask_axes(observed, self.shape) if n_missing else ([], 0)
        # constant along an axis with more than one point (a length-1 axis says nothing)
        constant = math.prod(n for k, n in enumerate(self.shape) if k not in self._masked_axes) > 1
        if path == "separable-mask" and (per_cell or not n_missing or not constant or n_points > MAX_POINTS_ANY):
            why = ("per-cell noise" if per_cell else "no missing cells" if not n_missing else
                   "a mask that depends on every axis" if not constant else
                   f"{n_points} observed points on the masked axes {self._masked_axes} > {MAX_POINTS_ANY}")
            raise ValueError(
                "path='separable-mask' needs a homoskedastic (learned) noise and a mask constant along at least "
                f"one axis with at most {MAX_POINTS_ANY} observed points on the others; this grid has {why} "
                "(use path='auto')")
        separable = constant and n_points <= separable_mask_limit(device)
        if path != "auto":
            return path
        if per_cell:
            return "cg"
        if not n_missing:
            return "exact"
        if (n_missing <= few_missing_limit(device) and n_missing * self.n_cells <= MAX_FORM_ELEMENTS
                and (not separable or n_missing <= n_points)):
            return "exact-missing"
        if separable:
            return "separable-mask"
        return "cg"

    @property
    def path(self) -> str:
        """The inference path chosen when the model was built: ``"exact"``, ``"exact-missing"``,
        ``"separable-mask"`` or ``"cg"``."""
        return self._path

    @property
    def last_solve(self) -> "SolveInfo":
        """How the last likelihood was computed: path, CG iterations, residuals, probes."""
        extra = self._last_extra
        return SolveInfo(
            path=self.path,
            iterations=self.cg_iterations,
            inner_iterations=self.cg_inner_iterations,
            residual=self.cg_residual,
            observed_residual=extra.get("observed_residual"),
            lml_error=extra.get("lml_error"),
            probes=extra.get("probes", 0),
        )

    @staticmethod
    def _default_kernel(axis: Tensor) -> gpytorch.kernels.Kernel:
        kern = gpytorch.kernels.MaternKernel(nu=2.5)
        n = axis.shape[0]
        if n > 1:
            extent = float((axis[-1] - axis[0]).abs())
            spacing = float(axis.diff().abs().median())
            # Between the grid spacing (finest resolvable scale) and the extent (coarsest).
            init = math.sqrt(spacing * extent)
        else:
            init = 1.0
        kern.lengthscale = init
        return kern

    def _check_kernel(self, k: int, kern: Any, axis: Tensor) -> None:
        if not isinstance(kern, gpytorch.kernels.Kernel):
            raise TypeError(f"kernels[{k}] must be a gpytorch.kernels.Kernel, got {type(kern).__name__}")
        ard = getattr(kern, "ard_num_dims", None)
        if ard not in (None, 1):
            raise ValueError(
                f"kernels[{k}] has ard_num_dims={ard}, but each GridGP kernel takes 1-D inputs "
                "(one kernel per grid dimension): use ard_num_dims=None or 1"
            )
        x = axis[: min(2, axis.shape[0])].unsqueeze(-1)
        try:
            with torch.no_grad():
                out = kern(x, x).to_dense()
        except Exception as err:  # any failure here means: the kernel cannot take 1-D inputs
            raise ValueError(
                f"kernels[{k}] ({type(kern).__name__}) does not accept 1-D inputs of shape (n, 1): "
                f"{type(err).__name__}: {err}"
            ) from None
        if tuple(out.shape) != (x.shape[0], x.shape[0]):
            raise ValueError(
                f"kernels[{k}] ({type(kern).__name__}) returned shape {tuple(out.shape)} for 1-D inputs of "
                f"shape {tuple(x.shape)}; expected {(x.shape[0], x.shape[0])} (batched kernels are not supported)"
            )

    # ------------------------------------------------------------------ parameters

    def __getstate__(self):
        # a recorded CUDA graph is not copied or pickled (a copy records its own when it trains)
        state = self.__dict__.copy()
        state["_graphed"] = None
        state["_probe_store"] = None
        return state

    @property
    def _missing(self) -> Optional[Tensor]:
        """``~observed`` (kept while ``observed`` is the same tensor), or ``None``."""
        obs = self.observed
        if obs is None:
            return None
        cached = self.__dict__.get("_missing_cache")
        if cached is None or cached[0] is not obs:
            cached = self.__dict__["_missing_cache"] = (obs, ~obs)
        return cached[1]

    def _grid_points(self) -> Tensor:
        mesh = torch.meshgrid(*self.axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    def _mean_grid(self) -> Tensor:
        """``μ`` on the grid in model units (length ``N``)."""
        if not self.user_mean:
            return self.mean_module.constant.expand(self.n_cells)
        return (self.mean_module(self._grid_points()) - self.shift) / self.scale

    def _mean_points(self, points: Tensor) -> Tensor:
        if not self.user_mean:
            return self.mean_module.constant.expand(points.shape[0])
        return (self.mean_module(points) - self.shift) / self.scale

    def _fill_noise(self) -> Tensor:
        """``d̃`` on the full grid in model units, with gradient: σ² everywhere, or the per-cell
        noise at observed cells and its geometric mean at missing ones (any positive value
        there leaves ``C_OO`` unchanged)."""
        if self.cell_noise is None:
            return self.noise.expand(self.n_cells)
        if self.observed is None:
            return self.cell_noise
        obs = self.observed
        safe = torch.where(obs, self.cell_noise, torch.ones_like(self.cell_noise))
        fill = torch.exp(torch.log(safe)[obs].mean())
        return torch.where(obs, self.cell_noise, fill)

    def _full_cov(self, factors: list[Tensor]) -> FullGridCovariance:
        return FullGridCovariance(
            factors,
            self.outputscale.detach(),
            self._fill_noise().detach(),
            homoskedastic=self.cell_noise is None,
            tol=self.cg_tol,
            max_iters=self.cg_max_iters,
            precondition=self.precondition,
        )

    def _std_normal(self, rows: int, cols: int, offset: int = 0) -> Tensor:
        store = self._probe_store
        if store is not None:  # a CUDA graph's probes: drawn outside the graph (see _graph.py)
            return store.get((rows, cols, offset), lambda: self._draw_normal(rows, cols, offset))
        return self._draw_normal(rows, cols, offset)

    def _draw_normal(self, rows: int, cols: int, offset: int = 0) -> Tensor:
        dev = self.y.device
        if self._probe_generator is None or not self.resample_probes or self._probe_generator.device != dev:
            self._probe_generator = torch.Generator(device=dev)
            self._probe_generator.manual_seed(self.seed + offset)
        # Drawn one column after another (a transposed view): the cg path holds its blocks as
        # rows (t, N), so the probes need no transposing copy there.
        return torch.randn(cols, rows, generator=self._probe_generator, dtype=self.y.dtype, device=dev).mT

    def _exact_trace(self, cells: Optional[Tensor]) -> int:
        """How many cells ``cells`` covers when that is at most ``exact_trace_limit`` (their unit
        vectors are the probes), else 0."""
        count = self.n_cells if cells is None else self.n_cells - self.n_observed if cells is self._missing else int(cells.sum())
        return count if 0 < count <= self.exact_trace_limit else 0

    def _probes(self, cells: Optional[Tensor], offset: int = 0) -> Tensor:
        """Probe columns for trace estimates over ``cells`` (bool grid; ``None`` = all).

        Random standard normal (``num_probes`` columns), or, when at most
        ``exact_trace_limit`` cells are concerned, ``√S`` times the ``S`` unit vectors of
        those cells: then ``(1/S) Σ_s z_sᵀ A z_s = tr A`` exactly, so the likelihood and its
        gradient are exact up to CG tolerance.
        """
        count = self._exact_trace(cells)
        if count:
            idx = torch.arange(self.n_cells, device=self.y.device)
            if cells is not None:
                idx = idx[cells]
            out = torch.zeros(self.n_cells, count, dtype=self.y.dtype, device=self.y.device)
            out[idx, torch.arange(count, device=self.y.device)] = math.sqrt(count)
            return out
        return self._std_normal(self.n_cells, self.num_probes, offset=offset)

    def _missing_probes(self) -> "Tensor | ProbeDraws":
        """The missing cells' probes: drawn at once, or run by run when the memory plan splits the
        CG into runs (:meth:`memory_plan`'s ``chunk`` columns per run; a run holds only its own
        probes). Run by run, the later runs continue the first run's generator: other numbers than
        one draw of all columns, from the same distribution."""
        per_run = self._memory_chunk("step")
        if per_run > self.num_probes or self._probe_store is not None or self._exact_trace(self._missing):
            return self._probes(self._missing, offset=1)

        def take(a: int, b: int) -> Tensor:
            if a == 0:  # seeded (or continued) as a draw of all columns is
                return self._draw_normal(self.n_cells, b, offset=1)
            return torch.randn(b - a, self.n_cells, generator=self._probe_generator, dtype=self.y.dtype,
                               device=self.y.device).mT

        return ProbeDraws(self.num_probes, take)

    # ------------------------------------------------------------------ likelihood

    def _check_finite(self, factors: list[Tensor]) -> None:
        """Raise the error ``fit`` gives for a non-finite loss, before any solve runs on
        non-finite hyperparameters (CG would fail with an unrelated message)."""
        parts = [self.outputscale.detach().reshape(1)] + [f.detach().reshape(-1) for f in factors]
        if self.learn_noise:
            parts.append(self.noise.detach().reshape(1))
        if not bool(torch.isfinite(torch.cat(parts)).all()):
            raise FloatingPointError(_nonfinite_message("GridGP.log_marginal_likelihood", float("nan"), self.hyperparameters()))

    def _lml_model_units(self) -> Tensor:
        factors = self._factors()
        if self.path == "exact":
            self.cg_iterations = 0
            self._last_extra = {}
            # y and μ apart (a constant μ never becomes a grid vector): memory.py counts this step
            mean = self._mean_grid() if self.user_mean else self.mean_module.constant
            return exact_lml(self.y, self.noise, self.outputscale, factors, mean=mean, chunk=self._memory_chunk())
        resid = self.y - self._mean_grid()
        if self._probe_store is None:  # not while a CUDA graph is recorded (no reads there)
            self._check_finite(factors)
        if self.path == "separable-mask":
            return self._separable_mask_lml(factors, resid)
        n, sp = self.n_cells, self.num_probes
        fm = None
        if self.path == "exact-missing":
            pieces, fm = self._few_missing_pieces(factors, resid.detach())
            eig, level = fm.eig, self.noise
        else:
            pieces, cov = self._cg_pieces(factors, resid, n, sp)
            eig = cov.eig
            level = self.noise if cov.homoskedastic else cov.sigma_bar2
        self.cg_iterations = pieces.iterations
        self.cg_inner_iterations = pieces.inner_iterations
        self.cg_residual = pieces.residual
        self._last_extra = pieces.extra
        # Surrogate: its gradient is the estimated gradient (bilinear derivatives with the
        # CG vectors held fixed); its value is discarded.
        surrogate = (pieces.alpha * self._mean_grid()).sum()
        if pieces.left.shape[-1]:
            left_w = pieces.left * pieces.weights
            surrogate = surrogate + self.outputscale * bilinear_form(left_w, pieces.right, factors)
            surrogate = surrogate + ((left_w * pieces.right).sum(-1) * self._fill_noise()).sum()
        if pieces.eig_left is not None:
            # pairs in eigen-coordinates (homoskedastic noise: ∂C = s²∂(⊗K) + ∂σ² I, Q orthogonal)
            left_w = pieces.eig_left * pieces.eig_weights.unsqueeze(-1)
            surrogate = surrogate + self.outputscale * eigen_bilinear_form(left_w, pieces.eig_right, eig, factors)
            surrogate = surrogate + self.noise * (left_w * pieces.eig_right).sum()
        if pieces.eig_sums is not None:  # pairs reduced run by run (probes in several CG runs)
            surrogate = surrogate + pieces.eig_sums.surrogate(self.outputscale, self.noise, factors)
        if fm is not None:
            surrogate = surrogate + fm.logdet_g_surrogate(self.outputscale, self.noise, factors)
        if pieces.exact_logdet and (self.precondition or fm is not None):
            # −½ log det(K + σ²I) with its exact gradient: σ² is the learned noise, or the
            # preconditioner's fixed σ̄² (per-cell noise, control variate).
            surrogate = surrogate + exact_lml(None, level, self.outputscale, factors)
        return pieces.value + (surrogate - surrogate.detach())

    def _few_missing_pieces(self, factors: list[Tensor], resid: Tensor) -> tuple[CGLMLPieces, FewMissing]:
        """The exact-missing path's value and data pair (:mod:`kronegp.models._few_missing`); the
        ``log det G`` term's gradient comes from :meth:`FewMissing.logdet_g_surrogate`."""
        with torch.no_grad():
            fm = FewMissing(KronEigen(factors), self.outputscale, self.noise, self._missing)
            r = self._obs_zero(resid)
            quad, alpha_t = fm.lml_terms(r)
            logdet = torch.log(fm.lam + fm.noise).sum() + fm.logdet_g
            value = -0.5 * quad - 0.5 * logdet - 0.5 * self.n_observed * math.log(2 * math.pi)
            alpha = self._obs_zero(fm.eig.from_eigbasis_rows(alpha_t)[0])
        empty = r.new_zeros(r.shape[0], 0)
        pieces = CGLMLPieces(
            value=value, alpha=alpha, left=empty, right=empty, weights=r.new_zeros(0), exact_logdet=True,
            iterations=0, residual=0.0, extra={"boxed": fm.boxed, "missing": fm.m},
            eig_left=alpha_t, eig_right=alpha_t, eig_weights=r.new_full((1,), 0.5),
        )
        return pieces, fm

    def _separable_mask_lml(self, factors: list[Tensor], resid: Tensor) -> Tensor:
        """The separable-mask path's likelihood with its exact gradient
        (:mod:`kronegp.models._separable_mask`)."""
        with torch.no_grad():
            sm = self._separable(factors)
            quad, logdet, alpha = sm.lml_terms(resid.detach())
            value = -0.5 * quad - 0.5 * logdet - 0.5 * self.n_observed * math.log(2 * math.pi)
            alpha_grid = sm.from_sb(alpha.unsqueeze(0)).squeeze(-1)
        self.cg_iterations, self.cg_inner_iterations, self.cg_residual = 0, 0, 0.0
        self._last_extra = {"masked_axes": list(sm.A), "observed_points": sm.n_points}
        surrogate = (alpha_grid * self._mean_grid()).sum() + lml_surrogate(sm, alpha, self.outputscale, self.noise, factors)
        return value + (surrogate - surrogate.detach())

    def _separable(self, factors: list[Tensor]) -> SeparableMask:
        return SeparableMask(factors, self.outputscale, self.noise, self.observed, self._masked_axes)

    def _cg_pieces(self, factors: list[Tensor], resid: Tensor, n: int, sp: int):
        cov = self._full_cov(factors)
        if self.precondition:
            pieces = cg_lml_pieces(
                cov,
                resid.detach(),
                self.observed,
                self.n_observed,
                probes_c=None if cov.homoskedastic else self._probes(None),
                probes_g=None if self.observed is None else self._missing_probes(),
                tol=self.cg_tol,
                max_iters=self.cg_max_iters,
                probe_chunk=self._memory_chunk("step"),
            )
        else:
            pieces = plain_cg_lml_pieces(
                cov.matvec, resid.detach(), self.observed, self.n_observed, self._std_normal(n, sp),
                tol=self.cg_tol, max_iters=self.cg_max_iters,
            )
        pieces.extra["probes"] = int(pieces.weights.numel() + (0 if pieces.eig_weights is None else pieces.eig_weights.numel())
                                     + (0 if pieces.eig_sums is None else pieces.eig_sums.rows)) - 1
        return pieces, cov

    def log_marginal_likelihood(self) -> Tensor:
        """``log p(y_O)`` in data units (0-dim tensor, differentiable in the hyperparameters).

        Exact on the exact path; on the cg path an estimate whose log-determinant is
        stochastic (SLQ with ``num_probes`` probes) and whose gradient is the stochastic
        trace estimate (see :mod:`kronegp.models._masked`).
        """
        with one_warning("GridGP.log_marginal_likelihood", stacklevel=4):
            return self._lml_model_units() - self.n_observed * math.log(self.scale)

    # ------------------------------------------------------------------ fitting

    def loss_backward(self, cuda_graph: Optional[bool] = None) -> Tensor:
        """The training loss ``−log p(y_O) / n_observed`` (0-dim, detached), with its gradient
        left in every trainable parameter's ``.grad`` (overwritten, not accumulated): one
        optimiser step's evaluation, as :meth:`fit` makes it.

        Args:
            cuda_graph: replay the evaluation from a CUDA graph recorded at the first call
                (:mod:`kronegp.models._graph`: on a 128³ grid the eager evaluation spends about
                half its time issuing ~350 launches from the host). ``None`` (default): on CUDA
                models except on the exact-missing path (eager: its factorisation checks
                read the device), with both missing cells and per-cell noise (nested CG solves,
                whose number follows the outer CG's) or with a grid axis longer than the GPU
                eigensolver takes (:data:`kronegp.linalg.DEVICE_JACOBI_MAX_ROWS`, 168 points
                on an H100: larger factors are decomposed by synchronising paths), which run
                eagerly, as does a step whose CG runs need more than
                :data:`kronegp.models._graph.MAX_RECORDED_ITERATIONS` iterations; if recording fails
                (e.g. a user kernel or mean that synchronises), it warns once with the reason
                and runs eagerly. ``True``: raise instead, for every reason above but the
                iteration limit (such a step still runs eagerly); ``False``: eagerly.
                A recorded graph keeps one evaluation's intermediate tensors allocated between
                calls.
        """
        from kronegp.models._graph import GraphedLoss, graph_reason

        self._memory_chunk("step")  # MemoryPlanError before any work when the step cannot fit
        if cuda_graph is None or cuda_graph:
            reason = graph_reason(self) if self._graph_failed is None else self._graph_failed
            if reason is None:
                if self._graphed is None:
                    self._graphed = GraphedLoss(self)
                try:
                    return self._graphed()
                except Exception as err:
                    if cuda_graph:
                        raise
                    self._graphed = None
                    self._graph_failed = f"{type(err).__name__}: {err}"
                    warnings.warn(
                        f"GridGP: the training step could not be recorded as a CUDA graph ({self._graph_failed}); "
                        "it runs eagerly (pass cuda_graph=False to fit/loss_backward to skip the attempt)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            elif cuda_graph:
                raise ValueError(f"cuda_graph=True, but this model's step cannot be a CUDA graph: {reason}")
        for p in self.parameters():
            p.grad = None
        return self._eager_loss_backward().detach()

    def _eager_loss_backward(self) -> Tensor:
        """``−log p(y_O) / n_observed``, back-propagated into the parameters' ``.grad``."""
        loss = -self.log_marginal_likelihood() / self.n_observed
        loss.backward()
        return loss

    def fit(
        self,
        iters: int = 100,
        optimizer: str = "adam",
        lr: Optional[float] = None,
        progress: bool = True,
        *,
        patience: Optional[int] = None,
        min_delta: float = 1e-5,
        cuda_graph: Optional[bool] = None,
    ) -> list[float]:
        """Maximise the log marginal likelihood over every hyperparameter.

        The loss is ``−log p(y_O) / n_observed`` (data units). Stops early once the loss
        has not improved by more than ``min_delta`` for ``patience`` steps (default 10 for
        Adam, 2 for L-BFGS).

        Args:
            iters: optimiser steps (for L-BFGS each step is up to 10 quasi-Newton updates
                with strong-Wolfe line searches, i.e. many evaluations).
            optimizer: ``"adam"`` or ``"lbfgs"``.
            lr: learning rate (default 0.1 for Adam, 1.0 for L-BFGS).
            progress: show a tqdm progress bar with the loss.
            cuda_graph: evaluate each step from a recorded CUDA graph (see :meth:`loss_backward`;
                default: on CUDA models where it can be recorded).

        Returns:
            :attr:`history`, the loss after every step of every fit so far.
        """
        from tqdm.auto import tqdm

        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        self.__dict__.pop("_step_chunk", None)  # plan the step for the memory free now
        self._memory_chunk("step")
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=0.1 if lr is None else lr)
            patience = 10 if patience is None else patience
        else:
            opt = torch.optim.LBFGS(
                params, lr=1.0 if lr is None else lr, max_iter=10, line_search_fn="strong_wolfe", history_size=20
            )
            patience = 2 if patience is None else patience
        last = {"loss": math.inf}

        def closure():
            loss = self.loss_backward(cuda_graph)
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(_nonfinite_message("GridGP.fit", value, self.hyperparameters()))
            last["loss"] = value
            return loss

        self.train()
        bar = tqdm(range(iters), disable=not progress, desc=f"GridGP ({self.path})")
        with one_warning("GridGP.fit", stacklevel=4):  # solves that fall short: one warning per fit
            self._fit_loop(bar, opt, closure, last, patience, min_delta)
        bar.close()
        self.eval()
        return self.history

    def _fit_loop(self, bar, opt, closure, last, patience, min_delta) -> None:
        best, waited = math.inf, 0
        for _ in bar:
            opt.step(closure)
            # The last evaluation is at the accepted point (L-BFGS's line search ends there).
            loss = last["loss"]
            self.history.append(loss)
            bar.set_postfix(loss=f"{loss:.5g}", cg=self.cg_iterations)
            if loss < best - min_delta:
                best, waited = loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break

    # ------------------------------------------------------------------ prediction

    def _cross_factors(self, points: Tensor) -> tuple[list[Tensor], Tensor]:
        """``a_k = k_k(x*_k, axis_k)`` (``n × n_k`` each) and the prior variance ``Π_k k_k(x*_k, x*_k)``."""
        cross, prior = [], None
        for k, (kern, ax) in enumerate(zip(self.kernels, self.axes)):
            xk = points[:, k : k + 1]
            cross.append(kern(xk, ax.unsqueeze(-1)).to_dense())
            dk = kern(xk, xk, diag=True)
            prior = dk if prior is None else prior * dk
        return cross, prior

    def _check_points(self, points: Any) -> Tensor:
        pts = points if isinstance(points, Tensor) else torch.as_tensor(points)
        if pts.dim() != 2 or pts.shape[1] != self.ndim:
            raise ValueError(f"points must have shape (n, {self.ndim}) (one coordinate per grid dimension), got {tuple(pts.shape)}")
        if not (pts.is_floating_point() or pts.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"points must be real-valued, got dtype {pts.dtype}")
        if pts.is_floating_point() and pts.dtype != self.y.dtype:
            raise TypeError(f"points has dtype {pts.dtype} but the model is {self.y.dtype}; cast them (nothing is promoted silently)")
        if pts.device != self.y.device and isinstance(points, Tensor):
            raise ValueError(f"points is on {pts.device} but the model is on {self.y.device}; move one of them")
        if pts.is_floating_point():
            bad = ~torch.isfinite(pts).all(dim=-1)
            if bool(bad.any()):
                rows = torch.nonzero(bad).reshape(-1)[:5].tolist()
                raise ValueError(f"points holds NaN or inf coordinates ({int(bad.sum())} rows, e.g. rows {rows})")
        return pts.to(dtype=self.y.dtype, device=self.y.device)

    def _point_chunks(self, n: int):
        per_point = max(1, self.n_cells // max(self.shape))
        size = max(1, _CHUNK_ELEMENTS // per_point)
        for start in range(0, n, size):
            yield slice(start, min(n, start + size))

    @staticmethod
    def _rowwise_kron_dot(grid_vec: Tensor, rows: list[Tensor]) -> Tensor:
        """``out_i = Σ_j g_j Π_k rows_k[i, j_k]``: ``g`` against row ``i`` of ``⊙``-Kronecker rows.

        One batched :func:`matmul_kron` with factors ``rows_k[i]ᵀ`` (``n_k × 1``), batch ``i``.
        """
        factors = [r.unsqueeze(-1) for r in rows]
        return matmul_kron(grid_vec.reshape(1, 1, -1), factors).reshape(-1)

    @staticmethod
    def _rowwise_kron_columns(rows: list[Tensor]) -> Tensor:
        """The grid vectors ``⊗_k rows_k[i]`` as columns of an ``(N, n)`` matrix."""
        factors = [r.unsqueeze(-1) for r in rows]
        one = rows[0].new_ones(1, 1)
        return kron_matmul(factors, one).squeeze(-1).mT

    @_warns_once("GridGP.predict")
    @torch.no_grad()
    def predict(
        self,
        points: Any = None,
        *,
        include_noise: bool = False,
        variance: str = "auto",
        as_xarray: Optional[bool] = None,
    ) -> Any:
        """Posterior mean and variance of ``f`` (data units) on the grid or at points.

        On the grid: ``m = μ + K α`` and ``v = diag(K − K W^{½} B⁻¹ W^{½} K)``; on the exact
        path ``v = (Q∘Q)(λσ²/(λ+σ²))`` (exact). At points ``x*`` (``(n, d)``):
        ``m* = μ(x*) + k*ᵀα`` and ``v* = k(x*, x*) − k*ᵀ C_O⁻¹ k*``, where the rows
        ``k*ᵀ = s² ⊗_k k_k(x*_k, axis_k)`` are row-wise Kronecker products (never dense).

        Args:
            points: ``None`` for the grid, or ``(n, d)`` coordinates in axis units.
            include_noise: add the observation noise (σ², or the per-cell noise on the grid)
                to the variance, for predictive intervals of new observations.
            variance: on the cg path, ``"exact"`` (one CG solve per predicted cell/point),
                ``"mc"`` (grid only: Monte Carlo with ``variance_samples`` posterior samples
                and the exact homoskedastic posterior as control variate, unbiased, error
                ∝ 1/√samples) or ``"auto"`` (exact up to ``exact_variance_limit`` cells,
                else mc with a warning). Ignored on the exact paths (``"exact-missing"``: the
                variance is exact, ``diag(K − K C_OO⁻¹ K)`` from ``G``'s Cholesky factor;
                ``"separable-mask"``: from the eigendecomposition of ``C_OO``).
            as_xarray: return an ``xarray.Dataset`` (default: when the model was built from
                an ``xarray.DataArray``); ``False`` for the ``(mean, var)`` tensors.

        Returns:
            ``(mean, var)`` tensors: grid-shaped, or ``(n,)`` for points. Or, for a model
            built from an ``xarray.DataArray``, an ``xarray.Dataset`` (:meth:`_as_dataset`)
            with ``mean``, ``sd`` (of ``f``) and ``sd_observation`` (of a new observation,
            ``f`` + noise) on the input's coordinates, with its attributes.

        Before any :meth:`fit` (and without :meth:`set_hyperparameters` or
        ``hyperparameters=``) it warns, once, that the initial hyperparameters are used.
        """
        self._warn_if_unfitted()
        if as_xarray is None:
            as_xarray = self._coords is not None
        if as_xarray:
            return self._as_dataset(points, include_noise, variance)
        if variance not in ("auto", "exact", "mc"):
            raise ValueError(f"variance must be 'auto', 'exact' or 'mc', got {variance!r}")
        if points is None and self.path == "exact":
            return self._predict_exact_grid(include_noise)
        factors = self._factors()
        s2 = self.outputscale
        resid = self.y - self._mean_grid()
        fm = None
        if self.path == "exact":
            eig = KronEigen(factors)
            lam = s2 * eig.eigvals()
            w = 1.0 / (lam + self.noise)
            alpha = eig.apply_function(w, resid.unsqueeze(-1)).squeeze(-1)
            system = None
        elif self.path in ("exact-missing", "separable-mask"):
            fm = system = (FewMissing(KronEigen(factors), s2, self.noise, self._missing) if self.path == "exact-missing"
                           else self._separable(factors))
            alpha = fm.apply(self._obs_zero(resid).unsqueeze(-1)).squeeze(-1)
        else:
            system = self._full_cov(factors)
            eig, lam = system.eig, system.lam
            alpha = self._solve_observed(system, self._obs_zero(resid).unsqueeze(-1)).squeeze(-1)

        if points is None:
            mean = self._mean_grid() + s2 * kron_matmul(factors, alpha.unsqueeze(-1)).squeeze(-1)
            if system is None:
                var = eig.diag_of(lam * self.noise * w)
            elif fm is not None:
                var = fm.grid_variance()
            else:
                var = self._masked_grid_variance(system, factors, variance)
            if include_noise:
                var = var + self._grid_noise_for_prediction()
            shape = self.shape
        else:
            pts = self._check_points(points)
            means, vars_ = [], []
            for sl in self._point_chunks(pts.shape[0]):
                cross, prior = self._cross_factors(pts[sl])
                means.append(self._mean_points(pts[sl]) + s2 * self._rowwise_kron_dot(alpha, cross))
                if system is None:
                    proj = [c @ q for c, q in zip(cross, eig.vecs)]
                    red = s2 * s2 * self._rowwise_kron_dot(w, [p * p for p in proj])
                else:
                    cols = self._obs_zero(s2 * self._rowwise_kron_columns(cross))
                    red = (cols * fm.apply(cols)).sum(0) if fm is not None else self._masked_reduction(system, cols)
                vars_.append(s2 * prior - red)
            mean, var = torch.cat(means), torch.cat(vars_)
            if include_noise:
                if not self.learn_noise:
                    raise ValueError(
                        "include_noise=True at arbitrary points needs a homoskedastic noise; this model has "
                        "per-cell noise, known only on the grid"
                    )
                var = var + self.noise
            shape = (pts.shape[0],)
        var = var.clamp_min(0)
        return (mean * self.scale + self.shift).reshape(shape), (var * self.scale**2).reshape(shape)

    def _warn_if_unfitted(self) -> None:
        if self.history or self._hyperparameters_chosen or self._warned_unfitted:
            return
        self._warned_unfitted = True
        warnings.warn(
            "GridGP.predict: the model was never fitted, so it predicts with its initial "
            f"hyperparameters {self._short_hyperparameters()}; call fit() first, or choose them with "
            "set_hyperparameters() (this warning is shown once per model)",
            UserWarning,
            stacklevel=3,
        )

    def _short_hyperparameters(self) -> str:
        hyper = self.hyperparameters()
        return ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in hyper.items() if k in ("lengthscales", "outputscale", "noise", "mean")
        )

    def _as_dataset(self, points: Any, include_noise: bool, variance: str) -> Any:
        """Predictions as an ``xarray.Dataset``: ``mean``, ``sd``, ``sd_observation`` (data units).

        On the grid they carry the input's dimensions, coordinates and attributes, plus
        ``observed`` (1 where the input had a value); at points, a ``point`` dimension with
        one coordinate variable per grid dimension. ``sd_observation`` adds the noise
        variance: the learned one, or the per-cell noise on the grid (NaN at missing cells
        and at points, where per-cell noise is unknown).
        """
        try:
            import xarray as xr
        except ImportError as err:
            raise ImportError("GridGP.predict(as_xarray=True) needs xarray: pip install xarray") from err
        if include_noise:
            raise ValueError(
                "include_noise=True applies to the (mean, var) tensors (as_xarray=False); the Dataset "
                "holds both sd (of f) and sd_observation (of a new observation)"
            )
        mean, var = self.predict(points, variance=variance, as_xarray=False)
        mean = mean.detach().cpu().double().numpy()
        var = var.detach().cpu().double().numpy()
        if self.learn_noise:
            noise = float(self.noise) * self.scale**2
        elif points is None:
            cell = (self.cell_noise * self.scale**2).detach().cpu().double()
            if self.observed is not None:
                cell = torch.where(self.observed.cpu(), cell, torch.full_like(cell, math.nan))
            noise = cell.numpy().reshape(self.shape)
        else:
            noise = math.nan
        template = self._coords
        name = (template.attrs.get("name") if template is not None else None) or "values"
        attrs = dict(template.attrs.get("attrs", {})) if template is not None else {}
        units = {"units": attrs["units"]} if "units" in attrs else {}
        fields = {
            "mean": (mean, f"posterior mean of {name}"),
            "sd": (np.sqrt(var), f"posterior standard deviation of {name} (the noise-free field)"),
            "sd_observation": (np.sqrt(var + noise), f"predictive standard deviation of a new observation of {name}"),
        }
        if points is None:
            dims = tuple(self.axis_names)
            ds = template.copy() if template is not None else xr.Dataset(
                coords={d: ax.detach().cpu().numpy() for d, ax in zip(dims, self.axes)})
            for key, (value, long_name) in fields.items():
                ds[key] = (dims, value, {**units, "long_name": long_name})
            observed = self.observed.reshape(self.shape) if self.observed is not None else None
            ds["observed"] = (dims, (observed.cpu().numpy() if observed is not None else
                                     np.ones(self.shape)).astype("int8"),
                              {"long_name": f"1 where {name} was observed"})
        else:
            pts = self._check_points(points).detach().cpu().double().numpy()
            ds = xr.Dataset(coords={d: ("point", pts[:, k]) for k, d in enumerate(self.axis_names)})
            for key, (value, long_name) in fields.items():
                ds[key] = (("point",), value, {**units, "long_name": long_name})
        ds.attrs = {**attrs, "model": f"kronegp.GridGP ({self.path} path)"}
        return ds

    def _grid_noise_for_prediction(self) -> Tensor:
        if self.learn_noise:
            return self.noise.expand(self.n_cells)
        if self.observed is not None and not bool(self.observed.all()):
            raise ValueError(
                "include_noise=True on the grid needs the noise at every cell, but per-cell noise is "
                "known only at observed cells"
            )
        return self.cell_noise

    def _obs_zero(self, vec: Tensor) -> Tensor:
        """Zero a grid vector (or ``(N, t)`` block) at missing cells."""
        if self.observed is None:
            return vec
        obs = self.observed.to(vec.dtype)
        return obs * vec if vec.dim() == 1 else obs.unsqueeze(-1) * vec

    def _solve_observed(self, cov: FullGridCovariance, rhs: Tensor) -> Tensor:
        """``C_OO⁻¹ b_O`` zero-filled, for ``(N, t)`` columns zero at missing cells."""
        out, iters = solve_observed(cov, rhs, self.observed, tol=self.cg_tol, max_iters=self.cg_max_iters)
        self.cg_iterations = iters
        return out

    def _masked_reduction(self, cov: FullGridCovariance, kcols: Tensor) -> Tensor:
        """``diag(k_Oᵀ C_OO⁻¹ k_O)`` for grid columns ``k`` (``(N, c)``).

        Solved 100× tighter than ``cg_tol``: the variance ``k** − kᵀC⁻¹k`` is a difference
        of near-equal terms next to observed cells, so its relative error is the solve's
        error amplified.
        """
        rhs = self._obs_zero(kcols)
        tol = max(self.cg_tol * 1e-2, 50 * torch.finfo(rhs.dtype).eps)
        out, iters = solve_observed(cov, rhs, self.observed, tol=tol, max_iters=self.cg_max_iters)
        self.cg_iterations = iters
        return (rhs * out).sum(0)

    def _masked_grid_variance(self, cov: FullGridCovariance, factors: list[Tensor], method: str) -> Tensor:
        s2 = cov.outputscale
        if method == "auto":
            method = "exact" if self.n_cells <= self.exact_variance_limit else "mc"
            if method == "mc":
                warnings.warn(
                    f"GridGP.predict: the grid has {self.n_cells} cells > exact_variance_limit="
                    f"{self.exact_variance_limit}, so the cg-path variance is a Monte Carlo estimate with "
                    f"{self.variance_samples} samples (pass variance='exact' for one CG solve per cell)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        prior = s2 * kron_vector([f.diagonal() for f in factors])
        if method == "exact":
            n = self.n_cells
            chunk = max(1, min(n, _CHUNK_ELEMENTS // n, 1024))
            red = []
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                unit = torch.zeros(n, stop - start, dtype=prior.dtype, device=prior.device)
                unit[torch.arange(start, stop, device=prior.device), torch.arange(stop - start, device=prior.device)] = 1
                red.append(self._masked_reduction(cov, cov.kernel_matvec(unit)))
            return prior - torch.cat(red)
        # Monte Carlo with a control variate: the deviation of a posterior sample from the
        # posterior mean, for this model and for the full-grid homoskedastic model with noise
        # σ̄² (exact variance known), driven by the same random numbers so the two correlate.
        s = self.variance_samples
        lam, eig, sb2 = cov.lam, cov.eig, cov.sigma_bar2
        f0 = eig.apply_function(lam.sqrt(), self._std_normal(self.n_cells, s, offset=2))
        eps = self._std_normal(self.n_cells, s, offset=3)
        noise_sd = self._fill_noise().detach().sqrt().unsqueeze(-1)
        sol = self._solve_observed(cov, self._obs_zero(f0 + noise_sd * eps))
        dev_model = f0 - cov.kernel_matvec(sol)
        dev_control = f0 - eig.apply_function(lam / (lam + sb2), f0 + sb2.sqrt() * eps)
        var_control = eig.diag_of(lam * sb2 / (lam + sb2))
        return var_control + (dev_model * dev_model - dev_control * dev_control).mean(-1)

    @_warns_once("GridGP.sample")
    @torch.no_grad()
    def sample(self, n: int = 1) -> Tensor:
        """``n`` joint posterior samples of ``f`` on the grid, shape ``(n, *grid)`` (data units).

        Exact path: ``m + Q ((λσ²/(λ+σ²))^{½} ∘ ξ)``. exact-missing and cg paths: pathwise conditioning
        (Matheron's rule), ``f = μ + f₀ + K_{·O} C_OO⁻¹ (r − f₀ − ε)_O`` with ``f₀ ~ N(0, K)``
        and ``ε ~ N(0, D)``, one block solve for all samples (exact with ``G``'s factor on the
        exact-missing path, with ``C_OO``'s eigendecomposition on the separable-mask path).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        g = torch.Generator(device=self.y.device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,))))
        if self.path == "exact":
            return self._sample_exact(n, g)
        factors = self._factors()
        s2 = self.outputscale
        mu = self._mean_grid()
        resid = self.y - mu
        xi = torch.randn(self.n_cells, n, generator=g, dtype=self.y.dtype, device=self.y.device)
        if self.path in ("exact-missing", "separable-mask"):
            # Matheron's rule as on the cg path, with C_OO⁻¹ applied exactly
            fm = (FewMissing(KronEigen(factors), s2, self.noise, self._missing) if self.path == "exact-missing"
                  else self._separable(factors))
            f0 = fm.eig.apply_function(fm.lam.sqrt(), xi)
            eps = torch.randn(self.n_cells, n, generator=g, dtype=self.y.dtype, device=self.y.device)
            sol = fm.apply(self._obs_zero(resid.unsqueeze(-1) - f0 - self.noise.sqrt() * eps))
            out = mu.unsqueeze(-1) + f0 + s2 * kron_matmul(factors, sol)
        else:
            cov = self._full_cov(factors)
            f0 = cov.eig.apply_function(cov.lam.sqrt(), xi)
            eps = torch.randn(self.n_cells, n, generator=g, dtype=self.y.dtype, device=self.y.device)
            noise_sd = self._fill_noise().sqrt().unsqueeze(-1)
            sol = self._solve_observed(cov, self._obs_zero(resid.unsqueeze(-1) - f0 - noise_sd * eps))
            out = mu.unsqueeze(-1) + f0 + cov.kernel_matvec(sol)
        return (out.mT * self.scale + self.shift).reshape(n, *self.shape)

    # ------------------------------------------------------------------ memory (kronegp.models.memory)

    #: ``device ↦ free bytes`` the memory plans are made for (replace it to plan for another budget)
    free_memory = staticmethod(memory.free_memory)

    def memory_plan(self, operation: str = "step", *, samples: int = 1,
                    free_bytes: Optional[int] = None) -> memory.MemoryPlan:
        """The predicted peak memory of a training ``"step"``, ``"predict"`` (on the grid) or
        ``"sample"`` and the chunk of its temporaries (:mod:`kronegp.models.memory`), for
        ``free_bytes`` or the device's free memory (:attr:`free_memory`)."""
        return memory.plan_for_model(self, operation, samples=samples, free_bytes=free_bytes, free=self.free_memory)

    def _memory_chunk(self, operation: str = "step", samples: int = 1) -> int:
        """The chunk of ``operation``, after checking that it fits (:class:`memory.MemoryPlanError`
        before any work otherwise). A training step's is kept until the next :meth:`fit`."""
        if operation != "step":
            return memory.check_plan(self.memory_plan(operation, samples=samples), self).chunk
        key = (self.y.dtype, self.y.device, self.path, self.num_probes, self.shape)
        cached = self.__dict__.get("_step_chunk")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_step_chunk"] = (key, memory.check_plan(self.memory_plan("step"), self).chunk)
        return cached[1]

    def _predict_exact_grid(self, include_noise: bool) -> tuple[Tensor, Tensor]:
        chunk = self._memory_chunk("predict")
        mean = self._mean_grid() if self.user_mean else self.mean_module.constant
        m, v = exact_posterior_grid(self.y, mean, self.noise, self.outputscale, self._factors(), chunk)
        if include_noise:
            v += self.noise
        v.clamp_min_(0).mul_(self.scale**2)
        m.mul_(self.scale).add_(self.shift)
        return m.view(self.shape), v.view(self.shape)

    def _sample_exact(self, n: int, generator: torch.Generator) -> Tensor:
        chunk = self._memory_chunk("sample", samples=n)
        mean = self._mean_grid() if self.user_mean else self.mean_module.constant
        out = exact_posterior_samples(self.y, mean, self.noise, self.outputscale, self._factors(), n, generator, chunk)
        return out.mul_(self.scale).add_(self.shift).view(n, *self.shape)

    # ------------------------------------------------------------------ reporting

    def hyperparameters(self) -> dict[str, Any]:
        """Current hyperparameters in data units, for printing.

        Keys: ``lengthscales`` (one per dimension, axis units; ``None`` for a kernel
        without one), ``outputscale`` (variance of ``f``), ``noise`` (learned variance, or
        ``"per-cell (fixed)"``), ``mean`` (the constant, or ``"user"``), ``kernels`` (every
        constrained kernel parameter by dimension), ``path``.
        """
        with torch.no_grad():
            lengthscales, kern_params = [], []
            for kern in self.kernels:
                ls = getattr(kern, "lengthscale", None)
                lengthscales.append(ls.reshape(-1).tolist()[0] if isinstance(ls, Tensor) and ls.numel() == 1 else (ls.reshape(-1).tolist() if isinstance(ls, Tensor) else None))
                params = {}
                for name, raw, constraint in kern.named_parameters_and_constraints():
                    value = constraint.transform(raw) if constraint is not None else raw
                    params[name.replace("raw_", "")] = value.reshape(-1).tolist() if value.numel() > 1 else float(value)
                kern_params.append(params)
            out = {
                "lengthscales": lengthscales,
                "outputscale": float(self.outputscale) * self.scale**2,
                "noise": float(self.noise) * self.scale**2 if self.learn_noise else "per-cell (fixed)",
                "mean": float(self.mean_module.constant) * self.scale + self.shift if not self.user_mean else "user",
                "kernels": kern_params,
                "path": self.path,
            }
        return out

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, observed={self.n_observed}/{self.n_cells}, path={self.path}, "
            f"dtype={self.y.dtype}, device={self.y.device}"
        )
