"""The shipped datasets load with their documented grids, units and physically sound values,
from the package's resources (and from a built wheel), and GridData behaves as documented."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from kronegp import datasets
from kronegp.datasets import GridData

REPO = Path(__file__).resolve().parent.parent


def _regular(c: np.ndarray, step: float) -> bool:
    return np.allclose(np.diff(c), step, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------- shipped data
def test_ozone_grid_units_and_values():
    g = datasets.load_ozone()
    assert isinstance(g, GridData)
    assert g.dims == ("lat", "lon", "time") and g.shape == (24, 24, 72)
    assert g.values.dtype == np.float64 and g.units == "DU"
    assert g.coord_units["lat"] == "degrees_north" and g.coord_units["lon"] == "degrees_east"
    lat, lon, time = (g.coords[d] for d in g.dims)
    assert _regular(lat, 2.5) and lat[0] == pytest.approx(-21.25) and lat[-1] == pytest.approx(36.25)
    assert _regular(lon, 2.5) and lon[0] == pytest.approx(-113.75) and lon[-1] == pytest.approx(-56.25)
    assert _regular(time, 1 / 12) and 1995 < time[0] < 1995.1 and 2000.9 < time[-1] < 2001
    assert g.n_missing == 0 and np.isfinite(g.values).all()
    # Total column ozone is a few hundred Dobson units everywhere on Earth.
    assert 200 < g.values.min() < g.values.max() < 450
    # Physics: the tropics hold less column ozone than the subtropics at ~35 N.
    tropics = g.values[np.abs(lat) < 5].mean()
    north = g.values[lat > 30].mean()
    assert north > tropics + 10
    # Northern-hemisphere ozone peaks in spring: March-April above September-October at 35 N.
    month = np.round((time - np.floor(time)) * 12 - 0.5).astype(int) + 1
    spring = g.values[lat > 30][..., np.isin(month, [3, 4])].mean()
    autumn = g.values[lat > 30][..., np.isin(month, [9, 10])].mean()
    assert spring > autumn + 5


def test_air_temperature_grid_units_and_values():
    g = datasets.load_air_temperature()
    assert g.dims == ("time", "lat", "lon") and g.shape == (240, 37, 49)
    assert g.size == 435_120 and g.units == "K" and g.n_missing == 0
    years, lat, lon = (g.coords[d] for d in g.dims)
    assert _regular(years, 1.0) and years[0] == 1860 and years[-1] == 2099
    assert _regular(lat, 1.25) and lat[0] == 15 and lat[-1] == 60
    assert _regular(lon, 1.875) and lon[0] == -135 and lon[-1] == -45
    # Annual-mean near-surface temperature in North America: between about -16 C and 33 C.
    assert 250 < g.values.min() < g.values.max() < 310
    # Physics: 15 N is warmer than 60 N, and the A1B scenario warms by more than 2 K
    # between the first and the last 20 years.
    assert g.values[:, lat < 20].mean() > g.values[:, lat > 55].mean() + 15
    assert g.values[-20:].mean() - g.values[:20].mean() > 2.0


def test_elnino_grid_units_and_values():
    g = datasets.load_elnino()
    assert g.dims == ("year", "month") and g.shape == (61, 12) and g.units == "degC"
    years, months = g.coords["year"], g.coords["month"]
    assert years[0] == 1950 and years[-1] == 2010 and _regular(years, 1.0)
    np.testing.assert_array_equal(months, np.arange(1, 13))
    assert 15 < g.values.min() < g.values.max() < 32 and g.n_missing == 0
    climatology = g.values.mean(axis=0)
    # Nino 1+2 is warmest in March and coolest in September.
    assert climatology[2] > climatology[8] + 3
    # The 1997-98 El Nino: December 1997 more than 3 C above the December mean.
    dec_1997 = g.values[years == 1997, 11].item()
    assert dec_1997 > climatology[11] + 3


def test_texture_grid_and_values():
    g = datasets.load_texture()
    assert g.dims == ("row", "col") and g.shape == (512, 512) and g.n_missing == 0
    assert 0 <= g.values.min() < g.values.max() <= 1
    assert g.values.std() > 0.05  # a texture, not a flat image
    # 8-bit storage: every value is a multiple of 1/255.
    levels = g.values * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-9)


@pytest.mark.parametrize("name", datasets.available())
def test_each_dataset_documents_its_provenance(name):
    g = datasets.load(name)
    assert g.name == name
    for key in ("source", "licence", "extraction"):
        assert isinstance(g.attrs.get(key), str) and len(g.attrs[key]) > 20, key
    assert set(g.coord_units) == set(g.dims)
    # datasets/README.md documents every shipped file and loader.
    readme = (REPO / "datasets" / "README.md").read_text()
    assert f"{name}.npz" in readme


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="name: expected one of"):
        datasets.load("ozone2")


def test_data_files_are_package_resources_and_small():
    data = resources.files("kronegp.datasets") / "data"
    total = 0
    for name in datasets.available():
        resource = data / f"{name}.npz"
        assert resource.is_file(), name
        total += len(resource.read_bytes())
    assert total < 3 * 2**20  # the brief: a few MB at most


@pytest.mark.slow
def test_built_wheel_ships_and_loads_the_data(tmp_path):
    """Build a wheel from a copy of the package, install it by unpacking, and load from it."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    shutil.copytree(REPO / "kronegp", src / "kronegp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.cubin"))
    shutil.copytree(REPO / "cuda_ext", src / "cuda_ext")  # shipped as kronegp/_cuda_src
    wheel_dir = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(src)], check=True, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("kronegp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    for name in datasets.available():
        assert f"kronegp/datasets/data/{name}.npz" in names
    for source in (REPO / "cuda_ext").glob("*.cu*"):
        assert f"kronegp/_cuda_src/{source.name}" in names
    # Load from the unpacked wheel only, from a directory outside the checkout.
    code = ("import kronegp, kronegp.datasets as d, json; "
            "assert kronegp.__file__.startswith(%r), kronegp.__file__; "
            "print(json.dumps({n: list(d.load(n).shape) for n in d.available()}))"
            % str(tmp_path / "site"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    shapes = json.loads(out.stdout)
    assert shapes == {"ozone": [24, 24, 72], "air_temperature": [240, 37, 49],
                      "elnino": [61, 12], "texture_brick": [512, 512]}


# ---------------------------------------------------------------------- GridData
def _small_grid(rng, shape=(3, 5, 4)) -> GridData:
    dims = ("y", "x", "t")
    coords = {d: np.sort(rng.uniform(0, 10, n)) for d, n in zip(dims, shape)}
    return GridData(values=rng.normal(size=shape) + 2.0, dims=dims, coords=coords, units="m",
                    coord_units={"y": "km", "x": "km", "t": "day"}, name="demo",
                    long_name="a test field", attrs={"source": "rng"})


def test_griddata_validates_its_parts():
    rng = np.random.default_rng(0)
    g = _small_grid(rng)
    with pytest.raises(ValueError, match="dims"):
        g.replace(dims=("y", "x"))
    with pytest.raises(ValueError, match="dims"):
        g.replace(dims=("y", "y", "t"))
    with pytest.raises(ValueError, match=r"coords\['x'\]: expected shape \(5,\)"):
        g.replace(coords={**g.coords, "x": np.arange(4.0)})
    with pytest.raises(ValueError, match="coords: expected one array"):
        g.replace(coords={"y": g.coords["y"], "x": g.coords["x"]})
    with pytest.raises(TypeError, match="floating dtype"):
        g.replace(values=np.ones((3, 5, 4), dtype=np.int32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        g.replace(values=[[1.0]])
    bad = g.values.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        g.replace(values=bad)


def test_griddata_missing_cells_isel_and_tensors():
    import torch

    rng = np.random.default_rng(1)
    g = _small_grid(rng)
    missing = np.zeros(g.shape, dtype=bool)
    missing[1:, 2:4, 0] = True
    h = g.with_missing(missing)
    assert h.n_missing == missing.sum() and np.isnan(h.values[missing]).all()
    np.testing.assert_array_equal(h.observed, ~missing)
    np.testing.assert_array_equal(h.values[~missing], g.values[~missing])
    assert g.n_missing == 0  # the original is untouched
    assert f"{missing.sum()} of {g.size} missing" in repr(h)
    with pytest.raises(ValueError, match="missing: expected a bool array of shape"):
        g.with_missing(missing[:, :, 0])

    s = h.isel(x=slice(1, 4), t=np.array([3, 0]))
    assert s.shape == (3, 3, 2)
    np.testing.assert_array_equal(s.coords["t"], g.coords["t"][[3, 0]])
    np.testing.assert_array_equal(s.values, h.values[:, 1:4][:, :, [3, 0]])
    with pytest.raises(TypeError, match="slice"):
        g.isel(x=2)
    with pytest.raises(ValueError, match="unknown axes"):
        g.isel(z=slice(0, 1))

    values32 = h.tensor(dtype=torch.float32)
    assert values32.dtype == torch.float32 and values32.shape == g.shape
    assert torch.isnan(values32).sum().item() == missing.sum()
    axes = h.axes()
    assert [a.dtype for a in axes] == [torch.float64] * 3
    assert [a.shape[0] for a in axes] == list(g.shape)


def test_npz_round_trip_and_integer_decoding(tmp_path):
    rng = np.random.default_rng(2)
    g = _small_grid(rng, shape=(4, 7, 1)).with_missing(rng.uniform(size=(4, 7, 1)) < 0.3)
    path = tmp_path / "grid.npz"
    g.save_npz(path, dtype=np.float64)
    back = datasets.load_grid_file(path)
    assert back.dims == g.dims and back.units == "m" and back.name == "demo"
    assert back.coord_units == g.coord_units and back.attrs["source"] == "rng"
    np.testing.assert_array_equal(np.isnan(back.values), np.isnan(g.values))
    np.testing.assert_allclose(back.values[g.observed], g.values[g.observed], rtol=1e-15)

    # A user's own npz with int16 storage, a fill value and a dims array.
    raw = rng.integers(-2000, 2000, size=(6, 5)).astype(np.int16)
    raw[2, 3] = -32768
    np.savez(tmp_path / "user.npz", temp=raw, scale=0.5, offset=10.0, fill=np.int16(-32768),
             dims=np.array(["lat", "lon"]), coord_lat=np.linspace(-3, 3, 6))
    u = datasets.load_grid_file(tmp_path / "user.npz", var="temp")
    assert u.dims == ("lat", "lon") and u.n_missing == 1 and np.isnan(u.values[2, 3])
    expected = raw.astype(np.float64) * 0.5 + 10.0
    ok = raw != -32768
    np.testing.assert_allclose(u.values[ok], expected[ok], rtol=1e-12)
    np.testing.assert_array_equal(u.coords["lon"], np.arange(5.0))
    assert u.coord_units["lon"] == "index"
    with pytest.raises(ValueError, match="no array 'pressure'"):
        datasets.load_grid_file(tmp_path / "user.npz", var="pressure")
    with pytest.raises(ValueError, match="no 'values' array; name one of"):
        datasets.load_grid_file(tmp_path / "user.npz")
    with pytest.raises(ValueError, match="expected a .npz or .nc file"):
        datasets.load_grid_file(tmp_path / "user.csv")


def test_xarray_round_trip_and_netcdf(tmp_path):
    xr = pytest.importorskip("xarray")
    g = datasets.load_ozone().isel(time=slice(0, 5))
    da = g.to_xarray()
    assert da.dims == g.dims and da.attrs["units"] == "DU"
    assert da["lat"].attrs["units"] == "degrees_north"
    np.testing.assert_array_equal(da.sel(lat=-21.25).values, g.values[0])
    back = GridData.from_xarray(da)
    np.testing.assert_array_equal(back.values, g.values)
    assert back.coord_units == g.coord_units and back.units == "DU"

    # Calendar times become decimal years.
    times = np.array(["2001-01-01", "2001-07-02T12:00", "2004-12-31"], dtype="datetime64[s]")
    t = xr.DataArray(np.arange(3.0), coords={"time": times}, dims=["time"], name="v")
    years = GridData.from_xarray(t).coords["time"]
    np.testing.assert_allclose(years, [2001.0, 2001.5, 2004 + 365 / 366], rtol=0, atol=1e-9)

    # A netCDF file (netCDF3 through scipy, which needs no extra engine).
    pytest.importorskip("scipy.io")
    ds = g.with_missing(g.values > 300).to_xarray().to_dataset(name="o3")
    ds.to_netcdf(tmp_path / "ozone.nc", engine="scipy")
    from_nc = datasets.load_grid_file(tmp_path / "ozone.nc", var="o3")
    assert from_nc.shape == g.shape and from_nc.n_missing == int((g.values > 300).sum()) > 0
    np.testing.assert_allclose(from_nc.coords["lon"], g.coords["lon"])
    with pytest.raises(ValueError, match=r"var: name one of the variables .*\['o3'\]"):
        datasets.load_grid_file(tmp_path / "ozone.nc", var="ozone")


def test_meta_json_is_readable_without_kronegp():
    """A shipped file is plain numpy + JSON: anyone can read it without this package."""
    raw = (resources.files("kronegp.datasets") / "data" / "ozone.npz").read_bytes()
    import io

    with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        assert meta["dims"] == ["lat", "lon", "time"] and meta["units"] == "DU"
        assert archive["values"].dtype == np.int16
