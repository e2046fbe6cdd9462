"""kronegp: Gaussian processes on grids with Kronecker-structured kernels.

The foundation is two products that never form the Kronecker matrix:

>>> import torch, kronegp
>>> A, B = torch.randn(3, 4), torch.randn(5, 2)
>>> y = kronegp.kron_matmul([A, B], torch.randn(8, 7))   # (A ⊗ B) · x, shape (15, 7)
>>> z = kronegp.matmul_kron(torch.randn(6, 15), [A, B])  # x · (A ⊗ B), shape (6, 8)
"""

from kronegp._backend import backend_info
from kronegp.ops import kron_matmul, matmul_kron

__version__ = "0.1.0"

__all__ = ["backend_info", "kron_matmul", "matmul_kron", "__version__"]
