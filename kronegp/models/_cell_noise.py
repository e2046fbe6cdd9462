"""A preconditioner for ``C = K + D`` with per-cell noise spread over decades, with an exact
log-determinant and exact samples: the likelihood's log-determinant run and the solves use it alike.

Notation of :mod:`kronegp.models._masked`: ``K = Q diag(λ) Qᵀ`` (``Q = ⊗Q_k``), ``D = diag(d)``,
CG in eigen-coordinates on ``C̃ = QᵀCQ = diag(λ) + Qᵀ D Q``. The Kronecker preconditioner
``P = K + σ̄² I`` (diagonal there) is exact in the directions where the signal dominates
(``λ ≫ d``) but in the others, most of a smooth kernel's grid, ``P⁻¹C`` acts like ``D/σ̄²``:
its spectrum spans the noise's range (1e4 in ``benchmarks/gaps.py``'s ``cell-noise``), and CG
needs hundreds of iterations, more on larger grids (229 at 10³, 389 at 16³, 513 at 24³ to 1e-5).
Scaling by the noise outside (``D^{½}(…)D^{½}``) breaks the signal directions (CG did not
converge in 3000 iterations). Scaling inside does not::

    M = A^{½} Δ A^{½},   A = I + K/c,   Δ = diag(σ̄^{2(1−β)} d^β),   c = mean(Δ)

In the noise directions ``A ≈ I`` and ``M ≈ Δ``, a compressed ``D``; in a smooth signal
direction ``q``, ``qᵀMq = a_q qᵀΔq ≈ (1 + λ_q/c) c ≈ λ_q``. It is ``P`` when ``d`` is one
value. With ``β = ½`` (:data:`BETA`) CG on ``benchmarks/gaps.py``'s data (4 right-hand sides, tol
1e-5) took 88 / 116 / 136 iterations at 10³ / 16³ / 24³ (β = 0.75: 116 / 114 / 128; β = 1 with
``c`` the arithmetic mean of ``d``: 228 / 221; the geometric one: 594 / 575), where the earlier
two-level (additive) preconditioner took 118 / 124 / 127. Its application in eigen-coordinates,
``M̃⁻¹ = diag(a^{-½}) Qᵀ Δ⁻¹ Q diag(a^{-½})``, costs one Kronecker pair (``Q`` and ``Qᵀ``) more per
iteration than ``P̃⁻¹``, so it pays where it at least halves the iterations: at most 30 % of the
eigenvalues above ``σ̄²`` (:data:`SIGNAL_FRACTION`; Matérn-5/2, 1e4 spread, tol 1e-6, 4 columns,
iterations P / two-level / this: signal 0.20 → 490 / 162 / 150, 0.47 → 204 / 162 / 97,
0.81 → 76 / 125 / 92, 1.0 → 13 / 17 / 58).

What the additive two-level one lacked, and why the likelihood could not use it: being a product
of factors with known determinants,

* ``log det M = Σ log(1 + λ/c) + Σ log Δ`` exactly, and
* ``z = Q diag(a^{½}) Qᵀ Δ^{½} ξ ~ N(0, M)`` for ``E[ξξᵀ] = I``, at one Kronecker pair per block:

the stochastic Lanczos quadrature then estimates only ``log det H`` of the preconditioned
remainder ``H = Δ^{-½}A^{-½}CA^{-½}Δ^{-½}`` (PCG from ``z`` runs Lanczos on ``H`` from ``ξ``), whose
spectrum is tight (condition 223 at 10³, where ``P``'s is 1500). ``H ≈ (D/σ̄²)^{1−β}`` is nearly
diagonal in grid coordinates: probes ``ξ`` of ±1 there (Rademacher) leave only its off-diagonal
part to the estimate's variance (``Var = 2 Σ_{i≠j} (log H)_ij²`` over ``S``), see
:func:`kronegp.models._masked.cg_lml_pieces`.
Being a callable, it runs block CG's torch iteration, not the fused CUDA step (which takes a
diagonal).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["BETA", "SIGNAL_FRACTION", "SQUARE_ROOT", "SquareRootPreconditioner", "square_root_pays"]

#: Whether :class:`~kronegp.models._masked.FullGridCovariance` uses this preconditioner where it
#: pays (tests and ``benchmarks/cell_noise.py`` compare with ``P`` alone).
SQUARE_ROOT = True
#: Largest fraction of eigenvalues ``λ > σ̄²`` (the signal's share of the grid) at which it is used.
SIGNAL_FRACTION = 0.3
#: The exponent of ``d`` in ``Δ`` (module docstring).
BETA = 0.5


class SquareRootPreconditioner:
    """``M = A^{½} Δ A^{½}`` (module docstring) in the eigen-coordinates of ``eig``, for blocks of
    rows ``(t, N)`` (``rows``) or columns ``(N, t)``; calling it applies ``M̃⁻¹``.

    Args:
        eig: the eigendecomposition of ``⊗K_k`` (``to_eigbasis[_rows]``/``from_eigbasis[_rows]``).
        lam: ``λ`` of ``K`` (outputscale included), ``noise``: ``d`` on the grid (positive),
        sigma_bar2: ``σ̄²`` (the geometric mean of ``d``),
        total: ``vec ↦ Σ_i vec_i`` over the grid (all-reduced when sharded).
    """

    def __init__(self, eig, lam: Tensor, noise: Tensor, sigma_bar2: Tensor, *, rows: bool,
                 total: Callable[[Tensor], Tensor]):
        self.eig, self.rows, self.lam, self._total = eig, rows, lam, total
        # Two grid vectors held (a^{-½}, Δ^{-½}); the rest is formed when asked, and the blocks are
        # scaled in place: the memory plan's per-cell counts (kronegp.models.memory) hold for it.
        delta = sigma_bar2 ** (1 - BETA) * noise ** BETA
        #: ``c``: the mean of ``Δ``
        self.level = total(delta) / total(torch.ones_like(delta))
        a = 1 + lam / self.level
        self._logdet = total(torch.log(a)) + total(torch.log(delta))
        self._a_inv_root, self._delta_inv_root = a.rsqrt_(), delta.rsqrt_()
        del a, delta

    @property
    def a(self) -> Tensor:
        """``a = 1 + λ/c``: ``A``'s eigenvalues."""
        return self._a_inv_root.pow(-2)

    @property
    def delta(self) -> Tensor:
        """``Δ`` on the grid."""
        return self._delta_inv_root.pow(-2)

    def _d(self, vec: Tensor) -> Tensor:
        return vec if self.rows else vec.unsqueeze(-1)

    def _to(self, x: Tensor) -> Tensor:
        return self.eig.to_eigbasis_rows(x) if self.rows else self.eig.to_eigbasis(x)

    def _from(self, u: Tensor) -> Tensor:
        return self.eig.from_eigbasis_rows(u) if self.rows else self.eig.from_eigbasis(u)

    def __call__(self, u: Tensor) -> Tensor:
        """``M̃⁻¹ u = a^{-½} ∘ Qᵀ(Δ⁻¹ ∘ Q(a^{-½} ∘ u))``."""
        a_inv_root, delta_inv_root = self._d(self._a_inv_root), self._d(self._delta_inv_root)
        w = self._from(a_inv_root * u)
        return self._to(w.mul_(delta_inv_root).mul_(delta_inv_root)).mul_(a_inv_root)

    def sample(self, xi: Tensor) -> Tensor:
        """``z̃ = Qᵀz = a^{½} ∘ Qᵀ(Δ^{½} ∘ ξ)`` for ``ξ`` on the grid: ``z̃ ~ N(0, M̃)`` when
        ``E[ξξᵀ] = I`` (and ``M̃⁻¹z̃ = a^{-½} ∘ Qᵀ(Δ^{-½} ∘ ξ)``)."""
        return self._to(xi / self._d(self._delta_inv_root)).div_(self._d(self._a_inv_root))

    def logdet(self) -> Tensor:
        """``log det M = Σ log a + Σ log Δ`` (0-dim)."""
        return self._logdet

    def signal_trace(self) -> Tensor:
        """``tr(Δ^{-½}A^{-½}KA^{-½}Δ^{-½}) = Σ_i Δ_i⁻¹ [Q diag(λ/a) Qᵀ]_ii`` (0-dim): the exact mean of
        ``ṽᵀ(λ∘ṽ)``, ``ṽ = M̃⁻¹z̃``, the signal's part of each probe's ``ξᵀHξ`` (a control variate
        of the log-determinant: the rms error of ``log det C`` at 16 probes, 10³ / 16³, from 11.2 / 20.6
        to 8.9 / 16.7; ``ξᵀHξ`` whole would give 7.0 / 12.7, but its noise part has no cheap trace)."""
        diag = self.eig.diag_of(self.lam * self._a_inv_root.square())
        return self._total(diag.mul_(self._delta_inv_root).mul_(self._delta_inv_root))


def square_root_pays(signal_cells: float, n_cells: float) -> bool:
    """Whether the preconditioner is used, given how many eigenvalues exceed ``σ̄²``."""
    return SQUARE_ROOT and signal_cells <= SIGNAL_FRACTION * n_cells
