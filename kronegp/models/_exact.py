"""Exact log marginal likelihood on a full grid with homoskedastic noise (Saatçi 2012).

With ``K = s² (K_1 ⊗ … ⊗ K_d)``, ``K_k = Q_k Λ_k Q_kᵀ``, ``λ = s² ⊗λ_k`` and
``C = K + σ² I = Q diag(λ + σ²) Qᵀ``, for the residual ``r = y − μ`` on ``N`` cells::

    α    = C⁻¹ r = Q (w ∘ Qᵀ r),    w = 1 / (λ + σ²)
    log p(y) = −½ rᵀα − ½ Σ_j log(λ_j + σ²) − (N/2) log 2π

Gradients are analytic (autograd through ``eigh`` divides by eigenvalue gaps, which are
zero on regular grids, so it is never used)::

    ∂/∂r    = −α
    ∂/∂σ²   = ½ αᵀα − ½ Σ_j w_j
    ∂/∂s²   = ½ αᵀ(⊗K_k)α − ½ Σ_j w_j (⊗λ_k)_j
    ∂/∂K_i  = ½ s² ∂_{K_i}[αᵀ(⊗K_k)α] − ½ s² Q_i diag(v_i) Q_iᵀ

where ``v_i[m] = Σ_{j: j_i = m} w_j Π_{k≠i} λ_k[j_k]``, from
``tr(C⁻¹ (K_1 ⊗ … E_pq … ⊗ K_d)) = Σ_j w_j Q_i[p, j_i] Q_i[q, j_i] Π_{k≠i} λ_k[j_k]``, and the
quadratic term is taken in eigen-coordinates ``α̃ = Qᵀα = w ∘ Qᵀr`` (a by-product of the
forward): ``αᵀ(⊗K)α = Σ_j λ_j α̃_j²`` and ``∂_{K_i}[αᵀ(⊗K)α] = Q_i M_i Q_iᵀ`` with
``M_i[p, q] = Σ_{j, j'} α̃_j α̃_{j'} Π_{k≠i} λ_k[j_k]`` over pairs equal off axis ``i``
(``j_i = p``, ``j'_i = q``), because ``Q_kᵀ Q_k = I`` on the other axes. The gradient is
that of the likelihood computed with the (clamped) eigenvalues, so value and gradient agree.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen, kron_apply_into, kron_vector_slab, slabs
from kronegp.ops import matmul_kron

__all__ = ["exact_lml", "eigen_bilinear_form"]


#: Elements per temporary when the caller gives no ``chunk`` (:mod:`kronegp.models.memory`
#: chooses it from the device's free memory for a model).
DEFAULT_CHUNK = 1 << 24


def _chunk(chunk: Optional[int], n: int) -> int:
    return max(1, min(n, DEFAULT_CHUNK if chunk is None else int(chunk)))


def _mean_in_eigbasis(eig: KronEigen, mean: Tensor) -> list[Tensor]:
    """``Q_kᵀ1`` per axis: ``Qᵀ(c·1) = c·⊗(Q_kᵀ1)`` for a constant mean ``c``."""
    return [q.sum(0) for q in eig.vecs]


def eigen_residual(eig: KronEigen, y: Tensor, mean: Optional[Tensor], chunk: int) -> Tensor:
    """``r̃ = Qᵀ(y − μ)`` as a new grid vector, its only grid-sized allocation (``μ``: ``None``,
    a 0-dim constant — subtracted in eigen-coordinates as ``c·⊗(Q_kᵀ1)`` — or a grid vector)."""
    if mean is not None and mean.dim() > 0:
        rt = torch.sub(y, mean)
        return kron_apply_into([q.mT for q in eig.vecs], rt, rt, chunk)
    rt = torch.empty_like(y)
    kron_apply_into([q.mT for q in eig.vecs], y, rt, chunk)
    if mean is not None:
        ones_t = _mean_in_eigbasis(eig, mean)
        rows = rt.view(eig.sizes[0], -1)
        for a, b in slabs(eig.sizes, chunk):
            rows[a:b].sub_((mean * kron_vector_slab(ones_t, a, b)).view(b - a, -1))
    return rt


class _ExactKronLML(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Optional[Tensor], mean: Optional[Tensor], noise: Tensor, outputscale: Tensor,
                chunk: int, *factors: Tensor) -> Tensor:
        eig = KronEigen(factors)
        sizes, n = eig.sizes, eig.size
        # one pass over first-axis slabs: log det, the quadratic form, and r̃ ← α̃ = w ∘ r̃ in place
        rt = eigen_residual(eig, y, mean, chunk) if y is not None else None
        rows = rt.view(sizes[0], -1) if rt is not None else None
        logdet = quad = noise.new_zeros(())
        for a, b in slabs(sizes, chunk):
            den = kron_vector_slab(eig.vals, a, b).mul_(outputscale).add_(noise)  # λ + σ²
            logdet = logdet + torch.log(den).sum()
            if rows is not None:
                w_r = den.reciprocal_().mul_(rows[a:b].reshape(-1))  # α̃ on the slab
                quad = quad + torch.dot(w_r, rows[a:b].reshape(-1))
                rows[a:b] = w_r.view(b - a, -1)
            del den  # (slab temporaries die here, not at the next slab: memory.py counts on it)
        lml = -0.5 * (logdet + quad) - 0.5 * n * math.log(2 * math.pi)
        ctx.eig, ctx.chunk = eig, chunk
        ctx.has_mean_vector = mean is not None and mean.dim() > 0
        ctx.save_for_backward(rt, mean, noise, outputscale)
        return lml

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha_t, mean, noise, outputscale = ctx.saved_tensors
        eig: KronEigen = ctx.eig
        chunk = ctx.chunk
        needs = ctx.needs_input_grad
        d_y = d_mean = d_noise = d_scale = None
        wanted = [i for i in range(len(eig.vecs)) if needs[5 + i]]
        sums = _slab_sums(eig, alpha_t, noise, outputscale, wanted, chunk)
        if alpha_t is not None and (needs[0] or (needs[1] and ctx.has_mean_vector)):
            alpha = kron_apply_into(eig.vecs, alpha_t, torch.empty_like(alpha_t), chunk)  # α = Qα̃
            d_y = -grad * alpha if needs[0] else None
            if needs[1]:
                d_mean = alpha.mul_(grad)
        elif needs[1] and alpha_t is not None:
            # ∂/∂c = 1ᵀα = (⊗Q_kᵀ1)ᵀ α̃
            ones_t = _mean_in_eigbasis(eig, mean)
            d_mean = grad * matmul_kron(alpha_t.view(1, -1), [u.unsqueeze(-1) for u in ones_t]).reshape(())
        if needs[2]:
            d_noise = grad * 0.5 * (sums["alpha_sq"] - sums["w"])  # ‖α‖ = ‖α̃‖ (Q orthogonal)
        if needs[3]:
            d_scale = grad * 0.5 * (sums["qform"] - sums["w_lam"])
        d_factors: list = [None] * len(eig.vecs)
        for i in wanted:
            inner = sums["gram"][i]
            inner.diagonal().sub_(sums["v"][i])
            q = eig.vecs[i]
            d_factors[i] = grad * 0.5 * outputscale * (q @ inner @ q.mT)
        return (d_y, d_mean, d_noise, d_scale, None, *d_factors)


def _slab_sums(eig: KronEigen, alpha_t: Optional[Tensor], noise: Tensor, outputscale: Tensor,
               axes: list[int], chunk: int) -> dict:
    """The reductions of the exact gradient, over first-axis slabs (temporaries ``≲ 3·chunk``).

    With ``λ`` the unit eigenvalues ``⊗λ_k``, ``w = 1/(s²λ + σ²)`` and ``L_i = ⊗_{k≠i} λ_k``:
    ``w = Σw``, ``w_lam = Σwλ``, ``alpha_sq = Σα̃²``, ``qform = Σλα̃²``, and per axis ``i`` in
    ``axes`` ``v_i = W_i L_i`` and ``gram_i = X_i diag(L_i) X_iᵀ`` (``X_i``, ``W_i``: ``α̃``,
    ``w`` with axis ``i`` first, ``n_i × N/n_i``; see :func:`_axis_gram`)."""
    sizes, vals = eig.sizes, eig.vals
    d = len(sizes)
    zero = noise.new_zeros(())
    out = {"w": zero, "w_lam": zero, "alpha_sq": zero, "qform": zero,
           "v": {i: vals[i].new_zeros(sizes[i]) for i in axes}}
    rows = alpha_t.view(sizes[0], -1) if alpha_t is not None else None
    pre = [kron_vector(vals[1:i]) if i > 1 else None for i in range(d)]
    post = [kron_vector(vals[i + 1:]) if i < d - 1 else None for i in range(d)]
    for a, b in slabs(sizes, chunk):
        lam = kron_vector_slab(vals, a, b)
        w = (lam * outputscale).add_(noise).reciprocal_()
        out["w"] = out["w"] + w.sum()
        out["w_lam"] = out["w_lam"] + torch.dot(w, lam)
        if rows is not None:
            x = rows[a:b].reshape(-1)
            xl = x * lam
            out["qform"] = out["qform"] + torch.dot(xl, x)
            del xl
            out["alpha_sq"] = out["alpha_sq"] + torch.dot(x, x)
        for i in axes:
            # v_i: the slab's w weighted by the other axes' eigenvalues, summed off axis i
            c = b - a
            if i == 0:
                v = w.view(c, -1) @ post[0] if d > 1 else w
                out["v"][0][a:b] += v
                continue
            n_pre = math.prod(sizes[1:i])
            wv = w.view(c, n_pre, sizes[i], -1)
            # (c, pre, n_i): a slab-sized product only on the last axis, and in place after it
            wv = wv @ post[i] if post[i] is not None else wv.squeeze(-1) * 1.0
            wv.mul_(vals[0][a:b].view(c, 1, 1))
            if pre[i] is not None:
                wv.mul_(pre[i].view(1, n_pre, 1))
            out["v"][i] += wv.sum((0, 1))
            del wv
        del lam, w  # (see forward)
    if rows is not None:
        out["gram"] = {i: _axis_gram(eig, alpha_t, i, chunk) for i in axes}
    else:
        out["gram"] = {i: vals[i].new_zeros(sizes[i], sizes[i]) for i in axes}
    return out


def _axis_gram(eig: KronEigen, x: Tensor, i: int, chunk: int) -> Tensor:
    """``X_i diag(L_i) X_iᵀ`` (``n_i × n_i``) for a grid vector ``x`` with axis ``i`` moved first
    (``X_i``) and ``L_i = ⊗_{k≠i} λ_k``, accumulated over blocks of at most ``chunk`` elements.

    Axis 0: column blocks of the ``(n_1, N/n_1)`` view, one weighted copy and one GEMM each.
    Other axes: per first-axis slab, axis ``i`` moved first by one copy (``(n_i, K)``), weighted,
    one GEMM (K-split into a batch when ``n_i`` is small: few output tiles, long contraction)."""
    sizes, vals = eig.sizes, eig.vals
    n = sizes[i]
    gram = x.new_zeros(n, n)
    if i == 0:
        cols_total = x.numel() // n
        view = x.view(n, cols_total)
        weight = kron_vector(vals[1:]) if len(sizes) > 1 else x.new_ones(1)
        cols = max(1, min(cols_total, chunk // n))
        for a in range(0, cols_total, cols):
            b = min(cols_total, a + cols)
            blk = view[:, a:b]
            gram += _gram(blk * weight[a:b], blk)
        return gram
    n_pre, n_post = math.prod(sizes[1:i]), math.prod(sizes[i + 1:])
    rest_w = kron_vector([*vals[1:i], *vals[i + 1:]]) if len(sizes) > 2 else x.new_ones(1)
    rows = x.view(sizes[0], -1)
    for a, b in slabs(sizes, chunk):
        c = b - a
        moved = rows[a:b].reshape(c, n_pre, n, n_post).movedim(2, 0).reshape(n, -1)  # one copy
        weight = (vals[0][a:b].unsqueeze(-1) * rest_w).reshape(-1)
        gram += _gram(moved * weight, moved)
        del moved  # before the next slab's copy
    return gram


def _gram(aw: Tensor, b: Tensor, split: Optional[bool] = None) -> Tensor:
    """``aw · bᵀ`` for ``(n, K)`` blocks; K-split into a batch (see :func:`_k_split`) when ``split``
    (default: on CUDA with ``n < 512``: few output tiles, a long contraction) and both are contiguous."""
    n, length = b.shape
    split = (n < 512 and aw.is_cuda) if split is None else split
    s, k = _k_split(length) if split and b.is_contiguous() and aw.is_contiguous() else (1, length)
    if s == 1:
        return aw @ b.mT
    return torch.bmm(aw.view(n, s, k).transpose(0, 1), b.view(n, s, k).permute(1, 2, 0)).sum(0)


def _k_split(length: int, chunk: int = 512, most: int = 32) -> tuple[int, int]:
    """``(s, k)`` with ``s·k = length``: a contraction of this length cut into ``s`` chunks of
    ``k ≥ chunk`` (``s ≤ most``, the largest such divisor; ``(1, length)`` when none). cuBLAS
    gives a batched GEMM with a long contraction and a small output one thread block per output
    tile, whatever the length; the chunks become more batches (more blocks), summed after."""
    for s in range(min(most, length // chunk), 1, -1):
        if length % s == 0:
            return s, length // s
    return 1, length


def _off_axis_gram(a: Tensor, b: Tensor, sizes: list[int], i: int, weight: Tensor,
                   split: Optional[bool] = None) -> Tensor:
    """``Σ_c Σ_{j, j'} a[c, j] weight[j∖i] b[c, j']`` over pairs ``j, j'`` equal off axis ``i``
    (``j_i = p``, ``j'_i = q``): an ``n_i × n_i`` matrix, for rows ``a, b`` of shape ``(c, N)``
    over the grid and ``weight`` over the other axes (length ``N / n_i``, their order).

    One weighting pass and one (batched) GEMM on views of the rows. ``split`` (default: on CUDA)
    lays the first axis's long contraction out in chunks first (a copy of ``b``, :func:`_k_split`):
    on the GPU a batched GEMM with a long contraction gets one thread block per output tile;
    on the CPU the copy costs more than it saves (64³, 17 rows: 4.4 → 5.7 ms)."""
    c, n = a.shape[0], sizes[i]
    pre, post = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
    if pre == 1 and post > 1 and (a.is_cuda if split is None else split):
        # First axis: a product per row contracts all post cells, too few tiles for the GPU
        # (a 128³ grid: 4 × 4 × c output tiles of 16384-long dot products). K-split into s
        # chunks of length k: the weighting writes a (c, s, n, k) layout, b is copied into it.
        s, k = _k_split(post)
        aw = torch.empty((c, s, n, k), dtype=a.dtype, device=a.device)
        torch.mul(a.view(c, n, s, k).transpose(1, 2), weight.view(1, s, 1, k), out=aw)
        bs = b.view(c, n, s, k).transpose(1, 2).contiguous()
        return torch.bmm(aw.view(c * s, n, k), bs.view(c * s, n, k).mT).sum(0)
    aw = a.view(c, pre, n, post) * weight.view(1, pre, 1, post)
    b4 = b.view(c, pre, n, post)
    if post == 1:  # last axis: one GEMM over all rows of the other axes
        return aw.view(c * pre, n).mT @ b4.view(c * pre, n)
    return torch.bmm(aw.view(c * pre, n, post), b4.view(c * pre, n, post).mT).sum(0)


def _eigen_gram(eig: KronEigen, left_t: Tensor, right_t: Tensor, i: int) -> Tensor:
    """``M_i = Σ_c Ã_{c,(i)} diag(L_i) B̃_{c,(i)}ᵀ`` (``L_i = ⊗_{k≠i} λ_k``): factor ``i``'s gradient of
    ``Σ_c ã_cᵀ (⊗K_k) b̃_c`` is ``Q_i M_i Q_iᵀ`` (:func:`eigen_bilinear_form`)."""
    others = eig.vals[:i] + eig.vals[i + 1 :]
    weight = kron_vector(others) if others else left_t.new_ones(1)
    return _off_axis_gram(left_t, right_t, eig.sizes, i, weight)


class _EigenBilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left_t: Tensor, right_t: Tensor, eig: KronEigen, *factors: Tensor) -> Tensor:
        ctx.eig = eig
        ctx.save_for_backward(left_t, right_t)
        return ((left_t * right_t).sum(0) * eig.eigvals()).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        left_t, right_t = ctx.saved_tensors
        eig: KronEigen = ctx.eig
        out: list = [None] * len(eig.sizes)
        for i in range(len(eig.sizes)):
            if ctx.needs_input_grad[3 + i]:
                q = eig.vecs[i]
                out[i] = grad * (q @ _eigen_gram(eig, left_t, right_t, i) @ q.mT)
        return (None, None, None, *out)


class EigenPairSums:
    """:func:`eigen_bilinear_form` of many row pairs, reduced as they come: blocks of pairs
    ``(ã_c, b̃_c)`` are added one block at a time (:meth:`add`) and only factor-sized sums are
    kept (the value ``Σ w_c ã_cᵀ(λ∘b̃_c)``, the trace ``Σ w_c ã_cᵀb̃_c`` and each factor's gram
    ``M_i``), so a block can be freed before the next is made: the cg path's probes in runs
    when their rows do not fit at once (:mod:`kronegp.models.memory`). The grams are the work the
    backward of :func:`eigen_bilinear_form` would do, done in the forward."""

    def __init__(self, eig: KronEigen):
        self.eig = eig
        self.rows = 0
        self.value: Optional[Tensor] = None
        self.trace: Optional[Tensor] = None
        self.grams: list = [None] * len(eig.sizes)

    def add(self, left_t: Tensor, right_t: Tensor, weight: float) -> None:
        """Add the pairs of rows ``left_t``, ``right_t`` (``(c, N)``), each with ``weight``."""
        with torch.no_grad():
            lw = left_t * weight
            per_cell = (lw * right_t).sum(0)
            value, trace = (per_cell * self.eig.eigvals()).sum(), per_cell.sum()
            del per_cell
            self.value = value if self.value is None else self.value + value
            self.trace = trace if self.trace is None else self.trace + trace
            for i in range(len(self.grams)):
                m = _eigen_gram(self.eig, lw, right_t, i)
                self.grams[i] = m if self.grams[i] is None else self.grams[i] + m
            self.rows += left_t.shape[0]

    def surrogate(self, outputscale: Tensor, noise: Tensor, factors: list[Tensor]) -> Tensor:
        """``s²·Σ w ãᵀ(⊗K)b̃ + σ²·Σ w ãᵀb̃`` with the gradient of :func:`eigen_bilinear_form` (the
        vectors held fixed): the cg path's ``∂C = s²∂(⊗K) + ∂σ² I`` term of these pairs."""
        if self.value is None:
            return outputscale.new_zeros(())
        return outputscale * _SummedEigenBilinear.apply(self, *factors) + noise * self.trace


class _SummedEigenBilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sums: EigenPairSums, *factors: Tensor) -> Tensor:
        ctx.sums = sums
        return sums.value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        sums: EigenPairSums = ctx.sums
        out = [grad * (q @ m @ q.mT) if need else None
               for q, m, need in zip(sums.eig.vecs, sums.grams, ctx.needs_input_grad[1:])]
        return (None, *out)


def eigen_bilinear_form(left_t: Tensor, right_t: Tensor, eig: KronEigen, factors: list[Tensor]) -> Tensor:
    """``Σ_c a_cᵀ (⊗K_k) b_c`` for grid vectors given in eigen-coordinates, ``ã_c = Qᵀa_c`` and
    ``b̃_c = Qᵀb_c`` (rows ``(c, N)`` of ``left_t``, ``right_t``; ``eig`` the decomposition of
    ``factors``), differentiable in the factors only, the vectors held fixed.

    Value ``Σ_c ã_cᵀ (λ ∘ b̃_c)``; gradient for factor ``i``: ``Q_i M_i Q_iᵀ`` with
    ``M_i = Σ_c Ã_{c,(i)} diag(L_i) B̃_{c,(i)}ᵀ`` (``L_i = ⊗_{k≠i} λ_k``), as in the exact path's
    quadratic term: ``Q_kᵀ K_k Q_k = Λ_k`` on every other axis, so no Kronecker matmul of the
    vectors is needed (:func:`kronegp.models._kron.bilinear_form` takes grid vectors instead)."""
    return _EigenBilinear.apply(left_t.detach(), right_t.detach(), eig, *factors)


def exact_lml(resid: Optional[Tensor], noise: Tensor, outputscale: Tensor, factors: list[Tensor], *,
              mean: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tensor:
    """Exact ``log N(r | 0, s² ⊗K_k + σ² I)`` with analytic gradients (see module docstring),
    ``r = resid − mean``.

    Args:
        resid: ``y − μ`` (or ``y`` when ``mean`` is given) flattened over the grid (row-major,
            the order of ``⊗``), length ``N``; or ``None`` for the log-determinant term alone,
            ``−½ log det C − (N/2) log 2π`` (the value at ``r = 0``, without its Kronecker matmuls).
        noise: ``σ²`` (0-dim). outputscale: ``s²`` (0-dim).
        factors: the symmetric ``K_k`` (``n_k × n_k``), one per grid dimension.
        mean: optional ``μ`` subtracted from ``resid``: a constant (one element; it is subtracted in
            eigen-coordinates, ``Qᵀ(y − c) = Qᵀy − c·⊗(Q_kᵀ1)``, and its gradient is
            ``(⊗Q_kᵀ1)ᵀα̃``, so no grid vector of it is formed) or a grid vector.
        chunk: elements per temporary (default :data:`DEFAULT_CHUNK`). The evaluation holds one
            grid vector (``α̃ = Qᵀα``, saved for the backward; two with a grid-vector mean or a
            gradient for ``resid``) plus temporaries of about ``3·chunk`` elements
            (:func:`kronegp.models.memory.plan_exact_step` counts them).
    """
    if mean is not None and mean.dim() > 0 and mean.numel() == 1:
        mean = mean.reshape(())
    n = math.prod(int(f.shape[-1]) for f in factors)
    return _ExactKronLML.apply(resid, mean, noise, outputscale, _chunk(chunk, n), *factors)


def _posterior_slab(eig: KronEigen, a: int, b: int, noise: Tensor, outputscale: Tensor) -> tuple[Tensor, Tensor]:
    """``(λ w, λ σ² w)`` on a first-axis slab (``λ = s²⊗λ_k``, ``w = 1/(λ + σ²)``)."""
    lam = kron_vector_slab(eig.vals, a, b).mul_(outputscale)
    shrink = lam.div_(lam + noise)  # λw
    return shrink, shrink * noise


def exact_posterior_grid(y: Tensor, mean: Optional[Tensor], noise: Tensor, outputscale: Tensor,
                         factors: list[Tensor], chunk: Optional[int] = None, *,
                         variance: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Posterior mean and variance of ``f`` on the grid (model units), exact path::

        m = μ + Kα = μ + Q(λw ∘ Qᵀ(y − μ))       v = (Q∘Q)(λσ²w)

    (``λ = s²⊗λ_k``, ``w = 1/(λ + σ²)``, ``Q∘Q = ⊗(Q_k∘Q_k)``). Each result is one grid vector
    computed in place (:func:`kronegp.models._kron.kron_apply_into`) with temporaries of about
    ``3·chunk`` elements: a billion-cell grid needs the two results and little more.
    ``mean``: a constant (0-dim) or a grid vector, or ``None``.
    """
    eig = KronEigen(factors)
    sizes = eig.sizes
    chunk = _chunk(chunk, eig.size)
    m = eigen_residual(eig, y, mean, chunk)
    rows = m.view(sizes[0], -1)
    for a, b in slabs(sizes, chunk):
        shrink, _ = _posterior_slab(eig, a, b, noise, outputscale)
        rows[a:b] *= shrink.view(b - a, -1)
        del shrink, _  # slabs die before the product's (memory.py counts on it)
    kron_apply_into(eig.vecs, m, m, chunk)
    if mean is not None:
        m += mean
    if not variance:
        return m, None
    v = torch.empty_like(m)
    vrows = v.view(sizes[0], -1)
    for a, b in slabs(sizes, chunk):
        _, var = _posterior_slab(eig, a, b, noise, outputscale)
        vrows[a:b] = var.view(b - a, -1)
        del _, var
    kron_apply_into([q * q for q in eig.vecs], v, v, chunk)
    return m, v


def exact_posterior_samples(y: Tensor, mean: Optional[Tensor], noise: Tensor, outputscale: Tensor,
                            factors: list[Tensor], samples: int, generator: Optional[torch.Generator] = None,
                            chunk: Optional[int] = None) -> Tensor:
    """``samples`` joint posterior draws of ``f`` on the grid (model units), shape ``(samples, N)``:
    ``m + Q((λσ²w)^{½} ∘ ξ)``, ``ξ ~ N(0, I)``; drawn one at a time into the result, in place, so
    besides the draws and the mean only slabs of about ``chunk`` elements are allocated."""
    eig = KronEigen(factors)
    sizes = eig.sizes
    chunk = _chunk(chunk, eig.size)
    m, _ = exact_posterior_grid(y, mean, noise, outputscale, factors, chunk, variance=False)
    out = torch.empty(samples, eig.size, dtype=y.dtype, device=y.device)
    for i in range(samples):
        row = out[i]
        row.normal_(generator=generator)
        rows = row.view(sizes[0], -1)
        for a, b in slabs(sizes, chunk):
            _, var = _posterior_slab(eig, a, b, noise, outputscale)
            rows[a:b] *= var.sqrt_().view(b - a, -1)
            del _, var
        kron_apply_into(eig.vecs, row, row, chunk)
        row += m
    return out
