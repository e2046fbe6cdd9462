"""Load cubins into the GPU's primary context and launch them on torch's current stream.

Only the CUDA driver API (``cuda.bindings.driver``) and raw pointers cross this line: the
kernels take one by-value struct (``KronArgs`` in ``cuda_ext/kron_common.cuh``) of data
pointers, strides and sizes, and run on ``torch.cuda.current_stream(device)``. Nothing here
links against torch's C++ ABI.
"""

from __future__ import annotations

import ctypes
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from kronegp._cuda.compiler import compile_specs, kernel_name
from kronegp._cuda.plan import MAX_FUSED, Step, plan_tiles

__all__ = ["KronArgs", "DeviceKernels", "RowProduct", "run_row_product"]

_MAX_GRID_Z = 65535
_MAX_GRID_X = 2**31 - 1


class KronArgs(ctypes.Structure):
    """Mirror of ``struct KronArgs`` (every field 8 bytes, so no padding either side)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("y", ctypes.c_void_p),
        ("f", ctypes.c_void_p * MAX_FUSED),
        ("xb", ctypes.c_int64),
        ("xm", ctypes.c_int64),
        ("xk", ctypes.c_int64),
        ("yb", ctypes.c_int64),
        ("ym", ctypes.c_int64),
        ("yk", ctypes.c_int64),
        ("fb", ctypes.c_int64 * MAX_FUSED),
        ("f0", ctypes.c_int64 * MAX_FUSED),
        ("f1", ctypes.c_int64 * MAX_FUSED),
        ("M", ctypes.c_int64),
        ("S", ctypes.c_int64),
    ]


def _drv():
    from cuda.bindings import driver

    return driver


def _check(result, what: str):
    """Unpack a cuda.bindings result tuple, raising on any error code."""
    driver = _drv()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"kronegp: {what} failed: {err.name} ({msg.decode() if msg else ''})")
    return rest[0] if len(rest) == 1 else rest


class DeviceKernels:
    """Per-GPU state: its primary context, architecture, and the kernels loaded into it."""

    def __init__(self, index: int):
        driver = _drv()
        self.index = index
        self.device = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        self.ctx = _check(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        attr = driver.CUdevice_attribute
        major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "cuDeviceGetAttribute")
        minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "cuDeviceGetAttribute")
        self.arch = f"sm_{major}{minor}"
        self.smem_optin = _check(
            driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, self.device),
            "cuDeviceGetAttribute",
        )
        # Plans keep two blocks per SM where the chip allows it (~228 KB per SM on sm_80/90).
        self.smem_budget = min(100 * 1024, self.smem_optin)
        self._functions: dict = {}

    def function(self, spec):
        fn = self._functions.get(spec)
        if fn is None:
            driver = _drv()
            name = kernel_name(spec)
            cubin = compile_specs([(name, spec)], self.arch)
            with self.current():
                module = _check(driver.cuModuleLoadData(cubin), f"cuModuleLoadData({name})")
                fn = _check(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
                if spec.smem_bytes > 48 * 1024:
                    _check(
                        driver.cuFuncSetAttribute(
                            fn,
                            driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            spec.smem_bytes,
                        ),
                        "cuFuncSetAttribute",
                    )
            self._functions[spec] = (module, fn)
        return self._functions[spec][1]

    def current(self):
        return _CtxGuard(self.ctx)


class _CtxGuard:
    """Make ``ctx`` current for a block (pushed only when another context is current)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.pushed = False

    def __enter__(self):
        driver = _drv()
        cur = _check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(cur) != int(self.ctx):
            _check(driver.cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
            self.pushed = True
        return self

    def __exit__(self, *exc):
        if self.pushed:
            _check(_drv().cuCtxPopCurrent(), "cuCtxPopCurrent")
        return False


class _NoCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@dataclass
class Operand:
    """A tensor viewed as ``(*batch, rows, cols)`` with explicit strides (elements)."""

    tensor: torch.Tensor
    batch_strides: tuple[int, ...]  # one per dimension of the broadcast batch shape
    s_row: int
    s_col: int


@dataclass
class RowProduct:
    """``y[b, m, :] = x[b, m, :] · (G_1 ⊗ … ⊗ G_N)`` in strided form.

    ``x`` rows are ``m`` (stride ``x.s_row``) and its columns ``k`` (``x.s_col``); factor ``G_i``
    element ``(p, q)`` is at ``(p·s_row + q·s_col)`` of ``factors[i]``; ``y`` likewise.
    """

    x: Operand
    factors: list[Operand]
    shapes: tuple[tuple[int, int], ...]  # (P_i, Q_i) of G_i
    y: Operand
    batch: tuple[int, ...]
    m: int
    in_col: bool
    out_col: bool


@lru_cache(maxsize=4096)
def _plan(shapes: tuple, m: int, itemsize: int, in_col: bool, out_col: bool, budget: int) -> tuple[Step, ...]:
    return tuple(plan_tiles(shapes, m, itemsize, in_col, out_col, budget))


def _merge_batch(sizes: Sequence[int], strides: Sequence[Sequence[int]]):
    """Collapse batch dims that every operand walks contiguously; drop size-1 dims.

    ``strides[t][d]`` is operand t's stride of batch dim d. Returns ``[(size, [stride_t])]``.
    """
    merged: list[tuple[int, list[int]]] = []
    for d, n in enumerate(sizes):
        if n == 1:
            continue
        st = [s[d] for s in strides]
        if merged and all(prev == cur * n for prev, cur in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * n, st)
        else:
            merged.append((n, st))
    return merged


def run_row_product(dev: DeviceKernels, prod: RowProduct, record=None) -> None:
    """Plan and launch every step of ``prod`` on the current stream of the tensors' device.

    ``record``: instead of launching, call ``record(spec)`` for each launch (CI uses this on CPU
    tensors to list the specs that a GPU would compile, through this very code path).
    """
    driver = _drv() if record is None else None
    x, y = prod.x, prod.y
    dtype = x.tensor.dtype
    itemsize = x.tensor.element_size()
    shapes = prod.shapes
    steps = _plan(shapes, prod.m, itemsize, prod.in_col, prod.out_col, dev.smem_budget)
    m = prod.m
    n_batch = math.prod(prod.batch)

    # Intermediates: contiguous (*batch, m, k) or (*batch, k, m) in the output's layout.
    tmps = []
    if len(steps) > 1:
        k_max = max(st.k_out for st in steps[:-1])
        for _ in range(min(2, len(steps) - 1)):
            tmps.append(torch.empty(n_batch * m * k_max, dtype=dtype, device=x.tensor.device))
        tmp_bstrides = []
        acc = m * k_max
        for n in reversed(prod.batch):
            tmp_bstrides.append(acc)
            acc *= n
        tmp_bstrides = tuple(reversed(tmp_bstrides))
    else:
        k_max, tmp_bstrides = 0, tuple(0 for _ in prod.batch)

    operands = [x, y] + list(prod.factors)
    all_strides = [o.batch_strides for o in operands] + [tmp_bstrides] * len(tmps)
    merged = _merge_batch(prod.batch, all_strides)
    inner = merged[-1] if merged else (1, [0] * len(all_strides))
    outer = merged[:-1]
    stream = torch.cuda.current_stream(x.tensor.device).cuda_stream if record is None else 0
    n_ops = len(operands)

    def ptr(t: torch.Tensor) -> int:
        return t.data_ptr()

    base_ptrs = [ptr(o.tensor) for o in operands] + [ptr(t) for t in tmps]

    args = KronArgs()
    params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
    params_ptr = ctypes.addressof(params)
    success = driver.CUresult.CUDA_SUCCESS if record is None else None
    with dev.current() if record is None else _NoCtx():
        for outer_idx in itertools.product(*(range(n) for n, _ in outer)):
            offs = [0] * len(all_strides)
            for (n, st), i in zip(outer, outer_idx):
                for t in range(len(offs)):
                    offs[t] += i * st[t]
            for z0 in range(0, inner[0], _MAX_GRID_Z):
                nz = min(_MAX_GRID_Z, inner[0] - z0)
                zoffs = [o + z0 * s for o, s in zip(offs, inner[1])]
                for j, st in enumerate(steps):
                    spec = st.spec
                    # input of this step
                    if j == 0:
                        args.x = base_ptrs[0] + zoffs[0] * itemsize
                        args.xb, args.xm, args.xk = inner[1][0], x.s_row, x.s_col
                    else:
                        t = n_ops + (j - 1) % 2
                        args.x = base_ptrs[t] + zoffs[t] * itemsize
                        args.xb = inner[1][t]
                        args.xm, args.xk = (1, m) if prod.out_col else (st.k_in, 1)
                    if j == len(steps) - 1:
                        args.y = base_ptrs[1] + zoffs[1] * itemsize
                        args.yb, args.ym, args.yk = inner[1][1], y.s_row, y.s_col
                    else:
                        t = n_ops + j % 2
                        args.y = base_ptrs[t] + zoffs[t] * itemsize
                        args.yb = inner[1][t]
                        args.ym, args.yk = (1, m) if prod.out_col else (st.k_out, 1)
                    for g in range(st.count):
                        fi = st.first + g
                        f = prod.factors[fi]
                        args.f[g] = base_ptrs[2 + fi] + zoffs[2 + fi] * itemsize
                        args.fb[g] = inner[1][2 + fi]
                        args.f0[g], args.f1[g] = f.s_row, f.s_col
                    args.M, args.S = m, st.s
                    spec = spec.vectorized(m, st.s, args.x, args.xb, args.xm, args.xk, args.y, args.yb, args.ym, args.yk)
                    if record is not None:
                        record(spec)
                        continue
                    fn = dev.function(spec)
                    gx, gy = spec.grid(m, st.s)
                    if gx > _MAX_GRID_X:
                        raise ValueError(f"kronegp: problem too large for one launch ({gx} blocks)")
                    err = driver.cuLaunchKernel(
                        fn, gx, gy, nz, spec.NT, 1, 1, spec.smem_bytes, stream, params_ptr, 0
                    )
                    if err[0] != success:
                        _check(err, f"cuLaunchKernel({kernel_name(spec)})")
    # The intermediates were allocated on this stream: the caching allocator reuses them only
    # after this stream's queued kernels, so dropping them here is safe.

