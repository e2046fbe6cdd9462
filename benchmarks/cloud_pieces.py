"""How to cut clouds into pieces for the two-level preconditioner (issue 22 item 2): CG iterations on the
missing cells' system ``G = X_MM`` and the preconditioner's setup, per rule for the pieces and cap on
the modes of a piece that does not fill its box, on a pattern of ``benchmarks/gaps.py`` (a table and JSON).

Rules (:func:`kronegp.models._two_level.pieces_of` is replaced for the run; the rest of the
preconditioner is the library's):

* ``components``: the library's rule (connected components, ≥ ``MIN_MISSING`` cells, ≥ ``MIN_INTERIOR``
  interior cells);
* ``tiles-B``: a component whose box is longer than ``B`` cells on some axis is cut into near-equal
  tiles of at most ``B`` cells per axis over its box, each (component ∩ tile) a piece (same filters);
* ``tiles-B+O``: the same tiles grown by ``O`` cells per side, so that neighbouring pieces overlap
  (the additive ``M`` is still SPD and CG still correct, but its log determinant and probes assume
  disjoint pieces: iterations only);
* ``necks-D``: cut at the necks: the cores are the components of the missing cells eroded ``D`` times;
  every cell of a component goes to the core it reaches first growing inside the missing cells
  (a component without a core stays whole).

Per row: pieces, coarse modes, CG iterations (``--rhs`` random right-hand sides at ``--tol``), the
setup (``two_level``) and CG wall times, one thread unless ``OMP_NUM_THREADS`` says otherwise.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/cloud_pieces.py --n 48 --rules components tiles-16 necks-1 --modes 256 1024
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import time
import warnings

import numpy as np
import scipy.ndimage
import torch

import gaps
import kronegp.models._masked as masked
import kronegp.models._two_level as two_level
from kronegp.models._few_missing import MissingBox
from kronegp.solvers import block_cg

LIBRARY_PIECES = two_level.pieces_of


def _kept(masks: list[np.ndarray], inner: np.ndarray, sizes) -> list[MissingBox]:
    """The library's filters and order on candidate pieces (bool grids)."""
    masks = [mk for mk in masks if mk.sum() >= two_level.MIN_MISSING and (mk & inner).sum() >= two_level.MIN_INTERIOR]
    masks.sort(key=lambda mk: -int(mk.sum()))
    return [MissingBox(torch.from_numpy(mk).reshape(-1), sizes) for mk in masks[: two_level.MAX_PIECES]]


def tiles(side: int, grow: int = 0):
    """``tiles-B[+O]``: components longer than ``side`` cut into tiles of their box (grown by ``grow``)."""

    def pieces(missing, sizes):
        mask = missing.reshape(list(sizes)).cpu().numpy()
        labels, _ = scipy.ndimage.label(mask)
        inner = scipy.ndimage.binary_erosion(mask, border_value=1)
        out = []
        for k, sl in enumerate(scipy.ndimage.find_objects(labels), 1):
            comp = labels == k
            ext = [s.stop - s.start for s in sl]
            if max(ext) <= side:
                out.append(comp)
                continue
            cuts = [np.linspace(s.start, s.stop, math.ceil(e / side) + 1).round().astype(int) for s, e in zip(sl, ext)]
            for at in itertools.product(*[range(len(c) - 1) for c in cuts]):
                box = np.zeros_like(comp)
                box[tuple(slice(max(0, c[i] - grow), c[i + 1] + grow) for c, i in zip(cuts, at))] = True
                out.append(comp & box)
        return _kept(out, inner, sizes)

    return pieces


def necks(depth: int):
    """``necks-D``: each component cut between the cores left after ``depth`` erosions."""

    def pieces(missing, sizes):
        mask = missing.reshape(list(sizes)).cpu().numpy()
        inner = scipy.ndimage.binary_erosion(mask, border_value=1)
        core = scipy.ndimage.binary_erosion(mask, iterations=depth, border_value=1)
        lab, cores = scipy.ndimage.label(core)
        lab = lab.astype(np.int64)
        comp, count = scipy.ndimage.label(mask)
        has = np.zeros(count + 1, dtype=bool)
        has[np.unique(comp[core])] = True
        alone = mask & ~has[comp]
        lab[alone] = comp[alone] + cores
        face = scipy.ndimage.generate_binary_structure(mask.ndim, 1)
        while True:  # grow the cores inside the missing cells, one face step at a time
            free = mask & (lab == 0)
            grown = scipy.ndimage.grey_dilation(lab, footprint=face)
            step = free & (grown > 0)
            if not step.any():
                break
            lab[step] = grown[step]
        return _kept([lab == k for k in range(1, int(lab.max()) + 1)], inner, sizes)

    return pieces


def rule(name: str):
    if name == "components":
        return LIBRARY_PIECES
    kind, _, arg = name.partition("-")
    if kind == "tiles":
        side, _, grow = arg.partition("+")
        return tiles(int(side), int(grow or 0))
    if kind == "necks":
        return necks(int(arg))
    raise ValueError(f"rules: unknown rule {name!r} (components, tiles-B, tiles-B+O, necks-D)")


def run(args) -> list[dict]:
    y, axes = gaps.draw(args.n, torch.float64, torch.device("cpu"))
    missing_grid, _ = gaps.pattern(args.pattern, args.n)
    gp = gaps.build(y, axes, missing_grid, None, path="cg")
    with torch.no_grad():
        cov = gp.inference.covariance(gp, gp._factors())
    observed = gp.observed
    missing = 1 - observed.to(torch.float64)
    g_diag = torch.where(missing > 0, cov.eig.diag_of(cov.p_inv), torch.ones_like(missing))
    matvec = masked._missing_matvec(cov, missing, 1e-10, rows=True)
    rhs = torch.randn(args.rhs, missing.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * missing
    rows = []
    saved = (two_level.pieces_of, two_level.MAX_TRUNCATED_MODES, two_level.MAX_BOX_ELEMENTS)
    try:
        for name, cap in [("jacobi", None)] + [(r, c) for r in args.rules for c in args.modes]:
            if cap is not None:
                two_level.pieces_of = rule(name)
                two_level.MAX_TRUNCATED_MODES = cap
                two_level.MAX_BOX_ELEMENTS = max(saved[2], cap * args.n**3)  # the cap, not the box, limits here
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                pre = None if cap is None else two_level.two_level(cov.eig, cov.factors, cov.outputscale, cov.sigma_bar2,
                                                                   cov.p_inv, g_diag, missing > 0)
                t1 = time.perf_counter()
                res = block_cg(matvec, rhs.clone(), pre.apply if pre is not None else 1.0 / g_diag, tol=args.tol,
                               rows=True, max_iters=1000)
                t2 = time.perf_counter()
            row = {"rule": name, "cap": cap, "pieces": len(pre.pieces) if pre else 0, "modes": pre.modes if pre else 0,
                   "iterations": int(res.iterations), "setup_s": t1 - t0, "cg_s": t2 - t1}
            rows.append(row)
            print(f"{name:14s} {str(cap):>5s} {row['pieces']:6d} {row['modes']:6d} {row['iterations']:6d} "
                  f"{row['setup_s']:8.2f} {row['cg_s']:8.2f}", flush=True)
    finally:
        two_level.pieces_of, two_level.MAX_TRUNCATED_MODES, two_level.MAX_BOX_ELEMENTS = saved
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32, help="grid side (n³ cells)")
    ap.add_argument("--pattern", default="clouds-20", help="a pattern of benchmarks/gaps.py")
    ap.add_argument("--rules", nargs="*", default=["components", "tiles-16", "tiles-16+3", "necks-1", "necks-2"])
    ap.add_argument("--modes", type=int, nargs="*", default=[two_level.MAX_TRUNCATED_MODES],
                    help="MAX_TRUNCATED_MODES per run (MAX_BOX_ELEMENTS raised to allow it)")
    ap.add_argument("--rhs", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(f"# {args.pattern} on {args.n}^3 float64, CPU ({torch.get_num_threads()} threads), {datetime.date.today()}")
    print(f"{'rule':14s} {'cap':>5s} {'pieces':>6s} {'modes':>6s} {'iters':>6s} {'setup s':>8s} {'cg s':>8s}")
    out = {"n": args.n, "pattern": args.pattern, "rhs": args.rhs, "tol": args.tol, "threads": torch.get_num_threads(),
           "date": str(datetime.date.today()), "rows": run(args)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
