"""CI on a CPU: every kernel specialisation the GPU tests launch compiles with NVRTC for
sm_80 and sm_90 (compile only, no GPU needed).

The specs are found by running every case of ``tests/test_cuda_kernel.py`` (forward, and
backward for the gradient cases) on ``meta`` tensors through the real CUDA backend with its
launcher replaced by a recorder: the same planning code, so the list cannot drift from what
the GPU tests use.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")

from kronegp import device  # noqa: E402
from kronegp._cuda import CudaBackend  # noqa: E402
from kronegp._cuda.compiler import compile_specs, kernel_name  # noqa: E402
from kronegp._cuda.launch import _plan, run_row_product  # noqa: E402
from kronegp._cuda.plan import TRANSPOSE_MAX_D, FusedSpec, GemmSpec, TransposeSpec, plan_tiles  # noqa: E402
from test_cuda_kernel import BIG_CASES, CASES, PATH_CASES, call, make_inputs  # noqa: E402

SMEM_BUDGET = 100 * 1024  # what DeviceKernels plans with on sm_80/sm_90


class _FakeDevice:
    smem_budget = SMEM_BUDGET


class _RecordingBackend(CudaBackend):
    def __init__(self):
        super().__init__()
        self.specs: set = set()

    def _transpose(self, src, dst, n, d, batch):
        if d <= TRANSPOSE_MAX_D:
            self.specs.add(TransposeSpec(src.element_size(), d))
        super()._transpose(src, dst, n, d, batch)  # CPU tensors: torch's copy

    def _run(self, x, prod, fast_key=None):
        if x.device.type == "meta":  # no pointers: the plan's specs (the launcher may vectorize)
            steps = _plan(prod.shapes, prod.m, x.element_size(), prod.in_col, prod.out_col, SMEM_BUDGET)
            self.specs.update(st.spec for st in steps)
            self.specs.update(st.spec.vectorized(prod.m, st.s, 0, 0, 1 if prod.in_col else st.k_in, prod.m if prod.in_col else 1, 0, 0, 1 if prod.out_col else st.k_out, prod.m if prod.out_col else 1) for st in steps)
        else:
            run_row_product(_FakeDevice(), prod, record=self.specs.add)


def _used_specs() -> list:
    rec = _RecordingBackend()
    orig = device.backend_for
    device.backend_for = lambda x: rec
    try:
        for case in BIG_CASES:  # too big to allocate here: plan through the backend on meta
            x, factors = make_inputs(case, "meta")
            getattr(rec, case.side)(*((factors, x) if case.side == "kron_matmul" else (x, factors)))
        # CPU tensors reach the real op implementation (meta ones do not); the cost model picks
        # the path as on the GPU, and test_every_path_matches_reference pins the fused path
        # for PATH_CASES, so those are recorded with the fused path pinned too.
        for force, cases in (("auto", CASES), ("fused", PATH_CASES), ("axis_gemm_t", PATH_CASES)):
            rec.force_path = force
            for case in cases:
                x, factors = make_inputs(case, "cpu", fill=False)
                if case.grad:
                    x.requires_grad_(True)
                    for f in factors:
                        f.requires_grad_(True)
                out = call(case, x, factors)
                if case.grad:
                    torch.autograd.grad(out, [x, *factors], torch.ones_like(out))
    finally:
        rec.force_path = "auto"
        device.backend_for = orig
    return sorted(rec.specs, key=repr)


def _compile_chunk(args):
    specs, arch = args
    named = [(kernel_name(s), s) for s in specs]
    return len(compile_specs(named, arch))


@pytest.fixture(scope="module")
def used_specs():
    return _used_specs()


def test_recorder_sees_both_kernels(used_specs):
    kinds = {type(s) for s in used_specs}
    assert kinds == {FusedSpec, GemmSpec, TransposeSpec}
    assert len(used_specs) > 20


@pytest.mark.slow  # every variant through NVRTC: minutes on a CPU (CI runs it)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_used_spec_compiles(used_specs, arch, tmp_path, monkeypatch):
    # A fresh cache: this test is about compiling, not about finding old cubins.
    monkeypatch.setenv("KRONEGP_CACHE_DIR", str(tmp_path))
    workers = max(1, min(4, os.cpu_count() or 1))
    chunk = math.ceil(len(used_specs) / (workers * 2))
    chunks = [(used_specs[i : i + chunk], arch) for i in range(0, len(used_specs), chunk)]
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_compile_chunk, chunks))
    assert all(n > 0 for n in sizes)


def test_plan_covers_every_factor_once():
    # Fused groups are consecutive, cover every factor once, last ones first.
    shapes = [(3, 5), (12, 7), (365, 61), (8, 8), (8, 8), (2, 2), (64, 3), (16, 16)]
    for itemsize in (4, 8):
        for col in (False, True):
            steps = plan_tiles(shapes, 11, itemsize, col, col)
            covered = []
            for st in steps:
                covered = list(range(st.first, st.first + st.count)) + covered
                assert st.k_in == st.s * st.spec.PG
                assert st.spec.smem_bytes <= 100 * 1024
            assert covered == list(range(len(shapes)))
            assert steps[0].k_in == math.prod(p for p, _ in shapes)
            assert steps[-1].k_out == math.prod(q for _, q in shapes)


def test_fused_tiles_move_whole_sectors_and_stay_small():
    # Every fused tile spans at least one 32-byte sector of output where the shape allows (the
    # tile search must not stop at its element target first: (1024, 32^3) once got 16-byte runs),
    # and the default tiles leave room for 4 blocks of the fused kernel per SM (~40 KB each).
    for itemsize in (4, 8):
        run = 32 // itemsize
        for sizes, m, passes in (([8] * 6, 1024, 2), ([16] * 4, 1024, 2), ([32] * 3, 1024, 2), ([16] * 6, 16, 3),
                                 ([3, 12, 5], 7, 1)):
            for col in (False, True):
                steps = plan_tiles([(p, p) for p in sizes], m, itemsize, col, col)
                # as few passes as the shared memory allows: a group whose tile reaches the
                # element target before it is sector-wide must still be fused
                assert len(steps) == passes, (sizes, itemsize, col, steps)
                for st in steps:
                    if st.spec.kind != "fused":
                        continue
                    wide = st.spec.TM if col else st.spec.TS
                    assert wide >= min(run, m if col else st.s), (sizes, itemsize, col, st.spec)
                    if max(sizes) <= 16:
                        assert st.spec.smem_bytes <= 76 * 1024, st.spec
                        if not col:
                            assert st.spec.smem_bytes <= 40 * 1024, st.spec


def test_cost_model_picks_the_regime():
    # CPU-only: the path choice is pure planning. Memory-bound runs of small factors stay on the
    # fused kernel (fewer passes), compute-bound large factors go to cuBLAS, and a kron_matmul
    # with few columns takes the transposed row form when the factors are large.
    from kronegp._cuda.plan import choose_path

    def path(sizes, m, itemsize, col):
        return choose_path([(p, p) for p in sizes], m, itemsize, col, col).path

    for itemsize in (4, 8):
        for col in (False, True):
            assert path([8] * 6, 1024, itemsize, col) == "fused"
            assert path([16] * 5, 320, itemsize, col) == "fused"
            assert path([64] * 3, 1024, itemsize, col) == "axis_gemm"
            assert path([128] * 2, 1024, itemsize, col) == "axis_gemm"
    # host-bound GP shapes (RESULTS.md round 3): a 72-wide factor with two small ones stays on our
    # kernels (three cuBLAS calls cost ~3× the host time); 64^3 goes to cuBLAS (our GEMM is slower)
    for itemsize in (4, 8):
        for col in (False, True):
            assert path([24, 24, 72], 11, itemsize, col) == "fused"
        assert path([64] * 3, 11, itemsize, False) == "axis_gemm"
        # kron_matmul: natural order (the rotating form's transpose call costs more host time than
        # its GEMMs save here: H100 0.152 vs 0.158 ms fp32)
        assert choose_path([(64, 64)] * 3, 11, itemsize, False, True).path == "axis_gemm"
    assert path([256] * 3, 11, 4, True) == "axis_gemm_t"
    assert path([256] * 3, 11, 4, False) == "axis_gemm"
    # operands the cuBLAS path cannot take (batched factors, strided x, TF32) stay fused
    c = choose_path([(256, 256)] * 2, 11, 4, False, False, axis_ok=False)
    assert c.path == "fused" and c.predicted_axis_s == math.inf


def test_cost_model_prices_a_batched_kron_matmul_as_its_products():
    # A batched kron_matmul, x (B, ΠQ, T), is B products of T columns: the batch leads the grid
    # axes, so the natural-order path's last-axis GEMMs keep C = T (the 11-column GEMMs the rotating
    # form avoids), whatever B. Counting the batch as B·T trailing columns (the model before issue
    # 23) priced the natural order as wide GEMMs and sent the sharded 512³ kron_matmul's trailing
    # step there. With the per-call host costs zeroed, every path's prediction for the batched call
    # is B times one product's (to 2 %: a batched GEMM reads the factor once, not B times), and
    # the choice is the same.
    from kronegp._cuda.plan import Rates, choose_path

    free = Rates(launch_s=0.0, gemm_call_s=0.0, transpose_call_s=0.0, elementwise_call_s=0.0)
    cases = [(((512, 512),) * 2, 11, 256, 4), (((256, 256),) * 3, 11, 8, 8), (((64, 64),) * 3, 4, 16, 4),
             (((24, 24), (24, 24), (72, 72)), 11, 5, 8), (((128, 96), (64, 128)), 32, 3, 4)]
    for shapes, t, b, itemsize in cases:
        one = choose_path(shapes, t, itemsize, False, True, rates=free)
        many = choose_path(shapes, b * t, itemsize, False, True, rates=free, batch=b)
        for attr in ("predicted_fused_s", "predicted_axis_s", "predicted_axis_t_s"):
            assert getattr(many, attr) == pytest.approx(b * getattr(one, attr), rel=0.02), (shapes, b, attr)
        assert many.path == one.path, (shapes, b)
    # the distributed trailing step's shape (512³, G = 2): the rotating form, as for one product
    shapes = ((512, 512),) * 2
    c = choose_path(shapes, 256 * 11, 4, False, True, batch=256)
    assert c.path == "axis_gemm_t" and c.predicted_axis_s > 2 * c.predicted_axis_t_s
    # matmul_kron's batch is more rows of the same GEMMs: it changes nothing there
    rows = choose_path(shapes, 256 * 11, 4, False, False)
    assert choose_path(shapes, 256 * 11, 4, False, False, batch=256).predicted_axis_s == rows.predicted_axis_s
    with pytest.raises(ValueError, match="batch must be a positive divisor of the rows m = 22, got 3"):
        choose_path(shapes, 22, 4, False, True, batch=3)


def test_axis_gemm_path_on_cpu_tensors_matches_dense():
    # The cuBLAS path is plain torch on strided views, so it runs (on the CPU's BLAS) here too:
    # every formulation (first axis, middle batch, last axis, transposed form), P ≠ Q, batches.
    from kronegp import reference
    from kronegp._cuda import CudaBackend

    gen = torch.Generator().manual_seed(5)
    for force in ("axis_gemm", "axis_gemm_t"):
        backend = CudaBackend(force_path=force)
        for shapes, rows, xb in [(((3, 5), (12, 7), (61, 64)), 11, ()), (((8, 8),) * 3, 1, ()),
                                 (((5, 3), (2, 9)), 4, (2, 3)), (((64, 61),), 3, ())]:
            for dt in (torch.float32, torch.float64):
                fs = [torch.randn(p, q, dtype=dt, generator=gen) for p, q in shapes]
                fd = [f.double() for f in fs]
                kp, kq = math.prod(p for p, _ in shapes), math.prod(q for _, q in shapes)
                x = torch.randn(*xb, rows, kp, dtype=dt, generator=gen)
                x2 = torch.randn(*xb, kq, rows, dtype=dt, generator=gen)
                assert backend.choice("matmul_kron", x, fs).path == "axis_gemm"
                expect = force if rows > 1 else "axis_gemm"
                assert backend.choice("kron_matmul", x2, fs).path == expect
                tol = 1e-5 if dt == torch.float32 else 1e-12
                for got, ref in ((backend.matmul_kron(x, fs), reference.matmul_kron(x.double(), fd)),
                                 (backend.kron_matmul(fs, x2), reference.kron_matmul(fd, x2.double()))):
                    assert got.shape == ref.shape and got.dtype == dt
                    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_batched_kron_matmul_auto_path_on_cpu_tensors_matches_reference():
    # The sharded kron_matmul's trailing step in small: a batch of 4 products of 256² × 11. The
    # model now picks the rotating form for it (batch leading, B blocks of T rows to transpose);
    # the first call plans it and the second replays its launch record, both right.
    from kronegp import reference
    from kronegp._cuda import CudaBackend

    backend = CudaBackend(force_path="auto", autotune=False)
    gen = torch.Generator().manual_seed(6)
    for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        fs = [torch.randn(256, 256, dtype=dt, generator=gen) / 16 for _ in range(2)]
        x = torch.randn(4, 256 * 256, 11, dtype=dt, generator=gen)
        assert backend.path_taken("kron_matmul", x, fs) == "axis_gemm_t"
        ref = reference.kron_matmul([f.double() for f in fs], x.double())
        for _ in range(2):
            got = backend.kron_matmul(fs, x)
            assert got.shape == ref.shape and ((got.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_cg_step_kernel_compiles(arch, tmp_path, monkeypatch):
    """The fused block-CG steps (kronegp._cuda.cg): every mode in both dtypes and layouts."""
    from kronegp._cuda.cg import CgSpec

    monkeypatch.setenv("KRONEGP_CACHE_DIR", str(tmp_path))
    specs = [CgSpec(itemsize, mode, rows) for itemsize in (4, 8) for mode in ("dot", "update", "direction") for rows in (False, True)]
    assert len(compile_specs([(kernel_name(s), s) for s in specs], arch)) > 0


#: Matrix sizes of the Jacobi eigensolver kernels the GPU tests and GridGP use (the largest:
#: what fits in an H100's shared memory, and an A100's), and the thread layouts they pin.
EIGH_SIZES = (1, 2, 3, 5, 9, 12, 16, 24, 31, 40, 61, 64, 72, 80, 100, 127, 128, 142, 168)
EIGH_LANES = (0, 4, 16, 32)


@pytest.mark.slow  # every variant through NVRTC: minutes on a CPU (CI runs it)
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_jacobi_eigh_kernel_compiles(arch, tmp_path, monkeypatch):
    """The Jacobi eigensolver (kronegp._cuda.eigh) for the sizes and layouts in use, both dtypes."""
    from kronegp._cuda.eigh import EighSpec

    monkeypatch.setenv("KRONEGP_CACHE_DIR", str(tmp_path))
    specs = sorted({EighSpec(itemsize, n, lanes) for itemsize in (4, 8) for n in EIGH_SIZES for lanes in EIGH_LANES}, key=repr)
    workers = max(1, min(4, os.cpu_count() or 1))
    chunk = math.ceil(len(specs) / (workers * 2))
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_compile_chunk, [(specs[i : i + chunk], arch) for i in range(0, len(specs), chunk)]))
    assert all(n > 0 for n in sizes)


def test_jacobi_eigh_sizes_fit_in_shared_memory():
    from kronegp._cuda.eigh import EighSpec, max_rows

    for optin, rows in ((232448, 168), (166912, 142)):  # H100 / A100 opt-in shared memory per block
        assert max_rows(optin) == rows
        assert EighSpec(8, rows).smem_bytes < optin < EighSpec(8, rows + 1).smem_bytes + 512
        assert rows in EIGH_SIZES


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tensor_core_fused_specs_compile(arch, tmp_path, monkeypatch):
    # The fused and GEMM kernels' tensor-core products (FusedSpec/GemmSpec.mma: fp64 DMMA, TF32, split TF32, opt-in
    # with KRONEGP_FUSED_MMA; SASS checked: DMMA.884 / HMMA.1688.F32.TF32, no local memory) for the
    # tensor-core cases of tests/test_precision.py: the planner's
    # specs for their shapes, both layouts, with the launcher's vectorised variants.
    monkeypatch.setenv("KRONEGP_CACHE_DIR", str(tmp_path))
    specs = set()
    for itemsize, mmas in ((8, (0, 1)), (4, (0, 1, 3))):  # with FMA (0) beside them
        for mma in mmas:
            for shapes, m in ((((8, 8),) * 5, 33), (((24, 24), (3, 5), (12, 7)), 7), (((16, 16),) * 3, 1024),
                              (((32, 31), (5, 32)), 11), (((2, 3), (31, 1)), 1), (((64, 64),) * 2, 11),
                              (((100, 128), (3, 5), (61, 365)), 4)):
                for col in (False, True):
                    for st in plan_tiles(shapes, m, itemsize, col, col, SMEM_BUDGET, mma=mma):
                        if st.spec.kind == "gemm":  # large factors: the GEMM kernel's MMA variant
                            specs.add(st.spec)
                        if st.spec.kind == "fused":
                            assert st.spec.mma == mma
                            specs.add(st.spec)
                            specs.add(st.spec.vectorized(m, st.s, 0, 0, 1 if col else st.k_in, m if col else 1,
                                                         0, 0, 1 if col else st.k_out, m if col else 1))
    specs = sorted(specs, key=repr)
    assert compile_specs([(kernel_name(s), s) for s in specs], arch)
