"""``kron_matmul`` and ``matmul_kron`` on grids sharded over a ``torch.distributed`` group.

Setting (:mod:`.sharding`): the grid is split along its first ``a`` axes; rank ``r``
holds the leading indices ``l ∈ L_r`` and every trailing cell. With
``F_lead = F_1 ⊗ … ⊗ F_a`` and ``F_trail = F_{a+1} ⊗ … ⊗ F_N``,
``⊗F = F_lead ⊗ F_trail``, and

    ((⊗F)·x)[l', t', :] = Σ_l F_lead[l', l] · (F_trail · x[l, :, :])[t', :]

so the product is two commuting steps: ``F_trail`` acts inside each leading index — local
to every rank — and ``F_lead`` mixes leading indices — it needs all of them on one rank.
Communication-avoiding schedule (as in FastKron's multi-GPU algorithm and in distributed
FFTs), **local first**:

1. apply every trailing factor in one fused local call of :func:`kronegp.kron_matmul`;
2. one all-to-all to the *cols* layout: every rank gets all ``L`` leading indices for a
   ``1/G`` share of the columns (the trailing cells × ``T``);
3. apply the leading factors in one local call;
4. one all-to-all back, so rank ``r`` holds its block of output rows.

or **exchange first** (steps 2, 3, 4, 1): the same, but the exchanged data are ``x`` and
``F_lead·x`` rather than ``F_trail·x`` and ``y``. Each rank chooses the order that moves
fewer bytes (they differ when the trailing factors are not square); every rank computes
the same choice from the same shapes. ``matmul_kron`` is the same with ``F_iᵀ`` and the
``M`` rows of ``x`` riding along as columns.

Bytes on the network per call, summed over ranks, for an even split (``ε`` the item
size, ``Z`` the exchanged intermediate: ``F_trail·x`` or ``F_lead·x``):

    this scheme:  (1 − 1/G) · (|Z| + |y|) · ε
    naive:        (G − 1)   · |x| · ε          (all-gather x, every rank computes all of y)

for square factors ``|Z| = |y| = |x|``, a ``G/2``-fold saving, and the local work is
``1/G`` of the product instead of all of it. :func:`communication_bytes` gives both counts
for any shapes (uneven splits included); :func:`~kronegp.distributed.count_bytes`
measures them.

Differentiation: the exchanges are autograd functions whose backward is the opposite
exchange, the local products are :mod:`kronegp.ops`, and the factors pass through
:func:`~kronegp.distributed.replicate_factors`, so ``x_local`` gets its block of
``∂ℓ/∂x`` and every rank gets the full ``∂ℓ/∂F_i`` (see :mod:`.reduce`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import kronegp
from kronegp.distributed._exchange import ExchangeSpec, cols_to_rows, rows_to_cols
from kronegp.distributed.reduce import replicate_factors
from kronegp.distributed.sharding import GridSharding, plan_shardings
from kronegp.ops import SUPPORTED_DTYPES, check_batch, check_dtype_device, check_factors

__all__ = ["kron_matmul", "matmul_kron", "communication_bytes", "CommunicationCount"]

SIDES = ("kron_matmul", "matmul_kron")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class CommunicationCount:
    """Bytes one distributed product puts on the network, against the naive scheme.

    Attributes:
        side: ``"kron_matmul"`` or ``"matmul_kron"``.
        world_size: ``G``.
        split_axes: how many leading grid axes are split over the ranks.
        order: ``"local-first"`` or ``"exchange-first"`` (see :mod:`.ops`).
        exchange_bytes: bytes crossing the network in each of the two all-to-alls
            (summed over ranks).
        per_rank_bytes: bytes each rank sends, both exchanges together.
        naive_bytes: the all-gather of ``x`` every rank would need to compute ``y`` alone:
            ``(G − 1)·|x|·ε`` summed over ranks.
        naive_per_rank_bytes: what each rank sends in that all-gather.
    """

    side: str
    world_size: int
    split_axes: int
    order: str
    itemsize: int
    exchange_bytes: tuple[int, int]
    per_rank_bytes: tuple[int, ...]
    naive_bytes: int
    naive_per_rank_bytes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.exchange_bytes)

    @property
    def saving(self) -> float:
        """``naive_bytes / total_bytes`` (``inf`` when nothing moves)."""
        return self.naive_bytes / self.total_bytes if self.total_bytes else math.inf


@dataclass(frozen=True)
class _Plan:
    side: str
    in_sh: GridSharding
    out_sh: GridSharding
    order: str
    u: int  # M for matmul_kron, 1 for kron_matmul
    t: int  # T for kron_matmul, 1 for matmul_kron
    v_first: int  # columns per leading index (divided by U) in the first exchange
    v_second: int
    batch_first: torch.Size  # batch shape of the data in the first exchange
    batch_second: torch.Size
    count: CommunicationCount


def _batch_of(shapes: Sequence[Sequence[int]]) -> list[torch.Size]:
    return [torch.Size(s[:-2]) for s in shapes]


def _make_plan(
    side: str,
    factor_shapes: Sequence[Sequence[int]],
    x_batch: torch.Size,
    cols: int,
    world_size: int,
    itemsize: int,
    split_axes: int | None,
) -> _Plan:
    """Shardings, schedule and byte counts, from shapes alone (identical on every rank)."""
    p = [int(s[-2]) for s in factor_shapes]
    q = [int(s[-1]) for s in factor_shapes]
    grid_in, grid_out = (q, p) if side == "kron_matmul" else (p, q)
    in_sh, out_sh = plan_shardings(grid_in, grid_out, world_size, split_axes)
    a = in_sh.split_axes
    fb = _batch_of(factor_shapes)
    try:
        torch.broadcast_shapes(x_batch, *fb)
    except RuntimeError:
        raise ValueError(
            f"batch dimensions do not broadcast: x has batch shape {tuple(x_batch)}, "
            f"factors have batch shapes {[tuple(b) for b in fb]}"
        ) from None
    b_lead = torch.broadcast_shapes(x_batch, *fb[:a])
    b_trail = torch.broadcast_shapes(x_batch, *fb[a:])
    b_all = torch.broadcast_shapes(x_batch, *fb)
    u, t = (1, cols) if side == "kron_matmul" else (cols, 1)
    rest_in = in_sh.rest * t
    rest_out = out_sh.rest * t

    def spec(sh: GridSharding, v: int) -> ExchangeSpec:
        return ExchangeSpec(sh.lead_counts, u, v, rank=0)

    def moved(sh: GridSharding, v: int, batch: torch.Size, to_cols: bool) -> list[int]:
        return [e * itemsize for e in spec(sh, v).offrank_elements(batch.numel(), to_cols)]

    options = {
        # F_trail·x crosses on the input sharding, y on the output one
        "local-first": (rest_out, rest_out, b_trail, b_all),
        # x crosses on the input sharding, F_lead·x on the output one
        "exchange-first": (rest_in, rest_in, x_batch, b_lead),
    }
    counts = {}
    for order, (v1, v2, bt1, bt2) in options.items():
        first, second = moved(in_sh, v1, bt1, True), moved(out_sh, v2, bt2, False)
        counts[order] = (first, second)
    order = min(options, key=lambda o: sum(map(sum, counts[o])))  # ties: local-first
    first, second = counts[order]
    x_numel = x_batch.numel() * u * t * in_sh.numel
    x_block = [x_batch.numel() * u * t * in_sh.local_size(r) for r in range(world_size)]
    count = CommunicationCount(
        side=side,
        world_size=world_size,
        split_axes=a,
        order=order,
        itemsize=itemsize,
        exchange_bytes=(sum(first), sum(second)),
        per_rank_bytes=tuple(f + s for f, s in zip(first, second)),
        naive_bytes=(world_size - 1) * x_numel * itemsize,
        naive_per_rank_bytes=tuple((world_size - 1) * n * itemsize for n in x_block),
    )
    v1, v2, bt1, bt2 = options[order]
    return _Plan(side, in_sh, out_sh, order, u, t, v1, v2, bt1, bt2, count)


def communication_bytes(
    factors: Sequence[Tensor | Sequence[int]],
    x_shape: Sequence[int],
    world_size: int,
    side: str = "kron_matmul",
    dtype: torch.dtype = torch.float32,
    split_axes: int | None = None,
) -> CommunicationCount:
    """Bytes a distributed product moves, and the naive all-gather's, without running it.

    Args:
        factors: the factors, or their shapes ``(*batch_i, P_i, Q_i)``.
        x_shape: the shape of the *whole* (unsharded) ``x``: ``(*batch, ΠQ_i, T)`` for
            ``kron_matmul``, ``(*batch, M, ΠP_i)`` for ``matmul_kron``.
        world_size: ``G``.
        side: ``"kron_matmul"`` or ``"matmul_kron"``.
        dtype: the element type (sets the item size).
        split_axes: as for the products.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    shapes = [tuple(f.shape) if isinstance(f, Tensor) else tuple(f) for f in factors]
    if not shapes or any(len(s) < 2 for s in shapes):
        raise ValueError(f"factors must be one or more shapes (*batch, P, Q), got {shapes}")
    x_shape = tuple(x_shape)
    if len(x_shape) < 2:
        raise ValueError(f"x_shape must have at least 2 dimensions, got {x_shape}")
    grid = math.prod(s[-1] if side == "kron_matmul" else s[-2] for s in shapes)
    grid_dim = -2 if side == "kron_matmul" else -1
    if x_shape[grid_dim] != grid:
        raise ValueError(
            f"x_shape {x_shape} does not fit factor shapes {shapes} for {side}: "
            f"x_shape[{grid_dim}] must be {grid}"
        )
    cols = x_shape[-1] if side == "kron_matmul" else x_shape[-2]
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = _make_plan(side, shapes, torch.Size(x_shape[:-2]), cols, world_size, itemsize, split_axes)
    return plan.count


# --------------------------------------------------------------------------- checks


def _group_info(group, x: Tensor, name: str) -> tuple[object, int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "kronegp.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group (torchrun sets its environment) first"
        )
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl" and x.device.type != "cuda":
        raise ValueError(
            f"{name} is on {x.device} but the group's backend is NCCL, which exchanges CUDA "
            "tensors only: move the data to this rank's GPU, or use a gloo group for CPU tensors"
        )
    return group, rank, world_size


def _check_x(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")


def _check_rows(n: int, sh: GridSharding, rank: int, name: str, where: str) -> None:
    expected = sh.local_size(rank)
    if n != expected:
        rows = sh.rows(rank)
        raise ValueError(
            f"{name} has {n} {where} on rank {rank}, expected {expected}: rank {rank} of "
            f"{sh.world_size} holds grid entries [{rows.start}, {rows.stop}) of "
            f"{sh.numel} (grid {sh.sizes} split along its first {sh.split_axes} "
            f"ax{'is' if sh.split_axes == 1 else 'es'}; see "
            "kronegp.distributed.plan_shardings)"
        )


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without DTensor: nothing can be one
        return None
    return DTensor, Replicate, Shard


def _unwrap_dtensors(factors, x, group, grid_dim: int):
    """Local tensors for DTensor inputs; ``(factors, x, group, mesh)``, ``mesh`` None if none.

    ``x`` may be a DTensor on a 1-D mesh sharded on its grid dimension (``grid_dim``,
    counted from the end); factors may be DTensors replicated on it.
    """
    types = _dtensor_types()
    if types is None:
        return factors, x, group, None
    DTensor, Replicate, Shard = types
    unwrapped = []
    for i, f in enumerate(factors):
        if isinstance(f, DTensor):
            if not all(isinstance(pl, Replicate) for pl in f.placements):
                raise ValueError(
                    f"factors[{i}] is a DTensor with placements {f.placements}; factors must be "
                    "replicated (Replicate()) on every rank"
                )
            f = f.to_local()
        unwrapped.append(f)
    if not isinstance(x, DTensor):
        return unwrapped, x, group, None
    mesh = x.device_mesh
    dim = x.dim() - grid_dim
    if mesh.ndim != 1 or len(x.placements) != 1:
        raise ValueError(f"x_local as a DTensor must live on a 1-D device mesh, got {mesh}")
    placement = x.placements[0]
    if not isinstance(placement, Shard) or placement.dim % x.dim() != dim:
        raise ValueError(
            f"x_local as a DTensor must be sharded on its grid dimension (Shard({dim})), "
            f"got placements {x.placements}"
        )
    if group is not None:
        raise ValueError("pass group=None with a DTensor x_local: its device mesh gives the group")
    return unwrapped, x.to_local(), mesh.get_group(), mesh


def _wrap_dtensor(y: Tensor, mesh, grid_dim: int, out_sh: GridSharding) -> Tensor:
    """Rewrap this rank's block as a DTensor sharded like the input (even splits only)."""
    from torch.distributed.tensor import DTensor, Shard

    dim = y.dim() - grid_dim
    shape = list(y.shape)
    shape[dim] = out_sh.numel
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(y, mesh, [Shard(dim)], shape=torch.Size(shape), stride=stride)


def _check_dtensor_split(in_sh: GridSharding, out_sh: GridSharding) -> None:
    # DTensor's Shard cuts as torch.chunk does; that agrees with our blocks only when the
    # flattened grid divides evenly, which plan_shardings then guarantees.
    if not (in_sh.even and out_sh.even):
        raise ValueError(
            f"a DTensor x_local needs grids that split evenly over {in_sh.world_size} ranks "
            f"(torch.chunk's cut, which DTensor uses, differs from an uneven one); got "
            f"{in_sh.sizes} -> {out_sh.sizes}: pass the local tensor instead"
        )


def _below_rows(f: Tensor) -> Tensor:
    """A factor whose batch dims must skip one extra leading dimension of the data."""
    return f.unsqueeze(-3) if f.dim() > 2 else f


def _prepare(side: str, factors, x_local, group, split_axes):
    """The checks and the plan both products start with: ``(factors, x, vector, plan, rank, group,
    mesh)``, ``x`` a matrix (a vector ``x_local`` gets its column, or row, dimension back), the
    factors replicated for autograd (:func:`~kronegp.distributed.replicate_factors`)."""
    rows_side = side == "kron_matmul"  # the grid runs along x's rows (else its columns)
    factors = check_factors(factors)
    factors, x_local, group, mesh = _unwrap_dtensors(factors, x_local, group, grid_dim=2 if rows_side else 1)
    _check_x(x_local, "x_local")
    check_dtype_device(factors, x_local)
    group, rank, world_size = _group_info(group, x_local, "x_local")
    vector = x_local.dim() == 1
    x = x_local.unsqueeze(-1 if rows_side else 0) if vector else x_local
    check_batch(factors, x.shape[:-2], "x_local")
    shapes = [tuple(f.shape) for f in factors]
    cols = x.shape[-1] if rows_side else x.shape[-2]
    plan = _make_plan(side, shapes, x.shape[:-2], cols, world_size, x.element_size(), split_axes)
    if mesh is not None:
        _check_dtensor_split(plan.in_sh, plan.out_sh)
    if rows_side:
        _check_rows(x.shape[-2], plan.in_sh, rank, "x_local", "rows (x_local.shape[-2])")
    else:
        _check_rows(x.shape[-1], plan.in_sh, rank, "x_local", "columns (x_local.shape[-1])")
    return replicate_factors(factors, group), x, vector, plan, rank, group, mesh


# --------------------------------------------------------------------------- schedule


def _run(
    plan: _Plan,
    x_rows: Tensor,
    apply_lead: Callable[[Tensor], Tensor],
    apply_trail: Callable[[Tensor, int], Tensor],
    rank: int,
    group,
) -> Tensor:
    """Run the schedule on rows data ``x_rows`` ``(*b, U, L_r, V_in)``; returns ``(*b', U, L'_r, V_out)``.

    ``apply_trail`` applies the trailing factors to rows data ``(*b, U, L_r, V)`` (the
    identity when there are none), ``apply_lead`` the leading ones to cols data
    ``(*b, L, C_j)``.
    """
    spec_in = ExchangeSpec(plan.in_sh.lead_counts, plan.u, plan.v_first, rank, group)
    spec_out = ExchangeSpec(plan.out_sh.lead_counts, plan.u, plan.v_second, rank, group)

    def exchange_to_cols(z: Tensor, spec: ExchangeSpec) -> Tensor:
        batch = z.shape[:-3]
        w = rows_to_cols(z.reshape(batch.numel(), *z.shape[-3:]), spec)
        return w.view(*batch, *w.shape[-2:])

    def exchange_to_rows(w: Tensor, spec: ExchangeSpec) -> Tensor:
        batch = w.shape[:-2]
        z = cols_to_rows(w.reshape(batch.numel(), *w.shape[-2:]), spec)
        return z.view(*batch, *z.shape[-3:])

    if plan.order == "local-first":
        z = apply_trail(x_rows)
        w = apply_lead(exchange_to_cols(z, spec_in))
        return exchange_to_rows(w, spec_out)
    w = apply_lead(exchange_to_cols(x_rows, spec_in))
    return apply_trail(exchange_to_rows(w, spec_out))


def kron_matmul(
    factors: Sequence[Tensor],
    x_local: Tensor,
    group=None,
    *,
    split_axes: int | None = None,
) -> Tensor:
    """``(F_1 ⊗ … ⊗ F_N) · x`` with the rows of ``x`` sharded over ``group``.

    Args:
        factors: ``F_i`` of shape ``(*batch_i, P_i, Q_i)``, the same on every rank.
        x_local: this rank's block of rows of ``x``, ``(*batch, K_r, T)`` (or a vector of
            length ``K_r``): the grid ``(Q_1, …, Q_N)`` split as
            :func:`~kronegp.distributed.plan_shardings` says — for ``G`` dividing
            ``ΠQ_i`` and ``ΠP_i`` (along some common leading axes), rows
            ``r·ΠQ_i/G … (r+1)·ΠQ_i/G − 1``.
            May be a ``DTensor`` on a 1-D mesh with placement ``Shard`` on the row
            dimension (even splits only); the result is then one too.
        group: the process group (default: the world; with a DTensor, its mesh's).
        split_axes: force how many leading grid axes are split.

    Returns:
        This rank's block of rows of ``y = (⊗F)·x``, ``(*batch', P_r, T)``, split over the
        grid ``(P_1, …, P_N)`` along the same number of axes.
    """
    factors, x, vector, plan, rank, group, mesh = _prepare("kron_matmul", factors, x_local, group, split_axes)
    a, t = plan.in_sh.split_axes, x.shape[-1]
    lead, trail = factors[:a], factors[a:]

    def apply_lead(w: Tensor) -> Tensor:  # (*b, L, C_j): F_lead on the rows
        return kronegp.kron_matmul(lead, w)

    def apply_trail(z: Tensor) -> Tensor:  # (*b, 1, L_r, R·T): F_trail inside each l
        if not trail:
            return z
        lr = z.shape[-2]
        rest = z.shape[-1] // t
        out = kronegp.kron_matmul([_below_rows(f) for f in trail], z.reshape(*z.shape[:-3], lr, rest, t))
        return out.reshape(*out.shape[:-3], 1, lr, out.shape[-2] * t)

    x_rows = x.reshape(*x.shape[:-2], 1, plan.in_sh.lead_counts[rank], plan.in_sh.rest * t)
    y = _run(plan, x_rows, apply_lead, apply_trail, rank, group)
    y = y.reshape(*y.shape[:-3], plan.out_sh.local_size(rank), t)
    if mesh is not None:
        return _wrap_dtensor(y, mesh, 2, plan.out_sh)
    return y.squeeze(-1) if vector else y


def matmul_kron(
    x_local: Tensor,
    factors: Sequence[Tensor],
    group=None,
    *,
    split_axes: int | None = None,
) -> Tensor:
    """``x · (F_1 ⊗ … ⊗ F_N)`` with the columns of ``x`` sharded over ``group``.

    Args:
        x_local: this rank's block of columns of ``x``, ``(*batch, M, K_r)`` (or a vector
            of length ``K_r``), the grid ``(P_1, …, P_N)`` split as in :func:`kron_matmul`.
            May be a ``DTensor`` sharded on the last dimension, as there.
        factors: ``F_i`` of shape ``(*batch_i, P_i, Q_i)``, the same on every rank.
        group: the process group (default: the world; with a DTensor, its mesh's).
        split_axes: force how many leading grid axes are split.

    Returns:
        This rank's block of columns of ``x·(⊗F)``, ``(*batch', M, Q_r)``, split over the
        grid ``(Q_1, …, Q_N)`` along the same number of axes.
    """
    factors, x, vector, plan, rank, group, mesh = _prepare("matmul_kron", factors, x_local, group, split_axes)
    a, m = plan.in_sh.split_axes, x.shape[-2]
    lead, trail = factors[:a], factors[a:]
    lead_t = [f.mT for f in lead]

    def apply_lead(w: Tensor) -> Tensor:  # (*b, L, C_j), columns (m, v): F_leadᵀ on the rows
        return kronegp.kron_matmul(lead_t, w)

    def apply_trail(z: Tensor) -> Tensor:  # (*b, M, L_r, R): x·F_trail on each (m, l)
        if not trail:
            return z
        lr = z.shape[-2]
        out = kronegp.matmul_kron(z.reshape(*z.shape[:-3], m * lr, z.shape[-1]), trail)
        return out.reshape(*out.shape[:-2], m, lr, out.shape[-1])

    x_rows = x.reshape(*x.shape[:-2], m, plan.in_sh.lead_counts[rank], plan.in_sh.rest)
    y = _run(plan, x_rows, apply_lead, apply_trail, rank, group)
    y = y.reshape(*y.shape[:-3], m, plan.out_sh.local_size(rank))
    if mesh is not None:
        return _wrap_dtensor(y, mesh, 1, plan.out_sh)
    return y.squeeze(0) if vector else y
