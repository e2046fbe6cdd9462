"""Distributed Kronecker products: time on 1 vs G devices, bytes moved, all-to-all bandwidth.

Launch one process per GPU (NCCL), or per CPU worker (gloo, ``--small``)::

    torchrun --nproc-per-node 8 benchmarks/multi_gpu.py --json multi_gpu.json
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --small --json small.json   # CPU

For every case (DESIGN.md's large cases, and GP-shaped grids 512³ and 768³ with T = 11,
each side, float32 and float64) it reports:

* ``t1_ms``: the single-device op (``kronegp.kron_matmul``/``matmul_kron``) on the whole
  problem on rank 0's device, when it fits there (else ``None``);
* ``tG_ms``: the distributed op on G devices (the slowest rank's median);
* ``bytes_formula`` (:func:`kronegp.distributed.communication_bytes`), ``bytes_measured``
  (:func:`kronegp.distributed.count_bytes`, summed over ranks), ``bytes_naive`` (the
  all-gather of x a rank would need to compute the product alone);
* ``a2a_ms`` and ``a2a_GBps``: one bare ``all_to_all_single`` of the first exchange's
  sizes, and the bytes each rank sends off-rank per second in it;
* ``max_rel_err``: rank blocks against the single-device result (where that ran).

Timings are medians of ``--repeats`` runs after warm-up (CUDA events on GPUs,
``perf_counter`` on CPUs), each run fenced by a barrier. Rank 0 prints a table and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import kronegp
import kronegp.distributed as kd
from kronegp.distributed._exchange import ExchangeSpec
from kronegp.distributed.ops import _make_plan

# (name, M or T, [(P, Q), ...]); DESIGN.md's large cases use M rows (T for kron_matmul).
LARGE = [
    ("1024x8^6", 1024, [(8, 8)] * 6),
    ("1024x16^4", 1024, [(16, 16)] * 4),
    ("1024x32^3", 1024, [(32, 32)] * 3),
    ("1024x64^3", 1024, [(64, 64)] * 3),
    ("1024x128^2", 1024, [(128, 128)] * 2),
    ("320x16^5", 320, [(16, 16)] * 5),
    ("16x8^8", 16, [(8, 8)] * 8),
    ("16x16^6", 16, [(16, 16)] * 6),
    ("16x64^4", 16, [(64, 64)] * 4),
    ("GP 512^3 T=11", 11, [(512, 512)] * 3),
    ("GP 768^3 T=11", 11, [(768, 768)] * 3),
]
# Small CPU cases: square, P ≠ Q (both schedules), uneven splits, odd sizes.
SMALL = [
    ("4x(6,4,5)", 4, [(6, 6), (4, 4), (5, 5)]),
    ("3x(12,3,7)", 3, [(12, 12), (3, 3), (7, 7)]),
    ("2x grow", 2, [(6, 4), (3, 5), (7, 2)]),
    ("3x shrink", 3, [(6, 4), (2, 7), (3, 5)]),
    ("2x(5,3) uneven", 2, [(5, 5), (3, 3)]),
    ("11x(9,8,10)", 11, [(9, 9), (8, 8), (10, 10)]),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int, warmup: int, group_barrier: bool) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if group_barrier:
            dist.barrier()
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _factors(shapes, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(p, q, generator=gen, device=device, dtype=dtype) / math.sqrt(q) for p, q in shapes]


def _block(side, cols, sh, rank, dtype, device, seed):
    """Rank ``rank``'s block of x, drawn from its own seed (so any rank can rebuild it)."""
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    n = sh.local_size(rank)
    shape = (n, cols) if side == "kron_matmul" else (cols, n)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def _fits_one_device(nbytes_x: int, nbytes_y: int, device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # x, y and one intermediate of the larger size, with room for workspace
    return nbytes_x + nbytes_y + max(nbytes_x, nbytes_y) < 0.85 * free


def run_case(name, cols, shapes, side, dtype, args, rank, world, device):
    seed = sum(map(ord, f"{name}{side}{dtype}"))  # the same on every rank (hash() is not)
    p = [s[0] for s in shapes]
    q = [s[1] for s in shapes]
    grid_in, grid_out = (q, p) if side == "kron_matmul" else (p, q)
    k_in, k_out = math.prod(grid_in), math.prod(grid_out)
    x_shape = (k_in, cols) if side == "kron_matmul" else (cols, k_in)
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _make_plan(side, shapes, torch.Size(), cols, world, itemsize, None)
    in_sh, out_sh = plan.in_sh, plan.out_sh
    count = plan.count

    factors = _factors(shapes, dtype, device, seed)
    x_local = _block(side, cols, in_sh, rank, dtype, device, seed)
    dop = kd.kron_matmul if side == "kron_matmul" else kd.matmul_kron
    op = kronegp.kron_matmul if side == "kron_matmul" else kronegp.matmul_kron

    def dist_call():
        return dop(factors, x_local) if side == "kron_matmul" else dop(x_local, factors)

    with kd.count_bytes() as counter:
        y_local = dist_call()
    measured = torch.tensor([counter.forward_bytes], dtype=torch.float64, device=device)
    dist.all_reduce(measured)
    t_g = _time(dist_call, device, args.repeats, args.warmup, True)
    t_g_max = torch.tensor([t_g], dtype=torch.float64, device=device)
    dist.all_reduce(t_g_max, op=dist.ReduceOp.MAX)

    # bare all-to-all with the first exchange's sizes
    spec = ExchangeSpec(in_sh.lead_counts, plan.u, plan.v_first, rank, None)
    batch = 1
    cc = spec.col_counts
    send_counts = [batch * spec.lead_counts[rank] * cc[j] for j in range(world)]
    recv_counts = [batch * spec.lead_counts[s] * cc[rank] for s in range(world)]
    send = torch.randn(sum(send_counts), device=device, dtype=dtype)
    recv = torch.empty(sum(recv_counts), device=device, dtype=dtype)
    t_a2a = _time(lambda: dist.all_to_all_single(recv, send, recv_counts, send_counts),
                  device, args.repeats, args.warmup, True)
    t_a2a_max = torch.tensor([t_a2a], dtype=torch.float64, device=device)
    dist.all_reduce(t_a2a_max, op=dist.ReduceOp.MAX)
    off_rank = (sum(send_counts) - send_counts[rank]) * itemsize
    off_max = torch.tensor([off_rank], dtype=torch.float64, device=device)
    dist.all_reduce(off_max, op=dist.ReduceOp.MAX)

    # single device, whole problem, on rank 0 (the others wait)
    t_1, err = None, None
    fits = torch.tensor([1.0], device=device)
    if rank == 0 and not _fits_one_device(k_in * cols * itemsize, k_out * cols * itemsize, device):
        fits.zero_()
    dist.broadcast(fits, 0)
    if fits.item() > 0:
        if rank == 0:
            blocks = [_block(side, cols, in_sh, r, dtype, device, seed) for r in range(world)]
            x_full = torch.cat(blocks, dim=0 if side == "kron_matmul" else 1)
            del blocks

            def one_call():
                return op(factors, x_full) if side == "kron_matmul" else op(x_full, factors)

            y_full = one_call()
            rows = out_sh.rows(0)
            want = y_full[rows, :] if side == "kron_matmul" else y_full[:, rows]
            err0 = ((y_local - want).norm() / want.norm()).item()
            del y_full, want  # the timed calls need the room (a 768^3 grid, T = 11: 20 GB a block)
            t_1 = _time(one_call, device, args.repeats, args.warmup, False)
            del x_full
            err_t = torch.tensor([err0], dtype=torch.float64, device=device)
        else:
            err_t = torch.zeros(1, dtype=torch.float64, device=device)
        # rank 0 checked its block against the whole; every rank also checks its own block
        # against the single-device op on the block's slice of the whole (small runs only)
        if args.small:
            x_full = torch.cat([_block(side, cols, in_sh, r, dtype, device, seed) for r in range(world)],
                               dim=0 if side == "kron_matmul" else 1)
            y_full = op(factors, x_full) if side == "kron_matmul" else op(x_full, factors)
            rows = out_sh.rows(rank)
            want = y_full[rows, :] if side == "kron_matmul" else y_full[:, rows]
            err_t = torch.maximum(err_t, ((y_local - want).norm() / want.norm()).reshape(1).double())
        dist.all_reduce(err_t, op=dist.ReduceOp.MAX)
        err = err_t.item()
        t1 = torch.tensor([t_1 if t_1 is not None else -1.0], dtype=torch.float64, device=device)
        dist.broadcast(t1, 0)
        t_1 = t1.item()
    del y_local
    if device.type == "cuda":
        torch.cuda.empty_cache()

    return {
        "case": name,
        "side": side,
        "dtype": str(dtype).removeprefix("torch."),
        "factors": [list(s) for s in shapes],
        "x_shape": list(x_shape),
        "world_size": world,
        "order": count.order,
        "split_axes": count.split_axes,
        "bytes_formula": count.total_bytes,
        "bytes_measured": int(measured.item()),
        "bytes_naive": count.naive_bytes,
        "saving": count.saving,
        "t1_ms": t_1,
        "tG_ms": t_g_max.item(),
        "speedup": (t_1 / t_g_max.item()) if t_1 else None,
        "a2a_ms": t_a2a_max.item(),
        "a2a_GBps": off_max.item() / (t_a2a_max.item() * 1e-3) / 1e9 if t_a2a_max.item() > 0 else None,
        "max_rel_err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="small CPU-sized cases (gloo)")
    parser.add_argument("--json", default="multi_gpu.json", help="where rank 0 writes the results")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--sides", default="kron_matmul,matmul_kron")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 10; 3 with --small)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.small else 10

    use_cuda = torch.cuda.is_available() and not args.small
    if use_cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    cases = SMALL if args.small else LARGE
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        cases = [c for c in cases if any(w in c[0] for w in wanted)]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    sides = [s.strip() for s in args.sides.split(",")]

    rows = []
    for name, cols, shapes in cases:
        for side in sides:
            for dtype in dtypes:
                rows.append(run_case(name, cols, shapes, side, dtype, args, rank, world, device))
                if rank == 0:
                    _print_row(rows[-1], header=len(rows) == 1)

    if rank == 0:
        report = {
            "world_size": world,
            "backend": str(dist.get_backend()),
            "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
            "kernel": kronegp.backend_info(),
            "torch": torch.__version__,
            "repeats": args.repeats,
            "rows": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    # With torch 2.13's CPU build, a gloo worker sometimes aborts in a static destructor at
    # interpreter exit ("terminate called without an active exception"), after all work
    # and the group's teardown are done; leave without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and v < 0) else format(v, spec)


def _print_row(r, header):
    if header:
        print(f"{'case':<16} {'side':<11} {'dtype':<7} {'G':>2} {'order':<14} {'MB moved':>9} "
              f"{'MB naive':>9} {'save':>5} {'t1 ms':>9} {'tG ms':>9} {'speedup':>7} "
              f"{'a2a GB/s':>8} {'rel err':>8}")
    print(f"{r['case']:<16} {r['side']:<11} {r['dtype']:<7} {r['world_size']:>2} {r['order']:<14} "
          f"{r['bytes_measured'] / 1e6:>9.3f} {r['bytes_naive'] / 1e6:>9.3f} {r['saving']:>5.2f} "
          f"{_fmt(r['t1_ms'], '9.3f')} {r['tG_ms']:>9.3f} {_fmt(r['speedup'], '7.2f')} "
          f"{_fmt(r['a2a_GBps'], '8.2f')} {_fmt(r['max_rel_err'], '8.1e')}", flush=True)


if __name__ == "__main__":
    main()
