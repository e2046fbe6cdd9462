"""Turning what a user hands GridGP (arrays, tensors, an xarray.DataArray) into checked tensors.

Everything is validated here, once, with errors that name the argument and say what was
expected; the model code below assumes clean inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ParsedGrid",
    "axis_to_numeric",
    "check_settings",
    "check_kernels",
    "checked_axis",
    "default_kernel",
    "parse_grid_data",
    "resolve_dtype_device",
    "standardisation",
    "standardised",
]


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
        coords: the ``xarray.Dataset`` of an ``xarray.DataArray`` input's coordinates (its
            name and attributes in ``attrs["name"]`` and ``attrs["attrs"]``), from which
            predictions are returned as xarray; ``None`` for other inputs.
    """

    values: Tensor
    mask: Optional[Tensor]
    noise: Optional[Tensor]
    axes: list[Tensor]
    axis_names: list[str]
    axis_units: list[Optional[str]]
    axis_origins: list[Any]
    coords: Any = None


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
    block: Optional[Callable[[tuple[int, ...]], slice]] = None,
) -> ParsedGrid:
    """Check and convert GridGP's inputs (see :class:`kronegp.models.GridGP`).

    With ``block`` (a sharded layout: ``grid shape ↦ this rank's rows`` of the flattened grid)
    ``values``, ``mask`` and ``noise`` are this rank's block, 1-D, ``axes`` (required) give the
    whole grid's shape, and the returned vectors are the block's; a block may have no observed
    cell (whether the grid has one is the caller's question, over every rank).
    """
    axis_names: Optional[list[str]] = None
    coords = None
    if _is_xarray(values):
        axis_names = [str(d) for d in values.dims]
        coords = _coords_template(values)
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
    if vals.dim() == 0 and block is None:
        raise ValueError("values must be an array shaped like the grid (n1, …, nd), got a scalar")

    dtype, device = resolve_dtype_device(vals, dtype, device)
    shape = tuple(vals.shape)
    if any(n == 0 for n in shape) and block is None:
        raise ValueError(f"values has an empty dimension: shape {shape}")
    _check_range("values", vals, dtype)
    vals = vals.to(device=device, dtype=dtype)
    d = len(shape)

    # ---- axes
    if block is not None:
        if not isinstance(axes, (list, tuple)) or len(axes) == 0:
            raise TypeError("axes must be a non-empty list of 1-D coordinate arrays, one per grid dimension "
                            f"(they give the whole grid's shape), got {type(axes).__name__}")
        d = len(axes)
    if axes is None:
        axes = [np.arange(n, dtype=np.float64) for n in shape]
    if isinstance(axes, (Tensor, np.ndarray)) and d == 1 and np.ndim(axes) == 1:
        axes = [axes]  # a single 1-D axis for 1-D data
    if not isinstance(axes, (list, tuple)):
        raise TypeError(f"axes must be a list of {d} 1-D coordinate arrays (one per dimension), got {type(axes).__name__}")
    if len(axes) != d:
        raise ValueError(f"axes must hold one 1-D array per dimension: values has {d} dimensions {shape}, got {len(axes)} axes")
    names = axis_names or [f"dim{k}" for k in range(d)]
    axis_tensors, units, origins = [], [], []
    for k, ax in enumerate(axes):
        num, unit, origin = checked_axis(ax, k)
        if block is None and num.shape[0] != shape[k]:
            raise ValueError(
                f"axes[{k}] has length {num.shape[0]} but values has {shape[k]} cells along dimension {k} "
                f"(values.shape = {shape})"
            )
        axis_tensors.append(torch.as_tensor(num, dtype=dtype, device=device))
        units.append(unit)
        origins.append(origin)
    where = f"the grid shape {shape}"
    if block is not None:
        rows = block(tuple(int(a.shape[0]) for a in axis_tensors))
        where = (f"this rank's block of the flattened grid, a 1-D tensor of length {rows.stop - rows.start} "
                 f"(cells [{rows.start}, {rows.stop}))")
        if shape != (rows.stop - rows.start,):
            raise ValueError(f"values must be {where}, got shape {shape}")

    # ---- missing cells
    observed = ~torch.isnan(vals)
    if mask is not None:
        m = mask if isinstance(mask, Tensor) else torch.as_tensor(np.asarray(mask))
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be a boolean array (True = observed), got dtype {m.dtype}")
        if tuple(m.shape) != shape:
            raise ValueError(f"mask must have {where}, got {tuple(m.shape)}")
        m = m.to(device)
        if bool((m & ~observed).any()):
            raise ValueError("values is NaN at cells that mask marks observed (True); mark them False or give a value")
        observed = observed & m
    finite_obs = torch.isfinite(vals) | ~observed
    if not bool(finite_obs.all()):
        raise ValueError("values holds infinite entries at observed cells; mark them missing (NaN or mask=False)")
    n_obs = int(observed.sum())
    if n_obs == 0 and block is None:
        raise ValueError("every cell is missing (all NaN or mask all False): there is nothing to fit")
    vals = torch.where(observed, vals, torch.zeros_like(vals))

    # ---- per-cell noise
    noise_t = None
    if noise is not None:
        nz = _as_float_array("noise", noise).to(device=device, dtype=dtype)
        try:
            nz = torch.broadcast_to(nz, shape)
        except RuntimeError:
            raise ValueError(f"noise must be a scalar or broadcast to {where}, got {tuple(nz.shape)}") from None
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
        coords=coords,
    )


def _coords_template(array: Any) -> Any:
    """An ``xarray.DataArray``'s coordinates as a Dataset, with its name and attributes."""
    ds = array.coords.to_dataset()
    ds.attrs = {"name": array.name, "attrs": dict(array.attrs)}
    return ds


def _check_range(name: str, vals: Tensor, dtype: torch.dtype) -> None:
    """Finite entries of ``vals`` must stay finite in ``dtype`` (1e39 is inf in float32)."""
    finite = vals[torch.isfinite(vals)] if vals.is_floating_point() else vals
    if finite.numel() == 0:
        return
    largest = float(finite.abs().max())
    if largest > torch.finfo(dtype).max:
        raise ValueError(
            f"{name} holds numbers up to {largest:.3g}, beyond the largest {dtype} "
            f"({torch.finfo(dtype).max:.3g}); use dtype=torch.float64 or rescale the values"
        )


def standardisation(observed_values: Tensor, n_observed: int, standardize: bool, dtype: torch.dtype,
                    layout) -> tuple[float, float]:
    """``(shift, scale)``: the model fits ``(y − shift) / scale``; ``(0, 1)`` unless ``standardize``.

    ``observed_values`` are the observed values on ``layout``'s cells (this rank's on a sharded
    layout, whose sums and maxima run over the whole grid). Mean and standard deviation of
    the observed values, computed in float64 on the values divided by their largest magnitude, so data near the top of the dtype's range (1e154
    in float64, whose squares overflow; 1e20 in float32) standardise correctly. Variances
    are reported in data units (``scale²``), so a spread whose square the dtype cannot hold
    with room to spare (sd above ``√max / 100``: 1.3e152 in float64, 1.8e17 in float32) is
    rejected with a clear error instead of predicting inf or NaN.
    """
    v = observed_values.detach().to(torch.float64)
    largest = layout.maximum(v.abs())
    if largest == 0.0:
        return 0.0, 1.0
    u = v / largest
    mean_u, var_u = layout.moments(u, n_observed)
    shift = mean_u * largest
    std = math.sqrt(var_u) * largest
    limit = math.sqrt(torch.finfo(dtype).max) / 100
    spread = std if standardize else largest
    if spread > limit:
        raise ValueError(
            f"values: their {'standard deviation' if standardize else 'magnitude'} {spread:.3g} is too "
            f"large for variances in data units in {dtype} (its square must stay well below "
            f"{torch.finfo(dtype).max:.3g}); rescale the values (e.g. change their units)"
        )
    if not standardize:
        return 0.0, 1.0
    return shift, (std if std > 0 else 1.0)


def standardised(values: Tensor, observed: Optional[Tensor], n_observed: int, standardize: bool,
                 layout) -> tuple[Tensor, float, float, float, float]:
    """``(y, shift, scale, mean0, var0)``: the values of ``layout``'s cells standardised
    (:func:`standardisation`; 0 at missing cells), and the mean and variance (``n − 1``; 1
    when undefined or 0) of the observed ``y`` over the whole grid, the model's initial mean
    and output scale."""
    obs_vals = values[observed] if observed is not None else values
    shift, scale = standardisation(obs_vals, n_observed, standardize, values.dtype, layout)
    y = (values - shift) / scale
    if observed is not None:
        y = torch.where(observed, y, torch.zeros_like(y))
    y_obs = y[observed] if observed is not None else y
    mean0, var0 = layout.moments(y_obs.detach(), n_observed)
    return y, shift, scale, mean0, (var0 if var0 > 0 else 1.0)


def _int_setting(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _bool_setting(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_settings(
    *,
    standardize: Any,
    num_probes: Any,
    cg_tol: Any,
    cg_max_iters: Any,
    precondition: Any,
    seed: Any,
    exact_variance_limit: Any,
    variance_samples: Any,
    exact_trace_limit: Any,
) -> dict[str, Any]:
    """GridGP's solver settings, checked at construction (not later, under the solver's names)."""
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float, np.floating, np.integer)):
        raise TypeError(f"cg_tol must be a number in (0, 1), got {cg_tol!r}")
    if not (0 < float(cg_tol) < 1):
        raise ValueError(f"cg_tol must be a relative residual in (0, 1), got {cg_tol}")
    return {
        "standardize": _bool_setting("standardize", standardize),
        "num_probes": _int_setting("num_probes", num_probes, 1),
        "cg_tol": float(cg_tol),
        "cg_max_iters": _int_setting("cg_max_iters", cg_max_iters, 1),
        "precondition": _bool_setting("precondition", precondition),
        "seed": _int_setting("seed", seed, 0),
        "exact_variance_limit": _int_setting("exact_variance_limit", exact_variance_limit, 0),
        "variance_samples": _int_setting("variance_samples", variance_samples, 1),
        "exact_trace_limit": _int_setting("exact_trace_limit", exact_trace_limit, 0),
    }


def default_kernel(axis: Tensor):
    """Matérn-5/2 with the lengthscale ``√(spacing · extent)`` of ``axis``: between the grid
    spacing (the finest resolvable scale) and the extent (the coarsest)."""
    import gpytorch

    kern = gpytorch.kernels.MaternKernel(nu=2.5)
    n = axis.shape[0]
    if n > 1:
        extent = float((axis[-1] - axis[0]).abs())
        spacing = float(axis.diff().abs().median())
        init = math.sqrt(spacing * extent)
    else:
        init = 1.0
    kern.lengthscale = init
    return kern


def check_kernels(kernels: Any, axes: Sequence[Tensor]) -> list:
    """``kernels`` (one GPyTorch kernel per grid dimension, or ``None`` for the defaults) moved
    to the axes' dtype and device, after checking each takes 1-D inputs ``(n, 1)``."""
    import gpytorch

    ndim = len(axes)
    if kernels is None:
        kernels = [default_kernel(ax) for ax in axes]
    if isinstance(kernels, gpytorch.kernels.Kernel) or not isinstance(kernels, (list, tuple)):
        raise TypeError(
            f"kernels must be a list of {ndim} GPyTorch kernels (one per dimension), got {type(kernels).__name__}"
        )
    if len(kernels) != ndim:
        raise ValueError(f"kernels must hold one kernel per dimension: {ndim} needed, got {len(kernels)}")
    out = []
    for k, (kern, axis) in enumerate(zip(kernels, axes)):
        if not isinstance(kern, gpytorch.kernels.Kernel):
            raise TypeError(f"kernels[{k}] must be a gpytorch.kernels.Kernel, got {type(kern).__name__}")
        kern = kern.to(dtype=axis.dtype, device=axis.device)
        ard = getattr(kern, "ard_num_dims", None)
        if ard not in (None, 1):
            raise ValueError(
                f"kernels[{k}] has ard_num_dims={ard}, but each GridGP kernel takes 1-D inputs "
                "(one kernel per grid dimension): use ard_num_dims=None or 1"
            )
        x = axis[: min(2, axis.shape[0])].unsqueeze(-1)
        try:
            with torch.no_grad():
                value = kern(x, x).to_dense()
        except Exception as err:  # any failure here means: the kernel cannot take 1-D inputs
            raise ValueError(
                f"kernels[{k}] ({type(kern).__name__}) does not accept 1-D inputs of shape (n, 1): "
                f"{type(err).__name__}: {err}"
            ) from None
        if tuple(value.shape) != (x.shape[0], x.shape[0]):
            raise ValueError(
                f"kernels[{k}] ({type(kern).__name__}) returned shape {tuple(value.shape)} for 1-D inputs of "
                f"shape {tuple(x.shape)}; expected {(x.shape[0], x.shape[0])} (batched kernels are not supported)"
            )
        out.append(kern)
    return out
