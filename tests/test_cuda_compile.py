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

from kronegp import _backend  # noqa: E402
from kronegp._cuda import CudaBackend  # noqa: E402
from kronegp._cuda.compiler import compile_specs, kernel_name  # noqa: E402
from kronegp._cuda.launch import _plan, run_row_product  # noqa: E402
from kronegp._cuda.plan import FusedSpec, GemmSpec, plan_tiles  # noqa: E402
from test_cuda_kernel import BIG_CASES, CASES, call, make_inputs  # noqa: E402

SMEM_BUDGET = 100 * 1024  # what DeviceKernels plans with on sm_80/sm_90


class _FakeDevice:
    smem_budget = SMEM_BUDGET


class _RecordingBackend(CudaBackend):
    def __init__(self):
        super().__init__()
        self.specs: set = set()

    def _run(self, x, prod):
        if x.device.type == "meta":  # no pointers: the plan's specs (the launcher may vectorize)
            steps = _plan(prod.shapes, prod.m, x.element_size(), prod.in_col, prod.out_col, SMEM_BUDGET)
            self.specs.update(st.spec for st in steps)
            self.specs.update(st.spec.vectorized(prod.m, st.s, 0, 0, 1 if prod.in_col else st.k_in, prod.m if prod.in_col else 1, 0, 0, 1 if prod.out_col else st.k_out, prod.m if prod.out_col else 1) for st in steps)
        else:
            run_row_product(_FakeDevice(), prod, record=self.specs.add)


def _used_specs() -> list:
    rec = _RecordingBackend()
    orig = _backend.for_tensor
    _backend.for_tensor = lambda x: rec
    try:
        for case in BIG_CASES:  # too big to allocate here: plan through the backend on meta
            x, factors = make_inputs(case, "meta")
            getattr(rec, case.side)(*((factors, x) if case.side == "kron_matmul" else (x, factors)))
        for case in CASES:  # CPU tensors reach the real op implementation (meta ones do not)
            x, factors = make_inputs(case, "cpu", fill=False)
            if case.grad:
                x.requires_grad_(True)
                for f in factors:
                    f.requires_grad_(True)
            out = call(case, x, factors)
            if case.grad:
                torch.autograd.grad(out, [x, *factors], torch.ones_like(out))
    finally:
        _backend.for_tensor = orig
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
    assert kinds == {FusedSpec, GemmSpec}
    assert len(used_specs) > 20


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
