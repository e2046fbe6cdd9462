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

**Checking the probes.** The weight ``z_sᵀ M z_s`` of a probe from ``N(0, M⁻¹)`` in ``n``
dimensions is a χ² variable with ``n`` degrees of freedom (``n ± √(2n)``). A weight far outside
that law says the probes are not what the estimator assumes, and that is the one error the
estimate cannot see in itself: probes seeded like the mask they were used with (``torch.randn``
in float32 is ``torch.rand``'s stream transformed, so ``seed + 1`` for both gave a column 30σ
small, and a 32³ likelihood 100 nats high in float32, where float64 was right). Given ``dof``,
:func:`slq_logdet_correction` checks every probe's weight (:func:`implausible_probes`) and
reports one outside the law (:func:`kronegp.solvers.report.finding`: one ``RuntimeWarning`` per
likelihood or fit) with what the estimate would be without it.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.special
import torch
from torch import Tensor

from kronegp import device
from kronegp.solvers.cg import CGResult
from kronegp.solvers.report import finding

__all__ = ["LanczosOnHost", "PROBE_TAIL", "cg_tridiagonals", "implausible_probes", "slq_logdet_correction",
           "slq_logdet_on_device", "tridiagonal_bands"]

#: A probe weight whose two-sided χ² tail probability is below this is reported: ~6σ for a large
#: ``n``; a million probe columns over a fit leave a false report at 1e-3.
PROBE_TAIL = 1e-9


def tridiagonal_bands(alphas, betas, steps):
    r"""The two bands of every column's Lanczos tridiagonal, from its CG coefficients::

        T[k, k] = 1/α_k + β_{k−1}/α_{k−1},   T[k, k+1] = T[k+1, k] = √β_k / α_k

    over the column's first ``size`` iterations: its ``steps``, cut before the first
    ``α = 0`` (a column that reached an exact solution). Past them the bands are padded with
    ``T[k, k] = 1`` and no coupling, a block decoupled from ``e₁``, so ``e₁ᵀ f(T) e₁`` of the
    padded matrix is that of the column's own tridiagonal.

    Args:
        alphas, betas: ``(K, *batch, t)`` coefficients of ``K`` CG iterations, torch tensors or
            NumPy arrays (the host-side quadrature: a NumPy operation this small costs ~1 µs, a
            torch CPU operator ~10–20).
        steps: ``(*batch, t)`` how many iterations each column ran (``column_iterations``).

    Returns:
        ``diag`` ``(K, *batch, t)``, ``off`` ``(K − 1, *batch, t)`` and ``size`` ``(*batch, t)``,
        of the inputs' kind.
    """
    k_total = alphas.shape[0]
    shape = (k_total,) + (1,) * (alphas.ndim - 1)
    if isinstance(alphas, np.ndarray):
        xp, cat = np, np.concatenate
        k = np.arange(k_total).reshape(shape)
        valid = np.cumprod((k < steps[None]) & (alphas > 0), axis=0).astype(bool)
    else:
        xp, cat = torch, torch.cat
        k = torch.arange(k_total, device=alphas.device).view(shape)
        valid = ((k < steps.unsqueeze(0)) & (alphas > 0)).long().cumprod(0).bool()
    safe_a = xp.where(valid, alphas, 1.0)
    diag = xp.where(valid, 1.0 / safe_a, 1.0)
    # valid is a prefix along K: valid[k] implies valid[k − 1]
    prev = xp.where(valid[1:], betas[:-1] / safe_a[:-1], 0.0)
    diag = cat([diag[:1], diag[1:] + prev])
    off = xp.where(valid[1:], xp.sqrt(xp.maximum(betas[:-1], xp.zeros_like(betas[:-1]))) / safe_a[:-1], 0.0)
    return diag, off, valid.sum(0)


def cg_tridiagonals(alphas: Tensor, betas: Tensor, steps: Tensor) -> list[Tensor]:
    """The Lanczos tridiagonal of each column from its CG coefficients (:func:`tridiagonal_bands`).

    Args:
        alphas, betas: ``(K, t)`` coefficients of ``K`` CG iterations for ``t`` columns
            (the ``alphas``/``betas`` of :class:`~kronegp.solvers.CGResult` with no batch).
        steps: ``(t,)`` how many iterations each column ran (its ``column_iterations``).

    Returns:
        ``t`` symmetric tridiagonal matrices, column ``j``'s of size ``steps[j]`` (fewer if
        it reached an exact solution earlier).
    """
    if alphas.dim() != 2 or betas.shape != alphas.shape:
        raise ValueError(
            "alphas and betas must both have shape (K, t); got "
            f"{tuple(alphas.shape)} and {tuple(betas.shape)}"
        )
    diag, off, size = tridiagonal_bands(alphas, betas, steps)
    out = []
    for j, m in enumerate(size.tolist()):
        o = off[: max(m - 1, 0), j]
        out.append(torch.diag(diag[:m, j]) + torch.diag(o, 1) + torch.diag(o, -1))
    return out


class LanczosOnHost:
    """A CG run's Lanczos coefficients (columns ``columns``) and its largest final residual,
    copied to the host without waiting for GPU work queued after it: the copy is queued on the
    current stream when this is made (pinned memory, non-blocking) and waited for (an event)
    when first read. A caller that queues more GPU work in between overlaps that work with
    the host-side quadrature (:func:`slq_logdet_correction` with ``host=``)."""

    def __init__(self, result: CGResult, columns: slice | list[int] | None = None):
        self.cols = _probe_columns(result, columns)
        self.k = result.alphas.shape[0]
        dev = result.alphas.device
        idx = torch.tensor(self.cols, device=dev)
        flat = torch.cat([
            result.alphas[:, idx].to(torch.float64).reshape(-1),
            result.betas[:, idx].to(torch.float64).reshape(-1),
            result.column_iterations[idx].to(torch.float64),
            result.initial_rz[idx].to(torch.float64),
            result.residual.max().to(torch.float64).reshape(1),
        ])
        self._event = None
        if dev.type == "cuda":
            self._data = torch.empty(flat.shape, dtype=torch.float64, pin_memory=True)
            self._data.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._data = flat

    def packed(self) -> Tensor:
        """``(2k + 2, c)`` host float64: α rows, β rows, iterations, initial ``rᵀz``."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._data[:-1].view(2 * self.k + 2, len(self.cols))

    def residual_max(self) -> float:
        """The run's largest final relative residual (over all its columns)."""
        self.packed()
        return float(self._data[-1])


def _probe_columns(result: CGResult, columns) -> list[int]:
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
    return cols


def _batched_eigh_nosync(mats: Tensor) -> tuple[Tensor, Tensor]:
    """``(λ, V)`` of a batch ``(c, n, n)`` of symmetric float64 matrices without synchronising:
    by the backend's eigensolver (:meth:`kronegp.device.Backend.small_eigh`, cold start: the Jacobi
    kernel on CUDA), else on the CPU by LAPACK. Eigenvectors are the columns of ``V``."""
    backend = device.backend_for(mats)
    capability = backend.eigh_capability(mats)
    if not capability:
        if not mats.is_cuda:
            return torch.linalg.eigh(mats)
        raise RuntimeError(f"slq_logdet_on_device: CUDA tensors need a GPU eigensolver ({capability.reason})")
    n = mats.shape[-1]
    if n > capability.limit:
        raise RuntimeError(
            f"slq_logdet_on_device: tridiagonals of {n} rows exceed the GPU eigensolver's limit of "
            f"{capability.limit} (CG ran too many iterations for the on-device quadrature)"
        )
    pairs = backend.small_eigh([m for m in mats], [None] * mats.shape[0])
    return torch.stack([lam for lam, _ in pairs]), torch.stack([q for _, q in pairs])


def slq_logdet_on_device(result: CGResult, columns: slice | None = None, pad_to: int = 16,
                         per_column: bool = False) -> Tensor:
    """:func:`slq_logdet_correction` computed where the coefficients are, without reading them
    on the host (so a CUDA graph can capture it): the tridiagonals are built as ``(c, K', K')``
    float64 matrices (``K`` iterations rounded up to a multiple of ``pad_to``, the padding a
    block decoupled from ``e₁``, see :func:`tridiagonal_bands`) and decomposed in one batch.

    ``columns``: a slice (the probe columns are a range in every caller), default all.
    """
    cols = _probe_columns(result, columns)
    if cols != list(range(cols[0], cols[-1] + 1)):
        raise ValueError(f"slq_logdet_on_device takes a contiguous range of columns, got {cols}")
    sel = slice(cols[0], cols[-1] + 1)
    dt = result.alphas.dtype
    alphas = result.alphas[:, sel].to(torch.float64)
    betas = result.betas[:, sel].to(torch.float64)
    diag, off, size = tridiagonal_bands(alphas, betas, result.column_iterations[sel])
    k, c = diag.shape
    kp = -(-k // pad_to) * pad_to
    if kp > k:
        diag = torch.cat([diag, diag.new_ones(kp - k, c)])
        off = torch.cat([off, off.new_zeros(kp - k, c)])
    mats = torch.diag_embed(diag.mT) + torch.diag_embed(off.mT, 1) + torch.diag_embed(off.mT, -1)
    theta, vecs = _batched_eigh_nosync(mats.contiguous())
    tiny = torch.finfo(dt).tiny
    quad = (vecs[:, 0, :] ** 2 * torch.log(theta.clamp_min(tiny))).sum(-1)
    weights = result.initial_rz[sel].to(torch.float64)
    values = torch.where(size > 0, weights * quad, torch.zeros_like(quad))
    return values.to(dt) if per_column else (values.sum() / c).to(dt)


def implausible_probes(weights, dof: int) -> list[tuple[int, float, float]]:
    """The probes whose weight ``zᵀMz`` is implausible for ``z ~ N(0, M⁻¹)`` in ``dof`` dimensions
    (a χ² variable, module docstring): ``(index, standard deviations from dof, two-sided tail
    probability)`` for each whose tail probability is below :data:`PROBE_TAIL`, worst first.
    Unit probes (``√S`` times unit vectors of ``S = dof`` cells) weigh exactly ``dof``: never
    reported."""
    if dof < 1:
        raise ValueError(f"dof must be a positive count of dimensions, got {dof}")
    w = np.asarray(weights, dtype=np.float64)
    # two-sided: the smaller tail (regularised incomplete gamma functions: P(χ²_n ≤ w) = P(n/2, w/2)),
    # doubled; scipy.special, not scipy.stats (0.04 s to import against 0.5)
    with np.errstate(divide="ignore"):
        log_tail = np.log(2.0) + np.log(np.minimum(scipy.special.gammainc(dof / 2, w / 2),
                                                   scipy.special.gammaincc(dof / 2, w / 2)))
    sigmas = (w - dof) / np.sqrt(2.0 * dof)
    out = [(int(j), float(sigmas[j]), float(np.exp(log_tail[j]))) for j in np.flatnonzero(log_tail < np.log(PROBE_TAIL))]
    return sorted(out, key=lambda item: -abs(item[1]))


def slq_logdet_correction(
    result: CGResult, columns: slice | list[int] | None = None, host: "LanczosOnHost | None" = None,
    per_column: bool = False,
    dof: int | None = None,
) -> Tensor:
    """SLQ estimate of ``log det(M^{½} A M^{½})`` from a CG run on probe right-hand sides.

    The probes must be drawn from ``N(0, M⁻¹)`` (for ``M = I``: standard normal) and
    solved from ``x0 = 0`` with ``record_lanczos=True``. Returns a 0-dim tensor; add
    ``log det M⁻¹`` to get ``log det A``.

    Args:
        result: the :class:`~kronegp.solvers.CGResult` (no batch dimensions).
        columns: which columns of the run are probes (default: all).
        host: the same run's :class:`LanczosOnHost` (same ``columns``), whose copy was queued
            earlier; otherwise the coefficients are copied here (waiting for the GPU's queue).
        per_column: return each probe's term (a ``(probes,)`` tensor, whose mean is the estimate)
            instead of their mean, for the estimate's spread.
        dof: the dimension ``n`` of the probes' space (e.g. the missing cells of ``G``): check
            each probe's weight against its χ² law and report an implausible one
            (:func:`implausible_probes`, module docstring). ``None``: no check.

    A run of a fixed :class:`~kronegp.solvers.CGSchedule` (``result.converged is None``: a
    computation that must not synchronise) goes to :func:`slq_logdet_on_device` instead.
    """
    if result.converged is None and host is None and isinstance(columns, (slice, type(None))):
        return slq_logdet_on_device(result, columns, per_column=per_column)
    # The tridiagonals are tiny (one row per CG iteration): build and decompose them on the
    # host in float64 (numpy/LAPACK) after one transfer, instead of a GPU eigh (hundreds of
    # launches) or torch ops (tens of µs each) per column.
    if host is None:
        host = LanczosOnHost(result, columns)
    elif host.cols != _probe_columns(result, columns):
        raise ValueError(f"host holds columns {host.cols}, not the requested {columns}")
    dev, dt = result.alphas.device, result.alphas.dtype
    cols = host.cols
    packed = host.packed()
    k = host.k
    packed = packed.numpy()
    diag, off, size = tridiagonal_bands(packed[:k], packed[k : 2 * k], packed[2 * k].astype(np.int64))
    size, weights = size.tolist(), packed[2 * k + 1].tolist()
    tiny = torch.finfo(dt).tiny
    terms = [0.0] * len(cols)  # a zero probe contributes nothing
    for j, m in enumerate(size):
        if m == 0:
            continue
        # LAPACK's tridiagonal solver (stemr) directly on the two bands: ~20 µs, where a
        # dense torch eigh per column costs ~0.3 ms of host time on the device tool.
        theta, vecs = scipy.linalg.eigh_tridiagonal(diag[:m, j], off[: m - 1, j], select="a")
        terms[j] = weights[j] * float((vecs[0] ** 2 * np.log(np.maximum(theta, tiny))).sum())
    estimate = sum(terms) / len(cols)
    if dof is not None:
        _report_implausible(weights, terms, estimate, int(dof))
    if per_column:
        return torch.tensor(terms, dtype=dt, device=dev)
    return torch.tensor(estimate, dtype=dt, device=dev)


def _report_implausible(weights: list[float], terms: list[float], estimate: float, dof: int) -> None:
    """Report probes whose weight is outside its χ² law (:func:`implausible_probes`), with the
    estimate the other probes give: the size of the error they may carry."""
    bad = implausible_probes(weights, dof)
    if not bad:
        return
    j, sig, tail = bad[0]
    others = [t for k, t in enumerate(terms) if k not in {b[0] for b in bad}]
    if others:
        without = sum(others) / len(others)
        effect = (f"the estimate {estimate:.6g} is {without:.6g} without {'it' if len(bad) == 1 else 'them'} "
                  f"(the log likelihood would move by {0.5 * (estimate - without):+.3g} nats)")
    else:
        effect = "every probe is implausible, so nothing measures the error"
    more = f" ({len(bad)} of {len(weights)} probes)" if len(bad) > 1 else ""
    finding(
        "slq_probes",
        f"SLQ log det: probe {j}'s weight zᵀMz = {weights[j]:.6g}, where z ~ N(0, M⁻¹) in {dof} "
        f"dimensions gives {dof} ± {np.sqrt(2.0 * dof):.3g} ({sig:+.1f}σ, two-sided chance {tail:.1e}){more}: "
        f"the probes are not independent standard normal draws (drawn from the seed of the mask "
        f"or the data?); {effect}",
        stacklevel=4)
