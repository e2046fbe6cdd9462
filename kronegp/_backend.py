"""Which implementation runs a Kronecker product for a given tensor, and why.

CPU tensors (and any device without a compiled backend) run :mod:`kronegp.reference`.
CUDA tensors run the fused kernel of :mod:`kronegp._cuda` when it loads; when it cannot,
the reason is warned once and the reference runs instead. :func:`backend_info` reports
the decision.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any

import torch

from kronegp import reference

__all__ = ["backend_info", "for_tensor", "set_autotune"]

_cuda_state: dict[str, Any] = {}


def _load_cuda() -> tuple[ModuleType | Any | None, str]:
    """Load the CUDA backend once; return ``(backend or None, reason)``."""
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
    return _cuda_state["backend"], _cuda_state["reason"]


def for_tensor(x: torch.Tensor):
    """The module-like object whose ``kron_matmul``/``matmul_kron`` should handle ``x``."""
    if x.device.type != "cuda":
        return reference
    backend, reason = _load_cuda()
    if backend is None:
        if not _cuda_state.get("warned"):
            _cuda_state["warned"] = True
            warnings.warn(
                f"kronegp: the CUDA kernel is unavailable ({reason}); CUDA tensors use the "
                "pure-torch reference instead",
                RuntimeWarning,
                stacklevel=3,
            )
        return reference
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
    backend, _ = _load_cuda()
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
    backend, reason = _load_cuda()
    info["cuda"] = "kernel" if backend is not None else "reference"
    info["cuda_reason"] = reason
    if backend is not None:
        info["autotune"] = backend.autotune
    info["gpu"] = torch.cuda.get_device_name()
    return info
