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

**Forming G.** ``G = U Yᵀ``. Either one GEMM (``2m²N`` flops), or through the box
``I_1 × … × I_d`` spanned by the missing cells (``I_k`` the indices that occur on axis ``k``,
``b_k = |I_k|``): ``G`` is the submatrix at the missing cells of ``Y (⊗_k Q_k[I_k, :])ᵀ``, one
Kronecker product of the ``m`` rows of ``Y`` with ``n_k × b_k`` factors, which costs
``~2m·N·b_1 + …`` (a contiguous hole: ``b_k`` is its side). The cheaper of the two is taken;
the same choice applies ``G⁻¹`` to ``U`` (the gradient's rows ``G⁻¹Y``).

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

Memory: ``U``, ``Y`` and ``G⁻¹Y`` are ``m × N`` each; :data:`MAX_MISSING_CPU` and
:data:`MAX_MISSING_CUDA` bound ``m`` (GridGP takes this path up to them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["FewMissing", "MAX_MISSING_CPU", "MAX_MISSING_CUDA", "MAX_FORM_ELEMENTS", "few_missing_limit"]

#: Most missing cells for the exact few-missing path on a CPU. Measured on a 2-core CPU
#: (2026-12-07, float64, 20 × 25 × 53 grid, benchmarks/gaps.py --limit): its training step
#: grows ~m²; at this m it still costs less than the CG path's step with exact traces.
MAX_MISSING_CPU = 4096
#: The same on a CUDA device: a default for the lead to calibrate on the H100/H200 with
#: ``python benchmarks/gaps.py --limit --device cuda`` (the m where the exact step's time
#: meets the CG step's).
MAX_MISSING_CUDA = 8192
#: Most elements of one ``m × N`` block (``U``, ``Y``, ``G⁻¹Y``: three are alive at once).
MAX_FORM_ELEMENTS = 1 << 28


def few_missing_limit(device: torch.device) -> int:
    """The largest ``m`` the exact few-missing path takes on ``device``."""
    return MAX_MISSING_CUDA if device.type == "cuda" else MAX_MISSING_CPU


def _rowwise_kron(rows: list[Tensor]) -> Tensor:
    """``out[c] = rows_1[c] ⊗ … ⊗ rows_d[c]`` for ``rows_k`` of shape ``(m, n_k)``: ``(m, Πn_k)``."""
    out = rows[0]
    for r in rows[1:]:
        out = (out.unsqueeze(-1) * r.unsqueeze(-2)).reshape(out.shape[0], -1)
    return out


class FewMissing:
    """``G = X_MM``, its Cholesky factor and the rows built from them, for fixed hyperparameters.

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
        idx = torch.nonzero(missing).reshape(-1)
        self.m = idx.numel()
        # per-axis indices of the missing cells (row-major, the order of ⊗)
        coords, rest = [], idx
        for n in reversed(self.sizes):
            coords.append(rest % n)
            rest = torch.div(rest, n, rounding_mode="floor")
        coords.reverse()
        self.U = _rowwise_kron([q[c] for q, c in zip(eig.vecs, coords)])  # (m, N): rows of Q at M
        self.Y = self.U * self.p  # (Qᵀ X E_M)ᵀ
        # the box spanned by the missing cells, and their positions in it
        self._box = [torch.unique(c) for c in coords]
        box_sizes = [b.numel() for b in self._box]
        pos = torch.zeros_like(idx)
        for c, b, nb in zip(coords, self._box, box_sizes):
            pos = pos * nb + torch.searchsorted(b, c)
        self._pos = pos
        self._box_sizes = box_sizes
        self._box_factors = [q[b] for q, b in zip(eig.vecs, self._box)]  # (b_k, n_k)
        self.G = self._against_rows(self.Y)  # U Yᵀ = Y Uᵀ (symmetric)
        self.G = 0.5 * (self.G + self.G.mT)
        L, info = torch.linalg.cholesky_ex(self.G)
        if int(info) != 0:
            raise FloatingPointError(
                f"GridGP (exact-missing path): G = X_MM over the {self.m} missing cells is not positive "
                "definite in this dtype (the noise is too small for the signal); use float64 or path='cg'"
            )
        self.L = L
        self.logdet_g = 2 * torch.log(L.diagonal()).sum()

    # ------------------------------------------------------------------ products with the rows

    def _kron_cost(self) -> int:
        """Flops of a product of ``m`` grid rows with the box factors (one side of ``U``)."""
        n, b = list(self.sizes), list(self._box_sizes)
        cost, cur = 0, list(n)
        for k in reversed(range(len(n))):  # matmul_kron contracts the last axis first
            cost += 2 * self.m * math.prod(cur) * b[k]
            cur[k] = b[k]
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
            box = coef.new_zeros(coef.shape[0], math.prod(self._box_sizes))
            box[:, self._pos] = coef
            return matmul_kron(box, self._box_factors)
        return coef @ self.U

    # ------------------------------------------------------------------ likelihood

    def lml_terms(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the residual ``r`` zero at missing cells (length ``N``): ``(quad, α̃, left, right)``
        with ``quad = rᵀα``, ``α̃ = Qᵀα`` (row ``(1, N)``) and the log det G gradient's rows
        ``left = G⁻¹Y``, ``right = Y`` (``(m, N)``, eigen-coordinates): see the module docstring."""
        rt = self.eig.to_eigbasis_rows(r.unsqueeze(0))  # (1, N)
        xr_m = self.Y @ rt[0]  # [X r]_M
        g = torch.cholesky_solve(xr_m.unsqueeze(-1), self.L).squeeze(-1)
        alpha_t = self.p * (rt - g.unsqueeze(0) @ self.U)
        quad = (rt * alpha_t).sum()
        ginv = torch.cholesky_inverse(self.L)
        left = self._rows_from(ginv) * self.p  # G⁻¹ U diag(p) = G⁻¹Y (G⁻¹ symmetric)
        return quad, alpha_t, left, self.Y

    # ------------------------------------------------------------------ posterior

    def apply(self, v: Tensor) -> Tensor:
        """``Z v = C_OO⁻¹ v_O`` zero-filled, for columns ``v`` (``(N, t)``)."""
        vt = self.eig.to_eigbasis(v)  # (N, t)
        w = torch.cholesky_solve(self.Y @ vt, self.L)  # G⁻¹ Bᵀ v
        out = self.eig.from_eigbasis(self.p.unsqueeze(-1) * vt - self.Y.mT @ w)
        return (~self.missing).to(out.dtype).unsqueeze(-1) * out

    def grid_variance(self) -> Tensor:
        """``diag(K − K Z K)`` over the grid (length ``N``)."""
        full = self.eig.diag_of(self.lam * self.noise * self.p)
        t = self.eig.from_eigbasis((self.lam * self.Y).mT)  # K B (N, m)
        tl = torch.linalg.solve_triangular(self.L, t.mT, upper=False)  # L⁻¹ Bᵀ K  (m, N)
        return full + (tl * tl).sum(0)
