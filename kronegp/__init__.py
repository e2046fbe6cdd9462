"""kronegp: Gaussian processes on grids with Kronecker-structured kernels.

The foundation is two products that never form the Kronecker matrix:

>>> import torch, kronegp
>>> A, B = torch.randn(3, 4), torch.randn(5, 2)
>>> y = kronegp.kron_matmul([A, B], torch.randn(8, 7))   # (A ⊗ B) · x, shape (15, 7)
>>> z = kronegp.matmul_kron(torch.randn(6, 15), [A, B])  # x · (A ⊗ B), shape (6, 8)
"""

import importlib

from kronegp.device import backend_info, set_autotune
from kronegp.ops import kron_matmul, matmul_kron

__version__ = "0.1.0"

# Higher layers load on first use, so `import kronegp` stays cheap and the ops never
# depend on the layers above them.
_LAZY = {
    "KroneckerOperator": "kronegp.operators",
    "patch_gpytorch": "kronegp.patch",
    "GridGP": "kronegp.models",
    "datasets": "kronegp.datasets",
    "distributed": "kronegp.distributed",
    "kernels": "kronegp.kernels",
    "solvers": "kronegp.solvers",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'kronegp' has no attribute {name!r}")


__all__ = ["backend_info", "set_autotune", "kron_matmul", "matmul_kron", "__version__", *_LAZY]
