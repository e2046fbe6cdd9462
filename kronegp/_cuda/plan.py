"""Which kernel runs which factors with which tile: :func:`plan_tiles`, and the kernel specs.

All products are planned in the row form ``y = x·(G_1 ⊗ … ⊗ G_N)``: every row of ``x`` (``M``
rows of ``K = ΠP_i`` elements) is multiplied independently. (``(⊗F)·x`` is the same with rows =
columns of ``x`` and ``G_i = F_iᵀ``.) The kernels apply the factors last to first, each launch
a group of consecutive factors, in FastKron's rotated order::

    x[m, s·PG + pg]  →  y[m, qg·S + s] = Σ_pg x[m, s·PG + pg] · (G_a ⊗ … ⊗ G_b)[pg, qg]

with ``PG = ΠP``, ``QG = ΠQ`` over the group and ``S = K_in / PG``. After the first group
has run the row is ordered ``(qg_last, p_1, …)``; after all of them it is ``(q_1, …, q_N)``.

Two kernels exist (sources in ``cuda_ext/``):

* :class:`FusedSpec` — several small factors (P, Q ≤ 32) of a tile held in shared memory: one
  pass over device memory for the whole group. Memory-bound regime.
* :class:`GemmSpec` — one factor of any size as a register-tiled GEMM with the rotated store.
  Compute-bound regime (P ≥ 64) and factors too large to fuse.

Everything here is plain Python (no GPU): CI plans and compiles every spec on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "FusedSpec", "GemmSpec", "TransposeSpec", "TRANSPOSE_MAX_D", "Step", "plan_tiles", "FUSE_MAX", "MAX_FUSED", "Rates", "PathChoice",
    "choose_path", "predict_fused_plan", "predict_axis_plan", "fused_mma",
]

#: Largest P or Q that the fused kernel takes (its factors live whole in shared memory).
FUSE_MAX = 32
#: Most factors one fused launch applies (the kernel's argument block holds this many).
MAX_FUSED = 8

_CTYPE = {4: "float", 8: "double"}


def kernel_source(name: str, itemsize: int, members: str, template: str, threads: int,
                  args: str = "KronArgs", checks: str = "") -> str:
    """The CUDA source of one specialisation: ``struct Spec`` (element type ``T`` and
    ``members``, C++ declarations) in a namespace of its own, optional ``checks`` there
    (static_asserts against the Python side), and the ``extern "C"`` entry ``name`` that runs
    ``template<Spec>`` on its one by-value argument struct ``args``."""
    body = "".join(f"    {line}\n" for line in members.strip().splitlines())
    return f"""
namespace {name}_ns {{
struct Spec {{
    typedef {_CTYPE[itemsize]} T;
{body}}};
{checks}}}
extern "C" __global__ void __launch_bounds__({threads}) {name}(const {args} a) {{
    {template}<{name}_ns::Spec>(a);
}}
"""


def _b(v: bool) -> str:
    return "true" if v else "false"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


# --------------------------------------------------------------------------- fused kernel


@dataclass(frozen=True)
class FusedSpec:
    """A fused launch: factors ``(P[i], Q[i])`` applied to tiles of ``TM`` rows × ``TS`` slices."""

    itemsize: int
    P: tuple[int, ...]
    Q: tuple[int, ...]
    TM: int
    TS: int
    NT: int
    in_col: bool  # x's rows are its contiguous axis (x[m, k] at m + k·ld): load m-fastest
    out_col: bool
    in_vec: bool = False  # 16-byte global loads (set per launch from pointer/stride alignment)
    out_vec: bool = False  # 16-byte global stores
    #: products on the tensor cores (sm_80+, :func:`fused_mma`): 0 FMA; 1 DMMA (float64) or TF32
    #: (float32 "medium"); 3 split TF32 (float32 "high")
    mma: int = 0

    kind = "fused"

    # The geometry below mirrors FusedGeom in cuda_ext/kron_fused.cuh; the generated source
    # static_asserts that both agree on the shared-memory size.
    @property
    def vec(self) -> int:
        return 16 // self.itemsize

    def rows(self, f: int) -> int:
        return self.TS * math.prod(self.P[:f]) * math.prod(self.Q[f + 1 :])

    def ld(self, f: int) -> int:
        return self.P[f] + 1 if self.P[f] % 2 == 0 else self.P[f]

    def rq(self, f: int) -> int:
        q, v = self.Q[f], self.vec
        return v if q <= v else (2 * v if q <= 2 * v else min(8, _round_up(q, v)))

    def mstride(self, words: int, col: bool) -> int:
        """Words between tile rows m of a layout (FusedGeom::mstride: column layouts padded to
        ≡ 2 or 6 mod 8 words, so the m of one warp access fall in distinct banks)."""
        if not col or self.TM == 1:
            return words
        while words % 8 not in (2, 6):
            words += 1
        return words

    def buf_elems(self) -> int:
        nf = len(self.P)
        sizes = [self.TM * self.mstride(self.TS * math.prod(self.Q), self.out_col)]
        sizes += [self.TM * self.mstride(self.rows(f) * self.ld(f), f == nf - 1 and self.in_col) for f in range(nf)]
        return _round_up(max(sizes), self.vec)

    def factor_elems(self) -> int:
        total = sum(p * _round_up(q, self.rq(f)) for f, (p, q) in enumerate(zip(self.P, self.Q)))
        return _round_up(total, self.vec)

    @property
    def smem_bytes(self) -> int:
        return (self.factor_elems() + 2 * self.buf_elems()) * self.itemsize

    @property
    def PG(self) -> int:
        return math.prod(self.P)

    @property
    def QG(self) -> int:
        return math.prod(self.Q)

    def grid(self, m: int, s: int) -> tuple[int, int]:
        return _cdiv(m, self.TM) * _cdiv(s, self.TS), 1

    def vectorized(self, m, s, x_ptr, xb, xm, xk, y_ptr, yb, ym, yk) -> "FusedSpec":
        """This spec with 16-byte global loads/stores where the operands' alignment allows."""
        v = self.vec
        if self.in_col:
            iv = xm == 1 and xk % v == 0 and self.TM % v == 0 and m % v == 0
        else:
            iv = xk == 1 and (xm % v == 0 or m == 1) and self.PG % v == 0
        iv = iv and xb % v == 0 and x_ptr % 16 == 0
        if self.out_col:
            ov = ym == 1 and yk % v == 0 and self.TM % v == 0 and m % v == 0
        else:
            ov = yk == 1 and (ym % v == 0 or m == 1) and self.TS % v == 0 and s % v == 0
        ov = ov and yb % v == 0 and y_ptr % 16 == 0
        if (iv, ov) == (self.in_vec, self.out_vec):
            return self
        return FusedSpec(self.itemsize, self.P, self.Q, self.TM, self.TS, self.NT, self.in_col,
                         self.out_col, iv, ov, self.mma)

    def source(self, name: str) -> str:
        nf = len(self.P)
        ps = ", ".join(map(str, self.P))
        qs = ", ".join(map(str, self.Q))
        members = f"""
static constexpr int NF = {nf};
static constexpr int P[{nf}] = {{{ps}}};
static constexpr int Q[{nf}] = {{{qs}}};
static constexpr int TM = {self.TM}, TS = {self.TS}, NT = {self.NT};
static constexpr bool IN_COL = {_b(self.in_col)}, OUT_COL = {_b(self.out_col)};
static constexpr bool IN_VEC = {_b(self.in_vec)}, OUT_VEC = {_b(self.out_vec)};
static constexpr int MMA = {self.mma};
"""
        check = (f"static_assert(FusedGeom<Spec>::smem_elems() * sizeof({_CTYPE[self.itemsize]}) == "
                 f"{self.smem_bytes}, \"smem size mismatch\");\n")
        return kernel_source(name, self.itemsize, members, "kron_fused", self.NT, checks=check)


# --------------------------------------------------------------------------- GEMM kernel


@dataclass(frozen=True)
class GemmSpec:
    """A single-factor launch as a GEMM over rows (m, s) with block tile ``BR × BQ``."""

    itemsize: int
    P: int
    Q: int
    BR: int
    BQ: int
    KC: int
    TR: int
    TQ: int
    in_col: bool
    out_col: bool
    mma: int = 0  # as FusedSpec.mma: the products on the tensor cores

    kind = "gemm"

    @property
    def NT(self) -> int:
        return (self.BR // self.TR) * (self.BQ // self.TQ)

    @property
    def m_fast(self) -> bool:
        return self.in_col or self.out_col

    @property
    def smem_bytes(self) -> int:
        vec = 16 // self.itemsize
        ldb = self.BQ + (8 if self.mma else 0)  # kron_gemm.cuh's LDB
        return self.KC * ((self.BR + vec) + ldb) * self.itemsize

    @property
    def PG(self) -> int:
        return self.P

    @property
    def QG(self) -> int:
        return self.Q

    def grid(self, m: int, s: int) -> tuple[int, int]:
        return _cdiv(m * s, self.BR), _cdiv(self.Q, self.BQ)

    def vectorized(self, *args) -> "GemmSpec":
        return self

    def source(self, name: str) -> str:
        members = f"""
static constexpr int P = {self.P}, Q = {self.Q};
static constexpr int BR = {self.BR}, BQ = {self.BQ}, KC = {self.KC}, TR = {self.TR}, TQ = {self.TQ};
static constexpr int NT = {self.NT};
static constexpr bool IN_COL = {_b(self.in_col)}, OUT_COL = {_b(self.out_col)}, M_FAST = {_b(self.m_fast)};
static constexpr int MMA = {self.mma};
"""
        return kernel_source(name, self.itemsize, members, "kron_gemm", self.NT)


def _gemm_spec(itemsize: int, p: int, q: int, in_col: bool, out_col: bool, mma: int = 0) -> GemmSpec:
    if itemsize == 4:
        tq = 8 if q > 8 else 4
        tr = 8
    else:
        tq = 4 if q > 2 else 2
        tr = 4
    # Columns per block: the factor's width rounded up to whole thread tiles, at most 128.
    bq = min(128 if itemsize == 4 else 64, _round_up(q, tq * 4)) if q > tq else tq
    ntq = bq // tq
    ntr = 256 // ntq
    br = ntr * tr
    kc_max = 16 if itemsize == 4 else 8
    kc = min(kc_max, max(1, 2048 // br), p)
    if mma:
        # whole MMA steps per stage (8 deep for TF32, 4 for DMMA) and whole 8-column tiles
        # (TF32: one step per stage; 16 deep spilled on the 128 × 128 tiles, 255 registers)
        kt = 8 if itemsize == 4 else 4
        kc = kt if itemsize == 4 else max(kt, kc // kt * kt)
        warps, mt = ntr * ntq // 32, 16 if itemsize == 4 else 8
        if bq % 8 or (ntr * ntq) % 32 or br % warps or (br // warps) % mt:
            mma = 0  # this tile does not split into warp MMA tiles: FMA
    return GemmSpec(itemsize, p, q, br, bq, kc, tr, tq, in_col, out_col, mma)


# --------------------------------------------------------------------------- transpose kernel

#: Largest short side the transpose kernel takes (its tile of TILE × D elements is static smem).
TRANSPOSE_MAX_D = 32


@dataclass(frozen=True)
class TransposeSpec:
    """Wide ``(D, N)`` → tall ``(N, D)`` transpose, ``D`` ≤ :data:`TRANSPOSE_MAX_D`, one block
    per ``TILE`` rows (``cuda_ext/kron_transpose.cuh``)."""

    itemsize: int
    D: int
    TILE: int = 128
    NT: int = 256

    kind = "transpose"
    smem_bytes = 0  # static shared memory only

    def grid(self, n: int) -> tuple[int, int]:
        return _cdiv(n, self.TILE), 1

    def source(self, name: str) -> str:
        members = f"""
static constexpr int D = {self.D}, TILE = {self.TILE}, NT = {self.NT};
"""
        return kernel_source(name, self.itemsize, members, "kron_transpose", self.NT)


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Step:
    """One launch: factors ``first … first+len-1`` (row-form indices) by ``spec``."""

    first: int
    count: int
    spec: FusedSpec | GemmSpec
    k_in: int  # row length before the step
    s: int  # slices per row: k_in / PG

    @property
    def k_out(self) -> int:
        return self.s * self.spec.QG


def fused_mma(itemsize: int, precision: str, arch: int, enabled: bool) -> int:
    """The fused kernel's product unit (:attr:`FusedSpec.mma`) for a dtype size, float32
    ``precision`` and GPU architecture (e.g. 90): tensor cores only where ``enabled`` (opt-in,
    ``KRONEGP_FUSED_MMA=1``, until the device timings show they pay) and the GPU has them for
    this type (sm_80+: fp64 DMMA, TF32); float32 ``"highest"`` always FMA (exact)."""
    if not enabled or arch < 80:
        return 0
    if itemsize == 8:
        return 1
    return {"highest": 0, "high": 3, "medium": 1}[precision]


def _fused_tile(itemsize, ps, qs, m, s, in_col, out_col, smem_budget, target_elems, mma=0):
    """The largest (TM, TS) within budget for a fused group, or None if even the least fails."""
    elem_run = 32 // itemsize  # a 32-byte sector of consecutive elements
    if in_col or out_col:
        tm_opts = [t for t in (32, 16, 8, 4, 2, 1) if t <= max(1, min(m, 32))]
        if m <= 32:
            tm_opts = [m]  # the whole row range: the tile is one contiguous span of memory
        ts_opts = [1, 2, 4, 8, 16, 32, 64, 128]
    else:
        tm_opts = [1]
        ts_opts = [128, 64, 32, 16, 8, 4, 2, 1]
    # Threads per block: each thread of a step holds up to 4 rows × RQ columns of outputs, and
    # with 256 threads a 4096-element tile gives it only 2 rows, where its shared-memory loads
    # keep pace with its FMAs (two rows of `a` and RQ factor values per RQ·2 FMAs). float64
    # halves the rate of both, and its 8-byte row loads take two wavefronts each: with 128
    # threads (4 rows each) the 16² row pass of (1024, 16^4) went 487 → 370 µs, 73 → 96 % of the
    # copy rate, 8^3 passes 72 → 88 %; float32 gained nothing in row layouts and lost 4–17 % in
    # column layouts (fewer loads in flight), so it keeps 256 (NOTES.md, "Fused kernel, round 5").
    nt = 128 if itemsize == 8 else 256
    best = None
    for tm in tm_opts:
        for ts in sorted(ts_opts):
            ts = min(ts, s)
            spec = FusedSpec(itemsize, tuple(ps), tuple(qs), tm, ts, nt, in_col, out_col, mma=mma)
            if spec.smem_bytes > smem_budget:
                break
            elems = tm * ts * max(spec.PG, spec.QG)
            run_ok = (tm >= min(m, elem_run)) if (in_col or out_col) else (ts >= min(s, elem_run))
            score = (run_ok, min(elems, target_elems), -elems)
            if best is None or score > best[0]:
                best = (score, spec)
            if elems >= target_elems and run_ok:  # past the target, but never short of a sector
                break
    return None if best is None else best[1]


def plan_tiles(
    shapes: Sequence[tuple[int, int]],
    m: int,
    itemsize: int,
    in_col: bool,
    out_col: bool,
    smem_budget: int = 100 * 1024,
    target_elems: int | None = None,
    mma: int = 0,
) -> list[Step]:
    """Plan ``x·(G_1 ⊗ … ⊗ G_N)`` for factor shapes ``shapes[i] = (P_i, Q_i)`` and ``m`` rows.

    Returns the launches in execution order (last factors first). Heuristic:

    * a factor with P or Q above :data:`FUSE_MAX` gets its own GEMM launch;
    * runs of small factors are fused greedily from the right, as many as fit a tile of at least
      one 32-byte sector of consecutive output (``TS`` slices in row layout, ``TM`` rows in
      column layout) within ``smem_budget`` bytes of shared memory; the tile then grows towards
      ``target_elems`` elements per buffer: 4096 (float64 in row layout: 2048), which keeps
      ~38 KB of shared memory per block and 4 blocks per SM (8192 gave 3 and ran 5–25% slower on
      the multi-pass cases: NOTES.md, "Fused kernel, round 3").

    ``in_col``/``out_col`` say that the rows of x / y are their contiguous axis (``(⊗F)·x``
    with ``x`` of shape ``(K, T)``); the intermediates follow the output's layout.
    """
    n = len(shapes)
    k_total = math.prod(p for p, _ in shapes)
    target = target_elems or (4096 if itemsize == 4 or in_col or out_col else 2048)
    steps: list[Step] = []
    dims = [p for p, _ in shapes]  # current size of each factor's axis (P before, Q after)
    i = n - 1
    cur_in_col = in_col
    while i >= 0:
        k_in = math.prod(dims)
        p, q = shapes[i]
        if p > FUSE_MAX or q > FUSE_MAX:
            spec = _gemm_spec(itemsize, p, q, cur_in_col, out_col, mma)
            steps.append(Step(i, 1, spec, k_in, k_in // p))
            dims[i] = q
            i -= 1
            cur_in_col = out_col
            continue
        group_first = i
        spec = _fused_tile(itemsize, [p], [q], m, k_in // p, cur_in_col, out_col, smem_budget, target, mma)
        if spec is None:
            raise ValueError(f"no fused tile fits {smem_budget} bytes for factor {(p, q)}")
        while group_first - 1 >= 0 and i - group_first + 1 < MAX_FUSED:
            pp, qq = shapes[group_first - 1]
            if pp > FUSE_MAX or qq > FUSE_MAX:
                break
            ps = [s[0] for s in shapes[group_first - 1 : i + 1]]
            qs = [s[1] for s in shapes[group_first - 1 : i + 1]]
            s_cand = k_in // math.prod(ps)
            cand = _fused_tile(itemsize, ps, qs, m, s_cand, cur_in_col, out_col, smem_budget, target, mma)
            if cand is None or not _runs_ok(cand, m, s_cand, itemsize):
                break
            spec = cand
            group_first -= 1
        s = k_in // spec.PG
        steps.append(Step(group_first, i - group_first + 1, spec, k_in, s))
        for j in range(group_first, i + 1):
            dims[j] = shapes[j][1]
        i = group_first - 1
        cur_in_col = out_col
    assert math.prod(dims) == math.prod(q for _, q in shapes) and steps[0].k_in == k_total
    return steps


def _runs_ok(spec: FusedSpec, m: int, s: int, itemsize: int) -> bool:
    """Does the tile still move whole 32-byte sectors (else fusing more costs bandwidth)?"""
    elem_run = 32 // itemsize
    if spec.in_col or spec.out_col:
        return spec.TM >= min(m, elem_run)
    return spec.TS >= min(s, elem_run)


# --------------------------------------------------------------------------- path choice


@dataclass(frozen=True)
class Rates:
    """What each way of computing achieves (H100 SXM, measured with benchmarks/kron_matmul.py).

    Only ratios between these decide a plan, except the per-launch host costs against
    whole-plan times;
    on another GPU the choice stays sensible as long as its copy/GEMM balance is similar.
    """

    copy_bytes_per_s: float = 2.9e12  # device-to-device copy, bytes read + written
    gemm_flops_per_s: tuple = ((4, 51e12), (8, 55e12))  # cuBLAS, TF32 off; fp64 on DMMA
    # cuBLAS float32 with TF32 on (H100 SXM: 495 TFLOP/s dense peak; a guess at what its GEMMs of
    # our shapes reach, not yet measured: benchmarks/kron_matmul.py --precisions reports it)
    tf32_gemm_flops_per_s: float = 250e12
    # one torch elementwise op of the split-TF32 path (host time per call; its bytes go at the
    # copy rate)
    elementwise_call_s: float = 8e-6
    gemm_bw_efficiency: float = 0.8  # a memory-bound cuBLAS GEMM moves bytes at this × copy
    # the fused kernel per pass: ~1.6 of 2.9 TB/s before its loads were batched (NOTES.md, round 3),
    # 11 % faster on average after (round 4: row-layout passes of 16^2 up to 2.4 TB/s)
    fused_bw_efficiency: float = 0.62
    # FFMA/DFMA with index overhead; float64 with 128 threads per block (round 5): 11.6 TFLOP/s in
    # the memory-bound 16^2 row pass, 10.7-14 in the compute-bound 32^2 passes
    fused_flops_per_s: tuple = ((4, 13.5e12), (8, 11e12))
    # column layouts ((⊗F)·x) reach ~0.75 of that (32^2 passes: 19 vs 26 TFLOP/s fp32, 10.7 vs 14
    # fp64); set per dtype so that (1024, 32^3) kron_matmul, the case on the edge, takes the path
    # that was faster in four runs: fused in fp32 (433-466 vs 443-498 µs), cuBLAS in fp64 (626-683
    # vs 728-823 µs)
    fused_col_rate_factor: tuple = ((4, 0.8), (8, 0.75))
    # cuda_ext/kron_gemm.cuh: ~5-6 TFLOP/s on the GP 64^3, T = 11 plan (14/10.5 on large M, where
    # cuBLAS wins anyway); a higher figure sent GP 64^3 to this path, 12-35% slower than cuBLAS
    own_gemm_flops_per_s: tuple = ((4, 6e12), (8, 5e12))
    transpose_bw_efficiency: float = 0.28  # torch's copy of (K, 11) to (11, K): ~0.8 TB/s measured
    own_transpose_bw_efficiency: float = 0.75  # cuda_ext/kron_transpose.cuh (D ≤ 32): ~2.2 TB/s measured
    # Host time per launch (benchmarks/kron_matmul.py --profile-host, H100 host): our kernels go
    # through a cached launch program (~70-115 µs for a 2-3 launch call, most of it fixed per
    # call); a cuBLAS GEMM through torch costs ~40-60 µs each (a 3-factor call: 117-186 µs).
    launch_s: float = 12e-6  # one of our kernels (fused, GEMM, transpose)
    gemm_call_s: float = 45e-6  # one torch/cuBLAS GEMM of the axis path
    # the rotating form's transpose call (TransposeSpec, context, launch): GP 64^3 T = 11 on the H100
    # host, 179 µs for 3 GEMMs + transpose against 141 µs for 3 GEMMs
    transpose_call_s: float = 40e-6

    def get(self, table: tuple, itemsize: int) -> float:
        return dict(table)[itemsize]


RATES = Rates()


def _gemm_shape_efficiency(rows: int, cols: int, inner: int) -> float:
    """Fraction of the GEMM rate cuBLAS reaches on a (rows × inner)·(inner × cols) product:
    tiles are ~128 wide, so a dimension shorter than that leaves the rest of the tile idle."""
    eff = 1.0
    for d in (rows, cols, inner):
        eff *= min(1.0, d / 128.0) ** 0.5
    return max(eff, 0.05)


def _gemm_seconds(flops: float, nbytes: float, eff: float, itemsize: int, rates: Rates,
                  precision: str = "highest", in_bytes: float = 0.0) -> float:
    """One cuBLAS GEMM call of the axis paths: the larger of its bytes at cuBLAS's share of the
    copy rate and its FLOPs at the GEMM rate times the shape efficiency ``eff``, plus the call's
    host time. float32 ``precision`` (:mod:`kronegp.precision`): ``"medium"`` one TF32 GEMM;
    ``"high"`` three, plus the split of the input (``in_bytes``: three elementwise passes that
    read it and write two parts)."""
    bw = rates.gemm_bw_efficiency * rates.copy_bytes_per_s
    if itemsize == 8 or precision == "highest":
        rate = rates.get(rates.gemm_flops_per_s, itemsize)
        return max(nbytes / bw, flops / (rate * eff)) + rates.gemm_call_s
    one = max(nbytes / bw, flops / (rates.tf32_gemm_flops_per_s * eff)) + rates.gemm_call_s
    if precision == "medium":
        return one
    split = 7 * in_bytes / rates.copy_bytes_per_s + 3 * rates.elementwise_call_s
    return 3 * one + split


def _factor_flops(shapes, m: int, order) -> list[float]:
    """FLOPs of each factor when applied in ``order`` (each axis holds P before, Q after)."""
    dims = [p for p, _ in shapes]
    out = [0.0] * len(shapes)
    for i in order:
        p, q = shapes[i]
        rest = math.prod(dims) // p
        out[i] = 2.0 * m * rest * p * q
        dims[i] = q
    return out


def predict_fused_plan(steps: Sequence[Step], shapes, m: int, itemsize: int, rates: Rates = RATES) -> float:
    """Seconds the fused-kernel plan should take: per launch, the larger of its bytes at the
    fused kernel's bandwidth and its FLOPs at its kernel's rate."""
    flops = _factor_flops(shapes, m, range(len(shapes) - 1, -1, -1))
    total = 0.0
    for st in steps:
        nbytes = m * (st.k_in + st.k_out) * itemsize
        f = sum(flops[st.first : st.first + st.count])
        if st.spec.kind == "fused":
            bw = rates.fused_bw_efficiency * rates.copy_bytes_per_s
            rate = rates.get(rates.fused_flops_per_s, itemsize)
            if st.spec.in_col or st.spec.out_col:
                rate *= rates.get(rates.fused_col_rate_factor, itemsize)
        else:
            bw = rates.gemm_bw_efficiency * rates.copy_bytes_per_s
            rate = rates.get(rates.own_gemm_flops_per_s, itemsize)
        total += max(nbytes / bw, f / rate) + rates.launch_s
    return total


def predict_axis_plan(shapes, m: int, itemsize: int, col: bool, rates: Rates = RATES,
                      precision: str = "highest", batch: int = 1) -> float:
    """Seconds the one-cuBLAS-GEMM-per-factor plan (:mod:`kronegp._cuda.axis_gemm`) should take.

    ``shapes`` in row form ``(I_i, O_i)``; ``col``: the ``m`` rows are the trailing (contiguous)
    axis of the natural layout (``kron_matmul``), else the leading one (``matmul_kron``).
    ``batch`` (``col`` only): the rows come as ``batch`` products of ``m / batch`` rows each, the
    grid axes between the batch index and the rows (``x (B, ΠI, T)``, ``m = B·T``): the batch
    leads and only ``T`` columns trail, so the last axis's GEMMs keep ``C = T`` however large the
    batch (counting the batch as trailing rows priced ``C = B·T``: NOTES.md, issue 23).
    """
    from kronegp._cuda.axis_gemm import axis_order

    ins = [p for p, _ in shapes]
    outs = [q for _, q in shapes]
    order = axis_order(ins, outs)
    dims = list(ins)
    lead, trail = (batch, m // batch) if col else (m, 1)
    total = 0.0
    for ax in order:
        i, o = dims[ax], outs[ax]
        a = lead * math.prod(dims[:ax])
        c = math.prod(dims[ax + 1 :]) * trail
        flops = 2.0 * a * o * i * c
        nbytes = (a * i * c + a * o * c + o * i) * itemsize
        if c == 1:
            eff = _gemm_shape_efficiency(a, o, i)
        elif a == 1:
            eff = _gemm_shape_efficiency(o, c, i)
        else:
            # a batch of (O × I)·(I × C): a short C (the T = 11 columns of a GP solve) costs more
            # than the square-root rule says (H100: 256³ with C = 11 ran at 0.24 of the GEMM rate, 128³
            # at ~0.2), measured against the tile cuBLAS picks, which is no wider than O (64³ with
            # C = 11 ran at ~0.3 of the rate: a 128-wide reference sent it to a slower path)
            eff = _gemm_shape_efficiency(o, 128, i) * min(1.0, c / min(128.0, max(o, 16))) ** 0.7
        total += _gemm_seconds(flops, nbytes, eff, itemsize, rates, precision, a * i * c * itemsize)
        dims[ax] = o
    return total


def predict_transposed_axis_plan(shapes, m: int, itemsize: int, rates: Rates = RATES,
                                 precision: str = "highest", batch: int = 1) -> float:
    """``kron_matmul`` by the rotating form (:func:`kronegp._cuda.axis_gemm.rotated_products`):
    one GEMM per factor, ``y(R, O) = x(I, R)ᵀ·Wᵀ`` with ``R`` all the other axes and the ``T``
    columns (every GEMM has that long side, where the natural-order plan gives the factor next to
    a short ``T`` a ``C = T`` side), then one transpose pass of the result ``(T, ΠO) → (ΠO, T)``.

    ``shapes`` in row form ``(I_i, O_i)`` (``I_i = Q_i`` of ``F_i``). ``batch``: the ``m`` rows
    are ``batch`` products of ``T = m / batch`` columns each (a batched GEMM per factor, ``R`` per
    product; one transpose of ``batch`` blocks ``(T, ΠO)``, by our kernel where ``T`` ≤
    :data:`TRANSPOSE_MAX_D`)."""
    t = m // batch
    size = m * math.prod(p for p, _ in shapes)
    total = 0.0
    for i, o in shapes:
        rest = size // i
        nbytes = (rest * (i + o) + i * o) * itemsize
        eff = _gemm_shape_efficiency(rest // batch, o, i)
        total += _gemm_seconds(2.0 * rest * i * o, nbytes, eff, itemsize, rates, precision, rest * i * itemsize)
        size = rest * o
    eff = rates.own_transpose_bw_efficiency if t <= TRANSPOSE_MAX_D else rates.transpose_bw_efficiency
    return total + 2 * size * itemsize / (eff * rates.copy_bytes_per_s) + rates.transpose_call_s


@dataclass(frozen=True)
class PathChoice:
    """``path``: ``"fused"`` (our kernels, ``steps``), ``"axis_gemm"`` (cuBLAS per factor) or
    ``"axis_gemm_t"`` (``kron_matmul`` only: one cuBLAS GEMM per factor in the rotating form, then
    one transpose pass)."""

    path: str
    steps: tuple
    predicted_fused_s: float
    predicted_axis_s: float
    predicted_axis_t_s: float = math.inf
    #: the float32 mode the cuBLAS paths run in: the asked one, or "highest" where exact float32
    #: is predicted faster than split TF32 (exact also meets "high"'s bound)
    axis_precision: str = "highest"

    @property
    def predicted_s(self) -> float:
        return {"fused": self.predicted_fused_s, "axis_gemm": self.predicted_axis_s,
                "axis_gemm_t": self.predicted_axis_t_s}[self.path]


def choose_path(
    shapes: Sequence[tuple[int, int]],
    m: int,
    itemsize: int,
    in_col: bool,
    out_col: bool,
    smem_budget: int = 100 * 1024,
    axis_ok: bool = True,
    force: str = "auto",
    rates: Rates = RATES,
    precision: str = "highest",
    batch: int = 1,
) -> PathChoice:
    """Pick the cheaper plan by the cost model: our fused kernels (:func:`plan_tiles`) or one
    cuBLAS GEMM per factor on natural-order axis views (``axis_ok``: the operands allow it).

    Both move ``bytes = m·(k_in + k_out)·itemsize`` per launch; the fused plan makes fewer
    launches (several factors per pass) at ~62% of copy bandwidth and 13.5 (fp32) / 11 (fp64)
    TFLOP/s (:class:`Rates`), the cuBLAS plan one pass per factor at ~80% of copy bandwidth and
    up to the full GEMM rate (fp64 on tensor cores). So runs of small factors (memory-bound, few
    passes) stay fused, and factors with P ≳ 32 (compute-bound) go to cuBLAS. ``force`` (``"fused"``,
    ``"axis_gemm"``) overrides the choice for benchmarks and tests.

    ``precision`` (float32, :mod:`kronegp.precision`): the cuBLAS paths run ``"medium"`` as TF32
    and ``"high"`` as split TF32 (or exact float32 where that is predicted faster:
    ``axis_precision``), priced at the TF32 rate; the fused kernels are exact float32 in every
    mode (their FMA rate whatever was asked).

    ``batch``: the call's broadcast batch size, ``m`` counting the rows of all its products
    (``m = batch · rows``). It does not change the bytes or FLOPs, but it does change the GEMMs
    of a batched ``kron_matmul`` (``out_col``): its ``x (B, ΠQ, T)`` has the batch *leading*,
    so the natural-order path still multiplies the last axis by ``T``-column GEMMs, and the
    rotating form's transpose is ``B`` blocks of ``T`` rows.
    """
    if batch < 1 or m % batch:
        raise ValueError(f"batch must be a positive divisor of the rows m = {m}, got {batch}")
    steps = tuple(plan_tiles(shapes, m // batch, itemsize, in_col, out_col, smem_budget))
    t_fused = predict_fused_plan(steps, shapes, m, itemsize, rates)
    t_axis = predict_axis_plan(shapes, m, itemsize, out_col, rates, precision, batch) if axis_ok else math.inf
    # out_col: kron_matmul with T > 1 columns trailing; the transposed form only pays for small T
    t_axis_t = (predict_transposed_axis_plan(shapes, m, itemsize, rates, precision, batch)
                if axis_ok and out_col else math.inf)
    axis_precision = precision if itemsize == 4 else "highest"
    if axis_precision == "high" and axis_ok:
        # split TF32 triples the GEMMs' bytes and adds the split passes: where that outweighs
        # the TF32 rate (memory-bound shapes), exact float32 is both faster and more precise
        ex_axis = predict_axis_plan(shapes, m, itemsize, out_col, rates, batch=batch)
        ex_t = predict_transposed_axis_plan(shapes, m, itemsize, rates, batch=batch) if out_col else math.inf
        if min(ex_axis, ex_t) < min(t_axis, t_axis_t):
            t_axis, t_axis_t, axis_precision = ex_axis, ex_t, "highest"
    times = {"fused": t_fused, "axis_gemm": t_axis, "axis_gemm_t": t_axis_t}
    if force != "auto" and times[force] < math.inf:
        path = force
    elif force == "axis_gemm_t" and axis_ok:
        path = "axis_gemm"  # matmul_kron has no transposed form: it is the row form already
    elif force != "auto" or not axis_ok:
        path = "fused"
    else:
        path = min(times, key=times.get)
    return PathChoice(path, steps, t_fused, t_axis, t_axis_t, axis_precision)
