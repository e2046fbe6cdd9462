"""Bad inputs a new user hands kronegp on day one, each answered by a clear error or a right result.

API cases assert the exception type and a message that names the argument; CLI cases assert
exit status 2, exactly one line on stderr naming the problem (no traceback), and that no
fitting started (every check comes before it).
"""

from __future__ import annotations

import io
import zipfile

import gpytorch
import numpy as np
import pytest
import torch

import kronegp
from kronegp import cli, datasets
from kronegp.models import GridGP

F64 = torch.float64


def _factors(*shapes, dtype=F64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*s, dtype=dtype, generator=gen) + 0.5 for s in shapes]


def _grid(shape=(5, 4), missing=False):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(shape, dtype=F64, generator=gen) + 2.0
    if missing:
        values[1, 1] = float("nan")
    return values, [torch.linspace(0.0, 1.0, n, dtype=F64) * (k + 1) for k, n in enumerate(shape)]


def _model(**kwargs):
    values, axes = _grid(missing=kwargs.pop("missing", False))
    return GridGP(values, axes, hyperparameters={"noise": 0.05}, **kwargs)


# ----------------------------------------------------------------------------- the ops

A23, B32 = (2, 3), (3, 2)
OPS_CASES = [
    # (id, call, exception, message)
    ("x 0-d", lambda: kronegp.matmul_kron(torch.tensor(1.0, dtype=F64), _factors(A23)), ValueError, "0-d tensor"),
    ("x 0-d kron_matmul", lambda: kronegp.kron_matmul(_factors(A23), torch.tensor(1.0, dtype=F64)), ValueError,
     "0-d tensor"),
    ("x int64", lambda: kronegp.matmul_kron(torch.ones(2, 2, dtype=torch.int64), _factors(A23)), TypeError,
     "x must be a floating-point tensor .* got torch.int64"),
    ("x bool", lambda: kronegp.kron_matmul(_factors(A23), torch.ones(3, 1, dtype=torch.bool)), TypeError,
     "x must be a floating-point tensor .* got torch.bool"),
    ("x complex", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=torch.complex64), _factors(A23)), TypeError,
     "x must be a floating-point tensor"),
    ("x float16", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=torch.float16), _factors(A23)), TypeError,
     "half precision"),
    ("x numpy", lambda: kronegp.matmul_kron(np.ones((1, 2)), _factors(A23)), TypeError, "x must be a torch.Tensor"),
    ("factors empty", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=F64), []), ValueError,
     "factors must hold at least one matrix"),
    ("factors a tensor", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=F64), torch.ones(2, 3, dtype=F64)),
     TypeError, "factors must be a list or tuple"),
    ("factor 1-D", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=F64), [torch.ones(2, dtype=F64)]), ValueError,
     r"factors\[0\] must be a matrix"),
    ("factor a list", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=F64), [[[1.0, 2.0]]]), TypeError,
     r"factors\[0\] must be a torch.Tensor"),
    ("factor dtype", lambda: kronegp.matmul_kron(torch.ones(1, 6, dtype=F64), [_factors(A23)[0], _factors(B32, dtype=torch.float32)[0]]),
     TypeError, r"factors\[1\] has dtype torch.float32 but x has dtype torch.float64"),
    ("factor int", lambda: kronegp.matmul_kron(torch.ones(1, 2, dtype=F64), [torch.ones(2, 3, dtype=torch.int64)]),
     TypeError, r"factors\[0\] has dtype torch.int64"),
    ("x columns", lambda: kronegp.matmul_kron(torch.ones(1, 5, dtype=F64), _factors(A23, B32)), ValueError,
     r"ΠP_i = 6 .* got x.shape\[-1\] = 5"),
    ("x rows", lambda: kronegp.kron_matmul(_factors(A23, B32), torch.ones(5, 1, dtype=F64)), ValueError,
     r"ΠQ_i = 6 .* got x.shape\[-2\] = 5"),
    ("vector length", lambda: kronegp.matmul_kron(torch.ones(5, dtype=F64), _factors(A23)), ValueError, "ΠP_i = 2"),
    ("batch", lambda: kronegp.matmul_kron(torch.ones(3, 1, 2, dtype=F64), _factors((4, 2, 3))), ValueError,
     "batch dimensions do not broadcast"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in OPS_CASES], ids=[c[0] for c in OPS_CASES])
def test_ops_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ops_right_results_at_the_edges():
    fs = _factors((2, 2, 3), B32)
    x = torch.randn(6, dtype=F64)
    # a vector with batched factors: the batch, then the product (was (2, 1, 6))
    y = kronegp.matmul_kron(torch.randn(6, dtype=F64)[:6], [f for f in _factors((2, 3, 2), (2, 3))])
    assert y.shape == (2, 6)
    assert kronegp.kron_matmul(fs, x).shape == (2, 6)
    # no rows: an empty result of the right shape
    assert kronegp.matmul_kron(torch.randn(0, 4, dtype=F64), _factors(A23, (2, 2))).shape == (0, 6)
    # one-element factors
    one = [torch.full((1, 1), 3.0, dtype=F64)]
    torch.testing.assert_close(kronegp.matmul_kron(torch.full((2, 1), 2.0, dtype=F64), one),
                               torch.full((2, 1), 6.0, dtype=F64))


# ----------------------------------------------------------------------------- GridGP


def _values(v):
    return lambda: GridGP(v)


values0, axes0 = _grid()
GRIDGP_CASES = [
    ("values strings", lambda: GridGP(np.array([["a", "b"], ["c", "d"]])), TypeError, "values must be a real-valued"),
    ("values 0-d", _values(np.float64(3.0)), ValueError, "values must be an array shaped like the grid"),
    ("values empty", _values(np.zeros((3, 0))), ValueError, r"values has an empty dimension: shape \(3, 0\)"),
    ("values all NaN", _values(np.full((3, 2), np.nan)), ValueError, "every cell is missing"),
    ("values inf", _values(np.array([[1.0, np.inf], [2.0, 3.0]])), ValueError, "values holds infinite entries"),
    ("values bool", _values(np.ones((2, 2), dtype=bool)), TypeError, "values must be a real-valued array"),
    ("values complex", _values(np.ones((2, 2), dtype=complex)), TypeError, "values must be a real-valued array"),
    ("values object", _values(np.array([[1.0, None]], dtype=object)), TypeError, "values must be a real-valued array"),
    ("values over float32", lambda: GridGP(np.array([[1e39, 1.0], [2.0, 3.0]]), dtype=torch.float32), ValueError,
     "values holds numbers up to 1e\\+39, beyond the largest torch.float32"),
    ("values variance overflows", _values(np.array([[1e155, -1e155], [3e154, 2.0]])), ValueError,
     "too large for variances in data units"),
    ("dtype float16", lambda: GridGP(values0, axes0, dtype=torch.float16), TypeError,
     "dtype must be torch.float32 or torch.float64"),
    ("axes too short", lambda: GridGP(values0, [axes0[0], axes0[1][:3]]), ValueError,
     r"axes\[1\] has length 3 but values has 4"),
    ("axes count", lambda: GridGP(values0, [axes0[0]]), ValueError, "one 1-D array per dimension"),
    ("axes repeat", lambda: GridGP(values0, [axes0[0], torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=F64)]),
     ValueError, r"axes\[1\] must be strictly monotone"),
    ("axes zigzag", lambda: GridGP(values0, [torch.tensor([0.0, 2.0, 1.0, 3.0, 4.0], dtype=F64), axes0[1]]),
     ValueError, r"axes\[0\] must be strictly monotone"),
    ("axes NaN", lambda: GridGP(values0, [axes0[0], torch.tensor([0.0, np.nan, 1.0, 2.0], dtype=F64)]), ValueError,
     r"axes\[1\] holds non-finite coordinates"),
    ("axes 2-D", lambda: GridGP(values0, [axes0[0], torch.ones(2, 2, dtype=F64)]), ValueError,
     r"axes\[1\] must be a non-empty 1-D array"),
    ("axes strings", lambda: GridGP(values0, [axes0[0], np.array(list("abcd"))]), TypeError,
     r"axes\[1\] must hold numbers or datetimes"),
    ("axes a dict", lambda: GridGP(values0, {"x": axes0[0]}), TypeError, "axes must be a list"),
    ("mask shape", lambda: GridGP(values0, axes0, mask=np.ones((4, 5), dtype=bool)), ValueError,
     r"mask must have the grid shape \(5, 4\)"),
    ("mask ints", lambda: GridGP(values0, axes0, mask=np.ones((5, 4), dtype=int)), TypeError,
     "mask must be a boolean array"),
    ("noise negative", lambda: GridGP(values0, axes0, noise=-1.0), ValueError, "noise variances must be positive"),
    ("noise shape", lambda: GridGP(values0, axes0, noise=np.ones(3)), ValueError,
     "noise must be a scalar or broadcast to the grid shape"),
    ("noise NaN", lambda: GridGP(values0, axes0, noise=np.nan), ValueError, "noise must be finite"),
    ("kernels count", lambda: GridGP(values0, axes0, kernels=[gpytorch.kernels.RBFKernel()]), ValueError,
     "kernels must hold one kernel per dimension: 2 needed, got 1"),
    ("kernels one kernel", lambda: GridGP(values0, axes0, kernels=gpytorch.kernels.RBFKernel()), TypeError,
     "kernels must be a list of 2 GPyTorch kernels"),
    ("kernels ard", lambda: GridGP(values0, axes0, kernels=[gpytorch.kernels.RBFKernel(ard_num_dims=2),
                                                          gpytorch.kernels.RBFKernel()]), ValueError,
     r"kernels\[0\] has ard_num_dims=2"),
    ("kernels not kernels", lambda: GridGP(values0, axes0, kernels=["rbf", "rbf"]), TypeError,
     r"kernels\[0\] must be a gpytorch.kernels.Kernel"),
    ("mean not a Mean", lambda: GridGP(values0, axes0, mean=3.0), TypeError, "mean must be a gpytorch.means.Mean"),
    ("cg_tol negative", lambda: GridGP(values0, axes0, cg_tol=-1), ValueError, r"cg_tol must be a relative residual"),
    ("cg_tol one", lambda: GridGP(values0, axes0, cg_tol=1.0), ValueError, r"cg_tol must be a relative residual"),
    ("cg_max_iters 0", lambda: GridGP(values0, axes0, cg_max_iters=0), ValueError, "cg_max_iters must be an integer >= 1"),
    ("cg_max_iters float", lambda: GridGP(values0, axes0, cg_max_iters=10.0), TypeError, "cg_max_iters must be an integer"),
    ("num_probes 0", lambda: GridGP(values0, axes0, num_probes=0), ValueError, "num_probes must be an integer >= 1"),
    ("variance_samples 0", lambda: GridGP(values0, axes0, variance_samples=0), ValueError,
     "variance_samples must be an integer >= 1"),
    ("seed negative", lambda: GridGP(values0, axes0, seed=-3), ValueError, "seed must be an integer >= 0"),
    ("standardize string", lambda: GridGP(values0, axes0, standardize="no"), TypeError,
     "standardize must be True or False"),
    ("hyperparameters a string", lambda: GridGP(values0, axes0, hyperparameters="warm"), TypeError,
     "hyperparameters must be a dict"),
    ("hyperparameters unknown key", lambda: GridGP(values0, axes0, hyperparameters={"lenghtscales": [1, 1]}),
     TypeError, r"unknown hyperparameter\(s\) \['lenghtscales'\]"),
    ("hyperparameters noise negative", lambda: GridGP(values0, axes0, hyperparameters={"noise": -1.0}), ValueError,
     "noise must be positive"),
    ("hyperparameters lengthscale zero", lambda: GridGP(values0, axes0, hyperparameters={"lengthscales": [0.0, 1.0]}),
     ValueError, r"lengthscales\[0\] must be positive"),
    ("hyperparameters lengthscales count", lambda: GridGP(values0, axes0, hyperparameters={"lengthscales": 1.0}),
     ValueError, "lengthscales must hold one entry per dimension"),
    ("hyperparameters mean NaN", lambda: GridGP(values0, axes0, hyperparameters={"mean": float("nan")}), ValueError,
     "mean must be finite"),
    ("hyperparameters outputscale list", lambda: GridGP(values0, axes0, hyperparameters={"outputscale": [1.0, 2.0]}),
     TypeError, "outputscale must be a number"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in GRIDGP_CASES], ids=[c[0] for c in GRIDGP_CASES])
def test_gridgp_construction_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


USE_CASES = [
    ("points NaN", lambda m: m.predict(torch.tensor([[0.5, float("nan")]], dtype=F64)), ValueError,
     "points holds NaN or inf coordinates"),
    ("points inf", lambda m: m.predict(torch.tensor([[float("inf"), 0.5]], dtype=F64)), ValueError,
     "points holds NaN or inf"),
    ("points columns", lambda m: m.predict(torch.zeros(3, 3, dtype=F64)), ValueError, r"points must have shape \(n, 2\)"),
    ("points 1-D", lambda m: m.predict(torch.zeros(2, dtype=F64)), ValueError, r"points must have shape \(n, 2\)"),
    ("points float32", lambda m: m.predict(torch.zeros(1, 2)), TypeError, "points has dtype torch.float32"),
    ("points bool", lambda m: m.predict(torch.zeros(1, 2, dtype=torch.bool)), TypeError, "points must be real-valued"),
    ("variance name", lambda m: m.predict(variance="fast"), ValueError, "variance must be 'auto', 'exact' or 'mc'"),
    ("sample 0", lambda m: m.sample(0), ValueError, "n must be >= 1"),
    ("fit optimizer", lambda m: m.fit(optimizer="sgd", progress=False), ValueError, "optimizer must be 'adam' or 'lbfgs'"),
    ("fit iters", lambda m: m.fit(iters=-1, progress=False), ValueError, "iters must be >= 0"),
    ("set kernels params", lambda m: m.set_hyperparameters(kernels=[{"nu": 1.5}, None]), ValueError,
     r"kernels\[0\] \(MaternKernel\) has no parameter\(s\) \['nu'\]"),
    ("set noise floor", lambda m: m.set_hyperparameters(noise=1e-40), ValueError, "noise must be above the model's floor"),
    ("xarray with include_noise", lambda m: m.predict(as_xarray=True, include_noise=True), ValueError,
     "include_noise=True applies to the"),
]


@pytest.mark.parametrize("use, error, match", [c[1:] for c in USE_CASES], ids=[c[0] for c in USE_CASES])
def test_gridgp_use_bad_inputs(use, error, match):
    with pytest.raises(error, match=match):
        use(_model())


def test_per_cell_noise_include_noise_at_points_is_refused():
    values, axes = _grid()
    m = GridGP(values, axes, noise=0.1)
    with pytest.raises(ValueError, match="include_noise=True at arbitrary points needs a homoskedastic noise"):
        m.predict(torch.zeros(1, 2, dtype=F64), include_noise=True)


def test_integer_values_and_points_give_right_results():
    """Integer data and integer prediction points are numbers: they are used, not refused."""
    values, axes = _grid()
    ints = torch.round(values * 10).to(torch.int64)
    a = GridGP(ints, axes, hyperparameters={"noise": 0.05})
    b = GridGP(ints.to(F64), axes, hyperparameters={"noise": 0.05})
    torch.testing.assert_close(a.predict()[0], b.predict()[0], rtol=1e-12, atol=0)
    pts = torch.tensor([[0, 1], [1, 2]])
    torch.testing.assert_close(a.predict(pts)[0], a.predict(pts.to(F64))[0], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- datasets


def test_datasets_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="path: expected a .npz or .nc file"):
        datasets.load_grid_file(tmp_path / "grid.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.load_grid_file(tmp_path / "none.npz")
    with pytest.raises(TypeError, match=r"isel\(lat=...\): expected a slice or an integer array, got an integer"):
        datasets.load_ozone().isel(lat=3)
    with pytest.raises(ValueError, match="name: expected one of"):
        datasets.load("ozone2")


# ----------------------------------------------------------------------------- the CLI


def _good_grid(path, **changes):
    """A small valid .npz grid (ozone corner), with fields replaced by ``changes``."""
    g = datasets.load_ozone().isel(lat=slice(0, 4), lon=slice(0, 3), time=slice(0, 5))
    arrays = {"values": g.values, **{f"coord_{d}": g.coords[d] for d in g.dims},
              "meta": np.array('{"dims": ["lat", "lon", "time"], "units": "DU"}')}
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _cli_files(tmp):
    """Each bad file case: name -> (argv after 'fit', expected fragment of the message)."""
    good = _good_grid(tmp / "good.npz")
    raw = good.read_bytes()
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (tmp / "random.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    (tmp / "empty.npz").write_bytes(b"")
    with open(tmp / "bare.npz", "wb") as f:
        np.save(f, np.ones((3, 4)))
    with open(tmp / "pickle.npz", "wb") as f:
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("values.npy", b"not an npy payload")
    (tmp / "badmember.npz").write_bytes(buf.getvalue())
    _good_grid(tmp / "scalar.npz", values=np.float64(3.0), coord_lat=None, coord_lon=None, coord_time=None,
               meta=None)
    _good_grid(tmp / "strings.npz", values=np.array([["a", "b"]]), coord_lat=None, coord_lon=None, coord_time=None,
               meta=None)
    zig = datasets.load_ozone().coords["lat"][:4].copy()
    zig[[1, 2]] = zig[[2, 1]]
    _good_grid(tmp / "zigzag.npz", coord_lat=zig)
    nan_coord = datasets.load_ozone().coords["lon"][:3].copy()
    nan_coord[1] = np.nan
    _good_grid(tmp / "nancoord.npz", coord_lon=nan_coord)
    _good_grid(tmp / "shortcoord.npz", coord_time=np.arange(4.0))
    _good_grid(tmp / "dims.npz", meta=np.array('{"dims": ["lat", "lon"]}'))
    _good_grid(tmp / "allnan.npz", values=np.full((4, 3, 5), np.nan))
    inf = np.ones((4, 3, 5))
    inf[0, 0, 0] = np.inf
    _good_grid(tmp / "inf.npz", values=inf)
    (tmp / "folder.npz").mkdir()
    (tmp / "garbage.nc").write_bytes(b"this is not netCDF at all" * 10)
    (tmp / "a_file").write_text("x")
    (tmp / "outdir.npz").mkdir()
    g = str(good)
    return {
        "corrupt npz": ([str(tmp / "corrupt.npz")], "not a valid .npz archive"),
        "random bytes npz": ([str(tmp / "random.npz")], "neither a .npz archive nor a plain .npy"),
        "truncated npz": ([str(tmp / "truncated.npz")], "npz archive"),
        "empty npz": ([str(tmp / "empty.npz")], "not a valid .npz archive"),
        "npy under npz name": ([str(tmp / "bare.npz")], "holds one bare array (.npy data) of shape (3, 4)"),
        "pickle under npz name": ([str(tmp / "pickle.npz")], "kronegp never loads pickles"),
        "bad member": ([str(tmp / "badmember.npz")], "is not a numpy array (a damaged or foreign archive member)"),
        "0-d array": ([str(tmp / "scalar.npz")], "0-d array (a single number), not a grid"),
        "string array": ([str(tmp / "strings.npz")], "holds <U1, not numbers"),
        "non-monotone coordinates": ([str(tmp / "zigzag.npz")], "must be strictly monotone"),
        "NaN coordinate": ([str(tmp / "nancoord.npz")], "coords['lon']: expected finite numbers"),
        "short coordinate": ([str(tmp / "shortcoord.npz")], "coords['time']: expected shape (5,)"),
        "dims mismatch": ([str(tmp / "dims.npz")], "dims ('lat', 'lon') do not match"),
        "all missing": ([str(tmp / "allnan.npz")], "every cell of"),
        "infinite values": ([str(tmp / "inf.npz")], "values: infinite entries"),
        "input missing": ([str(tmp / "absent.npz")], "absent.npz does not exist"),
        "input a folder": ([str(tmp / "folder.npz")], "is a directory"),
        "input suffix": ([str(tmp / "grid.csv")], "expected a .npz or .nc file"),
        "garbage nc": ([str(tmp / "garbage.nc")], "is not a readable netCDF file"),
        "missing variable": ([g, "--var", "temp"], "has no array 'temp'"),
        "out csv": ([g, "--out", str(tmp / "pred.csv")], "--out: expected a file name ending in .npz or .nc"),
        "out no suffix": ([g, "--out", str(tmp / "pred")], "--out: expected a file name ending in .npz or .nc"),
        "out missing folder": ([g, "--out", str(tmp / "no" / "such" / "p.npz")], "does not exist"),
        "out a folder": ([g, "--out", str(tmp / "outdir.npz")], "is a folder, not a file name"),
        "out under a file": ([g, "--out", str(tmp / "a_file" / "p.npz")], "does not exist"),
        "iters negative": ([g, "--iters", "-1"], "argument --iters: expected an integer >= 1, got -1"),
        "iters zero": ([g, "--iters", "0"], "argument --iters: expected an integer >= 1, got 0"),
        "iters text": ([g, "--iters", "many"], "argument --iters: expected an integer >= 1, got 'many'"),
        "lr negative": ([g, "--lr", "-0.1"], "argument --lr: expected a positive number"),
        "lr nan": ([g, "--lr", "nan"], "argument --lr: expected a positive number"),
        "variance samples 0": ([g, "--variance-samples", "0"], "argument --variance-samples: expected an integer >= 1"),
        "seed negative": ([g, "--seed", "-2"], "argument --seed: expected an integer >= 0"),
        "optimizer": ([g, "--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
        "dtype": ([g, "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        "device unknown": ([g, "--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        "unknown option": ([g, "--itres", "3"], "unrecognized arguments: --itres 3"),
        "no file": ([], "the following arguments are required: file"),
    }


def _case_names():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return list(_cli_files(Path(tmp)))


CLI_CASE_NAMES = _case_names()


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    return _cli_files(tmp_path_factory.mktemp("cli_bad"))


@pytest.mark.parametrize("case", CLI_CASE_NAMES)
def test_cli_user_errors_are_one_line_exit_2_before_fitting(case, cli_files, capsys):
    argv, fragment = cli_files[case]
    try:
        status = cli.main(["fit", *argv, "--quiet"])
    except SystemExit as exit_:  # argparse exits by itself
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2, (case, status, captured.err)
    assert captured.err.count("\n") == 1 and captured.err.startswith("kronegp"), captured.err
    assert "Traceback" not in captured.err
    assert "allow_pickle" not in captured.err  # never numpy's hint to unpickle an untrusted file
    assert fragment in captured.err, (fragment, captured.err)
    assert "fitting GridGP" not in captured.out  # checked before any fitting


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_cli_cuda_without_a_gpu(cli_files, capsys, tmp_path):
    good = _good_grid(tmp_path / "g.npz")
    assert cli.main(["fit", str(good), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU is available" in err


def test_cli_demo_output_suffix_is_checked_first(capsys, tmp_path):
    assert cli.main(["demo", "--small", "--out", str(tmp_path / "demo.jpg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out: expected a file name ending in .png" in err


# A sharded model's block (kronegp.models.sharded: this rank's cells [2, 9) of a 3×4 grid),
# checked by the same parser as a whole grid; errors say which cells the rank holds.
def _block_rows(shape):
    return slice(2, 9)


_BLOCK_AXES = [np.arange(3.0), np.arange(4.0)]
DISTRIBUTED_BLOCK_CASES = [
    ("block wrong length", dict(values=np.zeros(6)), ValueError,
     r"values must be this rank's block of the flattened grid, a 1-D tensor of length 7 \(cells \[2, 9\)\)"),
    ("block grid-shaped", dict(values=np.zeros((3, 4))), ValueError, "a 1-D tensor of length 7"),
    ("block axes missing", dict(values=np.zeros(7), axes=None), TypeError, "axes must be a non-empty list"),
    ("block mask length", dict(values=np.zeros(7), mask=np.ones(12, dtype=bool)), ValueError,
     r"mask must have this rank's block .* got \(12,\)"),
    ("block noise length", dict(values=np.zeros(7), noise=np.ones(12)), ValueError,
     r"noise must be a scalar or broadcast to this rank's block"),
    ("block inf", dict(values=np.array([0, 1, np.inf, 0, 0, 0, 0.0])), ValueError, "infinite entries"),
]


@pytest.mark.parametrize("kwargs, error, match", [c[1:] for c in DISTRIBUTED_BLOCK_CASES],
                         ids=[c[0] for c in DISTRIBUTED_BLOCK_CASES])
def test_distributed_block_bad_inputs(kwargs, error, match):
    from kronegp.models import parse_grid_data

    kwargs = {"axes": _BLOCK_AXES, **kwargs}
    with pytest.raises(error, match=match):
        parse_grid_data(kwargs.pop("values"), kwargs.pop("axes"), block=_block_rows, **kwargs)


def test_distributed_block_may_be_all_missing():
    # a rank whose block holds no observed cell is fine: the grid may have some elsewhere
    from kronegp.models import parse_grid_data

    data = parse_grid_data(np.full(7, np.nan), _BLOCK_AXES, block=_block_rows)
    assert data.values.shape == (7,) and not bool(data.mask.any()) and not bool(data.values.abs().sum())
