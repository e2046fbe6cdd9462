"""Simple gap-filling baselines and the scores to judge a GP's predictions against them.

Used by ``kronegp demo`` and the notebooks: a per-cell monthly climatology (mean and spread
of the same calendar month in the other years) and a per-time-step spatial linear
interpolation; RMSE and the coverage of ``mean ± 1.96 sd`` intervals.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Z95", "climatology_baseline", "coverage", "rmse", "spatial_interpolation_baseline"]

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def climatology_baseline(values: np.ndarray, month_of_year: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell monthly climatology: the mean and sd over the observed years of that month.

    ``values`` is ``(..., time)`` with NaN for missing; ``month_of_year`` gives each time
    step's calendar month. Returns ``(mean, sd)`` grids of the same shape; a cell whose
    month is never observed gets NaN.
    """
    mean = np.full(values.shape, np.nan)
    sd = np.full(values.shape, np.nan)
    for m in np.unique(month_of_year):
        sel = month_of_year == m
        block = values[..., sel]
        n = (~np.isnan(block)).sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = np.nansum(block, axis=-1, keepdims=True) / n
            var = np.nansum((block - mu) ** 2, axis=-1, keepdims=True) / np.maximum(n - 1, 1)
        mean[..., sel] = np.where(n > 0, mu, np.nan)
        sd[..., sel] = np.where(n > 1, np.sqrt(var), np.nan)
    return mean, sd


def spatial_interpolation_baseline(values: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Per time step, linear interpolation in (lat, lon) from that step's observed cells.

    ``values`` is ``(lat, lon, time)``; cells outside the convex hull of the observed ones
    fall back to the nearest observed cell.
    """
    from scipy.interpolate import griddata

    grid_lat, grid_lon = np.meshgrid(lat, lon, indexing="ij")
    points_all = np.column_stack([grid_lat.ravel(), grid_lon.ravel()])
    out = values.copy()
    for t in range(values.shape[-1]):
        frame = values[..., t]
        ok = ~np.isnan(frame)
        if ok.all() or not ok.any():
            continue
        pts = np.column_stack([grid_lat[ok], grid_lon[ok]])
        linear = griddata(pts, frame[ok], points_all, method="linear")
        nearest = griddata(pts, frame[ok], points_all, method="nearest")
        filled = np.where(np.isnan(linear), nearest, linear).reshape(frame.shape)
        out[..., t] = np.where(ok, frame, filled)
    return out


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


def coverage(mean: np.ndarray, sd: np.ndarray, truth: np.ndarray) -> float | None:
    """Fraction of ``truth`` inside ``mean ± 1.96 sd``, over cells where ``sd`` is defined
    (``None`` where it is defined nowhere)."""
    ok = np.isfinite(sd)
    if not ok.any():
        return None
    return float(np.mean(np.abs(truth[ok] - mean[ok]) <= Z95 * sd[ok]))
