"""One training evaluation of a :class:`~kronegp.GridGP` — loss and gradients — as a CUDA graph.

On a 128³ grid an evaluation launches ~350 kernels, and the host needs ~35 µs to issue each
(Python, autograd, cuBLAS): the step takes about twice its GPU time. Recorded once as a CUDA
graph, it is replayed in one launch. Five things stand in the way of recording, and are
handled here and in the solvers:

* **CG stops when it has converged**, which is read on the host. Under a fixed
  :class:`~kronegp.solvers.CGSchedule` every CG run does a set number of iterations (what it
  needed in the eager evaluation before the recording, plus :attr:`GraphedLoss.margin`;
  converged columns are frozen on the device), and whether each run converged in time is
  read after the replay, together with the iteration counts (one transfer per step). If one
  did not, the replay's result is discarded: the step runs eagerly and is recorded again.
* **The data column is refined until the observed cells' residual meets tol** (with missing
  cells: :func:`kronegp.models._masked.refine_observed`), a loop that reads that residual after
  each round. The recording pass (eager, before the graph) runs it as usual and notes its plan in
  the schedule (:meth:`CGSchedule.note_plan <kronegp.solvers.CGSchedule.note_plan>`: its rounds,
  the inner tolerance of each, whether it ended short of tol); its CG runs are runs of the
  schedule like any other. The fixed pass (the one recorded) makes the same rounds, hence the same
  runs, without a read: each round's ``G`` tolerance is the eager loop's rule applied on the device
  to the residual reached, a round after the one that met tol keeps the previous result (the
  eager loop stops there), and the final observed residual is a check of the schedule
  (:meth:`CGSchedule.add_check <kronegp.solvers.CGSchedule.add_check>`), read with the runs'
  after each replay. Above tol the replay is discarded, run eagerly and recorded again — as a run
  that ran out of iterations — unless the recording fell short too (the dtype's limit): then it
  warns as the eager step does. Skipping the loop, as the graph first did, left the H100's graphed
  gradients 1.1e-5 (relative, float64) off the eager ones.
* **The SLQ quadrature** ran on the host; under a fixed schedule it runs on the device
  (:func:`kronegp.solvers.lanczos.slq_logdet_on_device`).
* **Probe vectors** are drawn outside the graph into buffers the graph reads (redrawn before
  each replay when ``resample_probes`` is set).
* **The two-level preconditioner of a hole or clouds** (:mod:`kronegp.models._two_level`) is set
  up on the host (box eigenvalues, mode choice, Cholesky checks). The model keeps it across steps
  (:class:`~kronegp.models._two_level.FrozenTwoLevel`): the recording pass (eager) builds or reuses
  it and notes which in the schedule's plans; the fixed passes and the graph read its tensors as
  static buffers and compute its drift from the current hyperparameters on the device, reported with
  the step. Where a replay reports it stale, it is rebuilt eagerly before the next replay
  (:meth:`InferencePath.between_replays <kronegp.models.paths.InferencePath.between_replays>`):
  copied into the same buffers where the shapes match (a refresh keeps each piece's count of modes
  while the mode rule stays within ``REFRESH_MODES`` of it), else the graph is recorded again. So a
  graphed step of a hole runs two-level, not Jacobi (which took CG to its 1000-iteration cap on a
  128³ float32 fit with a 5 % hole, H100, 2026-12-07).

What the step reports (``cg_iterations``, ``cg_residual``, the entries of ``_last_extra`` that
:attr:`GridGP.last_solve <kronegp.GridGP.last_solve>` reads: the observed residual, the
likelihood's error estimate, the refinement's iterations) is device tensors under a fixed
schedule; :class:`_Report` carries them back as numbers in the same transfer as the checks.

A step whose CG runs take more than :data:`MAX_RECORDED_ITERATIONS` iterations in all (no
preconditioner, a hard system) is run eagerly instead of recorded.

The graph is recorded again whenever anything it baked in changes: a parameter or buffer
replaced (``.to()``, ``load_state_dict`` with other tensors), ``requires_grad`` switched, a
setting of the model changed (probes, CG tolerance, ...), or the two-level preconditioner given
new tensors (a refresh of other shapes, or an eager step or prediction between two replays that
rebuilt it: :meth:`InferencePath.graph_state <kronegp.models.paths.InferencePath.graph_state>`). Its memory pool keeps one
evaluation's intermediate tensors allocated between steps.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from kronegp import device
from kronegp.linalg import device_eigh_rows, jacobi_start_buffers
from kronegp.solvers.cg import CGSchedule, cg_schedule, warn_not_converged

__all__ = ["GraphedLoss", "MAX_RECORDED_ITERATIONS", "graph_reason", "loss_backward"]


#: A step whose CG runs would be recorded with more iterations than this in all is not recorded
#: (each iteration is ~10 graph nodes, and the on-device quadrature decomposes tridiagonals of one
#: row per iteration, padded to a multiple of 16, in the Jacobi kernel: at most 142 rows on an
#: A100); the step runs eagerly instead, and recording is tried again at the next call.
MAX_RECORDED_ITERATIONS = 128

#: Spare CG iterations a recording gives each run of the data column's refinement
#: (:func:`~kronegp.models._masked.refine_observed`: its ``G`` rounds, below float64 its mixed-precision
#: rounds; the runs a :class:`~kronegp.solvers.CGSchedule` tags ``"refine"``) beyond
#: :attr:`GraphedLoss.margin`. Their counts drift more than the main block's between nearby
#: hyperparameters (a round from where the main CG stopped: 3 → 5–6 over three Adam steps of 24³ with a
#: 20 % clouds hole), and each ran out of its one spare iteration as often as the main block did; each
#: costs one 1-column ``G`` iteration per replay, the main block's a (probes + 1)-column one.
REFINE_MARGIN = 2


class _ProbeStore:
    """The probe blocks of one recorded evaluation, by ``(rows, cols, offset)``."""

    def __init__(self):
        self.blocks: dict = {}

    def get(self, key, draw: Callable[[], Tensor]) -> Tensor:
        if key not in self.blocks:
            self.blocks[key] = draw()
        return self.blocks[key]

    def redraw(self, draw: Callable[[int, int, int], Tensor]) -> None:
        for (rows, cols, offset), buf in self.blocks.items():
            buf.copy_(draw(rows, cols, offset))


class _Report:
    """What the model's path reported of its last evaluation — ``cg_iterations``,
    ``cg_inner_iterations``, ``cg_residual`` and the entries of ``_last_extra`` (what
    :attr:`GridGP.last_solve <kronegp.GridGP.last_solve>` reads: iterations, the data term's
    observed residual and error estimate, ...) — with its device tensors (the numbers of a run
    under a fixed schedule, not read there) made plain numbers: ``int`` from an integer tensor,
    else ``float``. Built from the eager fixed pass (read at once) and from the recording (its
    tensors go into the check that is read after each replay); :meth:`apply` puts the numbers
    back on the model. The graph's one home for what a step reports."""

    STATS = ("cg_iterations", "cg_inner_iterations", "cg_residual")

    def __init__(self, model):
        self.stats = {key: getattr(model, key) for key in self.STATS}
        self.extra = dict(model._last_extra)
        #: (in ``stats`` or in ``extra``, key, integer) for each device tensor, in :meth:`tensor`'s order
        self.slots: list[tuple[bool, str, bool]] = []
        self._tensors: list[Tensor] = []
        for in_stats, values in ((True, self.stats), (False, self.extra)):
            for key, value in values.items():
                if isinstance(value, Tensor):
                    self.slots.append((in_stats, key, not value.is_floating_point()))
                    self._tensors.append(value.reshape(()).to(torch.float64))

    def tensor(self) -> Optional[Tensor]:
        """The device tensors as one float64 vector (``None`` if there are none)."""
        return torch.stack(self._tensors) if self._tensors else None

    def read(self) -> list[float]:
        """:meth:`tensor`'s values (reads the device)."""
        return [] if not self._tensors else self.tensor().tolist()

    def apply(self, model, numbers: list[float]) -> None:
        """Set the model's report: these values, with ``numbers`` (:meth:`tensor`'s, read) in the
        place of the tensors."""
        stats, extra = dict(self.stats), dict(self.extra)
        for (in_stats, key, integer), x in zip(self.slots, numbers, strict=True):
            (stats if in_stats else extra)[key] = int(x) if integer else float(x)
        for key, value in stats.items():
            setattr(model, key, value)
        model._last_extra = extra


class GraphedLoss:
    """``model``'s training loss ``−log p(y_O) / n_observed`` with its gradients, replayed from a
    CUDA graph (see the module docstring).

    Calling it returns the loss (0-dim) and leaves each trainable parameter's gradient in its
    ``.grad`` (overwritten, not accumulated). ``margin``: CG iterations recorded beyond what the
    eager evaluation needed (each costs one operator product of GPU time per step; too few
    makes every drift of the count a re-recording).
    """

    def __init__(self, model, margin: int = 1, refine_margin: int = REFINE_MARGIN):
        if margin < 0 or refine_margin < 0:
            raise ValueError(f"margin and refine_margin must be >= 0, got {margin}, {refine_margin}")
        # weak: the model holds this object, and a reference cycle would leave the graph's
        # destruction (and its memory pool's release) to Python's cyclic collector, which may
        # run in the middle of another recording and invalidate it
        self._model = weakref.ref(model)
        self.margin = int(margin)
        #: more spare iterations for the refinement's runs (:data:`REFINE_MARGIN`)
        self.refine_margin = int(refine_margin)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.recordings = 0  # how many times the step was recorded (for tests and reports)
        self._signature = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._store = _ProbeStore()

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("GraphedLoss: its model no longer exists")
        return model

    # ------------------------------------------------------------------ what the graph bakes in

    def _params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _current_signature(self):
        m = self.model
        tensors = [(p.data_ptr(), tuple(p.shape), p.dtype, p.requires_grad) for p in m.parameters()]
        tensors += [(b.data_ptr(), tuple(b.shape), b.dtype) for b in m.buffers()]
        settings = (m.num_probes, m.cg_tol, m.cg_max_iters, m.precondition, m.exact_trace_limit,
                    m.resample_probes, m.seed, m.path, self.margin, self.refine_margin)
        return tuple(tensors), settings, m.inference.graph_state(m)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, schedule: CGSchedule) -> Tensor:
        with cg_schedule(schedule):
            return self.model._eager_loss_backward()

    def _eager_and_record(self) -> Tensor:
        """Run the step eagerly on the graph's stream, then record it; this call's result is
        the eager one.

        Three passes: (1) eager with the usual stopping rule, which gives each CG run's
        iteration count; (2) eager again under the fixed schedule with torch's sync debug
        mode raising, so that anything that would read the device — which a recording cannot
        do, and whose failed recording leaves torch's CUDA generator unusable — raises here,
        before any recording starts; (3) the recording.
        """
        m, params = self.model, self._params()
        dev = m.y.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(dev))
        self._store = store = _ProbeStore()
        m.layout.probe_store = store  # the eager step draws the probes into it, the graph reads them
        # the previous graph and its pool's tensors go now, not while recording
        self.graph = self._loss = self._grads = self._check = None
        for p in params:
            p.grad = None
        try:
            with torch.cuda.stream(stream):
                schedule = CGSchedule.record()
                loss = self._evaluate(schedule).detach()
                # not recorded: a non-finite loss (the caller reports it), or more CG iterations
                # than a graph should unroll (this step was then an ordinary eager one)
                margins = self._margins_of(schedule)
                counts = [c + k for c, k in zip(schedule.counts, margins)]
                if bool(torch.isfinite(loss)) and sum(counts) <= MAX_RECORDED_ITERATIONS:
                    for p in params:
                        p.grad = None
                    debug = torch.cuda.get_sync_debug_mode()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        loss = self._evaluate(CGSchedule.fixed(counts, schedule.plans)).detach()
                    finally:
                        torch.cuda.set_sync_debug_mode(debug)
                    report = _Report(m)
                    numbers = report.read()
                    grads = [p.grad for p in params]
                    self._margins = margins
                    self._record(counts, schedule.plans, stream)
                    report.apply(m, numbers)  # this call's step is the eager fixed pass
                else:
                    grads = [p.grad for p in params]
        finally:
            m.layout.probe_store = None
            torch.cuda.current_stream(dev).wait_stream(stream)
        for p, g in zip(params, grads):
            p.grad = g
        return loss

    def _margins_of(self, schedule: CGSchedule) -> list[int]:
        """Per run of a recording: the spare iterations the graph gives it (:attr:`margin`, plus
        :attr:`refine_margin` for the refinement's runs)."""
        return [self.margin + (self.refine_margin if tag == "refine" else 0) for tag in schedule.tags]

    def _recorded_step(self, counts: list[int], plans: list):
        """What the graph records: the step under ``CGSchedule.fixed(counts, plans)`` (gradients
        left in ``.grad``), then the check read after each replay (the schedule's runs and checks,
        then the report's numbers). Returns ``(loss, check or None, schedule, report)``."""
        m = self.model
        schedule = CGSchedule.fixed(counts, plans)
        for p in self._params():
            p.grad = None
        # detached: holding the recorded autograd graph would keep its AccumulateGrad
        # nodes (bound to this stream) for later eager steps
        loss = self._evaluate(schedule).detach()
        report = _Report(m)
        rows = [schedule.check_tensor().reshape(-1)] if counts or schedule.checks else []
        carried = report.tensor()
        rows += [carried] if carried is not None else []
        return loss, (torch.cat(rows) if rows else None), schedule, report

    def _record(self, counts: list[int], plans: list, stream: torch.cuda.Stream) -> None:
        """Record the step with ``counts`` CG iterations per run (margin included), following
        ``plans`` (the recording pass's :attr:`CGSchedule.plans`: the refinement rounds of the
        data column's solve)."""
        m, params = self.model, self._params()
        graph = torch.cuda.CUDAGraph()
        gc.collect()
        gc.disable()  # no cyclic collection (and CUDA frees) in the middle of the recording
        try:
            with torch.cuda.graph(graph, stream=stream):
                loss, check, schedule, report = self._recorded_step(counts, plans)
        finally:
            gc.enable()
        # The Jacobi kernel's warm starts are read and written in place by the graph: keep them
        # alive even if the eigendecomposition cache is cleared.
        self._keep = jacobi_start_buffers()
        self.graph, self.recordings = graph, self.recordings + 1
        # what the recording read as it is now (its eager pass may have rebuilt a frozen preconditioner)
        self._signature = self._current_signature()
        self._loss, self._grads, self._check = loss, [p.grad for p in params], check
        self._limits = [min(c, m.cg_max_iters) for c in counts]  # what each run does per replay
        self._checks, self._report = schedule.checks, report

    def __call__(self) -> Tensor:
        m = self.model
        sig = self._current_signature()
        if sig != self._signature:
            self.graph, self._signature = None, sig
        said: dict = {}
        if self.graph is not None:  # what the step keeps frozen, refreshed eagerly where it went stale
            again, said = m.inference.between_replays(m)
            if again:
                self.graph = None
        if self.graph is None:
            loss = self._eager_and_record()
            m._last_extra.update(said)  # a refresh that made this recording: its report
            return loss
        if m.resample_probes:
            self._store.redraw(lambda rows, cols, offset: m.layout.draw_normal(rows, cols, offset, m.seed, True, m.y))
        self.graph.replay()
        params = self._params()
        for p, g in zip(params, self._grads):
            p.grad = g
        values = [] if self._check is None else self._check.tolist()  # the step's one synchronisation
        n_runs, n_checks = len(self._limits), len(self._checks)
        runs = [values[3 * i : 3 * i + 3] for i in range(n_runs)]
        checks = [values[3 * i : 3 * i + 3] for i in range(n_runs, n_runs + n_checks)]
        # A run that ran out of recorded iterations, or a check above its bound where the recording
        # met it (the data column's observed residual after the recorded refinement rounds): the
        # replay's result is discarded; the step runs eagerly and is recorded again.
        if (any(active and limit < m.cg_max_iters for (_, active, _), limit in zip(runs, self._limits))
                or any(above and not c.final for (_, above, _), c in zip(checks, self._checks))):
            return self._eager_and_record()
        self._report.apply(m, values[3 * (n_runs + n_checks) :])
        m._last_extra.update(said)
        # what the eager step would have warned: a run stopped at max_iters, a refinement that ends
        # short of its tolerance as the recorded one did
        for (_, active, residual), limit in zip(runs, self._limits):
            if active:
                warn_not_converged(limit, residual, m.cg_tol, stacklevel=3)
        for (_, above, value), c in zip(checks, self._checks):
            if above:
                c.warn(value, 3)
        # Every run needed 2+ iterations fewer than recorded beyond its margin: record again,
        # shorter, at the next call.
        if runs and all(limit - needed > margin + 1
                        for (needed, _, _), limit, margin in zip(runs, self._limits, self._margins)):
            self.graph = None
        return self._loss.detach().clone()


def graph_reason(model) -> Optional[str]:
    """Why ``model``'s step cannot be a CUDA graph, or ``None`` if it can."""
    dev = model.y.device
    if dev.type != "cuda":
        return f"the model is on {dev}, not a CUDA device"
    if model.layout.graph_obstacle is not None:
        return model.layout.graph_obstacle
    obstacle = model.inference.graph_obstacle(model)
    if obstacle is not None:
        return obstacle
    capability = device.backend_for(model.y).eigh_capability(model.y)
    if not capability:
        return f"the factors have no on-device eigensolver ({capability.reason})"
    rows = device_eigh_rows(model.y)
    if max(model.shape) > rows:
        return (f"a grid axis has {max(model.shape)} points: factors of more than {rows} rows are "
                "eigendecomposed on the host or by cuSOLVER, which synchronise")
    return None


def loss_backward(model, cuda_graph: Optional[bool]) -> Tensor:
    """:meth:`GridGP.loss_backward <kronegp.GridGP.loss_backward>`: the step from the model's
    recorded graph where it can be one (recorded at the first call; a failed recording warns
    once and the model runs eagerly from then on), else eagerly."""
    if cuda_graph is None or cuda_graph:
        reason = graph_reason(model) if model._graph_failed is None else model._graph_failed
        if reason is None:
            if model._graphed is None:
                model._graphed = GraphedLoss(model)
            try:
                return model._graphed()
            except Exception as err:
                if cuda_graph:
                    raise
                model._graphed = None
                model._graph_failed = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"GridGP: the training step could not be recorded as a CUDA graph ({model._graph_failed}); "
                    "it runs eagerly (pass cuda_graph=False to fit/loss_backward to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        elif cuda_graph:
            raise ValueError(f"cuda_graph=True, but this model's step cannot be a CUDA graph: {reason}")
    for p in model.parameters():
        p.grad = None
    return model._eager_loss_backward().detach()
