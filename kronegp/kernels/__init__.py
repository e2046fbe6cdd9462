"""Kernels on grids: GPyTorch kernels that return Kronecker operators (a kernel per grid
dimension, :mod:`~kronegp.kernels.grid_product_kernel`), and the fused evaluation of the common
stationary kernels' factors that the grid GPs use (:mod:`~kronegp.kernels.stationary`)."""

from kronegp.kernels.grid_product_kernel import GridProductKernel, grid_axes, grid_points
from kronegp.kernels.stationary import stationary_factor, stationary_factors

__all__ = ["GridProductKernel", "grid_axes", "grid_points", "stationary_factor", "stationary_factors"]
