"""Hyperparameters of grid GPs in data units: copy them between models, describe them in words.

Reading and setting them are the models' own methods (:meth:`GridGP.hyperparameters`,
:meth:`GridGP.set_hyperparameters`); these are what a script or notebook does with them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["copy_hyperparameters", "describe_hyperparameters"]


def copy_hyperparameters(source: Any, target: Any) -> None:
    """Give ``target`` the hyperparameters of ``source`` (same kernels, other data).

    Through data units (:meth:`GridGP.set_hyperparameters`): kernel parameters are in axis
    units and copy as they are; the output scale, noise and constant mean are converted
    into ``target``'s own standardisation. What one of the two models does not have (a
    learned noise next to per-cell noise, a constant mean next to a user mean) is left as
    it is in ``target``.
    """
    hyper = dict(source.hyperparameters())
    if not (source.learn_noise and target.learn_noise):
        hyper.pop("noise", None)
    if source.user_mean or target.user_mean:
        hyper.pop("mean", None)
    target.set_hyperparameters(hyper)


def _plain_unit(unit: str) -> str:
    """``"year (decimal, mid-month)"`` → ``"year"``: the unit without its explanation."""
    return unit.split(" (")[0].strip()


def _format_number(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def describe_hyperparameters(hyper: Mapping[str, Any], dims: Sequence[str], coord_units: Mapping[str, str],
                             units: str) -> list[str]:
    """Lines describing :meth:`GridGP.hyperparameters` with axis names and units.

    Lengthscales are per dimension, in that axis's units; the output scale and the noise
    are variances in the field's units squared, printed with their square roots.
    """
    lines = []
    lengthscales = hyper.get("lengthscales")
    if isinstance(lengthscales, (list, tuple)) and len(lengthscales) == len(dims):
        parts = []
        for d, ls in zip(dims, lengthscales):
            unit = _plain_unit(coord_units.get(d, ""))
            if isinstance(ls, (int, float)):
                parts.append(f"{d} {ls:.4g} {unit}".rstrip())
            elif ls is None:
                parts.append(f"{d} (none: see its kernel below)")
            else:
                parts.append(f"{d} {ls}")
        lines.append("lengthscale per dimension: " + ", ".join(parts))
    for key, label in (("outputscale", "signal variance"), ("noise", "noise variance")):
        value = hyper.get(key)
        if isinstance(value, (int, float)):
            lines.append(f"{label}: {value:.4g} {units}² (sd {math.sqrt(value):.3g} {units})")
        elif value is not None:
            lines.append(f"{label}: {value}")
    if isinstance(hyper.get("mean"), (int, float)):
        lines.append(f"constant mean: {hyper['mean']:.4g} {units}")
    # Kernel parameters beyond a lengthscale (e.g. spectral-mixture weights), per dimension.
    for d, params in zip(dims, hyper.get("kernels") or []):
        extra = {k: v for k, v in params.items() if k != "lengthscale"}
        if extra:
            lines.append(f"kernel of {d}: " + ", ".join(f"{k}={_format_number(v)}" for k, v in extra.items()))
    return lines
