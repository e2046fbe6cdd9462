"""Host (Python) time per Kron-Matmul call on a CPU, with the GPU work stubbed out.

The CUDA backend's per-call work — the door's checks, the path choice, the launch record lookup,
allocation, argument patching — runs unchanged on CPU tensors; only the things that need a GPU
are replaced: the device (no context, no cubins: every kernel handle is 0), torch's current
stream (0), ``cuLaunchKernel`` (a Python no-op that counts launches) and the cuBLAS GEMMs of the
axis paths (an empty tensor of the product's shape). What remains is our Python: the number
the issue's host target (≤ 15 µs per eager call) is about, less the driver's own launch cost
(~2–4 µs per ``cuLaunchKernel``) and torch's GEMM dispatch, which this cannot see.

    PYTHONPATH=. python benchmarks/host_overhead.py [--calls 5000] [--profile] [--launch ctypes]

Prints µs per call for each case through the public op (door included; ``grad``: the same call
with factors that require grad, the forward only), through the backend alone (its own key, as the
backward's products call it), and with ``--profile`` a cProfile of the slowest case.

``--launch python`` (the default, as in earlier rounds) stubs ``cuLaunchKernel`` with a Python
no-op; ``--launch ctypes`` with a real foreign call through ctypes, set up as the launcher sets up
libcuda's (:func:`kronegp._cuda.launch.bind_launch`), to libc's ``abs`` of the stub's null
kernel handle (which returns 0): that adds ctypes' own argument conversion per launch, which a
GPU run pays too.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import math
import os
import pstats
import sys
import time

if __name__ == "__main__" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # glibc would mmap and unmap every large CPU buffer (~10-100 µs each); keep freed blocks for
    # reuse instead, which is what torch's CUDA caching allocator does on the GPU
    os.environ.update(MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch

import kronegp
from kronegp import device
from kronegp._cuda import CudaBackend, axis_gemm, launch

CASES = [  # (name, rows, factor sizes, path): the host-bound GP shapes and one many-factor one
    ("GP [24,24,72], T=11", 11, [24, 24, 72], "fused"),
    ("GP 64^3, T=11", 11, [64, 64, 64], "auto"),
    ("(4, 8^6)", 4, [8] * 6, "fused"),
]


class StubDevice:
    """What the launcher asks of a device, without one (also the device of tests/test_launch.py)."""

    index = 0
    arch = "sm_90"
    smem_optin = 227 * 1024
    smem_budget = 100 * 1024
    sm_count = 132

    def __init__(self):
        self.programs: dict = {}

    def function(self, spec):
        return 0

    def current(self):
        return _NoCtx()

    def make_current(self):
        return False  # the context is current already: what a call on torch's current device finds

    def pop_current(self):
        raise AssertionError("nothing was pushed")


class _NoCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def stub_backend() -> tuple[CudaBackend, dict]:
    """A CudaBackend whose device, stream, launches and cuBLAS calls are stubs; returns it and a
    counter of launches."""
    counter = {"launches": 0}
    dev = StubDevice()

    def fake_launch(*args):
        counter["launches"] += 1
        return 0

    def fake_gemm(w, x, a, i, c):
        o = w.shape[0]
        shape = (a, o) if c == 1 else ((o, c) if a == 1 else (a, o, c))
        return torch.empty(shape, dtype=x.dtype)

    launch._C_LAUNCH = fake_launch
    launch.current_stream_handle = lambda device: 0
    axis_gemm._axis_gemm = fake_gemm
    backend = CudaBackend()
    backend._device = lambda t: dev
    return backend, counter


def _per_call_us(fn, calls: int) -> float:
    for _ in range(200):
        fn()
    best = math.inf
    for _ in range(5):  # best of five: the machine is shared
        t0 = time.thread_time()  # this thread's CPU time: other processes' load does not count
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--launch", choices=("python", "ctypes"), default="python",
                    help="what stands in for cuLaunchKernel while timing (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    backend, counter = stub_backend()
    counting = launch._C_LAUNCH
    timed = counting if args.launch == "python" else launch.bind_launch(ctypes.CDLL(None).abs)
    device.backend_for = lambda x: backend  # the public op reaches the stubbed CUDA backend
    print(f"# host µs per call, launches stubbed ({args.launch}), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'case':22s} {'dtype':8s} {'side':12s} {'path':10s} {'public op':>10s} {'grad':>7s} {'backend':>9s} "
          f"{'launches':>8s}")
    worst = None
    for name, rows, sizes, force in CASES:
        backend.force_path = force
        for dt in (torch.float32, torch.float64):
            fs = [torch.randn(p, p, dtype=dt) for p in sizes]
            fg = [f.clone().requires_grad_() for f in fs]
            k = math.prod(sizes)
            x_row = torch.randn(rows, k, dtype=dt)
            x_col = torch.randn(k, rows, dtype=dt)
            for side in ("matmul_kron", "kron_matmul"):
                if side == "matmul_kron":
                    pub = lambda: kronegp.matmul_kron(x_row, fs)  # noqa: E731
                    grad = lambda: kronegp.matmul_kron(x_row, fg)  # noqa: E731
                    raw = lambda: backend.matmul_kron(x_row, fs)  # noqa: E731
                    path = backend.path_taken(side, x_row, fs)
                else:
                    pub = lambda: kronegp.kron_matmul(fs, x_col)  # noqa: E731
                    grad = lambda: kronegp.kron_matmul(fg, x_col)  # noqa: E731
                    raw = lambda: backend.kron_matmul(fs, x_col)  # noqa: E731
                    path = backend.path_taken(side, x_col, fs)
                launch._C_LAUNCH = counting
                counter["launches"] = 0
                pub()
                n_launch = counter["launches"]
                launch._C_LAUNCH = timed
                t_pub = _per_call_us(pub, args.calls)
                t_grad = _per_call_us(grad, args.calls)
                t_raw = _per_call_us(raw, args.calls)
                print(f"{name:22s} {str(dt)[6:]:8s} {side:12s} {path:10s} {t_pub:10.2f} {t_grad:7.2f} {t_raw:9.2f} "
                      f"{n_launch:8d}", flush=True)
                if worst is None or t_pub > worst[0]:
                    worst = (t_pub, pub, f"{name} {dt} {side}")
    if args.profile and worst is not None:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            worst[1]()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(20)
        print(f"# cProfile of {worst[2]}\n{buf.getvalue()}")


if __name__ == "__main__":
    main()
