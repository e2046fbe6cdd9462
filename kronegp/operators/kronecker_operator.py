"""``KroneckerOperator``: linear_operator's Kronecker product with kronegp's products underneath.

``K = F_1 ⊗ F_2 ⊗ … ⊗ F_N`` with ``F_i`` of shape ``(*batch, P_i, Q_i)``, so ``K`` is
``(*batch, ΠP_i, ΠQ_i)`` and, for a grid index ``(p_1, …, p_N)`` flattened row-major
(the last factor's index varies fastest)::

    K[(p_1…p_N), (q_1…q_N)] = F_1[p_1, q_1] · F_2[p_2, q_2] ⋯ F_N[p_N, q_N]

Everything linear_operator derives from Kronecker structure (eigendecomposition solves and
log-determinants, added diagonals, root decompositions, the diagonal, indexing, batching)
is inherited from :class:`~linear_operator.operators.KroneckerProductLinearOperator`.
What changes is how ``K`` meets a block of vectors: the products go through
:func:`kronegp.kron_matmul` / :func:`kronegp.matmul_kron` (one fused kernel on a GPU)
instead of linear_operator's reshape/GEMM/transpose loop, and the gradient with respect to
the factors comes from :meth:`KroneckerOperator._bilinear_derivative`, a closed form built
from Kronecker products rather than autograd through ``N`` stored intermediates.

Factors that are LinearOperators — the densification rule
----------------------------------------------------------
The fused product wants plain matrices. Each factor is turned into one by
:func:`factor_as_matrix`:

* a ``torch.Tensor`` or :class:`~linear_operator.operators.DenseLinearOperator` is used as
  is (no copy);
* any other LinearOperator (Toeplitz, diagonal, added-diagonal, sums, products, …) with at
  most :data:`DENSE_FACTOR_MAX_NUMEL` entries is densified (a symmetric Toeplitz factor by
  one gather from its column, anything else with ``to_dense()``); without autograd the
  dense form is cached by the identity of the factor's tensors, so a training step
  densifies it once. A grid axis is short (tens to a few thousand points), so the ``P_i·Q_i`` cost
  of densifying is small next to the ``ΠP_i · T`` product it feeds, and a dense factor
  lets all the factors run as one kernel;
* a Kronecker product (a GPyTorch ``GridKernel`` covariance used as the data factor of
  a ``MultitaskKernel``, say) is flattened whatever its size: its own factors join the
  list, so ``(A ⊗ B) ⊗ C`` runs as the one product ``A ⊗ B ⊗ C`` (densifying it would
  cost a product with an identity on every call);
* any other larger LinearOperator keeps its structure: it is applied along its own axis
  with its own ``_matmul`` (e.g. an FFT for Toeplitz), while the runs of dense factors
  around it still go through kronegp's product. That costs an extra transpose of the
  block per structured factor, which is what its structure saves against ``P_i·Q_i``
  memory.

Nothing in this module builds the dense ``ΠP_i × ΠQ_i`` matrix.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    ToeplitzLinearOperator,
)
from linear_operator.utils.memoize import cached
from torch import Tensor

from kronegp import ops
from kronegp.linalg import kron_bilinear_grads, kron_vector, symmetric_eig

__all__ = [
    "DENSE_FACTOR_MAX_NUMEL",
    "DENSE_CACHE_SIZE",
    "KroneckerOperator",
    "apply_along_axes",
    "clear_dense_factor_cache",
    "factor_as_matrix",
    "flat_factor_matrices",
    "leaf_eigendecompositions",
]

#: LinearOperator factors with at most this many entries (``P_i · Q_i``) are densified
#: before a product; larger ones keep their structure. 2^22 entries is a 2048 × 2048
#: factor: 16 MiB in float32, well below what one product over the grid moves.
DENSE_FACTOR_MAX_NUMEL = 2**22

Matrix = Union[Tensor, LinearOperator]


def flat_factor_matrices(factor: LinearOperator) -> list[Matrix]:
    """``factor`` as the list of matrices it contributes to a product along its axis.

    One entry (:func:`factor_as_matrix`) unless ``factor`` is a Kronecker product, whose
    own factors are then listed in order (recursively): a product with ``A ⊗ B`` along one
    axis is the product with ``A`` and ``B`` along two.
    """
    if isinstance(factor, KroneckerProductLinearOperator):
        return [m for sub in factor.linear_ops for m in flat_factor_matrices(sub)]
    return [factor_as_matrix(factor)]


def factor_as_matrix(factor: LinearOperator) -> Matrix:
    """The form in which ``factor`` enters a Kronecker product (see the module docstring).

    Returns a ``Tensor`` (dense factors, and structured ones up to
    :data:`DENSE_FACTOR_MAX_NUMEL` entries) or the LinearOperator itself (larger structured
    factors, applied with their own ``_matmul``). A structured factor whose dense form
    needs no autograd graph (grad mode off, as inside linear_operator's autograd
    Functions, or no parameter requiring grad) comes from :func:`_cached_dense`, so
    the forward solve, the log-determinant and the backward of one training step
    densify it once.
    """
    if isinstance(factor, Tensor):
        return factor
    if isinstance(factor, DenseLinearOperator):
        return factor.tensor
    if factor.size(-2) * factor.size(-1) <= DENSE_FACTOR_MAX_NUMEL:
        if _needs_graph(factor):
            return _densify(factor)
        return _cached_dense(factor)
    return factor


# ------------------------------------------------------------------ dense forms of factors

#: How many dense forms of structured factors :func:`factor_as_matrix` keeps (0: none).
DENSE_CACHE_SIZE = 16
#: Only factors with at most this many entries are cached (a 1024 × 1024 factor).
_DENSE_CACHE_MAX_NUMEL = 2**20

_dense_cache: "OrderedDict[tuple, tuple[tuple[Tensor, ...], Tensor]]" = OrderedDict()
_toeplitz_index_cache: dict = {}


def clear_dense_factor_cache() -> None:
    """Forget every cached dense factor (see :func:`factor_as_matrix`)."""
    _dense_cache.clear()


def _tensor_key(t: Tensor) -> Optional[tuple]:
    if t.is_inference():
        return None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _factor_key(factor: LinearOperator, dtype: torch.dtype) -> Optional[tuple]:
    """Identity of ``factor``'s value: its class, its representation tensors (storage,
    offset, shape, strides, dtype, device, version) and its keyword arguments, plus the
    requested dtype. ``None`` when something in it cannot be keyed."""
    keys = []
    for t in factor.representation():
        k = _tensor_key(t)
        if k is None:
            return None
        keys.append(k)
    if any(isinstance(v, Tensor) for v in factor._kwargs.values()):
        return None  # hashed by id, which a freed tensor's successor may reuse: not a value key
    try:
        kwargs = tuple(sorted(factor._kwargs.items()))
        hash(kwargs)
    except TypeError:
        return None
    return (type(factor), tuple(keys), kwargs, dtype)


def _needs_graph(factor: LinearOperator) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in factor.representation())


def _toeplitz_index(n: int, device: torch.device) -> Tensor:
    """``|i − j|`` for ``i, j < n``: the column entry of each position of a symmetric Toeplitz matrix."""
    key = (n, device)
    idx = _toeplitz_index_cache.get(key)
    if idx is None:
        r = torch.arange(n, device=device)
        idx = (r.unsqueeze(-1) - r).abs_()
        if len(_toeplitz_index_cache) > 64:
            _toeplitz_index_cache.clear()
        _toeplitz_index_cache[key] = idx
    return idx


def _densify(factor: LinearOperator) -> Tensor:
    r"""``factor`` as a dense tensor, differentiable with respect to its representation.

    A symmetric Toeplitz factor ``T[i, j] = c[|i − j|]`` is one gather from its column
    (linear_operator's ``to_dense`` multiplies it by the identity through FFTs, with a
    device synchronisation in its argument check); anything else uses ``to_dense()``.
    """
    if isinstance(factor, DenseLinearOperator):
        return factor.tensor
    if type(factor) is ToeplitzLinearOperator:
        column = factor.column
        return column[..., _toeplitz_index(column.size(-1), column.device)]
    return factor.to_dense()


def _cached_dense(factor: Union[Tensor, LinearOperator], dtype: Optional[torch.dtype] = None) -> Tensor:
    """The dense form of ``factor`` in ``dtype`` (default: its own), detached, cached by
    :func:`_factor_key` (least recently used out, references held so that a keyed
    storage cannot be reused while cached)."""
    if isinstance(factor, Tensor):
        out = factor.detach()
        return out if dtype is None or out.dtype == dtype else _cached_cast(out, dtype)
    dtype = factor.dtype if dtype is None else dtype
    if isinstance(factor, DenseLinearOperator) and factor.dtype == dtype:
        return factor.tensor.detach()
    numel = factor.size(-2) * factor.size(-1) * math.prod(factor.batch_shape)
    key = _factor_key(factor, dtype) if DENSE_CACHE_SIZE > 0 and numel <= _DENSE_CACHE_MAX_NUMEL else None
    if key is not None:
        hit = _dense_cache.get(key)
        if hit is not None:
            _dense_cache.move_to_end(key)
            return hit[1]
    # Not under no_grad: ``to_dense`` of many LinearOperators is memoized on the operator,
    # and a graph-less result cached there would cut the gradient of a later caller.
    if dtype == factor.dtype:
        dense = _densify(factor).detach()
    else:
        dense = _cached_dense(factor).to(dtype)
    if key is not None:
        _dense_cache[key] = (tuple(t.detach() for t in factor.representation()), dense)
        while len(_dense_cache) > DENSE_CACHE_SIZE:
            _dense_cache.popitem(last=False)
    return dense


def _cached_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` (``t`` detached), cached by ``t``'s identity like :func:`_cached_dense`."""
    k = _tensor_key(t)
    key = None if k is None or DENSE_CACHE_SIZE <= 0 or t.numel() > _DENSE_CACHE_MAX_NUMEL else ("cast", k, dtype)
    if key is not None:
        hit = _dense_cache.get(key)
        if hit is not None:
            _dense_cache.move_to_end(key)
            return hit[1]
    out = t.to(dtype)
    if key is not None:
        _dense_cache[key] = ((t,), out)
        while len(_dense_cache) > DENSE_CACHE_SIZE:
            _dense_cache.popitem(last=False)
    return out


def _dense_grad_to_representation(factor: LinearOperator, grad: Tensor) -> tuple[Optional[Tensor], ...]:
    r"""Chain ``G = ∂f/∂F`` (dense, shape of ``factor``) to ``factor``'s representation.

    * dense: ``G`` itself;
    * symmetric Toeplitz ``F[i, j] = c[|i − j|]``: ``∂f/∂c_k = Σ_{|i−j| = k} G[i, j]``
      (one scatter-add);
    * diagonal ``F = diag(d)``: ``∂f/∂d = diag(G)``; constant diagonal ``F = a I``:
      ``∂f/∂a = tr G``;
    * anything else: ``F._bilinear_derivative(G, I)``, since
      ``Σ_{pq} G[p, q] F[p, q] = Σ_c (G e_c)ᵀ F e_c``.
    """
    if isinstance(factor, DenseLinearOperator):
        return (grad,)
    kind = type(factor)
    if kind is ToeplitzLinearOperator:
        column = factor.column
        n = column.size(-1)
        idx = _toeplitz_index(n, grad.device).reshape(-1)
        g = grad.new_zeros(*grad.shape[:-2], n).index_add_(-1, idx, grad.reshape(*grad.shape[:-2], n * n))
        return (_sum_to_shape(g, column.shape),)
    if kind is ConstantDiagLinearOperator:
        g = grad.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        return (_sum_to_shape(g, factor.diag_values.shape),)
    if kind is DiagLinearOperator:
        return (_sum_to_shape(grad.diagonal(dim1=-2, dim2=-1), factor._diag.shape),)
    eye = torch.eye(factor.size(-1), dtype=grad.dtype, device=grad.device)
    return tuple(factor._bilinear_derivative(grad, eye.expand(*grad.shape[:-2], *eye.shape)))


# ------------------------------------------------------------------ eigendecompositions of factors


class _SymEigBackward(torch.autograd.Function):
    r"""Attach the gradient of a symmetric eigendecomposition to an already computed one.

    ``forward(A, λ, Q)`` returns ``(λ, Q)`` unchanged (computed elsewhere, without autograd);
    the backward is that of ``A = Q diag(λ) Qᵀ``::

        ∂f/∂A = Q (diag(ḡ_λ) + F ∘ ½(Qᵀ ḡ_Q − ḡ_Qᵀ Q)) Qᵀ,     F[i, j] = 1 / (λ_j − λ_i) (i ≠ j)

    (the term with ``F`` only when the eigenvectors are used; it divides by eigenvalue
    gaps exactly as ``torch.linalg.eigh``'s backward does).
    """

    @staticmethod
    def forward(ctx, a, lam, q):
        ctx.save_for_backward(lam, q)
        ctx.a_dtype = a.dtype
        return lam, q

    @staticmethod
    def backward(ctx, g_lam, g_q):
        lam, q = ctx.saved_tensors
        if g_q is None:
            if g_lam is None:
                return None, None, None
            inner = torch.diag_embed(g_lam.to(q.dtype))
        else:
            vg = q.mT @ g_q.to(q.dtype)
            skew = 0.5 * (vg - vg.mT)
            gaps = lam.unsqueeze(-2) - lam.unsqueeze(-1)
            gaps.diagonal(dim1=-2, dim2=-1).fill_(1.0)
            inner = skew / gaps
            if g_lam is not None:
                inner.diagonal(dim1=-2, dim2=-1).copy_(g_lam.to(q.dtype))
        return (q @ inner @ q.mT).to(ctx.a_dtype), None, None


def _is_diagonal(factor) -> bool:
    return isinstance(factor, DiagLinearOperator) and not isinstance(factor, KroneckerProductLinearOperator)


def leaf_eigendecompositions(leaves: Sequence[LinearOperator]) -> list[tuple[Tensor, Optional[Tensor]]]:
    r"""``(λ_i, Q_i)`` of each factor ``F_i = Q_i diag(λ_i) Q_iᵀ``, in float64, without autograd.

    Diagonal factors are their own decomposition (``λ = diag``, ``Q = None`` for the
    identity). Every other factor is densified (:func:`_cached_dense`, in float64) and all
    of them, batch entries included, go to :func:`kronegp.linalg.symmetric_eig` in one
    call: one transfer to the host and one back on a GPU, and a cache by tensor identity
    that makes the second decomposition of the same factor in a training step (the
    log-determinant after the solve, the backward after the forward) free. ``λ`` comes
    back as computed (ascending, not clamped) on the factor's device.
    """
    out: list = [None] * len(leaves)
    mats, where = [], []
    for i, f in enumerate(leaves):
        if _is_diagonal(f):
            out[i] = (f._diagonal().detach().to(torch.float64), None)
            continue
        dense = _cached_dense(f, torch.float64)
        n = dense.size(-1)
        flat = dense.reshape(-1, n, n)
        where.append((i, dense.shape[:-2], len(mats), flat.shape[0]))
        mats.extend(flat.unbind(0))
    if mats:
        results = symmetric_eig(mats)
        for i, batch, start, count in where:
            pairs = results[start : start + count]
            if count == 1 and not batch:
                lam, q = pairs[0]
            else:
                lam = torch.stack([p[0] for p in pairs]).reshape(*batch, -1)
                q = torch.stack([p[1] for p in pairs]).reshape(*batch, *pairs[0][1].shape)
            out[i] = (lam, q)
    return out


def _below_one_axis(mat: Tensor) -> Tensor:
    """A batched matrix whose batch dims must skip one extra axis of ``x`` (the "before" axis)."""
    return mat.unsqueeze(-3) if mat.dim() > 2 else mat


def apply_along_axes(
    mats: Sequence[Optional[Matrix]], in_sizes: Sequence[int], x: Tensor
) -> Tensor:
    """Apply ``mats[i]`` to axis ``i`` of ``x`` viewed as ``(*batch, D_1, …, D_N, T)``.

    ``x`` has shape ``(*batch, ΠD_i, T)`` with ``D_i = in_sizes[i]``; ``mats[i]`` is a
    matrix ``(*batch_i, O_i, D_i)`` (Tensor or LinearOperator) or ``None`` for the identity
    on that axis. Returns ``(*batch', ΠO_i, T)``, i.e.::

        out = (A_1 ⊗ … ⊗ A_N) · x     with A_i = mats[i] (or I_{D_i} where None)

    Consecutive Tensor matrices form one call of :func:`kronegp.kron_matmul` on the view
    ``(*batch, before, ΠD_run, after · T)``, so a run of dense factors is one fused
    product; identity axes cost nothing; a LinearOperator matrix is applied with its own
    ``_matmul`` after moving its axis to the front of the block.
    """
    n = len(mats)
    sizes = list(in_sizes)
    t = x.shape[-1]
    i = 0
    while i < n:
        mat = mats[i]
        if mat is None:
            i += 1
            continue
        batch = x.shape[:-2]
        if isinstance(mat, Tensor):
            j = i
            while j < n and isinstance(mats[j], Tensor):
                j += 1
            run = list(mats[i:j])
            before = math.prod(sizes[:i])
            mid = math.prod(sizes[i:j])
            after = math.prod(sizes[j:]) * t
            if before == 1:
                y = ops.kron_matmul(run, x.reshape(*batch, mid, after))
                batch = y.shape[:-2]
            else:
                # the batch dims of each factor must line up with x's, not with `before`
                y = ops.kron_matmul(
                    [_below_one_axis(m) for m in run], x.reshape(*batch, before, mid, after)
                )
                batch = y.shape[:-3]
            for k in range(i, j):
                sizes[k] = mats[k].shape[-2]
            i = j
        else:
            before = math.prod(sizes[:i])
            after = math.prod(sizes[i + 1 :]) * t
            block = x.reshape(*batch, before, sizes[i], after).movedim(-2, -3)
            y = mat._matmul(block.reshape(*batch, sizes[i], before * after))
            batch = y.shape[:-2]
            sizes[i] = mat.size(-2)
            y = y.reshape(*batch, sizes[i], before, after).movedim(-3, -2)
            i += 1
        x = y.reshape(*batch, math.prod(sizes), t)
    return x


def _leaf_factors(op: KroneckerProductLinearOperator) -> list[LinearOperator]:
    """The factors of ``op`` with nested Kronecker products expanded (``⊗`` is associative)."""
    out = []
    for f in op.linear_ops:
        out.extend(_leaf_factors(f) if isinstance(f, KroneckerProductLinearOperator) else [f])
    return out


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back down to ``shape`` (undoing batch broadcasting)."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(k for k, size in enumerate(shape) if size == 1 and grad.shape[k] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


class KroneckerOperator(KroneckerProductLinearOperator):
    r"""``F_1 ⊗ … ⊗ F_N`` whose products run through kronegp's Kronecker kernels.

    A drop-in :class:`~linear_operator.operators.KroneckerProductLinearOperator`: same
    constructor, same shapes and batching, ``isinstance`` checks against the parent hold.

    :param factors: ``F_1, …, F_N``: tensors or LinearOperators of shape
        ``(*batch_i, P_i, Q_i)``; batch shapes broadcast. LinearOperator factors follow the
        densification rule of :func:`factor_as_matrix`.

    Products (``T`` right-hand sides, ``M`` left-hand rows):

    * ``_matmul(X) = (F_1 ⊗ … ⊗ F_N) X`` → ``kron_matmul``;
    * ``_t_matmul(X) = (F_1ᵀ ⊗ … ⊗ F_Nᵀ) X`` → ``kron_matmul`` on the transposed factors;
    * ``rmatmul(Y) = Y (F_1 ⊗ … ⊗ F_N)`` → ``matmul_kron``.
    """

    def __init__(self, *factors: Union[Tensor, LinearOperator]):
        if len(factors) == 0:
            raise ValueError("KroneckerOperator needs at least one factor, got none")
        for i, f in enumerate(factors):
            if not isinstance(f, (Tensor, LinearOperator)):
                raise TypeError(
                    f"factors[{i}] must be a torch.Tensor or a LinearOperator of shape "
                    f"(*batch, P, Q), got {type(f).__name__}"
                )
            if f.dim() < 2:
                raise ValueError(
                    f"factors[{i}] must be a matrix of shape (*batch, P, Q), got shape {tuple(f.shape)}"
                )
        super().__init__(*factors)

    # ------------------------------------------------------------------ structure

    def factor_matrices(self) -> list[Matrix]:
        """Each factor as it enters a product (see :func:`factor_as_matrix`), one per factor."""
        return [factor_as_matrix(f) for f in self.linear_ops]

    def _flat_matrices(self) -> tuple[list[Matrix], list[int]]:
        """The matrices a product applies, nested Kronecker factors flattened
        (:func:`flat_factor_matrices`), and for each the index of the factor it came from."""
        mats, owners = [], []
        for j, f in enumerate(self.linear_ops):
            sub = flat_factor_matrices(f)
            mats.extend(sub)
            owners.extend([j] * len(sub))
        return mats, owners

    @property
    def factor_shapes(self) -> list[tuple[int, int]]:
        """``[(P_1, Q_1), …, (P_N, Q_N)]``."""
        return [(f.size(-2), f.size(-1)) for f in self.linear_ops]

    # ------------------------------------------------------------------ products

    def _product(self, mats: list[Matrix], rhs: Tensor) -> Tensor:
        """``(⊗ mats) · rhs`` for a block ``(*batch, ΠQ_i, T)`` or a vector."""
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        if all(isinstance(m, Tensor) for m in mats):
            out = ops.kron_matmul(mats, x)
        else:
            out = apply_along_axes(mats, [m.size(-1) for m in mats], x)
        return out.squeeze(-1) if vector else out

    def _matmul(self, rhs: Tensor) -> Tensor:
        r"""``(F_1 ⊗ … ⊗ F_N) · rhs`` for ``rhs`` of shape ``(*batch, ΠQ_i, T)`` or ``(ΠQ_i,)``."""
        if not isinstance(rhs, Tensor):
            return super()._matmul(rhs)
        return self._product(self._flat_matrices()[0], rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        r"""``(F_1 ⊗ … ⊗ F_N)ᵀ · rhs = (F_1ᵀ ⊗ … ⊗ F_Nᵀ) · rhs``, ``rhs`` of shape ``(*batch, ΠP_i, T)``."""
        if not isinstance(rhs, Tensor):
            return super()._t_matmul(rhs)
        return self._product([m.mT for m in self._flat_matrices()[0]], rhs)

    def rmatmul(self, other: Union[Tensor, LinearOperator]) -> Union[Tensor, LinearOperator]:
        r"""``other · (F_1 ⊗ … ⊗ F_N)`` for ``other`` of shape ``(*batch, M, ΠP_i)`` or ``(ΠP_i,)``.

        With dense factors this is one :func:`kronegp.matmul_kron` (differentiable through
        kronegp's own backward, which recomputes rather than stores intermediates);
        otherwise linear_operator's route ``(Kᵀ otherᵀ)ᵀ``, which still runs ``_matmul``
        of the transposed operator through kronegp.
        """
        if isinstance(other, Tensor) and other.dim() >= 1:
            mats = self._flat_matrices()[0]
            if all(isinstance(m, Tensor) for m in mats):
                return ops.matmul_kron(other, mats)
        return super().rmatmul(other)

    def matmul(self, other: Union[Tensor, LinearOperator]) -> Union[Tensor, LinearOperator]:
        r"""``K · other``; for another Kronecker product with matching factor shapes
        ``(A_1 ⊗ … ⊗ A_N)(B_1 ⊗ … ⊗ B_N) = (A_1 B_1) ⊗ … ⊗ (A_N B_N)`` stays Kronecker."""
        if isinstance(other, KroneckerProductLinearOperator) and len(other.linear_ops) == len(
            self.linear_ops
        ):
            if all(a.size(-1) == b.size(-2) for a, b in zip(self.linear_ops, other.linear_ops)):
                return KroneckerOperator(
                    *(a.matmul(b) for a, b in zip(self.linear_ops, other.linear_ops))
                )
        return super().matmul(other)

    # ------------------------------------------------------------------ gradients

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Optional[Tensor], ...]:
        r"""Gradient of ``Σ_c u_cᵀ (F_1 ⊗ … ⊗ F_N) v_c`` with respect to each factor's tensors.

        ``U = [u_1…u_D]`` is ``(*batch, ΠP_i, D)``, ``V = [v_1…v_D]`` is ``(*batch, ΠQ_i, D)``.
        With every factor a dense matrix in a product (the usual case: dense factors, and
        structured ones densified by :func:`factor_as_matrix`; nested Kronecker factors
        flattened into their own factors), :func:`kron_bilinear_grads` forms each
        ``G_j = ∂/∂F_j = Σ_{a,b,c} Ũ_j[a, p, b, c] Ṽ_j[a, q, b, c]`` (the factors before
        ``j`` moved onto ``U`` transposed, those after ``j`` onto ``V``) with ``2(N−1)``
        factor applications shared between the ``G_j`` and one GEMM per contraction.
        ``G_j`` then goes to the factor's own tensors (:func:`_dense_grad_to_representation`):
        ``G_j`` itself for a dense factor, a scatter-add for a Toeplitz column, the diagonal
        for a diagonal factor, ``F_j._bilinear_derivative(G_j, I)`` otherwise. Factors too
        large to densify take :meth:`_bilinear_derivative_general`.

        Like linear_operator's default, the result carries no autograd graph.
        """
        if left_vecs.dim() == 1:
            left_vecs = left_vecs.unsqueeze(-1)
            right_vecs = right_vecs.unsqueeze(-1)
        factors = self.linear_ops
        reps = [f.representation() for f in factors]
        if not any(t.requires_grad for rep in reps for t in rep):
            return tuple(None for rep in reps for _ in rep)
        mats, _ = self._flat_matrices()
        leaves: list[LinearOperator] = []
        for f, rep in zip(factors, reps):
            if isinstance(f, KroneckerProductLinearOperator):
                sub = _leaf_factors(f)
                if len(rep) != sum(len(leaf.representation()) for leaf in sub):
                    leaves = []  # a representation that is not its factors' (extra kwargs)
                    break
                leaves.extend(sub)
            else:
                leaves.append(f)
        if len(leaves) != len(mats) or not all(isinstance(m, Tensor) for m in mats):
            return self._bilinear_derivative_general(left_vecs, right_vecs)
        leaf_reps = [leaf.representation() for leaf in leaves]
        needs = [any(t.requires_grad for t in rep) for rep in leaf_reps]
        with torch.no_grad():
            dense_grads = kron_bilinear_grads(mats, left_vecs, right_vecs, needs)
            grads: list[Optional[Tensor]] = []
            for leaf, rep, mat, g in zip(leaves, leaf_reps, mats, dense_grads):
                if g is None:
                    grads.extend(None for _ in rep)
                else:
                    grads.extend(_dense_grad_to_representation(leaf, _sum_to_shape(g, mat.shape)))
        return tuple(grads)

    def _bilinear_derivative_general(
        self, left_vecs: Tensor, right_vecs: Tensor
    ) -> tuple[Optional[Tensor], ...]:
        r""":meth:`_bilinear_derivative` when some factor keeps its structure (too large to
        densify, see :func:`factor_as_matrix`): that factor is applied with its own products.

        With ``U = [u_1…u_D]`` (``(*batch, ΠP_i, D)``) and ``V = [v_1…v_D]``
        (``(*batch, ΠQ_i, D)``) viewed as tensors ``U[p_1…p_N, c]``, ``V[q_1…q_N, c]``::

            ∂/∂F_j[p, q] = Σ_{c, a, b} Ũ_j[a, p, b, c] · Ṽ_j[a, q, b, c]

            Ũ_j = (F_1ᵀ ⊗ … ⊗ F_{j-1}ᵀ ⊗ I_{P_j} ⊗ I ⊗ … ⊗ I) U      (a runs over Q_1…Q_{j-1})
            Ṽ_j = (I ⊗ … ⊗ I ⊗ I_{Q_j} ⊗ F_{j+1} ⊗ … ⊗ F_N) V        (b runs over P_{j+1}…P_N)

        i.e. the factors before ``j`` are moved onto ``U`` (transposed) and those after ``j``
        onto ``V``, and the contraction over every axis but ``j`` is one GEMM. ``j`` runs
        from ``N`` down to 1, so ``Ṽ_j = (I ⊗ F_{j+1} ⊗ I) Ṽ_{j+1}`` costs one factor and
        ``Ũ_j`` one Kronecker product of ``U``; at most two blocks of the size of ``V`` are
        alive at once, and nothing from the forward product is stored.

        ``G_j = ∂/∂F_j`` then goes to the factor itself: a dense factor's gradient is
        ``G_j``; a small structured factor gets ``F_j._bilinear_derivative(G_j, I_{Q_j})``
        (since ``Σ_{pq} G[p,q] F[p,q] = Σ_c (G e_c)ᵀ F e_c``), which chains through its own
        parameters (a Toeplitz column, a diagonal, …). A factor too large to densify never
        has ``G_j`` formed: it gets the ``K = D·ΠQ_{<j}·ΠP_{>j}`` columns themselves,
        ``F_j._bilinear_derivative(Ũ_j, Ṽ_j)`` with ``Ũ_j`` as ``(P_j, K)`` and ``Ṽ_j`` as
        ``(Q_j, K)`` (for a nested Kronecker factor that is this same method again).
        """
        if left_vecs.dim() == 1:
            left_vecs = left_vecs.unsqueeze(-1)
            right_vecs = right_vecs.unsqueeze(-1)
        factors = self.linear_ops
        needs = [any(t.requires_grad for t in f.representation()) for f in factors]
        if not any(needs):
            return tuple(None for f in factors for _ in f.representation())

        mats, owners = self._flat_matrices()
        flat_ps = [m.size(-2) for m in mats]
        flat_qs = [m.size(-1) for m in mats]
        ps = [p for p, _ in self.factor_shapes]
        qs = [q for _, q in self.factor_shapes]
        d = left_vecs.shape[-1]
        n = len(factors)
        per_factor: list[tuple[Optional[Tensor], ...]] = [()] * n
        # Walk j = N-1 … 0 so that Ṽ_j comes from Ṽ_{j+1} with one more factor (F_{j+1})
        # applied: only the current Ṽ is held. Ũ_j is computed afresh from U (one product).
        v = right_vecs
        v_sizes = list(flat_qs)  # axis sizes of the current Ṽ (owners > j are already P-sized)
        for j in range(n - 1, -1, -1):
            factor = factors[j]
            if j < n - 1:
                nxt = [m if o == j + 1 else None for m, o in zip(mats, owners)]
                v = apply_along_axes(nxt, v_sizes, v)
                v_sizes = [m.size(-2) if o == j + 1 else s for m, o, s in zip(mats, owners, v_sizes)]
            if not needs[j]:
                per_factor[j] = tuple(None for _ in factor.representation())
                continue
            qa = math.prod(qs[:j])
            pb = math.prod(ps[j + 1 :])
            u = left_vecs
            if j > 0:
                u = apply_along_axes(
                    [m.mT if o < j else None for m, o in zip(mats, owners)], flat_ps, left_vecs
                )
            u_j = u.reshape(*u.shape[:-2], qa, ps[j], pb * d)
            v_j = v.reshape(*v.shape[:-2], qa, qs[j], pb * d)
            own = [m for m, o in zip(mats, owners) if o == j]
            if len(own) == 1 and isinstance(own[0], Tensor):
                g = _sum_to_shape(torch.einsum("...apb,...aqb->...pq", u_j, v_j), factor.shape)
                per_factor[j] = _dense_grad_to_representation(factor, g)
            else:
                u_cols = u_j.movedim(-2, -3).reshape(*u_j.shape[:-3], ps[j], qa * pb * d)
                v_cols = v_j.movedim(-2, -3).reshape(*v_j.shape[:-3], qs[j], qa * pb * d)
                batch = torch.broadcast_shapes(u_cols.shape[:-2], v_cols.shape[:-2], factor.batch_shape)
                u_cols = u_cols.expand(*batch, *u_cols.shape[-2:])
                v_cols = v_cols.expand(*batch, *v_cols.shape[-2:])
                per_factor[j] = tuple(factor._bilinear_derivative(u_cols, v_cols))
            if not any(needs[:j]):
                # no factor before j needs a gradient: skip the remaining Ṽ updates
                for k in range(j):
                    per_factor[k] = tuple(None for _ in factors[k].representation())
                break
        grads = tuple(g for entry in per_factor for g in entry)
        return grads

    # ------------------------------------------------------------------ eigendecomposition

    def _symeig(
        self, eigenvectors: bool = False, return_evals_as_lazy: Optional[bool] = False
    ) -> tuple[Union[Tensor, LinearOperator], Optional[LinearOperator]]:
        r"""``F_1 ⊗ … ⊗ F_N = (⊗Q_i) (⊗Λ_i) (⊗Q_i)ᵀ`` from one eigendecomposition per factor.

        What linear_operator's Kronecker ``_symeig`` computes (eigenvalues
        ``λ = λ_1 ⊗ … ⊗ λ_N`` of the factors' eigenvalues clamped at zero, in the
        operator's dtype; eigenvectors ``Q_1 ⊗ … ⊗ Q_N`` as a Kronecker operator; nested
        Kronecker factors are flattened, which by associativity is the same matrix), but
        every factor is decomposed by :func:`kronegp.linalg.symmetric_eig` in float64
        (see :func:`leaf_eigendecompositions`) instead of a ``torch.linalg.eigh`` per
        factor. Diagonal factors keep their own trivial decomposition. Differentiable:
        with autograd on, each dense factor is attached through :class:`_SymEigBackward`.
        """
        leaves = _leaf_factors(self)
        pairs = leaf_eigendecompositions(leaves)
        dtype = self.dtype
        evals, evecs = [], []
        for f, (lam, q) in zip(leaves, pairs):
            if q is None:  # a diagonal factor
                lam_f, vec_f = f._symeig(eigenvectors=eigenvectors)
                evals.append(lam_f)
                evecs.append(vec_f)
                continue
            if _needs_graph(f):
                lam, q = _SymEigBackward.apply(_densify(f), lam, q)
            evals.append(lam.clamp_min(0.0).to(dtype))
            evecs.append(DenseLinearOperator(q.to(dtype)) if eigenvectors else None)
        lazy = KroneckerProductDiagLinearOperator(*(DiagLinearOperator(e) for e in evals))
        out_evals = lazy if return_evals_as_lazy else kron_vector(evals)
        return out_evals, (KroneckerOperator(*evecs) if eigenvectors else None)

    def eigen_inverse(
        self, shift: Union[Tensor, float], dtype: torch.dtype = torch.float64
    ) -> Callable[[Tensor], Tensor]:
        r"""``r ↦ (F_1 ⊗ … ⊗ F_N + s I)⁻¹ r = Q (Λ + s)⁻¹ Qᵀ r``, computed in ``dtype``, no autograd.

        ``Q = ⊗Q_i``, ``Λ = ⊗Λ_i`` from :func:`leaf_eigendecompositions` (eigenvalues
        clamped at zero), decomposed once when this is called; each application is two
        :func:`kronegp.kron_matmul` (identity axes for diagonal factors) and a scaling.
        ``shift`` is a scalar or ``(*batch, 1)``; ``r`` is ``(*batch, N, C)``; the result
        is in ``dtype``.
        """
        leaves = _leaf_factors(self)
        pairs = leaf_eigendecompositions(leaves)
        sizes = [f.size(-1) for f in leaves]
        with torch.no_grad():
            lam = kron_vector([p[0].clamp_min(0.0) for p in pairs])
            shift = shift.detach().to(torch.float64) if isinstance(shift, Tensor) else shift
            scale = (lam + shift).reciprocal_().to(dtype).unsqueeze(-1)
            qs = [None if q is None else q.to(dtype) for _, q in pairs]
            qts = [None if q is None else q.mT for q in qs]

        def apply(rhs: Tensor) -> Tensor:
            with torch.no_grad():
                x = apply_along_axes(qts, sizes, rhs.to(dtype))
                return apply_along_axes(qs, sizes, x * scale)

        return apply

    def eigen_solve(self, rhs: Tensor, shift: Union[Tensor, float]) -> Tensor:
        r"""``(F_1 ⊗ … ⊗ F_N + s I)⁻¹ rhs`` in float64 (:meth:`eigen_inverse`); the caller casts."""
        return self.eigen_inverse(shift, torch.float64)(rhs)

    # ------------------------------------------------------------------ algebra

    def _mul_constant(self, other: Union[float, Tensor]) -> LinearOperator:
        r"""``c · (F_1 ⊗ … ⊗ F_N) = (c F_1) ⊗ F_2 ⊗ … ⊗ F_N``: the product stays Kronecker,
        so eigendecomposition solves keep working."""
        first, *rest = self.linear_ops
        return KroneckerOperator(first._mul_constant(other), *rest)

    def __add__(self, other):
        r"""Kronecker-aware sums.

        * ``+ ConstantDiagLinearOperator`` / ``+ KroneckerProductDiagLinearOperator``:
          :class:`~kronegp.operators.KroneckerAddedDiagOperator`, solved exactly through
          the eigendecompositions of the factors;
        * ``+ DiagLinearOperator`` (a general diagonal): the same class, which solves by
          preconditioned CG (see its docstring);
        * anything else: linear_operator's rules (``+ Kronecker`` gives a
          ``SumKroneckerLinearOperator``).
        """
        from kronegp.operators.kronecker_added_diag_operator import KroneckerAddedDiagOperator

        if isinstance(other, (KroneckerProductDiagLinearOperator, ConstantDiagLinearOperator)):
            return KroneckerAddedDiagOperator(self, other)
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        r"""``K + diag(d)``.

        A scalar or a trailing size-1 ``d`` is a constant diagonal ``σ² I``
        (``K + σ² I = Q (Λ + σ²) Qᵀ``: exact, through the factors' eigendecompositions);
        a full ``(..., N)`` ``d`` is a general diagonal (CG; see
        :class:`~kronegp.operators.KroneckerAddedDiagOperator`).
        """
        from kronegp.operators.kronecker_added_diag_operator import KroneckerAddedDiagOperator

        if not self.is_square:
            raise RuntimeError("add_diagonal is only defined for square operators, got shape "
                               f"{tuple(self.shape)}")
        if not isinstance(diag, Tensor):
            raise TypeError(f"diag must be a torch.Tensor, got {type(diag).__name__}")
        if diag.dim() == 0:
            diag_op = ConstantDiagLinearOperator(diag.unsqueeze(-1), diag_shape=self.shape[-1])
        elif diag.shape[-1] == 1:
            diag_op = ConstantDiagLinearOperator(diag, diag_shape=self.shape[-1])
        else:
            try:
                expanded = diag.expand(self.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"diag must have shape (..., {self.shape[-1]}), (..., 1) or () to add to an "
                    f"operator of shape {tuple(self.shape)}; got {tuple(diag.shape)}"
                ) from None
            diag_op = DiagLinearOperator(expanded)
        return KroneckerAddedDiagOperator(self, diag_op)

    @cached(name="cholesky")
    def _cholesky(self, upper: bool = False) -> LinearOperator:
        r"""``chol(F_1 ⊗ … ⊗ F_N) = chol(F_1) ⊗ … ⊗ chol(F_N)``, kept on kronegp's products.

        Nested Kronecker factors are flattened first (``chol((A ⊗ B) ⊗ C) = chol A ⊗ chol B
        ⊗ chol C``), so every factor of the result is a plain triangular matrix."""
        from kronegp.operators.kronecker_triangular_operator import KroneckerTriangularOperator

        return KroneckerTriangularOperator(*(f.cholesky(upper=upper) for f in _leaf_factors(self)), upper=upper)
