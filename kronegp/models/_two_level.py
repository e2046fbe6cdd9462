"""A two-level preconditioner for the missing cells' system ``G = X_MM`` of holes and clouds.

Notation of :mod:`kronegp.models._masked`: ``X ≈ C⁻¹`` applied as ``Q diag(p) Qᵀ`` (``p = 1/(λ + σ²)``,
exact for homoskedastic noise; ``P⁻¹`` of the Kronecker preconditioner with per-cell noise),
``M`` the ``m`` missing cells, ``J = diag(X)_M`` (the Jacobi scaling the cg path always had).

**Why a hole is slow.** ``G⁻¹`` is the conditional covariance of the missing values given the
observed ones. Scattered cells are pinned by their observed neighbours: ``J⁻¹G`` has eigenvalues
within a small factor of 1 and CG takes ~5 iterations. In a hole, a mode that is smooth over
the hole (prior variance ``s²Πμ ≫ σ²``) is not pinned: ``vᵀGv / vᵀJv`` falls towards
``σ²/(s²Πμ)``, and CG needs ~``√(s²/σ²)``-many more iterations (measured, 40³ grid, hole of
19³ cells: 95 against 5 for the same number of scattered cells).

**Pieces.** The missing cells are cut into their connected components (cells sharing a face,
:func:`pieces_of`): a hole is one piece, three holes three, merged cloud blobs one piece with a
large, partly observed box; components of fewer than :data:`MIN_MISSING` cells (scattered
cells) get none. Each piece ``i`` gets its own coarse space ``W_i`` on its own cells, so the
pieces' corrections act on disjoint cells and ``M`` below is block diagonal over them: every
formula of this docstring holds per piece, and the log determinants and probes add up.

**Coarse space.** Those modes are, to a good approximation, the leading eigenvectors of the
kernel restricted to the piece's bounding box, which is a Kronecker product: with
``K_k[I_k, I_k] = V_k diag(μ_k) V_kᵀ`` (``I_k`` the box's indices on axis ``k``), the columns of
``W = E_M (⊗V_k) S`` are the tensor modes ``(j_1, …, j_d)`` with ``s² Π_k μ_k[j_k] ≥`` :data:`MODE_SCORE`
``· σ²`` (``S`` selects them, at most :data:`MAX_MODES`, :data:`MAX_TOTAL_MODES` over all pieces;
``E_M`` restricts the box to the piece's cells). The preconditioner is additive two-level
(Jacobi plus a Galerkin coarse solve per piece)::

    M = J⁻¹ + Σ_i W_i E_i⁻¹ W_iᵀ,     E = Wᵀ G W = Sᵀ (⊗R_k) diag(p) (⊗R_k)ᵀ S,   R_k = V_kᵀ Q_k[I_k, :]

``E`` costs one Kronecker matmul of ``n_1`` grid slabs with factors of ``r_k² × n_k`` (the
Khatri–Rao squares of ``R_k``, :func:`kronegp.models._few_missing.khatri_gram`, axis 1 summed
directly: :func:`selected_gram`) when the piece fills its box. Otherwise (a ragged hole, a cloud)
``W`` is not a Kronecker product, and ``E`` comes from ``X = I/σ² − Q diag(ω) Qᵀ`` (``ω = 1/σ² − p``)
with the eigen-coordinates of prior variance below ``ϑ`` dropped (:func:`truncated_galerkin`):
``E ⪯ Ẽ ⪯ (1 +`` :data:`GALERKIN_TOL` ``) E``, any SPD ``Ẽ`` being correct (``ϑ`` certified a
posteriori where it can, else a priori). It costs the ``|S|`` box rows of ``W``, their Kronecker
matmul with the kept coordinates' ``Q_k[I_k, J_k]`` and ``|S|²`` flops per kept eigen-coordinate (on
clouds about a sixth of the grid's: the Matérn spectrum decays slowly), so such a piece takes at most
:data:`MAX_TRUNCATED_MODES` modes, its box rows formed :data:`MAX_BOX_ELEMENTS` elements at a time. (Forming
``X W`` through the grid, as the first version did, costs ``|S|`` grid products: as much as
``|S|/(s+1)`` CG iterations of ``s + 1`` columns.)
Applying ``M`` to a block costs two Kronecker products over the pieces' boxes with ``b_k × r_k``
factors and a ``|S_i| × |S_i|`` triangular solve pair, batched over pieces of similar boxes
(:class:`PieceSet`: their boxes and modes zero-padded, ``L`` identity-padded), so the ops per CG
iteration do not grow with the number of pieces. ``M`` is symmetric positive definite whatever
the ``E_i`` are (exact or not), so CG stays correct; its quality only sets the iterations.

**Host work.** The pieces depend on the mask alone and are found once per mask
(:func:`cached_pieces`); a step's setup reads the device once for ``s²/σ²``, once per piece for its
box eigenvalues (the modes it keeps set the shapes) and once per piece for its Cholesky check (twice
for a piece that does not fill its box: :func:`truncated_galerkin`'s a posteriori check)
(``benchmarks/holeops.py``: a 64³ hole's setup 17 → 3 host reads, 201 → 129 ops; the apply 11 ops
and two products per batch).

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

**Measured, pieces** (same machine and method, 2026-12-07, Jacobi → two-level): three 1 % holes
(``holes3-1``) 16 → 9 / 22 → 9 / 40 → 8 iterations at 32³ / 48³ / 64³, step 1.9× / 2.0× / 1.75×
the scatter's (Jacobi 3–6×). Clouds (``clouds-20``: the blobs merge into one component spanning the
grid, plus a dozen blobs) 45 → 14 / 83 → 28 / 135 → 63 iterations, but the step is 4.2× / 7.9× /
9–14× the scatter's: even with Jacobi at 32³, 1.7× faster at 48³, 0.9–1.4× at 64³, where the
merged component's modes are capped by :data:`MAX_BOX_ELEMENTS` (128) and setup (16 s) plus
applies (11 s) of a 70 s step eat most of the saving. Issue 22's ≤ 3× target holds for holes,
not clouds.

**Measured, clouds** (cloudsplit branch, same machine and method, 2026-12-07; ``benchmarks/cloud_pieces.py``
and NOTES.md "Clouds split into sub-box pieces"): cutting the merged component into sub-box pieces
(tiles of its box, overlapping or not, or cuts at its necks) never took fewer iterations than the one
component (48³: 46–63 against 49 on ``G`` at tol 1e-8; 32³: 24–58 against 23): the coupling between
the parts matters, and the pieces' log determinants need them disjoint. More modes on the merged
component do: caps of 256 / 512 / 1024 take 49 / 30 / 19 iterations on ``G`` at 48³ (28 / 18 / 11 in
the training step), but the step, which rebuilds the coarse space, takes 4.8–5.7 / 6.4–6.7 / 15–16 s
(same process, alternating), so the
shipped cap stays at 256 (6.0× the scatter's at 48³; at 64³, where the box-row cap gave the merged
cloud 150 modes before, 64 → 50 iterations and 65–73 → 37–49 s a step: 13.7× the scatter's). With the coarse
space built once and kept across steps (emulated), the 1024 cap's step is 2.6× the scatter's at 48³
(11 iterations) and 1.8–4× at 64³ (17). :func:`truncated_galerkin`'s a posteriori threshold keeps
half the eigen-coordinates (setup 2.15 → 1.75 s at 48³).

Applies to a grid held whole (the rows layout of :mod:`kronegp.models._masked`), to each piece of
:func:`pieces_of`: scattered cells (no piece) keep plain Jacobi, which already pins them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.models._few_missing import MissingBox, khatri_gram, khatri_square, pair_maps
from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["CoarseBasis", "CoarsePiece", "TwoLevel", "two_level", "pieces_of", "selected_gram", "truncated_galerkin",
           "coarse_bytes", "ENABLED", "MODE_SCORE", "MAX_MODES", "MAX_TOTAL_MODES", "MAX_PIECES", "MAX_GRAM_ELEMENTS",
           "GALERKIN_TOL", "GALERKIN_TRIAL_C", "MAX_TRUNCATED_MODES", "MAX_BOX_ELEMENTS", "MIN_MISSING", "MIN_INTERIOR"]

#: Use the two-level preconditioner where it applies (tests and benchmarks switch it off to compare).
ENABLED = True
#: A box mode enters the coarse space when its prior variance ``s²Πμ`` is at least this times ``σ²``.
MODE_SCORE = 1.0
#: At most this many coarse modes (the largest scores first).
MAX_MODES = 1024
#: At most this many elements in the partial gram ``H`` (``n_1 · (Π_{k>1} r_k)²``, see :func:`selected_gram`).
MAX_GRAM_ELEMENTS = 1 << 24
#: At most this many coarse modes over all pieces together (the largest pieces first).
MAX_TOTAL_MODES = 4096
#: At most this many pieces get a coarse space (the largest first; the others keep Jacobi).
MAX_PIECES = 256
#: A piece that does not fill its box forms its Galerkin matrix from X's eigen-expansion truncated so
#: that ``E ⪯ Ẽ ⪯ (1 + GALERKIN_TOL) E`` (:func:`truncated_galerkin`).
GALERKIN_TOL = 0.1
#: :func:`truncated_galerkin` first tries the threshold that certifies its bound if the smallest eigenvalue of
#: ``E`` against ``WᵀW/σ²`` is at least this (measured 0.003–0.05 on clouds' pieces, 48³, 2026-12-07; the
#: a priori one assumes ``1/(1 + top)``, 3e-5–2e-4 there), checks it with one Cholesky, and else falls back.
GALERKIN_TRIAL_C = 2e-3
#: At most this many modes for a piece that does not fill its box (:func:`truncated_galerkin` costs
#: ``|S|²`` per kept eigen-coordinate: measured on clouds, 2026-12-07, see the module docstring).
MAX_TRUNCATED_MODES = 256
#: ... whose ``|S|`` box rows :func:`truncated_galerkin` holds at most this many elements of at a time (it
#: capped ``|S|`` at ``MAX_BOX_ELEMENTS / box`` before: 150 modes for the merged cloud of 64³, whose step took
#: 65–73 s and 64 iterations against 43–49 s and 50 with 256 modes, same process, 2026-12-07).
MAX_BOX_ELEMENTS = 1 << 25
#: Fewer missing cells than this keep plain Jacobi (the coarse space would cost more than it saves).
MIN_MISSING = 64
#: A piece needs at least this many interior cells (all face neighbours missing): clusters of
#: scattered cells (20 % of a 48³ grid has some of over 64 cells) keep Jacobi, which pins them.
MIN_INTERIOR = 8


def _tensor_modes(mus: list[Tensor], scale: float, limit: int, first: int) -> Optional[tuple[Tensor, list[int]]]:
    """Flat indices (row-major over ``Π r_k``, the leading ``r_k`` modes per axis) of the tensor modes
    with ``scale·Πμ ≥ MODE_SCORE``, best first, at most :data:`MAX_MODES` and ``limit``, fewer where
    their gram over ``first`` cells of axis 1 would pass :data:`MAX_GRAM_ELEMENTS`, and per axis how
    many leading modes they use; ``None`` if none. ``mus`` on the host (the choice sets shapes: one
    read of the device per piece, :func:`two_level`); the indices are returned on the host too."""
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


def selected_gram(mats: list[Tensor], w: Tensor, sel: Tensor, sizes: list[int], chunk: Optional[int] = None) -> Tensor:
    """``(⊗A_k)[sel] diag(w) (⊗A_k)[sel]ᵀ`` (``(|sel|, |sel|)``) for ``A_k`` of shape ``(r_k, n_k)``
    (``sizes = [r_k]``), grid weights ``w`` (length ``Πn_k``) and ``sel`` flat row-major over ``Πr_k``.

    Axes 2…d by one Kronecker matmul of the ``n_1`` slabs of ``w`` with their Khatri–Rao squares
    (:func:`kronegp.models._few_missing.khatri_gram`): ``H[j] = (⊗_{k>1}A_k) diag(w[j]) (⊗_{k>1}A_k)ᵀ``
    (``n_1 · R'²`` elements, ``R' = Π_{k>1}r_k``); axis 1 by one GEMM over the pairs ``c ≤ c'`` of its
    modes, ``F[(c, c'), (a', b')] = Σ_j A_1[c, j] A_1[c', j] H[j][a', b']`` (``r_1(r_1+1)/2 · R'²``
    elements, in blocks of pairs of at most :data:`MAX_GRAM_ELEMENTS`, or ``chunk`` pairs), and
    ``E[a, b] = F[(a_1, b_1), (a', b')]`` gathered: the gram of the few selected tensor modes without
    the ``(Πr_k)²`` one of them all, and without reading ``H`` once per pair of selected modes
    (``n_1·|sel|²``, the first version's chunked loop)."""
    n1 = mats[0].shape[1]
    rest = math.prod(sizes[1:])
    a1 = torch.div(sel, rest, rounding_mode="floor")
    ar = sel % rest
    if len(mats) == 1:
        H = w.reshape(n1, 1)
    else:
        H = khatri_gram([khatri_square(a) for a in mats[1:]], sizes[1:], w.reshape(n1, -1).mT.contiguous())  # (n1, R', R')
        H = H.reshape(n1, rest * rest)
    pairs = khatri_square(mats[0])  # (P_1, n1): A_1[c, j] A_1[c', j], c ≤ c'
    index = pair_maps(mats[0].shape[0], sel.device)[2]
    pair = index[a1.unsqueeze(-1), a1.unsqueeze(0)]  # (k, k): the pair (a_1, b_1)
    col = ar.unsqueeze(-1) * rest + ar.unsqueeze(0)  # (k, k): (a', b') flat
    step = max(1, chunk if chunk is not None else MAX_GRAM_ELEMENTS // max(1, rest * rest))
    if step >= pairs.shape[0]:
        return (pairs @ H).reshape(-1)[pair * (rest * rest) + col]
    E = w.new_zeros(sel.numel(), sel.numel())
    for p0 in range(0, pairs.shape[0], step):
        F = pairs[p0 : p0 + step] @ H  # (c, R'²)
        inside = (pair >= p0) & (pair < p0 + F.shape[0])
        E = torch.where(inside, F.reshape(-1)[((pair - p0).clamp(0, F.shape[0] - 1)) * (rest * rest) + col], E)
    return E


def pieces_of(missing: Tensor, sizes) -> list[MissingBox]:
    """The pieces of the missing cells (bool grid, flat) that get a coarse space each: the connected
    components (cells sharing a face) of at least :data:`MIN_MISSING` cells, :data:`MIN_INTERIOR` of
    them interior (all face neighbours missing: a cluster of scattered cells has hardly any, and
    its modes are pinned already), at most
    :data:`MAX_PIECES` (the largest first), each a :class:`~kronegp.models._few_missing.MissingBox`
    of its own cells (so their cells are disjoint). Scattered cells form no piece. One read of the
    mask on the host (``scipy.ndimage.label``)."""
    import scipy.ndimage

    mask = missing.reshape(list(sizes)).cpu().numpy()
    labels, count = scipy.ndimage.label(mask)
    if count == 0:
        return []
    # interior cells: every face neighbour missing too (beyond the grid's edge counts as missing)
    inner = torch.from_numpy(scipy.ndimage.binary_erosion(mask, border_value=1)).reshape(-1)
    labels = torch.from_numpy(labels).reshape(-1)
    cells = torch.bincount(labels, minlength=count + 1)[1:]
    interior = torch.bincount(labels[inner], minlength=count + 1)[1:]
    big = torch.nonzero((cells >= MIN_MISSING) & (interior >= MIN_INTERIOR)).reshape(-1)
    big = big[torch.argsort(cells[big], descending=True, stable=True)][:MAX_PIECES] + 1
    return [MissingBox((labels == int(k)).to(missing.device), sizes) for k in big]


class CoarseBasis:
    """``W = E_M (⊗V_k) S``: the coarse modes over one piece's box, restricted to its missing cells."""

    def __init__(self, hole: MissingBox, vecs: list[Tensor], sel: Tensor, full: list[int]):
        self.hole = hole
        self.vecs = vecs  # V_k (b_k, r_k)
        self.vecs_t = [v.mT.contiguous() for v in vecs]
        self.sel, self.full = sel, full
        self.modes = sel.numel()

    def box_rows(self, coef: Tensor) -> Tensor:
        """``(⊗V_k) S c`` over the whole box for coefficients ``(t, |S|)``: ``(t, box)``."""
        full = coef.new_zeros(coef.shape[0], math.prod(self.full))
        full[:, self.sel] = coef
        return matmul_kron(full, self.vecs_t)

    def add_w(self, coef: Tensor, out: Tensor) -> Tensor:
        """``out += W c`` for coefficients ``(t, |S|)`` and rows ``out`` ``(t, N)`` (in place: only
        this piece's cells are touched, so the pieces of one preconditioner add into one block)."""
        h = self.hole
        box = self.box_rows(coef)
        out[:, h.idx] += box if h.fills else box[:, h.pos]
        return out

    def w(self, coef: Tensor, n: int) -> Tensor:
        """``W c`` for coefficients ``(t, |S|)``: rows ``(t, N)`` (``N = n``) zero off the piece's cells."""
        return self.add_w(coef, coef.new_zeros(coef.shape[0], n))


class CoarsePiece:
    """One piece's coarse solve: its basis ``W_i``, ``E_i = L Lᵀ`` and ``L⁻¹ (W_iᵀ J W_i) L⁻ᵀ = U diag(s) Uᵀ``."""

    def __init__(self, basis: CoarseBasis, E: Tensor, EJ: Tensor):
        self.basis, self.hole, self.modes = basis, basis.hole, basis.modes
        self.L = torch.linalg.cholesky(0.5 * (E + E.mT))
        linv_ej = torch.linalg.solve_triangular(self.L, EJ, upper=False)
        T = torch.linalg.solve_triangular(self.L, linv_ej.mT, upper=False)  # L⁻¹ EJ L⁻ᵀ
        s, self.U = torch.linalg.eigh(0.5 * (T + T.mT))
        self.s = s.clamp_min(0)
        # f(s) = ((1+s)^{-½} − 1)/s = −1 / (√(1+s) (1 + √(1+s))): no cancellation at s → 0
        root = torch.sqrt(1 + self.s)
        self.f = -1.0 / (root * (1 + root))


class PieceBatch:
    """Pieces of similar boxes applied together (hyperparameter-free index maps, kept per model with
    :class:`PieceSet`): their boxes padded to the largest extent per axis, ``B`` of them side by side
    as ``(B, Πb, t)``; ``cells`` the pieces' missing cells on the grid and ``slots`` their positions in
    that padded block (row-major per box, each box after the one before)."""

    def __init__(self, members: list[int], boxes: list[MissingBox]):
        self.members = members
        d = len(boxes[members[0]].box_sizes)
        self.extent = [max(boxes[i].box_sizes[k] for i in members) for k in range(d)]
        self.size = math.prod(self.extent)
        cells, slots = [], []
        for at, i in enumerate(members):
            h = boxes[i]
            pos = torch.zeros_like(h.idx)
            for c, ax, e in zip(h.coords, h.axes, self.extent):  # the piece's cells over the padded box
                pos = pos * e + torch.searchsorted(ax, c)
            cells.append(h.idx)
            slots.append(pos + at * self.size)
        self.cells, self.slots = torch.cat(cells), torch.cat(slots)


class PieceSet:
    """The pieces of one mask (:func:`pieces_of`) and their batches: what does not depend on the
    hyperparameters, found once per mask (:func:`cached_pieces`). A batch takes pieces (the largest
    boxes first) while its padded block stays within twice their boxes' cells, so equal pieces (three
    equal holes) make one batch and a dozen cloud blobs a few, whatever their number."""

    def __init__(self, pieces: list[MissingBox]):
        self.pieces = pieces
        order = sorted(range(len(pieces)), key=lambda i: -pieces[i].box)
        self.batches: list[PieceBatch] = []
        group: list[int] = []
        for i in order:
            trial = group + [i]
            extent = [max(pieces[j].box_sizes[k] for j in trial) for k in range(len(pieces[i].box_sizes))]
            if group and len(trial) * math.prod(extent) > 2 * sum(pieces[j].box for j in trial):
                self.batches.append(PieceBatch(group, pieces))
                trial = [i]
            group = trial
        if group:
            self.batches.append(PieceBatch(group, pieces))


#: :func:`cached_pieces`' entries, oldest first: ``id(mask) → (weak reference, version, key, piece set)``
#: (an entry leaves with its mask: a dead model's pieces are not kept)
_PIECE_CACHE: dict = {}
#: How many masks :func:`cached_pieces` keeps (one per live model is the common case).
PIECE_CACHE_SIZE = 8


def cached_pieces(observed: Tensor, sizes) -> PieceSet:
    """The :class:`PieceSet` of ``~observed`` (bool grid, flat; a model's mask), found once per mask:
    kept while ``observed`` is the same tensor at the same version (an in-place change bumps it, and
    ``GridGP.to`` makes a new one) with the same grid and the same piece rules (:data:`MIN_MISSING`,
    :data:`MIN_INTERIOR`, :data:`MAX_PIECES`). :func:`pieces_of` reads the whole mask on the host
    (``scipy.ndimage``: 47 ms a step at 128³ on the CPU machine, plus the device reads of the pieces'
    boxes), and the mask is fixed while a model trains."""
    import weakref

    key = (tuple(sizes), observed.device, observed._version, MIN_MISSING, MIN_INTERIOR, MAX_PIECES)
    entry = _PIECE_CACHE.get(id(observed))
    if entry is not None and entry[0]() is observed and entry[1] == key:
        return entry[2]
    found = PieceSet(pieces_of(observed.logical_not(), sizes))
    if entry is None or entry[0]() is not observed:
        weakref.finalize(observed, _PIECE_CACHE.pop, id(observed), None)
    _PIECE_CACHE.pop(id(observed), None)
    while len(_PIECE_CACHE) >= PIECE_CACHE_SIZE:
        _PIECE_CACHE.pop(next(iter(_PIECE_CACHE)))
    _PIECE_CACHE[id(observed)] = (weakref.ref(observed), key, found)
    return found


class _Padded:
    """One :class:`PieceBatch` at this step's modes: the pieces' ``V_k`` (zero-padded to ``(B, b_k, r_k)``),
    their selections flat over the padded ``Πr_k`` (``(B, S)``, ``S`` the most modes of a piece; a
    missing mode points at 0 and is masked), and ``L``, ``U``, ``f`` padded with the identity (and
    ``f = 0``), so the padding stays zero through every solve."""

    def __init__(self, batch: PieceBatch, built: dict, like: Tensor):
        members = [built.get(i) for i in batch.members]
        d = len(batch.extent)
        dt, dev = like.dtype, like.device
        ranks = [max([pc.basis.full[k] for pc in members if pc is not None] + [1]) for k in range(d)]
        S = max([pc.modes for pc in members if pc is not None] + [1])
        B = len(members)
        self.batch, self.full = batch, math.prod(ranks)
        self.vecs = [like.new_zeros(B, e, r) for e, r in zip(batch.extent, ranks)]
        self.sel = torch.zeros(B, S, dtype=torch.long, device=dev)
        self.mask = like.new_zeros(B, S, 1)
        eye = torch.eye(S, dtype=dt, device=dev).expand(B, S, S)
        self.L, self.U = eye.clone(), eye.clone()
        self.f = like.new_zeros(B, S, 1)
        self.s = like.new_zeros(B, S)
        for at, pc in enumerate(members):
            if pc is None:  # no coarse space this step: its cells keep Jacobi (coefficients masked to 0)
                continue
            basis, k = pc.basis, pc.modes
            for v, V in zip(basis.vecs, self.vecs):
                V[at, : v.shape[0], : v.shape[1]] = v
            flat, rest = torch.zeros_like(basis.sel), basis.sel  # the selection over the padded ranks
            digits = []
            for r in reversed(basis.full):
                digits.append(rest % r)
                rest = torch.div(rest, r, rounding_mode="floor")
            for digit, r in zip(reversed(digits), ranks):
                flat = flat * r + digit
            self.sel[at, :k] = flat
            self.mask[at, :k] = 1.0
            self.L[at, :k, :k], self.U[at, :k, :k] = pc.L, pc.U
            self.f[at, :k, 0], self.s[at, :k] = pc.f, pc.s
        self.vecs_t = [v.mT.contiguous() for v in self.vecs]

    def wt(self, rows: Tensor) -> Tensor:
        """``W_iᵀ v`` of every piece for rows ``(t, N)``: ``(B, S, t)`` (zero past each piece's modes)."""
        t, b = rows.shape[0], self.batch
        box = rows.new_zeros(len(b.members) * b.size, t)
        box[b.slots] = rows[:, b.cells].mT
        y = kron_matmul(self.vecs_t, box.view(len(b.members), b.size, t))  # (B, Πr, t): (⊗V_kᵀ) box
        return torch.gather(y, 1, self.sel.unsqueeze(-1).expand(-1, -1, t)) * self.mask

    def add_w(self, coef: Tensor, out: Tensor) -> Tensor:
        """``out += Σ_i W_i c_i`` for coefficients ``(B, S, t)`` (zero past each piece's modes) and rows
        ``out`` ``(t, N)``, in place (the pieces' cells are disjoint)."""
        t, b = coef.shape[-1], self.batch
        full = coef.new_zeros(coef.shape[0], self.full, t).scatter_add_(1, self.sel.unsqueeze(-1).expand(-1, -1, t), coef)
        box = kron_matmul(self.vecs, full).reshape(-1, t)  # (B·Πb, t): (⊗V_k) S c over each box
        return out.index_add_(1, b.cells, box[b.slots].mT)


class TwoLevel:
    """``M = J⁻¹ + Σ_i W_i E_i⁻¹ W_iᵀ`` on blocks of rows ``(t, N)`` that vanish off the missing cells
    (module docstring), from the pieces' coarse solves and ``J`` on the grid. The pieces' cells are
    disjoint, so ``M`` is block diagonal over them. Build with :func:`two_level`.

    The pieces are applied a batch at a time (:class:`PieceSet`: one batch for equal holes): per batch
    a gather, a Kronecker product of ``(B, b_k, r_k)`` factors, a batched Cholesky solve, a product back
    and a scatter, whatever the number of pieces in it (a dozen ops and two products; the first
    version's loop over pieces took as many per piece)."""

    def __init__(self, pieces: list[CoarsePiece], g_diag: Tensor, piece_set: Optional[PieceSet] = None):
        self.pieces = pieces
        self.modes = sum(pc.modes for pc in pieces)
        self.g_diag = g_diag
        self.j_inv = 1.0 / g_diag
        if piece_set is None:
            piece_set = PieceSet([pc.hole for pc in pieces])
            built = dict(enumerate(pieces))
        else:
            built = {piece_set.pieces.index(pc.hole): pc for pc in pieces}
        self.batches = [_Padded(b, built, g_diag) for b in piece_set.batches
                        if any(i in built for i in b.members)]

    def apply(self, rows: Tensor) -> Tensor:
        """``M v`` for rows ``(t, N)`` zero off the missing cells (the result is too)."""
        out = rows * self.j_inv
        for pb in self.batches:
            pb.add_w(torch.cholesky_solve(pb.wt(rows), pb.L), out)
        return out

    def sample(self, xi: Tensor) -> Tensor:
        """Probes ``z = P^{½}ξ`` with ``Cov z = M⁻¹`` for rows ``ξ`` (``(S, N)``, zero off the missing cells)."""
        a = self.g_diag.sqrt() * xi
        corr = torch.zeros_like(a)
        for pb in self.batches:
            c = torch.linalg.solve_triangular(pb.L, pb.wt(a), upper=False)  # L⁻¹ Wᵀ J^{½} ξ  (B, |S|, S)
            c = pb.U @ (pb.f * (pb.U.mT @ c))
            pb.add_w(torch.linalg.solve_triangular(pb.L.mT, c, upper=True), corr)  # W L⁻ᵀ …
        return a.add_(corr.mul_(self.g_diag))

    def logdet_p(self, missing: Tensor) -> Tensor:
        """``log det P = −log det M`` over the missing cells (``missing``: 0/1 grid vector)."""
        return (missing * torch.log(self.g_diag)).sum() - sum(torch.log1p(pb.s).sum() for pb in self.batches)


def _box_eigs(factors: list[Tensor], piece: MissingBox) -> tuple[list[Tensor], list[Tensor]]:
    """``(μ_k, V_k)`` of each ``K_k[I_k, I_k]`` over the piece's box, largest first."""
    mus, vecs = [], []
    for f, ax in zip(factors, piece.axes):
        mu, v = torch.linalg.eigh(f.detach()[ax][:, ax])
        mus.append(mu.flip(0).clamp_min(0))
        vecs.append(v.flip(-1))
    return mus, vecs


def truncated_galerkin(basis: CoarseBasis, eig: KronEigen, outputscale: Tensor, level: Tensor, p: Tensor,
                       top: float) -> Tensor:
    """``Ẽ = Wᵀ X̃ W`` for a piece that does not fill its box, with ``X = I/σ² − Q diag(ω) Qᵀ``
    (``ω = 1/σ² − p``) truncated to the eigen-coordinates whose prior variance ``λ`` is at least a
    threshold ``ϑ``, chosen so that ``E ⪯ Ẽ ⪯ (1 + GALERKIN_TOL) E``.

    The dropped part is ``D = Σ ω_j Wᵀq_j q_jᵀW ⪯ (ϑ/σ²) WᵀW/σ²`` (``ω_j ≤ λ_j/σ⁴``) and ``E = Ẽ − D ⪯ Ẽ``.
    A priori, ``E ⪰ WᵀW / (σ²(1 + top))`` (Cauchy–Schwarz: ``vᵀXv ≥ |v|⁴ / vᵀCv`` and
    ``vᵀCv ≤ (s²Πμ_1 + σ²)|v|²`` on the box; ``top``: the box's largest score ``s²Πμ/σ²``), so
    ``ϑ₀ = GALERKIN_TOL · σ² / (1 + top)`` certifies the bound. That assumes a mode smooth over the
    whole box, which a ragged piece does not hold (measured on clouds, 48³: the smallest eigenvalue
    ``c`` of ``Ẽ`` against ``WᵀW/σ²`` is 0.003–0.05 where ``1/(1 + top)`` is 3e-5–2e-4). So first
    ``ϑ₁ = t σ² ·`` :data:`GALERKIN_TRIAL_C` (``t = GALERKIN_TOL / (1 + GALERKIN_TOL)``), with fewer
    coordinates, and a posteriori: if ``Ẽ₁ ⪰ (ϑ₁/(σ² t)) WᵀW/σ²`` (one Cholesky), then
    ``E ⪰ Ẽ₁ − (ϑ₁/σ²) WᵀW/σ² ⪰ (1 − t) Ẽ₁``, i.e. ``Ẽ₁ ⪯ (1 + GALERKIN_TOL) E``: done. Else the
    coordinates between ``ϑ₀`` and ``ϑ₁`` are subtracted too (the a priori bound holds).

    The kept coordinates are a Kronecker sub-box (per axis, the ``j`` that can reach ``ϑ``) and the ones
    in it reaching ``ϑ``: per pass one matmul of the ``|S|`` box rows with factors ``Q_k[I_k, J_k]`` and a
    gram over them (``|S|²`` flops per kept coordinate: on clouds about a third of the grid's at ``ϑ₀``,
    half of that at ``ϑ₁``). The box rows are formed once where ``|S|·box ≤`` :data:`MAX_BOX_ELEMENTS`,
    else that many elements at a time, again for each block of coordinates."""
    h = basis.hole
    level_f = float(level)
    t = GALERKIN_TOL / (1.0 + GALERKIN_TOL)
    floor = GALERKIN_TOL * level_f / (1.0 + top)  # ϑ₀, certified a priori
    trial = t * level_f * GALERKIN_TRIAL_C  # ϑ₁, certified a posteriori
    inside = p.new_zeros(h.box)
    inside[h.pos] = 1.0
    ww = selected_gram([v.mT for v in basis.vecs], inside, basis.sel, basis.full) / level  # WᵀW / σ²
    E = ww.clone()
    eye = torch.eye(basis.modes, dtype=p.dtype, device=p.device)
    if basis.modes * h.box <= MAX_BOX_ELEMENTS:  # W over the box, formed once
        whole = basis.box_rows(eye).mul_(inside)
        wbox = lambda: (whole,)  # noqa: E731
    else:  # at most MAX_BOX_ELEMENTS of it at a time, formed again per block of eigen-coordinates
        rows = max(1, MAX_BOX_ELEMENTS // h.box)
        wbox = lambda: (basis.box_rows(eye[a : a + rows]).mul_(inside) for a in range(0, basis.modes, rows))  # noqa: E731
    if trial > floor:
        _subtract_band(E, wbox, basis, eig, outputscale, level, p, trial, math.inf)
        try:  # Ẽ₁ − (ϑ₁/(σ² t)) WᵀW/σ² ≻ 0 certifies Ẽ₁ ⪯ (1 + GALERKIN_TOL) E
            torch.linalg.cholesky(E - (trial / (level_f * t)) * ww)
            return E
        except torch.linalg.LinAlgError:
            pass
        _subtract_band(E, wbox, basis, eig, outputscale, level, p, floor, trial)
    else:
        _subtract_band(E, wbox, basis, eig, outputscale, level, p, floor, math.inf)
    return E


def _subtract_band(E: Tensor, wbox, basis: CoarseBasis, eig: KronEigen, outputscale: Tensor, level: Tensor,
                   p: Tensor, lo: float, hi: float) -> None:
    """``E −= Σ_j ω_j (Wᵀq_j)(Wᵀq_j)ᵀ`` over the eigen-coordinates ``j`` with prior variance ``lo ≤ λ_j < hi``
    (in place; ``wbox()``: ``W``'s ``|S|`` box rows, in blocks of modes)."""
    h = basis.hole
    s2 = float(outputscale)
    tops = [float(v.max()) for v in eig.vals]
    keep = [torch.nonzero(s2 * v * math.prod(tops[:k] + tops[k + 1:]) >= lo).reshape(-1) for k, v in enumerate(eig.vals)]
    if any(k.numel() == 0 for k in keep):
        return
    rest = math.prod(k.numel() for k in keep[1:])
    step = max(1, MAX_GRAM_ELEMENTS // (basis.modes * rest))  # axis-1 coordinates per block of Y
    lam_rest = s2 * kron_vector([v[k] for v, k in zip(eig.vals[1:], keep[1:])]) if len(keep) > 1 else None
    flat_rest = torch.zeros(1, dtype=torch.long, device=p.device)  # grid (eigen-coordinate) index over axes 2…d
    for k, n in zip(keep[1:], eig.sizes[1:]):
        flat_rest = (flat_rest.unsqueeze(-1) * n + k).reshape(-1)
    mats = [q[ax][:, k] for q, ax, k in zip(eig.vecs[1:], h.axes[1:], keep[1:])]
    q1 = eig.vecs[0][h.axes[0]]
    for a in range(0, keep[0].numel(), step):
        k1 = keep[0][a : a + step]
        lam = (eig.vals[0][k1].unsqueeze(-1) * (lam_rest if lam_rest is not None else s2)).reshape(-1)
        flat = (k1.unsqueeze(-1) * (eig.size // eig.sizes[0]) + flat_rest).reshape(-1)
        chosen = torch.nonzero((lam >= lo) & (lam < hi)).reshape(-1)
        if chosen.numel() == 0:
            continue
        Y = torch.cat([matmul_kron(w, [q1[:, k1]] + mats)[:, chosen] for w in wbox()])  # (|S|, kept): Wᵀ q_j
        omega = (1.0 / level - p[flat[chosen]]).clamp_min(0)
        E -= (Y * omega) @ Y.mT


def two_level(eig: KronEigen, factors: list[Tensor], outputscale: Tensor, level: Tensor, p: Tensor,
              g_diag: Tensor, missing: Optional[Tensor] = None, *, observed: Optional[Tensor] = None) -> Optional[TwoLevel]:
    """The two-level preconditioner for the missing cells (bool grid, flat) of a whole grid, or ``None``
    where it does not apply (:data:`ENABLED` off, no piece of :func:`pieces_of`, no mode scoring
    :data:`MODE_SCORE`): then Jacobi alone, as before. A piece whose Galerkin matrix is not positive
    definite in this dtype keeps Jacobi on its cells.

    Args:
        eig: ``⊗K_k = Q diag(λ̂) Qᵀ``. factors: the ``K_k``. outputscale: ``s²``.
        level: ``σ²`` (or ``σ̄²``, per-cell noise). p: ``1/(λ + σ²)`` on the grid (``X``'s eigenvalues).
        g_diag: ``J`` on the grid (``diag(X)`` at missing cells, 1 elsewhere).
        missing: the missing cells (bool grid, flat), cut into pieces by :func:`pieces_of`; or
            ``observed``: a model's mask, whose pieces :func:`cached_pieces` finds once.

    Host reads: ``s²/σ²`` once, and per piece its box's eigenvalues (one transfer: the modes it keeps
    set the shapes) and the Cholesky factor's check.
    """
    if not ENABLED:
        return None
    pieces = cached_pieces(observed, eig.sizes) if observed is not None else PieceSet(pieces_of(missing, eig.sizes))
    built, budget = [], MAX_TOTAL_MODES
    scale = float(outputscale / level)
    for hole in pieces.pieces:
        if budget <= 0:
            break
        mus, vecs = _box_eigs(factors, hole)
        mus = torch.cat(mus).cpu().split([v.shape[-1] for v in vecs])  # one read: the choice below is the host's
        limit = min(MAX_MODES, budget) if hole.fills else min(MAX_TRUNCATED_MODES, budget)
        chosen = _tensor_modes(mus, scale, limit, eig.sizes[0] if hole.fills else hole.box_sizes[0]) if limit > 0 else None
        if chosen is None:
            continue
        sel, full = chosen
        sel = sel.to(g_diag.device)
        basis = CoarseBasis(hole, [v[:, :r].contiguous() for v, r in zip(vecs, full)], sel, full)
        # Wᵀ J W over the box (J at the missing cells, 0 at the box's observed cells)
        jbox = g_diag.new_zeros(hole.box)
        jbox[hole.pos] = g_diag[hole.idx]
        EJ = selected_gram([v.mT for v in basis.vecs], jbox, sel, full)
        if hole.fills:
            R = [v.mT @ q[ax] for v, q, ax in zip(basis.vecs, eig.vecs, hole.axes)]  # R_k = V_kᵀ Q_k[I_k, :]
            E = selected_gram(R, p, sel, full)
        else:
            E = truncated_galerkin(basis, eig, outputscale, level, p, scale * math.prod(float(mu[0]) for mu in mus))
        try:
            built.append(CoarsePiece(basis, E, EJ))
        except torch.linalg.LinAlgError:
            continue
        budget -= basis.modes
    return TwoLevel(built, g_diag, pieces) if built else None


def coarse_bytes(missing: Optional[Tensor], sizes, itemsize: int) -> int:
    """Bytes the two-level preconditioner may hold for ``missing`` (bool grid, flat) at its peak, 0 where
    it does not apply (for :mod:`kronegp.models.memory`): per piece of :func:`pieces_of`, six
    ``|S_i| × |S_i|`` matrices kept and eight more while it is built, plus the partial gram ``H`` of
    :func:`selected_gram`, its block of axis-1 pairs and its three ``|S_i|²`` index maps (a box it
    fills) or the ``|S_i|`` box rows (:data:`MAX_BOX_ELEMENTS` at a time), eigen-coordinates and three
    more ``|S_i|²`` (``WᵀW/σ²``, the a posteriori check and its factor) of :func:`truncated_galerkin`
    (one that it does not); per batch of :class:`PieceSet`, ``L`` and ``U`` padded to its largest
    ``|S_i|`` and the boxes' padded block; ``|S_i|`` at most the box and the budgets."""
    if not ENABLED or missing is None:
        return 0
    kept, peak, budget = 0, 0, MAX_TOTAL_MODES
    pieces = PieceSet(pieces_of(missing, sizes))
    count: dict[int, int] = {}
    index = 3 * 8 // itemsize  # selected_gram's three long (k, k) index maps, in elements
    for i, piece in enumerate(pieces.pieces):
        if budget <= 0:
            break
        if piece.fills:
            modes = min(piece.box, MAX_MODES, budget)
            work = 2 * min(sizes[0] * piece.box**2, MAX_GRAM_ELEMENTS) + index * modes * modes
        else:  # the box rows (MAX_BOX_ELEMENTS at a time), their gram's partial H, truncated_galerkin's blocks
            # of Y (an axis-1 slab at least), and its WᵀW/σ² with the a posteriori check's matrix and factor
            modes = min(piece.box, MAX_TRUNCATED_MODES, budget)
            rows = min(modes, max(1, MAX_BOX_ELEMENTS // piece.box))
            work = rows * piece.box + 2 * min(piece.box_sizes[0] * piece.box**2, MAX_GRAM_ELEMENTS) \
                + (index + 3) * modes * modes + max(MAX_GRAM_ELEMENTS, modes * math.prod(sizes[1:]))
        count[i] = modes
        budget -= modes
        kept += 6 * modes * modes
        peak = max(peak, work + 8 * modes * modes)
    for batch in pieces.batches:
        most = max([count.get(i, 0) for i in batch.members])
        kept += 2 * len(batch.members) * most * most + len(batch.members) * batch.size
    return (kept + peak) * itemsize
