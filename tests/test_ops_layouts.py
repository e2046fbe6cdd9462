"""kron_matmul / matmul_kron over every layout a caller can hand them, against torch.kron.

tests/test_ops.py draws contiguous inputs of one rank pattern; a 1-D ``x`` with batched
factors slipped through it (``matmul_kron`` returned ``(2, 1, 8)`` instead of ``(2, 8)``).
Here hypothesis draws, independently: ``x`` as a vector or with 0–2 batch dimensions, each
factor with 0–2 batch dimensions (size-1 dimensions that broadcast included), and every
tensor contiguous, transposed in storage, strided (every other column) or expanded
(stride-0 batch dimensions). The reference is ``x @ (F_1 ⊗ … ⊗ F_N)`` with the Kronecker
matrix built by ``torch.kron`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronegp
from _helpers import dense_kron, rel_err

TOL = {torch.float32: 3e-5, torch.float64: 1e-12}
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def _make(shape: tuple[int, ...], layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` stored as ``layout`` says (values never all zero)."""
    if layout == "transposed" and len(shape) >= 2:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, generator=gen).mT
    elif layout == "strided":
        t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, generator=gen)[..., ::2]
    elif layout == "expanded" and len(shape) >= 2 and shape[0] > 1:
        t = torch.randn(1, *shape[1:], dtype=dtype, generator=gen).expand(shape)
    else:
        t = torch.randn(*shape, dtype=dtype, generator=gen)
    assert tuple(t.shape) == tuple(shape)
    return t


def _plain(t: torch.Tensor) -> torch.Tensor:
    """float64 with row-major strides: torch.kron fails on some strides of size-1 dimensions."""
    return t.double().clone(memory_format=torch.contiguous_format)


@st.composite
def batch_of(draw, full: tuple[int, ...]) -> tuple[int, ...]:
    """A batch shape that broadcasts to ``full``: a suffix of it, some entries set to 1."""
    rank = draw(st.integers(0, len(full)))
    suffix = full[len(full) - rank:]
    return tuple(1 if draw(st.booleans()) else n for n in suffix)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 3))
    ps = [draw(st.integers(1, 5)) for _ in range(n)]
    qs = [draw(st.integers(1, 5)) for _ in range(n)]
    full = tuple(draw(st.lists(st.integers(2, 3), max_size=2)))
    vector = draw(st.booleans())
    x_batch = () if vector else draw(batch_of(full))
    f_batches = [draw(batch_of(full)) for _ in range(n)]
    x_layout = draw(st.sampled_from(LAYOUTS))
    f_layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(n)]
    cols = draw(st.sampled_from([1, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return ps, qs, vector, x_batch, f_batches, x_layout, f_layouts, cols, dtype, seed


def _product(op: str, factors, x, vector: bool):
    """The op's result and the dense reference: ``x @ K`` (matmul_kron) or ``K @ x`` (kron_matmul)."""
    kron = dense_kron([_plain(f) for f in factors])
    xd = x.double()
    if op == "matmul_kron":
        expected = (xd.unsqueeze(-2) @ kron).squeeze(-2) if vector else xd @ kron
        return kronegp.matmul_kron(x, factors), expected
    expected = (kron @ xd.unsqueeze(-1)).squeeze(-1) if vector else kron @ xd
    return kronegp.kron_matmul(factors, x), expected


@pytest.mark.parametrize("op", ["matmul_kron", "kron_matmul"])
@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_every_layout_and_rank_against_torch_kron(op, case):
    ps, qs, vector, x_batch, f_batches, x_layout, f_layouts, cols, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    factors = [_make((*b, p, q), layout, dtype, gen) for p, q, b, layout in zip(ps, qs, f_batches, f_layouts)]
    if op == "matmul_kron":  # x is (..., M, ΠP)
        x = _make((math.prod(ps),) if vector else (*x_batch, cols, math.prod(ps)), x_layout, dtype, gen)
    else:  # x is (..., ΠQ, T)
        x = _make((math.prod(qs),) if vector else (*x_batch, math.prod(qs), cols), x_layout, dtype, gen)
    y, expected = _product(op, factors, x, vector)
    assert y.shape == expected.shape, (y.shape, expected.shape)
    assert y.dtype == dtype
    assert rel_err(y, expected) < TOL[dtype]


def test_vector_x_with_batched_factors_keeps_only_the_batch():
    """The reported case: (8,) against factors batched by 2 gives (2, 8), not (2, 1, 8)."""
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(2, 2, 4, dtype=torch.float64, generator=gen),
               torch.randn(2, 2, dtype=torch.float64, generator=gen)]
    x = torch.randn(4, dtype=torch.float64, generator=gen)
    assert kronegp.matmul_kron(x, factors).shape == (2, 8)
    assert kronegp.kron_matmul([f.mT for f in factors], x).shape == (2, 8)
