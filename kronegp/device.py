"""The device door: which backend computes for a tensor, what it can do, and why not.

Every computation below the library's layers goes through one typed interface,
:class:`Backend`:

* the two Kronecker products (:meth:`Backend.kron_matmul`, :meth:`Backend.matmul_kron`),
  reached by everyone else through :mod:`kronegp.ops`;
* the fused step of block CG (:meth:`Backend.cg_state`, :meth:`Backend.cg_step`), used by
  :func:`kronegp.solvers.block_cg`;
* the eigensolver of small symmetric matrices in one launch (:meth:`Backend.small_eigh`), used
  by :func:`kronegp.linalg.symmetric_eig` and the on-device Lanczos quadrature.

A caller asks :func:`backend_for` for the backend of its tensor and the backend's
:meth:`~Backend.cg_capability` / :meth:`~Backend.eigh_capability` whether it has the kernel
(a :class:`Capability`: available or not, the size limit, and the reason); it never probes for
a method. Two backends implement the interface:

* :class:`ReferenceBackend` — :mod:`kronegp.reference` (pure torch, any device, the definition
  of correct) for the products; it has no CG or eigensolver kernel and says so, with the reason
  (a CPU tensor, or why the CUDA backend did not load), so callers take their torch paths;
* ``kronegp._cuda.CudaBackend`` — the fused kernels compiled at run time, for CUDA tensors when
  it loads (:func:`load_cuda`); when it cannot, the reason is warned once and CUDA tensors get
  the reference.

:func:`backend_info` reports the decision; :func:`set_autotune` switches the CUDA path choice to
timing. Only this module, :mod:`kronegp.ops` and ``kronegp._cuda`` itself import ``kronegp._cuda``
(``tests/test_module_boundaries.py`` checks it).
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from kronegp import reference

__all__ = [
    "Backend", "Capability", "ReferenceBackend", "backend_for", "backend_info", "load_cuda", "set_autotune",
]


@dataclass(frozen=True)
class Capability:
    """Whether a backend has a kernel for a tensor, how large a problem it takes, and why (not).

    ``limit``: the most columns (CG step) or rows (eigensolver) the kernel takes; 0 when
    unavailable. ``reason``: what runs (available) or why nothing does (unavailable), for
    messages. Truthy when available.
    """

    available: bool
    reason: str
    limit: int = 0

    def __bool__(self) -> bool:
        return self.available


class Backend(ABC):
    """What a device backend provides. Inputs reaching it were checked by its callers
    (:mod:`kronegp.ops` for the products; same dtype and device, consistent shapes)."""

    #: Whether the CUDA path choice times its candidates (:func:`set_autotune`); the reference
    #: has one path and ignores it.
    autotune: bool = False

    @abstractmethod
    def describe(self) -> str:
        """One line: what this backend runs, for :func:`backend_info` and messages."""

    # ---------------------------------------------------------------- Kronecker products

    @abstractmethod
    def kron_matmul(self, factors: Sequence[Tensor], x: Tensor, precision: str = "highest", *,
                    signature: Any = None) -> Tensor:
        """``(F_1 ⊗ … ⊗ F_N) · x`` for ``x`` of shape ``(..., ΠQ_i, T)``; ``precision``: the
        float32 mode (:mod:`kronegp.precision`), which a backend may exceed but never undercut.

        ``signature``: ``None``, or the call's signature as :mod:`kronegp.ops` remembered it (a
        :class:`kronegp.ops.CallSignature`, hashed by identity): every call handed the same object
        has operands of the same shapes, strides, dtype, device and 16-byte alignment of ``x`` and
        the same ``precision``, so a backend may key a per-signature plan by it instead of reading
        all of that again."""

    @abstractmethod
    def matmul_kron(self, x: Tensor, factors: Sequence[Tensor], precision: str = "highest", *,
                    signature: Any = None) -> Tensor:
        """``x · (F_1 ⊗ … ⊗ F_N)`` for ``x`` of shape ``(..., M, ΠP_i)``; ``precision`` and
        ``signature`` as above."""

    # ---------------------------------------------------------------- fused block-CG step

    @abstractmethod
    def cg_capability(self, like: Tensor) -> Capability:
        """Whether :meth:`cg_step` runs on ``like``'s device and dtype; ``limit``: the widest
        block (right-hand sides) it takes."""

    @abstractmethod
    def cg_state(self, **initial: Tensor | float | int) -> Any:
        """The per-column state of one fused solve, built from the torch iteration's initial
        values (``rz``, ``res``, ``b_norm``, ``active``, ``zero``, ``tol``, ``record``). It has
        ``any_active()``, ``res``, ``active``, ``iters``, ``alphas`` and ``betas``."""

    @abstractmethod
    def cg_step(self, mode: str, state: Any, **blocks: Any) -> None:
        """One element-wise step of block CG (``mode`` ``"dot"``, ``"update"`` or
        ``"direction"``) in a single pass, updating ``state`` and the blocks in place."""

    # ---------------------------------------------------------------- small eigensolver

    @abstractmethod
    def eigh_capability(self, like: Tensor) -> Capability:
        """Whether :meth:`small_eigh` runs on ``like``'s device; ``limit``: the most rows it
        takes there."""

    @abstractmethod
    def small_eigh(self, mats: Sequence[Tensor], starts: Sequence[Optional[Tensor]],
                   keeps: Optional[Sequence[Optional[Tensor]]] = None, sweeps: Optional[Tensor] = None,
                   lanes: int = 0) -> list[tuple[Tensor, Tensor]]:
        """``(λ ascending, Q)`` of each small symmetric matrix, without synchronising: started
        from the float64 eigenvectors ``starts[i]`` (``None``: the identity), the final float64
        eigenvectors written into ``keeps[i]`` (when given), the sweeps run into ``sweeps``."""


class ReferenceBackend(Backend):
    """The pure-torch reference (:mod:`kronegp.reference`) behind the :class:`Backend` interface.

    It computes the products on any device; it has no CG-step or eigensolver kernel, and its
    capabilities say why (``why``: a CPU tensor, or why the CUDA backend did not load), so the
    callers run their torch paths.
    """

    def __init__(self, why: str):
        self.why = why

    def describe(self) -> str:
        return f"pure-torch reference ({self.why})"

    def kron_matmul(self, factors: Sequence[Tensor], x: Tensor, precision: str = "highest", *,
                    signature: Any = None) -> Tensor:
        return reference.kron_matmul(factors, x, precision)

    def matmul_kron(self, x: Tensor, factors: Sequence[Tensor], precision: str = "highest", *,
                    signature: Any = None) -> Tensor:
        return reference.matmul_kron(x, factors, precision)

    def _missing(self, kernel: str) -> str:
        return f"no {kernel}: {self.describe()}"

    def cg_capability(self, like: Tensor) -> Capability:
        return Capability(False, self._missing("fused CG step"))

    def cg_state(self, **initial: Tensor | float | int) -> Any:
        raise NotImplementedError(f"kronegp.device: {self._missing('fused CG step')}")

    def cg_step(self, mode: str, state: Any, **blocks: Any) -> None:
        raise NotImplementedError(f"kronegp.device: {self._missing('fused CG step')}")

    def eigh_capability(self, like: Tensor) -> Capability:
        return Capability(False, self._missing("small-matrix eigensolver kernel"))

    def small_eigh(self, mats, starts, keeps=None, sweeps=None, lanes=0) -> list[tuple[Tensor, Tensor]]:
        raise NotImplementedError(f"kronegp.device: {self._missing('small-matrix eigensolver kernel')}")


_HOST = ReferenceBackend("tensors off CUDA run the reference")
_cuda_state: dict[str, Any] = {}


def load_cuda() -> tuple[Optional[Backend], str]:
    """The CUDA backend, loaded once, and what it is; ``(None, why not)`` when it cannot load
    (``KRONEGP_DISABLE_CUDA=1``, no driver or NVRTC, an unsupported GPU)."""
    if "backend" not in _cuda_state:
        backend, reason = None, ""
        if os.environ.get("KRONEGP_DISABLE_CUDA", "") not in ("", "0"):
            reason = "disabled by KRONEGP_DISABLE_CUDA"
        else:
            try:
                from kronegp import _cuda

                backend = _cuda.load()
                reason = backend.describe()
            except Exception as err:  # any failure to load means: say why, use the reference
                reason = f"{type(err).__name__}: {err}"
        _cuda_state["backend"], _cuda_state["reason"] = backend, reason
        if backend is None:
            _cuda_state["reference"] = ReferenceBackend(f"the CUDA backend is unavailable: {reason}")
    return _cuda_state["backend"], _cuda_state["reason"]


def backend_for(x: Tensor) -> Backend:
    """The backend that computes for ``x``: the CUDA kernels for a CUDA tensor when they load,
    else the reference (warning once, with the reason, the first time a CUDA tensor gets it)."""
    if not x.is_cuda:
        return _HOST
    backend = _cuda_state.get("backend")
    if backend is not None:  # loaded: the common case, without load_cuda's call (host time)
        return backend
    backend, reason = load_cuda()
    if backend is None:
        if not _cuda_state.get("warned"):
            _cuda_state["warned"] = True
            warnings.warn(
                f"kronegp: the CUDA kernel is unavailable ({reason}); CUDA tensors use the "
                "pure-torch reference instead",
                RuntimeWarning,
                stacklevel=3,
            )
        return _cuda_state["reference"]
    return backend


def set_autotune(enabled: bool = True) -> None:
    """Choose the path of each CUDA call signature by timing its candidates once.

    By default a cost model picks, per call, between the fused kernels and one cuBLAS GEMM per
    factor (and, for ``kron_matmul`` with few columns, the transposed form). With autotuning on,
    the first call of each signature (side, factor shapes, rows, dtype, layout) runs every
    candidate a few times on its own operands, synchronising the device, and keeps the fastest;
    the choices are saved per GPU model in the kernel cache folder (``$KRONEGP_CACHE_DIR`` or
    ``~/.cache/kronegp``) and reused by later processes. Also switched on by ``KRONEGP_AUTOTUNE=1``.
    CPU tensors, and CUDA tensors without the kernel backend, are not affected.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled must be a bool, got {type(enabled).__name__}")
    backend, _ = load_cuda()
    if backend is not None:
        backend.autotune = enabled


def backend_info() -> dict[str, Any]:
    """Which path runs Kronecker products on each device type, and why.

    Returns a dict with ``cpu`` (always the reference) and ``cuda``: ``"kernel"`` or
    ``"reference"`` (or ``"no GPU"``), with ``cuda_reason`` explaining the choice.
    """
    info: dict[str, Any] = {"cpu": "reference", "torch": torch.__version__}
    if not torch.cuda.is_available():
        info["cuda"] = "no GPU"
        info["cuda_reason"] = "torch.cuda.is_available() is False"
        return info
    backend, reason = load_cuda()
    info["cuda"] = "kernel" if backend is not None else "reference"
    info["cuda_reason"] = reason
    if backend is not None:
        info["autotune"] = backend.autotune
    info["gpu"] = torch.cuda.get_device_name()
    return info
