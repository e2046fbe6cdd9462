"""Where a training step spends its time: torch.profiler tables for GridGP's three regimes
and the patched/unpatched GPyTorch GridKernel model, plus eigh micro-timings.

    python benchmarks/profile_step.py --n 128 --out-dir DIR
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gp_training as gt  # noqa: E402


def wall(fn, reps=5):
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def prof(fn, name, out_dir, rows=30):
    from torch.profiler import ProfilerActivity, profile
    fn(); fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn(); torch.cuda.synchronize()
    p.export_chrome_trace(os.path.join(out_dir, f"{name}.trace.json"))
    ka = p.key_averages()
    t1 = ka.table(sort_by="cuda_time_total", row_limit=rows)
    t2 = ka.table(sort_by="self_cpu_time_total", row_limit=rows)
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as fh:
        fh.write(t1 + "\n\n" + t2)
    return ka


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--parts", default="eigh,gridgp,gpytorch", help="comma list of eigh, gridgp, gpytorch")
    ap.add_argument("--regimes", default=",".join(gt.REGIMES))
    a = ap.parse_args()
    dev = torch.device("cuda")
    dt = torch.float32
    parts = a.parts.split(",")
    # eigh micro-timings
    for n in ((64, 128, 365) if "eigh" in parts else ()):
        for d in (torch.float32, torch.float64):
            m = torch.randn(n, n, device=dev, dtype=d); m = m @ m.T
            t = wall(lambda: torch.linalg.eigh(m), 10)
            mb = m.expand(3, n, n).contiguous()
            tb = wall(lambda: torch.linalg.eigh(mb), 10)
            tc = wall(lambda: torch.linalg.eigh(m.double().cpu())[1].to(dev), 10)
            print(f"eigh n={n} {d}: gpu {t*1e3:.2f} ms, batched3 {tb*1e3:.2f} ms, cpu64+copy {tc*1e3:.2f} ms", flush=True)
    for regime in (a.regimes.split(",") if "gridgp" in parts else ()):
        y, axes, noise, mask = gt.make_data(a.n, regime, dt, dev)
        y_in = y.clone()
        if mask is not None:
            y_in[~mask] = float("nan")
        model = gt.build_gridgp(y_in, axes, noise, mask, dt, num_probes=a.probes)
        step = gt.gridgp_step(model)
        w = wall(step)
        ka = prof(step, f"gridgp_{regime}", a.out_dir)
        cuda_total = sum(e.self_device_time_total for e in ka) / 1e3
        print(f"GridGP {a.n}^3 {regime}: wall {w*1e3:.1f} ms, summed kernel time {cuda_total:.1f} ms, iters {model.cg_iterations} {getattr(model,'cg_inner_iterations',None)}", flush=True)
        del model
    import gpytorch
    import kronegp
    import gpytorch_models as gm
    for kind in (("grid", "multitask", "kiss") if "gpytorch" in parts else ()):
        model, lik, x, yv, shape = gm.build(kind, gm.SIZES["full"], dt, dev)
        model.train(); lik.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)
        prank = 0 if kind == "kiss" else gpytorch.settings.max_preconditioner_size.value()

        def step():
            model.zero_grad()
            torch.manual_seed(0)
            with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.max_preconditioner_size(prank):
                loss = -mll(model(x), yv)
            loss.backward()
        for patched in (False, True):
            h = kronegp.patch_gpytorch() if patched else None
            try:
                w = wall(step)
                ka = prof(step, f"gpytorch_{kind}_{'patched' if patched else 'plain'}", a.out_dir)
                cuda_total = sum(e.self_device_time_total for e in ka) / 1e3
                print(f"GPyTorch {kind} patched={patched}: wall {w*1e3:.1f} ms, summed kernel {cuda_total:.1f} ms", flush=True)
            finally:
                if h is not None:
                    h.undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
