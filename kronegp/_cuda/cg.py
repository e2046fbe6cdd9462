"""The element-wise steps of block CG in one pass each (``cuda_ext/cg_update.cuh``).

:func:`kronegp.solvers.block_cg` calls these through :meth:`CudaBackend.cg_state` and
:meth:`CudaBackend.cg_step` for contiguous CUDA blocks ``(n, t)`` (or ``(t, n)``) with a diagonal
(or no) preconditioner; see the header for what each computes and why it is faster than the
same algebra in torch. The per-column coefficients and convergence state live in a
:class:`CgState` on the device: an iteration is three launches and one read of a flag.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kronegp._cuda.launch import DeviceKernels, current_stream_handle, launch_struct
from kronegp._cuda.plan import kernel_source

__all__ = ["CgSpec", "CgArgs", "CgState", "CG_MAX_COLUMNS", "cg_launch"]

#: Widest block (columns) the kernels take: a thread block holds a whole number of rows' columns.
CG_MAX_COLUMNS = 1024
_MODES = {"dot": 0, "update": 1, "direction": 2}
_NSUM = {"dot": 1, "update": 2, "direction": 0}


class CgArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("r", ctypes.c_void_p),
        ("p", ctypes.c_void_p),
        ("ap", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("coef", ctypes.c_void_p),
        ("part", ctypes.c_void_p),
        ("n", ctypes.c_longlong),
        ("t", ctypes.c_longlong),
        ("rz", ctypes.c_void_p),
        ("res", ctypes.c_void_p),
        ("bnorm", ctypes.c_void_p),
        ("active", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("iters", ctypes.c_void_p),
        ("rec", ctypes.c_void_p),
        ("counter", ctypes.c_void_p),
        ("any_active", ctypes.c_void_p),
        ("tol", ctypes.c_double),
        ("tiny", ctypes.c_double),
        ("force", ctypes.c_int),
    ]


class CgState:
    """Per-column state of one fused block-CG solve, on the device (see ``cg_update.cuh``).

    Built from the torch path's initial values: ``rz`` (``rᵀz``), ``res`` (relative
    residual), ``b_norm`` (``‖b‖``, 1 for zero columns), ``active`` and ``zero`` (bool), all
    ``(t,)``. ``record``: how many iterations of ``α, β`` to make room for at first (0: no
    record; the buffers grow as needed).
    """

    def __init__(self, rz: Tensor, res: Tensor, b_norm: Tensor, active: Tensor, zero: Tensor,
                 tol: float, record: int = 0):
        t, dev = rz.shape[0], rz.device
        self.t, self.tol = t, float(tol)
        self.tiny = float(torch.finfo(rz.dtype).tiny)
        self.rz = rz.contiguous().clone()
        self.res = res.contiguous().clone()
        self.b_norm = b_norm.contiguous()
        self.active = active.to(torch.int32).contiguous()
        self.zero = zero.to(torch.int32).contiguous()
        self.iters = torch.zeros(t, dtype=torch.long, device=dev)
        self.coef = torch.empty(2, t, dtype=rz.dtype, device=dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)
        self.flag = self.active.amax().reshape(1) if t else torch.zeros(1, dtype=torch.int32, device=dev)
        self._part: Optional[Tensor] = None
        self.recording = record > 0
        self.alphas = torch.empty(record, t, dtype=rz.dtype, device=dev) if record else None
        self.betas = torch.empty(record, t, dtype=rz.dtype, device=dev) if record else None

    def partials(self, size: int) -> Tensor:
        """A float64 buffer of at least ``size`` elements for the blocks' partial sums (kept:
        every launch of the solve has the same grid)."""
        if self._part is None or self._part.numel() < size:
            self._part = torch.empty(size, dtype=torch.float64, device=self.rz.device)
        return self._part

    def any_active(self) -> bool:
        """Whether a column is still iterating (reads the device flag: synchronises)."""
        return bool(self.flag.item())

    def ensure_record(self, iteration: int) -> None:
        """Room for the coefficients of ``iteration`` (doubles the record buffers when full)."""
        if self.recording and iteration >= self.alphas.shape[0]:
            grow = max(2 * self.alphas.shape[0], iteration + 1)
            self.alphas = torch.cat([self.alphas, self.alphas.new_empty(grow - self.alphas.shape[0], self.t)])
            self.betas = torch.cat([self.betas, self.betas.new_empty(grow - self.betas.shape[0], self.t)])


@dataclass(frozen=True)
class CgSpec:
    """One CG step kind (``"dot"``, ``"update"``, ``"direction"``) for one dtype."""

    itemsize: int
    mode: str
    rows: bool = False  # blocks (t, n) with contiguous right-hand sides, else (n, t)

    kind = "cg"
    smem_bytes = 0  # static shared memory only

    def source(self, name: str) -> str:
        return kernel_source(name, self.itemsize, f"static constexpr int MODE = {_MODES[self.mode]};",
                             "kron_cg_rows" if self.rows else "kron_cg", 256 if self.rows else 1024, args="CgArgs")


def _threads(t: int) -> int:
    """Threads per block: a multiple of ``t`` (so each thread keeps one column), ~256."""
    return t * max(1, 256 // t)


def cg_launch(
    dev: DeviceKernels,
    mode: str,
    state: CgState,
    *,
    x: Optional[Tensor] = None,
    r: Optional[Tensor] = None,
    p: Tensor,
    ap: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    rows: bool = False,
    iteration: int = 0,
    force: bool = False,
) -> None:
    """Launch one step of iteration ``iteration`` on the current stream; ``"dot"`` and
    ``"update"`` also update ``state`` (``force``: keep every non-zero column, the
    ``min_iters`` rule).

    Every block is a contiguous ``(n, t)`` tensor (``(t, n)`` with ``rows``) of one dtype on
    one device, ``d`` a contiguous ``(n,)`` tensor or ``None``; the caller
    (:func:`kronegp.solvers.block_cg`) guarantees it.
    """
    t, n = p.shape if rows else p.shape[::-1]
    spec = CgSpec(p.element_size(), mode, rows)
    fn = dev.function(spec)
    sms = dev.sm_count
    if rows:
        nt = 256
        blocks = max(1, min(-(-n // nt), -(-16 * sms // t)))
        grid = (blocks, t, 1)
    else:
        nt = _threads(t)
        blocks = max(1, min(-(-(n * t) // nt), 16 * sms))
        grid = (blocks, 1, 1)
    nsum = _NSUM[mode]
    part = state.partials(blocks * nsum * t) if nsum else None
    args = CgArgs()
    args.x = x.data_ptr() if x is not None else 0
    args.r = r.data_ptr() if r is not None else 0
    args.p = p.data_ptr()
    args.ap = ap.data_ptr() if ap is not None else 0
    args.d = d.data_ptr() if d is not None else 0
    args.coef = state.coef.data_ptr()
    args.part = part.data_ptr() if part is not None else 0
    args.n, args.t = n, t
    args.rz, args.res, args.bnorm = state.rz.data_ptr(), state.res.data_ptr(), state.b_norm.data_ptr()
    args.active, args.zero, args.iters = state.active.data_ptr(), state.zero.data_ptr(), state.iters.data_ptr()
    args.rec = 0
    if state.recording and mode != "direction":
        state.ensure_record(iteration)
        args.rec = (state.alphas if mode == "dot" else state.betas)[iteration].data_ptr()
    args.counter, args.any_active = state.counter.data_ptr(), state.flag.data_ptr()
    args.tol, args.tiny, args.force = state.tol, state.tiny, int(force)
    with dev.current():
        launch_struct(fn, grid, nt, args, current_stream_handle(p.device), spec)
