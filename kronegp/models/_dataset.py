"""A grid GP's predictions as an ``xarray.Dataset`` (``GridGP.predict(as_xarray=True)``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kronegp.models._points import check_points

__all__ = ["prediction_dataset"]


def prediction_dataset(gp, points: Any, include_noise: bool, variance: str) -> Any:
    """Predictions as an ``xarray.Dataset``: ``mean``, ``sd``, ``sd_observation`` (data units).

    On the grid they carry the input's dimensions, coordinates and attributes, plus
    ``observed`` (1 where the input had a value); at points, a ``point`` dimension with
    one coordinate variable per grid dimension. ``sd_observation`` adds the noise
    variance: the learned one, or the per-cell noise on the grid (NaN at missing cells
    and at points, where per-cell noise is unknown).
    """
    try:
        import xarray as xr
    except ImportError as err:
        raise ImportError("GridGP.predict(as_xarray=True) needs xarray: pip install xarray") from err
    if include_noise:
        raise ValueError(
            "include_noise=True applies to the (mean, var) tensors (as_xarray=False); the Dataset "
            "holds both sd (of f) and sd_observation (of a new observation)"
        )
    mean, var = gp.predict(points, variance=variance, as_xarray=False)
    mean = mean.detach().cpu().double().numpy()
    var = var.detach().cpu().double().numpy()
    if gp.learn_noise:
        noise = float(gp.noise) * gp.scale**2
    elif points is None:
        cell = (gp.cell_noise * gp.scale**2).detach().cpu().double()
        if gp.observed is not None:
            cell = torch.where(gp.observed.cpu(), cell, torch.full_like(cell, math.nan))
        noise = cell.numpy().reshape(gp.shape)
    else:
        noise = math.nan
    template = gp._coords
    name = (template.attrs.get("name") if template is not None else None) or "values"
    attrs = dict(template.attrs.get("attrs", {})) if template is not None else {}
    units = {"units": attrs["units"]} if "units" in attrs else {}
    fields = {
        "mean": (mean, f"posterior mean of {name}"),
        "sd": (np.sqrt(var), f"posterior standard deviation of {name} (the noise-free field)"),
        "sd_observation": (np.sqrt(var + noise), f"predictive standard deviation of a new observation of {name}"),
    }
    if points is None:
        dims = tuple(gp.axis_names)
        ds = template.copy() if template is not None else xr.Dataset(
            coords={d: ax.detach().cpu().numpy() for d, ax in zip(dims, gp.axes)})
        for key, (value, long_name) in fields.items():
            ds[key] = (dims, value, {**units, "long_name": long_name})
        observed = gp.observed.reshape(gp.shape) if gp.observed is not None else None
        ds["observed"] = (dims, (observed.cpu().numpy() if observed is not None else
                                 np.ones(gp.shape)).astype("int8"),
                          {"long_name": f"1 where {name} was observed"})
    else:
        pts = check_points(points, gp.ndim, gp.y).detach().cpu().double().numpy()
        ds = xr.Dataset(coords={d: ("point", pts[:, k]) for k, d in enumerate(gp.axis_names)})
        for key, (value, long_name) in fields.items():
            ds[key] = (("point",), value, {**units, "long_name": long_name})
    ds.attrs = {**attrs, "model": f"kronegp.GridGP ({gp.path} path)"}
    return ds
