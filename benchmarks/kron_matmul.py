"""Benchmark kronegp's Kron-Matmul against linear_operator and a plain torch loop (DESIGN.md).

For every case of the DESIGN.md list, both dtypes and both sides:

* ours: ``kronegp.kron_matmul(F, x)`` with x ``(K, T)`` and ``kronegp.matmul_kron(x, F)`` with
  x ``(M, K)`` (the public ops, so dispatch overhead is included); the cost model picks each
  call's path, or with ``--autotune`` the path timed fastest on the case's first call;
* linear_operator: ``KroneckerProductLinearOperator(F)._matmul(x)`` and ``x @ op`` (rmatmul);
* torch loop: ``kronegp.reference`` (one batched GEMM per factor).

The floor is measured in the same run: ``floor = max(bytes / B, flops / R, 5 µs)`` with B the
device-to-device copy bandwidth (bytes read + written) and R torch's GEMM rate in the dtype
(TF32 off). Times are medians of ``--reps`` CUDA-event timings after warm-up, rotating over
two fresh random input sets. Errors are relative to a float64 reference.

    python benchmarks/kron_matmul.py --out results.json [--quick] [--dtypes float32]
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


_HOST_US: list = []  # host µs of the last time_ms call's runs (CPU time to issue one call)


def time_ms(fn, inputs, reps: int, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn(*inputs[i % len])`` in milliseconds.

    Also leaves in ``_HOST_US`` the median host time (µs) to issue one call: the wall time from
    entering ``fn`` to its return, with the GPU idle beforehand (no queue back-pressure)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times, host = [], []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        h0 = time.perf_counter()
        fn(*args)
        h1 = time.perf_counter()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        host.append((h1 - h0) * 1e6)
    _HOST_US[:] = [statistics.median(host)]
    return statistics.median(times)


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


def run(args) -> dict:
    dev = torch.cuda.get_device_name()
    ceil = measure_ceilings(args.reps)
    print(f"# {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    print(
        f"# copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s; GEMM "
        + ", ".join(f"{k.split('.')[-1]} {v / 1e12:.1f} TFLOP/s" for k, v in ceil["gemm_flops_per_s"].items()),
        flush=True,
    )
    print(f"# backend: {kronegp.backend_info().get('cuda_reason')}", flush=True)
    if args.autotune:
        # "ours" runs with the path of each signature tuned in this run (timed on its first call)
        _cuda_backend().autotune, _cuda_backend().autotune_persist = True, False
        print("# autotune: on (paths timed in this run, not saved)", flush=True)
    rows = []
    cases = CASES[: args.limit] if args.limit else CASES
    for dtname in args.dtypes:
        dt = getattr(torch, dtname)
        rate = ceil["gemm_flops_per_s"][str(dt)]
        for name, m, sizes in cases:
            k = math.prod(sizes)
            for side in args.sides:
                gen = torch.Generator(device="cuda").manual_seed(0)
                inputs = []
                for _ in range(2):
                    fs = [torch.randn(p, p, device="cuda", dtype=dt, generator=gen) / math.sqrt(p) for p in sizes]
                    shape = (k, m) if side == "kron_matmul" else (m, k)
                    x = torch.randn(*shape, device="cuda", dtype=dt, generator=gen)
                    inputs.append((x, fs))
                if side == "kron_matmul":
                    ours = lambda x, fs: kronegp.kron_matmul(fs, x)  # noqa: E731
                    loop = lambda x, fs: reference.kron_matmul(fs, x)  # noqa: E731
                    lo = lambda x, op: op._matmul(x)  # noqa: E731
                else:
                    ours = lambda x, fs: kronegp.matmul_kron(x, fs)  # noqa: E731
                    loop = lambda x, fs: reference.matmul_kron(x, fs)  # noqa: E731
                    lo = lambda x, op: x @ op  # noqa: E731
                nbytes = (2 * m * k + sum(p * p for p in sizes)) * x.element_size()
                flops = case_flops(m, sizes)
                floor_s = max(nbytes / ceil["copy_bytes_per_s"], flops / rate, 5e-6)
                with torch.no_grad():
                    x0, f0 = inputs[0]
                    out = ours(x0, f0)
                    ref = (
                        reference.kron_matmul([f.double() for f in f0], x0.double())
                        if side == "kron_matmul"
                        else reference.matmul_kron(x0.double(), [f.double() for f in f0])
                    )
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    nan = bool(torch.isnan(out).any())
                    backend = _cuda_backend()
                    path_err = {}
                    for path in args.paths:
                        backend.force_path = path
                        try:
                            o = ours(x0, f0)
                            path_err[path] = ((o.double() - ref).norm() / ref.norm()).item()
                            nan = nan or bool(torch.isnan(o).any())
                            del o
                        finally:
                            backend.force_path = "auto"
                    del out, ref
                    choice = backend.choice(side, x0, f0)
                    t_ours = time_ms(ours, inputs, args.reps)
                    host_us = _HOST_US[0]
                    by_path = {}
                    for path in args.paths:  # each path pinned, for the cost model's calibration
                        backend.force_path = path
                        try:
                            by_path[path] = {"ms": time_ms(ours, inputs, args.reps), "host_us": _HOST_US[0],
                                             "rel_err": path_err[path]}
                        finally:
                            backend.force_path = "auto"
                    t_loop = time_ms(loop, inputs, args.reps)
                    lo_inputs = [(x, lo_operator(fs)) for x, fs in inputs]
                    try:
                        t_lo = time_ms(lo, lo_inputs, args.reps)
                    except Exception as e:  # noqa: BLE001 — an anchor that fails is reported, not fatal
                        print(f"  linear_operator failed on {name}: {e}", file=sys.stderr)
                        t_lo = float("nan")
                del inputs, lo_inputs
                torch.cuda.empty_cache()
                row = {
                    "case": name,
                    "dtype": dtname,
                    "side": side,
                    "M": m,
                    "factors": sizes,
                    "bytes": nbytes,
                    "flops": flops,
                    "floor_ms": floor_s * 1e3,
                    "ours_ms": t_ours,
                    "lo_ms": t_lo,
                    "loop_ms": t_loop,
                    "time_over_floor": t_ours / (floor_s * 1e3),
                    "lo_over_floor": t_lo / (floor_s * 1e3),
                    "speedup_vs_lo": t_lo / t_ours,
                    "speedup_vs_loop": t_loop / t_ours,
                    "rel_err": err,
                    "nan": nan,
                    "path": backend.path_taken(side, x0, f0),
                    "model_path": choice.path,
                    "plan_launches": len(choice.steps) if choice.path == "fused" else len(sizes),
                    "predicted_fused_ms": choice.predicted_fused_s * 1e3,
                    "predicted_axis_ms": choice.predicted_axis_s * 1e3,
                    # the rotating form (kron_matmul only: None for matmul_kron)
                    "predicted_axis_t_ms": choice.predicted_axis_t_s * 1e3 if math.isfinite(choice.predicted_axis_t_s) else None,
                    "host_us": host_us,
                    "by_path": by_path,
                }
                rows.append(row)
                print(
                    f"{name:24s} {dtname:8s} {side:11s} ours {t_ours:9.4f} ms  floor {floor_s * 1e3:8.4f}  "
                    f"x{row['time_over_floor']:5.2f}  LO {t_lo:9.3f} (x{row['lo_over_floor']:5.1f})  "
                    f"vsLO {row['speedup_vs_lo']:5.2f}  vsloop {row['speedup_vs_loop']:5.2f}  err {err:.1e}  "
                    f"{row['path']} host {host_us:.0f}us pred f/a/t {row['predicted_fused_ms']:.3f}/"
                    f"{row['predicted_axis_ms']:.3f}/{choice.predicted_axis_t_s * 1e3:.3f} " + " ".join(f"{k} {v['ms']:.3f}" for k, v in by_path.items()),
                    flush=True,
                )
    summary = {}
    for dtname in args.dtypes:
        sel = [r for r in rows if r["dtype"] == dtname]
        if not sel:
            continue
        gm = lambda key: math.exp(statistics.fmean(math.log(r[key]) for r in sel if r[key] == r[key]))  # noqa: E731
        summary[dtname] = {
            "geomean_time_over_floor": gm("time_over_floor"),
            "geomean_lo_over_floor": gm("lo_over_floor"),
            "geomean_speedup_vs_lo": gm("speedup_vs_lo"),
            "geomean_speedup_vs_loop": gm("speedup_vs_loop"),
            "max_rel_err": max(r["rel_err"] for r in sel),
            "slower_than_lo": [f"{r['case']} {r['side']}" for r in sel if r["speedup_vs_lo"] < 1],
        }
        print(f"# {dtname}: " + json.dumps(summary[dtname]), flush=True)
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
    ap.add_argument("--sides", nargs="+", default=["matmul_kron", "kron_matmul"])
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases")
    ap.add_argument("--paths", nargs="*", default=[], choices=["fused", "axis_gemm", "axis_gemm_t"],
                    help="also time ours with each path pinned (cost-model calibration)")
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
