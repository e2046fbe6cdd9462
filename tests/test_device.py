"""The device door (:mod:`kronegp.device`): the solvers and the products reach kernels only
through a :class:`~kronegp.device.Backend` and its capabilities.

A fake backend that records its calls stands in for the CUDA one on CPU tensors: its CG step and
eigensolver are written in torch from the kernels' specification (``cuda_ext/cg_update.cuh``), so
a solve through it must give the torch path's results, and a backend without the kernel must
send the solver to that torch path. The custom ops pass ``torch.library.opcheck``.
"""

from __future__ import annotations

import pytest
import torch

import kronegp
from kronegp import device, linalg, reference
from kronegp.device import Backend, Capability, ReferenceBackend
from kronegp.solvers import block_cg
from kronegp.solvers.lanczos import slq_logdet_on_device

from _helpers import dense_kron, rel_err

DTYPES = [torch.float64, torch.float32]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


class _FakeCgState:
    """The per-column state of a fused solve, in torch (the fields block_cg reads)."""

    def __init__(self, rz, res, b_norm, active, zero, tol, record=0):
        self.rz, self.res, self.b_norm = rz.clone(), res.clone(), b_norm
        self.active, self.zero = active.clone(), zero
        self.tol, self.tiny = tol, torch.finfo(rz.dtype).tiny
        self.iters = torch.zeros(rz.shape, dtype=torch.long)
        self.alpha = self.beta = None
        self.recording = record > 0
        self._alphas, self._betas = [], []

    def any_active(self) -> bool:
        return bool(self.active.any())

    @property
    def alphas(self):
        return torch.stack(self._alphas) if self._alphas else None

    @property
    def betas(self):
        return torch.stack(self._betas) if self._betas else None


class FakeBackend(Backend):
    """A backend with every kernel, in torch, recording each call; ``cg_limit``/``eigh_limit``
    of 0 make it say the kernel is unavailable."""

    def __init__(self, cg_limit: int = 64, eigh_limit: int = 32):
        self.cg_limit, self.eigh_limit = cg_limit, eigh_limit
        self.calls: list[str] = []

    def describe(self) -> str:
        return "fake backend for tests"

    def kron_matmul(self, factors, x, precision="highest", *, signature=None):
        self.calls.append("kron_matmul")
        return reference.kron_matmul(factors, x, precision)

    def matmul_kron(self, x, factors, precision="highest", *, signature=None):
        self.calls.append("matmul_kron")
        return reference.matmul_kron(x, factors, precision)

    def cg_capability(self, like):
        return Capability(self.cg_limit > 0, "fake CG step" if self.cg_limit else "fake: no CG step", self.cg_limit)

    def cg_state(self, **initial):
        self.calls.append("cg_state")
        return _FakeCgState(**initial)

    def cg_step(self, mode, state, *, p, x=None, r=None, ap=None, d=None, rows=False, iteration=0, force=False):
        self.calls.append(f"cg_step:{mode}")
        vd = -1 if rows else -2

        def col(v):  # per-column coefficients against the block
            return v.unsqueeze(vd)

        def z_of(res):
            return res if d is None else (d.unsqueeze(-2) if rows else d.unsqueeze(-1)) * res

        keep = state.active | (force & ~state.zero)
        if mode == "dot":
            pap = (p * ap).sum(vd)
            state.alpha = torch.where(keep, state.rz / pap.clamp_min(state.tiny), torch.zeros_like(pap))
            if state.recording:
                state._alphas.append(state.alpha)
        elif mode == "update":
            x.addcmul_(p, col(state.alpha))
            r.addcmul_(ap, col(state.alpha), value=-1)
            rz_new, rr = (r * z_of(r)).sum(vd), (r * r).sum(vd)
            state.beta = torch.where(keep, rz_new / state.rz.clamp_min(state.tiny), torch.zeros_like(rz_new))
            if state.recording:
                state._betas.append(state.beta)
            state.rz = torch.where(keep, rz_new, state.rz)
            state.iters += keep.long()
            state.res = torch.where(keep, rr.clamp_min(0).sqrt() / state.b_norm, state.res)
            state.active = state.active & (state.res > state.tol)
        else:
            p.copy_(z_of(r) + col(state.beta) * p)

    def eigh_capability(self, like):
        return Capability(self.eigh_limit > 0, "fake eigensolver" if self.eigh_limit else "fake: none", self.eigh_limit)

    def small_eigh(self, mats, starts, keeps=None, sweeps=None, lanes=0):
        self.calls.append(f"small_eigh:{len(mats)}")
        return [torch.linalg.eigh(m.double()) for m in mats]


@pytest.fixture
def fake(monkeypatch):
    """Every tensor's backend is the returned fake (as a CUDA tensor's would be the kernels)."""
    backend = FakeBackend()
    monkeypatch.setattr(device, "backend_for", lambda x: backend)
    return backend


def _spd_system(n: int, t: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)).to(dtype)
    b = torch.randn(n, t, generator=g, dtype=torch.float64).to(dtype)
    d = (1.0 / a.diagonal()).contiguous()
    return a, b, d


# --------------------------------------------------------------------------- the interface


def test_a_backend_missing_a_kernel_method_cannot_be_built():
    # Why an ABC rather than hasattr probes: a kernel method under another name fails loudly
    # when the backend is built (load_cuda then warns with that reason), instead of sending the
    # solvers quietly to their slow paths.
    class Renamed(Backend):
        def stub(self, *args, **kwargs):
            return None

        describe = kron_matmul = matmul_kron = cg_capability = cg_state = cg_step = eigh_capability = stub
        jacobi_eigh = stub  # the eigensolver under its old name

    with pytest.raises(TypeError, match="small_eigh"):
        Renamed()


def test_the_cuda_backend_implements_the_interface():
    from kronegp._cuda import CudaBackend

    backend = CudaBackend()  # builds without a GPU: every abstract method is implemented
    assert isinstance(backend, Backend)
    cpu = torch.zeros(3)
    assert not backend.cg_capability(cpu) and "cpu" in backend.cg_capability(cpu).reason
    assert not backend.eigh_capability(cpu)


def test_the_reference_says_why_it_has_no_kernels():
    ref = device.backend_for(torch.zeros(2))
    assert isinstance(ref, ReferenceBackend)
    for cap in (ref.cg_capability(torch.zeros(2)), ref.eigh_capability(torch.zeros(2))):
        assert not cap and cap.limit == 0 and "reference" in cap.reason
    with pytest.raises(NotImplementedError, match="no fused CG step"):
        ref.cg_step("dot", None, p=torch.zeros(2, 1))
    with pytest.raises(NotImplementedError, match="no small-matrix eigensolver"):
        ref.small_eigh([torch.eye(2)], [None])


@pytest.mark.cuda
def test_the_cuda_backend_has_its_kernels_on_a_gpu(monkeypatch):
    like = torch.zeros(4, device="cuda")
    backend = device.backend_for(like)
    assert backend is device.load_cuda()[0]
    cg, eigh = backend.cg_capability(like), backend.eigh_capability(like)
    assert cg and cg.limit >= 64 and eigh and eigh.limit >= 64, (cg, eigh)
    # block_cg on a CUDA block takes the fused step through the door
    calls = []
    real_step = backend.cg_step

    def step(mode, state, **blocks):
        calls.append(mode)
        real_step(mode, state, **blocks)

    monkeypatch.setattr(backend, "cg_step", step)
    a, b, d = _spd_system(50, 3, torch.float64, seed=8)
    a_dev = a.cuda()
    out = block_cg(lambda v: a_dev @ v, b.cuda(), precond=d.cuda(), tol=1e-10)
    assert calls[:3] == ["dot", "update", "direction"] and len(calls) == 3 * out.iterations
    assert rel_err(out.solution.cpu(), torch.linalg.solve(a, b)) <= 1e-8


def test_backend_info_on_this_machine():
    info = kronegp.backend_info()
    assert info["cpu"] == "reference" and info["cuda_reason"]


# --------------------------------------------------------------------------- the products


@pytest.mark.parametrize("dtype", DTYPES)
def test_products_and_their_gradients_go_through_the_door(fake, dtype):
    g = torch.Generator().manual_seed(1)
    fs = [torch.randn(3, 4, generator=g, dtype=dtype, requires_grad=True),
          torch.randn(5, 2, generator=g, dtype=dtype, requires_grad=True)]
    x = torch.randn(8, 3, generator=g, dtype=dtype, requires_grad=True)
    y = kronegp.kron_matmul(fs, x)
    assert fake.calls == ["kron_matmul"]
    dense = dense_kron([f.detach() for f in fs])
    assert rel_err(y, dense @ x.detach()) <= TOL[dtype]
    y.square().sum().backward()
    # dx and both factors' gradients: every product of the backward asked the same door
    assert len(fake.calls) > 1 and set(fake.calls) <= {"kron_matmul", "matmul_kron"}
    w = torch.randn(2, 15, generator=g, dtype=dtype)
    fake.calls.clear()
    assert rel_err(kronegp.matmul_kron(w, [f.detach() for f in fs]), w @ dense) <= TOL[dtype]
    assert fake.calls == ["matmul_kron"]


# --------------------------------------------------------------------------- block CG


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_block_cg_through_the_fused_step_matches_the_torch_path(monkeypatch, dtype, rows, diagonal):
    a, b, d = _spd_system(37, 5, dtype, seed=2)
    b[:, 2] = 0  # a zero column is solved by 0 and frozen from the start, on both paths
    rhs = b.T.contiguous() if rows else b
    kwargs = dict(precond=d if diagonal else None, tol=1e-6 if dtype == torch.float32 else 1e-10,
                  max_iters=200, min_iters=3, record_lanczos=True, rows=rows)

    def matvec(v):
        return (v @ a) if rows else (a @ v)

    fused = FakeBackend()
    monkeypatch.setattr(device, "backend_for", lambda x: fused)
    got = block_cg(matvec, rhs, **kwargs)
    steps = [c for c in fused.calls if c.startswith("cg_step")]
    assert fused.calls[0] == "cg_state" and len(steps) == 3 * got.iterations > 0
    assert steps[:3] == ["cg_step:dot", "cg_step:update", "cg_step:direction"]

    without = FakeBackend(cg_limit=0)  # a backend without the kernel: the torch iteration
    monkeypatch.setattr(device, "backend_for", lambda x: without)
    want = block_cg(matvec, rhs, **kwargs)
    assert without.calls == []

    assert got.iterations == want.iterations and got.converged and want.converged
    assert torch.equal(got.column_iterations, want.column_iterations)
    tol = TOL[dtype]
    assert rel_err(got.solution, want.solution) <= tol
    # the residuals are at the tolerance, where rounding is a large part of them: compare to it
    assert float((got.residual - want.residual).abs().max()) <= (0.1 if dtype == torch.float64 else 1.0) * kwargs["tol"]
    # late CG coefficients amplify rounding (orthogonality is lost): compare the first ones
    assert rel_err(got.alphas[:8], want.alphas[:8]) <= tol and rel_err(got.betas[:8], want.betas[:8]) <= tol
    exact = torch.linalg.solve(a.double(), b.double())
    assert rel_err(got.solution.T if rows else got.solution, exact) <= (1e-8 if dtype == torch.float64 else 1e-3)


def test_block_cg_skips_a_fused_step_too_narrow_for_the_block(monkeypatch):
    a, b, _ = _spd_system(20, 6, torch.float64, seed=3)
    narrow = FakeBackend(cg_limit=4)  # the block has 6 right-hand sides
    monkeypatch.setattr(device, "backend_for", lambda x: narrow)
    out = block_cg(lambda v: a @ v, b, tol=1e-10)
    assert narrow.calls == [] and out.converged
    assert rel_err(out.solution, torch.linalg.solve(a, b)) <= 1e-8


# --------------------------------------------------------------------------- eigensolver


def _lanczos_run(seed: int):
    a, b, _ = _spd_system(30, 4, torch.float64, seed=seed)
    # a fixed schedule would keep the run on the device; record_lanczos gives the coefficients
    return block_cg(lambda v: a @ v, b, tol=1e-8, record_lanczos=True)


def test_on_device_quadrature_uses_the_backend_eigensolver(monkeypatch):
    result = _lanczos_run(seed=4)
    want = slq_logdet_on_device(result)  # CPU reference: LAPACK
    fake = FakeBackend()
    monkeypatch.setattr(device, "backend_for", lambda x: fake)
    got = slq_logdet_on_device(result)
    assert fake.calls == ["small_eigh:4"]
    assert rel_err(got, want) <= 1e-12
    fake.eigh_limit = 4  # the padded tridiagonals have 16+ rows
    with pytest.raises(RuntimeError, match="limit of 4"):
        slq_logdet_on_device(result)


def test_symmetric_eig_asks_the_backend_how_many_rows_its_eigensolver_takes(fake, monkeypatch):
    cpu = torch.zeros(1)
    assert linalg.device_eigh_rows(cpu) == fake.eigh_limit
    monkeypatch.setattr(linalg, "DEVICE_JACOBI_MAX_ROWS", 10)
    assert linalg.device_eigh_rows(cpu) == 10
    monkeypatch.setattr(linalg, "DEVICE_JACOBI_MAX_ROWS", 0)
    assert linalg.device_eigh_rows(cpu) == 0
    monkeypatch.setattr(linalg, "DEVICE_JACOBI_MAX_ROWS", None)
    fake.eigh_limit = 0
    assert linalg.device_eigh_rows(cpu) == 0


def test_the_reference_has_no_device_eigensolver_rows():
    assert linalg.device_eigh_rows(torch.zeros(1)) == 0


# --------------------------------------------------------------------------- custom ops


def _op_inputs(dtype, seed: int, dev: str = "cpu"):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(dev).requires_grad_(True)

    fs = [rand(2, 1, 3, 4), rand(5, 2)]  # one batched (broadcast against x's batch), one plain
    x_km = rand(3, 8, 6)  # (batch, ΠQ, T)
    x_mk = rand(3, 7, 15)  # (batch, M, ΠP)
    return fs, x_km, x_mk


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_kron_matmul(dtype, dev, precision):
    fs, x, _ = _op_inputs(dtype, seed=5, dev=dev)
    torch.library.opcheck(torch.ops.kronegp.kron_matmul.default, (fs, x, precision))


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_matmul_kron(dtype, dev, precision):
    fs, _, x = _op_inputs(dtype, seed=6, dev=dev)
    torch.library.opcheck(torch.ops.kronegp.matmul_kron.default, (x, fs, precision))


class _PointerBackend(ReferenceBackend):
    """The reference, but reading x's data pointer first, as the CUDA backend does."""

    def kron_matmul(self, factors, x, precision="highest", *, signature=None):
        x.data_ptr()
        return super().kron_matmul(factors, x, precision)

    def matmul_kron(self, x, factors, precision="highest", *, signature=None):
        x.data_ptr()
        return super().matmul_kron(x, factors, precision)


def test_opcheck_with_a_backend_that_reads_data_pointers(monkeypatch):
    """AOT tracing (opcheck's aot_dispatch tests) runs the op's backward on fake tensors outside
    torch.compile: the backward's products must reach the op's fake kernel, not a backend that
    reads data pointers (the CUDA failure of 2026-12-07, reproduced on CPU)."""
    backend = _PointerBackend("test")
    monkeypatch.setattr(device, "backend_for", lambda x: backend)
    fs, x_km, x_mk = _op_inputs(torch.float64, seed=8)
    torch.library.opcheck(torch.ops.kronegp.kron_matmul.default, (fs, x_km, "highest"))
    torch.library.opcheck(torch.ops.kronegp.matmul_kron.default, (x_mk, fs, "highest"))


def test_the_ops_own_gradients_match_the_dense_product():
    fs, x_km, x_mk = _op_inputs(torch.float64, seed=7)
    small = [f.detach()[:1, :1].clone().requires_grad_(True) if f.dim() > 2 else f for f in fs]
    assert torch.autograd.gradcheck(lambda x, a, b: torch.ops.kronegp.kron_matmul([a, b], x, "highest"),
                                    (x_km.detach()[:1].clone().requires_grad_(True), *small))
    assert torch.autograd.gradcheck(lambda x, a, b: torch.ops.kronegp.matmul_kron(x, [a, b], "highest"),
                                    (x_mk.detach()[:1].clone().requires_grad_(True), *small))
