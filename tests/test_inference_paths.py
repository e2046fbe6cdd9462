"""One object per inference path (issue 22 item 5, issue 23 "one grid-GP core").

* each path object (:mod:`kronegp.models.paths`), forced on a small float64 grid, against a dense
  Cholesky (the references of :mod:`test_gaps`): likelihood, gradient, posterior on the grid
  and at points;
* every path class has the same interface;
* ``GridGP`` never branches on the path (read from its source with ``ast``);
* the paths do their grid-vector work through the model's layout (a layout that counts its
  calls gives the same numbers).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import kronegp.models._dense as dense_module
from kronegp import GridGP
from kronegp.models.layout import LocalLayout
from kronegp.models.paths import PATHS, InferencePath
from test_gaps import dense_grid_posterior, dense_lml, field, lml_and_grads, pattern, rel

GRID_GP_SOURCE = Path(__file__).resolve().parent.parent / "kronegp" / "models" / "grid_gp.py"
MEMORY_SOURCE = GRID_GP_SOURCE.with_name("memory.py")


def _separable_mask(shape):
    g = torch.Generator().manual_seed(4)
    keep = torch.rand(shape[0], shape[1], 1, generator=g) > 0.3
    return keep.expand(shape).clone()


def _build(case, monkeypatch=None):
    """The model of ``case``; ``"cg-noise"`` runs the iterative estimator (its dense likelihood
    switched off through ``monkeypatch``), ``"cg-noise-dense"`` the dense one."""
    v, axes = field()
    hyper = {"lengthscales": [1.5, 2.0, 2.5], "noise": 0.05}
    if case == "exact":
        return GridGP(v, axes, path="exact", hyperparameters=hyper)
    if case == "exact-missing":
        v[pattern("clouds")] = float("nan")
        return GridGP(v, axes, path="exact-missing", hyperparameters=hyper)
    if case == "separable-mask":
        return GridGP(v, axes, mask=_separable_mask(v.shape), path="separable-mask", hyperparameters=hyper)
    if case == "cg-missing":
        v[pattern("hole")] = float("nan")
        return GridGP(v, axes, path="cg", cg_tol=1e-10, hyperparameters=hyper)
    if case == "cg-noise" and monkeypatch is not None:
        monkeypatch.setattr(dense_module, "DENSE_MAX_CPU", 0)
    g = torch.Generator().manual_seed(5)  # cg with per-cell noise over two decades
    noise = 0.01 * 10 ** (2 * torch.rand(v.shape, generator=g, dtype=v.dtype))
    return GridGP(v, axes, noise=noise, path="cg", cg_tol=1e-10, hyperparameters={"lengthscales": [1.5, 2.0, 2.5]})


CASES = ["exact", "exact-missing", "separable-mask", "cg-missing", "cg-noise", "cg-noise-dense"]


@pytest.mark.parametrize("case", CASES)
def test_each_path_object_matches_a_dense_cholesky(case, monkeypatch):
    gp = _build(case, monkeypatch)
    if case.startswith("cg-noise"):  # the dense likelihood runs eagerly, the iterative one may be a graph
        assert (gp.inference.graph_obstacle(gp) is not None) == (case == "cg-noise-dense")
    name = case if not case.startswith("cg") else "cg"
    assert gp.path == name and type(gp.inference) is PATHS[name]
    tol = 1e-6 if name == "cg" else 1e-10
    a, ga = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    b, gb = lml_and_grads(gp, dense_lml)
    assert abs(a - b) <= tol * abs(b), (a, b)
    assert rel(ga, gb) <= tol * 10
    assert gp.last_solve.path == name
    mean, var = gp.predict(variance="exact")
    ref_mean, ref_var = dense_grid_posterior(gp)
    assert rel(mean.reshape(-1), ref_mean) <= tol
    assert rel(var.reshape(-1), ref_var) <= tol * 100  # a difference of near-equal terms
    # at points that are grid nodes the posterior is the grid's
    pts = gp.layout.grid_points(gp.axes)[::7]
    pmean, pvar = gp.predict(pts, variance="exact")
    assert rel(pmean, ref_mean[::7]) <= tol
    assert rel(pvar, ref_var[::7]) <= tol * 100
    torch.manual_seed(0)
    draws = gp.sample(3)
    assert draws.shape == (3, *gp.shape) and bool(torch.isfinite(draws).all())


def test_every_path_class_has_the_same_interface():
    members = ["lml", "posterior_grid", "posterior_points", "sample", "graph_obstacle", "memory_plan"]
    assert sorted(PATHS) == ["cg", "exact", "exact-missing", "separable-mask"]
    for name, cls in PATHS.items():
        assert issubclass(cls, InferencePath) and cls.name == name
        for member in members:
            params = list(inspect.signature(getattr(cls, member)).parameters)
            assert params == list(inspect.signature(getattr(InferencePath, member)).parameters), (name, member)
        # what the base leaves to each path is there
        overridden = {m for m in ("lml", "sample", "_system", "_solved", "_point_reduction", "memory_plan")
                      if getattr(cls, m) is not getattr(InferencePath, m)}
        assert {"lml", "_point_reduction", "memory_plan"} <= overridden, name
        assert "_system" in overridden or {"_solved", "sample"} <= overridden, name


def _path_branches(source: str) -> list[int]:
    """Lines where ``source`` compares something with a path's name (``x == "cg"``,
    ``x in ("exact", …)``) or with a ``.path`` / ``path`` value. (``variance`` takes
    ``"exact"`` too, as a method: comparisons of ``variance`` are not about the path.)"""
    names = set(PATHS)
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or (isinstance(node.left, ast.Name) and node.left.id == "variance"):
            continue
        for operand in [node.left, *node.comparators]:
            consts = [operand] + (list(operand.elts) if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [])
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts) or (
                    isinstance(operand, ast.Attribute) and operand.attr in ("path", "_path")) or (
                    isinstance(operand, ast.Name) and operand.id == "path"):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_gridgp_does_not_branch_on_the_path():
    # the check finds a branch where there is one
    assert _path_branches('if self.path == "cg":\n    pass\n') == [1]
    assert _path_branches('x = gp.path in ("exact-missing", "separable-mask")\n') == [1]
    found = _path_branches(GRID_GP_SOURCE.read_text())
    assert not found, f"grid_gp.py compares the path at lines {found}: ask gp.inference instead"


def test_memory_plan_leaves_the_choice_to_the_path():
    """memory.py counts bytes; which count applies is the path's (InferencePath.memory_plan): it neither
    compares the path, nor asks the path object anything but its plan, nor imports the paths (a cycle
    memory -> paths -> _masked -> memory was removed once)."""
    source = MEMORY_SOURCE.read_text()
    found = _path_branches(source)
    assert not found, f"memory.py compares the path at lines {found}: let the path's memory_plan choose"
    tree = ast.parse(source)
    asked = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Attribute) and node.value.attr == "inference"}
    assert asked == {"memory_plan"}, asked
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(name and name.endswith("paths") for name in imported), imported


class _CountingLayout(LocalLayout):
    """A local layout that counts the calls of every method a path may use."""

    def __init__(self, shape):
        super().__init__(shape)
        self.calls: dict[str, int] = {}
        for name in ("kron_matmul", "eigen", "kron_vector", "total", "bilinear", "exact_lml", "covariance", "dense_lml",
                     "std_normal", "unit_probes", "fill_noise", "grid_points"):
            real = getattr(self, name)

            def counted(*args, _real=real, _name=name, **kw):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _real(*args, **kw)

            setattr(self, name, counted)


@pytest.mark.parametrize("case", ["exact", "cg-missing", "cg-noise", "cg-noise-dense"])
def test_paths_work_through_the_layout(case, monkeypatch):
    gp = _build(case, monkeypatch)
    before, grads_before = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    gp.layout = gp.inference.layout = _CountingLayout(gp.shape)
    after, grads_after = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    assert after == before and rel(grads_after, grads_before) == 0.0
    calls = gp.layout.calls
    if case == "exact":
        assert calls.get("exact_lml", 0) == 1
    elif case == "cg-noise-dense":
        assert calls.get("dense_lml", 0) == 1 and calls.get("covariance", 0) == 0
    else:
        assert calls.get("covariance", 0) == 1 and calls.get("total", 0) >= 1 and calls.get("fill_noise", 0) >= 1
        assert calls.get("unit_probes", 0) + calls.get("std_normal", 0) >= 1


def test_forced_exact_missing_refuses_rows_that_cannot_be_held(monkeypatch):
    """path='exact-missing' with more m·N than one block of rows may hold is a clear error before any
    work (on the H100, gaps.py --limit forced it at 64³ with 13,824 scattered cells: a 15.6 GiB
    allocation failed mid-step); auto never takes it there. A compact hole with the same m·N goes through
    its box and never forms the rows: it is taken, forced or by auto, and matches a dense Cholesky."""
    import kronegp.models.paths as paths_module
    from kronegp.models._few_missing import MissingBox, forms_rows
    from test_gaps import dense_lml, lml_and_grads, rel

    monkeypatch.setattr(paths_module, "MAX_FORM_ELEMENTS", 1000)
    v = torch.randn(10, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    scattered = v.clone()
    scattered.view(-1)[torch.tensor([3, 97, 211, 358, 402, 555, 781, 996])] = float("nan")  # m = 8, m·N = 8000 > 1000
    with pytest.raises(ValueError, match=r"path='exact-missing' holds blocks of m × N rows.*m = 8 missing cells"):
        GridGP(scattered, path="exact-missing")
    assert GridGP(scattered).path != "exact-missing"
    hole = v.clone()
    hole[3:5, 3:5, 3:5] = float("nan")  # m = 8 too, in a box of 8 cells
    assert not forms_rows(MissingBox(torch.isnan(hole).reshape(-1), (10, 10, 10)), (10, 10, 10))
    assert forms_rows(MissingBox(torch.isnan(scattered).reshape(-1), (10, 10, 10)), (10, 10, 10))
    for path in ("exact-missing", "auto"):
        gp = GridGP(hole, path=path)
        assert gp.path == "exact-missing"
        lml, grads = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
        ref, ref_grads = lml_and_grads(gp, dense_lml)
        assert abs(lml - ref) <= 1e-10 * abs(ref) and rel(grads, ref_grads) <= 1e-10


@pytest.mark.parametrize("shape,frac", [((5, 6, 7), 0.1), ((9, 4, 3), 0.5), ((4, 4, 4), 1.0)])
def test_unit_probes_are_the_scaled_unit_vectors_of_the_cells(shape, frac):
    """``LocalLayout.unit_probes`` (built without a boolean index, so a CUDA graph's checked pass may call it)
    gives ``√S`` times the unit vectors of the cells, in the grid's order, and nothing elsewhere."""
    lay = LocalLayout(shape)
    n = lay.n_cells
    g = torch.Generator().manual_seed(int(frac * 10))
    cells = torch.rand(n, generator=g) < frac
    count = int(cells.sum())
    like = torch.zeros(1, dtype=torch.float64)
    got = lay.unit_probes(cells, count, like)
    want = torch.zeros(n, count, dtype=torch.float64)
    want[torch.nonzero(cells).squeeze(-1), torch.arange(count)] = count**0.5
    assert got.shape == (n, count)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    every = lay.unit_probes(None, n, like)
    torch.testing.assert_close(every, n**0.5 * torch.eye(n, dtype=torch.float64), rtol=1e-15, atol=0)
