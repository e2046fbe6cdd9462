"""Exact inference when the mask does not depend on some axes (a land mask repeated at every time
step, a fixed station layout, whole time slices missing).

Split the axes into the masked ones ``A`` (the mask depends on them) and the free ones ``B`` (the
mask is constant along each). The observed cells are then a product ``O = S × grid_B``, ``S`` the
``|S|`` observed points of ``grid_A``, and with homoskedastic noise::

    C_OO = s² (K_S ⊗ K_B) + σ² I,     K_S = (⊗_{k∈A} K_k)[S, S],   K_B = ⊗_{k∈B} K_k

in the order ``(A, B)`` of the axes (a permutation of the grid). ``K_S`` is dense (``|S| × |S|``,
the entrywise product of the factors' rows and columns at ``S``), ``K_B`` stays Kronecker. With
``K_S = V diag(μ) Vᵀ`` (one dense ``eigh``) and ``K_B = Q diag(λ) Qᵀ`` (the factors')::

    C_OO = (V ⊗ Q) diag(D) (V ⊗ Q)ᵀ,    D_ij = s² μ_i λ_j + σ²,   P = 1/D

(``μ``, ``λ`` clipped at 0 as :class:`kronegp.models._kron.KronEigen` does), so with the observed
residual as a matrix ``R`` (``|S| × n_B``) and ``R̃ = Vᵀ R Q``::

    log p = −½ Σ R̃²∘P − ½ Σ log D − (|O|/2) log 2π,      α = V (R̃∘P) Qᵀ

exactly, no iterations. **Gradient** (exact, no probes, no differentiation through ``eigh``):
``∂ log p = ½ αᵀ ∂C α − ½ tr(C_OO⁻¹ ∂C)`` and, since ``C_OO⁻¹ = Σ_ij P_ij w_ij w_ijᵀ`` for the
eigenvectors ``w_ij = v_i ⊗ q_j`` (whatever the degeneracy),
``tr(C_OO⁻¹ ∂C) = ∂[s² eᵀ P g + σ² Σ P]`` with ``e = diag(Vᵀ K_S V)``, ``g = ⊗_{k∈B} diag(Q_kᵀ K_k Q_k)``
formed from the live factors and ``V``, ``Q``, ``P`` held fixed; the data term is
``½ (s² tr(αᵀ K_S α K_B) + σ² ‖α‖²)`` with ``α`` fixed. Both are autograd surrogates
(:func:`lml_surrogate`), costing ``O(|S|² n_B + |S| n_B Σ n_k)``.

**Posterior** on the whole grid (masked-out cells included): mean ``μ + s²(⊗K) α`` (``α``
zero-filled), variance ``s² Π diag K_k − s⁴ (H∘H) Wᵀ`` with ``H = K_A[:, S] V`` (``n_A × |S|``, the
cross-covariance from ``S`` to every point of ``grid_A``) and ``W = (Q∘Q)(P∘λ²)ᵀ`` (``n_B × |S|``);
at points and for samples, products with ``C_OO⁻¹`` (:meth:`SeparableMask.apply`).

Cost per step: one ``eigh`` of ``|S| × |S|`` (``~9|S|³`` flops) plus the above; memory ``|S|²`` and a
few ``|S| × n_B`` blocks. :func:`separable_mask_limit` bounds ``|S|`` for ``path="auto"``,
:data:`MAX_POINTS_ANY` when the path is forced.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["SeparableMask", "MAX_POINTS_CPU", "MAX_POINTS_CUDA", "MAX_POINTS_ANY", "separable_mask_limit", "mask_axes", "VARIANCE_CHUNK", "variance_rows",
           "lml_surrogate"]

#: Most observed points ``|S|`` of the masked axes for which ``path="auto"`` takes this path on a
#: CPU. Measured (2-core CPU, loaded, one thread, float64, 2026-12-07): ``eigh`` of ``|S|`` = 1024 /
#: 2048 / 4096 takes 0.38 / 2.4 / 20 s. A step on 30 × 30 × 40 with a 30 % land mask constant in
#: time (``|S|`` = 630) takes 0.12 s against the cg path's 0.65 s (16 random probes, stochastic); on
#: 60 × 60 × 20 (``|S|`` = 2520) 7.2 s against 1.2 s. Past ~2000 points the exact step costs more
#: than cg's stochastic one unless the free axes are long (cg's cost grows with them, this path's
#: ``eigh`` does not), so the limit is 2048.
MAX_POINTS_CPU = 2048
#: The same on a CUDA device: a default, not measured.
MAX_POINTS_CUDA = 8192
#: Most points ``path="separable-mask"`` accepts when forced (``K_S`` and ``V``: 2 GiB in float64).
MAX_POINTS_ANY = 16384


def separable_mask_limit(device: torch.device) -> int:
    """The largest ``|S|`` the separable-mask path takes on ``device``."""
    return MAX_POINTS_CUDA if device.type == "cuda" else MAX_POINTS_CPU


#: Most values of one block of :meth:`SeparableMask.grid_variance` (rows of ``K_A[:, S]``: three such
#: ``rows × |S|`` blocks are alive at once, the memory plan's count)
VARIANCE_CHUNK = 1 << 24


def variance_rows(n_points: int, n_b: int, chunk_elements: int = VARIANCE_CHUNK) -> int:
    """Points of ``grid_A`` per block of :meth:`SeparableMask.grid_variance` (at least one; the last
    block may hold fewer)."""
    return max(1, chunk_elements // max(n_points, n_b))


def mask_axes(observed: Tensor, shape: tuple) -> tuple[list[int], int]:
    """``(A, |S|)``: the axes the boolean grid ``observed`` (flat) depends on, and the number of
    observed points of their grid (``observed`` is constant along every other axis)."""
    grid = observed.reshape(shape)
    axes = [k for k in range(len(shape)) if not bool((grid == grid.narrow(k, 0, 1)).all())]
    sub = grid
    for k in reversed(range(len(shape))):
        if k not in axes:
            sub = sub.narrow(k, 0, 1)
    return axes, int(sub.sum())


class SeparableMask:
    """``C_OO = s²(K_S ⊗ K_B) + σ² I`` diagonalised (module docstring), no autograd.

    Args:
        factors: the ``K_k`` of every axis (grid order). outputscale: ``s²``. noise: ``σ²``.
        observed: bool grid of observed cells (flat, length ``N``), constant along at least one axis.
        masked: the axes ``A`` it depends on (:func:`mask_axes`).
    """

    def __init__(self, factors: list[Tensor], outputscale: Tensor, noise: Tensor, observed: Tensor,
                 masked: list[int]):
        d = len(factors)
        self.sizes = [f.shape[0] for f in factors]
        self.A = list(masked)
        self.B = [k for k in range(d) if k not in self.A]
        self.perm = self.A + self.B
        self.inv_perm = [self.perm.index(k) for k in range(d)]
        self.n_a = math.prod(self.sizes[k] for k in self.A)
        self.n_b = math.prod(self.sizes[k] for k in self.B)
        self.observed = observed
        grid = observed.reshape(self.sizes).permute(self.perm).reshape(self.n_a, self.n_b)
        self.s_idx = torch.nonzero(grid[:, 0]).reshape(-1)  # S as flat indices of grid_A
        # per-axis coordinates of S (row-major over A)
        coords, rest = [], self.s_idx
        for k in reversed(self.A):
            coords.append(rest % self.sizes[k])
            rest = torch.div(rest, self.sizes[k], rounding_mode="floor")
        coords.reverse()
        self.coords = coords
        self.s2 = outputscale.detach()
        self.noise = noise.detach()
        f = [x.detach() for x in factors]
        self.factors = f
        self.k_s = self.gram_s(f)
        # decomposed in float64 (as KronEigen's factors are, by symmetric_eig), whatever the model's dtype: a float32
        # eigh misplaces K_S's small eigenvalues by ~eps·‖K_S‖, which a small σ² magnifies (8×9×10, 20 % of the
        # points masked, noise 1e-5: the float32 likelihood 1e-3 to 2e-3 off the float64 one of the same float32
        # factors, 1e-6 to 2e-5 after; tests/test_separable_mask.py)
        sym = 0.5 * (self.k_s + self.k_s.mT)
        mu, vecs = torch.linalg.eigh(sym.to(torch.float64))  # (no copy of a float64 one)
        mu, self.V = mu.to(self.k_s.dtype), vecs.to(self.k_s.dtype)
        del sym, vecs
        self.mu = mu.clamp_min(0)
        self.eig_b = KronEigen([f[k] for k in self.B])
        self.lam_b = self.eig_b.eigvals()
        self.D = self.s2 * self.mu.unsqueeze(-1) * self.lam_b + self.noise  # (|S|, n_B)
        self.P = 1.0 / self.D
        self._eig = None

    @property
    def n_points(self) -> int:
        return self.s_idx.numel()

    def gram_s(self, factors: list[Tensor]) -> Tensor:
        """``K_S = (⊗_{k∈A} K_k)[S, S]`` (with autograd in ``factors``)."""
        out = None
        for k, c in zip(self.A, self.coords):
            g = factors[k][c][:, c]
            out = g if out is None else out * g
        return out

    # ------------------------------------------------------------------ layout

    def to_sb(self, v: Tensor) -> Tensor:
        """Grid columns ``(N, t)`` → the observed block ``(t, |S|, n_B)``."""
        t, d = v.shape[-1], len(self.sizes)
        x = v.reshape(*self.sizes, t).permute(d, *self.perm).reshape(t, self.n_a, self.n_b)
        return x[:, self.s_idx]

    def from_sb(self, x: Tensor) -> Tensor:
        """The block ``(t, |S|, n_B)`` → grid columns ``(N, t)``, zero at missing cells."""
        t = x.shape[0]
        full = x.new_zeros(t, self.n_a, self.n_b)
        full[:, self.s_idx] = x
        perm_sizes = [self.sizes[k] for k in self.perm]
        full = full.reshape(t, *perm_sizes).permute(*[1 + i for i in self.inv_perm], 0)
        return full.reshape(-1, t)

    # ------------------------------------------------------------------ C_OO⁻¹

    def to_eig(self, x: Tensor) -> Tensor:
        """``Vᵀ X Q`` for blocks ``(t, |S|, n_B)``."""
        return self.V.mT @ self.eig_b.to_eigbasis_rows(x)

    def from_eig(self, x: Tensor) -> Tensor:
        """``V X Qᵀ`` for blocks ``(t, |S|, n_B)``."""
        return self.eig_b.from_eigbasis_rows(self.V @ x)

    def apply(self, v: Tensor) -> Tensor:
        """``C_OO⁻¹ v_O`` zero-filled, for grid columns ``v`` (``(N, t)``)."""
        return self.from_sb(self.from_eig(self.P * self.to_eig(self.to_sb(v))))

    def lml_terms(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rᵀα, Σ log D, α)`` for the residual ``r`` (length ``N``); ``α`` as a block ``(|S|, n_B)``."""
        rt = self.to_eig(self.to_sb(r.unsqueeze(-1)))[0]
        at = rt * self.P
        return (rt * at).sum(), torch.log(self.D).sum(), self.from_eig(at.unsqueeze(0))[0]

    # ------------------------------------------------------------------ posterior

    @property
    def eig(self) -> KronEigen:
        """The full grid's ``⊗K_k`` decomposition (for prior samples)."""
        if self._eig is None:
            self._eig = KronEigen(self.factors)
        return self._eig

    @property
    def lam(self) -> Tensor:
        """``s² ⊗λ_k`` over the full grid."""
        return self.s2 * self.eig.eigvals()

    def cross_a(self, rows: Optional[slice] = None) -> Tensor:
        """``K_A[a, S]`` for the points ``a`` of ``grid_A`` in ``rows`` (``(n, |S|)``)."""
        idx = torch.arange(self.n_a, device=self.s_idx.device)
        if rows is not None:
            idx = idx[rows]
        out = None
        for k in reversed(self.A):
            ck = idx % self.sizes[k]
            idx = torch.div(idx, self.sizes[k], rounding_mode="floor")
            g = self.factors[k][ck][:, self.coords[self.A.index(k)]]
            out = g if out is None else out * g
        return out

    def grid_variance(self, chunk_elements: int = VARIANCE_CHUNK) -> Tensor:
        """``diag(K − K_{·O} C_OO⁻¹ K_{O·})`` over the grid (length ``N``, grid order), in blocks of
        :func:`variance_rows` points of ``grid_A``."""
        prior = self.s2 * kron_vector([f.diagonal() for f in self.factors])
        qq = [q * q for q in self.eig_b.vecs]
        w = kron_matmul(qq, (self.P * self.lam_b * self.lam_b).mT)  # (n_B, |S|)
        size = variance_rows(self.n_points, self.n_b, chunk_elements)
        red = []
        for start in range(0, self.n_a, size):
            h = self.cross_a(slice(start, start + size)) @ self.V
            red.append((h * h) @ w.mT)
        red = (self.s2 * self.s2) * torch.cat(red)  # (n_A, n_B)
        perm_sizes = [self.sizes[k] for k in self.perm]
        red = red.reshape(perm_sizes).permute(self.inv_perm).reshape(-1)
        return prior - red


def lml_surrogate(sm: SeparableMask, alpha: Tensor, outputscale: Tensor, noise: Tensor,
                  factors: list[Tensor]) -> Tensor:
    """A 0-dim tensor whose gradient in ``s²``, ``σ²`` and ``factors`` is that of ``log p`` with the
    residual held fixed (module docstring; its value is not ``log p``): ``½ αᵀ C(θ) α − ½ (s² eᵀPg + σ² ΣP)``
    for the block ``α`` (``(|S|, n_B)``, detached)."""
    k_s = sm.gram_s(factors)
    f_b = [factors[k] for k in sm.B]
    k_alpha = matmul_kron((k_s @ alpha).unsqueeze(0), f_b)[0]  # K_S α K_B
    data = 0.5 * (outputscale * (alpha * k_alpha).sum() + noise * (alpha * alpha).sum())
    e = ((sm.V.mT @ k_s) * sm.V.mT).sum(-1)  # diag(Vᵀ K_S V)
    g = kron_vector([((q.mT @ f) * q.mT).sum(-1) for q, f in zip(sm.eig_b.vecs, f_b)])  # ⊗ diag(Qᵀ K Q)
    logdet = outputscale * (e @ sm.P @ g) + noise * sm.P.sum()
    return data - 0.5 * logdet
