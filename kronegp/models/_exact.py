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
from kronegp.models._kron import KronEigen

__all__ = ["exact_lml", "eigen_bilinear_form"]


class _ExactKronLML(torch.autograd.Function):
    @staticmethod
    def forward(ctx, resid: Optional[Tensor], noise: Tensor, outputscale: Tensor, *factors: Tensor) -> Tensor:
        eig = KronEigen(factors)
        lam_unit = eig.eigvals()
        lam = outputscale * lam_unit
        w = 1.0 / (lam + noise)
        n = lam.shape[0]
        lml = -0.5 * torch.log(lam + noise).sum() - 0.5 * n * math.log(2 * math.pi)
        if resid is not None:
            rt = eig.to_eigbasis(resid.unsqueeze(-1)).squeeze(-1)
            alpha_t = w * rt  # Qᵀα
            alpha = eig.from_eigbasis(alpha_t.unsqueeze(-1)).squeeze(-1)
            lml = lml - 0.5 * (rt * alpha_t).sum()
        else:
            alpha = alpha_t = None  # the log-determinant term alone: α = 0
        ctx.eig = eig
        ctx.save_for_backward(alpha, alpha_t, w, lam_unit, outputscale)
        return lml

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha, alpha_t, w, lam_unit, outputscale = ctx.saved_tensors
        eig: KronEigen = ctx.eig
        needs = ctx.needs_input_grad
        d_resid = -grad * alpha if needs[0] and alpha is not None else None
        alpha_sq = (alpha * alpha).sum() if alpha is not None else 0.0
        d_noise = grad * 0.5 * (alpha_sq - w.sum()) if needs[1] else None
        d_scale = None
        d_factors: list = [None] * len(eig.vecs)
        if needs[2]:
            qform = (lam_unit * alpha_t * alpha_t).sum() if alpha_t is not None else 0.0
            d_scale = grad * 0.5 * (qform - (w * lam_unit).sum())
        wanted = [i for i in range(len(eig.vecs)) if needs[3 + i]]
        for i, d_k in _eigen_factor_gradients(eig, wanted, alpha_t, w).items():
            d_factors[i] = grad * 0.5 * outputscale * d_k
        return (d_resid, d_noise, d_scale, *d_factors)


def _k_split(length: int, chunk: int = 512, most: int = 32) -> tuple[int, int]:
    """``(s, k)`` with ``s·k = length``: a contraction of this length cut into ``s`` chunks of
    ``k ≥ chunk`` (``s ≤ most``, the largest such divisor; ``(1, length)`` when none). cuBLAS
    gives a batched GEMM with a long contraction and a small output one thread block per output
    tile, whatever the length; the chunks become more batches (more blocks), summed after."""
    for s in range(min(most, length // chunk), 1, -1):
        if length % s == 0:
            return s, length // s
    return 1, length


def _eigen_factor_gradients(eig: KronEigen, axes: list[int], alpha_t: Optional[Tensor], w: Tensor) -> dict[int, Tensor]:
    """``Q_i (M_i − diag(v_i)) Q_iᵀ = ∂_{K_i}[αᵀ(⊗K)α] − tr-term`` for each axis ``i`` in ``axes``.

    In eigen-coordinates ``α̃ = Qᵀα`` with axis ``i`` moved first (``X_i``, ``n_i × N/n_i``; ``W_i``
    likewise for ``w``) and ``L_i = ⊗_{k≠i} λ_k`` over the other axes in order
    (``Q_kᵀQ_k = I`` for them)::

        M_i = (X_i · diag(L_i)) X_iᵀ      v_i = W_i L_i

    one weighted Gram product per factor instead of Kronecker matmuls of ``α``; axes of equal
    size (a cube) go through one batched product (each small kernel costs more host time than
    GPU time).
    """
    sizes = eig.sizes
    out: dict[int, Tensor] = {}
    by_size: dict[int, list[int]] = {}
    for i in axes:
        by_size.setdefault(sizes[i], []).append(i)
    for n, members in by_size.items():
        weight = torch.stack([kron_vector(eig.vals[:i] + eig.vals[i + 1 :]) if len(sizes) > 1 else w.new_ones(1)
                              for i in members]).unsqueeze(1)  # (g, 1, N/n)
        wm = torch.stack([w.reshape(sizes).movedim(i, 0).reshape(n, -1) for i in members])
        v = (wm * weight).sum(-1)
        if alpha_t is None:
            inner = -torch.diag_embed(v)
        else:
            # The Gram products contract the N/n cells off the axis: K-split into s chunks of
            # length k (the stack lays them out as (g, s, n, k)), batched, then summed.
            g, (s, k) = len(members), _k_split(weight.shape[-1])
            xm = torch.stack([alpha_t.reshape(sizes).movedim(i, 0).reshape(n, s, k).transpose(0, 1) for i in members])
            xw = xm * weight.view(g, s, 1, k)
            inner = torch.bmm(xw.view(g * s, n, k), xm.view(g * s, n, k).mT).view(g, s, n, n).sum(1)
            inner.diagonal(dim1=-2, dim2=-1).sub_(v)
        q = torch.stack([eig.vecs[i] for i in members])
        for i, d_k in zip(members, torch.bmm(torch.bmm(q, inner), q.mT).unbind(0)):
            out[i] = d_k
    return out


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
        sizes = eig.sizes
        out: list = [None] * len(sizes)
        for i in range(len(sizes)):
            if not ctx.needs_input_grad[3 + i]:
                continue
            others = eig.vals[:i] + eig.vals[i + 1 :]
            weight = kron_vector(others) if others else left_t.new_ones(1)
            q = eig.vecs[i]
            out[i] = grad * (q @ _off_axis_gram(left_t, right_t, sizes, i, weight) @ q.mT)
        return (None, None, None, *out)


def eigen_bilinear_form(left_t: Tensor, right_t: Tensor, eig: KronEigen, factors: list[Tensor]) -> Tensor:
    """``Σ_c a_cᵀ (⊗K_k) b_c`` for grid vectors given in eigen-coordinates, ``ã_c = Qᵀa_c`` and
    ``b̃_c = Qᵀb_c`` (rows ``(c, N)`` of ``left_t``, ``right_t``; ``eig`` the decomposition of
    ``factors``), differentiable in the factors only, the vectors held fixed.

    Value ``Σ_c ã_cᵀ (λ ∘ b̃_c)``; gradient for factor ``i``: ``Q_i M_i Q_iᵀ`` with
    ``M_i = Σ_c Ã_{c,(i)} diag(L_i) B̃_{c,(i)}ᵀ`` (``L_i = ⊗_{k≠i} λ_k``), as in the exact path's
    quadratic term: ``Q_kᵀ K_k Q_k = Λ_k`` on every other axis, so no Kronecker matmul of the
    vectors is needed (:func:`kronegp.models._kron.bilinear_form` takes grid vectors instead)."""
    return _EigenBilinear.apply(left_t.detach(), right_t.detach(), eig, *factors)


def exact_lml(resid: Optional[Tensor], noise: Tensor, outputscale: Tensor, factors: list[Tensor]) -> Tensor:
    """Exact ``log N(r | 0, s² ⊗K_k + σ² I)`` with analytic gradients (see module docstring).

    Args:
        resid: ``y − μ`` flattened over the grid (row-major, the order of ``⊗``), length ``N``;
            or ``None`` for the log-determinant term alone, ``−½ log det C − (N/2) log 2π``
            (the value at ``r = 0``, without its Kronecker matmuls).
        noise: ``σ²`` (0-dim). outputscale: ``s²`` (0-dim).
        factors: the symmetric ``K_k`` (``n_k × n_k``), one per grid dimension.
    """
    return _ExactKronLML.apply(resid, noise, outputscale, *factors)
