"""DistributedGridGP against the single-process GridGP.

Each spawned rank builds the single-process :class:`kronegp.GridGP` on the whole grid (the
reference) and a :class:`kronegp.distributed.DistributedGridGP` holding its block, sets the
same hyperparameters in both (away from their initial values), and compares the loss and
the gradient of every hyperparameter after one ``backward()``. Regimes: the exact path
(full grid), missing cells (Schur-complement CG), per-cell noise (preconditioned CG),
both; unit probes (exact traces) and random probes (the replicated draw reproduces
GridGP's); even and uneven splits (grid 6×5×7 on 4 ranks cuts axis 0 into 2,2,1,1;
grid 3×8 on 2 or 4 ranks splits both axes, leaving none local); a rank with no observed
cell; a user mean; float32 and float64; groups of 1, 2 and 4.
Processes are spawned as in ``tests/test_distributed.py`` (same ``os._exit`` workaround).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import gpytorch
import pytest
import torch
import torch.distributed as dist

import kronegp
import kronegp.distributed as kd
import kronegp.models._two_level as two_level
from kronegp.models import sharded
from process_group import free_port, run_rank, run_workers
from _helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]

# (name, grid shape, missing fraction, per-cell noise, extra GridGP kwargs)
CASES = [
    ("exact", (6, 5, 7), 0.0, False, {}),
    ("missing, unit probes", (6, 5, 7), 0.2, False, {}),
    ("missing, random probes", (6, 5, 7), 0.2, False, {"exact_trace_limit": 0, "num_probes": 5}),
    ("per-cell noise, unit probes", (6, 5, 7), 0.0, True, {}),
    ("per-cell noise, random probes", (6, 5, 7), 0.0, True, {"exact_trace_limit": 0, "num_probes": 4}),
    ("per-cell noise and missing", (6, 5, 7), 0.2, True, {"exact_trace_limit": 0, "num_probes": 3}),
    ("missing, no preconditioner", (6, 5, 7), 0.2, False, {"precondition": False, "num_probes": 4}),
    ("missing, user mean, 2-D", (12, 9), 0.25, False, {"mean": "linear"}),
    # a hole over the first 2 rows of axis 0: on 4 ranks rank 0 observes nothing
    ("hole, per-cell noise", (6, 5, 7), "hole", True, {"exact_trace_limit": 0, "num_probes": 3}),
    ("exact, user mean, every axis split", (3, 8), 0.0, False, {"mean": "linear"}),
]
# Float64: both runs take the same CG steps; only the order of summation differs.
TOL = {torch.float64: 1e-7, torch.float32: 2e-3}


def _data(shape, missing, per_cell, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.sort(torch.rand(n, generator=gen, dtype=torch.float64) * n).values for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    values = 3.0 + sum(torch.sin(0.7 * m + k) for k, m in enumerate(mesh))
    values = (values + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if missing == "hole":
        values[:2] = float("nan")
    elif missing > 0:
        drop = torch.rand(shape, generator=gen) < missing
        values = torch.where(drop, torch.full_like(values, float("nan")), values)
    noise = (0.05 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype) if per_cell else None
    return values, axes, noise


def _linear_mean(d, dtype):
    mean = gpytorch.means.LinearMean(d).to(dtype)
    with torch.no_grad():  # the same on every rank (check_replicated would refuse otherwise)
        mean.weights.fill_(0.1)
        mean.bias.fill_(2.0)
    return mean


def _set_hyperparameters(gp, dgp, seed):
    """Move both models to the same hyperparameters, away from the initial values."""
    gen = torch.Generator().manual_seed(seed)
    ref = dict(gp.named_parameters())
    with torch.no_grad():
        for name, p in dgp.named_parameters():
            step = 0.3 * torch.randn(ref[name].shape, generator=gen, dtype=torch.float64)
            ref[name].add_(step.to(device=p.device, dtype=p.dtype))
            p.copy_(ref[name])


def _check_case(case, dtype, rank, world, device, fail):
    name, shape, missing, per_cell, extra = case
    extra = dict(extra)
    tag = f"{name} {shape} {dtype} G={world}"
    values, axes, noise = _data(shape, missing, per_cell, dtype, seed=len(name) + sum(shape))
    kwargs = dict(cg_tol=1e-9 if dtype == torch.float64 else 1e-5, **extra)
    # A sharded grid preconditions the missing cells' system by Jacobi alone (the two-level
    # preconditioner of a hole needs the whole grid): the reference does too, so that the same
    # random probes give the same estimate (this process is a spawned rank: the switch is its own).
    two_level.ENABLED = False
    if kwargs.get("mean") == "linear":
        kwargs["mean"] = _linear_mean(len(shape), dtype)
    # the distributed model has the exact and cg paths: GridGP on the same one
    gp = kronegp.GridGP(values, axes, noise=noise, device=device, path="cg" if missing else "auto", **kwargs)
    if "mean" in kwargs:
        kwargs["mean"] = _linear_mean(len(shape), dtype)
    dgp = kd.DistributedGridGP.from_grid(values, axes, noise=noise, device=device, **kwargs)
    if dgp.path != gp.path:
        fail.append(f"{tag}: path {dgp.path} != GridGP's {gp.path}")
        return

    # initial hyperparameters: the all-reduced statistics give GridGP's
    ref = dict(gp.named_parameters())
    for pname, p in dgp.named_parameters():
        # absolute below 1: the constant mean of standardised data starts at ~0
        err = ((p - ref[pname]).norm() / ref[pname].norm().clamp_min(1.0)).item()
        if not err <= TOL[dtype]:
            fail.append(f"{tag}: initial {pname} relative error {err:.2e}")

    _set_hyperparameters(gp, dgp, seed=3)
    loss_ref = -gp.log_marginal_likelihood() / gp.n_observed
    loss_ref.backward()
    loss = dgp.loss()
    loss.backward()
    err = abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())
    if not err <= TOL[dtype]:
        fail.append(f"{tag}: loss {loss.item():.10g} vs GridGP {loss_ref.item():.10g} (rel {err:.2e})")
    # the loss is one replicated scalar
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    if len(set(losses)) != 1:
        fail.append(f"{tag}: loss differs between ranks {losses}")
    checked = 0
    for pname, p in dgp.named_parameters():
        g_ref = ref[pname].grad
        if p.grad is None or g_ref is None:
            if (p.grad is None) != (g_ref is None):
                fail.append(f"{tag}: gradient of {pname} is {p.grad} vs GridGP {g_ref}")
            continue
        if g_ref.abs().max() == 0:
            fail.append(f"{tag}: GridGP's gradient of {pname} is zero: the test cannot tell")
        err = rel_err(p.grad, g_ref)
        if not err <= TOL[dtype] * 10:
            fail.append(f"{tag}: d loss / d {pname} = {p.grad.tolist()} vs GridGP {g_ref.tolist()} (rel {err:.2e})")
        checked += 1
        # every rank holds the same (full) gradient
        grads = [None] * world
        dist.all_gather_object(grads, p.grad.detach().cpu().reshape(-1).tolist())
        if any(g != grads[0] for g in grads):
            fail.append(f"{tag}: gradient of {pname} differs between ranks")
    n_params = sum(1 for _ in dgp.parameters())
    if checked != n_params:
        fail.append(f"{tag}: compared {checked} of {n_params} gradients")


def _check_local_blocks(rank, world, device, fail):
    """The constructor on per-rank blocks equals from_grid on the whole grid."""
    shape = (6, 5, 7)
    values, axes, noise = _data(shape, 0.2, True, torch.float64, seed=11)
    rows = kd.DistributedGridGP.rows_of(shape, rank, world)
    block = values.reshape(-1)[rows].clone()
    a = kd.DistributedGridGP(block, axes, noise=noise.reshape(-1)[rows].clone(), device=device, exact_trace_limit=0)
    b = kd.DistributedGridGP.from_grid(values, axes, noise=noise, device=device, exact_trace_limit=0)
    la, lb = float(a.loss()), float(b.loss())
    if not abs(la - lb) <= 1e-12 * abs(lb):
        fail.append(f"local blocks: loss {la} vs from_grid {lb}")
    # chunked probes: each rank draws only its rows, and they are the rows of one draw of
    # the whole block (here a single chunk, seeded by (seed, offset, chunk) = (0, 0, 0))
    c = kd.DistributedGridGP(block, axes, noise=noise.reshape(-1)[rows].clone(), device=device,
                             exact_trace_limit=0, probes="chunked")
    z = c.layout.std_normal(c.n_cells, 3, 0, seed=c.seed, resample=False, like=c.y)
    key = hashlib.blake2b(b"0,0,0", digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(key, "little") >> 1)
    whole = torch.randn(math.prod(shape), 3, generator=gen, dtype=torch.float64, device=device)
    assert math.prod(shape) <= sharded._PROBE_CHUNK_ROWS
    if not torch.equal(z, whole[rows]):
        fail.append("chunked probes: this rank's rows differ from the whole draw's")


def _check_fit(rank, world, device, fail):
    """GridGP.fit is the sharded model's fit: the same steps (Adam, and L-BFGS with its
    inner iterations and line searches) on the cg and the exact path, the same loss history
    to 1e-8 in float64; the result loads into a GridGP."""
    shape = (6, 5, 7)
    for missing, optimizer, iters in ((0.2, "adam", 3), (0.2, "lbfgs", 2), (0.0, "lbfgs", 2)):
        tag = f"fit {optimizer}, {'cg' if missing else 'exact'}"
        values, axes, _ = _data(shape, missing, False, torch.float64, seed=5)
        kwargs = dict(exact_trace_limit=0, num_probes=4, cg_tol=1e-10)
        gp = kronegp.GridGP(values, axes, device=device, path="cg" if missing else "exact", **kwargs)
        dgp = kd.DistributedGridGP.from_grid(values, axes, device=device, **kwargs)
        h_ref = gp.fit(iters=iters, optimizer=optimizer, progress=False)
        h = dgp.fit(iters=iters, optimizer=optimizer, progress=False)
        err = rel_err(torch.tensor(h), torch.tensor(h_ref))
        if len(h) != len(h_ref) or len(h) < 2 or not err <= 1e-8:
            fail.append(f"{tag}: loss history {h} vs GridGP {h_ref} (rel {err:.2e})")
        if h[-1] >= h[0]:
            fail.append(f"{tag}: the loss did not fall ({h}): the test cannot tell a step from none")
        fresh = kronegp.GridGP(values, axes, device=device, path=gp.path, **kwargs)
        fresh.load_state_dict(dgp.hyperparameter_state(), strict=False)
        for name, p in fresh.named_parameters():
            err = rel_err(p.detach(), dict(gp.named_parameters())[name].detach())
            if not err <= 1e-7:
                fail.append(f"{tag}: {name} after the fit differs from GridGP's (rel {err:.2e})")
        if dgp.hyperparameters().keys() != gp.hyperparameters().keys():
            fail.append(f"{tag}: hyperparameters() keys {list(dgp.hyperparameters())} vs GridGP's")


def _check_whole_grid_paths(rank, world, device, fail):
    """The paths that need every cell refuse a sharded grid, naming the path; "auto" takes cg
    where the single-device model would take exact-missing; prediction refuses clearly."""
    values, axes, _ = _data((6, 5, 7), 0.02, False, torch.float64, seed=7)
    if kronegp.GridGP(values, axes, device=device).path != "exact-missing":
        fail.append("whole-grid paths: the single-device model did not choose exact-missing: the test cannot tell")
    dgp = kd.DistributedGridGP.from_grid(values, axes, device=device)
    if dgp.path != "cg":
        fail.append(f"whole-grid paths: auto chose {dgp.path} on a sharded grid, expected cg")
    for path in ("exact-missing", "separable-mask"):
        try:
            kd.DistributedGridGP.from_grid(values, axes, device=device, path=path)
        except ValueError as err:
            if path not in str(err) or "whole grid" not in str(err):
                fail.append(f"path={path}: message {err!r} does not name the path and why")
        else:
            fail.append(f"path={path} on a sharded grid: no error")
    # the step is never a CUDA graph on a sharded grid (collectives); on CPU the device says so first
    try:
        dgp.loss_backward(cuda_graph=True)
    except ValueError as err:
        want = "sharded" if torch.device(device).type == "cuda" else "not a CUDA device"
        if want not in str(err):
            fail.append(f"cuda_graph=True: message {err!r} lacks {want!r}")
    else:
        fail.append("cuda_graph=True on a sharded model: no error")
    for call in (dgp.predict, dgp.sample, dgp.memory_plan):
        try:
            call()
        except NotImplementedError as err:
            if "hyperparameter_state" not in str(err):
                fail.append(f"{call.__name__}: message {err!r} does not say what to do")
        else:
            fail.append(f"{call.__name__} on a sharded model: no error")


def _check_errors(rank, world, device, fail):
    shape = (6, 5, 7)
    values, axes, _ = _data(shape, 0.0, False, torch.float64, seed=1)
    rows = kd.DistributedGridGP.rows_of(shape, rank, world)
    block = values.reshape(-1)[rows].clone()
    expect = [
        (dict(values=block[:-1], axes=axes), ValueError, "1-D tensor of length"),
        (dict(values=block, axes=axes[:2]), ValueError, "1-D tensor of length"),
        (dict(values=block, axes=axes, mask=torch.ones(block.shape[0], dtype=torch.int64)), TypeError, "boolean"),
        (dict(values=block, axes="x"), TypeError, "axes must be"),
        (dict(values=block, axes=axes, probes="each"), ValueError, "probes must be"),
    ]
    # A bad block on one rank only must raise on every rank (no rank left in a collective).
    bad_on_rank0 = block.clone()
    if rank == 0:
        bad_on_rank0[0] = float("inf")
    expect.append((dict(values=bad_on_rank0, axes=axes), ValueError, "rank 0: .*infinite"))
    expect.append((dict(values=block, axes=axes, noise=0.1 if rank == 0 else None), ValueError,
                   "noise was given on some ranks and not on others"))
    expect.append((dict(values=block, axes=axes, mask=torch.ones(block.shape[0] + 1, dtype=torch.bool)), ValueError,
                   "mask must have this rank's block"))
    for kwargs, exc, pattern in expect:
        try:
            kd.DistributedGridGP(device=device, **kwargs)
        except exc as err:
            if not re.search(pattern, str(err)):
                fail.append(f"error for {list(kwargs)}: message {err!r} lacks {pattern!r}")
        except Exception as err:  # noqa: BLE001 - report the wrong type
            fail.append(f"error for {list(kwargs)}: {type(err).__name__} {err}, expected {exc.__name__}")
        else:
            fail.append(f"no error for {list(kwargs)}")


def _worker(rank, world, port, backend, out_dir, which):
    def checks(device, fail):
        torch.set_num_threads(1)
        for case in CASES:
            # float32 on one case per regime at G = 2 only (CI's 2 cores)
            dtypes = (torch.float64, torch.float32) if world == 2 and "unit" not in case[0] else (torch.float64,)
            for dtype in dtypes:
                _check_case(case, dtype, rank, world, device, fail)
        if which == "all":
            _check_local_blocks(rank, world, device, fail)
            _check_fit(rank, world, device, fail)
            _check_whole_grid_paths(rank, world, device, fail)
            _check_errors(rank, world, device, fail)

    run_rank(rank, world, port, backend, out_dir, checks)


def _spawn(world: int, backend: str, tmp_path: Path, which: str = "all", timeout: float = 240.0):
    run_workers(_worker, world, backend, tmp_path, which, timeout)


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_gridgp_step_matches_single_process(world, tmp_path):
    # G = 1 is the degenerate split (no exchange moves anything); the CUDA test runs it on NCCL
    _spawn(world, "gloo", tmp_path, which="all" if world == 2 else "cases")


@pytest.mark.cuda
def test_nccl_group_of_one_matches_single_device_gridgp(tmp_path):
    _spawn(1, "nccl", tmp_path)


@pytest.mark.multigpu
def test_nccl_all_gpus_match_single_device_gridgp(tmp_path):
    _spawn(torch.cuda.device_count(), "nccl", tmp_path, timeout=600.0)


def test_needs_an_initialised_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.DistributedGridGP(torch.zeros(4), [torch.arange(4.0)])


@pytest.mark.slow
def test_benchmark_step_runs_on_gloo(tmp_path):
    out = tmp_path / "gp.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(ROOT / "benchmarks" / "multi_gpu_gp.py"), "--small", "--repeats", "1", "--warmup", "0", "--dtypes", "float64",
        "--json", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert {r["regime"] for r in report["rows"]} >= {"missing 20%", "per-cell noise", "exact"}
    for row in report["rows"]:
        assert row["sec_per_step_G"] > 0
        if row["sec_per_step_1"] is not None:
            # same hyperparameters and probes: the same loss on 1 and on G processes
            assert abs(row["loss_G"] - row["loss_1"]) <= 1e-6 * abs(row["loss_1"])
