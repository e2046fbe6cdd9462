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

(``F_k`` is ``b_k² × n_k``: the row-wise Khatri–Rao square of ``A_k``), one Kronecker matmul of
one column costing ``~2N·b_d² + …``, where the rows ``U`` would cost ``m·N`` to hold. So
``G = [A diag(p) Aᵀ]_pos``, and the gradient of ``log det G`` needs, per axis ``i``, only the
``b_i × b_i`` blocks ``S_j`` of ``(I ⊗ ⊗_{k≠i} F_kᵀ) vec(G⁻¹)`` (``G⁻¹`` zero-filled in the box)
for every ``j`` over the other axes, and ``M_i = Σ_j L_i[j] (p_j p_jᵀ) ∘ (A_iᵀ S_j A_i)``: about
``N·Σ_i b_i(b_i + n_i)`` flops, against ``2m·N·Σ n_i`` for ``m`` rows. On the 20 × 25 × 49
air-temperature grid with a 6 × 8 × 12 hole that is ~0.03 GFLOP against 2.6.

**Scattered cells** (a box too large to hold ``b²`` entries) use the rows: ``G = U Yᵀ``
(``2m²N`` flops, or through the box when that is cheaper), ``G⁻¹Y`` likewise, and the
gradient of :func:`kronegp.models._exact.eigen_bilinear_form` of the ``m`` rows.

**Likelihood** ``log p = −½ rᵀα − ½ log det C − ½ log det G − (n/2) log 2π`` with
``Qᵀα = p ∘ (Qᵀr − Uᵀ G⁻¹ [Xr]_M)``, ``[Xr]_M = U (p ∘ Qᵀr)``.

**Gradient** (exact, no probes): with ``∂G = −[X ∂C X]_MM``::

    ∂ log p = ½ αᵀ ∂C α − ½ ∂ log det C + ½ tr(G⁻¹ Bᵀ ∂C B)

and ``tr(G⁻¹ Bᵀ ∂C B) = Σ_c (G⁻¹Y)_c (Qᵀ∂CQ) Y_cᵀ``: ``m + 1`` pairs of rows in
eigen-coordinates, the form :func:`kronegp.models._exact.eigen_bilinear_form` differentiates
(``Qᵀ∂CQ`` of ``s²⊗K_k + σ²I``), plus the exact ``−½ log det C`` term.

**Posterior** mean ``μ + Kα``; variance on the grid
``diag(K − KZK) = diag(Q (λσ²/(λ+σ²)) Qᵀ) + rowsum((T L⁻ᵀ)²)`` with ``T = Q(λ ∘ Yᵀ)`` and
``G = L Lᵀ``; at points and for samples, products with ``Z`` (:meth:`FewMissing.apply`).

Memory: a box of ``b²`` entries (at most :data:`MAX_BOX_CELLS` ² ), or the rows ``U``, ``Y`` and
``G⁻¹Y`` (``m × N`` each); :data:`MAX_MISSING_CPU` and :data:`MAX_MISSING_CUDA` bound ``m``
(GridGP takes this path up to them). Predictions form the rows ``U`` (``m × N``) either way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["FewMissing", "MissingBox", "khatri_square", "khatri_gram", "MAX_MISSING_CPU", "MAX_MISSING_CUDA", "MAX_FORM_ELEMENTS", "MAX_BOX_CELLS",
           "few_missing_limit", "box_pays"]

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


def box_pays(box: int, m: int, n_cells: int) -> bool:
    """Whether ``G`` and the gradient go through the box of ``box`` cells (compact holes) rather
    than the rows (scatter): the box's ``b²`` entries against the ``m·N`` of the rows (scattered
    cells span the whole grid), and at most :data:`MAX_BOX_CELLS` (also the cost model's,
    :mod:`kronegp.models.costs`)."""
    return box <= MAX_BOX_CELLS and box * box <= 4 * m * n_cells


def few_missing_limit(device: torch.device) -> int:
    """The largest ``m`` the exact few-missing path takes on ``device``."""
    return MAX_MISSING_CUDA if device.type == "cuda" else MAX_MISSING_CPU


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


def khatri_square(a: Tensor) -> Tensor:
    """The row-wise Khatri–Rao square ``F[(c, c'), j] = a[c, j] a[c', j]`` of ``a`` (``(r, n)`` → ``(r², n)``)."""
    return (a.unsqueeze(1) * a.unsqueeze(0)).reshape(-1, a.shape[1])


def khatri_gram(khatri: list[Tensor], sizes: list[int], w: Tensor) -> Tensor:
    """``A diag(w_s) Aᵀ`` (``(t, R, R)``) for ``A = ⊗A_k`` (``A_k`` of shape ``(r_k, n_k)``, ``R = Πr_k``)
    and weights ``w`` (``(Πn_k, t)``), given ``khatri[k] = khatri_square(A_k)`` and ``sizes = [r_k]``:
    one Kronecker matmul of ``t`` columns (module docstring)."""
    d, t, r = len(sizes), w.shape[-1], math.prod(sizes)
    vec = kron_matmul(khatri, w).reshape([x for rk in sizes for x in (rk, rk)] + [t])
    return vec.permute(2 * d, *range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(t, r, r)


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
    """

    def __init__(self, eig: KronEigen, outputscale: Tensor, noise: Tensor, missing: Tensor):
        self.eig = eig
        self.sizes = eig.sizes
        self.lam = outputscale.detach() * eig.eigvals()
        self.noise = noise.detach()
        self.p = 1.0 / (self.lam + self.noise)
        self.missing = missing
        hole = MissingBox(missing, self.sizes)
        idx = hole.idx
        self.m = hole.m
        self._coords, self._box_sizes, self._pos = hole.coords, hole.box_sizes, hole.pos
        self._box_factors = [q[b] for q, b in zip(eig.vecs, hole.axes)]  # A_k (b_k, n_k)
        self.box = hole.box
        #: whether G and the gradient go through the box (compact holes) or the rows (scatter)
        self.boxed = box_pays(self.box, self.m, eig.size)
        self._U = None
        if self.boxed:
            self._khatri = [khatri_square(a) for a in self._box_factors]
            # with the grams the gradient needs (one Kronecker matmul of three columns)
            p2 = self.p * self.p
            grams = self.box_gram(torch.stack([self.p, p2, p2 * eig.eigvals()], -1))
            G, self._grams = grams[0], grams[1:]
            if self.m != self.box or bool((self._pos != torch.arange(self.m, device=idx.device)).any()):
                G = G[self._pos][:, self._pos]
        else:
            G = self._against_rows(self.Y)
        G = 0.5 * (G + G.mT)
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise FloatingPointError(
                f"GridGP (exact-missing path): G = X_MM over the {self.m} missing cells is not positive "
                "definite in this dtype (the noise is too small for the signal); use float64 or path='cg'"
            )
        self.G, self.L = G, L
        self.logdet_g = 2 * torch.log(L.diagonal()).sum()
        self._ginv = self._ginv_box = None

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

    @property
    def ginv(self) -> Tensor:
        if self._ginv is None:
            self._ginv = torch.cholesky_inverse(self.L)
        return self._ginv

    @property
    def ginv_box(self) -> Tensor:
        """``G⁻¹`` zero-filled in the box, ``(b, b)``."""
        if self._ginv_box is None:
            if self.m == self.box:  # the missing cells fill their box (one contiguous hole)
                self._ginv_box = self.ginv[torch.argsort(self._pos)][:, torch.argsort(self._pos)]
            else:
                out = self.ginv.new_zeros(self.box, self.box)
                out[self._pos.unsqueeze(-1), self._pos.unsqueeze(0)] = self.ginv
                self._ginv_box = out
        return self._ginv_box

    def box_gram(self, w: Tensor) -> Tensor:
        """``A diag(w_s) Aᵀ`` over the box (``(t, b, b)``), for grid weights ``w`` (``(N, t)``)."""
        return khatri_gram(self._khatri, self._box_sizes, w)

    def box_factor_grads(self, needs) -> list[Optional[Tensor]]:
        """``Q_i M_i Q_iᵀ``, ``M_i = Σ_j L_i[j] (p_j p_jᵀ) ∘ (A_iᵀ S_j A_i)``, for the axes in ``needs``
        (module docstring: the gradient of ``tr(G⁻¹ U diag(p) Q̃ diag(p) Uᵀ)`` in ``K_i``).

        ``S`` for axis ``i`` contracts every other axis's pair ``(c_k, c_k')`` of ``vec(G⁻¹)`` with
        ``F_k``, the axes that shrink it most first; axes share the contractions they start
        with (kept by the axes they contracted), and ``M_i = Σ_j (A_i ∘ w_j)ᵀ S_j (A_i ∘ p_j)`` is one GEMM over
        ``(j, c)`` (``w_j = L_i[j] p_j``)."""
        d, b, n = len(self.sizes), self._box_sizes, self.sizes
        # vec(G⁻¹) in the pair order (c_1, c_1', c_2, c_2', …) of the Khatri–Rao factors
        ginv = self.ginv_box.reshape(b + b).permute(*[x for k in range(d) for x in (k, d + k)])
        ginv = ginv.reshape([bk * bk for bk in b])

        def contract(x: Tensor, k: int) -> Tensor:  # axis k: (c_k, c_k') pairs -> j_k
            return torch.movedim(torch.tensordot(x, self._khatri[k], dims=([k], [0])), -1, k)

        # Axes in order of how much they shrink the tensor (n_k / b_k²), each contracted
        # prefix kept: the axes share their first (costliest) contractions.
        order = sorted(range(d), key=lambda k: n[k] / (b[k] * b[k]))
        memo: dict = {(): ginv}
        out: list[Optional[Tensor]] = [None] * d
        for i in range(d):
            if not needs[i]:
                continue
            done: tuple = ()
            for k in (k for k in order if k != i):
                key = done + (k,)
                if key not in memo:
                    memo[key] = contract(memo[done], k)
                done = key
            out[i] = self._axis_grad(i, memo[done])
        return out

    def _axis_grad(self, i: int, s: Tensor) -> Tensor:
        """``Q_i M_i Q_iᵀ`` from ``s``: every axis but ``i`` contracted (shape ``n`` with ``b_i²`` at ``i``)."""
        n, bi = self.sizes, self._box_sizes[i]
        pre, post = math.prod(n[:i]), math.prod(n[i + 1:])
        s = s.reshape(pre, bi, bi, post).permute(0, 3, 1, 2).reshape(pre * post, bi, bi)
        a = self._box_factors[i]  # (b_i, n_i)
        pj = self.p.reshape(pre, n[i], post).permute(0, 2, 1).reshape(pre * post, 1, n[i])
        others = self.eig.vals[:i] + self.eig.vals[i + 1:]
        weight = kron_vector(others).reshape(-1, 1, 1) if others else pj.new_ones(1, 1, 1)
        v = s @ (a * pj)  # (J, b_i, n_i): S_j (A_i ∘ p_j)
        aw = a * (pj * weight)  # (J, b_i, n_i)
        m_i = aw.reshape(-1, n[i]).mT @ v.reshape(-1, n[i])
        q = self.eig.vecs[i]
        return q @ m_i @ q.mT

    # ------------------------------------------------------------------ products with the rows

    def _kron_cost(self) -> int:
        """Flops of a product of ``m`` grid rows with the box factors (one side of ``U``)."""
        cost, cur = 0, list(self.sizes)
        for k in reversed(range(len(cur))):  # matmul_kron contracts the last axis first
            cost += 2 * self.m * math.prod(cur) * self._box_sizes[k]
            cur[k] = self._box_sizes[k]
        return cost

    def _use_kron(self) -> bool:
        return self._kron_cost() < 2 * self.m * self.m * self.eig.size

    def _against_rows(self, rows: Tensor) -> Tensor:
        """``rows · Uᵀ`` (``(t, N) → (t, m)``)."""
        if self._use_kron():
            box = matmul_kron(rows, [f.mT for f in self._box_factors])  # rows (⊗Q_k[I_k])ᵀ
            return box[:, self._pos]
        return rows @ self.U.mT

    def _rows_from(self, coef: Tensor) -> Tensor:
        """``coef · U`` (``(t, m) → (t, N)``)."""
        if self._use_kron():
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
        g = torch.cholesky_solve(xr_m.unsqueeze(-1), self.L).mT  # (1, m)
        alpha_t = self.p * (rt - self._rows_from(g))
        return (rt * alpha_t).sum(), alpha_t

    def logdet_g_surrogate(self, outputscale: Tensor, noise: Tensor, factors: list[Tensor]) -> Tensor:
        """A 0-dim tensor whose gradient is that of ``−½ log det G`` in ``s²``, ``σ²`` and the factors
        (its value is not the term's): ``½ tr(G⁻¹ Bᵀ ∂C B)`` with ``QᵀB = Yᵀ`` held fixed and
        ``∂C = ∂s² (⊗K) + s² ∂(⊗K) + ∂σ² I``."""
        if self.boxed:
            quad_noise, quad_kern = (self.ginv_box * self._grams).sum((-2, -1)).unbind(0)  # tr(G⁻¹ Y [I, λ̂] Yᵀ)
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

    def grid_variance(self, chunk_elements: int = 1 << 26) -> Tensor:
        """``diag(K − K Z K)`` over the grid (length ``N``): ``diag(Q (λσ²/(λ+σ²)) Qᵀ)`` plus
        ``Σ_c (K B L⁻ᵀ)_c²``, the ``m`` columns ``K B L⁻ᵀ e_c = Q(λp ∘ Qᵀ E_M L⁻ᵀ e_c)`` in chunks
        of at most ``chunk_elements`` grid values (``4·m·N·Σn_k`` flops in all)."""
        full = self.eig.diag_of(self.lam * self.noise * self.p)
        linv_t = torch.linalg.solve_triangular(self.L, torch.eye(self.m, dtype=self.L.dtype, device=self.L.device),
                                               upper=False).mT  # L⁻ᵀ
        size = max(1, min(self.m, chunk_elements // self.eig.size))
        for start in range(0, self.m, size):
            cols = linv_t[:, start : start + size]
            grid = cols.new_zeros(self.eig.size, cols.shape[1])
            grid[self.missing] = cols
            h = self.eig.apply_function(self.lam * self.p, grid)
            full = full + (h * h).sum(-1)
        return full
