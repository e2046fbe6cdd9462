"""Per-rank phases of the sharded products (kronegp.distributed), timed on ONE GPU at the per-rank sizes.

The distributed ``kron_matmul`` of a 512³ grid with T = 11 took 100.7 ms on 2 H200s against 97.6 ms
on one (RESULTS.md, issue 8). This script splits one rank's work into its phases and times each on a
single device, at the sizes rank 0 sees for G = 2, 4, 8 (an even split: every rank does the same):

* ``trail``  — the trailing factors, local to every leading index: the kronegp call
  ``distributed.ops`` makes (for ``kron_matmul`` a *batched* call on ``(L_r, R, T)``), with the path
  the CUDA backend picks now. Comparison rows: the same call on the natural-order cuBLAS path
  (``old``: what the cost model picked before it knew that a batched ``kron_matmul`` keeps ``T``
  columns per GEMM — NOTES.md, issue 23), every path pinned (``force_path``), and in the layout of
  rows (``rows form``: the block transposed so the trailing factors meet an unbatched
  ``matmul_kron``, transposes included);
* ``pack``   — the copy of the block into the all-to-all's send buffer (``_rows_to_cols``);
* ``lead``   — the leading factors on the exchanged block (every leading index, 1/G of the columns);
* ``unpack`` — the copy out of the second all-to-all's receive buffer (``_cols_to_rows``);
* the bytes each rank sends in the two all-to-alls, from the exchange specs the ops build, against
  ``communication_bytes`` (the all-to-all itself needs G devices; its time is estimated from
  ``--link-gbs``, the rate measured in issue 8, and marked as an estimate).

Each phase is reported against 1/G of the single-device op on the whole problem (timed in the same
run): the target is local work ≤ 1.15/G. Under every measured row a ``model`` row gives the CUDA
cost model's prediction of the same phases (``kronegp._cuda.plan.choose_path`` on meta tensors; the
copies at the copy rate of ``Rates``), so one GPU run confirms or refutes it; ``--predict-only``
prints the model rows alone (no tensors are allocated: any size, on any machine). Medians of
``--repeats`` runs after warm-up, CUDA events, the device name. Run::

    python benchmarks/sharded_phases.py --json sharded_phases.json

(``--size 32 --device cpu`` is a quick check on a machine without a GPU.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

import kronegp
from kronegp import device as kdevice
from kronegp.distributed import communication_bytes
from kronegp.distributed._exchange import ExchangeSpec, _copy_cols
from kronegp.distributed.ops import _make_plan
from timing import time_call

PATHS = ("fused", "axis_gemm", "axis_gemm_t")
#: the trailing step's path before the cost model priced batched kron_matmul (NOTES.md, issue 23)
OLD_TRAIL_PATH = "axis_gemm"


def timed(fn, dev: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (:func:`timing.time_call`: CUDA events on a GPU)."""
    return 1e3 * statistics.median(time_call(fn, dev, repeats, warmup))


def _path(side: str, x: torch.Tensor, factors) -> str:
    cuda, _ = kdevice.load_cuda()
    if cuda is None or kdevice.backend_for(x) is not cuda:
        return "reference"
    return cuda.path_taken(side, x, factors)


def _pinned(path: str, call, dev, args):
    """``call`` timed with the CUDA path pinned to ``path`` (ms, or the error a path that does not
    take this shape raises); None off CUDA."""
    backend, _ = kdevice.load_cuda()
    if backend is None or dev.type != "cuda":
        return None
    backend.force_path = path
    try:
        return timed(call, dev, args.repeats, args.warmup)
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:120]
    finally:
        backend.force_path = "auto"


def _pinned_result(path: str, call, dev):
    """``call()`` on the pinned ``path`` (None off CUDA)."""
    backend, _ = kdevice.load_cuda()
    if backend is None or dev.type != "cuda":
        return None
    backend.force_path = path
    try:
        return call()
    finally:
        backend.force_path = "auto"


def _copy_all(spec: ExchangeSpec, lr: int, flat: torch.Tensor, grid: torch.Tensor, to_block: bool) -> None:
    """Every rank's run of columns between the all-to-all buffer ``flat`` and the rows block
    ``grid`` ``(1, U, L_r, V)``: the packing of ``_rows_to_cols`` (``to_block``) or the unpacking
    of ``_cols_to_rows``."""
    start = 0
    for j in range(spec.world_size):
        c0, c1 = spec.col_range(j)
        _copy_cols(flat[start : start + lr * (c1 - c0)].view(1, lr, c1 - c0), grid, c0, c1, to_block)
        start += lr * (c1 - c0)


@dataclass(frozen=True)
class RankShapes:
    """What rank 0 of ``G`` computes in a sharded ``side`` (local-first order), as shapes: the one
    home of the per-rank sizes for the timed and the predicted phases."""

    side: str
    plan: object  # distributed.ops._Plan
    trail_x: tuple  # the trailing step's operand (kron_matmul: batched (L_r, R, T))
    lead_x: tuple  # the leading step's operand (L, C_0)
    pack_elems: int  # elements copied into the first all-to-all's send buffer
    unpack_elems: int  # elements copied out of the second one's receive buffer

    @classmethod
    def of(cls, side: str, n: int, t: int, g: int, itemsize: int) -> "RankShapes":
        shapes = [(n, n)] * 3
        plan = _make_plan(side, shapes, torch.Size(), t, g, itemsize, None)
        if plan.order != "local-first":
            raise ValueError(f"{side} on {g} ranks runs {plan.order}; this script times local-first")
        in_sh, out_sh, u = plan.in_sh, plan.out_sh, plan.u
        lr_in, lr_out = in_sh.lead_counts[0], out_sh.lead_counts[0]
        trail_x = (lr_in, in_sh.rest, t) if side == "kron_matmul" else (u * lr_in, in_sh.rest)
        cr = ExchangeSpec(in_sh.lead_counts, u, plan.v_first, 0).col_counts[0]
        return cls(side, plan, trail_x, (in_sh.lead, cr), u * lr_in * plan.v_first, u * lr_out * plan.v_second)

    def split(self, factors):
        a = self.plan.in_sh.split_axes
        lead = factors[:a] if self.side == "kron_matmul" else [f.mT for f in factors[:a]]
        return lead, factors[a:]


def _model():
    """The CUDA backend's cost model and its rates: it plans from shapes, so it runs on meta
    tensors on any machine."""
    from kronegp._cuda import CudaBackend
    from kronegp._cuda.plan import RATES

    return CudaBackend(force_path="auto", autotune=False), RATES


def predict(side: str, n: int, t: int, g: int, dtype, args) -> dict:
    """The cost model's milliseconds for rank 0's phases (and the whole op on one device)."""
    model, rates = _model()
    itemsize = torch.empty((), dtype=dtype).element_size()
    rs = RankShapes.of(side, n, t, g, itemsize)
    meta = [torch.empty(n, n, device="meta", dtype=dtype) for _ in range(3)]
    lead, trail = rs.split(meta)
    whole_x = torch.empty((n**3, t) if side == "kron_matmul" else (t, n**3), device="meta", dtype=dtype)
    whole = model.choice(side, whole_x, meta)
    tc = model.choice(side, torch.empty(rs.trail_x, device="meta", dtype=dtype), trail)
    lc = model.choice("kron_matmul", torch.empty(rs.lead_x, device="meta", dtype=dtype), lead)
    copy = lambda elems: 1e3 * 2 * elems * itemsize / rates.copy_bytes_per_s  # noqa: E731 (read + write)
    out = {
        "one_device_ms": 1e3 * whole.predicted_s, "one_device_path": whole.path,
        "trail_ms": 1e3 * tc.predicted_s, "trail_path": tc.path,
        "trail_old_ms": 1e3 * {"axis_gemm": tc.predicted_axis_s, "axis_gemm_t": tc.predicted_axis_t_s,
                               "fused": tc.predicted_fused_s}[OLD_TRAIL_PATH],
        "pack_ms": copy(rs.pack_elems), "lead_ms": 1e3 * lc.predicted_s, "lead_path": lc.path,
        "unpack_ms": copy(rs.unpack_elems),
    }
    sent = sum(rs.plan.count.per_rank_bytes[:1])
    out["alltoall_ms_estimate"] = 1e3 * sent / (args.link_gbs * 1e9)
    return _ratios(out, g)


def _ratios(r: dict, g: int) -> dict:
    share = r["one_device_ms"] / g
    r["local_ms"] = r["trail_ms"] + r["lead_ms"]
    r["local_and_copies_ms"] = r["local_ms"] + r["pack_ms"] + r["unpack_ms"]
    r["local_over_share"] = r["local_ms"] / share
    r["with_copies_over_share"] = r["local_and_copies_ms"] / share
    if isinstance(r.get("trail_old_ms"), float):
        r["old_local_over_share"] = (r["trail_old_ms"] + r["lead_ms"]) / share
    return r


def phases(side: str, n: int, t: int, g: int, factors, dtype, dev, args) -> dict:
    """Rank 0's phases of the sharded ``side`` on ``G = g`` ranks (all on this one device)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rs = RankShapes.of(side, n, t, g, itemsize)
    plan = rs.plan
    in_sh, out_sh, u = plan.in_sh, plan.out_sh, plan.u
    lead, trail = rs.split(factors)
    lr_in, lr_out = in_sh.lead_counts[0], out_sh.lead_counts[0]
    gen = torch.Generator(device=dev).manual_seed(g)
    row = {"side": side, "G": g, "split_axes": in_sh.split_axes, "order": plan.order,
           "rows_per_rank": in_sh.local_size(0)}

    # ---- trailing factors, local to each leading index (as distributed.ops.apply_trail calls them)
    z_in = torch.randn(rs.trail_x, generator=gen, device=dev, dtype=dtype)
    if side == "kron_matmul":
        def trail_call():
            return kronegp.kron_matmul(trail, z_in)

        # rows form: (L_r, R, T) → (T·L_r, R) rows, x·(⊗F_trailᵀ) unbatched, and back
        trail_t = [f.mT for f in trail]

        def rows_form():
            rows = z_in.permute(2, 0, 1).reshape(t * lr_in, in_sh.rest)
            y = kronegp.matmul_kron(rows, trail_t)
            return y.view(t, lr_in, -1).permute(1, 2, 0).contiguous()

        row["trail_rows_form_ms"] = timed(rows_form, dev, args.repeats, args.warmup)
        ref = trail_call()
        row["trail_rows_form_rel_err"] = float((rows_form() - ref).norm() / ref.norm())
        old = _pinned_result(OLD_TRAIL_PATH, trail_call, dev)
        if old is not None:
            row["trail_old_rel_err"] = float((old - ref).norm() / ref.norm())
        del ref, old
    else:
        def trail_call():
            return kronegp.matmul_kron(z_in, trail)

    row["trail_path"] = _path(side, z_in, trail)
    row["trail_ms"] = timed(trail_call, dev, args.repeats, args.warmup)
    row["trail_old_ms"] = _pinned(OLD_TRAIL_PATH, trail_call, dev, args)
    if args.all_paths:
        row["trail_pinned_ms"] = {p: _pinned(p, trail_call, dev, args) for p in PATHS}
    z = trail_call()
    del z_in

    # ---- pack: rows → cols send buffer (the copy _rows_to_cols makes before its all-to-all)
    spec_in = ExchangeSpec(in_sh.lead_counts, u, plan.v_first, 0)
    z4 = z.reshape(1, u, lr_in, plan.v_first)
    send = torch.empty(rs.pack_elems, device=dev, dtype=dtype)
    row["pack_ms"] = timed(lambda: _copy_all(spec_in, lr_in, send, z4, True), dev, args.repeats, args.warmup)
    del z, z4, send

    # ---- leading factors on the exchanged block: every leading index, 1/G of the columns
    w = torch.randn(rs.lead_x, generator=gen, device=dev, dtype=dtype)

    def lead_call():
        return kronegp.kron_matmul(lead, w)

    row["lead_path"] = _path("kron_matmul", w, lead)
    row["lead_ms"] = timed(lead_call, dev, args.repeats, args.warmup)
    del w

    # ---- unpack: cols → rows receive buffer into this rank's output block (_cols_to_rows)
    spec_out = ExchangeSpec(out_sh.lead_counts, u, plan.v_second, 0)
    recv = torch.randn(rs.unpack_elems, generator=gen, device=dev, dtype=dtype)
    out = torch.empty(1, u, lr_out, plan.v_second, device=dev, dtype=dtype)
    row["unpack_ms"] = timed(lambda: _copy_all(spec_out, lr_out, recv, out, False), dev, args.repeats, args.warmup)
    del recv, out

    # ---- bytes: what the exchange specs send, against communication_bytes
    first = spec_in.offrank_elements(1, True)[0] * itemsize
    second = spec_out.offrank_elements(1, False)[0] * itemsize
    x_shape = (in_sh.numel, t) if side == "kron_matmul" else (t, in_sh.numel)
    count = communication_bytes([(n, n)] * 3, x_shape, g, side=side, dtype=dtype)
    row["sent_bytes_per_rank"] = first + second
    row["communication_bytes_per_rank"] = count.per_rank_bytes[0]
    row["alltoall_ms_estimate"] = 1e3 * (first + second) / (args.link_gbs * 1e9)
    return row


def _ms(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else "—"


def print_row(kind: str, g: int, r: dict) -> None:
    rows_form = _ms(r.get("trail_rows_form_ms"))
    sent = (f"{r['sent_bytes_per_rank'] / 1e6:.0f} ({r['communication_bytes_per_rank'] / 1e6:.0f})"
            if "sent_bytes_per_rank" in r else "—")
    old = r.get("old_local_over_share")
    print(f"| {g} | {kind} | {_ms(r['trail_ms'])} ({r['trail_path']}) | {_ms(r.get('trail_old_ms'))} | {rows_form} | "
          f"{_ms(r['pack_ms'])} | {_ms(r['lead_ms'])} ({r['lead_path']}) | {_ms(r['unpack_ms'])} | "
          f"{r['local_over_share']:.2f} | {r['with_copies_over_share']:.2f} | {'—' if old is None else f'{old:.2f}'} | "
          f"{sent} | {r['alltoall_ms_estimate']:.2f} |", flush=True)


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
    ap.add_argument("--all-paths", action="store_true", help="also time the trailing step on every CUDA path")
    ap.add_argument("--predict-only", action="store_true", help="the cost model's rows only (nothing timed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" and not args.predict_only else "cpu"
    print(f"# {'cost model only' if args.predict_only else name}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"grid {args.size}^3, cols {args.cols}, backend: {kronegp.backend_info().get('cuda_reason', 'cpu')}",
          flush=True)
    rows = []
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        n, t = args.size, args.cols
        for side in args.sides:
            if args.predict_only:
                t1, path1, factors = None, None, None
                print(f"\n## {side} {dt_name}: cost model only")
            else:
                gen = torch.Generator(device=dev).manual_seed(0)
                factors = [torch.randn(n, n, generator=gen, device=dev, dtype=dtype) / math.sqrt(n) for _ in range(3)]
                shape = (n**3, t) if side == "kron_matmul" else (t, n**3)
                x = torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

                def whole():
                    return kronegp.kron_matmul(factors, x) if side == "kron_matmul" else kronegp.matmul_kron(x, factors)

                t1 = timed(whole, dev, args.repeats, args.warmup)
                path1 = _path(side, x, factors)
                del x
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"\n## {side} {dt_name}: one device {t1:.2f} ms (path {path1})", flush=True)
            print("| G | row | trail ms (path) | trail old ms (axis_gemm) | trail rows form ms | pack ms | "
                  "lead ms (path) | unpack ms | local/(t1/G) | +copies/(t1/G) | old local/(t1/G) | "
                  "sent MB/rank (count MB) | all-to-all ms est. |")
            print("|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|")
            for g in args.ranks:
                model = predict(side, n, t, g, dtype, args)
                model.update(side=side, G=g, dtype=dt_name, row="model")
                if not args.predict_only:
                    r = phases(side, n, t, g, factors, dtype, dev, args)
                    r.update(dtype=dt_name, one_device_ms=t1, one_device_path=path1, device=name, row="measured")
                    rows.append(_ratios(r, g))
                    print_row("measured", g, r)
                    if "trail_pinned_ms" in r:
                        print(f"|   | trail on each path: {json.dumps(r['trail_pinned_ms'], default=lambda v: round(v, 3))} |")
                rows.append(model)
                print_row(f"model (t1 {model['one_device_ms']:.3g} ms, {model['one_device_path']})", g, model)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
