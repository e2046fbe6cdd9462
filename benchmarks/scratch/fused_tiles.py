"""Scratch: fused plans with larger tiles / more threads / 16-byte runs vs the current plan."""
import json, math, os, statistics, sys, time
import torch
import kronegp
from kronegp import _backend, reference
from kronegp._cuda import launch, plan
import kronegp._cuda as kc

be = _backend.for_tensor(torch.empty(1, device="cuda"))
be.force_path = "fused"
dev = be._device(torch.empty(1, device="cuda"))
print("optin", dev.smem_optin, flush=True)
orig_plan = launch._plan.__wrapped__ if hasattr(launch._plan, "__wrapped__") else launch._plan

def configure(budget, target, run_bytes, threads):
    plan.RUN_BYTES = run_bytes
    plan.FUSED_THREADS.update(threads)
    def myplan(shapes, m, itemsize, in_col, out_col, b):
        tgt = target(itemsize, in_col or out_col)
        return tuple(plan.plan_tiles(shapes, m, itemsize, in_col, out_col, budget, tgt))
    launch._plan = myplan
    dev.programs.clear(); be._fast.clear()

def tm(fn, inputs, reps):
    for x, fs in inputs: fn(x, fs)
    torch.cuda.synchronize()
    ts = []
    for r in range(reps):
        x, fs = inputs[r % 2]
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); fn(x, fs); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)

CASES = [("(1024,8^6)", 1024, [8]*6), ("(1024,16^4)", 1024, [16]*4), ("(1024,32^3)", 1024, [32]*3),
         ("(320,16^5)", 320, [16]*5), ("(16,8^8)", 16, [8]*8), ("(16,16^6)", 16, [16]*6),
         ("GP[24,24,72]", 11, [24,24,72])]
base_t = lambda it, col: 4096 if it == 4 or col else 2048
CONFIGS = {
    "base": (100*1024, base_t, 32, {4: 256, 8: 128}),
    "big16_512": (220*1024, lambda it, col: 16384, 16, {4: 512, 8: 512}),
    "big16_1024": (220*1024, lambda it, col: 16384, 16, {4: 1024, 8: 1024}),
    "big16_256": (220*1024, lambda it, col: 16384, 16, {4: 256, 8: 256}),
    "run16_base": (100*1024, base_t, 16, {4: 256, 8: 128}),
}
res = []
for dt in (torch.float32, torch.float64):
    for name, m, sizes in CASES:
        k = math.prod(sizes)
        for side in ("matmul_kron", "kron_matmul"):
            g = torch.Generator(device="cuda").manual_seed(0)
            inputs = []
            for _ in range(2):
                fs = [torch.randn(p, p, device="cuda", dtype=dt, generator=g) / math.sqrt(p) for p in sizes]
                x = torch.randn(*((k, m) if side == "kron_matmul" else (m, k)), device="cuda", dtype=dt, generator=g)
                inputs.append((x, fs))
            fn = (lambda x, fs: kronegp.kron_matmul(fs, x)) if side == "kron_matmul" else (lambda x, fs: kronegp.matmul_kron(x, fs))
            x0, f0 = inputs[0]
            ref = (reference.kron_matmul([f.double() for f in f0], x0.double()) if side == "kron_matmul"
                   else reference.matmul_kron(x0.double(), [f.double() for f in f0]))
            row = {"case": name, "dtype": str(dt), "side": side}
            for cname, cfg in CONFIGS.items():
                configure(*cfg)
                shapes = tuple((p, p) for p in sizes)
                in_col = side == "kron_matmul" and m > 1
                steps = launch._plan(shapes, m, dt.itemsize, in_col, in_col, 0)
                desc = "+".join(f"{st.count}[TS{st.spec.TS}TM{st.spec.TM}NT{st.spec.NT} {st.spec.smem_bytes//1024}K]" for st in steps)
                try:
                    t0 = time.time()
                    out = fn(x0, f0)
                    torch.cuda.synchronize()
                    ct = time.time() - t0
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    del out
                    ms = tm(fn, inputs, 10)
                except Exception as e:
                    ms, err, ct = float("nan"), float("nan"), 0
                    print("ERR", cname, name, e, flush=True)
                row[cname] = {"ms": ms, "err": err, "plan": desc}
                print(f"{name:14s} {str(dt)[6:]:8s} {side:11s} {cname:11s} {ms:8.4f} ms err {err:.1e} compile {ct:.1f}s {desc}", flush=True)
            res.append(row)
            del inputs, ref
            torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fused_tiles.json"), "w"), indent=1)
