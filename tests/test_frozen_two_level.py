"""The model's frozen two-level preconditioner of holes and clouds (issue 22 item 2,
``kronegp.models._two_level.FrozenTwoLevel``): kept across steps, rebuilt on drift, and, stale,
a matter of CG iterations alone: the likelihood, its gradient and the posterior stay within the
dense Cholesky's bounds. The CUDA-graph side is in ``test_gridgp_graph.py``."""

import math

import pytest
import torch

import kronegp.models._two_level as two_level_mod
import test_gaps as ref  # the dense references and the small grids with gaps


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """The small grids' holes and clouds get pieces (as in ``test_gaps``)."""
    monkeypatch.setattr(two_level_mod, "MIN_MISSING", 1)
    monkeypatch.setattr(two_level_mod, "MIN_INTERIOR", 0)


def _params(gp):
    return [p.detach().clone() for p in gp.parameters()]


def _restore(gp, saved):
    with torch.no_grad():
        for p, s in zip(gp.parameters(), saved):
            p.copy_(s)


def _move(gp, lengthscale=1.0, noise=1.0, outputscale=1.0):
    """Scale the hyperparameters (in place: the model's tensors stay the same)."""
    with torch.no_grad():
        for k in gp.kernels:
            k.lengthscale = k.lengthscale * lengthscale
        gp.raw_noise.copy_(gp.noise_constraint.inverse_transform(gp.noise * noise))
        gp.raw_outputscale.copy_(gp.outputscale_constraint.inverse_transform(gp.outputscale * outputscale))


def _step(gp):
    with torch.no_grad():
        return float(gp.log_marginal_likelihood())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["hole", "two-holes", "clouds"])
def test_a_stale_preconditioner_keeps_likelihood_gradient_and_posterior_on_the_dense_values(name, dtype, monkeypatch):
    """Built at other hyperparameters (lengthscales ×1.6, noise ×0.3) and never rebuilt: CG still
    reaches its tolerance, and the likelihood, gradient and posterior match the dense Cholesky within
    the bounds of the fresh preconditioner's tests (``test_gaps``)."""
    if dtype == torch.float32 and name != "hole":
        pytest.skip("float32: the hole is enough")
    monkeypatch.setattr(two_level_mod, "REFRESH_DRIFT", math.inf)
    monkeypatch.setattr(two_level_mod, "REFRESH_ITERATIONS", math.inf)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    gp = ref.model(name, path="cg", cg_tol=tol, dtype=dtype)
    at = _params(gp)
    _move(gp, lengthscale=1.6, noise=0.3)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and gp._two_level.builds == 1
    _restore(gp, at)
    lml, grads = ref.lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    info = gp.last_solve
    stale_drift = gp._last_extra["two_level_drift"]
    assert info.preconditioner_reused is True and gp._two_level.builds == 1 and stale_drift > 0.3
    assert info.residual <= tol
    gp64 = gp if dtype == torch.float64 else ref.model(name, path="cg")
    dense, dense_grads = ref.lml_and_grads(gp64, ref.dense_lml)
    bound = 1e-6 if dtype == torch.float64 else 1e-3
    assert abs(lml - dense) <= bound * abs(dense)
    assert ref.rel(grads.double(), dense_grads) <= bound
    if dtype == torch.float64:  # the posterior's solves reuse it too
        mean, var = gp.predict(variance="exact")
        ref_mean, ref_var = ref.dense_grid_posterior(gp)
        assert gp._two_level.builds == 1
        assert ref.rel(mean.reshape(-1), ref_mean) <= 1e-6
        assert ref.rel(var.reshape(-1), ref_var) <= 1e-6


def test_the_refresh_rule_fires_on_drift_grown_iterations_and_a_new_mask_or_dtype(monkeypatch):
    # the drift rule of a CUDA graph's step, here on eager steps (which by default rebuild only on iterations:
    # test_an_eager_step_rebuilds_on_iterations_not_on_drift)
    monkeypatch.setattr(two_level_mod, "REFRESH_DRIFT_EAGER", two_level_mod.REFRESH_DRIFT)
    gp = ref.model("hole", path="cg")
    frozen = gp._two_level
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 1
    _step(gp)  # unchanged
    assert gp.last_solve.preconditioner_reused is True and frozen.builds == 1
    _move(gp, lengthscale=1.02)  # a small move: drift below REFRESH_DRIFT
    _step(gp)
    assert gp.last_solve.preconditioner_reused is True and 0 < gp._last_extra["two_level_drift"] < two_level_mod.REFRESH_DRIFT
    _move(gp, noise=2.0, outputscale=2.0)  # s² and σ² together: no drift (κ follows the scale)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is True and gp._last_extra["two_level_drift"] < 0.05
    _move(gp, lengthscale=1.5)  # past REFRESH_DRIFT
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 2
    _move(gp, noise=0.5)  # s²/σ² doubled: |log 2| = 0.69 > REFRESH_DRIFT
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 3
    # CG iterations grown past REFRESH_ITERATIONS × those of its first step
    _step(gp)
    assert gp.last_solve.preconditioner_reused is True
    frozen.note_iterations(int(two_level_mod.REFRESH_ITERATIONS * frozen.iterations) + 3)
    assert frozen.stale is not None
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 4 and frozen.stale is None
    # FREEZE off: a new one every step
    monkeypatch.setattr(two_level_mod, "FREEZE", False)
    _step(gp)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 6
    monkeypatch.setattr(two_level_mod, "FREEZE", True)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is True
    # the mask changed in place, the model moved to another dtype: rebuilt for them
    gp.observed[int(torch.nonzero(gp.observed)[0])] = False
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 7
    gp.to(torch.float32)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.pre.g_diag.dtype == torch.float32
    # Jacobi alone (no piece): nothing to report
    monkeypatch.setattr(two_level_mod, "ENABLED", False)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is None


def test_a_badly_off_preconditioner_only_costs_iterations(monkeypatch):
    """Built at lengthscales ×0.25 and noise ×30: at the model's own hyperparameters CG takes more
    iterations than with a fresh one, and reaches the same (dense) likelihood."""
    monkeypatch.setattr(two_level_mod, "REFRESH_DRIFT", math.inf)
    monkeypatch.setattr(two_level_mod, "REFRESH_ITERATIONS", math.inf)
    gp = ref.model("hole", path="cg", cg_tol=1e-10)
    at = _params(gp)
    _move(gp, lengthscale=0.25, noise=30.0)
    _step(gp)
    _restore(gp, at)
    stale = _step(gp)
    its_stale, info = gp.last_solve.iterations, gp.last_solve
    assert info.preconditioner_reused is True and info.residual <= 1e-10
    monkeypatch.setattr(two_level_mod, "FREEZE", False)
    fresh = _step(gp)
    its_fresh = gp.last_solve.iterations
    dense = float(ref.dense_lml(gp).detach())
    assert its_stale > its_fresh, (its_stale, its_fresh)  # the premise: it is badly off
    for value in (stale, fresh):
        assert abs(value - dense) <= 1e-6 * abs(dense)


def test_a_scaled_preconditioner_is_kappa_m_with_its_log_det_and_probes():
    """``TwoLevel.scaled(log κ)`` applies ``κM``, draws probes of covariance ``(κM)⁻¹`` and gives
    ``log det P = −log det(κM)``, sharing the unscaled one's tensors."""
    gp = ref.model("hole", path="cg")
    pre, _, miss, _ = ref._coarse_for(gp)
    log_k = torch.tensor(0.37, dtype=torch.float64)
    scaled = pre.scaled(log_k)
    assert scaled.batches is pre.batches and pre.log_scale is None
    M = ref._dense_of(pre.apply, miss)
    Mk = ref._dense_of(scaled.apply, miss)
    assert ref.rel(Mk, math.exp(0.37) * M) <= 1e-12
    logdet = float(torch.linalg.slogdet(Mk)[1])
    assert abs(float(scaled.logdet_p(miss.double())) + logdet) <= 1e-10 * abs(logdet)
    Z = ref._dense_of(scaled.sample, miss)
    assert ref.rel(Z.mT @ Z, torch.linalg.inv(Mk)) <= 1e-10


@pytest.mark.parametrize("name", ["hole", "clouds"])
def test_a_refresh_goes_into_the_same_tensors_when_the_shapes_hold(name, monkeypatch):
    """Between CUDA-graph replays (``CGPath.between_replays``): a reported drift past REFRESH_DRIFT
    rebuilds the preconditioner at the current hyperparameters into the tensors it had (what a recorded
    graph reads), keeping each piece's count of modes (and a cloud's candidates and mass filter's U);
    the values are those of a fresh build there."""
    monkeypatch.setattr(two_level_mod, "MIN_MISSING", 1)  # the clouds' small blobs get pieces
    monkeypatch.setattr(two_level_mod, "MIN_INTERIOR", 0)
    gp = ref.model(name, path="cg", cg_tol=1e-10)
    _step(gp)
    frozen = gp._two_level
    assert (name == "clouds") == any(pc.basis.mix is not None for pc in frozen.pre.pieces)
    before = [t.data_ptr() for t in frozen.pre._buffers()]
    modes, version = frozen.pre.modes, frozen.version
    assert gp.inference.between_replays(gp) == (False, {"two_level_reused": True})  # nothing moved
    _move(gp, lengthscale=1.15, noise=0.8)
    gp._last_extra["two_level_drift"] = 0.3  # what the replay reported (past REFRESH_DRIFT)
    again, said = gp.inference.between_replays(gp)
    assert not again and said["two_level_reused"] is False and frozen.refreshes == 1
    assert [t.data_ptr() for t in frozen.pre._buffers()] == before and frozen.version == version
    assert frozen.pre.modes == modes
    # the refreshed values: a fresh build of the same modes at these hyperparameters, and no drift left
    with torch.no_grad():
        cov = gp.inference.covariance(gp, gp._factors())
        assert float(frozen.drift(cov.factors, cov.outputscale, cov.sigma_bar2)) <= 1e-12
        g_diag = ref.masked._g_diag(cov, gp.observed, gp.y.dtype)
        fresh = ref.masked._build_two_level(cov, gp.observed, g_diag, like=frozen.pre)
    for a, b in zip(frozen.pre._buffers(), fresh._buffers()):
        assert torch.equal(a, b)
    # a step right after it reuses it, on the dense likelihood
    value = _step(gp)
    assert gp.last_solve.preconditioner_reused is True
    dense = float(ref.dense_lml(gp).detach())
    assert abs(value - dense) <= 1e-6 * abs(dense)


@pytest.mark.parametrize("name", ["hole", "clouds"])
def test_a_float32_grid_applies_its_basis_in_float32_and_its_coarse_solves_in_float64(name):
    """A float32 model's two-level preconditioner multiplies by its basis (``V_k``, ``U``) in float32 and by
    its small matrices in float64 (``COARSE_DTYPE``): CG takes at most one iteration more than the float64
    model's, and the likelihood stays within float32's bound of the dense Cholesky."""
    gp32 = ref.model(name, path="cg", dtype=torch.float32, cg_tol=1e-5)
    gp64 = ref.model(name, path="cg", dtype=torch.float64, cg_tol=1e-5)
    with torch.no_grad():
        a = float(gp32.log_marginal_likelihood())
        gp64.log_marginal_likelihood()
        want = float(ref.dense_lml(gp64))
    pre = gp32._two_level.pre
    assert pre is not None and pre.batches
    for pb in pre.batches:
        assert all(v.dtype == torch.float32 for v in pb.vecs + pb.vecs_t)
        assert pb.mix is None or pb.mix.dtype == torch.float32
        assert pb.e_inv.dtype == pb.f_mat.dtype == pb.s.dtype == torch.float64
    assert gp32.last_solve.iterations <= gp64.last_solve.iterations + 1
    assert abs(a - want) <= 1e-4 * abs(want)


def test_an_eager_step_rebuilds_on_iterations_not_on_drift():
    """By default (REFRESH_DRIFT_EAGER = inf) an eager step keeps its preconditioner however far the
    hyperparameters moved, until CG slows past REFRESH_ITERATIONS; the likelihood is the fresh one's."""
    assert two_level_mod.REFRESH_DRIFT_EAGER == math.inf
    gp = ref.model("clouds", path="cg", cg_tol=1e-10)
    frozen = gp._two_level
    _step(gp)
    assert frozen.builds == 1
    _move(gp, lengthscale=1.5, noise=0.5)  # far past REFRESH_DRIFT
    stale = _step(gp)
    assert gp.last_solve.preconditioner_reused is True and frozen.builds == 1
    assert gp._last_extra["two_level_drift"] > two_level_mod.REFRESH_DRIFT
    fresh = ref.model("clouds", path="cg", cg_tol=1e-10)
    _move(fresh, lengthscale=1.5, noise=0.5)
    assert abs(stale - _step(fresh)) <= 1e-7 * abs(stale)
    frozen.note_iterations(int(two_level_mod.REFRESH_ITERATIONS * frozen.iterations) + 3)
    _step(gp)
    assert gp.last_solve.preconditioner_reused is False and frozen.builds == 2
    # a posterior's solves note no iterations: they rebuild on drift (REFRESH_DRIFT), as a graph's step does
    _move(gp, lengthscale=1.5)
    gp.predict(as_xarray=False)
    assert frozen.builds == 3
