"""How a grid's flattened index is split into contiguous blocks over the ranks of a group.

A grid of sizes ``(n_1, …, n_N)`` is flattened row-major (``n_1`` slowest), the order of
the rows of ``x`` in ``kron_matmul`` and of its columns in ``matmul_kron``. The grid is
split over ``G`` ranks along its first ``a`` axes (the *split axes*): their combined index
``l ∈ [0, L)``, ``L = n_1·…·n_a``, is cut into ``G`` contiguous runs of ``L_r`` values,
and rank ``r`` holds every cell whose leading index lies in its run, the trailing axes
``a+1 … N`` whole. Its block of the flattened index is therefore contiguous::

    rows of rank r = [ (L_0 + … + L_{r-1}) · R,  (L_0 + … + L_r) · R ),   R = n_{a+1}·…·n_N

Choice of ``a`` (:func:`plan_shardings`): the smallest ``a`` for which ``G`` divides
``L`` on both the input and the output grid. Then every ``L_r = L/G`` and rank ``r`` holds
flattened rows ``r·K/G … (r+1)·K/G − 1``: the plain even split. Where no such ``a``
exists (``G`` divides neither grid's size), the split is uneven: the smallest ``a`` with
``L ≥ G`` on both grids, runs balanced as ``torch.tensor_split`` does (the first
``L mod G`` ranks hold one leading index more). A grid with fewer cells than ranks is
rejected.

The trailing axes are whole on every rank, so the factors of those axes can be applied
locally; only the split axes need communication (:mod:`kronegp.distributed.ops`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["GridSharding", "plan_shardings", "balanced_counts", "grid_sharding"]


def balanced_counts(total: int, parts: int) -> tuple[int, ...]:
    """``total`` items in ``parts`` contiguous runs as ``torch.tensor_split`` cuts them."""
    base, extra = divmod(total, parts)
    return tuple(base + 1 if r < extra else base for r in range(parts))


@dataclass(frozen=True)
class GridSharding:
    """The split of one grid over ``world_size`` ranks along its first ``split_axes`` axes.

    Attributes:
        sizes: grid axis sizes ``(n_1, …, n_N)``.
        world_size: number of ranks ``G``.
        split_axes: ``a``, how many leading axes are split (``1 ≤ a ≤ N``).
    """

    sizes: tuple[int, ...]
    world_size: int
    split_axes: int

    def __post_init__(self) -> None:
        if not 1 <= self.split_axes <= len(self.sizes):
            raise ValueError(
                f"split_axes must lie in [1, {len(self.sizes)}] for a grid of sizes "
                f"{self.sizes}, got {self.split_axes}"
            )
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")

    @property
    def lead(self) -> int:
        """``L = n_1·…·n_a``, the combined size of the split axes."""
        return math.prod(self.sizes[: self.split_axes])

    @property
    def rest(self) -> int:
        """``R = n_{a+1}·…·n_N``, the cells each leading index carries (1 if ``a = N``)."""
        return math.prod(self.sizes[self.split_axes :])

    @property
    def numel(self) -> int:
        return self.lead * self.rest

    @property
    def even(self) -> bool:
        return self.lead % self.world_size == 0

    @property
    def lead_counts(self) -> tuple[int, ...]:
        """``L_r`` for every rank: how many leading indices it holds."""
        return balanced_counts(self.lead, self.world_size)

    def lead_range(self, rank: int) -> range:
        """The leading indices ``l`` held by ``rank``."""
        counts = self.lead_counts
        start = sum(counts[:rank])
        return range(start, start + counts[rank])

    def rows(self, rank: int) -> slice:
        """The block of the flattened grid index held by ``rank`` (a ``slice``)."""
        lead = self.lead_range(rank)
        return slice(lead.start * self.rest, lead.stop * self.rest)

    def local_size(self, rank: int) -> int:
        return self.lead_counts[rank] * self.rest


def _choose_split_axes(in_sizes: Sequence[int], out_sizes: Sequence[int], world_size: int) -> int:
    n = len(in_sizes)
    prefix_in = [math.prod(in_sizes[:a]) for a in range(1, n + 1)]
    prefix_out = [math.prod(out_sizes[:a]) for a in range(1, n + 1)]
    for a in range(1, n + 1):
        if prefix_in[a - 1] % world_size == 0 and prefix_out[a - 1] % world_size == 0:
            return a
    for a in range(1, n + 1):
        if prefix_in[a - 1] >= world_size and prefix_out[a - 1] >= world_size:
            return a
    raise ValueError(
        f"a grid of sizes {tuple(in_sizes)} (output grid {tuple(out_sizes)}) has fewer cells "
        f"than the {world_size} ranks of the group: every rank must hold at least one "
        "leading index; use a smaller group"
    )


def plan_shardings(
    in_sizes: Sequence[int],
    out_sizes: Sequence[int] | None,
    world_size: int,
    split_axes: int | None = None,
) -> tuple[GridSharding, GridSharding]:
    """The input and output shardings of a distributed Kronecker product.

    Both grids are split along the same number ``a`` of leading axes (so the factors of
    the other axes act locally on both sides). ``a`` is chosen as the module docstring
    says, unless ``split_axes`` gives it.

    Args:
        in_sizes: the grid ``x`` lives on (``Q_i`` for ``kron_matmul``, ``P_i`` for
            ``matmul_kron``).
        out_sizes: the grid of the result (``P_i``, resp. ``Q_i``); ``None`` for a square
            product (the same grid).
        world_size: ``G``.
        split_axes: force ``a`` (``1 ≤ a ≤ N``).
    """
    in_sizes = tuple(int(s) for s in in_sizes)
    out_sizes = in_sizes if out_sizes is None else tuple(int(s) for s in out_sizes)
    if len(in_sizes) != len(out_sizes) or len(in_sizes) == 0:
        raise ValueError(
            f"input and output grids must have the same, non-zero number of axes, got "
            f"{in_sizes} and {out_sizes}"
        )
    if any(s < 1 for s in in_sizes + out_sizes):
        raise ValueError(f"grid sizes must be positive, got {in_sizes} and {out_sizes}")
    if split_axes is None:
        split_axes = _choose_split_axes(in_sizes, out_sizes, world_size)
    shardings = (
        GridSharding(in_sizes, world_size, split_axes),
        GridSharding(out_sizes, world_size, split_axes),
    )
    for sh in shardings:
        if sh.lead < world_size:
            raise ValueError(
                f"split_axes={split_axes} gives {sh.lead} leading indices on grid {sh.sizes}, "
                f"fewer than the {world_size} ranks: every rank must hold at least one"
            )
    return shardings


def grid_sharding(shape: Sequence[int], world_size: int) -> GridSharding:
    """The split of the grid ``shape`` over ``world_size`` ranks used for every grid vector.

    It is the input (= output) sharding of a square distributed product on that grid, so
    vectors in this layout go straight into :func:`kronegp.distributed.kron_matmul`.
    """
    return plan_shardings(tuple(int(n) for n in shape), None, world_size)[0]
