"""The demo's data split and figure: ``kronegp demo`` and notebook 01 hold out the same block.

The shipped ozone grid (:func:`kronegp.datasets.load_ozone`) with a block of 2000 held out:
hyperparameters are learned on the complete years before it, the block is predicted from
every observed cell, and the predictions are scored against the baselines of
:mod:`kronegp.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoSetup", "demo_figure", "demo_setup", "month_of_year"]


@dataclass
class DemoSetup:
    """The demo's data split: a training period for the hyperparameters and a held-out block."""

    ozone: Any              # GridData, the whole grid (the truth)
    train_months: int       # hyperparameters are learned on months [0, train_months)
    held_out: np.ndarray    # bool grid, True = held out (inside the months after training)


def demo_setup(small: bool) -> DemoSetup:
    """Full: 24 x 24 x 72, hyperparameters from 1995-1999, a block of 2000 held out.

    The block covers 1.25-18.75 N, 93.75-76.25 W (Central America and the Caribbean) for
    all of 2000: 8 x 8 cells x 12 months = 768 cells. ``small`` is a 16 x 16 x 36 corner
    (1998-2000) with a 5 x 5 x 6 block, for tests.
    """
    from kronegp import datasets

    ozone = datasets.load_ozone()
    if small:
        ozone = ozone.isel(lat=slice(4, 20), lon=slice(4, 20), time=slice(36, 72))
        train_months, block = 24, (slice(5, 10), slice(5, 10), slice(24, 30))
    else:
        train_months, block = 60, (slice(9, 17), slice(8, 16), slice(60, 72))
    held_out = np.zeros(ozone.shape, dtype=bool)
    held_out[block] = True
    return DemoSetup(ozone=ozone, train_months=train_months, held_out=held_out)


def month_of_year(decimal_years: np.ndarray) -> np.ndarray:
    """Calendar month (1-12) of mid-month decimal years."""
    return np.floor((decimal_years % 1) * 12).astype(int) + 1


def demo_figure(ozone, train, mean, sd, held_out, t: int, out: str) -> None:
    """Observed (block held out), truth, GP mean and GP sd for month ``t``, written to ``out``
    (needs matplotlib: ``ImportError`` without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lat, lon, time_ = (ozone.coords[d] for d in ozone.dims)
    year, month = int(time_[t]), int(month_of_year(time_[t:t + 1])[0])
    half_lat, half_lon = np.diff(lat).mean() / 2, np.diff(lon).mean() / 2
    extent = [lon[0] - half_lon, lon[-1] + half_lon, lat[0] - half_lat, lat[-1] + half_lat]
    rows = np.flatnonzero(held_out[:, :, t].any(axis=1))
    cols = np.flatnonzero(held_out[:, :, t].any(axis=0))
    lo, hi = np.nanmin(ozone.values[..., t]), np.nanmax(ozone.values[..., t])
    panels = [
        (train.values[..., t], f"observed, block held out ({ozone.units})", "viridis", lo, hi),
        (ozone.values[..., t], f"truth ({ozone.units})", "viridis", lo, hi),
        (mean[..., t], f"GridGP mean ({ozone.units})", "viridis", lo, hi),
        (sd[..., t], f"GridGP predictive sd ({ozone.units})", "magma", None, None),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2), constrained_layout=True)
    for ax, (field_, title, cmap, vmin, vmax) in zip(axes, panels):
        im = ax.imshow(field_, origin="lower", extent=extent, cmap=cmap, vmin=vmin, vmax=vmax,
                       aspect="auto", interpolation="nearest")
        ax.add_patch(Rectangle((lon[cols[0]] - half_lon, lat[rows[0]] - half_lat),
                               2 * half_lon * len(cols), 2 * half_lat * len(rows), fill=False,
                               edgecolor="red", linewidth=1.5))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("longitude (°E)")
        fig.colorbar(im, ax=ax, shrink=0.85)
    axes[0].set_ylabel("latitude (°N)")
    fig.suptitle(f"Total column ozone, {year}-{month:02d}: GridGP fills the held-out block (red)")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
