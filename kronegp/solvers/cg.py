"""Preconditioned conjugate gradients on a block of right-hand sides.

Solves ``A X = B`` for a symmetric positive-definite ``A`` given only as a callable,
with ``B`` of shape ``(..., n, t)``: ``t`` independent CG runs advanced together, so every
iteration costs one call of ``matvec`` and one of ``precond`` on an ``(..., n, t)`` block
(one Kronecker product for all columns, rather than ``t``). Each column keeps its own
step sizes (this is the "modified batched CG" of Gardner et al. 2018, not O'Leary's block
Krylov method), and a column that has converged is frozen while the others continue.

With preconditioner ``M ≈ A⁻¹`` (``precond(r) = M r``), iteration ``k`` of column ``j``::

    α_k = (r_kᵀ z_k) / (p_kᵀ A p_k)          z_k = M r_k
    x_{k+1} = x_k + α_k p_k,   r_{k+1} = r_k − α_k A p_k
    β_k = (r_{k+1}ᵀ z_{k+1}) / (r_kᵀ z_k),   p_{k+1} = z_{k+1} + β_k p_k

The coefficients ``α_k, β_k`` are those of the Lanczos process on ``M^{½} A M^{½}`` started
from ``M^{½} b / ‖M^{½} b‖`` (see :mod:`kronegp.solvers.lanczos`), which is why they are
recorded.

Between two ``matvec`` calls an iteration is bandwidth-bound element-wise work on ``(n, t)``
blocks. On a contiguous block ``(n, t)`` whose backend has the fused CG step
(:meth:`kronegp.device.Backend.cg_capability`: CUDA tensors) with a diagonal preconditioner
(``precond`` given as a tensor) or none, and the local inner product, it runs as three
single-pass kernels (``pᵀAp``; the ``x``/``r`` update with ``rᵀz`` and ``rᵀr``; the new
direction), 11 passes over the block instead of ~23 for the same algebra in torch,
and the per-column coefficients and convergence test are computed by those kernels on the
device (instead of ~15 tiny torch launches per iteration). :data:`FUSED` turns that off
(tests compare both). A preconditioner given as a callable (e.g. the two-level one of a
hole, :mod:`kronegp.models._two_level`) always runs the torch iteration.

**Fixed schedules** (:class:`CGSchedule`, for CUDA graph capture). Deciding when to stop reads
the device, which a captured CUDA graph cannot do. Inside ``with cg_schedule(schedule):`` each
``block_cg`` call either records how many iterations it needed (``CGSchedule.record()``) or
runs exactly the count given for its position in the call order (``CGSchedule.fixed(counts)``):
columns that converge earlier are frozen on the device, so extra iterations change nothing
but time. Such a run never synchronises; whether it converged is read afterwards from
:meth:`CGSchedule.check` (one transfer for every run of the schedule).

A computation may decide more on the host than when CG stops (how many times to solve again,
with what tolerance: :func:`kronegp.models._masked.refine_observed`). Under a recording schedule
it decides as usual and notes what it did (:meth:`CGSchedule.note_plan`); under a fixed one it
takes that plan (:meth:`CGSchedule.next_plan`), makes the same runs, and hands the number that
decided as a device tensor to :meth:`CGSchedule.add_check`, read with the runs' checks.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from kronegp import device
from kronegp.device import Backend
from kronegp.solvers.report import shortfall

__all__ = ["CGResult", "CGSchedule", "ScheduleCheck", "active_schedule", "block_cg", "cg_schedule", "local_inner", "row_inner", "FUSED"]

Inner = Callable[[Tensor, Tensor], Tensor]

#: Use the fused CUDA iteration where it applies (see the module docstring).
FUSED = True


def local_inner(a: Tensor, b: Tensor) -> Tensor:
    """Column-wise inner products ``Σ_i a[..., i, j] b[..., i, j]`` → shape ``(..., t)``.

    The default reduction over the grid dimension (``-2``) when the whole vector is local.
    A sharded caller passes ``inner`` that all-reduces this local sum instead.
    """
    return (a * b).sum(dim=-2)


@dataclass
class CGResult:
    """What :func:`block_cg` returns.

    Attributes:
        solution: ``X`` with ``A X ≈ B``, shape of ``B``.
        iterations: iterations run (the most any column needed).
        column_iterations: ``(..., t)`` iterations each column ran before it converged.
        residual: ``(..., t)`` final relative residual ``‖b − A x‖ / ‖b‖`` per column.
        converged: whether every column reached ``tol``; ``None`` for a run of a fixed
            :class:`CGSchedule` (not read: see :meth:`CGSchedule.check`).
        alphas, betas: ``(iterations, ..., t)`` CG coefficients (zero once a column froze);
            filled only with ``record_lanczos=True``, else ``None``.
        initial_rz: ``(..., t)`` ``bᵀ M b`` per column (``‖M^{½} b‖²``), the weight of the
            Lanczos start vector.
    """

    solution: Tensor
    iterations: int
    column_iterations: Tensor
    residual: Tensor
    converged: Optional[bool]
    alphas: Optional[Tensor]
    betas: Optional[Tensor]
    initial_rz: Tensor

    @property
    def iterations_needed(self) -> "int | Tensor":
        """Iterations the run took: :attr:`iterations`, or for a run of a fixed
        :class:`CGSchedule` what its slowest column needed, as a 0-dim device tensor (not read)."""
        return self.iterations if self.converged is not None else self.column_iterations.max()

    def residual_max(self) -> "float | Tensor":
        """The largest final relative residual: a float, or for a run of a fixed schedule a
        0-dim device tensor (not read)."""
        return float(self.residual.max()) if self.converged is not None else self.residual.max()


@dataclass
class ScheduleCheck:
    """A number a computation under a fixed :class:`CGSchedule` must keep at or below ``tol`` for its
    result to stand (:meth:`CGSchedule.add_check`).

    Attributes:
        value: 0-dim device tensor (not read by the computation).
        tol: the bound.
        final: the recorded computation ended above ``tol`` too, with nothing left to try (like a
            run stopped at ``max_iters``): a value above it is then reported through ``warn``, not
            grounds to run the computation again.
        warn: ``(value, stacklevel) ↦`` the warning (or :func:`kronegp.solvers.report.shortfall`)
            the eager computation gives for it; ``stacklevel`` as its caller would pass it to
            ``warnings.warn``.
    """

    value: Tensor
    tol: float
    final: bool
    warn: Callable[[float, int], None]


class CGSchedule:
    """Iteration counts of the :func:`block_cg` runs of one computation, by call order.

    ``CGSchedule.record()`` notes what each run needed (:attr:`counts`) and the plans the
    computation noted (:attr:`plans`); ``CGSchedule.fixed(c, plans)`` makes run ``i`` do exactly
    ``c[i]`` iterations without reading the device, hands the plans back in order, and keeps each
    run's per-column state and the computation's :class:`ScheduleCheck` for :meth:`check`.
    Activate one with :func:`cg_schedule`.
    """

    def __init__(self, counts: Optional[list[int]] = None, plans: Optional[list] = None):
        #: iterations per run: recorded, or the fixed ones to run
        self.counts: list[int] = [] if counts is None else [int(c) for c in counts]
        self.is_fixed = counts is not None
        #: ``(key, plan)`` per host decision of the computation: noted, or the ones to follow
        self.plans: list[tuple[str, object]] = [] if plans is None else list(plans)
        #: the checks a fixed computation added (:meth:`add_check`), in order
        self.checks: list[ScheduleCheck] = []
        #: per run started, the tag it started under (:meth:`tagged`; ``None``: none)
        self.tags: list[Optional[str]] = []
        self._tag: Optional[str] = None
        self._next = 0
        self._next_plan = 0
        # per fixed run: (column_iterations, residual, active), None until it has finished
        self._runs: list[Optional[tuple[Tensor, Tensor, Tensor]]] = []

    @classmethod
    def record(cls) -> "CGSchedule":
        return cls(None)

    @classmethod
    def fixed(cls, counts: list[int], plans: Optional[list] = None) -> "CGSchedule":
        """Run ``counts`` iterations per run and follow ``plans`` (a recording's :attr:`plans`)."""
        if any(c < 1 for c in counts):
            raise ValueError(f"every fixed iteration count must be >= 1, got {counts}")
        return cls(list(counts), [] if plans is None else plans)

    def _start(self, max_iters: int) -> tuple[int, Optional[int]]:
        """A run starts: its slot (runs are numbered in the order they start, whatever order
        nested runs end in) and, on a fixed schedule, its iteration count."""
        slot = self._next
        self._next += 1
        self.tags.append(self._tag)
        if not self.is_fixed:
            self.counts.append(0)
            return slot, None
        if slot >= len(self.counts):
            raise RuntimeError(
                f"CGSchedule: block_cg run {slot + 1} of a schedule of {len(self.counts)} runs; the "
                "computation made more CG runs than when the schedule was recorded"
            )
        self._runs.append(None)
        return slot, min(self.counts[slot], max_iters)

    def _done(self, slot: int, iterations: int, col_iters: Tensor, res: Tensor, active: Tensor) -> None:
        if self.is_fixed:
            self._runs[slot] = (col_iters, res, active)
        else:
            self.counts[slot] = iterations

    @property
    def runs(self) -> int:
        """Runs started so far under this schedule."""
        return self._next

    @contextlib.contextmanager
    def tagged(self, tag: str):
        """The runs started in the block are ``tag``'s (:attr:`tags`): a CUDA graph's recording gives
        the data column's refinement runs (``"refine"``, :func:`kronegp.models._masked.refine_observed`)
        more spare iterations than the others (:mod:`kronegp.models._graph`)."""
        before, self._tag = self._tag, tag
        try:
            yield self
        finally:
            self._tag = before

    def note_plan(self, key: str, plan) -> None:
        """Recording: the computation ``key`` decided ``plan`` on the host (what a fixed run of it
        must do again without reading the device)."""
        if self.is_fixed:
            raise RuntimeError(f"CGSchedule.note_plan({key!r}): a fixed schedule follows plans, it does not note them")
        self.plans.append((key, plan))

    def next_plan(self, key: str):
        """Fixed: the plan that ``key`` noted at this point of the recorded computation."""
        if not self.is_fixed:
            raise RuntimeError(f"CGSchedule.next_plan({key!r}): a recording schedule has no plans to follow")
        i = self._next_plan
        if i >= len(self.plans) or self.plans[i][0] != key:
            had = repr(self.plans[i][0]) if i < len(self.plans) else "none"
            raise RuntimeError(
                f"CGSchedule: plan {i + 1} asked for {key!r}, the recording noted {had} there ({len(self.plans)} "
                "plans); the computation decided differently from when the schedule was recorded (or "
                "CGSchedule.fixed was not given the recording's plans)"
            )
        self._next_plan += 1
        return self.plans[i][1]

    def add_check(self, value: Tensor, tol: float, *, final: bool, warn: Callable[[float, int], None]) -> None:
        """Fixed: ``value`` (0-dim device tensor) must be ``<= tol`` for the computation's result
        to stand; read with the runs' checks (:meth:`check_tensor`). See :class:`ScheduleCheck`."""
        if not self.is_fixed:
            raise RuntimeError("CGSchedule.add_check: only a fixed schedule's computation adds checks")
        self.checks.append(ScheduleCheck(value.reshape(()), float(tol), bool(final), warn))

    def check_tensor(self) -> Tensor:
        """``(runs + checks, 3)`` float64 on the device: per fixed run, the most iterations a column
        needed, whether a column is still above ``tol`` (1) or not (0), the largest final
        relative residual; then per :class:`ScheduleCheck`, its ``tol``, whether its value is above
        it (1) or not (0), the value. Built from device tensors only (no synchronisation): a
        captured graph can compute it, to be read after each replay."""
        if (not self._runs and not self.checks) or any(run is None for run in self._runs):
            raise RuntimeError("CGSchedule.check_tensor: needs fixed runs or checks, every run finished")
        rows = [torch.stack([it.max().to(torch.float64), act.any().to(torch.float64), r.max().to(torch.float64)])
                for it, r, act in self._runs]
        for c in self.checks:
            value = c.value.to(torch.float64)
            rows.append(torch.stack([torch.full_like(value, c.tol), (value > c.tol).to(torch.float64), value]))
        return torch.stack(rows)

    def check(self) -> list[tuple]:
        """Per fixed run: (iterations needed, converged, largest relative residual); then per
        check: (tol, met, value). Reads the device (synchronises)."""
        values = self.check_tensor().tolist()
        runs = len(self._runs)
        return ([(int(i), not bool(a), float(r)) for i, a, r in values[:runs]]
                + [(t, not bool(a), v) for t, a, v in values[runs:]])


_SCHEDULE: contextvars.ContextVar[Optional[CGSchedule]] = contextvars.ContextVar("kronegp_cg_schedule", default=None)


@contextlib.contextmanager
def cg_schedule(schedule: Optional[CGSchedule]):
    """Run the :func:`block_cg` calls of the block under ``schedule`` (``None``: normally)."""
    token = _SCHEDULE.set(schedule)
    try:
        yield schedule
    finally:
        _SCHEDULE.reset(token)


def active_schedule() -> Optional[CGSchedule]:
    """The :class:`CGSchedule` the :func:`block_cg` runs follow now, or ``None``: a computation
    under one must make the same runs whatever their results (no data-dependent extra solve)."""
    return _SCHEDULE.get()


def warn_not_converged(iterations: int, residual: float, tol: float, stacklevel: int) -> None:
    """The ``RuntimeWarning`` of a CG run that stopped at ``max_iters`` above ``tol`` (also given by
    :mod:`kronegp.models._graph` for such a run inside a replayed CUDA graph); ``stacklevel`` as
    the caller would pass it to ``warnings.warn``. Inside :func:`kronegp.solvers.report.one_warning`
    it is recorded, and the block warns once."""
    shortfall(
        residual,
        tol,
        f"kronegp.solvers.block_cg: stopped after {iterations} iterations (max_iters) with "
        f"relative residual {residual:.3e} > tol {tol:.1e}; raise max_iters, loosen tol "
        "or use a better preconditioner",
        stacklevel=stacklevel + 1,
    )


def _check_rhs(rhs: Tensor) -> None:
    if not isinstance(rhs, Tensor):
        raise TypeError(f"rhs must be a torch.Tensor of shape (..., n, t), got {type(rhs).__name__}")
    if rhs.dim() < 2:
        raise ValueError(
            f"rhs must have shape (..., n, t) (use rhs.unsqueeze(-1) for one vector), got {tuple(rhs.shape)}"
        )
    if not rhs.is_floating_point():
        raise TypeError(f"rhs must be a floating-point tensor, got {rhs.dtype}")


def row_inner(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise inner products ``Σ_i a[..., j, i] b[..., j, i]`` → ``(..., t)``: the default
    reduction of :func:`block_cg` with ``rows=True``."""
    return (a * b).sum(dim=-1)


def _fused_backend(rhs: Tensor, inner: Optional[Inner], diag: Optional[Tensor], rows: bool) -> Optional[Backend]:
    """The backend of ``rhs`` if its fused CG step applies to this solve (one block ``(n, t)``,
    the local inner product, a diagonal or no preconditioner, ``t`` within the kernel's limit),
    else ``None``."""
    if not (FUSED and rhs.dim() == 2 and inner in (None, local_inner, row_inner)):
        return None
    n, t = (rhs.shape[1], rhs.shape[0]) if rows else rhs.shape
    if diag is not None and diag.shape != (n,):
        return None
    backend = device.backend_for(rhs)
    capability = backend.cg_capability(rhs)
    return backend if capability and t <= capability.limit else None


def _diagonal_precond(d: Tensor, rows: bool) -> Callable[[Tensor], Tensor]:
    """``r ↦ diag(d) r`` on blocks of columns ``(..., n, t)``, or of rows ``(..., t, n)``."""
    return (lambda r: d.unsqueeze(-2) * r) if rows else (lambda r: d.unsqueeze(-1) * r)


def _as_block(ap: Tensor, p: Tensor) -> Tensor:
    if ap.shape != p.shape or ap.dtype != p.dtype or ap.device != p.device:
        raise ValueError(
            f"matvec must return a tensor like its input ({tuple(p.shape)}, {p.dtype}, {p.device}), got "
            f"{tuple(ap.shape)}, {ap.dtype}, {ap.device}"
        )
    return ap.contiguous()


def block_cg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precond: Optional[Callable[[Tensor], Tensor] | Tensor] = None,
    *,
    inner: Optional[Inner] = None,
    tol: "float | Tensor" = 1e-5,
    max_iters: int = 1000,
    min_iters: int = 0,
    x0: Optional[Tensor] = None,
    record_lanczos: bool = False,
    warn: bool = True,
    rows: bool = False,
    overwrite_rhs: bool = False,
) -> CGResult:
    """Solve ``A X = B`` column by column with preconditioned CG, all columns at once.

    Args:
        matvec: ``v ↦ A v`` for ``v`` of shape ``(..., n, t)``; ``A`` symmetric positive definite.
        rhs: ``B``, shape ``(..., n, t)``.
        precond: ``r ↦ M r`` with ``M ≈ A⁻¹`` symmetric positive definite; or a tensor ``d``
            of shape ``(..., n)`` (positive) for the diagonal ``M = diag(d)``; ``None`` for none.
        inner: ``(a, b) ↦ (..., t)`` column-wise inner products; default :func:`local_inner`
            (:func:`row_inner` with ``rows``). Pass an all-reduced one when the ``n``
            dimension is sharded across processes.
        tol: stop a column once ``‖b − A x‖ / ‖b‖ ≤ tol`` (2-norms through ``inner``). In a run of
            a fixed :class:`CGSchedule` it may be a 0-dim device tensor (a tolerance the computation
            chose on the device, not read; such a run takes the torch iteration).
        max_iters: at most this many iterations; a run that stops here without reaching
            ``tol`` warns (``RuntimeWarning``) with the residual reached.
        min_iters: run at least this many iterations (Lanczos quadrature needs a few).
        x0: starting guess, shape of ``rhs``; zero by default. The Lanczos coefficients
            describe the Krylov space of the *initial residual*, so log-determinant
            estimation needs ``x0 = 0``.
        record_lanczos: keep the ``α_k, β_k`` of every iteration.
        warn: warn when ``tol`` is not reached.
        rows: the right-hand sides are the *rows* of ``rhs`` (shape ``(..., t, n)``, each
            vector contiguous), and ``matvec``/``precond`` take and return such blocks; a
            diagonal ``precond`` still has shape ``(..., n)``. For operators that work on
            rows natively (``x · (⊗F)`` in :func:`kronegp.matmul_kron`), this avoids
            transposing the block around every product. Everything else (coefficients,
            residuals, the solution's layout) follows ``rhs``.
        overwrite_rhs: the caller hands ``rhs`` over (a contiguous block it no longer needs):
            it becomes the residual, updated in place, instead of a copy (one block less).

    Memory: besides ``rhs`` and what ``matvec`` allocates, a run holds ``x``, ``r`` and ``p``
    (``r`` is ``rhs`` itself with ``overwrite_rhs``), plus on the unfused path ``z = M r``, and
    ``A p`` while it is used: every update is written in place into these blocks, and ``A p``
    is dropped before the next ``matvec`` (:mod:`kronegp.models.memory` counts them).

    Returns:
        :class:`CGResult`.
    """
    _check_rhs(rhs)
    if not callable(matvec):
        raise TypeError(f"matvec must be callable v -> A v, got {type(matvec).__name__}")
    vd = -1 if rows else -2  # the vector (n) dimension
    diag: Optional[Tensor] = None
    if isinstance(precond, Tensor):
        want = rhs.shape[:-2] + (rhs.shape[vd],)
        if precond.shape != want and precond.shape != want[-1:]:
            raise ValueError(
                f"precond given as a diagonal must have shape {tuple(want)} (rhs without its "
                f"{'row' if rows else 'column'} dimension), got {tuple(precond.shape)}"
            )
        if precond.dtype != rhs.dtype or precond.device != rhs.device:
            raise ValueError(
                f"precond (diagonal) must match rhs's dtype and device ({rhs.dtype}, {rhs.device}), "
                f"got {precond.dtype} on {precond.device}"
            )
        diag = precond.contiguous()
        precond = _diagonal_precond(diag, rows)
    elif precond is not None and not callable(precond):
        raise TypeError(f"precond must be callable r -> M r, a diagonal tensor, or None, got {type(precond).__name__}")
    schedule = _SCHEDULE.get()
    if isinstance(tol, Tensor):
        # a tolerance the computation chose on the device (its value cannot be checked here)
        if schedule is None or not schedule.is_fixed or tol.dim() != 0:
            where = "no schedule" if schedule is None else "a fixed schedule" if schedule.is_fixed else "a recording schedule"
            raise ValueError("tol may be a tensor only as a 0-dim one, in a run of a fixed CGSchedule; "
                             f"got shape {tuple(tol.shape)}, {where}")
    elif tol <= 0 or not (tol == tol):
        raise ValueError(f"tol must be a positive number, got {tol}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    inner = (row_inner if rows else local_inner) if inner is None else inner
    apply_m = (lambda r: r) if precond is None else precond

    def per_vector(v: Tensor) -> Tensor:  # (..., t) coefficients against the block
        return v.unsqueeze(vd)

    slot, fixed = schedule._start(max_iters) if schedule is not None else (0, None)

    # The fused step applies a diagonal preconditioner or none: a callable one (e.g. the two-level
    # preconditioner of a hole) runs the torch iteration, never the fused one without it; nor does
    # it take a tolerance held on the device.
    fused = (_fused_backend(rhs, inner, diag, rows)
             if x0 is None and (precond is None or diag is not None) and not isinstance(tol, Tensor) else None)
    b_norm = inner(rhs, rhs).sqrt()
    # the caller's block becomes the residual (updated in place) when it is handed over
    own = overwrite_rhs and x0 is None and rhs.is_contiguous()
    if fused is not None:
        x = torch.zeros(rhs.shape, dtype=rhs.dtype, device=rhs.device)
        r = rhs if own else rhs.clone(memory_format=torch.contiguous_format)
    elif x0 is None:
        x = torch.zeros_like(rhs)
        r = rhs if own else rhs.clone()
    else:
        if x0.shape != rhs.shape:
            raise ValueError(f"x0 must have the shape of rhs {tuple(rhs.shape)}, got {tuple(x0.shape)}")
        x = x0.clone()
        r = rhs - matvec(x)
    del rhs  # (with overwrite_rhs it is r; its norms are taken)

    # A zero column is solved by x = 0; it must neither divide by zero nor hold the others back.
    zero_col = b_norm == 0
    safe_b_norm = torch.where(zero_col, torch.ones_like(b_norm), b_norm)
    if x0 is not None:  # in place: x and r are this function's own blocks
        x.masked_fill_(per_vector(zero_col), 0)
        r.masked_fill_(per_vector(zero_col), 0)
    z = apply_m(r)
    p = z.clone(memory_format=torch.contiguous_format)  # r is updated in place below; p must not alias it
    rz = inner(r, z)
    if diag is not None and fused is None:
        z = torch.empty_like(p)  # M r is written into this block every iteration (no new one)
    initial_rz = rz.clone()
    res = inner(r, r).sqrt() / safe_b_norm
    active = (res > tol) & ~zero_col
    col_iters = torch.zeros(b_norm.shape, dtype=torch.long, device=x.device)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    tiny = torch.finfo(x.dtype).tiny
    iterations = 0
    if fused is not None:
        # The coefficients and the convergence state stay on the device (the backend's CG state):
        # three launches per iteration besides matvec, and one read of a flag.
        record = (fixed if fixed is not None else min(max_iters, 64)) if record_lanczos else 0
        st = fused.cg_state(rz=rz, res=res, b_norm=safe_b_norm, active=active, zero=zero_col, tol=tol, record=record)
        while (iterations < fixed) if fixed is not None else (
                iterations < max_iters and (iterations < min_iters or st.any_active())):
            force = iterations < min_iters
            ap = _as_block(matvec(p), p)
            fused.cg_step("dot", st, p=p, ap=ap, rows=rows, iteration=iterations, force=force)
            fused.cg_step("update", st, x=x, r=r, p=p, ap=ap, d=diag, rows=rows, iteration=iterations, force=force)
            fused.cg_step("direction", st, r=r, p=p, d=diag, rows=rows)
            del ap  # before the next matvec: its block is not held beside the new one
            iterations += 1
        res, active, col_iters = st.res, st.active.bool(), st.iters
        if record_lanczos and iterations:
            alphas, betas = [st.alphas[:iterations]], [st.betas[:iterations]]
    else:
        while (iterations < fixed) if fixed is not None else (
                iterations < max_iters and (bool(active.any()) or iterations < min_iters)):
            keep = active | ((iterations < min_iters) & ~zero_col)
            ap = matvec(p)
            pap = inner(p, ap)
            alpha = torch.where(keep, rz / pap.clamp_min(tiny), torch.zeros_like(rz))
            # In place: x and r are this function's own buffers; one pass each instead of a
            # temporary per product (the vectors are (N, t) grids, the solve is bandwidth-bound
            # between its Kronecker matmuls).
            x.addcmul_(p, per_vector(alpha))
            r.addcmul_(ap, per_vector(alpha), value=-1)
            del ap  # before the next matvec: its block is not held beside the new one
            if diag is None:
                z = apply_m(r)
            else:
                torch.mul(r, diag.unsqueeze(-2) if rows else diag.unsqueeze(-1), out=z)
            rz_new = inner(r, z)
            beta = torch.where(keep, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
            torch.addcmul(z, p, per_vector(beta), out=p)  # p ← z + β p, in place
            rz = torch.where(keep, rz_new, rz)
            col_iters = col_iters + keep.long()
            iterations += 1
            if record_lanczos:
                alphas.append(alpha.unsqueeze(0))
                betas.append(beta.unsqueeze(0))
            res = torch.where(keep, inner(r, r).clamp_min(0).sqrt() / safe_b_norm, res)
            active = active & (res > tol)

    if schedule is not None:
        schedule._done(slot, iterations, col_iters, res, active)
    converged = None if fixed is not None else not bool(active.any())
    if converged is False and warn:
        warn_not_converged(iterations, float(res.max()), tol, stacklevel=2)
    return CGResult(
        solution=x,
        iterations=iterations,
        column_iterations=col_iters,
        residual=res,
        converged=converged,
        alphas=torch.cat(alphas) if record_lanczos and alphas else None,
        betas=torch.cat(betas) if record_lanczos and betas else None,
        initial_rz=initial_rz,
    )
