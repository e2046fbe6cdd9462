"""Per-rank phases of the sharded products (kronegp.distributed), timed on ONE GPU at the per-rank sizes.

The distributed ``kron_matmul`` of a 512³ grid with T = 11 took 100.7 ms on 2 H200s against 97.6 ms
on one (RESULTS.md, issue 8). This script splits one rank's work into its phases and times each on a
single device, at the sizes rank 0 sees for G = 2, 4, 8 (an even split: every rank does the same):

* ``trail``  — the trailing factors, local to every leading index (one kronegp op, as
  ``distributed.ops`` calls it), with the path the CUDA backend picks; and, for comparison, the
  same call with each path pinned (``force_path``) and in the layout of rows (``rows form``:
  the block transposed so the trailing factors meet an unbatched ``matmul_kron``, transposes
  included);
* ``pack``   — the copy of the block into the all-to-all's send buffer (``_rows_to_cols``);
* ``lead``   — the leading factors on the exchanged block (every leading index, 1/G of the columns);
* ``unpack`` — the copy out of the second all-to-all's receive buffer (``_cols_to_rows``);
* the bytes each rank sends in the two all-to-alls, from the exchange specs the ops build, against
  ``communication_bytes`` (the all-to-all itself needs G devices; its time is estimated from
  ``--link-gbs``, the rate measured in issue 8, and marked as an estimate).

Each phase is reported against 1/G of the single-device op on the whole problem (timed in the same
run): the target is local work ≤ 1.15/G. Medians of ``--repeats`` runs after warm-up, CUDA events,
the device name. Run::

    python benchmarks/sharded_phases.py --json sharded_phases.json

(``--size 32 --device cpu`` is a quick check on a machine without a GPU.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from datetime import datetime, timezone

import torch

import kronegp
from kronegp import device as kdevice
from kronegp.distributed import communication_bytes
from kronegp.distributed._exchange import ExchangeSpec, _copy_cols
from kronegp.distributed.ops import _make_plan
from timing import time_call

PATHS = ("fused", "axis_gemm", "axis_gemm_t")


def timed(fn, dev: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (:func:`timing.time_call`: CUDA events on a GPU)."""
    return 1e3 * statistics.median(time_call(fn, dev, repeats, warmup))


def _path(side: str, x: torch.Tensor, factors) -> str:
    cuda, _ = kdevice.load_cuda()
    if cuda is None or kdevice.backend_for(x) is not cuda:
        return "reference"
    return cuda.path_taken(side, x, factors)


def _pinned_paths(side: str, x, factors, call, dev, args) -> dict:
    """The same call with each CUDA path pinned (empty off CUDA)."""
    backend, _ = kdevice.load_cuda()
    if backend is None or dev.type != "cuda":
        return {}
    out = {}
    try:
        for path in PATHS:
            backend.force_path = path
            try:
                out[path] = timed(call, dev, args.repeats, args.warmup)
            except Exception as err:  # a path that does not take this shape says so
                out[path] = f"{type(err).__name__}: {err}"[:120]
    finally:
        backend.force_path = "auto"
    return out


def _copy_all(spec: ExchangeSpec, lr: int, flat: torch.Tensor, grid: torch.Tensor, to_block: bool) -> None:
    """Every rank's run of columns between the all-to-all buffer ``flat`` and the rows block
    ``grid`` ``(1, U, L_r, V)``: the packing of ``_rows_to_cols`` (``to_block``) or the unpacking
    of ``_cols_to_rows``."""
    start = 0
    for j in range(spec.world_size):
        c0, c1 = spec.col_range(j)
        _copy_cols(flat[start : start + lr * (c1 - c0)].view(1, lr, c1 - c0), grid, c0, c1, to_block)
        start += lr * (c1 - c0)


def phases(side: str, n: int, t: int, g: int, factors, dtype, dev, args) -> dict:
    """Rank 0's phases of the sharded ``side`` on ``G = g`` ranks (all on this one device)."""
    shapes = [tuple(f.shape) for f in factors]
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _make_plan(side, shapes, torch.Size(), t, g, itemsize, None)
    in_sh, out_sh = plan.in_sh, plan.out_sh
    a = in_sh.split_axes
    lead, trail = factors[:a], factors[a:]
    lr_in, lr_out = in_sh.lead_counts[0], out_sh.lead_counts[0]
    gen = torch.Generator(device=dev).manual_seed(g)
    row = {"side": side, "G": g, "split_axes": a, "order": plan.order, "rows_per_rank": in_sh.local_size(0)}
    u = plan.u  # M rides along as U in matmul_kron

    # ---- trailing factors, local to each leading index (as distributed.ops.apply_trail calls them)
    if side == "kron_matmul":
        z_in = torch.randn(lr_in, in_sh.rest, t, generator=gen, device=dev, dtype=dtype)

        def trail_call():
            return kronegp.kron_matmul(trail, z_in)

        row["trail_path"] = _path("kron_matmul", z_in, trail)
        row["trail_pinned_ms"] = _pinned_paths("kron_matmul", z_in, trail, trail_call, dev, args)

        # rows form: (L_r, R, T) → (T·L_r, R) rows, x·(⊗F_trailᵀ) unbatched, and back
        trail_t = [f.mT for f in trail]

        def rows_form():
            rows = z_in.permute(2, 0, 1).reshape(t * lr_in, in_sh.rest)
            y = kronegp.matmul_kron(rows, trail_t)
            return y.view(t, lr_in, -1).permute(1, 2, 0).contiguous()

        row["trail_rows_form_ms"] = timed(rows_form, dev, args.repeats, args.warmup)
        err = (rows_form() - trail_call()).norm() / trail_call().norm()
        row["trail_rows_form_rel_err"] = float(err)
    else:
        z_in = torch.randn(u * lr_in, in_sh.rest, generator=gen, device=dev, dtype=dtype)

        def trail_call():
            return kronegp.matmul_kron(z_in, trail)

        row["trail_path"] = _path("matmul_kron", z_in, trail)
        row["trail_pinned_ms"] = _pinned_paths("matmul_kron", z_in, trail, trail_call, dev, args)
    row["trail_ms"] = timed(trail_call, dev, args.repeats, args.warmup)
    z = trail_call()
    del z_in

    # ---- pack: rows → cols send buffer (the copy _rows_to_cols makes before its all-to-all)
    v1 = plan.v_first
    spec_in = ExchangeSpec(in_sh.lead_counts, u, v1, 0)
    z4 = z.reshape(1, u, lr_in, v1)
    send = torch.empty(z4.numel(), device=dev, dtype=dtype)
    row["pack_ms"] = timed(lambda: _copy_all(spec_in, lr_in, send, z4, True), dev, args.repeats, args.warmup)
    del z, z4, send

    # ---- leading factors on the exchanged block: every leading index, 1/G of the columns
    cr = spec_in.col_counts[0]
    w = torch.randn(in_sh.lead, cr, generator=gen, device=dev, dtype=dtype)
    lead_f = lead if side == "kron_matmul" else [f.mT for f in lead]

    def lead_call():
        return kronegp.kron_matmul(lead_f, w)

    row["lead_path"] = _path("kron_matmul", w, lead_f)
    row["lead_ms"] = timed(lead_call, dev, args.repeats, args.warmup)
    del w

    # ---- unpack: cols → rows receive buffer into this rank's output block (_cols_to_rows)
    spec_out = ExchangeSpec(out_sh.lead_counts, u, plan.v_second, 0)
    recv = torch.randn(lr_out * u * plan.v_second, generator=gen, device=dev, dtype=dtype)
    out = torch.empty(1, u, lr_out, plan.v_second, device=dev, dtype=dtype)
    row["unpack_ms"] = timed(lambda: _copy_all(spec_out, lr_out, recv, out, False), dev, args.repeats, args.warmup)
    del recv, out

    # ---- bytes: what the exchange specs send, against communication_bytes
    first = spec_in.offrank_elements(1, True)[0] * itemsize
    second = spec_out.offrank_elements(1, False)[0] * itemsize
    x_shape = (in_sh.numel, t) if side == "kron_matmul" else (t, in_sh.numel)
    count = communication_bytes(shapes, x_shape, g, side=side, dtype=dtype)
    row["sent_bytes_per_rank"] = first + second
    row["communication_bytes_per_rank"] = count.per_rank_bytes[0]
    row["alltoall_ms_estimate"] = 1e3 * (first + second) / (args.link_gbs * 1e9)
    row["local_ms"] = row["trail_ms"] + row["lead_ms"]
    row["local_and_copies_ms"] = row["local_ms"] + row["pack_ms"] + row["unpack_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="points per axis of the cubic grid (512)")
    ap.add_argument("--cols", type=int, default=11, help="T (kron_matmul) / M (matmul_kron)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float64"])
    ap.add_argument("--sides", nargs="+", default=["kron_matmul", "matmul_kron"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--link-gbs", type=float, default=334.0,
                    help="all-to-all rate for the estimate, GB/s per rank (334: 2 H200s, issue 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# {name}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, grid {args.size}^3, "
          f"cols {args.cols}, backend: {kronegp.backend_info().get('cuda_reason', 'cpu')}", flush=True)
    rows = []
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        gen = torch.Generator(device=dev).manual_seed(0)
        n, t = args.size, args.cols
        factors = [torch.randn(n, n, generator=gen, device=dev, dtype=dtype) / math.sqrt(n) for _ in range(3)]
        for side in args.sides:
            shape = (n**3, t) if side == "kron_matmul" else (t, n**3)
            x = torch.randn(*shape, generator=gen, device=dev, dtype=dtype)
            op = kronegp.kron_matmul if side == "kron_matmul" else kronegp.matmul_kron

            def whole():
                return op(factors, x) if side == "kron_matmul" else op(x, factors)

            t1 = timed(whole, dev, args.repeats, args.warmup)
            path1 = _path(side, x, factors)
            del x
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            print(f"\n## {side} {dt_name}: one device {t1:.2f} ms (path {path1})", flush=True)
            print("| G | order | trail ms (path) | pack ms | lead ms (path) | unpack ms | local/(t1/G) | "
                  "+copies/(t1/G) | sent MB/rank (count MB) | all-to-all ms est. |")
            print("|---:|---|---|---:|---|---:|---:|---:|---|---:|")
            for g in args.ranks:
                r = phases(side, n, t, g, factors, dtype, dev, args)
                r.update(dtype=dt_name, one_device_ms=t1, one_device_path=path1, device=name)
                share = t1 / g
                r["local_over_share"] = r["local_ms"] / share
                r["with_copies_over_share"] = r["local_and_copies_ms"] / share
                rows.append(r)
                print(f"| {g} | {r['order']} | {r['trail_ms']:.2f} ({r['trail_path']}) | {r['pack_ms']:.2f} | "
                      f"{r['lead_ms']:.2f} ({r['lead_path']}) | {r['unpack_ms']:.2f} | {r['local_over_share']:.2f} | "
                      f"{r['with_copies_over_share']:.2f} | {r['sent_bytes_per_rank'] / 1e6:.0f} "
                      f"({r['communication_bytes_per_rank'] / 1e6:.0f}) | {r['alltoall_ms_estimate']:.2f} |", flush=True)
                extra = {k: r[k] for k in ("trail_pinned_ms", "trail_rows_form_ms", "trail_rows_form_rel_err") if k in r}
                if extra:
                    print(f"|   | trail alternatives: {json.dumps(extra, default=lambda v: round(v, 3))} |", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
