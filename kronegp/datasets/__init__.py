"""Real gridded datasets shipped with kronegp, and the grid type they load into.

Every loader returns a :class:`GridData`: a field ``values`` on the rectilinear grid
``coords[dims[0]] × coords[dims[1]] × …``, i.e. ``values[i, j, …]`` is the field at
``(coords[dims[0]][i], coords[dims[1]][j], …)``, in ``units``; missing cells are NaN.

=====================================  ===================  ==========================
loader                                 dims                 shape
=====================================  ===================  ==========================
:func:`load_ozone`                     (lat, lon, time)     24 × 24 × 72
:func:`load_air_temperature`           (time, lat, lon)     240 × 37 × 49
:func:`load_elnino`                    (year, month)        61 × 12
:func:`load_texture`                   (row, col)           512 × 512
=====================================  ===================  ==========================

The files live inside the package (``kronegp/datasets/data/*.npz``) and are read through
:mod:`importlib.resources`, so they work from an installed wheel as well as a source
checkout. Where each one comes from, how it was extracted and its licence are in
``datasets/README.md`` and in each dataset's ``attrs``.

The same ``.npz`` layout (see :meth:`GridData.save_npz`) is what ``kronegp fit`` reads and
writes, so a user's grid round-trips through it.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import numpy as np

__all__ = [
    "GridData",
    "available",
    "load",
    "load_air_temperature",
    "load_elnino",
    "load_grid_file",
    "load_ozone",
    "load_texture",
    "save_predictions",
]


@dataclass(frozen=True, eq=False)
class GridData:
    """A scalar field on a rectilinear grid, with named axes, coordinates and units.

    ``values`` has shape ``tuple(len(coords[d]) for d in dims)`` and holds the field at
    the grid points ``(coords[dims[0]][i₀], …, coords[dims[-1]][i_{N-1}])``. Missing
    cells are NaN; everything else must be finite.

    Attributes:
        values: float64 array, NaN where the field is missing.
        dims: axis names, one per dimension of ``values``.
        coords: ``{dim: 1-D float64 coordinate array}``.
        units: units of ``values`` (UDUNITS-style where one exists, e.g. ``"K"``, ``"DU"``).
        coord_units: ``{dim: units of that coordinate}``.
        name: short identifier (``"ozone"``).
        long_name: what the field is, in words.
        attrs: provenance: ``source``, ``licence``, ``extraction`` and anything else.
    """

    values: np.ndarray
    dims: tuple[str, ...]
    coords: Mapping[str, np.ndarray]
    units: str = ""
    coord_units: Mapping[str, str] = field(default_factory=dict)
    name: str = ""
    long_name: str = ""
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        values = self.values
        if not isinstance(values, np.ndarray):
            raise TypeError(f"values: expected a numpy.ndarray, got {type(values).__name__}")
        if not np.issubdtype(values.dtype, np.floating):
            raise TypeError(f"values: expected a floating dtype (NaN marks missing cells), "
                            f"got {values.dtype}")
        dims = tuple(self.dims)
        if len(dims) != values.ndim:
            raise ValueError(f"dims: expected {values.ndim} names for values of shape "
                             f"{values.shape}, got {dims}")
        if len(set(dims)) != len(dims) or not all(isinstance(d, str) and d for d in dims):
            raise ValueError(f"dims: expected distinct non-empty strings, got {dims}")
        if set(self.coords) != set(dims):
            raise ValueError(f"coords: expected one array for each of {dims}, "
                             f"got keys {tuple(self.coords)}")
        coords = {}
        for d, n in zip(dims, values.shape):
            c = np.asarray(self.coords[d])
            if c.ndim != 1 or len(c) != n:
                raise ValueError(f"coords[{d!r}]: expected shape ({n},) to match values.shape "
                                 f"{values.shape}, got {c.shape}")
            if not np.issubdtype(c.dtype, np.number) or not np.all(np.isfinite(c)):
                raise ValueError(f"coords[{d!r}]: expected finite numbers, got dtype {c.dtype}")
            coords[d] = c.astype(np.float64, copy=False)
        if np.isinf(values).any():
            raise ValueError("values: infinite entries; mark missing cells with NaN")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "coord_units", dict(self.coord_units))
        object.__setattr__(self, "attrs", dict(self.attrs))

    # ------------------------------------------------------------------ shape and mask
    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def size(self) -> int:
        return self.values.size

    @property
    def observed(self) -> np.ndarray:
        """Boolean grid, True where the field has a value (not NaN)."""
        return ~np.isnan(self.values)

    @property
    def n_missing(self) -> int:
        return int(np.isnan(self.values).sum())

    def __repr__(self) -> str:
        axes = ", ".join(
            f"{d}: {len(c)} [{c[0]:g} … {c[-1]:g}]" + (f" {self.coord_units[d]}"
                                                        if self.coord_units.get(d) else "")
            for d, c in self.coords.items()
        )
        finite = self.values[self.observed]
        rng = f"{finite.min():.4g} … {finite.max():.4g}" if finite.size else "all missing"
        return (f"GridData({self.name or 'unnamed'}: {self.long_name or 'field'} in "
                f"{self.units or 'no units'}; {axes}; values {rng}; "
                f"{self.n_missing} of {self.size} missing)")

    # ------------------------------------------------------------------ derived grids
    def replace(self, **changes) -> "GridData":
        """A copy with some fields changed (``values``, ``coords``, ``attrs``…)."""
        kwargs = {k: getattr(self, k) for k in
                  ("values", "dims", "coords", "units", "coord_units", "name", "long_name",
                   "attrs")}
        kwargs.update(changes)
        return GridData(**kwargs)

    def isel(self, **indexers) -> "GridData":
        """Select by position along named axes: ``g.isel(time=slice(0, 12), lat=slice(None, None, 2))``.

        Each indexer is a ``slice`` or a 1-D integer array; the axis is kept (a single
        integer is rejected because it would drop the axis and the grid would change rank).
        """
        unknown = set(indexers) - set(self.dims)
        if unknown:
            raise ValueError(f"isel: unknown axes {sorted(unknown)}; this grid has {self.dims}")
        index = []
        coords = {}
        for d in self.dims:
            ix = indexers.get(d, slice(None))
            if isinstance(ix, (int, np.integer)):
                raise TypeError(f"isel({d}=...): expected a slice or an integer array, got an "
                                f"integer (use slice({ix}, {ix} + 1) to keep the axis)")
            if not isinstance(ix, slice):
                ix = np.asarray(ix)
                if ix.ndim != 1 or not np.issubdtype(ix.dtype, np.integer):
                    raise TypeError(f"isel({d}=...): expected a slice or a 1-D integer array, "
                                    f"got {ix.dtype} of shape {ix.shape}")
            coords[d] = self.coords[d][ix]
            if len(coords[d]) == 0:
                raise ValueError(f"isel({d}=...): selection is empty")
            index.append(ix)
        values = self.values
        for axis, ix in enumerate(index):  # one axis at a time: numpy would broadcast arrays
            values = values[(slice(None),) * axis + (ix,)]
        return self.replace(values=np.ascontiguousarray(values), coords=coords)

    def with_missing(self, missing: np.ndarray) -> "GridData":
        """A copy with NaN wherever the boolean grid ``missing`` is True."""
        missing = np.asarray(missing)
        if missing.shape != self.shape or missing.dtype != np.bool_:
            raise ValueError(f"missing: expected a bool array of shape {self.shape}, got "
                             f"{missing.dtype} of shape {missing.shape}")
        values = self.values.copy()
        values[missing] = np.nan
        return self.replace(values=values)

    # ------------------------------------------------------------------ conversions
    def tensor(self, dtype=None, device=None):
        """``values`` as a torch tensor (NaN kept), float64 unless ``dtype`` says otherwise."""
        import torch

        return torch.as_tensor(self.values, dtype=dtype or torch.float64, device=device)

    def axes(self, dtype=None, device=None) -> list:
        """The coordinates as a list of 1-D torch tensors in ``dims`` order (GridGP's ``axes``)."""
        import torch

        return [torch.as_tensor(self.coords[d], dtype=dtype or torch.float64, device=device)
                for d in self.dims]

    def to_xarray(self):
        """An ``xarray.DataArray`` with the same values, coordinates, units and attributes.

        Needs xarray (optional): ``pip install xarray``.
        """
        try:
            import xarray as xr
        except ImportError as err:
            raise ImportError("GridData.to_xarray needs xarray, which is optional: "
                              "pip install xarray") from err
        coords = {d: (d, self.coords[d], {"units": self.coord_units.get(d, "")})
                  for d in self.dims}
        attrs = {"units": self.units, "long_name": self.long_name,
                 **{k: (v if isinstance(v, (str, int, float)) else json.dumps(v))
                    for k, v in self.attrs.items()}}
        return xr.DataArray(self.values, coords=coords, dims=self.dims,
                            name=self.name or None, attrs=attrs)

    @classmethod
    def from_xarray(cls, array, name: str | None = None) -> "GridData":
        """Build from an ``xarray.DataArray``; datetime coordinates become decimal years.

        A dimension without a coordinate gets positions ``0, 1, …``. Calendar times
        (numpy ``datetime64`` or cftime objects, e.g. a 360-day model calendar) are
        converted to decimal years, ``year + (day of year − 1) / days in that year``
        (cftime: ``year + (month − 1 + (day − 1) / days in month) / 12``).
        """
        coords, coord_units = {}, {}
        for d in array.dims:
            if d in array.coords:
                c = np.asarray(array[d].values)
                unit = str(array[d].attrs.get("units", ""))
                if np.issubdtype(c.dtype, np.datetime64) or c.dtype == object:
                    c, unit = _decimal_years(c), "year (decimal)"
            else:
                c, unit = np.arange(array.sizes[d], dtype=np.float64), "index"
            coords[str(d)] = c
            coord_units[str(d)] = unit
        attrs = {k: v for k, v in array.attrs.items() if k not in ("units", "long_name")}
        return cls(
            values=np.asarray(array.values, dtype=np.float64),
            dims=tuple(str(d) for d in array.dims),
            coords=coords,
            units=str(array.attrs.get("units", "")),
            coord_units=coord_units,
            name=str(name or array.name or ""),
            long_name=str(array.attrs.get("long_name", array.attrs.get("standard_name", ""))),
            attrs=attrs,
        )

    def save_npz(self, path, dtype=np.float32) -> None:
        """Write in the layout :func:`load_grid_file` reads (and the shipped data use).

        Keys: ``values`` (``dtype``, NaN for missing), ``coord_<dim>`` per axis and
        ``meta`` (JSON: name, dims, units, coord_units, long_name, attrs).
        """
        meta = {"name": self.name, "dims": list(self.dims), "units": self.units,
                "coord_units": self.coord_units, "long_name": self.long_name,
                **{k: v for k, v in self.attrs.items() if _json_ok(v)}}
        np.savez_compressed(path, values=self.values.astype(dtype),
                            meta=np.array(json.dumps(meta, sort_keys=True)),
                            **{f"coord_{d}": self.coords[d] for d in self.dims})


def _json_ok(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _decimal_years(times: np.ndarray) -> np.ndarray:
    """Calendar times (datetime64 or cftime-like objects) as float decimal years."""
    if np.issubdtype(times.dtype, np.datetime64):
        t = times.astype("datetime64[s]")
        year = t.astype("datetime64[Y]")
        start = year.astype("datetime64[s]")
        length = (year + 1).astype("datetime64[s]") - start
        return (year.astype(np.int64) + 1970 + (t - start) / length).astype(np.float64)
    out = np.empty(times.shape, dtype=np.float64)
    for i, t in enumerate(times):
        try:
            days = getattr(t, "daysinmonth", None) or 30
            out[i] = t.year + (t.month - 1 + (t.day - 1 + t.hour / 24) / days) / 12
        except AttributeError as err:
            raise TypeError(f"coordinate value {t!r} is neither a number nor a calendar "
                            f"time") from err
    return out


# ---------------------------------------------------------------------- reading files
def _from_npz(archive, var: str | None, source: str) -> GridData:
    files = set(archive.files)
    meta = _meta(archive, source) if "meta" in files else {}
    key = var or ("values" if "values" in files else None)
    if key is None:
        candidates = sorted(k for k in files if not k.startswith("coord_")
                            and k not in ("meta", "scale", "offset", "fill", "dims"))
        raise ValueError(f"var: {source} has no 'values' array; name one of {candidates}")
    if key not in files:
        raise ValueError(f"var: {source} has no array {key!r}; it holds {sorted(files)}")
    stored = archive[key]
    if not isinstance(stored, np.ndarray):  # numpy hands back the raw bytes of a non-.npy member
        raise ValueError(f"var: {key!r} in {source} is not a numpy array (a damaged or foreign archive member)")
    if stored.ndim == 0:
        raise ValueError(f"var: {key!r} in {source} is a 0-d array (a single number), not a grid")
    if not (np.issubdtype(stored.dtype, np.number) or stored.dtype == np.bool_):
        raise ValueError(f"var: {key!r} in {source} holds {stored.dtype}, not numbers")
    if "dims" in meta:
        dims = tuple(meta["dims"])
    elif "dims" in files:
        dims = tuple(str(d) for d in archive["dims"])
    else:
        dims = tuple(f"dim_{i}" for i in range(stored.ndim))
    if len(dims) != stored.ndim:
        raise ValueError(f"{source}: dims {dims} do not match {key!r} of shape {stored.shape}")
    values = stored.astype(np.float64)
    if "fill" in files:
        values[stored == archive["fill"]] = np.nan
    if "scale" in files:
        values *= float(archive["scale"])
    if "offset" in files:
        values += float(archive["offset"])
    coords, coord_units = {}, dict(meta.get("coord_units", {}))
    for d, n in zip(dims, stored.shape):
        if f"coord_{d}" in files:
            coords[d] = archive[f"coord_{d}"]
        else:
            coords[d] = np.arange(n, dtype=np.float64)
            coord_units.setdefault(d, "index")
    attrs = {k: v for k, v in meta.items()
             if k not in ("name", "dims", "units", "coord_units", "long_name")}
    return GridData(values=values, dims=dims, coords=coords, units=meta.get("units", ""),
                    coord_units=coord_units, name=meta.get("name", var or ""),
                    long_name=meta.get("long_name", ""), attrs=attrs)


def _meta(archive, source: str) -> dict:
    """The ``meta`` JSON string of an archive, checked."""
    raw = archive["meta"]
    try:
        meta = json.loads(str(raw)) if isinstance(raw, np.ndarray) and raw.ndim == 0 else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: its 'meta' entry is not a JSON object string (see GridData.save_npz)")
    return meta


def load_grid_file(path: str | os.PathLike, var: str | None = None) -> GridData:
    """Read a grid from a ``.npz`` (always) or netCDF ``.nc`` file (needs xarray).

    ``.npz``: the array ``var`` (default ``values``) is the field; ``coord_<dim>`` arrays
    give coordinates, with dimension names from a ``meta`` JSON string (key ``dims``) or a
    ``dims`` string array (otherwise ``dim_0, dim_1, …`` with index coordinates).
    Optional ``scale``/``offset``/``fill`` decode integer storage as
    ``stored * scale + offset`` with ``fill`` → NaN.

    ``.nc``: the variable ``var`` read with ``xarray.open_dataset`` (masking and scaling
    decoded, so fill values become NaN), through :meth:`GridData.from_xarray`.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npz", ".nc", ".nc4", ".netcdf"):
        raise ValueError(f"path: expected a .npz or .nc file, got {path!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path} is a directory, not a file")
    if suffix == ".npz":
        return _read_npz(path, var)
    try:
        import xarray as xr
    except ImportError as err:
        raise ImportError(f"reading {path} needs xarray and a netCDF engine: "
                          "pip install 'kronegp[netcdf]' (.npz files need neither)") from err
    try:
        dataset = xr.open_dataset(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"path: {path} is not a readable netCDF file ({type(err).__name__}: "
                         f"{_first_line(err)})") from None
    with dataset:
        names = sorted(str(v) for v in dataset.data_vars)
        if var is None and len(names) == 1:
            var = names[0]
        if var is None or var not in dataset.data_vars:
            raise ValueError(f"var: name one of the variables of {path}: {names} (got {var!r})")
        array = dataset[var]
        if array.ndim == 0:
            raise ValueError(f"var: {var!r} in {path} is a 0-d variable (a single number), not a grid")
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"var: {var!r} in {path} holds {array.dtype}, not numbers")
        return GridData.from_xarray(array.load(), name=var)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_npz(path: str, var: str | None) -> GridData:
    """``np.load`` with every way a file can fail to be a ``.npz`` archive said in one line."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"path: {path} is not a valid .npz archive (truncated or corrupt: "
                         f"{_first_line(err)})") from None
    except ValueError:  # numpy falls back to unpickling anything else, which is refused here
        raise ValueError(f"path: {path} is neither a .npz archive nor a plain .npy array (it is "
                         "corrupt, another format, or a pickle: kronegp never loads pickles)") from None
    except OSError as err:
        raise ValueError(f"path: cannot read {path}: {_first_line(err)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"path: {path} holds one bare array (.npy data) of shape "
                         f"{getattr(loaded, 'shape', '?')}, not a .npz archive of named arrays: "
                         "save it with numpy.savez(path, values=array, coord_<dim>=...)")
    try:
        with loaded as archive:
            return _from_npz(archive, var, path)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise ValueError(f"path: {path} is a damaged .npz archive ({type(err).__name__}: "
                         f"{_first_line(err)})") from None


def save_predictions(predictions, path: str | os.PathLike) -> None:
    """Write ``GridGP.predict``'s ``xarray.Dataset`` on the grid to ``.nc`` or ``.npz``.

    ``.nc``: the Dataset itself (netCDF-4 through xarray's default engine: netCDF4 or
    h5netcdf). ``.npz``: the layout :func:`load_grid_file` reads: ``mean``, ``sd`` and
    ``sd_observation`` (float32), ``observed`` (bool), ``coord_<dim>`` per axis and a
    ``meta`` JSON string (dims, units, coordinate units, long_name); so
    ``load_grid_file(path, var="sd")`` gives a :class:`GridData` of any of them. Any other
    suffix is a ``ValueError`` (the suffix chooses the format; nothing is appended).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".nc":
        predictions.to_netcdf(path)
        return
    if suffix != ".npz":
        raise ValueError(f"path: expected a .npz or .nc file name, got {path!r}")
    mean = predictions["mean"]
    dims = [str(d) for d in mean.dims]
    units = str(mean.attrs.get("units", ""))
    coords = {d: np.asarray(predictions[d].values) for d in dims}
    meta = {"name": "mean", "dims": dims, "units": units,
            "coord_units": {d: str(predictions[d].attrs.get("units", "")) for d in dims},
            "long_name": str(mean.attrs.get("long_name", "")),
            "variables": "mean: posterior mean; sd: posterior sd of the field; "
                         "sd_observation: predictive sd of a new observation; "
                         "observed: True where the input had a value"}
    for d, c in coords.items():
        if not np.issubdtype(c.dtype, np.number):
            raise ValueError(f"predictions: coordinate {d!r} is {c.dtype}; .npz holds numbers only, "
                             "write .nc instead")
    np.savez_compressed(path, **{k: np.asarray(predictions[k].values, dtype=np.float32)
                                 for k in ("mean", "sd", "sd_observation")},
                        observed=np.asarray(predictions["observed"].values).astype(bool),
                        meta=np.array(json.dumps(meta)),
                        **{f"coord_{d}": c for d, c in coords.items()})


# ---------------------------------------------------------------------- shipped data
_SHIPPED = ("ozone", "air_temperature", "elnino", "texture_brick")


def available() -> tuple[str, ...]:
    """Names of the shipped datasets, for :func:`load`."""
    return _SHIPPED


def load(name: str) -> GridData:
    """Load a shipped dataset by name (see :func:`available`)."""
    if name not in _SHIPPED:
        raise ValueError(f"name: expected one of {_SHIPPED}, got {name!r}")
    data = (resources.files(__name__) / "data" / f"{name}.npz").read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return _from_npz(archive, None, f"kronegp/datasets/data/{name}.npz")


def load_ozone() -> GridData:
    """Monthly mean total column ozone over Central America, 1995–2000.

    ASA Data Expo 2006 (NASA), the subset shipped in R's plyr package.
    Grid ``(lat, lon, time)`` = 24 × 24 × 72: 2.5° cells centred at latitudes
    −21.25…36.25 °N and longitudes −113.75…−56.25 °E, monthly from January 1995 to
    December 2000 (time in decimal years at mid-month). Values in Dobson units (DU),
    whole numbers between about 230 and 390; none missing.
    """
    return load("ozone")


def load_air_temperature() -> GridData:
    """Climate-model annual mean air temperature at 1.5 m over North America, 1860–2099.

    Met Office Unified Model (HadCM3-family) run under the SRES A1B scenario, from
    iris-sample-data's ``A1B_north_america.nc``. Grid ``(time, lat, lon)`` =
    240 × 37 × 49 (435,120 cells): years 1860…2099 (each a December–November mean in the
    model's 360-day calendar), latitudes 15…60 °N every 1.25°, longitudes −135…−45 °E
    every 1.875°. Values in kelvin (K), stored to 0.01 K; none missing.
    """
    return load("air_temperature")


def load_elnino() -> GridData:
    """Monthly Niño 1+2 sea-surface temperature (0–10 °S, 90–80 °W), 1950–2010.

    NOAA CPC, ERSST.v3b, as shipped in statsmodels. Grid ``(year, month)`` = 61 × 12,
    month 1 = January. Values in degrees Celsius (degC), between about 18 and 29; none
    missing.
    """
    return load("elnino")


def load_texture() -> GridData:
    """A brick-wall texture (scikit-image's ``brick``, CC0) for pattern extrapolation.

    Grid ``(row, col)`` = 512 × 512 pixels, grey-level intensity in [0, 1]
    (stored as 8-bit, value / 255). Slice it with :meth:`GridData.isel` for a smaller
    problem, e.g. ``load_texture().isel(row=slice(0, 128), col=slice(0, 128))``.
    """
    return load("texture_brick")
