"""A float32 model's representation error (:mod:`kronegp.models._representation`) on large grids.

For ``gaps.py``'s cell-noise pattern (per-cell noise 1e-4…1 of the data's variance, the model's
default hyperparameters) on n³: the float32 model's ``log_marginal_likelihood()``, its
``last_solve.representation_error`` and reported errors, against its float64 twin (the same model
with every parameter and buffer widened: ``copy.deepcopy(gp).double()``, cg at ``--twin-tol``, the
same probes' seed) — the difference the estimate predicts, up to both likelihoods' probe and solver
errors. Then the cost: a plain evaluation (``gp._lml()``, what a training step evaluates) against
``log_marginal_likelihood()`` with the estimate, under ``no_grad`` and with a backward, per case.

Usage::

    python benchmarks/representation_error.py --device cuda --n 64 128
    OMP_NUM_THREADS=1 python benchmarks/representation_error.py --device cpu --n 24
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch

from gaps import build, draw, pattern
from timing import time_call


def run(n: int, dev: torch.device, args) -> None:
    y, axes = draw(n, torch.float32, dev)
    missing, noise = pattern(args.pattern, n)
    gp = build(y, axes, missing, noise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            lml = float(gp.log_marginal_likelihood())
    info = gp.last_solve
    said = [str(w.message) for w in caught if "dtype=torch.float64" in str(w.message)]
    twin = copy.deepcopy(gp).double()
    twin.cg_tol = args.twin_tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ref = float(twin.log_marginal_likelihood())
    print(f"{args.pattern} {n}^3 {gp.path}: float32 {lml:.10g}  float64 twin {ref:.10g}  difference {ref - lml:.4g} "
          f"({(ref - lml) / abs(ref):.2g})  estimate {info.representation_error:.4g}  lml_std_error {info.lml_std_error}  "
          f"twin's std error {twin.last_solve.lml_std_error}  lml_error {info.lml_error}  warned {len(said)}", flush=True)
    if said:
        print("  " + said[0], flush=True)

    def plain():
        with torch.no_grad():
            gp._lml()

    def estimated():
        with torch.no_grad():
            gp.log_marginal_likelihood()

    def step():
        gp._loss().backward()

    def estimated_step():
        (-gp.log_marginal_likelihood() / gp.n_observed).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = [statistics.median(time_call(fn, dev, repeats=args.repeats)) for fn in (plain, estimated, step, estimated_step)]
    print(f"  cost: no_grad {t[0] * 1e3:.1f} -> {t[1] * 1e3:.1f} ms ({t[1] / t[0]:.2f}x); with backward "
          f"{t[2] * 1e3:.1f} -> {t[3] * 1e3:.1f} ms ({t[3] / t[2]:.2f}x)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--pattern", default="cell-noise")
    ap.add_argument("--twin-tol", type=float, default=1e-10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    for n in args.n:
        run(n, dev, args)


if __name__ == "__main__":
    main()
