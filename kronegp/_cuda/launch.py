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
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import torch

from kronegp._cuda.compiler import compile_specs, kernel_name
from kronegp._cuda.plan import MAX_FUSED, Step, plan_tiles

__all__ = ["KronArgs", "DeviceKernels", "RowProduct", "run_row_product"]

_MAX_GRID_Z = 65535
_MAX_GRID_X = 2**31 - 1
_MAX_PROGRAMS = 1024  # cached launch programs per device


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


_DRIVER = None


def _drv():
    global _DRIVER
    if _DRIVER is None:
        from cuda.bindings import driver

        _DRIVER = driver
    return _DRIVER


_C_LAUNCH = None
_vp = ctypes.c_void_p


def bind_launch(fn):
    """Set up the ctypes function ``fn`` as ``cuLaunchKernel`` is called here: an ``int`` result and
    no ``argtypes``. Callers pass the handles and pointers as ``c_void_p`` (the kernel-parameter
    array as the ctypes array itself, which ctypes passes by address), the sizes as Python ints
    (ctypes' default C ``int``: every grid, block and shared-memory size here is below 2³¹), and
    ``None`` for ``extra``. Converting by hand halves ctypes' per-call cost (~0.7 against ~1.5 µs
    of host time on the 2-core CPU machine) against ``argtypes`` conversion."""
    fn.restype = ctypes.c_int
    fn.argtypes = None
    return fn


def _c_launch():
    """``cuLaunchKernel`` of the process's libcuda through ctypes (or None if it cannot be
    found), set up by :func:`bind_launch`: a plain C call costs ~1 µs of host time where the
    cuda-bindings wrapper, which converts every argument to its own types, costs several. Same
    library, same context."""
    global _C_LAUNCH
    if _C_LAUNCH is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        except (OSError, AttributeError) as err:
            import warnings

            warnings.warn(f"kronegp: launching through cuda-bindings (slower host path): {err}",
                          RuntimeWarning, stacklevel=3)
            _C_LAUNCH = False
        else:
            _C_LAUNCH = bind_launch(fn)
    return _C_LAUNCH or None


_C_CTX_GET = None


def _c_ctx_get_current():
    """``cuCtxGetCurrent`` of the process's libcuda through ctypes (None if unavailable): the
    context check runs once per call, and the cuda-bindings wrapper costs several µs of it."""
    global _C_CTX_GET
    if _C_CTX_GET is None:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent
        except (OSError, AttributeError):
            _C_CTX_GET = False
        else:
            fn.restype = ctypes.c_int  # one argument, passed as ctypes.byref: no argtypes needed
            _C_CTX_GET = fn
    return _C_CTX_GET or None


def current_stream_handle(device: torch.device | int) -> int:
    """torch's current stream on ``device`` (or the device of that index) as a raw ``CUstream``
    handle: what ``torch.cuda.current_stream(device).cuda_stream`` returns, without building the
    Stream object (torch's own raw accessor, the one Triton uses, where this torch has it)."""
    if isinstance(device, int):
        index = device
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(index).cuda_stream


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
        self.ctx_handle = int(self.ctx)  # the CUcontext's address, compared on every call
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
        self.sm_count = _check(
            driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.device),
            "cuDeviceGetAttribute",
        )
        self._functions: dict = {}
        self.programs: dict = {}  # call signature -> _Program (run_row_product)

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
        """``with dev.current():`` this GPU's context is current inside the block."""
        return _CtxGuard(self)

    def make_current(self) -> bool:
        """Make this GPU's context current on the calling thread; True when that pushed it (another
        was current: :meth:`pop_current` after the launches), False when it already was."""
        get = _c_ctx_get_current()
        if get is not None:
            cur = ctypes.c_void_p()
            code = get(ctypes.byref(cur))
            if code != 0:
                _check((_drv().CUresult(code),), "cuCtxGetCurrent")
            if (cur.value or 0) == self.ctx_handle:
                return False
        elif int(_check(_drv().cuCtxGetCurrent(), "cuCtxGetCurrent")) == self.ctx_handle:
            return False
        _check(_drv().cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        return True

    def pop_current(self) -> None:
        """Undo a :meth:`make_current` that pushed."""
        _check(_drv().cuCtxPopCurrent(), "cuCtxPopCurrent")


class _CtxGuard:
    """Make a device's context current for a block (pushed only when another context is current)."""

    def __init__(self, dev):
        self.dev = dev
        self.pushed = False

    def __enter__(self):
        self.pushed = self.dev.make_current()
        return self

    def __exit__(self, *exc):
        if self.pushed:
            self.dev.pop_current()
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
    mma: int = 0  # the fused kernels' product unit (FusedSpec.mma)


@lru_cache(maxsize=4096)
def _plan(shapes: tuple, m: int, itemsize: int, in_col: bool, out_col: bool, budget: int,
          mma: int = 0) -> tuple[Step, ...]:
    return tuple(plan_tiles(shapes, m, itemsize, in_col, out_col, budget, mma=mma))


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


@dataclass
class _Launch:
    """One prepared launch: everything but the data pointers, which ``patches`` fill per call."""

    spec: object
    grid: tuple[int, int, int]
    template: KronArgs  # strides, sizes, factor strides; pointers hold offsets only
    patches: tuple  # (field, slot, operand, byte offset): field "x", "y" or "f" (slot g)
    fn: object = None
    # What execute_program reads per call (set when the program is cached, :func:`_prepare`):
    slots: tuple = ()  # (operand, byte offset) of the pointers x, y, f[0], f[1], … in field order
    pack: object = None  # struct.Struct writing those pointers (KronArgs' first fields, 8 bytes each)
    fn_vp: object = None  # the CUfunction as c_void_p, for the ctypes launch
    fn_ptr: int = 0
    nt: int = 0
    smem: int = 0


@dataclass
class _Program:
    """The launches of one call signature (shapes, strides, dtype, alignment), built once."""

    launches: list
    n_tmps: int
    tmp_elems: int
    tmp_bytes: int = 0  # bytes of one intermediate (tmp_elems of the signature's dtype)
    # per thread: the argument blocks of every launch, reused from call to call (_ArgBlocks)
    local: threading.local = field(default_factory=threading.local)


class _ArgBlocks:
    """One thread's argument blocks for a program: each launch's ``KronArgs`` filled from its
    template once, and the kernel-parameter array pointing at it. A call writes only the data
    pointers into them before each launch: ``cuLaunchKernel`` copies the parameters when it
    enqueues (and a graph capture into its node), so the blocks are free again when it returns;
    they are per thread because ctypes releases the GIL during the call."""

    __slots__ = ("args", "table", "params")

    def __init__(self, launches: list):
        n = len(launches)
        self.args = (KronArgs * n)(*[launch.template for launch in launches])
        size = ctypes.sizeof(KronArgs)
        self.table = (ctypes.c_void_p * n)(*[ctypes.addressof(self.args) + i * size for i in range(n)])
        base = ctypes.addressof(self.table)
        self.params = [ctypes.c_void_p(base + i * ctypes.sizeof(ctypes.c_void_p)) for i in range(n)]


def _signature(prod: RowProduct) -> tuple:
    """Everything a program depends on besides the data pointers (only their 16-byte residue)."""
    x, y = prod.x, prod.y
    return (
        prod.shapes, prod.m, prod.in_col, prod.out_col, prod.batch, x.tensor.dtype, prod.mma,
        x.batch_strides, x.s_row, x.s_col, x.tensor.data_ptr() % 16,
        y.batch_strides, y.s_row, y.s_col, y.tensor.data_ptr() % 16,
        tuple((f.batch_strides, f.s_row, f.s_col) for f in prod.factors),
    )


def _build_program(prod: RowProduct, smem_budget: int) -> _Program:
    """Plan ``prod`` and lay out its launches (batch chunks × steps) with symbolic pointers.

    Pointer fields hold ``residue + offset`` while building (``residue`` = the real pointer's
    address mod 16), so each spec's 16-byte vectorisation check sees the true alignment;
    ``patches`` record which operand and byte offset each pointer field takes at call time.
    """
    x, y = prod.x, prod.y
    itemsize = x.tensor.element_size()
    steps = _plan(prod.shapes, prod.m, itemsize, prod.in_col, prod.out_col, smem_budget, prod.mma)
    m = prod.m
    n_tmps, k_max = 0, 0
    tmp_bstrides = tuple(0 for _ in prod.batch)
    if len(steps) > 1:
        k_max = max(st.k_out for st in steps[:-1])
        n_tmps = min(2, len(steps) - 1)
        acc, bs = m * k_max, []
        for n in reversed(prod.batch):
            bs.append(acc)
            acc *= n
        tmp_bstrides = tuple(reversed(bs))
    n_batch = math.prod(prod.batch)

    operands = [x, y] + list(prod.factors)
    all_strides = [o.batch_strides for o in operands] + [tmp_bstrides] * n_tmps
    merged = _merge_batch(prod.batch, all_strides)
    inner = merged[-1] if merged else (1, [0] * len(all_strides))
    outer = merged[:-1]
    n_ops = len(operands)
    residue = [o.tensor.data_ptr() % 16 for o in operands] + [0] * n_tmps

    launches = []
    for outer_idx in itertools.product(*(range(n) for n, _ in outer)):
        offs = [0] * len(all_strides)
        for (n, st), i in zip(outer, outer_idx):
            for t in range(len(offs)):
                offs[t] += i * st[t]
        for z0 in range(0, inner[0], _MAX_GRID_Z):
            nz = min(_MAX_GRID_Z, inner[0] - z0)
            zoffs = [o + z0 * s for o, s in zip(offs, inner[1])]
            for j, st in enumerate(steps):
                args = KronArgs()
                patches = []
                t_in = 0 if j == 0 else n_ops + (j - 1) % 2
                t_out = 1 if j == len(steps) - 1 else n_ops + j % 2
                patches.append(("x", 0, t_in, zoffs[t_in] * itemsize))
                patches.append(("y", 0, t_out, zoffs[t_out] * itemsize))
                args.x = residue[t_in] + zoffs[t_in] * itemsize
                args.y = residue[t_out] + zoffs[t_out] * itemsize
                if j == 0:
                    args.xb, args.xm, args.xk = inner[1][0], x.s_row, x.s_col
                else:
                    args.xb = inner[1][t_in]
                    args.xm, args.xk = (1, m) if prod.out_col else (st.k_in, 1)
                if j == len(steps) - 1:
                    args.yb, args.ym, args.yk = inner[1][1], y.s_row, y.s_col
                else:
                    args.yb = inner[1][t_out]
                    args.ym, args.yk = (1, m) if prod.out_col else (st.k_out, 1)
                for g in range(st.count):
                    fi = st.first + g
                    f = prod.factors[fi]
                    patches.append(("f", g, 2 + fi, zoffs[2 + fi] * itemsize))
                    args.fb[g] = inner[1][2 + fi]
                    args.f0[g], args.f1[g] = f.s_row, f.s_col
                args.M, args.S = m, st.s
                spec = st.spec.vectorized(m, st.s, args.x or 0, args.xb, args.xm, args.xk,
                                          args.y or 0, args.yb, args.ym, args.yk)
                gx, gy = spec.grid(m, st.s)
                if gx > _MAX_GRID_X:
                    raise ValueError(f"kronegp: problem too large for one launch ({gx} blocks)")
                launches.append(_Launch(spec, (gx, gy, nz), args, tuple(patches)))
    # each intermediate a multiple of 64 elements (256 bytes): both parts of execute_program's one
    # block stay 16-byte aligned, as the specs' vectorisation above assumed (residue 0)
    tmp_elems = -(-(n_batch * m * k_max) // 64) * 64
    return _Program(launches, n_tmps, tmp_elems, tmp_elems * itemsize)


def _prepare(dev: DeviceKernels, prog: _Program) -> None:
    """Load the kernels of a program about to be cached and precompute what each call reads."""
    for launch in prog.launches:
        launch.fn = dev.function(launch.spec)
        launch.fn_ptr = int(launch.fn)
        launch.fn_vp = ctypes.c_void_p(launch.fn_ptr)
        launch.nt, launch.smem = launch.spec.NT, launch.spec.smem_bytes
        by_field = {f: (t, off) for f, _, t, off in launch.patches if f != "f"}
        fs = sorted((g, t, off) for f, g, t, off in launch.patches if f == "f")
        assert [g for g, _, _ in fs] == list(range(len(fs)))  # f[0..count): contiguous after x and y
        launch.slots = (by_field["x"], by_field["y"], *[(t, off) for _, t, off in fs])
        launch.pack = struct.Struct(f"<{len(launch.slots)}Q")


def run_row_product(dev: DeviceKernels, prod: RowProduct, record=None) -> None:
    """Launch every step of ``prod`` on the current stream of the tensors' device.

    The launches of a call signature (:func:`_signature`) are built once and cached on the
    device, kernel handles included; a repeated call only allocates the intermediates, patches
    the data pointers into copies of the prepared argument blocks and launches (host time).

    ``record``: instead of launching, call ``record(spec)`` for each launch (CI uses this on CPU
    tensors to list the specs that a GPU would compile, through this very code path).
    """
    if record is not None:
        for launch in _build_program(prod, dev.smem_budget).launches:
            record(launch.spec)
        return
    key = _signature(prod)
    prog = dev.programs.get(key)
    if prog is None:
        prog = _build_program(prod, dev.smem_budget)
        _prepare(dev, prog)
        if len(dev.programs) >= _MAX_PROGRAMS:
            dev.programs.clear()  # a crude bound: signatures rarely number this many
        dev.programs[key] = prog
    xt = prod.x.tensor
    ptrs = [xt.data_ptr(), prod.y.tensor.data_ptr()] + [f.tensor.data_ptr() for f in prod.factors]
    execute_program(dev, prog, xt, ptrs)
    return prog


def execute_program(dev: DeviceKernels, prog: _Program, like: torch.Tensor, ptrs: list) -> None:
    """Run a cached program: ``ptrs`` = data pointers of x, y and the factors, in that order;
    intermediates like ``like`` (dtype, device). This is the whole per-call host path of a
    fused call (~1 µs of Python per launch besides the launch itself): keep it lean."""
    # Intermediates come from torch's caching allocator on this stream: it reuses them only
    # after this stream's queued kernels, so dropping them on return is safe. One block for
    # both (held until every launch is queued), each part a multiple of 256 bytes long.
    tmp = None  # held until every launch is queued: no other allocation may get its block before
    if prog.n_tmps:
        tmp = like.new_empty(prog.n_tmps * prog.tmp_elems)
        base = tmp.data_ptr()
        ptrs = [*ptrs, base, base + prog.tmp_bytes] if prog.n_tmps > 1 else [*ptrs, base]
    blocks = getattr(prog.local, "blocks", None)
    if blocks is None:
        blocks = prog.local.blocks = _ArgBlocks(prog.launches)
    args = blocks.args
    stream = _vp(current_stream_handle(dev.index))
    c_launch = _c_launch()
    pushed = dev.make_current()
    try:
        for i, launch in enumerate(prog.launches):
            launch.pack.pack_into(args, i * _ARGS_BYTES, *[ptrs[t] + off for t, off in launch.slots])
            if c_launch is None:
                launch_struct(launch.fn, launch.grid, launch.nt, args[i], stream.value or 0, launch.spec,
                              smem=launch.smem)
                continue
            gx, gy, gz = launch.grid
            code = c_launch(launch.fn_vp, gx, gy, gz, launch.nt, 1, 1, launch.smem, stream, blocks.params[i], None)
            if code != 0:
                _check((_drv().CUresult(code),), f"cuLaunchKernel({kernel_name(launch.spec)})")
    finally:
        if pushed:
            dev.pop_current()
    del tmp


_ARGS_BYTES = ctypes.sizeof(KronArgs)


def launch_struct(fn, grid: tuple[int, int, int], threads: int, args: ctypes.Structure, stream: int, spec,
                  *, smem: int = 0, fn_ptr: int = 0) -> None:
    """``cuLaunchKernel`` of a kernel whose one parameter is the struct ``args``, with ``smem``
    bytes of dynamic shared memory; the caller has the device's context current
    (``DeviceKernels.current``). Through libcuda by ctypes where it loads (``fn_ptr``: the
    CUfunction's address, if the caller keeps it), else through cuda-bindings; ``spec`` names
    the kernel in an error."""
    params = (ctypes.c_void_p * 1)(ctypes.addressof(args))
    c_launch = _c_launch()
    if c_launch is not None:
        code = c_launch(_vp(fn_ptr or int(fn)), *grid, threads, 1, 1, smem, _vp(stream), params, None)
        if code != 0:
            _check((_drv().CUresult(code),), f"cuLaunchKernel({kernel_name(spec)})")
        return
    driver = _drv()
    err = driver.cuLaunchKernel(fn, *grid, threads, 1, 1, smem, stream, ctypes.addressof(params), 0)
    if err[0] != driver.CUresult.CUDA_SUCCESS:
        _check(err, f"cuLaunchKernel({kernel_name(spec)})")


def run_transpose(dev: DeviceKernels, spec, src: torch.Tensor, dst: torch.Tensor, n: int, batch: int) -> None:
    """``batch`` contiguous ``(D, n)`` → ``(n, D)`` transposes from ``src`` into ``dst`` on the
    current stream (``cuda_ext/kron_transpose.cuh``)."""
    fn = dev.function(spec)
    itemsize = src.element_size()
    per = n * spec.D
    gx, gy = spec.grid(n)
    if gx > _MAX_GRID_X:
        raise ValueError(f"kronegp: transpose too large for one launch ({gx} blocks)")
    stream = current_stream_handle(src.device)
    x0, y0 = src.data_ptr(), dst.data_ptr()
    with dev.current():
        for z0 in range(0, batch, _MAX_GRID_Z):
            nz = min(_MAX_GRID_Z, batch - z0)
            args = KronArgs()
            args.x, args.y = x0 + z0 * per * itemsize, y0 + z0 * per * itemsize
            args.xb = args.yb = per
            args.M, args.S = n, 1
            launch_struct(fn, (gx, gy, nz), spec.NT, args, stream, spec)
