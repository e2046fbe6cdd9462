"""Per-cell noise on a full grid (issue 22, item 2): where the cg path's time goes, and what cuts it.

Data: ``gaps.py``'s draw and its ``cell-noise`` noise (per-cell variances over a 1e4 range) on
n × n × n grids. Two tables, one JSON:

* **solves**: CG with ``C = K + D`` in eigen-coordinates on 4 random right-hand sides to
  ``--tol``, preconditioned by ``P = K + σ̄² I`` (diagonal there) or by the square-root
  preconditioner of :mod:`kronegp.models._cell_noise` (two Kronecker products more per
  iteration): iterations, seconds, the signal's share of the eigenvalues (``λ > σ̄²``, what
  decides which one :class:`~kronegp.models._masked.FullGridCovariance` uses) and which it chose.
* **steps**: the training step (``loss_backward``, median) of ``cell-noise`` and
  ``block-1+cell-noise`` as GridGP runs it (dense Cholesky up to
  :data:`~kronegp.models._dense.DENSE_MAX_CPU` observed cells, else CG) and with each
  alternative switched on or off (``cg, unit probes``: the iterative estimator with
  ``exact_trace_limit``'s unit probes, what ran before the dense likelihood; ``P only``: the
  square-root preconditioner off, in the solves and the log-determinant run), with the
  likelihood's relative error against a dense Cholesky (up to ``--dense-max`` observed cells), the
  standard error the model reports for it (``last_solve.lml_std_error``, relative) and, with
  ``--seeds k``, the root mean square of the error over k probe seeds (one draw is one sample;
  seeds 100… : ``gaps.pattern`` draws the noise from seed 1, and probes of seed 1 would be made of
  the same random stream, correlated with the noise: −0.35 for the first column).

Usage::

    python benchmarks/cell_noise.py --n 10 16 24 --out cell_noise_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

import gaps
import kronegp.models._cell_noise as cell_noise
import kronegp.models._dense as dense
from kronegp.solvers import block_cg


def solves(n: int, dtype: torch.dtype, tol: float) -> list[dict]:
    y, axes = gaps.draw(n, dtype, torch.device("cpu"))
    _, noise = gaps.pattern("cell-noise", n)
    gp = gaps.build(y, axes, None, noise)
    cov = gp.inference.covariance(gp, gp._factors())
    rhs = cov.eig.to_eigbasis_rows(torch.randn(4, gp.n_cells, dtype=dtype, generator=torch.Generator().manual_seed(0)))
    frac = float((cov.lam > cov.sigma_bar2).double().mean())
    chosen = "square-root" if cov.solve_precond(rows=True) is not cov.p_inv else "P"
    rows = []
    for name, precond in [("P", cov.p_inv),
                          ("square-root", cell_noise.SquareRootPreconditioner(
                              cov.eig, cov.lam, cov.fill_noise, cov.sigma_bar2, rows=True, total=lambda v: v.sum()))]:
        t0 = time.perf_counter()
        res = block_cg(cov.eig_matvec_rows, rhs, precond, tol=tol, max_iters=5000, rows=True)
        rows.append({"n": n, "cells": gp.n_cells, "preconditioner": name, "iterations": int(res.iterations_needed),
                     "seconds": time.perf_counter() - t0, "signal_fraction": frac, "chosen": chosen})
    return rows


def steps(n: int, dtype: torch.dtype, repeats: int, dense_max: int, slow_max: int, seeds: int = 1,
          patterns=("cell-noise", "block-1+cell-noise")) -> list[dict]:
    y, axes = gaps.draw(n, dtype, torch.device("cpu"))
    rows = []
    for name in patterns:
        missing, noise = gaps.pattern(name, n)
        gp = gaps.build(y, axes, missing, noise)
        ref = gaps.dense_lml(gp) if gp.n_observed <= dense_max else None
        variants = [("as chosen", {}), ("P only", {"SQUARE_ROOT": False})]
        if gp.n_observed <= dense.DENSE_MAX_CPU:
            variants = [("as chosen (dense)", {}), ("cg, random probes", {"DENSE_MAX_CPU": 0, "exact_trace_limit": 0})]
            if gp.n_observed <= slow_max:
                variants.append(("cg, unit probes", {"DENSE_MAX_CPU": 0}))
        for label, switches in variants:
            saved = (cell_noise.SQUARE_ROOT, dense.DENSE_MAX_CPU, gp.exact_trace_limit)
            cell_noise.SQUARE_ROOT = switches.get("SQUARE_ROOT", saved[0])
            dense.DENSE_MAX_CPU = switches.get("DENSE_MAX_CPU", saved[1])
            gp.exact_trace_limit = switches.get("exact_trace_limit", saved[2])
            try:
                gp.loss_backward()  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    gp.loss_backward()
                    times.append(time.perf_counter() - t0)
                with torch.no_grad():
                    lml = float(gp.log_marginal_likelihood())  # data units, like gaps.dense_lml
                info = gp.last_solve
                first = None if ref is None else abs(lml - ref) / abs(ref)
                errors = []
                for seed in range(100, 100 + seeds if ref is not None else 100):  # other probes: the spread
                    gp.seed = seed
                    with torch.no_grad():
                        errors.append((float(gp.log_marginal_likelihood()) - ref) / abs(ref))
                gp.seed = 0
            finally:
                cell_noise.SQUARE_ROOT, dense.DENSE_MAX_CPU, gp.exact_trace_limit = saved
            rows.append({"n": n, "pattern": name, "variant": label, "step_s": statistics.median(times),
                         "iterations": info.iterations, "inner_iterations": info.inner_iterations,
                         "probes": info.probes,
                         "lml_rel_err": first,
                         "lml_rel_rms": (sum(e * e for e in errors) / len(errors)) ** 0.5 if errors else None,
                         "seeds": seeds,
                         "lml_rel_std_error": None if info.lml_std_error is None or ref is None
                         else info.lml_std_error / abs(ref)})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10, 16, 24])
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dense-max", type=int, default=4096, help="reference by dense Cholesky up to this many cells")
    ap.add_argument("--slow-max", type=int, default=1000,
                    help="time the unit-probe estimator (one probe per cell) up to this many cells")
    ap.add_argument("--seeds", type=int, default=1, help="probe seeds per step variant (the rms error over them)")
    ap.add_argument("--patterns", nargs="+", default=["cell-noise", "block-1+cell-noise"])
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out = {"date": datetime.date.today().isoformat(), "device": "cpu", "threads": torch.get_num_threads(),
           "dtype": args.dtype, "solves": [], "steps": []}
    print(f"{'n':>4} {'cells':>7} {'precond':>10} {'iters':>6} {'s':>8} {'signal':>7} {'chosen':>10}")
    for n in args.n:
        for r in solves(n, dtype, args.tol):
            out["solves"].append(r)
            print(f"{r['n']:>4} {r['cells']:>7} {r['preconditioner']:>10} {r['iterations']:>6} {r['seconds']:>8.3f} "
                  f"{r['signal_fraction']:>7.2f} {r['chosen']:>10}", flush=True)
    if not args.no_steps:
        print(f"\n{'n':>4} {'pattern':>20} {'variant':>20} {'step s':>8} {'iters':>6} {'inner':>7} {'probes':>6} "
              f"{'lml err':>9} {'rms err':>9} {'std err':>9}")
        fmt = lambda x: "-" if x is None else f"{x:.1e}"  # noqa: E731
        for n in args.n:
            for r in steps(n, dtype, args.repeats, args.dense_max, args.slow_max, args.seeds, args.patterns):
                out["steps"].append(r)
                print(f"{r['n']:>4} {r['pattern']:>20} {r['variant']:>20} {r['step_s']:>8.3f} {r['iterations']!s:>6} "
                      f"{r['inner_iterations']!s:>7} {r['probes']!s:>6} {fmt(r['lml_rel_err']):>9} "
                      f"{fmt(r['lml_rel_rms']):>9} {fmt(r['lml_rel_std_error']):>9}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
