"""GridGP's training step replayed from a CUDA graph (``loss_backward``, ``kronegp.models._graph``)
against the same step run eagerly: loss, gradients, CG counts; re-recording when the graph's
assumptions break. CPU: the choice of path and its errors."""

import copy
import gc
import math
import warnings

import gpytorch
import pytest
import torch

from _helpers import rel_err
from kronegp import linalg
from kronegp.models import GridGP


def _data(kind, dtype, n=(14, 12, 10), device="cpu"):
    g = torch.Generator().manual_seed(11)
    axes = [torch.linspace(0, 1, k, dtype=torch.float64) for k in n]
    y = (torch.sin(5 * axes[0])[:, None, None] * torch.cos(3 * axes[1])[None, :, None]
         + 0.3 * axes[2][None, None, :] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64))
    kw = {}
    if kind in ("missing", "both"):
        kw["mask"] = (torch.rand(n, generator=g) >= 0.2).to(device)
    if kind in ("per-cell", "both"):
        kw["noise"] = (0.01 * torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * math.log(10))).to(device, dtype)
    return y.to(device, dtype), [a.to(device, dtype) for a in axes], kw


def _model(kind, dtype, device="cuda", **extra):
    y, axes, kw = _data(kind, dtype, device=device)
    # the cg path with missing cells (few missing cells would take the exact-missing path, eager)
    extra.setdefault("path", "auto" if kind == "exact" else "cg")
    return GridGP(y, axes, num_probes=4, exact_trace_limit=0, **kw, **extra)


def _grads(m):
    return [p.grad.detach().clone() for p in m.parameters() if p.requires_grad]


def _nudge(models, step, scale=2e-2):
    """The same hyperparameter move on every model (like an optimiser step)."""
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for ps in zip(*(list(m.parameters()) for m in models)):
            delta = scale * torch.randn(ps[0].shape, generator=g, dtype=torch.float64)
            for p in ps:
                p.add_(delta.to(p.device, p.dtype))


def _tols(dtype):
    # Both models' GPU eigendecompositions start from the same warm starts (kept per factor size),
    # which the other model moves: their factors' eigenpairs differ within the Jacobi kernel's
    # tolerance, ~1e-9 of the float64 loss (a stale buffer in the graph would show as > 1e-3).
    return (2e-5, 1e-3) if dtype == torch.float32 else (1e-8, 1e-6)


def _assert_same_step(graphed, eager, dtype, loss_g, loss_e):
    loss_tol, grad_tol = _tols(dtype)
    assert float(loss_g) == pytest.approx(float(loss_e), rel=loss_tol)
    for a, b in zip(_grads(graphed), _grads(eager)):
        assert rel_err(a, b) < grad_tol
    if graphed.path == "cg":
        assert graphed.cg_iterations == eager.cg_iterations
        assert isinstance(graphed.cg_iterations, int) and isinstance(graphed.cg_inner_iterations, int)
        assert graphed.cg_residual == pytest.approx(eager.cg_residual, rel=0.05)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["exact", "missing", "per-cell"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graphed_step_matches_eager_over_moving_hyperparameters(kind, dtype):
    graphed = _model(kind, dtype)
    eager = copy.deepcopy(graphed)
    for step in range(5):
        loss_g = graphed.loss_backward(cuda_graph=True)
        loss_e = eager.loss_backward(cuda_graph=False)
        _assert_same_step(graphed, eager, dtype, loss_g, loss_e)
        _nudge([graphed, eager], step)
    # recorded once (at most once more if the CG count drifted past the margin)
    assert 1 <= graphed._graphed.recordings <= 2
    assert eager._graphed is None
    # a copy does not share the graph: it records its own
    twin = copy.deepcopy(graphed)
    assert twin._graphed is None
    _assert_same_step(twin, graphed, dtype, twin.loss_backward(cuda_graph=True), graphed.loss_backward(cuda_graph=True))
    assert twin._graphed is not None and twin._graphed is not graphed._graphed


@pytest.mark.cuda
def test_graph_rerecords_when_cg_needs_more_iterations_and_when_a_parameter_is_replaced():
    dtype = torch.float64
    graphed = _model("missing", dtype)
    eager = copy.deepcopy(graphed)
    graphed.loss_backward(cuda_graph=True)
    eager.loss_backward(cuda_graph=False)
    graphed._graphed.margin = 0
    graphed.loss_backward(cuda_graph=True)  # margin changed: recorded again with no spare iteration
    assert graphed._graphed.recordings == 2
    # far less noise: the G system is harder, CG needs more iterations than recorded
    for m in (graphed, eager):
        with torch.no_grad():
            m.raw_noise.sub_(4.0)
    loss_g = graphed.loss_backward(cuda_graph=True)
    loss_e = eager.loss_backward(cuda_graph=False)
    assert graphed._graphed.recordings == 3  # the replay fell short: the step ran eagerly, recorded again
    _assert_same_step(graphed, eager, dtype, loss_g, loss_e)
    loss_g = graphed.loss_backward(cuda_graph=True)
    assert graphed._graphed.recordings == 3
    _assert_same_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
    hard = eager.cg_iterations
    # back to the easy system: the replay (recorded for the hard one) is still right, and marks
    # the graph for a shorter recording at the next call
    for m in (graphed, eager):
        with torch.no_grad():
            m.raw_noise.add_(4.0)
    loss_g = graphed.loss_backward(cuda_graph=True)
    _assert_same_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
    assert hard - eager.cg_iterations >= 2  # the premise: 2+ iterations recorded beyond the need
    assert graphed._graphed.graph is None and graphed._graphed.recordings == 3
    loss_g = graphed.loss_backward(cuda_graph=True)
    assert graphed._graphed.recordings == 4
    _assert_same_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
    # a replaced parameter: recorded again, and the new tensor is the one trained
    for m in (graphed, eager):
        m.raw_outputscale = torch.nn.Parameter(m.raw_outputscale.detach().clone() + 0.1)
    loss_g = graphed.loss_backward(cuda_graph=True)
    assert graphed._graphed.recordings == 5 and graphed.raw_outputscale.grad is not None
    _assert_same_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))


@pytest.mark.cuda
def test_graph_resamples_probes_and_survives_a_cleared_eig_cache():
    dtype = torch.float64
    graphed = _model("missing", dtype)
    graphed.resample_probes = True
    eager = copy.deepcopy(graphed)
    losses = []
    for step in range(3):
        loss_g = graphed.loss_backward(cuda_graph=True)
        loss_e = eager.loss_backward(cuda_graph=False)
        _assert_same_step(graphed, eager, dtype, loss_g, loss_e)  # the same fresh probes each step
        losses.append(float(loss_g))
        linalg.clear_eig_cache()  # the graph keeps the warm starts it reads alive
        gc.collect()
        torch.cuda.empty_cache()
    assert len(set(losses)) == 3
    assert graphed._graphed.recordings == 1


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_fit_with_graph_follows_the_eager_fit(optimizer):
    graphed = _model("missing", torch.float64)
    eager = copy.deepcopy(graphed)
    h_g = graphed.fit(iters=4, optimizer=optimizer, progress=False, cuda_graph=True)
    h_e = eager.fit(iters=4, optimizer=optimizer, progress=False, cuda_graph=False)
    assert len(h_g) == len(h_e)
    for a, b in zip(h_g, h_e):
        assert a == pytest.approx(b, rel=1e-8)
    assert graphed._graphed is not None and eager._graphed is None


class _SyncingMean(gpytorch.means.ConstantMean):
    """A user mean that reads a value on the host (cannot be recorded)."""

    def forward(self, x):
        return super().forward(x) * (1.0 + 0.0 * float(self.constant))


@pytest.mark.cuda
def test_graph_falls_back_with_a_warning_or_raises_when_recording_fails():
    y, axes, kw = _data("missing", torch.float64, device="cuda")
    m = GridGP(y, axes, mean=_SyncingMean(), num_probes=4, exact_trace_limit=0, path="cg", **kw)
    ref = copy.deepcopy(m)
    with pytest.raises(RuntimeError, match="synchroniz"):
        m.loss_backward(cuda_graph=True)  # found by the eager pass under sync debug mode
    assert torch.cuda.get_sync_debug_mode() == 0  # restored
    torch.randn(3, device="cuda")  # nothing was recorded: torch's CUDA generator still works
    with pytest.warns(RuntimeWarning, match="could not be recorded as a CUDA graph"):
        loss = m.loss_backward()
    assert float(loss) == pytest.approx(float(ref.loss_backward(cuda_graph=False)), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.loss_backward()  # warned once
    with pytest.raises(ValueError, match="could not be recorded|cannot be a CUDA graph"):
        m.loss_backward(cuda_graph=True)


def test_cpu_models_run_eagerly_and_refuse_a_graph():
    m = _model("missing", torch.float64, device="cpu")
    loss = m.loss_backward()
    ref = -m.log_marginal_likelihood() / m.n_observed
    assert float(loss) == pytest.approx(float(ref), rel=1e-12)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    grads = _grads(m)
    m.loss_backward()  # overwritten, not accumulated
    for a, b in zip(_grads(m), grads):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="cuda_graph=True.*not a CUDA device"):
        m.loss_backward(cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True.*not a CUDA device"):
        m.fit(iters=1, progress=False, cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,jacobi_rows,reason", [
    ("both", None, "nested CG"),  # missing cells with per-cell noise
    ("missing", 12, "14 points.*more than 12 rows"),  # an axis longer than the GPU eigensolver takes
])
def test_models_that_cannot_be_recorded_run_eagerly_by_default(kind, jacobi_rows, reason, monkeypatch):
    if jacobi_rows is not None:
        monkeypatch.setattr(linalg, "DEVICE_JACOBI_MAX_ROWS", jacobi_rows)
    m = _model(kind, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = m.loss_backward()
    assert m._graphed is None and math.isfinite(float(loss))
    with pytest.raises(ValueError, match=reason):
        m.loss_backward(cuda_graph=True)


@pytest.mark.cuda
def test_steps_with_many_cg_iterations_are_not_recorded(monkeypatch):
    from kronegp.models import _graph

    monkeypatch.setattr(_graph, "MAX_RECORDED_ITERATIONS", 1)
    m = _model("missing", torch.float64)
    ref = copy.deepcopy(m)
    for _ in range(2):
        loss = m.loss_backward(cuda_graph=True)
        assert m._graphed.graph is None and m._graphed.recordings == 0
        _assert_same_step(m, ref, torch.float64, loss, ref.loss_backward(cuda_graph=False))
