"""A float32 model's representation error (:mod:`kronegp.models._representation`): the estimate against
the actual difference between the float32 model's likelihood and its float64 twin's, both by a dense
float64 Cholesky of ``C_OO`` (the float32 factors widened, and the same kernels evaluated in float64,
the same output scale, noise and residual), on every path; the warning where it is large, none where
it is not or in float64."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from _helpers import dense_kron
from kronegp import GridGP, kron_matmul
from kronegp.models._dense import dense_lml
from kronegp.models._representation import REPRESENTATION_NATS, twin_factors

SHAPE = (8, 9, 10)


def _data(shape, seed=0):
    """A smooth draw (Matérn 5/2, lengthscale 0.2 on [0, 1]) plus noise of sd 0.1, float64."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for n in shape]
    chols = []
    for ax in axes:
        d = (ax[:, None] - ax[None, :]).abs() / 0.2
        k = (1 + math.sqrt(5) * d + 5 / 3 * d * d) * torch.exp(-math.sqrt(5) * d)
        chols.append(torch.linalg.cholesky(k + 1e-8 * torch.eye(len(ax), dtype=torch.float64)))
    f = kron_matmul(chols, torch.randn(math.prod(shape), 1, generator=g, dtype=torch.float64)).reshape(shape)
    return f + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64), axes, g


def _model(*, cell=None, noise=None, missing=None, dtype=torch.float32, lengthscale=0.5, shape=SHAPE, **kw):
    """A model whose noise is far below the data's (sd 0.1): ``cell = (lo, hi)``, per-cell noise
    log-uniform in that range, or ``noise``, a homoskedastic one (both relative to the signal's
    variance 1); ``missing``: ``"few"`` (two cells), ``"scatter"`` (10 %), ``"separable"`` (a mask
    constant along the last axis)."""
    y, axes, g = _data(shape)
    mask = None
    if missing == "few":
        mask = torch.ones(shape, dtype=torch.bool)
        mask[1, 2, 3] = mask[2, 3, 1] = False
    elif missing == "scatter":
        mask = torch.rand(shape, generator=g) > 0.1
    elif missing == "separable":
        mask = (torch.rand(shape[:2], generator=g) > 0.2).unsqueeze(-1).expand(shape).clone()
    per_cell = None
    if cell is not None:
        lo, hi = cell
        per_cell = lo * (hi / lo) ** torch.rand(shape, generator=g, dtype=torch.float64)
    hp = {"lengthscales": [lengthscale] * len(shape), "outputscale": 1.0}
    if noise is not None:
        hp["noise"] = noise
    return GridGP(y.to(dtype), [a.to(dtype) for a in axes], mask=mask,
                  noise=None if per_cell is None else per_cell.to(dtype), standardize=False, hyperparameters=hp, **kw)


def _actual(gp) -> float:
    """The float64 twin's log likelihood minus the float32 model's, both by a dense float64 Cholesky
    of ``C_OO`` (nats): the same output scale, noise and residual, the factors the float32 ones widened
    and the same kernels evaluated in float64."""
    with torch.no_grad():
        r = (gp.y - gp._mean_grid()).double()
        s2, d = gp.outputscale.double(), gp._fill_noise().double()
        ours = dense_lml([f.double() for f in gp._factors()], s2, d, r, gp.observed)
        twin = dense_lml(twin_factors(gp), s2, d, r, gp.observed)
    return float(twin - ours)


def _evaluated(gp):
    """``log_marginal_likelihood()`` under no_grad, with the representation warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            value = gp.log_marginal_likelihood()
    assert not value.requires_grad
    return value, [w for w in caught if "dtype=torch.float64" in str(w.message)]


LARGE = {  # (model arguments, the path the model takes)
    "cell 1e-8..1e-4": (dict(cell=(1e-8, 1e-4)), "cg"),
    "cell 1e-6..1e-2, 10 % missing": (dict(cell=(1e-6, 1e-2), missing="scatter"), "cg"),
    "cell 1e-6..1e-2, probes": (dict(cell=(1e-6, 1e-2), lengthscale=1.0, exact_trace_limit=0), "cg"),
    "homoskedastic 1e-5": (dict(noise=1e-5), "exact"),
    "homoskedastic 1e-5, 2 missing": (dict(noise=1e-5, missing="few"), "exact-missing"),
    "homoskedastic 1e-5, separable mask": (dict(noise=1e-5, missing="separable"), "separable-mask"),
    "homoskedastic 1e-5, 10 % missing": (dict(noise=1e-5, missing="scatter", path="cg"), "cg"),
}


@pytest.mark.parametrize("name", list(LARGE))
def test_the_estimate_follows_the_float64_twin_and_warns(name):
    """Noise 1e-8…1e-2 of the signal, far below the data's: the estimate is within a factor 3 of the
    dense float64 difference (measured: within 0.2 %), past every reported error, and the warning gives it."""
    kwargs, path = LARGE[name]
    gp = _model(**kwargs)
    assert gp.path == path
    value, caught = _evaluated(gp)
    info = gp.last_solve
    actual = _actual(gp)
    assert abs(actual) > REPRESENTATION_NATS  # the case is one the warning is for
    assert info.representation_error is not None
    assert actual / 3 <= info.representation_error <= 3 * actual if actual > 0 else \
        3 * actual <= info.representation_error <= actual / 3
    reported = max(info.lml_error or 0.0, info.lml_std_error or 0.0)
    assert abs(info.representation_error) > reported
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert msg.startswith("GridGP.log_marginal_likelihood: ") and f"~{info.representation_error:.3g} nats" in msg
    # once per model: the next call reports it, and does not warn again
    assert not _evaluated(gp)[1] and gp.last_solve.representation_error == pytest.approx(info.representation_error)


@pytest.mark.parametrize("kwargs", [dict(cell=(0.1, 0.1001)), dict(cell=(0.1, 0.1001), missing="scatter"),
                                    dict(noise=0.1), dict(noise=0.1, missing="few")])
def test_a_benign_float32_model_reports_a_small_error_without_warning(kwargs):
    """Noise 0.1 of the signal: the estimate still follows the twin (within a factor 3, or below 1e-6
    nats), far below a nat, and nothing warns."""
    gp = _model(**kwargs)
    _, caught = _evaluated(gp)
    est, actual = gp.last_solve.representation_error, _actual(gp)
    assert not caught and abs(est) < 1e-2 * REPRESENTATION_NATS
    assert abs(est - actual) <= 2 / 3 * abs(actual) + 1e-6


@pytest.mark.parametrize("kwargs", [dict(cell=(1e-8, 1e-4)), dict(noise=1e-5)])
def test_float64_models_estimate_nothing(kwargs):
    gp = _model(dtype=torch.float64, **kwargs)
    _, caught = _evaluated(gp)
    assert not caught and gp.last_solve.representation_error is None


def test_the_training_step_skips_it_and_a_fit_warns_once_at_its_end():
    """``loss_backward`` makes no estimate (its report has none, no warning); a fit makes one at its
    fitted hyperparameters, in its one warning; the gradient a caller back-propagates is the plain
    likelihood's."""
    gp = _model(noise=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gp.loss_backward()
    assert gp.last_solve.representation_error is None and not caught
    grads = [p.grad.clone() for p in gp.parameters() if p.grad is not None]
    for p in gp.parameters():
        p.grad = None
    (-gp.log_marginal_likelihood() / gp.n_observed).backward()  # with grad: the value keeps its graph
    assert all(torch.allclose(a, p.grad) for a, p in zip(grads, [p for p in gp.parameters() if p.grad is not None]))
    # the kernels and the noise fixed, so that the error stays large (the fit moves the output scale and the mean)
    for p in [gp.raw_noise, *gp.kernels.parameters()]:
        p.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gp.fit(iters=2, progress=False)
    ours = [w for w in caught if "dtype=torch.float64" in str(w.message)]
    assert len(ours) == 1 and str(ours[0].message).startswith("GridGP.fit: ")
    assert gp.last_solve.representation_error is not None


@pytest.mark.parametrize("lengthscale", [0.5, 1.0])
def test_the_dense_path_of_a_float32_model_computes_in_float64(lengthscale):
    """Per-cell noise with 10 % missing on 8×9×10 (648 observed cells: the dense path, a Cholesky of ``C_OO``). It runs
    in float64, so a float32 model's likelihood is the float64 value of its own float32 factors up to the value's own
    rounding, and its gradient that value's; a float32 Cholesky was 55 (lengthscale 0.5) and 6.1e4 nats (1.0) off."""
    gp = _model(cell=(1e-6, 1e-2), missing="scatter", lengthscale=lengthscale)
    assert gp.path == "cg" and gp.inference.dense(gp)
    params = [p for p in gp.parameters() if p.requires_grad]
    value = gp._lml()
    assert value.dtype == torch.float32
    grads = torch.autograd.grad(value, params)
    # the same model's parameters through its own float32 factors, widened, then everything in float64
    obs = gp.observed
    K = gp.outputscale.double() * dense_kron([f.double() for f in gp._factors()])
    C = K[obs][:, obs] + torch.diag(gp.cell_noise.double()[obs])
    r = (gp.y.double() - gp._mean_grid().double())[obs]
    L = torch.linalg.cholesky(C)
    a = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    ref = -0.5 * (r * a).sum() - torch.log(L.diagonal()).sum() - 0.5 * r.numel() * math.log(2 * math.pi)
    assert abs(float(value) - float(ref)) <= 4 * torch.finfo(torch.float32).eps * abs(float(ref))
    ours, wide = (torch.cat([g.double().reshape(-1) for g in gs]) for gs in (grads, torch.autograd.grad(ref, params)))
    assert float((ours - wide).norm()) <= 1e-4 * float(wide.norm())  # the float32 gradient's own rounding
