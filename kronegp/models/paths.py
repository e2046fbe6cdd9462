"""The inference paths of a grid GP: one object per path, chosen once when the model is built.

Every path has the same small interface (:class:`InferencePath`); the model calls it and never
asks which path it holds:

* :meth:`~InferencePath.lml`: the log marginal likelihood in model units, as a *surrogate*:
  its value is the likelihood (or its estimate), its gradient the right gradient (analytic on
  the exact paths, the stochastic trace estimate on the cg path). It records how it was
  computed in the model's ``cg_iterations``, ``cg_inner_iterations``, ``cg_residual`` and
  ``_last_extra`` (what :class:`~kronegp.models.grid_gp.SolveInfo` reports).
* :meth:`~InferencePath.posterior_grid` / :meth:`~InferencePath.posterior_points`: the
  posterior mean and variance of ``f`` (model units, noise-free) on the grid or at points.
* :meth:`~InferencePath.sample`: joint posterior samples on the grid (model units).
* :meth:`~InferencePath.memory_plan`: the peak memory of a training step, ``predict()`` on the grid
  or ``sample(n)`` on this path (counted by :mod:`kronegp.models.memory`; the path chooses which
  count applies and the chunk of the exact path's slabs or the cg path's CG runs), and
  :meth:`~InferencePath.graph_obstacle` (why a training step cannot be a CUDA graph).

The paths and their numerical homes:

* :class:`ExactPath` (every cell observed, homoskedastic noise): :mod:`kronegp.models._exact`.
* :class:`ExactMissingPath` (few missing cells): ``G = X_MM`` factored,
  :mod:`kronegp.models._few_missing`.
* :class:`SeparableMaskPath` (a mask constant along some axes): :mod:`kronegp.models._separable_mask`.
* :class:`CGPath` (per-cell noise, or many missing cells): :mod:`kronegp.models._masked`; its
  likelihood with per-cell noise on few observed cells is a dense Cholesky
  (:mod:`kronegp.models._dense`).

Each does its grid-vector work through the model's layout (:mod:`kronegp.models.layout`:
Kronecker products, eigendecompositions, sums over the grid, probes), so that the sharded
layout (:mod:`kronegp.models.sharded`) runs the same exact and cg paths; exact-missing and
separable-mask need every cell at hand and refuse it (:func:`choose_path`). A path object holds no tensor of the model: it reads the
model's buffers and hyperparameters at every call (they follow ``.to()``).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import ClassVar, Optional

import torch
from torch import Tensor

from kronegp.models import costs, memory
from kronegp.models._exact import eigen_bilinear_form, exact_posterior_grid, exact_posterior_samples
from kronegp.models._few_missing import (MAX_BOX_CELLS, MAX_FORM_ELEMENTS, FewMissing, MissingBox, box_pays,
                                         few_missing_limit, forms_rows, rows_through_box, variance_columns)
from kronegp.models._masked import (CGLMLPieces, FullGridCovariance, ProbeDraws, cg_lml_pieces, plain_cg_lml_pieces,
                                    refresh_two_level, solve_observed)
from kronegp.models._points import CHUNK_ELEMENTS, cross_factors, rowwise_kron_columns, rowwise_kron_dot
from kronegp.models._separable_mask import (MAX_POINTS_ANY, SeparableMask, lml_surrogate, mask_axes,
                                            separable_mask_limit, variance_rows)

__all__ = ["InferencePath", "ExactPath", "ExactMissingPath", "SeparableMaskPath", "CGPath", "choose_path", "check_mask",
           "PATHS"]


def nonfinite_message(where: str, value: float, hyperparameters: dict) -> str:
    return f"{where}: the loss became {value}; hyperparameters: {hyperparameters}"


def check_finite(gp, factors: list[Tensor]) -> None:
    """Raise the error ``fit`` gives for a non-finite loss, before any solve runs on
    non-finite hyperparameters (CG would fail with an unrelated message)."""
    if gp.layout.probe_store is not None:  # not while a CUDA graph is recorded (no reads there)
        return
    parts = [gp.outputscale.detach().reshape(1)] + [f.detach().reshape(-1) for f in factors]
    if gp.learn_noise:
        parts.append(gp.noise.detach().reshape(1))
    if not bool(torch.isfinite(torch.cat(parts)).all()):
        raise FloatingPointError(nonfinite_message("GridGP.log_marginal_likelihood", float("nan"), gp.hyperparameters()))


def _checked_inputs(gp) -> tuple[list[Tensor], Tensor]:
    """The factors ``K_k`` and the residual ``y − μ`` on the grid, after :func:`check_finite`."""
    factors = gp._factors()
    resid = gp.y - gp._mean_grid()
    check_finite(gp, factors)
    return factors, resid


def _obs_zero(gp, vec: Tensor) -> Tensor:
    """Zero a grid vector (or ``(N, t)`` block) at missing cells."""
    if gp.observed is None:
        return vec
    obs = gp.observed.to(vec.dtype)
    return obs * vec if vec.dim() == 1 else obs.unsqueeze(-1) * vec


def check_mask(gp) -> None:
    """Keep what the model derived from its mask true when the mask changed since it was last
    seen: changed in place (``gp.observed[i] = False``: its ``_version`` moved), loaded by
    ``load_state_dict``, or a new tensor (``.to()``, an assignment). Read at every call of the
    model (an identity and a version compared); the first call, when the model is built, records
    the mask and its complement ``~observed`` (the plan's second bool grid vector).

    A change that only hides observed cells is taken, when the path chosen for the new mask (with
    the request the model was built with) is the model's path: the observed count, the complement
    and its box, the step's memory plan and a recorded CUDA graph are refreshed (the
    standardisation stays: any fixed one is exact; the paths read the values at observed cells
    only). Anything else raises ``ValueError`` naming what to do (a new ``GridGP``): a cell marked
    observed that was missing (its value was never given: the model holds 0 there), a mask whose
    path would differ (auto would now choose another, or a forced one no longer applies), a
    sharded grid (each rank holds its block; the count is collective)."""
    obs = gp.observed
    if obs is None:
        return
    seen = gp.__dict__.get("_missing_cache")
    if seen is not None and seen[0] is obs and seen[1] == obs._version:
        return
    missing = ~obs
    if seen is not None:
        before = seen[2].to(obs.device)
        newly_missing = int((missing & ~before).sum())
        if bool((obs & before).any()):
            raise ValueError(
                f"GridGP: the mask (gp.observed) was changed so that {int((obs & before).sum())} missing cells are "
                "marked observed; the model never had their values (it holds 0 there). Build a new GridGP with the "
                "values and the mask")
        if newly_missing:
            _take_hidden_cells(gp, obs, newly_missing)
    gp.__dict__["_missing_cache"] = (obs, obs._version, missing)


def _take_hidden_cells(gp, obs: Tensor, newly_missing: int) -> None:
    """:func:`check_mask`'s refresh after ``newly_missing`` observed cells were hidden, or its error."""
    what = f"GridGP: the mask (gp.observed) was changed in place to hide {newly_missing} observed cells"
    if not gp.layout.whole_grid:
        raise ValueError(f"{what} on one rank's block of a sharded grid (the observed count is collective); "
                         "build a new model on every rank with the new mask")
    n_observed = gp.layout.count(obs)
    if n_observed == 0:
        raise ValueError(f"{what}: every cell is now missing, there is nothing to fit")
    request = gp.__dict__.get("_path_request", gp.path)
    try:
        chosen = choose_path(request, gp.layout, obs, n_observed, gp.cell_noise is not None, obs.device,
                             dtype=gp.y.dtype, num_probes=gp.num_probes)
    except ValueError as err:
        raise ValueError(f"{what}; path={request!r} no longer applies ({err}). Build a new GridGP with the new "
                         "mask") from None
    if repr(chosen) != repr(gp.inference):
        raise ValueError(f"{what}; the model's path is {gp.inference!r} but path={request!r} would now choose "
                         f"{chosen!r}. Build a new GridGP with the new mask (or pass path= to keep one that applies)")
    gp.n_observed = n_observed
    gp.__dict__.pop("_step_chunk", None)  # the plan counts the mask's pieces (the two-level preconditioner)
    gp._graphed = None  # a recorded step holds the old count


def _missing(gp) -> Optional[Tensor]:
    """``~observed`` (kept while ``observed`` is the same tensor at the same version: :func:`check_mask`),
    or ``None``."""
    if gp.observed is None:
        return None
    check_mask(gp)
    return gp.__dict__["_missing_cache"][2]


def _missing_box(gp, sizes: list[int]) -> MissingBox:
    """The :class:`MissingBox` of ``_missing(gp)`` on a grid of ``sizes`` (kept with it, like it)."""
    missing = _missing(gp)
    cached = gp.__dict__.get("_missing_box_cache")
    if cached is None or cached[0] is not missing:
        cached = gp.__dict__["_missing_box_cache"] = (missing, MissingBox(missing, sizes))
    return cached[1]


def _report(gp, iterations, inner, residual, extra: dict) -> None:
    gp.cg_iterations, gp.cg_inner_iterations, gp.cg_residual, gp._last_extra = iterations, inner, residual, extra


class InferencePath:
    """One way to compute a grid GP's likelihood, posterior and samples (module docstring).

    Args:
        layout: where the grid vectors live (:class:`~kronegp.models.layout.LocalLayout`).
    """

    #: the name :attr:`GridGP.path` reports
    name: ClassVar[str] = ""

    def __init__(self, layout):
        self.layout = layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------ the interface

    def lml(self, gp) -> Tensor:
        """``log p(y_O)`` in model units (without the standardisation's Jacobian), as a surrogate."""
        raise NotImplementedError

    def memory_plan(self, gp, operation: str, samples: int, budget: Optional[float]) -> memory.MemoryPlan:
        """The :class:`~kronegp.models.memory.MemoryPlan` of ``operation`` (``"step"``, ``"predict"`` on the
        grid or ``"sample"`` of ``samples`` draws; checked by :func:`~kronegp.models.memory.plan_for_model`,
        which calls this) on this path, with its chunk the largest within ``budget`` bytes (``None``: no
        limit) where the path chunks its work."""
        raise NotImplementedError

    def graph_obstacle(self, gp) -> Optional[str]:
        """Why this path's training step cannot be recorded as a CUDA graph, or ``None``."""
        return None

    def graph_state(self, gp):
        """What a recorded training step reads besides the model's parameters and buffers and was built
        outside it (hashable; ``None``: nothing): where it changes, the graph is recorded again."""
        return None

    def between_replays(self, gp) -> tuple[bool, dict]:
        """Between two replays of the recorded training step (:mod:`kronegp.models._graph`): refresh,
        eagerly, what the step keeps frozen across steps. Returns whether the graph must be recorded
        again (what it reads changed shape) and the entries of ``_last_extra`` the next replay's
        report gets (what the refresh did)."""
        return False, {}

    def posterior_grid(self, gp, variance: str) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of ``f`` on the grid (model units, flat, fresh tensors)."""
        factors, s2 = gp._factors(), gp.outputscale
        system, alpha = self._solved(gp, factors, gp.y - gp._mean_grid())
        mean = gp._mean_grid() + s2 * self.layout.kron_matmul(factors, alpha.unsqueeze(-1)).squeeze(-1)
        return mean, self._grid_variance(gp, system, factors, variance)

    def posterior_points(self, gp, pts: Tensor, chunks) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of ``f`` at ``pts`` (``(n, d)``, checked), by ``chunks``
        (slices of the points), in model units."""
        factors, s2 = gp._factors(), gp.outputscale
        system, alpha = self._solved(gp, factors, gp.y - gp._mean_grid())
        means, vars_ = [], []
        for sl in chunks:
            cross, prior = cross_factors(gp.kernels, gp.axes, pts[sl])
            means.append(gp._mean_points(pts[sl]) + s2 * rowwise_kron_dot(alpha, cross))
            vars_.append(s2 * prior - self._point_reduction(gp, system, cross, s2))
        return torch.cat(means), torch.cat(vars_)

    def sample(self, gp, n: int, generator: torch.Generator) -> Tensor:
        """``n`` joint posterior samples of ``f`` on the grid, ``(n, N)`` in model units.

        Pathwise conditioning (Matheron's rule): ``f = μ + f₀ + K_{·O} C_OO⁻¹ (r − f₀ − ε)_O``
        with ``f₀ ~ N(0, K)`` and ``ε ~ N(0, D)``, one block solve for all samples.
        """
        factors, like = gp._factors(), gp.y
        mu = gp._mean_grid()
        resid = gp.y - mu
        xi = torch.randn(gp.n_cells, n, generator=generator, dtype=like.dtype, device=like.device)
        system = self._system(gp, factors)
        f0 = system.eig.apply_function(system.lam.sqrt(), xi)
        eps = torch.randn(gp.n_cells, n, generator=generator, dtype=like.dtype, device=like.device)
        noise_sd = gp._fill_noise().sqrt().unsqueeze(-1)
        sol = self._apply_inverse(gp, system, _obs_zero(gp, resid.unsqueeze(-1) - f0 - noise_sd * eps))
        return (mu.unsqueeze(-1) + f0 + gp.outputscale * self.layout.kron_matmul(factors, sol)).mT

    # ------------------------------------------------------------------ what the posteriors need

    def _system(self, gp, factors: list[Tensor]):
        """The system that applies ``C_OO⁻¹`` (with ``.eig``, ``.lam``: ``K``'s eigendecomposition)."""
        raise NotImplementedError

    def _apply_inverse(self, gp, system, rhs: Tensor) -> Tensor:
        """``C_OO⁻¹ b_O`` zero-filled, for ``(N, t)`` columns zero at missing cells."""
        return system.apply(rhs)

    def _solved(self, gp, factors: list[Tensor], resid: Tensor):
        """``(system, α)``: what the variances need, and ``α = C_OO⁻¹ r_O`` zero-filled."""
        system = self._system(gp, factors)
        return system, self._apply_inverse(gp, system, _obs_zero(gp, resid).unsqueeze(-1)).squeeze(-1)

    def _grid_variance(self, gp, system, factors: list[Tensor], variance: str) -> Tensor:
        raise NotImplementedError

    def _point_reduction(self, gp, system, cross: list[Tensor], s2: Tensor) -> Tensor:
        """``k*ᵀ C_OO⁻¹ k*`` for the points whose cross factors are ``cross``."""
        raise NotImplementedError


# ---------------------------------------------------------------------- exact Kronecker


class ExactPath(InferencePath):
    """Every cell observed, one noise level: ``C = Q diag(λ + σ²) Qᵀ`` exactly
    (:mod:`kronegp.models._exact`), chunked by the memory plan."""

    name = "exact"

    @staticmethod
    def _mean(gp) -> Tensor:
        # y and μ apart (a constant μ never becomes a grid vector): memory.py counts this
        return gp._mean_grid() if gp.user_mean else gp.mean_module.constant

    def lml(self, gp) -> Tensor:
        factors = gp._factors()
        _report(gp, 0, gp.cg_inner_iterations, gp.cg_residual, {})
        return self.layout.exact_lml(gp.y, gp.noise, gp.outputscale, factors, mean=self._mean(gp),
                                     chunk=self.layout.step_chunk(gp))

    def memory_plan(self, gp, operation, samples, budget):
        # the slabs' chunk: the largest within the budget
        return memory.choose_exact_plan(gp.shape, gp.y.dtype, operation, samples=samples, user_mean=gp.user_mean,
                                        device_type=gp.y.device.type, budget=budget)

    def posterior_grid(self, gp, variance: str) -> tuple[Tensor, Tensor]:
        chunk = memory.operation_chunk(gp, "predict")
        return exact_posterior_grid(gp.y, self._mean(gp), gp.noise, gp.outputscale, gp._factors(), chunk)

    def sample(self, gp, n: int, generator: torch.Generator) -> Tensor:
        chunk = memory.operation_chunk(gp, "sample", samples=n)
        return exact_posterior_samples(gp.y, self._mean(gp), gp.noise, gp.outputscale, gp._factors(), n,
                                       generator, chunk)

    def _solved(self, gp, factors, resid):
        eig = self.layout.eigen(factors)
        w = 1.0 / (gp.outputscale * eig.eigvals() + gp.noise)
        return (eig, w), eig.apply_function(w, resid.unsqueeze(-1)).squeeze(-1)

    def _point_reduction(self, gp, system, cross, s2):
        eig, w = system
        proj = [c @ q for c, q in zip(cross, eig.vecs)]
        return s2 * s2 * rowwise_kron_dot(w, [p * p for p in proj])


# ---------------------------------------------------------------------- shared by the two factored paths and cg


def _pieces_surrogate(gp, pieces: CGLMLPieces, eig, factors: list[Tensor], level: Optional[Tensor],
                      extra: Optional[Tensor] = None) -> Tensor:
    """``value + (surrogate − surrogate.detach())``: the surrogate's gradient is the estimated
    gradient (bilinear derivatives with the CG vectors held fixed); its value is discarded.
    ``level``: add ``−½ log det(K + level·I)`` with its exact gradient (``None``: not)."""
    layout = gp.layout
    _report(gp, pieces.iterations, pieces.inner_iterations, pieces.residual, pieces.extra)
    if pieces.alpha is None:  # a constant mean (one device): the data term's gradient in it is 1ᵀα
        surrogate = (pieces.alpha_total * gp.mean_module.constant).sum()
    else:
        surrogate = layout.total(pieces.alpha * gp._mean_grid())
    if pieces.left.shape[-1]:
        left_w = pieces.left * pieces.weights
        surrogate = surrogate + gp.outputscale * layout.bilinear(left_w, pieces.right, factors)
        surrogate = surrogate + layout.total((left_w * pieces.right).sum(-1) * gp._fill_noise())
    if pieces.eig_left is not None:
        # pairs in eigen-coordinates (homoskedastic noise: ∂C = s²∂(⊗K) + ∂σ² I, Q orthogonal)
        left_w = pieces.eig_left * pieces.eig_weights.unsqueeze(-1)
        surrogate = surrogate + gp.outputscale * eigen_bilinear_form(left_w, pieces.eig_right, eig, factors)
        surrogate = surrogate + gp.noise * layout.total(left_w * pieces.eig_right)
    if pieces.eig_sums is not None:  # pairs reduced run by run (probes in several CG runs)
        surrogate = surrogate + pieces.eig_sums.surrogate(gp.outputscale, gp.noise, factors)
    if extra is not None:
        surrogate = surrogate + extra
    if level is not None:
        # −½ log det(K + σ²I) with its exact gradient: σ² is the learned noise, or the
        # preconditioner's fixed σ̄² (per-cell noise, control variate).
        surrogate = surrogate + layout.exact_lml(None, level, gp.outputscale, factors)
    return pieces.value + (surrogate - surrogate.detach())


class _FactoredPath(InferencePath):
    """A path whose ``C_OO⁻¹`` is applied exactly by a factored system (``.apply``,
    ``.grid_variance``, ``.eig``, ``.lam``) built once per call from the hyperparameters."""

    #: why its training step is not a CUDA graph (its factorisation reads the device)
    eager_because: ClassVar[str] = ""

    def graph_obstacle(self, gp) -> Optional[str]:
        return self.eager_because

    def posterior_grid(self, gp, variance: str) -> tuple[Tensor, Tensor]:
        memory.operation_chunk(gp, "predict")  # MemoryPlanError before any work when it cannot fit (not chunked)
        return super().posterior_grid(gp, variance)

    def sample(self, gp, n: int, generator: torch.Generator) -> Tensor:
        memory.operation_chunk(gp, "sample", samples=n)
        return super().sample(gp, n, generator)

    def _grid_variance(self, gp, system, factors, variance):
        return system.grid_variance()

    def _point_reduction(self, gp, system, cross, s2):
        cols = _obs_zero(gp, s2 * rowwise_kron_columns(cross))
        return (cols * system.apply(cols)).sum(0)



class ExactMissingPath(_FactoredPath):
    """Few missing cells, one noise level: ``G = [C⁻¹]_MM`` Cholesky-factored
    (:mod:`kronegp.models._few_missing`); exact likelihood, gradients, posterior."""

    name = "exact-missing"

    def _system(self, gp, factors):
        eig = self.layout.eigen(factors)
        return FewMissing(eig, gp.outputscale, gp.noise, _missing(gp), _missing_box(gp, eig.sizes))

    # its Cholesky factorisation's check (and the box's index maps) read the device
    eager_because = "the exact-missing path (few missing cells) runs eagerly"

    def memory_plan(self, gp, operation, samples, budget):
        # not chunked: the mask's box (or the rows) decides the counts, not the budget
        shape, dtype, device = list(gp.shape), gp.y.dtype, gp.y.device.type
        hole = _missing_box(gp, shape)
        boxed = box_pays(hole.box, hole.m, gp.n_cells)
        if operation == "step":
            return memory.plan_few_missing_step(shape, dtype, hole.m, hole.box_sizes, boxed=boxed, device_type=device)
        through_box = rows_through_box(hole.m, shape, hole.box_sizes)
        if operation == "predict":
            return memory.plan_few_missing_predict(shape, dtype, hole.m, hole.box_sizes, boxed=boxed,
                                                   through_box=through_box, device_type=device,
                                                   columns=variance_columns(hole.m, gp.n_cells))
        return memory.plan_few_missing_sample(shape, dtype, hole.m, hole.box_sizes, samples, boxed=boxed,
                                              through_box=through_box, device_type=device)

    def lml(self, gp) -> Tensor:
        factors, resid = _checked_inputs(gp)
        with torch.no_grad():
            fm = self._system(gp, factors)
            r = _obs_zero(gp, resid.detach())
            quad, alpha_t = fm.lml_terms(r)
            logdet = torch.log(fm.lam + fm.noise).sum() + fm.logdet_g
            value = -0.5 * quad - 0.5 * logdet - 0.5 * gp.n_observed * math.log(2 * math.pi)
            # a constant mean needs only 1ᵀα (no grid vector of α)
            alpha = _obs_zero(gp, fm.eig.from_eigbasis_rows(alpha_t)[0]) if gp.user_mean else None
            alpha_total = None if gp.user_mean else fm.observed_total(alpha_t)
        empty = r.new_zeros(r.shape[0], 0)
        pieces = CGLMLPieces(
            value=value, alpha=alpha, alpha_total=alpha_total, left=empty, right=empty, weights=r.new_zeros(0), exact_logdet=True,
            iterations=0, residual=0.0, extra={"boxed": fm.boxed, "missing": fm.m},
            eig_left=alpha_t, eig_right=alpha_t, eig_weights=r.new_full((1,), 0.5),
        )
        # the log det G term's gradient: FewMissing.logdet_g_surrogate
        return _pieces_surrogate(gp, pieces, fm.eig, factors, gp.noise,
                                 extra=fm.logdet_g_surrogate(gp.outputscale, gp.noise, factors))


class SeparableMaskPath(_FactoredPath):
    """A mask constant along some axes, one noise level: ``C_OO = s²(K_S ⊗ K_B) + σ²I``
    diagonalised exactly (:mod:`kronegp.models._separable_mask`).

    Args:
        masked_axes: the axes the mask depends on (:func:`~kronegp.models._separable_mask.mask_axes`).
    """

    name = "separable-mask"

    def __init__(self, layout, masked_axes: list[int]):
        super().__init__(layout)
        self.masked_axes = list(masked_axes)

    def __repr__(self) -> str:
        return f"SeparableMaskPath(masked_axes={self.masked_axes})"

    def _system(self, gp, factors):
        return SeparableMask(factors, gp.outputscale, gp.noise, gp.observed, self.masked_axes)

    # its dense eigh over the observed points synchronises
    eager_because = "the separable-mask path runs eagerly"

    def memory_plan(self, gp, operation, samples, budget):
        # not chunked: the observed points of the masked axes decide the counts, not the budget
        shape, dtype, device = list(gp.shape), gp.y.dtype, gp.y.device.type
        points = mask_axes(gp.observed, shape)[1]
        if operation == "step":
            return memory.plan_separable_step(shape, dtype, points, device_type=device)
        n_b = math.prod(n for k, n in enumerate(shape) if k not in self.masked_axes)
        if operation == "predict":
            rows = min(gp.n_cells // n_b, variance_rows(points, n_b))  # points of the masked axes per block
            return memory.plan_separable_predict(shape, dtype, points, n_b, rows, device_type=device)
        return memory.plan_separable_sample(shape, dtype, points, n_b, samples, device_type=device)

    def lml(self, gp) -> Tensor:
        factors, resid = _checked_inputs(gp)
        with torch.no_grad():
            sm = self._system(gp, factors)
            quad, logdet, alpha = sm.lml_terms(resid.detach())
            value = -0.5 * quad - 0.5 * logdet - 0.5 * gp.n_observed * math.log(2 * math.pi)
            alpha_grid = sm.from_sb(alpha.unsqueeze(0)).squeeze(-1)
        _report(gp, 0, 0, 0.0, {"masked_axes": list(sm.A), "observed_points": sm.n_points})
        surrogate = (gp.layout.total(alpha_grid * gp._mean_grid())
                     + lml_surrogate(sm, alpha, gp.outputscale, gp.noise, factors))
        return value + (surrogate - surrogate.detach())


# ---------------------------------------------------------------------- preconditioned CG


class CGPath(InferencePath):
    """Per-cell noise or many missing cells: preconditioned block CG on the full-grid
    covariance (:mod:`kronegp.models._masked`), stochastic log-determinant and traces."""

    name = "cg"

    def memory_plan(self, gp, operation, samples, budget):
        # the step's CG blocks, the longest CG run within the budget (a prediction's or a sample's solves
        # hold no more columns than the step's probes: labelled with the operation, the step's count)
        plan = memory.plan_cg_model(gp, gp.num_probes, budget)
        plan.operation = f"cg {operation} ({gp.num_probes} probes)"
        return plan

    def covariance(self, gp, factors: list[Tensor]) -> FullGridCovariance:
        """``C = K + diag(d̃)`` at the current hyperparameters (no autograd)."""
        return self.layout.covariance(factors, gp.outputscale.detach(), gp._fill_noise().detach(),
                                      homoskedastic=gp.cell_noise is None, tol=gp.cg_tol,
                                      max_iters=gp.cg_max_iters, precondition=gp.precondition)

    def dense(self, gp) -> bool:
        """Whether the likelihood is a dense Cholesky of ``C_OO`` (:mod:`kronegp.models._dense`):
        per-cell noise and at most the layout's ``dense_limit`` and ``exact_trace_limit`` observed
        cells (``exact_trace_limit=0`` asks for the stochastic estimates)."""
        limit = min(self.layout.dense_limit(gp.y.device), gp.exact_trace_limit)
        return gp.cell_noise is not None and gp.precondition and gp.n_observed <= limit

    def graph_obstacle(self, gp) -> Optional[str]:
        if self.dense(gp):
            return "the dense likelihood of a small grid with per-cell noise (its Cholesky check reads the device)"
        if gp.observed is not None and gp.cell_noise is not None:
            # every outer iteration solves with C by CG: the number of runs follows the outer count; or,
            # with few missing cells, G = X_MM is factored (its Cholesky check reads the device)
            return "missing cells with per-cell noise (nested CG solves, or G = X_MM factored)"
        run = self.cg_run(gp)
        if gp.observed is not None and run is not None and run <= gp.num_probes:
            # a graph keeps its probes as inputs: all of them, where the runs hold one run's
            return "the memory plan splits the probes into several CG runs (a graph would hold them all)"
        return None

    def graph_state(self, gp):
        """The version of the model's frozen two-level preconditioner: an eager step or a prediction
        between two replays that rebuilt it gave it new tensors (the graph reads the old ones)."""
        return gp._two_level.version

    def between_replays(self, gp) -> tuple[bool, dict]:
        """The missing cells' two-level preconditioner (:class:`~kronegp.models._two_level.FrozenTwoLevel`):
        where the last replay found it stale (its reported drift past ``REFRESH_DRIFT``, or CG
        iterations grown), rebuilt now at the current hyperparameters, into the tensors the graph
        reads where the shapes match (else: record again)."""
        frozen = gp._two_level
        if frozen.pre is None:
            return False, {}
        extra = gp._last_extra
        if isinstance(extra.get("missing_iterations"), (int, float)):
            frozen.note_iterations(int(extra["missing_iterations"]))
        drift = extra.get("two_level_drift")
        if frozen.needs_refresh(None if isinstance(drift, Tensor) else drift) is None:
            return False, {"two_level_reused": True}
        with torch.no_grad():
            in_place = refresh_two_level(self.covariance(gp, gp._factors()), gp.observed, frozen)
        return not in_place, {"two_level_reused": False, "two_level_drift": 0.0,
                              "coarse_modes": frozen.pre.modes if frozen.pre is not None else None}

    # ------------------------------------------------------------------ probes

    def std_normal(self, gp, rows: int, cols: int, offset: int = 0) -> Tensor:
        return self.layout.std_normal(rows, cols, offset, seed=gp.seed, resample=gp.resample_probes, like=gp.y)

    def probes(self, gp, cells: Optional[Tensor], offset: int = 0) -> Tensor:
        """Probe columns for trace estimates over ``cells`` (bool grid; ``None`` = all).

        Random standard normal (``num_probes`` columns), or, when at most
        ``exact_trace_limit`` cells are concerned, ``√S`` times the ``S`` unit vectors of
        those cells: then ``(1/S) Σ_s z_sᵀ A z_s = tr A`` exactly, so the likelihood and its
        gradient are exact up to CG tolerance.
        """
        count = self.exact_trace(gp, cells)
        if count:
            return self.layout.unit_probes(cells, count, gp.y)
        return self.std_normal(gp, gp.n_cells, gp.num_probes, offset=offset)

    def cell_noise_probes(self, gp) -> Tensor:
        """The probes of ``log det C`` with per-cell noise: the unit vectors of :meth:`probes` where
        it takes them, else ±1 entries (the signs of its standard normal draw), whose estimate's
        variance lacks the diagonal part (:func:`~kronegp.models._masked.cg_lml_pieces`)."""
        if self.exact_trace(gp, None):
            return self.probes(gp, None)
        return torch.sign(self.std_normal(gp, gp.n_cells, gp.num_probes))

    def exact_trace(self, gp, cells: Optional[Tensor]) -> int:
        """How many cells ``cells`` covers when their unit vectors are the probes (exact traces),
        else 0 (``num_probes`` random probes: estimates).

        Unit probes when the count is at most ``exact_trace_limit`` and the cost rule
        (:func:`kronegp.models.costs.prefer_exact`) takes their CG of ``count + 1`` columns over
        the ``num_probes + 1`` of random probes: predicted within the exact budget (a CPU's
        2 s), or no slower. On the 240 × 37 × 49 air grid 576 scattered cells' unit probes took
        128 s against 3.9 s; on 20³ any count up to 1024 stays exact (NOTES.md)."""
        count = (gp.n_cells if cells is None else gp.n_cells - gp.n_observed if cells is _missing(gp)
                 else self.layout.count(cells))
        if not 0 < count <= gp.exact_trace_limit:
            return 0
        rates = costs.rates_for(gp.y.device, gp.y.dtype)
        unit = costs.cg_seconds(count + 1, self.layout.shape, rates)
        random = costs.cg_seconds(gp.num_probes + 1, self.layout.shape, rates)
        return count if costs.prefer_exact(unit, random, gp.y.device) else 0

    def estimates(self, gp, homoskedastic: bool) -> bool:
        """Whether the likelihood and its gradient are stochastic estimates: some trace takes random
        probes (no preconditioner: always), not unit probes (:meth:`exact_trace`)."""
        if not gp.precondition:
            return True
        random_c = not homoskedastic and not self.exact_trace(gp, None)
        random_g = gp.observed is not None and not self.exact_trace(gp, _missing(gp))
        return random_c or random_g

    def cg_run(self, gp) -> Optional[int]:
        """Columns per block CG run of the missing cells' system, from the memory plan
        (:func:`kronegp.models.memory.choose_cg_run`); ``None``: one run (the layout does not
        split, e.g. a sharded grid)."""
        return self.layout.step_chunk(gp)

    def missing_probes(self, gp) -> "Tensor | ProbeDraws":
        """The missing cells' probes: drawn at once, or run by run when the memory plan splits the
        CG into runs (a run holds only its own probes). Run by run, the later runs continue the
        first run's generator: other numbers than one draw of all columns, from the same
        distribution."""
        run = self.cg_run(gp)
        if (run is None or run > gp.num_probes or self.layout.probe_store is not None
                or self.exact_trace(gp, _missing(gp))):
            return self.probes(gp, _missing(gp), offset=1)

        def take(a: int, b: int) -> Tensor:
            if a == 0:  # seeded (or continued) as a draw of all columns is
                return self.std_normal(gp, gp.n_cells, b, offset=1)
            return self.layout.continue_normal(gp.n_cells, b - a, like=gp.y)

        return ProbeDraws(gp.num_probes, take)

    # ------------------------------------------------------------------ likelihood

    def lml(self, gp) -> Tensor:
        factors, resid = _checked_inputs(gp)
        if self.dense(gp):
            try:
                value = self.layout.dense_lml(factors, gp.outputscale, gp._fill_noise(), resid, gp.observed)
            except torch.linalg.LinAlgError:
                pass  # not positive definite in this dtype: CG below reports what it reaches
            else:
                _report(gp, 0, 0, 0.0, {"dense": gp.n_observed, "probes": 0})
                return value
        cov = self.covariance(gp, factors)
        if gp.precondition:
            # Per-cell noise and missing cells few enough for unit probes: G = X_MM from X's columns
            # there, solved in the C run, and factored (no CG on G, whose every product is a CG solve
            # with C); the unit probes only where G does not factor (drawn then).
            dense_missing = self._dense_missing(gp, cov)
            probes_g = None if gp.observed is None else self.missing_probes(gp) if not dense_missing else \
                ProbeDraws(gp.n_cells - gp.n_observed, lambda a, b: self.missing_probes(gp)[:, a:b])
            pieces = cg_lml_pieces(
                cov, resid.detach(), gp.observed, gp.n_observed,
                probes_c=None if cov.homoskedastic else self.cell_noise_probes(gp),
                probes_g=probes_g,
                tol=gp.cg_tol, max_iters=gp.cg_max_iters, inner=self.layout.inner,
                probe_chunk=None if gp.observed is None else self.cg_run(gp), frozen=gp._two_level,
                dense_missing=dense_missing,
            )
        else:
            pieces = plain_cg_lml_pieces(
                cov.matvec, resid.detach(), gp.observed, gp.n_observed,
                self.std_normal(gp, gp.n_cells, gp.num_probes), tol=gp.cg_tol, max_iters=gp.cg_max_iters,
                inner=self.layout.inner,
            )
        pieces.extra["estimate"] = self.estimates(gp, cov.homoskedastic)
        pieces.extra["probes"] = int(pieces.weights.numel() + (0 if pieces.eig_weights is None else pieces.eig_weights.numel())
                                     + (0 if pieces.eig_sums is None else pieces.eig_sums.rows)) - 1
        level = gp.noise if cov.homoskedastic else cov.sigma_bar2
        return _pieces_surrogate(gp, pieces, cov.eig, factors,
                                 level if pieces.exact_logdet and gp.precondition else None)

    # ------------------------------------------------------------------ posterior

    def _solve_observed(self, gp, cov: FullGridCovariance, rhs: Tensor, tol: Optional[float] = None) -> Tensor:
        """``C_OO⁻¹ b_O`` zero-filled, for ``(N, t)`` columns zero at missing cells."""
        out, gp.cg_iterations = solve_observed(cov, rhs, gp.observed, tol=gp.cg_tol if tol is None else tol,
                                               max_iters=gp.cg_max_iters, frozen=gp._two_level,
                                               dense_missing=self._dense_missing(gp, cov))
        return out

    def _dense_missing(self, gp, cov: FullGridCovariance) -> bool:
        """Per-cell noise and missing cells few enough for unit probes (:meth:`exact_trace`): ``G = X_MM``
        is formed from ``X``'s columns at the missing cells and factored (:func:`~kronegp.models._masked.cg_lml_pieces`'s
        and :func:`~kronegp.models._masked.solve_observed`'s ``dense_missing``), no CG on ``G``."""
        return gp.observed is not None and not cov.homoskedastic and self.exact_trace(gp, _missing(gp)) > 0

    def _system(self, gp, factors):
        return self.covariance(gp, factors)

    def _apply_inverse(self, gp, cov, rhs):
        return self._solve_observed(gp, cov, rhs)

    def _point_reduction(self, gp, cov, cross, s2):
        return self._reduction(gp, cov, _obs_zero(gp, s2 * rowwise_kron_columns(cross)))

    def _reduction(self, gp, cov: FullGridCovariance, kcols: Tensor) -> Tensor:
        """``diag(k_Oᵀ C_OO⁻¹ k_O)`` for grid columns ``k`` (``(N, c)``).

        Solved 100× tighter than ``cg_tol``: the variance ``k** − kᵀC⁻¹k`` is a difference
        of near-equal terms next to observed cells, so its relative error is the solve's
        error amplified.
        """
        rhs = _obs_zero(gp, kcols)
        out = self._solve_observed(gp, cov, rhs, tol=max(gp.cg_tol * 1e-2, 50 * torch.finfo(rhs.dtype).eps))
        return (rhs * out).sum(0)

    def _grid_variance(self, gp, cov, factors, method):
        s2 = cov.outputscale
        if method == "auto":
            method = "exact" if gp.n_cells <= gp.exact_variance_limit else "mc"
            if method == "mc":
                warnings.warn(
                    f"GridGP.predict: the grid has {gp.n_cells} cells > exact_variance_limit="
                    f"{gp.exact_variance_limit}, so the cg-path variance is a Monte Carlo estimate with "
                    f"{gp.variance_samples} samples (pass variance='exact' for one CG solve per cell)",
                    RuntimeWarning,
                    stacklevel=5,
                )
        prior = s2 * self.layout.kron_vector([f.diagonal() for f in factors])
        if method == "exact":
            n = gp.n_cells
            chunk = max(1, min(n, CHUNK_ELEMENTS // n, 1024))
            red = []
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                unit = torch.zeros(n, stop - start, dtype=prior.dtype, device=prior.device)
                unit[torch.arange(start, stop, device=prior.device), torch.arange(stop - start, device=prior.device)] = 1
                red.append(self._reduction(gp, cov, cov.kernel_matvec(unit)))
            return prior - torch.cat(red)
        # Monte Carlo with a control variate: the deviation of a posterior sample from the
        # posterior mean, for this model and for the full-grid homoskedastic model with noise
        # σ̄² (exact variance known), driven by the same random numbers so the two correlate.
        s = gp.variance_samples
        lam, eig, sb2 = cov.lam, cov.eig, cov.sigma_bar2
        f0 = eig.apply_function(lam.sqrt(), self.std_normal(gp, gp.n_cells, s, offset=2))
        eps = self.std_normal(gp, gp.n_cells, s, offset=3)
        noise_sd = gp._fill_noise().detach().sqrt().unsqueeze(-1)
        sol = self._solve_observed(gp, cov, _obs_zero(gp, f0 + noise_sd * eps))
        dev_model = f0 - cov.kernel_matvec(sol)
        dev_control = f0 - eig.apply_function(lam / (lam + sb2), f0 + sb2.sqrt() * eps)
        var_control = eig.diag_of(lam * sb2 / (lam + sb2))
        return var_control + (dev_model * dev_model - dev_control * dev_control).mean(-1)



#: every path by the name ``GridGP(path=...)`` takes
PATHS = {cls.name: cls for cls in (ExactPath, ExactMissingPath, SeparableMaskPath, CGPath)}


def exact_missing_pays(layout, observed: Tensor, device: torch.device, dtype: torch.dtype, num_probes: int,
                       hole: Optional[MissingBox] = None) -> bool:
    """Whether the exact-missing path's predicted step (:func:`kronegp.models.costs.exact_missing_seconds`,
    through the box or the rows as :class:`~kronegp.models._few_missing.FewMissing` will go) is
    within the exact budget or no slower than the cg path's with ``num_probes`` random probes
    (:func:`kronegp.models.costs.prefer_exact`). The rows cost ``~m·N`` where a full grid's step
    costs ``~N·Σn_k``: 576 scattered cells on the 435k-cell air grid took 50 s against cg's 3.9 s,
    while on 20³ every ``m`` up to the limit stays exact (NOTES.md). ``hole``: the missing cells' box where
    the caller has it."""
    shape = layout.shape
    hole = MissingBox(~observed, shape) if hole is None else hole
    rates = costs.rates_for(device, dtype)
    box = hole.box_sizes if box_pays(hole.box, hole.m, layout.n_cells) else None
    exact = costs.exact_missing_seconds(hole.m, shape, box, rates)
    return costs.prefer_exact(exact, costs.cg_seconds(num_probes + 1, shape, rates), device)


def choose_path(requested: str, layout, observed: Optional[Tensor], n_observed: int, per_cell: bool,
                device: torch.device, *, dtype: torch.dtype, num_probes: int) -> InferencePath:
    """The inference path, once (see ``GridGP``'s ``path`` argument): the requested one after
    checking that the data allow it, or for ``"auto"`` the fastest exact path they allow, else cg.

    Auto takes exact-missing for at most :func:`~kronegp.models._few_missing.few_missing_limit`
    missing cells when it also pays (:func:`exact_missing_pays`: the cost rule, which looks at the
    grid's size); ``dtype`` and ``num_probes`` (the cg path's) are what the rule prices."""
    if requested != "auto" and requested not in PATHS:
        raise ValueError(f"path must be 'auto', 'exact', 'exact-missing', 'separable-mask' or 'cg', got {requested!r}")
    shape, n_cells = layout.shape, layout.n_cells
    n_missing = 0 if observed is None else n_cells - n_observed
    if not layout.whole_grid and requested in ("exact-missing", "separable-mask"):
        raise ValueError(
            f"path={requested!r} needs the whole grid on one device (it "
            f"{'factors the Schur complement over every missing cell' if requested == 'exact-missing' else 'reads the mask of every cell and decomposes K_S over the observed points'}); "
            "this layout holds one rank's block of a sharded grid: use path='cg' or 'auto'")
    if requested == "exact" and (n_missing or per_cell):
        raise ValueError(
            f"path='exact' needs every cell observed and one noise level; this grid has {n_missing} missing "
            f"cells{' and per-cell noise' if per_cell else ''} (use path='auto')")
    if requested == "exact-missing" and (per_cell or not n_missing):
        raise ValueError(
            "path='exact-missing' needs missing cells and a homoskedastic (learned) noise; this grid has "
            f"{n_missing} missing cells{' and per-cell noise' if per_cell else ''} (use path='auto')")
    @functools.lru_cache(maxsize=1)
    def missing_box() -> MissingBox:  # a scan of the whole mask: once, and only where a rule below needs it
        return MissingBox(~observed, shape)

    def too_many_rows() -> bool:
        """The m × N rows of C⁻¹ (three blocks at once) past MAX_FORM_ELEMENTS: only missing cells that do
        not go through their box form them (more than MAX_BOX_CELLS never do)."""
        return n_missing * n_cells > MAX_FORM_ELEMENTS and (n_missing > MAX_BOX_CELLS or forms_rows(missing_box(), shape))

    if requested == "exact-missing" and too_many_rows():
        raise ValueError(
            f"path='exact-missing' holds blocks of m × N rows of C⁻¹ (three at once, for the gradient and the "
            f"posterior) for missing cells that do not fit a box of at most {MAX_BOX_CELLS} cells: m = {n_missing} "
            f"missing cells × N = {n_cells} cells = {n_missing * n_cells:.3g} elements "
            f"({3 * n_missing * n_cells * torch.finfo(dtype).bits / 8 / 2**30:.1f} GiB), more than "
            f"{MAX_FORM_ELEMENTS:.3g} per block; use path='auto' or 'cg'")
    masked, n_points = mask_axes(observed, shape) if n_missing and layout.whole_grid else ([], 0)
    # constant along an axis with more than one point (a length-1 axis says nothing)
    constant = math.prod(n for k, n in enumerate(shape) if k not in masked) > 1
    if requested == "separable-mask" and (per_cell or not n_missing or not constant or n_points > MAX_POINTS_ANY):
        why = ("per-cell noise" if per_cell else "no missing cells" if not n_missing else
               "a mask that depends on every axis" if not constant else
               f"{n_points} observed points on the masked axes {masked} > {MAX_POINTS_ANY}")
        raise ValueError(
            "path='separable-mask' needs a homoskedastic (learned) noise and a mask constant along at least "
            f"one axis with at most {MAX_POINTS_ANY} observed points on the others; this grid has {why} "
            "(use path='auto')")
    separable = constant and n_points <= separable_mask_limit(device)
    name = requested
    if requested == "auto":
        if per_cell:
            name = "cg"
        elif not n_missing:
            name = "exact"
        elif not layout.whole_grid:
            name = "cg"
        elif (n_missing <= few_missing_limit(device) and not too_many_rows()
              and (not separable or n_missing <= n_points)
              and exact_missing_pays(layout, observed, device, dtype, num_probes, missing_box())):
            name = "exact-missing"
        else:
            name = "separable-mask" if separable else "cg"
    return SeparableMaskPath(layout, masked) if name == "separable-mask" else PATHS[name](layout)
