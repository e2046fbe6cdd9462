"""``GridProductKernel``: a product kernel over the dimensions of a grid, as a Kronecker operator.

For a product kernel ``k(x, x') = Π_i k_i(x_i, x'_i)`` evaluated on a full grid
``X = A_1 × A_2 × … × A_D`` (axis ``A_i`` of ``n_i`` points), the covariance is exactly::

    K(X, X') = K_1(A_1, A'_1) ⊗ K_2(A_2, A'_2) ⊗ … ⊗ K_D(A_D, A'_D)

when the grid points are listed in *Kronecker order*: row-major, the last dimension varying
fastest (point ``(j_1, …, j_D)`` at row ``((j_1 n_2 + j_2) n_3 + …) n_D + j_D``). Only the
``D`` small matrices ``K_i`` (``n_i × n'_i``) are formed.

How grid inputs are passed
--------------------------
Inputs are ordinary GPyTorch inputs, ``(*batch, n, D)`` tensors holding every grid point in
Kronecker order. Build them with :func:`grid_points` from the axes. The kernel recovers the
axes from the points on each call (:func:`grid_axes`: one ``O(n·D)`` pass and an exact
check), so no grid is fixed at construction and ``x1``, ``x2`` may be different grids (e.g.
training grid and a finer prediction grid: a rectangular Kronecker operator).
:meth:`GridProductKernel.covar_from_axes` skips the recovery when the axes are at hand.

Off-grid inputs
---------------
Points that are not a full Cartesian product in Kronecker order (a subset of a grid,
shuffled points, scattered data, or train and test points concatenated as
``ExactGP``'s prediction does) raise a ``ValueError`` saying which check failed: the
Kronecker structure does not exist for them, and silently building a dense matrix would
hide an ``O(n²)`` cost. Evaluate off-grid covariances with a product of the base kernels
without grid structure (``ProductKernel`` over ``active_dims``), or predict through the
Kronecker operator on a grid. ``diag=True`` works for any points (it is just
``Π_i k_i(x_i, x'_i)`` elementwise).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from gpytorch.kernels import Kernel
from linear_operator import to_dense
from torch import Tensor

from kronegp.operators import KroneckerOperator

__all__ = ["GridProductKernel", "grid_axes", "grid_points"]


def grid_points(axes: Sequence[Tensor]) -> Tensor:
    """Every point of the grid ``axes[0] × … × axes[D-1]`` in Kronecker order.

    Args:
        axes: ``D`` one-dimensional tensors (``n_i`` points each) of one dtype and device.

    Returns:
        ``(Πn_i, D)``: row ``((j_1 n_2 + j_2) n_3 + …) n_D + j_D`` is
        ``(axes[0][j_1], …, axes[D-1][j_D])`` (the last dimension varies fastest).
    """
    if isinstance(axes, Tensor) or not isinstance(axes, (list, tuple)) or len(axes) == 0:
        raise TypeError("axes must be a non-empty list or tuple of 1-D tensors, one per grid dimension")
    for i, a in enumerate(axes):
        if not isinstance(a, Tensor) or a.dim() != 1 or a.numel() == 0:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"axes[{i}] must be a non-empty 1-D tensor of grid coordinates, got {got}")
        if a.dtype != axes[0].dtype or a.device != axes[0].device:
            raise TypeError(
                f"axes[{i}] is {a.dtype} on {a.device} but axes[0] is {axes[0].dtype} on "
                f"{axes[0].device}; put every axis in one dtype and on one device"
            )
    sizes = [a.numel() for a in axes]
    columns = [
        a.view(*[1] * i, -1, *[1] * (len(axes) - i - 1)).expand(sizes) for i, a in enumerate(axes)
    ]
    return torch.stack(columns, dim=-1).reshape(-1, len(axes))


def grid_axes(x: Tensor, name: str = "x") -> list[Tensor]:
    """The axes of the grid whose points (in Kronecker order) are ``x``, or a ``ValueError``.

    ``x`` has shape ``(n, D)``. Column ``c`` of a Kronecker-ordered grid first changes at row
    ``s_c = Π_{j>c} n_j`` (its stride) and a constant column is an axis of one point; so
    ``n_c = s_{c-1} / s_c`` and ``A_c = x[0 : n_c s_c : s_c, c]``. The result is then checked
    exactly against ``x`` (every point compared), so what is returned always reproduces
    ``x`` through :func:`grid_points`. (An axis whose first two values are equal cannot be
    recognised this way and is reported as off-grid.)
    """
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, D), got {tuple(x.shape)}")
    n, d = x.shape
    if n == 0:
        raise ValueError(f"{name} holds no points (shape {tuple(x.shape)})")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN; grid coordinates must be finite numbers")
    changed = x != x[:1]
    first_change = changed.to(torch.int8).argmax(dim=0).tolist()
    varies = changed.any(dim=0).tolist()
    sizes, strides = [], []
    prev = n
    for c in range(d):
        if not varies[c]:
            sizes.append(1)
            strides.append(prev)
            continue
        stride = first_change[c]
        if prev % stride != 0:
            raise ValueError(_off_grid(name, x, f"column {c} first changes at row {stride}, which does not divide {prev}"))
        sizes.append(prev // stride)
        strides.append(stride)
        prev = stride
    if prev != 1:
        raise ValueError(_off_grid(name, x, f"the last varying column has stride {prev}, not 1"))
    axes = [x[0 : sizes[c] * strides[c] : strides[c], c] for c in range(d)]
    cube = x.view(*sizes, d)
    for c in range(d):
        expected = axes[c].view(*[1] * c, -1, *[1] * (d - c - 1))
        if not bool((cube[..., c] == expected).all()):
            raise ValueError(_off_grid(name, x, f"column {c} is not axis {c} repeated in Kronecker order"))
    return axes


def _off_grid(name: str, x: Tensor, why: str) -> str:
    return (
        f"GridProductKernel: {name} (shape {tuple(x.shape)}) is not a full grid in Kronecker order "
        f"({why}). Grid inputs must be every point of axes[0] × … × axes[D-1], last dimension "
        "varying fastest, as built by kronegp.kernels.grid_points(axes). Off-grid points "
        "(subsets, scattered data, train and test points concatenated) have no Kronecker "
        "structure: use a ProductKernel over active_dims for them."
    )


class GridProductKernel(Kernel):
    r"""``k(x, x') = Π_i k_i(x_i, x'_i)`` on grids, returned as a :class:`~kronegp.operators.KroneckerOperator`.

    :param base_kernels: one GPyTorch kernel per grid dimension (any kernels, any mix), each
        acting on a single coordinate. Their hyperparameters (lengthscales, …) are learned as
        usual; note that output scales multiply, so scale at most one of them, or wrap the
        whole kernel in a ``ScaleKernel``.
    :param kwargs: passed to :class:`gpytorch.kernels.Kernel` (e.g. ``batch_shape``).

    ``forward(x1, x2)`` with ``x1``, ``x2`` of shape ``(*batch, n, D)`` holding full grids in
    Kronecker order (see :func:`grid_points`) returns::

        K_1(A_1, A'_1) ⊗ … ⊗ K_D(A_D, A'_D)      (Πn_i × Πn'_i)

    with the axes ``A_i`` (``A'_i``) recovered from ``x1`` (``x2``) by :func:`grid_axes`.
    Off-grid inputs raise ``ValueError`` (module docstring). ``diag=True`` returns
    ``Π_i k_i(x1_i, x2_i)`` elementwise for any points.
    """

    def __init__(self, *base_kernels: Kernel, **kwargs):
        if len(base_kernels) == 1 and isinstance(base_kernels[0], (list, tuple)):
            base_kernels = tuple(base_kernels[0])
        if len(base_kernels) == 0:
            raise ValueError("GridProductKernel needs one base kernel per grid dimension, got none")
        for i, k in enumerate(base_kernels):
            if not isinstance(k, Kernel):
                raise TypeError(f"base_kernels[{i}] must be a gpytorch Kernel, got {type(k).__name__}")
            if k.active_dims is not None:
                raise ValueError(
                    f"base_kernels[{i}] has active_dims set; each base kernel already sees only its own "
                    "grid coordinate (dimension i), so leave active_dims unset"
                )
            if k.ard_num_dims not in (None, 1):
                raise ValueError(
                    f"base_kernels[{i}] has ard_num_dims={k.ard_num_dims}; it acts on one coordinate, "
                    "so ard_num_dims must be None or 1"
                )
        super().__init__(**kwargs)
        self.base_kernels = torch.nn.ModuleList(base_kernels)

    @property
    def num_dims(self) -> int:
        """``D``, the number of grid dimensions (one base kernel each)."""
        return len(self.base_kernels)

    def covar_from_axes(
        self, axes1: Sequence[Tensor], axes2: Optional[Sequence[Tensor]] = None, **params
    ) -> KroneckerOperator:
        r"""``⊗_i k_i(A_i, A'_i)`` straight from the axes (``axes2`` defaults to ``axes1``)."""
        if len(axes1) != self.num_dims or (axes2 is not None and len(axes2) != self.num_dims):
            raise ValueError(
                f"expected {self.num_dims} axes (one per base kernel), got {len(axes1)}"
                + ("" if axes2 is None else f" and {len(axes2)}")
            )
        same = axes2 is None
        axes2 = axes1 if same else axes2
        factors = []
        for k, a1, a2 in zip(self.base_kernels, axes1, axes2):
            p1 = a1.unsqueeze(-1)
            p2 = p1 if same else a2.unsqueeze(-1)
            factors.append(to_dense(k(p1, p2, **params)))
        return KroneckerOperator(*factors)

    def _axes_of(self, x: Tensor, name: str) -> list[Tensor]:
        if x.shape[-1] != self.num_dims:
            raise ValueError(
                f"{name} must have shape (*batch, n, {self.num_dims}) for {self.num_dims} base kernels, "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[:-2]
        first = x[(0,) * len(batch)] if batch else x
        axes = grid_axes(first, name)
        if batch and not bool((x == first).all()):
            raise ValueError(
                f"GridProductKernel: every batch element of {name} must be the same grid "
                f"(got shape {tuple(x.shape)} with differing grids)"
            )
        return axes

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        if last_dim_is_batch:
            raise ValueError("GridProductKernel does not support last_dim_is_batch=True")
        if diag:
            out = None
            for i, k in enumerate(self.base_kernels):
                term = k(x1[..., i : i + 1], x2[..., i : i + 1], diag=True, **params)
                out = term if out is None else out * term
            return out
        axes1 = self._axes_of(x1, "x1")
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        axes2 = None if same else self._axes_of(x2, "x2")
        covar = self.covar_from_axes(axes1, axes2, **params)
        batch = torch.broadcast_shapes(covar.batch_shape, x1.shape[:-2], x2.shape[:-2])
        if covar.batch_shape != batch:
            covar = covar._expand_batch(batch)
        return covar

    def num_outputs_per_input(self, x1: Tensor, x2: Tensor) -> int:
        return 1
