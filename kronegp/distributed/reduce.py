"""Reductions across the group, and the gradient convention they share.

Convention (the one ``DTensor`` uses for replicated values): a value every rank holds a
copy of — a factor, a hyperparameter, an all-reduced inner product — is *one* value, and
its gradient is one gradient, which every rank also holds a copy of. Hence:

* :func:`replicate_factors` is the identity forward; backward it sums the factor
  gradients of all ranks (each rank's local products only see its share of the data), so
  after ``loss.backward()`` every rank holds the full gradient and takes the same
  optimiser step. No ``DistributedDataParallel`` wrapper is needed, and none should be
  added on top (it would sum a second time).
* :func:`allreduce_inner` sums over the ranks forward; backward it is the identity: the
  gradient of ``Σ_r s_r`` with respect to rank ``r``'s own term ``s_r`` is the replicated
  incoming gradient itself. So every rank calls ``loss.backward()`` on the same
  replicated scalar, once.

Every rank must run the same sequence of these calls (and of the distributed products),
forward and backward, with the same ``requires_grad`` pattern; a rank that skips one
leaves the others waiting in the collective.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["allreduce_inner", "allreduce_sum", "replicate_factors", "group_rank_size", "sum_over_ranks", "raise_together"]


class _ReplicatedFactors(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the factor gradients backward, in one call."""

    @staticmethod
    def forward(ctx, group, *factors: Tensor):
        ctx.group = group
        ctx.shapes = [f.shape for f in factors]
        return tuple(f.view_as(f) for f in factors)

    @staticmethod
    def backward(ctx, *grads):
        # autograd materialises missing output gradients as zeros (the default), so a
        # factor that met no data on this rank still joins the sum with zeros.
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        out: list = [None] * len(grads)
        if not wanted:
            return (None, *out)
        buf = torch.cat([grads[i].reshape(-1) for i in wanted])
        if dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=ctx.group)
        start = 0
        for i in wanted:
            n = ctx.shapes[i].numel()
            out[i] = buf[start : start + n].view(ctx.shapes[i])
            start += n
        return (None, *out)


def replicate_factors(factors: Sequence[Tensor], group=None) -> list[Tensor]:
    """Mark ``factors`` as replicated over ``group``: their gradients are summed over ranks.

    ``f ↦ f`` forward; backward ``∂ℓ/∂f = Σ_r ∂ℓ/∂f|_r`` (one ``all_reduce`` for all the
    factors together). The distributed products call this on their factors themselves.
    """
    if not any(f.requires_grad for f in factors) or not torch.is_grad_enabled():
        return list(factors)
    return list(_ReplicatedFactors.apply(group, *factors))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks forward; identity backward (the gradient is already replicated)."""

    @staticmethod
    def forward(ctx, value: Tensor, group):
        out = value.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def allreduce_sum(value: Tensor, group=None) -> Tensor:
    """``Σ_r value_r`` on every rank, differentiable with the module's convention."""
    return _AllReduceSum.apply(value, group)


def allreduce_inner(group=None, dim: int = -2) -> Callable[[Tensor, Tensor], Tensor]:
    """An ``inner(a, b)`` for CG on a grid sharded over ``group``.

    ``inner(a, b) = Σ_ranks Σ_{i ∈ local block} a[…, i, …] · b[…, i, …]``, the sum running
    over dimension ``dim`` (the grid dimension: ``-2`` for blocks ``(…, N, T)``), so the
    result has ``dim`` removed (``(…, T)`` for blocks of ``T`` right-hand sides) and is
    the same on every rank. It is :mod:`kronegp.solvers`' default local inner product
    followed by one ``all_reduce``. ``a`` and ``b`` broadcast as in ``a * b``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "allreduce_inner needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment)"
        )

    def inner(a: Tensor, b: Tensor) -> Tensor:
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise TypeError(
                f"inner(a, b) takes tensors, got {type(a).__name__} and {type(b).__name__}"
            )
        return allreduce_sum((a * b).sum(dim=dim), group)

    return inner


# --------------------------------------------------------------------------- plain collectives


def group_rank_size(group=None, who: str = "DistributedGridGP") -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``, or a clear error without a group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{who} needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    return rank, dist.get_world_size(group)


def sum_over_ranks(values: Sequence[float | int], group, device, dtype=torch.float64) -> list:
    """Plain (non-differentiable) all-reduced sums of a few numbers, in one call."""
    buf = torch.tensor(list(values), dtype=dtype, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.tolist()


def raise_together(problem: Optional[tuple[str, str]], group) -> None:
    """Raise on *every* rank when any rank found bad input.

    ``problem`` is ``(exception type name, message)`` or ``None``. A rank that raised
    alone would leave the others waiting in the next collective, so the verdicts are
    all-gathered first; every rank raises the first bad rank's type (``TypeError`` or
    ``ValueError``) with every bad rank's message, each naming its rank.
    """
    verdicts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(verdicts, problem, group=group)
    bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if bad:
        exc_type = TypeError if bad[0][1][0] == "TypeError" else ValueError
        raise exc_type("; ".join(f"rank {r}: {msg}" for r, (_, msg) in bad))
