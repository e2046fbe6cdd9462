"""One warning per call for solves that stop short of their tolerance.

A model's likelihood or prediction runs many CG solves (a solve inside every product with
``G``, one per refinement round, one per chunk of columns); when the iteration cap or the
dtype stops them, each used to warn on its own: ~33 copies of the same message for one
likelihood. Inside :func:`one_warning` every shortfall is recorded instead, and one
``RuntimeWarning`` is issued when the outermost block ends: the worst shortfall's sentence
(largest residual relative to its tolerance), how many solves fell short, and whatever the
caller adds (an estimate of the likelihood's error). Blocks nest: a ``fit`` that evaluates
the likelihood many times warns once for the whole fit. Outside any block, a shortfall
warns at once (a bare :func:`kronegp.solvers.block_cg` call). A :func:`finding` (an estimate
found wrong by another test than a residual, e.g. implausible SLQ probes) warns the same way,
and its sentence is always in the block's warning (the latest of each kind).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional

__all__ = ["Shortfall", "Shortfalls", "finding", "note", "one_warning", "shortfall"]


@dataclass
class Shortfall:
    """A solve that stopped at ``residual`` (relative) above ``tol``; ``sentence`` says so."""

    residual: float
    tol: float
    sentence: str


@dataclass
class Shortfalls:
    """The shortfalls of one :func:`one_warning` block, notes to add to its warning, and findings
    (:func:`finding`), each of which makes it warn."""

    where: str
    items: list[Shortfall] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    findings: dict[str, str] = field(default_factory=dict)

    def worst(self) -> Optional[Shortfall]:
        return max(self.items, key=lambda s: s.residual / s.tol, default=None)

    def warns(self) -> bool:
        return bool(self.items or self.findings)

    def message(self) -> str:
        worst = self.worst()
        count = len(self.items)
        more = f" ({count} solves fell short; the worst is reported)" if count > 1 else ""
        parts = ([worst.sentence + more] if worst is not None else []) + list(self.findings.values())
        notes = "".join(f"; {note}" for note in self.notes.values())
        return f"{self.where}: {'; '.join(parts)}{notes}"


_ACTIVE: ContextVar[Optional[Shortfalls]] = ContextVar("kronegp_shortfalls", default=None)


@contextmanager
def one_warning(where: str, stacklevel: int = 3) -> Iterator[Shortfalls]:
    """Collect the shortfalls of the solves run inside; warn once at the end if any.

    ``where`` names the call (``"GridGP.fit"``); ``stacklevel`` is that of the warning as seen
    from the ``with`` statement's caller. Inside an outer block this yields the outer one.
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    col = Shortfalls(where)
    token = _ACTIVE.set(col)
    try:
        yield col
    finally:
        _ACTIVE.reset(token)
    if col.warns():
        warnings.warn(col.message(), RuntimeWarning, stacklevel=stacklevel)


def shortfall(residual: float, tol: float, sentence: str, stacklevel: int = 2) -> None:
    """Record a solve that reached ``residual`` (relative) instead of ``tol``; outside any
    :func:`one_warning` block, warn at once with ``sentence``."""
    col = _ACTIVE.get()
    if col is None:
        warnings.warn(sentence, RuntimeWarning, stacklevel=stacklevel + 1)
    else:
        col.items.append(Shortfall(float(residual), float(tol), sentence))


def note(key: str, text: str) -> None:
    """Add (or replace) a note to the active block's warning, if there is one and it warns."""
    col = _ACTIVE.get()
    if col is not None:
        col.notes[key] = text


def finding(key: str, sentence: str, stacklevel: int = 2) -> None:
    """Report a result found wrong by a test other than a solve's residual (``key`` names the
    kind; the latest sentence of each kind is kept): inside a :func:`one_warning` block its
    warning carries ``sentence`` (and the block warns even if no solve fell short); outside
    any block, warn at once."""
    col = _ACTIVE.get()
    if col is None:
        warnings.warn(sentence, RuntimeWarning, stacklevel=stacklevel + 1)
    else:
        col.findings[key] = sentence
