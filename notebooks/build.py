"""Write (and optionally execute) the kronegp notebooks from the cell sources in this folder.

The notebooks' code lives in ``notebooks/cells/NN_name.py`` as plain Python, cells separated
by ``# %%`` lines (``# %% [markdown]`` for text, each line of which starts with ``# ``), so it
reads and diffs like code; this script turns each into ``NN_name.ipynb``::

    python notebooks/build.py                        # write all .ipynb (no outputs)
    python notebooks/build.py --execute              # ... and run them (KRONEGP_NOTEBOOK_SIZE)
    python notebooks/build.py --execute --size small 01_ozone_spatiotemporal

Executed notebooks are saved with their outputs and figures. ``tests/test_notebooks.py``
checks that the saved notebooks hold exactly these cells and runs them at ``small`` size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells"
SIZES = ("small", "medium", "full")


def parse_cells(path: Path) -> list[tuple[str, str]]:
    """``[(kind, source)]`` from a ``# %%``-separated Python file; kind is code or markdown."""
    cells: list[tuple[str, list[str]]] = []
    for line in path.read_text().splitlines():
        if line.startswith("# %%"):
            kind = "markdown" if "[markdown]" in line else "code"
            cells.append((kind, []))
        elif cells:
            cells[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"{path}: text before the first '# %%' cell marker: {line!r}")
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if kind == "markdown":
            bad = [ln for ln in lines if ln and not ln.startswith("#")]
            if bad:
                raise ValueError(f"{path}: markdown line without '# ': {bad[0]!r}")
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] for ln in lines]
        out.append((kind, "\n".join(lines)))
    return out


def notebook_names() -> list[str]:
    return sorted(p.stem for p in CELLS.glob("[0-9][0-9]_*.py"))


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(parse_cells(CELLS / f"{name}.py")):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(source, id=f"cell-{i:02d}"))  # stable ids: clean diffs
    return nb


def execute(nb: nbformat.NotebookNode, size: str, timeout: int = 1800,
            cwd: Path = HERE) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom in a fresh kernel with ``KRONEGP_NOTEBOOK_SIZE=size``."""
    from nbclient import NotebookClient

    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size!r}")
    previous = os.environ.get("KRONEGP_NOTEBOOK_SIZE")
    os.environ["KRONEGP_NOTEBOOK_SIZE"] = size  # the kernel inherits this environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("KRONEGP_NOTEBOOK_SIZE", None)
        else:
            os.environ["KRONEGP_NOTEBOOK_SIZE"] = previous
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"notebooks (default all: {notebook_names()})")
    parser.add_argument("--execute", action="store_true", help="run and save with outputs")
    parser.add_argument("--size", default=os.environ.get("KRONEGP_NOTEBOOK_SIZE", "medium"),
                        choices=SIZES)
    args = parser.parse_args(argv)
    names = args.names or notebook_names()
    unknown = sorted(set(names) - set(notebook_names()))
    if unknown:
        parser.error(f"unknown notebooks {unknown}; expected names from {notebook_names()}")
    for name in names:
        nb = build(name)
        if args.execute:
            start = time.perf_counter()
            print(f"{name}: executing at size {args.size} ...", flush=True)
            execute(nb, args.size)
            print(f"{name}: ran in {time.perf_counter() - start:.0f} s", flush=True)
            nb.metadata["kronegp"] = {"executed_size": args.size}
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
