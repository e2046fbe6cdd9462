"""What a GPU pays on the host for a hole: aten ops and host synchronisations of one cg-path training
step (``loss_backward``), split into the two-level preconditioner's setup and the CG iterations.

A contiguous hole costs 15× the step of as many scattered cells on an H100 (RESULTS.md round 13)
but only 1.6–2.8× on a CPU: on the GPU the grid products take ~2 ms a step and every small torch op
~10–35 µs of host time, so a step of many small ops (and of host reads, which wait for the queue to
drain) is bound by the host. This counts, on any device, what the GPU would launch and wait for:

* ops: every aten op dispatched (a :class:`torch.utils._python_dispatch.TorchDispatchMode`; a
  Kronecker product is one custom op), per phase, inclusive of nested phases;
* syncs: the ops that read the device on CUDA (``_local_scalar_dense``: ``item``/``float``/``int``/
  ``bool`` of a tensor; ``nonzero``, ``unique``, ``bincount``, ``masked_select``, boolean indexing,
  ``repeat_interleave`` without an output size, ``_linalg_check_errors`` after a Cholesky or eigh),
  plus ``Tensor.tolist``/``numpy``/``cpu`` calls (not dispatched: counted by wrapping them).

Phases: ``setup`` (:func:`kronegp.models._two_level.two_level`, pieces included), ``apply`` (one
:meth:`TwoLevel.apply`), ``sample`` (:meth:`TwoLevel.sample`), and each ``block_cg`` run with its
iterations (so ``ops / iteration`` of the CG loop, products and preconditioner together). Then the
step's wall time without the counter (median of ``--repeats``) and a prediction of the GPU step:
``(kernel ops + box products × --box-product-ops) × --op-us + grid products × --product-ms``
(kernel ops: outside the Kronecker products, not views; the products counted at the reference
backend, a grid product being one over all cells). Ops on tensors read back to the host (the mode
choice) are the host's, not launches: counted apart.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/holeops.py --n 64 --out holeops_64.json
    PYTHONPATH=. python benchmarks/holeops.py --setup --device cuda --n 128 --patterns block-1 block-5 block-10

``--setup``: the two-level setup as a step pays it (``_g_preconditioner``) and one apply to 17 rows,
timed (min and median of ``--repeats``), on ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time
import warnings
from collections import Counter

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import gaps
import kronegp.device as device
import kronegp.models._masked as masked
import kronegp.models._two_level as two_level

#: aten ops that read the device (wait for the queue) on CUDA
SYNC_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "_unique",
            "bincount", "masked_select", "repeat_interleave", "_linalg_check_errors", "histc"}


#: ops that launch no kernel besides views
METADATA_OPS = {"_unsafe_view", "detach", "lift_fresh", "alias", "_reshape_alias"}


def _on_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_holeops_host", False)


def _tag_host(t) -> None:
    if isinstance(t, torch.Tensor):
        t._holeops_host = True


def _is_sync(name: str, args) -> bool:
    base = name.split(".")[0]
    if base in SYNC_OPS:
        return True
    if base in ("index", "index_put", "index_put_", "_index_put_impl_"):
        idx = args[1] if len(args) > 1 else []
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or []))
    return False


class Count(TorchDispatchMode):
    """Ops and syncs per phase (a stack: an op counts for every open phase), and the custom ops."""

    def __init__(self):
        super().__init__()
        self.stack = ["step"]
        self.host_ops, self.transfers = Counter(), Counter()
        self.ops, self.syncs, self.calls = Counter(), Counter(), Counter()
        self.sync_names: Counter = Counter()
        self.views = Counter()  # ops that launch no kernel (views, metadata): a few µs of host each
        self.outside = Counter()  # ops outside the grid products (which a GPU runs as its own kernels)
        self.outside_views = Counter()

        self.products, self.grid_products = Counter(), Counter()
        self.grid_cells = 0  # a product over at least this many cells per vector is a grid product

    @contextlib.contextmanager
    def phase(self, name: str, cells: int = 0):
        if name == "product":
            for p in set(self.stack):
                self.products[p] += 1
                self.grid_products[p] += cells >= self.grid_cells
        self.stack.append(name)
        self.calls[name] += 1
        try:
            yield
        finally:
            self.stack.pop()

    def host_read(self, what: str):
        for p in set(self.stack):
            self.syncs[p] += 1
        self.sync_names[(self.stack[-1], what)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if flat and all(_on_host(t) for t in flat):  # the host's own tensors (read back, or from numpy): no launch
            out = func(*args, **(kwargs or {}))
            for t in pytree.tree_leaves(out):
                _tag_host(t)
            self.host_ops[self.stack[-1]] += 1
            return out
        name = func.name().split("::")[-1]
        sync = _is_sync(name, args)
        view = func.is_view or name.split(".")[0] in METADATA_OPS
        in_product = "product" in self.stack
        for p in set(self.stack):
            self.ops[p] += 1
            self.syncs[p] += sync
            self.views[p] += view
            self.outside[p] += not in_product
            self.outside_views[p] += view and not in_product
        if sync:
            self.sync_names[(self.stack[-1], name)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def instrumented(counter: Count, cg_runs: list):
    """Wrap the phases' functions (and the host reads that bypass dispatch) for one step."""
    saved = []

    def patch(obj, attr, new):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    def phased(fn, label):
        def wrapper(*a, **k):
            with counter.phase(label):
                return fn(*a, **k)
        return wrapper

    patch(masked, "two_level", phased(masked.two_level, "setup"))
    patch(two_level.TwoLevel, "apply", phased(two_level.TwoLevel.apply, "apply"))
    patch(two_level.TwoLevel, "sample", phased(two_level.TwoLevel.sample, "sample"))
    real_cg = masked.block_cg

    def cg(*a, **k):
        label = f"cg{len(cg_runs)}"
        with counter.phase(label):
            res = real_cg(*a, **k)
        cg_runs.append((label, int(res.iterations)))
        return res

    patch(masked, "block_cg", cg)
    def product(fn, cells_of):
        def wrapper(*a, **k):
            with counter.phase("product", cells_of(*a)):
                return fn(*a, **k)
        return wrapper

    # the grid products (and the coarse space's box products): kron_matmul(self, factors, x), x (…, ΠQ, t);
    # matmul_kron(self, x, factors), x (…, ΠP)
    ref = device.ReferenceBackend
    patch(ref, "kron_matmul", product(ref.kron_matmul, lambda self, f, x, *_: x.shape[-2]))
    patch(ref, "matmul_kron", product(ref.matmul_kron, lambda self, x, f, *_: x.shape[-1]))
    # host reads that bypass dispatch; what they return is the host's (tagged: its ops are not the GPU's)
    real_cpu, real_to = torch.Tensor.cpu, torch.Tensor.to

    def cpu(self, *a, **k):
        if _on_host(self):
            return self
        counter.host_read("cpu")
        with _disable_current_modes():
            out = real_cpu(self, *a, **k).clone()  # on a CPU .cpu() is the tensor itself
        _tag_host(out)
        return out

    def to(self, *a, **k):
        moves = any(isinstance(x, (str, torch.device)) for x in a) or "device" in k
        if not (_on_host(self) and moves):
            return real_to(self, *a, **k)
        with _disable_current_modes():  # host → device: a copy (the tag stays behind)
            out = real_to(self, *a, **k).clone()
        counter.transfers[counter.stack[-1]] += 1
        return out

    patch(torch.Tensor, "cpu", cpu)
    patch(torch.Tensor, "to", to)
    for meth in ("tolist", "numpy"):
        real = getattr(torch.Tensor, meth)

        def read(self, *a, _real=real, _name=meth, **k):
            if not _on_host(self):
                counter.host_read(_name)
            return _real(self, *a, **k)

        patch(torch.Tensor, meth, read)
    real_from = torch.from_numpy

    def from_numpy(arr):
        out = real_from(arr)
        _tag_host(out)
        return out

    patch(torch, "from_numpy", from_numpy)
    try:
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


PHASES = ("step", "setup", "apply", "sample")


def _phase(counter: "Count", p: str, per: int) -> dict:
    """A phase's counts, total and per ``per`` (calls or iterations)."""
    tot = {"ops": counter.ops[p], "host_ops": counter.outside[p], "kernel_ops": counter.outside[p] - counter.outside_views[p],
           "syncs": counter.syncs[p], "products": counter.products[p], "grid_products": counter.grid_products[p]}
    return {**tot, "per": per, **({f"{k}_each": v / per for k, v in tot.items()} if per else {})}


def count_step(gp) -> dict:
    """Ops and syncs of one ``loss_backward`` of ``gp`` (after one uncounted warm-up step)."""
    gp.loss_backward()
    counter, cg_runs = Count(), []
    counter.grid_cells = gp.n_cells
    with instrumented(counter, cg_runs), counter:
        gp.loss_backward()
    out = {p: _phase(counter, p, 1 if p == "step" else counter.calls[p]) for p in PHASES}
    out["cg"] = [{"run": label, **_phase(counter, label, it)} for label, it in cg_runs]
    out["host_ops"] = dict(counter.host_ops)
    out["transfers_to_device"] = sum(counter.transfers.values())
    out["sync_sites"] = {f"{ph}:{name}": c for (ph, name), c in counter.sync_names.most_common()}
    return out


def predict(ph: dict, op_us: float, product_ms: float, box_product_ops: float) -> float:
    """Seconds on the GPU: kernel ops outside products × ``op_us`` (host bound), grid products ×
    ``product_ms`` (device bound), box products as ``box_product_ops`` ops each."""
    box = ph["products"] - ph["grid_products"]
    return (ph["kernel_ops"] + box * box_product_ops) * op_us * 1e-6 + ph["grid_products"] * product_ms * 1e-3


def time_setup(gp, repeats: int, columns: int = 17) -> dict:
    """Seconds of the two-level setup as a step pays it (``_g_preconditioner``: pieces, box eigs, modes,
    Galerkin matrices) and of one apply to ``columns`` rows, min and median of ``repeats`` (after one)."""
    with torch.no_grad():
        cov = gp.inference.covariance(gp, gp._factors())
        dt = gp.y.dtype
        sync = torch.cuda.synchronize if gp.y.is_cuda else (lambda: None)
        masked._g_preconditioner(cov, gp.observed, dt)
        setup = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            g_diag, coarse = masked._g_preconditioner(cov, gp.observed, dt)
            sync()
            setup.append(time.perf_counter() - t0)
        rows = torch.randn(columns, gp.n_cells, dtype=dt, device=gp.y.device) * (1 - gp.observed.to(dt))
        apply = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            coarse.apply(rows)
            sync()
            apply.append(time.perf_counter() - t0)
    return {"setup_min_s": min(setup), "setup_median_s": statistics.median(setup), "apply_min_s": min(apply),
            "apply_median_s": statistics.median(apply), "modes": coarse.modes}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--patterns", nargs="*", default=["block-1"], help="gap patterns of benchmarks/gaps.py")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--op-us", type=float, default=15.0, help="host µs per kernel op on the GPU machine")
    ap.add_argument("--product-ms", type=float, default=0.0, help="device ms per grid product (prediction)")
    ap.add_argument("--box-product-ops", type=float, default=3.0, help="kernel ops per small (box) product")
    ap.add_argument("--device", default="cpu", help="--setup: the device (the counts run on the CPU)")
    ap.add_argument("--setup", action="store_true",
                    help="time the two-level setup and one apply per hole pattern instead (no counts, no step)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.setup:
        y, axes = gaps.draw(args.n, getattr(torch, args.dtype), torch.device(args.device))
        rows = []
        for pat in args.patterns:
            hole, _ = gaps.pattern(pat, args.n)
            gp = gaps.build(y, axes, hole, None, path="cg")
            row = {"pattern": pat, "m": int(hole.sum()), **time_setup(gp, args.repeats)}
            rows.append(row)
            print(f"{args.n}^3 {pat}: m={row['m']} modes={row['modes']} setup min {row['setup_min_s']:.3f} s "
                  f"(median {row['setup_median_s']:.3f}), apply (17 rows) min {row['apply_min_s'] * 1e3:.1f} ms", flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "device": str(y.device), "threads": torch.get_num_threads(), "n": args.n, "dtype": args.dtype, "rows": rows}, fh, indent=1)
        return {"rows": rows}
    dtype = getattr(torch, args.dtype)
    y, axes = gaps.draw(args.n, dtype, torch.device("cpu"))
    rows = []
    print(f"{args.n}^3 {args.dtype}, cpu, {torch.get_num_threads()} thread(s); ops = aten ops dispatched (kernel = "
          "outside grid/box products, not views), syncs = host reads on CUDA; per call / per CG iteration")
    for pat in args.patterns:
        hole, _ = gaps.pattern(pat, args.n)
        m = int(hole.sum())
        g = torch.Generator().manual_seed(m)
        scatter = torch.zeros(args.n**3, dtype=torch.bool)
        scatter[torch.randperm(args.n**3, generator=g)[:m]] = True
        for kind, missing in (("hole", hole), ("scatter", scatter.reshape(hole.shape))):
            gp = gaps.build(y, axes, missing, None, path="cg")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counts = count_step(gp)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    gp.loss_backward()
                    times.append(time.perf_counter() - t0)
            row = {"pattern": pat, "kind": kind, "m": m, "step_s": statistics.median(times),
                   "coarse_modes": gp.last_solve.coarse_modes, **counts}
            row["predicted_gpu_s"] = predict(counts["step"], args.op_us, args.product_ms, args.box_product_ops)
            rows.append(row)
            st, se, ap_, sa = counts["step"], counts["setup"], counts["apply"], counts["sample"]
            print(f"{pat} {kind} m={m} modes={row['coarse_modes']}: step {row['step_s']:.3f} s, "
                  f"{st['kernel_ops']} kernel ops ({st['ops']} all), {st['syncs']} syncs, {st['grid_products']} grid "
                  f"+ {st['products'] - st['grid_products']} box products; predicted GPU step "
                  f"{row['predicted_gpu_s']:.3f} s")
            if se["per"]:
                print(f"  setup: {se['kernel_ops']} kernel ops, {se['syncs']} syncs, {se['products']} products")
            if ap_["per"]:
                print(f"  apply ×{ap_['per']}: {ap_['kernel_ops_each']:.0f} kernel ops, {ap_['syncs_each']:.1f} syncs, "
                      f"{ap_['products_each']:.0f} box products each")
            if sa["per"]:
                print(f"  sample ×{sa['per']}: {sa['kernel_ops_each']:.0f} kernel ops, {sa['syncs_each']:.1f} syncs each")
            for c in counts["cg"]:
                print(f"  {c['run']}: {c['per']} iterations, per iteration {c.get('kernel_ops_each', 0):.0f} kernel ops, "
                      f"{c.get('syncs_each', 0):.1f} syncs, {c.get('grid_products_each', 0):.1f} grid products "
                      f"(run total {c['kernel_ops']} ops, {c['syncs']} syncs)")
            print(f"  host-side ops (on tensors read back; not launched): {sum(counts['host_ops'].values())}, "
                  f"host-to-device copies: {counts['transfers_to_device']}")
            print("  sync sites: " + ", ".join(f"{k}×{v}" for k, v in list(counts["sync_sites"].items())[:10]), flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": "cpu", "threads": torch.get_num_threads(), "n": args.n, "dtype": args.dtype,
              "op_us": args.op_us, "product_ms": args.product_ms, "box_product_ops": args.box_product_ops, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
