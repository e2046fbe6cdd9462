"""kronegp.distributed against the single-process ops.

Process groups are spawned with ``torch.multiprocessing`` on 127.0.0.1 (a free port,
bounded timeouts): gloo with 2 and 4 processes on the CPU (CI), NCCL on every GPU
(marker ``multigpu``), and NCCL with a group of size 1 (marker ``cuda``). One spawn per
group runs every case; each rank reports its failures, and the test asserts there are
none. The reference for every case is :func:`kronegp.kron_matmul` / ``matmul_kron`` on
the whole tensors, which every rank builds from the same seed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import kronegp
import kronegp.distributed as kd
from kronegp.distributed._exchange import _pieces
from kronegp.reference import kron_dense
from process_group import free_port, run_rank, run_workers
from _helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


# --------------------------------------------------------------------------- no group needed


def test_even_split_is_the_flat_block_split():
    for sizes, g in [((4, 3, 5), 2), ((3, 12, 61), 4), ((3, 4), 2), ((6, 6), 4), ((8,), 8)]:
        in_sh, out_sh = kd.plan_shardings(sizes, None, g)
        k = math.prod(sizes)
        assert k % g == 0 and in_sh == out_sh and in_sh.even
        for r in range(g):
            assert in_sh.rows(r) == slice(r * k // g, (r + 1) * k // g)


def test_uneven_split_cuts_the_leading_axes_like_tensor_split():
    in_sh, out_sh = kd.plan_shardings((7, 2), (5, 3), 2)  # 14 even, 15 odd: no common even a
    assert in_sh.split_axes == 1 and not out_sh.even
    assert [in_sh.rows(r) for r in range(2)] == [slice(0, 8), slice(8, 14)]
    assert [out_sh.rows(r) for r in range(2)] == [slice(0, 9), slice(9, 15)]
    sh, _ = kd.plan_shardings((3, 5, 7), None, 4)  # 3 < 4 ranks: split over (3·5)
    assert sh.split_axes == 2 and sh.lead_counts == (4, 4, 4, 3)
    covered = [i for r in range(4) for i in range(105)[sh.rows(r)]]
    assert covered == list(range(105))


def test_split_rejects_grids_smaller_than_the_group():
    with pytest.raises(ValueError, match="fewer cells than the 8 ranks"):
        kd.plan_shardings((2, 3), None, 8)
    with pytest.raises(ValueError, match="split_axes"):
        kd.plan_shardings((4, 3), None, 2, split_axes=3)
    with pytest.raises(ValueError, match="fewer than the 5 ranks"):
        kd.plan_shardings((4, 3), None, 5, split_axes=1)


def test_column_pieces_tile_the_range_exactly():
    for v in (1, 3, 7):
        for c0 in range(0, 3 * v + 1):
            for c1 in range(c0, 3 * v + 1):
                cells = []
                for u0, u1, v0, v1, off in _pieces(c0, c1, v):
                    assert off == len(cells)
                    cells += [u * v + w for u in range(u0, u1) for w in range(v0, v1)]
                assert cells == list(range(c0, c1))
                assert len(_pieces(c0, c1, v)) <= 3


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("side", ["kron_matmul", "matmul_kron"])
def test_square_factors_move_2_over_g_of_the_naive_bytes(g, side):
    # Square factors, even split: |Z| = |y| = |x|, so (1 − 1/G)·2|x| against (G − 1)|x|.
    shapes = [(16, 16), (12, 12), (3, 3)]
    k = 16 * 12 * 3
    x_shape = (k, 5) if side == "kron_matmul" else (5, k)
    c = kd.communication_bytes(shapes, x_shape, g, side=side, dtype=torch.float64)
    x_bytes = k * 5 * 8
    assert c.total_bytes == 2 * x_bytes * (g - 1) // g
    assert c.naive_bytes == (g - 1) * x_bytes
    assert c.saving == pytest.approx(g / 2)
    assert sum(c.per_rank_bytes) == c.total_bytes


def test_schedule_exchanges_the_smaller_intermediate():
    # Trailing factors grow the data 10 -> 21 cells: exchanging x and F_lead·x is cheaper.
    grow = kd.communication_bytes([(6, 4), (3, 5), (7, 2)], (40, 3), 2)
    z_local_first, z_exchange_first = 4 * 21 * 3, 4 * 10 * 3
    y = 6 * 21 * 3
    assert grow.order == "exchange-first"
    assert grow.total_bytes == 4 * (z_exchange_first + 6 * 10 * 3) // 2
    shrink = kd.communication_bytes([(6, 4), (2, 7), (3, 5)], (140, 3), 2)
    assert shrink.order == "local-first"
    assert shrink.total_bytes == 4 * (4 * 6 * 3 + 6 * 6 * 3) // 2
    assert z_local_first + y > z_exchange_first  # sanity of the example


def test_communication_bytes_rejects_bad_shapes():
    with pytest.raises(ValueError, match="side"):
        kd.communication_bytes([(2, 2)], (2, 1), 2, side="both")
    with pytest.raises(ValueError, match=r"x_shape\[-2\] must be 6"):
        kd.communication_bytes([(2, 2), (3, 3)], (5, 1), 2)
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        kd.communication_bytes([(2, 3, 3), (2, 2)], (4, 6, 1), 2)


@pytest.mark.parametrize("g", [2, 4, 8])
def test_sharded_kron_matmul_local_steps_plan_like_the_single_device_op(g):
    # Issue 23: each rank's local work must be <= 1.15/G of the single-device op. The trailing
    # step of kron_matmul is a *batched* call on (L_r, R, T) (ops.apply_trail); the CUDA cost
    # model (run here on meta tensors: it plans from shapes) must see that its batch leads the grid
    # axes and take the rotating form as the whole op does, not the natural order whose last axis
    # is L_r·512 GEMMs of 11 columns. Then trailing + leading steps cost 1/G of the whole op.
    from kronegp._cuda import CudaBackend

    model = CudaBackend(force_path="auto", autotune=False)
    n, t = 512, 11
    factors = [torch.empty(n, n, device="meta") for _ in range(3)]
    in_sh, _ = kd.plan_shardings((n, n, n), None, g)
    a, lr = in_sh.split_axes, in_sh.lead_counts[0]
    whole = model.choice("kron_matmul", torch.empty(n**3, t, device="meta"), factors)
    trail = model.choice("kron_matmul", torch.empty(lr, in_sh.rest, t, device="meta"), factors[a:])
    lead = model.choice("kron_matmul", torch.empty(in_sh.lead, in_sh.rest * t // g, device="meta"), factors[:a])
    assert whole.path == trail.path == "axis_gemm_t", (whole, trail)
    assert trail.predicted_axis_s > 2 * trail.predicted_axis_t_s  # the 11-column GEMMs it avoids
    assert trail.predicted_s + lead.predicted_s <= 1.15 * whole.predicted_s / g


def test_ops_need_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.kron_matmul([torch.randn(2, 2)], torch.randn(2, 1))
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.allreduce_inner()


# --------------------------------------------------------------------------- spawned groups

# (factor shapes (*batch, P, Q), x batch, T or M). Chosen to cover: square and P ≠ Q;
# both schedules; even splits and uneven ones (K odd); a = N (nothing local) with fewer
# columns than ranks; batch dims on x, on a leading and on a trailing factor; T = 1, M = 1.
CASES = [
    ([(4, 4), (3, 3), (5, 5)], (), 3),
    ([(6, 4), (3, 5), (7, 2)], (), 2),  # trailing factors grow: exchange-first
    ([(6, 4), (2, 7), (3, 5)], (), 1),  # trailing factors shrink: local-first
    ([(5, 5), (3, 3)], (), 2),  # 15 cells: uneven split
    ([(5, 7), (3, 2)], (), 3),  # 14 -> 15 cells: uneven on the output side only
    ([(12, 12), (3, 3), (61, 61)], (), 1),
    ([(4, 4)], (), 1),  # one factor, one column: ranks without columns
    ([(2, 4, 4), (3, 2)], (2,), 2),  # batched leading factor, batched x
    ([(4, 4), (2, 1, 3, 5)], (1,), 2),  # batched trailing factor, broadcast x batch
]


def _make(case, side, dtype, seed):
    shapes, x_batch, cols = case
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grid = math.prod(s[-1] if side == "kron_matmul" else s[-2] for s in shapes)
    x_shape = (*x_batch, grid, cols) if side == "kron_matmul" else (*x_batch, cols, grid)
    x = torch.randn(x_shape, generator=gen, dtype=dtype)
    return factors, x


def _grid_slice(t: torch.Tensor, side: str, rows: slice) -> torch.Tensor:
    return t[..., rows, :] if side == "kron_matmul" else t[..., rows]


def _check_case(case, side, dtype, rank, world, device, fail):
    shapes = case[0]
    factors, x = _make(case, side, dtype, seed=zlib.crc32(repr((case, side)).encode()))
    op = kronegp.kron_matmul if side == "kron_matmul" else kronegp.matmul_kron
    dop = kd.kron_matmul if side == "kron_matmul" else kd.matmul_kron
    factors = [f.to(device) for f in factors]
    x = x.to(device)
    y_full = op(factors, x) if side == "kron_matmul" else op(x, factors)
    p = [s[-2] for s in shapes]
    q = [s[-1] for s in shapes]
    grid_in, grid_out = (q, p) if side == "kron_matmul" else (p, q)
    in_sh, out_sh = kd.plan_shardings(grid_in, grid_out, world)
    x_local = _grid_slice(x, side, in_sh.rows(rank)).clone().requires_grad_(True)
    f_local = [f.clone().requires_grad_(True) for f in factors]
    tag = f"{side} {shapes} batch={case[1]} cols={case[2]} {dtype} G={world}"

    # forward, and its bytes against the formula
    with kd.count_bytes() as counter:
        y_local = dop(f_local, x_local) if side == "kron_matmul" else dop(x_local, f_local)
    expected_local = _grid_slice(y_full, side, out_sh.rows(rank))
    if y_local.shape != expected_local.shape:
        fail.append(f"{tag}: shape {tuple(y_local.shape)} != {tuple(expected_local.shape)}")
        return
    err = rel_err(y_local.detach(), expected_local)
    if not err <= TOL[dtype]:
        fail.append(f"{tag}: forward relative error {err:.2e}")
    plan = kd.communication_bytes(shapes, tuple(x.shape), world, side=side, dtype=dtype)
    if counter.forward_bytes != plan.per_rank_bytes[rank] or counter.exchanges != 2:
        fail.append(
            f"{tag}: rank {rank} sent {counter.forward_bytes} B in {counter.exchanges} "
            f"exchanges, formula says {plan.per_rank_bytes[rank]} B in 2"
        )

    # gradients: loss = Σ_ranks <g_r, y_r> through allreduce_inner, the same on every rank
    gen = torch.Generator().manual_seed(7)
    g_full = torch.randn(y_full.shape, generator=gen, dtype=dtype).to(device)
    g_local = _grid_slice(g_full, side, out_sh.rows(rank))
    inner = kd.allreduce_inner(dim=-2 if side == "kron_matmul" else -1)
    with kd.count_bytes() as back:
        loss = inner(y_local, g_local).sum()
        loss.backward()
    x_ref = x.clone().requires_grad_(True)
    f_ref = [f.clone().requires_grad_(True) for f in factors]
    y_ref = op(f_ref, x_ref) if side == "kron_matmul" else op(x_ref, f_ref)
    loss_ref = (y_ref * g_full).sum()
    loss_ref.backward()
    err = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    if not err <= TOL[dtype]:
        fail.append(f"{tag}: all-reduced loss relative error {err:.2e}")
    dx_ref = _grid_slice(x_ref.grad, side, in_sh.rows(rank))
    err = rel_err(x_local.grad, dx_ref)
    if not err <= TOL[dtype]:
        fail.append(f"{tag}: dx relative error {err:.2e}")
    for i, (f, fr) in enumerate(zip(f_local, f_ref)):
        err = rel_err(f.grad, fr.grad)
        if not err <= TOL[dtype]:
            fail.append(f"{tag}: dF[{i}] relative error {err:.2e}")
    # backward: the same two exchanges reversed, so the same bytes over the group
    sent = torch.tensor([back.backward_bytes], dtype=torch.float64, device=device)
    dist.all_reduce(sent)
    if int(sent.item()) != plan.total_bytes:
        fail.append(f"{tag}: backward moved {int(sent.item())} B, forward formula {plan.total_bytes} B")


def _check_errors(rank, world, device, fail):
    factors = [torch.randn(4, 4, device=device), torch.randn(3, 3, device=device)]
    in_sh, _ = kd.plan_shardings((4, 3), None, world)
    wrong = torch.randn(in_sh.local_size(rank) + 1, 2, device=device)
    try:
        kd.kron_matmul(factors, wrong)
        fail.append("a block with the wrong number of rows was accepted")
    except ValueError as err:
        if f"rank {rank}" not in str(err) or "x_local" not in str(err):
            fail.append(f"unclear error for wrong rows: {err}")
    try:
        kd.matmul_kron(torch.randn(2, in_sh.local_size(rank), device=device).double(), factors)
        fail.append("mixed dtypes were accepted")
    except TypeError as err:
        if "dtype" not in str(err):
            fail.append(f"unclear error for mixed dtypes: {err}")


def _check_cg(rank, world, device, fail):
    """Distributed CG: the matvec is the distributed product, the inner product all-reduced."""
    from kronegp.solvers import block_cg

    gen = torch.Generator().manual_seed(11)
    sizes = (6, 5, 7)
    factors = []
    for n in sizes:
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        factors.append((a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)).to(device))
    noise = 0.3
    k = math.prod(sizes)
    rhs = torch.randn(k, 3, generator=gen, dtype=torch.float64).to(device)
    dense = kron_dense(factors) + noise * torch.eye(k, dtype=torch.float64, device=device)
    want = torch.linalg.solve(dense, rhs)
    sh, _ = kd.plan_shardings(sizes, None, world)
    rows = sh.rows(rank)
    result = block_cg(
        lambda v: kd.kron_matmul(factors, v) + noise * v,
        rhs[rows],
        inner=kd.allreduce_inner(),
        tol=1e-11,
        max_iters=500,
    )
    err = rel_err(result.solution, want[rows])
    if not err <= 1e-8 or not result.converged:
        fail.append(f"distributed CG: relative error {err:.2e}, converged={result.converged}")


def _check_dtensor(rank, world, device, fail):
    """A DTensor sharded on the grid dimension goes in, one sharded the same way comes out."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh(device.type, (world,))
    gen = torch.Generator().manual_seed(5)
    factors = [torch.randn(4, 4, generator=gen, dtype=torch.float64).to(device),
               torch.randn(3, 5, generator=gen, dtype=torch.float64).to(device)]
    for side, dim in (("kron_matmul", 0), ("matmul_kron", 1)):
        k = 20 if side == "kron_matmul" else 12
        x = torch.randn((k, 2) if dim == 0 else (2, k), generator=gen, dtype=torch.float64).to(device)
        x_local = x.tensor_split(world, dim=dim)[rank].clone().requires_grad_(True)
        x_dt = DTensor.from_local(x_local, mesh, [Shard(dim)])
        if side == "kron_matmul":
            y_dt, y_ref = kd.kron_matmul(factors, x_dt), kronegp.kron_matmul(factors, x)
        else:
            y_dt, y_ref = kd.matmul_kron(x_dt, factors), kronegp.matmul_kron(x, factors)
        if not isinstance(y_dt, DTensor) or y_dt.placements != (Shard(dim),):
            fail.append(f"DTensor {side}: got {type(y_dt).__name__} {getattr(y_dt, 'placements', '')}")
            continue
        err = rel_err(y_dt.full_tensor(), y_ref)
        if not err <= 1e-12:
            fail.append(f"DTensor {side}: relative error {err:.2e}")
        kd.allreduce_sum(y_dt.to_local().square().sum()).backward()
        x_ref = x.clone().requires_grad_(True)
        op = kronegp.kron_matmul(factors, x_ref) if dim == 0 else kronegp.matmul_kron(x_ref, factors)
        op.square().sum().backward()
        err = rel_err(x_local.grad, x_ref.grad.tensor_split(world, dim=dim)[rank])
        if not err <= 1e-12:
            fail.append(f"DTensor {side}: dx relative error {err:.2e}")


def _worker(rank, world, port, backend, out_dir, cases):
    def checks(device, fail):
        if cases == "cg":
            _check_cg(rank, world, device, fail)
            return
        for case in cases:
            for side in ("kron_matmul", "matmul_kron"):
                # float32 on 2 ranks only: 4 ranks share CI's 2 cores, and the float32 path
                # differs from float64 in no line of kronegp.distributed
                for dtype in (torch.float64, torch.float32) if world <= 2 else (torch.float64,):
                    _check_case(case, side, dtype, rank, world, device, fail)
        if cases:
            _check_errors(rank, world, device, fail)
            _check_dtensor(rank, world, device, fail)

    run_rank(rank, world, port, backend, out_dir, checks)


def _spawn(world: int, backend: str, tmp_path: Path, cases=CASES, timeout: float = 150.0):
    run_workers(_worker, world, backend, tmp_path, cases, timeout)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_matches_single_process(world, tmp_path):
    _spawn(world, "gloo", tmp_path)


@pytest.mark.slow
def test_distributed_cg_solves_like_a_dense_solve(tmp_path):
    pytest.importorskip("kronegp.solvers")
    _spawn(2, "gloo", tmp_path, cases="cg")


@pytest.mark.cuda
def test_nccl_group_of_one_matches_single_device(tmp_path):
    _spawn(1, "nccl", tmp_path)


@pytest.mark.multigpu
def test_nccl_all_gpus_match_single_device(tmp_path):
    _spawn(torch.cuda.device_count(), "nccl", tmp_path, timeout=600.0)


@pytest.mark.slow
def test_benchmark_reports_the_formula_counts_on_gloo(tmp_path):
    world = 4
    out = tmp_path / "multi_gpu.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "benchmarks" / "multi_gpu.py"), "--small", "--repeats", "1",
        "--warmup", "0", "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == world and report["backend"] == "gloo"
    assert len(report["rows"]) >= 4
    square_checked = 0
    for row in report["rows"]:
        count = kd.communication_bytes(
            row["factors"], row["x_shape"], world, side=row["side"],
            dtype=getattr(torch, row["dtype"]),
        )
        assert row["bytes_formula"] == count.total_bytes
        assert row["bytes_measured"] == count.total_bytes  # summed over ranks, forward
        assert row["bytes_naive"] == count.naive_bytes
        assert row["max_rel_err"] < (1e-4 if row["dtype"] == "float32" else 1e-10)
        itemsize = 4 if row["dtype"] == "float32" else 8
        x_bytes = math.prod(row["x_shape"]) * itemsize
        assert row["bytes_naive"] == (world - 1) * x_bytes
        square = all(p == q for p, q in row["factors"])
        if square and row["factors"][0][0] % world == 0:  # even split: 2(1 − 1/G)|x|
            assert row["bytes_measured"] == 2 * x_bytes * (world - 1) // world
            assert row["bytes_naive"] > row["bytes_measured"]
            square_checked += 1
    assert square_checked >= 4
