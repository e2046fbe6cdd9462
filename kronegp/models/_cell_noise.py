"""A two-level preconditioner for ``C = K + D`` with per-cell noise spread over decades.

Notation of :mod:`kronegp.models._masked`: ``K = Q diag(λ) Qᵀ`` (``Q = ⊗Q_k``), ``D = diag(d)``,
CG in eigen-coordinates on ``C̃ = QᵀCQ = diag(λ) + Qᵀ D Q``. The Kronecker preconditioner
``P = K + σ̄² I`` (diagonal there) is exact in the directions where the signal dominates
(``λ ≫ d``) but in the others, most of a smooth kernel's grid, ``P⁻¹C`` acts like ``D/σ̄²``:
its spectrum spans the noise's range (1e4 in ``benchmarks/gaps.py``'s ``cell-noise``), and CG
needs hundreds of iterations, more on larger grids (228 at 10³, 515 at 24³ to 1e-5).
Scaling by the noise instead (``D^{½}(…)D^{½}``) breaks the signal directions (CG did not
converge in 3000 iterations). Both together, each on its own subspace, with the smooth split
``w = λ/(λ + σ̄²)`` (signal) and ``1 − w`` (noise)::

    M̃ = diag(w / (λ + σ̄²)) + diag(σ̄²/(λ + σ̄²)) Qᵀ D⁻¹ Q diag(σ̄²/(λ + σ̄²))

is symmetric positive definite (a positive diagonal plus a positive semi-definite term) and
equals ``P̃⁻¹`` when ``D = σ̄² I``. On ``benchmarks/gaps.py``'s data it brings the iterations
(4 right-hand sides, tol 1e-5) from 228 to ~116 at 10³ and from 515 to ~122 at 24³: about
flat in the grid size where ``P``'s grow. It costs two Kronecker products (one pair, ``Q`` and
``Qᵀ``) more per iteration than the diagonal ``P̃⁻¹``, so it pays when it at least halves the
iterations, which it did when at most 30 % of the eigenvalues ``λ`` exceed ``σ̄²``
(:data:`SIGNAL_FRACTION`; 1e4 noise spread, tol 1e-6, Matérn-5/2: signal fraction 0.20 → 492
against 163 iterations, 0.31 → 287/154, 0.44 → 207/161, 0.58 → 140/154; a narrow spread
(0.5 decades) needs ~10 with ``P`` and ~5 with ``M̃``). So it is used there only.

It serves the solves with ``C`` that need no log-determinant (:meth:`FullGridCovariance.solve`:
predictions, the data and probe columns inside the missing cells' system ``G``). The training
likelihood's own run with ``C`` stays on ``P``: its stochastic log-determinant needs probes
``z ~ N(0, P)`` and ``log det P`` exactly, which ``M̃`` does not offer. Being a callable, it
runs block CG's torch iteration, not the fused CUDA step (which takes a diagonal).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

__all__ = ["SIGNAL_FRACTION", "TWO_LEVEL", "two_level_pays", "two_level_preconditioner"]

#: Whether :class:`~kronegp.models._masked.FullGridCovariance` solves with per-cell noise use
#: this preconditioner (tests and ``benchmarks/cell_noise.py`` compare with ``P`` alone).
TWO_LEVEL = True
#: Largest fraction of eigenvalues ``λ > σ̄²`` (the signal's share of the grid) at which it is used.
SIGNAL_FRACTION = 0.3


def two_level_preconditioner(eig, lam: Tensor, noise: Tensor, sigma_bar2: Tensor, *, rows: bool
                             ) -> Callable[[Tensor], Tensor]:
    """``u ↦ M̃ u`` (module docstring) in the eigen-coordinates of ``eig``, for blocks of rows
    ``(t, N)`` (``rows``) or columns ``(N, t)``.

    Args:
        eig: the eigendecomposition of ``⊗K_k`` (``to_eigbasis[_rows]``/``from_eigbasis[_rows]``).
        lam: ``λ`` of ``K`` (outputscale included), ``noise``: ``d`` on the grid (positive),
        sigma_bar2: ``σ̄²``, where the split between signal and noise falls.
    """
    diag = lam / (lam + sigma_bar2) ** 2
    root = sigma_bar2 / (lam + sigma_bar2)
    inv_noise = 1.0 / noise
    if rows:
        return lambda u: diag * u + root * eig.to_eigbasis_rows(inv_noise * eig.from_eigbasis_rows(root * u))
    diag, root, inv_noise = diag.unsqueeze(-1), root.unsqueeze(-1), inv_noise.unsqueeze(-1)
    return lambda u: diag * u + root * eig.to_eigbasis(inv_noise * eig.from_eigbasis(root * u))


def two_level_pays(signal_cells: float, n_cells: float) -> bool:
    """Whether the two-level preconditioner is used, given how many eigenvalues exceed ``σ̄²``."""
    return TWO_LEVEL and signal_cells <= SIGNAL_FRACTION * n_cells
