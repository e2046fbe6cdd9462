"""Clouds on the cg path (issue 22 item 2): the two-level preconditioner's pieces that do not fill
their boxes, whose Galerkin matrices come from :func:`kronegp.models._two_level.truncated_galerkin`
with its a posteriori certified threshold, against a dense Cholesky and dense Galerkin matrices."""

import pytest
import torch

import kronegp.models._masked as masked
import kronegp.models._two_level as two_level_mod
from kronegp import GridGP
from test_gaps import (_coarse_dense, _coarse_for, assert_float32_agrees_with_float64, assert_posterior_matches_dense,
                       dense_lml, lml_and_grads, model, rel)


@pytest.fixture
def bands(monkeypatch):
    """Every piece's threshold passes of :func:`truncated_galerkin`: ``(cells, lo, hi)`` per call of
    ``_subtract_band``, and the floor ``ϑ₀`` of each piece (its a priori threshold)."""
    calls, floors = [], []
    real_band, real_tg = two_level_mod._subtract_band, two_level_mod.truncated_galerkin

    def band(E, wbox, basis, eig, s2, level, lo, hi):
        calls.append((basis.hole.m, lo, hi))
        return real_band(E, wbox, basis, eig, s2, level, lo, hi)

    def tg(basis, eig, s2, level, top):
        floors.append((basis.hole.m, two_level_mod.GALERKIN_TOL * float(level) / (1 + top)))
        return real_tg(basis, eig, s2, level, top)

    monkeypatch.setattr(two_level_mod, "_subtract_band", band)
    monkeypatch.setattr(two_level_mod, "truncated_galerkin", tg)
    monkeypatch.setattr(two_level_mod, "MIN_MISSING", 1)
    monkeypatch.setattr(two_level_mod, "MIN_INTERIOR", 0)
    return calls, floors


def _branches(calls, floors):
    """Per piece (in build order): ``"trial"`` when the first, higher threshold was certified (one pass
    above the floor), ``"fallback"`` when the coordinates down to the floor were subtracted too."""
    out, at = [], 0
    for m, floor in floors:
        mine = []
        while at < len(calls) and calls[at][0] == m and (not mine or calls[at][2] == mine[-1][1]):
            mine.append(calls[at])
            at += 1
        if len(mine) == 1 and mine[0][1] > floor * (1 + 1e-12):
            out.append("trial")
        elif mine and abs(mine[-1][1] - floor) <= 1e-12 * floor:
            out.append("fallback" if len(mine) == 2 else "floor")
        else:
            out.append("?")
    return out


def test_the_certified_threshold_keeps_the_bound_on_both_branches(bands, monkeypatch):
    """A coarse tolerance and a trial constant that some pieces meet and one does not (measured on this
    grid: c = 0.005–0.05 and 0.1 requested): each truncated Ẽ stays within E ⪯ Ẽ ⪯ (1 + tol) E of the
    dense Galerkin matrix, whichever threshold certified it, and the trial one drops coordinates."""
    calls, floors = bands
    monkeypatch.setattr(two_level_mod, "GALERKIN_TOL", 1.0)
    monkeypatch.setattr(two_level_mod, "GALERKIN_TRIAL_C", 0.1)
    pre, G, miss, _ = _coarse_for(model("clouds", path="cg"))
    branches = _branches(calls, floors)
    assert "trial" in branches and "fallback" in branches, branches
    W, E = _coarse_dense(pre, miss)
    at = 0
    for pc in pre.pieces:
        w = W[:, at : at + pc.modes]
        exact = w.mT @ G @ w
        approx = E[at : at + pc.modes, at : at + pc.modes]
        at += pc.modes
        assert rel(approx, exact) > 1e-8  # something was dropped
        ratio = torch.linalg.eigvals(torch.linalg.solve(exact, approx)).real
        assert float(ratio.min()) >= 1 - 1e-8 and float(ratio.max()) <= 2 + 1e-8


def test_a_trial_constant_no_piece_meets_falls_back_to_the_a_priori_threshold(bands, monkeypatch):
    """``GALERKIN_TRIAL_C = 1`` asks ``E ⪰ WᵀW/σ²``, which a piece never holds (``X ⪯ I/σ²``, equality only
    with no prior variance): every piece falls back, and gets the Ẽ of the a priori threshold alone."""
    calls, floors = bands
    monkeypatch.setattr(two_level_mod, "GALERKIN_TRIAL_C", 1.0)
    pre, *_ = _coarse_for(model("clouds", path="cg"))
    assert set(_branches(calls, floors)) == {"fallback"}
    monkeypatch.setattr(two_level_mod, "GALERKIN_TRIAL_C", 0.0)  # the floor directly (one pass)
    calls.clear(), floors.clear()
    direct, *_ = _coarse_for(model("clouds", path="cg"))
    assert set(_branches(calls, floors)) == {"floor"}
    for a, b in zip(pre.pieces, direct.pieces):
        assert rel(a.L @ a.L.mT, b.L @ b.L.mT) <= 1e-12


@pytest.fixture
def built(monkeypatch):
    """The two-level preconditioners the cg path builds (a list, in build order)."""
    out = []
    real = two_level_mod.two_level

    def spy(*a, **k):
        out.append(real(*a, **k))
        return out[-1]

    monkeypatch.setattr(masked, "two_level", spy)
    return out


def test_clouds_on_the_cg_path_match_dense_with_certified_truncation(bands, built, monkeypatch):
    """Likelihood, gradient and posterior with pieces whose Galerkin matrices took the trial threshold
    (float64; 1e-6 relative against a dense Cholesky): the preconditioner only sets the iterations."""
    calls, floors = bands
    monkeypatch.setattr(two_level_mod, "GALERKIN_TRIAL_C", 0.1)
    gp = model("clouds", path="cg", cg_tol=1e-10)
    lml, grads = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    assert built and built[-1] is not None and "trial" in _branches(calls, floors)
    ref, ref_grads = lml_and_grads(gp, dense_lml)
    assert abs(lml - ref) <= 1e-6 * abs(ref)
    assert rel(grads, ref_grads) <= 1e-6
    assert_posterior_matches_dense(gp, 1e-6, variance="exact")


def test_float32_clouds_with_float64_coarse_solves_match_dense(bands, built):
    """A float32 grid's coarse solves run in float64 beside its float32 rows (apply, probes, log det P):
    likelihood within 1e-4 and gradient within 1e-3 of a dense float64 Cholesky and of the float64 model,
    posterior mean within 1e-4 (assert_float32_agrees_with_float64's bounds)."""
    m32 = model("clouds", path="cg", dtype=torch.float32)
    lml, grads = lml_and_grads(m32, lambda m: m.log_marginal_likelihood())
    assert built and built[-1] is not None and built[-1].dtype == torch.float64 and built[-1].g_diag.dtype == torch.float32
    m64 = model("clouds", path="cg", cg_tol=1e-10)
    ref, ref_grads = lml_and_grads(m64, dense_lml)
    assert abs(lml - ref) <= 1e-4 * abs(ref), (lml, ref)
    assert rel(grads.double(), ref_grads) <= 1e-3
    assert_float32_agrees_with_float64(m64, m32)


def _clouds(n: int, frac: float = 0.2, seed: int = 1) -> torch.Tensor:
    """Random balls of radius 0.05–0.15 n until ``frac`` of an n³ grid is missing (benchmarks/gaps.py's
    ``clouds-20`` rule)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), -1)
    miss = torch.zeros(n, n, n, dtype=torch.bool)
    while float(miss.double().mean()) < frac:
        centre = torch.rand(3, generator=g, dtype=torch.float64) * n
        radius = (0.05 + 0.1 * float(torch.rand(1, generator=g))) * n
        miss |= ((idx - centre) ** 2).sum(-1) < radius * radius
    return miss


def _cloudy_field(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A smooth field plus noise on an n³ unit grid (float64) with :func:`_clouds` missing (NaN), and its axes."""
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for _ in range(3)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    v = sum(torch.sin(4 * m) for m in mesh) + 0.1 * torch.randn(n, n, n, generator=torch.Generator().manual_seed(0),
                                                                   dtype=torch.float64)
    v[_clouds(n)] = float("nan")
    return v, axes


def test_two_level_cuts_the_iterations_of_clouds(monkeypatch):
    """24³, 20 % clouds (2794 cells; the blobs merge into one component over most of the grid, plus a
    few): CG on G takes 43 iterations with Jacobi and 24 with the two-level preconditioner (415 modes
    with the merged cloud's cap at 256, 671 at 512: 24 either way; measured 2026-12-07). Asserted: at least 1.4× fewer, with the preconditioner's modes present."""
    n = 24
    v, axes = _cloudy_field(n)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(two_level_mod, "ENABLED", on)
        gp = GridGP(v, axes, path="cg", cg_tol=1e-8)
        with torch.no_grad():
            gp.log_marginal_likelihood()
        runs[on] = (gp.last_solve.iterations, gp._last_extra.get("coarse_modes"))
    assert runs[False][1] is None and runs[True][1] > 0
    assert runs[True][0] * 1.4 <= runs[False][0], runs


def test_a_float32_grid_solves_its_coarse_problems_in_float64(monkeypatch):
    """24³, 20 % clouds in float32: the coarse solves are built and applied in float64 (COARSE_DTYPE), so the
    grid keeps the float64 grid's coarse space and its iterations (before the mass filter, float32 coarse solves
    kept 159 of 671 modes there: the merged cloud's truncated Galerkin matrix, a difference, failed its Cholesky;
    33 iterations against 17; measured 2026-12-07). The apply returns the grid's dtype; the likelihood stays
    within float32's reach of the float64 grid's."""
    n = 24
    v, axes = _cloudy_field(n)
    runs = {}
    for name, dt, coarse in (("64", torch.float64, torch.float64), ("32 wide", torch.float32, torch.float64),
                             ("32 narrow", torch.float32, None)):
        monkeypatch.setattr(two_level_mod, "COARSE_DTYPE", coarse)
        gp = GridGP(v.to(dt), [a.to(dt) for a in axes], path="cg", cg_tol=1e-8 if dt == torch.float64 else 1e-5)
        with torch.no_grad():
            lml = float(gp.log_marginal_likelihood())
        pre = gp._two_level.pre
        runs[name] = (gp.last_solve.iterations, pre.modes, lml, pre.dtype, pre.batches[0].e_inv.dtype)
        rows = torch.zeros(3, gp.n_cells, dtype=dt)
        rows[:, gp.observed.logical_not()] = 1.0
        assert pre.apply(rows).dtype == dt
    assert runs["32 wide"][3:] == (torch.float64, torch.float64) and runs["32 narrow"][3:] == (torch.float32,) * 2
    assert runs["32 wide"][1] == runs["64"][1] and runs["32 wide"][0] <= runs["32 narrow"][0], runs
    assert abs(runs["32 wide"][2] - runs["64"][2]) <= 2e-3 * abs(runs["64"][2]), runs


def test_the_merged_cloud_keeps_its_massive_directions_and_the_memory_plan_counts_them(monkeypatch):
    """24³, 20 % clouds: the merged component keeps the candidates' directions with at least MASS_SHARE of their
    mass on its cells (mass_filter), more at a lower share, never more than MAX_TRUNCATED_MODES (a cap of 64 binds);
    :func:`coarse_bytes` (the memory plan's part) covers the kept matrices of what the step built, and follows
    the cap."""
    n = 24
    v, axes = _cloudy_field(n)
    missing = torch.isnan(v).reshape(-1)
    found = {}
    for share, cap in ((0.3, 512), (0.05, 512), (0.05, 64)):
        monkeypatch.setattr(two_level_mod, "MASS_SHARE", share)
        monkeypatch.setattr(two_level_mod, "MAX_TRUNCATED_MODES", cap)
        gp = GridGP(v, axes, path="cg", cg_tol=1e-8)
        with torch.no_grad():
            gp.log_marginal_likelihood()
        pieces = gp._two_level.pre.pieces
        merged = max((pc for pc in pieces if not pc.hole.fills), key=lambda pc: pc.hole.m)
        U = merged.basis.mix
        assert U is not None and U.shape == (merged.basis.sel.numel(), merged.modes)
        assert U.shape[0] <= two_level_mod.candidate_modes(v.device) and U.shape[1] <= cap
        inside = torch.zeros(merged.hole.box, dtype=torch.float64)
        inside[merged.hole.pos] = 1.0
        W = merged.basis.box_rows(torch.eye(merged.modes, dtype=torch.float64)) * inside  # orthonormal on the piece
        assert rel(W @ W.mT, torch.eye(merged.modes, dtype=torch.float64)) <= 1e-10
        kept = 6 * 8 * sum(pc.modes**2 for pc in pieces)
        planned = two_level_mod.coarse_bytes(missing, (n, n, n), 8)
        assert planned >= kept, (share, cap, planned, kept)
        found[(share, cap)] = (merged.modes, planned)
    assert found[(0.3, 512)][0] < found[(0.05, 512)][0] <= 512 and found[(0.05, 64)][0] == 64, found
    assert found[(0.05, 64)][1] < found[(0.05, 512)][1], found


# ----------------------------------------------------------------------------- benchmarks/cloud_pieces.py


def test_the_benchmarks_tile_rule_splits_a_spanning_component_into_disjoint_pieces_of_their_tiles(monkeypatch):
    """The ``tiles-B`` rule whose iterations NOTES.md reports: a component spanning a 16³ grid (a
    plus of three bars through the centre) cut into tiles of at most 6 cells per axis of its box (3 per
    axis: 27 tiles, of which the centre one and the six the arms cross hold cells and are pieces): each
    piece inside its tile, the pieces disjoint, together the component; grown tiles overlap;
    ``components`` keeps it whole."""
    from _helpers import benchmark_module

    cp = benchmark_module("cloud_pieces")
    monkeypatch.setattr(two_level_mod, "MIN_MISSING", 8)
    monkeypatch.setattr(two_level_mod, "MIN_INTERIOR", 0)
    n = 16
    miss = torch.zeros(n, n, n, dtype=torch.bool)
    miss[:, 6:10, 6:10] = True
    miss[6:10, :, 6:10] = True
    miss[6:10, 6:10, :] = True
    flat = miss.reshape(-1)
    whole = cp.rule("components")(flat, (n, n, n))
    assert [pc.m for pc in whole] == [int(miss.sum())]
    pieces = cp.rule("tiles-6")(flat, (n, n, n))
    edges = torch.linspace(0, n, 4).round().long()  # the tiles' edges on each axis (the box is the grid)
    assert len(pieces) == 7  # the centre tile and the six arms' tiles (the corners and edges hold none)
    seen = torch.zeros(n**3, dtype=torch.long)
    for pc in pieces:
        for c in pc.coords:  # every cell of a piece in one tile on each axis
            tile = torch.bucketize(c, edges[1:-1], right=True)
            assert bool((tile == tile[0]).all())
        seen[pc.idx] += 1
    assert int(seen.max()) == 1 and bool((seen > 0).eq(flat).all())
    grown = cp.rule("tiles-6+2")(flat, (n, n, n))
    seen = torch.zeros(n**3, dtype=torch.long)
    for pc in grown:
        seen[pc.idx] += 1
    assert int(seen.max()) > 1 and bool((seen > 0).eq(flat).all())


def test_box_rows_in_blocks_give_the_same_galerkin_matrix(monkeypatch):
    """A piece whose ``|S|`` box rows pass MAX_BOX_ELEMENTS gets them a few modes at a time (formed again
    per block of eigen-coordinates): the same Ẽ as from the rows held whole, on both thresholds."""
    monkeypatch.setattr(two_level_mod, "MIN_MISSING", 1)
    monkeypatch.setattr(two_level_mod, "MIN_INTERIOR", 0)
    monkeypatch.setattr(two_level_mod, "GALERKIN_TRIAL_C", 0.1)  # some pieces pass the trial, one falls back
    gp = model("clouds", path="cg")
    pre, *_ = _coarse_for(gp)
    with torch.no_grad():
        cov = gp.inference.covariance(gp, gp._factors())
        scale = float(cov.outputscale / cov.sigma_bar2)
        ragged = [pc for pc in pre.pieces if not pc.hole.fills and pc.modes > 3]
        assert ragged
        for pc in ragged:
            mus, _ = two_level_mod._box_eigs(cov.factors, pc.hole)
            top = scale * float(torch.stack([mu[0] for mu in mus]).prod())
            args = (pc.basis, cov.eig, cov.outputscale, cov.sigma_bar2, top)
            whole = two_level_mod.truncated_galerkin(*args)
            with monkeypatch.context() as m:
                m.setattr(two_level_mod, "MAX_BOX_ELEMENTS", 3 * pc.hole.box)  # three modes a block
                blocks = two_level_mod.truncated_galerkin(*args)
            assert rel(blocks, whole) <= 1e-12


def test_the_candidates_follow_the_device_rule(monkeypatch):
    """A ragged piece takes candidate_modes(device) candidates: MAX_CANDIDATE_MODES on the CPU (a small cap binds
    here, and the memory plan follows it), MAX_CANDIDATE_MODES_CUDA on a CUDA device."""
    assert two_level_mod.candidate_modes(torch.device("cpu")) == two_level_mod.MAX_CANDIDATE_MODES
    assert two_level_mod.candidate_modes(torch.device("cuda")) == two_level_mod.MAX_CANDIDATE_MODES_CUDA
    assert two_level_mod.candidate_modes("cuda:1") == two_level_mod.MAX_CANDIDATE_MODES_CUDA
    n = 24
    v, axes = _cloudy_field(n)
    missing = torch.isnan(v).reshape(-1)
    rows, planned = {}, {}
    for most in (40, 400):
        monkeypatch.setattr(two_level_mod, "MAX_CANDIDATE_MODES", most)
        gp = GridGP(v, axes, path="cg", cg_tol=1e-8)
        with torch.no_grad():
            gp.log_marginal_likelihood()
        merged = max((pc for pc in gp._two_level.pre.pieces if not pc.hole.fills), key=lambda pc: pc.hole.m)
        rows[most] = merged.basis.mix.shape[0]
        planned[most] = two_level_mod.coarse_bytes(missing, (n, n, n), 8)
    assert rows[40] <= 40 < rows[400] <= 400, rows
    assert planned[40] < planned[400], planned
