"""Turning what a user hands GridGP (arrays, tensors, an xarray.DataArray) into checked tensors.

Everything is validated here, once, with errors that name the argument and say what was
expected; the model code below assumes clean inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ParsedGrid", "parse_grid_data", "axis_to_numeric", "checked_axis", "resolve_dtype_device"]


@dataclass
class ParsedGrid:
    """What :func:`parse_grid_data` makes of a model's inputs: checked tensors on one device, of
    one dtype (a dataset with its metadata is :class:`kronegp.datasets.GridData`).

    Attributes:
        values: grid-shaped values, missing cells set to 0.
        mask: grid-shaped bool, True where observed; ``None`` when every cell is observed.
        noise: grid-shaped per-cell noise variances (0 at missing cells), or ``None``.
        axes: one strictly monotone 1-D coordinate tensor per dimension.
        axis_names: a name per dimension (xarray dims, else ``dim0``…).
        axis_units: ``"days"`` for axes converted from datetimes, else ``None``.
        axis_origins: the datetime subtracted from a converted axis, else ``None``.
    """

    values: Tensor
    mask: Optional[Tensor]
    noise: Optional[Tensor]
    axes: list[Tensor]
    axis_names: list[str]
    axis_units: list[Optional[str]]
    axis_origins: list[Any]


def _is_xarray(obj: Any) -> bool:
    return type(obj).__module__.startswith("xarray") and hasattr(obj, "dims") and hasattr(obj, "coords")


def axis_to_numeric(coord: Any) -> tuple[np.ndarray, Optional[str], Any]:
    """A coordinate as float64 numbers: datetimes become days since the first entry."""
    arr = np.asarray(coord.detach().cpu() if isinstance(coord, Tensor) else coord)
    if np.issubdtype(arr.dtype, np.datetime64):
        origin = arr.reshape(-1)[0] if arr.size else None
        return (arr - origin) / np.timedelta64(1, "D"), "days", origin
    if np.issubdtype(arr.dtype, np.timedelta64):
        return arr / np.timedelta64(1, "D"), "days", None
    return arr, None, None


def checked_axis(coord: Any, k: int) -> tuple[np.ndarray, Optional[str], Any]:
    """``axes[k]`` as float64 coordinates (:func:`axis_to_numeric`), its unit and origin, after
    checking that it is a non-empty 1-D array of finite, strictly monotone numbers (or datetimes)."""
    num, unit, origin = axis_to_numeric(coord)
    if num.ndim != 1 or num.shape[0] == 0:
        raise ValueError(f"axes[{k}] must be a non-empty 1-D array, got shape {num.shape}")
    if not (np.issubdtype(num.dtype, np.floating) or np.issubdtype(num.dtype, np.integer)):
        raise TypeError(f"axes[{k}] must hold numbers or datetimes, got dtype {num.dtype}")
    num = num.astype(np.float64)
    if not np.all(np.isfinite(num)):
        raise ValueError(f"axes[{k}] holds non-finite coordinates (NaN or inf)")
    if num.shape[0] > 1:
        steps = np.diff(num)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise ValueError(
                f"axes[{k}] must be strictly monotone (increasing or decreasing, no repeats); "
                f"its steps change sign or are zero, e.g. at index {int(np.argmax((steps <= 0) if steps[0] > 0 else (steps >= 0)))}"
            )
    return num, unit, origin


def resolve_dtype_device(
    vals: Tensor, dtype: Optional[torch.dtype], device: Optional[torch.device | str]
) -> tuple[torch.dtype, torch.device]:
    """The model's dtype (``dtype``, else the values' own float dtype, else float64) and device
    (``device``, else the values' device when they came as a tensor, else the CPU)."""
    if dtype is None:
        dtype = vals.dtype if vals.dtype in (torch.float32, torch.float64) else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype, torch.device(device) if device is not None else vals.device


def _as_float_array(name: str, obj: Any, shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """A tensor (any float dtype, original device) from a tensor/array/list; no dtype decision yet."""
    if isinstance(obj, Tensor):
        t = obj
    else:
        try:
            t = torch.as_tensor(np.asarray(obj))
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must be an array-like of numbers, got {type(obj).__name__}: {err}") from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the grid shape {shape}, got {tuple(t.shape)}")
    return t


def parse_grid_data(
    values: Any,
    axes: Optional[Sequence[Any]] = None,
    *,
    mask: Any = None,
    noise: Any = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> ParsedGrid:
    """Check and convert GridGP's inputs (see :class:`kronegp.models.GridGP`)."""
    axis_names: Optional[list[str]] = None
    if _is_xarray(values):
        axis_names = [str(d) for d in values.dims]
        if axes is None:
            axes = [
                values.coords[d].values if d in values.coords else np.arange(values.sizes[d])
                for d in values.dims
            ]
        values = values.values
    if isinstance(values, Tensor):
        vals = values
    else:
        arr = np.asarray(values)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"values must be a real-valued array, got dtype {arr.dtype}")
        vals = torch.as_tensor(arr)
    if not (vals.is_floating_point() or vals.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"values must be real-valued (float or int), got dtype {vals.dtype}")
    if vals.dim() == 0:
        raise ValueError("values must be an array shaped like the grid (n1, …, nd), got a scalar")

    dtype, device = resolve_dtype_device(vals, dtype, device)
    shape = tuple(vals.shape)
    if any(n == 0 for n in shape):
        raise ValueError(f"values has an empty dimension: shape {shape}")
    vals = vals.to(device=device, dtype=dtype)
    d = len(shape)
    names = axis_names or [f"dim{k}" for k in range(d)]

    # ---- axes
    if axes is None:
        axes = [np.arange(n, dtype=np.float64) for n in shape]
    if isinstance(axes, (Tensor, np.ndarray)) and d == 1 and np.ndim(axes) == 1:
        axes = [axes]  # a single 1-D axis for 1-D data
    if not isinstance(axes, (list, tuple)):
        raise TypeError(f"axes must be a list of {d} 1-D coordinate arrays (one per dimension), got {type(axes).__name__}")
    if len(axes) != d:
        raise ValueError(f"axes must hold one 1-D array per dimension: values has {d} dimensions {shape}, got {len(axes)} axes")
    axis_tensors, units, origins = [], [], []
    for k, ax in enumerate(axes):
        num, unit, origin = checked_axis(ax, k)
        if num.shape[0] != shape[k]:
            raise ValueError(
                f"axes[{k}] has length {num.shape[0]} but values has {shape[k]} cells along dimension {k} "
                f"(values.shape = {shape})"
            )
        axis_tensors.append(torch.as_tensor(num, dtype=dtype, device=device))
        units.append(unit)
        origins.append(origin)

    # ---- missing cells
    observed = ~torch.isnan(vals)
    if mask is not None:
        m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean array (True = observed), got dtype {m.dtype}")
        if tuple(m.shape) != shape:
            raise ValueError(f"mask must have the grid shape {shape}, got {tuple(m.shape)}")
        m = m.to(device)
        if bool((m & ~observed).any()):
            raise ValueError("values is NaN at cells that mask marks observed (True); mark them False or give a value")
        observed = observed & m
    finite_obs = torch.isfinite(vals) | ~observed
    if not bool(finite_obs.all()):
        raise ValueError("values holds infinite entries at observed cells; mark them missing (NaN or mask=False)")
    n_obs = int(observed.sum())
    if n_obs == 0:
        raise ValueError("every cell is missing (all NaN or mask all False): there is nothing to fit")
    vals = torch.where(observed, vals, torch.zeros_like(vals))

    # ---- per-cell noise
    noise_t = None
    if noise is not None:
        nz = _as_float_array("noise", noise).to(device=device, dtype=dtype)
        try:
            nz = torch.broadcast_to(nz, shape)
        except RuntimeError:
            raise ValueError(f"noise must be a scalar or broadcast to the grid shape {shape}, got {tuple(nz.shape)}") from None
        at_obs = nz[observed]
        if not bool(torch.isfinite(at_obs).all()):
            raise ValueError("noise must be finite at every observed cell (NaN or inf found)")
        if bool((at_obs <= 0).any()):
            raise ValueError(
                f"noise variances must be positive at observed cells (smallest {float(at_obs.min()):.3g}); "
                "use a small positive variance for near-exact observations"
            )
        noise_t = torch.where(observed, nz, torch.zeros_like(nz)).contiguous()

    return ParsedGrid(
        values=vals.contiguous(),
        mask=None if n_obs == math.prod(shape) else observed.contiguous(),
        noise=noise_t,
        axes=axis_tensors,
        axis_names=names,
        axis_units=units,
        axis_origins=origins,
    )
