"""Where a grid GP's grid vectors live: the seam between the inference paths and the storage.

:class:`~kronegp.GridGP` and its inference paths (:mod:`kronegp.models.paths`) do their
grid-vector work through a layout object, never by reaching for the storage itself.
:class:`LocalLayout` holds every grid vector whole on one device.
:class:`~kronegp.models.sharded.ShardedLayout` (the grid split over the ranks of a process
group) supplies the same methods with this rank's block of every grid vector (the rows
``rows(r)`` of the flattened grid) and replicated factors; the model and the paths written
against this interface run unchanged on it. What each member must do there:

* ``place`` ``(values, axes, mask=, noise=, dtype=, device=)``: the model's first step, a
  classmethod here (:class:`~kronegp.models.sharded.ShardedPlacement` sharded): check the
  inputs (:func:`~kronegp.models._data.parse_grid_data`) and return ``(layout, parsed data)``
  with the data on this layout's cells (sharded: this rank's block, every rank's errors
  raised on every rank); ``mask`` is ``None`` only when the whole grid is observed.
* ``whole_grid``: whether the paths that need every cell at hand (exact-missing,
  separable-mask) can run (sharded: ``False``; they refuse); ``graph_obstacle``: why the
  training step cannot be a CUDA graph on this layout, else ``None``; ``reports``: whether
  this process shows progress (sharded: rank 0).
* ``n_local``: the cells this layout holds (``N`` here, ``|rows(r)|`` sharded); ``n_cells`` is
  always the whole grid's ``N``.
* :meth:`kron_matmul` ``(factors, x)``: ``(⊗F)·x`` for this layout's rows of ``x``
  (sharded: :func:`kronegp.distributed.kron_matmul`, an all-to-all per exchanged axis).
* :meth:`eigen` ``(factors)``: the eigendecomposition of ``⊗K_k`` acting on this layout's rows
  (:class:`~kronegp.models._kron.KronEigen` here, ``ShardedKronEigen`` sharded: factors and
  their eigenpairs replicated, ``λ`` and every transform sharded).
* :meth:`total` ``(x)``: the sum of a grid vector (or of per-cell values) over the whole grid,
  differentiable (sharded: local sum + all-reduce, ``allreduce_sum``); :attr:`inner`: the
  column-wise inner product the solvers use (sharded: ``allreduce_inner``).
* :meth:`bilinear` ``(a, b, factors)``: ``Σ_c aᵀ(⊗K_k)b`` with the gradient in the factors
  (sharded: ``total(a · kron_matmul(factors, b))`` with the factors passed through
  ``replicate_factors``).
* :meth:`covariance`: the full-grid ``C = K + diag(d̃)`` the CG solves use
  (:class:`~kronegp.models._masked.FullGridCovariance`; sharded: ``sharded_grid_covariance``).
* :meth:`exact_lml` ``(y, noise, s², factors, mean=, chunk=)``: the exact Kronecker likelihood
  with its analytic gradient (:func:`~kronegp.models._exact.exact_lml`; sharded:
  ``_DistributedExactLML`` on ``y − mean``, a 0-dim mean passed through ``replicate_factors``),
  with :meth:`step_chunk` ``(gp)`` the slab size it may use (the memory plan; sharded: ``None``;
  on the cg path the same plan's columns per block CG run).
* :meth:`dense_limit` ``(device)`` and :meth:`dense_lml`: up to how many observed cells the
  per-cell-noise likelihood is a dense Cholesky, and that likelihood
  (:mod:`kronegp.models._dense`; sharded: 0, never).
* :meth:`kron_vector`: ``⊗v_k`` on this layout's cells (sharded: ``_local_kron_vector``).
* :meth:`std_normal` ``(rows, cols, offset, seed, resample)`` and :meth:`unit_probes`: probe
  blocks for this layout's cells, the same numbers whatever the layout (sharded: this rank's
  rows of the same draw, ``ShardedLayout.std_normal``; unit probes numbered in global cell order);
  :meth:`continue_normal`: the cg path's probes drawn run by run when the memory plan splits its
  block CG into runs (:meth:`step_chunk`; sharded: never split).
* :meth:`count` ``(cells)``: how many cells of a bool grid vector are set, over the whole grid.
* :meth:`fill_noise`: the noise ``d̃`` on this layout's cells, the fill at missing cells being
  the geometric mean over the whole grid (sharded: through :meth:`total`).
* :meth:`grid_points` ``(axes)``: coordinates ``(n_local, d)`` of this layout's cells (for a
  user mean).
* :meth:`maximum` ``(x)``: the largest entry over the whole grid (a float, 0 when empty);
  :meth:`moments` ``(x, n)``: mean and unbiased variance (0 for ``n ≤ 1``) of the ``n``
  values that ``x`` holds over the whole grid (floats; sharded: two all-reduced sums);
  :meth:`replicated` ``(t)`` and :meth:`call_replicated` ``(module, x)``: a replicated
  parameter, or a module's parameters, about to meet this layout's cells (sharded: through
  ``replicate_factors``, so their gradients are summed over the ranks; here unchanged).

A layout holds no grid tensor of the model (those are the model's buffers, moved by
``.to()``); it holds only what it draws (the probe generator, and the probes of a CUDA graph
being recorded, :attr:`probe_store`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from kronegp.linalg import kron_vector
from kronegp.models._data import ParsedGrid, parse_grid_data
from kronegp.models._dense import dense_limit, dense_lml
from kronegp.models._exact import exact_lml
from kronegp.models._kron import KronEigen, bilinear_form
from kronegp.models._masked import FullGridCovariance, unit_rows
from kronegp.ops import kron_matmul
from kronegp.solvers import local_inner

__all__ = ["LocalLayout", "probe_seed"]


def probe_seed(seed: int, offset: int) -> int:
    """The generator seed of the probe block ``offset`` of a model seeded ``seed``: a hash of the
    two, not ``seed + offset``. A mask drawn from a generator with a small seed must not share
    the probes' random numbers: on the CPU, ``torch.randn`` in float32 is a Box–Muller transform
    of ``torch.rand``'s stream, so the mask ``torch.rand(shape, generator=seeded(1)) < 0.5``
    picked exactly the cells where the first probe column (seed 0 + offset 1) was small
    (``zᵀz`` over the missing cells 0.66 of its expectation, a 30σ draw): the log determinant's
    SLQ estimate was 100 nats off on a 32³ grid with half its cells missing (NOTES.md)."""
    key = hashlib.blake2b(f"kronegp-probes,{int(seed)},{int(offset)}".encode(), digest_size=8).digest()
    return int.from_bytes(key, "little") >> 1



class LocalLayout:
    """Every grid vector whole, on the model's device (see the module docstring).

    Args:
        shape: the grid ``(n_1, …, n_d)``.
    """

    #: column-wise inner product of the CG solves
    inner = staticmethod(local_inner)
    whole_grid = True
    reports = True
    graph_obstacle: Optional[str] = None

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(shape)
        self.n_cells = math.prod(self.shape)
        self.n_local = self.n_cells
        self._generator: Optional[torch.Generator] = None
        #: set while a CUDA graph of the training step is recorded (:mod:`kronegp.models._graph`):
        #: the probes are drawn outside the graph, into it
        self.probe_store = None

    @classmethod
    def place(cls, values, axes, **kwargs) -> tuple["LocalLayout", ParsedGrid]:
        """The model's inputs checked (:func:`parse_grid_data`), and the layout of their grid."""
        data = parse_grid_data(values, axes, **kwargs)
        return cls(tuple(data.values.shape)), data

    # ------------------------------------------------------------------ products and sums

    @staticmethod
    def kron_matmul(factors: list[Tensor], x: Tensor) -> Tensor:
        return kron_matmul(factors, x)

    @staticmethod
    def eigen(factors: list[Tensor]) -> KronEigen:
        return KronEigen(factors)

    @staticmethod
    def kron_vector(vectors: list[Tensor]) -> Tensor:
        return kron_vector(vectors)

    @staticmethod
    def total(x: Tensor) -> Tensor:
        return x.sum()

    @staticmethod
    def count(cells: Tensor) -> int:
        return int(cells.sum())

    @staticmethod
    def maximum(x: Tensor) -> float:
        return float(x.max()) if x.numel() else 0.0

    @staticmethod
    def moments(x: Tensor, n: int) -> tuple[float, float]:
        return float(x.mean()), (float(x.var()) if n > 1 else 0.0)

    @staticmethod
    def replicated(t: Tensor) -> Tensor:
        return t

    @staticmethod
    def call_replicated(module: torch.nn.Module, x: Tensor) -> Tensor:
        return module(x)

    @staticmethod
    def bilinear(left: Tensor, right: Tensor, factors: list[Tensor]) -> Tensor:
        return bilinear_form(left, right, factors)

    @staticmethod
    def step_chunk(gp) -> Optional[int]:
        """The chunk of ``gp``'s training step by the memory plan
        (:func:`kronegp.models.memory.operation_chunk`): the exact step's slab size, or the cg
        step's columns per block CG run."""
        from kronegp.models import memory

        return memory.operation_chunk(gp, "step")

    @staticmethod
    def exact_lml(resid: Optional[Tensor], noise: Tensor, outputscale: Tensor, factors: list[Tensor], **kw) -> Tensor:
        return exact_lml(resid, noise, outputscale, factors, **kw)

    @staticmethod
    def dense_limit(device: torch.device) -> int:
        return dense_limit(device)

    @staticmethod
    def dense_lml(factors: list[Tensor], outputscale: Tensor, noise: Tensor, resid: Tensor,
                  observed: Optional[Tensor]) -> Tensor:
        return dense_lml(factors, outputscale, noise, resid, observed)

    @staticmethod
    def covariance(factors: list[Tensor], outputscale: Tensor, fill_noise: Tensor, *, homoskedastic: bool,
                   tol: float, max_iters: int, precondition: bool) -> FullGridCovariance:
        return FullGridCovariance(factors, outputscale, fill_noise, homoskedastic=homoskedastic, tol=tol,
                                  max_iters=max_iters, precondition=precondition)

    def fill_noise(self, noise: Optional[Tensor], cell_noise: Optional[Tensor], observed: Optional[Tensor]) -> Tensor:
        """``d̃``, with gradient: ``σ²`` everywhere (``cell_noise`` ``None``), or the per-cell noise
        at observed cells and its geometric mean over the grid's observed cells at missing ones."""
        if cell_noise is None:
            return noise.expand(self.n_local)
        if observed is None:
            return cell_noise
        safe = torch.where(observed, cell_noise, torch.ones_like(cell_noise))
        fill = torch.exp(torch.log(safe)[observed].mean())
        return torch.where(observed, cell_noise, fill)

    @staticmethod
    def grid_points(axes: list[Tensor]) -> Tensor:
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    # ------------------------------------------------------------------ probes

    def std_normal(self, rows: int, cols: int, offset: int, *, seed: int, resample: bool,
                   like: Tensor) -> Tensor:
        """An ``(rows, cols)`` standard normal block (dtype and device of ``like``), seeded
        :func:`probe_seed` ``(seed, offset)``: the same numbers at every call unless ``resample``."""
        store = self.probe_store
        if store is not None:  # a CUDA graph's probes: drawn outside the graph (see _graph.py)
            return store.get((rows, cols, offset), lambda: self.draw_normal(rows, cols, offset, seed, resample, like))
        return self.draw_normal(rows, cols, offset, seed, resample, like)

    def draw_normal(self, rows: int, cols: int, offset: int, seed: int, resample: bool, like: Tensor) -> Tensor:
        dev = like.device
        if self._generator is None or not resample or self._generator.device != dev:
            self._generator = torch.Generator(device=dev)
            self._generator.manual_seed(probe_seed(seed, offset))
        # Drawn one column after another (a transposed view): the cg path holds its blocks as
        # rows (t, N), so the probes need no transposing copy there.
        return torch.randn(cols, rows, generator=self._generator, dtype=like.dtype, device=dev).mT

    def continue_normal(self, rows: int, cols: int, like: Tensor) -> Tensor:
        """The next ``(rows, cols)`` standard normal block of the generator the last
        :meth:`draw_normal` seeded (a CG run's probes after the first run's)."""
        return torch.randn(cols, rows, generator=self._generator, dtype=like.dtype, device=like.device).mT

    def unit_probes(self, cells: Optional[Tensor], count: int, like: Tensor) -> Tensor:
        """``√S`` times the ``S = count`` unit vectors of ``cells`` (``None``: every cell), as
        ``(N, S)`` columns: ``(1/S) Σ_s z_sᵀ A z_s = tr A`` over those cells exactly."""
        if cells is None:  # every cell: count is N
            return math.sqrt(count) * torch.eye(self.n_cells, count, dtype=like.dtype, device=like.device)
        # (N, S) columns of rows, as draw_normal's; built without reading the device
        return unit_rows(cells, count, like.dtype, math.sqrt(count)).mT
