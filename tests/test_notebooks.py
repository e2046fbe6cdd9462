"""The notebooks: saved with the cells notebooks/build.py writes, executed, and they run top
to bottom at small size (KRONEGP_NOTEBOOK_SIZE=small) on the CPU without errors."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _build_module():
    spec = importlib.util.spec_from_file_location("kronegp_notebook_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()
NAMES = build.notebook_names()


def test_the_five_notebooks_exist():
    assert len(NAMES) == 5
    for name in NAMES:
        assert (NOTEBOOKS / f"{name}.ipynb").is_file(), f"{name}.ipynb was never written"


@pytest.mark.parametrize("name", NAMES)
def test_saved_notebook_matches_its_cells_and_has_figures(name):
    saved = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    expected = build.build(name)
    assert [(c.cell_type, c.source) for c in saved.cells] == \
        [(c.cell_type, c.source) for c in expected.cells], \
        f"{name}.ipynb differs from notebooks/cells/{name}.py: run `python notebooks/build.py --execute {name}`"
    code = [c for c in saved.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}.ipynb is saved unexecuted"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{name}.ipynb was saved with an error"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1, f"{name}.ipynb has no figure"
    assert saved.metadata.get("kronegp", {}).get("executed_size") in ("medium", "full")


def _run(name, tmp_path, env=None):
    nb = build.build(name)
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        build.execute(nb, "small", timeout=600, cwd=NOTEBOOKS)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    texts = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                  for o in c.outputs)
    return texts, figures


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_small_size(name, tmp_path):
    texts, figures = _run(name, tmp_path)
    assert "size small" in texts or name.startswith("04")
    assert figures >= 1 or name.startswith("04")


@pytest.mark.slow
def test_benchmark_notebook_says_when_results_are_absent(tmp_path):
    name = next(n for n in NAMES if n.startswith("04"))
    texts, figures = _run(name, tmp_path, env={"KRONEGP_BENCH_RESULTS": str(tmp_path)})
    assert "No benchmark results found" in texts and figures == 0
