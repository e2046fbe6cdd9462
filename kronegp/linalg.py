"""Eigendecompositions of the small symmetric matrices kronegp works with.

Kronecker methods eigendecompose each factor ``K_k`` (``n_k × n_k``, typically 10–1000 rows)
once per set of hyperparameters. On a GPU ``torch.linalg.eigh`` is a poor fit for that: a
128 × 128 float32 matrix takes ~2 ms and ~250 kernel launches (cuSOLVER's Jacobi method;
float64 uses ``syevd``, ~1.8 ms), while LAPACK on the host takes ~0.6 ms in float64 and
launches nothing (H100 host and device, 2026-11-24, ``benchmarks/profile_step.py``).

The rule of :func:`symmetric_eig`:

* matrices with at most :data:`HOST_EIGH_MAX_ROWS` rows are copied to the host in one
  transfer, decomposed there in float64 (several at a time, on threads), and copied back in
  one transfer;
* larger ones are decomposed on their own device, in float64 (cuSOLVER's ``syevd``; its
  float32 Jacobi path is ~3× slower at 365 rows);
* results come back in the input's dtype, on the input's device. Computing in float64 also
  makes the float32 eigenvectors orthonormal to float32 rounding.

Results are cached (a few entries, least recently used first out) by the identity of the
input tensor: its storage, offset, shape, strides, dtype and version counter, holding a
reference so that the storage cannot be reused while cached. An in-place change bumps the
version and misses the cache; writes that bypass autograd's version counter (``.data``,
DLPack) are not seen — call :func:`clear_eig_cache` after them, or set
:data:`EIG_CACHE_SIZE` to 0.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["symmetric_eig", "clear_eig_cache", "HOST_EIGH_MAX_ROWS", "EIG_CACHE_SIZE"]

#: Matrices of a CUDA device with at most this many rows are decomposed on the host.
HOST_EIGH_MAX_ROWS = 256
#: How many decompositions :func:`symmetric_eig` keeps (0 disables the cache).
EIG_CACHE_SIZE = 16

_cache: "OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]]" = OrderedDict()
_pool: Optional[ThreadPoolExecutor] = None


def clear_eig_cache() -> None:
    """Forget every cached decomposition."""
    _cache.clear()


def _key(m: Tensor) -> Optional[tuple]:
    if EIG_CACHE_SIZE <= 0 or m.is_inference():
        return None
    return (m.data_ptr(), m.storage_offset(), tuple(m.shape), m.stride(), m.dtype, m.device, m._version)


def _check(mats: Sequence[Tensor]) -> None:
    for i, m in enumerate(mats):
        if not isinstance(m, Tensor):
            raise TypeError(f"mats[{i}] must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"mats[{i}] must be a square matrix (n, n), got shape {tuple(m.shape)}")
        if m.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"mats[{i}] must be float32 or float64, got {m.dtype}")


def _host_eigh(mats64: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    global _pool
    if len(mats64) == 1:
        return [torch.linalg.eigh(mats64[0])]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kronegp-eigh")
    return list(_pool.map(torch.linalg.eigh, mats64))


def symmetric_eig(mats: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(eigenvalues ascending, eigenvectors)`` of each symmetric matrix, without autograd.

    Only the lower triangle is read (as ``torch.linalg.eigh`` does). See the module
    docstring for where each decomposition runs and how results are cached.

    Args:
        mats: square float32/float64 matrices, on any devices, of any sizes.

    Returns:
        one ``(λ, Q)`` pair per matrix, ``M = Q diag(λ) Qᵀ``, in the matrix's dtype and on its
        device.
    """
    mats = list(mats)
    _check(mats)
    out: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(mats)
    keys = []
    host, device_side = [], []
    for i, m in enumerate(mats):
        key = _key(m)
        keys.append(key)
        if key is not None and key in _cache:
            _cache.move_to_end(key)
            out[i] = _cache[key][1:]
            continue
        if m.device.type == "cpu" or m.shape[0] <= HOST_EIGH_MAX_ROWS:
            host.append(i)
        else:
            device_side.append(i)
    with torch.no_grad():
        if host:
            # One device→host transfer for all of them (a single synchronisation).
            flat = torch.cat([mats[i].detach().reshape(-1).to(torch.float64) for i in host])
            flat = flat.cpu() if flat.device.type != "cpu" else flat
            pieces, offset = [], 0
            for i in host:
                n = mats[i].shape[0]
                pieces.append(flat[offset : offset + n * n].view(n, n))
                offset += n * n
            results = _host_eigh(pieces)
            # One host→device transfer per device back.
            by_device: dict = {}
            for i, (lam, q) in zip(host, results):
                by_device.setdefault(mats[i].device, []).append((i, lam, q))
            for dev, items in by_device.items():
                packed = torch.cat([torch.cat([lam, q.reshape(-1)]) for _, lam, q in items])
                if dev.type != "cpu":
                    packed = packed.to(dev)
                offset = 0
                for i, lam, q in items:
                    n = lam.shape[0]
                    dt = mats[i].dtype
                    lam_i = packed[offset : offset + n].to(dt)
                    q_i = packed[offset + n : offset + n + n * n].view(n, n).to(dt)
                    offset += n + n * n
                    out[i] = (lam_i, q_i)
        for i in device_side:
            m = mats[i].detach()
            lam, q = torch.linalg.eigh(m.to(torch.float64))
            out[i] = (lam.to(m.dtype), q.to(m.dtype))
    for i, key in enumerate(keys):
        if key is not None and key not in _cache:
            _cache[key] = (mats[i].detach(), *out[i])
            while len(_cache) > EIG_CACHE_SIZE:
                _cache.popitem(last=False)
    return out  # type: ignore[return-value]
