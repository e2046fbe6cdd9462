"""Launch records: what a repeated call signature runs, decided once.

:class:`kronegp._cuda.CudaBackend` keys every call by its signature — side, float32 precision,
x's shape, strides and 16-byte residue, each factor's shape and strides, dtype, device — and
keeps one record per signature. The first call plans (path choice, tiles, kernel specs, argument
blocks, kernel handles); every later call looks the record up and does only what depends on the
data: allocate the output (and intermediates) from torch's caching allocator, patch the data
pointers into the prepared argument blocks, launch on the current stream. Outputs are fresh
contiguous tensors, so their strides and alignment are part of the plan, not of the key.

A record is a callable ``record(x, factors) -> out``. A public call hands the backend the
signature that :mod:`kronegp.ops` remembered for it (:class:`kronegp.ops.CallSignature`), and the
record is kept under that object, so a repeated public call reads nothing of its operands for
the lookup; calls without one (the backward's products) build the key above.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from kronegp import reference
from kronegp._cuda.axis_gemm import axis_products, axis_steps, rotated_products
from kronegp._cuda.launch import execute_program

__all__ = ["FusedRecord", "AxisRecord", "RotatedRecord", "ReferenceRecord"]

_data_ptr = torch.Tensor.data_ptr


class FusedRecord:
    """Our kernels: a cached launch program (:func:`kronegp._cuda.launch.execute_program`)."""

    __slots__ = ("dev", "prog", "out_shape")

    def __init__(self, dev, prog, out_shape: tuple):
        self.dev, self.prog, self.out_shape = dev, prog, out_shape

    def __call__(self, x: Tensor, factors: Sequence[Tensor]) -> Tensor:
        out = x.new_empty(self.out_shape)
        execute_program(self.dev, self.prog, x, [x.data_ptr(), out.data_ptr(), *map(_data_ptr, factors)])
        return out


class AxisRecord:
    """One cuBLAS GEMM per factor in natural order (:func:`kronegp._cuda.axis_gemm.axis_products`);
    ``transposed``: the factors act as ``F_iᵀ`` (``matmul_kron``); ``outs``: each one's output size.
    The GEMM shapes are worked out once, here."""

    __slots__ = ("lead", "dims", "trail", "transposed", "out_shape", "precision", "steps")

    def __init__(self, lead: int, dims: Sequence[int], trail: int, transposed: bool, out_shape: tuple,
                 precision: str, outs: Sequence[int]):
        self.lead, self.dims, self.trail = lead, list(dims), trail
        self.transposed, self.out_shape, self.precision = transposed, out_shape, precision
        self.steps = axis_steps(lead, dims, outs, trail)

    def __call__(self, x: Tensor, factors: Sequence[Tensor]) -> Tensor:
        mats = [f.mT for f in factors] if self.transposed else factors
        return axis_products(x, self.lead, self.dims, self.trail, mats, self.precision,
                             self.steps).view(self.out_shape)


class RotatedRecord:
    """``kron_matmul`` in the rotating form: one cuBLAS GEMM per factor, then one transpose
    (``transpose(src, dst, n, d, batch)``, the backend's)."""

    __slots__ = ("nb", "dims", "t", "out_shape", "precision", "transpose", "p_total")

    def __init__(self, nb: int, dims: Sequence[int], t: int, out_shape: tuple, precision: str,
                 transpose: Callable):
        self.nb, self.dims, self.t, self.out_shape = nb, list(dims), t, out_shape
        self.precision, self.transpose = precision, transpose
        self.p_total = out_shape[-2]

    def __call__(self, x: Tensor, factors: Sequence[Tensor]) -> Tensor:
        out = x.new_empty(self.out_shape)
        yt = rotated_products(x, self.nb, self.dims, self.t, factors, self.precision)
        self.transpose(yt, out, self.p_total, self.t, self.nb)
        return out


class ReferenceRecord:
    """Empty products (a zero-sized dimension): the reference, nothing to launch."""

    __slots__ = ("side", "precision")

    def __init__(self, side: str, precision: str):
        self.side, self.precision = side, precision

    def __call__(self, x: Tensor, factors: Sequence[Tensor]) -> Tensor:
        if self.side == "matmul_kron":
            return reference.matmul_kron(x, factors)
        return reference.kron_matmul(factors, x)
