"""GP models on grids: :class:`GridGP`, its inference paths (:mod:`kronegp.models.paths`: exact
Kronecker, exact few-missing, separable mask, preconditioned CG; one object each, chosen once)
and the layout they work through (:mod:`kronegp.models.layout`: the whole grid on one device;
:mod:`kronegp.models.sharded`: the grid sharded over a process group, :class:`DistributedGridGP`,
imported on first use so that the single-device model does not load ``torch.distributed``'s
model pieces), and what to do with the hyperparameters (:mod:`kronegp.models.hyperparameters`).

Also exported, for building on the model's core: the checks of grid data
(:func:`parse_grid_data`, :func:`checked_axis`, :func:`resolve_dtype_device`), the
hyperparameter views (:class:`GridHyperparameters`), the factors' eigendecompositions
(:func:`factor_eigs`) and the CG path's covariance and marginal likelihood pieces
(:class:`FullGridCovariance`, :func:`cg_lml_pieces`, :func:`plain_cg_lml_pieces`).
"""

from kronegp.models._data import ParsedGrid, checked_axis, default_kernel, parse_grid_data, resolve_dtype_device
from kronegp.models._kron import factor_eigs
from kronegp.models._masked import FullGridCovariance, cg_lml_pieces, plain_cg_lml_pieces
from kronegp.models._params import GridHyperparameters
from kronegp.models.grid_gp import GridGP
from kronegp.models.hyperparameters import copy_hyperparameters, describe_hyperparameters

__all__ = [
    "GridGP", "copy_hyperparameters", "describe_hyperparameters",
    "FullGridCovariance", "GridHyperparameters", "ParsedGrid", "cg_lml_pieces", "checked_axis", "default_kernel", "factor_eigs",
    "parse_grid_data", "plain_cg_lml_pieces", "resolve_dtype_device",
]
