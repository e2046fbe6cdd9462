"""GridGP's training step replayed from a CUDA graph (``loss_backward``, ``kronegp.models._graph``)
against the same step run eagerly: loss, gradients, CG counts; re-recording when the graph's
assumptions break. CPU: the choice of path and its errors, the step under recorded and fixed CG
schedules (the data column's refinement), and the graph tests again with a stand-in for CUDA
graphs that replays by running the recorded step again."""

import contextlib
import copy
import gc
import math
import warnings

import gpytorch
import pytest
import torch

from _helpers import rel_err
from kronegp import linalg
from kronegp.models import GridGP, _graph
from kronegp.models import _masked as masked
from kronegp.solvers import CGSchedule, cg_schedule


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


class _GraphByRerun:
    """``torch.cuda.CUDAGraph`` on the CPU: the recording runs the step eagerly, and a replay runs
    the recorded step again (``GraphedLoss._recorded_step`` under the same fixed schedule, probes
    from the graph's store) and writes its outputs into the tensors the recording returned, as a
    replay does. What only a GPU shows (a read of the device while recording, a stale buffer)
    stays with the cuda tests."""

    def replay(self):
        self.rerun()


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


def _graphs_by_rerun(monkeypatch):
    """Replace what ``kronegp.models._graph`` asks of ``torch.cuda`` by CPU stand-ins."""
    mode = {"sync": 0}
    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _GraphByRerun)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["sync"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda value: mode.update(sync=value))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(_graph, "jacobi_start_buffers", lambda: None)
    monkeypatch.setattr(_graph, "graph_reason", lambda model: None)
    record = _graph.GraphedLoss._record

    def recorded(self, counts, plans, stream):
        record(self, counts, plans, stream)

        def rerun():
            m = self.model
            m.layout.probe_store = self._store  # the graph reads the probes from the store
            try:
                loss, check, _, _ = self._recorded_step(counts, plans)
            finally:
                m.layout.probe_store = None
            self._loss.copy_(loss)
            if check is not None:
                self._check.copy_(check)
            for kept, p in zip(self._grads, self._params()):
                kept.copy_(p.grad)

        self.graph.rerun = rerun

    monkeypatch.setattr(_graph.GraphedLoss, "_record", recorded)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def graph_device(request, monkeypatch):
    """Where a graph test runs: a GPU with CUDA graphs, or the CPU with :class:`_GraphByRerun`."""
    if request.param == "cpu":
        _graphs_by_rerun(monkeypatch)
    return request.param


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


@pytest.mark.parametrize("kind", ["exact", "missing", "per-cell"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graphed_step_matches_eager_over_moving_hyperparameters(kind, dtype, graph_device):
    graphed = _model(kind, dtype, graph_device)
    eager = copy.deepcopy(graphed)
    for step in range(5):
        loss_g = graphed.loss_backward(cuda_graph=True)
        loss_e = eager.loss_backward(cuda_graph=False)
        _assert_same_step(graphed, eager, dtype, loss_g, loss_e)
        if kind == "missing":  # the data column refined to tol (float32: in mixed precision), graphed too
            assert graphed.last_solve.observed_residual <= graphed.cg_tol
        _nudge([graphed, eager], step)
    # recorded once (at most once more if the CG count drifted past the margin)
    assert 1 <= graphed._graphed.recordings <= 2
    assert eager._graphed is None
    assert graphed.cuda_graphed and not eager.cuda_graphed
    # a copy does not share the graph: it records its own
    twin = copy.deepcopy(graphed)
    assert twin._graphed is None and not twin.cuda_graphed
    _assert_same_step(twin, graphed, dtype, twin.loss_backward(cuda_graph=True), graphed.loss_backward(cuda_graph=True))
    assert twin._graphed is not None and twin._graphed is not graphed._graphed


def test_graph_rerecords_when_cg_needs_more_iterations_and_when_a_parameter_is_replaced(graph_device):
    dtype = torch.float64
    graphed = _model("missing", dtype, graph_device)
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


def test_graph_resamples_probes_and_survives_a_cleared_eig_cache(graph_device):
    dtype = torch.float64
    graphed = _model("missing", dtype, graph_device)
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


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_fit_with_graph_follows_the_eager_fit(optimizer, graph_device):
    graphed = _model("missing", torch.float64, graph_device)
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
    assert m.cuda_graphed is False
    loss = m.loss_backward()
    assert m.cuda_graphed is False  # the public word for it (benchmarks report it)
    with pytest.raises(AttributeError):
        m.cuda_graphed = True  # read-only
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


def _adam_fit(m, steps, eager):
    """``steps`` Adam steps (lr 0.05) of ``m``'s graphed loss; each step's loss and gradients checked
    against ``eager`` (set to the same hyperparameters first), and its data column at tol."""
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(steps):
        with torch.no_grad():
            for a, b in zip(eager.parameters(), m.parameters()):
                a.copy_(b)
        opt.zero_grad()
        loss = m.loss_backward(cuda_graph=True)
        _assert_same_step(m, eager, torch.float64, loss, eager.loss_backward(cuda_graph=False))
        assert m.last_solve.observed_residual <= m.cg_tol
        opt.step()
    return m._graphed.recordings


def test_a_fit_stays_on_its_recording_where_the_refinement_drifts(monkeypatch, graph_device):
    """An Adam fit whose data column's refinement drifts between steps: its G rounds need a few more
    iterations than recorded, or its observed residual ends just above tol after the recorded rounds
    at the next hyperparameters. Each was a re-recording (3 recordings in 8 steps with one spare
    iteration per refinement run and the rounds planned to tol); with REFINE_MARGIN's spare iterations
    and a spare round planned to PLAN_HEADROOM·tol, the replays stay replays, with the eager step's
    loss and gradients and the data column at tol at every step."""
    m = _model("missing", torch.float64, graph_device)
    eager = copy.deepcopy(m)
    old = copy.deepcopy(m)
    assert _adam_fit(m, 8, eager) == 1
    # the premise: without the headroom the same fit records again
    monkeypatch.setattr(masked, "PLAN_HEADROOM", 1.0)
    old._graphed = _graph.GraphedLoss(old, refine_margin=0)
    assert _adam_fit(old, 8, eager) >= 3


def test_a_recording_plans_a_spare_refinement_round_it_does_not_take():
    """The recording pass plans the float64 refinement down to PLAN_HEADROOM·tol (one spare round
    where the eager loop stops between that and tol) and notes it, but returns the eager step's result;
    the fixed pass runs the spare round and discards it on the device (same loss and gradients), and the
    spare round's CG runs are tagged as the refinement's (REFINE_MARGIN)."""
    m = _model("missing", torch.float64, "cpu")
    loss_e, grads_e, extra_e = _scheduled_step(m, None)
    assert m.cg_tol * masked.PLAN_HEADROOM < extra_e["observed_residual"] <= m.cg_tol  # the premise
    rec = CGSchedule.record()
    loss_r, grads_r, extra_r = _scheduled_step(m, rec)
    (rounds, short), = [plan for key, plan in rec.plans if key == "refine_observed"]
    assert len(rounds) == 2 and not short  # the round the eager loop made, and the spare one
    assert rec.tags == [None, "refine", "refine"]
    fixed = CGSchedule.fixed(rec.counts, rec.plans)
    loss_f, grads_f, extra_f = _scheduled_step(m, fixed)
    for loss, grads, extra in ((loss_r, grads_r, extra_r), (loss_f, grads_f, extra_f)):
        assert float(loss) == pytest.approx(float(loss_e), rel=1e-12)
        assert all(rel_err(a, b) < 1e-12 for a, b in zip(grads, grads_e))
        assert float(extra["observed_residual"]) == pytest.approx(extra_e["observed_residual"], rel=1e-12)
        assert int(extra["refine_iterations"]) == extra_e["refine_iterations"]


def test_steps_with_many_cg_iterations_are_not_recorded(monkeypatch, graph_device):
    monkeypatch.setattr(_graph, "MAX_RECORDED_ITERATIONS", 1)
    m = _model("missing", torch.float64, graph_device)
    ref = copy.deepcopy(m)
    for _ in range(2):
        loss = m.loss_backward(cuda_graph=True)
        assert m._graphed.graph is None and m._graphed.recordings == 0 and not m.cuda_graphed
        _assert_same_step(m, ref, torch.float64, loss, ref.loss_backward(cuda_graph=False))


# ---------------------------------------------------------------- the data column's refinement under CG schedules


def _scheduled_step(m, schedule):
    """Loss, gradients and ``_last_extra`` of one training evaluation under ``schedule``."""
    for p in m.parameters():
        p.grad = None
    with cg_schedule(schedule):
        loss = m._eager_loss_backward().detach()
    return loss, _grads(m), dict(m._last_extra)


@pytest.mark.parametrize("kind", ["missing", "both"])
def test_a_cg_schedule_refines_the_data_column_as_the_eager_step_does(kind):
    """A CUDA graph's step (a recording pass, then fixed runs) refines the data column's solve until
    the observed cells' residual meets tol, as the eager step does (skipping it left the H100's
    graphed gradients 1.1e-5 off the eager ones): the same loss, gradients and reported residual.
    With per-cell noise ("both") the solves with C inside the refinement are CG runs too: the fixed
    pass makes the same runs in the same order (exact counts: its nested runs follow the outer count)."""
    m = _model(kind, torch.float64, "cpu")
    loss_e, grads_e, extra_e = _scheduled_step(m, None)
    # the premise: the data column needed refining, and it reached tol
    assert extra_e["refine_iterations"] > 0 and extra_e["observed_residual"] <= m.cg_tol
    rec = CGSchedule.record()
    steps = [_scheduled_step(m, rec)]
    (rounds, short), = [plan for key, plan in rec.plans if key == "refine_observed"]
    assert len(rounds) >= 1 and not short
    # with per-cell noise the recording also noted its choice of the solves' preconditioner; and the
    # version of the model's two-level preconditioner of G (none applies to scattered cells)
    assert [key for key, _ in rec.plans if key != "refine_observed"] == (
        ["square_root_precond"] if kind == "both" else []) + ["two_level"]
    assert m._two_level.pre is None
    fixed = CGSchedule.fixed([c + (kind == "missing") for c in rec.counts], rec.plans)
    steps.append(_scheduled_step(m, fixed))
    assert fixed.runs == len(rec.counts)
    for loss, grads, extra in steps:
        assert float(loss) == pytest.approx(float(loss_e), rel=1e-10)
        for a, b in zip(grads, grads_e):
            assert rel_err(a, b) < 1e-10
        for name in ("observed_residual", "lml_error", "refine_iterations"):
            assert float(extra[name]) == pytest.approx(extra_e[name], rel=1e-10)
    # the fixed pass read none of them: device tensors, for the graph's one transfer
    assert all(isinstance(steps[1][2][name], torch.Tensor) for name in ("observed_residual", "lml_error"))
    *runs, (tol, met, value) = fixed.check()
    assert all(converged for _, converged, _ in runs)
    assert met and tol == m.cg_tol and value == pytest.approx(extra_e["observed_residual"], rel=1e-10)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def test_a_cg_schedule_refines_a_float32_data_column_in_mixed_precision(device):
    """float32: the data column's mixed-precision rounds (float64 residuals) under a recording and
    a fixed schedule, as in the eager step: the rounds noted, the same loss, gradients and observed
    residual (at tol), and the fixed pass reads none of them."""
    m = _model("missing", torch.float32, device)
    loss_e, grads_e, extra_e = _scheduled_step(m, None)
    assert extra_e["observed_residual"] <= m.cg_tol
    rec = CGSchedule.record()
    steps = [_scheduled_step(m, rec)]
    (made,) = [plan for key, plan in rec.plans if key == "refine_mixed"]
    assert made >= 1  # the premise: the float32 data column needed mixed rounds
    fixed = CGSchedule.fixed(rec.counts, rec.plans)
    steps.append(_scheduled_step(m, fixed))
    assert fixed.runs == len(rec.counts)
    for loss, grads, extra in steps:
        assert float(loss) == pytest.approx(float(loss_e), rel=1e-6)
        for a, b in zip(grads, grads_e):
            assert rel_err(a, b) < 1e-5
        assert float(extra["observed_residual"]) == pytest.approx(extra_e["observed_residual"], rel=1e-5)
    assert all(isinstance(steps[1][2][name], torch.Tensor) for name in ("observed_residual", "lml_error"))
    *runs, (tol, met, value) = fixed.check()
    assert met and value == pytest.approx(extra_e["observed_residual"], rel=1e-5)


def test_a_fixed_schedule_flags_a_refinement_cut_short():
    """The check read after a replay says when the data column's observed residual is above tol:
    with no refinement round (what the main CG left), and with the refinement's CG cut to one
    iteration (its run is flagged too)."""
    m = _model("missing", torch.float64, "cpu")
    rec = CGSchedule.record()
    _scheduled_step(m, rec)
    main = rec.counts[:1]  # the missing cells' block CG; then the refinement's runs
    assert len(rec.counts) > 1
    kept = [plan for plan in rec.plans if plan[0] == "two_level"]  # the model's two-level preconditioner (none here)
    none = CGSchedule.fixed(main, kept + [("refine_observed", ([], False))])
    _, _, extra = _scheduled_step(m, none)
    *runs, (tol, met, value) = none.check()
    assert not met and value > tol and float(extra["observed_residual"]) == value
    cut = CGSchedule.fixed(main + [1] * (len(rec.counts) - 1), rec.plans)
    _scheduled_step(m, cut)
    *runs, (tol, met, value) = cut.check()
    assert not all(converged for _, converged, _ in runs[1:]) and not met and value > tol
    # a plan for another computation, or none, is an error naming it
    with pytest.raises(RuntimeError, match="plan 1 asked for 'two_level'.*noted none"):
        _scheduled_step(m, CGSchedule.fixed(rec.counts, []))


def test_a_replay_short_of_tol_like_its_recording_warns_and_is_not_recorded_again(monkeypatch):
    """float32 without its mixed-precision rounds cannot reach tol=1e-7 on the observed cells (one
    round takes it to 1e-9): the recording warns, notes that it fell short, and a replay that falls
    short too warns the same way (its residual, from the replay) instead of running the step again."""
    _graphs_by_rerun(monkeypatch)
    monkeypatch.setattr(masked, "MIXED_ROUNDS", 0)
    m = _model("missing", torch.float32, "cpu", cg_tol=1e-7)
    with pytest.warns(RuntimeWarning, match="observed cells reached a relative residual"):
        m.loss_backward(cuda_graph=True)
    assert m._graphed.recordings == 1 and m._graphed._checks[0].final
    first = m.last_solve.observed_residual
    with pytest.warns(RuntimeWarning, match="observed cells reached a relative residual of .*not tol=1e-07"):
        m.loss_backward(cuda_graph=True)
    assert m._graphed.recordings == 1
    assert isinstance(m.last_solve.observed_residual, float) and m.last_solve.observed_residual > 1e-7
    assert m.last_solve.observed_residual == pytest.approx(first, rel=1e-6)


# ---------------------------------------------------------------- a hole: the frozen two-level preconditioner in the graph


def _hole_model(dtype, device, big=False, **extra):
    """A 4 × 4 × 4 hole (two-level preconditioner: kronegp.models._two_level) in the graph tests' grid,
    exact traces (unit probes): any preconditioner gives the same values up to the CG tolerance.
    ``big``: a 10 × 8 × 8 hole, 4 random probes."""
    y, axes, _ = _data("exact", dtype, device=device)
    mask = torch.ones(y.shape, dtype=torch.bool, device=device)
    if big:
        mask[2:12, 2:10, 1:9] = False
        extra.update(num_probes=4, exact_trace_limit=0)
    else:
        mask[5:9, 4:8, 3:7] = False
    return GridGP(y, axes, mask=mask, path="cg", cg_tol=1e-10 if dtype == torch.float64 else 1e-5, **extra)


def _assert_close_step(graphed, eager, dtype, loss_g, loss_e):
    """Loss and gradients within the CG tolerance (the two may hold preconditioners of other steps)."""
    loss_tol, grad_tol = (1e-4, 1e-2) if dtype == torch.float32 else (1e-8, 1e-6)
    assert float(loss_g) == pytest.approx(float(loss_e), rel=loss_tol)
    for a, b in zip(_grads(graphed), _grads(eager)):
        assert rel_err(a, b) < grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graphed_step_of_a_hole_runs_its_frozen_two_level_preconditioner(dtype, graph_device):
    """The graphed step of a hole applies the model's two-level preconditioner (not Jacobi, as it did
    while the setup ran in every step): the same loss and gradients as the eager step, the
    preconditioner built once and reused by every replay while the hyperparameters move a little."""
    graphed = _hole_model(dtype, graph_device)
    eager = copy.deepcopy(graphed)
    for step in range(4):
        loss_g = graphed.loss_backward(cuda_graph=True)
        loss_e = eager.loss_backward(cuda_graph=False)
        _assert_close_step(graphed, eager, dtype, loss_g, loss_e)
        assert graphed._last_extra["coarse_modes"] > 0 and graphed.last_solve.preconditioner_reused is (step > 0)
        assert graphed.last_solve.observed_residual <= graphed.cg_tol
        _nudge([graphed, eager], step, scale=5e-3)
    assert graphed._two_level.builds == 1 and 1 <= graphed._graphed.recordings <= 2


def test_graphed_hole_takes_far_fewer_cg_iterations_than_jacobi(graph_device, monkeypatch):
    """Measured on the CPU stand-in (2026-12-07): 9 iterations on G against Jacobi's 23."""
    import kronegp.models._two_level as two_level_mod

    its = {}
    for on in (True, False):
        monkeypatch.setattr(two_level_mod, "ENABLED", on)
        m = _hole_model(torch.float64, graph_device, big=True)
        for _ in range(2):  # recorded, then replayed
            m.loss_backward(cuda_graph=True)
        its[on] = m._last_extra["missing_iterations"]
        assert (m.last_solve.preconditioner_reused is True) if on else (m.last_solve.preconditioner_reused is None)
    assert 2 * its[True] <= its[False], its


def test_a_graph_refreshes_a_drifted_preconditioner_between_replays(graph_device, monkeypatch):
    """A replay reports the drift of the frozen preconditioner; past REFRESH_DRIFT it is rebuilt before
    the next replay, into the tensors the graph reads (same shapes: no recording); where the shapes
    change (here: a refresh that may not keep a piece's count of modes) the graph is recorded again."""
    import kronegp.models._two_level as two_level_mod

    monkeypatch.setattr(two_level_mod, "REFRESH_DRIFT", 0.05)
    monkeypatch.setattr(two_level_mod, "REFRESH_DRIFT_EAGER", 0.05)  # the eager twin rebuilds on the same drift
    dtype = torch.float64
    graphed = _hole_model(dtype, graph_device)
    graphed._graphed = _graph.GraphedLoss(graphed, margin=4)  # the stale replay stays within its iterations
    eager = copy.deepcopy(graphed)
    for _ in range(2):
        graphed.loss_backward(cuda_graph=True)
        eager.loss_backward(cuda_graph=False)
    frozen = graphed._two_level
    buffers = [t.data_ptr() for t in frozen.pre._buffers()]
    recordings = graphed._graphed.recordings
    assert recordings >= 1  # the premise: the steps are replays of a recorded graph
    # a move whose stale replay and refreshed replay both meet the recording's checks (the data column's observed
    # residual after the recorded refinement: at ×1.1–1.15 the stale replay misses it, at ×1.2–1.25 the refreshed
    # one, and either is recorded again, correctly, which is not what this test follows)
    for m in (graphed, eager):
        with torch.no_grad():
            for k in m.kernels:
                k.lengthscale = k.lengthscale * 1.3
    loss_g = graphed.loss_backward(cuda_graph=True)  # the stale one, its drift reported
    loss_e = eager.loss_backward(cuda_graph=False)  # eager: rebuilt at once
    _assert_close_step(graphed, eager, dtype, loss_g, loss_e)
    assert graphed.last_solve.preconditioner_reused is True and eager.last_solve.preconditioner_reused is False
    assert graphed._last_extra["two_level_drift"] > two_level_mod.REFRESH_DRIFT
    loss_g = graphed.loss_backward(cuda_graph=True)  # refreshed in place, then replayed
    _assert_close_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
    assert graphed.last_solve.preconditioner_reused is False and frozen.refreshes == 1 and frozen.builds == 2
    assert [t.data_ptr() for t in frozen.pre._buffers()] == buffers and graphed._graphed.recordings == recordings
    graphed.loss_backward(cuda_graph=True)
    assert graphed.last_solve.preconditioner_reused is True
    # a refresh whose shapes change: recorded again. The stale replay reports the drift and the next call rebuilds
    # between the replays, or, where the stale replay misses the recording's observed-residual check, its result is
    # discarded and the eager step rebuilds: either way one build with new shapes (not in place) and one recording
    monkeypatch.setattr(two_level_mod, "REFRESH_MODES", -1.0)
    recordings, builds = graphed._graphed.recordings, frozen.builds
    for m in (graphed, eager):
        with torch.no_grad():
            m.raw_noise.sub_(2.0)  # less noise: more modes score
    for _ in range(2):
        loss_g = graphed.loss_backward(cuda_graph=True)
        if frozen.builds > builds:
            break
    assert frozen.builds == builds + 1 and frozen.refreshes == 1 and graphed._graphed.recordings == recordings + 1
    assert graphed.last_solve.preconditioner_reused is False  # built for this recording
    _assert_close_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
    # an eager step between two replays that rebuilds it (new tensors, the graph reads the old ones)
    graphed.loss_backward(cuda_graph=True)
    recordings = graphed._graphed.recordings
    for m in (graphed, eager):
        with torch.no_grad():
            for k in m.kernels:
                k.lengthscale = k.lengthscale * 1.2
    graphed.loss_backward(cuda_graph=False)
    assert graphed.last_solve.preconditioner_reused is False
    loss_g = graphed.loss_backward(cuda_graph=True)
    assert graphed._graphed.recordings == recordings + 1
    _assert_close_step(graphed, eager, dtype, loss_g, eager.loss_backward(cuda_graph=False))
