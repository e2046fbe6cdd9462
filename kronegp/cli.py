"""The ``kronegp`` command: show the toolkit working, fit a user's grid, benchmark, report.

::

    kronegp demo  [--out kronegp_demo.png] [--iters 60] [--small] [--device auto]
    kronegp fit   FILE.nc|FILE.npz --var NAME [--out predictions.npz] [--iters 60]
    kronegp bench [ARGS passed to benchmarks/kron_matmul.py]
    kronegp info

``demo`` holds out a block of the shipped ozone grid (:func:`kronegp.datasets.load_ozone`):
it learns a :class:`kronegp.GridGP`'s hyperparameters by exact Kronecker inference on the
complete years before the block, predicts every cell from all observed cells (the CG path,
block missing), and scores the held-out cells against a per-cell monthly climatology and a
spatial linear interpolation. ``fit`` fits a GridGP to any gridded file (missing cells are
NaN) and writes the posterior mean and standard deviations of every cell.

GridGP standardises values internally and reports everything in the field's units;
coordinates keep their own units, so lengthscales read in degrees, years, pixels…
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main"]

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


# ---------------------------------------------------------------------- small helpers
class _Clock:
    """Prints ``[  1.2 s] message`` lines so long work shows progress as it goes."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():6.1f} s] {message}", flush=True)


def _pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"kronegp: --device {name}: no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use --device cpu or auto")
    return device


def _device_words(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _as_float(value) -> Any:
    """Tensors and arrays to plain Python numbers/lists, for printing."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value


# ---------------------------------------------------------------------- fitting
def _sync(device) -> None:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _timed_fit(model, args, device, clock, per: str) -> tuple[list, float]:
    """``model.fit`` with the command's optimiser settings; says how long it took and how the
    loss (``per`` what) moved. Returns the loss history and the seconds."""
    t0 = time.perf_counter()
    history = model.fit(iters=args.iters, optimizer=args.optimizer, lr=args.lr, progress=not args.quiet)
    _sync(device)
    seconds = time.perf_counter() - t0
    clock.say(f"fitted in {seconds:.1f} s ({len(history)} steps, loss "
              f"{history[0]:.4f} -> {history[-1]:.4f} {per})")
    return history, seconds


def _plain_unit(unit: str) -> str:
    """``"year (decimal, mid-month)"`` → ``"year"``: the unit without its explanation."""
    return unit.split(" (")[0].strip()


def describe_hyperparameters(hyper: dict, dims: Sequence[str], coord_units: dict,
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
            lines.append(f"{label}: {value:.4g} {units}² (sd {np.sqrt(value):.3g} {units})")
        elif value is not None:
            lines.append(f"{label}: {value}")
    if isinstance(hyper.get("mean"), (int, float)):
        lines.append(f"constant mean: {hyper['mean']:.4g} {units}")
    # Kernel parameters beyond a lengthscale (e.g. spectral-mixture weights), per dimension.
    for d, params in zip(dims, hyper.get("kernels") or []):
        extra = {k: v for k, v in params.items() if k != "lengthscale"}
        if extra:
            lines.append(f"kernel of {d}: " + ", ".join(
                f"{k}={_format_number(v) if isinstance(v, float) else v}" for k, v in extra.items()))
    return lines


def _format_number(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def copy_hyperparameters(source, target) -> None:
    """Give GridGP ``target`` the hyperparameters of ``source`` (same kernels, other data).

    Kernel parameters are in axis units and copy as they are; the output scale, noise and
    constant mean live in each model's own standardised units, so they pass through data
    units: ``θ_target = θ_data / scale_target²`` (variances) and
    ``μ_target = (μ_data − shift_target) / scale_target``.
    """
    import torch

    hyper = source.hyperparameters()
    with torch.no_grad():
        target.kernels.load_state_dict(source.kernels.state_dict())
        like = target.raw_outputscale
        target.raw_outputscale.copy_(target.outputscale_constraint.inverse_transform(
            torch.as_tensor(hyper["outputscale"] / target.scale**2, dtype=like.dtype,
                            device=like.device)))
        if source.learn_noise and target.learn_noise:
            target.raw_noise.copy_(target.noise_constraint.inverse_transform(
                torch.as_tensor(hyper["noise"] / target.scale**2, dtype=like.dtype,
                                device=like.device)))
        if not source.user_mean and not target.user_mean:
            target.mean_module.constant.fill_((hyper["mean"] - target.shift) / target.scale)


# ---------------------------------------------------------------------- baselines
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


def _rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


def _coverage(mean: np.ndarray, sd: np.ndarray, truth: np.ndarray) -> float | None:
    """Fraction of ``truth`` inside ``mean ± 1.96 sd``, over cells where ``sd`` is defined."""
    ok = np.isfinite(sd)
    if not ok.any():
        return None
    return float(np.mean(np.abs(truth[ok] - mean[ok]) <= Z95 * sd[ok]))


# ---------------------------------------------------------------------- demo
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


def _month_of_year(decimal_years: np.ndarray) -> np.ndarray:
    """Calendar month (1-12) of mid-month decimal years."""
    return np.floor((decimal_years % 1) * 12).astype(int) + 1


def run_demo(args) -> int:
    import torch

    from kronegp.models import GridGP

    clock = _Clock()
    device = _pick_device(args.device)
    dtype = _dtype(args.dtype)
    torch.manual_seed(args.seed)
    setup = demo_setup(args.small)
    ozone, held_out, n_train = setup.ozone, setup.held_out, setup.train_months
    lat, lon, time_ = (ozone.coords[d] for d in ozone.dims)
    train = ozone.with_missing(held_out)
    block_lat = lat[held_out.any(axis=(1, 2))]
    block_lon = lon[held_out.any(axis=(0, 2))]
    block_time = time_[held_out.any(axis=(0, 1))]
    clock.say(f"ozone: {ozone.shape[0]} lat x {ozone.shape[1]} lon x {ozone.shape[2]} months "
              f"({ozone.size} cells, {ozone.units}), {time_[0]:.0f}-{time_[-1]:.0f}")
    clock.say(f"held out: {held_out.sum()} cells, {block_lat[0]:g}..{block_lat[-1]:g} N x "
              f"{block_lon[0]:g}..{block_lon[-1]:g} E, {len(block_time)} months from "
              f"{int(block_time[0])}-{_month_of_year(block_time[:1])[0]:02d}")

    # 1. Hyperparameters by exact Kronecker inference on the complete training years: the
    #    held-out block lies after them, so nothing of it leaks into the fit.
    axes = [lat, lon, time_]
    fit_model = GridGP(ozone.values[..., :n_train], [lat, lon, time_[:n_train]], dtype=dtype,
                       device=device)
    clock.say(f"learning hyperparameters on the first {n_train} months "
              f"({fit_model.n_cells} cells, {fit_model.path} path) on {_device_words(device)}, "
              f"{args.dtype}, up to {args.iters} {args.optimizer} steps")
    history, seconds_fit = _timed_fit(fit_model, args, device, clock, "per cell")
    print("fitted hyperparameters:")
    for line in describe_hyperparameters(fit_model.hyperparameters(), ozone.dims,
                                         ozone.coord_units, ozone.units):
        print(f"  {line}")

    # 2. Condition on every observed cell of all 72 months, block missing: the CG path.
    model = GridGP(train.values, axes, dtype=dtype, device=device,
                   variance_samples=args.variance_samples, seed=args.seed)
    copy_hyperparameters(fit_model, model)
    clock.say(f"predicting all {ozone.size} cells from the {model.n_observed} observed "
              f"({model.path} path; variance by Monte Carlo, {args.variance_samples} samples)")
    t0 = time.perf_counter()
    mean_t, var_t = model.predict(variance="mc")
    _sync(device)
    seconds_predict = time.perf_counter() - t0
    clock.say(f"predicted in {seconds_predict:.1f} s ({model.cg_iterations} CG iterations)")
    mean = mean_t.detach().cpu().double().numpy()
    noise = float(model.hyperparameters()["noise"])
    sd = np.sqrt(var_t.detach().cpu().double().numpy() + noise)  # of a new observation

    truth = ozone.values[held_out]
    clim_mean, clim_sd = climatology_baseline(train.values, _month_of_year(time_))
    interp = spatial_interpolation_baseline(train.values, lat, lon)
    rows = [
        ("GridGP", mean, sd),
        ("per-cell monthly climatology", clim_mean, clim_sd),
        ("spatial linear interpolation", interp, None),
    ]
    print(f"held-out cells: {held_out.sum()} (sd of the truth there {truth.std():.2f} "
          f"{ozone.units})")
    print(f"  {'method':30s} {'RMSE':>8s}   95 % interval coverage")
    scores = {}
    for name, pred, pred_sd in rows:
        rmse = _rmse(pred[held_out], truth)
        cover = _coverage(pred[held_out], pred_sd[held_out], truth) if pred_sd is not None else None
        scores[name] = (rmse, cover)
        cover_s = f"{100 * cover:5.1f} %" if cover is not None else "  -   (no interval)"
        print(f"  {name:30s} {rmse:8.2f}   {cover_s}")
    print(f"  (RMSE in {ozone.units}; GridGP interval: mean +- 1.96 predictive sd; climatology: "
          f"mean +- 1.96 sd over the other years of that month)")
    if args.out:
        months = np.flatnonzero(held_out.any(axis=(0, 1)))
        if _demo_figure(ozone, train, mean, sd, held_out, int(months[len(months) // 2]),
                        args.out):
            clock.say(f"wrote {args.out}")
    clock.say(f"done on {_device_words(device)} in {clock.elapsed():.1f} s "
              f"(fit {seconds_fit:.1f} s, predict {seconds_predict:.1f} s)")
    return 0


def _demo_figure(ozone, train, mean, sd, held_out, t: int, out: str) -> bool:
    """Observed (block held out), truth, GP mean and GP sd for month ``t``; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        print("kronegp: matplotlib is not installed, so no figure was written "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    lat, lon, time_ = (ozone.coords[d] for d in ozone.dims)
    year, month = int(time_[t]), int(_month_of_year(time_[t:t + 1])[0])
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
    return True


# ---------------------------------------------------------------------- fit
def run_fit(args) -> int:
    import torch

    from kronegp.datasets import load_grid_file
    from kronegp.models import GridGP

    clock = _Clock()
    device = _pick_device(args.device)
    dtype = _dtype(args.dtype)
    torch.manual_seed(args.seed)
    try:
        grid = load_grid_file(args.file, args.var)
    except (ValueError, ImportError, OSError) as err:
        raise SystemExit(f"kronegp fit: {err}") from err
    clock.say(f"read {args.file}: {grid!r}")
    if grid.n_missing == grid.size:
        raise SystemExit(f"kronegp fit: every cell of {args.var or 'values'} is missing (NaN)")
    model = GridGP(grid.values, [grid.coords[d] for d in grid.dims], dtype=dtype, device=device,
                   variance_samples=args.variance_samples, seed=args.seed)
    clock.say(f"fitting GridGP ({model.path} path, {grid.size - grid.n_missing} observed cells, "
              f"{grid.n_missing} to predict) on {_device_words(device)}, {args.dtype}, up to "
              f"{args.iters} {args.optimizer} steps")
    history, _ = _timed_fit(model, args, device, clock, "per observed cell")
    print("fitted hyperparameters:")
    hyper = model.hyperparameters()
    for line in describe_hyperparameters(hyper, grid.dims, grid.coord_units, grid.units):
        print(f"  {line}")
    with torch.no_grad():
        lml = float(model.log_marginal_likelihood())
    print(f"log marginal likelihood: {lml:.6g}")
    method = "mc" if model.path == "cg" and grid.size > model.exact_variance_limit else "exact"
    t0 = time.perf_counter()
    mean_t, var_t = model.predict(variance=method)
    _sync(device)
    clock.say(f"predicted all {grid.size} cells in {time.perf_counter() - t0:.1f} s"
              + (f" (variance by Monte Carlo, {args.variance_samples} samples)"
                 if model.path == "cg" and method == "mc" else ""))
    mean = mean_t.detach().cpu().double().numpy()
    sd_f = np.sqrt(var_t.detach().cpu().double().numpy())
    sd_y = np.sqrt(sd_f**2 + float(hyper["noise"]))
    obs = grid.observed
    print(f"in-sample RMSE on the {obs.sum()} observed cells: "
          f"{_rmse(mean[obs], grid.values[obs]):.4g} {grid.units}")
    out = args.out or str(Path(args.file).with_suffix("")) + "_kronegp.npz"
    _write_predictions(grid, mean, sd_f, sd_y, out)
    clock.say(f"wrote mean, sd and sd_observation of all {grid.size} cells to {out}")
    return 0


def _write_predictions(grid, mean, sd_f, sd_y, out: str) -> None:
    """Predictions on the grid: ``mean``, ``sd`` (of the field f), ``sd_observation``
    (of a new observation y = f + noise), ``observed`` (1 where the input had a value)."""
    fields = {"mean": mean, "sd": sd_f, "sd_observation": sd_y}
    if out.endswith(".nc"):
        ds = grid.replace(values=mean, name="mean").to_xarray().to_dataset(name="mean")
        for name in ("sd", "sd_observation"):
            ds[name] = grid.replace(values=fields[name], name=name).to_xarray()
        ds["observed"] = (grid.dims, grid.observed.astype(np.int8))
        ds.to_netcdf(out)
        return
    import json

    meta = {"name": grid.name, "dims": list(grid.dims), "units": grid.units,
            "coord_units": grid.coord_units,
            "long_name": f"GridGP predictions of {grid.long_name or grid.name or 'the field'}",
            "variables": "mean: posterior mean; sd: posterior sd of the field; "
                         "sd_observation: predictive sd of a new observation; "
                         "observed: True where the input had a value"}
    np.savez_compressed(out, **{k: v.astype(np.float32) for k, v in fields.items()},
                        observed=grid.observed, meta=np.array(json.dumps(meta)),
                        **{f"coord_{d}": grid.coords[d] for d in grid.dims})


# ---------------------------------------------------------------------- bench
def _find_benchmark_script() -> Path | None:
    candidates = [Path.cwd() / "benchmarks" / "kron_matmul.py",
                  Path(__file__).resolve().parent.parent / "benchmarks" / "kron_matmul.py"]
    return next((p for p in candidates if p.is_file()), None)


def run_bench(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("kronegp bench: no GPU present (torch.cuda.is_available() is False). The "
              "benchmark times the CUDA kernel against its anchors and needs a GPU; the "
              "script decides what it can do without one.", flush=True)
    script = _find_benchmark_script()
    if script is None:
        print("kronegp bench: benchmarks/kron_matmul.py was not found (looked in the current "
              "directory and next to the kronegp package). It ships with the source "
              "repository, not the wheel: run this from a checkout.", file=sys.stderr)
        return 2
    print(f"kronegp bench: running {script}", flush=True)
    spec = importlib.util.spec_from_file_location("kronegp_bench_kron_matmul", script)
    module = importlib.util.module_from_spec(spec)
    old_argv = sys.argv
    sys.argv = [str(script), *args.bench_args]
    try:
        spec.loader.exec_module(module)  # a script guarded by __main__ does nothing here
        if hasattr(module, "main"):
            result = module.main(list(args.bench_args)) if _takes_argv(module.main) else module.main()
        else:
            import runpy

            runpy.run_path(str(script), run_name="__main__")
            result = 0
    finally:
        sys.argv = old_argv
    return int(result or 0)


def _takes_argv(func) -> bool:
    import inspect

    try:
        return len(inspect.signature(func).parameters) > 0
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------- info
def info_dict() -> dict[str, Any]:
    """Versions, device and kernel backend: what ``kronegp info`` prints."""
    import torch

    import kronegp

    out: dict[str, Any] = {
        "kronegp": kronegp.__version__,
        "kronegp location": str(Path(kronegp.__file__).parent),
        "python": f"{platform.python_version()} ({platform.platform()})",
    }
    for dist in ("torch", "gpytorch", "linear_operator", "numpy", "scipy", "matplotlib",
                 "xarray", "cuda.core", "cuda.bindings"):
        try:
            module = importlib.import_module(dist)
            out[dist] = getattr(module, "__version__", "installed")
        except ImportError:
            out[dist] = "not installed"
    out["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    if torch.cuda.is_available():
        out["device"] = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}"
                                  for i in range(torch.cuda.device_count()))
    else:
        out["device"] = f"cpu only ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)"
    backend = kronegp.backend_info()
    out["kernel backend, CPU tensors"] = backend.get("cpu")
    out["kernel backend, CUDA tensors"] = f"{backend.get('cuda')}: {backend.get('cuda_reason')}"
    layers = {}
    for name, module, attr in (("GridGP", "kronegp.models", "GridGP"),
                               ("patch_gpytorch", "kronegp.patch", "patch_gpytorch"),
                               ("KroneckerOperator", "kronegp.operators", "KroneckerOperator"),
                               ("distributed", "kronegp.distributed", None)):
        try:
            loaded = importlib.import_module(module)
            if attr is not None:
                getattr(loaded, attr)
            layers[name] = "available"
        except Exception as err:  # report, don't fail: info must work on a partial install
            layers[name] = f"unavailable ({type(err).__name__}: {err})"
    out["layers"] = layers
    from kronegp import datasets

    out["datasets"] = ", ".join(datasets.available())
    return out


def run_info(args) -> int:
    for key, value in info_dict().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:18s} {v}")
        else:
            print(f"{key:30s} {value}")
    return 0


# ---------------------------------------------------------------------- entry point
def _add_fit_options(p: argparse.ArgumentParser, iters: int) -> None:
    p.add_argument("--iters", type=int, default=iters, help=f"optimiser steps (default {iters})")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: GridGP's, 0.1 for Adam, 1 for L-BFGS)")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    p.add_argument("--device", default="auto",
                   help="auto (GPU when present, else CPU), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=int, default=0, help="seed for the stochastic estimators")
    p.add_argument("--variance-samples", type=int, default=32,
                   help="Monte Carlo samples for predictive variances on the CG path (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kronegp", description="Gaussian processes on grids with Kronecker-structured kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit a GridGP to the shipped ozone grid with a block "
                                       "held out; score it against baselines; write a PNG")
    demo.add_argument("--out", default="kronegp_demo.png",
                      help="PNG path (default kronegp_demo.png; '' for none)")
    demo.add_argument("--small", action="store_true",
                      help="a 16 x 16 x 24 corner of the grid (a few seconds; for tests)")
    _add_fit_options(demo, iters=60)
    demo.set_defaults(run=run_demo)

    fit = sub.add_parser("fit", help="fit a GridGP to your own gridded .npz or .nc file")
    fit.add_argument("file", help=".npz (see kronegp.datasets.load_grid_file) or .nc (needs xarray)")
    fit.add_argument("--var", default=None,
                     help="variable to fit (required for .nc; .npz default: 'values')")
    fit.add_argument("--out", default=None,
                     help="predictions file, .npz or .nc (default FILE_kronegp.npz)")
    _add_fit_options(fit, iters=60)
    fit.set_defaults(run=run_fit)

    bench = sub.add_parser(
        "bench", help="run benchmarks/kron_matmul.py (Kron-Matmul timings); every further "
                      "argument goes to that script", add_help=False)
    bench.set_defaults(run=run_bench)

    info = sub.add_parser("info", help="versions, device and which kernel backend is active, and why")
    info.set_defaults(run=run_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # The benchmark script owns its options (including -h): pass everything after `bench`.
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
