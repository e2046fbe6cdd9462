"""The two Kronecker products, the only door to them on every backend (:mod:`kronegp.device`).

* :func:`kron_matmul` ``(factors, x) = (F_1 ⊗ … ⊗ F_N) · x``
* :func:`matmul_kron` ``(x, factors) = x · (F_1 ⊗ … ⊗ F_N)``

Each is registered as a ``torch.library`` custom op (``kronegp::kron_matmul``,
``kronegp::matmul_kron``) with a fake implementation, which is what ``torch.compile`` sees:
one opaque node of known shape. Eagerly the backend is called directly, skipping the
custom op's Python dispatch (same result; the dispatch cost 33 µs of a 45 µs call on the
2-core CPU machine, GPU work stubbed, 2026-12-07). Differentiation is a ``torch.autograd.Function`` around that op with
``setup_context`` and a ``vmap`` rule, the form that both autograd and ``torch.func``
(``grad``, ``vjp``, ``vmap``) accept; its backward calls the public ops again, so the
gradients run on the same backend as the forward. Inputs are checked here, once, with errors that name the argument;
below this module nobody checks again. A repeated call is checked once per call signature (see
"call signatures" below): its later calls skip the checks and hand the backend the remembered
signature, the key of its plan, so that they cost little more than the launches (host time).

Dtypes: float32 and float64. Half precision (float16, bfloat16) is rejected rather than
silently computed in another precision; cast explicitly if you want it.

Precision: float32 products follow ``torch.get_float32_matmul_precision()`` (``"highest"``
exact, ``"high"`` split TF32, ``"medium"`` TF32; :mod:`kronegp.precision`), overridden per call
by ``precision=``; float64 is always IEEE float64. The backward runs in the forward's mode.

Backward (``g`` the incoming gradient):

* ``y = x·(⊗F)``: ``dx = g·(⊗F_iᵀ)``; ``dF_j[p, q] = Σ Z_j[…, p, …] g[…, q, …]`` where
  ``Z_j`` is ``x`` with every factor but ``F_j`` applied.
* ``y = (⊗F)·x``: ``dx = (⊗F_iᵀ)·g``; ``dF_j[p, q] = Σ g[…, p, …] Z_j[…, q, …]`` likewise.

``Z_j`` is recomputed from ``x`` with two Kronecker products (the factors before ``j`` and
those after it), never stored, so the forward saves only its inputs.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Sequence

import torch
from torch import Tensor

from kronegp import device
from kronegp.precision import default_precision, resolve_precision

__all__ = ["kron_matmul", "matmul_kron", "check_factors", "check_x", "check_dtype_device", "check_batch", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- checks
# Public for the other door to the same products, the sharded ones (kronegp.distributed.ops).


def check_factors(factors: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(factors, Tensor) or not isinstance(factors, (list, tuple)):
        raise TypeError(
            "factors must be a list or tuple of 2-D tensors (P_i, Q_i), "
            f"got {type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError("factors must hold at least one matrix, got an empty sequence")
    for i, f in enumerate(factors):
        if not isinstance(f, Tensor):
            raise TypeError(f"factors[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() < 2:
            raise ValueError(
                f"factors[{i}] must be a matrix of shape (P, Q) (optionally with leading batch "
                f"dimensions), got shape {tuple(f.shape)}"
            )
    return list(factors)


def check_x(x: Tensor) -> None:
    """``x`` is a tensor with at least one dimension: a vector or a batch of matrices."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError(
            "x must be a vector or a (..., rows, columns) tensor, got a 0-d tensor (a scalar): "
            "multiply the factors by it instead"
        )


def check_dtype_device(factors: list[Tensor], x: Tensor) -> None:
    if not x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"x must be a floating-point tensor (float32 or float64), got {x.dtype}: cast it "
            "with x.double() or x.float()"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"x must be float32 or float64, got {x.dtype}; kronegp does not compute in half "
            "precision: cast with x.float() or x.double()"
        )
    for i, f in enumerate(factors):
        if f.dtype != x.dtype:
            raise TypeError(
                f"factors[{i}] has dtype {f.dtype} but x has dtype {x.dtype}; kronegp does not "
                "promote dtypes: cast them to the same one"
            )
        if f.device != x.device:
            raise ValueError(
                f"factors[{i}] is on {f.device} but x is on {x.device}; kronegp does not move "
                "tensors between devices: put them on one"
            )


def check_batch(factors: list[Tensor], x_batch: torch.Size, name: str = "x") -> None:
    if all(f.dim() == 2 for f in factors):
        return  # nothing to broadcast (and torch.broadcast_shapes costs ~20 µs)
    try:
        torch.broadcast_shapes(x_batch, *(f.shape[:-2] for f in factors))
    except RuntimeError:
        shapes = ", ".join(str(tuple(f.shape[:-2])) for f in factors)
        raise ValueError(
            f"batch dimensions do not broadcast: {name} has batch shape {tuple(x_batch)}, "
            f"factors have batch shapes {shapes}"
        ) from None


def _shapes(factors: list[Tensor]) -> str:
    return ", ".join(f"({f.shape[-2]}, {f.shape[-1]})" for f in factors)


def _differentiable(x: Tensor, factors: list[Tensor]) -> bool:
    """Whether to go through the autograd.Function or straight to the computation.

    The Function is needed when autograd must record the op, or when a ``torch.func``
    transform is active (it needs the Function even when nothing has ``requires_grad``).
    Otherwise skipping it saves ~50 µs per call, which is most of the cost of small
    products. (Also, under ``torch.compile`` dynamo in torch 2.13 mis-traces an
    autograd.Function with ``setup_context`` when no input requires grad.)
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in factors)):
        return True
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


# --------------------------------------------------------------------------- call signatures
# A repeated call is checked once. The signature of a call holds everything the checks above and a
# backend's plan depend on: the float32 mode, x's and each factor's shape, strides, dtype and
# device, x's 16-byte alignment, and whether any operand requires grad. The first call of a
# signature runs every check; once they pass, the signature is remembered, and a later call with
# the same one skips them (they would pass again: they read nothing else) and hands the backend the
# remembered entry, by which it keys its plan for the call (``kronegp._cuda`` keeps a launch
# record per entry). A call whose signature cannot be read cheaply (factors not a plain list or
# tuple, an operand that is no tensor or has no storage, torch.compile tracing, a torch.func
# transform) takes the checked path every time.


class CallSignature:
    """A remembered call signature whose checks passed: what the call needs besides its operands.
    Backends key per-signature plans by the object itself (hashed by identity)."""

    __slots__ = ("precision", "vector", "grad")

    def __init__(self, precision: str, vector: bool, grad: bool):
        self.precision, self.vector, self.grad = precision, vector, grad


_SEQUENCES = (list, tuple)
_strides = torch._C.TensorBase.stride  # raises TypeError on anything but a tensor
_meta = attrgetter("shape", "dtype", "device", "requires_grad")
_checked: dict = {}  # call signature -> CallSignature
_MAX_CHECKED = 4096  # signatures remembered (a crude bound: calls rarely have this many)


def _lookup(side: str, factors, x, precision) -> tuple[CallSignature | None, tuple | None]:
    """``(remembered entry or None, signature)`` of a call; the signature is None where the checked
    path must run every time (then nothing here is read by torch.compile's tracing either)."""
    if (type(factors) not in _SEQUENCES or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return None, None
    try:
        dtype = x.dtype
        if precision is None and dtype is torch.float32:
            precision = default_precision()
        key = (side, precision, _strides(x), x.shape, dtype, x.device, x.requires_grad, x.data_ptr() & 15,
               *map(_meta, factors), *map(_strides, factors))
        return _checked.get(key), key
    except (AttributeError, TypeError, RuntimeError):  # not tensors, no storage, unhashable precision
        return None, None


def _remember(key: tuple | None, precision: str, vector: bool, x: Tensor, factors: list[Tensor]) -> CallSignature | None:
    """Remember the signature ``key`` of a call whose checks have just passed."""
    if key is None:
        return None
    if len(_checked) >= _MAX_CHECKED:
        _checked.clear()
    entry = _checked[key] = CallSignature(precision, vector, x.requires_grad or any(f.requires_grad for f in factors))
    return entry


def kron_matmul(factors: Sequence[Tensor], x: Tensor, *, precision: str | None = None) -> Tensor:
    """``(F_1 ⊗ … ⊗ F_N) · x``.

    Args:
        factors: matrices ``F_i`` of shape ``(*batch_i, P_i, Q_i)``, one or more.
        x: ``(*batch, ΠQ_i, T)``, or a vector of length ``ΠQ_i``.
        precision: float32 only: ``"highest"``, ``"high"`` or ``"medium"``
            (:mod:`kronegp.precision`); ``None`` follows ``torch.get_float32_matmul_precision()``.

    Returns:
        ``(*batch', ΠP_i, T)`` (``(*batch', ΠP_i)`` for a vector ``x``), where ``batch'``
        broadcasts the batch shapes of ``x`` and the factors.
    """
    known, key = _lookup("kron_matmul", factors, x, precision)
    if known is not None:  # checked before: only what depends on the data and on grad mode
        xin = x.unsqueeze(-1) if known.vector else x
        if known.grad and torch.is_grad_enabled():
            out = _km_apply(known.precision, xin, *factors)
        else:
            out = device.backend_for(x).kron_matmul(factors, xin, known.precision, signature=known)
        return out.squeeze(-1) if known.vector else out
    factors = check_factors(factors)
    check_x(x)
    check_dtype_device(factors, x)
    precision = resolve_precision(precision, x.dtype)
    q_total = math.prod([f.shape[-1] for f in factors])
    vector = x.dim() == 1
    if vector:
        x = x.unsqueeze(-1)
    if x.shape[-2] != q_total:
        raise ValueError(
            f"x must have shape (..., ΠQ_i, T) with ΠQ_i = {q_total} for factor shapes "
            f"{_shapes(factors)}; got x.shape[-2] = {x.shape[-2]} (x.shape = {tuple(x.shape)})"
        )
    check_batch(factors, x.shape[:-2])
    known = _remember(key, precision, vector, x, factors)
    if _differentiable(x, factors):
        out = _KronMatmul.apply(precision, x, *factors)
    else:
        out = _raw_kron_matmul(factors, x, precision, known)
    return out.squeeze(-1) if vector else out


def matmul_kron(x: Tensor, factors: Sequence[Tensor], *, precision: str | None = None) -> Tensor:
    """``x · (F_1 ⊗ … ⊗ F_N)``.

    Args:
        x: ``(*batch, M, ΠP_i)``, or a vector of length ``ΠP_i``.
        factors: matrices ``F_i`` of shape ``(*batch_i, P_i, Q_i)``, one or more.
        precision: as for :func:`kron_matmul`.

    Returns:
        ``(*batch', M, ΠQ_i)`` (``(*batch', ΠQ_i)`` for a vector ``x``), ``batch'`` as in
        :func:`kron_matmul`.
    """
    known, key = _lookup("matmul_kron", factors, x, precision)
    if known is not None:  # checked before: only what depends on the data and on grad mode
        xin = x.unsqueeze(0) if known.vector else x
        if known.grad and torch.is_grad_enabled():
            out = _mk_apply(known.precision, xin, *factors)
        else:
            out = device.backend_for(x).matmul_kron(xin, factors, known.precision, signature=known)
        return out.squeeze(-2) if known.vector else out
    factors = check_factors(factors)
    check_x(x)
    check_dtype_device(factors, x)
    precision = resolve_precision(precision, x.dtype)
    p_total = math.prod([f.shape[-2] for f in factors])
    vector = x.dim() == 1
    if vector:
        x = x.unsqueeze(0)
    if x.shape[-1] != p_total:
        raise ValueError(
            f"x must have shape (..., M, ΠP_i) with ΠP_i = {p_total} for factor shapes "
            f"{_shapes(factors)}; got x.shape[-1] = {x.shape[-1]} (x.shape = {tuple(x.shape)})"
        )
    check_batch(factors, x.shape[:-2])
    known = _remember(key, precision, vector, x, factors)
    if _differentiable(x, factors):
        out = _MatmulKron.apply(precision, x, *factors)
    else:
        out = _raw_matmul_kron(x, factors, precision, known)
    # the row dimension added above: with batched factors the result has batch dimensions in front
    return out.squeeze(-2) if vector else out


# --------------------------------------------------------------------------- custom ops


def _out_batch(factors: Sequence[Tensor], x: Tensor) -> torch.Size:
    return torch.broadcast_shapes(x.shape[:-2], *(f.shape[:-2] for f in factors))


@torch.library.custom_op("kronegp::kron_matmul", mutates_args=())
def _kron_matmul_op(factors: list[Tensor], x: Tensor, precision: str) -> Tensor:
    return device.backend_for(x).kron_matmul(factors, x, precision=precision)


@_kron_matmul_op.register_fake
def _(factors: list[Tensor], x: Tensor, precision: str) -> Tensor:
    p_total = math.prod([f.shape[-2] for f in factors])
    return x.new_empty((*_out_batch(factors, x), p_total, x.shape[-1]))


@torch.library.custom_op("kronegp::matmul_kron", mutates_args=())
def _matmul_kron_op(x: Tensor, factors: list[Tensor], precision: str) -> Tensor:
    return device.backend_for(x).matmul_kron(x, factors, precision=precision)


@_matmul_kron_op.register_fake
def _(x: Tensor, factors: list[Tensor], precision: str) -> Tensor:
    q_total = math.prod([f.shape[-1] for f in factors])
    return x.new_empty((*_out_batch(factors, x), x.shape[-2], q_total))


# --------------------------------------------------------------------------- autograd


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum ``grad`` down to ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.dim() - len(shape)
    grad = grad.sum(dim=tuple(range(extra))) if extra > 0 else grad
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _below_rows(f: Tensor) -> Tensor:
    """A factor whose batch dims must skip one extra leading-row dimension of x."""
    return f.unsqueeze(-3) if f.dim() > 2 else f


def _setup_context(ctx, inputs, output):
    precision, x, *factors = inputs
    ctx.precision = precision
    ctx.save_for_backward(x, *factors)


def _raw_matmul_kron(x: Tensor, factors: list[Tensor], precision: str,
                     signature: CallSignature | None = None) -> Tensor:
    """The product without autograd: the custom op while tracing, the backend eagerly.

    Inputs are already checked. Backward passes use this too (double backward is not
    offered, so no autograd.Function is nested in a backward). Eagerly the custom op's
    Python dispatch would only add ~30 µs per call, so the backend is called directly.
    ``signature``: the call's remembered signature, for the backend's plan cache.
    """
    if _tracing(x):
        return torch.ops.kronegp.matmul_kron(x, factors, precision)
    return device.backend_for(x).matmul_kron(x, factors, precision, signature=signature)


def _raw_kron_matmul(factors: list[Tensor], x: Tensor, precision: str,
                     signature: CallSignature | None = None) -> Tensor:
    if _tracing(x):
        return torch.ops.kronegp.kron_matmul(factors, x, precision)
    return device.backend_for(x).kron_matmul(factors, x, precision, signature=signature)


_PLAIN = (Tensor, torch.nn.Parameter)


def _tracing(x: Tensor) -> bool:
    """Whether the product must go through the custom op: under torch.compile, or when ``x`` is
    no plain tensor — the fake and functional tensors of AOT tracing (``torch.library.opcheck``,
    ``torch.export``, a compiled backward), which is_compiling() does not see and whose data
    pointers a backend cannot read (the op's fake kernel handles them)."""
    return type(x) not in _PLAIN or torch.compiler.is_compiling()


def _around(factors: list[Tensor], j: int):
    """Factor ``j``'s neighbours and sizes, for its gradient: the factors before and after it,
    and the ``(ΠP, ΠQ)`` of those before, of ``F_j`` itself and of those after."""
    before, after = factors[:j], factors[j + 1 :]

    def sizes(fs):
        return math.prod([g.shape[-2] for g in fs]), math.prod([g.shape[-1] for g in fs])

    return before, after, sizes(before), tuple(factors[j].shape[-2:]), sizes(after)


def _matmul_kron_backward(ctx, grad: Tensor):
    x, *factors = ctx.saved_tensors
    m = x.shape[-2]
    batch = grad.shape[:-2]
    dx = None
    if ctx.needs_input_grad[1]:
        dx = _sum_to(_raw_matmul_kron(grad, [f.mT for f in factors], ctx.precision), x.shape)
    dfs = []
    for j, f in enumerate(factors):
        if not ctx.needs_input_grad[2 + j]:
            dfs.append(None)
            continue
        before, after, (pa, qa), (p_j, q_j), (pb, qb) = _around(factors, j)
        z, zb = x, x.shape[:-2]
        if after:  # (…, M·Pa·P_j, Pb) · (⊗F_after)
            z = _raw_matmul_kron(z.reshape(*zb, m * pa * p_j, pb), after, ctx.precision)
            zb = z.shape[:-2]
        if before:  # (⊗F_beforeᵀ) acting on the Pa axis of (…, M, Pa, P_j·Qb)
            z = _raw_kron_matmul([_below_rows(g.mT) for g in before], z.reshape(*zb, m, pa, p_j * qb), ctx.precision)
            zb = z.shape[:-3]
        z = z.reshape(*zb, m * qa, p_j, qb)
        g = grad.reshape(*batch, m * qa, q_j, qb)
        dfs.append(_sum_to(torch.einsum("...lpb,...lqb->...pq", z, g), f.shape))
    return (None, dx, *dfs)


def _kron_matmul_backward(ctx, grad: Tensor):
    x, *factors = ctx.saved_tensors
    t = x.shape[-1]
    batch = grad.shape[:-2]
    dx = None
    if ctx.needs_input_grad[1]:
        dx = _sum_to(_raw_kron_matmul([f.mT for f in factors], grad, ctx.precision), x.shape)
    dfs = []
    for j, f in enumerate(factors):
        if not ctx.needs_input_grad[2 + j]:
            dfs.append(None)
            continue
        before, after, (pa, qa), (p_j, q_j), (pb, qb) = _around(factors, j)
        z, zb = x, x.shape[:-2]
        if after:  # ⊗F_after acting on the Qb axis of (…, Qa·Q_j, Qb, T)
            z = _raw_kron_matmul([_below_rows(g) for g in after], z.reshape(*zb, qa * q_j, qb, t), ctx.precision)
            zb = z.shape[:-3]
        if before:  # ⊗F_before acting on the Qa axis of (…, Qa, Q_j·Pb·T)
            z = _raw_kron_matmul(before, z.reshape(*zb, qa, q_j * pb * t), ctx.precision)
            zb = z.shape[:-2]
        z = z.reshape(*zb, pa, q_j, pb * t)
        g = grad.reshape(*batch, pa, p_j, pb * t)
        dfs.append(_sum_to(torch.einsum("...apb,...aqb->...pq", g, z), f.shape))
    return (None, dx, *dfs)


def _vmap_inputs(in_dims, x: Tensor, factors: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Move every vmapped dimension to the front as an ordinary leading batch dimension.

    Our ops broadcast batch dimensions from the right, so the vmapped dimension of x and
    of each batched factor is padded with singleton dimensions until they line up.
    """
    x_dim, *f_dims = in_dims
    size = next(t.shape[d] for t, d in zip((x, *factors), in_dims) if d is not None)
    x = x.movedim(x_dim, 0) if x_dim is not None else x.unsqueeze(0).expand(size, *x.shape)
    rank = max([x.dim() - 3] + [f.dim() - 3 for f, d in zip(factors, f_dims) if d is not None])
    x = x.reshape(size, *([1] * (rank - (x.dim() - 3))), *x.shape[1:])
    moved = []
    for f, d in zip(factors, f_dims):
        if d is not None:
            f = f.movedim(d, 0)
            f = f.reshape(size, *([1] * (rank - (f.dim() - 3))), *f.shape[1:])
        moved.append(f)
    return x, moved


class _MatmulKron(torch.autograd.Function):
    """Differentiation (autograd, torch.func) around the opaque custom op."""

    @staticmethod
    def forward(precision, x, *factors):
        return _raw_matmul_kron(x, [*factors], precision)  # list(...) trips dynamo

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_matmul_kron_backward)

    @staticmethod
    def vmap(info, in_dims, precision, x, *factors):
        x, factors = _vmap_inputs(in_dims[1:], x, factors)
        return matmul_kron(x, factors, precision=precision), 0


class _KronMatmul(torch.autograd.Function):
    """Differentiation (autograd, torch.func) around the opaque custom op."""

    @staticmethod
    def forward(precision, x, *factors):
        return _raw_kron_matmul([*factors], x, precision)  # list(...) trips dynamo

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_kron_matmul_backward)

    @staticmethod
    def vmap(info, in_dims, precision, x, *factors):
        x, factors = _vmap_inputs(in_dims[1:], x, factors)
        return kron_matmul(factors, x, precision=precision), 0


def _apply_outside_transforms(fn: type[torch.autograd.Function]):
    """``fn.apply`` for calls made where no torch.func transform is active (a remembered signature
    says so), without what ``autograd.Function.apply`` adds there for nothing.

    ``Function.apply`` binds default arguments through ``inspect.signature`` on every call of a
    Function that defines ``setup_context`` (~40 of the ~80 µs a differentiable call cost on the
    2-core CPU machine); ours take positional arguments and no defaults, so binding changes
    nothing. Outside transforms it then unwraps dead functorch wrappers and calls the C
    ``apply``: so does this. On a torch without those names, ``fn.apply`` itself.
    """
    try:
        c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, fn)
        from torch._functorch.utils import unwrap_dead_wrappers
    except (AttributeError, KeyError, ImportError):
        return fn.apply
    return lambda *args: c_apply(*unwrap_dead_wrappers(args))


_mk_apply = _apply_outside_transforms(_MatmulKron)
_km_apply = _apply_outside_transforms(_KronMatmul)


# --------------------------------------------------------------------------- the custom ops' autograd
# The public functions differentiate through the autograd.Functions above (which also give
# torch.func a vmap rule); the same formulas are registered on the custom ops themselves, so
# that ``torch.ops.kronegp.*`` called directly (``torch.library.opcheck``, graphs that hold the
# op) differentiates too.


class _OrderedContext:
    """An op's autograd context seen with its inputs in the order ``(precision, x, *factors)``
    that the backward formulas take (an op's ``needs_input_grad`` nests the factor list)."""

    def __init__(self, ctx, needs_x: bool, needs_factors: Sequence[bool]):
        self.saved_tensors = ctx.saved_tensors
        self.precision = ctx.precision
        self.needs_input_grad = (False, needs_x, *needs_factors)


def _register_op_autograd(op, backward, x_first: bool) -> None:
    """Register ``backward`` (inputs ordered ``(precision, x, *factors)``) on the custom op
    ``op``, whose inputs are ``(x, factors, precision)`` (``x_first``) or ``(factors, x, precision)``."""

    def setup_context(ctx, inputs, output):
        x, factors = inputs[:2] if x_first else inputs[1::-1]
        ctx.precision = inputs[2]
        ctx.save_for_backward(x, *factors)

    def op_backward(ctx, grad: Tensor):
        needs_x, needs_factors = ctx.needs_input_grad[:2] if x_first else ctx.needs_input_grad[1::-1]
        _, dx, *dfs = backward(_OrderedContext(ctx, needs_x, needs_factors), grad)
        return (dx, dfs, None) if x_first else (dfs, dx, None)

    op.register_autograd(op_backward, setup_context=setup_context)


_register_op_autograd(_kron_matmul_op, _kron_matmul_backward, x_first=False)
_register_op_autograd(_matmul_kron_op, _matmul_kron_backward, x_first=True)
