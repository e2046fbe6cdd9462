"""The one all-to-all of the distributed products, and its adjoint, as autograd functions.

Two layouts of a block of grid data whose leading grid index ``l ∈ [0, L)`` is split over
``G`` ranks (rank ``r`` holds ``L_r`` consecutive values, see :mod:`.sharding`):

* **rows**: rank ``r`` holds ``z_r`` of shape ``(B, U, L_r, V)`` — every column.
* **cols**: rank ``j`` holds ``w_j`` of shape ``(B, L, C_j)`` — every leading index, and
  the ``j``-th of ``G`` contiguous balanced runs of the ``C = U·V`` columns, a column
  being the flattened pair ``(u, v)``.

``U`` carries the rows ``M`` of ``x`` in ``matmul_kron`` (1 in ``kron_matmul``), ``V`` the
trailing grid cells times ``T``. :func:`rows_to_cols` and :func:`cols_to_rows` convert
with one ``all_to_all_single`` each; they are permutations of the same data, so each is
the other's adjoint and the backward of one is the other. Rank ``r`` sends
``B·L_r·C_j`` elements to rank ``j``: over all ranks ``B·(L·C − Σ_r L_r·C_r)`` elements
cross the network per exchange (``B·L·C·(1 − 1/G)`` for an even split).

Every exchange adds its bytes to the open :func:`count_bytes` counters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from kronegp.distributed.sharding import balanced_counts

__all__ = ["ByteCounter", "count_bytes", "ExchangeSpec", "rows_to_cols", "cols_to_rows"]


# --------------------------------------------------------------------------- counting


@dataclass
class ByteCounter:
    """Bytes this rank put on the network in distributed products (measured at the call).

    ``sent_bytes`` counts only data leaving the rank (the block a rank keeps for itself
    moves no bytes). ``exchanges`` counts ``all_to_all`` calls, ``forward`` and
    ``backward`` the bytes of each pass; ``log`` lists ``(direction, bytes)`` per call.
    """

    sent_bytes: int = 0
    exchanges: int = 0
    forward_bytes: int = 0
    backward_bytes: int = 0
    log: list = field(default_factory=list)

    def _add(self, direction: str, nbytes: int, backward: bool) -> None:
        self.sent_bytes += nbytes
        self.exchanges += 1
        if backward:
            self.backward_bytes += nbytes
        else:
            self.forward_bytes += nbytes
        self.log.append((direction, nbytes))


_COUNTERS: list[ByteCounter] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCounter]:
    """Count the bytes this rank sends in distributed products inside the ``with`` block.

    >>> with count_bytes() as c:          # doctest: +SKIP
    ...     y = kron_matmul(factors, x_local)
    >>> c.sent_bytes                      # doctest: +SKIP
    """
    counter = ByteCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(direction: str, nbytes: int, backward: bool) -> None:
    for counter in _COUNTERS:
        counter._add(direction, nbytes, backward)


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ExchangeSpec:
    """Everything both ranks of an exchange agree on: the split of ``L`` and of ``C``."""

    lead_counts: tuple[int, ...]  # L_r for every rank
    u: int
    v: int
    rank: int
    group: object = None

    @property
    def world_size(self) -> int:
        return len(self.lead_counts)

    @property
    def lead(self) -> int:
        return sum(self.lead_counts)

    @property
    def col_counts(self) -> tuple[int, ...]:
        return balanced_counts(self.u * self.v, self.world_size)

    def col_range(self, j: int) -> tuple[int, int]:
        counts = self.col_counts
        start = sum(counts[:j])
        return start, start + counts[j]

    def lead_start(self, r: int) -> int:
        return sum(self.lead_counts[:r])

    def offrank_elements(self, batch: int, to_cols: bool) -> list[int]:
        """Elements each rank sends to the others in one exchange.

        rows → cols: rank ``r`` sends ``B·L_r·C_j`` to each ``j ≠ r``; cols → rows: rank
        ``r`` sends ``B·L_j·C_r``. The sums over ranks agree: ``B·(L·C − Σ_r L_r·C_r)``.
        """
        lc, cc = self.lead_counts, self.col_counts
        lead, cols = sum(lc), sum(cc)
        if to_cols:
            return [batch * lc[r] * (cols - cc[r]) for r in range(self.world_size)]
        return [batch * cc[r] * (lead - lc[r]) for r in range(self.world_size)]


def _pieces(c0: int, c1: int, v: int) -> list[tuple[int, int, int, int, int]]:
    """Rectangles ``(u0, u1, v0, v1, offset)`` covering columns ``[c0, c1)`` of ``(u, v)``.

    A run of flattened columns is at most a partial row of ``u``, whole rows, and a
    partial row; ``offset`` is where each rectangle starts inside the run.
    """
    out = []
    c = c0
    while c < c1:
        u, v0 = divmod(c, v)
        if v0 == 0 and c1 - c >= v:  # whole rows of u
            n = (c1 - c) // v
            out.append((u, u + n, 0, v, c - c0))
            c += n * v
        else:
            v1 = min(v, v0 + (c1 - c))
            out.append((u, u + 1, v0, v1, c - c0))
            c += v1 - v0
    return out


def _copy_cols(block: Tensor, grid: Tensor, c0: int, c1: int, to_block: bool) -> None:
    """Copy columns ``[c0, c1)`` between ``grid`` ``(B, U, Lr, V)`` and ``block`` ``(B, Lr, c1−c0)``."""
    v = grid.shape[-1]
    for u0, u1, v0, v1, off in _pieces(c0, c1, v):
        width = (u1 - u0) * (v1 - v0)
        blk = block[:, :, off : off + width].unflatten(-1, (u1 - u0, v1 - v0))
        grd = grid[:, u0:u1, :, v0:v1].permute(0, 2, 1, 3)
        if to_block:
            blk.copy_(grd)
        else:
            grd.copy_(blk)


def _all_to_all(send: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], spec, direction, backward):
    recv = send.new_empty(sum(recv_counts))
    dist.all_to_all_single(recv, send, list(recv_counts), list(send_counts), group=spec.group)
    off_rank = sum(send_counts) - send_counts[spec.rank]
    _record(direction, off_rank * send.element_size(), backward)
    return recv


# --------------------------------------------------------------------------- exchanges


def _rows_to_cols(z: Tensor, spec: ExchangeSpec, backward: bool) -> Tensor:
    b, u, lr, v = z.shape
    r, g = spec.rank, spec.world_size
    cc = spec.col_counts
    send_counts = [b * lr * cc[j] for j in range(g)]
    recv_counts = [b * spec.lead_counts[s] * cc[r] for s in range(g)]
    send = z.new_empty(sum(send_counts))
    start = 0
    for j in range(g):
        c0, c1 = spec.col_range(j)
        _copy_cols(send[start : start + send_counts[j]].view(b, lr, c1 - c0), z, c0, c1, True)
        start += send_counts[j]
    recv = _all_to_all(send, send_counts, recv_counts, spec, "rows->cols", backward)
    if b == 1:  # the blocks of every source already lie one after another along L
        return recv.view(1, spec.lead, cc[r])
    parts, start = [], 0
    for s in range(g):
        parts.append(recv[start : start + recv_counts[s]].view(b, spec.lead_counts[s], cc[r]))
        start += recv_counts[s]
    return torch.cat(parts, dim=1)


def _cols_to_rows(w: Tensor, spec: ExchangeSpec, backward: bool) -> Tensor:
    b, lead, cr = w.shape
    r, g = spec.rank, spec.world_size
    lc, cc = spec.lead_counts, spec.col_counts
    send_counts = [b * lc[j] * cr for j in range(g)]
    recv_counts = [b * lc[r] * cc[s] for s in range(g)]
    if b == 1 and w.is_contiguous():  # row blocks for ranks 0…G−1 are consecutive already
        send = w.reshape(-1)
    else:
        send = torch.cat(
            [w[:, spec.lead_start(j) : spec.lead_start(j) + lc[j], :].reshape(-1) for j in range(g)]
        )
    recv = _all_to_all(send, send_counts, recv_counts, spec, "cols->rows", backward)
    out = w.new_empty(b, spec.u, lc[r], spec.v)
    start = 0
    for s in range(g):
        c0, c1 = spec.col_range(s)
        _copy_cols(recv[start : start + recv_counts[s]].view(b, lc[r], c1 - c0), out, c0, c1, False)
        start += recv_counts[s]
    return out


class _RowsToCols(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, spec: ExchangeSpec) -> Tensor:
        ctx.spec = spec
        return _rows_to_cols(z, spec, backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _cols_to_rows(grad, ctx.spec, backward=True), None


class _ColsToRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, spec: ExchangeSpec) -> Tensor:
        ctx.spec = spec
        return _cols_to_rows(w, spec, backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _rows_to_cols(grad, ctx.spec, backward=True), None


def rows_to_cols(z: Tensor, spec: ExchangeSpec) -> Tensor:
    """``(B, U, L_r, V)`` on rank ``r`` → ``(B, L, C_r)``; differentiable (backward: :func:`cols_to_rows`)."""
    return _RowsToCols.apply(z, spec)


def cols_to_rows(w: Tensor, spec: ExchangeSpec) -> Tensor:
    """``(B, L, C_r)`` on rank ``r`` → ``(B, U, L_r, V)``; differentiable (backward: :func:`rows_to_cols`)."""
    return _ColsToRows.apply(w, spec)
