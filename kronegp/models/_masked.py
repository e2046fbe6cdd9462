"""Log marginal likelihood with missing cells and/or per-cell noise, by conjugate gradients.

Notation: ``K = s² (⊗K_k)`` on the full grid of ``N`` cells, ``O`` the observed cells,
``M`` the missing ones, ``d`` the noise variances. The likelihood needs ``C_OO = K_OO + D_O``.
Everything is stored on the full grid (a vector on ``O`` is zero-filled at ``M``).

**Full-grid covariance.** ``C = K + D̃`` with ``D̃ = d`` on ``O`` and a fill value on ``M``
(σ² when the noise is homoskedastic, ``σ̄²`` otherwise); ``C_OO`` does not depend on the fill.

* homoskedastic: ``C = Q diag(λ + σ²) Qᵀ``, so ``X = C⁻¹``, ``log det C`` and its gradient
  are exact (:mod:`kronegp.models._exact`).
* per-cell noise: preconditioned CG with ``P = K + σ̄² I = Q diag(λ + σ̄²) Qᵀ`` (σ̄² the
  geometric mean of the noise): the spectrum of ``P⁻¹C`` lies within the range of
  ``d/σ̄²``, whatever the kernel; where the signal fills at most 30 % of the spectrum, the
  square-root preconditioner ``M = A^{½}ΔA^{½}`` of :mod:`kronegp.models._cell_noise` instead
  (iterations about flat in the grid size). ``log det C`` by stochastic Lanczos quadrature in
  the same CG run, with probes ``z ~ N(0, M)`` built from ±1 vectors ``ξ`` on the grid and
  ``log det M`` exact, so the probes estimate only ``log det`` of the preconditioned remainder;
  with ``P``, the first-order term ``tr(P⁻¹(D − σ̄²I))`` (exact) is a control variate at a
  coefficient fitted to the probes. Its gradient from ``u = C⁻¹z``, ``v = M⁻¹z``; with ``P``,
  ``tr(P⁻¹∂K)`` exact as a control variate. The probes' spread gives the estimate's standard
  error (``GridGP.last_solve.lml_std_error``).

**Missing cells** (Schur complement). With ``X = C⁻¹`` and ``G = X_MM`` (``m × m``)::

    C_OO⁻¹ = X_OO − X_OM G⁻¹ X_MO          log det C_OO = log det C + log det G

so ``α = C_OO⁻¹ r_O = [X (r − G⁻¹[X r]_M)]_O`` needs one CG solve with ``G``, preconditioned
by ``P⁻¹``: Jacobi, ``P = diag(G) = diag(X)_M`` (exact for Kronecker ``C``). ``G`` is the
Kronecker-preconditioned system: ``G⁻¹`` is the conditional covariance of the missing
values given the observed ones, whose spectrum is tight when missing cells are scattered
(CG on ``G`` takes a handful of iterations where CG on ``C_OO`` takes hundreds). A compact
contiguous hole leaves its smooth modes unpinned (95 Jacobi iterations on a 19³ hole of a 40³
grid against 5 scattered): there ``P⁻¹`` is two-level, Jacobi plus a Galerkin coarse space of
the box kernel's leading modes per connected piece of missing cells (holes, clouds;
:mod:`kronegp.models._two_level`: 9 iterations), with
``log det P`` still exact; a model keeps it across its steps until the hyperparameters drift
(:class:`~kronegp.models._two_level.FrozenTwoLevel`: any fixed SPD ``P`` keeps CG, the SLQ estimate and
the gradient's trace estimate exact in expectation, and nothing differentiates through it). ``log det G`` by SLQ from the CG coefficients of probes
``z ~ N(0, P)``; with ``∂G = −[X ∂C X]_MM``::

    ∂ log det G = −tr(G⁻¹ [X ∂C X]_MM) ≈ −(1/S) Σ_s (X G⁻¹ z_s)ᵀ ∂C (X P⁻¹ z_s)

**Few missing cells with per-cell noise** (``dense_missing``). There every product with ``G`` is a
CG solve with ``C`` (nested CG: 7 outer iterations, 2316 inner, 8–9 s a step on 16³ with m = 27).
Where the ``m`` missing cells take unit probes anyway, their unit vectors ``e_M`` instead join the
``C`` run as more right-hand sides: ``W = X e_M``, ``G = W_M`` (``m × m``, factored ``L Lᵀ`` in
float64), and exactly up to that run's tolerance ``log det G`` (Cholesky), ``α = [X r − W G⁻¹[X r]_M]_O``
and ``−½ ∂ log det G = ½ Σ_k (W L⁻ᵀ)_kᵀ ∂C (W L⁻ᵀ)_k``; ``α`` is refined on the observed cells by the
same factored ``G`` (one solve with ``C`` a round: :func:`_schur_by_columns`, :func:`refine_observed`'s
``correct``). A ``G`` that does not factor falls back to the nested route, with a warning.

**Gradient** of ``log p = −½ r_Oᵀα − ½ log det C_OO − (n/2) log 2π``::

    ∂ log p = ½ αᵀ ∂C α − ½ ∂ log det C − ½ ∂ log det G + αᵀ ∂μ

Every stochastic term is a bilinear form ``aᵀ ∂C b = s² ∂[aᵀ(⊗K_k)b] + Σ_i a_i ∂d̃_i b_i``
with ``a, b`` held fixed: autograd of one Kronecker matmul. :func:`cg_lml_pieces` returns
the value and those ``(a, b, weight)`` columns; the model builds the surrogate.

Every reduction goes through ``inner`` and every operator is a callable, so a caller
holding a shard of the grid can pass sharded callables and an all-reduced ``inner``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from kronegp.models import _cell_noise
from kronegp.models._exact import EigenPairSums
from kronegp.models._kron import KronEigen
from kronegp.models._two_level import FrozenTwoLevel, two_level
from kronegp.models import memory
from kronegp.ops import kron_matmul
from kronegp.solvers import block_cg, local_inner, row_inner, slq_logdet_correction, solve_with_logdet
from kronegp.solvers.cg import active_schedule
from kronegp.solvers.lanczos import LanczosOnHost
from kronegp.solvers.report import finding, note, shortfall

__all__ = ["FullGridCovariance", "cg_lml_pieces", "CGLMLPieces", "ObservedSolve", "ProbeDraws", "refine_observed",
           "refresh_two_level", "solve_observed", "unit_rows"]

Inner = Callable[[Tensor, Tensor], Tensor]

#: Whether :func:`cg_lml_pieces` may return the missing-cell pairs in eigen-coordinates (tests
#: switch it off to compare with the grid-coordinate pairs on the same solves).
_EIGEN_PAIRS = True

#: Whether :func:`cg_lml_pieces` may take ``dense_missing`` (tests and ``benchmarks/gaps.py
#: --cell-noise-missing`` switch it off to run the nested route on the same model).
DENSE_MISSING = True


@dataclass
class ProbeDraws:
    """``count`` probe columns drawn on demand: ``take(a, b)`` returns columns ``a … b−1`` as
    ``(N, b − a)``, called once per range in increasing order (a run of the cg path's probes
    draws only its own, :func:`cg_lml_pieces` with ``probe_chunk``)."""

    count: int
    take: Callable[[int, int], Tensor]

    @classmethod
    def of(cls, probes: Tensor) -> "ProbeDraws":
        """The columns of a drawn ``(N, S)`` tensor."""
        return cls(probes.shape[-1], lambda a, b: probes[:, a:b])


def _larger(a, b):
    """The larger of two counts or residuals: numbers, or 0-dim device tensors (not read)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


def controlled_samples(samples: Tensor, control: Tensor, mean: Tensor) -> Tensor:
    """``a_s − β̂ (b_s − E b)``: per-probe estimates ``a_s`` with a control variate ``b_s`` of known
    mean, at the coefficient ``β̂ = cov(a, b) / var(b)`` estimated from the same probes (the one
    that minimises the variance; 0 where ``b`` does not vary). A fixed ``β = 1`` is right only
    when ``log H ≈ H − I``: with noise over 1e4 ``H`` reaches 70-90 and its variance grew 8× (rms
    error of ``log det C`` at 16 probes, 10³: 157 against 20 without, 7.3 with ``β̂`` and ±1
    probes). The estimated ``β̂`` biases the mean by ``O(1/S)`` (−0.1 to −0.8 nats above)."""
    a, b = samples - samples.mean(), control - control.mean()
    den = (b * b).sum()
    beta = torch.where(den > 0, (a * b).sum() / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return samples - beta * (control - mean)


def _total(inner: Inner, vec: Tensor) -> Tensor:
    """``Σ_i vec_i`` over the (possibly sharded) grid through ``inner``."""
    return inner(vec.unsqueeze(-1), torch.ones_like(vec).unsqueeze(-1)).squeeze(-1)


class FullGridCovariance:
    """``C = K + diag(d̃)`` on the full grid for fixed hyperparameters (no autograd).

    Args:
        factors: the kernel factors ``K_k`` (detached here).
        outputscale: ``s²``.
        fill_noise: ``d̃`` on the full grid (length ``N``), every entry positive.
        homoskedastic: ``d̃`` is one constant (``C`` is then inverted exactly).
        tol, max_iters: CG rule for solves with ``C`` when it is not homoskedastic.
        inner: column-wise inner product.
        precondition: use ``P = K + σ̄² I`` in those solves.
        eig: the eigendecomposition of ``⊗K_k`` (default :class:`KronEigen` of ``factors``),
            and ``product``: ``(factors, x) ↦ (⊗F)·x`` (default :func:`kronegp.kron_matmul`).
            A sharded grid passes its own pair (and an all-reduced ``inner``); every sum over
            the grid below goes through ``inner``, so nothing else changes.
    """

    def __init__(
        self,
        factors,
        outputscale,
        fill_noise: Tensor,
        *,
        homoskedastic: bool,
        tol: float,
        max_iters: int,
        inner: Inner = local_inner,
        precondition: bool = True,
        eig=None,
        product: Callable[[list[Tensor], Tensor], Tensor] = kron_matmul,
    ):
        self.factors = [f.detach() for f in factors]
        self.outputscale = outputscale.detach() if isinstance(outputscale, Tensor) else outputscale
        self.fill_noise = fill_noise.detach()
        self.homoskedastic = homoskedastic
        self.tol, self.max_iters, self.inner = tol, max_iters, inner
        self.precondition = precondition
        self.product = product
        self.eig = KronEigen(self.factors) if eig is None else eig
        self.lam = self.outputscale * self.eig.eigvals()
        if homoskedastic:
            self.sigma_bar2 = self.fill_noise[0]
        else:
            # The geometric mean centres the spectrum of P⁻¹C (within [d_min, d_max]/σ̄²)
            # on 1 in log scale, which is what bounds CG's iterations.
            self.sigma_bar2 = torch.exp(_total(inner, torch.log(self.fill_noise)) / _total(inner, torch.ones_like(self.fill_noise)))
        self.p_diag = self.lam + self.sigma_bar2
        #: ``(λ + σ̄²)⁻¹``: ``P̃⁻¹`` as a diagonal (block CG fuses its iteration with it).
        self.p_inv = 1.0 / self.p_diag
        #: Whether the solves may hold their vectors as rows ``(t, N)`` (the whole grid is
        #: local): Kronecker products of rows (``x · (⊗F)``) need no transpose of the block,
        #: where products of columns transpose it twice (see :meth:`solve_rows`).
        self.rows = isinstance(self.eig, KronEigen) and inner is local_inner and product is kron_matmul
        self.solve_iterations = 0
        self._square_root: Optional[bool] = None
        self._float64 = None  # (factors, s², d̃) in float64, for matvec_float64

    def solve_precond(self, rows: bool):
        """The preconditioner of :meth:`solve` and of the likelihood's log-determinant run:
        ``P̃⁻¹`` (a diagonal), or with per-cell noise, where it pays, the square-root one of
        :mod:`kronegp.models._cell_noise` (iterations about flat in the grid size, exact
        ``log det`` and samples)."""
        if not self.precondition:
            return None
        if self.homoskedastic:
            return self.p_inv
        if self._square_root is None:  # one read of the device per covariance
            schedule = active_schedule()
            if schedule is not None and schedule.is_fixed:  # a CUDA graph's step: the recording's choice
                self._square_root = schedule.next_plan("square_root_precond")
            else:
                signal = _total(self.inner, (self.lam > self.sigma_bar2).to(self.lam.dtype))
                cells = _total(self.inner, torch.ones_like(self.lam))
                self._square_root = _cell_noise.square_root_pays(float(signal), float(cells))
                if schedule is not None:
                    schedule.note_plan("square_root_precond", self._square_root)
        if not self._square_root:
            return self.p_inv
        return _cell_noise.SquareRootPreconditioner(self.eig, self.lam, self.fill_noise, self.sigma_bar2, rows=rows,
                                                    total=lambda v: _total(self.inner, v))

    def kernel_matvec(self, x: Tensor) -> Tensor:
        """``K x`` for ``x`` of shape ``(N, t)``."""
        return self.outputscale * self.product(self.factors, x)

    def matvec(self, x: Tensor) -> Tensor:
        """``C x = K x + d̃ ∘ x``."""
        return self.kernel_matvec(x) + self.fill_noise.unsqueeze(-1) * x

    def matvec_float64(self, x: Tensor) -> Tensor:
        """``C x`` computed in float64 for ``x`` of any dtype (``(N, t)``): the same ``C`` (the
        factors, ``s²`` and ``d̃`` as held, widened exactly), without the rounding of a float32
        product (~1e-6 × its terms), which is what limits a float32 residual ``b − C x``
        (:func:`refine_observed`). One Kronecker product in float64 (~2× a float32 one)."""
        if self._float64 is None:
            s2 = self.outputscale.double() if isinstance(self.outputscale, Tensor) else float(self.outputscale)
            self._float64 = ([f.double() for f in self.factors], s2, self.fill_noise.double().unsqueeze(-1))
        factors, s2, d = self._float64
        x = x.double()
        return self.product(factors, x).mul_(s2).addcmul_(d, x)  # in place: no float64 temporaries

    def precond_logdet(self) -> Tensor:
        """``log det P = Σ_i log(λ_i + σ̄²)`` over the whole grid (through ``inner``)."""
        return _total(self.inner, torch.log(self.p_diag))

    def eig_matvec(self, u: Tensor) -> Tensor:
        """``C̃ u = Qᵀ C Q u = λ ∘ u + Qᵀ(d̃ ∘ Q u)``: ``C`` in eigen-coordinates (two
        Kronecker matmuls, where ``C`` and ``P⁻¹`` in grid coordinates cost three)."""
        return torch.addcmul(self.eig.to_eigbasis(self.fill_noise.unsqueeze(-1) * self.eig.from_eigbasis(u)), self.lam.unsqueeze(-1), u)

    def eig_matvec_rows(self, u: Tensor) -> Tensor:
        """:meth:`eig_matvec` on rows ``(t, N)``."""
        return torch.addcmul(self.eig.to_eigbasis_rows(self.fill_noise * self.eig.from_eigbasis_rows(u)), self.lam, u)

    def solve_rows(self, x: Tensor, tol: Optional[float] = None) -> Tensor:
        """``C⁻¹`` applied to each row of ``x`` (``(t, N)``, contiguous); needs :attr:`rows`."""
        if self.homoskedastic:
            return self.eig.apply_function_rows(self.p_inv, x)
        res = block_cg(
            self.eig_matvec_rows,
            self.eig.to_eigbasis_rows(x),
            self.solve_precond(rows=True),
            tol=self.tol if tol is None else tol,
            max_iters=self.max_iters,
            rows=True,
        )
        self.solve_iterations = self.solve_iterations + res.iterations_needed
        return self.eig.from_eigbasis_rows(res.solution)

    def solve(self, x: Tensor, tol: Optional[float] = None) -> Tensor:
        """``C⁻¹ x``: exact when homoskedastic, else preconditioned CG in eigen-coordinates.

        ``Q`` is orthogonal, so CG on ``C̃ = QᵀCQ`` with ``P̃ = QᵀPQ`` (diagonal) runs the same
        iterations, residual norms and Lanczos coefficients as CG on ``C`` with ``P``.
        With :attr:`rows` the columns are turned into rows once and back once.
        """
        if self.rows:
            return self.solve_rows(x.mT.contiguous(), tol).mT.contiguous()
        if self.homoskedastic:
            return self.eig.apply_function(1.0 / self.p_diag, x)
        res = block_cg(
            self.eig_matvec,
            self.eig.to_eigbasis(x),
            self.solve_precond(rows=False),
            inner=self.inner,
            tol=self.tol if tol is None else tol,
            max_iters=self.max_iters,
        )
        self.solve_iterations = self.solve_iterations + res.iterations_needed
        return self.eig.from_eigbasis(res.solution)


@dataclass
class CGLMLPieces:
    """Value and gradient pieces of the cg-path log marginal likelihood.

    Attributes:
        value: ``log p(y_O)`` estimate (0-dim, no gradient), constant included.
        alpha: ``C_OO⁻¹ r_O`` zero-filled on the grid; or ``None`` with ``alpha_total = 1ᵀα`` (a
            constant mean on one device needs no more: the exact-missing path).
        left, right, weights: columns ``(N, c)`` and weights ``(c,)`` such that the
            gradient is ``Σ_c w_c left_cᵀ (∂C) right_c`` (+ the exact-logdet term and ``αᵀ∂μ``).
        exact_logdet: whether ``−½ log det C`` (homoskedastic ``C``), or else ``−½ log det P``
            (per-cell noise preconditioned by ``P``, the control variate), must be added with its
            exact gradient (not with the square-root preconditioner, whose pairs hold all of it).
        iterations: CG iterations of the outermost solve (the ``G`` system with missing
            cells, else the ``C`` system; the ``C`` run where ``G`` was factored, ``dense_missing``).
        inner_iterations: total CG iterations spent in solves with ``C`` (per-cell noise).
        residual: largest final relative residual of the outermost solve.
        Under a fixed :class:`~kronegp.solvers.CGSchedule` (which does not read the device) the
        three counts above are 0-dim device tensors.
        eig_left, eig_right, eig_weights: more pairs, given in eigen-coordinates of
            ``cov.eig`` as rows ``(c', N)`` (``Qᵀ`` of the grid vectors), or ``None``; the
            gradient adds ``Σ w (Qᵀa)ᵀ (Qᵀ∂C Q)(Qᵀb)``. Only with homoskedastic noise, where
            ``∂C = s²∂(⊗K_k) + ∂σ² I`` keeps that form cheap (see
            :func:`kronegp.models._exact.eigen_bilinear_form`).
        eig_sums: more such pairs already reduced (the probes' pairs of a run in several CG runs,
            ``probe_chunk``), added by :meth:`~kronegp.models._exact.EigenPairSums.surrogate`.
    """

    value: Tensor
    alpha: Optional[Tensor]
    left: Tensor
    right: Tensor
    weights: Tensor
    exact_logdet: bool
    iterations: "int | Tensor"
    inner_iterations: "int | Tensor" = 0
    residual: "float | Tensor" = 0.0
    extra: dict = field(default_factory=dict)
    eig_left: Optional[Tensor] = None
    eig_right: Optional[Tensor] = None
    eig_weights: Optional[Tensor] = None
    eig_sums: Optional[EigenPairSums] = None
    alpha_total: Optional[Tensor] = None


def _missing_matvec(
    cov: FullGridCovariance, missing: Tensor, inner_tol: float, rows: bool = False
) -> Callable[[Tensor], Tensor]:
    """``v ↦ [X v_M]_M`` embedded in the grid, for ``v`` that is zero on observed cells
    (columns ``(N, t)``, or rows ``(t, N)`` through :meth:`FullGridCovariance.solve_rows`).

    CG keeps that invariant exactly (its right-hand sides, the preconditioner and
    this product are all zero there), so neither the input nor the identity block on the
    observed cells needs a pass of its own.
    """
    # the solves return new blocks: masked in place (no second block beside them)
    if rows:
        return lambda v: cov.solve_rows(v, tol=inner_tol).mul_(missing)
    mis = missing.unsqueeze(-1)
    return lambda v: cov.solve(v, tol=inner_tol).mul_(mis)


def _g_diag(cov: FullGridCovariance, observed: Tensor, dtype: torch.dtype) -> Tensor:
    """``diag(G)`` on the grid (``diag(X)_M``, exact when ``C`` is Kronecker, and ``diag(P⁻¹)_M``
    otherwise; 1 at observed cells)."""
    missing = 1 - observed.to(dtype)
    return torch.where(missing > 0, cov.eig.diag_of(cov.p_inv), torch.ones_like(missing))


def _build_two_level(cov: FullGridCovariance, observed: Tensor, g_diag: Tensor, like=None):
    """The two-level preconditioner at ``cov``'s hyperparameters (:func:`kronegp.models._two_level.two_level`)."""
    return two_level(cov.eig, cov.factors, cov.outputscale, cov.sigma_bar2, cov.p_inv, g_diag, observed=observed,
                     like=like)


def _g_preconditioner(cov: FullGridCovariance, observed: Tensor, dtype: torch.dtype,
                      frozen: Optional[FrozenTwoLevel] = None, report: Optional[dict] = None, *, training: bool = False):
    """``(g_diag, coarse)``: ``diag(G)`` on the grid (:func:`_g_diag`) and the two-level preconditioner of
    the connected pieces of missing cells (:mod:`kronegp.models._two_level`; found once per mask) where
    it applies to this grid, else ``None`` (Jacobi). A sharded grid keeps Jacobi.

    With ``frozen`` (a model's :class:`~kronegp.models._two_level.FrozenTwoLevel`) the preconditioner
    of an earlier step is reused until the hyperparameters drift (its ``two_level_reused`` and
    ``two_level_drift`` go to ``report``), also under a :class:`~kronegp.solvers.CGSchedule` (a CUDA
    graph's step: the recording pass builds it, the fixed passes and the replays read its tensors).
    Without it, one is built for this call, and a run under a schedule keeps Jacobi (the setup reads
    the device). ``training``: an eager training step (its kept preconditioner is rebuilt when its CG slows,
    not on drift: :data:`~kronegp.models._two_level.REFRESH_DRIFT_EAGER`); a posterior's solves rebuild on
    drift, since nothing notes their iterations."""
    g_diag = _g_diag(cov, observed, dtype)
    if not cov.rows:
        return g_diag, None
    schedule = active_schedule()
    if frozen is None:
        return g_diag, _build_two_level(cov, observed, g_diag) if schedule is None else None
    coarse = frozen.get(lambda: _build_two_level(cov, observed, g_diag), observed, g_diag, cov.factors,
                        cov.outputscale, cov.sigma_bar2, schedule, {} if report is None else report, training=training)
    return g_diag, coarse


def refresh_two_level(cov: FullGridCovariance, observed: Tensor, frozen: FrozenTwoLevel) -> bool:
    """Rebuild ``frozen`` at ``cov``'s hyperparameters now, between two replays of a CUDA graph's step
    (:meth:`~kronegp.models._two_level.FrozenTwoLevel.refresh`): ``True`` where it went into the tensors
    the graph reads, ``False`` where its shapes changed (the graph must be recorded again)."""
    g_diag = _g_diag(cov, observed, cov.p_inv.dtype)
    return frozen.refresh(lambda like: _build_two_level(cov, observed, g_diag, like), observed, g_diag, cov.factors,
                          cov.outputscale, cov.sigma_bar2)


def _columns_precond(g_diag: Tensor, coarse):
    """``G``'s preconditioner for blocks of columns ``(N, t)``: the two-level one (which works on
    rows) through a transpose, or the Jacobi diagonal."""
    return (lambda v: coarse.apply(v.mT.contiguous()).mT) if coarse is not None else 1.0 / g_diag


#: How often :func:`solve_observed` solves its missing-cell system again to reach ``tol`` on
#: the observed cells (each round from the previous solution, to a tighter tolerance).
REFINE_ROUNDS = 3

#: Below float64 (a float32 model), the most rounds of mixed-precision refinement
#: (:func:`refine_observed`): each one solves the correction equation in the model's dtype and
#: measures the residual in float64; a round gains a factor ~cond·eps (measured 1e-2 on a 32³ and
#: 0.04–0.1 on a 64³ grid, 50 % missing at fitted hyperparameters), so 1e-5 took 2 and 4 rounds.
MIXED_ROUNDS = 6

#: A CUDA graph's recording pass (a recording :class:`~kronegp.solvers.CGSchedule`) plans the float64
#: rounds of :func:`refine_observed` down to this fraction of ``tol``: where the eager rule would stop
#: between it and ``tol``, one more round is recorded, which a replay runs only where its residual is
#: still above ``tol`` after the others (the fixed pass stops at ``tol``, as the eager step does; the
#: round is discarded on the device otherwise). Replays at nearby hyperparameters missed ``tol`` by
#: 1.07–2.9× after the recorded rounds (24³/32³, 10–20 % holes, Adam lr 0.05): each miss was a
#: re-recording; the spare round costs a 1-column ``G`` solve of a few iterations per replay.
PLAN_HEADROOM = 0.5


def _inner_tol(tol: float, dtype: torch.dtype) -> float:
    # Solves inside the G operator must be much tighter than the outer CG, or the outer
    # Lanczos coefficients describe a perturbed operator; but not below what the dtype holds.
    return max(tol * 1e-2, 50 * torch.finfo(dtype).eps)


def _mixed_fits(rhs: Tensor) -> bool:
    """Whether the mixed-precision rounds' float64 vectors for ``rhs`` (``(N, t)``) fit the free
    memory of its CUDA device (always on the CPU): :data:`kronegp.models.memory.CG_REFINE_MIXED`
    per column, the count the memory plan uses. Where they do not, the float32 rounds run and the
    result's residual is reported as usual, with this note."""
    if rhs.device.type != "cuda":
        return True
    need = memory.CG_REFINE_MIXED * rhs.numel() * 8
    free = memory.free_memory(rhs.device)
    if free is None or need <= memory.HEADROOM * free:
        return True
    note("refine_mixed", f"mixed-precision refinement skipped: its float64 vectors need {need / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB are free")
    return False


def _mixed(dtype: torch.dtype) -> bool:
    """Whether :func:`refine_observed` refines in mixed precision (a dtype below float64)."""
    return torch.finfo(dtype).eps > torch.finfo(torch.float64).eps


def solve_observed(
    cov: FullGridCovariance,
    rhs: Tensor,
    observed: Optional[Tensor],
    *,
    tol: float,
    max_iters: int,
    inner: Inner = local_inner,
    frozen: Optional[FrozenTwoLevel] = None,
    dense_missing: bool = False,
) -> tuple[Tensor, int]:
    """``C_OO⁻¹ b_O`` zero-filled on the grid, for columns ``b`` (``(N, t)``, zero at missing),
    to a relative residual ``‖(C x − b)_O‖ / ‖b_O‖ ≤ tol`` in every column.

    The CG runs on the missing cells' system ``G v = [X b]_M`` (module docstring), whose
    residual is not the observed system's: ``x = X(b − v)`` carries ``G``'s error amplified,
    by ~1500× on a 20 %-missing climate grid with noise 2e-4 of the signal variance (a
    mean 1 K off at ``tol`` = 1e-5). So the observed residual is measured after the solve
    (one product with ``C``) and, in float64, the ``G`` system solved again, from where it
    stopped, to a tolerance scaled by the amplification seen, up to :data:`REFINE_ROUNDS`
    times; in float32, by mixed-precision refinement instead (:func:`refine_observed`). A
    result that still misses ``tol`` warns with the residual
    (:func:`kronegp.solvers.report.shortfall`: once per model call).

    ``frozen``: a model's kept two-level preconditioner (:func:`_g_preconditioner`).

    ``dense_missing`` (per-cell noise, few missing cells: the likelihood's rule, :func:`cg_lml_pieces`):
    ``X b`` and ``W = X e_M`` in one solve with ``C``, ``G = W_M`` factored (:func:`_schur_by_columns`), and
    the observed residual refined through that factored ``G`` (one solve with ``C`` a round) instead of CG
    on ``G`` with a CG solve in each product; where ``G`` does not factor, the nested route, with a warning.

    Returns the solution and the outer CG iterations (all rounds; 0 where ``G`` was factored and no round
    of CG on ``G`` was needed).
    """
    if observed is None:
        if cov.homoskedastic:
            return cov.solve(rhs), 0
        before = cov.solve_iterations
        x = cov.solve(rhs, tol=tol)
        x = refine_full(cov, rhs, x, tol=tol, inner=inner).solution  # CG's own residual is not the true one
        return x, cov.solve_iterations - before
    schur = None
    if dense_missing and DENSE_MISSING and not cov.homoskedastic:
        t = rhs.shape[-1]
        both = cov.solve(torch.cat([rhs, _missing_units(observed, rhs.dtype).mT], dim=-1), tol=tol)
        schur = _schur_by_columns(cov, both[:, t:], both[:, :t], observed)
        del both
    if schur is not None:
        ref = refine_observed(cov, rhs, observed, schur.v, tol=tol, max_iters=max_iters, inner=inner, frozen=frozen,
                              start_solution=schur.alpha, correct=schur.correct)
        return ref.solution, ref.iterations
    ref = refine_observed(cov, rhs, observed, None, tol=tol, max_iters=max_iters, inner=inner, frozen=frozen)
    return ref.solution, ref.iterations


@dataclass
class ObservedSolve:
    """What :func:`refine_observed` reached.

    Attributes:
        solution: ``x ≈ C_OO⁻¹ b_O`` zero-filled, ``(N, t)``.
        residual: ``(C x − b)_O`` zero-filled (the observed system's residual; below float64, that of
            the float64 ``x`` of the mixed-precision rounds, computed in float64, rounded).
        reached: the largest relative residual ``‖(C x − b)_O‖ / ‖b_O‖`` over the columns.
        iterations: CG iterations on the ``G`` system (all rounds).
        rounds: solves of the ``G`` system run (0 when the given start already met ``tol``).
        inner_tol: the tolerance of the last ``G`` solve (under a fixed schedule: the recording's).
        Under a fixed :class:`~kronegp.solvers.CGSchedule` ``reached``, ``iterations`` and ``rounds``
        are 0-dim device tensors (not read).
    """

    solution: Tensor
    residual: Tensor
    reached: "float | Tensor"
    iterations: "int | Tensor"
    rounds: "int | Tensor"
    inner_tol: float


def _observed_shortfall(reached: float, tol: float, tol_g: float, dtype: torch.dtype, stacklevel: int,
                        mixed: Optional[str] = None) -> None:
    """:func:`refine_observed`'s report of a result short of ``tol`` (also given by a CUDA graph's
    replay that ends there, through its :class:`~kronegp.solvers.cg.ScheduleCheck`); ``stacklevel``
    as the caller would pass it to ``warnings.warn``; ``mixed``: what the mixed-precision rounds did."""
    if mixed is not None:
        eps = torch.finfo(dtype).eps
        how = (f"({dtype} solves, residuals in float64: {mixed}); mixed-precision refinement "
               f"converges only where cond(C_OO)·eps < 1 (eps of {dtype} = {eps:.1e}; each round multiplies "
               "the residual by about that): float64, or a model with more noise, conditions it better")
    else:
        how = (f"(its inner CG went down to {tol_g:.0e}; the limit of {dtype} is "
               f"~{50 * torch.finfo(dtype).eps:.0e}): float64, or a model with more noise, conditions it better")
    shortfall(
        reached, tol,
        f"the solve on the observed cells reached a relative residual of {reached:.1e}, "
        f"not tol={tol:.0e} {how}; results built on it may be off by that much relative to the data",
        stacklevel=stacklevel + 1)


def refine_observed(
    cov: FullGridCovariance,
    rhs: Tensor,
    observed: Tensor,
    start: Optional[Tensor],
    *,
    tol: float,
    max_iters: int,
    inner: Inner = local_inner,
    precond=None,
    frozen: Optional[FrozenTwoLevel] = None,
    start_solution: Optional[Tensor] = None,
    correct: Optional[Callable[[Tensor, float], Tensor]] = None,
) -> ObservedSolve:
    """Solve ``C_OO x_O = b_O`` through the missing cells' system ``G v = [X b]_M`` until the
    observed residual reaches ``tol`` (see :func:`solve_observed`), from ``start`` (a solution
    ``v`` of the ``G`` system to a tolerance ``tol``, e.g. a column of the likelihood's block
    CG: then its observed residual is measured first, and ``G`` solved again only if it falls
    short) or from zero. A result short of ``tol`` after :data:`REFINE_ROUNDS` rounds, or at
    the dtype's limit, is reported through :func:`kronegp.solvers.report.shortfall`. ``precond``:
    ``G``'s preconditioner on columns (default: the likelihood's, Jacobi or two-level, the one ``frozen``
    keeps where given; built only where ``G`` is solved). ``start_solution``: the caller's ``x`` for
    ``start`` (eager runs; e.g. from ``G`` factored, :func:`_schur_by_columns`): its residual is measured
    first, without the solve with ``C`` that ``x = X(b − v)`` costs. ``correct``: ``(ρ, tight) ↦ d ≈ C_OO⁻¹ ρ``
    for columns zero at missing cells, cheaper than a ``G`` solve (``G`` factored: one solve with ``C``
    to ``tight``, :meth:`_SchurByColumns.correct`): in float64, rounds ``x ← x − d(C x − b)`` from
    ``start_solution`` (up to :data:`REFINE_ROUNDS`, while each gains 2×) come before any ``G`` solve;
    below float64 the mixed-precision rounds take it as their correction. Only where they fall short is
    ``x`` formed from ``start`` and ``G`` solved as above.

    **Below float64** (a float32 model) solving ``G`` again does not help: the float32
    application of ``X = C⁻¹`` (relative error ~2e-5 on a 32³ grid) and the float32 product
    ``C x`` (~1e-5 of ``b``) hold the residual at 1e-4–7e-2 (50 % missing at fitted
    hyperparameters). There, after the first solve, rounds of mixed-precision iterative
    refinement (Wilkinson; Moler 1967): ``r = b_O − C_OO x`` computed in float64
    (:meth:`FullGridCovariance.matvec_float64`), the correction ``C_OO d = r/‖r‖`` solved in
    float32 by the same ``G`` route from zero (to the dtype's floor ``50·eps``), ``x ← x + ‖r‖ d``
    accumulated in float64; up to :data:`MIXED_ROUNDS` rounds, stopping at ``tol``, or when a
    round gained less than a factor 2 (a round that made it worse is undone). Each round
    multiplies the error by ~cond(C_OO)·eps32 (the float32 solve's relative error: 1e-2 on a
    32³ grid, 0.04–0.1 on 64³, 50 % missing at fitted hyperparameters), so it converges only
    where that is below 1; a shortfall warns with the residual of every round. ``residual`` and
    ``reached`` are those of the float64 ``x``; the solution returned is that ``x`` rounded to
    the model's dtype (relative error eps32: its own residual can reach ~cond·eps32 ‖x‖‖C‖/‖b‖,
    1.3e-5 on the 64³ grid, which no float32 vector does better).

    Under a :class:`~kronegp.solvers.CGSchedule` (a CUDA graph's step, :mod:`kronegp.models._graph`):
    a recording one sees the rounds decided as above, and the plan noted (each round's ``G``
    tolerance and inner tolerance; whether it ended short of ``tol``; below float64 also the
    number of mixed rounds); a fixed one makes as many rounds with the same inner tolerances (so
    the same CG runs, nested ones included) without reading the device: each ``G`` tolerance is
    the rule above applied on the device to the residual reached (a 0-dim tensor ``tol`` of
    :func:`~kronegp.solvers.block_cg`), so the rounds stop where the eager loop's would, and a
    round after the loop would have stopped is run but its result discarded on the device (the
    mixed rounds alike). The final residual goes to the schedule's checks: above ``tol`` the
    replay is run again eagerly (and recorded again), unless the recording fell short too, in
    which case it is reported as here."""
    obs = observed.to(rhs.dtype).unsqueeze(-1)
    missing = 1 - observed.to(rhs.dtype)
    tight = _inner_tol(tol, rhs.dtype)
    floor = 50 * torch.finfo(rhs.dtype).eps
    tiny = torch.finfo(rhs.dtype).tiny
    b_norm = inner(rhs, rhs).sqrt()  # rhs is zero at missing cells
    mixed = _mixed(rhs.dtype)
    schedule = active_schedule()
    if mixed:  # the float64 vectors must fit (a fixed schedule takes the recording's answer)
        if schedule is not None and schedule.is_fixed:
            mixed = schedule.next_plan("refine_mixed_fits")
        else:
            mixed = _mixed_fits(rhs)
            if schedule is not None:
                schedule.note_plan("refine_mixed_fits", mixed)
    g_rounds = 0 if mixed else REFINE_ROUNDS  # in float32 the mixed rounds take over after the first
    # the likelihood's preconditioner of G (its columns as rows for the two-level one), at the first solve
    given = [precond]

    def solve_g(v: Optional[Tensor], tol_g: float, tight: float, b: Tensor = rhs):
        if given[0] is None:
            given[0] = _columns_precond(*_g_preconditioner(cov, observed, rhs.dtype, frozen))
        # the refinement's runs, tagged: a CUDA graph records them with more spare iterations
        with schedule.tagged("refine") if schedule is not None else contextlib.nullcontext():
            rhs_g = missing.unsqueeze(-1) * cov.solve(b, tol=tight)
            return block_cg(_missing_matvec(cov, missing, tight), rhs_g, given[0], inner=inner, tol=tol_g,
                            max_iters=max_iters, x0=v)

    def back(v: Tensor, tight: float, b: Tensor = rhs) -> Tensor:
        """``x = X(b − v)`` on the observed cells."""
        return obs * cov.solve(b - missing.unsqueeze(-1) * v, tol=tight)

    def measure(v: Optional[Tensor], tight: float, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x = X(b − v)`` on the observed cells (or the given ``out``), its residual there, and the
        largest relative one (0-dim, not read)."""
        out = back(v, tight) if out is None else out
        r = obs * (cov.matvec(out) - rhs)
        rel = torch.where(b_norm > 0, inner(r, r).sqrt() / b_norm.clamp_min(tiny), torch.zeros_like(b_norm))
        return out, r, rel.max()

    rounds_m = _MixedRounds(cov, rhs, obs, inner, solve_g, back, tol=tol, correct=correct) if mixed else None
    if schedule is not None and schedule.is_fixed:
        return _refine_planned(schedule, solve_g, measure, start, rhs, tol=tol, tight=tight, mixed=rounds_m)
    tol_g, v, iterations, rounds, plan = tol, start, 0, 0, []
    # A recording plans its rounds to a tighter target (PLAN_HEADROOM): a spare round for its replays,
    # made here only to note its plan and count; its result is dropped (kept: where the eager loop stops).
    target = tol * PLAN_HEADROOM if schedule is not None else tol
    out = r = kept = None
    for round_ in range(g_rounds + 1):
        if round_ > 0:
            # per-cell noise: the solves with C inside G's product follow the outer tolerance
            # down (applied to 1e-7, X caps what a tighter G solve can reach)
            tight = max(floor, min(tight, tol_g * 1e-2))
        if v is None or round_ > 0:
            out = r = None  # the previous round's, freed before this round's solve
            res = solve_g(v, tol_g, tight)
            v, iterations, rounds = res.solution, iterations + res.iterations, rounds + 1
            plan.append((tol_g, tight))
            del res
        if round_ == 0 and start_solution is not None:
            out, r, reached = measure(None, tight, start_solution)
            made = 0
            while correct is not None and not mixed and float(reached) > tol and made < REFINE_ROUNDS:
                made += 1
                new_out, new_r, new_reached = measure(None, tight, out - correct(r, tight))  # r = (C x − b)_O
                gained = float(new_reached) < 0.5 * float(reached)
                if float(new_reached) < float(reached):  # a round that made it worse is undone
                    out, r, reached = new_out, new_r, new_reached
                del new_out, new_r
                if not gained:
                    break
            if float(reached) > tol and not (mixed and correct is not None):  # from v: x = X(b − v), tight
                out = r = None
                out, r, reached = measure(v, tight)
        else:
            out, r, reached = measure(v, tight)
        reached = float(reached)
        if kept is not None or tol_g <= floor or round_ == g_rounds:
            break  # (a spare round made: one at most)
        if reached <= tol:
            if reached <= target:
                break
            kept = (v, out, r, reached, iterations, rounds, tol_g)  # the eager loop stops here
        # the spare round to the target (tighter than a replay that needs it would ask: its count suffices)
        tol_g = max(floor, tol_g * (tol if kept is None else target) / reached / 2)
    if kept is not None:  # the eager loop's result (a recording's spare round planned, not taken)
        v, out, r, reached, iterations, rounds, tol_g = kept
        kept = None
    said = None
    if mixed:
        out, r, reached, its, made, history = rounds_m.eager(out)
        iterations, rounds = iterations + its, rounds + made
        said = _rounds_said(history, made)
    if schedule is not None:  # recording: what a fixed run (a CUDA graph) makes again
        schedule.note_plan("refine_observed", (plan, reached > tol))
        if mixed:
            schedule.note_plan("refine_mixed", made)
    if reached > tol:
        _observed_shortfall(reached, tol, tol_g, rhs.dtype, stacklevel=3, mixed=said)
    return ObservedSolve(out, r, reached, iterations, rounds, tol_g)


def _rounds_said(history: Optional[list[float]], made: int) -> str:
    """The mixed-precision rounds for a shortfall's warning: each round's residual and the count (``history``),
    or the count a fixed schedule replayed (``None``)."""
    count = f"{made} round{'s' * (made != 1)}"
    return f"{count}, as recorded" if history is None else " → ".join(f"{h:.1e}" for h in history) + f" in {count}"


class _MixedRounds:
    """The mixed-precision rounds of :func:`refine_observed` (a dtype below float64), eager or on
    the device only (a fixed schedule); one round is :meth:`step`."""

    def __init__(self, cov: FullGridCovariance, rhs: Tensor, obs: Optional[Tensor], inner: Inner, solve_g, back, *, tol: float,
                 correct=None):
        self.cov, self.inner, self.solve_g, self.back = cov, inner, solve_g, back
        self.obs = None if obs is None else obs.double()  # None: every cell observed (refine_full)
        self.correct = correct  # refine_observed's: C_OO⁻¹ without a G solve, where given
        self.rhs, self.b64, self.tol = rhs, rhs.double(), tol
        self.b_norm = inner(self.b64, self.b64).sqrt()
        # The correction's G solve to the dtype's floor: G's error is amplified into the observed
        # residual (solve_observed), so at 1e-3 a round gained nothing (32³: 1.3e-2 → 1.4e-2).
        self.tol_c = self.tight = 50 * torch.finfo(rhs.dtype).eps

    def residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``r = (b − C x)_O`` in float64 and the largest relative residual (0-dim, not read)."""
        r = self.cov.matvec_float64(x).neg_().add_(self.b64)  # in place, as above
        if self.obs is not None:
            r.mul_(self.obs)
        rel = torch.where(self.b_norm > 0, self.inner(r, r).sqrt() / self.b_norm.clamp_min(torch.finfo(r.dtype).tiny),
                          torch.zeros_like(self.b_norm))
        return r, rel.max()

    def step(self, x: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One round from ``x`` and its float64 residual ``r``: the new ``x``, its residual and
        relative residual, and the correction solve's CG iterations."""
        scale = self.inner(r, r).sqrt().clamp_min(torch.finfo(self.rhs.dtype).tiny)  # per column
        unit = (r / scale).to(self.rhs.dtype)  # ‖unit‖ = 1: the float32 solve's range is not a concern
        if self.correct is not None:
            d, its = self.correct(unit, self.tight), torch.zeros((), dtype=torch.long, device=unit.device)
        else:
            res = self.solve_g(None, self.tol_c, self.tight, unit)
            d, its = self.back(res.solution, self.tight, unit), res.iterations_needed
        x = torch.addcmul(x, scale, d.double())  # x stays float64 (rounding it each round stalls
        r, rel = self.residual(x)                 # at a float32 x's own residual: 1.3e-5 on 64³)
        return x, r, rel, its

    def result(self, x: Tensor, r: Tensor):
        """``(x, (C x − b)_O)`` in the model's dtype (``x`` rounded once, at the end)."""
        return x.to(self.rhs.dtype), (-r).to(self.rhs.dtype)

    def eager(self, x: Tensor):
        """Rounds from the first solve's ``x`` until ``tol``, a round gaining less than 2×, or
        :data:`MIXED_ROUNDS`: ``(x, residual, reached, iterations, rounds, history)``."""
        x = x.double()
        r, rel = self.residual(x)
        history, iterations, made = [float(rel)], 0, 0
        while history[-1] > self.tol and made < MIXED_ROUNDS:
            new_x, new_r, new_rel, its = self.step(x, r)
            made, iterations = made + 1, iterations + int(its)
            history.append(float(new_rel))
            if history[-1] < history[-2]:  # a round that made it worse is undone
                x, r = new_x, new_r
            if history[-1] > history[-2] / 2:  # no longer converging (cond·eps near 1 or above)
                break
            del new_x, new_r
        return (*self.result(x, r), min(history), iterations, made, history)

    def planned(self, x: Tensor, count: int, iterations: Tensor, rounds: Tensor):
        """:meth:`eager`'s rounds under a fixed schedule (``count`` recorded), nothing read: a
        round after the eager loop would have stopped is run but discarded on the device.
        ``(x, residual, reached, iterations, rounds)``."""
        x = x.double()
        r, rel = self.residual(x)
        stop = rel <= self.tol
        for _ in range(count):
            new_x, new_r, new_rel, its = self.step(x, r)
            take = ~stop & (new_rel < rel)
            iterations = iterations + torch.where(stop, torch.zeros_like(its), its)
            rounds = rounds + (~stop).long()
            stop = stop | (new_rel <= self.tol) | (new_rel > rel / 2)
            x, r, rel = torch.where(take, new_x, x), torch.where(take, new_r, r), torch.where(take, new_rel, rel)
            del new_x, new_r
        return (*self.result(x, r), rel, iterations, rounds)


def refine_full(cov: FullGridCovariance, rhs: Tensor, x: Tensor, *, tol: float, inner: Inner = local_inner) -> ObservedSolve:
    """Check ``x ≈ C⁻¹ b`` (columns ``(N, t)``, every cell observed, per-cell noise) by its true residual and refine
    it where that misses ``tol``: the likelihood's data column after its block CG with the probes.

    CG's recursive residual is not the true one below float64: on a 16³ float32 grid with per-cell noise over
    1e4 (cond(C) ~ 1e7) CG stopped at 1e-5 by its own residual where the true one was 8e-5 (the solution 3e-5 off a
    dense solve of the same C; 3e-8 after one round), and at cond 1.5e13 it reported convergence at a true
    residual of ~1e2, silently (``tests/test_mixed_refinement.py``). The rounds are :class:`_MixedRounds`' (Wilkinson's refinement, residuals in float64 by
    :meth:`FullGridCovariance.matvec_float64`), each correction ``C d = ρ`` solved with ``C`` to the dtype's floor;
    up to :data:`MIXED_ROUNDS`, stopping at ``tol`` or when a round gains less than 2×; a shortfall warns with
    every round's residual. In float64 the same check (one product with ``C``) rarely finds work.

    Under a :class:`~kronegp.solvers.CGSchedule`: a recording notes the rounds made, a fixed one makes as many
    without reading the device (the rounds past where the eager loop stopped discarded there) and leaves the
    final residual to the schedule's checks."""
    mixed = _mixed(rhs.dtype)
    schedule = active_schedule()
    fixed = schedule is not None and schedule.is_fixed
    fits = schedule.next_plan("refine_full_fits") if fixed else (_mixed_fits(rhs) if mixed else True)
    if schedule is not None and not fixed:
        schedule.note_plan("refine_full_fits", fits)

    def correct(rho: Tensor, tight: float) -> Tensor:
        return cov.solve(rho, tol=tight)

    if not fits:  # the float64 vectors do not fit (noted): the residual of x as it is, measured in the dtype
        unrefined = "no refinement: its float64 vectors did not fit"
        r = cov.matvec(x) - rhs
        b_norm = inner(rhs, rhs).sqrt()
        reached = torch.where(b_norm > 0, inner(r, r).sqrt() / b_norm.clamp_min(torch.finfo(rhs.dtype).tiny),
                              torch.zeros_like(b_norm)).max()
        if fixed:
            schedule.add_check(reached, tol, final=True, warn=lambda value, stacklevel: _observed_shortfall(
                value, tol, tol, rhs.dtype, stacklevel + 1, mixed=unrefined))
            return ObservedSolve(x, r, reached, torch.zeros((), dtype=torch.long, device=x.device),
                                 torch.zeros((), dtype=torch.long, device=x.device), tol)
        reached = float(reached)
        if reached > tol:
            _observed_shortfall(reached, tol, tol, rhs.dtype, stacklevel=3, mixed=unrefined)
        return ObservedSolve(x, r, reached, 0, 0, tol)
    rounds_m = _MixedRounds(cov, rhs, None, inner, None, None, tol=tol, correct=correct)
    if fixed:
        count, short = schedule.next_plan("refine_full")
        zero = torch.zeros((), dtype=torch.long, device=x.device)
        out, r, reached, iterations, rounds = rounds_m.planned(x, count, zero, zero)
        how = _rounds_said(None, count)
        schedule.add_check(reached, tol, final=short, warn=lambda value, stacklevel: _observed_shortfall(
            value, tol, rounds_m.tight, rhs.dtype, stacklevel + 1, mixed=how))
        return ObservedSolve(out, r, reached, iterations, rounds, rounds_m.tight)
    out, r, reached, iterations, made, history = rounds_m.eager(x)
    if schedule is not None:
        schedule.note_plan("refine_full", (made, reached > tol))
    if reached > tol:
        said = _rounds_said(history, made)
        _observed_shortfall(reached, tol, rounds_m.tight, rhs.dtype, stacklevel=3, mixed=said)
    return ObservedSolve(out, r, reached, iterations, made, rounds_m.tight)


def _refine_planned(schedule, solve_g, measure, start: Optional[Tensor], rhs: Tensor, *, tol: float,
                    tight: float, mixed: Optional[_MixedRounds] = None) -> ObservedSolve:
    """:func:`refine_observed` under a fixed schedule, nothing read: the recorded rounds, each ``G``
    solve to the tolerance the eager loop would choose from the residual reached (computed on the
    device), with the recorded inner tolerance; the rounds after the loop would have stopped keep
    its result; then, below float64, the recorded number of mixed-precision rounds."""
    plan, short = schedule.next_plan("refine_observed")
    count_m = schedule.next_plan("refine_mixed") if mixed is not None else 0
    if start is None and not plan:
        raise RuntimeError("refine_observed: a fixed schedule's plan has no round to solve from zero")
    floor = 50 * torch.finfo(rhs.dtype).eps
    count = torch.zeros((), dtype=torch.long, device=rhs.device)
    v, iterations, rounds = start, count, count
    out = r = reached = stop = None
    tol_g: "float | Tensor" = tol  # a number until the residual has chosen it

    def tighten(tol_g, reached, stop):
        """The eager loop's next ``G`` tolerance (unchanged once it has stopped)."""
        new = torch.clamp_min(tol_g * tol / reached.to(torch.float64) / 2, floor)
        if not isinstance(tol_g, Tensor):  # a fill, not a copy from the host (a graph records no copy)
            tol_g = torch.full((), tol_g, dtype=torch.float64, device=rhs.device)
        return torch.where(stop, tol_g, new)

    if start is not None:
        out, r, reached = measure(start, tight)
        stop = reached <= tol
        tol_g = tighten(tol_g, reached, stop)
    for _, tight in plan:
        res = solve_g(v, tol_g, tight)
        new_out, new_r, new_reached = measure(res.solution, tight)
        it = res.iterations_needed
        if stop is None:  # the first round, from zero
            v, out, r, reached, iterations, rounds = res.solution, new_out, new_r, new_reached, it, count + 1
            stop = reached <= tol
        else:  # kept where the eager loop stopped before this round
            v = torch.where(stop, v, res.solution)
            out, r = torch.where(stop, out, new_out), torch.where(stop, r, new_r)
            reached = torch.where(stop, reached, new_reached)
            iterations = iterations + torch.where(stop, torch.zeros_like(it), it)
            rounds = rounds + (~stop).long()
            stop = stop | (reached <= tol)
        stop = stop | (tol_g <= floor)  # this round's G tolerance at the dtype's limit: the eager loop stops too
        tol_g = tighten(tol_g, reached, stop)
        del res, new_out, new_r
    if mixed is not None:
        out, r, reached, iterations, rounds = mixed.planned(out, count_m, iterations, rounds)
    said = plan[-1][0] if plan else tol  # the recording's last G tolerance, for the report
    how = _rounds_said(None, count_m) if mixed is not None else None
    schedule.add_check(reached, tol, final=short,
                       warn=lambda value, stacklevel: _observed_shortfall(value, tol, said, rhs.dtype, stacklevel + 1,
                                                                          mixed=how))
    return ObservedSolve(out, r, reached, iterations, rounds, said)


def _report_observed(check: "ObservedSolve", alpha: Tensor, tol: float, inner: Inner, extra: dict) -> None:
    """The data term's check (:func:`refine_observed`'s result for ``α``) into the likelihood's report:
    the observed residual, the refinement's iterations and the data term's error estimate, with a note
    on the warning where it falls short of ``tol``."""
    # rᵀα̂ − rᵀα = α̂ᵀ(Cα̂ − r) to first order: the data term's error, in nats.
    lml_error = 0.5 * _total(inner, alpha * check.residual[:, 0]).abs()
    read = not isinstance(check.reached, Tensor)  # a fixed schedule's numbers stay on the device
    extra["lml_error"] = float(lml_error) if read else lml_error
    extra["observed_residual"] = check.reached
    extra["refine_iterations"] = check.iterations
    if read and check.reached > tol:
        note("lml_error", f"the log likelihood's data term may be off by ~{extra['lml_error']:.2g} "
                          "(first-order estimate from that residual)")


def unit_rows(cells: Tensor, count: int, dtype: torch.dtype, value: float = 1.0) -> Tensor:
    """``value`` times the unit vectors of the ``count`` cells of ``cells`` (bool, the grid's) as rows
    ``(count, N)``, in the grid's order, without reading the device (a boolean index would; a CUDA graph's
    checked pass forbids it): each cell's rank among ``cells`` by a cumulative sum, the others sent to a
    spare row. The probes of exact traces (``LocalLayout.unit_probes``) and the missing cells' columns of
    ``C⁻¹`` (``dense_missing``)."""
    flat = cells.reshape(-1)
    rank = torch.where(flat, torch.cumsum(flat, 0) - 1, count)
    rows = torch.zeros(count + 1, flat.numel(), dtype=dtype, device=flat.device)
    # scatter_, not an advanced-index assignment: index_put_ on CUDA synchronises (round 16, H100)
    rows.scatter_(0, rank.unsqueeze(0), value)
    return rows[:count]


def _missing_units(observed: Tensor, dtype: torch.dtype) -> Tensor:
    """The unit vectors of the missing cells as rows ``(m, N)``, in the grid's order."""
    missing = ~observed.reshape(-1)
    return unit_rows(missing, int(missing.sum()), dtype)


@dataclass
class _SchurByColumns:
    """:func:`_schur_by_columns`' result: ``α`` (``(N, t)``, zero at missing cells), the start ``v`` of
    :func:`refine_observed` (``G⁻¹[X r]_M`` on the grid), ``log det G``, and ``W`` with ``G``'s factor
    ``L`` (``G = L Lᵀ``) for :meth:`pairs` and :meth:`correct`."""

    alpha: Tensor
    v: Tensor
    logdet: Tensor
    w: Tensor
    chol: Tensor
    idx: Tensor
    cov: FullGridCovariance

    def pairs(self) -> Tensor:
        """The gradient's pairs ``W L⁻ᵀ`` (``(N, m)``): ``−½ ∂ log det G = ½ Σ_k (W L⁻ᵀ)_kᵀ ∂C (W L⁻ᵀ)_k``
        (the likelihood's only; a prediction does not form them)."""
        eye = torch.eye(self.chol.shape[0], dtype=self.chol.dtype, device=self.chol.device)
        return self.w @ torch.linalg.solve_triangular(self.chol, eye, upper=False).mT.to(self.w.dtype)

    def correct(self, rho: Tensor, tight: float) -> Tensor:
        """``C_OO⁻¹ ρ`` zero-filled for columns ``ρ`` zero at missing cells, by the same formula as ``α``
        (:func:`_schur_by_columns`) with ``X ρ`` solved to ``tight``: a round of refinement of ``α`` for
        one solve with ``C`` (:func:`refine_observed`'s ``correct``); its error is that of ``W``."""
        x = self.cov.solve(rho, tol=tight)
        y = torch.cholesky_solve(x[self.idx].double(), self.chol).to(x.dtype)
        return (x - self.w @ y).index_fill_(0, self.idx, 0)


def _schur_by_columns(cov: FullGridCovariance, w: Tensor, x_r: Tensor, observed: Tensor) -> Optional[_SchurByColumns]:
    """The Schur complement of the missing cells from ``W = X e_M`` (``(N, m)``, the ``C`` run's columns
    at the missing cells' unit vectors) and ``X r`` (``(N, t)``: the likelihood's data column, or a prediction's
    right-hand sides, :func:`solve_observed`), exactly up to those solves' tolerance:
    ``G = W_M`` (``m × m``, symmetrised, factored in float64 whatever the model's dtype)::

        log det C_OO = log det C + log det G        α = [X r − W G⁻¹ [X r]_M]_O

    and ``−½ ∂ log det G = ½ tr(G⁻¹ [X ∂C X]_MM)`` as the pairs ``(W L⁻ᵀ, W L⁻ᵀ)`` at weight ½. One
    Cholesky of ``m × m`` where the nested route ran CG on ``G`` with a CG solve with ``C`` in each
    product (8–9 s a step on 16³, m = 27: NOTES.md). ``C W = E_M + ρ`` and ``C X r = r + ρ_r`` leave
    ``α``'s observed residual at ``ρ_r − ρ G⁻¹[X r]_M``, of the run's tolerance.

    ``None`` where ``G`` is not positive definite in float64 (the solves' error larger than its smallest
    eigenvalue): reported as a finding with its extreme eigenvalues, and the caller takes the nested
    route."""
    dt = w.dtype
    idx = torch.nonzero(~observed.reshape(-1)).squeeze(-1)
    wm = w[idx].double()
    g = 0.5 * (wm + wm.mT)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info):
        ev = torch.linalg.eigvalsh(g)
        finding("dense_missing",
                f"G = [C⁻¹]_MM of the {idx.numel()} missing cells, from CG solves with C in {dt}, is not positive "
                f"definite in float64 (eigenvalues {float(ev[0]):.3g} … {float(ev[-1]):.3g}): the solve took "
                "the nested CG route on G instead (float64, a tighter cg_tol or more noise condition it better)")
        return None
    v_m = torch.cholesky_solve(x_r[idx].double(), chol)
    v = torch.zeros_like(x_r)
    v[idx] = v_m.to(dt)
    obs = observed.reshape(-1, 1).to(dt)
    alpha = obs * (x_r - w @ v_m.to(dt))
    return _SchurByColumns(alpha, v, 2 * torch.log(chol.diagonal()).sum().to(dt), w, chol, idx, cov)


class _Layout:
    """How :func:`cg_lml_pieces` holds its blocks of vectors: as rows ``(t, N)`` when the whole
    grid is local (:attr:`FullGridCovariance.rows`: Kronecker products of rows need no transpose
    of the block), else as columns ``(N, t)`` (a sharded grid, whose ``inner`` all-reduces).
    Every step of the estimator is written once against these few operations."""

    def __init__(self, cov: FullGridCovariance, inner: Inner):
        self.cov, self.rows = cov, cov.rows
        self.inner = row_inner if self.rows else inner
        #: block CG / ``solve_with_logdet`` arguments that select the layout
        self.cg = {"rows": True} if self.rows else {"inner": inner}
        self.eig_matvec = cov.eig_matvec_rows if self.rows else cov.eig_matvec
        self.to_eig = cov.eig.to_eigbasis_rows if self.rows else cov.eig.to_eigbasis
        self.from_eig = cov.eig.from_eigbasis_rows if self.rows else cov.eig.from_eigbasis

    def d(self, vec: Tensor) -> Tensor:
        """A grid vector ready to scale every vector of a block (a diagonal)."""
        return vec if self.rows else vec.unsqueeze(-1)

    def block(self, vec: Tensor) -> Tensor:
        """One grid vector as a block of one."""
        return vec.unsqueeze(0) if self.rows else vec.unsqueeze(-1)

    def from_columns(self, cols: Tensor) -> Tensor:
        """``(N, t)`` columns (probes) in this layout."""
        return cols.mT.contiguous() if self.rows else cols

    def columns(self, blk: Tensor) -> Tensor:
        """The block as ``(N, t)`` columns (what :class:`CGLMLPieces` holds)."""
        return blk.mT if self.rows else blk

    def cat(self, blocks: list[Tensor]) -> Tensor:
        return torch.cat(blocks, dim=0 if self.rows else -1)

    def take(self, blk: Tensor, which):
        """Vectors ``which`` (an index or a slice) of a block."""
        return blk[which] if self.rows else blk[:, which]

    def count(self, blk: Tensor) -> int:
        return blk.shape[0 if self.rows else 1]

    def solve(self, blk: Tensor, tol: float) -> Tensor:
        return self.cov.solve_rows(blk, tol=tol) if self.rows else self.cov.solve(blk, tol=tol)


def cg_lml_pieces(
    cov: FullGridCovariance,
    resid: Tensor,
    observed: Optional[Tensor],
    n_observed: int,
    *,
    probes_c: Optional[Tensor],
    probes_g: Optional[Tensor],
    tol: float,
    max_iters: int,
    inner: Inner = local_inner,
    probe_chunk: Optional[int] = None,
    frozen: Optional[FrozenTwoLevel] = None,
    dense_missing: bool = False,
) -> CGLMLPieces:
    """Estimate ``log N(r_O | 0, C_OO)`` and the pieces of its gradient (see module docstring).

    Args:
        cov: the full-grid covariance ``C`` for the current hyperparameters, with its
            Kronecker preconditioner (``precondition=True``): the estimator's control
            variates and the caller's exact log-determinant term rely on it. Without a
            preconditioner use :func:`plain_cg_lml_pieces`.
        resid: ``r = y − μ`` on the grid (values at missing cells are ignored).
        observed: bool grid of observed cells, or ``None`` (all observed).
        n_observed: number of observed cells (over all shards).
        probes_c: ``(N, S)`` with ``E[ξξᵀ] = I`` on the grid, for ``log det C`` (per-cell noise
            only): ±1 entries (Rademacher) give the smallest variance (``CGPath.cell_noise_probes``;
            at 16 probes, 10³, rms error of ``log det C`` 11 against 20 for standard normal ones).
        probes_g: ``(N, S)`` standard normal, for ``log det G`` (missing cells only; rows
            at observed cells are ignored).
            Either may instead be ``√S`` times ``S`` distinct unit vectors covering every
            cell concerned: the trace estimates are then exact (up to CG tolerance).
            ``probes_g`` may also be :class:`ProbeDraws` (drawn run by run).
        tol, max_iters: CG rule. inner: column-wise inner product.
        probe_chunk: columns per block CG run of the missing cells' system (the data column
            and the probes, ``S + 1`` in all); default all in one run. With fewer, the runs go
            one after another and each run's gradient pairs are reduced before the next
            (:attr:`CGLMLPieces.eig_sums`): the memory of ``probe_chunk`` columns instead of
            ``S + 1`` (:func:`kronegp.models.memory.plan_cg_step`), the same values up to
            round-off for the same probes. Homoskedastic noise on a local grid only (else one run).
        frozen: the model's kept two-level preconditioner of ``G``
            (:class:`~kronegp.models._two_level.FrozenTwoLevel`): reused across steps until the
            hyperparameters drift, and under a CUDA graph's schedule too; ``None``: one built for this
            call (Jacobi under a schedule).
        dense_missing: with per-cell noise, missing cells and the whole grid local, solve ``X e_M`` (the
            missing cells' unit vectors) as more columns of the ``C`` run and factor ``G = X_MM``
            (:func:`_schur_by_columns`) instead of CG on ``G`` with a CG solve inside each product: for
            a few missing cells (the caller's rule: where they take unit probes, ``CGPath.exact_trace``).
            ``probes_g`` stays required: the nested route's, taken where ``G`` does not factor
            (:class:`ProbeDraws` draw nothing until then). Ignored otherwise.
    """
    if not cov.precondition:
        raise ValueError("cg_lml_pieces needs cov with precondition=True; use plain_cg_lml_pieces without a preconditioner")
    dt = resid.dtype
    lay = _Layout(cov, inner)
    dense_missing = DENSE_MISSING and dense_missing and observed is not None and not cov.homoskedastic and lay.rows
    with torch.no_grad():
        obs_f = observed.to(dt) if observed is not None else torch.ones_like(resid)
        r = obs_f * resid
        lefts, rights, weights = [], [], []
        eig_left = eig_right = eig_weights = sums = None
        logdet = resid.new_zeros(())
        exact_logdet = True
        inner_before = cov.solve_iterations
        iterations, residual = 0, 0.0
        extra: dict = {}
        w = None  # X e_M (dense_missing)

        # ---- log det C and the C-system probes
        if cov.homoskedastic:
            logdet = logdet + cov.precond_logdet()  # C = P exactly
        else:
            if probes_c is None:
                raise ValueError("probes_c is required when the noise is not homoskedastic")
            s = probes_c.shape[1]
            # CG in eigen-coordinates (see FullGridCovariance.solve) from z̃ = Qᵀz, z ~ N(0, M) for
            # the solves' preconditioner M⁻¹ (the square-root one of kronegp.models._cell_noise where
            # it pays; under a fixed CG schedule, the recording's choice), drawn from the
            # caller's ξ on the grid: with ±1 entries the estimate's variance is only the
            # off-diagonal part of log H, H = M^{-½}CM^{-½} being nearly diagonal there.
            xi = lay.from_columns(probes_c)
            # With dense_missing the unit vectors of the missing cells ride in this run as more
            # right-hand sides (X's columns there: G = X_MM is then factored, _schur_by_columns).
            units = _missing_units(observed, dt) if dense_missing else None
            rhs = lay.block(r) if units is None else lay.cat([lay.block(r), units])
            t = lay.count(rhs)  # the data column and the unit vectors
            del units
            pre = cov.solve_precond(rows=lay.rows)
            square_root = not isinstance(pre, Tensor)
            if square_root:
                zt, log_m = pre.sample(xi), pre.logdet()
            else:
                zt, log_m = lay.d(cov.p_diag.sqrt()) * lay.to_eig(xi), cov.precond_logdet()
            del xi
            out = solve_with_logdet(
                lay.eig_matvec,
                lay.to_eig(rhs),
                zt,
                precond=pre,
                precond_logdet=log_m,
                tol=tol,
                max_iters=max_iters,
                **lay.cg,
            )
            vt = out.probe_precond  # Qᵀv, v = M⁻¹z
            back = lay.from_eig(lay.cat([out.solution, out.probe_solves, vt]))
            samples = out.logdet_samples  # each probe's log det C
            if square_root:
                # Control variate: the signal's part of ξᵀHξ, ṽᵀ(λ∘ṽ), has an exact mean
                # (SquareRootPreconditioner.signal_trace), at a coefficient fitted to the probes.
                samples = controlled_samples(samples, lay.inner(vt, lay.d(cov.lam) * vt), pre.signal_trace())
            else:
                # Control variate for SLQ: with H = P^{-½} C P^{-½} = I + E, tr E = tr(P⁻¹(D − σ̄²I))
                # is exact (diag P⁻¹ is a Kronecker product) and each probe's z̃ᵀEz̃ = vᵀCv − zᵀv
                # (v = P⁻¹z; vᵀCv = ṽᵀ(λ∘ṽ) + vᵀ(d̃∘v), zᵀv = z̃ᵀṽ: no further matmul) is known.
                v_grid = lay.take(back, slice(t + s, None))
                per_probe = (
                    lay.inner(vt, lay.d(cov.lam) * vt)
                    + lay.inner(v_grid, lay.d(cov.fill_noise) * v_grid)
                    - lay.inner(zt, vt)
                )
                first_order = _total(inner, cov.eig.diag_of(1.0 / cov.p_diag) * (cov.fill_noise - cov.sigma_bar2))
                samples = controlled_samples(samples, per_probe, first_order)
            del zt
            logdet = logdet + samples.mean()
            if s > 1:  # the mean's standard error from the probes' spread (−½ of it in the likelihood)
                extra["lml_std_error"] = 0.5 * samples.std() / math.sqrt(s)
            extra["preconditioner"] = "square-root" if square_root else "P"
            back = lay.columns(back)
            x_r, u, v = back[:, :1], back[:, t : t + s], back[:, t + s :]
            w = back[:, 1:t] if t > 1 else None  # X e_M
            cov.solve_iterations = cov.solve_iterations + out.cg.iterations_needed
            iterations = out.cg.iterations_needed
            residual = out.residual_max()
            if square_root:
                # tr(C⁻¹∂C) = E[uᵀ∂C v], u = C⁻¹z, v = M⁻¹z (E[zzᵀ] = M); the noise is fixed, ∂C = ∂K.
                exact_logdet = False
                lefts.append(u)
            else:
                # Control variate: tr(C⁻¹∂C) = tr(P⁻¹∂K) + E[uᵀ∂C v − vᵀ∂K v] with v = P⁻¹z,
                # E[v vᵀ] = P⁻¹. The first term is exact (the caller adds −½ log det P with its
                # analytic gradient), the second is small when P ≈ C. The noise is fixed on this
                # branch, so ∂C = ∂K and the pair is ((u − v), v).
                lefts.append(u - v)
            rights.append(v)
            weights.append(resid.new_full((s,), -0.5 / s))

        schur = None if w is None else _schur_by_columns(cov, w, x_r, observed)
        w = None
        if observed is None:
            if cov.homoskedastic:
                alpha = cov.solve(r.unsqueeze(-1)).squeeze(-1)
            else:  # the data column's true residual, refined where CG's recursive one misled (float32)
                check = refine_full(cov, r.unsqueeze(-1), x_r, tol=tol, inner=inner)
                alpha = check.solution[:, 0]
                _report_observed(check, alpha, tol, inner, extra)
                del check
        elif schur is not None:
            # G = X_MM factored (module docstring, "Few missing cells with per-cell noise"): no CG on G. The data term's
            # check as on the nested route: α's observed residual, G solved again only if short.
            check = refine_observed(cov, r.unsqueeze(-1), observed, schur.v, tol=tol, max_iters=max_iters,
                                    inner=inner, frozen=frozen, start_solution=schur.alpha, correct=schur.correct)
            alpha = check.solution[:, 0]
            _report_observed(check, alpha, tol, inner, extra)
            del check
            # −½ ∂ log det G = +½ tr(G⁻¹[X ∂C X]_MM) = +½ Σ_k (W L⁻ᵀ)_kᵀ ∂C (W L⁻ᵀ)_k
            pairs = schur.pairs()
            lefts.append(pairs)
            rights.append(pairs)
            weights.append(resid.new_full((pairs.shape[-1],), 0.5))
            del pairs
            logdet = logdet + schur.logdet
            extra["missing_solve"], extra["missing_iterations"] = "dense", 0
            schur = None
        else:
            extra["missing_solve"] = "cg"
            if probes_g is None:
                raise ValueError("probes_g is required when cells are missing")
            missing = 1 - obs_f
            # Jacobi scaling of G centres its log-spectrum on 0, which is what makes the SLQ
            # variance small (unscaled, log g ≈ log(1/σ²) on every eigenvalue). Holes and clouds
            # add a coarse space of their smooth modes (kronegp.models._two_level): P = M⁻¹ is then
            # no longer diagonal, but its log det is exact and the probes are drawn from N(0, P).
            g_diag, coarse = _g_preconditioner(cov, observed, dt, frozen, extra, training=True)
            if coarse is None:
                g_scale = missing * g_diag.sqrt()
                precond_g, log_p = 1.0 / g_diag, _total(inner, missing * torch.log(g_diag))
            else:
                precond_g, log_p = coarse.apply, coarse.logdet_p(missing)
                extra["coarse_modes"] = coarse.modes
            tight = _inner_tol(tol, dt)
            draws = probes_g if isinstance(probes_g, ProbeDraws) else ProbeDraws.of(probes_g)
            probes_g = None  # held by draws until its last run has taken them
            s = draws.count
            # With exact solves on a local grid, X = Q diag(p_inv) Qᵀ: the probes' vectors of the
            # gradient stay in eigen-coordinates (only the data vector comes back to the grid),
            # which saves two Kronecker products of s rows here and the bilinear derivative's
            # partial products in the backward.
            eig_pairs = _EIGEN_PAIRS and lay.rows and cov.homoskedastic
            # The G system's s + 1 columns (the data column first, then the probes) run in one
            # block CG, or in runs of probe_chunk columns (eigen-coordinate pairs only): each run
            # holds its own blocks, draws its own probes and reduces its gradient pairs at once
            # (EigenPairSums), so memory scales with the run, not with s.
            cols = s + 1
            step = cols if probe_chunk is None or not eig_pairs else max(1, min(cols, int(probe_chunk)))
            sums = EigenPairSums(cov.eig) if step < cols else None
            matvec_g = _missing_matvec(cov, missing, tight, rows=lay.rows)
            slq: list = []
            iterations = residual = n_missing = None
            for a in range(0, cols, step):
                b = min(cols, a + step)
                data = a == 0
                pcols = slice(1 if data else 0, None)  # the run's probe columns
                raw = lay.from_columns(draws.take(max(a - 1, 0), b - 1))
                if coarse is None:
                    zg = lay.d(g_scale) * raw  # z ~ N(0, diag(G)) on M
                    mz = lay.d(missing) * zg / lay.d(g_diag)  # M z = P⁻¹ z
                else:
                    zg = coarse.sample(missing * raw)  # z ~ N(0, M⁻¹) on M
                    mz = coarse.apply(zg)
                del raw
                if b == cols:
                    draws = None  # the probes are in zg now (freed unless the caller holds them)
                first = lay.cat(([lay.block(r)] if data else []) + [mz])
                del mz
                if eig_pairs:
                    first_t = cov.eig.to_eigbasis_rows(first).mul_(cov.p_inv)  # Qᵀ X [r, z/g]
                    del first
                    if data:
                        xr = cov.eig.from_eigbasis_rows(first_t[:1])
                else:
                    xr_and_z = lay.solve(first, tight)
                    del first
                    if data:
                        xr = lay.take(xr_and_z, slice(0, 1))
                rhs_g = lay.cat(([lay.d(missing) * xr] if data else []) + [zg])
                del zg
                xr = None
                res = block_cg(matvec_g, rhs_g, precond_g, tol=tol, max_iters=max_iters, record_lanczos=True,
                               overwrite_rhs=True, **lay.cg)
                del rhs_g  # it was the CG's residual block
                probes_here = lay.count(res.solution) - (1 if data else 0)
                # copy queued before the back-solve (none for a fixed-schedule run: no synchronisation)
                lanczos = None if res.converged is None or not probes_here else LanczosOnHost(res, columns=pcols)
                g = res.solution
                second = lay.cat(([lay.block(r) - lay.d(missing) * lay.take(g, slice(0, 1))] if data else [])
                                 + [lay.d(missing) * lay.take(g, pcols)])
                # The back-solve's GPU work is queued first; the host-side SLQ (a transfer and LAPACK
                # band solves) and the residual read then run while the GPU computes it.
                # u' = X G⁻¹ z, v' = X P⁻¹ z: E[u'ᵀ ∂C v'] = tr(G⁻¹ [X ∂C X]_MM) (E[z zᵀ] = P).
                if eig_pairs:
                    second_t = cov.eig.to_eigbasis_rows(second).mul_(cov.p_inv)  # Qᵀ X [r − g_r, G⁻¹z]
                    del second
                    if data:
                        alpha = obs_f * cov.eig.from_eigbasis_rows(second_t[:1])[0]
                else:
                    back = lay.solve(second, tight)
                    del second
                    if data:
                        alpha = obs_f * lay.take(back, 0)
                if data:
                    # The data term needs C_OO α = r_O, whose residual is not G's (solve_observed):
                    # measure it and solve G's data column again from where it stopped if it falls
                    # short. Under a CG schedule (a CUDA graph's step) the recording notes the rounds
                    # and the fixed run makes them again, its residual checked after each replay.
                    check = refine_observed(cov, r.unsqueeze(-1), observed, lay.columns(lay.take(g, slice(0, 1))),
                                            tol=tol, max_iters=max_iters, inner=inner,
                                            precond=_columns_precond(g_diag, coarse))
                    alpha = check.solution[:, 0]
                    _report_observed(check, alpha, tol, inner, extra)
                    del check
                del g
                if eig_pairs:
                    if data:
                        # The data pair too: Qᵀα of the masked α (one row; X(r − g_r) vanishes on M
                        # only up to the CG residual).
                        alpha_t = cov.eig.to_eigbasis_rows(alpha.unsqueeze(0))
                    if sums is not None:
                        if probes_here:
                            sums.add(second_t[pcols], first_t[pcols], 0.5 / s)
                    else:  # one run: the pairs go to the backward whole (row 0 becomes the data pair)
                        second_t[0], first_t[0] = alpha_t[0], alpha_t[0]
                        eig_left, eig_right = second_t, first_t
                        eig_weights = torch.cat([resid.new_full((1,), 0.5), resid.new_full((s,), 0.5 / s)])
                    del second_t, first_t
                else:
                    lefts.append(lay.columns(lay.take(back, slice(1, None))))
                    rights.append(lay.columns(lay.take(xr_and_z, slice(1, None))))
                    weights.append(resid.new_full((s,), 0.5 / s))
                    del back, xr_and_z
                it = res.iterations_needed
                reached = res.residual_max() if lanczos is None else lanczos.residual_max()
                iterations = it if iterations is None else _larger(iterations, it)
                residual = reached if residual is None else _larger(residual, reached)
                if probes_here:
                    if lanczos is not None and n_missing is None:  # a run that reads the device anyway
                        n_missing = round(float(_total(inner, missing)))
                    # dof: each probe's weight is checked against its χ² law (a probe that is not a
                    # N(0, P) draw biases the estimate silently; kronegp.solvers.lanczos)
                    slq.append((slq_logdet_correction(res, columns=pcols, host=lanczos,
                                                      dof=n_missing if lanczos is not None else None), probes_here))
                del res, lanczos
            if sums is not None:
                eig_left = eig_right = alpha_t
                eig_weights = resid.new_full((1,), 0.5)
            extra["missing_iterations"] = iterations
            if coarse is not None and frozen is not None and not isinstance(iterations, Tensor):
                frozen.note_iterations(iterations)  # its baseline, or stale when they grew
            # one run: its SLQ estimate; several: their mean weighted by their probes
            est = slq[0][0] if len(slq) == 1 else sum(e * k for e, k in slq) / s
            logdet = logdet + log_p + est

        if eig_left is None:
            lefts.insert(0, alpha.unsqueeze(-1))
            rights.insert(0, alpha.unsqueeze(-1))
            weights.insert(0, resid.new_full((1,), 0.5))
        quad = _total(inner, r * alpha)
        value = -0.5 * quad - 0.5 * logdet - 0.5 * n_observed * math.log(2 * math.pi)

    empty = resid.new_zeros(resid.shape[0], 0)
    return CGLMLPieces(
        value=value,
        alpha=alpha,
        left=torch.cat(lefts, dim=-1) if lefts else empty,
        right=torch.cat(rights, dim=-1) if rights else empty,
        weights=torch.cat(weights) if weights else resid.new_zeros(0),
        exact_logdet=exact_logdet,
        iterations=iterations,
        inner_iterations=cov.solve_iterations - inner_before,
        residual=residual,
        extra=extra,
        eig_left=eig_left,
        eig_right=eig_right,
        eig_weights=eig_weights,
        eig_sums=sums,
    )


def plain_cg_lml_pieces(
    matvec_c: Callable[[Tensor], Tensor],
    resid: Tensor,
    observed: Optional[Tensor],
    n_observed: int,
    probes: Tensor,
    *,
    tol: float,
    max_iters: int,
    inner: Inner = local_inner,
) -> CGLMLPieces:
    """The same estimate with CG on ``C_OO`` and no preconditioner (the baseline).

    ``C_OO`` is embedded in the grid as ``[C v_O]_O`` on observed cells and the identity
    on missing ones; SLQ with standard normal probes restricted to ``O``.
    """
    with torch.no_grad():
        obs_f = observed.to(resid.dtype) if observed is not None else torch.ones_like(resid)
        o = obs_f.unsqueeze(-1)

        def matvec(v: Tensor) -> Tensor:
            return o * matvec_c(o * v) + (1 - o) * v

        z = o * probes
        out = solve_with_logdet(matvec, (obs_f * resid).unsqueeze(-1), z, inner=inner, tol=tol, max_iters=max_iters)
        alpha = obs_f * out.solution[:, 0]
        s = z.shape[1]
        value = -0.5 * _total(inner, obs_f * resid * alpha) - 0.5 * out.logdet - 0.5 * n_observed * math.log(2 * math.pi)
    return CGLMLPieces(
        value=value,
        alpha=alpha,
        left=torch.cat([alpha.unsqueeze(-1), out.probe_solves], dim=-1),
        right=torch.cat([alpha.unsqueeze(-1), z], dim=-1),
        weights=torch.cat([resid.new_full((1,), 0.5), resid.new_full((s,), -0.5 / s)]),
        exact_logdet=False,
        iterations=out.cg.iterations,
        residual=out.residual_max(),
    )
