"""GP models on grids: :class:`GridGP` (exact Kronecker path, masked/heteroskedastic CG path)."""

from kronegp.models.grid_gp import GridGP

__all__ = ["GridGP"]
