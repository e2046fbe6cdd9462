"""The fused path's per-call host work on a CPU: what ``execute_program`` hands ``cuLaunchKernel``.

The GPU work is stubbed (no context, every kernel handle 0, ``cuLaunchKernel`` a recorder that
copies each launch's argument block out of the kernel-parameter array it was given), so the
pointer patching of cached programs — per-thread argument blocks written in place, the
intermediates' block, batch offsets — is checked here; the GPU tests check the numbers.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from pathlib import Path

import pytest
import torch

from kronegp._cuda import CudaBackend, launch
from kronegp._cuda.launch import KronArgs

_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, _BENCHMARKS)
try:
    from host_overhead import StubDevice  # the device stub the host-overhead benchmark times with
finally:
    sys.path.remove(_BENCHMARKS)


STREAM = 0x5000


@pytest.fixture
def recorded(monkeypatch):
    """A fused-path CudaBackend on CPU tensors and the list of launches it makes: ``(grid, threads,
    smem, stream, KronArgs copy)``."""
    launches = []

    def fake_launch(fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        # params: the kernel-parameter array's slot for this launch (a void* to the argument block)
        block = ctypes.c_void_p.from_address(params.value).value
        launches.append(((gx, gy, gz), bx, smem, stream.value, KronArgs.from_buffer_copy(KronArgs.from_address(block))))
        return 0

    monkeypatch.setattr(launch, "_C_LAUNCH", fake_launch)
    monkeypatch.setattr(launch, "current_stream_handle", lambda device: STREAM)
    backend = CudaBackend(force_path="fused")
    dev = StubDevice()
    backend._device = lambda t: dev
    return backend, launches


def _program(backend):
    (record,) = backend._records.values()
    return record.prog


def _template_fields(args: KronArgs) -> tuple:
    return (args.xb, args.xm, args.xk, args.yb, args.ym, args.yk, tuple(args.fb), tuple(args.f0), tuple(args.f1),
            args.M, args.S)


def _check_call(prog, calls, x, out, factors):
    """Every launch of one call: its pointers are the operands' (plus the build's byte offsets),
    its other fields the template's, and the steps chain through the intermediates."""
    assert len(calls) == len(prog.launches)
    operands = [x, out, *factors]
    tmps = set()
    for (grid, nt, smem, stream, args), lz in zip(calls, prog.launches):
        assert grid == lz.grid and nt == lz.spec.NT and smem == lz.spec.smem_bytes and stream == STREAM
        assert _template_fields(args) == _template_fields(lz.template)
        for field, slot, t, off in lz.patches:
            got = {"x": args.x, "y": args.y, "f": args.f[slot]}[field]
            if t < len(operands):
                assert got == operands[t].data_ptr() + off, (field, slot)
            else:
                tmps.add(got - off)
    # one intermediate block: its parts tmp_bytes apart
    assert len(tmps) == prog.n_tmps
    if prog.n_tmps == 2:
        lo, hi = sorted(tmps)
        assert hi - lo == prog.tmp_bytes
    # unbatched: step j writes where step j + 1 reads
    for (*_, a), (*_, b) in zip(calls, calls[1:]):
        assert a.y == b.x and a.y not in (x.data_ptr(), out.data_ptr())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_fused_calls_patch_every_pointer(recorded, dtype):
    backend, calls = recorded
    gen = torch.Generator().manual_seed(3)
    sizes = [24, 24, 72]
    fs = [torch.randn(p, p, dtype=dtype, generator=gen) for p in sizes]
    for rep in range(3):  # the first call plans, the others replay the record
        x = torch.randn(math.prod(sizes), 11, dtype=dtype, generator=gen)
        calls.clear()
        out = backend.kron_matmul(fs, x)
        prog = _program(backend)
        assert len(prog.launches) >= 2
        _check_call(prog, calls, x, out, fs)


def test_batched_fused_calls_patch_batch_offsets(recorded):
    backend, calls = recorded
    gen = torch.Generator().manual_seed(4)
    fs = [torch.randn(2, 1, 8, 8, generator=gen), torch.randn(8, 8, generator=gen), torch.randn(3, 8, 8, generator=gen)[1:]]
    for rep in range(2):
        x = torch.randn(2, 2, 3, 512, generator=gen)[:, :, :, :]
        calls.clear()
        out = backend.matmul_kron(x, fs)
        prog = _program(backend)
        assert len(calls) == len(prog.launches)
        operands = [x, out, *fs]
        for (*_, args), lz in zip(calls, prog.launches):
            for field, slot, t, off in lz.patches:
                if t < len(operands):
                    got = {"x": args.x, "y": args.y, "f": args.f[slot]}[field]
                    assert got == operands[t].data_ptr() + off


def test_each_thread_writes_its_own_argument_blocks(recorded):
    # ctypes releases the GIL inside cuLaunchKernel: two threads replaying one program must not
    # share the blocks they patch.
    backend, calls = recorded
    gen = torch.Generator().manual_seed(5)
    fs = [torch.randn(8, 8, generator=gen) for _ in range(6)]
    x = torch.randn(4, 8**6, generator=gen)
    backend.matmul_kron(x, fs)
    prog = _program(backend)
    mine = prog.local.blocks
    theirs = {}

    def other():
        x2 = torch.randn(4, 8**6)
        out2 = backend.matmul_kron(x2, fs)
        theirs["blocks"], theirs["x"], theirs["out"] = prog.local.blocks, x2, out2

    calls.clear()
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert theirs["blocks"] is not mine
    assert ctypes.addressof(theirs["blocks"].args) != ctypes.addressof(mine.args)
    _check_call(prog, calls, theirs["x"], theirs["out"], fs)
