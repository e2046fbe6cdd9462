"""Kronecker products on grids sharded over the ranks of a ``torch.distributed`` group.

The grid dimension of ``x`` (its rows in :func:`kron_matmul`, its columns in
:func:`matmul_kron`) is split into contiguous blocks, one per rank, and each rank gets its
block of the result in the same layout. One fused local product, one all-to-all, one
local product, one all-to-all back: see :mod:`kronegp.distributed.ops` for the schedule
and the byte counts, :mod:`kronegp.distributed.sharding` for which rank holds what, and
:mod:`kronegp.distributed.reduce` for gradients of replicated values.

Launch one process per GPU with ``torchrun --nproc-per-node G script.py``; in the script::

    import torch, torch.distributed as dist, kronegp.distributed as kd
    dist.init_process_group("nccl")                 # "gloo" for CPU tensors
    rank, G = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    in_sh, out_sh = kd.plan_shardings([n1, n2, n3], None, G)
    x_local = x_full[..., in_sh.rows(rank), :]      # or build the block in place
    y_local = kd.kron_matmul(factors, x_local)      # rows out_sh.rows(rank) of (⊗F)·x
    inner = kd.allreduce_inner()                    # for kronegp.solvers(..., inner=inner)

GridGP training on a sharded grid is :class:`kronegp.GridGP` on a sharded layout
(:mod:`kronegp.models.sharded`); :class:`DistributedGridGP` is re-exported here for the
public API, imported on first use (the model lives above this package, and the products do
not pull in GPyTorch).
"""

from kronegp.distributed._exchange import ByteCounter, count_bytes
from kronegp.distributed.ops import (
    CommunicationCount,
    communication_bytes,
    kron_matmul,
    matmul_kron,
)
from kronegp.distributed.reduce import (
    allreduce_inner, allreduce_sum, group_rank_size, raise_together, replicate_factors, sum_over_ranks,
)
from kronegp.distributed.sharding import GridSharding, grid_sharding, plan_shardings

__all__ = [
    "kron_matmul",
    "matmul_kron",
    "allreduce_inner",
    "allreduce_sum",
    "replicate_factors",
    "communication_bytes",
    "CommunicationCount",
    "count_bytes",
    "ByteCounter",
    "GridSharding",
    "plan_shardings",
    "grid_sharding",
    "group_rank_size",
    "sum_over_ranks",
    "raise_together",
    "DistributedGridGP",
]


def __getattr__(name: str):
    if name == "DistributedGridGP":
        from kronegp.models.sharded import DistributedGridGP

        return DistributedGridGP
    raise AttributeError(f"module 'kronegp.distributed' has no attribute {name!r}")
