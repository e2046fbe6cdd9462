"""Figure of a slice of a large fitted GridGP field: observed values, posterior mean and posterior
sd, from the ``.npz`` that ``gp_training.py --scale --slice-out FILE`` saves.

Usage::

    python benchmarks/plot_scale_slice.py scale_slice.npz --out notebooks/figures/scale_1024_slice.png
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def plot_slice(path: str, out: str) -> None:
    import matplotlib
    import matplotlib.colors

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(path)
    n, k = int(data["n"]), int(data["slice_index"])
    hyper = json.loads(str(data["hyperparameters"]))
    # On a full grid the sd is flat inside and rises only within a few cells of the edges (and at
    # missing cells): its panel shows a corner, on a log scale, so that structure is visible.
    corner = min(n, 32)
    sd = data["sd"][:corner, :corner]
    panels = [("observed (noisy draw)", data["observed"], "viridis", None),
              ("posterior mean", data["mean"], "viridis", None),
              (f"posterior sd, corner {corner}×{corner} cells (log scale)", sd, "magma",
               matplotlib.colors.LogNorm(float(np.nanmin(sd)), float(np.nanmax(sd))))]
    lo = min(float(np.nanmin(p[1])) for p in panels[:2])
    hi = max(float(np.nanmax(p[1])) for p in panels[:2])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    for ax, (title, img, cmap, norm) in zip(axes, panels):
        kw = {"vmin": lo, "vmax": hi} if norm is None else {"norm": norm}
        im = ax.imshow(img.T, origin="lower", cmap=cmap, interpolation="nearest", **kw)
        ax.set_title(title)
        ax.set_xlabel("axis 0")
        ax.set_ylabel("axis 1")
        fig.colorbar(im, ax=ax, shrink=0.85)
    ls = ", ".join(f"{v:.3g}" for v in hyper["lengthscales"])
    fig.suptitle(f"GridGP on a {n}³ grid ({n**3:,} cells), slice axis 2 = {k}; "
                 f"lengthscales {ls}, noise sd {hyper['noise'] ** 0.5:.3g}")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slice", help="the .npz written by gp_training.py --scale --slice-out")
    p.add_argument("--out", default="scale_slice.png")
    args = p.parse_args(argv)
    plot_slice(args.slice, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
