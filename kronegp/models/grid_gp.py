"""GridGP: Gaussian-process regression on a grid (n_1 × … × n_d), missing cells allowed.

Model (in standardised units when ``standardize=True``)::

    y_c = μ(x_c) + f(x_c) + ε_c,   f ~ GP(0, s² Π_k k_k(x_k, x_k')),   ε_c ~ N(0, d_c)

over the cells ``c`` of the grid ``x = (axes[0][i_1], …, axes[d-1][i_d])``. The covariance
of ``f`` on the grid is ``K = s² (K_1 ⊗ … ⊗ K_d)``, ``K_k`` the ``n_k × n_k`` matrix of the
kernel of dimension ``k`` on its axis. ``d_c = σ²`` (learned) unless per-cell noise is given.

Four inference paths, chosen once from the data when the model is built (``path``), each one
object of :mod:`kronegp.models.paths` with the same interface (the model never branches on it):

* **exact** (every cell observed, homoskedastic noise): eigendecompose each ``K_k``;
  the likelihood, its analytic gradients, the posterior mean and the exact posterior
  variance on the grid cost a few Kronecker matmuls (:mod:`kronegp.models._exact`).
* **exact-missing** (homoskedastic noise, at most
  :func:`~kronegp.models._few_missing.few_missing_limit` missing cells, and a step the cost rule of
  :mod:`kronegp.models.costs` finds affordable on this grid): the Schur complement
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
import torch
from torch import Tensor

from kronegp.models import memory
from kronegp.models._data import check_kernels, check_settings, standardised
from kronegp.models._params import GridHyperparameters
from kronegp.models._points import check_points, point_chunks
from kronegp.models._representation import checked_lml
from kronegp.models._two_level import FrozenTwoLevel
from kronegp.models.layout import LocalLayout
from kronegp.models.paths import InferencePath, check_mask, choose_path
from kronegp.solvers.report import one_warning

__all__ = ["GridGP", "SolveInfo"]


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
            (cg path with missing cells, or with per-cell noise on a full grid: the data column's
            true residual, measured in float64), else ``None``.
        lml_error: first-order estimate of the likelihood's error from that residual (nats,
            model units), else ``None``.
        probes: probe vectors of the traces (0 on the exact paths; on the cg path random probes, or
            one unit probe per cell when the traces are exact).
        estimate: whether the likelihood and its gradient are stochastic estimates (the cg path
            with random probes, :meth:`~kronegp.models.paths.CGPath.exact_trace`), not exact up to
            the CG tolerance.
        lml_std_error: the standard error of the likelihood's stochastic log-determinant term,
            from the spread of its probes' estimates (nats, model units; cg path with per-cell
            noise), else ``None``.
        coarse_modes: the coarse modes of the two-level preconditioner the cg path built for the
            connected pieces of missing cells (holes, clouds; :mod:`kronegp.models._two_level`), else
            ``None`` (no such piece, scattered cells only, or another path).
        preconditioner_reused: on the cg path with a two-level preconditioner of the missing cells
            (holes, clouds: :mod:`kronegp.models._two_level`), ``True`` where the step reused the one
            the model keeps from an earlier step, ``False`` where it was built or rebuilt for this step
            (the first step, hyperparameters moved past ``REFRESH_DRIFT``, CG iterations grown:
            :class:`~kronegp.models._two_level.FrozenTwoLevel`); ``None`` where none applies (Jacobi).
        missing_solve: on the cg path with missing cells, how ``G = [C⁻¹]_MM`` was solved: ``"cg"`` (CG on
            ``G``; with per-cell noise each of its products a CG solve with ``C``) or ``"dense"`` (per-cell
            noise with few missing cells, :mod:`kronegp.models._masked`: their columns of ``C⁻¹`` solved in
            the likelihood's ``C`` run and ``G`` factored; then ``iterations`` are that run's); else ``None``.
        representation_error: for a model below float64, the first-order estimate (nats) of the same model's
            likelihood in float64 minus this one's: the kernel factors' float32 rounding (~6e-8 of each
            entry), amplified by ``cond(C)``, moves the likelihood by ``½ αᵀEα − ½ tr(C_OO⁻¹E)``, from the
            likelihood's gradient in the factors (exact on the exact paths, the probes' estimate on the cg
            path: :mod:`kronegp.models._representation`). It is the model's representation, not its solver
            (no tolerance or probe count changes it; ``dtype=torch.float64`` removes it), so it is not in
            ``lml_error`` or ``lml_std_error``; where it exceeds both and 1 nat, a warning says so (once per
            model for :meth:`GridGP.log_marginal_likelihood`, once per :meth:`GridGP.fit`). Computed by
            :meth:`GridGP.log_marginal_likelihood` and at the end of :meth:`GridGP.fit` (one more
            evaluation), not by a training step (:meth:`GridGP.loss_backward`): ``None`` there, and for
            float64 models. A per-cell-noise model whose noise is 1e-4…1 of the signal measured 0.04 nats
            on 16³ (1e-8…1e-4: 32 nats), a 128³ one ~2000.
    """

    path: str
    iterations: Optional[int]
    inner_iterations: int
    residual: Optional[float]
    observed_residual: Optional[float]
    lml_error: Optional[float]
    probes: int
    estimate: bool = False
    lml_std_error: Optional[float] = None
    coarse_modes: Optional[int] = None
    preconditioner_reused: Optional[bool] = None
    missing_solve: Optional[str] = None
    representation_error: Optional[float] = None

    @classmethod
    def of(cls, model) -> "SolveInfo":
        """What ``model`` (a :class:`GridGP`) recorded of its last likelihood."""
        extra = model._last_extra
        return cls(
            path=model.path,
            iterations=model.cg_iterations,
            inner_iterations=model.cg_inner_iterations,
            residual=model.cg_residual,
            observed_residual=extra.get("observed_residual"),
            lml_error=extra.get("lml_error"),
            probes=extra.get("probes", 0),
            estimate=bool(extra.get("estimate", False)),
            lml_std_error=None if extra.get("lml_std_error") is None else float(extra["lml_std_error"]),
            coarse_modes=None if extra.get("coarse_modes") is None else int(extra["coarse_modes"]),
            preconditioner_reused=None if extra.get("two_level_reused") is None else bool(extra["two_level_reused"]),
            missing_solve=extra.get("missing_solve"),
            representation_error=extra.get("representation_error"),
        )

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
            (the missing cells, or every cell with per-cell noise) and the cost rule
            (:mod:`kronegp.models.costs`) finds their CG columns affordable on this grid (predicted
            within 2 s a step on a CPU, or no slower than the random probes'), the traces use one
            unit probe per cell instead of ``num_probes`` random ones: likelihood and gradient
            are then exact up to CG tolerance (:attr:`last_solve` ``.estimate`` says which). With per-cell noise on at most this many and
            :data:`~kronegp.models._dense.DENSE_MAX_CPU` (``DENSE_MAX_CUDA``) observed cells the
            likelihood is a dense Cholesky instead: exact, no iterations, no probes.
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
            within its limit, its step is predicted within the exact budget or no slower than
            cg's (:func:`~kronegp.models.paths.exact_missing_pays`: scattered cells cost ``~m·N``,
            so a large grid takes cg for a few hundred of them), and no more than the observed points ``|S|`` of the masked axes
            (its ``m × m`` system is then no larger than separable-mask's ``|S| × |S|``
            eigenproblem), else separable-mask when the mask is constant along some axis and
            ``|S|`` is within :func:`~kronegp.models._separable_mask.separable_mask_limit` (2048 on
            a CPU; forced, up to ``MAX_POINTS_ANY`` = 16384), else cg.
        layout: where the grid vectors live: ``None`` (the whole grid on one device), or a
            placement such as :class:`~kronegp.models.sharded.ShardedPlacement` (the grid sharded
            over a process group; ``values``, ``mask``, ``noise`` this rank's block): see
            :class:`~kronegp.models.sharded.DistributedGridGP` and :mod:`kronegp.models.layout`.

    Attributes:
        path: ``"exact"``, ``"exact-missing"``, ``"separable-mask"`` or ``"cg"``.
        observed: the mask, flat (True = observed; ``None`` when every cell is). Hiding observed
            cells in place (``gp.observed[i] = False``) is taken at the next call where the model's
            path stays the one chosen for the new mask; marking a missing cell observed, or a change
            that would choose another path, raises ``ValueError`` (build a new model:
            :func:`~kronegp.models.paths.check_mask`).
        last_solve: how the last likelihood was computed (:class:`SolveInfo`).
        cuda_graphed: whether the training step runs as a recorded CUDA graph (read-only; see
            :meth:`loss_backward`): ``True`` while the model holds a recorded graph of its step, which
            the next :meth:`loss_backward` or :meth:`fit` step replays (recording it again first where what
            it reads changed); ``False`` on the CPU, before the first step, with ``cuda_graph=False``,
            where the step cannot be a graph or its recording failed, and while the step needs more CG
            iterations than a graph unrolls (it then runs eagerly).
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
        layout: Any = None,
    ):
        super().__init__()
        settings = check_settings(
            standardize=standardize, num_probes=num_probes, cg_tol=cg_tol, cg_max_iters=cg_max_iters,
            precondition=precondition, seed=seed, exact_variance_limit=exact_variance_limit,
            variance_samples=variance_samples, exact_trace_limit=exact_trace_limit,
        )
        self.layout, data = (layout or LocalLayout).place(values, axes, mask=mask, noise=noise, dtype=dtype,
                                                          device=device)
        self.shape = self.layout.shape
        self.ndim = len(self.shape)
        self.n_cells = math.prod(self.shape)
        self.axis_names, self.axis_units, self.axis_origins = data.axis_names, data.axis_units, data.axis_origins
        self._coords = data.coords  # an xarray input's coordinates: predictions come back as xarray
        for key in ("num_probes", "cg_tol", "cg_max_iters", "precondition", "seed", "exact_variance_limit",
                    "exact_trace_limit", "variance_samples"):
            setattr(self, key, settings[key])
        self.resample_probes = False
        self.cg_iterations: Optional[int] = None
        self.cg_inner_iterations = 0
        self.cg_residual: Optional[float] = None
        self._last_extra: dict = {}
        self.history: list[float] = []
        self._graphed = None  # the CUDA graph of the training step (``loss_backward``)
        self._graph_failed: Optional[str] = None  # why recording it failed, once it has
        #: the cg path's two-level preconditioner of the missing cells, kept across steps until the
        #: hyperparameters drift (:class:`~kronegp.models._two_level.FrozenTwoLevel`)
        self._two_level = FrozenTwoLevel()

        values_t = data.values.reshape(-1)
        observed = data.mask.reshape(-1) if data.mask is not None else None
        self.n_observed = self.layout.count(observed) if observed is not None else self.n_cells
        y, self.shift, self.scale, mean0, var0 = standardised(values_t, observed, self.n_observed,
                                                              settings["standardize"], self.layout)
        self.register_buffer("y", y)
        self.register_buffer("observed", observed)
        #: the inference path, chosen once (:mod:`kronegp.models.paths`); :attr:`path` names it
        self.inference: InferencePath = choose_path(path, self.layout, observed, self.n_observed,
                                                    data.noise is not None, values_t.device,
                                                    dtype=values_t.dtype, num_probes=settings["num_probes"])
        self._path_request = path  # what check_mask asks choose_path again when the mask changes
        self.register_buffer(
            "cell_noise", data.noise.reshape(-1) / self.scale**2 if data.noise is not None else None
        )
        for k, ax in enumerate(data.axes):
            self.register_buffer(f"axis_{k}", ax)

        self.kernels = torch.nn.ModuleList(check_kernels(kernels, data.axes))
        self._init_hyperparameters(var0, mean0, data.noise is None, mean, values_t.dtype, values_t.device)

        # ---- initial hyperparameters: chosen by the user (data units), else the defaults above
        self._hyperparameters_chosen = False  # set by set_hyperparameters and load_state_dict
        self._warned_unfitted = False
        self.register_load_state_dict_post_hook(_loaded_state)
        if hyperparameters is not None:
            self.set_hyperparameters(hyperparameters)
        check_mask(self)  # records the mask: later calls see whether it changed (paths.check_mask)

    @property
    def path(self) -> str:
        """The inference path chosen when the model was built: ``"exact"``, ``"exact-missing"``,
        ``"separable-mask"`` or ``"cg"``."""
        return self.inference.name

    @property
    def cuda_graphed(self) -> bool:
        """Whether the training step runs as a recorded CUDA graph (class docstring; :mod:`kronegp.models._graph`)."""
        return self._graphed is not None and self._graphed.graph is not None

    @property
    def last_solve(self) -> "SolveInfo":
        """How the last likelihood was computed: path, CG iterations, residuals, probes."""
        return SolveInfo.of(self)

    def __getstate__(self):
        # a recorded CUDA graph is not copied or pickled (a copy records its own when it trains)
        state = self.__dict__.copy()
        state["_graphed"] = None
        return state

    # ------------------------------------------------------------------ the model's grid vectors

    def _mean_grid(self) -> Tensor:
        """``μ`` on the layout's cells in model units (length ``n_local``)."""
        if not self.user_mean:
            return self.layout.replicated(self.mean_module.constant).expand(self.layout.n_local)
        return (self.layout.call_replicated(self.mean_module, self.layout.grid_points(self.axes)) - self.shift) / self.scale

    def _mean_points(self, points: Tensor) -> Tensor:
        if not self.user_mean:
            return self.mean_module.constant.expand(points.shape[0])
        return (self.mean_module(points) - self.shift) / self.scale

    def _fill_noise(self) -> Tensor:
        """``d̃`` on the full grid in model units, with gradient: σ² everywhere, or the per-cell
        noise at observed cells and its geometric mean at missing ones (any positive value
        there leaves ``C_OO`` unchanged)."""
        return self.layout.fill_noise(self.noise, self.cell_noise, self.observed)

    # ------------------------------------------------------------------ likelihood and fitting

    def log_marginal_likelihood(self) -> Tensor:
        """``log p(y_O)`` in data units (0-dim tensor, differentiable in the hyperparameters).

        Exact on the exact paths; on the cg path an estimate whose log-determinant is
        stochastic (SLQ with ``num_probes`` probes) and whose gradient is the stochastic
        trace estimate (see :mod:`kronegp.models._masked`).

        Below float64 it also estimates how far the same model in float64 would be
        (:attr:`last_solve` ``.representation_error``; it warns, once per model, where that exceeds the
        solver's reported error and 1 nat): one backward pass to the kernel factors, made even under
        ``torch.no_grad()`` (the value is then returned detached); the training step
        (:meth:`loss_backward`) does not make it.
        """
        check_mask(self)
        with one_warning("GridGP.log_marginal_likelihood", stacklevel=4):
            return checked_lml(self, self._lml, once=True)

    def _lml(self) -> Tensor:
        """``log p(y_O)`` in data units, without the representation error's estimate."""
        return self.inference.lml(self) - self.n_observed * math.log(self.scale)

    def _loss(self) -> Tensor:
        """The training loss ``−log p(y_O) / n_observed`` (differentiable), as the training step evaluates
        it: without the representation error's estimate (:meth:`fit` makes it once, at its end)."""
        check_mask(self)
        with one_warning("GridGP.log_marginal_likelihood", stacklevel=4):
            return -self._lml() / self.n_observed

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
                whose number follows the outer CG's, or ``G`` factored: its Cholesky check reads the device) or with a grid axis longer than the GPU
                eigensolver takes (:data:`kronegp.linalg.DEVICE_JACOBI_MAX_ROWS`, 168 points
                on an H100: larger factors are decomposed by synchronising paths), which run
                eagerly, as does a step whose CG runs need more than
                :data:`kronegp.models._graph.MAX_RECORDED_ITERATIONS` iterations; if recording fails
                (e.g. a user kernel or mean that synchronises), it warns once with the reason
                and runs eagerly. Holes and clouds keep their two-level preconditioner in the
                graph (the model's frozen one, refreshed between replays when the hyperparameters
                drift: :mod:`kronegp.models._graph`). ``True``: raise instead, for every reason above but the
                iteration limit (such a step still runs eagerly); ``False``: eagerly.
                A recorded graph keeps one evaluation's intermediate tensors allocated between
                calls.
        """

        from kronegp.models._graph import loss_backward

        check_mask(self)  # a mask changed in place: refreshed (or a clear error) before a graph replays
        self.layout.step_chunk(self)  # MemoryPlanError before any work when the step cannot fit
        return loss_backward(self, cuda_graph)

    def _eager_loss_backward(self) -> Tensor:
        """``−log p(y_O) / n_observed``, back-propagated into the parameters' ``.grad``."""
        loss = self._loss()
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

        Below float64, one more evaluation at the fitted hyperparameters estimates the likelihood's
        representation error (:attr:`last_solve` ``.representation_error``) and warns, in the fit's one
        warning, where it exceeds the solver's reported error and 1 nat.

        Returns:
            :attr:`history`, the loss after every step of every fit so far.
        """

        from kronegp.models._fit import fit

        return fit(self, iters, optimizer, lr, progress, patience=patience, min_delta=min_delta,
                   cuda_graph=cuda_graph)

    # ------------------------------------------------------------------ prediction

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
            built from an ``xarray.DataArray``, an ``xarray.Dataset`` (:func:`~kronegp.models._dataset.prediction_dataset`)
            with ``mean``, ``sd`` (of ``f``) and ``sd_observation`` (of a new observation,
            ``f`` + noise) on the input's coordinates, with its attributes.

        Before any :meth:`fit` (and without :meth:`set_hyperparameters` or
        ``hyperparameters=``) it warns, once, that the initial hyperparameters are used.
        """

        check_mask(self)
        self._warn_if_unfitted()
        if as_xarray is None:
            as_xarray = self._coords is not None
        if as_xarray:
            from kronegp.models._dataset import prediction_dataset

            return prediction_dataset(self, points, include_noise, variance)
        if variance not in ("auto", "exact", "mc"):
            raise ValueError(f"variance must be 'auto', 'exact' or 'mc', got {variance!r}")
        if points is None:
            mean, var = self.inference.posterior_grid(self, variance)
            if include_noise and not self.learn_noise and self.observed is not None and not bool(self.observed.all()):
                raise ValueError("include_noise=True on the grid needs the noise at every cell, but per-cell "
                                 "noise is known only at observed cells")
            if include_noise:
                var.add_(self.noise if self.learn_noise else self.cell_noise)
            shape = self.shape
        else:
            pts = check_points(points, self.ndim, self.y)
            mean, var = self.inference.posterior_points(self, pts, point_chunks(pts.shape[0], self.shape))
            if include_noise:
                if not self.learn_noise:
                    raise ValueError(
                        "include_noise=True at arbitrary points needs a homoskedastic noise; this model has "
                        "per-cell noise, known only on the grid"
                    )
                var.add_(self.noise)
            shape = (pts.shape[0],)
        var.clamp_min_(0).mul_(self.scale**2)
        return mean.mul_(self.scale).add_(self.shift).view(shape), var.view(shape)

    def _warn_if_unfitted(self) -> None:
        if self.history or self._hyperparameters_chosen or self._warned_unfitted:
            return
        self._warned_unfitted = True
        short = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in self.hyperparameters().items() if k in ("lengthscales", "outputscale", "noise", "mean"))
        warnings.warn(
            "GridGP.predict: the model was never fitted, so it predicts with its initial "
            f"hyperparameters {short}; call fit() first, or choose them with "
            "set_hyperparameters() (this warning is shown once per model)",
            UserWarning,
            stacklevel=3,
        )

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
        check_mask(self)
        g = torch.Generator(device=self.y.device)
        g.manual_seed(int(torch.randint(0, 2**62, (1,))))
        return self.inference.sample(self, n, g).mul_(self.scale).add_(self.shift).reshape(n, *self.shape)

    # ------------------------------------------------------------------ memory (kronegp.models.memory)

    #: ``device ↦ free bytes`` the memory plans are made for (replace it to plan for another budget)
    free_memory = staticmethod(memory.free_memory)

    def memory_plan(self, operation: str = "step", *, samples: int = 1,
                    free_bytes: Optional[int] = None) -> memory.MemoryPlan:
        """The predicted peak memory of a training ``"step"``, ``"predict"`` (on the grid) or
        ``"sample"`` and the chunk of its temporaries (:mod:`kronegp.models.memory`), for
        ``free_bytes`` or the device's free memory (:attr:`free_memory`)."""
        check_mask(self)
        return memory.plan_for_model(self, operation, samples=samples, free_bytes=free_bytes, free=self.free_memory)

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, observed={self.n_observed}/{self.n_cells}, path={self.path}, "
            f"dtype={self.y.dtype}, device={self.y.device}"
        )
