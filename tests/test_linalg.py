"""kronegp.linalg.symmetric_eig: agreement with a dense reconstruction, the host/device rule, the cache."""

import pytest
import torch

import kronegp.linalg as kl
from kronegp.linalg import clear_eig_cache, symmetric_eig


def _spd(n, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)).to(dtype=dtype, device=device)


def _check(m, lam, q, tol):
    assert lam.dtype == m.dtype and q.dtype == m.dtype and lam.device == m.device and q.device == m.device
    assert torch.all(lam[1:] >= lam[:-1])
    m64, lam64, q64 = m.double(), lam.double(), q.double()
    recon = q64 @ torch.diag(lam64) @ q64.T
    assert (recon - m64).norm() / m64.norm() < tol
    eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    assert (q64.T @ q64 - eye).norm() / eye.norm() < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_mixed_sizes_match_reconstruction(dtype, tol):
    clear_eig_cache()
    mats = [_spd(n, dtype, seed=n) for n in (1, 3, 12, 61, 300)]
    for m, (lam, q) in zip(mats, symmetric_eig(mats)):
        _check(m, lam, q, tol)


def _count_eigh_sizes(monkeypatch) -> list:
    """Record the size of every ``torch.linalg.eigh`` call (from any thread) in the returned list."""
    seen = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: seen.append(a.shape[0]) or real_eigh(a))
    return seen


def _toeplitz_kernel(n, dtype, lengthscale=7.0, device="cpu"):
    """Matérn-5/2 on evenly spaced points: symmetric Toeplitz, hence centrosymmetric."""
    x = torch.arange(n, dtype=torch.float64)
    d = (x[:, None] - x[None, :]).abs() / lengthscale
    k = (1 + 5**0.5 * d + 5 / 3 * d**2) * torch.exp(-(5**0.5) * d)
    return (k + 1e-3 * torch.eye(n, dtype=torch.float64)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_centrosymmetric_matrices_split_in_two(dtype, tol, monkeypatch):
    """Symmetric Toeplitz factors (even and odd sizes) go through two half-size problems; the
    result is a valid ascending decomposition with eigenvalues equal to eigh's."""
    clear_eig_cache()
    monkeypatch.setattr(kl, "CENTRO_MIN_ROWS", 16)
    real_eigh = torch.linalg.eigh
    sizes_seen = _count_eigh_sizes(monkeypatch)
    ns = (16, 17, 61, 64, 128, 365)
    mats = [_toeplitz_kernel(n, dtype) for n in ns]
    pairs = symmetric_eig(mats)
    for m, (lam, q) in zip(mats, pairs):
        _check(m, lam, q, tol)
        ref = real_eigh(m.double())[0]
        assert (lam.double() - ref).abs().max() / ref.abs().max() < tol
    assert sorted(sizes_seen) == sorted([n // 2 for n in ns] + [n - n // 2 for n in ns])


def test_centrosymmetric_split_reads_the_lower_triangle(monkeypatch):
    clear_eig_cache()
    monkeypatch.setattr(kl, "CENTRO_MIN_ROWS", 16)
    m = _toeplitz_kernel(40, torch.float64)
    junk = m + torch.triu(torch.rand(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 1)
    (lam, q), = symmetric_eig([junk])
    _check(m, lam, q, 1e-13)


def test_nearly_centrosymmetric_matrix_is_not_split(monkeypatch):
    """A perturbation far above rounding keeps the direct decomposition (nothing symmetrised away)."""
    clear_eig_cache()
    monkeypatch.setattr(kl, "CENTRO_MIN_ROWS", 16)
    m = _toeplitz_kernel(50, torch.float64)
    m[7, 2] += 1e-9
    m[2, 7] += 1e-9
    real_eigh = torch.linalg.eigh
    sizes_seen = _count_eigh_sizes(monkeypatch)
    (lam, q), = symmetric_eig([m])
    assert sizes_seen == [50]
    _check(m, lam, q, 1e-13)
    assert torch.allclose(lam, real_eigh(m)[0], rtol=0, atol=1e-14)


def test_centrosymmetric_split_can_be_switched_off(monkeypatch):
    clear_eig_cache()
    monkeypatch.setattr(kl, "CENTRO_MIN_ROWS", 0)
    sizes_seen = _count_eigh_sizes(monkeypatch)
    symmetric_eig([_toeplitz_kernel(32, torch.float64)])
    assert sizes_seen == [32]


def test_host_workers_and_calling_thread_split(monkeypatch):
    """Small host matrices go to single-threaded workers, larger ones stay on the calling
    thread; both agree with the reconstruction, and the caller's thread settings are kept."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    clear_eig_cache()
    monkeypatch.setattr(kl, "HOST_WORKER_MAX_ROWS", 50)
    def openmp_threads(info):
        return [lib["num_threads"] for lib in info if lib["user_api"] == "openmp"]

    threads = torch.get_num_threads()
    before = openmp_threads(threadpoolctl.threadpool_info())
    mats = [_spd(n, torch.float64, seed=n) for n in (5, 12, 49, 50, 51, 120)]
    for m, (lam, q) in zip(mats, symmetric_eig(mats)):
        _check(m, lam, q, 1e-13)
    assert torch.get_num_threads() == threads
    assert kl._host_pool is not None
    assert all(n == 1 for n in openmp_threads(kl._host_pool.submit(threadpoolctl.threadpool_info).result()))
    assert openmp_threads(threadpoolctl.threadpool_info()) == before


def test_reads_lower_triangle_like_eigh():
    m = _spd(7, torch.float64)
    skew = 2 * torch.triu(m, 1) + torch.tril(m)  # upper triangle doubled, lower untouched
    (lam, _), = symmetric_eig([skew])
    assert torch.allclose(lam, torch.linalg.eigh(m)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [5, 200])  # a host worker / the calling thread
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_gives_nan_eigenpairs(n, bad):
    """LAPACK alone raised for NaN at n = 5, returned finite numbers for it at n = 200 and NaN
    eigenvalues with finite eigenvectors for Inf: every path now gives NaN, like the Jacobi kernel."""
    clear_eig_cache()
    m = _spd(n, torch.float64, seed=n)
    m[3, 1] = bad
    (lam, q), = symmetric_eig([m])
    assert torch.isnan(lam).all() and torch.isnan(q).all()
    upper = _spd(n, torch.float64, seed=n)
    upper[1, 3] = bad  # not read: a finite problem
    (lam, q), = symmetric_eig([upper])
    _check(torch.tril(upper) + torch.tril(upper, -1).T, lam, q, 1e-13)


def test_cache_hit_and_invalidation_by_inplace_change():
    clear_eig_cache()
    m = _spd(9, torch.float64)
    (lam1, q1), = symmetric_eig([m])
    (lam2, q2), = symmetric_eig([m.detach()])  # same storage and version: cached
    assert lam2 is lam1 and q2 is q1
    m.mul_(2.0)  # bumps the version counter
    (lam3, _), = symmetric_eig([m])
    assert lam3 is not lam1
    assert torch.allclose(lam3, 2 * lam1, rtol=1e-12)


def test_cache_disabled(monkeypatch):
    clear_eig_cache()
    monkeypatch.setattr(kl, "EIG_CACHE_SIZE", 0)
    m = _spd(5, torch.float64)
    (lam1, _), = symmetric_eig([m])
    (lam2, _), = symmetric_eig([m])
    assert lam2 is not lam1


def test_cache_is_bounded(monkeypatch):
    clear_eig_cache()
    monkeypatch.setattr(kl, "EIG_CACHE_SIZE", 3)
    symmetric_eig([_spd(4, torch.float64, seed=s) for s in range(5)])
    assert len(kl._cache) == 3


def test_no_autograd_and_inference_mode():
    m = _spd(6, torch.float32).requires_grad_(True)
    (lam, q), = symmetric_eig([m])
    assert not lam.requires_grad and not q.requires_grad
    with torch.inference_mode():
        mi = _spd(6, torch.float32)
        (lam_i, _), = symmetric_eig([mi])
    assert torch.allclose(lam_i, lam, rtol=1e-5)


@pytest.mark.parametrize(
    "bad,err",
    [
        (torch.ones(2, 3), ValueError),
        (torch.ones(2, 2, 2), ValueError),
        (torch.ones(3, 3, dtype=torch.float16), TypeError),
        ([[1.0]], TypeError),
    ],
)
def test_bad_input(bad, err):
    with pytest.raises(err, match=r"mats\[0\]"):
        symmetric_eig([bad])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_host_and_device_sides(dtype, tol, monkeypatch):
    clear_eig_cache()
    monkeypatch.setattr(kl, "DEVICE_JACOBI_MAX_ROWS", 0)  # the host and cuSOLVER paths
    monkeypatch.setattr(kl, "HOST_EIGH_MAX_ROWS", 64)
    mats = [_spd(n, dtype, device="cuda", seed=n) for n in (3, 64, 65, 365)]  # two on each side
    for m, (lam, q) in zip(mats, symmetric_eig(mats)):
        _check(m, lam, q, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_centrosymmetric_factors_on_both_sides(dtype, tol, monkeypatch):
    """Toeplitz factors of CUDA tensors: split on the host (≤ HOST_EIGH_MAX_ROWS rows), decomposed
    directly on the device above; both agree with eigh."""
    clear_eig_cache()
    monkeypatch.setattr(kl, "DEVICE_JACOBI_MAX_ROWS", 0)  # the host and cuSOLVER paths
    monkeypatch.setattr(kl, "HOST_EIGH_MAX_ROWS", 64)
    monkeypatch.setattr(kl, "CENTRO_MIN_ROWS", 16)
    mats = [_toeplitz_kernel(n, dtype, device="cuda") for n in (33, 64, 128, 365)]
    for m, (lam, q) in zip(mats, symmetric_eig(mats)):
        _check(m, lam, q, tol)
        ref = torch.linalg.eigh(m.double())[0]
        assert (lam.double() - ref).abs().max() / ref.abs().max() < tol


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_concurrent_device_path_on_a_side_stream(dtype, tol, monkeypatch):
    """Several device-side matrices (threads + side streams), made and used on a non-default stream."""
    clear_eig_cache()
    monkeypatch.setattr(kl, "DEVICE_JACOBI_MAX_ROWS", 0)  # the host and cuSOLVER paths
    monkeypatch.setattr(kl, "HOST_EIGH_MAX_ROWS", 16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        mats = []
        for n in (17, 30, 65, 100, 365):
            a = torch.randn(n, n, device="cuda", dtype=torch.float64)
            mats.append((a @ a.T / n + 0.1 * torch.eye(n, device="cuda", dtype=torch.float64)).to(dtype))
        pairs = symmetric_eig(mats)
        for m, (lam, q) in zip(mats, pairs):
            _check(m, lam, q, tol)
    torch.cuda.synchronize()


def _jacobi_limit():
    from kronegp import device

    like = torch.empty(1, device="cuda")
    return device.backend_for(like).eigh_capability(like).limit


def _indefinite(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T).to(dtype=dtype, device="cuda")


def _jacobi(mats, starts=None, keeps=None, sweeps=None, lanes=0):
    from kronegp import device

    starts = starts or [None] * len(mats)
    return device.backend_for(mats[0]).small_eigh(mats, starts, keeps, sweeps, lanes)


def _jacobi_test_matrices(dtype):
    limit = _jacobi_limit()
    mats = [_spd(n, dtype, device="cuda", seed=n) for n in (1, 2, 3, 5, 12, 16, 31, 61, 64, 100, 127, 128, limit)]
    mats += [_indefinite(n, dtype, seed=n) for n in (2, 3, 12, 61, 128)]
    mats += [_toeplitz_kernel(n, dtype, lengthscale=n / 10, device="cuda") for n in (24, 72, 128)]
    mats += [_toeplitz_kernel(128, dtype, lengthscale=12.0 + k, device="cuda") for k in range(9)]  # 12 of one size: two launches
    return mats


@pytest.mark.cuda
@pytest.mark.parametrize("lanes", [0, 4, 16, 32])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_jacobi_kernel_matches_eigh(dtype, tol, lanes):
    """The GPU Jacobi kernel from a cold start: SPD, indefinite and kernel (Toeplitz, clustered tiny
    eigenvalues) matrices of odd and even sizes up to the shared-memory limit, grouped by size as
    symmetric_eig groups them; every thread layout."""
    mats = _jacobi_test_matrices(dtype)
    sizes = sorted({m.shape[0] for m in mats})
    for n in sizes:
        group = [m for m in mats if m.shape[0] == n]
        keeps = [torch.full((n, n), float("nan"), dtype=torch.float64, device="cuda") for _ in group]
        for m, (lam, q), keep in zip(group, _jacobi(group, keeps=keeps, lanes=lanes), keeps):
            _check(m, lam, q, tol)
            ref = torch.linalg.eigh(m.double())[0]
            assert (lam.double() - ref).abs().max() <= tol * ref.abs().max()
            # the kept float64 eigenvectors: the same columns (unsorted), orthonormal to float64 rounding
            eye = torch.eye(n, dtype=torch.float64, device="cuda")
            assert (keep.T @ keep - eye).abs().max() < (1e-13 if dtype == torch.float64 else 1e-7)
            assert (keep.T @ m.double() @ keep).diagonal().sort().values.sub(ref).abs().max() <= max(tol, 1e-13) * ref.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_jacobi_warm_start_takes_fewer_sweeps_for_the_same_result(dtype, tol):
    a = _toeplitz_kernel(128, dtype, lengthscale=12.0, device="cuda")
    b = _toeplitz_kernel(128, dtype, lengthscale=12.3, device="cuda")
    start = torch.empty(128, 128, dtype=torch.float64, device="cuda")
    sweeps = torch.zeros(3, dtype=torch.int32, device="cuda")
    _jacobi([a], keeps=[start])
    (lam_cold, _), = _jacobi([b], sweeps=sweeps[0:1])
    (lam_warm, q_warm), = _jacobi([b], [start.clone()], sweeps=sweeps[1:2])
    (lam_same, q_same), = _jacobi([a], [start], [start], sweeps=sweeps[2:3])  # in place
    cold, warm, same = sweeps.tolist()
    assert warm <= cold / 3 and same == 1, (cold, warm, same)
    _check(b, lam_warm, q_warm, tol)
    _check(a, lam_same, q_same, tol)
    assert (lam_warm - lam_cold).abs().max() <= tol * lam_cold.abs().max()


@pytest.mark.cuda
def test_cuda_symmetric_eig_seeds_on_the_host_then_runs_the_kernel_without_synchronising(monkeypatch):
    """The first decomposition of a (device, size, position) runs on the host and keeps float64
    eigenvectors; later ones run the Jacobi kernel from them, without a host synchronisation and
    reading only the lower triangle."""
    clear_eig_cache()
    seen = _count_eigh_sizes(monkeypatch)
    first = [_toeplitz_kernel(n, torch.float32, lengthscale=ls, device="cuda") for n, ls in ((40, 5.0), (40, 7.0), (9, 2.0))]
    for m, (lam, q) in zip(first, symmetric_eig(first)):
        _check(m, lam, q, 2e-6)
    assert sorted(seen) == [9, 40, 40] and len(kl._starts) == 3
    nxt = [_toeplitz_kernel(n, torch.float32, lengthscale=ls, device="cuda") for n, ls in ((40, 5.1), (40, 7.1), (9, 2.1))]
    garbage = [torch.tril(m) + torch.triu(torch.full_like(m, float("nan")), 1) for m in nxt]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pairs = symmetric_eig(garbage)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sorted(seen) == [9, 40, 40]
    for m, (lam, q) in zip(nxt, pairs):
        _check(m, lam, q, 2e-6)
        ref = torch.linalg.eigh(m.double())[0]
        assert (lam.double() - ref).abs().max() <= 2e-6 * ref.abs().max()


@pytest.mark.cuda
def test_cuda_jacobi_failure_gives_nan_eigenvalues(monkeypatch):
    from kronegp._cuda import eigh

    m = _spd(64, torch.float32, device="cuda", seed=1)
    bad = m.clone()
    bad[5, 3] = float("inf")
    (lam, _), = _jacobi([bad])
    assert torch.isnan(lam).all()
    monkeypatch.setattr(eigh, "MAX_SWEEPS", 1)
    (lam, _), = _jacobi([m])
    assert torch.isnan(lam).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_cuda_non_finite_matrix_gives_nan_and_leaves_the_start_alone(dtype, tol):
    """NaN/Inf in the lower triangle: NaN eigenpairs on the cuSOLVER path (which raised "failed
    to converge"), on the host path that seeds a Jacobi start (no start kept from it) and in the
    kernel (its start not overwritten: later finite matrices at that place still decompose)."""
    clear_eig_cache()
    big = _spd(200, dtype, device="cuda", seed=2)  # beyond the host and Jacobi limits: cuSOLVER
    big[7, 2] = float("nan")
    (lam, q), = symmetric_eig([big])
    assert torch.isnan(lam).all() and torch.isnan(q).all()
    bad = _toeplitz_kernel(40, dtype, lengthscale=5.0, device="cuda")
    bad[9, 4] = float("inf")
    (lam, q), = symmetric_eig([bad])  # cold: the host path
    assert torch.isnan(lam).all() and torch.isnan(q).all() and not kl._starts
    for step, ls in enumerate((5.0, 5.1, 5.2)):
        good = _toeplitz_kernel(40, dtype, lengthscale=ls, device="cuda")
        (lam, q), = symmetric_eig([good])  # host (seeds the start), then the kernel twice
        _check(good, lam, q, tol)
        assert len(kl._starts) == 1
        if step == 1:
            worse = good.clone()
            worse[20, 3] = float("nan")
            (lam, _), = symmetric_eig([worse])  # the kernel, from the start
            assert torch.isnan(lam).all()


@pytest.mark.cuda
def test_cuda_jacobi_on_a_side_stream_and_switched_off(monkeypatch):
    clear_eig_cache()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for seed in (1, 2):  # the host seeds, then the kernel
            mats = [_spd(n, torch.float64, device="cuda", seed=n + seed) for n in (9, 80)]
            pairs = symmetric_eig(mats)
            for m, (lam, q) in zip(mats, pairs):
                _check(m, lam, q, 1e-13)
    torch.cuda.synchronize()
    seen = _count_eigh_sizes(monkeypatch)
    symmetric_eig([_spd(9, torch.float64, device="cuda", seed=5)])
    assert seen == []
    monkeypatch.setattr(kl, "DEVICE_JACOBI_MAX_ROWS", 0)
    symmetric_eig([_spd(9, torch.float64, device="cuda", seed=6)])
    assert seen == [9]


@pytest.mark.parametrize("sizes", [[3], [3, 5], [4, 1, 6], [2, 3, 4, 5]])
def test_kron_vector_matches_kronecker_matmul_of_columns(sizes):
    from kronegp.reference import kron_matmul as ref_kron_matmul

    g = torch.Generator().manual_seed(len(sizes))
    vs = [torch.randn(n, dtype=torch.float64, generator=g) for n in sizes]
    expected = ref_kron_matmul([v.reshape(-1, 1) for v in vs], torch.ones(1, 1, dtype=torch.float64)).reshape(-1)
    assert torch.allclose(kl.kron_vector(vs), expected, rtol=1e-13, atol=0)


def test_kron_vector_broadcasts_batches():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 1, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, 5, dtype=torch.float64, generator=g)
    out = kl.kron_vector([a, b])
    assert out.shape == (2, 4, 15)
    for i in range(2):
        for j in range(4):
            assert torch.allclose(out[i, j], torch.kron(a[i, 0], b[j]), rtol=1e-14, atol=0)


@pytest.mark.cuda
def test_cuda_jacobi_start_seeded_by_cusolver_is_not_the_callers_result(monkeypatch):
    """A first decomposition on the device path (cuSOLVER) seeds the Jacobi kernel's start with a
    copy: the kernel overwrites its start in place, and must not overwrite the Q returned before."""
    clear_eig_cache()
    monkeypatch.setattr(kl, "HOST_EIGH_MAX_ROWS", 16)  # 40 rows: the device path, then the kernel
    a = _toeplitz_kernel(40, torch.float64, lengthscale=5.0, device="cuda")
    (lam_a, q_a), = symmetric_eig([a])
    kept = q_a.clone()
    symmetric_eig([_toeplitz_kernel(40, torch.float64, lengthscale=5.5, device="cuda")])
    torch.cuda.synchronize()
    assert torch.equal(q_a, kept)
    _check(a, lam_a, q_a, 1e-13)
