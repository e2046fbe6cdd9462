"""``patch_gpytorch()``: make unmodified GPyTorch models build kronegp's Kronecker operator.

GPyTorch builds Kronecker covariances by calling linear_operator's
``KroneckerProductLinearOperator(*factors)`` — in ``GridKernel`` (hence KISS-GP's
``GridInterpolationKernel``), ``MultitaskKernel``, the multitask likelihoods, and in user
code. While the patch is active, every such call returns a
:class:`~kronegp.operators.KroneckerOperator` instead, whose products run through
:func:`kronegp.kron_matmul` / :func:`kronegp.matmul_kron`.

How: the patch wraps ``KroneckerProductLinearOperator.__init__``. When the object under
construction is *exactly* a ``KroneckerProductLinearOperator`` (not a subclass), the
wrapper re-types it to ``KroneckerOperator`` (a subclass with the same layout) before
initialising it. Nothing else changes:

* the name ``KroneckerProductLinearOperator`` still means linear_operator's class
  everywhere, so every ``isinstance`` check across linear_operator and GPyTorch (and
  ``KroneckerOperator`` *is* an instance of it) behaves as before;
* subclasses — ``KroneckerProductTriangularLinearOperator``,
  ``KroneckerProductDiagLinearOperator`` — are constructed untouched;
* undoing puts the original ``__init__`` function object back, so afterwards
  ``KroneckerProductLinearOperator.__dict__`` is what it was.

Use it either way::

    with kronegp.patch_gpytorch():          # undone on exit, even on an exception
        loss = -mll(model(x), y)

    handle = kronegp.patch_gpytorch()       # active until undone
    ...
    handle.undo()                            # idempotent; `with handle:` also undoes

Patches nest (a counter): the original ``__init__`` returns when the last active handle is
undone. Operators built while the patch was active stay ``KroneckerOperator`` afterwards.
"""

from __future__ import annotations

import functools
import threading
import warnings

from linear_operator.operators import KroneckerProductLinearOperator

__all__ = ["PatchHandle", "is_patched", "patch_gpytorch"]

_lock = threading.Lock()
_state = {"depth": 0, "original_init": None, "wrapper": None}


def _make_wrapper(original_init):
    from kronegp.operators import KroneckerOperator

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        if type(self) is KroneckerProductLinearOperator:
            # Re-type before initialising: KroneckerOperator adds no instance state of its
            # own beyond what its __init__ sets, and the layouts are identical.
            self.__class__ = KroneckerOperator
            KroneckerOperator.__init__(self, *args, **kwargs)
            return
        original_init(self, *args, **kwargs)

    __init__._kronegp_patch = True
    return __init__


def _activate() -> None:
    with _lock:
        if _state["depth"] == 0:
            original = KroneckerProductLinearOperator.__dict__["__init__"]
            wrapper = _make_wrapper(original)
            _state["original_init"], _state["wrapper"] = original, wrapper
            KroneckerProductLinearOperator.__init__ = wrapper
        _state["depth"] += 1


def _deactivate() -> None:
    with _lock:
        _state["depth"] -= 1
        if _state["depth"] > 0:
            return
        current = KroneckerProductLinearOperator.__dict__.get("__init__")
        if current is not _state["wrapper"]:
            # Someone else replaced __init__ on top of ours; restoring would drop their
            # change, keeping it would keep ours underneath. Say so rather than guess.
            warnings.warn(
                "kronegp.patch_gpytorch: KroneckerProductLinearOperator.__init__ was replaced "
                "by someone else while the patch was active; restoring linear_operator's "
                "original __init__ anyway, which drops that replacement",
                RuntimeWarning,
                stacklevel=3,
            )
        KroneckerProductLinearOperator.__init__ = _state["original_init"]
        _state["original_init"] = _state["wrapper"] = None


def is_patched() -> bool:
    """Whether ``KroneckerProductLinearOperator(...)`` currently builds a ``KroneckerOperator``."""
    return _state["depth"] > 0


class PatchHandle:
    """An active :func:`patch_gpytorch`; ``undo()`` (or leaving a ``with`` block) ends it."""

    def __init__(self):
        self._active = True
        _activate()

    @property
    def active(self) -> bool:
        return self._active

    def undo(self) -> None:
        """End this patch (idempotent). The original constructor returns when no patch is left."""
        if self._active:
            self._active = False
            _deactivate()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"PatchHandle(active={self._active})"


def patch_gpytorch() -> PatchHandle:
    """Route every ``KroneckerProductLinearOperator(...)`` construction to ``KroneckerOperator``.

    Applies immediately and returns a :class:`PatchHandle`; use it as a context manager or
    call ``handle.undo()``. See the module docstring for how it works and what it leaves
    untouched.
    """
    return PatchHandle()
