"""Benchmark kronegp's Kron-Matmul against linear_operator and a plain torch loop (DESIGN.md).

For every case of the DESIGN.md list, both dtypes, both sides and (float32) every precision mode
of ``--precisions`` (``highest`` exact, ``high`` split TF32, ``medium`` TF32):

* ours: ``kronegp.kron_matmul(F, x, precision=…)`` with x ``(K, T)`` and
  ``kronegp.matmul_kron(x, F, precision=…)`` with x ``(M, K)`` (the public ops, so dispatch
  overhead is included); the cost model picks each call's path, or with ``--autotune`` the path
  timed fastest on the case's first call;
* linear_operator: ``KroneckerProductLinearOperator(F)._matmul(x)`` and ``x @ op`` (rmatmul);
* torch loop: ``kronegp.reference`` (one batched GEMM per factor).

Three times per call, in the same run (DESIGN.md, "Benchmark method"):

* **device** — the call captured in a CUDA graph (one graph per input set) and replayed
  back to back between two CUDA events, per replay; where capture fails, back-to-back eager
  calls between two events (``method`` says which);
* **eager** — wall time per call of back-to-back eager calls (host clock, synchronised before
  and after the run): what a loop of calls costs;
* **host** — eager − device: the host time the device cannot hide; and **issue**, the host
  time to return from one call (perf_counter around it).

The floor is measured in the same run: ``floor = max(bytes / B, flops / R, 5 µs)`` with B the
device-to-device copy bandwidth (bytes read + written) and R torch's GEMM rate in the dtype
(TF32 off) — the same floor for every precision mode. Medians of ``--reps`` timings after
warm-up, rotating over two fresh random input sets. Errors are relative to a float64 reference.

    python benchmarks/kron_matmul.py --out results.json [--limit N] [--dtypes float32]
        [--precisions highest high medium] [--paths fused axis_gemm]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

import kronegp
from kronegp import reference

CASES = [
    ("(1024, 8^6)", 1024, [8] * 6),
    ("(1024, 16^4)", 1024, [16] * 4),
    ("(1024, 32^3)", 1024, [32] * 3),
    ("(1024, 64^3)", 1024, [64] * 3),
    ("(1024, 128^2)", 1024, [128] * 2),
    ("(320, 16^5)", 320, [16] * 5),
    ("(16, 8^8)", 16, [8] * 8),
    ("(16, 16^6)", 16, [16] * 6),
    ("(16, 64^4)", 16, [64] * 4),
    ("GP 64^3, T=11", 11, [64] * 3),
    ("GP 128^3, T=11", 11, [128] * 3),
    ("GP 256^3, T=11", 11, [256] * 3),
    ("GP [64,128,365], T=11", 11, [64, 128, 365]),
    ("GP [24,24,72], T=11", 11, [24, 24, 72]),
]


def _event_ms(body) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    body()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(fn, inputs, reps: int, warmup: int = 3) -> float:
    """Median CUDA-event time of one ``fn(*inputs[i % len])`` in milliseconds (ceilings)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    return statistics.median(_event_ms(lambda: fn(*inputs[i % len(inputs)])) for i in range(reps))


def _graphs(fn, inputs):
    """One CUDA graph per input set of ``fn(*args)``, or None where capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS handles, compilation)
            for args in inputs:
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = []
        for args in inputs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(*args)
            graphs.append(g)
        return graphs
    except Exception as err:  # noqa: BLE001 — a call that cannot be captured is timed eagerly
        print(f"  (graph capture failed: {type(err).__name__}: {str(err)[:120]})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def measure(fn, inputs, reps: int, target_ms: float = 2.0) -> dict:
    """Device, eager and host times of ``fn`` (module docstring), in ms and µs."""
    for i in range(3):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    one = _event_ms(lambda: fn(*inputs[0]))
    n = int(min(200, max(2, target_ms / max(one, 1e-3))))  # calls per timing: ≥ ~2 ms of work
    graphs = _graphs(fn, inputs)
    method = "graph" if graphs is not None else "events"
    dev = []
    for _ in range(reps):
        if graphs is not None:
            dev.append(_event_ms(lambda: [graphs[i % len(graphs)].replay() for i in range(n)]) / n)
        else:
            dev.append(_event_ms(lambda: [fn(*inputs[i % len(inputs)]) for i in range(n)]) / n)
    del graphs
    eager, issue = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            h0 = time.perf_counter()
            fn(*inputs[i % len(inputs)])
            issue.append(time.perf_counter() - h0)
        torch.cuda.synchronize()
        eager.append((time.perf_counter() - t0) / n * 1e3)
    device_ms, eager_ms = statistics.median(dev), statistics.median(eager)
    return {"device_ms": device_ms, "eager_ms": eager_ms, "host_us": (eager_ms - device_ms) * 1e3,
            "issue_us": statistics.median(issue) * 1e6, "method": method, "calls_per_timing": n}


def _cuda_backend():
    from kronegp import device

    return device.load_cuda()[0]


def measure_ceilings(reps: int) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 1 << 28  # 1 GiB of float32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    t = time_ms(lambda: b.copy_(a), [()], reps)
    bw = 2 * n * 4 / (t * 1e-3)
    del a, b
    rates = {}
    for dt in (torch.float32, torch.float64):
        s = 8192
        x = torch.randn(s, s, device="cuda", dtype=dt)
        y = torch.randn(s, s, device="cuda", dtype=dt)
        t = time_ms(lambda: x @ y, [()], max(3, reps // 2))
        rates[str(dt)] = 2 * s**3 / (t * 1e-3)
        del x, y
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": bw, "gemm_flops_per_s": rates}


def case_flops(m: int, sizes: list[int]) -> float:
    # Σ_i 2·M·(Π_{j<i} Q_j)·P_i·Q_i·(Π_{j>i} P_j), square factors here
    total = 0
    for i in range(len(sizes)):
        total += 2 * m * math.prod(sizes[:i]) * sizes[i] * sizes[i] * math.prod(sizes[i + 1 :])
    return total


def lo_operator(factors):
    from linear_operator.operators import DenseLinearOperator, KroneckerProductLinearOperator

    return KroneckerProductLinearOperator(*[DenseLinearOperator(f) for f in factors])


def _rounded(v):
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


def _rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _compile_one(job):
    from kronegp._cuda.compiler import compile_specs, kernel_name

    spec, arch = job
    compile_specs([(kernel_name(spec), spec)], arch)
    return 1


def precompile(cases, dtypes, precisions, mma: bool, arch: str, smem_budget: int = 100 * 1024) -> int:
    """Compile, in parallel processes, every fused/GEMM kernel spec the run's fused plans use
    (contiguous operands: the launcher's 16-byte variants too; with ``mma`` the tensor-core
    variants), into the kernel cache: the timed loop then only loads cubins. Returns the count."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    from kronegp._cuda.plan import fused_mma, plan_tiles

    specs = set()
    for dtname in dtypes:
        itemsize = 8 if dtname == "float64" else 4
        modes = precisions if itemsize == 4 else ["highest"]
        units = {fused_mma(itemsize, p, int(arch[3:]), on) for p in modes for on in ((False, True) if mma else (False,))}
        for _, m, sizes in cases:
            shapes = [(p, p) for p in sizes]
            for col in (False, True):  # matmul_kron: row layouts; kron_matmul with T > 1: column
                if col and m == 1:
                    continue
                for unit in units:
                    for st in plan_tiles(shapes, m, itemsize, col, col, smem_budget, mma=unit):
                        specs.add(st.spec)
                        specs.add(st.spec.vectorized(m, st.s, 0, 0, 1 if col else st.k_in, m if col else 1,
                                                     0, 0, 1 if col else st.k_out, m if col else 1))
    with ProcessPoolExecutor(max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
        return sum(pool.map(_compile_one, [(sp, arch) for sp in specs]))


def run(args) -> dict:
    dev = torch.cuda.get_device_name()
    ceil = measure_ceilings(args.reps)
    torch.set_float32_matmul_precision("highest")  # anchors exact; ours is told its mode per call
    print(f"# {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    print(
        f"# copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s; GEMM "
        + ", ".join(f"{k.split('.')[-1]} {v / 1e12:.1f} TFLOP/s" for k, v in ceil["gemm_flops_per_s"].items()),
        flush=True,
    )
    print(f"# backend: {kronegp.backend_info().get('cuda_reason')}", flush=True)
    if _cuda_backend().fused_mma_enabled:
        print("# fused kernels on the tensor cores (KRONEGP_FUSED_MMA)", flush=True)
    print("# times: device (graph replay) / eager (back-to-back wall) ms, host = eager - device µs, "
          "issue = host µs to return from a call", flush=True)
    backend = _cuda_backend()
    if not args.no_precompile:
        cap = torch.cuda.get_device_capability()
        t0 = time.perf_counter()
        n = precompile(CASES[: args.limit] if args.limit else CASES, args.dtypes, args.precisions,
                       "fused_mma" in args.paths, f"sm_{cap[0]}{cap[1]}")
        print(f"# precompiled {n} kernel specs in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.autotune:
        # "ours" runs with the path of each signature tuned in this run (timed on its first call)
        backend.autotune, backend.autotune_persist = True, False
        print("# autotune: on (paths timed in this run, not saved)", flush=True)
    rows = []
    cases = CASES[: args.limit] if args.limit else CASES
    for dtname in args.dtypes:
        dt = getattr(torch, dtname)
        rate = ceil["gemm_flops_per_s"][str(dt)]
        precisions = args.precisions if dt == torch.float32 else ["highest"]
        for name, m, sizes in cases:
            k = math.prod(sizes)
            for side in args.sides:
                try:
                    gen = torch.Generator(device="cuda").manual_seed(0)
                    inputs = []
                    for _ in range(2):
                        fs = [torch.randn(p, p, device="cuda", dtype=dt, generator=gen) / math.sqrt(p) for p in sizes]
                        shape = (k, m) if side == "kron_matmul" else (m, k)
                        x = torch.randn(*shape, device="cuda", dtype=dt, generator=gen)
                        inputs.append((x, fs))
                    if side == "kron_matmul":
                        loop = lambda x, fs: reference.kron_matmul(fs, x)  # noqa: E731
                        lo = lambda x, op: op._matmul(x)  # noqa: E731
                    else:
                        loop = lambda x, fs: reference.matmul_kron(x, fs)  # noqa: E731
                        lo = lambda x, op: x @ op  # noqa: E731
                    nbytes = (2 * m * k + sum(p * p for p in sizes)) * x.element_size()
                    flops = case_flops(m, sizes)
                    floor_ms = max(nbytes / ceil["copy_bytes_per_s"], flops / rate, 5e-6) * 1e3
                    with torch.no_grad():
                        x0, f0 = inputs[0]
                        ref = (reference.kron_matmul([f.double() for f in f0], x0.double()) if side == "kron_matmul"
                               else reference.matmul_kron(x0.double(), [f.double() for f in f0]))
                        t_loop = measure(loop, inputs, args.reps)
                        lo_inputs = [(x, lo_operator(fs)) for x, fs in inputs]
                        try:
                            t_lo = measure(lo, lo_inputs, args.reps)
                        except Exception as e:  # noqa: BLE001 — an anchor that fails is reported, not fatal
                            print(f"  linear_operator failed on {name}: {e}", file=sys.stderr)
                            t_lo = {"device_ms": float("nan"), "eager_ms": float("nan")}
                        del lo_inputs
                        for prec in precisions:
                            if side == "kron_matmul":
                                ours = lambda x, fs, p=prec: kronegp.kron_matmul(fs, x, precision=p)  # noqa: E731
                            else:
                                ours = lambda x, fs, p=prec: kronegp.matmul_kron(x, fs, precision=p)  # noqa: E731
                            out = ours(x0, f0)
                            err, nan = _rel_err(out, ref), bool(torch.isnan(out).any())
                            del out
                            t = measure(ours, inputs, args.reps)
                            by_path = {}
                            for path in args.paths:  # each path pinned, for the cost model's calibration
                                if path == "fused_mma" and dt == torch.float32 and prec == "highest":
                                    continue  # exact float32 is FMA: the same kernels as "fused"
                                # fused_mma: the fused path with its products on the tensor cores
                                backend.force_path = "fused" if path == "fused_mma" else path
                                backend.fused_mma_enabled = path == "fused_mma"
                                try:
                                    o = ours(x0, f0)
                                    by_path[path] = {**measure(ours, inputs, args.reps), "rel_err": _rel_err(o, ref)}
                                    nan = nan or bool(torch.isnan(o).any())
                                    del o
                                finally:
                                    backend.force_path, backend.fused_mma_enabled = "auto", False
                            if prec != "highest" and not args.no_direct:
                                # the cuBLAS path forced into this mode (the cost model may run exact
                                # float32 instead for "high"): calibrates Rates.tf32_gemm_flops_per_s
                                from kronegp._cuda.axis_gemm import axis_products

                                if side == "kron_matmul":
                                    direct = lambda x, fs, p=prec: axis_products(x, 1, sizes, m, fs, p)  # noqa: E731
                                else:
                                    direct = lambda x, fs, p=prec: axis_products(x, m, sizes, 1, [f.mT for f in fs], p)  # noqa: E731
                                o = direct(x0, f0).view(ref.shape)
                                by_path[f"axis_gemm[{prec}]"] = {**measure(direct, inputs, args.reps), "rel_err": _rel_err(o, ref)}
                                del o
                            choice = backend.choice(side, x0, f0, prec)
                            row = {
                                "case": name, "dtype": dtname, "side": side, "precision": prec, "M": m,
                                "factors": sizes, "bytes": nbytes, "flops": flops, "floor_ms": floor_ms,
                                "ours": t, "lo": t_lo, "loop": t_loop,
                                "device_over_floor": t["device_ms"] / floor_ms,
                                "eager_over_floor": t["eager_ms"] / floor_ms,
                                "lo_over_floor": t_lo["eager_ms"] / floor_ms,
                                "eager_speedup_vs_lo": t_lo["eager_ms"] / t["eager_ms"],
                                "device_speedup_vs_lo": t_lo["device_ms"] / t["device_ms"],
                                "eager_speedup_vs_loop": t_loop["eager_ms"] / t["eager_ms"],
                                "rel_err": err, "nan": nan,
                                "path": backend.path_taken(side, x0, f0, prec), "model_path": choice.path,
                                "axis_precision": choice.axis_precision,
                                "plan_launches": len(choice.steps) if choice.path == "fused" else len(sizes),
                                "predicted_fused_ms": choice.predicted_fused_s * 1e3,
                                "predicted_axis_ms": choice.predicted_axis_s * 1e3,
                                "predicted_axis_t_ms": (choice.predicted_axis_t_s * 1e3
                                                        if math.isfinite(choice.predicted_axis_t_s) else None),
                                "by_path": by_path,
                            }
                            rows.append(row)
                            print(
                                f"{name:22s} {dtname[5:]:2s} {side:11s} {prec:7s} dev {t['device_ms']:8.4f} "
                                f"eager {t['eager_ms']:8.4f} host {t['host_us']:6.1f} issue {t['issue_us']:5.1f} "
                                f"floor {floor_ms:7.4f} d/f {row['device_over_floor']:5.2f} e/f {row['eager_over_floor']:5.2f} "
                                f"LO {t_lo['eager_ms']:8.3f} xLO {row['eager_speedup_vs_lo']:5.2f} "
                                f"xloop {row['eager_speedup_vs_loop']:5.2f} err {err:.1e} {row['path']}"
                                + (f"[{choice.axis_precision}]" if row["path"] != "fused" else "")
                                + "".join(f" | {k} {v['device_ms']:.3f} err {v['rel_err']:.1e}" for k, v in by_path.items()),
                                flush=True,
                            )
                    del inputs, ref
                    torch.cuda.empty_cache()
                except Exception as err:  # noqa: BLE001 — report the case and go on with the others
                    print(f"{name} {dtname} {side}: FAILED {type(err).__name__}: {err}", flush=True)
                    rows.append({"case": name, "dtype": dtname, "side": side, "error": f"{type(err).__name__}: {err}"})
                    torch.cuda.empty_cache()
    summary = {"failed": [f"{r['case']} {r['dtype']} {r['side']}" for r in rows if "error" in r]}
    for dtname in args.dtypes:
        for prec in (args.precisions if dtname == "float32" else ["highest"]):
            sel = [r for r in rows if r["dtype"] == dtname and r.get("precision") == prec]
            if not sel:
                continue

            def gm(key, sel=sel):
                vals = [r[key] for r in sel if r[key] == r[key]]
                return math.exp(statistics.fmean(math.log(v) for v in vals))

            summary[f"{dtname} {prec}"] = {
                "geomean_device_over_floor": gm("device_over_floor"),
                "geomean_eager_over_floor": gm("eager_over_floor"),
                "max_device_over_floor": max(r["device_over_floor"] for r in sel),
                "geomean_lo_over_floor": gm("lo_over_floor"),
                "geomean_eager_speedup_vs_lo": gm("eager_speedup_vs_lo"),
                "geomean_eager_speedup_vs_loop": gm("eager_speedup_vs_loop"),
                "median_host_us": statistics.median(r["ours"]["host_us"] for r in sel),
                "median_issue_us": statistics.median(r["ours"]["issue_us"] for r in sel),
                "max_issue_us": max(r["ours"]["issue_us"] for r in sel),
                "max_rel_err": max(r["rel_err"] for r in sel),
                "any_nan": any(r["nan"] for r in sel),
                "slower_than_lo": [f"{r['case']} {r['side']}" for r in sel if r["eager_speedup_vs_lo"] < 1],
            }
    if "highest" in args.precisions and "high" in args.precisions:
        # the issue's split-TF32 target: GP-shaped cases with P ≥ 64, "high" against "highest"
        ratio = {}
        for r in rows:
            if r["dtype"] == "float32" and r.get("precision") == "high" and r["case"].startswith("GP") and min(r["factors"]) >= 64:
                base = next((b for b in rows if b.get("precision") == "highest" and b["case"] == r["case"]
                             and b["side"] == r["side"] and b["dtype"] == "float32"), None)
                if base is not None:
                    ratio[f"{r['case']} {r['side']}"] = base["ours"]["device_ms"] / r["ours"]["device_ms"]
        summary["high_speedup_over_highest_gp_p64"] = ratio
    print("# summary")
    for key, val in summary.items():
        print(f"# {key}: " + json.dumps(_rounded(val)), flush=True)
    return {"device": dev, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "ceilings": ceil,
            "backend": kronegp.backend_info(), "rows": rows, "summary": summary}


def profile_host(n: int = 1000) -> dict:
    """Host µs per call of the small GP cases (the GPU work is a few µs, so the host sets the
    pace), per path, and a cProfile of the auto path: where the host time goes."""
    import cProfile
    import io
    import pstats

    backend = _cuda_backend()
    out = {}
    for name, m, sizes in [c for c in CASES if c[0].startswith(("GP 64^3", "GP [24"))]:
        for dtname in ("float32", "float64"):
            dt = getattr(torch, dtname)
            fs = [torch.randn(p, p, device="cuda", dtype=dt) for p in sizes]
            k = math.prod(sizes)
            x_row = torch.randn(m, k, device="cuda", dtype=dt)
            x_col = torch.randn(k, m, device="cuda", dtype=dt)
            calls = {"matmul_kron": lambda: kronegp.matmul_kron(x_row, fs),
                     "kron_matmul": lambda: kronegp.kron_matmul(fs, x_col)}
            for side, fn in calls.items():
                for path in ("auto", "fused", "axis_gemm"):
                    backend.force_path = path
                    for _ in range(20):
                        fn()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    key = f"{name} {dtname} {side} {path}"
                    out[key] = {"host_us": (t1 - t0) / n * 1e6, "total_us": (t2 - t0) / n * 1e6}
                    print(f"host {key:45s} {out[key]['host_us']:7.1f} us/call issue, "
                          f"{out[key]['total_us']:7.1f} us/call to finish", flush=True)
                backend.force_path = "auto"
    # where the time goes, auto path, one fused and one cuBLAS case
    for name, m, sizes in [("GP [24,24,72]", 11, [24, 24, 72]), ("GP 64^3", 11, [64] * 3)]:
        fs = [torch.randn(p, p, device="cuda") for p in sizes]
        x = torch.randn(m, math.prod(sizes), device="cuda")
        for _ in range(20):
            kronegp.matmul_kron(x, fs)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            kronegp.matmul_kron(x, fs)
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        print(f"# cProfile {name} float32 matmul_kron ({n} calls)\n" + buf.getvalue(), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kron_matmul_results.json")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--precisions", nargs="+", default=["highest", "high", "medium"],
                    choices=["highest", "high", "medium"], help="float32 precision modes of ours")
    ap.add_argument("--sides", nargs="+", default=["matmul_kron", "kron_matmul"])
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases")
    ap.add_argument("--paths", nargs="*", default=[], choices=["fused", "fused_mma", "axis_gemm", "axis_gemm_t"],
                    help="also time ours with each path pinned (cost-model calibration); fused_mma: the fused "
                         "path on the tensor cores (KRONEGP_FUSED_MMA)")
    ap.add_argument("--no-precompile", action="store_true",
                    help="skip compiling the run's kernels in parallel first (they compile on first use)")
    ap.add_argument("--no-direct", action="store_true",
                    help="skip timing the cuBLAS path forced into each float32 mode other than highest")
    ap.add_argument("--autotune", action="store_true",
                    help="run ours with autotuning on (each signature's path timed once, in this run)")
    ap.add_argument("--profile-host", action="store_true",
                    help="only measure host µs per call of the small GP cases and cProfile them")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kron_matmul.py needs a CUDA GPU")
    if args.profile_host:
        result = profile_host()
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        return
    result = run(args)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
