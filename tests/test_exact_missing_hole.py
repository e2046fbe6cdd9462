"""The exact-missing path's hole step (issue 22, exacthole branch): ``G⁻¹`` from its Cholesky factor by a
Schur-complement split (:func:`kronegp.models._few_missing.inverse_from_cholesky`), the series' block Hankel
gather, and the whole path with the split forced on small holes (corners, edges, a whole axis),
each against a dense reference."""

import math

import pytest
import torch

import kronegp.models._few_missing as few_missing
from _helpers import rel_err
from kronegp import GridGP
from kronegp.models._few_missing import FewMissing, inverse_from_cholesky
from kronegp.models._kron import KronEigen
from test_gaps import (assert_float32_agrees_with_float64, assert_posterior_matches_dense, dense_lml, field,
                       lml_and_grads, rel)


def spd(n: int, cond: float, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric positive definite ``(n, n)`` with eigenvalues spread log-uniformly over ``[1, cond]``,
    and its inverse from the same eigenvectors (a reference that no factorisation made)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    vals = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return ((q * vals) @ q.mT).to(dtype), (q / vals) @ q.mT


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 33, 100])
def test_inverse_from_cholesky_matches_the_exact_inverse(n, dtype, monkeypatch):
    """Leaves of at most 8 rows: 8 rows are one leaf, 9 are split 4 | 5, 33 twice more (odd halves)."""
    monkeypatch.setattr(few_missing, "INVERSE_LEAF", 8)
    g, exact = spd(n, 1e3, seed=n, dtype=dtype)
    inv = inverse_from_cholesky(torch.linalg.cholesky(g))
    assert inv.dtype == dtype and inv.shape == (n, n) and inv.is_contiguous()
    bound = 1e-12 if dtype == torch.float64 else 5e-4  # cond 1e3 times the dtype's round-off
    assert rel_err(inv, exact) <= bound
    assert rel_err(inv, inv.mT) <= bound  # symmetric to round-off


@pytest.mark.parametrize("cond", [1e4, 1e8, 1e10])
def test_inverse_from_cholesky_is_as_accurate_as_potri(cond, monkeypatch):
    """Ill-conditioned G: the split's error stays that of LAPACK's potri on the same factor (within
    a factor 3), where ``B`` times an explicit ``A⁻¹`` lost ``cond(A)`` more digits (1e-3 at 1e10)."""
    g, exact = spd(257, cond, seed=5)
    L = torch.linalg.cholesky(g)
    split = inverse_from_cholesky(L)  # the default leaf: split once at 257 rows
    monkeypatch.setattr(few_missing, "INVERSE_LEAF", 1 << 20)
    whole = inverse_from_cholesky(L)
    assert rel_err(whole, torch.cholesky_inverse(L)) <= 1e-15
    assert rel_err(split, exact) <= 3 * max(rel_err(whole, exact), 1e-15)


def test_exact_missing_names_an_indefinite_g(monkeypatch):
    """G that fails its factorisation (forced here) is a FloatingPointError naming m and the way out."""
    v, axes = field()
    v[1:3, 1:3, 1:3] = float("nan")
    gp = GridGP(v, axes, path="exact-missing")
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda g, **kw: (real(g)[0], torch.tensor(3, dtype=torch.int32)))
    with pytest.raises(FloatingPointError, match=r"G = X_MM over the 8 missing cells is not positive definite.*float64 or path='cg'"):
        gp.log_marginal_likelihood()


def _holed(cut, *, dtype=torch.float64, seed=0):
    v, axes = field(seed=seed, dtype=dtype)
    v = v.clone()
    v[cut] = float("nan")
    gp = GridGP(v, axes, path="exact-missing")
    with torch.no_grad():  # away from the initial values, so every gradient term matters
        for k, kern in enumerate(gp.kernels):
            kern.lengthscale = kern.lengthscale * (0.6 + 0.3 * k)
        gp.raw_outputscale.add_(0.3)
        gp.raw_noise.add_(-0.7)
        gp.mean_module.constant.add_(0.2)
    return gp


# field() is 7 × 8 × 9
HOLES = {
    "corner": (slice(0, 3), slice(0, 4), slice(0, 5)),  # m = 60
    "far-corner": (slice(4, 7), slice(5, 8), slice(6, 9)),  # m = 27
    "edge": (slice(0, 2), slice(3, 6), slice(8, 9)),  # one index on the last axis, m = 6
    "whole-axis": (slice(2, 5), slice(None), slice(4, 6)),  # the box spans axis 1, m = 48
    "odd": (slice(1, 6), slice(2, 3), slice(1, 8)),  # 5 × 1 × 7, m = 35
}


@pytest.mark.parametrize("name", sorted(HOLES))
def test_exact_missing_split_matches_dense(name, monkeypatch):
    """The whole path with G⁻¹ split to leaves of at most 7 rows (so every hole here is split two to
    four times, into odd halves too): likelihood, gradient and grid posterior within 1e-10 of a
    dense Cholesky."""
    monkeypatch.setattr(few_missing, "INVERSE_LEAF", 7)
    gp = _holed(HOLES[name])
    assert gp.path == "exact-missing"
    lml, grads = lml_and_grads(gp, lambda m: m.log_marginal_likelihood())
    ref, ref_grads = lml_and_grads(gp, dense_lml)
    assert abs(lml - ref) <= 1e-10 * abs(ref)
    assert rel(grads, ref_grads) <= 1e-10, (grads, ref_grads)
    assert_posterior_matches_dense(gp, 1e-10)


def test_exact_missing_split_float32_agrees_with_float64(monkeypatch):
    monkeypatch.setattr(few_missing, "INVERSE_LEAF", 7)
    m64 = _holed(HOLES["corner"])
    m32 = _holed(HOLES["corner"], dtype=torch.float32)
    assert m32.path == "exact-missing"
    assert_float32_agrees_with_float64(m64, m32)


def test_exact_missing_inverse_on_demand():
    """The posterior's products need only L: G⁻¹ is formed on first use (the gradient's)."""
    gp = _holed(HOLES["corner"])
    factors = [f.detach() for f in gp._factors()]
    fm = FewMissing(KronEigen(factors), gp.outputscale.detach(), gp.noise.detach(), ~gp.observed)
    assert fm._ginv is None
    assert rel_err(fm.ginv @ fm.G, torch.eye(fm.m, dtype=fm.G.dtype)) <= 1e-12
    assert abs(float(fm.logdet_g) - float(torch.logdet(fm.G))) <= 1e-12 * abs(float(fm.logdet_g))


@pytest.mark.parametrize("terms, r", [(1, 1), (3, 2), (12, 6), (5, 7)])
def test_hankel_spread_builds_the_block_hankel_of_the_spread_sums(terms, r):
    """``t.reshape(-1)[index] * half`` equals the block Hankel matrix of the ``T_q`` spread from
    their folded pairs (off-diagonal pairs doubled), built here entry by entry."""
    g = torch.Generator().manual_seed(terms * 10 + r)
    first, second, _ = few_missing.pair_maps(r)
    t = torch.randn(2 * terms + 1, first.numel(), generator=g, dtype=torch.float64)
    index, half = few_missing._hankel_spread(terms, r, torch.device("cpu"), torch.float64)
    h = t.reshape(-1)[index] * half
    ref = torch.empty((terms + 1) * r, (terms + 1) * r, dtype=torch.float64)
    pair = {(int(a), int(b)): p for p, (a, b) in enumerate(zip(first, second))}
    for k in range(terms + 1):
        for l in range(terms + 1):
            for c in range(r):
                for d in range(r):
                    value = t[k + l, pair[(min(c, d), max(c, d))]]
                    ref[k * r + c, l * r + d] = value if c == d else 0.5 * value
    assert rel_err(h, ref) <= 1e-15


def _system(gp):
    factors = [f.detach() for f in gp._factors()]
    return FewMissing(KronEigen(factors), gp.outputscale.detach(), gp.noise.detach(), ~gp.observed)


def test_square_pool_reuses_buffers_only_when_free():
    """A step's G, L and G⁻¹ reuse the previous step's buffers once it is collected; never a buffer
    that is still held (a live FewMissing, or a tensor a caller kept), and the results stay exact."""
    import gc

    gp = _holed(HOLES["corner"])
    gc.collect()
    few_missing._POOL._free.clear()  # other tests' buffers of this size
    first = _system(gp)
    first.ginv  # noqa: B018 (formed on first use)
    ptrs = {first.G.data_ptr(), first.L.data_ptr(), first.ginv.data_ptr()}
    second = _system(gp)  # the first is alive: buffers of its own
    second.ginv  # noqa: B018
    assert not ptrs & {second.G.data_ptr(), second.L.data_ptr(), second.ginv.data_ptr()}
    ref_ginv = second.ginv.clone()
    del first
    gc.collect()
    third = _system(gp)  # the first's buffers, free now
    assert {third.G.data_ptr(), third.L.data_ptr(), third.ginv.data_ptr()} == ptrs
    assert rel_err(third.ginv, ref_ginv) <= 1e-14 and rel_err(second.ginv, ref_ginv) == 0.0
    kept = third.G  # a caller keeps one: it stays the caller's
    kept_values = kept.clone()
    del third, second
    gc.collect()
    fourth = _system(gp)
    fourth.ginv  # noqa: B018
    assert fourth.G.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_values)
    assert rel_err(fourth.ginv @ fourth.G, torch.eye(fourth.m, dtype=fourth.G.dtype)) <= 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_inverse_from_cholesky_on_cuda(dtype, monkeypatch):
    """The split on a GPU (triangular solves and GEMMs of cuBLAS/cuSOLVER) against the exact inverse;
    the CPU buffer pool keeps no device memory."""
    monkeypatch.setattr(few_missing, "INVERSE_LEAF", 16)
    g, exact = spd(101, 1e3, seed=2)
    L = torch.linalg.cholesky(g.to(dtype).cuda())
    inv = inverse_from_cholesky(L)
    assert inv.is_cuda and inv.dtype == dtype
    assert rel_err(inv.cpu(), exact) <= (1e-12 if dtype == torch.float64 else 5e-4)
    few_missing._POOL.give_back([torch.empty(4, 4, device="cuda")])
    assert all(b.device.type == "cpu" for free in few_missing._POOL._free.values() for b in free)
