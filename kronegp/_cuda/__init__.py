"""The CUDA backend: our fused Kron-Matmul kernels, compiled at run time for the GPU at hand.

Layers (one module each):

* :mod:`kronegp._cuda.plan` — :func:`~kronegp._cuda.plan.plan_tiles`: which factors each launch
  fuses and with which tile; the kernel specs and the source text that specialises them.
* :mod:`kronegp._cuda.compiler` — NVRTC (``cuda.bindings.nvrtc``) to cubin, disk cache keyed by
  source hash, architecture, NVRTC version and specialisation.
* :mod:`kronegp._cuda.launch` — module loading and launches through the CUDA driver API on
  torch's current stream, with data pointers only; launch programs cached per call signature.
* :mod:`kronegp._cuda.axis_gemm` — the other path: one cuBLAS GEMM per factor (through torch) on
  copy-free natural-order views, for compute-bound factors (float32 in the three precision modes
  of :mod:`kronegp.precision`).
* :mod:`kronegp._cuda.records` — the lean host path: one launch record per call signature.

Per call signature, :func:`~kronegp._cuda.plan.choose_path` (a cost model of bytes and FLOPs per
pass) picks the fused kernels, the cuBLAS-per-factor path, or for ``kron_matmul`` with few columns
the rotating form (one cuBLAS GEMM per factor that leaves the result transposed, then our
transpose kernel). The first call of a signature (shapes, strides, dtype, device, x's 16-byte
alignment, precision) plans it and keeps a launch record (:mod:`kronegp._cuda.records`); later
calls look the record up by that signature and only allocate, patch pointers and launch.

:func:`load` returns the :class:`~kronegp.device.Backend` that :mod:`kronegp.device` hands out for
CUDA tensors; inputs reaching it were checked by :mod:`kronegp.ops` (same dtype and device,
consistent shapes, broadcastable batches).
"""

from __future__ import annotations

import hashlib
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from kronegp import reference
from kronegp.device import Backend, Capability
from kronegp._cuda.compiler import cache_dir, nvrtc_version, source_dir
from kronegp._cuda.launch import (
    DeviceKernels, Operand, RowProduct, _check, execute_program, run_row_product, run_transpose,
)
from kronegp._cuda.axis_gemm import axis_gemm_allowed, axis_products, rotated_products
from kronegp._cuda.plan import TRANSPOSE_MAX_D, PathChoice, TransposeSpec, choose_path, fused_mma, plan_tiles
from kronegp._cuda.records import AxisRecord, FusedRecord, ReferenceRecord, RotatedRecord
from kronegp._cuda.tune import PathTuner, time_candidates, tune_key

__all__ = ["load", "CudaBackend", "plan_tiles"]

_MIN_ARCH = 70  # the kernels use nothing newer than Volta; NVRTC decides the upper end
#: What the path choice assumes of shared memory (DeviceKernels plans with min(this, opt-in)).
_CHOICE_SMEM = 100 * 1024
_PATHS = ("auto", "fused", "axis_gemm", "axis_gemm_t")
_MAX_RECORDS = 4096  # launch records kept (a crude bound: signatures rarely number this many)


@lru_cache(maxsize=4096)
def _choice(shapes: tuple, m: int, itemsize: int, in_col: bool, out_col: bool, axis_ok: bool, force: str,
            precision: str = "highest", nb: int = 1) -> PathChoice:
    return choose_path(shapes, m, itemsize, in_col, out_col, _CHOICE_SMEM, axis_ok, force, precision=precision,
                       batch=nb)


def _batch_shape(x: Tensor, factors: Sequence[Tensor]) -> torch.Size:
    if x.dim() == 2 and all(f.dim() == 2 for f in factors):
        return torch.Size()  # the common case, without broadcast_shapes' cost
    return torch.broadcast_shapes(x.shape[:-2], *(f.shape[:-2] for f in factors))


def _batch_strides(t: Tensor, batch: torch.Size) -> tuple[int, ...]:
    """``t``'s strides over the broadcast batch shape (0 where ``t`` is broadcast)."""
    tb = t.shape[:-2]
    lead = len(batch) - len(tb)
    out = []
    for d in range(len(batch)):
        i = d - lead
        out.append(0 if i < 0 or tb[i] == 1 else t.stride(i))
    return tuple(out)


def tuner_stamp(gpu_name: str) -> dict:
    """What tuned timings depend on besides the call signature: the kernel sources, the cuBLAS
    paths (Python code in :mod:`kronegp._cuda.axis_gemm`: a change there voids old timings too),
    torch's version and the GPU model."""
    from kronegp._cuda import axis_gemm
    from kronegp._cuda.compiler import _sources_hash

    paths = hashlib.sha256(Path(axis_gemm.__file__).read_bytes()).hexdigest()
    return {"sources": _sources_hash(), "paths": paths, "torch": torch.__version__, "gpu": gpu_name}


class CudaBackend(Backend):
    """The :class:`~kronegp.device.Backend` of CUDA tensors: ``kron_matmul`` / ``matmul_kron``
    through the fused kernels or cuBLAS, the fused block-CG step, the Jacobi eigensolver."""

    def __init__(self, force_path: str | None = None, autotune: bool | None = None):
        self._devices: dict[int, DeviceKernels] = {}
        self._records: dict = {}  # call signature -> launch record (kronegp._cuda.records)
        self._tuners: dict[int, PathTuner] = {}  # device index -> its GPU model's tuned choices
        self.force_path = force_path or os.environ.get("KRONEGP_CUDA_PATH", "auto") or "auto"
        if autotune is None:
            autotune = os.environ.get("KRONEGP_AUTOTUNE", "") not in ("", "0")
        self.autotune = bool(autotune)
        #: save tuned choices in the kernel cache folder (tests switch this off)
        self.autotune_persist = True
        self.fused_mma_enabled = os.environ.get("KRONEGP_FUSED_MMA", "") not in ("", "0")

    @property
    def force_path(self) -> str:
        """``"auto"`` (the cost model decides), ``"fused"`` or ``"axis_gemm"`` (benchmarks, tests)."""
        return self._force_path

    @force_path.setter
    def force_path(self, value: str) -> None:
        if value not in _PATHS:
            raise ValueError(f"force_path must be one of {_PATHS}, got {value!r}")
        self._force_path = value
        self._records = {}  # records hold a path: choose again

    @property
    def fused_mma_enabled(self) -> bool:
        """The fused kernels' products on the tensor cores (fp64 DMMA; TF32 / split TF32 for
        float32 "medium" / "high"; sm_80+); ``KRONEGP_FUSED_MMA=1``. Opt-in until device timings
        show they pay."""
        return self._fused_mma

    @fused_mma_enabled.setter
    def fused_mma_enabled(self, value: bool) -> None:
        self._fused_mma = bool(value)
        self._records = {}

    @property
    def autotune(self) -> bool:
        """Time each signature's candidate paths on its first call (:mod:`kronegp._cuda.tune`)."""
        return self._autotune

    @autotune.setter
    def autotune(self, value: bool) -> None:
        self._autotune = bool(value)
        self._records = {}

    def _signature(self, side: str, x: Tensor, factors: Sequence[Tensor], batch: torch.Size | None = None) -> tuple:
        """``(shapes, rows, in_col, out_col, axis_ok, nb)`` of a call in row form: the factors as
        ``(P_i, Q_i)`` of ``G_i``, rows over the broadcast ``batch`` (computed if not given), the
        layouts of x and y, whether the cuBLAS path may run, and the batch size ``nb`` (the cost
        model needs it apart from the rows: a batched ``kron_matmul``'s batch leads its grid
        axes, its ``T`` columns trail them)."""
        nb = math.prod(_batch_shape(x, factors) if batch is None else batch)
        if side == "matmul_kron":
            shapes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in factors)
            m = x.shape[-2]
            in_col, out_col = m > 1 and x.stride(-2) == 1 and x.stride(-1) != 1, False
        else:
            shapes = tuple((int(f.shape[-1]), int(f.shape[-2])) for f in factors)
            m = x.shape[-1]
            in_col, out_col = m > 1 and x.stride(-1) == 1 and x.stride(-2) != 1, m > 1
        return shapes, m * nb, in_col, out_col, axis_gemm_allowed(x, factors), nb

    def choice(self, side: str, x: Tensor, factors: Sequence[Tensor], precision: str = "highest") -> PathChoice:
        """The cost model's plan for a call ``side`` (``"matmul_kron"``/``"kron_matmul"``) with
        these operands (``force_path`` applied)."""
        shapes, m, in_col, out_col, axis_ok, nb = self._signature(side, x, factors)
        return _choice(shapes, m, x.element_size(), in_col, out_col, axis_ok, self._force_path, precision, nb)

    def path_taken(self, side: str, x: Tensor, factors: Sequence[Tensor], precision: str = "highest") -> str:
        """The path such a call runs now: the tuned one where autotuning has timed this
        signature, else the cost model's (nothing is timed here)."""
        shapes, m, in_col, out_col, axis_ok, nb = self._signature(side, x, factors)
        if self.autotune and self._force_path == "auto":
            hit = self.tuner(x.device).lookup(
                tune_key(side, shapes, m, x.element_size(), in_col, out_col, axis_ok, precision, nb))
            if hit is not None:
                return hit
        return _choice(shapes, m, x.element_size(), in_col, out_col, axis_ok, self._force_path, precision, nb).path

    def tuner(self, device: torch.device) -> PathTuner:
        """The tuned path choices for the GPU model of ``device``."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        tuner = self._tuners.get(index)
        if tuner is None:
            name = torch.cuda.get_device_name(index)
            same_model = next((t for t in self._tuners.values() if t.stamp["gpu"] == name), None)
            if same_model is not None:
                tuner = same_model
            else:
                file = PathTuner.file_for(cache_dir(), name) if self.autotune_persist else None
                tuner = PathTuner(file, tuner_stamp(name))
            self._tuners[index] = tuner
        return tuner

    def _path(self, side: str, x: Tensor, shapes: tuple, m: int, in_col: bool, out_col: bool, axis_ok: bool, run,
              precision: str = "highest", nb: int = 1) -> str:
        """The path of one call: pinned (``force_path``), tuned (``autotune``), or the cost model's.

        ``run(path)`` performs the call by ``path``; autotuning times it on the first call of a
        signature (:mod:`kronegp._cuda.tune`)."""
        return self._path_final(side, x, shapes, m, in_col, out_col, axis_ok, run, precision, nb)[0]

    def _path_final(self, side, x, shapes, m, in_col, out_col, axis_ok, run, precision, nb=1) -> tuple[str, bool]:
        """:meth:`_path` and whether it is final (False: the model's stand-in until autotuning
        could time the signature, so no launch record may keep it)."""
        choice = _choice(shapes, m, x.element_size(), in_col, out_col, axis_ok, self._force_path, precision, nb)
        if not self.autotune or self._force_path != "auto":
            return choice.path, True
        times = {"fused": choice.predicted_fused_s, "axis_gemm": choice.predicted_axis_s,
                 "axis_gemm_t": choice.predicted_axis_t_s}
        candidates = [p for p, t in times.items() if t < math.inf]
        if len(candidates) < 2:
            return choice.path, True
        key = tune_key(side, shapes, m, x.element_size(), in_col, out_col, axis_ok, precision, nb)
        tuner = self.tuner(x.device)
        path = tuner.lookup(key)
        if path is None:
            if torch.cuda.is_current_stream_capturing():
                return choice.path, False  # no timing inside a graph capture
            times = time_candidates(run, candidates)
            if not times:
                return choice.path, False  # nothing ran within memory: the call itself will say so
            path = tuner.record(key, times, choice.path)
        return path, True

    def _device(self, t: Tensor) -> DeviceKernels:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        dev = self._devices.get(index)
        if dev is None:
            dev = self._devices[index] = DeviceKernels(index)
        return dev

    def _run(self, x: Tensor, prod: RowProduct):
        """Launch ``prod`` (planned and cached per signature by the launcher); returns
        ``(device, program)`` for a launch record, or None where nothing was launched."""
        dev = self._device(x)
        prog = run_row_product(dev, prod)
        return None if prog is None else (dev, prog)

    def cg_capability(self, like: Tensor) -> Capability:
        """The fused block-CG step (:mod:`kronegp._cuda.cg`) runs on CUDA tensors, blocks of up to
        :data:`~kronegp._cuda.cg.CG_MAX_COLUMNS` right-hand sides."""
        if like.device.type != "cuda":
            return Capability(False, f"the CUDA kernels take CUDA tensors, not {like.device.type}")
        from kronegp._cuda.cg import CG_MAX_COLUMNS

        return Capability(True, "fused CUDA block-CG step (kronegp._cuda.cg)", CG_MAX_COLUMNS)

    def cg_state(self, **initial):
        """The device-side per-column state of a fused block-CG solve (:class:`kronegp._cuda.cg.CgState`)."""
        from kronegp._cuda.cg import CgState

        return CgState(**initial)

    def cg_step(self, mode: str, state, **blocks) -> None:
        """One element-wise step of block CG in a single pass (:mod:`kronegp._cuda.cg`)."""
        from kronegp._cuda.cg import cg_launch

        cg_launch(self._device(blocks["p"]), mode, state, **blocks)

    def eigh_capability(self, like: Tensor) -> Capability:
        """The Jacobi kernel (:mod:`kronegp._cuda.eigh`) runs on CUDA tensors, matrices of as many
        rows as the device's shared memory holds."""
        if like.device.type != "cuda":
            return Capability(False, f"the CUDA kernels take CUDA tensors, not {like.device.type}")
        from kronegp._cuda.eigh import max_rows

        return Capability(True, "CUDA Jacobi eigensolver (kronegp._cuda.eigh)", max_rows(self._device(like).smem_optin))

    def small_eigh(self, mats: Sequence[Tensor], starts: Sequence[Tensor | None],
                   keeps: Sequence[Tensor | None] | None = None, sweeps: Tensor | None = None, lanes: int = 0):
        """Eigendecompositions of small symmetric matrices in one launch (:mod:`kronegp._cuda.eigh`)."""
        from kronegp._cuda.eigh import jacobi_eigh

        return jacobi_eigh(self._device(mats[0]), mats, starts, keeps, sweeps, lanes)

    def _transpose(self, src: Tensor, dst: Tensor, n: int, d: int, batch: int) -> None:
        """``batch`` contiguous wide ``(d, n)`` → tall ``(n, d)`` transposes (the rotating form's
        last pass).

        Our coalesced kernel for ``d`` ≤ 32 (torch's strided copy reaches ~0.8 TB/s on these
        shapes); torch's copy for wider ones, where it is efficient, and on non-CUDA tensors."""
        if d <= TRANSPOSE_MAX_D and src.device.type == "cuda":
            run_transpose(self._device(src), TransposeSpec(src.element_size(), d), src, dst, n, batch)
        else:
            dst.view(batch, n, d).copy_(src.view(batch, d, n).mT)

    def describe(self) -> str:
        major, minor = nvrtc_version()
        return (
            f"fused CUDA Kron-Matmul kernels + cuBLAS per factor, chosen per call by a cost model "
            f"(NVRTC {major}.{minor}, sources {source_dir()}, "
            f"cache {cache_dir()})"
        )

    # Per call: the signature is the record key; everything else happened on its first call.
    # x's shape and strides with its 16-byte residue, each factor's shape and strides, dtype,
    # device and precision are everything a record depends on (outputs and intermediates come
    # fresh from torch's caching allocator: aligned, contiguous).

    # ``signature`` (the door's remembered signature of the call, :class:`kronegp.ops.CallSignature`)
    # stands for all of that: the record is kept under it, and a repeated public call reads nothing
    # here but the record. Calls without one (the backward's products, tests) build the key.

    def matmul_kron(self, x: Tensor, factors: Sequence[Tensor], precision: str = "highest", *,
                    signature=None) -> Tensor:
        """``x · (F_1 ⊗ … ⊗ F_N)``: rows of x times the Kronecker product, ``G_i = F_i``."""
        key = signature
        if key is None:
            key = (False, precision, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
                   *[(f.shape, f.stride()) for f in factors])
        rec = self._records.get(key)
        if rec is not None:
            return rec(x, factors)
        return self._first_call(key, "matmul_kron", x, factors, precision)

    def kron_matmul(self, factors: Sequence[Tensor], x: Tensor, precision: str = "highest", *,
                    signature=None) -> Tensor:
        """``(F_1 ⊗ … ⊗ F_N) · x``: each column of x is a row times ``⊗F_iᵀ`` (``G_i = F_iᵀ``)."""
        key = signature
        if key is None:
            key = (True, precision, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15,
                   *[(f.shape, f.stride()) for f in factors])
        rec = self._records.get(key)
        if rec is not None:
            return rec(x, factors)
        return self._first_call(key, "kron_matmul", x, factors, precision)

    def _first_call(self, key: tuple, side: str, x: Tensor, factors, precision: str) -> Tensor:
        """Plan a new signature, run it, and keep its launch record under ``key``."""
        batch = _batch_shape(x, factors)
        nb = math.prod(batch)
        if side == "matmul_kron":
            rows, k_in = x.shape[-2], x.shape[-1]
            k_out = math.prod(int(f.shape[-1]) for f in factors)
            out_shape = (*batch, rows, k_out)
        else:
            rows, k_in = x.shape[-1], x.shape[-2]
            k_out = math.prod(int(f.shape[-2]) for f in factors)
            out_shape = (*batch, k_out, rows)
        if rows == 0 or k_in == 0 or k_out == 0 or nb == 0:  # empty: nothing to launch
            rec = ReferenceRecord(side, precision)
            out = rec(x, factors)
        else:
            shapes, m, in_col, out_col, axis_ok, nb = self._signature(side, x, factors, batch)
            # the mode the cuBLAS paths run in (exact where split TF32 would be slower)
            axis_prec = _choice(shapes, m, x.element_size(), in_col, out_col, axis_ok, self._force_path,
                                precision, nb).axis_precision
            run = (lambda p: self._by_path(side, x, factors, batch, shapes, in_col, p, precision, axis_prec))
            path, final = self._path_final(side, x, shapes, m, in_col, out_col, axis_ok, run, precision, nb)
            out, launched = self._by_path(side, x, factors, batch, shapes, in_col, path, precision, axis_prec)
            dims = [p for p, _ in shapes]
            if not final:
                return out
            if path == "axis_gemm":
                lead, trail = (rows * nb, 1) if side == "matmul_kron" else (nb, rows)
                rec = AxisRecord(lead, dims, trail, side == "matmul_kron", out_shape, axis_prec, [q for _, q in shapes])
            elif path == "axis_gemm_t":
                rec = RotatedRecord(nb, dims, rows, out_shape, axis_prec, self._transpose)
            elif launched is not None:
                rec = FusedRecord(*launched, out_shape)
            else:
                return out
        if len(self._records) >= _MAX_RECORDS:
            self._records.clear()
        self._records[key] = rec
        return out

    def _by_path(self, side, x: Tensor, factors, batch: torch.Size, shapes: tuple, in_col: bool, path: str,
                 precision: str, axis_precision: str):
        """One call by ``path``: ``(out, (device, program) or None)`` (the program of the fused
        path, for its launch record). ``precision``: the asked float32 mode (the fused kernels'
        product unit); ``axis_precision``: the mode the cuBLAS paths run in."""
        if side == "matmul_kron":
            return self._matmul_kron(x, factors, batch, shapes, in_col, path, precision, axis_precision)
        return self._kron_matmul(factors, x, batch, shapes, in_col, path, precision, axis_precision)

    def _matmul_kron(self, x: Tensor, factors, batch: torch.Size, shapes: tuple, in_col: bool, path: str,
                     precision: str = "highest", axis_precision: str = "highest"):
        m = x.shape[-2]
        q_total = math.prod(q for _, q in shapes)
        if path == "axis_gemm":
            # rows (batch·M) lead, each factor's axis in natural order: x (B·M, P_1, …, P_N)
            y = axis_products(x, m * math.prod(batch), [p for p, _ in shapes], 1, [f.mT for f in factors],
                              axis_precision)
            return y.view(*batch, m, q_total), None
        out = torch.empty((*batch, m, q_total), dtype=x.dtype, device=x.device)
        return out, self._row_form(False, x, factors, out, batch, shapes, m, in_col, False, precision)

    def _kron_matmul(self, factors, x: Tensor, batch: torch.Size, shapes: tuple, in_col: bool, path: str,
                     precision: str = "highest", axis_precision: str = "highest"):
        t = x.shape[-1]
        nb = math.prod(batch)
        p_total = math.prod(p for _, p in shapes)
        if path == "axis_gemm":
            # x (B, Q_1, …, Q_N, T): the T columns trail, each factor acts on its axis
            y = axis_products(x, nb, [p for p, _ in shapes], t, list(factors), axis_precision)
            return y.view(*batch, p_total, t), None
        out = torch.empty((*batch, p_total, t), dtype=x.dtype, device=x.device)
        if path == "axis_gemm_t":
            # rotating form: one GEMM per factor leaves yᵀ (B, T, ΠP), one transpose pass back
            yt = rotated_products(x, nb, [p for p, _ in shapes], t, list(factors), axis_precision)
            self._transpose(yt, out, p_total, t, nb)
            return out, None
        # rows of the row form are the columns t of x (and of out): strides swapped
        return out, self._row_form(True, x, factors, out, batch, shapes, t, in_col, t > 1, precision)

    def _row_form(self, swapped: bool, x: Tensor, factors, out: Tensor, batch: torch.Size, shapes: tuple,
                  m: int, in_col: bool, out_col: bool, precision: str = "highest"):
        """Run the kernel plan of the row form ``out = x · (⊗G)`` with ``m`` rows; ``swapped``
        (kron_matmul): the rows are the tensors' last dimension, so their two matrix strides
        swap. Returns what :meth:`_run` does."""

        def operand(a: Tensor) -> Operand:
            r, c = (a.stride(-1), a.stride(-2)) if swapped else (a.stride(-2), a.stride(-1))
            return Operand(a, _batch_strides(a, batch), r, c)

        mma = fused_mma(x.element_size(), precision, self._arch(x), self.fused_mma_enabled)
        prod = RowProduct(x=operand(x), factors=[operand(f) for f in factors], shapes=shapes, y=operand(out),
                          batch=tuple(batch), m=m, in_col=in_col, out_col=out_col, mma=mma)
        return self._run(x, prod)

    def _arch(self, x: Tensor) -> int:
        """The compute capability of ``x``'s GPU as a number (90 for sm_90); 0 off the GPU."""
        if x.device.type != "cuda":
            return 0
        return int(self._device(x).arch[3:])


def load() -> CudaBackend:
    """The backend, after checking that the driver, NVRTC, the sources and the GPU all fit.

    Raises (``ImportError``, ``RuntimeError``, ``FileNotFoundError``) with the cause otherwise;
    :mod:`kronegp.device` turns that into one warning and the reference.
    """
    from cuda.bindings import driver, nvrtc  # noqa: F401  (ImportError names the package)

    _check(driver.cuInit(0), "cuInit")
    major, minor = nvrtc_version()
    source_dir()
    backend = CudaBackend()  # KRONEGP_CUDA_PATH=fused|axis_gemm pins the path (benchmarks)
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        arch = cap[0] * 10 + cap[1]
        if arch < _MIN_ARCH:
            raise RuntimeError(f"GPU sm_{arch} is older than the kernels' minimum sm_{_MIN_ARCH}")
        err, n = nvrtc.nvrtcGetNumSupportedArchs()
        err, archs = nvrtc.nvrtcGetSupportedArchs()
        if archs and arch not in archs:
            raise RuntimeError(
                f"NVRTC {major}.{minor} cannot compile for this GPU's sm_{arch} "
                f"(supported: sm_{min(archs)}..sm_{max(archs)})"
            )
    return backend
