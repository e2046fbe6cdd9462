"""GPyTorch kernels on grids that return Kronecker operators (a kernel per grid dimension)."""

from kronegp.kernels.grid_product_kernel import GridProductKernel, grid_axes, grid_points

__all__ = ["GridProductKernel", "grid_axes", "grid_points"]
