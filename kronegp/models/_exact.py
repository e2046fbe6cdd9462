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

__all__ = ["exact_lml"]


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
        for i in range(len(eig.vecs)):
            if needs[3 + i]:
                inner = _eigen_factor_gradient(eig, i, alpha_t, w)
                d_factors[i] = grad * 0.5 * outputscale * (eig.vecs[i] @ inner @ eig.vecs[i].mT)
        return (d_resid, d_noise, d_scale, *d_factors)


def _eigen_factor_gradient(eig: KronEigen, i: int, alpha_t: Optional[Tensor], w: Tensor) -> Tensor:
    """``M_i − diag(v_i)`` with ``∂_{K_i}[αᵀ(⊗K)α] − tr-term = Q_i (M_i − diag(v_i)) Q_iᵀ``.

    In eigen-coordinates ``α̃ = Qᵀα`` (grid-shaped ``(a, p, b)`` around axis ``i``) and with
    ``L[a, b] = Π_{k≠i} λ_k`` (``Q_kᵀQ_k = I`` for the other axes)::

        M_i[p, q] = Σ_{a,b} α̃[a, p, b] α̃[a, q, b] L[a, b]      v_i[p] = Σ_{a,b} w[a, p, b] L[a, b]

    a few small operations per factor instead of Kronecker matmuls of ``α``.
    """
    sizes = eig.sizes
    n_i = sizes[i]
    pre, post = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
    lead = kron_vector(eig.vals[:i]) if i > 0 else w.new_ones(1)
    trail = kron_vector(eig.vals[i + 1 :]) if i + 1 < len(sizes) else w.new_ones(1)
    weight = lead.reshape(pre, 1, 1) * trail.reshape(1, 1, post)
    out = -torch.diag_embed((w.reshape(pre, n_i, post) * weight).sum(dim=(0, 2)))
    if alpha_t is not None:
        a = alpha_t.reshape(pre, n_i, post)
        out = out + torch.einsum("apb,aqb->pq", a * weight, a)
    return out


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
