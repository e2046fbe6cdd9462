"""float32 precision modes of the Kronecker products, following PyTorch's own switch.

``torch.get_float32_matmul_precision()`` (set by ``torch.set_float32_matmul_precision``) picks
the mode of every float32 product; ``precision=`` on :func:`kronegp.kron_matmul` /
:func:`kronegp.matmul_kron` overrides it per call. float64 is always IEEE float64.

* ``"highest"`` (torch's default): exact float32 products (FMA, or cuBLAS with TF32 off).
  Relative error ~1e-7 against float64 (bound used by the tests: 1e-5).
* ``"high"``: split TF32. Each float32 operand ``a`` is split as ``a_hi + a_lo`` with
  ``a_hi = a`` rounded to TF32 (10-bit mantissa, exact on the tensor cores) and ``a_lo = a − a_hi``
  (exact in float32, ``|a_lo| ≤ 2⁻¹¹·|a|``), and ``a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi``:
  three TF32 products, float32 accumulation; what is dropped is ``a_lo·b_lo`` (≤ 2⁻²²·|a·b|) and
  the TF32 rounding of the ``lo`` parts (≤ 2⁻²¹·|a·b|). Bound used by the tests: 2e-6.
* ``"medium"``: plain TF32 products (inputs rounded to a 10-bit mantissa), float32
  accumulation: relative error ~1e-4–1e-3. Bound used by the tests: 5e-3.

Where a mode's fast path does not exist (a kernel without tensor cores, the CPU, the
reference), the product is computed more precisely than asked, never less: the fused kernels
and the CPU are always exact float32. Only the cuBLAS paths on a GPU use TF32; they switch
torch's global cuBLAS TF32 flag around their GEMMs and restore it after (a process that runs
float32 GEMMs in other threads at the same moment may see the flag flipped meanwhile).
"""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "resolve_precision", "default_precision", "cublas_tf32"]

#: The modes, most precise first.
PRECISIONS = ("highest", "high", "medium")


@torch.compiler.assume_constant_result  # torch.compile reads it once, when it traces the call
def default_precision() -> str:
    """torch's float32 matmul precision as one of :data:`PRECISIONS`.

    torch ≥ 2.9 refuses ``get_float32_matmul_precision()`` after its newer per-backend API
    (``torch.backends.cuda.matmul.fp32_precision``) was used; then that setting decides:
    ``"tf32"`` is what ``"high"`` sets in torch, anything else (``"ieee"``, ``"none"``) exact.
    """
    try:
        mode = torch.get_float32_matmul_precision()
    except RuntimeError:
        mode = "high" if getattr(torch.backends.cuda.matmul, "fp32_precision", "") == "tf32" else "highest"
    return mode if mode in PRECISIONS else "highest"


def resolve_precision(precision: str | None, dtype: torch.dtype) -> str:
    """The mode a product of ``dtype`` runs in: ``precision`` (checked) or torch's default for
    float32; always ``"highest"`` for float64 (IEEE float64 whatever was asked)."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    if dtype != torch.float32:
        return "highest"
    return default_precision() if precision is None else precision


def _get_tf32() -> bool:
    getter = getattr(torch._C, "_get_cublas_allow_tf32", None)  # 0.2 µs; the property costs 2
    try:
        return bool(getter()) if getter is not None else bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch ≥ 2.9 after its newer API was used: ask that one
        return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _switch_tf32(enabled: bool):
    """Set torch's cuBLAS TF32 switch; return what restores the previous state exactly (through
    the same API the process uses: torch ≥ 2.9 refuses a mix of its two)."""
    try:
        torch._C._get_cublas_allow_tf32()  # raises if the newer API is in use
    except (RuntimeError, AttributeError):
        matmul = torch.backends.cuda.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        return lambda: setattr(matmul, "fp32_precision", before)
    mode = torch.get_float32_matmul_precision()  # "medium" and "high" both mean TF32 on: keep which
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return lambda: torch.set_float32_matmul_precision(mode)


class cublas_tf32:
    """``with cublas_tf32(enabled):`` torch's float32 cuBLAS GEMMs use TF32 iff ``enabled``
    inside the block; the previous setting is restored on exit. Costs one flag read when it
    already has the wanted value."""

    __slots__ = ("enabled", "restore")

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.restore = None

    def __enter__(self):
        if _get_tf32() != self.enabled:
            self.restore = _switch_tf32(self.enabled)
        return self

    def __exit__(self, *exc):
        if self.restore is not None:
            self.restore()
            self.restore = None
        return False
