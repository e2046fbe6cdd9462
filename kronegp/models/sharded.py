"""GridGP with the grid sharded over the ranks of a ``torch.distributed`` group: the sharded layout.

:class:`DistributedGridGP` is :class:`kronegp.GridGP` itself — one constructor (data checked
by the same parser, statistics all-reduced), one :meth:`~kronegp.GridGP.fit`
(:mod:`kronegp.models._fit`), the same hyperparameters, standardisation and inference path
objects — built on a :class:`ShardedLayout` (:class:`ShardedPlacement` is the ``layout``
argument that places the data): the exact Kronecker path and the cg path (missing cells
and/or per-cell noise), with every grid-sized vector split over the ranks as :func:`~kronegp.distributed.plan_shardings` splits a
square product on the grid ``(n_1, …, n_d)``: rank ``r`` holds the contiguous block
``rows(r)`` of the flattened (row-major) grid, e.g. ``r·N/G … (r+1)·N/G − 1`` when ``G``
divides the leading axes. What is sharded and what is replicated:

* sharded (one block per rank): the data ``y``, the mask, the per-cell noise, the mean on
  the grid, every CG block (right-hand sides, iterates, probes), the eigenvalue grid
  ``λ = s² ⊗λ_k``;
* replicated (identical on every rank): the axes, the hyperparameters and the kernel
  factors ``K_k`` with their eigendecompositions ``K_k = Q_k Λ_k Q_kᵀ`` (``n_k × n_k``),
  every CG coefficient, the loss.

Every product with ``K``, ``Q`` or ``Qᵀ`` (including the preconditioner
``P⁻¹ = Q (λ + σ̄²)⁻¹ Qᵀ``) is :func:`kronegp.distributed.kron_matmul`; every sum over
the grid is a local sum followed by one ``all_reduce`` (:func:`allreduce_inner`). The cg
path is :class:`kronegp.models.paths.CGPath`, the same object the single-process model runs,
working through a :class:`ShardedLayout` (this rank's block of every grid vector, the
distributed products, all-reduced sums, the sharded covariance, this rank's probe rows): so
with the same probe vectors the two runs take the same CG steps and agree to float
tolerance. The exact path is :class:`~kronegp.models.paths.ExactPath` on the same layout, whose
``exact_lml`` is :class:`_DistributedExactLML`. The exact-missing and separable-mask paths
need every cell at hand and refuse a sharded layout. Communication itself (the distributed
products, reductions, plain collectives) lives in :mod:`kronegp.distributed`.

Gradients follow :mod:`kronegp.distributed.reduce`'s convention: the loss is one
replicated scalar, every rank calls ``loss.backward()`` on it once, and afterwards every
rank holds the full gradient of every hyperparameter (no ``DistributedDataParallel``).
Replicated parameters that meet sharded data are passed through
:func:`replicate_factors` (sum of the gradients over ranks) exactly once; those that only
meet all-reduced scalars are not.

Probe vectors (cg path): with ``probes="replicated"`` every rank draws the whole
``(N, S)`` block from the generator :class:`~kronegp.GridGP` uses (seeded
:func:`~kronegp.models.layout.probe_seed` ``(seed, offset)`` on the data's device) and keeps its rows, so the run reproduces the
single-process model's estimate; ``probes="chunked"`` draws rows in fixed chunks of
``2^16`` from generators seeded by ``(seed, offset, chunk)``, so each rank draws only its
rows and the estimate does not depend on ``G`` (but differs from GridGP's random draw).
``"auto"`` (default) is replicated up to ``2^24`` probe entries. When at most
``exact_trace_limit`` cells enter a trace, both use GridGP's unit probes (exact traces).

Launch one process per GPU::

    torchrun --nproc-per-node G train.py

with, in ``train.py``::

    import torch, torch.distributed as dist
    from kronegp.distributed import DistributedGridGP
    dist.init_process_group("nccl")                      # "gloo" for CPU tensors
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    gp = DistributedGridGP.from_grid(values, axes, device="cuda")   # keeps its own block
    # or, each rank reading only its block of the flattened grid:
    #   rows = DistributedGridGP.rows_of([len(a) for a in axes], dist.get_rank(), dist.get_world_size())
    #   gp = DistributedGridGP(values_flat_block, axes, mask=mask_block, device="cuda")
    gp.fit(iters=50)                                     # every rank, same steps
    if dist.get_rank() == 0:
        print(gp.hyperparameters())

Prediction is not distributed: copy the hyperparameters into a single-device
:class:`~kronegp.GridGP` with :meth:`DistributedGridGP.hyperparameter_state`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import kronegp
from kronegp.distributed import ops as dist_ops
from kronegp.distributed.reduce import (
    allreduce_inner, allreduce_sum, group_rank_size, raise_together, replicate_factors, sum_over_ranks,
)
from kronegp.distributed.sharding import GridSharding, grid_sharding
from kronegp.linalg import kron_vector
from kronegp.models._data import ParsedGrid, parse_grid_data
from kronegp.models._kron import factor_eigs
from kronegp.models._masked import FullGridCovariance
from kronegp.models.grid_gp import GridGP
from kronegp.models.layout import probe_seed

__all__ = ["DistributedGridGP", "REPLICATED_PROBE_LIMIT", "ShardedKronEigen", "ShardedLayout", "ShardedPlacement",
           "sharded_grid_covariance"]

#: ``probes="auto"``: every rank draws the whole ``(N, S)`` block up to this many entries (then chunked).
REPLICATED_PROBE_LIMIT = 1 << 24
_PROBE_CHUNK_ROWS = 1 << 16


def _local_kron_vector(vectors: Sequence[Tensor], sh: GridSharding, rank: int) -> Tensor:
    """Rank ``rank``'s block of ``v_1 ⊗ … ⊗ v_d`` (never the whole vector).

    The block is ``(v_1 ⊗ … ⊗ v_a)[L_r] ⊗ (v_{a+1} ⊗ … ⊗ v_d)`` for the split axes ``a``:
    leading indices ``L_r``, every trailing cell.
    """
    a = sh.split_axes
    lead = sh.lead_range(rank)
    lead_vec = kron_vector(vectors[:a])[lead.start : lead.stop]
    if a == len(vectors):
        return lead_vec
    trail_vec = kron_vector(vectors[a:])
    return (lead_vec.unsqueeze(-1) * trail_vec.unsqueeze(0)).reshape(-1)


def _local_contract_all_but(
    w_local: Tensor, vals: Sequence[Tensor], keep: int, sh: GridSharding, rank: int
) -> Tensor:
    """This rank's share of ``Σ_{j: j_keep = m} w_j Π_{k≠keep} vals_k[j_k]`` (length ``n_keep``).

    Summed over the ranks it is ``v_keep`` of the exact-path gradient
    (:mod:`kronegp.models._exact`) for the whole ``w``. The trailing axes are whole here, so they contract with one local Kronecker
    product; the leading indices ``L_r`` are unravelled (``|L_r| ≤ n_1·…·n_a``, small).
    """
    a, d = sh.split_axes, len(vals)
    sizes = sh.sizes
    lead = sh.lead_range(rank)
    w_block = w_local.reshape(len(lead), sh.rest)
    if keep >= a:
        facs = [
            torch.eye(sizes[k], dtype=w_local.dtype, device=w_local.device) if k == keep else vals[k].reshape(1, -1)
            for k in range(a, d)
        ]
        per_lead = kronegp.kron_matmul(facs, w_block.mT)  # (n_keep, |L_r|)
        lead_weight = kron_vector(vals[:a])[lead.start : lead.stop]
        return per_lead @ lead_weight
    if a < d:
        t = kronegp.kron_matmul([vals[k].reshape(1, -1) for k in range(a, d)], w_block.mT).reshape(-1)
    else:
        t = w_block.reshape(-1)
    idx = torch.arange(lead.start, lead.stop, device=w_local.device)
    multi = torch.unravel_index(idx, tuple(sizes[:a]))
    weight = torch.ones_like(t)
    for k in range(a):
        if k != keep:
            weight = weight * vals[k][multi[k]]
    out = torch.zeros(sizes[keep], dtype=w_local.dtype, device=w_local.device)
    return out.index_add_(0, multi[keep], t * weight)


# --------------------------------------------------------------------------- sharded linear algebra


class ShardedKronEigen:
    """:class:`kronegp.models._kron.KronEigen` on a sharded grid (no autograd).

    ``K_1 ⊗ … ⊗ K_d = Q diag(λ) Qᵀ`` with ``Q = ⊗Q_k``, ``λ = ⊗λ_k``; the ``Q_k``, ``λ_k``
    are replicated, grid vectors are this rank's block, and ``Q``/``Qᵀ`` are applied with
    :func:`kronegp.distributed.kron_matmul` (eigen-coordinates are indexed like grid
    cells, ``Q_k`` being square, so the same sharding holds them).
    """

    def __init__(self, factors: Sequence[Tensor], sharding: GridSharding, rank: int, group):
        self.vals, self.vecs = factor_eigs(factors)
        self.sharding, self.rank, self.group = sharding, rank, group

    def eigvals(self) -> Tensor:
        """This rank's block of ``λ_1 ⊗ … ⊗ λ_d``."""
        return _local_kron_vector(self.vals, self.sharding, self.rank)

    def to_eigbasis(self, x: Tensor) -> Tensor:
        """``Qᵀ x`` for this rank's rows ``x`` (``(N_r, t)``)."""
        return dist_ops.kron_matmul([q.mT for q in self.vecs], x, self.group)

    def from_eigbasis(self, x: Tensor) -> Tensor:
        """``Q x`` for this rank's rows ``x``."""
        return dist_ops.kron_matmul(self.vecs, x, self.group)

    def apply_function(self, diag: Tensor, x: Tensor) -> Tensor:
        """``Q diag(g) Qᵀ x``, ``g`` this rank's block of a grid vector."""
        return self.from_eigbasis(diag.unsqueeze(-1) * self.to_eigbasis(x))

    def diag_of(self, diag: Tensor) -> Tensor:
        """This rank's block of ``diag(Q diag(g) Qᵀ) = (⊗ Q_k∘Q_k) g``."""
        return dist_ops.kron_matmul([q * q for q in self.vecs], diag.reshape(-1, 1), self.group).reshape(-1)


def sharded_grid_covariance(
    factors: Sequence[Tensor],
    outputscale: Tensor,
    fill_noise: Tensor,
    *,
    homoskedastic: bool,
    tol: float,
    max_iters: int,
    sharding: GridSharding,
    rank: int,
    group,
    precondition: bool = True,
) -> FullGridCovariance:
    """``C = K + diag(d̃)`` on a sharded grid: :class:`kronegp.models._masked.FullGridCovariance`
    with this rank's rows as grid vectors, products through the distributed ops, the
    eigendecomposition of :class:`ShardedKronEigen` and ``inner`` all-reduced (so ``σ̄²`` and
    ``log det P`` are sums over the whole grid)."""
    return FullGridCovariance(
        factors,
        outputscale,
        fill_noise,
        homoskedastic=homoskedastic,
        tol=tol,
        max_iters=max_iters,
        inner=allreduce_inner(group),
        precondition=precondition,
        eig=ShardedKronEigen([f.detach() for f in factors], sharding, rank, group),
        product=lambda fs, x: dist_ops.kron_matmul(fs, x, group),
    )


class _ShardInfo:
    """What the exact-path autograd function needs to know about the layout (not a tensor)."""

    def __init__(self, sharding: GridSharding, rank: int, group):
        self.sharding, self.rank, self.group = sharding, rank, group


class _DistributedExactLML(torch.autograd.Function):
    """``log N(r | 0, s² ⊗K_k + σ² I)`` with ``r`` sharded; analytic gradients.

    The formulas are :mod:`kronegp.models._exact`'s; here every sum over the grid is a
    local sum plus one all-reduce, and the returned gradients of the replicated inputs
    (``σ²``, ``s²``, ``K_k``) are already the full ones (the gradient of ``r`` is this
    rank's block). ``resid=None`` means ``r = 0`` (only ``−½ log det C`` is wanted).
    """

    @staticmethod
    def forward(ctx, resid, noise: Tensor, outputscale: Tensor, info: _ShardInfo, *factors: Tensor) -> Tensor:
        sh, group = info.sharding, info.group
        eig = ShardedKronEigen(factors, sh, info.rank, group)
        lam_unit = eig.eigvals()
        lam = outputscale * lam_unit
        w = 1.0 / (lam + noise)
        sums = torch.stack([torch.log(lam + noise).sum(), lam.new_zeros(())])
        if resid is None:
            alpha = None
        else:
            rt = eig.to_eigbasis(resid.unsqueeze(-1)).squeeze(-1)
            alpha = eig.from_eigbasis((w * rt).unsqueeze(-1)).squeeze(-1)
            sums[1] = (rt * rt * w).sum()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lml = -0.5 * sums[1] - 0.5 * sums[0] - 0.5 * sh.numel * math.log(2 * math.pi)
        ctx.eig, ctx.info, ctx.zero_resid = eig, info, resid is None
        ctx.save_for_backward(alpha if alpha is not None else lam.new_zeros(0), w, lam_unit, outputscale, *factors)
        return lml

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha, w, lam_unit, outputscale, *factors = ctx.saved_tensors
        eig: ShardedKronEigen = ctx.eig
        info: _ShardInfo = ctx.info
        needs = ctx.needs_input_grad
        zero = ctx.zero_resid
        need_factors = any(needs[4:])
        d_resid = None if zero or not needs[0] else -grad * alpha
        # Replicated sums, one all-reduce: αᵀα, Σw, Σ w λ_unit, then the n_k-vectors v_i.
        parts = [
            (alpha * alpha).sum() if not zero else w.new_zeros(()),
            w.sum(),
            (w * lam_unit).sum(),
        ]
        sizes = [f.shape[-1] for f in factors]
        if need_factors:
            parts += [
                _local_contract_all_but(w, eig.vals, i, info.sharding, info.rank) if needs[4 + i] else w.new_zeros(n)
                for i, n in enumerate(sizes)
            ]
        buf = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=info.group)
        a2, w_sum, wl_sum = buf[0], buf[1], buf[2]
        d_noise = grad * 0.5 * (a2 - w_sum) if needs[1] else None
        d_scale = None
        d_factors: list = [None] * len(factors)
        if needs[2] or need_factors:
            qform = w.new_zeros(())
            quad_grads = None
            if not zero:
                with torch.enable_grad():
                    leaves = [f.detach().requires_grad_(True) for f in factors]
                    k_alpha = dist_ops.kron_matmul(leaves, alpha.unsqueeze(-1), info.group).squeeze(-1)
                    local_q = (alpha * k_alpha).sum()
                    # the distributed product sums the factor gradients of all ranks itself
                    quad_grads = torch.autograd.grad(local_q, leaves) if need_factors else None
                qform = allreduce_sum(local_q.detach(), info.group)
            if needs[2]:
                d_scale = grad * 0.5 * (qform - wl_sum)
            start = 3
            for i, n in enumerate(sizes):
                v = buf[start : start + n] if need_factors else None
                start += n
                if not needs[4 + i]:
                    continue
                q = eig.vecs[i]
                trace_grad = (q * v) @ q.mT
                quad = quad_grads[i] if quad_grads is not None else torch.zeros_like(trace_grad)
                d_factors[i] = grad * 0.5 * outputscale * (quad - trace_grad)
        return (d_resid, d_noise, d_scale, None, *d_factors)


# --------------------------------------------------------------------------- the layout


class ShardedLayout:
    """:class:`kronegp.models.layout.LocalLayout`'s interface on a grid sharded over ``group``:
    every grid vector is this rank's block ``rows(rank)`` of the flattened grid, sums and inner
    products are all-reduced, Kronecker products are the distributed ones (see
    :mod:`kronegp.models.layout` for what each method does). The inference paths of
    :mod:`kronegp.models.paths` run on it unchanged (:class:`DistributedGridGP`'s exact and cg paths).

    Args:
        sharding, rank, group: the split of the grid and this rank's place in it.
        probes: ``"replicated"``, ``"chunked"`` or ``"auto"`` (module docstring).
    """

    def __init__(self, sharding: GridSharding, rank: int, group, probes: str = "auto"):
        self.sharding, self.rank, self.group, self.probe_scheme = sharding, rank, group, probes
        self.shape = tuple(sharding.sizes)
        self.n_cells = math.prod(self.shape)
        self.rows = sharding.rows(rank)
        self.n_local = sharding.local_size(rank)
        self.inner = allreduce_inner(group)
        self.info = _ShardInfo(sharding, rank, group)
        self.probe_store = None  # no CUDA graph of a sharded step
        self.reports = rank == 0

    whole_grid = False
    graph_obstacle = "the grid is sharded over a process group (its collectives are not recorded in a graph)"

    def kron_matmul(self, factors: list[Tensor], x: Tensor) -> Tensor:
        return dist_ops.kron_matmul(factors, x, self.group)

    def eigen(self, factors: list[Tensor]) -> ShardedKronEigen:
        return ShardedKronEigen(factors, self.sharding, self.rank, self.group)

    def kron_vector(self, vectors: list[Tensor]) -> Tensor:
        return _local_kron_vector(vectors, self.sharding, self.rank)

    def total(self, x: Tensor) -> Tensor:
        return allreduce_sum(x.sum(), self.group)

    def count(self, cells: Tensor) -> int:
        return int(sum_over_ranks([int(cells.sum())], self.group, cells.device)[0])

    def maximum(self, x: Tensor) -> float:
        buf = (x.max() if x.numel() else x.new_zeros(())).detach().to(torch.float64).reshape(1)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return float(buf)

    def moments(self, x: Tensor, n: int) -> tuple[float, float]:
        mean = float(self.total(x.detach())) / n
        return mean, (float(self.total((x.detach() - mean) ** 2)) / (n - 1) if n > 1 else 0.0)

    def replicated(self, t: Tensor) -> Tensor:
        return replicate_factors([t], self.group)[0]

    def call_replicated(self, module: torch.nn.Module, x: Tensor) -> Tensor:
        names = [n for n, _ in module.named_parameters()]
        reps = replicate_factors([p for _, p in module.named_parameters()], self.group)
        return torch.func.functional_call(module, dict(zip(names, reps)), (x,))

    def bilinear(self, left: Tensor, right: Tensor, factors: list[Tensor]) -> Tensor:
        # the factors' gradients are summed over the ranks inside the distributed product
        return self.total(left * self.kron_matmul(factors, right))

    @staticmethod
    def step_chunk(gp) -> None:
        return None  # the sharded exact step is not chunked, nor the cg step split into CG runs

    def exact_lml(self, y: Optional[Tensor], noise: Tensor, outputscale: Tensor, factors: list[Tensor], *,
                  mean: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tensor:
        """``log N(y − mean | 0, s² ⊗K_k + σ² I)`` on this rank's block (``y`` ``None``: ``r = 0``)."""
        if mean is not None and mean.dim() == 0:  # a constant: replicated, meeting sharded data here
            (mean,) = replicate_factors([mean], self.group)
        resid = y if y is None or mean is None else y - mean
        return _DistributedExactLML.apply(resid, noise, outputscale, self.info, *factors)

    @staticmethod
    def dense_limit(device: torch.device) -> int:
        """0: a sharded grid never forms ``C_OO`` densely (:mod:`kronegp.models._dense`)."""
        return 0

    def covariance(self, factors: list[Tensor], outputscale: Tensor, fill_noise: Tensor, *, homoskedastic: bool,
                   tol: float, max_iters: int, precondition: bool) -> FullGridCovariance:
        return sharded_grid_covariance(factors, outputscale, fill_noise, homoskedastic=homoskedastic, tol=tol,
                                       max_iters=max_iters, sharding=self.sharding, rank=self.rank,
                                       group=self.group, precondition=precondition)

    def fill_noise(self, noise: Optional[Tensor], cell_noise: Optional[Tensor], observed: Optional[Tensor]) -> Tensor:
        """``d̃`` on this rank's cells: ``σ²`` (replicated: its gradient summed over the ranks), or
        the per-cell noise with its global geometric mean at missing cells (no gradient)."""
        if cell_noise is None:
            (noise,) = replicate_factors([noise], self.group)
            return noise.expand(self.n_local)
        if observed is None:
            return cell_noise
        with torch.no_grad():
            safe = torch.where(observed, cell_noise, torch.ones_like(cell_noise))
            fill = torch.exp(self.total(torch.log(safe)[observed]) / self.count(observed))
            return torch.where(observed, cell_noise, fill)

    def grid_points(self, axes: list[Tensor]) -> Tensor:
        idx = torch.arange(self.rows.start, self.rows.stop, device=axes[0].device)
        multi = torch.unravel_index(idx, self.shape)
        return torch.stack([ax[m] for ax, m in zip(axes, multi)], dim=-1)

    def std_normal(self, rows: int, cols: int, offset: int, *, seed: int, resample: bool, like: Tensor) -> Tensor:
        """This rank's rows of an ``(N, cols)`` standard normal block (module docstring)."""
        dev, dt = like.device, like.dtype
        scheme = self.probe_scheme
        if scheme == "auto":
            scheme = "replicated" if self.n_cells * cols <= REPLICATED_PROBE_LIMIT else "chunked"
        if scheme == "replicated":
            gen = torch.Generator(device=dev)
            gen.manual_seed(probe_seed(seed, offset))
            # GridGP's draw: column after column (its (N, cols) block is a transposed view)
            return torch.randn(cols, self.n_cells, generator=gen, dtype=dt, device=dev)[:, self.rows].mT.contiguous()
        out = []
        start, stop = self.rows.start, self.rows.stop
        for chunk in range(start // _PROBE_CHUNK_ROWS, (stop - 1) // _PROBE_CHUNK_ROWS + 1):
            c0 = chunk * _PROBE_CHUNK_ROWS
            c1 = min(self.n_cells, c0 + _PROBE_CHUNK_ROWS)
            key = hashlib.blake2b(f"{seed},{offset},{chunk}".encode(), digest_size=8).digest()
            gen = torch.Generator(device=dev)
            gen.manual_seed(int.from_bytes(key, "little") >> 1)
            block = torch.randn(c1 - c0, cols, generator=gen, dtype=dt, device=dev)
            out.append(block[max(start, c0) - c0 : min(stop, c1) - c0])
        return torch.cat(out)

    def unit_probes(self, cells: Optional[Tensor], count: int, like: Tensor) -> Tensor:
        """This rank's rows of ``√S`` times the unit vectors of the ``S = count`` cells (global order)."""
        dev = like.device
        local = self.n_local if cells is None else int(cells.sum())
        counts = torch.zeros(self.sharding.world_size, dtype=torch.int64, device=dev)
        counts[self.rank] = local
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.group)
        before = int(counts[: self.rank].sum())
        idx = torch.arange(self.n_local, device=dev)
        if cells is not None:
            idx = idx[cells]
        out = torch.zeros(self.n_local, count, dtype=like.dtype, device=dev)
        out[idx, torch.arange(before, before + local, device=dev)] = math.sqrt(count)
        return out




class ShardedPlacement:
    """How :class:`~kronegp.GridGP` places its data on a grid sharded over ``group``: its
    ``layout`` argument (what :class:`DistributedGridGP` passes). :meth:`place` checks this
    rank's block with :func:`~kronegp.models._data.parse_grid_data` (``values``, ``mask``,
    ``noise`` 1-D blocks of the flattened grid, ``axes`` the whole grid's), raises every rank's
    errors on every rank, and returns the :class:`ShardedLayout` with the block.

    Args:
        group: the process group (default: the world).
        probes: ``"auto"``, ``"replicated"`` or ``"chunked"`` (module docstring).
    """

    def __init__(self, group=None, probes: str = "auto"):
        self.rank, self.world_size = group_rank_size(group)
        if probes not in ("auto", "replicated", "chunked"):
            raise ValueError(f"probes must be 'auto', 'replicated' or 'chunked', got {probes!r}")
        self.group, self.probes = group, probes

    def place(self, values: Any, axes: Any, *, mask: Any = None, noise: Any = None, dtype=None,
              device=None) -> tuple[ShardedLayout, ParsedGrid]:
        group, rank = self.group, self.rank
        problem, data = None, None
        try:
            data = parse_grid_data(values, axes, mask=mask, noise=noise, dtype=dtype, device=device,
                                   block=lambda shape: grid_sharding(shape, self.world_size).rows(rank))
            dev = data.values.device
            if str(dist.get_backend(group)).lower() == "nccl" and dev.type != "cuda":
                raise ValueError(
                    f"device is {dev} but the group's backend is NCCL, which exchanges CUDA tensors "
                    "only: pass device='cuda' (this rank's GPU), or use a gloo group for CPU tensors")
        except (TypeError, ValueError) as err:
            problem = (type(err).__name__, str(err))
        raise_together(problem, group)
        dev = data.values.device
        if sum_over_ranks([noise is not None], group, dev)[0] not in (0, self.world_size):
            raise_together(
                ("ValueError", "noise was given on some ranks and not on others: pass it on every rank or none"), group)
        shape = tuple(int(a.shape[0]) for a in data.axes)
        layout = ShardedLayout(grid_sharding(shape, self.world_size), rank, group, self.probes)
        observed = data.mask if data.mask is not None else torch.ones_like(data.values, dtype=torch.bool)
        n_observed = layout.count(observed)
        if n_observed == 0:
            raise ValueError("every cell is missing (all NaN or mask all False) on every rank: nothing to fit")
        data.mask = None if n_observed == layout.n_cells else observed
        return layout, data


# --------------------------------------------------------------------------- the model


class DistributedGridGP(GridGP):
    """:class:`kronegp.GridGP` with the grid sharded over ``group``: the same model (construction,
    standardisation, hyperparameters, :meth:`fit`, the exact and cg inference paths) on a
    :class:`ShardedLayout`, i.e. ``GridGP(..., layout=ShardedPlacement(group, probes))``.

    Each rank holds only its block of the grid: the cells ``rows_of(shape, rank, G)`` of
    the row-major flattened grid (see the module docstring). Hyperparameters have
    :class:`~kronegp.GridGP`'s names and initial values, computed from statistics
    all-reduced over the whole grid, so they are identical on every rank. Every rank of
    ``group`` must construct the model, and call every method, together; a bad input on any
    rank raises on every rank, naming the rank.

    Args:
        values: this rank's block, a 1-D tensor/array of length ``N_r`` (NaN = missing).
            Use :meth:`from_grid` to pass the whole grid instead.
        axes: one 1-D coordinate array per dimension of the *whole* grid (required: it
            gives the grid's shape).
        mask: optional bool block (True = observed), combined with the NaNs of ``values``.
        noise: optional per-cell noise variances: a scalar or this rank's block (data units).
        group: the process group (default: the world).
        probes: ``"auto"``, ``"replicated"`` or ``"chunked"`` (module docstring).
        **kwargs: :class:`~kronegp.GridGP`'s other arguments. ``path`` may be ``"auto"``,
            ``"exact"`` or ``"cg"``: exact-missing and separable-mask need the whole grid on one
            device and refuse (``"auto"`` takes cg wherever cells are missing).

    Attributes:
        path: ``"exact"`` (every cell observed, learned homoskedastic noise) or ``"cg"``.
        rows: the slice of the flattened grid this rank holds.
        cg_iterations, cg_residual, history: as for :class:`~kronegp.GridGP`.

    Prediction, sampling and memory plans are not distributed: copy the hyperparameters into a
    single-device :class:`~kronegp.GridGP` with :meth:`hyperparameter_state`.
    """

    def __init__(self, values: Any, axes: Sequence[Any], *, group=None, probes: str = "auto", **kwargs: Any):
        super().__init__(values, axes, layout=ShardedPlacement(group, probes), **kwargs)
        self.check_replicated()

    @classmethod
    def from_grid(cls, values: Any, axes: Optional[Sequence[Any]] = None, *, mask: Any = None,
                  noise: Any = None, group=None, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device | str] = None, **kwargs) -> "DistributedGridGP":
        """Build from the *whole* grid (every rank passes the same one) and keep this rank's block.

        ``values``, ``axes``, ``mask``, ``noise`` are exactly :class:`~kronegp.GridGP`'s
        (numpy, torch, ``xarray.DataArray``; checked by the same parser); other keywords
        go to the constructor. Convenient for tests and grids that fit one host's memory.
        """
        rank, world = group_rank_size(group)
        data = parse_grid_data(values, axes, mask=mask, noise=noise, dtype=dtype, device=device)
        rows = grid_sharding(data.values.shape, world).rows(rank)
        block = [None if t is None else t.reshape(-1)[rows].clone() for t in (data.values, data.mask, data.noise)]
        return cls(block[0], data.axes, mask=block[1], noise=block[2], group=group,
                   dtype=data.values.dtype, device=data.values.device, **kwargs)

    @staticmethod
    def rows_of(shape: Sequence[int], rank: int, world_size: int) -> slice:
        """The cells of the flattened grid ``shape`` that ``rank`` of ``world_size`` holds."""
        return grid_sharding(shape, world_size).rows(rank)

    @property
    def group(self):
        return self.layout.group

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.sharding.world_size

    @property
    def rows(self) -> slice:
        return self.layout.rows

    def check_replicated(self) -> None:
        """Raise ``ValueError`` on every rank unless every parameter is the same on every rank."""
        params = [p.detach().reshape(-1).to(torch.float64) for p in self.parameters()]
        if not params:
            return
        flat = torch.cat(params)
        lo, hi = flat.clone(), flat.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):
            names = [n for n, p in self.named_parameters() for _ in range(p.numel())]
            bad = sorted({names[i] for i in torch.nonzero(lo != hi).reshape(-1).tolist()})
            raise ValueError(
                f"hyperparameters differ between ranks ({', '.join(bad)}): every rank must build the "
                "model with the same kernels, mean and settings"
            )

    def hyperparameter_state(self) -> dict[str, Tensor]:
        """The parameters by name (GridGP's names): ``GridGP.load_state_dict(·, strict=False)``."""
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def loss(self) -> Tensor:
        """``−log p(y_O) / n_observed``, :meth:`fit`'s objective (replicated, differentiable)."""
        return self._loss()

    def _not_distributed(self, what: str):
        raise NotImplementedError(
            f"DistributedGridGP.{what} is not distributed: load hyperparameter_state() into a "
            "single-device kronegp.GridGP (load_state_dict(..., strict=False)) and call it there")

    def predict(self, *args: Any, **kwargs: Any):
        self._not_distributed("predict")

    def sample(self, *args: Any, **kwargs: Any):
        self._not_distributed("sample")

    def memory_plan(self, *args: Any, **kwargs: Any):
        self._not_distributed("memory_plan")

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, rank={self.rank}/{self.world_size}, rows=[{self.rows.start}, "
            f"{self.rows.stop}), observed={self.n_observed}/{self.n_cells}, path={self.path}, "
            f"dtype={self.y.dtype}, device={self.y.device}"
        )
