"""The fused CUDA kernels against the pure-torch reference, on the GPU (marker ``cuda``).

Every case builds fresh random inputs, poisons the memory the caching allocator will hand to
the output with NaN, runs the public op (so the backend is the one users get), and compares
with :mod:`kronegp.reference` evaluated in float64 on the same GPU by relative error.

The case list is generated (seeded) here and reused by ``tests/test_cuda_compile.py``, which
compiles every kernel specialisation these cases use on a CPU-only machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

import kronegp
from kronegp import reference
from _helpers import rel_err

SIZES = [1, 2, 3, 5, 8, 12, 16, 31, 32, 61, 64, 100, 128, 256, 365, 1024]
SMALL = [1, 2, 3, 5, 8, 12, 16]
ROWS = [1, 3, 11, 16, 1024]
MAX_ELEMS = 1 << 22  # per tensor of a case, so the whole list runs in seconds
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@dataclass(frozen=True)
class Case:
    side: str  # "kron_matmul": (⊗F)·x with x (…, ΠQ, T); "matmul_kron": x·(⊗F) with x (…, M, ΠP)
    dtype: str
    shapes: tuple[tuple[int, int], ...]
    rows: int  # T for kron_matmul, M for matmul_kron
    x_batch: tuple[int, ...] = ()
    f_batch: tuple[tuple[int, ...], ...] = field(default=())  # per factor, () if none
    x_layout: str = "contiguous"  # or "transposed" (a .mT view) or "strided" (every other column)
    f_transposed: bool = False  # factors given as .mT views
    grad: bool = False

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def __str__(self):
        shp = "x".join(f"{p}:{q}" for p, q in self.shapes)
        extra = []
        if self.x_batch or any(self.f_batch):
            extra.append(f"b{self.x_batch}{self.f_batch}")
        if self.x_layout != "contiguous":
            extra.append(self.x_layout)
        if self.f_transposed:
            extra.append("fT")
        if self.grad:
            extra.append("grad")
        return f"{self.side}-{self.dtype}-r{self.rows}-{shp}" + ("-" + "-".join(extra) if extra else "")


def _size_ok(shapes, rows, batch=1) -> bool:
    # bounds every intermediate: each axis is at most max(P, Q) long
    return rows * batch * math.prod(max(p, q) for p, q in shapes) <= MAX_ELEMS


def kernel_cases() -> list[Case]:
    rng = random.Random(20261124)
    sides = ("kron_matmul", "matmul_kron")
    dtypes = ("float32", "float64")
    cases: list[Case] = []
    # every size as one factor, P ≠ Q, both sides and dtypes, every row count
    for i, p in enumerate(SIZES):
        for j in range(2):
            q = SIZES[(i * 7 + 3 + 5 * j) % len(SIZES)]
            rows = ROWS[(i + j) % len(ROWS)]
            while not _size_ok([(p, q)], rows):
                rows = ROWS[ROWS.index(rows) - 1]
            cases.append(Case(sides[(i + j) % 2], dtypes[(i // 2 + j) % 2], ((p, q),), rows))
    # random products of 1..8 mixed factors
    while len(cases) < 32 + 48:
        n = rng.randint(1, 8)
        shapes = tuple(
            (rng.choice(SMALL if rng.random() < 0.75 else SIZES), rng.choice(SMALL if rng.random() < 0.75 else SIZES))
            for _ in range(n)
        )
        rows = rng.choice(ROWS)
        if not _size_ok(shapes, rows) or math.prod(max(p, q) for p, q in shapes) < 2:
            continue
        cases.append(
            Case(
                rng.choice(sides),
                rng.choice(dtypes),
                shapes,
                rows,
                x_layout=rng.choice(["contiguous", "contiguous", "transposed", "strided"]),
                f_transposed=rng.random() < 0.3,
            )
        )
    # square powers: the fused paths of the benchmark shapes at small M
    for shapes in ([(8, 8)] * 6, [(16, 16)] * 4, [(32, 32)] * 3, [(8, 8)] * 7, [(16, 16)] * 5):
        for side in sides:
            for dt in dtypes:
                cases.append(Case(side, dt, tuple(shapes), 3 if dt == "float64" else 16))
    # batches: x batched, factors broadcast against it
    cases += [
        Case("matmul_kron", "float32", ((3, 5), (8, 8), (12, 2)), 11, (2, 3), ((3,), (1, 1), (2, 1))),
        Case("kron_matmul", "float64", ((3, 5), (8, 8), (12, 2)), 11, (2, 3), ((3,), (1, 1), (2, 1))),
        Case("kron_matmul", "float32", ((61, 64), (5, 3)), 16, (4,), ((4,), ())),
        Case("matmul_kron", "float64", ((61, 64), (5, 3)), 3, (), ((2, 1), (3,))),
        Case("kron_matmul", "float32", ((16, 16), (16, 16)), 1, (3,), ((), ())),
    ]
    # gradients: x and every factor
    cases += [
        Case("kron_matmul", "float64", ((3, 5), (12, 8), (7, 6)), 11, grad=True),
        Case("matmul_kron", "float64", ((3, 5), (12, 8), (7, 6)), 11, grad=True),
        Case("kron_matmul", "float32", ((8, 8), (64, 61), (16, 16)), 16, grad=True),
        Case("matmul_kron", "float32", ((8, 8), (64, 61), (16, 16)), 3, grad=True),
        Case("matmul_kron", "float64", ((2, 3), (5, 5)), 4, (2,), ((2,), ()), grad=True),
        Case("kron_matmul", "float32", ((100, 31), (3, 12)), 1, grad=True),
    ]
    return cases


CASES = kernel_cases()


def make_inputs(case: Case, device, generator=None, fill: bool = True):
    """Random ``(x, factors)`` for ``case`` on ``device``, with the case's layouts.

    ``fill=False`` leaves them uninitialised (the compile test only needs their shapes)."""
    dt = case.torch_dtype
    fb = case.f_batch or tuple(() for _ in case.shapes)

    def randn(*shape):
        if not fill or str(device) == "meta":
            return torch.empty(shape, dtype=dt, device=device)
        return torch.randn(*shape, dtype=dt, device=device, generator=generator)

    factors = []
    for (p, q), b in zip(case.shapes, fb):
        f = randn(*b, q, p).mT if case.f_transposed else randn(*b, p, q)
        factors.append(f)
    if case.side == "kron_matmul":
        inner = (math.prod(q for _, q in case.shapes), case.rows)
    else:
        inner = (case.rows, math.prod(p for p, _ in case.shapes))
    if case.x_layout == "transposed":
        x = randn(*case.x_batch, inner[1], inner[0]).mT
    elif case.x_layout == "strided":
        x = randn(*case.x_batch, inner[0], 2 * inner[1])[..., ::2]
    else:
        x = randn(*case.x_batch, *inner)
    return x, factors


def call(case: Case, x, factors):
    if case.side == "kron_matmul":
        return kronegp.kron_matmul(factors, x)
    return kronegp.matmul_kron(x, factors)


def call_reference(case: Case, x, factors):
    if case.side == "kron_matmul":
        return reference.kron_matmul(factors, x)
    return reference.matmul_kron(x, factors)


def poison(nbytes: int, device=None) -> None:
    """Fill memory the caching allocator will hand out next with NaN (then free it)."""
    n = max(1, nbytes // 4 + 1024)
    block = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
    del block


def _expected_bytes(case: Case) -> int:
    p_tot = math.prod(p for p, _ in case.shapes)
    q_tot = math.prod(q for _, q in case.shapes)
    return 2 * case.rows * max(p_tot, q_tot) * max(1, math.prod(case.x_batch)) * 8 * 4


def _check_case(case: Case, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x, factors = make_inputs(case, "cuda", gen)
    poison(_expected_bytes(case), "cuda")
    out = call(case, x, factors)
    torch.cuda.synchronize()
    ref = call_reference(case, x.double(), [f.double() for f in factors])
    assert out.shape == ref.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all(), f"{case}: unwritten (NaN) output elements"
    err = rel_err(out, ref)
    assert err <= TOL[x.dtype], f"{case}: relative error {err:.3g} > {TOL[x.dtype]:.0e}"


@pytest.mark.cuda
def test_backend_is_the_kernel():
    info = kronegp.backend_info()
    assert info["cuda"] == "kernel", info


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CASES if not c.grad], ids=str)
def test_forward_matches_reference(case):
    _check_case(case)


@pytest.mark.cuda
@pytest.mark.parametrize("case", [c for c in CASES if c.grad], ids=str)
def test_gradients_match_reference(case):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, factors = make_inputs(case, "cuda", gen)
    w = None
    leaves = [x.detach().clone().requires_grad_(True)] + [f.detach().clone().requires_grad_(True) for f in factors]
    out = call(case, leaves[0], leaves[1:])
    w = torch.randn(out.shape, dtype=out.dtype, device="cuda", generator=gen)
    poison(_expected_bytes(case), "cuda")
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = call_reference(case, ref_leaves[0], ref_leaves[1:])
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), ref_leaves)
    tol = 10 * TOL[x.dtype]
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all(), f"{case}: grad {i} has NaN"
        err = rel_err(g, r)
        assert err <= tol, f"{case}: grad {i} relative error {err:.3g} > {tol:.0e}"


PATHS = ("fused", "axis_gemm", "axis_gemm_t")
#: every third forward case, run with each path pinned (auto picks one per case above)
PATH_CASES = [c for c in CASES if not c.grad][::3]


@pytest.mark.cuda
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_reference(path):
    from kronegp import device

    backend = device.load_cuda()[0]
    backend.force_path = path
    try:
        for case in PATH_CASES:
            _check_case(case, seed=7)
    finally:
        backend.force_path = "auto"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_kron_matmul_takes_the_rotating_form(dtype):
    # The trailing step of the sharded kron_matmul (kronegp.distributed) is a batched call
    # (L_r, R, T): the cost model now prices its batch as leading (issue 23) and picks the rotating
    # form, whose transpose runs B blocks of T rows; the result must match the reference.
    from kronegp import device

    backend = device.load_cuda()[0]
    gen = torch.Generator(device="cuda").manual_seed(9)
    factors = [torch.randn(256, 256, dtype=dtype, device="cuda", generator=gen) / 16 for _ in range(2)]
    x = torch.randn(16, 256 * 256, 11, dtype=dtype, device="cuda", generator=gen)
    assert backend.path_taken("kron_matmul", x, factors) == "axis_gemm_t"
    out = kronegp.kron_matmul(factors, x)
    ref = reference.kron_matmul([f.double() for f in factors], x.double())
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.0e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transpose_kernel_moves_every_element(dtype):
    # The wide → tall transpose of the rotating kron_matmul form: a pure copy, so the result
    # must equal the input's transpose bit for bit (NaN-poisoned outputs catch unwritten ones).
    from kronegp import device

    backend = device.load_cuda()[0]
    gen = torch.Generator(device="cuda").manual_seed(4)
    for n, d, b in [(1, 1, 1), (1000, 11, 1), (129, 32, 3), (77, 5, 2), (4099, 16, 1)]:
        wide = torch.randn(b, d, n, dtype=dtype, device="cuda", generator=gen)
        tall = torch.full((b, n, d), float("nan"), dtype=dtype, device="cuda")
        backend._transpose(wide, tall, n, d, b)
        torch.cuda.synchronize()
        assert torch.equal(tall, wide.mT), (n, d, b)


@pytest.mark.cuda
def test_non_default_stream_and_device_index():
    case = Case("matmul_kron", "float32", ((8, 8), (12, 5), (16, 16)), 1024)
    gen = torch.Generator(device="cuda").manual_seed(2)
    with torch.cuda.device(0):
        x, factors = make_inputs(case, "cuda:0", gen)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            poison(_expected_bytes(case), "cuda:0")
            out = kronegp.matmul_kron(x, factors)
            # a second product queued behind the first on the same side stream
            out2 = kronegp.kron_matmul(factors, out.mT)
        stream.synchronize()
        ref = reference.matmul_kron(x.double(), [f.double() for f in factors])
        ref2 = reference.kron_matmul([f.double() for f in factors], ref.mT)
        assert rel_err(out, ref) <= 1e-5
        assert rel_err(out2, ref2) <= 1e-5


@pytest.mark.cuda
def test_launches_go_to_torchs_current_stream():
    # the raw stream handle the launcher reads is torch's current stream, default or not
    from kronegp._cuda.launch import current_stream_handle

    dev = torch.device("cuda", 0)
    assert current_stream_handle(dev) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(side):
        assert current_stream_handle(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream


BIG_CASES = [
    # more than 2^31 elements of x: 64-bit indexing, K = 2^28
    Case("matmul_kron", "float32", ((16, 16),) * 7, 9),
    Case("kron_matmul", "float32", ((16, 16),) * 7, 9),
]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("case", BIG_CASES, ids=str)
def test_more_than_2_31_elements(case):
    torch.cuda.empty_cache()  # earlier tests' cached blocks would count as used
    free, _ = torch.cuda.mem_get_info()
    k = math.prod(p for p, _ in case.shapes)
    need = 4 * case.rows * k * 4 + 8 * k * 2
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, found {free / 2**30:.0f}")
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, factors = make_inputs(case, "cuda", gen)
    assert x.numel() > 2**31
    out = call(case, x, factors)
    torch.cuda.synchronize()
    fd = [f.double() for f in factors]
    for r in (0, case.rows - 1):  # the first and the last row (beyond element 2^31)
        if case.side == "kron_matmul":
            ref = reference.kron_matmul(fd, x[:, r : r + 1].double())
            got = out[:, r : r + 1]
        else:
            ref = reference.matmul_kron(x[r : r + 1].double(), fd)
            got = out[r : r + 1]
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= 1e-5
        del ref


_MEMCHECK_SCRIPT = """
import math, sys, torch
sys.path.insert(0, {tests!r})
from kronegp import device
from test_cuda_kernel import CASES, call, make_inputs
backend = device.load_cuda()[0]
backend.force_path = "fused"
small = [c for c in CASES if not c.grad and c.rows * max(math.prod(p for p, _ in c.shapes), math.prod(q for _, q in c.shapes)) * max(1, math.prod(c.x_batch)) <= 1 << 21]
for case in small:
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, factors = make_inputs(case, "cuda", gen)
    call(case, x, factors)
torch.cuda.synchronize()
print("cases run:", len(small))
"""


@pytest.mark.cuda
def test_fused_kernels_stay_in_bounds_under_memcheck(tmp_path):
    """Every fused kernel of the case list (up to 2M elements) under compute-sanitizer's memcheck:
    an access outside the operands fails even where the memory behind them happens to be mapped
    (a partial last batch of the row-layout tile walk once read the rows after a tile; results
    were right, and it faulted only when the operand ended a memory segment)."""
    import os
    import shutil
    import subprocess
    import sys

    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        pytest.skip("compute-sanitizer (CUDA toolkit) not found")
    script = tmp_path / "memcheck_cases.py"
    script.write_text(_MEMCHECK_SCRIPT.format(tests=os.path.dirname(__file__)))
    # Without torch's caching allocator every tensor is its own cudaMalloc, whose exact bounds
    # memcheck knows (inside a cached segment a stray read lands on other, valid memory).
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    proc = subprocess.run(
        [tool, "--tool", "memcheck", "--report-api-errors", "no", "--error-exitcode", "99", sys.executable, str(script)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cases run:" in out and "ERROR SUMMARY: 0 errors" in out, out[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["fused", "axis_gemm", "axis_gemm_t"])
def test_repeated_calls_replay_their_record_right(path):
    # The first call of a signature is checked and planned; the repeats skip the checks, find the
    # record by the door's remembered signature and only patch pointers: fresh data each time,
    # poisoned outputs, both sides, a vector x.
    from kronegp import device

    backend = device.load_cuda()[0]
    backend.force_path = path
    try:
        gen = torch.Generator(device="cuda").manual_seed(21)
        fs = [torch.randn(p, q, device="cuda", generator=gen) for p, q in ((8, 8), (12, 5), (16, 16))]
        fd = [f.double() for f in fs]
        for rep in range(4):
            x = torch.randn(5 * 8 * 16, 11, device="cuda", generator=gen)
            poison(4 * 8 * 12 * 16 * 11 * 3, "cuda")
            assert rel_err(kronegp.kron_matmul(fs, x), reference.kron_matmul(fd, x.double())) <= 1e-5
            w = torch.randn(3, 8 * 12 * 16, device="cuda", generator=gen)
            assert rel_err(kronegp.matmul_kron(w, fs), reference.matmul_kron(w.double(), fd)) <= 1e-5
            v = torch.randn(5 * 8 * 16, device="cuda", generator=gen)
            assert rel_err(kronegp.kron_matmul(fs, v), reference.kron_matmul(fd, v[:, None].double())[:, 0]) <= 1e-5
    finally:
        backend.force_path = "auto"


@pytest.mark.cuda
def test_threads_replaying_one_signature_each_get_their_own_result():
    # Fused launches patch per-thread argument blocks (ctypes releases the GIL inside
    # cuLaunchKernel): several threads calling one signature at once must not mix their pointers.
    import threading

    from kronegp import device

    backend = device.load_cuda()[0]
    backend.force_path = "fused"
    try:
        gen = torch.Generator(device="cuda").manual_seed(22)
        fs = [torch.randn(8, 8, device="cuda", generator=gen) for _ in range(6)]
        fd = [f.double() for f in fs]
        kronegp.matmul_kron(torch.randn(4, 8**6, device="cuda"), fs)  # plan it once
        xs = [torch.randn(4, 8**6, device="cuda", generator=gen) for _ in range(4)]
        outs: dict = {}

        def work(i):
            for _ in range(20):
                outs[i] = kronegp.matmul_kron(xs[i], fs)
            torch.cuda.current_stream().synchronize()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        torch.cuda.synchronize()
        for i, x in enumerate(xs):
            assert rel_err(outs[i], reference.matmul_kron(x.double(), fd)) <= 1e-5, i
    finally:
        backend.force_path = "auto"
