"""The element-wise steps of block CG in one pass each (``cuda_ext/cg_update.cuh``).

:func:`kronegp.solvers.block_cg` calls these through :meth:`CudaBackend.cg_dot`,
:meth:`~CudaBackend.cg_update` and :meth:`~CudaBackend.cg_direction` for contiguous CUDA
blocks ``(n, t)`` with a diagonal (or no) preconditioner; see the header for what each
computes and why it is faster than the same algebra in torch.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kronegp._cuda.launch import DeviceKernels, current_stream_handle, launch_struct

__all__ = ["CgSpec", "CgArgs", "CG_MAX_COLUMNS", "cg_launch"]

#: Widest block (columns) the kernels take: a thread block holds a whole number of rows' columns.
CG_MAX_COLUMNS = 1024
_MODES = {"dot": 0, "update": 1, "direction": 2}
_NSUM = {"dot": 1, "update": 2, "direction": 0}
_CTYPE = {4: "float", 8: "double"}


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
    ]


@dataclass(frozen=True)
class CgSpec:
    """One CG step kind (``"dot"``, ``"update"``, ``"direction"``) for one dtype."""

    itemsize: int
    mode: str
    rows: bool = False  # blocks (t, n) with contiguous right-hand sides, else (n, t)

    kind = "cg"
    smem_bytes = 0  # static shared memory only

    def source(self, name: str) -> str:
        return f"""
namespace {name}_ns {{
struct Spec {{
    typedef {_CTYPE[self.itemsize]} T;
    static constexpr int MODE = {_MODES[self.mode]};
}};
}}
extern "C" __global__ void __launch_bounds__({256 if self.rows else 1024}) {name}(const CgArgs a) {{
    kron_cg{"_rows" if self.rows else ""}<{name}_ns::Spec>(a);
}}
"""


def _threads(t: int) -> int:
    """Threads per block: a multiple of ``t`` (so each thread keeps one column), ~256."""
    return t * max(1, 256 // t)


def cg_launch(
    dev: DeviceKernels,
    mode: str,
    *,
    x: Optional[Tensor] = None,
    r: Optional[Tensor] = None,
    p: Tensor,
    ap: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    coef: Optional[Tensor] = None,
    rows: bool = False,
) -> Optional[Tensor]:
    """Launch one step on the current stream; returns the ``(NSUM, t)`` sums (in the block's
    dtype) for ``"dot"`` and ``"update"``, ``None`` for ``"direction"``.

    Every block is a contiguous ``(n, t)`` tensor (``(t, n)`` with ``rows``) of one dtype on
    one device, ``d`` a contiguous ``(n,)`` tensor or ``None``, ``coef`` contiguous ``(t,)``;
    the caller (:func:`kronegp.solvers.block_cg`) guarantees it.
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
    part = torch.empty((blocks, nsum, t), dtype=torch.float64, device=p.device) if nsum else None
    args = CgArgs()
    args.x = x.data_ptr() if x is not None else 0
    args.r = r.data_ptr() if r is not None else 0
    args.p = p.data_ptr()
    args.ap = ap.data_ptr() if ap is not None else 0
    args.d = d.data_ptr() if d is not None else 0
    args.coef = coef.data_ptr() if coef is not None else 0
    args.part = part.data_ptr() if part is not None else 0
    args.n, args.t = n, t
    with dev.current():
        launch_struct(fn, grid, nt, args, current_stream_handle(p.device), spec)
    if part is None:
        return None
    return part.sum(0).to(p.dtype)
