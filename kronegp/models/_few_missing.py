"""Exact inference with a few missing cells: the Schur complement ``G = X_MM`` formed and factored.

Notation of :mod:`kronegp.models._masked`: ``C = K + σ² I = Q diag(λ + σ²) Qᵀ`` on the full grid
of ``N`` cells (homoskedastic noise), ``X = C⁻¹ = Q diag(p) Qᵀ`` with ``p = 1/(λ + σ²)``, ``M`` the
``m`` missing cells, ``O`` the observed ones. Then::

    log det C_OO = log det C + log det G,       G = X_MM = U diag(p) Uᵀ
    C_OO⁻¹ (zero-filled) = Z = X − B G⁻¹ Bᵀ,    B = X E_M,  QᵀB = (p ∘ U)ᵀ = Yᵀ

where ``U`` (``m × N``) holds the rows of ``Q = ⊗Q_k`` at the missing cells: row ``c`` is
``⊗_k Q_k[i_k(c), :]``, a row-wise Kronecker product (``m·N`` multiplications). ``Z`` vanishes
on the rows and columns of ``M`` (``E_Mᵀ Z = X_M· − G G⁻¹ E_Mᵀ X = 0``), so it *is* the
zero-filled ``C_OO⁻¹``: nothing is iterated, every result is exact up to round-off.

**Compact holes: the box.** Let ``I_k`` be the indices that occur on axis ``k`` among the
missing cells (``b_k = |I_k|``, ``b = Πb_k``: a contiguous hole *is* its box) and
``A_k = Q_k[I_k, :]`` (``b_k × n_k``); the rows of ``Q`` over the box are ``A = ⊗A_k`` and
``U = E_posᵀ A``. For any weights ``w`` over the grid::

    A diag(w) Aᵀ  =  reshape((⊗_k F_k) w),     F_k[(c, c'), j] = A_k[c, j] A_k[c', j]

(``F_k``: the row-wise Khatri–Rao square of ``A_k``), one Kronecker matmul of one column, where
the rows ``U`` would cost ``m·N`` to hold. ``F_k`` is symmetric in ``(c, c')``, so it is kept over
the pairs ``c ≤ c'`` only (``b_k(b_k+1)/2 × n_k``) and anything contracted with it is folded
first (``W[c, c'] + W[c', c]``, :class:`BoxPairs`): every product over the box runs on
``Π b_k(b_k+1)/2 ≈ b²/2^d`` entries. So ``G = [A diag(p) Aᵀ]_pos`` (spread from the pairs, exactly
symmetric), ``z = diag(Uᵀ G⁻¹ U) = (⊗F_kᵀ) vec(G⁻¹)`` gives ``tr(G⁻¹ U diag(w) Uᵀ) = zᵀw`` (the
noise and outputscale terms), and the factor gradient of ``log det G`` needs, per axis ``i``,
only the ``b_i × b_i`` blocks ``S_j`` of ``(I ⊗ ⊗_{k≠i} F_kᵀ) vec(G⁻¹)`` (``G⁻¹`` zero-filled in the
box; the axes share their first contractions) for every ``j`` over the other axes, and
``M_i = Σ_j L_i[j] (p_j p_jᵀ) ∘ (A_iᵀ S_j A_i)``. Summed over every ``j`` that is
``2N·b_i·n_i`` flops per axis (2 GFLOP on the 240 × 37 × 49 air grid with a 6 × 8 × 12 hole);
but ``σ² p_aj = 1/(1 + u_a L_j)`` (``u = s²λ_i/σ²``) is a power series in ``u_a L_j`` wherever
``max(u)·L_j ≤ ρ``, which separates ``a`` from ``j``: those ``j`` (most of them on a smooth grid)
cost ``2K+1`` weighted sums of ``S_j`` (``~4K·N·b_i²/n_i`` flops) and one block-Hankel product
(:meth:`FewMissing._axis_grad`); only the other axes' few large modes are summed directly.

**Scattered cells** (a box too large to hold ``b²`` entries) use the rows: ``G = U Yᵀ``
(``2m²N`` flops, or through the box when that is cheaper), ``G⁻¹Y`` likewise, and the
gradient of :func:`kronegp.models._exact.eigen_bilinear_form` of the ``m`` rows.

**Likelihood** ``log p = −½ rᵀα − ½ log det C − ½ log det G − (n/2) log 2π`` with
``Qᵀα = p ∘ (Qᵀr − Uᵀ G⁻¹ [Xr]_M)``, ``[Xr]_M = U (p ∘ Qᵀr)``.

**Gradient** (exact, no probes): with ``∂G = −[X ∂C X]_MM``::

    ∂ log p = ½ αᵀ ∂C α − ½ ∂ log det C + ½ tr(G⁻¹ Bᵀ ∂C B)

and ``tr(G⁻¹ Bᵀ ∂C B) = Σ_c (G⁻¹Y)_c (Qᵀ∂CQ) Y_cᵀ``: ``m + 1`` pairs of rows in
eigen-coordinates, the form :func:`kronegp.models._exact.eigen_bilinear_form` differentiates
(``Qᵀ∂CQ`` of ``s²⊗K_k + σ²I``), plus the exact ``−½ log det C`` term; through the box (above)
for a compact hole. A constant mean's gradient is ``1ᵀα``, taken in eigen-coordinates
(:meth:`FewMissing.observed_total`) without the grid vector ``α``.

**Posterior** mean ``μ + Kα``; variance on the grid
``diag(K − KZK) = diag(Q (λσ²/(λ+σ²)) Qᵀ) + rowsum((T L⁻ᵀ)²)`` with ``T = Q(λ ∘ Yᵀ)`` and
``G = L Lᵀ``; at points and for samples, products with ``Z`` (:meth:`FewMissing.apply`).

**G's factor and inverse**: LAPACK's Cholesky ``G = LLᵀ`` (``log det G`` from its diagonal), then
``G⁻¹`` from ``L`` by :func:`inverse_from_cholesky` (half-size blocks through a triangular solve and
GEMMs, as accurate as LAPACK's ``potri`` and ~18 % faster at m = 576 on a CPU), formed only when the
gradient asks for it. On a CPU the three ``m × m`` matrices live in buffers reused from one training
step to the next (:class:`_SquarePool`: freshly mapped memory cost ~3000 page faults a step).

Memory: a box of ``b²`` entries (at most :data:`MAX_BOX_CELLS` ² ; ``G``, ``L``, ``G⁻¹``), or the rows ``U``, ``Y`` and
``G⁻¹Y`` (``m × N`` each); :data:`MAX_MISSING_CPU` and :data:`MAX_MISSING_CUDA` bound ``m``
(GridGP takes this path up to them). Predictions and samples keep the rows ``U`` (``m × N``) only where
``G`` was formed through them (scattered cells); the grid variance holds four ``N × c`` blocks of its
columns (:func:`variance_columns`). :mod:`kronegp.models.memory` counts all of it.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor

from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["FewMissing", "MissingBox", "khatri_square", "khatri_gram", "pair_maps", "BoxPairs", "box_pairs",
           "TAYLOR_RATIOS", "taylor_terms", "inverse_from_cholesky", "INVERSE_LEAF", "series_plan", "MAX_MISSING_CPU", "MAX_MISSING_CUDA", "MAX_FORM_ELEMENTS", "MAX_BOX_CELLS", "forms_rows",
           "few_missing_limit", "box_pays", "rows_through_box", "VARIANCE_CHUNK", "variance_columns"]

#: Most missing cells for the exact few-missing path on a CPU. Measured (2-core CPU, one thread,
#: 2026-12-07, 20³ float64, ``benchmarks/gaps.py --limit``): up to m = 1000 its step beats the cg
#: path's (then exact too, with one unit probe per missing cell: 0.70 s against 85 s for a hole,
#: 2.5 s against 15 s scattered); at m = 1728 the cg path's 16 random probes are faster
#: (0.99 s / 0.18 s against 2.5 s / 6.5 s) but stochastic. So the limit follows the cg path's
#: ``exact_trace_limit`` default. A cap: below it the cost rule (:mod:`kronegp.models.costs`) still
#: prices the step, which grows with the grid (``m·N`` for scattered cells).
MAX_MISSING_CPU = 1024
#: The same on a CUDA device: a default, not yet measured, for the lead to calibrate on the
#: H100/H200 with ``python benchmarks/gaps.py --limit --device cuda --n 64`` (the m where the
#: exact step's time meets the cg step's).
MAX_MISSING_CUDA = 2048
#: Most elements of one ``m × N`` block of rows (``U``, ``Y``, ``G⁻¹Y``: three are alive at once).
MAX_FORM_ELEMENTS = 1 << 28
#: Largest box (cells spanned by the missing cells' indices) handled as a box (``b²`` entries).
MAX_BOX_CELLS = 6144
#: The ``ρ`` tried for the log det G gradient's series (:meth:`FewMissing._axis_grad`): the other
#: axes' modes with ``max(u)·L_j ≤ ρ`` go through ``K(ρ)`` powers (:func:`taylor_terms`), the others
#: directly; per axis the ``ρ`` with the fewest flops (:func:`series_plan`; a small ``ρ`` needs fewer
#: powers, a large one leaves fewer modes to sum directly).
TAYLOR_RATIOS = (0.05, 0.1, 0.25, 0.5)


def taylor_terms(dtype: torch.dtype, ratio: float) -> int:
    """``K``: the powers ``0…K`` of ``Σ_k (−x)^k = 1/(1 + x)`` for ``|x| ≤ ρ`` (``ratio``) whose
    remainder ``ρ^{K+1}/(1 − ρ)`` is below a tenth of ``dtype``'s round-off."""
    if not 0 < ratio < 1:
        raise ValueError(f"ratio must lie in (0, 1) for the series to converge, not {ratio}")
    eps = torch.finfo(dtype).eps
    return max(1, math.ceil(math.log(0.1 * eps * (1 - ratio)) / math.log(ratio)) - 1)


def box_pays(box: int, m: int, n_cells: int) -> bool:
    """Whether ``G`` and the gradient go through the box of ``box`` cells (compact holes) rather
    than the rows (scatter): the box's ``b²`` entries against the ``m·N`` of the rows (scattered
    cells span the whole grid), and at most :data:`MAX_BOX_CELLS` (also the cost model's,
    :mod:`kronegp.models.costs`)."""
    return box <= MAX_BOX_CELLS and box * box <= 4 * m * n_cells


def forms_rows(hole: "MissingBox", sizes) -> bool:
    """Whether :class:`FewMissing` for ``hole`` on a grid of ``sizes`` forms ``m × N`` rows of ``Q`` (``U``,
    ``Y`` and the products with them): through the rows (:func:`box_pays` false), or through the box with
    its products by the rows (:func:`rows_through_box` false). A compact hole does neither: its ``G`` and
    gradient live on the box and its products go through the box factors, ``(t, N)`` at a time."""
    return not box_pays(hole.box, hole.m, math.prod(sizes)) or not rows_through_box(hole.m, sizes, hole.box_sizes)


def few_missing_limit(device: torch.device) -> int:
    """The largest ``m`` the exact few-missing path takes on ``device``."""
    return MAX_MISSING_CUDA if device.type == "cuda" else MAX_MISSING_CPU


def rows_through_box(m: int, sizes, box_sizes) -> bool:
    """Whether products of ``m`` grid rows with ``U`` (``rows · Uᵀ``, ``coef · U``) go through the box
    factors ``⊗Q_k[I_k]`` (one :func:`~kronegp.ops.matmul_kron`) rather than the rows ``U`` themselves:
    the product's flops (the last axis contracted first) against ``2m²N``. (The memory plan reads it
    too: the Kronecker product holds two ``m × N`` intermediates beside ``U`` and ``Y``.)"""
    cost, cur = 0, [int(n) for n in sizes]
    for k in reversed(range(len(cur))):  # matmul_kron contracts the last axis first
        cost += 2 * m * math.prod(cur) * int(box_sizes[k])
        cur[k] = int(box_sizes[k])
    return cost < 2 * m * m * math.prod(int(n) for n in sizes)


#: Most grid values of one block of :meth:`FewMissing.grid_variance`'s columns (``N × c``; four such
#: blocks are alive at once, the memory plan's count)
VARIANCE_CHUNK = 1 << 26


def variance_columns(m: int, n_cells: int, chunk_elements: int = VARIANCE_CHUNK) -> int:
    """Columns per block of :meth:`FewMissing.grid_variance` (at most ``m``, at least one)."""
    return max(1, min(m, chunk_elements // n_cells))


class MissingBox:
    """The missing cells of a grid and the box they span (shared with
    :mod:`kronegp.models._two_level`).

    Attributes:
        idx: flat indices of the missing cells (ascending), ``m`` of them.
        coords: per axis, each missing cell's index on that axis (row-major, the order of ⊗).
        axes: per axis, the sorted distinct indices ``I_k`` occurring there; ``box_sizes`` their
            counts ``b_k`` and ``box`` their product (a contiguous hole *is* its box).
        pos: each missing cell's position in the box (row-major over ``I_1 × … × I_d``).
        fills: whether the missing cells are exactly the box's cells (then ``pos = 0…m−1``).
    """

    def __init__(self, missing: Tensor, sizes):
        self.idx = torch.nonzero(missing).reshape(-1)
        self.m = self.idx.numel()
        coords, rest = [], self.idx
        for n in reversed(list(sizes)):
            coords.append(rest % n)
            rest = torch.div(rest, n, rounding_mode="floor")
        coords.reverse()
        self.coords = coords
        self.axes = [torch.unique(c) for c in coords]
        self.box_sizes = [b.numel() for b in self.axes]
        pos = torch.zeros_like(self.idx)
        for c, b, nb in zip(coords, self.axes, self.box_sizes):
            pos = pos * nb + torch.searchsorted(b, c)
        self.pos = pos
        self.box = math.prod(self.box_sizes)
        self.fills = self.m == self.box  # positions ascend with idx, so pos = arange(m) then


@functools.lru_cache(maxsize=64)
def pair_maps(r: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """The pairs ``c ≤ c'`` of ``r`` indices (row-major over the upper triangle, ``r(r+1)/2`` of
    them): ``(first, second, index)`` with ``index[c, c']`` the pair of ``(min, max)`` (``(r, r)``).
    Kept between calls: read them, never write them."""
    first, second = torch.triu_indices(r, r, device=device)
    index = torch.empty(r, r, dtype=torch.long, device=device)
    number = torch.arange(first.numel(), device=device)
    index[first, second] = number
    index[second, first] = number
    return first, second, index


def khatri_square(a: Tensor) -> Tensor:
    """The row-wise Khatri–Rao square ``F[(c, c'), j] = a[c, j] a[c', j]`` of ``a`` over the pairs
    ``c ≤ c'`` (:func:`pair_maps`; ``F`` is symmetric in ``(c, c')``, so the other half repeats it):
    ``(r, n)`` → ``(r(r+1)/2, n)``."""
    first, second, _ = pair_maps(a.shape[0], a.device)
    return a[first] * a[second]


class BoxPairs:
    """Index maps between the ``R × R`` pairs of cells of a box (``R = Πr_k``, row-major) and the
    pairs ``c_k ≤ c_k'`` of each axis (:func:`pair_maps`; ``ΠP_k`` of them, ``P_k = r_k(r_k+1)/2``,
    about ``R²/2^d``), the layout of Kronecker products with the Khatri–Rao squares (:func:`khatri_square`).

    Attributes:
        pairs: ``[P_k]``.
        spread: ``(R, R)``: the folded index of the pair ``(c, c')`` (``(c_k, c_k')`` → ``(min, max)``
            on every axis): a matrix symmetric in each axis's pair on its own is ``vec[spread]``.
    """

    def __init__(self, sizes, device):
        sizes, d = list(sizes), len(sizes)
        maps = [pair_maps(rk, device) for rk in sizes]
        self.pairs = [f.numel() for f, _, _ in maps]
        spread = torch.zeros([1] * (2 * d), dtype=torch.long, device=device)
        for k, (_, _, index) in enumerate(maps):
            stride = math.prod(self.pairs[k + 1:])
            spread = spread + (index * stride).reshape([sizes[k] if j == k else 1 for j in range(d)]
                                                       + [sizes[k] if j == k else 1 for j in range(d)])
        r = math.prod(sizes)
        self.spread = spread.reshape(r, r)

    def fold(self, w: Tensor) -> Tensor:
        """``w`` (``(R, R)``) folded onto the pairs, shaped ``[P_k]``: each folded pair sums the
        ``w[c, c']`` that map to it (``W[c, c'] + W[c', c]`` per axis off its diagonal), so
        ``Σ w[c, c'] Π_k F_k[(c_k, c_k')] = Σ fold(w) Π_k F_k`` for any ``F_k`` symmetric in its pair.
        One scatter-add reading ``w`` in order (measured 8× faster than gathering it by pair)."""
        out = w.new_zeros(math.prod(self.pairs))
        return out.scatter_add_(0, self.spread.reshape(-1), w.reshape(-1)).reshape(self.pairs)

    def unfold(self, vec: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``vec`` over the pairs (``(ΠP_k, t)``) spread to ``(t, R, R)`` (into ``out`` if given,
        contiguous)."""
        r, t = self.spread.shape[0], vec.shape[-1]
        if t == 1:  # a 1-D gather: 4× faster than index_select's rows of one element (measured)
            if out is not None:
                torch.index_select(vec.reshape(-1), 0, self.spread.reshape(-1), out=out.view(-1))
                return out
            return vec.reshape(-1).index_select(0, self.spread.reshape(-1)).reshape(1, r, r)
        full = vec.index_select(0, self.spread.reshape(-1)).mT.reshape(t, r, r)  # (R², t) gathered
        return full if out is None else out.copy_(full)


#: Boxes whose maps are kept between calls (a training step builds the same box each time).
_CACHED_BOX_PAIRS = 1 << 21


@functools.lru_cache(maxsize=4)
def _cached_box_pairs(sizes: tuple, device: torch.device) -> BoxPairs:
    return BoxPairs(sizes, device)


def box_pairs(sizes, device) -> BoxPairs:
    """:class:`BoxPairs` of a box (kept between calls up to ``R² =`` 2²¹ pairs of cells)."""
    if math.prod(sizes) ** 2 <= _CACHED_BOX_PAIRS:
        return _cached_box_pairs(tuple(sizes), torch.device(device))
    return BoxPairs(sizes, device)


def khatri_gram(khatri: list[Tensor], sizes: list[int], w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``A diag(w_s) Aᵀ`` (``(t, R, R)``) for ``A = ⊗A_k`` (``A_k`` of shape ``(r_k, n_k)``, ``R = Πr_k``)
    and weights ``w`` (``(Πn_k, t)``), given ``khatri[k] = khatri_square(A_k)`` and ``sizes = [r_k]``:
    one Kronecker matmul of ``t`` columns over the pairs ``c_k ≤ c_k'`` of every axis (the gram is
    symmetric in each axis's pair on its own), spread to ``(c_k, c_k')`` after (module docstring),
    into ``out`` if given (contiguous ``(t, R, R)``)."""
    vec = kron_matmul(khatri, w)  # (ΠP_k, t)
    return box_pairs(sizes, w.device).unfold(vec, out=out)


def _powers(x: Tensor, top: int, first: Optional[Tensor] = None) -> Tensor:
    """``first ∘ x^q`` for ``q = 0…top`` (``(top + 1, len(x))``; ``first`` defaults to ones), by
    repeated products (one cumulative product, not ``top`` calls of ``pow``)."""
    out = x.unsqueeze(0).repeat(top + 1, 1)
    out[0] = 1.0 if first is None else first
    return torch.cumprod(out, 0)


@functools.lru_cache(maxsize=64)
def _spread_halved(r: int, device, dtype) -> tuple[Tensor, Tensor]:
    """``(index, half)``: ``x[..., index] * half`` spreads a pair axis (:func:`pair_maps`) holding a
    symmetric matrix with its off-diagonal entries doubled (a fold, :meth:`BoxPairs.fold`) to ``(r, r)``."""
    _, _, index = pair_maps(r, device)
    half = torch.full((r, r), 0.5, dtype=dtype, device=device).fill_diagonal_(1.0)
    return index, half


@functools.lru_cache(maxsize=16)
def _hankel_spread(terms: int, r: int, device, dtype) -> tuple[Tensor, Tensor]:
    """``(index, half)``: ``t.reshape(-1)[index] * half`` turns ``T_q`` folded on the pairs of ``r``
    indices (``t`` of shape ``(2K+1, r(r+1)/2)``, off-diagonal pairs doubled: :meth:`BoxPairs.fold`)
    into the block Hankel matrix ``((K+1)·r, (K+1)·r)`` of the ``T_{k+l}`` spread to ``(r, r)``
    (one gather, where spreading and then indexing the blocks took two)."""
    pair, halves = _spread_halved(r, device, dtype)
    k = torch.arange(terms + 1, device=device)
    q = (k.reshape(-1, 1, 1, 1) + k.reshape(1, 1, -1, 1))  # (K+1, 1, K+1, 1): k + l
    index = q * (r * (r + 1) // 2) + pair.reshape(1, r, 1, r)
    size = (terms + 1) * r
    return index.reshape(size, size), halves.reshape(1, r, 1, r).expand(terms + 1, r, terms + 1, r).reshape(size, size)


def series_plan(scaled: Tensor, b: int, n: int, dtype: torch.dtype) -> Optional[tuple[float, int]]:
    """``(ρ, K)`` for :meth:`FewMissing._axis_grad`'s series, or ``None`` (every mode summed directly):
    of :data:`TAYLOR_RATIOS`, the one whose series over the modes with ``scaled = max(u)·L_j ≤ ρ``
    plus the direct sum over the rest costs the fewest flops, if that beats the direct sum alone
    (box side ``b``, axis length ``n``)."""
    pairs, total = b * (b + 1) // 2, scaled.numel()
    direct = 2 * (b * n * n + b * b * n)  # flops per mode summed directly
    best, plan = total * direct, None
    counts = (scaled.unsqueeze(0) <= scaled.new_tensor(TAYLOR_RATIOS).unsqueeze(-1)).sum(-1).tolist()  # one read
    for ratio, few in zip(TAYLOR_RATIOS, counts):
        terms = taylor_terms(dtype, ratio)
        series = 2 * (2 * terms + 1) * total * pairs + 2 * ((terms + 1) * b) ** 2 * n + 2 * (terms + 1) * b * n * n
        if few and series + (total - few) * direct < best:
            best, plan = series + (total - few) * direct, (ratio, terms)
    return plan


#: Largest block :func:`inverse_from_cholesky` hands to LAPACK's ``potri``; a larger one is split in
#: two, its off-diagonal block a triangular solve and two GEMMs. Measured (2-core CPU, one thread,
#: MKL, float64, 2026-12-07): ``potri`` runs at ~18 GFLOP/s on 144–576 rows, a GEMM at 42–45 GFLOP/s
#: and a triangular solve at ~24; ``(LLᵀ)⁻¹`` of 576 rows took 7.2 ms whole, ~4.8 ms split to 144.
INVERSE_LEAF = 160


def inverse_from_cholesky(L: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``G⁻¹ = (LLᵀ)⁻¹`` from the lower Cholesky factor ``L`` (``(m, m)``), symmetric, written to
    ``out`` (``(m, m)``, any strides; a new row-major tensor if ``None``) and returned.

    Up to :data:`INVERSE_LEAF` rows, LAPACK's ``potri``. A larger ``L = [[L₁, 0], [L₂₁, L₂]]`` is
    ``G = [[A, Bᵀ], [B, C]]`` with ``A = L₁L₁ᵀ`` and Schur complement ``S = C − BA⁻¹Bᵀ = L₂L₂ᵀ``, so::

        T = BA⁻¹ = L₂₁L₁⁻¹,   G⁻¹ = [[A⁻¹ + Tᵀ S⁻¹ T, −(S⁻¹T)ᵀ], [−S⁻¹ T, S⁻¹]]

    with ``A⁻¹`` and ``S⁻¹`` from ``L₁`` and ``L₂`` (recursively, into ``out``'s diagonal blocks, then
    updated in place): one triangular solve and two GEMMs of half the size per split, most of the
    work at a GEMM's rate rather than ``potri``'s. ``T`` comes from the factor by a triangular solve,
    never from ``B`` and an explicit ``A⁻¹``: that product (and ``S`` formed from it) loses
    ``cond(A)`` more digits (measured: 1e-3 relative error at cond 1e10, against 7e-8 for ``potri``
    and this split alike)."""
    n = L.shape[-1]
    if out is None:
        out = L.new_empty(n, n)
    if n <= INVERSE_LEAF:
        # potri's result is symmetric (torch mirrors the triangle it writes)
        return out.copy_(torch.cholesky_inverse(L).mT)
    h = n // 2
    l1 = L[:h, :h]
    a_inv = inverse_from_cholesky(l1, out[:h, :h])
    s_inv = inverse_from_cholesky(L[h:, h:], out[h:, h:])
    t = torch.linalg.solve_triangular(l1, L[h:, :h], upper=False, left=False)  # T L₁ = L₂₁
    lower = torch.mm(s_inv, t, out=out[h:, :h]).neg_()  # −S⁻¹T
    a_inv.addmm_(t.mT, lower, alpha=-1)  # A⁻¹ + Tᵀ S⁻¹ T
    out[:h, h:] = lower.mT
    return out


class _SquarePool:
    """``(m, m)`` buffers of a CPU reused by the :class:`FewMissing` of consecutive training steps.

    Why: a step on a CPU allocates ``G``, its factor and its inverse afresh (``8m²`` bytes each,
    2.6 MB at m = 576); glibc hands such blocks back to the system when they are freed, and the
    next step's first touch of them page-faults. Measured on the air corner (20 × 25 × 49, m = 576,
    one thread, 2026-12-07): ~3000 page faults and 4.4 ms of system time per step, none with
    ``MALLOC_TRIM_THRESHOLD_`` raised. A :class:`FewMissing` takes its buffers here and returns
    them when it is collected (``weakref.finalize``); a returned buffer is handed out again only
    while the pool's reference is the only one (a caller who kept ``fm.G`` keeps it to itself), so
    a step whose previous one is still alive (two graphs at once) allocates its own. Views of them
    are not counted: nothing in kronegp keeps one past its :class:`FewMissing`. At most
    :data:`POOL_KEEP` buffers of each of :data:`POOL_SHAPES` shapes are kept.
    CUDA's caching allocator already reuses device memory, so devices other than the CPU skip this."""

    def __init__(self):
        self._free: dict = {}
        self._lock = threading.Lock()

    def take(self, n: int, dtype: torch.dtype, device: torch.device, column_major: bool = False) -> Tensor:
        """An ``(n, n)`` buffer (uninitialised; column-major if asked, for LAPACK to write in place)."""
        column_major = column_major and n > 1  # one element: both layouts at once
        if device.type == "cpu":
            with self._lock:
                free = self._free.get((n, dtype, column_major), [])
                for i in range(len(free)):
                    # two references, the list's and getrefcount's argument; more: someone kept it
                    if sys.getrefcount(free[i]) <= 2:
                        return free.pop(i)
        buf = torch.empty(n, n, dtype=dtype, device=device)
        return buf.mT if column_major else buf

    def give_back(self, bufs: list) -> None:
        """Return buffers (called when their :class:`FewMissing` is collected)."""
        with self._lock:
            for buf in bufs:
                if buf.device.type != "cpu":  # take() hands out fresh device memory: nothing to keep
                    continue
                key = (buf.shape[-1], buf.dtype, buf.stride(0) == 1 and buf.shape[-1] > 1)
                free = self._free.pop(key, [])
                self._free[key] = free  # the most recent shape last
                while len(self._free) > POOL_SHAPES:
                    del self._free[next(iter(self._free))]
                if all(b is not buf for b in free):
                    free.append(buf)
                del free[:-POOL_KEEP]  # the newest (a buffer someone kept stays at the front)
            bufs.clear()


#: Buffers :class:`_SquarePool` keeps per shape, dtype and layout (row-major: G and G⁻¹ of one
#: step; column-major: L), and the (shape, dtype, layout) it keeps at once (the latest used):
#: at most 8 buffers, 67 MB for m = 1024 in float64, 21 MB for the air corner's m = 576.
POOL_KEEP = 2
POOL_SHAPES = 4
_POOL = _SquarePool()


def _not_positive_definite(m: int) -> FloatingPointError:
    return FloatingPointError(
        f"GridGP (exact-missing path): G = X_MM over the {m} missing cells is not positive "
        "definite in this dtype (the noise is too small for the signal); use float64 or path='cg'"
    )


def _rowwise_kron(rows: list[Tensor]) -> Tensor:
    """``out[c] = rows_1[c] ⊗ … ⊗ rows_d[c]`` for ``rows_k`` of shape ``(m, n_k)``: ``(m, Πn_k)``."""
    out = rows[0]
    for r in rows[1:]:
        out = (out.unsqueeze(-1) * r.unsqueeze(-2)).reshape(out.shape[0], -1)
    return out


class _BoxLogdetTerm(torch.autograd.Function):
    """``tr(G⁻¹ U diag(p) Q̃ diag(p) Uᵀ)`` with ``Q̃ = Qᵀ(⊗K_k)Q``: the value ``Σ_c (G⁻¹Y)_c (λ̂ ∘ Y_c)``
    (``λ̂ = ⊗λ_k``) and its factor gradients ``Q_i M_i Q_iᵀ``, ``G⁻¹`` and ``p`` held fixed."""

    @staticmethod
    def forward(ctx, fm: "FewMissing", value: Tensor, *factors: Tensor) -> Tensor:
        ctx.fm = fm
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        fm: FewMissing = ctx.fm
        needs = ctx.needs_input_grad[2:]
        return (None, None, *[grad * g if need else None for g, need in zip(fm.box_factor_grads(needs), needs)])


class FewMissing:
    """``G = X_MM``, its Cholesky factor and what the likelihood and posterior need from it.

    Args:
        eig: the eigendecomposition of ``⊗K_k`` (no autograd).
        outputscale: ``s²``. noise: ``σ²`` (homoskedastic; 0-dim tensors).
        missing: bool grid of missing cells (flat, length ``N``), with at least one.
        hole: its :class:`MissingBox`, if the caller keeps one (a model's mask does not change
            between training steps); else built here.
    """

    def __init__(self, eig: KronEigen, outputscale: Tensor, noise: Tensor, missing: Tensor,
                 hole: Optional[MissingBox] = None):
        self.eig = eig
        self.sizes = eig.sizes
        self.outputscale = outputscale.detach()
        self.lam_unit = eig.eigvals()  # ⊗λ_k
        self.lam = self.outputscale * self.lam_unit
        self.noise = noise.detach()
        self.p = 1.0 / (self.lam + self.noise)
        self.missing = missing
        hole = MissingBox(missing, self.sizes) if hole is None else hole
        self.m = hole.m
        self._coords, self._box_sizes, self._pos = hole.coords, hole.box_sizes, hole.pos
        self._box_factors = [q[b] for q, b in zip(eig.vecs, hole.axes)]  # A_k (b_k, n_k)
        self.box = hole.box
        #: whether G and the gradient go through the box (compact holes) or the rows (scatter)
        self.boxed = box_pays(self.box, self.m, eig.size)
        self._U = None
        self._fills = hole.fills
        # G, L and G⁻¹ in buffers reused between steps on a CPU (_SquarePool: page faults otherwise)
        m, dtype, device = self.m, self.p.dtype, self.p.device
        self._buffers: list = []
        weakref.finalize(self, _POOL.give_back, self._buffers)
        if self.boxed:
            self._khatri = [khatri_square(a) for a in self._box_factors]
            if self._fills:  # symmetric exactly (one value per folded pair)
                G = self._buffers_take(m)
                khatri_gram(self._khatri, self._box_sizes, self.p.unsqueeze(-1), out=G.unsqueeze(0))
            else:
                G = self.box_gram(self.p.unsqueeze(-1))[0][self._pos][:, self._pos]
        else:
            G = self._against_rows(self.Y)
            G = 0.5 * (G + G.mT)
        L, info = torch.linalg.cholesky_ex(G, out=(self._buffers_take(m, column_major=True),
                                                   torch.empty((), dtype=torch.int32, device=device)))
        if int(info) != 0:
            raise _not_positive_definite(self.m)
        self.G, self.L = G, L
        self.logdet_g = 2 * torch.log(L.diagonal()).sum()
        self._ginv = self._ginv_box = self._missing_alpha = None
        self._contracted: dict = {}

    # ------------------------------------------------------------------ the rows and the box

    @property
    def U(self) -> Tensor:
        """The rows of ``Q`` at the missing cells, ``(m, N)`` (formed on first use)."""
        if self._U is None:
            self._U = _rowwise_kron([q[c] for q, c in zip(self.eig.vecs, self._coords)])
        return self._U

    @property
    def Y(self) -> Tensor:
        """``(Qᵀ X E_M)ᵀ = U diag(p)``, ``(m, N)``."""
        return self.U * self.p

    def _buffers_take(self, n: int, column_major: bool = False) -> Tensor:
        """An ``(n, n)`` buffer from the pool, returned to it when this object is collected."""
        buf = _POOL.take(n, self.p.dtype, self.p.device, column_major)
        self._buffers.append(buf)
        return buf

    @property
    def ginv(self) -> Tensor:
        """``G⁻¹``, ``(m, m)`` row-major (:func:`inverse_from_cholesky`; formed on first use: the
        gradient needs it, the posterior's products only ``L``)."""
        if self._ginv is None:
            self._ginv = inverse_from_cholesky(self.L, out=self._buffers_take(self.m))
        return self._ginv

    @property
    def ginv_box(self) -> Tensor:
        """``G⁻¹`` zero-filled in the box, ``(b, b)``."""
        if self._ginv_box is None:
            if self._fills:  # one contiguous hole: the box's order is the cells' (pos = 0…m−1)
                self._ginv_box = self.ginv
            else:
                out = self.ginv.new_zeros(self.box, self.box)
                out[self._pos.unsqueeze(-1), self._pos.unsqueeze(0)] = self.ginv
                self._ginv_box = out
        return self._ginv_box

    def box_gram(self, w: Tensor) -> Tensor:
        """``A diag(w_s) Aᵀ`` over the box (``(t, b, b)``), for grid weights ``w`` (``(N, t)``)."""
        return khatri_gram(self._khatri, self._box_sizes, w)

    def _contraction(self, axes: tuple) -> Tensor:
        """``vec(G⁻¹)`` (zero-filled in the box) folded onto each axis's pairs ``c_k ≤ c_k'``
        (:meth:`BoxPairs.fold`), with the axes in ``axes`` contracted by ``F_k`` in that order (each
        ``(c_k, c_k')`` → ``j_k``); the prefixes are kept, so the axes share their first contractions."""
        if axes not in self._contracted:
            if not axes:
                x = box_pairs(self._box_sizes, self.ginv.device).fold(self.ginv_box)
            else:
                x, k = self._contraction(axes[:-1]), axes[-1]
                x = torch.movedim(torch.tensordot(x, self._khatri[k], dims=([k], [0])), -1, k)
            self._contracted[axes] = x
        return self._contracted[axes]

    def _contraction_order(self) -> list[int]:
        """Axes in order of how much their contraction shrinks the tensor (``n_k`` per pair)."""
        n, b = self.sizes, self._box_sizes
        return sorted(range(len(n)), key=lambda k: n[k] / (b[k] * (b[k] + 1) / 2))

    def box_diagonal(self) -> Tensor:
        """``z_j = Σ_{c,c'} G⁻¹[c, c'] U[c, j] U[c', j]`` over the grid (length ``N``; the rows of
        ``U`` through the box): ``tr(G⁻¹ U diag(w) Uᵀ) = zᵀw`` for any weights ``w``."""
        return self._contraction(tuple(self._contraction_order())).reshape(-1)

    def box_factor_grads(self, needs) -> list[Optional[Tensor]]:
        """``Q_i M_i Q_iᵀ``, ``M_i = Σ_j L_i[j] (p_j p_jᵀ) ∘ (A_iᵀ S_j A_i)``, for the axes in ``needs``
        (module docstring: the gradient of ``tr(G⁻¹ U diag(p) Q̃ diag(p) Uᵀ)`` in ``K_i``), from
        ``S`` with every axis but ``i`` contracted (:meth:`_contraction`), by :meth:`_axis_grad`."""
        order = self._contraction_order()
        out: list[Optional[Tensor]] = [None] * len(self.sizes)
        for i in range(len(self.sizes)):
            if needs[i]:
                out[i] = self._axis_grad(i, self._contraction(tuple(k for k in order if k != i)))
        return out

    def _axis_grad(self, i: int, s: Tensor) -> Tensor:
        """``Q_i M_i Q_iᵀ`` from ``s``: every axis but ``i`` contracted, axis ``i`` folded (shape
        ``n`` with ``b_i(b_i+1)/2`` at ``i``; ``S_j`` symmetric, its off-diagonal pairs doubled).

        With ``u = s²λ_i/σ²``, ``p_aj = σ⁻² / (1 + u_a L_j)`` (``L_j = L_i[j]``). Where
        ``L̃_j = max(u) L_j ≤ ρ`` (:func:`series_plan`), ``σ² p_aj = Σ_k (−ũ_a L̃_j)^k`` (``ũ = u/max u``,
        ``|ũ L̃| ≤ ρ``: ``K`` terms reach the dtype's round-off) separates ``a`` from ``j``::

            Σ_j L_j p_aj p_a'j (A_iᵀ S_j A_i)[a, a'] = σ⁻⁴ Σ_{k,l} (−ũ_a)^k (−ũ_a')^l (A_iᵀ T_{k+l} A_i)[a, a'],
            T_q = Σ_j L_j L̃_j^q S_j

        (``2K+1`` sums over ``j``, one GEMM, then ``Φᵀ H Φ`` with ``H`` the block Hankel matrix of the
        ``T_q`` and ``Φ`` the ``A_i diag((−ũ)^k)``: no cost per grid cell and pair ``(a, a')``). The
        other ``j`` (the kernel's large modes on the other axes, few on a smooth grid) are summed
        directly, ``M_i += Σ_j (A_i ∘ w_j)ᵀ S_j (A_i ∘ p_j)`` (``w_j = L_j p_j``) in one GEMM over
        ``(j, c)``: ``2·b_i·n_i²`` flops per such ``j`` instead of every ``j``. Where the series costs
        more flops than the direct sum over its ``j`` (short axes, small grids), every ``j`` is summed
        directly."""
        n, bi = self.sizes, self._box_sizes[i]
        ni, pairs = n[i], bi * (bi + 1) // 2
        pre, post = math.prod(n[:i]), math.prod(n[i + 1:])
        s = s.reshape(pre, pairs, post)
        a = self._box_factors[i]  # (b_i, n_i)
        others = self.eig.vals[:i] + self.eig.vals[i + 1:]
        weight = kron_vector(others) if others else a.new_ones(1)  # L_j, j row-major over (pre, post)
        u = self.eig.vals[i] * (self.outputscale / self.noise)
        u_max = float(u.max())
        scaled = weight * u_max  # L̃_j
        plan = series_plan(scaled, bi, ni, a.dtype)
        if plan is None:
            few = 0
        else:
            ratio, terms = plan
            small = scaled <= ratio  # L̃_j ≤ ρ
            few = int(small.sum())
        m_i = None
        # S_j as rows (J, pairs), j row-major over (pre, post): one copy (none when i is the last axis);
        # the series' sums over j and the direct modes' gather are then one GEMM and one row gather
        s_rows = s.permute(0, 2, 1).reshape(-1, pairs)
        if few < weight.numel():  # the modes summed directly
            pj = self.p.view(pre, ni, post).permute(0, 2, 1).reshape(-1, ni)  # p_j as rows
            if few == 0:
                sj, wj = s_rows, weight
            else:
                big = torch.nonzero(~small).reshape(-1)
                sj, pj, wj = s_rows.index_select(0, big), pj.index_select(0, big), weight[big]
            index, half = _spread_halved(bi, a.device, a.dtype)
            # S_j (A_i ∘ p_j) = (S_j A_i) ∘ p_j: one GEMM over the stacked S_j (a batch of b_i × b_i
            # products ran 3–5× slower), then M_i = Σ_j (A_i ∘ w_j p_j)ᵀ (S_j A_i ∘ p_j), one GEMM over (j, c)
            v = ((sj[:, index] * half).reshape(-1, bi) @ a).reshape(-1, bi, ni) * pj.unsqueeze(1)
            left = a * (pj * wj.unsqueeze(-1)).unsqueeze(1)  # A_i ∘ w_j p_j, (J', b_i, n_i)
            m_i = left.reshape(-1, ni).mT @ v.reshape(-1, ni)
        if few:  # the series, zero weight on the modes summed directly
            w = _powers(scaled, 2 * terms, weight * small)  # L_j L̃_j^q, (2K+1, J)
            t = w @ s_rows  # T_q folded, (2K+1, pairs)
            index, half = _hankel_spread(terms, bi, a.device, a.dtype)
            h = t.reshape(-1)[index] * half  # ((K+1)·b_i, (K+1)·b_i): the block Hankel of the T_{k+l}
            ut = u / u_max if u_max > 0 else torch.zeros_like(u)
            phi = (a * _powers(-ut, terms).unsqueeze(1)).reshape(-1, ni)  # A_i diag((−ũ)^k), (K+1)·b_i rows
            series = phi.mT @ (h @ phi) / (self.noise * self.noise)
            m_i = series if m_i is None else m_i + series
        q = self.eig.vecs[i]
        return q @ m_i @ q.mT

    # ------------------------------------------------------------------ products with the rows

    def _use_kron(self) -> bool:
        return rows_through_box(self.m, self.sizes, self._box_sizes)

    def _against_rows(self, rows: Tensor) -> Tensor:
        """``rows · Uᵀ`` (``(t, N) → (t, m)``)."""
        if self._use_kron():
            box = matmul_kron(rows, [f.mT for f in self._box_factors])  # rows (⊗Q_k[I_k])ᵀ
            return box if self._fills else box[:, self._pos]
        return rows @ self.U.mT

    def _rows_from(self, coef: Tensor) -> Tensor:
        """``coef · U`` (``(t, m) → (t, N)``)."""
        if self._use_kron():
            if self._fills:  # the box's cells are the missing cells, in order
                return matmul_kron(coef, self._box_factors)
            box = coef.new_zeros(coef.shape[0], self.box)
            box[:, self._pos] = coef
            return matmul_kron(box, self._box_factors)
        return coef @ self.U

    # ------------------------------------------------------------------ likelihood

    def lml_terms(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """``(rᵀα, Qᵀα)`` for the residual ``r`` zero at missing cells (length ``N``; ``Qᵀα`` as a
        row ``(1, N)``): ``Qᵀα = p ∘ (Qᵀr − Uᵀ G⁻¹ [Xr]_M)`` with ``[Xr]_M = U (p ∘ Qᵀr)``."""
        rt = self.eig.to_eigbasis_rows(r.unsqueeze(0))  # (1, N)
        xr_m = self._against_rows(self.p * rt)[0]
        g = self.ginv @ xr_m  # (m,); G⁻¹ is formed for the gradient anyway
        alpha_t = self.p * (rt - self._rows_from(g.unsqueeze(0)))
        # U α̃ᵀ = [Xr]_M − G G⁻¹[Xr]_M: α's values at the missing cells, zero but for round-off
        self._missing_alpha = (alpha_t, xr_m - self.G @ g)
        return (rt * alpha_t).sum(), alpha_t

    def observed_total(self, alpha_t: Tensor) -> Tensor:
        """``Σ_O (Qα̃)``, the sum of the grid vector ``Qα̃`` over the observed cells (``α̃`` a row
        ``(1, N)``), without forming it: ``(⊗Q_kᵀ1)ᵀα̃`` less its ``m`` missing values ``U α̃ᵀ`` (zero
        but for round-off: for the ``α̃`` of :meth:`lml_terms` they are ``[Xr]_M − G G⁻¹[Xr]_M``, ``m²``
        flops, where a product with the box factors took ~0.3 ms on the air corner)."""
        ones = matmul_kron(alpha_t, [q.sum(0).unsqueeze(-1) for q in self.eig.vecs]).reshape(())
        kept = self._missing_alpha
        missing = kept[1] if kept is not None and kept[0] is alpha_t else self._against_rows(alpha_t)
        return ones - missing.sum()

    def logdet_g_surrogate(self, outputscale: Tensor, noise: Tensor, factors: list[Tensor]) -> Tensor:
        """A 0-dim tensor whose gradient is that of ``−½ log det G`` in ``s²``, ``σ²`` and the factors
        (its value is not the term's): ``½ tr(G⁻¹ Bᵀ ∂C B)`` with ``QᵀB = Yᵀ`` held fixed and
        ``∂C = ∂s² (⊗K) + s² ∂(⊗K) + ∂σ² I``."""
        if self.boxed:
            zp = self.box_diagonal() * self.p * self.p
            quad_noise, quad_kern = zp.sum(), (zp * self.lam_unit).sum()  # tr(G⁻¹ Y [I, λ̂] Yᵀ)
            return 0.5 * (outputscale * _BoxLogdetTerm.apply(self, quad_kern, *factors) + noise * quad_noise)
        from kronegp.models._exact import eigen_bilinear_form

        y = self.Y
        w = self._rows_from(self.ginv) * (0.5 * self.p)  # ½ G⁻¹Y (G⁻¹ symmetric)
        return outputscale * eigen_bilinear_form(w, y, self.eig, factors) + noise * torch.vdot(w.reshape(-1), y.reshape(-1))

    # ------------------------------------------------------------------ posterior

    def _x(self, v: Tensor) -> Tensor:
        """``X v = Q (p ∘ Qᵀ v)`` for columns ``v`` (``(N, t)``)."""
        return self.eig.apply_function(self.p, v)

    def apply(self, v: Tensor) -> Tensor:
        """``Z v = C_OO⁻¹ v_O`` zero-filled, for columns ``v`` (``(N, t)``):
        ``X (v − E_M G⁻¹ [X v]_M)``, four Kronecker matmuls of the columns (no rows ``U``)."""
        xv = self._x(v)
        w = torch.cholesky_solve(xv[self.missing], self.L)  # G⁻¹ Bᵀ v
        full = torch.zeros_like(v)
        full[self.missing] = w
        out = xv - self._x(full)
        return (~self.missing).to(out.dtype).unsqueeze(-1) * out

    def grid_variance(self, chunk_elements: int = VARIANCE_CHUNK) -> Tensor:
        """``diag(K − K Z K)`` over the grid (length ``N``): ``diag(Q (λσ²/(λ+σ²)) Qᵀ)`` plus
        ``Σ_c (K B L⁻ᵀ)_c²``, the ``m`` columns ``K B L⁻ᵀ e_c = Q(λp ∘ Qᵀ E_M L⁻ᵀ e_c)`` in chunks
        of :func:`variance_columns` columns (``4·m·N·Σn_k`` flops in all)."""
        full = self.eig.diag_of(self.lam * self.noise * self.p)
        linv_t = torch.linalg.solve_triangular(self.L, torch.eye(self.m, dtype=self.L.dtype, device=self.L.device),
                                               upper=False).mT  # L⁻ᵀ
        size = variance_columns(self.m, self.eig.size, chunk_elements)
        for start in range(0, self.m, size):
            cols = linv_t[:, start : start + size]
            grid = cols.new_zeros(self.eig.size, cols.shape[1])
            grid[self.missing] = cols
            h = self.eig.apply_function(self.lam * self.p, grid)
            full = full + (h * h).sum(-1)
        return full
