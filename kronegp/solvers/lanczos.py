"""Lanczos tridiagonals from CG coefficients, and stochastic Lanczos quadrature (SLQ).

Preconditioned CG on ``A`` with preconditioner ``M`` is the Lanczos process on the
symmetric matrix ``H = M^{½} A M^{½}`` started from ``q₁ = M^{½} b / ‖M^{½} b‖``. After
``k`` iterations with coefficients ``α_0…α_{k−1}``, ``β_0…β_{k−2}``, the Lanczos
tridiagonal ``T`` (``k × k``) is::

    T[i, i]     = 1/α_i + β_{i−1}/α_{i−1}      (β_{−1}/α_{−1} = 0)
    T[i, i+1]   = T[i+1, i] = √β_i / α_i

and Gauss quadrature gives ``q₁ᵀ f(H) q₁ ≈ e₁ᵀ f(T) e₁ = Σ_m V[0, m]² f(θ_m)`` with
``T = V diag(θ) Vᵀ``.

SLQ: for probes ``z_s ~ N(0, M⁻¹)`` the whitened vectors ``M^{½} z_s`` are standard normal
with squared norm ``z_sᵀ M z_s`` (the first ``rᵀ z`` of CG), so::

    log det(M^{½} A M^{½}) = tr log H ≈ (1/S) Σ_s (z_sᵀ M z_s) · e₁ᵀ log(T_s) e₁

and ``log det A = log det(M⁻¹) + tr log H``; the caller adds ``log det(M⁻¹)``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from kronegp.solvers.cg import CGResult

__all__ = ["cg_tridiagonals", "slq_logdet_correction"]


def cg_tridiagonals(alphas: Tensor, betas: Tensor, steps: Tensor) -> list[Tensor]:
    """The Lanczos tridiagonal of each column from its CG coefficients.

    Args:
        alphas, betas: ``(K, t)`` coefficients of ``K`` CG iterations for ``t`` columns
            (the ``alphas``/``betas`` of :class:`~kronegp.solvers.CGResult` with no batch).
        steps: ``(t,)`` how many iterations each column ran (its ``column_iterations``).

    Returns:
        ``t`` symmetric tridiagonal matrices, column ``j``'s of size ``steps[j]``.
    """
    if alphas.dim() != 2 or betas.shape != alphas.shape:
        raise ValueError(
            "alphas and betas must both have shape (K, t); got "
            f"{tuple(alphas.shape)} and {tuple(betas.shape)}"
        )
    out = []
    for j in range(alphas.shape[1]):
        k = int(steps[j])
        a = alphas[:k, j]
        b = betas[:k, j]
        # A column that reached an exact solution has α = 0 from there on: stop before it.
        good = int((a > 0).cumprod(0).sum())
        a, b = a[:good], b[:good]
        diag = 1.0 / a
        if good > 1:
            diag = diag + torch.cat([a.new_zeros(1), b[:-1] / a[:-1]])
        off = b[:-1].clamp_min(0).sqrt() / a[:-1]
        out.append(torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1))
    return out


def slq_logdet_correction(result: CGResult, columns: slice | list[int] | None = None) -> Tensor:
    """SLQ estimate of ``log det(M^{½} A M^{½})`` from a CG run on probe right-hand sides.

    The probes must be drawn from ``N(0, M⁻¹)`` (for ``M = I``: standard normal) and
    solved from ``x0 = 0`` with ``record_lanczos=True``. Returns a 0-dim tensor; add
    ``log det M⁻¹`` to get ``log det A``.

    Args:
        result: the :class:`~kronegp.solvers.CGResult` (no batch dimensions).
        columns: which columns of the run are probes (default: all).
    """
    if result.alphas is None or result.betas is None:
        raise ValueError("result holds no Lanczos coefficients: run block_cg with record_lanczos=True")
    if result.alphas.dim() != 2:
        raise ValueError(
            "slq_logdet_correction takes a CG run without batch dimensions (coefficients of "
            f"shape (K, t)); got {tuple(result.alphas.shape)}"
        )
    cols = range(result.alphas.shape[1]) if columns is None else range(result.alphas.shape[1])[columns] if isinstance(columns, slice) else columns
    cols = list(cols)
    if not cols:
        raise ValueError("no probe columns selected")
    # The tridiagonals are tiny (one row per CG iteration): build and decompose them on the
    # host in float64 (numpy/LAPACK) after one transfer, instead of a GPU eigh (hundreds of
    # launches) or torch ops (tens of µs each) per column.
    dev, dt = result.alphas.device, result.alphas.dtype
    idx = torch.tensor(cols, device=dev)
    packed = torch.cat([
        result.alphas[:, idx].to(torch.float64),
        result.betas[:, idx].to(torch.float64),
        result.column_iterations[idx].to(torch.float64).unsqueeze(0),
        result.initial_rz[idx].to(torch.float64).unsqueeze(0),
    ]).cpu()
    k = result.alphas.shape[0]
    packed = packed.numpy()
    alphas, betas = packed[:k], packed[k : 2 * k]
    steps, weights = packed[2 * k].astype(np.int64), packed[2 * k + 1]
    tiny = torch.finfo(dt).tiny
    total = 0.0
    for j in range(len(cols)):
        diag, off = _tridiagonal_bands(alphas[: steps[j], j], betas[: steps[j], j])
        if diag.size == 0:
            continue  # a zero probe contributes nothing
        # LAPACK's tridiagonal solver (stemr) directly on the two bands: ~20 µs, where a
        # dense torch eigh per column costs ~0.3 ms of host time on the device tool.
        theta, vecs = scipy.linalg.eigh_tridiagonal(diag, off, select="a")
        total += weights[j] * float((vecs[0] ** 2 * np.log(np.maximum(theta, tiny))).sum())
    return torch.tensor(total / len(cols), dtype=dt, device=dev)


def _tridiagonal_bands(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal and off-diagonal of the Lanczos tridiagonal from one column's CG ``α, β``
    (the same matrix as :func:`cg_tridiagonals` builds, as its two bands)."""
    good = int(np.cumprod(a > 0).sum())  # an exact solution leaves α = 0 from there on
    a, b = a[:good], b[:good]
    diag = 1.0 / a
    if good > 1:
        diag[1:] += b[:-1] / a[:-1]
    off = np.sqrt(np.maximum(b[:-1], 0.0)) / a[:-1]
    return diag, off
