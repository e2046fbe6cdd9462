"""Predicted training-step times of the exact and the stochastic ways to handle missing cells, and
the rule that chooses between them (issue 22: limits on ``m`` alone ignore the grid's size).

Two choices look at these costs, both once per model (nothing here reads data):

* **(a) exact-missing or cg** (:func:`kronegp.models.paths.choose_path`, ``path="auto"``, homoskedastic
  noise, ``m`` missing cells within :func:`~kronegp.models._few_missing.few_missing_limit`):
  :func:`exact_missing_seconds` against :func:`cg_seconds` with ``num_probes`` random probes;
* **(b) exact traces or random probes** on the cg path (:meth:`kronegp.models.paths.CGPath.exact_trace`,
  at most ``exact_trace_limit`` cells in a trace): :func:`cg_seconds` with one unit probe per cell
  against ``num_probes`` random ones.

**The rule** (:func:`prefer_exact`): the exact choice when its predicted step is at most
:data:`EXACT_BUDGET_S` (cheap enough that an exact likelihood is worth any ratio), or no slower
than the stochastic one. The budget is a policy, not a measurement: on a CPU it is set so that the
20³ grid keeps the choices it had under the old fixed limits (exact-missing up to 1024 missing
cells, its slowest, 1000 scattered cells, measured 1.1 s against 0.04 s for cg's estimate).

**The work** of a step (``loss_backward``), over ``N`` cells, axes ``n_k``, ``S = Σn_k``:

* cg, ``t`` columns (the data column and the probes, or ``m`` unit probes): every CG iteration is
  two Kronecker products of a ``(t, N)`` block (``2·t·N·S`` flops each) plus element-wise passes
  over it; the iterations of scattered cells (measured 1–7) and the gradient's products are folded
  into the coefficients: ``overhead + t·N·(element + axis·S)``.
* exact-missing through the rows ``U`` (scattered cells, :mod:`kronegp.models._few_missing`): the
  ``(m, N)`` blocks ``U``, ``Y``, ``G⁻¹Y``, the element-wise passes and the bilinear gradient over
  them, and ``G = U Yᵀ`` (a GEMM of ``2m²N`` flops or ``m`` Kronecker products of ``≤ 2m·N·S``,
  the cheaper): ``overhead + m·N·(element + axis·min(m, S)) + cubic·m³`` (Cholesky and ``G⁻¹``).
  Measured, the element term dominates: a 20³ and the 435k-cell grid cost the same per ``m·N``
  (~1e-7 s on this CPU) although their ``S`` are 60 and 326.
* exact-missing through the box (a compact hole, ``b_k`` indices per axis;
  :func:`~kronegp.models._few_missing.box_pays`): ``overhead + box·N·Σ_k b_k(b_k + n_k) + cubic·m³``.

Coefficients per device type and dtype (:data:`RATES`), seconds, fitted to
``benchmarks/gaps.py --limit`` on a 2-core CPU (one torch thread, loaded, 2026-12-07; NOTES.md
"Scattered cells on large grids"); the CUDA ones to an H100's float64 rows of ``python benchmarks/gaps.py --limit --device cuda --n 64`` (which prints each
row's predicted and measured times; float32 on CUDA is scaled from them, not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["StepRates", "RATES", "EXACT_BUDGET_S", "rates_for", "cg_seconds", "exact_missing_seconds",
           "prefer_exact"]


@dataclass(frozen=True)
class StepRates:
    """Seconds per unit of work of one training step on one device type and dtype (module docstring).

    Attributes:
        cg_overhead, cg_element, cg_axis: the cg step: fixed, per element of its ``(t, N)``
            blocks, per element and unit of ``Σn_k``.
        exact_overhead: the exact-missing step, fixed.
        rows_element, rows_axis: exact-missing through the rows ``U`` (``(m, N)``): per element, and
            per element and unit of ``min(m, Σn_k)``.
        box: exact-missing through the box, per unit of ``N·Σ_k b_k(b_k + n_k)``.
        cubic: per ``m³`` of the ``m × m`` factorisation (both exact-missing forms).
    """

    cg_overhead: float
    cg_element: float
    cg_axis: float
    exact_overhead: float
    rows_element: float
    rows_axis: float
    box: float
    cubic: float

    def scaled(self, factor: float) -> "StepRates":
        """Every coefficient times ``factor`` (a device ``1/factor`` times as fast)."""
        return StepRates(*(factor * getattr(self, f) for f in self.__dataclass_fields__))


# Fitted (relative least squares) to 20³ and the air grid, float64, m = 8…1728 (NOTES.md); float32
# measured no cheaper on this CPU (its rows within ±35 % of these where the box was not busier).
# ``cubic`` refitted after the block inverse from the Cholesky factor (2026-12-07, quiet box, one
# thread, ``gaps.py --limit --n 20``): holes of 10³ / 12³ cells measured 55 / 208 ms where 1.4e-10
# predicted 157 / 740 ms; 3.6e-11 predicts 55 / 201 ms (the scattered rows' predictions move < 15 %).
_CPU64 = StepRates(cg_overhead=0.012, cg_element=1.5e-7, cg_axis=6.2e-10, exact_overhead=0.015,
                   rows_element=8.7e-8, rows_axis=2.4e-10, box=2.6e-10, cubic=3.6e-11)
_CPU32 = _CPU64
# CUDA float64: fitted to ``gaps.py --limit --device cuda --n 64`` on an H100 (2026-12-07, round 14 of
# benchmarks/RESULTS.md; 64³, m = 8…8000, scattered cells and cubic holes): both steps are host-bound
# below ~10 ms (cg 4–5 ms with 17 columns, exact-missing 9–11 ms up to m = 512 in a box); the unit-probe
# rows (up to 8001 columns, 0.95e-9 s per element at Σn = 192) fit the per-element terms, the
# scattered rows at m = 512 / 1000 (19 / 35 ms) the rows' and the cubic term; the box term is too small
# to resolve there (holes of 1000 cells: 16 ms, the cubic term included). float32: the element terms
# (memory-bound passes) at half, the fixed costs alike — scaled, not measured (the 128³ float32 cg
# step of round 13, 16–28 ms, is within 1.5× of it).
_CUDA64 = StepRates(cg_overhead=0.001, cg_element=5.0e-10, cg_axis=2.05e-12, exact_overhead=0.009,
                    rows_element=4.5e-11, rows_axis=1.25e-13, box=1e-12, cubic=7e-12)
_CUDA32 = StepRates(cg_overhead=0.001, cg_element=2.5e-10, cg_axis=1.0e-12, exact_overhead=0.009,
                    rows_element=2.25e-11, rows_axis=6.3e-14, box=5e-13, cubic=7e-12)

#: coefficients by (device type, dtype); other devices use the CPU's
RATES = {("cpu", torch.float64): _CPU64, ("cpu", torch.float32): _CPU32,
         ("cuda", torch.float64): _CUDA64, ("cuda", torch.float32): _CUDA32}

#: predicted step (s) up to which the exact choice is taken whatever the stochastic one costs
EXACT_BUDGET_S = {"cpu": 2.0, "cuda": 0.05}


def rates_for(device: torch.device, dtype: torch.dtype) -> StepRates:
    """The coefficients for ``device``'s type and ``dtype`` (the CPU's float64 ones for others)."""
    return RATES.get((device.type, dtype), RATES.get(("cpu", dtype), _CPU64))


def cg_seconds(columns: int, sizes: Sequence[int], rates: StepRates) -> float:
    """Predicted cg step with ``columns`` CG columns (the data column and the probes)."""
    n = math.prod(sizes)
    return rates.cg_overhead + columns * n * (rates.cg_element + rates.cg_axis * sum(sizes))


def exact_missing_seconds(m: int, sizes: Sequence[int], box_sizes: Optional[Sequence[int]],
                          rates: StepRates) -> float:
    """Predicted exact-missing step with ``m`` missing cells: through the box when ``box_sizes``
    (the indices per axis, :attr:`~kronegp.models._few_missing.MissingBox.box_sizes`) is given, the
    rows ``U`` otherwise."""
    n = math.prod(sizes)
    if box_sizes is not None:
        work = rates.box * n * sum(b * (b + nk) for b, nk in zip(box_sizes, sizes))
    else:
        work = m * n * (rates.rows_element + rates.rows_axis * min(m, sum(sizes)))
    return rates.exact_overhead + work + rates.cubic * m**3


def prefer_exact(exact_s: float, stochastic_s: float, device: torch.device) -> bool:
    """The rule: the exact choice when it is predicted within :data:`EXACT_BUDGET_S` or no slower
    than the stochastic one."""
    budget = EXACT_BUDGET_S.get(device.type, EXACT_BUDGET_S["cpu"])
    return exact_s <= max(budget, stochastic_s)
