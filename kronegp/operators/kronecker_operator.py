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
  most :data:`DENSE_FACTOR_MAX_NUMEL` entries is densified with ``to_dense()`` on every
  product. A grid axis is short (tens to a few thousand points), so the ``P_i·Q_i`` cost
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
from typing import Optional, Sequence, Union

import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductDiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
)
from linear_operator.utils.memoize import cached
from torch import Tensor

from kronegp import ops

__all__ = [
    "DENSE_FACTOR_MAX_NUMEL",
    "KroneckerOperator",
    "apply_along_axes",
    "factor_as_matrix",
    "flat_factor_matrices",
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
    factors, applied with their own ``_matmul``).
    """
    if isinstance(factor, Tensor):
        return factor
    if isinstance(factor, DenseLinearOperator):
        return factor.tensor
    if factor.size(-2) * factor.size(-1) <= DENSE_FACTOR_MAX_NUMEL:
        return factor.to_dense()
    return factor


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

    def _product(self, mats: list[Matrix], x: Tensor) -> Tensor:
        if all(isinstance(m, Tensor) for m in mats):
            return ops.kron_matmul(mats, x)
        return apply_along_axes(mats, [m.size(-1) for m in mats], x)

    def _matmul(self, rhs: Tensor) -> Tensor:
        r"""``(F_1 ⊗ … ⊗ F_N) · rhs`` for ``rhs`` of shape ``(*batch, ΠQ_i, T)`` or ``(ΠQ_i,)``."""
        if not isinstance(rhs, Tensor):
            return super()._matmul(rhs)
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        out = self._product(self._flat_matrices()[0], x)
        return out.squeeze(-1) if vector else out

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        r"""``(F_1 ⊗ … ⊗ F_N)ᵀ · rhs = (F_1ᵀ ⊗ … ⊗ F_Nᵀ) · rhs``, ``rhs`` of shape ``(*batch, ΠP_i, T)``."""
        if not isinstance(rhs, Tensor):
            return super()._t_matmul(rhs)
        vector = rhs.dim() == 1
        x = rhs.unsqueeze(-1) if vector else rhs
        out = self._product([m.mT for m in self._flat_matrices()[0]], x)
        return out.squeeze(-1) if vector else out

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
                if isinstance(factor, DenseLinearOperator):
                    per_factor[j] = (g,)
                else:
                    eye = torch.eye(qs[j], dtype=g.dtype, device=g.device)
                    per_factor[j] = tuple(factor._bilinear_derivative(g, eye.expand(*g.shape[:-2], *eye.shape)))
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
