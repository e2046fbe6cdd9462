"""Eigendecompositions of small symmetric matrices on the GPU in one launch
(``cuda_ext/jacobi_eigh.cuh``: one-sided Jacobi in float64, the matrix in shared memory).

:func:`kronegp.linalg.symmetric_eig` routes CUDA matrices of at most :func:`max_rows` rows here
(through :meth:`kronegp.device.Backend.small_eigh`): the host never waits for the result,
where a host LAPACK decomposition needs a synchronising copy and cuSOLVER a chain of ~200
launches.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
from torch import Tensor

from kronegp._cuda.launch import DeviceKernels, current_stream_handle, launch_struct
from kronegp._cuda.plan import kernel_source

__all__ = ["EighSpec", "EighArgs", "EIGH_MAX_BATCH", "SHIFT", "TOL", "MAX_SWEEPS", "max_rows", "jacobi_eigh"]

#: Matrices per launch (the argument block holds this many pointers; more take several launches).
EIGH_MAX_BATCH = 8
#: The shift ``s = SHIFT·‖A‖_F`` added to the diagonal: above 1, ``A + sI`` is positive definite
#: for every symmetric ``A`` (``‖A‖_F ≥ |λ|``), which one-sided Jacobi needs to return
#: eigenvectors rather than singular vectors.
SHIFT = 1.0625
#: A pair of columns is rotated while ``|u_pᵀu_q| > TOL·‖u_p‖‖u_q‖``, per output dtype (the
#: sweeps end once no cosine above ``10·TOL`` is left, or convergence is visibly quadratic:
#: ``cuda_ext/jacobi_eigh.cuh``). float64: 1e-15 reconstructs a 128-row Matérn factor to
#: ~1e-13 relative (LAPACK: ~1e-14); float32: 1e-8, below float32 rounding (6e-8).
TOL = {torch.float64: 1e-15, torch.float32: 1e-8}
#: Sweeps before giving up (the eigenvalues are then NaN). Three 128-row Matérn factors on an H100:
#: from scratch 9 (float32) / 18 (float64) sweeps, from the eigenvectors of factors 2 % off 2 / 3,
#: from their own eigenvectors 1.
MAX_SWEEPS = 60


class EighArgs(ctypes.Structure):
    _fields_ = [
        ("a", ctypes.c_void_p * EIGH_MAX_BATCH),
        ("start", ctypes.c_void_p * EIGH_MAX_BATCH),
        ("keep", ctypes.c_void_p * EIGH_MAX_BATCH),
        ("lam", ctypes.c_void_p * EIGH_MAX_BATCH),
        ("q", ctypes.c_void_p * EIGH_MAX_BATCH),
        ("sweeps", ctypes.c_void_p),
        ("scratch", ctypes.c_void_p),
        ("shift", ctypes.c_double),
        ("tol", ctypes.c_double),
        ("max_sweeps", ctypes.c_int),
    ]


@dataclass(frozen=True)
class EighSpec:
    """The Jacobi kernel for ``N × N`` matrices of one dtype."""

    itemsize: int
    N: int
    LANES: int = 0  # threads per column pair (0: 8 up to 128 rows, else 32; measured on an H100)

    def __post_init__(self):
        if self.LANES == 0:
            object.__setattr__(self, "LANES", 8 if self.N <= 128 else 32)

    kind = "eigh"

    @property
    def NPAD(self) -> int:
        return self.N + self.N % 2

    @property
    def NT(self) -> int:
        """``LANES`` threads per column pair, a whole number of warps, at most 1024."""
        return min(1024, -(-self.LANES * (self.NPAD // 2) // 32) * 32)

    @property
    def smem_bytes(self) -> int:
        # U (NPAD × N doubles), norms and Rayleigh quotients (NPAD doubles each), ranks (NPAD ints)
        return 8 * (self.NPAD * self.N + 2 * self.NPAD) + 4 * self.NPAD

    def source(self, name: str) -> str:
        members = f"static constexpr int N = {self.N};\nstatic constexpr int NT = {self.NT};\nstatic constexpr int LANES = {self.LANES};"
        return kernel_source(name, self.itemsize, members, "kron_jacobi_eigh", self.NT, args="EighArgs",
                             checks=f"static_assert(KRONEGP_EIGH_MAX_BATCH == {EIGH_MAX_BATCH}, \"batch\");\n")


def _static_smem() -> int:
    return 3 * 8 * 32 + 16  # the kernel's __shared__ reduction scratch, shift and flag


@lru_cache(maxsize=None)
def max_rows(smem_optin: int) -> int:
    """The largest ``N`` whose kernel fits in ``smem_optin`` bytes of shared memory per block."""
    n = 1
    while EighSpec(8, n + 1).smem_bytes + _static_smem() <= smem_optin:
        n += 1
    return n


def jacobi_eigh(dev: DeviceKernels, mats: Sequence[Tensor], starts: Sequence[Optional[Tensor]],
                keeps: Optional[Sequence[Optional[Tensor]]] = None, sweeps: Optional[Tensor] = None,
                lanes: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``(λ ascending, Q)`` of each matrix, computed on the current stream without synchronising.

    ``mats``: contiguous ``(N, N)`` CUDA matrices of one size and dtype on ``dev``'s device (the
    lower triangle is read); ``starts``: per matrix a contiguous float64 ``(N, N)`` matrix with
    orthonormal columns on that device (the eigenvectors of a nearby matrix, in any order), or
    ``None``; ``keeps``: per matrix a contiguous float64 ``(N, N)`` buffer (it may be the
    matrix's start) that receives the eigenvectors in float64, unsorted (left as it was for a
    matrix holding NaN/Inf, so that a start is never poisoned), or ``None``.
    ``sweeps``: an int32 tensor of ``len(mats)`` elements on the device to receive the sweep
    counts, or ``None``. A matrix that did not converge in :data:`MAX_SWEEPS` sweeps, or holds a
    non-finite value, gets NaN eigenvalues. ``lanes``: threads per column pair (0: the default
    of :class:`EighSpec`).
    """
    n, dtype, device = mats[0].shape[0], mats[0].dtype, mats[0].device
    spec = EighSpec(mats[0].element_size(), n, lanes)
    fn = dev.function(spec)
    packed = torch.empty(len(mats), n + n * n, dtype=dtype, device=device)
    if sweeps is None:
        sweeps = torch.empty(len(mats), dtype=torch.int32, device=device)
    out = [(packed[i, :n], packed[i, n:].view(n, n)) for i in range(len(mats))]
    scratch = None
    if any(st is not None for st in starts):
        scratch = torch.empty(min(len(mats), EIGH_MAX_BATCH), n, n, dtype=torch.float64, device=device)
    stream = current_stream_handle(device)
    with dev.current():
        for b0 in range(0, len(mats), EIGH_MAX_BATCH):
            chunk = range(b0, min(len(mats), b0 + EIGH_MAX_BATCH))
            args = EighArgs()
            for k, i in enumerate(chunk):
                args.a[k] = mats[i].data_ptr()
                args.start[k] = starts[i].data_ptr() if starts[i] is not None else 0
                args.keep[k] = keeps[i].data_ptr() if keeps is not None and keeps[i] is not None else 0
                args.lam[k] = out[i][0].data_ptr()
                args.q[k] = out[i][1].data_ptr()
            args.sweeps = sweeps.data_ptr() + 4 * b0
            args.scratch = scratch.data_ptr() if scratch is not None else 0
            args.shift, args.tol, args.max_sweeps = SHIFT, TOL[dtype], MAX_SWEEPS
            launch_struct(fn, (len(chunk), 1, 1), spec.NT, args, stream, spec, smem=spec.smem_bytes)
    return out
