"""GridGP training with the grid sharded over the ranks of a ``torch.distributed`` group.

:class:`DistributedGridGP` is :class:`kronegp.GridGP`'s likelihood — the exact Kronecker
path, and the cg path (missing cells and/or per-cell noise) — with every grid-sized
vector split over the ranks as :func:`~kronegp.distributed.plan_shardings` splits a
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
``exact_lml`` is :class:`_DistributedExactLML`.

Gradients follow :mod:`kronegp.distributed.reduce`'s convention: the loss is one
replicated scalar, every rank calls ``loss.backward()`` on it once, and afterwards every
rank holds the full gradient of every hyperparameter (no ``DistributedDataParallel``).
Replicated parameters that meet sharded data are passed through
:func:`replicate_factors` (sum of the gradients over ranks) exactly once; those that only
meet all-reduced scalars are not.

Probe vectors (cg path): with ``probes="replicated"`` every rank draws the whole
``(N, S)`` block from the generator :class:`~kronegp.GridGP` uses (seeded ``seed +
offset`` on the data's device) and keeps its rows, so the run reproduces the
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

import gpytorch
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

import kronegp
from kronegp.distributed import ops as dist_ops
from kronegp.distributed.reduce import allreduce_inner, allreduce_sum, replicate_factors
from kronegp.distributed.sharding import GridSharding, plan_shardings
from kronegp.linalg import kron_vector
from kronegp.models import (
    FullGridCovariance, GridHyperparameters, checked_axis, default_kernel, factor_eigs, parse_grid_data,
    resolve_dtype_device,
)
from kronegp.models.paths import CGPath, ExactPath

__all__ = ["DistributedGridGP", "ShardedKronEigen", "ShardedLayout", "sharded_grid_covariance", "grid_sharding"]

# "auto" probes: draw the whole (N, S) block on every rank up to this many entries.
_REPLICATED_PROBE_LIMIT = 1 << 24
_PROBE_CHUNK_ROWS = 1 << 16


# --------------------------------------------------------------------------- group helpers


def _group_rank_size(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "DistributedGridGP needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets its environment)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group passed as group")
    return rank, dist.get_world_size(group)


def _sum_over_ranks(values: Sequence[float | int], group, device, dtype=torch.float64) -> list:
    """Plain (non-differentiable) all-reduced sums of a few numbers, in one call."""
    buf = torch.tensor(list(values), dtype=dtype, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.tolist()


def _raise_together(problem: Optional[tuple[str, str]], group) -> None:
    """Raise on *every* rank when any rank found bad input.

    ``problem`` is ``(exception type name, message)`` or ``None``. A rank that raised
    alone would leave the others waiting in the next collective, so the verdicts are
    all-gathered first; every rank raises the first bad rank's type (``TypeError`` or
    ``ValueError``) with every bad rank's message, each naming its rank.
    """
    verdicts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(verdicts, problem, group=group)
    bad = [(r, v) for r, v in enumerate(verdicts) if v is not None]
    if bad:
        exc_type = TypeError if bad[0][1][0] == "TypeError" else ValueError
        raise exc_type("; ".join(f"rank {r}: {msg}" for r, (_, msg) in bad))


def grid_sharding(shape: Sequence[int], world_size: int) -> GridSharding:
    """The split of the grid ``shape`` over ``world_size`` ranks used for every grid vector.

    It is the input (= output) sharding of a square distributed product on that grid, so
    vectors in this layout go straight into :func:`kronegp.distributed.kron_matmul`.
    """
    return plan_shardings(tuple(int(n) for n in shape), None, world_size)[0]


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


# --------------------------------------------------------------------------- input checking


class ShardedLayout:
    """:class:`kronegp.models.layout.LocalLayout`'s interface on a grid sharded over ``group``:
    every grid vector is this rank's block ``rows(rank)`` of the flattened grid, sums and inner
    products are all-reduced, Kronecker products are the distributed ones (see
    :mod:`kronegp.models.layout` for what each method does). The inference paths of
    :mod:`kronegp.models.paths` run on it unchanged (today :class:`DistributedGridGP`'s cg path).

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

    def kron_matmul(self, factors: list[Tensor], x: Tensor) -> Tensor:
        return dist_ops.kron_matmul(factors, x, self.group)

    def eigen(self, factors: list[Tensor]) -> ShardedKronEigen:
        return ShardedKronEigen(factors, self.sharding, self.rank, self.group)

    def kron_vector(self, vectors: list[Tensor]) -> Tensor:
        return _local_kron_vector(vectors, self.sharding, self.rank)

    def total(self, x: Tensor) -> Tensor:
        return allreduce_sum(x.sum(), self.group)

    def count(self, cells: Tensor) -> int:
        return int(_sum_over_ranks([int(cells.sum())], self.group, cells.device)[0])

    def bilinear(self, left: Tensor, right: Tensor, factors: list[Tensor]) -> Tensor:
        # the factors' gradients are summed over the ranks inside the distributed product
        return self.total(left * self.kron_matmul(factors, right))

    @staticmethod
    def step_chunk(gp) -> None:
        return None  # the sharded exact step is not chunked

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
            scheme = "replicated" if self.n_cells * cols <= _REPLICATED_PROBE_LIMIT else "chunked"
        if scheme == "replicated":
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed + offset)
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


def _check_axes(axes: Any, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    if not isinstance(axes, (list, tuple)) or len(axes) == 0:
        raise TypeError(
            "axes must be a non-empty list of 1-D coordinate arrays, one per grid dimension "
            f"(they give the whole grid's shape), got {type(axes).__name__}"
        )
    out = []
    for k, ax in enumerate(axes):
        num, _, _ = checked_axis(ax, k)
        out.append(torch.as_tensor(num, dtype=dtype, device=device))
    return out


def _as_local_vector(name: str, obj: Any, n_local: int, rank: int, rows: slice) -> Tensor:
    t = obj if isinstance(obj, Tensor) else torch.as_tensor(np.asarray(obj))
    if t.dim() != 1 or t.shape[0] != n_local:
        raise ValueError(
            f"{name} must be this rank's block of the flattened grid, a 1-D tensor of length "
            f"{n_local} (rank {rank} holds cells [{rows.start}, {rows.stop})), got shape {tuple(t.shape)}"
        )
    return t


# --------------------------------------------------------------------------- the model


class DistributedGridGP(GridHyperparameters, torch.nn.Module):
    """:class:`kronegp.GridGP`'s likelihood and training with the grid sharded over ``group``.

    Each rank holds only its block of the grid: the cells ``rows_of(shape, rank, G)`` of
    the row-major flattened grid (see the module docstring). Hyperparameters have the
    names and initial values :class:`~kronegp.GridGP` gives them (``kernels``,
    ``raw_outputscale``, ``raw_noise``, ``mean_module``), computed from statistics
    all-reduced over the whole grid, so they are identical on every rank.

    Args:
        values: this rank's block, a 1-D tensor/array of length ``N_r`` (NaN = missing).
            Use :meth:`from_grid` to pass the whole grid instead.
        axes: one 1-D coordinate array per dimension of the *whole* grid (required: it
            gives the grid's shape).
        mask: optional bool block (True = observed), combined with the NaNs of ``values``.
        noise: optional per-cell noise variances: a scalar or this rank's block (data units).
        group: the process group (default: the world). Every rank of it must construct
            the model, and call every method, together.
        kernels, mean, standardize, dtype, device, num_probes, cg_tol, cg_max_iters,
        precondition, seed, exact_trace_limit: as for :class:`~kronegp.GridGP`.
        probes: ``"auto"``, ``"replicated"`` or ``"chunked"`` (module docstring).

    Attributes:
        path: ``"exact"`` (every cell observed, learned homoskedastic noise) or ``"cg"``.
        rows: the slice of the flattened grid this rank holds.
        cg_iterations, cg_residual, history: as for :class:`~kronegp.GridGP`.
    """

    def __init__(
        self,
        values: Any,
        axes: Sequence[Any],
        *,
        mask: Any = None,
        noise: Any = None,
        group=None,
        kernels: Optional[Sequence[gpytorch.kernels.Kernel]] = None,
        mean: Optional[gpytorch.means.Mean] = None,
        standardize: bool = True,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
        num_probes: int = 16,
        cg_tol: float = 1e-5,
        cg_max_iters: int = 1000,
        precondition: bool = True,
        seed: int = 0,
        exact_trace_limit: int = 1024,
        probes: str = "auto",
    ):
        super().__init__()
        rank, world = _group_rank_size(group)
        self.group, self.rank, self.world_size = group, rank, world
        vals_in = values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
        dtype, device = resolve_dtype_device(vals_in, dtype, device)
        if str(dist.get_backend(group)).lower() == "nccl" and device.type != "cuda":
            raise ValueError(
                f"device is {device} but the group's backend is NCCL, which exchanges CUDA tensors "
                "only: pass device='cuda' (this rank's GPU), or use a gloo group for CPU tensors"
            )
        if probes not in ("auto", "replicated", "chunked"):
            raise ValueError(f"probes must be 'auto', 'replicated' or 'chunked', got {probes!r}")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")

        self.axes_list = _check_axes(axes, dtype, device)
        self.shape = tuple(int(a.shape[0]) for a in self.axes_list)
        self.ndim = len(self.shape)
        self.n_cells = math.prod(self.shape)
        self.sharding = grid_sharding(self.shape, world)
        self.rows = self.sharding.rows(rank)
        n_local = self.sharding.local_size(rank)
        self.n_local = n_local
        self.num_probes = int(num_probes)
        self.cg_tol, self.cg_max_iters = float(cg_tol), int(cg_max_iters)
        self.precondition = bool(precondition)
        self.seed = int(seed)
        self.exact_trace_limit = int(exact_trace_limit)
        self.probe_scheme = probes
        self.cg_iterations: Optional[int] = None
        self.cg_residual: Optional[float] = None
        self.history: list[float] = []
        #: where the grid vectors live: this rank's block (:class:`ShardedLayout`)
        self.layout = ShardedLayout(self.sharding, rank, group, probes)
        self._info = self.layout.info
        self.resample_probes = False  # the probes are the same at every evaluation (L-BFGS needs that)
        self.cg_inner_iterations = 0
        self._last_extra: dict = {}

        # ---- this rank's data, checked; every rank learns every rank's verdict
        problem = None
        try:
            vals = _as_local_vector("values", vals_in, n_local, rank, self.rows)
            if not (vals.is_floating_point() or vals.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
                raise TypeError(f"values must be real-valued (float or int), got dtype {vals.dtype}")
            vals = vals.to(device=device, dtype=dtype)
            observed = ~torch.isnan(vals)
            if mask is not None:
                m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
                if m.dtype != torch.bool:
                    raise TypeError(f"mask must be a boolean array (True = observed), got dtype {m.dtype}")
                m = _as_local_vector("mask", m, n_local, rank, self.rows).to(device)
                if bool((m & ~observed).any()):
                    raise ValueError("values is NaN at cells that mask marks observed (True)")
                observed = observed & m
            if not bool((torch.isfinite(vals) | ~observed).all()):
                raise ValueError("values holds infinite entries at observed cells; mark them missing")
            vals = torch.where(observed, vals, torch.zeros_like(vals))
            noise_t = None
            if noise is not None:
                nz = noise if isinstance(noise, Tensor) else torch.as_tensor(np.asarray(noise))
                if nz.dim() != 0:
                    nz = _as_local_vector("noise", nz, n_local, rank, self.rows)
                nz = torch.broadcast_to(nz.to(device=device, dtype=dtype), (n_local,))
                at_obs = nz[observed]
                if not bool(torch.isfinite(at_obs).all()) or bool((at_obs <= 0).any()):
                    raise ValueError("noise variances must be finite and positive at every observed cell")
                noise_t = torch.where(observed, nz, torch.zeros_like(nz)).contiguous()
        except (TypeError, ValueError) as err:
            problem = (type(err).__name__, str(err))
        _raise_together(problem, group)
        flags = _sum_over_ranks([noise is not None], group, device)
        if flags[0] not in (0, world):
            _raise_together(
                ("ValueError", "noise was given on some ranks and not on others: pass it on every rank or none"),
                group,
            )

        # ---- global statistics (all-reduced), as GridGP computes them on the whole grid
        n_obs_local = int(observed.sum())
        obs_vals = vals[observed].to(torch.float64)
        n_obs, total = _sum_over_ranks([n_obs_local, float(obs_vals.sum())], group, device)
        self.n_observed = int(n_obs)
        if self.n_observed == 0:
            raise ValueError("every cell is missing (all NaN or mask all False) on every rank: nothing to fit")
        mean_v = total / n_obs
        (ss,) = _sum_over_ranks([float(((obs_vals - mean_v) ** 2).sum())], group, device)
        std = math.sqrt(ss / (n_obs - 1)) if n_obs > 1 else 0.0
        if standardize:
            self.shift, self.scale = mean_v, (std if std > 0 else 1.0)
        else:
            self.shift, self.scale = 0.0, 1.0
        y = torch.where(observed, (vals - self.shift) / self.scale, torch.zeros_like(vals))
        self.register_buffer("y", y)
        self.register_buffer("observed", None if self.n_observed == self.n_cells else observed.contiguous())
        self.register_buffer("cell_noise", noise_t / self.scale**2 if noise_t is not None else None)
        # the path: GridGP's exact or cg object (the other two need the whole grid), chosen once
        self.inference = (ExactPath if self.path == "exact" else CGPath)(self.layout)
        for k, ax in enumerate(self.axes_list):
            self.register_buffer(f"axis_{k}", ax)
        # statistics of the standardised observations (GridGP: y_obs.mean(), y_obs.var())
        y_mean = (mean_v - self.shift) / self.scale
        y_var = (ss / self.scale**2) / (n_obs - 1) if n_obs > 1 else 1.0
        var0 = y_var if y_var > 0 else 1.0
        dt, dev = dtype, device

        # ---- hyperparameters: GridGP's names and initial values
        if kernels is None:
            kernels = [default_kernel(ax) for ax in self.axes_list]
        if isinstance(kernels, gpytorch.kernels.Kernel) or not isinstance(kernels, (list, tuple)):
            raise TypeError(
                f"kernels must be a list of {self.ndim} GPyTorch kernels (one per dimension), got {type(kernels).__name__}"
            )
        if len(kernels) != self.ndim or not all(isinstance(k, gpytorch.kernels.Kernel) for k in kernels):
            raise ValueError(f"kernels must hold one gpytorch.kernels.Kernel per dimension ({self.ndim})")
        self.kernels = torch.nn.ModuleList([k.to(dtype=dt, device=dev) for k in kernels])
        self._init_hyperparameters(var0, y_mean, noise_t is None, mean, dt, dev)
        self.check_replicated()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_grid(cls, values: Any, axes: Optional[Sequence[Any]] = None, *, mask: Any = None,
                  noise: Any = None, group=None, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device | str] = None, **kwargs) -> "DistributedGridGP":
        """Build from the *whole* grid (every rank passes the same one) and keep this rank's block.

        ``values``, ``axes``, ``mask``, ``noise`` are exactly :class:`~kronegp.GridGP`'s
        (numpy, torch, ``xarray.DataArray``; checked by the same parser); other keywords
        go to the constructor. Convenient for tests and grids that fit one host's memory.
        """
        rank, world = _group_rank_size(group)
        data = parse_grid_data(values, axes, mask=mask, noise=noise, dtype=dtype, device=device)
        rows = grid_sharding(data.values.shape, world).rows(rank)
        flat = data.values.reshape(-1)[rows]
        local_mask = data.mask.reshape(-1)[rows] if data.mask is not None else None
        local_noise = data.noise.reshape(-1)[rows] if data.noise is not None else None
        return cls(flat.clone(), data.axes, mask=None if local_mask is None else local_mask.clone(),
                   noise=None if local_noise is None else local_noise.clone(), group=group,
                   dtype=data.values.dtype, device=data.values.device, **kwargs)

    @staticmethod
    def rows_of(shape: Sequence[int], rank: int, world_size: int) -> slice:
        """The cells of the flattened grid ``shape`` that ``rank`` of ``world_size`` holds."""
        return grid_sharding(shape, world_size).rows(rank)

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

    # ------------------------------------------------------------------ parameters

    def _local_points(self) -> Tensor:
        """Coordinates ``(N_r, d)`` of this rank's cells."""
        return self.layout.grid_points(self.axes)

    def _mean_local(self) -> Tensor:
        """``μ`` on this rank's cells (model units).

        The mean's parameters meet sharded data here, so they pass through
        :func:`replicate_factors`: their gradient is summed over the ranks.
        """
        if not self.user_mean:
            (constant,) = replicate_factors([self.mean_module.constant], self.group)
            return constant.expand(self.n_local)
        names = [n for n, _ in self.mean_module.named_parameters()]
        reps = replicate_factors([p for _, p in self.mean_module.named_parameters()], self.group)
        out = torch.func.functional_call(self.mean_module, dict(zip(names, reps)), (self._local_points(),))
        return (out - self.shift) / self.scale

    def _fill_noise(self) -> Tensor:
        """``d̃`` on this rank's cells (model units): :meth:`ShardedLayout.fill_noise`."""
        return self.layout.fill_noise(self.noise, self.cell_noise, self.observed)

    #: μ on this rank's cells, under the name the inference paths call
    _mean_grid = _mean_local

    def _std_normal_rows(self, cols: int, offset: int) -> Tensor:
        """This rank's rows of an ``(N, cols)`` standard normal block (module docstring)."""
        return self.layout.std_normal(self.n_cells, cols, offset, seed=self.seed, resample=False, like=self.y)

    # ------------------------------------------------------------------ likelihood

    def _lml_model_units(self) -> Tensor:
        # GridGP's own path objects, run on this rank's block through the layout
        return self.inference.lml(self)

    def log_marginal_likelihood(self) -> Tensor:
        """``log p(y_O)`` in data units: a 0-dim tensor, the same on every rank.

        Differentiable in every hyperparameter; after ``backward()`` every rank holds the
        full gradient. Exact on the exact path; on the cg path GridGP's estimate.
        """
        return self._lml_model_units() - self.n_observed * math.log(self.scale)

    def loss(self) -> Tensor:
        """``−log p(y_O) / n_observed``, :meth:`fit`'s objective (replicated)."""
        return -self.log_marginal_likelihood() / self.n_observed

    # ------------------------------------------------------------------ fitting

    def fit(self, iters: int = 100, optimizer: str = "adam", lr: Optional[float] = None,
            progress: bool = True, *, patience: Optional[int] = None, min_delta: float = 1e-5) -> list[float]:
        """:meth:`kronegp.GridGP.fit` on the group: every rank takes the same steps.

        The loss and the gradients are replicated, so each rank's optimiser makes the same
        update and the hyperparameters stay identical; the progress bar shows on rank 0.
        """
        from tqdm.auto import tqdm

        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        params = [p for p in self.parameters() if p.requires_grad]
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=0.1 if lr is None else lr)
            patience = 10 if patience is None else patience
        else:
            opt = torch.optim.LBFGS(params, lr=1.0 if lr is None else lr, max_iter=1,
                                    line_search_fn="strong_wolfe", history_size=20)
            patience = 3 if patience is None else patience

        def closure():
            opt.zero_grad()
            loss = self.loss()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DistributedGridGP.fit: the loss became {float(loss)}")
            loss.backward()
            return loss

        self.train()
        best, waited = math.inf, 0
        bar = tqdm(range(iters), disable=not progress or self.rank != 0, desc=f"DistributedGridGP ({self.path})")
        for _ in bar:
            loss = float(opt.step(closure))
            self.history.append(loss)
            bar.set_postfix(loss=f"{loss:.5g}", cg=self.cg_iterations)
            if loss < best - min_delta:
                best, waited = loss, 0
            else:
                waited += 1
                if waited >= patience:
                    break
        bar.close()
        self.eval()
        return self.history

    # ------------------------------------------------------------------ reporting

    def hyperparameter_state(self) -> dict[str, Tensor]:
        """The parameters by name (GridGP's names): ``GridGP.load_state_dict(·, strict=False)``."""
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters in data units (as :meth:`kronegp.GridGP.hyperparameters`)."""
        with torch.no_grad():
            lengthscales = []
            for kern in self.kernels:
                ls = getattr(kern, "lengthscale", None)
                lengthscales.append(ls.reshape(-1).tolist() if isinstance(ls, Tensor) else None)
            return {
                "lengthscales": lengthscales,
                "outputscale": float(self.outputscale) * self.scale**2,
                "noise": float(self.noise) * self.scale**2 if self.learn_noise else "per-cell (fixed)",
                "mean": float(self.mean_module.constant) * self.scale + self.shift if not self.user_mean else "user",
                "path": self.path,
            }

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, rank={self.rank}/{self.world_size}, rows=[{self.rows.start}, "
            f"{self.rows.stop}), observed={self.n_observed}/{self.n_cells}, path={self.path}, "
            f"dtype={self.y.dtype}, device={self.y.device}"
        )
