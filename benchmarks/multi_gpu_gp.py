"""One GridGP training step on 1 device vs a grid sharded over G devices.

Launch one process per GPU (NCCL), or per CPU worker (gloo, ``--small``)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/multi_gpu_gp.py --json gp.json
    torchrun --nproc-per-node 2 benchmarks/multi_gpu_gp.py --small --json gp_small.json   # CPU

A training step is the loss (negative log marginal likelihood per observed cell) forward
and ``backward()`` with respect to every hyperparameter — what an optimiser step costs;
the optimiser's update itself is left out so that every repeat sees the same
hyperparameters (and the same CG iteration counts). For every grid and regime it reports:

* ``sec_per_step_G``: :class:`kronegp.distributed.DistributedGridGP` on G ranks (the
  slowest rank; median of ``--repeats`` after ``--warmup``), each rank building only its
  own block of the data;
* ``sec_per_step_1``: the single-device :class:`kronegp.GridGP` on rank 0's device on the
  whole grid (``None`` when it does not fit there, or with ``--skip-single``);
* ``peak_mem_G_bytes`` (the largest rank's) and ``peak_mem_1_bytes``: peak CUDA memory
  allocated during the step (``None`` on CPU);
* ``loss_G``, ``loss_1``, ``cg_iterations_*``: the two runs solve the same problem; with
  the replicated probe draw (``N·S ≤ 2^24``) they use the same probes and the losses
  agree to float tolerance, with the chunked draw (larger grids) they are two estimates.

Regimes (DESIGN.md's end-to-end cases): ``exact`` (full grid, learned noise: the exact
Kronecker path), ``missing 20%`` (learned noise, a fifth of the cells missing at random:
CG on the missing-cell system), ``per-cell noise`` (full grid, fixed noise per cell:
preconditioned CG). The data are a smooth field plus noise, drawn from a hash of the cell
index, so every rank can make its own block without the whole grid.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

import kronegp
from kronegp.distributed import DistributedGridGP
from kronegp.models.sharded import REPLICATED_PROBE_LIMIT

REGIMES = ("exact", "missing 20%", "per-cell noise")


def _hash_uniform(idx: torch.Tensor, salt: float) -> torch.Tensor:
    """A uniform number in [0, 1) per cell index, the same on every rank and device."""
    x = torch.sin((idx.to(torch.float64) + salt) * 12.9898) * 43758.5453
    return x - torch.floor(x)


def make_block(shape, rows: slice, regime: str, dtype, device):
    """Cells ``rows`` of the flattened grid: ``(values with NaN at missing cells, noise or None)``."""
    idx = torch.arange(rows.start, rows.stop, device=device)
    multi = torch.unravel_index(idx, tuple(shape))
    field = sum(torch.sin(6.0 * m.to(torch.float64) / n + k) for k, (m, n) in enumerate(zip(multi, shape)))
    values = 10.0 + field + 0.3 * (_hash_uniform(idx, 0.5) - 0.5)
    noise = None
    if regime == "missing 20%":
        values = torch.where(_hash_uniform(idx, 1.5) < 0.2, torch.full_like(values, float("nan")), values)
    elif regime == "per-cell noise":
        noise = (0.01 + 0.05 * _hash_uniform(idx, 2.5)).to(dtype)
    return values.to(dtype), noise


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model) -> float:
    model.zero_grad(set_to_none=True)
    loss = model.loss() if hasattr(model, "loss") else -model.log_marginal_likelihood() / model.n_observed
    loss.backward()
    return loss.item()


def _time_steps(model, device, repeats: int, warmup: int, group) -> tuple[float, float, int]:
    """Median seconds per step (max over the group's ranks), the loss, peak memory."""
    for _ in range(warmup):
        _step(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], math.nan
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group)
        _sync(device)
        t0 = time.perf_counter()
        loss = _step(model)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), loss, peak


def _max_over_ranks(values: list[float], device) -> list[float]:
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return buf.tolist()


def run_case(shape, regime, dtype, args, rank, world, device) -> dict:
    axes = [torch.linspace(0.0, 1.0, n, dtype=torch.float64) for n in shape]
    n_cells = math.prod(shape)
    settings = dict(num_probes=args.num_probes, exact_trace_limit=0, cg_tol=args.cg_tol, seed=0)

    rows = DistributedGridGP.rows_of(shape, rank, world)
    values, noise = make_block(shape, rows, regime, dtype, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = DistributedGridGP(values, axes, noise=noise, device=device, **settings)
    t_g, loss_g, peak_g = _time_steps(model, device, args.repeats, args.warmup, dist.group.WORLD)
    iters_g = model.cg_iterations
    probes = "replicated" if n_cells * args.num_probes <= REPLICATED_PROBE_LIMIT else "chunked"
    del model, values, noise
    t_g, peak_g = _max_over_ranks([t_g, float(peak_g)], device)

    t_1 = loss_1 = peak_1 = iters_1 = None
    if rank == 0 and not args.skip_single:
        try:
            full_values, full_noise = make_block(shape, slice(0, n_cells), regime, dtype, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            gp = kronegp.GridGP(full_values.reshape(shape), axes, noise=None if full_noise is None else full_noise.reshape(shape),
                                device=device, path="cg" if regime != "exact" else "auto", **settings)  # the sharded model's path
            t_1, loss_1, peak_1 = _time_steps(gp, device, args.repeats, args.warmup, None)
            iters_1 = gp.cg_iterations
            del gp, full_values, full_noise
        except torch.cuda.OutOfMemoryError:
            t_1 = loss_1 = peak_1 = iters_1 = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    return {
        "grid": list(shape),
        "regime": regime,
        "dtype": str(dtype).replace("torch.", ""),
        "probes": probes,
        "sec_per_step_G": t_g,
        "sec_per_step_1": t_1,
        "speedup": (t_1 / t_g) if t_1 else None,
        "peak_mem_G_bytes": int(peak_g) if device.type == "cuda" else None,
        "peak_mem_1_bytes": int(peak_1) if (device.type == "cuda" and peak_1 is not None) else None,
        "loss_G": loss_g,
        "loss_1": loss_1,
        "cg_iterations_G": iters_g,
        "cg_iterations_1": iters_1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small CPU-sized grid (gloo)")
    parser.add_argument("--grids", default=None,
                        help="semicolon-separated grids, e.g. '256,256,256;512,512,512' (default: that on GPUs, "
                             "'16,12,10' with --small)")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--num-probes", type=int, default=16)
    parser.add_argument("--cg-tol", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 5; 2 with --small)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-single", action="store_true", help="do not run the single-device GridGP")
    parser.add_argument("--json", default="multi_gpu_gp.json", help="where rank 0 writes the results")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.small else 5

    use_cuda = torch.cuda.is_available() and not args.small
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    grids_arg = args.grids or ("16,12,10" if args.small else "256,256,256;512,512,512")
    grids = [tuple(int(n) for n in g.split(",")) for g in grids_arg.split(";") if g]
    regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
    for r in regimes:
        if r not in REGIMES:
            raise SystemExit(f"--regimes: unknown regime {r!r}; choose from {REGIMES}")
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]

    rows = []
    for shape in grids:
        for regime in regimes:
            for dtype in dtypes:
                row = run_case(shape, regime, dtype, args, rank, world, device)
                rows.append(row)
                if rank == 0:
                    print(_format(row), flush=True)
    if rank == 0:
        report = {
            "world_size": world,
            "backend": backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "repeats": args.repeats,
            "num_probes": args.num_probes,
            "cg_tol": args.cg_tol,
            "rows": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()


def _format(row: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    mem = lambda b: None if b is None else b / 2**30  # noqa: E731
    return (
        f"{'x'.join(map(str, row['grid'])):>12} {row['regime']:>15} {row['dtype']:>8}  "
        f"G: {f(row['sec_per_step_G'], '.4f')} s/step {f(mem(row['peak_mem_G_bytes']), '.2f')} GiB  "
        f"1: {f(row['sec_per_step_1'], '.4f')} s/step {f(mem(row['peak_mem_1_bytes']), '.2f')} GiB  "
        f"speedup {f(row['speedup'], '.2f')}  loss G {row['loss_G']:.6g} / 1 {f(row['loss_1'], '.6g')}  "
        f"cg {row['cg_iterations_G']}/{row['cg_iterations_1']} ({row['probes']} probes)"
    )


if __name__ == "__main__":
    main()
