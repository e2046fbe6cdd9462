"""The ``kronegp`` command: info, demo (reduced size), fit on a user's file, bench wiring."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kronegp import baselines, cli, datasets, demo
from kronegp.models import describe_hyperparameters

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_info_reports_versions_device_and_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^kronegp\s+0\.\d+\.\d+", out, re.M)
    assert re.search(r"^torch\s+" + re.escape(torch.__version__) + "$", out, re.M)
    assert "kernel backend, CPU tensors    reference" in out
    if not torch.cuda.is_available():
        assert "no GPU: torch.cuda.is_available() is False" in out
        assert "cpu only" in out
    assert "ozone, air_temperature, elnino, texture_brick" in out


def test_console_script_is_installed_and_runs():
    script = shutil.which("kronegp") or str(Path(sys.executable).parent / "kronegp")
    if not Path(script).exists():
        pytest.fail("the `kronegp` console script is not installed next to this Python; "
                    "install the package (pip install -e .)")
    out = subprocess.run([script, "info"], check=True, capture_output=True, text=True).stdout
    assert "kernel backend, CUDA tensors" in out


def _scores(out: str) -> dict[str, tuple[float, float | None]]:
    rows = {}
    for name in ("GridGP", "per-cell monthly climatology", "spatial linear interpolation"):
        m = re.search(rf"^\s+{re.escape(name)}\s+([\d.]+)\s+(?:([\d.]+) %|-)", out, re.M)
        assert m, f"no score row for {name!r} in:\n{out}"
        rows[name] = (float(m.group(1)), float(m.group(2)) / 100 if m.group(2) else None)
    return rows


@pytest.mark.slow
def test_demo_small_fits_scores_and_writes_png(tmp_path, capsys):
    png = tmp_path / "figs" / "demo.png"
    assert cli.main(["demo", "--small", "--quiet", "--device", "cpu", "--iters", "40",
                     "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"lengthscale per dimension: lat [\d.]+ degrees_north, lon [\d.]+ "
                     r"degrees_east, time [\d.]+ year", out)
    assert re.search(r"noise variance: [\d.]+ DU²", out)
    assert "done on cpu" in out
    scores = _scores(out)
    gp_rmse, gp_cover = scores["GridGP"]
    clim_rmse, _ = scores["per-cell monthly climatology"]
    # The held-out block is filled better than the climatology does, with honest intervals.
    assert gp_rmse < clim_rmse
    assert 0.8 <= gp_cover <= 1.0
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > 3 * height  # four panels side by side


def test_demo_setup_holds_out_a_block_after_the_training_months():
    for small in (False, True):
        setup = demo.demo_setup(small)
        held = setup.held_out
        assert held.shape == setup.ozone.shape and held.any()
        months = np.flatnonzero(held.any(axis=(0, 1)))
        assert months.min() >= setup.train_months  # hyperparameters never see the block
        lat_idx = np.flatnonzero(held.any(axis=(1, 2)))
        lon_idx = np.flatnonzero(held.any(axis=(0, 2)))
        # A contiguous box: every cell of lat x lon x months is held out.
        assert held.sum() == len(lat_idx) * len(lon_idx) * len(months)
    assert demo.demo_setup(False).held_out.sum() == 8 * 8 * 12


def _user_grid(tmp_path) -> tuple[Path, datasets.GridData, np.ndarray]:
    truth = datasets.load_ozone().isel(lat=slice(6, 14), lon=slice(6, 15), time=slice(0, 18))
    missing = np.zeros(truth.shape, dtype=bool)
    missing[2:5, 3:6, 4:8] = True
    path = tmp_path / "my_ozone.npz"
    truth.with_missing(missing).save_npz(path)
    return path, truth, missing


@pytest.mark.slow
def test_fit_npz_writes_predictions_for_every_cell(tmp_path, capsys):
    path, truth, missing = _user_grid(tmp_path)
    out_path = tmp_path / "pred.npz"
    assert cli.main(["fit", str(path), "--iters", "15", "--quiet", "--device", "cpu",
                     "--out", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "lengthscale per dimension: lat" in out and "log marginal likelihood" in out
    assert f"{missing.sum()} to predict" in out
    mean = datasets.load_grid_file(out_path, var="mean")
    sd = datasets.load_grid_file(out_path, var="sd")
    sd_obs = datasets.load_grid_file(out_path, var="sd_observation")
    assert mean.dims == truth.dims and mean.shape == truth.shape and mean.units == "DU"
    np.testing.assert_allclose(mean.coords["lat"], truth.coords["lat"])
    assert np.isfinite(mean.values).all() and (sd.values > 0).all()
    assert (sd_obs.values > sd.values).all()
    # Held-out cells are uncertain, observed ones are not; the filled values are close.
    assert sd.values[missing].mean() > 1.5 * sd.values[~missing].mean()
    rmse_missing = np.sqrt(np.mean((mean.values[missing] - truth.values[missing]) ** 2))
    assert rmse_missing < truth.values[missing].std()
    with np.load(out_path) as archive:
        np.testing.assert_array_equal(archive["observed"], ~missing)


@pytest.mark.slow
def test_fit_netcdf4_in_and_out(tmp_path, capsys):
    """A real netCDF-4 (HDF5) file in, netCDF-4 out, through the engine the extras install."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("netCDF4")
    _, truth, missing = _user_grid(tmp_path)
    nc = tmp_path / "field.nc"
    truth.with_missing(missing).to_xarray().to_dataset(name="o3").to_netcdf(nc, engine="netcdf4",
                                                                            format="NETCDF4")
    assert nc.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # HDF5, i.e. netCDF-4
    out_nc = tmp_path / "pred.nc"
    assert cli.main(["fit", str(nc), "--iters", "5", "--quiet", "--device", "cpu",  # its only variable
                     "--out", str(out_nc)]) == 0
    assert out_nc.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    with xr.open_dataset(out_nc) as ds:
        assert set(ds.data_vars) >= {"mean", "sd", "sd_observation", "observed"}
        assert ds["mean"].dims == truth.dims and np.isfinite(ds["mean"].values).all()
        assert ds["mean"].attrs["units"] == "DU"
        np.testing.assert_allclose(ds["lat"].values, truth.coords["lat"])
        assert (ds["sd_observation"].values > ds["sd"].values).all()
        np.testing.assert_array_equal(ds["observed"].values, (~missing).astype(np.int8))
    capsys.readouterr()
    assert cli.main(["fit", str(nc), "--var", "ozone"]) == 2
    assert re.fullmatch(r"kronegp fit: var: name one of the variables of .*\['o3'\] \(got 'ozone'\)\n",
                        capsys.readouterr().err)


def test_fit_rejects_missing_files_and_unknown_devices(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "grid.csv")]) == 2
    assert "expected a .npz or .nc file" in capsys.readouterr().err
    assert cli.main(["fit", str(tmp_path / "absent.npz")]) == 2
    assert "absent.npz does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda"]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err


def test_bench_says_when_there_is_no_gpu_and_runs_the_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "kron_matmul.py").write_text(
        "import sys\n"
        "def main(argv):\n"
        "    print('BENCH ARGS', argv)\n"
        "    return 0\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main(sys.argv[1:]))\n")
    assert cli.main(["bench", "--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    assert "BENCH ARGS ['--device', 'cpu', '--small']" in out
    if not torch.cuda.is_available():
        assert "no GPU present" in out


def test_bench_without_the_script_explains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_find_benchmark_script", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "benchmarks/kron_matmul.py was not found" in capsys.readouterr().err


def test_climatology_baseline_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 4, 36))
    values[0, 1, [2, 14]] = np.nan
    month = np.tile(np.arange(1, 13), 3)
    mean, sd = baselines.climatology_baseline(values, month)
    for i, j, t in [(0, 1, 2), (2, 3, 35), (1, 0, 13)]:
        same = values[i, j, month == month[t]]
        same = same[~np.isnan(same)]
        assert mean[i, j, t] == pytest.approx(same.mean(), rel=1e-12)
        expected_sd = same.std(ddof=1) if len(same) > 1 else np.nan
        np.testing.assert_allclose(sd[i, j, t], expected_sd, rtol=1e-12)
    assert np.isnan(sd[0, 1, 2])  # one observed year left: no spread to estimate


def test_spatial_interpolation_baseline_reproduces_a_plane():
    lat, lon = np.linspace(-10, 10, 7), np.linspace(0, 30, 9)
    plane = 2.0 * lat[:, None, None] - 0.5 * lon[None, :, None] + np.arange(3.0)
    values = plane.copy()
    values[2:5, 3:6, 1] = np.nan
    filled = baselines.spatial_interpolation_baseline(values, lat, lon)
    np.testing.assert_allclose(filled, plane, rtol=1e-10, atol=1e-10)


def test_describe_hyperparameters_labels_dimensions_and_units():
    hyper = {"lengthscales": [2.5, 0.25, None], "outputscale": 4.0, "noise": 0.25,
             "mean": 10.0, "kernels": [{"lengthscale": 2.5}, {"lengthscale": 0.25},
                                       {"period_length": 1.0}], "path": "exact"}
    lines = describe_hyperparameters(hyper, ("lat", "time", "x"),
                                         {"lat": "degrees_north", "time": "year (decimal)"}, "K")
    assert lines[0] == ("lengthscale per dimension: lat 2.5 degrees_north, time 0.25 year, "
                        "x (none: see its kernel below)")
    assert "signal variance: 4 K² (sd 2 K)" in lines
    assert "noise variance: 0.25 K² (sd 0.5 K)" in lines
    assert "constant mean: 10 K" in lines
    assert "kernel of x: period_length=1" in lines
