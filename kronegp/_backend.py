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

__all__ = ["backend_info", "for_tensor"]

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
    info["gpu"] = torch.cuda.get_device_name()
    return info
