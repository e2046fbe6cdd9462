"""Time ways to eigendecompose the small factors of a Kronecker kernel (3 × n×n) from a CUDA tensor.

Prints ms per set of three for each option; used to choose kronegp.linalg's rule.
"""
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
import torch


def timeit(fn, reps=15):
    fn(); fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    dev = torch.device("cuda")
    print("torch threads", torch.get_num_threads(), torch.__config__.parallel_info().splitlines()[:6])
    pool = ThreadPoolExecutor(4)
    for n in (32, 64, 128, 256, 365):
        mats = []
        for s in range(3):
            a = torch.randn(n, n, device=dev, dtype=torch.float64); mats.append((a @ a.T / n).float())
        res = {}
        res["gpu_f32"] = timeit(lambda: [torch.linalg.eigh(m) for m in mats])
        res["gpu_f64"] = timeit(lambda: [torch.linalg.eigh(m.double()) for m in mats])
        def host(fn):
            def run():
                flat = torch.cat([m.reshape(-1).double() for m in mats]).cpu()
                outs = fn([flat[i*n*n:(i+1)*n*n].view(n, n) for i in range(3)])
                torch.cat([torch.cat([l, q.reshape(-1)]) for l, q in outs]).to(dev)
            return run
        res["host_serial"] = timeit(host(lambda ms: [torch.linalg.eigh(m) for m in ms]))
        res["host_pool"] = timeit(host(lambda ms: list(pool.map(torch.linalg.eigh, ms))))
        res["host_batched"] = timeit(host(lambda ms: [(l, q) for l, q in zip(*torch.linalg.eigh(torch.stack(ms)))]))
        def sp(ms):
            return [tuple(torch.from_numpy(x) for x in scipy.linalg.eigh(m.numpy(), driver="evd", check_finite=False)) for m in ms]
        res["host_scipy_evd"] = timeit(host(sp))
        def sp_pool(ms):
            f = lambda m: tuple(torch.from_numpy(x) for x in scipy.linalg.eigh(m.numpy(), driver="evd", check_finite=False))
            return list(pool.map(f, ms))
        res["host_scipy_evd_pool"] = timeit(host(sp_pool))
        import kronegp.linalg as kl0
        # kronegp's rule: one worker per matrix, each limited to one OpenMP thread
        res["host_workers_1thread"] = timeit(host(kl0._host_eighs))
        def npe(ms):
            return [tuple(torch.from_numpy(x) for x in np.linalg.eigh(m.numpy())) for m in ms]
        res["host_numpy"] = timeit(host(npe))
        import kronegp.linalg as kl
        for hmax in (0, 64, 160, 512):
            kl.HOST_EIGH_MAX_ROWS = hmax
            def sym():
                kl.clear_eig_cache()
                kl.symmetric_eig(mats)
            res[f"symmetric_eig_host<={hmax}"] = timeit(sym)
        old = torch.get_num_threads()
        for th in (1, 4):
            torch.set_num_threads(th)
            res[f"host_serial_t{th}"] = timeit(host(lambda ms: [torch.linalg.eigh(m) for m in ms]))
        torch.set_num_threads(old)
        print(f"n={n}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
