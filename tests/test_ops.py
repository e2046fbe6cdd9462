"""kron_matmul / matmul_kron against dense Kronecker products built with torch.kron."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronegp
from kronegp.reference import kron_dense
from _helpers import dense_kron, rel_err

TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    # Keep ΠP, ΠQ small enough for a dense reference.
    ps, qs = [], []
    for _ in range(n):
        ps.append(draw(st.integers(1, 7)))
        qs.append(draw(st.integers(1, 7)))
        while math.prod(ps) * math.prod(qs) > 4000:
            ps[-1], qs[-1] = max(1, ps[-1] // 2), max(1, qs[-1] // 2)
            if ps[-1] == 1 and qs[-1] == 1:
                break
    x_batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    factor_batched = draw(st.booleans())
    rows = draw(st.sampled_from([1, 2, 5]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return ps, qs, x_batch, factor_batched, rows, dtype, seed


def make_factors(ps, qs, batch, factor_batched, dtype, gen):
    factors = []
    for i, (p, q) in enumerate(zip(ps, qs)):
        fb = batch[-1:] if (factor_batched and batch and i % 2 == 0) else ()
        factors.append(torch.randn(*fb, p, q, dtype=dtype, generator=gen))
    return factors


@settings(max_examples=120, deadline=None)
@given(problems())
def test_matmul_kron_matches_dense(problem):
    ps, qs, x_batch, factor_batched, m, dtype, seed = problem
    gen = torch.Generator().manual_seed(seed)
    factors = make_factors(ps, qs, x_batch, factor_batched, dtype, gen)
    dense = dense_kron([f.double() for f in factors])
    for _ in range(2):  # the repeat (fresh data, same signature) skips the checks: same answer
        x = torch.randn(*x_batch, m, math.prod(ps), dtype=dtype, generator=gen)
        y = kronegp.matmul_kron(x, factors)
        expected = x.double() @ dense
        assert y.shape == expected.shape and y.dtype == dtype
        assert rel_err(y, expected) < TOL[dtype]


@settings(max_examples=120, deadline=None)
@given(problems())
def test_kron_matmul_matches_dense(problem):
    ps, qs, x_batch, factor_batched, t, dtype, seed = problem
    gen = torch.Generator().manual_seed(seed)
    factors = make_factors(ps, qs, x_batch, factor_batched, dtype, gen)
    dense = dense_kron([f.double() for f in factors])
    for _ in range(2):  # the repeat (fresh data, same signature) skips the checks: same answer
        x = torch.randn(*x_batch, math.prod(qs), t, dtype=dtype, generator=gen)
        y = kronegp.kron_matmul(factors, x)
        expected = dense @ x.double()
        assert y.shape == expected.shape and y.dtype == dtype
        assert rel_err(y, expected) < TOL[dtype]


def test_kron_dense_helper_matches_torch_kron():
    gen = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 3, 4, generator=gen), torch.randn(1, 2, 5, generator=gen)]
    assert rel_err(kron_dense(fs), dense_kron(fs)) < 1e-6


def test_vectors_and_many_factors():
    gen = torch.Generator().manual_seed(1)
    factors = [torch.randn(2, 2, dtype=torch.float64, generator=gen) for _ in range(16)]
    factors[3] = torch.randn(1, 2, dtype=torch.float64, generator=gen)
    k_in, k_out = 2**16, 2**15
    x = torch.randn(k_in, dtype=torch.float64, generator=gen)
    # (⊗F)·x against the vector x·(⊗Fᵀ): two independent paths of the same product.
    y1 = kronegp.kron_matmul(factors, x)
    y2 = kronegp.matmul_kron(x, [f.mT for f in factors])
    assert y1.shape == (k_out,) and y2.shape == (k_out,)
    assert rel_err(y1, y2) < 1e-12
    # and against a dense product on a few leading factors
    small = factors[:5]
    xs = torch.randn(math.prod(f.shape[1] for f in small), dtype=torch.float64, generator=gen)
    assert rel_err(kronegp.kron_matmul(small, xs), dense_kron(small) @ xs) < 1e-12


def test_strided_input_is_not_required_contiguous():
    gen = torch.Generator().manual_seed(2)
    factors = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64)]
    x = torch.randn(15, 9, generator=gen, dtype=torch.float64).mT  # (9, 15), not contiguous
    assert rel_err(kronegp.matmul_kron(x, factors), x @ dense_kron(factors)) < 1e-12
    x2 = torch.randn(7, 8, generator=gen, dtype=torch.float64).mT  # (8, 7)
    assert rel_err(kronegp.kron_matmul(factors, x2), dense_kron(factors) @ x2) < 1e-12


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(3)
    factors = [torch.randn(3, 3, generator=gen), torch.randn(4, 2, generator=gen)]
    x = torch.randn(5, 12, generator=gen)
    copies = [f.clone() for f in factors], x.clone()
    kronegp.matmul_kron(x, factors)
    assert torch.equal(x, copies[1]) and all(torch.equal(a, b) for a, b in zip(factors, copies[0]))


def test_nan_and_inf_propagate_like_ieee():
    factors = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.5], [2.0, 1.0]])]
    x = torch.tensor([[1.0, float("nan"), 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [float("inf"), 1.0, 1.0, 1.0]])
    y = kronegp.matmul_kron(x, factors)
    expected = x @ dense_kron(factors)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
    assert torch.equal(torch.isinf(y[2]), torch.isinf(expected[2]))
    assert rel_err(y[1], expected[1]) < 1e-6


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "shapes,x_batch,fbatch",
    [
        ([(3, 2)], (), ()),
        ([(2, 3), (3, 2), (1, 2)], (2,), ()),
        ([(2, 2), (3, 4)], (2, 1), (3,)),
        ([(4, 1), (2, 3), (2, 2)], (), (2,)),
    ],
)
@pytest.mark.parametrize("op", ["matmul_kron", "kron_matmul"])
def test_gradcheck(shapes, x_batch, fbatch, op):
    gen = torch.Generator().manual_seed(4)
    factors = [
        torch.randn(*(fbatch if i == 0 else ()), p, q, dtype=torch.float64, generator=gen).requires_grad_()
        for i, (p, q) in enumerate(shapes)
    ]
    ptot, qtot = math.prod(p for p, _ in shapes), math.prod(q for _, q in shapes)
    if op == "matmul_kron":
        x = torch.randn(*x_batch, 3, ptot, dtype=torch.float64, generator=gen, requires_grad=True)
        fn = lambda x, *fs: kronegp.matmul_kron(x, list(fs))  # noqa: E731
    else:
        x = torch.randn(*x_batch, qtot, 2, dtype=torch.float64, generator=gen, requires_grad=True)
        fn = lambda x, *fs: kronegp.kron_matmul(list(fs), x)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *factors))


def test_gradient_matches_dense_autograd():
    gen = torch.Generator().manual_seed(5)
    fs = [torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3)]
    x = torch.randn(2, 64, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 27, 5, dtype=torch.float64, generator=gen)
    (kronegp.kron_matmul(fs, x) * w).sum().backward()
    ours = [f.grad.clone() for f in fs] + [x.grad.clone()]
    for t in fs + [x]:
        t.grad = None
    ((dense_kron(fs) @ x) * w).sum().backward()
    for a, b in zip(ours, [f.grad for f in fs] + [x.grad]):
        assert rel_err(a, b) < 1e-12


def test_gradient_only_for_requested_inputs():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 3, generator=gen, requires_grad=True)
    b = torch.randn(2, 2, generator=gen)
    x = torch.randn(4, 6, generator=gen)
    kronegp.matmul_kron(x, [a, b]).sum().backward()
    assert a.grad is not None and b.grad is None and x.grad is None


# --------------------------------------------------------------------------- compile / func


def test_torch_compile_matches_eager():
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(5, 2, generator=gen)
    x = torch.randn(6, 15, generator=gen)

    def f(x, a, b):
        y = kronegp.matmul_kron(x, [a, b])  # (6, 8)
        return kronegp.kron_matmul([a, b], y.mT)  # (15, 6)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, a, b), f(x, a, b)) < 1e-6
    # and with gradients flowing through both ops
    a.requires_grad_()
    x.requires_grad_()
    compiled(x, a, b).pow(2).sum().backward()
    ga, gx = a.grad.clone(), x.grad.clone()
    a.grad = x.grad = None
    f(x, a, b).pow(2).sum().backward()
    assert rel_err(ga, a.grad) < 1e-5 and rel_err(gx, x.grad) < 1e-5


def test_torch_func_grad_and_vmap():
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 3, dtype=torch.float64, generator=gen), torch.randn(2, 2, dtype=torch.float64, generator=gen)
    x = torch.randn(6, dtype=torch.float64, generator=gen)
    g = torch.func.grad(lambda a: kronegp.matmul_kron(x, [a, b]).pow(2).sum())(a)
    a2 = a.clone().requires_grad_()
    kronegp.matmul_kron(x, [a2, b]).pow(2).sum().backward()
    assert rel_err(g, a2.grad) < 1e-12


# --------------------------------------------------------------------------- bad input


def test_errors_name_the_argument():
    a, b = torch.randn(3, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"ΠP_i = 15.*got x.shape\[-1\] = 16"):
        kronegp.matmul_kron(torch.randn(2, 16), [a, b])
    with pytest.raises(ValueError, match=r"ΠQ_i = 8.*got x.shape\[-2\] = 9"):
        kronegp.kron_matmul([a, b], torch.randn(9, 2))
    with pytest.raises(ValueError, match=r"factors\[1\] must be a matrix"):
        kronegp.matmul_kron(torch.randn(2, 15), [a, torch.randn(5)])
    with pytest.raises(ValueError, match="at least one"):
        kronegp.kron_matmul([], torch.randn(1, 1))
    with pytest.raises(TypeError, match=r"factors\[0\] has dtype torch.float64 but x has dtype torch.float32"):
        kronegp.matmul_kron(torch.randn(2, 15), [a.double(), b])
    with pytest.raises(TypeError, match="float32 or float64"):
        kronegp.matmul_kron(torch.randn(2, 15).half(), [a.half(), b.half()])
    with pytest.raises(TypeError, match="list or tuple"):
        kronegp.matmul_kron(torch.randn(2, 15), a)
    with pytest.raises(TypeError, match=r"factors\[1\] must be a torch.Tensor"):
        kronegp.matmul_kron(torch.randn(2, 15), [a, b.numpy()])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kronegp.kron_matmul([a, b], [[1.0]])
    with pytest.raises(ValueError, match="batch dimensions do not broadcast"):
        kronegp.matmul_kron(torch.randn(3, 2, 15), [torch.randn(2, 3, 4), b])


def test_mixed_devices_rejected():
    a = torch.randn(2, 2)
    x = torch.randn(1, 2, device="meta")
    with pytest.raises(ValueError, match=r"factors\[0\] is on cpu but x is on meta"):
        kronegp.matmul_kron(x, [a])


def test_torch_func_vmap_matches_loop():
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(4, 3, 2, dtype=torch.float64, generator=gen)  # vmapped factor
    b = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    xs = torch.randn(4, 5, 6, dtype=torch.float64, generator=gen)  # vmapped x
    out = torch.func.vmap(lambda x, a: kronegp.matmul_kron(x, [a, b]))(xs, a)
    loop = torch.stack([xs[i] @ dense_kron([a[i], b]) for i in range(4)])
    assert rel_err(out, loop) < 1e-12
    xs2 = torch.randn(6, 3, 4, dtype=torch.float64, generator=gen)  # vmapped over dim 2
    out2 = torch.func.vmap(lambda x: kronegp.kron_matmul([a[0], b], x), in_dims=2)(xs2)
    loop2 = torch.stack([dense_kron([a[0], b]) @ xs2[:, :, i] for i in range(4)])
    assert rel_err(out2, loop2) < 1e-12


# --------------------------------------------------------------------------- repeated calls


def test_a_repeated_call_is_checked_once(monkeypatch):
    # The door remembers the signature of a call whose checks passed: a repeat with fresh data
    # skips them, and the backend gets one signature object per signature (its plan key).
    from kronegp import device, ops

    monkeypatch.setattr(ops, "_checked", {})
    checked, seen = [], []
    real_check = ops.check_factors
    monkeypatch.setattr(ops, "check_factors", lambda fs: checked.append(1) or real_check(fs))
    real_backend = device.backend_for

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def kron_matmul(self, factors, x, precision="highest", *, signature=None):
            seen.append(signature)
            return self.inner.kron_matmul(factors, x, precision, signature=signature)

        def matmul_kron(self, x, factors, precision="highest", *, signature=None):
            seen.append(signature)
            return self.inner.matmul_kron(x, factors, precision, signature=signature)

    monkeypatch.setattr(device, "backend_for", lambda x: Spy(real_backend(x)))
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(7, 3, generator=gen), torch.randn(2, 5, generator=gen)
    dense = dense_kron([a.double(), b.double()])
    for _ in range(3):
        x = torch.randn(4, 14, generator=gen)
        assert rel_err(kronegp.matmul_kron(x, [a, b]), x.double() @ dense) < TOL[torch.float32]
    assert len(checked) == 1 and len(seen) == 3 and seen[0] is seen[1] is seen[2] is not None
    # other strides of x, a vector x, the other side: other signatures, each checked once, each right
    xt = torch.randn(14, 4, generator=gen).mT
    assert rel_err(kronegp.matmul_kron(xt, [a, b]), xt.double() @ dense) < TOL[torch.float32]
    v, w = torch.randn(14, generator=gen), torch.randn(15, generator=gen)
    for _ in range(2):
        assert rel_err(kronegp.matmul_kron(v, (a, b)), v.double() @ dense) < TOL[torch.float32]
        assert rel_err(kronegp.kron_matmul([a, b], w), dense @ w.double()) < TOL[torch.float32]
    assert len(checked) == 4 and seen[3] is not seen[0] and seen[-1] is seen[-3] and seen[-2] is seen[-4]


def test_bad_input_is_named_after_a_good_call_of_the_same_shapes(monkeypatch):
    # A remembered signature holds dtype, device and type of every operand: a bad call that
    # agrees with a good one in shapes still meets the checks and their messages.
    from kronegp import ops

    monkeypatch.setattr(ops, "_checked", {})
    a, b = torch.randn(3, 4), torch.randn(5, 2)
    x = torch.randn(2, 15)
    for _ in range(2):
        kronegp.matmul_kron(x, [a, b])
    with pytest.raises(TypeError, match=r"factors\[0\] has dtype torch.float64 but x has dtype torch.float32"):
        kronegp.matmul_kron(x, [a.double(), b])
    with pytest.raises(TypeError, match=r"x must be float32 or float64|factors\[0\] has dtype"):
        kronegp.matmul_kron(x.double(), [a, b])
    with pytest.raises(ValueError, match=r"factors\[1\] is on meta but x is on cpu"):
        kronegp.matmul_kron(x, [a, b.to("meta")])
    with pytest.raises(TypeError, match=r"factors\[1\] must be a torch.Tensor"):
        kronegp.matmul_kron(x, [a, b.numpy()])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kronegp.matmul_kron(x.numpy(), [a, b])
    with pytest.raises(TypeError, match="list or tuple"):
        kronegp.matmul_kron(x, (f for f in [a, b]))
    with pytest.raises(ValueError, match="precision must be one of"):
        kronegp.matmul_kron(x, [a, b], precision="low")
    with pytest.raises(ValueError, match="precision must be one of"):
        kronegp.matmul_kron(x, [a, b], precision=["high"])  # unhashable: no signature, still named
    with pytest.raises(ValueError, match=r"ΠP_i = 15.*got x.shape\[-1\] = 16"):
        kronegp.matmul_kron(torch.randn(2, 16), [a, b])


def test_a_remembered_signature_keeps_gradients_and_grad_mode():
    # Whether an operand requires grad is part of the signature; grad mode is read every call.
    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(3, 3, dtype=torch.float64, generator=gen), torch.randn(4, 2, dtype=torch.float64, generator=gen)
    x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    for _ in range(2):
        assert kronegp.kron_matmul([a, b], x).grad_fn is None
    a.requires_grad_()
    for _ in range(2):
        y = kronegp.kron_matmul([a, b], x)
        assert y.grad_fn is not None
        (ga,) = torch.autograd.grad(y.square().sum(), a)
        a_ref = a.detach().clone().requires_grad_()
        (dense_kron([a_ref, b]) @ x).square().sum().backward()
        assert rel_err(ga, a_ref.grad) < 1e-12
        with torch.no_grad():
            assert kronegp.kron_matmul([a, b], x).grad_fn is None
