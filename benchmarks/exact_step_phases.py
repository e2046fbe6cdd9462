"""Phase timings of one exact GridGP step at 128³ on a GPU (host wall clock, synchronised
between phases): kernel factors, residual, eigendecompositions, rest of the forward,
backward; and a GPyTorch kernel evaluated through ``__call__`` against ``forward``.

    python benchmarks/exact_step_phases.py
"""
import os
import statistics
import sys
import time

import torch

import kronegp.linalg as kl
from kronegp.models._exact import exact_lml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gp_training as gt  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    y, axes, noise, mask = gt.make_data(128, "homoskedastic", torch.float32, dev)
    m = gt.build_gridgp(y, axes, noise, mask, torch.float32)
    step = gt.gridgp_step(m)
    for _ in range(3): step()

    def sync(): torch.cuda.synchronize()
    T = {k: [] for k in ("factors", "resid", "eig", "forward_rest", "backward", "step_total", "step_nosync")}
    for _ in range(20):
        sync(); t0 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        f = m._factors(); sync(); t1 = time.perf_counter()
        r = m.y - m._mean_grid(); sync(); t2 = time.perf_counter()
        kl.symmetric_eig([x.detach() for x in f]); sync(); t3 = time.perf_counter()
        lml = exact_lml(r, m.noise, m.outputscale, f); sync(); t4 = time.perf_counter()
        (-lml / m.n_observed).backward(); sync(); t5 = time.perf_counter()
        T["factors"].append(t1 - t0); T["resid"].append(t2 - t1); T["eig"].append(t3 - t2)
        T["forward_rest"].append(t4 - t3); T["backward"].append(t5 - t4)
        sync(); t6 = time.perf_counter(); step(); sync(); T["step_total"].append(time.perf_counter() - t6)
        t7 = time.perf_counter(); step(); T["step_nosync"].append(time.perf_counter() - t7); sync()
    for k, v in T.items():
        print(f"{k:14s} {statistics.median(v)*1e3:7.2f} ms")
    # kernel evaluation alternatives
    kern, ax = m.kernels[0], m.axes[0].unsqueeze(-1)
    def call(): return kern(ax, ax).to_dense()
    def fwd(): return kern.forward(ax, ax)
    for name, fn in (("kern(x,x).to_dense()", call), ("kern.forward(x,x)", fwd)):
        fn(); sync(); t = time.perf_counter()
        for _ in range(50): fn()
        sync(); print(f"{name:24s} {(time.perf_counter()-t)/50*1e3:.3f} ms")


if __name__ == "__main__":
    main()
