"""GP models on grids: :class:`GridGP` (exact Kronecker path, masked/heteroskedastic CG path),
and what to do with their hyperparameters (:mod:`kronegp.models.hyperparameters`)."""

from kronegp.models.grid_gp import GridGP
from kronegp.models.hyperparameters import copy_hyperparameters, describe_hyperparameters

__all__ = ["GridGP", "copy_hyperparameters", "describe_hyperparameters"]
