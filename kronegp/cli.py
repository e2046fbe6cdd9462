"""The ``kronegp`` command: it parses arguments, calls the library and prints.

::

    kronegp demo  [--out kronegp_demo.png] [--iters 60] [--small] [--device auto]
    kronegp fit   FILE.nc|FILE.npz [--var NAME] [--out predictions.npz|.nc] [--iters 60]
    kronegp bench [ARGS passed to benchmarks/kron_matmul.py]
    kronegp info

``demo`` holds out a block of the shipped ozone grid (:mod:`kronegp.demo`): it learns a
:class:`kronegp.GridGP`'s hyperparameters by exact Kronecker inference on the complete
years before the block, predicts every cell from all observed cells (the CG path, block
missing), and scores the held-out cells against the baselines of :mod:`kronegp.baselines`.
``fit`` fits a GridGP to any gridded file (missing cells are NaN) and writes the posterior
mean and standard deviations of every cell (:func:`kronegp.datasets.save_predictions`).

Every mistake in what the user typed or handed over (unreadable or malformed input, a
missing variable, an output path that cannot be written, a bad option value) is reported
as one line on stderr with exit status 2, before any fitting starts; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


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
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available "
                        "(torch.cuda.is_available() is False); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def _device_words(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


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
    if history:
        clock.say(f"fitted in {seconds:.1f} s ({len(history)} steps, loss "
                  f"{history[0]:.4f} -> {history[-1]:.4f} {per})")
    return history, seconds


def _check_output(out: str, suffixes: tuple[str, ...], option: str = "--out") -> None:
    """``out`` has one of ``suffixes`` and can be written: its folder exists and takes a new
    file (checked by creating and removing one), and it is not a folder itself."""
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in suffixes:
        raise UserError(f"{option}: expected a file name ending in {' or '.join(suffixes)} (the suffix "
                        f"chooses the format), got {out!r}")
    path = Path(out)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{option}: the folder {str(folder)!r} of {out!r} does not exist")
    if path.is_dir():
        raise UserError(f"{option}: {out!r} is a folder, not a file name")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as err:
        raise UserError(f"{option}: cannot write {out!r}: {err.strerror or err}") from None
    if not existed:
        path.unlink()


def _netcdf_engine_available() -> bool:
    try:
        import xarray  # noqa: F401
    except ImportError:
        return False
    return any(importlib.util.find_spec(m) is not None for m in ("netCDF4", "h5netcdf"))


# ---------------------------------------------------------------------- demo
def run_demo(args) -> int:
    import torch

    from kronegp.baselines import climatology_baseline, coverage, rmse, spatial_interpolation_baseline
    from kronegp.demo import demo_figure, demo_setup, month_of_year
    from kronegp.models import GridGP, copy_hyperparameters, describe_hyperparameters

    if args.out:
        try:  # the demo makes its figure's folder (fit does not: a typo there loses a long fit)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out: cannot make the folder of {args.out!r}: {err.strerror or err}") from None
        _check_output(args.out, (".png",))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--out: writing the figure needs matplotlib (pip install matplotlib); "
                            "pass --out '' for no figure") from None
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
              f"{int(block_time[0])}-{month_of_year(block_time[:1])[0]:02d}")

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

    # 2. Condition on every observed cell of all 72 months, block missing (the path GridGP
    #    chooses for 768 missing cells in one box: exact-missing; cg where that does not apply).
    model = GridGP(train.values, axes, dtype=dtype, device=device,
                   variance_samples=args.variance_samples, seed=args.seed)
    copy_hyperparameters(fit_model, model)
    how = (f"variance by Monte Carlo, {args.variance_samples} samples" if model.path == "cg"
           else "exact mean and variance")
    clock.say(f"predicting all {ozone.size} cells from the {model.n_observed} observed "
              f"({model.path} path; {how})")
    t0 = time.perf_counter()
    mean_t, var_t = model.predict(variance="mc")
    _sync(device)
    seconds_predict = time.perf_counter() - t0
    clock.say(f"predicted in {seconds_predict:.1f} s"
              + (f" ({model.cg_iterations} CG iterations)" if model.path == "cg" else ""))
    mean = mean_t.detach().cpu().double().numpy()
    noise = float(model.hyperparameters()["noise"])
    sd = np.sqrt(var_t.detach().cpu().double().numpy() + noise)  # of a new observation

    truth = ozone.values[held_out]
    clim_mean, clim_sd = climatology_baseline(train.values, month_of_year(time_))
    interp = spatial_interpolation_baseline(train.values, lat, lon)
    rows = [
        ("GridGP", mean, sd),
        ("per-cell monthly climatology", clim_mean, clim_sd),
        ("spatial linear interpolation", interp, None),
    ]
    print(f"held-out cells: {held_out.sum()} (sd of the truth there {truth.std():.2f} "
          f"{ozone.units})")
    print(f"  {'method':30s} {'RMSE':>8s}   95 % interval coverage")
    for name, pred, pred_sd in rows:
        error = rmse(pred[held_out], truth)
        cover = coverage(pred[held_out], pred_sd[held_out], truth) if pred_sd is not None else None
        cover_s = f"{100 * cover:5.1f} %" if cover is not None else "  -   (no interval)"
        print(f"  {name:30s} {error:8.2f}   {cover_s}")
    print(f"  (RMSE in {ozone.units}; GridGP interval: mean +- 1.96 predictive sd; climatology: "
          f"mean +- 1.96 sd over the other years of that month)")
    if args.out:
        months = np.flatnonzero(held_out.any(axis=(0, 1)))
        demo_figure(ozone, train, mean, sd, held_out, int(months[len(months) // 2]), args.out)
        clock.say(f"wrote {args.out}")
    clock.say(f"done on {_device_words(device)} in {clock.elapsed():.1f} s "
              f"(fit {seconds_fit:.1f} s, predict {seconds_predict:.1f} s)")
    return 0


# ---------------------------------------------------------------------- fit
def run_fit(args) -> int:
    import torch

    from kronegp.baselines import rmse
    from kronegp.datasets import load_grid_file, save_predictions
    from kronegp.models import GridGP, describe_hyperparameters

    # Everything the user handed over is checked before the (possibly long) fit.
    out = args.out or str(Path(args.file).with_suffix("")) + "_kronegp.npz"
    _check_output(out, (".npz", ".nc"))
    if out.lower().endswith(".nc") and not _netcdf_engine_available():
        raise UserError(f"--out {out}: writing netCDF needs xarray and netCDF4 or h5netcdf: "
                        "pip install 'kronegp[netcdf]' (or write .npz)")
    device = _pick_device(args.device)
    dtype = _dtype(args.dtype)
    try:
        grid = load_grid_file(args.file, args.var)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    clock = _Clock()
    clock.say(f"read {args.file}: {grid!r}")
    if grid.n_missing == grid.size:
        raise UserError(f"{args.file}: every cell of {grid.name or args.var or 'values'} is missing (NaN)")
    torch.manual_seed(args.seed)
    try:
        model = GridGP(grid.to_xarray(), dtype=dtype, device=device,
                       variance_samples=args.variance_samples, seed=args.seed)
    except (ValueError, TypeError) as err:
        raise UserError(f"{args.file}: {err}") from None
    clock.say(f"fitting GridGP ({model.path} path, {grid.size - grid.n_missing} observed cells, "
              f"{grid.n_missing} to predict) on {_device_words(device)}, {args.dtype}, up to "
              f"{args.iters} {args.optimizer} steps")
    _timed_fit(model, args, device, clock, "per observed cell")
    print("fitted hyperparameters:")
    for line in describe_hyperparameters(model.hyperparameters(), grid.dims, grid.coord_units, grid.units):
        print(f"  {line}")
    with torch.no_grad():
        lml = float(model.log_marginal_likelihood())
    print(f"log marginal likelihood: {lml:.6g}")
    method = "mc" if model.path == "cg" and grid.size > model.exact_variance_limit else "exact"
    t0 = time.perf_counter()
    predictions = model.predict(variance=method)
    _sync(device)
    clock.say(f"predicted all {grid.size} cells in {time.perf_counter() - t0:.1f} s"
              + (f" (variance by Monte Carlo, {args.variance_samples} samples)"
                 if model.path == "cg" and method == "mc" else ""))
    obs = grid.observed
    print(f"in-sample RMSE on the {obs.sum()} observed cells: "
          f"{rmse(predictions['mean'].values[obs], grid.values[obs]):.4g} {grid.units}")
    try:
        save_predictions(predictions, out)
    except (OSError, ValueError) as err:
        raise UserError(f"--out: writing {out!r} failed: {str(err).splitlines()[0]}") from None
    clock.say(f"wrote mean, sd and sd_observation of all {grid.size} cells to {out}")
    return 0


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
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_fit_options(p: argparse.ArgumentParser, iters: int) -> None:
    p.add_argument("--iters", type=_at_least(1), default=iters, help=f"optimiser steps (default {iters})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: GridGP's, 0.1 for Adam, 1 for L-BFGS)")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    p.add_argument("--device", default="auto",
                   help="auto (GPU when present, else CPU), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed for the stochastic estimators")
    p.add_argument("--variance-samples", type=_at_least(1), default=32,
                   help="Monte Carlo samples for predictive variances on the CG path (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kronegp", description="Gaussian processes on grids with Kronecker-structured kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="fit a GridGP to the shipped ozone grid with a block "
                                       "held out; score it against baselines; write a PNG")
    demo.add_argument("--out", default="kronegp_demo.png",
                      help="PNG path (default kronegp_demo.png; '' for none)")
    demo.add_argument("--small", action="store_true",
                      help="a 16 x 16 x 24 corner of the grid (a few seconds; for tests)")
    _add_fit_options(demo, iters=60)
    demo.set_defaults(run=run_demo)

    fit = sub.add_parser("fit", help="fit a GridGP to your own gridded .npz or .nc file")
    fit.add_argument("file", help=".npz (see kronegp.datasets.load_grid_file) or netCDF .nc")
    fit.add_argument("--var", default=None,
                     help="variable to fit (.nc: default the only one; .npz default: 'values')")
    fit.add_argument("--out", default=None,
                     help="predictions file: .npz or .nc (netCDF-4), by its suffix "
                          "(default FILE_kronegp.npz)")
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
    """Run the command; returns its exit status (2 for a user error, said in one line)."""
    parser = build_parser()
    # The benchmark script owns its options (including -h): pass everything after `bench`.
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except UserError as err:
        print(f"kronegp {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
