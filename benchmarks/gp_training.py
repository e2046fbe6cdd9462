"""One GP training step (log marginal likelihood forward + backward) on a 3-D grid: GridGP vs GPyTorch.

Regimes (float32 by default, data drawn from a Matérn-5/2 GP on an n×n×n grid):

* ``homoskedastic``: full grid, learned noise. GridGP: exact Kronecker path.
* ``per-cell``: full grid, fixed per-cell noise variances (a factor 10 range). GridGP:
  preconditioned CG with ``P = K + σ̄²I``.
* ``missing20``: 20 % of cells missing at random, learned noise. GridGP: CG on the
  Schur complement of the missing cells.

The GPyTorch anchor is an ``ExactGP`` with ``ScaleKernel(GridKernel(MaternKernel(ν=5/2,
ARD)))`` and with ``GridKernel`` alone (no ScaleKernel: linear_operator then keeps its
Kronecker eigen-solve) on the full grid, each timed with ``use_toeplitz`` on and off (the
fastest of the four counts), with
``GaussianLikelihood`` (homoskedastic), ``FixedNoiseGaussianLikelihood`` (per-cell) and, for
missing cells (``GridKernel`` needs the inputs to be exactly the grid), a full grid whose
missing cells get a fixed noise variance of 1e4 on top of the learned one
(``FixedNoiseGaussianLikelihood(..., learn_additional_noise=True)``); the models are
``gpytorch_models.grid_setting``, shared with ``gaps.py``.

GridGP's step is what ``GridGP.fit`` runs: ``loss_backward``, on CUDA replayed from a CUDA
graph (``gridgp_s``); the same step run eagerly is timed too (``gridgp_eager_s``; only that one
with ``--no-cuda-graph``).

Also reported: CG iterations with and without GridGP's preconditioner, and GridGP's
likelihood against a tightly converged float64 GridGP run (CG tolerance 1e-10, 8× the
probes) — per observed cell and relative.

Usage::

    python benchmarks/gp_training.py --device cuda --out results.json          # 64^3, 128^3
    python benchmarks/gp_training.py --device cuda --scale --out scale.json     # 512^3 … 1024^3 (below)
    python benchmarks/gp_training.py --device cpu --small                       # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings

import torch

import kronegp
from kronegp.models import GridGP
from kronegp.models._kron import KronEigen
import gpytorch_models as gm
from timing import time_call

REGIMES = ("homoskedastic", "per-cell", "missing20")


def make_data(n: int, regime: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A GP draw on an n³ grid (Matérn-5/2, lengthscale n/8 cells), observation noise, mask."""
    import gpytorch

    g = torch.Generator(device=device).manual_seed(seed)
    axis = torch.arange(n, dtype=torch.float64, device=device)
    kern = gpytorch.kernels.MaternKernel(nu=2.5).to(device=device, dtype=torch.float64)
    kern.lengthscale = n / 8
    with torch.no_grad():
        k1 = kern(axis[:, None], axis[:, None]).to_dense()
        eig = KronEigen([k1, k1, k1])
        xi = torch.randn(n**3, 1, generator=g, dtype=torch.float64, device=device)
        f = eig.apply_function(eig.eigvals().sqrt(), xi).reshape(n, n, n)
    noise = None
    if regime == "per-cell":
        noise = 0.01 * torch.exp(torch.rand(n, n, n, generator=g, dtype=torch.float64, device=device) * math.log(10))
        y = f + noise.sqrt() * torch.randn(n, n, n, generator=g, dtype=torch.float64, device=device)
    else:
        y = f + 0.1 * torch.randn(n, n, n, generator=g, dtype=torch.float64, device=device)
    mask = None
    if regime == "missing20":
        mask = torch.rand(n, n, n, generator=g, device=device) >= 0.2
    axes = [axis] * 3
    return y.to(dtype), axes, noise.to(dtype) if noise is not None else None, mask


def gridgp_step(model: GridGP, cuda_graph: bool | None = None):
    """What ``GridGP.fit`` runs per optimiser step: the loss and its gradients
    (``loss_backward``; on CUDA replayed from a CUDA graph unless ``cuda_graph=False``)."""

    def step():
        model.loss_backward(cuda_graph=cuda_graph)

    return step


def build_gridgp(y, axes, noise, mask, dtype, **kw) -> GridGP:
    # exact_trace_limit=0: time the scalable estimator (random probes) even on small grids.
    kw.setdefault("exact_trace_limit", 0)
    return GridGP(y, [a.to(dtype) for a in axes], mask=mask, noise=noise, dtype=dtype, **kw)


def run_case(n: int, regime: str, args, device: torch.device) -> dict:
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    y, axes, noise, mask = make_data(n, regime, dtype, device)
    y_in = y.clone()
    if mask is not None:
        y_in[~mask] = float("nan")
    rec: dict = {"n": n, "cells": n**3, "regime": regime, "dtype": args.dtype, "cg_tol": args.cg_tol, "num_probes": args.probes}

    model = build_gridgp(y_in, axes, noise, mask, dtype, num_probes=args.probes, cg_tol=args.cg_tol)
    times = time_call(gridgp_step(model, None if args.cuda_graph else False), device, args.repeats, args.warmup)
    rec["gridgp_s"] = statistics.median(times)
    rec["cuda_graph"] = graph = model.cuda_graphed  # the timed step replayed a recorded graph
    if graph:  # the same step run eagerly, same process
        rec["gridgp_eager_s"] = statistics.median(time_call(gridgp_step(model, False), device, args.repeats, args.warmup))
    rec["gridgp_path"] = model.path
    rec["cg_iterations"] = model.cg_iterations
    rec["cg_inner_iterations"] = getattr(model, "cg_inner_iterations", None)
    with torch.no_grad():
        lml = float(model.log_marginal_likelihood())
    rec["gridgp_lml"] = lml

    if model.path == "cg":
        plain = build_gridgp(y_in, axes, noise, mask, dtype, num_probes=args.probes, precondition=False, cg_max_iters=args.plain_max_iters)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                plain.log_marginal_likelihood()
        rec["cg_iterations_no_precond"] = plain.cg_iterations
        rec["no_precond_converged"] = not any("relative residual" in str(w.message) for w in caught)
        del plain

    if args.check_lml:
        ref = build_gridgp(y_in.double(), axes, noise.double() if noise is not None else None, mask, torch.float64,
                           num_probes=8 * args.probes, cg_tol=1e-10, seed=1)
        with torch.no_grad():
            # Same hyperparameters: GridGP initialises them from the data, identically.
            ref_lml = float(ref.log_marginal_likelihood())
        rec["reference_lml"] = ref_lml
        rec["lml_error_per_cell"] = abs(lml - ref_lml) / model.n_observed
        rec["lml_rel_error"] = abs(lml - ref_lml) / abs(ref_lml)
        del ref

    if not args.no_gpytorch:
        def anchor(scale, toeplitz):
            return lambda: gm.grid_setting(y, axes, noise=noise, observed=mask, scale=scale, toeplitz=toeplitz,
                                           dtype=dtype, device=device)

        variants = [(f"{'scale' if sc else 'noscale'}_toeplitz_{'on' if tp else 'off'}", anchor(sc, tp))
                    for sc in args.gpytorch_scale for tp in (True, False)]
        timed = gm.fastest_setting(variants, device, args.gpytorch_repeats)
        for name, r in timed["settings"].items():
            rec[f"gpytorch_{name}_s"] = r["step_s"] if "step_s" in r else f"failed: {r.get('failed')}"
        best = timed["best"]
        if best is not None:
            rec["gpytorch_best_s"] = timed["settings"][best]["step_s"]
            if args.gpytorch_accuracy:
                rec["gpytorch_loss_rel_error"] = dict(variants)[best]().loss_error()
            rec["speedup"] = rec["gpytorch_best_s"] / rec["gridgp_s"]
    return rec


def scale_data(n: int, device: torch.device, missing: bool, seed: int = 0, chunk: int = 1 << 26):
    """A float32 GP draw on an n³ grid built in place (one grid vector, plus the mask): Matérn-5/2
    with lengthscale n/8 cells, ``f = Q(√λ ∘ ξ)`` by the chunked Kronecker product, noise sd 0.1,
    20 % of cells missing (NaN) if ``missing``."""
    import gpytorch
    from kronegp.models._kron import kron_apply_into, kron_vector_slab, slabs

    g = torch.Generator(device=device).manual_seed(seed)
    axis = torch.arange(n, dtype=torch.float64, device=device)
    kern = gpytorch.kernels.MaternKernel(nu=2.5).to(device=device, dtype=torch.float64)
    kern.lengthscale = n / 8
    with torch.no_grad():
        lam, q = torch.linalg.eigh(kern(axis[:, None], axis[:, None]).to_dense())
        lam, q = lam.clamp_min(0).float(), q.float()
        y = torch.randn(n**3, generator=g, dtype=torch.float32, device=device)
        rows = y.view(n, -1)
        for a, b in slabs([n] * 3, chunk):
            rows[a:b] *= kron_vector_slab([lam] * 3, a, b).sqrt_().view(b - a, -1)
        kron_apply_into([q] * 3, y, y, chunk)
        for a, b in slabs([n] * 3, chunk):
            rows[a:b] += 0.1 * torch.randn(b - a, n * n, generator=g, dtype=torch.float32, device=device)
            if missing:
                rows[a:b][torch.rand(b - a, n * n, generator=g, device=device) < 0.2] = float("nan")
    return y.view(n, n, n), [axis.float()] * 3


def _gib(x: int | float) -> float:
    return x / 2**30


def _measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``fn`` and the peak allocated memory over its calls (GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = statistics.median(time_call(fn, device, repeats, warmup))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return t, _gib(peak)


def run_scale_exact(n: int, args, device: torch.device) -> dict:
    """The exact path on a full n³ float32 grid: training step, prediction on the grid, one sample;
    time, measured and planned peak memory; likelihood against the same model in float64."""
    y, axes = scale_data(n, device, missing=False)
    model = GridGP(y, axes, dtype=torch.float32)
    del y
    rec: dict = {"n": n, "cells": n**3, "regime": "homoskedastic", "dtype": "float32", "path": model.path}
    plan = model.memory_plan("step")
    rec.update(plan_gib=_gib(plan.peak_bytes), plan_chunk=plan.chunk, plan=plan.describe())
    rec["allocated_before_gib"] = _gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    rec["gridgp_s"], rec["peak_gib"] = _measure(gridgp_step(model, False), device, args.scale_repeats)
    rec["plan_rel_error"] = (rec["plan_gib"] - rec["peak_gib"]) / rec["peak_gib"] if device.type == "cuda" else None
    rec["cg_iterations"] = model.cg_iterations
    with torch.no_grad():
        lml = float(model.log_marginal_likelihood())
    rec["gridgp_lml"] = lml
    pplan = model.memory_plan("predict")
    rec["predict_plan_gib"] = _gib(pplan.peak_bytes)
    rec["predict_s"], rec["predict_peak_gib"] = _measure(lambda: model.predict(), device, 1, 0)
    splan = model.memory_plan("sample", samples=1)
    rec["sample_plan_gib"] = _gib(splan.peak_bytes)
    rec["sample_s"], rec["sample_peak_gib"] = _measure(lambda: model.sample(1), device, 1, 0)
    if args.check_lml:
        # the tighter run: the same data and hyperparameters in float64 (GridGP initialises
        # them from the data identically)
        ref = GridGP((model.y.double() * model.scale + model.shift).view(model.shape), [a.double() for a in axes],
                     dtype=torch.float64)
        with torch.no_grad():
            ref_lml = float(ref.log_marginal_likelihood())
        del ref
        rec["reference_lml"] = ref_lml
        rec["lml_rel_error"] = abs(lml - ref_lml) / abs(ref_lml)
        rec["lml_error_per_cell"] = abs(lml - ref_lml) / model.n_observed
    if args.slice_out and n == max(args.scale_sizes):
        model.fit(iters=args.scale_fit_iters, optimizer="adam", lr=0.1, progress=False, cuda_graph=False)
        rec["fit_steps"] = len(model.history)
        rec["fit_loss"] = model.history[-1] if model.history else None
        mean, var = model.predict()
        k = n // 2
        data = model.y.view(model.shape)[:, :, k] * model.scale + model.shift
        np_out = {
            "observed": data.cpu().numpy(), "mean": mean[:, :, k].cpu().numpy(),
            "sd": var[:, :, k].sqrt().cpu().numpy(), "n": n, "slice_index": k,
            "hyperparameters": json.dumps(model.hyperparameters()),
        }
        import numpy as np

        np.savez_compressed(args.slice_out, **np_out)
        rec["slice_out"] = args.slice_out
        del mean, var
    return rec


def run_scale_missing(n: int, probes: int, args, device: torch.device) -> dict:
    """The cg path on an n³ float32 grid with 20 % of cells missing: training step (time, measured
    and planned peak), CG iterations, likelihood against a run with a 100× tighter CG tolerance
    (same probes)."""
    y, axes = scale_data(n, device, missing=True)
    model = build_gridgp(y, axes, None, None, torch.float32, num_probes=probes)
    del y
    rec: dict = {"n": n, "cells": n**3, "regime": "missing20", "dtype": "float32", "num_probes": probes, "path": model.path}
    plan = model.memory_plan("step")
    # columns per block CG run and runs per step (the plan splits the probes when memory is short)
    rec.update(plan_gib=_gib(plan.peak_bytes), plan=plan.describe(), plan_run_columns=plan.chunk,
               cg_runs=-(-(probes + 1) // plan.chunk))
    rec["allocated_before_gib"] = _gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None
    rec["gridgp_s"], rec["peak_gib"] = _measure(gridgp_step(model, None if args.cuda_graph else False), device,
                                                args.scale_repeats)
    rec["plan_rel_error"] = (rec["plan_gib"] - rec["peak_gib"]) / rec["peak_gib"] if device.type == "cuda" else None
    rec["cuda_graph"] = model.cuda_graphed
    rec["cg_iterations"] = model.cg_iterations
    if args.check_lml:
        with torch.no_grad():
            lml = float(model.log_marginal_likelihood())
            model.cg_tol = model.cg_tol * 1e-2
            ref_lml = float(model.log_marginal_likelihood())
        rec["reference_cg_iterations"] = model.cg_iterations
        rec.update(gridgp_lml=lml, reference_lml=ref_lml, reference="same probes, cg_tol / 100",
                   lml_rel_error=abs(lml - ref_lml) / abs(ref_lml), lml_error_per_cell=abs(lml - ref_lml) / model.n_observed)
    return rec


#: 20 %-missing sizes run whenever their plan fits (besides the largest that fits)
ALWAYS_MISSING_SIZES = (512, 768, 1024)


def _missing_candidates(args, device: torch.device):
    """(n, probes) to run with 20 % missing and ``--scale-probes`` probes: the largest size in
    ``--scale-missing-sizes`` whose plan fits the free memory (the plan splits the probes into
    shorter CG runs where all at once do not fit, :func:`kronegp.models.memory.choose_cg_run`), and
    each of :data:`ALWAYS_MISSING_SIZES` listed there whose plan fits; every listed size that does
    not fit is skipped with the plan's numbers (so is a smaller one that fits but is not run)."""
    from kronegp.models import memory

    free = memory.free_memory(device)
    budget = None if free is None else memory.HEADROOM * free
    chosen, skipped, largest = [], [], None
    for n in sorted(args.scale_missing_sizes, reverse=True):
        plan = memory.choose_cg_run((n, n, n), torch.float32, args.scale_probes, missing=True, per_cell=False,
                                    device_type=device.type, budget=budget)
        fits = budget is None or plan.peak_bytes <= budget
        if fits and (largest is None or n in ALWAYS_MISSING_SIZES):
            largest = n if largest is None else largest
            chosen.append((n, args.scale_probes))
        else:
            why = (f"the plan does not fit {_gib(free):.1f} GiB free (even CG runs of {plan.chunk} columns)"
                   if not fits else f"fits, but smaller than {largest}³ (not in {ALWAYS_MISSING_SIZES})")
            skipped.append({"n": n, "regime": "missing20", "num_probes": args.scale_probes, "plan_gib": _gib(plan.peak_bytes),
                            "plan_run_columns": plan.chunk, "skipped": f"{why}: {plan.describe()}"})
    return chosen, skipped


def run_scale(args, device: torch.device) -> list[dict]:
    """The scale suite: the exact path at ``--scale-sizes``, then 20 % missing at the sizes that fit;
    each case in its own try (an out-of-memory error is recorded, and the next case runs)."""
    out = []
    cases = [("exact", n, None) for n in args.scale_sizes]
    if args.scale_missing_sizes:
        chosen, skipped = _missing_candidates(args, device)
        out.extend(skipped)
        cases += [("missing", n, p) for n, p in chosen]
    for kind, n, p in cases:
        try:
            rec = run_scale_exact(n, args, device) if kind == "exact" else run_scale_missing(n, p, args, device)
        except Exception as err:  # recorded, not fatal: the other sizes still run
            rec = {"n": n, "regime": "homoskedastic" if kind == "exact" else "missing20",
                   "failed": f"{type(err).__name__}: {err}"[:500]}
        out.append(rec)
        print(json.dumps(rec), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def print_scale_table(results: list[dict]) -> None:
    cols = [("n", "n", "{}"), ("regime", "regime", "{}"), ("probes", "num_probes", "{}"), ("step s", "gridgp_s", "{:.3f}"),
            ("peak GiB", "peak_gib", "{:.2f}"), ("plan GiB", "plan_gib", "{:.2f}"), ("plan err", "plan_rel_error", "{:+.1%}"),
            ("CG it", "cg_iterations", "{}"), ("CG runs", "cg_runs", "{}"), ("lml rel err", "lml_rel_error", "{:.1e}"),
            ("predict s", "predict_s", "{:.3f}"), ("pred peak", "predict_peak_gib", "{:.2f}"),
            ("pred plan", "predict_plan_gib", "{:.2f}")]
    print(" | ".join(f"{h:>11}" for h, _, _ in cols))
    for rec in results:
        if "failed" in rec or "skipped" in rec:
            print(f"{rec['n']:>11} | {rec['regime']:>11} | {rec.get('failed') or rec.get('skipped')}")
            continue
        row = []
        for _, key, fmt in cols:
            v = rec.get(key)
            row.append(f"{fmt.format(v) if v is not None and v == v else '-':>11}")
        print(" | ".join(row))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--probes", type=int, default=16, help="GridGP num_probes")
    p.add_argument("--cg-tol", type=float, default=1e-5, help="GridGP cg_tol (its default: 1e-5)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpytorch-repeats", type=int, default=5)
    p.add_argument("--plain-max-iters", type=int, default=3000)
    p.add_argument("--no-gpytorch", action="store_true")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="time GridGP's step eagerly only (default on CUDA: replayed from a CUDA graph, and eagerly too)")
    p.add_argument("--gpytorch-accuracy", action="store_true",
                   help="also report the fastest GPyTorch anchor's loss error at its default CG settings")
    p.add_argument("--gpytorch-scale", default="both", choices=["both", "scale", "noscale"],
                   help="GPyTorch anchors with ScaleKernel(GridKernel), GridKernel alone, or both")
    p.add_argument("--no-check-lml", dest="check_lml", action="store_false")
    p.add_argument("--scale", action="store_true",
                   help="the scale suite: exact float32 at --scale-sizes, 20 %% missing at the largest size that fits")
    p.add_argument("--scale-sizes", type=int, nargs="*", default=[512, 768, 1024], help="exact-path grid sizes n (n³ cells)")
    p.add_argument("--scale-missing-sizes", type=int, nargs="*", default=[1024, 896, 768, 640, 576, 512],
                   help="20 %% missing candidates, largest first; the memory plan picks the largest that fits")
    p.add_argument("--scale-probes", type=int, default=16,
                   help="probes of the 20 %% missing rows (GridGP's default; rounds before issue 25 used 8)")
    p.add_argument("--scale-repeats", type=int, default=3)
    p.add_argument("--scale-fit-iters", type=int, default=10, help="Adam steps before the saved slice")
    p.add_argument("--slice-out", default=None, help="save a slice of the largest exact fit (npz) for plot_scale_slice.py")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.gpytorch_scale = {"both": (True, False), "scale": (True,), "noscale": (False,)}[args.gpytorch_scale]
    device = torch.device(args.device)
    if args.small:
        args.sizes = [12, 16]
        args.repeats, args.warmup, args.gpytorch_repeats = 3, 1, 2
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": kronegp.backend_info(),
    }
    results = []
    if args.scale:
        results = run_scale(args, device)
        header["date"] = __import__("datetime").datetime.now(__import__("datetime").timezone.utc).isoformat(timespec="seconds")
        if args.out:  # written before the table, so a cut-off run keeps its numbers
            with open(args.out, "w") as fh:
                json.dump({"meta": header, "results": results}, fh, indent=1)
        print_scale_table(results)
    else:
        cols = ["n", "regime", "gridgp_s", "gridgp_eager_s", "gpytorch_best_s", "speedup", "cg_iterations", "cg_iterations_no_precond", "lml_error_per_cell", "lml_rel_error", "gpytorch_loss_rel_error"]
        print(" | ".join(f"{c:>16}" for c in cols))
        for n in args.sizes:
            for regime in args.regimes:
                rec = run_case(n, regime, args, device)
                results.append(rec)
                row = []
                for c in cols:
                    v = rec.get(c, "")
                    row.append(f"{v:>16.4g}" if isinstance(v, float) else f"{str(v):>16}")
                print(" | ".join(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": header, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
