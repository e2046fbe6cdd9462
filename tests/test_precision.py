"""float32 precision modes (kronegp/precision.py): resolution at the door, the split into TF32
parts, the cuBLAS paths in every mode, launch records; on a GPU (marker ``cuda``) every mode
against a float64 reference within its documented bound, with poisoned outputs."""

from __future__ import annotations

import math

import pytest
import torch

import kronegp
from kronegp import reference
from kronegp.precision import PRECISIONS, cublas_tf32, default_precision, resolve_precision
from _helpers import rel_err

#: documented relative error bounds against float64 (kronegp/precision.py)
BOUND = {"highest": 1e-5, "high": 2e-6, "medium": 5e-3}


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_resolution_follows_torch_and_the_override(restore_matmul_precision):
    for mode in PRECISIONS:
        torch.set_float32_matmul_precision(mode)
        assert default_precision() == mode
        assert resolve_precision(None, torch.float32) == mode
        assert resolve_precision(None, torch.float64) == "highest"  # float64 is always IEEE
        for override in PRECISIONS:
            assert resolve_precision(override, torch.float32) == override
            assert resolve_precision(override, torch.float64) == "highest"


def test_bad_precision_is_named():
    f, x = torch.randn(3, 4), torch.randn(4, 2)
    with pytest.raises(ValueError, match="precision must be one of"):
        kronegp.kron_matmul([f], x, precision="tf32")
    with pytest.raises(ValueError, match="precision must be one of"):
        kronegp.matmul_kron(x.mT, [f.mT], precision="low")


def test_cpu_is_exact_in_every_mode():
    # The CPU (reference) computes exact float32 whatever the mode: never less precise than asked.
    gen = torch.Generator().manual_seed(3)
    fs = [torch.randn(p, q, generator=gen) for p, q in ((5, 3), (7, 11), (4, 4))]
    x = torch.randn(3 * 11 * 4, 6, generator=gen)
    ref = reference.kron_matmul([f.double() for f in fs], x.double())
    for mode in PRECISIONS:
        assert rel_err(kronegp.kron_matmul(fs, x, precision=mode), ref) < BOUND["highest"]


def test_tf32_split_is_exact_and_rounds_to_tf32():
    from kronegp._cuda.axis_gemm import tf32_split

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4099, generator=gen) * torch.logspace(-20, 20, 4099)
    hi, lo = tf32_split(t)
    assert torch.equal(hi + lo, t)  # the split loses nothing
    assert int((hi.view(torch.int32) & 0x1FFF).abs().max()) == 0  # hi has a 10-bit mantissa
    assert float((lo.abs() / t.abs()).max()) <= 2.0**-11  # rounded to nearest, not truncated
    assert float((lo.abs() / t.abs()).max()) > 2.0**-12


def test_cublas_tf32_switch_restores_the_setting(restore_matmul_precision):
    for mode in PRECISIONS:  # "medium" and "high" both mean TF32 on: the switch must keep which
        torch.set_float32_matmul_precision(mode)
        before = torch.backends.cuda.matmul.allow_tf32
        for enabled in (True, False):
            with cublas_tf32(enabled):
                assert torch.backends.cuda.matmul.allow_tf32 is enabled
            assert torch.backends.cuda.matmul.allow_tf32 is before
            assert torch.get_float32_matmul_precision() == mode


@pytest.mark.parametrize("force", ["axis_gemm", "axis_gemm_t"])
def test_axis_paths_in_every_mode_on_cpu_tensors(force):
    # The cuBLAS paths are torch on strided views: on CPU tensors they run the split-TF32
    # arithmetic too (CPU GEMMs ignore TF32, so every mode must come out float32-exact), and
    # repeated calls go through the launch record of their signature.
    from kronegp._cuda import CudaBackend

    gen = torch.Generator().manual_seed(7)
    backend = CudaBackend(force_path=force)
    shapes = ((3, 5), (12, 7), (61, 64))
    for mode in PRECISIONS:
        for dt in (torch.float32, torch.float64):
            fs = [torch.randn(p, q, dtype=dt, generator=gen) for p, q in shapes]
            fd = [f.double() for f in fs]
            for rep in range(2):  # first call plans, second replays the record
                x = torch.randn(5 * 7 * 64, 11, dtype=dt, generator=gen)
                got = backend.kron_matmul(fs, x, precision=mode)
                assert rel_err(got, reference.kron_matmul(fd, x.double())) < (1e-5 if dt == torch.float32 else 1e-13)
                x2 = torch.randn(2, 4, 3 * 12 * 61, dtype=dt, generator=gen)
                got2 = backend.matmul_kron(x2, fs, precision=mode)
                assert got2.shape == (2, 4, 5 * 7 * 64)
                assert rel_err(got2, reference.matmul_kron(x2.double(), fd)) < (1e-5 if dt == torch.float32 else 1e-13)
    assert len(backend._records) == 2 * 2 * 3  # sides × dtypes × modes: one record per signature


def test_record_key_separates_strides_and_alignment():
    # Another alignment of x's data or other factor strides is another signature: each gets its
    # own record and its own right answer; fresh data of a known signature reuses its record.
    from kronegp._cuda import CudaBackend

    gen = torch.Generator().manual_seed(9)
    backend = CudaBackend(force_path="axis_gemm")
    fs = [torch.randn(4, 6, generator=gen), torch.randn(5, 3, generator=gen)]
    fd = [f.double() for f in fs]
    aligned = torch.randn(18, 20, generator=gen)
    shifted = torch.randn(18 * 20 + 1, generator=gen)[1:].view(18, 20)  # data 4 bytes off
    assert aligned.data_ptr() % 16 != shifted.data_ptr() % 16
    for x in (aligned, shifted, torch.randn(18, 20, generator=gen)):
        assert rel_err(backend.kron_matmul(fs, x), reference.kron_matmul(fd, x.double())) < 1e-5
    assert len(backend._records) == 2
    ft = [f.mT.contiguous().mT for f in fs]  # same values, transposed strides
    assert rel_err(backend.kron_matmul(ft, aligned), reference.kron_matmul(fd, aligned.double())) < 1e-5
    assert len(backend._records) == 3


def test_cost_model_prices_tf32_for_large_factors():
    # TF32 makes the cuBLAS path cheaper for compute-bound factors; split TF32 is never priced
    # above exact float32 (which meets its bound: the model falls back to it); the fused kernels
    # are exact whatever the mode, so their predicted time does not move.
    from kronegp._cuda.plan import choose_path

    for shapes, m in (([(256, 256)] * 3, 11), ([(64, 64)] * 3, 1024), ([(64, 128), (128, 128), (365, 365)], 11)):
        exact = choose_path(shapes, m, 4, False, True, precision="highest")
        assert exact.axis_precision == "highest"
        best_exact = min(exact.predicted_axis_s, exact.predicted_axis_t_s)
        medium = choose_path(shapes, m, 4, False, True, precision="medium")
        assert medium.axis_precision == "medium"
        assert min(medium.predicted_axis_s, medium.predicted_axis_t_s) < best_exact
        high = choose_path(shapes, m, 4, False, True, precision="high")
        assert high.axis_precision in ("high", "highest")
        assert min(high.predicted_axis_s, high.predicted_axis_t_s) <= best_exact
        for c in (medium, high):
            assert c.predicted_fused_s == exact.predicted_fused_s
    f64 = choose_path([(256, 256)] * 3, 11, 8, False, True, precision="medium")
    assert f64.axis_precision == "highest"  # float64 ignores the mode
    assert f64.predicted_axis_s == choose_path([(256, 256)] * 3, 11, 8, False, True).predicted_axis_s


# --------------------------------------------------------------------------- GPU

GPU_CASES = [  # (side, rows, factor shapes): cuBLAS-bound, fused, rotated, mixed, odd sizes
    ("kron_matmul", 11, ((64, 64),) * 3),
    ("matmul_kron", 11, ((64, 64),) * 3),
    ("kron_matmul", 11, ((128, 128),) * 3),
    ("matmul_kron", 16, ((64, 61), (100, 128), (3, 5))),
    ("kron_matmul", 7, ((24, 24), (24, 24), (72, 72))),
    ("matmul_kron", 33, ((8, 8),) * 5),
    ("kron_matmul", 3, ((365, 365), (12, 7))),
]


def _poisoned_run(fn):
    """Run ``fn`` with the caching allocator's free blocks holding NaN (an unwritten output
    element then shows)."""
    torch.cuda.synchronize()
    junk = torch.full((1 << 24,), float("nan"), device="cuda")
    del junk
    return fn()


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["auto", "fused", "axis_gemm", "axis_gemm_t"])
@pytest.mark.parametrize("mode", PRECISIONS)
def test_every_mode_within_its_bound(mode, path):
    from kronegp import device

    backend = device.backend_for(torch.empty(1, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(11)
    try:
        backend.force_path = path
        for side, rows, shapes in GPU_CASES:
            fs = [torch.randn(p, q, device="cuda", generator=gen) / math.sqrt(q) for p, q in shapes]
            fd = [f.double() for f in fs]
            for rep in range(2):  # the first call plans, the second replays the launch record
                if side == "kron_matmul":
                    x = torch.randn(math.prod(q for _, q in shapes), rows, device="cuda", generator=gen)
                    got = _poisoned_run(lambda: kronegp.kron_matmul(fs, x, precision=mode))
                    ref = reference.kron_matmul(fd, x.double())
                else:
                    x = torch.randn(rows, math.prod(p for p, _ in shapes), device="cuda", generator=gen)
                    got = _poisoned_run(lambda: kronegp.matmul_kron(x, fs, precision=mode))
                    ref = reference.matmul_kron(x.double(), fd)
                assert not torch.isnan(got).any(), (side, shapes, mode, path)
                err = rel_err(got, ref)
                assert err < BOUND[mode], (side, shapes, mode, path, err)
                if mode == "medium" and backend.path_taken(side, x, fs, mode) != "fused":
                    assert err > 1e-6, "TF32 mode ran in exact float32: the flag did not reach cuBLAS"
    finally:
        backend.force_path = "auto"


@pytest.mark.cuda
def test_global_mode_reaches_the_kernel_and_is_restored(restore_matmul_precision):
    gen = torch.Generator(device="cuda").manual_seed(12)
    fs = [torch.randn(128, 128, device="cuda", generator=gen) / 11.3 for _ in range(2)]
    x = torch.randn(128 * 128, 11, device="cuda", generator=gen)
    ref = reference.kron_matmul([f.double() for f in fs], x.double())
    errs = {}
    for mode in PRECISIONS:
        torch.set_float32_matmul_precision(mode)
        errs[mode] = rel_err(kronegp.kron_matmul(fs, x), ref)
        assert torch.get_float32_matmul_precision() == mode  # the switch left torch's flag alone
    assert errs["highest"] < BOUND["highest"] and errs["high"] < BOUND["high"] and errs["medium"] < BOUND["medium"]
    # float64 ignores every mode
    torch.set_float32_matmul_precision("medium")
    fd = [f.double() for f in fs]
    assert rel_err(kronegp.kron_matmul(fd, x.double()), ref) < 1e-13


@pytest.mark.cuda
@pytest.mark.parametrize("mode", PRECISIONS)
def test_gradients_in_every_mode(mode):
    gen = torch.Generator(device="cuda").manual_seed(13)
    fs = [(torch.randn(p, p, device="cuda", generator=gen) / math.sqrt(p)).requires_grad_() for p in (64, 72)]
    x = torch.randn(11, 64 * 72, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(11, 64 * 72, device="cuda", generator=gen)
    (kronegp.matmul_kron(x, fs, precision=mode) * w).sum().backward()
    fd = [f.detach().double().requires_grad_() for f in fs]
    xd = x.detach().double().requires_grad_()
    (reference.matmul_kron(xd, fd) * w.double()).sum().backward()
    bound = max(BOUND[mode] * 10, 1e-5)  # gradients sum over more terms
    assert rel_err(x.grad, xd.grad) < bound
    for f, g in zip(fs, fd):
        assert rel_err(f.grad, g.grad) < bound


@pytest.mark.cuda
def test_split_tf32_gemms_on_the_gpu():
    # The split-TF32 arithmetic itself (the cost model may prefer exact float32 for a shape, so
    # the public op need not run it): both cuBLAS forms, within "high"'s bound and far more
    # precise than plain TF32.
    from kronegp._cuda.axis_gemm import axis_products, rotated_products

    gen = torch.Generator(device="cuda").manual_seed(14)
    for dims, t in (((64, 64, 64), 11), ((128, 61, 256), 5), ((365, 12), 3)):
        mats = [torch.randn(d, d, device="cuda", generator=gen) / math.sqrt(d) for d in dims]
        x = torch.randn(math.prod(dims), t, device="cuda", generator=gen)
        ref = reference.kron_matmul([w.double() for w in mats], x.double())
        errs = {}
        for mode in PRECISIONS:
            nat = axis_products(x, 1, dims, t, mats, mode).view(-1, t)
            rot = rotated_products(x, 1, dims, t, mats, mode).view(t, -1).mT
            errs[mode] = max(rel_err(nat, ref), rel_err(rot, ref))
            assert errs[mode] < BOUND[mode], (dims, mode, errs[mode])
        assert errs["high"] < errs["medium"] / 20, errs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_on_tensor_cores(dtype):
    # KRONEGP_FUSED_MMA: our kernels' products (fused and large-factor GEMM) on DMMA (float64) or
    # TF32 / split TF32 (float32 "medium" / "high"), every mode within its bound, outputs poisoned.
    from kronegp import device

    backend = device.backend_for(torch.empty(1, device="cuda"))
    if int(backend._device(torch.empty(1, device="cuda")).arch[3:]) < 80:
        pytest.skip("tensor-core products need sm_80")
    gen = torch.Generator(device="cuda").manual_seed(15)
    cases = [("matmul_kron", 33, ((8, 8),) * 5), ("kron_matmul", 7, ((24, 24), (3, 5), (12, 7))),
             ("kron_matmul", 1024, ((16, 16),) * 3), ("matmul_kron", 11, ((32, 31), (5, 32))),
             ("matmul_kron", 1, ((2, 3), (31, 1))),
             # large factors: the GEMM kernel's MMA variant (odd P, Q; both layouts)
             ("kron_matmul", 11, ((64, 64),) * 2), ("matmul_kron", 5, ((100, 128), (3, 5), (61, 37))),
             ("kron_matmul", 3, ((365, 72), (8, 8)))]
    modes = PRECISIONS if dtype == torch.float32 else ("highest",)
    try:
        backend.force_path, backend.fused_mma_enabled = "fused", True
        for side, rows, shapes in cases:
            fs = [torch.randn(p, q, device="cuda", dtype=dtype, generator=gen) / math.sqrt(q) for p, q in shapes]
            fd = [f.double() for f in fs]
            for mode in modes:
                if side == "kron_matmul":
                    x = torch.randn(math.prod(q for _, q in shapes), rows, device="cuda", dtype=dtype, generator=gen)
                    got = _poisoned_run(lambda: kronegp.kron_matmul(fs, x, precision=mode))
                    ref = reference.kron_matmul(fd, x.double())
                else:
                    x = torch.randn(rows, math.prod(p for p, _ in shapes), device="cuda", dtype=dtype, generator=gen)
                    got = _poisoned_run(lambda: kronegp.matmul_kron(x, fs, precision=mode))
                    ref = reference.matmul_kron(x.double(), fd)
                assert not torch.isnan(got).any(), (side, shapes, mode)
                err = rel_err(got, ref)
                bound = 1e-13 if dtype == torch.float64 else BOUND[mode]
                assert err < bound, (side, shapes, mode, err)
                if mode == "medium":
                    assert err > 1e-6, "medium ran exact: the TF32 products did not run"
    finally:
        backend.force_path, backend.fused_mma_enabled = "auto", False


def test_torchs_newer_tf32_api_is_followed_and_restored():
    # torch ≥ 2.9 raises when its legacy and newer TF32 APIs are mixed; a process that set the
    # newer one (torch.backends.cuda.matmul.fp32_precision) must get its mode read and restored
    # through that API. A subprocess: the API choice sticks to a process.
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 switch")
    code = (
        "import torch\n"
        "from kronegp.precision import cublas_tf32, default_precision\n"
        "m = torch.backends.cuda.matmul\n"
        "m.fp32_precision = 'tf32'\n"
        "assert default_precision() == 'high', default_precision()\n"
        "with cublas_tf32(False):\n"
        "    assert m.fp32_precision == 'ieee'\n"
        "assert m.fp32_precision == 'tf32'\n"
        "m.fp32_precision = 'ieee'\n"
        "assert default_precision() == 'highest'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
