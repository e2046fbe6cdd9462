"""Iterative solvers for symmetric positive-definite operators given as callables.

* :func:`block_cg`: preconditioned conjugate gradients on many right-hand sides at once,
  each column with its own step sizes, recording the coefficients Lanczos needs.
* :func:`tridiagonal_bands`, :func:`cg_tridiagonals`, :func:`slq_logdet_correction`: the Lanczos tridiagonal matrices
  hidden in those coefficients, and the stochastic Lanczos quadrature estimate of
  ``log det`` built from them.
* :func:`solve_with_logdet`: one call that solves ``A x = b`` and estimates
  ``log det A`` and the probe solves needed for stochastic trace estimation.
* :class:`CGSchedule`, :func:`cg_schedule`: fixed iteration counts for every CG run of a
  computation, so that it never reads the device (recording it as a CUDA graph).

Every inner product goes through an ``inner(a, b)`` callable (default: a sum over the
grid dimension, ``-2``), so a caller whose vectors are sharded across processes passes an
all-reduced one and nothing here assumes the whole vector is local.
"""

from kronegp.solvers.cg import CGResult, CGSchedule, block_cg, cg_schedule, local_inner, row_inner
from kronegp.solvers.lanczos import cg_tridiagonals, slq_logdet_correction, tridiagonal_bands
from kronegp.solvers.logdet import SolveWithLogdet, solve_with_logdet

__all__ = [
    "CGResult",
    "CGSchedule",
    "SolveWithLogdet",
    "block_cg",
    "cg_schedule",
    "cg_tridiagonals",
    "local_inner",
    "row_inner",
    "slq_logdet_correction",
    "solve_with_logdet",
    "tridiagonal_bands",
]
