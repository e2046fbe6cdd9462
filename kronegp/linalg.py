"""Small dense linear algebra on Kronecker factors: their eigendecompositions
(:func:`symmetric_eig`), Kronecker products of vectors (:func:`kron_vector`) and the gradients
of a Kronecker bilinear form with respect to its factors (:func:`kron_bilinear_grads`, for
:class:`~kronegp.operators.KroneckerOperator` and the models alike).

Kronecker methods eigendecompose each factor ``K_k`` (``n_k × n_k``, typically 10–1000 rows)
once per set of hyperparameters. On a GPU a small ``torch.linalg.eigh`` is a chain of
~130–250 launch-bound kernels (cuSOLVER's Jacobi method in float32, ``syevd`` in float64).
On the host, LAPACK through torch (MKL) with its default thread count is slow for these
sizes (threads cost more than they bring below ~500 rows), but one thread per matrix is
fast, and several matrices then run side by side. Three factors, ms (H100 and its 16-core
host, 2026-11-24, ``benchmarks/eigh_options.py`` and timings of the same calls inside worker
threads; host columns without transfers — with them, ``symmetric_eig`` of three 128-row
factors takes 2.7–2.9 ms against 6.3 on the GPU path in the same run):

======  ===============  ==================  ===========  ==========================
rows    host, 16 thr.    host, 3 × 1 thread  GPU fp64     GPU fp64, 3 streams/threads
======  ===============  ==================  ===========  ==========================
64      0.96             0.59                2.64         3.11
128     15.7             1.62                5.48         2.93
256     48.3             7.96                6.72         4.97
365     80.3             19.9                10.6         8.53
======  ===============  ==================  ===========  ==========================

The rule of :func:`symmetric_eig`:

* CUDA matrices with at most :data:`DEVICE_JACOBI_MAX_ROWS` rows (by default as many as the
  GPU's shared memory holds: 168 on an H100) are decomposed by kronegp's Jacobi kernel
  (``cuda_ext/jacobi_eigh.cuh``) in one launch, without synchronising — started from the float64
  eigenvectors of the previous matrix decomposed at the same place (device, dtype, size,
  position among the call's matrices of that size; float32 and float64 apart: a start
  converged only to float32's tolerance leaves float64 runs converging slowly, and their stop
  rule early — ~1e-8 off). A training step's factors differ little from the previous
  step's: three sweeps instead of ~18 from scratch, one for an unchanged matrix (H100, three
  128-row factors: 0.5–0.9 ms of GPU time, float32 or float64, none of the host's). The first
  decomposition at a place takes the rules below and keeps its float64 eigenvectors as the
  start; the result does not depend on the start beyond the kernel's tolerance
  (:data:`kronegp._cuda.eigh.TOL`);
* other CUDA matrices with at most :data:`HOST_EIGH_MAX_ROWS` rows are copied to the host in one
  transfer, decomposed there in float64, and copied back in one transfer;
* host decompositions of at most :data:`HOST_WORKER_MAX_ROWS` rows run one per worker
  thread, each worker limited to one OpenMP thread (``threadpoolctl``; the limit is
  thread-local, so the caller's and torch's own thread settings are untouched); larger
  ones run on the calling thread with torch's threads;
* a host decomposition of a centrosymmetric matrix (symmetric Toeplitz: a stationary kernel on
  evenly spaced points, to rounding) with at least :data:`CENTRO_MIN_ROWS` rows is two
  half-size problems, its even and odd eigenvectors (``_centro_eigh``);
* larger CUDA matrices are decomposed on their own device in float64, several at a time,
  each from its own host thread on its own side stream (ordered after the caller's stream,
  and the caller's stream after them);
* results come back in the input's dtype, on the input's device. Computing in float64 also
  makes float32 eigenvectors orthonormal to float32 rounding.

Results are cached (a few entries, least recently used first out) by the identity of the
input tensor: its storage, offset, shape, strides, dtype and version counter, holding a
reference so that the storage cannot be reused while cached. An in-place change bumps the
version and misses the cache; writes that bypass autograd's version counter (``.data``,
DLPack) are not seen — call :func:`clear_eig_cache` after them, or set
:data:`EIG_CACHE_SIZE` to 0.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from kronegp import device, ops

__all__ = [
    "symmetric_eig", "clear_eig_cache", "kron_vector", "kron_bilinear_grads", "device_eigh_rows", "jacobi_start_buffers", "DEVICE_JACOBI_MAX_ROWS", "HOST_EIGH_MAX_ROWS",
    "HOST_WORKER_MAX_ROWS", "CENTRO_MIN_ROWS", "EIG_CACHE_SIZE",
]

#: CUDA matrices with at most this many rows are decomposed by kronegp's Jacobi kernel on their
#: device (``None``: as many as fit in the GPU's shared memory, 168 on an H100, 142 on an A100;
#: 0: never). Needs the CUDA backend (:func:`kronegp.backend_info`).
DEVICE_JACOBI_MAX_ROWS: Optional[int] = None
#: Other matrices of a CUDA device with at most this many rows are decomposed on the host.
HOST_EIGH_MAX_ROWS = 160
#: Host decompositions of at most this many rows run in single-threaded workers, side by side.
HOST_WORKER_MAX_ROWS = 512
#: Host matrices that are centrosymmetric (symmetric Toeplitz: stationary kernels on evenly
#: spaced axes) with at least this many rows are decomposed as two half-size problems (0 switches
#: that off). Three factors on a 2-core host, ms, direct → split: 64 rows 0.55 → 1.03, 128 rows
#: 1.99 → 1.73, 256 rows 10.5 → 7.8, 365 rows 22.2 → 14.1; inside a 128³ GridGP step on the
#: H100's 16-core host the split of 128-row factors cost 1.1–1.9 ms more (three workers' small
#: torch ops), so it starts where LAPACK's time dominates. CUDA matrices decomposed on the device
#: are not split (two half-size ``syevd`` chains are twice the launches).
CENTRO_MIN_ROWS = 256
#: How many decompositions :func:`symmetric_eig` keeps (0 disables the cache).
EIG_CACHE_SIZE = 16

_cache: "OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]]" = OrderedDict()
# The Jacobi kernel's starting points: float64 eigenvectors of the last matrix decomposed per
# (device, dtype, size, position among a call's matrices of that size), which the kernel overwrites,
# with the stream that last wrote them.
_starts: dict = {}
_pool: Optional[ThreadPoolExecutor] = None
_host_pool: Optional[ThreadPoolExecutor] = None


def _one_openmp_thread() -> None:
    # omp_set_num_threads is per thread: this worker's LAPACK (MKL under torch's OpenMP)
    # runs on one thread; the caller's thread and torch's own pool keep their settings.
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=1, user_api="openmp")


def _get_host_pool() -> ThreadPoolExecutor:
    global _host_pool
    if _host_pool is None:
        _host_pool = ThreadPoolExecutor(
            max_workers=max(1, min(8, os.cpu_count() or 1)),
            thread_name_prefix="kronegp-host-eigh",
            initializer=_one_openmp_thread,
        )
    return _host_pool


def _centro_split(m: Tensor, eps: float) -> Optional[tuple[Tensor, Tensor]]:
    """The even and odd blocks of ``m`` (read from its lower triangle, as ``eigh`` does) when it
    is centrosymmetric, ``m[i, j] = m[n−1−i, n−1−j]``, to within ``2·eps·max|m|``; else ``None``.

    A symmetric centrosymmetric ``m`` (every symmetric Toeplitz matrix: a stationary kernel on
    evenly spaced points) commutes with the exchange ``J``, so its eigenvectors can be taken
    even (``Jv = v``) or odd (``Jv = −v``), and it splits into two eigenproblems of half the size
    (Cantoni & Butler, 1976). With ``h = ⌊n/2⌋``, ``A = m[:h, :h]``, ``B = m[:h, n−h:]`` and
    ``BJ`` = ``B`` with its columns reversed: odd block ``A − BJ``; even block ``A + BJ``, bordered
    for odd ``n`` by ``√2·m[:h, h]`` and ``m[h, h]``. The matrix is first made exactly symmetric
    and centrosymmetric (a change within the tolerance, i.e. within the rounding of its entries).
    """
    n = m.shape[0]
    sym = torch.tril(m) + torch.tril(m, -1).mT
    scale = float(sym.abs().max())
    rot = sym.flip(0, 1)
    if scale == 0.0 or float((sym - rot).abs().max()) > 2.0 * eps * scale:
        return None
    c = 0.5 * (sym + rot)
    h = n // 2
    a, bj = c[:h, :h], c[:h, n - h :].flip(1)
    odd = a - bj
    even = a + bj
    if n % 2:  # bordered by the middle row and column
        mid = c[h : h + 1]
        even = torch.cat([torch.cat([even, (2.0**0.5) * mid[:, :h].mT], 1), torch.cat([(2.0**0.5) * mid[:, :h], mid[:, h : h + 1]], 1)])
    return 0.5 * (even + even.mT), 0.5 * (odd + odd.mT)


def _centro_eigh(m: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(m)`` (eigenvalues ascending), through two half-size problems when
    :func:`_centro_split` applies (about a quarter of the arithmetic), else directly."""
    n = m.shape[0]
    blocks = _centro_split(m, eps) if 0 < CENTRO_MIN_ROWS <= n else None
    if blocks is None:
        return torch.linalg.eigh(m)
    h = n // 2
    lam_e, u = torch.linalg.eigh(blocks[0])
    lam_o, v = torch.linalg.eigh(blocks[1])
    r = 2.0**-0.5
    # even vectors [u; (√2·u_h); J u]/√2, odd vectors [v; (0); −J v]/√2
    top_e, top_o = r * u[:h], r * v
    parts_e = [top_e] + ([u[h : h + 1]] if n % 2 else []) + [top_e.flip(0)]
    parts_o = [top_o] + ([v.new_zeros(1, h)] if n % 2 else []) + [-top_o.flip(0)]
    lam = torch.cat([lam_e, lam_o])
    q = torch.cat([torch.cat(parts_e), torch.cat(parts_o)], 1)
    order = torch.argsort(lam, stable=True)
    return lam[order], q[:, order]


def _host_eighs(pieces: list[Tensor], eps: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
    """``eigh`` of host float64 matrices (:func:`_centro_eigh`; ``eps``: the rounding unit of each
    matrix's original dtype): small ones side by side in single-threaded workers, larger ones on
    this thread with torch's threads."""
    bad = {i for i, p in enumerate(pieces) if not np.isfinite(np.tril(p.numpy())).all()}  # what eigh reads
    small = [i for i, p in enumerate(pieces) if p.shape[0] <= HOST_WORKER_MAX_ROWS and i not in bad]
    futures = {i: _get_host_pool().submit(_centro_eigh, pieces[i], eps[i]) for i in small}
    out: list = [None] * len(pieces)
    for i, p in enumerate(pieces):
        if i in bad:
            out[i] = _nan_pair(p.shape[0], p.dtype, p.device)
        elif i not in futures:
            out[i] = _centro_eigh(p, eps[i])
    for i, fut in futures.items():
        out[i] = fut.result()
    return out  # type: ignore[return-value]


def jacobi_start_buffers() -> list[Tensor]:
    """The device eigensolver's warm starts (float64 eigenvectors it reads and overwrites in
    place, one per device, dtype, size and position): a CUDA graph that replays
    :func:`symmetric_eig` holds them so that they outlive the capture."""
    return [buf for buf, _ in _starts.values()]


def clear_eig_cache() -> None:
    """Forget every cached decomposition (and the Jacobi kernel's warm starts)."""
    _cache.clear()
    _starts.clear()


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


def _nan_pair(n: int, dtype, device) -> tuple[Tensor, Tensor]:
    """The eigenpairs of a matrix holding NaN or Inf: NaN, as the Jacobi kernel gives them.

    LAPACK and cuSOLVER do not agree on such input (they raise "failed to converge", return
    NaN, or return finite numbers, by size and by which entries are bad), so the host and
    cuSOLVER paths do not call them with it: a model then sees a NaN loss and says which
    hyperparameters gave it, on every device."""
    return (torch.full((n,), math.nan, dtype=dtype, device=device),
            torch.full((n, n), math.nan, dtype=dtype, device=device))


def _device_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    if not bool(torch.isfinite(torch.tril(m)).all()):  # a synchronisation, as torch's eigh makes anyway
        return _nan_pair(m.shape[0], m.dtype, m.device)
    lam, q = torch.linalg.eigh(m.to(torch.float64))
    return lam.to(m.dtype), q.to(m.dtype)


def device_eigh_rows(like: Tensor) -> int:
    """The most rows of a matrix that :func:`symmetric_eig` hands to the device's eigensolver
    (the backend's :meth:`~kronegp.device.Backend.eigh_capability`, capped by
    :data:`DEVICE_JACOBI_MAX_ROWS`) on ``like``'s device; 0 where it has none."""
    if DEVICE_JACOBI_MAX_ROWS == 0:
        return 0
    rows = device.backend_for(like).eigh_capability(like).limit
    return rows if DEVICE_JACOBI_MAX_ROWS is None else min(rows, DEVICE_JACOBI_MAX_ROWS)


def _jacobi_eighs(mats: list[Tensor], keys: list[tuple]) -> list[tuple[Tensor, Tensor]]:
    """The Jacobi kernel on CUDA matrices, one launch per (device, dtype, size), each started
    from (and leaving in) the float64 eigenvectors kept under its key in :data:`_starts`."""
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.device, m.dtype, m.shape[0]), []).append(i)
    out: list = [None] * len(mats)
    for idx in groups.values():
        batch = [mats[i].detach().contiguous() for i in idx]
        stream = torch.cuda.current_stream(batch[0].device)
        starts = []
        for i in idx:
            buf, last = _starts[keys[i]]
            if last != stream:  # written on another stream: order this one after it
                stream.wait_stream(last)
                buf.record_stream(stream)
                _starts[keys[i]] = (buf, stream)
            starts.append(buf)
        for i, pair in zip(idx, device.backend_for(batch[0]).small_eigh(batch, starts, starts)):
            out[i] = pair
    return out


def _keep_start(key: tuple, q: Tensor) -> None:
    """Keep float64 eigenvectors ``q`` (on their CUDA device) as the Jacobi kernel's start at ``key``."""
    _starts[key] = (q, torch.cuda.current_stream(q.device))


_NUMPY_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_side_streams: dict = {}
_device_warm = False


def _device_eigh_concurrent(mats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """One host thread and one side stream per matrix: a small ``eigh`` is a chain of ~130
    launch-bound kernels, so several chains overlap on the GPU and on the host."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kronegp-eigh")
    current = [torch.cuda.current_stream(m.device) for m in mats]

    def run(i: int):
        m = mats[i]
        key = (m.device, i % 4)
        stream = _side_streams.get(key)
        if stream is None:
            stream = _side_streams[key] = torch.cuda.Stream(device=m.device)
        stream.wait_stream(current[i])  # m is ready on the caller's stream
        with torch.cuda.stream(stream):
            pair = _device_eigh(m)
        return pair, stream

    results = list(_pool.map(run, range(len(mats))))
    out = []
    for i, ((lam, q), stream) in enumerate(results):
        current[i].wait_stream(stream)
        # Made on the side stream, used on the caller's: keep the allocator from reusing
        # their memory before the caller's stream is done with it.
        lam.record_stream(current[i])
        q.record_stream(current[i])
        mats[i].record_stream(stream)
        out.append((lam, q))
    return out


def symmetric_eig(mats: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(eigenvalues ascending, eigenvectors)`` of each symmetric matrix, without autograd.

    Only the lower triangle is read (as ``torch.linalg.eigh`` does). See the module
    docstring for where each decomposition runs and how results are cached.

    Args:
        mats: square float32/float64 matrices, on any devices, of any sizes.

    Returns:
        one ``(λ, Q)`` pair per matrix, ``M = Q diag(λ) Qᵀ``, in the matrix's dtype and on its
        device. A matrix holding NaN or Inf gets NaN eigenvalues and eigenvectors on every path
        (the GPU Jacobi kernel, which does not synchronise and so cannot raise, also gives NaN
        eigenvalues to a matrix it does not converge in :data:`kronegp._cuda.eigh.MAX_SWEEPS`
        sweeps); on a finite matrix LAPACK and cuSOLVER raise or return NaN as they do.
    """
    mats = list(mats)
    _check(mats)
    out: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(mats)
    keys = []
    host, device_side, jacobi = [], [], []
    slots: dict = {}
    start_keys: list = [None] * len(mats)  # where the Jacobi kernel keeps each one's start
    for i, m in enumerate(mats):
        if m.device.type == "cuda" and 0 < m.shape[0] <= device_eigh_rows(m):
            place = (m.device, m.dtype, m.shape[0])
            slot = slots[place] = slots.get(place, -1) + 1
            start_keys[i] = (*place, slot)
        key = _key(m)
        keys.append(key)
        if key is not None and key in _cache:
            _cache.move_to_end(key)
            out[i] = _cache[key][1:]
            continue
        if start_keys[i] in _starts:
            jacobi.append(i)
        elif m.device.type == "cpu" or m.shape[0] <= HOST_EIGH_MAX_ROWS:
            host.append(i)
        else:
            device_side.append(i)
    with torch.no_grad():
        if jacobi:
            for i, pair in zip(jacobi, _jacobi_eighs([mats[i] for i in jacobi], [start_keys[i] for i in jacobi])):
                out[i] = pair
        if host:
            # One device→host transfer for all of them (a single synchronisation), in their own
            # dtype when they share one: the widening to float64 then happens on the host, not
            # as a kernel per matrix.
            # (NumPy for the host-side casts: a torch CPU op this size wakes torch's OpenMP
            # pool, whose spinning threads then compete with the LAPACK workers.)
            parts = [mats[i].detach().reshape(-1) for i in host]
            if len({p.dtype for p in parts}) > 1:
                parts = [p.to(torch.float64) for p in parts]
            flat = torch.cat(parts)
            flat = torch.from_numpy(flat.cpu().numpy().astype(np.float64, copy=False))
            pieces, offset = [], 0
            for i in host:
                n = mats[i].shape[0]
                pieces.append(flat[offset : offset + n * n].view(n, n))
                offset += n * n
            # One host→device transfer per device and dtype back, narrowed to the matrices'
            # dtype on the host (no cast kernels on the device).
            by_target: dict = {}
            eps = [torch.finfo(mats[i].dtype).eps for i in host]
            for i, (lam, q) in zip(host, _host_eighs(pieces, eps)):
                by_target.setdefault((mats[i].device, mats[i].dtype), []).append((i, lam, q))
                if start_keys[i] is not None and np.isfinite(lam.numpy()).all():  # the Jacobi kernel's first start
                    _keep_start(start_keys[i], torch.from_numpy(np.ascontiguousarray(q.numpy())).to(mats[i].device))
            for (dev, dt), items in by_target.items():
                packed = np.concatenate([np.concatenate([lam.numpy(), q.numpy().reshape(-1)]) for _, lam, q in items])
                packed = torch.from_numpy(packed.astype(_NUMPY_DTYPE[dt], copy=False))
                if dev.type != "cpu":
                    packed = packed.to(dev)
                offset = 0
                for i, lam, q in items:
                    n = lam.shape[0]
                    out[i] = (packed[offset : offset + n], packed[offset + n : offset + n + n * n].view(n, n))
                    offset += n + n * n
        global _device_warm
        if not _device_warm and device_side:
            # torch loads its CUDA linear-algebra library lazily on the first call, and
            # that load is not safe to race from several threads: do one call here first.
            i = device_side.pop(0)
            out[i] = _device_eigh(mats[i].detach())
            _device_warm = True
        if len(device_side) > 1 and all(mats[i].device.type == "cuda" for i in device_side):
            for i, pair in zip(device_side, _device_eigh_concurrent([mats[i].detach() for i in device_side])):
                out[i] = pair
        else:
            for i in device_side:
                out[i] = _device_eigh(mats[i].detach())
    for i in device_side:
        if start_keys[i] is not None and bool(torch.isfinite(out[i][0]).all()):  # (synchronised already)
            # a copy of its own: the kernel overwrites its start, and Q is the caller's result
            _keep_start(start_keys[i], out[i][1].to(torch.float64, memory_format=torch.contiguous_format, copy=True))
    for i, key in enumerate(keys):
        if key is not None and key not in _cache:
            _cache[key] = (mats[i].detach(), *out[i])
            while len(_cache) > EIG_CACHE_SIZE:
                _cache.popitem(last=False)
    return out  # type: ignore[return-value]


def kron_vector(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ⊗ … ⊗ v_N`` for vectors ``(*batch_i, n_i)`` (last index fastest; batch shapes
    broadcast), e.g. the eigenvalues ``⊗λ_k`` of a Kronecker product.

    Broadcast outer products: a Kronecker product of vectors has no contraction, so it is
    ``N − 1`` element-wise products rather than a Kronecker matmul call.
    """
    out = vectors[0]
    for v in vectors[1:]:
        out = (out.unsqueeze(-1) * v.unsqueeze(-2)).reshape(*torch.broadcast_shapes(out.shape[:-1], v.shape[:-1]), -1)
    return out


# ------------------------------------------------------------------ bilinear derivative, dense factors
#
# Layout. ``U`` and ``V`` arrive as ``(*batch, ΠP_i, T)``: grid axes in natural order, the
# ``T`` columns trailing. Every contraction and factor application below is a GEMM on a
# copy-free view ``(A, n, C)`` of one grid axis ``n``; it is well shaped (one GEMM, or a
# batch of large ones) unless ``C = T`` is the short side, which happens for the LAST
# grid axis only. So the columns are moved once, in front of the last axis: grid axes
# ``(d_1, …, d_{N-1}, T, d_N)`` (one pass per block, in :func:`_columns_before_last_axis`).
# There the last axis is the single GEMM ``(Πd_{<N}·T, d_N)``, the first axis the single
# GEMM ``(d_1, rest)``, and a middle axis a batch over ``A = Πd_{<j}`` of
# ``(d_j, Πd_{j<i<N}·T·d_N)`` products.


def _columns_before_last_axis(x: Tensor, last: int) -> Tensor:
    """``x`` ``(*batch, R·last, T)`` as the contiguous ``(*batch, R, T, last)`` (one copy)."""
    return x.unflatten(-2, (-1, last)).transpose(-1, -2).contiguous()


def _apply_on_axis(
    x: Tensor, nb: int, sizes: Sequence[int], t: int, j: int, mat: Tensor
) -> tuple[Tensor, int]:
    r"""``(I ⊗ … ⊗ M ⊗ … ⊗ I) x``: ``mat`` ``(*batch_m, O, sizes[j])`` on grid axis ``j`` of ``x``.

    ``x`` is contiguous in the columns-before-last-axis layout with ``nb`` leading batch
    dims and grid axis sizes ``sizes``. One public Kronecker op on a view, no copy:
    the last axis is ``x (Πd_{<N}·T, d_N) · Mᵀ`` (:func:`kronegp.matmul_kron`), any
    other axis ``M · x (A, d_j, C)`` (:func:`kronegp.kron_matmul`, batched over ``A``: a batched ``M`` skips that axis).
    Returns the result (same layout, axis ``j`` of size ``O``) and its batch rank.
    """
    n = len(sizes)
    batch = x.shape[:nb]
    if j == n - 1:
        y = ops.matmul_kron(x.reshape(*batch, math.prod(sizes[:-1]) * t, sizes[j]), [mat.mT])
        return y, y.dim() - 2
    a = math.prod(sizes[:j])
    c = math.prod(sizes[j + 1 : n - 1]) * t * sizes[n - 1]
    if a == 1:
        y = ops.kron_matmul([mat], x.reshape(*batch, sizes[j], c))
        return y, y.dim() - 2
    y = ops.kron_matmul([mat.unsqueeze(-3) if mat.dim() > 2 else mat], x.reshape(*batch, a, sizes[j], c))
    return y, y.dim() - 3


def _contract_off_axis(
    xu: Tensor, nbu: int, su: Sequence[int], xv: Tensor, nbv: int, sv: Sequence[int], t: int, j: int
) -> Tensor:
    r"""``G[p, q] = Σ xu[…, p, …] · xv[…, q, …]`` over every index but grid axis ``j``.

    Both blocks are in the columns-before-last-axis layout and agree in every grid axis
    but ``j`` (sizes ``su``, ``sv``). The last axis is one GEMM over the rows
    ``Πd_{<N}·T``; the first one GEMM over ``C``; a middle axis a batch of GEMMs over
    ``A`` summed afterwards (``A·p·q`` entries written), or, where that would write more
    than the blocks hold, ``einsum``'s copy to ``(p, A·C)`` and one GEMM.
    """
    n = len(su)
    bu, bv = xu.shape[:nbu], xv.shape[:nbv]
    p, q = su[j], sv[j]
    if j == n - 1:
        rows = math.prod(su[:-1]) * t
        return torch.matmul(xu.reshape(*bu, rows, p).mT, xv.reshape(*bv, rows, q))
    a = math.prod(su[:j])
    c = math.prod(su[j + 1 : n - 1]) * t * su[n - 1]
    if a == 1:
        return torch.matmul(xu.reshape(*bu, p, c), xv.reshape(*bv, q, c).mT)
    u3, v3 = xu.reshape(*bu, a, p, c), xv.reshape(*bv, a, q, c)
    if p * q <= (p + q) * c:
        return torch.matmul(u3, v3.mT).sum(-3)
    return torch.einsum("...apc,...aqc->...pq", u3, v3)


def kron_bilinear_grads(
    mats: Sequence[Tensor], left: Tensor, right: Tensor, needs: Optional[Sequence[bool]] = None
) -> list[Optional[Tensor]]:
    r"""``G_j = ∂/∂F_j Σ_c u_cᵀ (F_1 ⊗ … ⊗ F_N) v_c`` for dense ``F_j`` (``mats[j]``, ``(*b_j, P_j, Q_j)``).

    ``left`` ``U`` is ``(*batch, ΠP_i, T)``, ``right`` ``V`` is ``(*batch, ΠQ_i, T)``. With
    the grid indices written out::

        G_j[p, q] = Σ_{a, b, c} Ũ_j[a, p, b, c] · Ṽ_j[a, q, b, c]
        Ũ_j = (F_1ᵀ ⊗ … ⊗ F_{j-1}ᵀ ⊗ I ⊗ … ⊗ I) U           (a over Q_1…Q_{j-1})
        Ṽ_j = (I ⊗ … ⊗ I ⊗ F_{j+1} ⊗ … ⊗ F_N) V             (b over P_{j+1}…P_N)

    Prefix and suffix are shared: ``Ũ_{j+1}`` is ``Ũ_j`` with ``F_jᵀ`` applied to axis ``j``,
    ``Ṽ_{j-1}`` is ``Ṽ_j`` with ``F_j`` applied to axis ``j``, so ``2(N−1)`` factor
    applications (one public Kronecker op each) and ``N`` contractions (one GEMM each,
    see :func:`_contract_off_axis`) do all ``N`` gradients; ``U`` and ``V`` are each moved
    once to the columns-before-last-axis layout (see the comment above). Factors outside
    ``needs[lo..hi]`` cost nothing beyond the chains that reach the needed ones. Each
    ``G_j`` comes back with the broadcast batch shape of ``U``, ``V`` and the factors
    (``None`` where not needed). No autograd graph is recorded (call under ``no_grad``).
    """
    n = len(mats)
    needs = [True] * n if needs is None else list(needs)
    out: list[Optional[Tensor]] = [None] * n
    if not any(needs):
        return out
    if n == 1:
        out[0] = torch.matmul(left, right.mT)  # Σ_c u_c v_cᵀ
        return out
    ps = [int(m.shape[-2]) for m in mats]
    qs = [int(m.shape[-1]) for m in mats]
    t = left.shape[-1]
    lo = needs.index(True)
    hi = n - 1 - needs[::-1].index(True)

    # Ṽ_j for j = N-1 … lo, each from the next by one factor (kept until its contraction)
    v_blocks: dict[int, tuple[Tensor, int, list[int]]] = {}
    v = _columns_before_last_axis(right, qs[-1])
    nbv, sv = v.dim() - 3, list(qs)
    v_blocks[n - 1] = (v, nbv, list(sv))
    for j in range(n - 2, lo - 1, -1):
        v, nbv = _apply_on_axis(v, nbv, sv, t, j + 1, mats[j + 1])
        sv[j + 1] = ps[j + 1]
        v_blocks[j] = (v, nbv, list(sv))
    del v

    # Ũ_j for j = 0 … hi, contracted with Ṽ_j as soon as both exist
    u = _columns_before_last_axis(left, ps[-1])
    nbu, su = u.dim() - 3, list(ps)
    for j in range(hi + 1):
        if j > 0:
            u, nbu = _apply_on_axis(u, nbu, su, t, j - 1, mats[j - 1].mT)
            su[j - 1] = qs[j - 1]
        block = v_blocks.pop(j, None)
        if needs[j]:
            vj, nbvj, svj = block
            out[j] = _contract_off_axis(u, nbu, su, vj, nbvj, svj, t, j)
    return out
