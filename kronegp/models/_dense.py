"""Small grids with per-cell noise: the likelihood by a dense Cholesky of ``C_OO``.

Notation of :mod:`kronegp.models._masked`: ``C_OO = s² (⊗K_k)_OO + D_O`` over the ``n`` observed
cells. When every cell has its own noise variance, no Kronecker identity inverts ``C``, and the
cg path's cost is its iterations (hundreds when the noise spans 1e4: the spectrum of the
preconditioned ``C`` spans the range of ``d/σ̄²``) times its columns; on a small grid those
columns are one unit probe per cell (``exact_trace_limit``), so a 10³ grid ran 236 iterations
on 1001 columns (22.7 s a step on a 2-core CPU, where GPyTorch took 0.12 s).

Formed densely instead (``n²`` entries, the Kronecker product of the factors restricted to the
observed cells), ``C_OO = L Lᵀ`` costs ``n³/3`` flops and gives everything exactly, with no
probes::

    log p = −½ rᵀ C_OO⁻¹ r − Σ log L_ii − (n/2) log 2π

and its gradient in every hyperparameter (the factors, ``s²``, the mean) by autograd through
the Cholesky (``∂ log p = ½ αᵀ ∂C α − ½ tr(C⁻¹ ∂C) + αᵀ∂μ``, formed by torch's Cholesky
backward in another ``~n³`` flops). That is the right tool while ``n³`` is smaller than the cg
path's ``iterations × columns × (Kronecker product of N cells)``: :data:`DENSE_MAX_CPU` and
:data:`DENSE_MAX_CUDA` bound ``n`` (measured by ``benchmarks/cell_noise.py``).
Predictions stay on the cg path (one solve per right-hand side, checked on the observed cells).

It is computed in float64 whatever the model's dtype (the result cast back): with ``n ≤ 1024`` that
costs nothing next to the step, and a float32 Cholesky of an ill-conditioned ``C_OO`` is silently wrong
(8×9×10, lengthscale 1, per-cell noise 1e-6…1e-2 of the signal, 10 % missing: 6.1e4 nats off the same
factors' float64 value; the float32 factors' own rounding, which no arithmetic removes, is what
:mod:`kronegp.models._representation` estimates).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import torch
from torch import Tensor

__all__ = ["DENSE_MAX_CPU", "DENSE_MAX_CUDA", "dense_limit", "dense_lml"]

#: Observed cells up to which the cg path's likelihood with per-cell noise is a dense Cholesky on
#: a CPU. Measured by ``benchmarks/cell_noise.py`` (float64, one thread, 2-core CPU shared with
#: other jobs, 2026-12-07): 10³ cells 0.26 s (dense) against 0.27 s (cg, 16 random probes) and
#: 22.7 s (cg, the 1000 unit probes it used there); 13³ 3.1 s against 0.49 s; 16³ 15 s against 0.70 s.
#: The crossover is near 1000 cells; 1024 is also ``exact_trace_limit``'s default, so at default
#: settings the per-cell-noise system never runs one unit probe per cell.
DENSE_MAX_CPU = 1024
#: The same on a GPU (not measured there yet: the CPU value, where a dense Cholesky is
#: relatively cheaper, so it is a lower bound of the crossover).
DENSE_MAX_CUDA = 1024


def dense_limit(device: torch.device) -> int:
    """Observed cells up to which the dense likelihood is used on ``device``."""
    return DENSE_MAX_CUDA if torch.device(device).type == "cuda" else DENSE_MAX_CPU


def dense_lml(factors: list[Tensor], outputscale: Tensor, noise: Tensor, resid: Tensor,
              observed: Optional[Tensor]) -> Tensor:
    """``log N(r_O | 0, C_OO)`` (constant included), differentiable in every argument.

    Args:
        factors: the kernel factors ``K_k`` (with gradient).
        outputscale: ``s²``.
        noise: ``d`` on the full grid (values at missing cells are ignored).
        resid: ``r = y − μ`` on the grid (with the mean's gradient; missing cells ignored).
        observed: bool grid of observed cells, or ``None`` (all observed).

    Returns:
        the log density in ``resid``'s dtype, computed in float64 (module docstring).

    Raises:
        torch.linalg.LinAlgError: ``C_OO`` is not positive definite in float64 (the caller falls back
            to CG).
    """
    dtype, wide = resid.dtype, torch.float64
    factors = [f.to(wide) for f in factors]
    outputscale, noise, resid = torch.as_tensor(outputscale).to(wide), noise.to(wide), resid.to(wide)
    K = reduce(torch.kron, factors)
    if observed is not None:
        idx = torch.nonzero(observed).squeeze(-1)
        K, noise, resid = K[idx][:, idx], noise[idx], resid[idx]
    C = outputscale * K + torch.diag_embed(noise)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"C_OO is not positive definite in {C.dtype} (leading minor {int(info)})")
    a = torch.cholesky_solve(resid.unsqueeze(-1), L).squeeze(-1)
    n = resid.shape[0]
    return (-0.5 * (resid * a).sum() - torch.log(L.diagonal()).sum() - 0.5 * n * math.log(2 * math.pi)).to(dtype)
