"""A two-level preconditioner for the missing cells' system ``G = X_MM`` of a contiguous hole.

Notation of :mod:`kronegp.models._masked`: ``X ≈ C⁻¹`` applied as ``Q diag(p) Qᵀ`` (``p = 1/(λ + σ²)``,
exact for homoskedastic noise; ``P⁻¹`` of the Kronecker preconditioner with per-cell noise),
``M`` the ``m`` missing cells, ``J = diag(X)_M`` (the Jacobi scaling the cg path always had).

**Why a hole is slow.** ``G⁻¹`` is the conditional covariance of the missing values given the
observed ones. Scattered cells are pinned by their observed neighbours: ``J⁻¹G`` has eigenvalues
within a small factor of 1 and CG takes ~5 iterations. In a hole, a mode that is smooth over
the hole (prior variance ``s²Πμ ≫ σ²``) is not pinned: ``vᵀGv / vᵀJv`` falls towards
``σ²/(s²Πμ)``, and CG needs ~``√(s²/σ²)``-many more iterations (measured, 40³ grid, hole of
19³ cells: 95 against 5 for the same number of scattered cells).

**Coarse space.** Those modes are, to a good approximation, the leading eigenvectors of the
kernel restricted to the hole's bounding box, which is a Kronecker product: with
``K_k[I_k, I_k] = V_k diag(μ_k) V_kᵀ`` (``I_k`` the box's indices on axis ``k``), the columns of
``W = E_M (⊗V_k) S`` are the tensor modes ``(j_1, …, j_d)`` with ``s² Π_k μ_k[j_k] ≥`` :data:`MODE_SCORE`
``· σ²`` (``S`` selects them, at most :data:`MAX_MODES`; ``E_M`` restricts the box to the missing
cells). The preconditioner is additive two-level (Jacobi plus a Galerkin coarse solve)::

    M = J⁻¹ + W E⁻¹ Wᵀ,     E = Wᵀ G W = Sᵀ (⊗R_k) diag(p) (⊗R_k)ᵀ S,   R_k = V_kᵀ Q_k[I_k, :]

``E`` costs one Kronecker matmul of ``n_1`` grid slabs with factors of ``r_k² × n_k`` (the
Khatri–Rao squares of ``R_k``, :func:`kronegp.models._few_missing.khatri_gram`, axis 1 summed
directly: :func:`selected_gram`) when the hole fills its box; otherwise ``X W`` through the
grid, :data:`COLUMN_CHUNK` modes at a time (then ``|S| ≤`` :data:`MAX_COLUMN_MODES`).
Applying ``M`` to a block costs two Kronecker products over the box with ``b_k × r_k`` factors
and a ``|S| × |S|`` triangular solve pair: small against the block's two Kronecker products over
the grid inside ``G``. ``M`` is symmetric positive definite whatever ``E`` is (exact or not),
so CG stays correct; its quality only sets the iterations.

**Exact log det and probes.** The SLQ estimate of ``log det G`` (:mod:`kronegp.solvers.lanczos`)
needs ``log det P`` of ``P = M⁻¹`` exactly and probes ``z ~ N(0, P)``. With
``B = J^{½} W L⁻ᵀ`` (``E = L Lᵀ``), ``J^{½} M J^{½} = I + B Bᵀ`` and ``T = BᵀB = L⁻¹ (Wᵀ J W) L⁻ᵀ``
(``|S| × |S|``, ``WᵀJW`` again one Khatri–Rao gram over the box) ``= U diag(s) Uᵀ``::

    log det P = Σ_M log J − Σ log(1 + s)
    z = J^{½} ξ + J W L⁻ᵀ U diag(f(s)) Uᵀ L⁻¹ Wᵀ J^{½} ξ,   f(s) = ((1 + s)^{−½} − 1) / s

(``(I + BBᵀ)^{−½} = I + B U diag(f(s)) Uᵀ Bᵀ``, so ``Cov z = J^{½}(I + BBᵀ)⁻¹J^{½} = M⁻¹``; ``f`` is
finite at ``s → 0``). With unit probes ``ξ = √S e_i`` the trace estimates stay exact.

**Measured** (2-core CPU, loaded, one thread, 2026-12-07, Jacobi → two-level CG iterations on
``G`` with 17 columns, model at GridGP's initial hyperparameters, ``σ²/s² = 0.1``): 40³ grid,
hole 15³: 49 → 9 (132 modes at score ≥ 1); hole 19³: 95 → 9 (250 modes); same number of
scattered cells: 5. Scores 0.3 / 3 / 10 gave 8 / 12 / 17 iterations on the 19³ hole with
379 / 177 / 120 modes: 1 balances the modes' cost against the iterations. Training step
(``benchmarks/gaps.py --holes``, same machine, median of 2) against as many scattered cells:
1.6× / 2.8× at 40³ (Jacobi: 5× / 11×); 1.8× / 2.4× / 1.9× for the 1 / 5 / 10 % holes of 64³
(8 / 9 / 10 iterations with 87 / 319 / 584 modes, scatter 4–5). More in NOTES.md.

Applies to a grid held whole (the rows layout of :mod:`kronegp.models._masked`) whose missing
cells fill at least :data:`MIN_FILL` of their bounding box (one compact hole: scattered cells,
clouds over the whole grid and several far-apart holes keep plain Jacobi, which already
converges there or whose box modes would not be the hole's).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.models._few_missing import MissingBox, khatri_gram, khatri_square
from kronegp.models._kron import KronEigen
from kronegp.ops import matmul_kron

__all__ = ["CoarseBasis", "TwoLevel", "two_level", "selected_gram", "coarse_bytes", "ENABLED", "MODE_SCORE",
           "MAX_MODES", "MAX_GRAM_ELEMENTS", "MAX_COLUMN_MODES", "COLUMN_CHUNK", "MIN_FILL", "MIN_MISSING"]

#: Use the two-level preconditioner where it applies (tests and benchmarks switch it off to compare).
ENABLED = True
#: A box mode enters the coarse space when its prior variance ``s²Πμ`` is at least this times ``σ²``.
MODE_SCORE = 1.0
#: At most this many coarse modes (the largest scores first).
MAX_MODES = 1024
#: At most this many elements in the partial gram ``H`` (``n_1 · (Π_{k>1} r_k)²``, see :func:`selected_gram`).
MAX_GRAM_ELEMENTS = 1 << 24
#: At most this many modes when the hole does not fill its box (each mode is a grid column through ``Qᵀ``).
MAX_COLUMN_MODES = 128
#: Modes per block when ``E`` is formed through the grid (memory: that many grid vectors at once).
COLUMN_CHUNK = 16
#: Least share of the bounding box the missing cells must fill.
MIN_FILL = 0.5
#: Fewer missing cells than this keep plain Jacobi (the coarse space would cost more than it saves).
MIN_MISSING = 64


def _tensor_modes(mus: list[Tensor], scale: float, limit: int, first: int) -> Optional[tuple[Tensor, list[int]]]:
    """Flat indices (row-major over ``Π r_k``, the leading ``r_k`` modes per axis) of the tensor modes
    with ``scale·Πμ ≥ MODE_SCORE``, best first, at most :data:`MAX_MODES` and ``limit``, fewer where
    their gram over ``first`` cells of axis 1 would pass :data:`MAX_GRAM_ELEMENTS`, and per axis how
    many leading modes they use; ``None`` if none."""
    # An axis's mode j can only enter with every other axis at its largest μ: the scores are formed
    # over those candidates only (not over the whole box, which may hold 10⁸ cells).
    top = [float(mu[0]) for mu in mus]
    mus = [mu[: max(1, int((scale * mu * math.prod(top[:k] + top[k + 1:]) >= MODE_SCORE).sum()))]
           for k, mu in enumerate(mus)]
    score = mus[0]
    for mu in mus[1:]:
        score = (score.unsqueeze(-1) * mu).reshape(-1)
    score = scale * score
    order = torch.argsort(score, descending=True)
    count = min(int((score >= MODE_SCORE).sum()), MAX_MODES, limit)
    sizes = [m.numel() for m in mus]
    while count > 0:
        sel = order[:count]
        per_axis, rest = [], sel
        for n in reversed(sizes):
            per_axis.append(rest % n)
            rest = torch.div(rest, n, rounding_mode="floor")
        per_axis.reverse()
        used = [int(a.max()) + 1 for a in per_axis]
        if first * math.prod(used[1:]) ** 2 <= MAX_GRAM_ELEMENTS:
            flat = torch.zeros_like(sel)  # the same modes, flat over Π used (the truncated axes)
            for a, r in zip(per_axis, used):
                flat = flat * r + a
            return flat, used
        count = count * 3 // 4
    return None


def selected_gram(mats: list[Tensor], w: Tensor, sel: Tensor, sizes: list[int], chunk: int = 8) -> Tensor:
    """``(⊗A_k)[sel] diag(w) (⊗A_k)[sel]ᵀ`` (``(|sel|, |sel|)``) for ``A_k`` of shape ``(r_k, n_k)``
    (``sizes = [r_k]``), grid weights ``w`` (length ``Πn_k``) and ``sel`` flat row-major over ``Πr_k``.

    Axis 1 is summed directly, the others by one Kronecker matmul of the ``n_1`` slabs of ``w`` with
    their Khatri–Rao squares (:func:`kronegp.models._few_missing.khatri_gram`):
    ``H[j] = (⊗_{k>1}A_k) diag(w[j]) (⊗_{k>1}A_k)ᵀ`` (``n_1 · (Π_{k>1}r_k)²`` elements) and
    ``E[a, b] = Σ_j A_1[a_1, j] A_1[b_1, j] H[j][a', b']``: the gram of the few selected tensor modes
    without the ``(Πr_k)²`` one of them all."""
    n1 = mats[0].shape[1]
    rest = math.prod(sizes[1:])
    a1 = torch.div(sel, rest, rounding_mode="floor")
    ar = sel % rest
    if len(mats) == 1:
        H = w.reshape(n1, 1, 1)
    else:
        H = khatri_gram([khatri_square(a) for a in mats[1:]], sizes[1:], w.reshape(n1, -1).mT.contiguous())  # (n1, R', R')
    rows = mats[0][a1]  # (k, n1): A_1[a_1, j]
    E = w.new_zeros(sel.numel(), sel.numel())
    for j in range(0, n1, chunk):
        h = H[j : j + chunk][:, ar][:, :, ar]  # (c, k, k)
        r = rows[:, j : j + chunk].mT  # (c, k)
        E += torch.einsum("ca,cb,cab->ab", r, r, h)
    return E


class CoarseBasis:
    """``W = E_M (⊗V_k) S``: the coarse modes over the hole's box, restricted to the missing cells."""

    def __init__(self, hole: MissingBox, vecs: list[Tensor], sel: Tensor, full: list[int]):
        self.hole = hole
        self.vecs = vecs  # V_k (b_k, r_k)
        self.vecs_t = [v.mT.contiguous() for v in vecs]
        self.sel, self.full = sel, full
        self.modes = sel.numel()

    def wt(self, rows: Tensor) -> Tensor:
        """``Wᵀ v`` for rows ``(t, N)``: ``(t, |S|)``."""
        h = self.hole
        if h.fills:
            box = rows[:, h.idx]
        else:
            box = rows.new_zeros(rows.shape[0], h.box)
            box[:, h.pos] = rows[:, h.idx]
        return matmul_kron(box, self.vecs)[:, self.sel]

    def w(self, coef: Tensor, n: int) -> Tensor:
        """``W c`` for coefficients ``(t, |S|)``: rows ``(t, N)`` (``N = n``) zero off the missing cells."""
        h = self.hole
        full = coef.new_zeros(coef.shape[0], math.prod(self.full))
        full[:, self.sel] = coef
        box = matmul_kron(full, self.vecs_t)
        out = coef.new_zeros(coef.shape[0], n)
        out[:, h.idx] = box if h.fills else box[:, h.pos]
        return out


class TwoLevel:
    """``M = J⁻¹ + W E⁻¹ Wᵀ`` on blocks of rows ``(t, N)`` that vanish off the missing cells (module
    docstring), from the basis ``W``, ``J`` on the grid, ``E`` and ``WᵀJW``. Build with :func:`two_level`."""

    def __init__(self, basis: CoarseBasis, g_diag: Tensor, E: Tensor, EJ: Tensor):
        self.basis, self.hole, self.modes = basis, basis.hole, basis.modes
        self.g_diag = g_diag
        self.j_inv = 1.0 / g_diag
        self.L = torch.linalg.cholesky(0.5 * (E + E.mT))
        linv_ej = torch.linalg.solve_triangular(self.L, EJ, upper=False)
        T = torch.linalg.solve_triangular(self.L, linv_ej.mT, upper=False)  # L⁻¹ EJ L⁻ᵀ
        s, self.U = torch.linalg.eigh(0.5 * (T + T.mT))
        self.s = s.clamp_min(0)
        # f(s) = ((1+s)^{-½} − 1)/s = −1 / (√(1+s) (1 + √(1+s))): no cancellation at s → 0
        root = torch.sqrt(1 + self.s)
        self.f = -1.0 / (root * (1 + root))

    def apply(self, rows: Tensor) -> Tensor:
        """``M v`` for rows ``(t, N)`` zero off the missing cells (the result is too)."""
        c = torch.cholesky_solve(self.basis.wt(rows).mT, self.L).mT
        return torch.addcmul(self.basis.w(c, rows.shape[-1]), rows, self.j_inv)

    def sample(self, xi: Tensor) -> Tensor:
        """Probes ``z = P^{½}ξ`` with ``Cov z = M⁻¹`` for rows ``ξ`` (``(S, N)``, zero off the missing cells)."""
        a = self.g_diag.sqrt() * xi
        c = torch.linalg.solve_triangular(self.L, self.basis.wt(a).mT, upper=False)  # L⁻¹ Wᵀ J^{½} ξ  (|S|, S)
        c = self.U @ (self.f.unsqueeze(-1) * (self.U.mT @ c))
        back = torch.linalg.solve_triangular(self.L.mT, c, upper=True).mT  # L⁻ᵀ …  (S, |S|)
        return a + self.g_diag * self.basis.w(back, xi.shape[-1])

    def logdet_p(self, missing: Tensor) -> Tensor:
        """``log det P = −log det M`` over the missing cells (``missing``: 0/1 grid vector)."""
        return (missing * torch.log(self.g_diag)).sum() - torch.log1p(self.s).sum()


def two_level(eig: KronEigen, factors: list[Tensor], outputscale: Tensor, level: Tensor, p: Tensor,
              g_diag: Tensor, missing: Tensor) -> Optional[TwoLevel]:
    """The two-level preconditioner for the missing cells (bool grid, flat) of a whole grid, or ``None``
    where it does not apply (:data:`ENABLED` off, fewer than :data:`MIN_MISSING` cells, a box filled
    below :data:`MIN_FILL`, no mode scoring :data:`MODE_SCORE`, or a Galerkin matrix that is not
    positive definite in this dtype: then Jacobi alone, as before).

    Args:
        eig: ``⊗K_k = Q diag(λ̂) Qᵀ``. factors: the ``K_k``. outputscale: ``s²``.
        level: ``σ²`` (or ``σ̄²``, per-cell noise). p: ``1/(λ + σ²)`` on the grid (``X``'s eigenvalues).
        g_diag: ``J`` on the grid (``diag(X)`` at missing cells, 1 elsewhere).
    """
    if not ENABLED:
        return None
    m = int(missing.sum())
    if m < MIN_MISSING:
        return None
    hole = MissingBox(missing, eig.sizes)
    if hole.m < MIN_FILL * hole.box:
        return None
    mus, vecs = [], []
    for f, ax in zip(factors, hole.axes):
        mu, v = torch.linalg.eigh(f.detach()[ax][:, ax])
        mus.append(mu.flip(0).clamp_min(0))
        vecs.append(v.flip(-1))
    chosen = _tensor_modes(mus, float(outputscale / level), MAX_MODES if hole.fills else MAX_COLUMN_MODES, eig.sizes[0])
    if chosen is None:
        return None
    sel, full = chosen
    basis = CoarseBasis(hole, [v[:, :r].contiguous() for v, r in zip(vecs, full)], sel, full)
    # Wᵀ J W over the box (J at the missing cells, 0 at the box's observed cells)
    jbox = g_diag.new_zeros(hole.box)
    jbox[hole.pos] = g_diag[hole.idx]
    EJ = selected_gram([v.mT for v in basis.vecs], jbox, sel, full)
    if hole.fills:
        R = [v.mT @ q[ax] for v, q, ax in zip(basis.vecs, eig.vecs, hole.axes)]  # R_k = V_kᵀ Q_k[I_k, :]
        E = selected_gram(R, p, sel, full)
    else:
        # E = Wᵀ X W through the grid, COLUMN_CHUNK modes at a time (one such block alive)
        k = basis.modes
        eye = torch.eye(k, dtype=p.dtype, device=p.device)
        E = torch.cat([basis.wt(eig.apply_function_rows(p, basis.w(eye[i : i + COLUMN_CHUNK], eig.size)))
                       for i in range(0, k, COLUMN_CHUNK)])
    try:
        return TwoLevel(basis, g_diag, E, EJ)
    except torch.linalg.LinAlgError:
        return None


def coarse_bytes(missing: Optional[Tensor], sizes, itemsize: int) -> int:
    """Bytes the two-level preconditioner may hold for ``missing`` (bool grid, flat) at its peak:
    the partial gram ``H`` of :func:`selected_gram` and six ``|S| × |S|`` matrices (eight with its
    chunk); 0 where it does not apply (for :mod:`kronegp.models.memory`)."""
    if not ENABLED or missing is None:
        return 0
    hole = MissingBox(missing, sizes)
    if hole.m < MIN_MISSING or hole.m < MIN_FILL * hole.box:
        return 0
    modes = min(hole.box, MAX_MODES if hole.fills else MAX_COLUMN_MODES)
    return (min(sizes[0] * hole.box**2, MAX_GRAM_ELEMENTS) + 14 * modes * modes) * itemsize
