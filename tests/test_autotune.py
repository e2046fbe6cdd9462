"""Opt-in autotuning of the CUDA path choice (:mod:`kronegp._cuda.tune`).

CPU tests drive the bookkeeping with fake timings (which candidates run, how often, what is kept
and saved, when the file is ignored); GPU tests (marker ``cuda``) tune real calls and check the
results against the reference and the timings against the choice.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import kronegp
from kronegp import reference
from kronegp._cuda import CudaBackend
from kronegp._cuda.tune import PathTuner, time_candidates, tune_key

STAMP = {"sources": "abc", "torch": "x", "gpu": "Fake GPU"}


def test_time_candidates_warms_up_then_interleaves():
    calls = []
    clock = {"fused": [3.0, 1.0, 2.0], "axis_gemm": [5.0, 4.0, 6.0]}

    def run(path):
        calls.append(path)

    def timer(fn):
        fn()
        return clock[calls[-1]].pop(0)

    times = time_candidates(run, ["fused", "axis_gemm"], reps=3, timer=timer)
    assert times == {"fused": 2.0, "axis_gemm": 5.0}  # medians
    # one untimed run each, then the candidates take turns
    assert calls == ["fused", "axis_gemm"] + ["fused", "axis_gemm"] * 3


def test_time_candidates_samples_short_calls_more():
    def count(ms):
        n = {"fused": 0}

        def timer(fn):
            fn()
            n["fused"] += 1
            return ms

        time_candidates(lambda p: None, ["fused"], timer=timer, budget_ms=5.0, max_reps=25)
        return n["fused"]

    assert count(2.0) == 3  # long calls: the minimum of 3 turns
    assert count(0.5) == 10  # 5 ms of timing
    assert count(0.01) == 25  # capped


def test_time_candidates_leaves_out_a_path_that_runs_out_of_memory():
    def run(path):
        if path == "axis_gemm_t":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    times = time_candidates(run, ["fused", "axis_gemm_t"], reps=2, timer=lambda fn: fn() or 1.0)
    assert times == {"fused": 1.0}
    assert time_candidates(lambda p: run("axis_gemm_t"), ["fused"], reps=2, timer=lambda fn: 1.0) == {}


def test_tuner_keeps_fastest_and_persists(tmp_path):
    file = PathTuner.file_for(tmp_path, "NVIDIA H100 80GB HBM3")
    assert file.parent == tmp_path and " " not in file.name
    key = tune_key("kron_matmul", ((64, 64),) * 3, 11, 4, False, True, True)
    t = PathTuner(file, STAMP)
    assert t.lookup(key) is None
    assert t.record(key, {"fused": 0.19, "axis_gemm": 0.13, "axis_gemm_t": 0.22}, "fused") == "axis_gemm"
    assert t.lookup(key) == "axis_gemm"
    data = json.loads(file.read_text())
    assert data["stamp"] == STAMP
    (entry,) = data["entries"].values()
    assert entry["path"] == "axis_gemm" and entry["model_path"] == "fused"
    # another process, same GPU model, same sources and torch: reuses the choice
    assert PathTuner(file, STAMP).lookup(key) == "axis_gemm"
    # other kernel sources: the old timings do not apply
    assert PathTuner(file, dict(STAMP, sources="def")).lookup(key) is None


def test_tuner_merges_entries_of_concurrent_writers(tmp_path):
    file = tmp_path / "t.json"
    k1 = tune_key("matmul_kron", ((8, 8),) * 6, 1024, 4, False, False, True)
    k2 = tune_key("matmul_kron", ((16, 16),) * 4, 1024, 4, False, False, True)
    a, b = PathTuner(file, STAMP), PathTuner(file, STAMP)
    a.record(k1, {"fused": 1.0, "axis_gemm": 2.0}, "fused")
    b.record(k2, {"fused": 3.0, "axis_gemm": 2.0}, "fused")
    fresh = PathTuner(file, STAMP)
    assert fresh.lookup(k1) == "fused" and fresh.lookup(k2) == "axis_gemm"


def test_unreadable_tuning_file_warns_and_starts_empty(tmp_path):
    file = tmp_path / "t.json"
    file.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable autotune file"):
        t = PathTuner(file, STAMP)
    key = tune_key("matmul_kron", ((8, 8),), 3, 8, False, False, True)
    assert t.lookup(key) is None
    t.record(key, {"fused": 1.0, "axis_gemm": 2.0}, "fused")  # and replaces it
    assert PathTuner(file, STAMP).lookup(key) == "fused"


class _FakeTimer:
    def __init__(self, times):
        self.times, self.calls = times, 0

    def __call__(self, run, candidates, reps=3, timer=None):
        self.calls += 1
        for c in candidates:
            run(c)
        return {c: self.times[c] for c in candidates}


def _cpu_backend(monkeypatch, fake, autotune=True):
    backend = CudaBackend(autotune=autotune)
    backend.autotune_persist = False
    monkeypatch.setattr("kronegp._cuda.time_candidates", fake)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(backend, "tuner", lambda device: backend._tuners.setdefault("cpu", PathTuner(None, STAMP)))
    return backend


def test_path_is_tuned_once_per_signature(monkeypatch):
    # GP 64^3 with T = 11: the cost model picks a path; the timings say another is faster
    shapes, x = ((64, 64),) * 3, torch.empty(64**3, 11)
    fake = _FakeTimer({"fused": 0.19, "axis_gemm": 0.13, "axis_gemm_t": 0.22})
    backend = _cpu_backend(monkeypatch, fake)
    ran = []
    path = backend._path("kron_matmul", x, shapes, 11, False, True, True, ran.append)
    assert path == "axis_gemm" and sorted(ran) == ["axis_gemm", "axis_gemm_t", "fused"]
    again = backend._path("kron_matmul", x, shapes, 11, False, True, True, ran.append)
    assert again == "axis_gemm" and fake.calls == 1 and len(ran) == 3
    # another signature (other rows) is tuned on its own
    backend._path("kron_matmul", x, shapes, 12, False, True, True, ran.append)
    assert fake.calls == 2
    # as is a batched call with as many rows in all (2 products of 6 columns: other GEMMs)
    backend._path("kron_matmul", x, shapes, 12, False, True, True, ran.append, nb=2)
    assert fake.calls == 3


def test_model_path_when_no_candidate_could_be_timed(monkeypatch):
    shapes, x = ((64, 64),) * 3, torch.empty(64**3, 11)
    backend = _cpu_backend(monkeypatch, lambda run, candidates: {})
    from kronegp._cuda import _choice

    model = _choice(shapes, 11, 4, False, True, True, "auto").path
    assert backend._path("kron_matmul", x, shapes, 11, False, True, True, None) == model
    assert not backend.tuner(x.device).table  # nothing recorded: tried again next time


def test_pinned_path_and_single_candidate_are_not_timed(monkeypatch):
    shapes, x = ((64, 64),) * 3, torch.empty(64**3, 11)
    fake = _FakeTimer({"fused": 0.19, "axis_gemm": 0.13, "axis_gemm_t": 0.22})
    backend = _cpu_backend(monkeypatch, fake)
    backend.force_path = "fused"
    assert backend._path("kron_matmul", x, shapes, 11, False, True, True, None) == "fused"
    backend.force_path = "auto"
    # the cuBLAS path not allowed (axis_ok False): the fused kernels are the only candidate
    assert backend._path("kron_matmul", x, shapes, 11, False, True, False, None) == "fused"
    assert fake.calls == 0
    off = _cpu_backend(monkeypatch, fake, autotune=False)
    model = off._path("kron_matmul", x, shapes, 11, False, True, True, None)
    assert model in ("fused", "axis_gemm", "axis_gemm_t") and fake.calls == 0


def test_stamp_follows_kernel_sources_and_cublas_path_code(tmp_path, monkeypatch):
    # Tuned timings describe code: editing the cuBLAS paths (Python) must void them like a
    # kernel source edit does, so a file saved before the edit is ignored.
    from kronegp._cuda import axis_gemm, tuner_stamp

    before = tuner_stamp("Fake GPU")
    assert set(before) == {"sources", "paths", "torch", "gpu"} and before["gpu"] == "Fake GPU"
    edited = tmp_path / "axis_gemm.py"
    edited.write_text(open(axis_gemm.__file__).read() + "\n# edited\n")
    monkeypatch.setattr(axis_gemm, "__file__", str(edited))
    after = tuner_stamp("Fake GPU")
    assert after["paths"] != before["paths"] and after["sources"] == before["sources"]
    file, key = tmp_path / "tune.json", tune_key("kron_matmul", ((8, 8),), 4, 4, False, True, True)
    PathTuner(file, before).record(key, {"fused": 1.0, "axis_gemm": 2.0}, "fused")
    assert PathTuner(file, before).lookup(key) == "fused"
    assert PathTuner(file, after).lookup(key) is None


def test_set_autotune_checks_its_argument():
    with pytest.raises(TypeError, match="enabled must be a bool"):
        kronegp.set_autotune("yes")


# ---- on the GPU


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tuned_calls_match_reference_and_choose_the_fastest(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("KRONEGP_CACHE_DIR", str(tmp_path))
    backend = CudaBackend(autotune=True)
    gen = torch.Generator(device="cuda").manual_seed(3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    cases = [("kron_matmul", [64, 64, 64], 11), ("matmul_kron", [64, 64, 64], 11),
             ("kron_matmul", [3, 61, 12], 5), ("matmul_kron", [8, 8, 8, 8], 16), ("kron_matmul", [128, 128], 1)]
    for side, sizes, rows in cases:
        fs = [torch.randn(n, n, dtype=dtype, device="cuda", generator=gen) for n in sizes]
        k = math.prod(sizes)
        if side == "kron_matmul":
            x = torch.randn(k, rows, dtype=dtype, device="cuda", generator=gen)
            out, ref = backend.kron_matmul(fs, x), reference.kron_matmul([f.double() for f in fs], x.double())
        else:
            x = torch.randn(rows, k, dtype=dtype, device="cuda", generator=gen)
            out, ref = backend.matmul_kron(x, fs), reference.matmul_kron(x.double(), [f.double() for f in fs])
        assert torch.isfinite(out).all() and _rel(out, ref) <= tol, (side, sizes, rows)
    tuner = backend.tuner(torch.device("cuda"))
    assert tuner.timings, "no signature was tuned"
    for key, times in tuner.timings.items():
        assert len(times) >= 2 and all(t > 0 for t in times.values())
        assert tuner.table[key] == min(times, key=times.get)
    # a new process (backend) on this GPU model reads the choices back without timing anything
    monkeypatch.setattr("kronegp._cuda.time_candidates", lambda *a, **k: pytest.fail("re-tuned a saved signature"))
    fresh = CudaBackend(autotune=True)
    for side, sizes, rows in cases[:2]:
        fs = [torch.randn(n, n, dtype=dtype, device="cuda", generator=gen) for n in sizes]
        x = torch.randn(math.prod(sizes), rows, dtype=dtype, device="cuda", generator=gen)
        if side == "kron_matmul":
            out, ref = fresh.kron_matmul(fs, x), reference.kron_matmul([f.double() for f in fs], x.double())
        else:
            x = x.mT.contiguous()
            out, ref = fresh.matmul_kron(x, fs), reference.matmul_kron(x.double(), [f.double() for f in fs])
        assert _rel(out, ref) <= tol
    assert fresh.tuner(torch.device("cuda")).table, "saved choices were not read back"


@pytest.mark.cuda
def test_autotune_switch_reaches_the_backend():
    from kronegp import device

    backend = device.load_cuda()[0]
    before = backend.autotune
    try:
        kronegp.set_autotune(True)
        assert kronegp.backend_info()["autotune"] is True and backend.autotune
        kronegp.set_autotune(False)
        assert kronegp.backend_info()["autotune"] is False
    finally:
        backend.autotune = before
