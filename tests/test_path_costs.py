"""The cost rule that chooses exact or stochastic handling of missing cells (kronegp/models/costs.py,
issue 22): it looks at the grid's size, not only at the number of missing cells.

Models are built (the choice is made at construction) but not stepped: the grids here are as large
as the shipped air grid only in their shape."""

from __future__ import annotations

import pytest
import torch

from kronegp import GridGP
from kronegp.models import costs

AIR = (240, 37, 49)  # the shipped air-temperature grid's shape (435,120 cells)


def _grid(shape, missing: torch.Tensor, dtype=torch.float64, **kw) -> GridGP:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v[missing.reshape(shape)] = float("nan")
    axes = [torch.linspace(0, 1, n, dtype=dtype) for n in shape]
    return GridGP(v, axes, **kw)


def _scatter(shape, m: int, seed: int = 0) -> torch.Tensor:
    n = torch.Size(shape).numel()
    out = torch.zeros(n, dtype=torch.bool)
    out[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]] = True
    return out.reshape(shape)


def _hole(shape, sides) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.bool)
    out[tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(shape, sides))] = True
    return out


def _cg_traces_exact(gp: GridGP) -> bool:
    return bool(gp.inference.exact_trace(gp, ~gp.observed))


def test_the_rule_takes_exact_within_the_budget_or_when_no_slower(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setitem(costs.EXACT_BUDGET_S, "cpu", 2.0)
    assert costs.prefer_exact(1.9, 0.01, cpu)  # within the budget, whatever the ratio
    assert costs.prefer_exact(5.0, 5.0, cpu)  # over it, but no slower
    assert not costs.prefer_exact(5.0, 4.9, cpu)
    monkeypatch.setitem(costs.EXACT_BUDGET_S, "cpu", 0.0)
    assert not costs.prefer_exact(1.9, 0.01, cpu)
    # a CUDA device has its own budget (no GPU needed to ask)
    monkeypatch.setitem(costs.EXACT_BUDGET_S, "cuda", 0.05)
    assert costs.prefer_exact(0.04, 0.001, torch.device("cuda"))
    assert not costs.prefer_exact(0.06, 0.001, torch.device("cuda"))


def test_predicted_costs_grow_with_the_grid_and_the_missing_cells():
    r = costs.rates_for(torch.device("cpu"), torch.float64)
    small, large = (20, 20, 20), AIR
    assert costs.exact_missing_seconds(576, large, None, r) > 50 * costs.exact_missing_seconds(576, small, None, r)
    assert costs.exact_missing_seconds(1000, small, None, r) > 5 * costs.exact_missing_seconds(100, small, None, r)
    # a compact hole through its box costs far less than the rows of as many scattered cells
    assert costs.exact_missing_seconds(576, large, [6, 8, 12], r) < 0.1 * costs.exact_missing_seconds(576, large, None, r)
    assert costs.cg_seconds(577, large, r) > 20 * costs.cg_seconds(17, large, r)
    # every device type and dtype has coefficients; unknown devices fall back to the CPU's
    for dev in ("cpu", "cuda"):
        for dt in (torch.float32, torch.float64):
            assert costs.rates_for(torch.device(dev), dt) is costs.RATES[(dev, dt)]


def test_scattered_cells_on_a_large_grid_take_cg_with_random_probes():
    """Issue 22: 576 scattered cells on the air grid took 50 s on exact-missing and 128 s with
    exact traces, against 3.9 s for cg with 16 random probes."""
    gp = _grid(AIR, _scatter(AIR, 576))
    assert gp.path == "cg"
    assert not _cg_traces_exact(gp)
    forced = _grid(AIR, _scatter(AIR, 576), path="cg")
    assert not _cg_traces_exact(forced)
    # a few scattered cells stay exact on the same grid (predicted well within the budget)
    assert _grid(AIR, _scatter(AIR, 8)).path == "exact-missing"


def test_a_hole_on_a_large_grid_stays_exact_through_its_box():
    gp = _grid(AIR, _hole(AIR, (6, 8, 12)))  # 576 cells, like the scatter above
    assert gp.path == "exact-missing"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_20_cube_keeps_the_old_choices(dtype):
    """Up to 1024 missing cells the old fixed limit took exact-missing on 20³; the rule keeps that
    (its slowest case, 1000 scattered cells, is predicted within the CPU budget)."""
    shape = (20, 20, 20)
    for m in (64, 512, 1000):
        assert _grid(shape, _scatter(shape, m), dtype=dtype).path == "exact-missing", m
    assert _grid(shape, _hole(shape, (10, 10, 10)), dtype=dtype).path == "exact-missing"
    assert _grid(shape, _scatter(shape, 1728), dtype=dtype).path == "cg"  # past the limit, as before


def test_small_grids_keep_exact_traces_on_the_cg_path():
    shape = (10, 10, 10)
    gp = _grid(shape, _scatter(shape, 200), path="cg")
    assert _cg_traces_exact(gp)
    assert not _cg_traces_exact(_grid(shape, _scatter(shape, 200), path="cg", exact_trace_limit=100))


def test_the_rule_follows_its_budget(monkeypatch):
    """With no budget, exact-missing and exact traces are taken only where predicted no slower."""
    shape = (20, 20, 20)
    monkeypatch.setitem(costs.EXACT_BUDGET_S, "cpu", 0.0)
    assert _grid(shape, _scatter(shape, 1000)).path == "cg"
    assert not _cg_traces_exact(_grid(shape, _scatter(shape, 200), path="cg"))
    assert _cg_traces_exact(_grid(shape, _scatter(shape, 10), path="cg"))  # 11 columns < 17
    monkeypatch.setitem(costs.EXACT_BUDGET_S, "cpu", float("inf"))
    assert _grid(AIR, _scatter(AIR, 576)).path == "exact-missing"


def test_last_solve_says_whether_the_likelihood_is_an_estimate():
    shape = (6, 5, 7)
    missing = _scatter(shape, 20)
    exact = _grid(shape, missing)
    exact.log_marginal_likelihood()
    assert exact.path == "exact-missing" and not exact.last_solve.estimate
    traces = _grid(shape, missing, path="cg")
    traces.log_marginal_likelihood()
    assert not traces.last_solve.estimate and traces.last_solve.probes == 20
    random = _grid(shape, missing, path="cg", exact_trace_limit=0, num_probes=5)
    random.log_marginal_likelihood()
    assert random.last_solve.estimate and random.last_solve.probes == 5
    plain = _grid(shape, missing, path="cg", precondition=False)
    plain.log_marginal_likelihood()
    assert plain.last_solve.estimate


@pytest.mark.cuda
def test_the_rule_prices_a_cuda_device_with_its_own_rates():
    """On a GPU the choice uses the CUDA coefficients and budget (fitted to ``benchmarks/gaps.py
    --limit --device cuda``): 576 scattered cells on the air grid's shape, which the CPU's rates
    give to cg, are a GPU's exact-missing step when its predicted step is within the CUDA budget;
    2000 are cg with random probes, and say so."""
    shape = (20, 20, 20)
    assert _grid(shape, _scatter(shape, 1000), device="cuda").path == "exact-missing"
    cuda_rates = costs.rates_for(torch.device("cuda"), torch.float64)
    exact = costs.exact_missing_seconds(576, AIR, None, cuda_rates)
    expected = "exact-missing" if costs.prefer_exact(exact, costs.cg_seconds(17, AIR, cuda_rates),
                                                     torch.device("cuda")) else "cg"
    assert _grid(AIR, _scatter(AIR, 576)).path == "cg"  # the CPU's rates
    assert _grid(AIR, _scatter(AIR, 576), device="cuda").path == expected
    gp = _grid(AIR, _scatter(AIR, 2000), device="cuda")
    assert gp.path == "cg" and not _cg_traces_exact(gp)
    gp.log_marginal_likelihood()
    assert gp.last_solve.estimate
