"""Solve ``A x = b`` and estimate ``log det A`` in one block CG run.

The right-hand side ``b`` and ``S`` probe vectors ``z_s ~ N(0, P)`` (``P = M⁻¹``, the
preconditioner's own matrix) go through CG together, so one ``matvec`` per iteration
serves the solve, the log-determinant and the stochastic trace estimates:

* ``x = A⁻¹ b``;
* ``log det A ≈ log det P + (1/S) Σ_s (z_sᵀ P⁻¹ z_s) e₁ᵀ log(T_s) e₁`` (SLQ, see
  :mod:`kronegp.solvers.lanczos`);
* ``u_s = A⁻¹ z_s`` and ``v_s = P⁻¹ z_s`` with ``E[u_sᵀ G v_s] = tr(A⁻¹ G)`` for any
  ``G``, because ``E[z zᵀ] = P``: the caller's gradient of ``log det A`` is
  ``(1/S) Σ_s u_sᵀ (∂A) v_s``, a bilinear derivative.

Nothing here assumes the vectors are local: every reduction goes through ``inner``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from kronegp.solvers.cg import CGResult, _diagonal_precond, block_cg
from kronegp.solvers.lanczos import LanczosOnHost, slq_logdet_correction

__all__ = ["SolveWithLogdet", "solve_with_logdet"]


@dataclass
class SolveWithLogdet:
    """What :func:`solve_with_logdet` returns.

    Attributes:
        solution: ``A⁻¹ b``, shape ``(n, t)``.
        probe_solves: ``A⁻¹ z_s``, shape ``(n, S)``.
        probe_precond: ``P⁻¹ z_s`` (= ``M z_s``), shape ``(n, S)``.
        (Transposed, ``(t, n)`` and ``(S, n)``, for a ``rows`` solve.)
        logdet: estimate of ``log det A`` (0-dim), ``precond_logdet`` included. Computed on
            first access from the Lanczos coefficients, whose copy to the host was queued when
            the CG ended: GPU work queued before that access runs while the host computes it.
        cg: the underlying :class:`~kronegp.solvers.CGResult`.
        lanczos: the queued host copy of its Lanczos coefficients (``None`` for a run of a fixed
            :class:`~kronegp.solvers.CGSchedule`, whose quadrature runs on the device).
        probe_columns: which columns of the CG run are the probes (``slice(t, None)``).
    """

    solution: Tensor
    probe_solves: Tensor
    probe_precond: Tensor
    cg: CGResult
    probe_columns: slice
    lanczos: Optional[LanczosOnHost] = field(repr=False)
    precond_logdet: Optional[Tensor] = None
    _logdet: Optional[Tensor] = field(default=None, repr=False)

    @property
    def logdet(self) -> Tensor:
        if self._logdet is None:
            # from the host copy, or on the device for a fixed-schedule run (no host copy)
            est = slq_logdet_correction(self.cg, columns=self.probe_columns, host=self.lanczos)
            self._logdet = est + self.precond_logdet if self.precond_logdet is not None else est
        return self._logdet

    @property
    def logdet_samples(self) -> Tensor:
        """Each probe's estimate of ``log det A`` (``(S,)``, ``precond_logdet`` included): their
        mean is :attr:`logdet`, their spread its standard error (``std / √S``)."""
        est = slq_logdet_correction(self.cg, columns=self.probe_columns, host=self.lanczos, per_column=True)
        return est + self.precond_logdet if self.precond_logdet is not None else est

    def residual_max(self) -> "float | Tensor":
        """The CG run's largest final relative residual (read from the queued host copy); for a
        run of a fixed :class:`~kronegp.solvers.CGSchedule` a 0-dim device tensor (not read)."""
        return self.cg.residual_max() if self.lanczos is None else self.lanczos.residual_max()


def solve_with_logdet(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    probes: Tensor,
    *,
    precond: Optional[Callable[[Tensor], Tensor] | Tensor] = None,
    precond_logdet: Optional[Tensor] = None,
    inner: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    tol: float = 1e-5,
    max_iters: int = 1000,
    rows: bool = False,
) -> SolveWithLogdet:
    """Solve ``A X = rhs`` and estimate ``log det A`` from probes, in one block CG run.

    Args:
        matvec: ``v ↦ A v`` on ``(n, t)`` blocks.
        rhs: ``(n, t)`` right-hand sides to solve.
        probes: ``(n, S)`` probes drawn from ``N(0, P)`` where ``precond`` applies ``P⁻¹``
            (standard normal when ``precond`` is ``None``).
        precond: ``r ↦ P⁻¹ r``, a tensor ``d`` (``(n,)``) for ``P⁻¹ = diag(d)``, or ``None``.
        precond_logdet: ``log det P`` (0-dim); required with ``precond``.
        inner: column-wise inner product ``(a, b) ↦ (t,)`` (all-reduced when sharded).
        tol, max_iters: CG stopping rule (see :func:`~kronegp.solvers.block_cg`).
        rows: ``rhs``, ``probes`` and the results hold their vectors as rows (``(t, n)``,
            ``(S, n)``), and ``matvec`` works on rows (see ``block_cg``'s ``rows``).
    """
    if rhs.dim() != 2 or probes.dim() != 2:
        want = "(t, n) and (S, n)" if rows else "(n, t) and (n, S)"
        raise ValueError(f"rhs and probes must be matrices {want}; got {tuple(rhs.shape)} and {tuple(probes.shape)}")
    vdim, cdim = (1, 0) if rows else (0, 1)
    if rhs.shape[vdim] != probes.shape[vdim]:
        raise ValueError(
            f"rhs has vectors of length {rhs.shape[vdim]} but probes of length {probes.shape[vdim]}; "
            "both live on the same grid"
        )
    if probes.shape[cdim] == 0:
        raise ValueError("probes must hold at least one column (S >= 1) to estimate log det")
    if precond is not None and precond_logdet is None:
        raise ValueError("precond_logdet (log det P) is required when a preconditioner is given")
    t = rhs.shape[cdim]
    result = block_cg(
        matvec,
        torch.cat([rhs, probes], dim=cdim),
        precond,
        inner=inner,
        tol=tol,
        max_iters=max_iters,
        record_lanczos=True,
        rows=rows,
        overwrite_rhs=True,  # the concatenated block is ours: it becomes the CG's residual
    )
    # copy queued now, read on demand (none for a fixed-schedule run, which must not synchronise)
    probe_columns = slice(t, None)
    lanczos = None if result.converged is None else LanczosOnHost(result, columns=probe_columns)
    if precond is None:
        probe_precond = probes
    elif isinstance(precond, Tensor):
        probe_precond = _diagonal_precond(precond, rows)(probes)
    else:
        probe_precond = precond(probes)
    return SolveWithLogdet(
        solution=result.solution[:t] if rows else result.solution[:, :t],
        probe_solves=result.solution[t:] if rows else result.solution[:, t:],
        probe_precond=probe_precond,
        cg=result,
        lanczos=lanczos,
        precond_logdet=precond_logdet,
        probe_columns=probe_columns,
    )
