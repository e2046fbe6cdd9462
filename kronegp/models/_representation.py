"""How far a float32 model's likelihood is from the same model's in float64: its representation error.

A float32 :class:`~kronegp.GridGP` evaluates its kernel factors ``K_k`` in float32, each entry
rounded (~6e-8 relative). Its covariance ``C = s² ⊗K_k + D`` is then not the float64 model's
``C + E``, and ``cond(C)`` amplifies ``E``: with per-cell noise 1e-4 of the signal a 128³ float32
likelihood was 2000 nats (2.9e-4) off its float64 twin while the probes' standard error said 9e-6
(NOTES.md, nineteenth session). No solver removes that: it is the model's representation, not its
arithmetic. To first order in ``E`` (``α = C_OO⁻¹ r_O``)::

    log p₆₄ − log p₃₂ ≈ ½ αᵀ E_OO α − ½ tr(C_OO⁻¹ E_OO) = Σ_k ⟨∂ log p / ∂K_k, ΔK_k⟩

with ``ΔK_k`` the float64 evaluation of the same kernel (its parameters widened, on the widened
axis) minus the float32 factor, widened: ``E = s² Σ_k K_1 ⊗ … ΔK_k … ⊗ K_d`` (to first order),
so ``⟨∂ log p/∂C, E⟩`` is the likelihood's gradient with respect to each factor, contracted with
``ΔK_k``. Every path already computes that gradient — analytic on the exact, exact-missing and
separable-mask paths and the dense likelihood, the stochastic trace estimate with the model's own
probes on the cg path — so the estimate is one backward pass to the factors (no new solve, no new
grid vector) and ``d`` dot products of ``n_k × n_k`` matrices. The output scale and the noise are
the model's own values in both dtypes (``E`` has no term in them; per-cell noise is a buffer,
widened exactly).

It is first order: where the float32 rounding moves ``C``'s smallest eigenvalues by as much as the
noise (``cond(C) · eps32 ≳ 1``, typically with a float32 factor whose smallest eigenvalues fall below
zero, which the eigendecomposition clamps to 0), it gives the order of magnitude only: on 64³ with a
lengthscale of 0.3 of the axis and noise 1e-5, 2.6e5 nats against the actual 1.3e4; with noise 1e-3,
7.4 against −22 (the float64 likelihood of the float32 factors against the twin's, exact path). The
warning then says that a factor is not positive definite.

The two terms nearly cancel when the data are a draw of the model (``E[αᵀEα] = tr(C⁻¹E)``: 0.011
against 0.011 nats on 16³, leaving 4e-5); the error is large where the model's noise is smaller than
the data's (the quadratic term: 32 nats on 16³ with per-cell noise 1e-8…1e-4, 0.04 with 1e-4…1, the
measured difference 32.43 and 0.037). The estimate agreed with the dense float64 difference to 1 %
in every case measured (NOTES.md, "The float32 likelihood's representation error").

When it is computed (:func:`checked_lml`): on direct :meth:`GridGP.log_marginal_likelihood
<kronegp.GridGP.log_marginal_likelihood>` calls of a model below float64, and once at the end of each
:meth:`~kronegp.GridGP.fit` (at the fitted hyperparameters); never in the training step itself
(:meth:`~kronegp.GridGP.loss_backward`, the CUDA graph). It costs the likelihood's backward pass
to the factors (about one more evaluation) and the ``d`` float64 factors.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from kronegp.linalg import symmetric_eig
from kronegp.models._params import kernel_factors
from kronegp.solvers.report import finding

__all__ = ["REPRESENTATION_NATS", "checked_lml", "representation_error", "twin_factors", "watch_factors"]

#: The representation error (nats) below which a float32 model does not warn, whatever the solver's
#: reported error: a likelihood ratio of ``e``, the smallest difference a model comparison or a
#: likelihood-ratio test reads (a float32 likelihood of ≤ 1.7e7 nats resolves it; larger ones warn
#: only past their own rounding, ``eps · |log p|``: :func:`warn_threshold`).
REPRESENTATION_NATS = 1.0


def estimated(dtype: torch.dtype) -> bool:
    """Whether models of ``dtype`` estimate their representation error (below float64's precision)."""
    return torch.finfo(dtype).eps > torch.finfo(torch.float64).eps


def twin_factors(gp) -> list[Tensor]:
    """The kernel factors of ``gp`` evaluated in float64: its kernels with their parameters widened,
    on its axes widened (no autograd). The float64 twin's factors, which ``E`` compares with."""
    with torch.no_grad():
        kernels = [copy.deepcopy(k).to(torch.float64) for k in gp.kernels]
        return [f.detach() for f in kernel_factors(kernels, [a.to(torch.float64) for a in gp.axes])]


@contextmanager
def watch_factors(gp) -> Iterator[list[list[Tensor]]]:
    """Record every set of factors ``gp._factors()`` returns inside the block (a list of lists)."""
    seen: list[list[Tensor]] = []
    gp.__dict__["_factor_watch"] = seen
    try:
        yield seen
    finally:
        gp.__dict__.pop("_factor_watch", None)


def representation_error(gp, value: Tensor, seen: list[list[Tensor]]) -> Optional[float]:
    """``Σ_k ⟨∂ value/∂K_k, ΔK_k⟩`` in nats (float64 twin minus this model, first order; module
    docstring), for the likelihood ``value`` computed from the factor sets ``seen``; ``None`` where
    it does not depend on them (no graph). The graph is kept (``value`` can still be back-propagated)."""
    flat = [f for factors in seen for f in factors]
    if not value.requires_grad or not flat:
        return None
    grads = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
    twin = twin_factors(gp)
    total = torch.zeros((), dtype=torch.float64, device=value.device)
    for i, (f, g) in enumerate(zip(flat, grads)):
        if g is not None:
            k = i % len(twin)
            total += (g.to(torch.float64) * (twin[k] - f.detach().to(torch.float64))).sum()
    return float(total)


def warn_threshold(gp, value: float) -> float:
    """The error (nats) past which :func:`checked_lml` warns: :data:`REPRESENTATION_NATS`, the dtype's
    rounding of the likelihood's value (``eps · |log p|``), and the solver's own reported error
    (``lml_error``, ``lml_std_error``: an error the model already reports is not hidden), whichever
    is largest."""
    extra = gp._last_extra
    solver = [float(extra[k]) for k in ("lml_error", "lml_std_error") if isinstance(extra.get(k), (int, float, Tensor))]
    return max([REPRESENTATION_NATS, torch.finfo(gp.y.dtype).eps * abs(value), *solver])


def checked_lml(gp, evaluate: Callable[[], Tensor], *, once: bool) -> Tensor:
    """``evaluate()`` (the likelihood), with its representation error in ``gp._last_extra`` and a
    :func:`~kronegp.solvers.report.finding` where it passes :func:`warn_threshold` (with ``once``, only
    if the model has not warned of it before: a direct call; a fit warns once for itself). A model
    below float64 evaluates with gradients (to its factors) even under ``torch.no_grad()``, and
    returns the value detached there."""
    if not estimated(gp.y.dtype):
        return evaluate()
    grad_outside = torch.is_grad_enabled()
    with torch.enable_grad(), watch_factors(gp) as seen:
        value = evaluate()
    error = representation_error(gp, value, seen)
    gp._last_extra["representation_error"] = error
    if error is not None:
        number = float(value.detach())
        bound = warn_threshold(gp, number)
        if math.isfinite(error) and abs(error) > bound and not (once and gp.__dict__.get("_warned_representation")):
            gp.__dict__["_warned_representation"] = True
            lowest = min(float(lam.min()) for lam, _ in symmetric_eig([f.detach() for f in seen[-1]]))
            caveat = ("" if lowest > 0 else
                      f"; a float32 factor is not positive definite (smallest eigenvalue {lowest:.2g}, taken as 0), "
                      "where a first-order estimate can be off by an order of magnitude")
            finding("representation", (
                f"the log likelihood in {str(gp.y.dtype).replace('torch.', '')} is ~{error:.3g} nats "
                f"off the same model in float64 (first-order estimate: the kernel factors' rounding, amplified by "
                f"cond(C); {abs(error) / max(abs(number), 1e-300):.2g} of its value {number:.8g}), more than "
                f"{bound:.2g} nats (the largest of the solver's reported error, {REPRESENTATION_NATS:g} nat and the value's "
                "rounding); no solver removes it: "
                f"build the model with dtype=torch.float64 (gp.last_solve.representation_error has the estimate){caveat}"))
    return value if grad_outside else value.detach()
