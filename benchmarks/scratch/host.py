"""Scratch: where the host time of a small call goes on the device host."""
import cProfile, io, math, pstats, time
import torch
import kronegp
from kronegp import _backend, ops

def per_call(fn, n=2000):
    for _ in range(50): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6

for dt in (torch.float32,):
    for name, sizes in [("[24,24,72]", [24, 24, 72]), ("64^3", [64] * 3)]:
        fs = [torch.randn(p, p, device="cuda", dtype=dt) for p in sizes]
        K = math.prod(sizes)
        x = torch.randn(11, K, device="cuda", dtype=dt)
        xt = torch.randn(K, 11, device="cuda", dtype=dt)
        be = _backend.for_tensor(x)
        print(name, "matmul_kron", f"{per_call(lambda: kronegp.matmul_kron(x, fs)):.1f} us", be.path_taken("matmul_kron", x, fs))
        print(name, "kron_matmul", f"{per_call(lambda: kronegp.kron_matmul(fs, xt)):.1f} us", be.path_taken("kron_matmul", xt, fs))
        print(name, "backend.matmul_kron", f"{per_call(lambda: be.matmul_kron(x, fs)):.1f} us")
        print(name, "_raw_matmul_kron", f"{per_call(lambda: ops._raw_matmul_kron(x, fs)):.1f} us")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000): kronegp.matmul_kron(x, fs)
        pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18); print(s.getvalue())
y = torch.empty(11, 41472, device="cuda")
a = torch.randn(64, 64, device="cuda"); b = torch.randn(64, 64, device="cuda")
print("torch.empty", f"{per_call(lambda: torch.empty(11, 41472, device='cuda')):.1f} us")
print("torch.empty_like", f"{per_call(lambda: torch.empty_like(y)):.1f} us")
print("y.add_(1)", f"{per_call(lambda: y.add_(1)):.1f} us")
print("mm 64", f"{per_call(lambda: a @ b):.1f} us")
print("python call overhead (lambda: None)", f"{per_call(lambda: None):.2f} us")
