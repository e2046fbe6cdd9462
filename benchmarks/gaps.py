"""GridGP on grids with gaps (issue 22): one row per missing-data pattern, a table and JSON.

Data: a draw from the model itself (Matérn-5/2 per axis, lengthscales 1/6 of each axis, noise
1e-2 of the signal variance) on an n × n × n grid (axis 0 is "time"). Patterns:

* ``scatter-1/10/20/50``: that percentage of cells missing at random;
* ``block-0.1/1/5/10``: one contiguous cube-shaped hole of that percentage of the cells;
* ``clouds-20``: random balls ("clouds") until 20 % of the cells are missing;
* ``holes3-1``: three far-apart cube-shaped holes of that percentage of the cells each;
* ``time-mask-30``: a random 30 % of space missing at every time step (a land mask);
* ``cell-noise``: full grid, per-cell noise variances spread over a 1e4 range;
* ``block-1+cell-noise``: the 1 % hole with that per-cell noise;
* ``scatter-1+cell-noise``: 1 % of cells missing at random, with that per-cell noise.

Per pattern: the path GridGP chose, the training step (``loss_backward``, median), its CG
iterations and probes, the likelihood's relative error against a reference (a dense Cholesky up to
``--dense-max`` observed cells, else the model in float64: on the same exact path, or on the cg
path at ``cg_tol`` 1e-10 with ``--ref-probes`` probes of another seed), with per-cell noise the
standard error the model reports for its estimate (``last_solve.lml_std_error``) and the
reference's own (``(ref err)``: a reference is tight only where it is well under the error),
the time to fit to convergence with L-BFGS (``--fit``), and at the missing cells the held-out
RMSE of the posterior mean against the data and the coverage of its 95 % predictive interval;
``warn``: the RuntimeWarnings of the timed steps / of the prediction (a solve short of its
tolerance: the prediction's texts are in the JSON, ``predict_warning_text``).

GPyTorch in the same run (``--gpytorch``, on by default), at GridGP's hyperparameters on the same
data and device: every applicable setting of ``gpytorch_models.py`` is timed (training step,
median) and the fastest counts: ``GridKernel`` on the full grid with and without ``ScaleKernel``,
``use_toeplitz`` on and off (Kronecker plus a diagonal, CG and stochastic Lanczos quadrature at
GPyTorch's defaults; missing cells get a fixed noise variance of 1e4 × the signal variance,
per-cell noise is ``FixedNoiseGaussianLikelihood``), and an ``ExactGP`` on the observed cells alone
by Cholesky. Reported: the fastest setting, its step, its likelihood error against the same
reference as ours, ``speedup`` = its step / ours; and the fastest setting whose likelihood error
is at most ours (or ``--gpytorch-accuracy-floor``), with ``speedup_equal_accuracy`` (the issue's
target compares at equal or better accuracy; GPyTorch's CG settings estimate the log determinant
with 10 probes and are often 1e-2 off on small grids). A setting whose estimate (one covariance product
timed × the products per step, or n_O³ for Cholesky; memory likewise) exceeds
``--gpytorch-timeout`` seconds for its warm-up and timed steps, or ``--gpytorch-memory-gib``, is
skipped before it runs, and the table says why.

``--holes``: each gap pattern of ``--hole-patterns`` (one hole ``block-…``, several ``holes3-…``,
clouds ``clouds-…``) against the same number of scattered cells on the cg path, with the two-level
preconditioner (:mod:`kronegp.models._two_level`) and without it. Its ``step`` is the steady state
(the model's frozen preconditioner reused, as in a fit), ``rebuilt step`` the step that builds it;
``--hole-fit`` adds a few Adam / L-BFGS fit steps and how many of their evaluations rebuilt it.
Every other step this script times is the median after a warm-up step, the steady state too.

``--air``: the shipped air-temperature grid (240 × 37 × 49) and its 20 × 25 × 49 corner, full
and with one 6 × 8 × 12 hole (``[4:10, 5:13, 10:22]``, m = 576): the exact path's step against the
exact-missing path's, the two alternating (load drift on a shared machine hits both alike), min
and median of ``--repeats`` each, and their ratio (issue 22's target: ≤ 5×). On a CPU also the
process CPU time per step (with one thread the step's own compute time, which other processes on
the machine do not lengthen; with more threads their sum, not a wall time).

``--cell-noise-missing``: per-cell noise with a few missing cells (``--cnm-patterns``) on grids of
``--cnm-sides``: the cg path's step with ``G = [C⁻¹]_MM`` factored from the ``C`` run's columns (where the
missing cells take unit probes) against the nested route (CG on ``G``, a CG solve with ``C`` in each
product; ``--no-cnm-nested`` skips it), in the same run: step (median), the ``C`` run's iterations, the
inner ones, which route ran, the observed residual, the likelihood of both (their relative difference)
and, up to ``--dense-max`` observed cells, each one's relative error against a dense Cholesky.

``--limit``: the exact-missing path's step against the cg path's (random probes, and exact traces)
for growing m (one contiguous hole, and m scattered cells) on the same grid (``--grid air``: the
shipped 435k-cell air grid), each predicted by the cost rule of :mod:`kronegp.models.costs` and
measured, with N, Σn_k, the box and what ``path="auto"`` chose: the data to fit ``costs.RATES``
(and to check ``kronegp.models._few_missing.MAX_MISSING_CPU`` / ``MAX_MISSING_CUDA``).

Usage::

    python benchmarks/gaps.py --small                               # a quick CPU run
    python benchmarks/gaps.py --device cpu --n 24 --out gaps_cpu.json
    python benchmarks/gaps.py --device cuda --n 128 --dtype float32 --out gaps_128.json
    python benchmarks/gaps.py --limit --device cuda --n 64          # calibrate costs.RATES on CUDA
    python benchmarks/gaps.py --limit --grid air --limit-m 8 27 64 216 576   # the large CPU grid
    python benchmarks/gaps.py --no-gpytorch --n 64                  # GridGP alone
    python benchmarks/gaps.py --device cuda --n 128 --dtype float32 --gpytorch-timeout 120
    python benchmarks/gaps.py --holes --device cpu --n 64 --repeats 1  # hole vs scatter, two-level on/off
    OMP_NUM_THREADS=1 python benchmarks/gaps.py --air --repeats 9 --out air_hole.json  # hole vs full, air grid
    python benchmarks/gaps.py --holes --hole-patterns clouds-20 holes3-1 --n 48 --repeats 1
    OMP_NUM_THREADS=1 python benchmarks/gaps.py --holes --hole-fit --n 48 --repeats 2 --no-jacobi
    OMP_NUM_THREADS=1 python benchmarks/gaps.py --cell-noise-missing --cnm-sides 12 16 20 24 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
import warnings

import torch

import gpytorch_models as gm
from kronegp import GridGP, kron_matmul
from timing import time_call


def draw(n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A draw of f + noise on an n³ grid from the model, with its axes."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(0, 1, n, dtype=torch.float64) for _ in range(3)]
    chols = []
    for ax in axes:
        d = (ax[:, None] - ax[None, :]).abs() / (1 / 6)
        k = (1 + math.sqrt(5) * d + 5 / 3 * d * d) * torch.exp(-math.sqrt(5) * d)
        chols.append(torch.linalg.cholesky(k + 1e-8 * torch.eye(n, dtype=torch.float64)))
    f = kron_matmul(chols, torch.randn(n**3, 1, generator=g, dtype=torch.float64)).reshape(n, n, n)
    y = f + 0.1 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return y.to(device, dtype), [a.to(device, dtype) for a in axes]


def pattern(name: str, n: int, seed: int = 1):
    """``(missing cells (bool grid) or None, per-cell noise variances or None)``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, n, n)
    missing, noise = None, None
    kind, _, frac = name.partition("-")
    if kind == "scatter":
        missing = torch.rand(shape, generator=g) < float(frac.split("+")[0]) / 100
    elif kind == "block":
        pct = float(frac.split("+")[0])
        side = max(1, round(n * (pct / 100) ** (1 / 3)))
        lo = (n - side) // 2
        missing = torch.zeros(shape, dtype=torch.bool)
        missing[lo : lo + side, lo : lo + side, lo : lo + side] = True
    elif kind == "holes3":  # three cubes of frac % each, at 1/5, 1/2 and 4/5 of each axis (a diagonal)
        side = max(1, round(n * (float(frac) / 100) ** (1 / 3)))
        missing = torch.zeros(shape, dtype=torch.bool)
        for at in (0.2, 0.5, 0.8):
            lo = min(max(0, round(at * n - side / 2)), n - side)
            missing[lo : lo + side, lo : lo + side, lo : lo + side] = True
    elif kind == "clouds":
        idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), -1)
        missing = torch.zeros(shape, dtype=torch.bool)
        while float(missing.double().mean()) < float(frac) / 100:
            centre = torch.rand(3, generator=g, dtype=torch.float64) * n
            radius = (0.05 + 0.1 * float(torch.rand(1, generator=g))) * n
            missing |= ((idx - centre) ** 2).sum(-1) < radius**2
    elif kind == "time":
        missing = (torch.rand(shape[1:], generator=g) < 0.3).expand(shape).clone()
    if "cell-noise" in name:
        noise = 0.01 * 10 ** (4 * torch.rand(shape, generator=g, dtype=torch.float64) - 2)
    return missing, noise


def dense_lml(gp: GridGP) -> float:
    """``log p(y_O)`` (data units) by a dense Cholesky in float64."""
    with torch.no_grad():
        from functools import reduce

        fs = [k(a.unsqueeze(-1), a.unsqueeze(-1)).to_dense().double() for k, a in zip(gp.kernels, gp.axes)]
        K = float(gp.outputscale) * reduce(torch.kron, fs)
        obs = gp.observed if gp.observed is not None else torch.ones(gp.n_cells, dtype=torch.bool, device=K.device)
        d = (gp.noise.expand(gp.n_cells) if gp.learn_noise else gp.cell_noise).double()
        L = torch.linalg.cholesky(K[obs][:, obs] + torch.diag(d[obs]))
        if gp.user_mean:
            raise ValueError("dense_lml: the reference takes the model's learned constant mean, not a user mean")
        r = (gp.y - gp.mean_module.constant).double()[obs]  # model units (the constant is in them)
        a = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
        n = int(obs.sum())
        return float(-0.5 * (r * a).sum() - torch.log(L.diagonal()).sum() - 0.5 * n * math.log(2 * math.pi)
                     - n * math.log(gp.scale))


def build(y, axes, missing, noise, **kw) -> GridGP:
    v = y.clone()
    if missing is not None:
        v[missing.to(v.device)] = float("nan")
    return GridGP(v, axes, noise=None if noise is None else noise.to(y.device, y.dtype), **kw)


def run_pattern(name: str, y, axes, args) -> dict:
    dev = y.device
    missing, noise = pattern(name, args.n)
    gp = build(y, axes, missing, noise)
    row = {"pattern": name, "path": gp.path, "cells": gp.n_cells, "missing": gp.n_cells - gp.n_observed}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        times = time_call(gp.loss_backward, dev, repeats=args.repeats)
        lml = float(gp.log_marginal_likelihood())
    row["step_s"] = statistics.median(times)
    info = gp.last_solve
    row.update(iterations=info.iterations, probes=info.probes, observed_residual=info.observed_residual,
               warnings=len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
    if gp.n_observed <= args.dense_max:
        ref, how = dense_lml(gp), "dense"
    else:  # the same exact path in float64, or the cg path at cg_tol 1e-10 (its SLQ estimate)
        path = "cg" if gp.path == "cg" else gp.path
        tight = build(y.double(), [a.double() for a in axes], missing, noise, path=path, cg_tol=1e-10,
                      num_probes=args.ref_probes, seed=1000)  # other probes than the model's
        tight.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in gp.state_dict().items()})
        ref = float(tight.log_marginal_likelihood())
        how = f"{path} float64" + (f" cg_tol 1e-10, {args.ref_probes} probes" if path == "cg" else "")
        ref_se = tight.last_solve.lml_std_error  # the reference's own probe error (per-cell noise)
        if ref_se is not None:
            row["lml_ref_rel_std_error"] = ref_se / abs(ref)  # nats: the units' shift is a constant
    row.update(lml=lml, lml_ref=ref, lml_ref_by=how, lml_rel_err=abs(lml - ref) / abs(ref))
    if info.lml_std_error is not None:  # the standard error the model reports for its own estimate
        row["lml_rel_std_error"] = info.lml_std_error / abs(ref)
    if args.gpytorch:
        row.update(run_gpytorch(gp, y, missing, noise, axes, row, args))
    if args.fit:
        t0 = time.perf_counter()
        gp.fit(iters=args.fit_iters, optimizer="lbfgs", progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        row["fit_s"] = time.perf_counter() - t0
        row["fit_evaluations"] = len(gp.history)
    if missing is not None:
        variance = "exact" if gp.path != "cg" or gp.n_cells <= gp.exact_variance_limit else "mc"
        with warnings.catch_warnings(record=True) as caught:  # counted, as the step's are: a solve
            warnings.simplefilter("always")                   # short of tol shows in the row
            mean, var = gp.predict(include_noise=gp.learn_noise, variance=variance)
        said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        row.update(predict_warnings=len(said), predict_warning_text=sorted(set(said)))
        held = missing.to(dev)
        err = (mean - y)[held]
        row["heldout_rmse"] = float(err.pow(2).mean().sqrt())
        if gp.learn_noise:
            row["heldout_coverage95"] = float((err.abs() <= 1.96 * var[held].sqrt()).double().mean())
    return row


def warned(row: dict) -> str:
    """The table's ``warn`` cell: RuntimeWarnings of the timed steps / of the prediction (``-`` where
    none was made)."""
    return f"{row['warnings']}/{row['predict_warnings'] if 'predict_warnings' in row else '-'}"


def run_gpytorch(gp: GridGP, y, missing, noise, axes, row: dict, args) -> dict:
    """GPyTorch's fastest applicable setting on this pattern, at ``gp``'s hyperparameters: the
    ``gpytorch_*`` keys of the row (``gpytorch_skipped`` with the reasons where none ran)."""
    dev, dtype = y.device, y.dtype
    hyper = gp.hyperparameters()
    if any(not isinstance(ls, float) for ls in hyper["lengthscales"]) or hyper["mean"] == "user":
        return {"gpytorch_skipped": "GridGP's kernels or mean have no GPyTorch counterpart here"}
    observed = None if missing is None else ~missing
    noise = None if noise is None else noise.to(dev, dtype)
    settings = [(f"{'scale' if sc else 'noscale'}_toeplitz_{'on' if tp else 'off'}",
                 lambda sc=sc, tp=tp: gm.grid_setting(y, axes, noise=noise, observed=observed, hyper=hyper, scale=sc,
                                                      toeplitz=tp, dtype=dtype, device=dev))
                for sc in (True, False) for tp in (True, False)]
    settings.append(("dense_cholesky", lambda: gm.dense_setting(y, axes, noise=noise, observed=observed, hyper=hyper,
                                                                 dtype=dtype, device=dev)))
    if args.gpytorch_memory_gib is not None:
        memory = args.gpytorch_memory_gib * 2**30
    elif dev.type == "cuda":
        memory = 0.8 * torch.cuda.mem_get_info(dev)[0]
    else:
        memory = 4 * 2**30
    timed = gm.fastest_setting(settings, dev, args.repeats, budget_s=args.gpytorch_timeout, memory_bytes=memory,
                               lml_ref=row["lml_ref"])
    out = {"gpytorch_settings": timed["settings"]}
    best = timed["best"]
    if best is None:
        out["gpytorch_skipped"] = "; ".join(f"{k}: {v.get('skipped') or v.get('failed')}"
                                            for k, v in timed["settings"].items())
        return out
    rec = timed["settings"][best]
    out.update(gpytorch_setting=best, gpytorch_step_s=rec["step_s"], gpytorch_lml_rel_err=rec["lml_rel_err"],
               speedup=rec["step_s"] / row["step_s"])
    # the issue's comparison: GPyTorch's fastest setting at equal or better likelihood accuracy
    tol = max(row["lml_rel_err"], args.gpytorch_accuracy_floor)
    accurate = [(r["step_s"], k) for k, r in timed["settings"].items() if "step_s" in r and r["lml_rel_err"] <= tol]
    out["gpytorch_accuracy_tol"] = tol
    if accurate:
        t, name = min(accurate)
        out.update(gpytorch_accurate_setting=name, gpytorch_accurate_step_s=t, speedup_equal_accuracy=t / row["step_s"])
    return out


GPYTORCH_HEAD = (f" {'GPyTorch fastest':20s} {'gpyt s':>8s} {'gpyt err':>9s} {'speedup':>7s}"
                 f" {'GPyTorch as accurate':20s} {'speedup':>7s}")


def gpytorch_cells(row: dict) -> str:
    """The GPyTorch columns of a pattern's line, then a line per setting not run and why."""
    if "gpytorch_step_s" in row:
        cells = (f" {row['gpytorch_setting']:20s} {row['gpytorch_step_s']:8.4f} {row['gpytorch_lml_rel_err']:9.2e}"
                 f" {row['speedup']:6.3g}x")
        if "speedup_equal_accuracy" in row:
            cells += f" {row['gpytorch_accurate_setting']:20s} {row['speedup_equal_accuracy']:6.3g}x"
        else:
            cells += f" {'none':20s} {'-':>7s}"
    else:
        cells = f" {'skipped':20s} {'-':>8s} {'-':>9s} {'-':>7s} {'-':20s} {'-':>7s}"
    for name, rec in row.get("gpytorch_settings", {}).items():
        if "step_s" not in rec:
            cells += f"\n#   GPyTorch {name}: {'skipped, ' + rec['skipped'] if 'skipped' in rec else 'failed, ' + rec['failed']}"
    if "gpytorch_settings" not in row and "gpytorch_skipped" in row:
        cells += f"\n#   GPyTorch skipped: {row['gpytorch_skipped']}"
    return cells


def air_grid(dtype: torch.dtype, device: torch.device):
    """The shipped air-temperature grid (240 × 37 × 49) and its axes."""
    from kronegp.datasets import load_air_temperature

    ds = load_air_temperature()
    y = torch.tensor(ds.values, dtype=dtype, device=device)
    return y, [torch.tensor(ds.coords[d], dtype=dtype, device=device) for d in ds.dims]


def limit_masks(shape, m: int):
    """``(kind, missing)`` for ``m`` missing cells: scattered at random, and one centred hole (a cube
    of side ``∛m`` clipped to the grid) when ``m`` is a cube."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(m)
    scatter = torch.zeros(n, dtype=torch.bool)
    scatter[torch.randperm(n, generator=g)[:m]] = True
    out = [("scatter", scatter.reshape(shape))]
    side = round(m ** (1 / 3))
    if side**3 == m and all(side <= s for s in shape):
        hole = torch.zeros(shape, dtype=torch.bool)
        lo = [(s - side) // 2 for s in shape]
        hole[tuple(slice(a, a + side) for a in lo)] = True
        out.insert(0, ("hole", hole))
    return out


def run_limit(y, axes, args) -> list[dict]:
    """The cost rule of :mod:`kronegp.models.costs` against measurement, for growing m (a hole and
    scattered cells): per row the grid's N and Σn_k, the box, what ``path="auto"`` chose (path and
    whether the cg path's traces are exact), and per way (exact-missing, cg with random probes, cg
    with exact traces when ``--limit-unit``) the predicted and the measured step. A way predicted
    above ``--limit-max-s`` is not run. The coefficients in ``costs.RATES`` are fitted to these rows."""
    from kronegp.models import costs
    from kronegp.models._few_missing import MissingBox, box_pays

    rows = []
    shape = tuple(y.shape)
    n = math.prod(shape)
    rates = costs.rates_for(y.device, y.dtype)
    ms = args.limit_m or [side**3 for side in args.limit_sides]
    for m in ms:
        if m >= n // 2:
            break
        for kind, missing in limit_masks(shape, m):
            hole = MissingBox(missing.reshape(-1), shape)
            boxed = box_pays(hole.box, m, n)
            predicted = {"exact-missing": costs.exact_missing_seconds(m, shape, hole.box_sizes if boxed else None, rates),
                         "cg": costs.cg_seconds(args.num_probes + 1, shape, rates),
                         "cg-exact-traces": costs.cg_seconds(m + 1, shape, rates)}
            auto = build(y, axes, missing, None, num_probes=args.num_probes)
            traces = "exact" if auto.path == "cg" and auto.inference.exact_trace(auto, ~auto.observed) else "random"
            row = {"kind": kind, "m": m, "N": n, "sizes": list(shape), "sum_n": sum(shape), "box": hole.box_sizes,
                   "boxed": boxed, "auto": auto.path, "auto_cg_traces": traces if auto.path == "cg" else None,
                   "predicted": predicted, "measured": {}, "iterations": {}}
            ways = [("exact-missing", dict(path="exact-missing")), ("cg", dict(path="cg", exact_trace_limit=0))]
            if args.limit_unit:
                ways.append(("cg-exact-traces", dict(path="cg", exact_trace_limit=m)))
            for way, kw in ways:
                if predicted[way] > args.limit_max_s:
                    continue
                budget = dict(costs.EXACT_BUDGET_S)
                if way == "cg-exact-traces":  # timed even where the rule would take random probes
                    costs.EXACT_BUDGET_S[y.device.type] = math.inf
                try:
                    gp = build(y, axes, missing, None, num_probes=args.num_probes, **kw)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        row["measured"][way] = statistics.median(time_call(gp.loss_backward, y.device,
                                                                           repeats=args.repeats))
                except (ValueError, torch.OutOfMemoryError) as err:  # a way that cannot run here: recorded
                    row.setdefault("failed", {})[way] = f"{type(err).__name__}: {err}"[:300]
                    gp = None
                    if y.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                finally:
                    costs.EXACT_BUDGET_S.clear()
                    costs.EXACT_BUDGET_S.update(budget)
                row["iterations"][way] = gp.last_solve.iterations
                assert gp.last_solve.estimate == (way == "cg"), (way, gp.last_solve)
            rows.append(row)
            cells = "  ".join(f"{w} {row['predicted'][w]:8.3f} / "
                              + (f"{row['measured'][w]:8.3f}" if w in row["measured"] else f"{'-':>8s}")
                              for w in ("exact-missing", "cg", "cg-exact-traces"))
            print(f"{kind:8s} {m:6d} {n:8d} {sum(shape):5d} {'x'.join(map(str, hole.box_sizes)):>12s} {str(boxed):5s} "
                  f"{auto.path:13s} {row['auto_cg_traces'] or '-':7s} {cells}", flush=True)
    return rows


LIMIT_HEAD = (f"{'kind':8s} {'m':>6s} {'N':>8s} {'sum_n':>5s} {'box':>12s} {'boxed':5s} {'auto':13s} {'traces':7s} "
              "exact-missing pred / meas s  cg (random probes) pred / meas s  cg-exact-traces pred / meas s")


def _fit_refreshes(gp: GridGP, optimizer: str, iters: int) -> dict:
    """A few steps of ``gp.fit`` with ``optimizer``, each evaluation's time, CG iterations and whether it
    reused the frozen two-level preconditioner (``last_solve.preconditioner_reused``): how often a fit
    rebuilds it, and the evaluations' medians either way."""
    evals: list[tuple[float, bool, int, bool]] = []
    step = gp.loss_backward

    def recordings() -> int:
        graphed = getattr(gp, "_graphed", None)
        return 0 if graphed is None else graphed.recordings

    def counted(*a, **k):
        before = recordings()
        t0 = time.perf_counter()
        out = step(*a, **k)
        if gp.y.device.type == "cuda":
            torch.cuda.synchronize(gp.y.device)
        evals.append((time.perf_counter() - t0, bool(gp.last_solve.preconditioner_reused), int(gp.last_solve.iterations),
                      recordings() > before))
        return out

    gp.loss_backward = counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.fit(iters=iters, optimizer=optimizer, progress=False)
    finally:
        del gp.loss_backward
    reused = [e for e in evals if e[1]]
    built = [e for e in evals if not e[1]]
    med = lambda xs, i: statistics.median(x[i] for x in xs) if xs else None  # noqa: E731
    return {"optimizer": optimizer, "evaluations": len(evals), "rebuilds": len(built),
            "reused_step_s": med(reused, 0), "rebuilt_step_s": med(built, 0),
            "reused_iterations": med(reused, 2), "rebuilt_iterations": med(built, 2),
            # a CUDA-graph step recorded (again) at an evaluation: "R" (an eager step and a recording), else "."
            "recordings": sum(e[3] for e in evals), "fit_s": sum(e[0] for e in evals),
            "sequence": "".join("r" if e[1] else "B" for e in evals),
            "recorded": "".join("R" if e[3] else "." for e in evals)}


def _step_times(gp: GridGP, device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    """``repeats`` training steps, each timed: wall seconds (``time_call``) and process CPU seconds (on a
    CPU with one thread the step's own compute, which other processes on a loaded machine do not lengthen)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start = time.process_time()
        wall += time_call(gp.loss_backward, device, repeats=1, warmup=0)
        cpu.append(time.process_time() - start)
    return wall, cpu


def run_holes(y, axes, args) -> list[dict]:
    """Each gap pattern of ``args.hole_patterns`` against the same number of scattered cells, on the
    cg path, with the two-level preconditioner of :mod:`kronegp.models._two_level` and without it (Jacobi).

    ``step_s`` is the **steady-state** step: the warm-up step builds the model's frozen two-level
    preconditioner (:class:`kronegp.models._two_level.FrozenTwoLevel`), the timed steps, at the same
    hyperparameters, reuse it, as a fit's steps do until its hyperparameters drift. ``rebuilt_step_s``
    (two-level rows): the step that builds it (``FREEZE`` off), what every step cost before it was kept.
    With ``--hole-fit`` also a few Adam and L-BFGS steps of a fit from the model's initial
    hyperparameters: evaluations, how many rebuilt the preconditioner, and their median steps. On a CPU
    each step's process CPU time too (``*_cpu_s``: with one thread, what load from other processes
    leaves out of the wall time)."""
    import kronegp.models._two_level as two_level

    rows = []
    n = args.n
    for pat in args.hole_patterns:
        hole, _ = pattern(pat, n)
        m = int(hole.sum())
        g = torch.Generator().manual_seed(m)
        scatter = torch.zeros(n**3, dtype=torch.bool)
        scatter[torch.randperm(n**3, generator=g)[:m]] = True
        for kind, missing in (("hole", hole), ("scatter", scatter.reshape(n, n, n))):
            for on in (True, False) if args.jacobi and kind == "hole" else (True,):  # scatter keeps Jacobi
                two_level.ENABLED = on
                gp = build(y, axes, missing, None, path="cg")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gp.loss_backward()  # warm-up: builds the preconditioner
                    times, cpu = _step_times(gp, y.device, args.repeats)
                    reused = gp.last_solve.preconditioner_reused
                    rebuilt = rebuilt_cpu = None
                    if reused is not None:  # a two-level preconditioner applies: its setup's step
                        two_level.FREEZE = False
                        try:
                            rebuilt, rebuilt_cpu = map(statistics.median, _step_times(gp, y.device, args.repeats))
                        finally:
                            two_level.FREEZE = True
                row = {"pattern": pat, "kind": kind, "m": m, "two_level": on, "step_s": statistics.median(times),
                       "step": "steady state (preconditioner reused)" if reused else "every step alike",
                       "rebuilt_step_s": rebuilt,
                       "iterations": int(gp.last_solve.iterations), "coarse_modes": gp.last_solve.coarse_modes}
                if y.device.type == "cpu":
                    row.update(step_cpu_s=statistics.median(cpu), rebuilt_step_cpu_s=rebuilt_cpu)
                extra = f"  rebuilt step {rebuilt:8.3f} s" if rebuilt is not None else ""
                if y.device.type == "cpu":
                    extra = f"  (CPU time {row['step_cpu_s']:.3f} s)" + extra
                    extra += f" (CPU time {rebuilt_cpu:.3f} s)" if rebuilt_cpu is not None else ""
                if args.hole_fit and reused is not None:
                    row["fits"] = []
                    for opt, iters in (("adam", args.hole_fit_adam), ("lbfgs", args.hole_fit_lbfgs)):
                        fresh = build(y, axes, missing, None, path="cg")
                        row["fits"].append(_fit_refreshes(fresh, opt, iters))
                        f = row["fits"][-1]
                        extra += (f"  {opt}: {f['rebuilds']}/{f['evaluations']} rebuilt ({f['sequence']}), "
                                  f"{f['recordings']} recorded ({f['recorded']}), {f['fit_s']:.2f} s")
                rows.append(row)
                print(f"{pat:10s} {kind:8s} m={m:6d} two-level={str(on):5s} step {row['step_s']:8.3f} s  "
                      f"iters {row['iterations']:4d}  modes {row['coarse_modes']}{extra}", flush=True)
        two_level.ENABLED = True
    return rows


#: ``--air``'s grids: (name, slice of the 240 × 37 × 49 grid)
AIR_GRIDS = {"full": (slice(None), slice(None), slice(None)), "corner": (slice(0, 20), slice(0, 25), slice(None))}


def run_cell_noise_missing(args, dtype: torch.dtype, dev: torch.device) -> list[dict]:
    """``--cell-noise-missing``: the factored-G route against the nested one (module docstring)."""
    import kronegp.models._masked as masked

    rows = []
    for n in args.cnm_sides:
        y, axes = draw(n, dtype, dev)
        for pat in args.cnm_patterns:
            missing, noise = pattern(pat, n)
            row = {"pattern": pat, "n": n, "cells": n**3, "missing": int(missing.sum())}
            ref = None
            for route, flag in (("factored", True), ("nested", False)):
                if route == "nested" and not args.cnm_nested:
                    continue
                masked.DENSE_MISSING = flag
                try:
                    gp = build(y, axes, missing, noise, num_probes=args.num_probes)
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        times = time_call(gp.loss_backward, dev, repeats=args.repeats)
                        lml = float(gp.log_marginal_likelihood())
                finally:
                    masked.DENSE_MISSING = True
                info = gp.last_solve
                if ref is None and gp.n_observed <= args.dense_max:
                    ref = dense_lml(gp)
                row[route] = {"step_s": statistics.median(times), "iterations": info.iterations,
                              "inner_iterations": info.inner_iterations, "missing_solve": info.missing_solve,
                              "observed_residual": info.observed_residual, "lml": lml, "estimate": info.estimate,
                              "lml_std_error": info.lml_std_error, "lml_rel_err": None if ref is None else abs(lml - ref) / abs(ref),
                              "warnings": len([w for w in caught if issubclass(w.category, RuntimeWarning)])}
            f, nst = row["factored"], row.get("nested")
            if nst is not None:
                row["speedup"] = nst["step_s"] / f["step_s"]
                row["lml_rel_diff"] = abs(f["lml"] - nst["lml"]) / abs(nst["lml"])
            rows.append(row)
            fmt = lambda d, k, spec: "-" if d is None or d.get(k) is None else format(d[k], spec)  # noqa: E731
            print(f"{pat:22s} {n:3d} {row['missing']:5d} {f['missing_solve'] or '-':>6s} {f['step_s']:8.3f} {f['iterations']:5d} "
                  f"{f['inner_iterations']:6d} {fmt(f, 'observed_residual', '9.1e')} {fmt(f, 'lml_rel_err', '9.1e')} | "
                  f"{fmt(nst, 'missing_solve', '>6s')} {fmt(nst, 'step_s', '8.3f')} {fmt(nst, 'iterations', '5d')} "
                  f"{fmt(nst, 'inner_iterations', '6d')} {fmt(nst, 'lml_rel_err', '9.1e')} | {fmt(row, 'speedup', '7.1f')} "
                  f"{fmt(row, 'lml_rel_diff', '9.1e')} {f['warnings']}/{fmt(nst, 'warnings', 'd')}", flush=True)
    return rows


CNM_HEAD = (f"{'pattern':22s} {'n':>3s} {'m':>5s} {'G':>6s} {'step s':>8s} {'iters':>5s} {'inner':>6s} {'obs res':>9s} "
            f"{'lml err':>9s} | {'G':>6s} {'step s':>8s} {'iters':>5s} {'inner':>6s} {'lml err':>9s} | {'speedup':>7s} "
            f"{'lml diff':>9s} warn\n# (factored | nested; lml err against a dense Cholesky, lml diff between the routes)")


def run_air(args) -> list[dict]:
    """The air grid's exact step against the exact-missing step with one 6 × 8 × 12 hole, alternating."""
    from kronegp.datasets import load_air_temperature

    data = load_air_temperature()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    values = torch.as_tensor(data.values, dtype=dtype)
    axes = [torch.as_tensor(a, dtype=dtype) for a in data.axes()]
    rows = []
    print(f"{'grid':12s} {'full (exact) min/med s':>24s} {'hole (exact-missing) min/med s':>32s} {'ratio min/med':>14s}"
          f" {'CPU-time ratio min/med':>23s}")
    for name in args.air_grids:
        cut = AIR_GRIDS[name]
        y = values[cut].contiguous().to(dev)
        ax = [a[c].to(dev) for a, c in zip(axes, cut)]
        holed = y.clone()
        holed[4:10, 5:13, 10:22] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full, hole = GridGP(y, ax), GridGP(holed, ax)
            full.loss_backward(), hole.loss_backward()
            t_full, t_hole, c_full, c_hole = [], [], [], []
            for _ in range(args.repeats):
                for model, wall, cpu in ((full, t_full, c_full), (hole, t_hole, c_hole)):
                    start = time.process_time()
                    wall += time_call(model.loss_backward, dev, repeats=1, warmup=0)
                    cpu.append(time.process_time() - start)
        row = {"grid": "x".join(map(str, y.shape)), "missing": int(torch.isnan(holed).sum()),
               "full_path": full.path, "hole_path": hole.path,
               "full_min_s": min(t_full), "full_median_s": statistics.median(t_full),
               "hole_min_s": min(t_hole), "hole_median_s": statistics.median(t_hole)}
        row["ratio_min"] = row["hole_min_s"] / row["full_min_s"]
        row["ratio_median"] = row["hole_median_s"] / row["full_median_s"]
        if dev.type == "cpu":
            row.update(full_cpu_min_s=min(c_full), full_cpu_median_s=statistics.median(c_full),
                       hole_cpu_min_s=min(c_hole), hole_cpu_median_s=statistics.median(c_hole))
            row["cpu_ratio_min"] = row["hole_cpu_min_s"] / row["full_cpu_min_s"]
            row["cpu_ratio_median"] = row["hole_cpu_median_s"] / row["full_cpu_median_s"]
        rows.append(row)
        print(f"{row['grid']:12s} {row['full_min_s']:11.4f} /{row['full_median_s']:8.4f}   "
              f"{row['hole_min_s']:19.4f} /{row['hole_median_s']:8.4f}   {row['ratio_min']:6.2f} /{row['ratio_median']:5.2f}"
              + (f"   {row['cpu_ratio_min']:15.2f} /{row['cpu_ratio_median']:5.2f}" if "cpu_ratio_min" in row else ""),
              flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--n", type=int, default=20, help="grid side (n³ cells)")
    ap.add_argument("--small", action="store_true", help="n = 10, no fit, 2 repeats")
    ap.add_argument("--ref-probes", type=int, default=64,
                    help="probes of the cg reference above --dense-max (per-cell noise: its error ~ 1/√probes, "
                         "reported as '(ref err)')")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--fit-iters", type=int, default=10)
    ap.add_argument("--dense-max", type=int, default=4000)
    ap.add_argument("--patterns", nargs="*", default=["scatter-1", "scatter-10", "scatter-20", "scatter-50",
                                                      "block-0.1", "block-1", "block-5", "block-10", "clouds-20",
                                                      "time-mask-30", "cell-noise", "block-1+cell-noise"])
    ap.add_argument("--gpytorch", action=argparse.BooleanOptionalAction, default=True,
                    help="time GPyTorch's fastest applicable setting per pattern in the same run")
    ap.add_argument("--gpytorch-timeout", type=float, default=120.0,
                    help="seconds one GPyTorch setting may take per pattern (warm-up + timed steps, by estimate)")
    ap.add_argument("--gpytorch-memory-gib", type=float, default=None,
                    help="memory one GPyTorch setting may take (default: 80%% of free GPU memory, 4 GiB on a CPU)")
    ap.add_argument("--gpytorch-accuracy-floor", type=float, default=1e-6,
                    help="a GPyTorch setting counts as accurate as ours within max(our lml rel err, this)")
    ap.add_argument("--limit", action="store_true", help="calibrate the exact-missing path's limit on m")
    ap.add_argument("--limit-sides", type=int, nargs="*", default=[2, 4, 6, 8, 10, 12, 14, 16, 20, 24],
                    help="--limit: m = side³ (a cube-shaped hole and m scattered cells)")
    ap.add_argument("--limit-m", type=int, nargs="*", default=None, help="--limit: these m instead of the sides'")
    ap.add_argument("--limit-unit", action=argparse.BooleanOptionalAction, default=True,
                    help="--limit: also time the cg path with exact traces (one unit probe per missing cell)")
    ap.add_argument("--limit-max-s", type=float, default=30.0, help="--limit: skip a way predicted above this")
    ap.add_argument("--num-probes", type=int, default=16, help="GridGP's num_probes (cg path)")
    ap.add_argument("--grid", default="cube", choices=["cube", "air"],
                    help="cube: a draw on n³ (--n); air: the shipped 240 × 37 × 49 air-temperature grid")
    ap.add_argument("--holes", action="store_true", help="a hole against as many scattered cells (cg path)")
    ap.add_argument("--hole-patterns", nargs="*", default=["block-1", "block-5", "block-10"],
                    help="--holes: the gap patterns (block-P, holes3-P, clouds-P) against as many scattered cells")
    ap.add_argument("--jacobi", action=argparse.BooleanOptionalAction, default=True,
                    help="--holes: also time the cg path without the two-level preconditioner")
    ap.add_argument("--hole-fit", action=argparse.BooleanOptionalAction, default=False,
                    help="--holes: also a few fit steps per two-level row (how often it rebuilds the preconditioner)")
    ap.add_argument("--hole-fit-adam", type=int, default=8, help="--hole-fit: Adam steps")
    ap.add_argument("--hole-fit-lbfgs", type=int, default=1, help="--hole-fit: L-BFGS steps (up to 10 updates each)")
    ap.add_argument("--air", action="store_true", help="the air grid: hole vs full grid, exact paths")
    ap.add_argument("--air-grids", nargs="*", default=["full", "corner"], choices=sorted(AIR_GRIDS))
    ap.add_argument("--cell-noise-missing", action="store_true",
                    help="per-cell noise with few missing cells: G factored against the nested CG route")
    ap.add_argument("--cnm-sides", type=int, nargs="*", default=[12, 16, 20, 24], help="--cell-noise-missing: n of n³")
    ap.add_argument("--cnm-patterns", nargs="*", default=["block-1+cell-noise", "scatter-1+cell-noise"])
    ap.add_argument("--cnm-nested", action=argparse.BooleanOptionalAction, default=True,
                    help="--cell-noise-missing: also time the nested route")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.small:
        args.n, args.fit, args.repeats = 10, False, 2
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    meta = {"device": name, "date": datetime.date.today().isoformat(), "n": args.n, "dtype": args.dtype,
            "torch": torch.__version__}
    if args.air:
        meta.pop("n")
        print(f"# gaps: the air grid's hole, {args.dtype}, {name}, {meta['date']}", flush=True)
        out = {"meta": meta, "air": run_air(args)}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)
        return out
    if args.cell_noise_missing:
        meta.pop("n")
        print(f"# gaps: per-cell noise with few missing cells, {args.dtype}, {name}, {meta['date']}\n{CNM_HEAD}", flush=True)
        out = {"meta": meta, "cell_noise_missing": run_cell_noise_missing(args, dtype, dev)}
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(out, fh, indent=1)
        return out
    y, axes = air_grid(dtype, dev) if args.grid == "air" else draw(args.n, dtype, dev)
    where = "the air grid 240x37x49" if args.grid == "air" else f"{args.n}^3"
    meta["grid"] = args.grid
    print(f"# gaps on {where} {args.dtype}, {name}, {meta['date']}", flush=True)
    if args.limit:
        print(LIMIT_HEAD, flush=True)
        out = {"meta": meta, "limit": run_limit(y, axes, args)}
    elif args.holes:
        out = {"meta": meta, "holes": run_holes(y, axes, args)}
    else:
        rows = []
        head = (f"{'pattern':20s} {'path':14s} {'missing':>7s} {'step s':>8s} {'iters':>5s} {'probes':>6s} {'lml rel err':>11s}"
                f" {'(std err)':>9s} {'(ref err)':>9s} {'fit s':>7s} {'RMSE':>7s} {'cov95':>6s} {'warn':>5s}")
        head += GPYTORCH_HEAD if args.gpytorch else ""
        print(head, flush=True)
        for pat in args.patterns:
            row = run_pattern(pat, y, axes, args)
            rows.append(row)
            fmt = lambda k, f: format(row[k], f) if row.get(k) is not None else "-"  # noqa: E731
            print(f"{pat:20s} {row['path']:14s} {row['missing']:7d} {row['step_s']:8.4f} {fmt('iterations', '5d'):>5s} "
                  f"{row['probes']:6d} {row['lml_rel_err']:11.2e} {fmt('lml_rel_std_error', '9.1e'):>9s} "
                  f"{fmt('lml_ref_rel_std_error', '9.1e'):>9s} {fmt('fit_s', '7.2f'):>7s} {fmt('heldout_rmse', '7.4f'):>7s} "
                  f"{fmt('heldout_coverage95', '6.3f'):>6s} {warned(row):>5s}" + (gpytorch_cells(row) if args.gpytorch else ""), flush=True)
            if args.out:  # after every row: a run stopped by a time limit keeps what it measured
                with open(args.out, "w") as fh:
                    json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        out = {"meta": meta, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
