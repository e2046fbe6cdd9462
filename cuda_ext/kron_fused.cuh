// Fused kernel: NF consecutive small factors applied to a tile of x held in shared memory.
//
// A block owns TM rows × TS slices of one batch entry. It loads the tile (TM·TS·PG elements,
// PG = ΠP_i) once, applies F_{NF-1}, …, F_0 in shared memory and writes TM·TS·QG elements once:
// one pass over device memory for NF factors.
//
// Inside the block every factor is applied like the global step: the per-row data is a matrix of
// R rows × P (the factor's axis is innermost), the product row r, column q is written at linear
// position q·R + r, which makes the next factor's axis innermost (the same rotation as FastKron's
// global store). After the last factor the per-row layout is (qg, s), exactly the order of the
// output, so the global store writes runs of TS consecutive slices.
//
// Bank conflicts: a step's input rows are stored with an odd leading dimension (P, or P+1 when P
// is even); the lanes of a warp read consecutive rows at one column, so their addresses differ by
// an odd number of words and fall in distinct banks (also for 8-byte doubles, taken per half-warp).
// The factors are read as broadcast vectors (every lane of a warp reads the same columns).
#pragma once
#include "kron_common.cuh"
#include "kron_mma.cuh"

template <class Spec>
struct FusedGeom {
    typedef typename Spec::T T;
    static constexpr int NF = Spec::NF;
    static constexpr int TM = Spec::TM;
    static constexpr int TS = Spec::TS;
    static constexpr int VEC = Vec<T>::N;
    static constexpr int prod_p() { int r = 1; for (int i = 0; i < NF; ++i) r *= Spec::P[i]; return r; }
    static constexpr int prod_q() { int r = 1; for (int i = 0; i < NF; ++i) r *= Spec::Q[i]; return r; }
    static constexpr int PG = prod_p();
    static constexpr int QG = prod_q();
    // rows of the per-row matrix when factor f is applied (factors f+1.. already applied)
    static constexpr int rows(int f) {
        int r = TS;
        for (int i = 0; i < f; ++i) r *= Spec::P[i];
        for (int i = f + 1; i < NF; ++i) r *= Spec::Q[i];
        return r;
    }
    static constexpr int ld(int f) { return (Spec::P[f] % 2 == 0) ? Spec::P[f] + 1 : Spec::P[f]; }
    // Words between consecutive rows m of the tile in a layout of `words` per row. The column
    // layouts move VEC consecutive m per thread (16-byte global accesses), so the lanes of a warp
    // touch 32/VEC·… different m at once: a stride ≡ 2 or 6 (mod 8) puts them in distinct banks
    // (≡ 0 mod 16 would make them collide 4 ways). Row layouts keep m blocks packed.
    static constexpr int mstride(int words, bool col) {
        if (!col || TM == 1) return words;
        int w = words;
        while (w % 8 != 2 && w % 8 != 6) ++w;
        return w;
    }
    static constexpr int mstride_in(int f) { return mstride(rows(f) * ld(f), f == NF - 1 && Spec::IN_COL); }
    static constexpr int mstride_out() { return mstride(TS * QG, Spec::OUT_COL); }
    static constexpr int in_size(int f) { return TM * mstride_in(f); }
    static constexpr int out_size() { return TM * mstride_out(); }
    static constexpr int buf_size() {
        int r = out_size();
        for (int i = 0; i < NF; ++i) r = cmax(r, in_size(i));
        return round_up(r, VEC);
    }
    // outputs per thread: RQ consecutive columns (a multiple of VEC, for vector factor reads)
    static constexpr int rq(int f) { return Spec::Q[f] <= VEC ? VEC : (Spec::Q[f] <= 2 * VEC ? 2 * VEC : cmin(8, round_up(Spec::Q[f], VEC))); }
    static constexpr int qstride(int f) { return round_up(Spec::Q[f], rq(f)); }
    static constexpr int f_off(int f) {
        int r = 0;
        for (int i = 0; i < f; ++i) r += Spec::P[i] * qstride(i);
        return r;
    }
    static constexpr int f_total() { return round_up(f_off(NF), VEC); }
    static constexpr int smem_elems() { return f_total() + 2 * buf_size(); }
};

// Position of per-row linear index j of the layout that feeds factor f (or the final layout).
template <class Spec, int f>
__device__ __forceinline__ unsigned fused_pos(unsigned m_l, unsigned j) {
    typedef FusedGeom<Spec> G;
    if constexpr (f < 0) {
        return m_l * G::mstride_out() + j;
    } else {
        constexpr unsigned P = Spec::P[f];
        constexpr unsigned LD = G::ld(f);
        return m_l * G::mstride_in(f) + (j / P) * LD + j % P;
    }
}

// Output (per-row row r, column q) of factor f's step lands at out_base(m_l, r) + q·out_step:
// the next layout's rows of P[f-1] divide the R rows of this step, so a column is a fixed stride.
template <class Spec, int f>
struct StepOut {
    typedef FusedGeom<Spec> G;
    static constexpr int R = G::rows(f);
    static constexpr int PN = (f > 0) ? Spec::P[f > 0 ? f - 1 : 0] : 1;
    static_assert(R % PN == 0, "a step's rows must hold whole rows of the next layout");
    static constexpr int step() { if constexpr (f > 0) return (R / PN) * G::ld(f - 1); else return R; }
    static __device__ __forceinline__ int base(int m_l, int r) {
        if constexpr (f > 0) return m_l * G::mstride_in(f - 1) + (r / PN) * G::ld(f - 1) + r % PN;
        else return m_l * G::mstride_out() + r;
    }
};

template <class Spec, int f>
__device__ __forceinline__ void fused_step(const typename Spec::T* __restrict__ in,
                                           typename Spec::T* __restrict__ out,
                                           const typename Spec::T* __restrict__ F) {
    typedef typename Spec::T T;
    typedef FusedGeom<Spec> G;
    typedef typename Vec<T>::type V;
    constexpr int VEC = G::VEC;
    constexpr int P = Spec::P[f], Q = Spec::Q[f];
    constexpr int R = G::rows(f), LD = G::ld(f);
    constexpr int U = G::TM * R;              // rows over the whole tile
    constexpr int RQ = G::rq(f);
    constexpr int QS = G::qstride(f);
    constexpr int NQG = QS / RQ;
    constexpr int NT = Spec::NT;
    constexpr int RR = cmax(1, cmin(4, cdiv(U * NQG, NT)));
    constexpr int NUG = cdiv(U, RR);
    constexpr bool ALL_U = (U % RR == 0);    // every (ug, i) is a real row: no clamp, no check
    constexpr bool ALL_Q = (QS == Q);         // no padding columns to skip
    for (int w = threadIdx.x; w < NUG * NQG; w += NT) {
        const int ug = w % NUG;
        const int q0 = (w / NUG) * RQ;
        int base[RR];
#pragma unroll
        for (int i = 0; i < RR; ++i) {
            const unsigned u = ALL_U ? ug + i * NUG : cmin(ug + i * NUG, U - 1);  // clamp: read, discard
            base[i] = (G::mstride_in(f) == R * LD) ? u * LD : (u / R) * G::mstride_in(f) + (u % R) * LD;
        }
        T acc[RR][RQ];
#pragma unroll
        for (int i = 0; i < RR; ++i)
#pragma unroll
            for (int j = 0; j < RQ; ++j) acc[i][j] = T(0);
#pragma unroll(P <= 32 ? P : 8)
        for (int p = 0; p < P; ++p) {
            T a[RR];
#pragma unroll
            for (int i = 0; i < RR; ++i) a[i] = in[base[i] + p];
            T fr[RQ];
            const V* fv = reinterpret_cast<const V*>(F + p * QS + q0);
#pragma unroll
            for (int v = 0; v < RQ / VEC; ++v) {
                V t = fv[v];
                const T* tv = reinterpret_cast<const T*>(&t);
#pragma unroll
                for (int e = 0; e < VEC; ++e) fr[VEC * v + e] = tv[e];
            }
#pragma unroll
            for (int i = 0; i < RR; ++i)
#pragma unroll
                for (int j = 0; j < RQ; ++j) acc[i][j] = fma(a[i], fr[j], acc[i][j]);
        }
        typedef StepOut<Spec, f> O;
#pragma unroll
        for (int i = 0; i < RR; ++i) {
            const int u = ug + i * NUG;
            if (ALL_U || u < U) {
                T* o = out + O::base(u / R, u % R) + q0 * O::step();
#pragma unroll
                for (int j = 0; j < RQ; ++j)
                    if (ALL_Q || q0 + j < Q) o[j * O::step()] = acc[i][j];
            }
        }
    }
}

// ---- tensor-core step (Spec::MMA != 0; sm_80 and later) --------------------------------------
// The same product as fused_step, out[u, q] = Σ_p in[u, p]·F[p, q] over the U = TM·R rows of the
// tile, as warp-level matrix multiplies: a warp owns MT consecutive rows u and every column tile
// of 8 q, walks p in steps of KT, loads one A fragment per step and reuses it for all column tiles.
//   double: DMMA m8n8k4 (IEEE fp64 products and sums: float64 stays float64);
//   float, MMA = 1: TF32 m16n8k8 (inputs rounded to TF32, float32 accumulation: "medium");
//   float, MMA = 3: split TF32, a = a_hi + a_lo with a_hi = rna_tf32(a), a_lo = rna_tf32(a − a_hi),
//     acc += a_lo·b_hi + a_hi·b_lo + a_hi·b_hi ("high": ~float32 accuracy).
// Fragment layouts (PTX ISA, mma.m8n8k4.f64 / mma.m16n8k8.tf32), g = lane/4, t = lane%4:
//   f64:  A a0 = (g, t);  B b0 = (t, g);  C c0,c1 = (g, 2t), (g, 2t+1)
//   tf32: A a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4);  B b0 = (t, g), b1 = (t+4, g)
//         C c0,c1 = (g, 2t), (g, 2t+1);  c2,c3 = (g+8, 2t), (g+8, 2t+1)
// Rows u ≥ U read row U−1 and are not stored; p ≥ P and q ≥ Q read as zeros.

template <class Spec, int f>
__device__ __forceinline__ unsigned mma_row_base(unsigned u) {
    typedef FusedGeom<Spec> G;
    constexpr unsigned R = G::rows(f), LD = G::ld(f), U = Spec::TM * R;
    u = u < U ? u : U - 1;
    return (G::mstride_in(f) == int(R * LD)) ? u * LD : (u / R) * G::mstride_in(f) + (u % R) * LD;
}

template <class Spec, int f>
__device__ __forceinline__ void mma_store(typename Spec::T* __restrict__ out, unsigned u, unsigned q,
                                          typename Spec::T v) {
    typedef FusedGeom<Spec> G;
    typedef StepOut<Spec, f> O;
    constexpr unsigned R = G::rows(f), U = Spec::TM * R;
    if (u < U && q < unsigned(Spec::Q[f])) out[O::base(u / R, u % R) + q * O::step()] = v;
}

template <class Spec, int f>
__device__ __forceinline__ void fused_step_mma(const typename Spec::T* __restrict__ in,
                                               typename Spec::T* __restrict__ out,
                                               const typename Spec::T* __restrict__ F) {
    typedef typename Spec::T T;
    typedef FusedGeom<Spec> G;
    constexpr bool F64 = sizeof(T) == 8;
    constexpr int P = Spec::P[f], Q = Spec::Q[f];
    constexpr int U = Spec::TM * G::rows(f);
    constexpr int QS = G::qstride(f);
    constexpr int MT = F64 ? 8 : 16, KT = F64 ? 4 : 8;
    constexpr int NQT = cdiv(Q, 8);       // column tiles of 8
    constexpr int NW = Spec::NT / 32;
    static_assert(Spec::NT % 32 == 0, "whole warps");
    static_assert(F64 || Spec::MMA == 1 || Spec::MMA == 3, "float: MMA 1 (TF32) or 3 (split TF32)");
    const unsigned lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int u0 = (threadIdx.x >> 5) * MT; u0 < U; u0 += NW * MT) {
        if constexpr (F64) {
            const unsigned ra = mma_row_base<Spec, f>(u0 + g);
            double acc[NQT][2];
#pragma unroll
            for (int j = 0; j < NQT; ++j) acc[j][0] = acc[j][1] = 0.0;
#pragma unroll(P <= 32 ? cdiv(P, KT) : 4)
            for (int p0 = 0; p0 < P; p0 += KT) {
                const unsigned p = p0 + t;
                const double a = (P % KT == 0 || p < unsigned(P)) ? in[ra + p] : 0.0;
#pragma unroll
                for (int j = 0; j < NQT; ++j) {
                    const unsigned q = j * 8 + g;
                    const double b = ((P % KT == 0 || p < unsigned(P)) && (QS >= NQT * 8 || q < unsigned(QS)))
                                         ? F[p * QS + q] : 0.0;
                    mma_f64(acc[j], a, b);
                }
            }
#pragma unroll
            for (int j = 0; j < NQT; ++j) {
                mma_store<Spec, f>(out, u0 + g, j * 8 + 2 * t, acc[j][0]);
                mma_store<Spec, f>(out, u0 + g, j * 8 + 2 * t + 1, acc[j][1]);
            }
        } else {
            const unsigned ra0 = mma_row_base<Spec, f>(u0 + g), ra1 = mma_row_base<Spec, f>(u0 + g + 8);
            float acc[NQT][4];
#pragma unroll
            for (int j = 0; j < NQT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll(P <= 32 ? cdiv(P, KT) : 4)
            for (int p0 = 0; p0 < P; p0 += KT) {
                const unsigned pa = p0 + t, pb = p0 + t + 4;
                const bool oka = P % KT == 0 || pa < unsigned(P), okb = P % KT == 0 || pb < unsigned(P);
                const float av[4] = {oka ? in[ra0 + pa] : 0.f, oka ? in[ra1 + pa] : 0.f,
                                     okb ? in[ra0 + pb] : 0.f, okb ? in[ra1 + pb] : 0.f};
                unsigned ahi[4], alo[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ahi[i] = to_tf32(av[i]);
                    if constexpr (Spec::MMA == 3) alo[i] = to_tf32(av[i] - __uint_as_float(ahi[i]));
                }
#pragma unroll
                for (int j = 0; j < NQT; ++j) {
                    const unsigned q = j * 8 + g;
                    const bool okq = QS >= NQT * 8 || q < unsigned(QS);
                    const float b0 = (oka && okq) ? F[pa * QS + q] : 0.f;
                    const float b1 = (okb && okq) ? F[pb * QS + q] : 0.f;
                    const unsigned bhi[2] = {to_tf32(b0), to_tf32(b1)};
                    if constexpr (Spec::MMA == 3) {
                        const unsigned blo[2] = {to_tf32(b0 - __uint_as_float(bhi[0])),
                                                 to_tf32(b1 - __uint_as_float(bhi[1]))};
                        mma_tf32(acc[j], alo, bhi);
                        mma_tf32(acc[j], ahi, blo);
                    }
                    mma_tf32(acc[j], ahi, bhi);
                }
            }
#pragma unroll
            for (int j = 0; j < NQT; ++j) {
                const unsigned q = j * 8 + 2 * t;
                mma_store<Spec, f>(out, u0 + g, q, acc[j][0]);
                mma_store<Spec, f>(out, u0 + g, q + 1, acc[j][1]);
                mma_store<Spec, f>(out, u0 + g + 8, q, acc[j][2]);
                mma_store<Spec, f>(out, u0 + g + 8, q + 1, acc[j][3]);
            }
        }
    }
}

template <class Spec, int f>
__device__ __forceinline__ void fused_steps(typename Spec::T* buf0, typename Spec::T* buf1,
                                            const typename Spec::T* fsm) {
    typedef FusedGeom<Spec> G;
    constexpr int OFF = G::f_off(f);
    if constexpr (Spec::MMA != 0) fused_step_mma<Spec, f>(buf0, buf1, fsm + OFF);
    else fused_step<Spec, f>(buf0, buf1, fsm + OFF);
    __syncthreads();
    if constexpr (f > 0) fused_steps<Spec, f - 1>(buf1, buf0, fsm);
}

// This thread's items it = 0 … N−1, item it read by load(it) and written by store(it, v), in
// batches of up to 8: a batch issues all its loads before any of its stores, so 8 loads per thread
// are in flight at once (a load → store → load chain waits a full memory latency per item). The
// loops are unrolled, so `it` is a compile-time constant in each call; a partial last batch runs
// only its real items.
template <class V, unsigned N, class Load, class Store>
__device__ __forceinline__ void batched_items(Load load, Store store) {
    constexpr unsigned LB = N < 8 ? N : 8;
    for (unsigned it0 = 0; it0 < N; it0 += LB) {
        V v[LB];
#pragma unroll
        for (unsigned l = 0; l < LB; ++l)
            if (it0 + l < N) v[l] = load(it0 + l);
#pragma unroll
        for (unsigned l = 0; l < LB; ++l)
            if (it0 + l < N) store(it0 + l, v[l]);
    }
}

// Copies TOTAL items, item e read by load(e) and written by store(e, v), thread t taking items
// t, t + NT, … (batched_items).
template <class V, unsigned TOTAL, unsigned NT, class Load, class Store>
__device__ __forceinline__ void batched_copy(Load load, Store store) {
    constexpr bool EXACT = TOTAL % NT == 0;  // every thread has cdiv(TOTAL, NT) real items
    batched_items<V, cdiv(TOTAL, NT)>(
        [&](unsigned it) {
            const unsigned e = threadIdx.x + it * NT;
            V v{};
            if (EXACT || e < TOTAL) v = load(e);
            return v;
        },
        [&](unsigned it, V v) {
            const unsigned e = threadIdx.x + it * NT;
            if (EXACT || e < TOTAL) store(e, v);
        });
}

// Factor f's element e (row-major P × QS, columns padded with zeros to QS) from device memory.
template <class Spec, int f>
__device__ __forceinline__ typename Spec::T factor_elem(const KronArgs& a, i64 b, unsigned e) {
    typedef typename Spec::T T;
    constexpr unsigned QS = FusedGeom<Spec>::qstride(f);
    const unsigned p = e / QS, q = e % QS;
    const T* fp = reinterpret_cast<const T*>(a.f[f]) + b * a.fb[f];
    return (q < unsigned(Spec::Q[f])) ? fp[p * a.f0[f] + q * a.f1[f]] : T(0);
}

// Element e of all factors laid end to end (f_off order): find its factor at compile time.
template <class Spec, int f = 0>
__device__ __forceinline__ typename Spec::T factors_elem(const KronArgs& a, i64 b, unsigned e) {
    typedef FusedGeom<Spec> G;
    if constexpr (f + 1 < Spec::NF) {
        if (e >= unsigned(G::f_off(f + 1))) return factors_elem<Spec, f + 1>(a, b, e);
    }
    return factor_elem<Spec, f>(a, b, e - G::f_off(f));
}

// All factors -> shared memory (each row padded with zeros to a multiple of RQ columns), the
// global loads of a batch issued before their stores (they are L2 hits: one latency per batch).
template <class Spec>
__device__ __forceinline__ void load_factors(const KronArgs& a, i64 b, typename Spec::T* fsm) {
    typedef typename Spec::T T;
    batched_copy<T, FusedGeom<Spec>::f_off(Spec::NF), Spec::NT>(
        [&](unsigned e) { return factors_elem<Spec>(a, b, e); },
        [&](unsigned e, T v) { fsm[e] = v; });
}

// How a thread walks a row-layout tile (TM rows of W words) in vectors of VEC words: its vector
// `it` starts at flat word t0 + it·NT·VEC (t0 = threadIdx.x·VEC). When that stride covers whole
// rows (A) or divides a row (B), the vector's row and word are the thread's own (m0, j0) plus
// compile-time steps dm(it), dj(it), so every address is one base plus an immediate. Every dj is
// a multiple of D, so splitting j by D (j/D, j%D) stays the thread's own split plus a constant.
template <class Spec, unsigned W, unsigned D>
struct RowTileWalk {
    static constexpr unsigned VEC = Vec<typename Spec::T>::N;
    static constexpr unsigned STEP = Spec::NT * VEC;
    static constexpr unsigned TOTAL = Spec::TM * W;
    static constexpr bool A = STEP % W == 0;
    static constexpr bool B = W % STEP == 0 && STEP % D == 0;
    static constexpr bool OK = (A || B) && TOTAL % STEP == 0 && W % VEC == 0;
    static constexpr unsigned NL = TOTAL / STEP;  // vectors per thread, exactly
    static constexpr unsigned K = B ? W / STEP : 1;
    static __device__ __forceinline__ unsigned j0(unsigned t0) { return A ? t0 % W : t0; }
    static __device__ __forceinline__ unsigned m0(unsigned t0) { return A ? t0 / W : 0u; }
    static __device__ __forceinline__ constexpr unsigned dm(unsigned it) { return A ? it * (STEP / W) : it / K; }
    static __device__ __forceinline__ constexpr unsigned dj(unsigned it) { return A ? 0u : (it % K) * STEP; }
};

template <class Spec>
__device__ __forceinline__ void kron_fused(const KronArgs& a) {
    typedef typename Spec::T T;
    typedef FusedGeom<Spec> G;
    constexpr int NF = Spec::NF, TM = Spec::TM, TS = Spec::TS, NT = Spec::NT;
    constexpr int PG = G::PG, QG = G::QG;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* fsm = reinterpret_cast<T*>(smem_raw);
    constexpr int FT = G::f_total(), BS = G::buf_size();
    T* buf0 = fsm + FT;
    T* buf1 = buf0 + BS;

    const i64 tiles_s = (a.S + TS - 1) / TS;
    i64 tile = blockIdx.x;
    i64 st, mt;
    if constexpr (Spec::IN_COL) { mt = tile % ((a.M + TM - 1) / TM); st = tile / ((a.M + TM - 1) / TM); }
    else { st = tile % tiles_s; mt = tile / tiles_s; }
    const i64 m0 = mt * TM, s0 = st * TS;
    const i64 b = blockIdx.z;

    // factors -> shared memory, rows padded with zeros to a multiple of RQ columns
    load_factors<Spec>(a, b, fsm);

    // x tile -> buf0 in the layout that feeds F_{NF-1}, the loads in batches (batched_copy, or
    // batched_items for the row walk). In-tile indices are unsigned: the divisions by constants stay
    // shifts/multiplies.
    {
        const T* xp = reinterpret_cast<const T*>(a.x) + b * a.xb;
        constexpr unsigned E = TM * TS * PG;
        typedef RowTileWalk<Spec, TS * PG, Spec::P[NF - 1]> WalkIn;
        if constexpr (Spec::IN_VEC && !Spec::IN_COL && WalkIn::OK) {
            // Row layout, contiguous rows (xk = 1): a thread's vectors sit at fixed offsets from
            // one base, in global and in shared memory (RowTileWalk), so only the loads, the
            // stores and (for a partial tile) the bounds checks remain per vector.
            typedef typename Vec<T>::type V;
            constexpr unsigned VEC = G::VEC, P = Spec::P[NF - 1], LD = G::ld(NF - 1);
            constexpr unsigned MS = G::mstride_in(NF - 1);
            const unsigned t0 = threadIdx.x * VEC;
            const unsigned j0 = WalkIn::j0(t0), ml0 = WalkIn::m0(t0);
            const T* xt = xp + (m0 + ml0) * a.xm + s0 * PG + j0;
            const bool full = m0 + TM <= a.M && s0 + TS <= a.S;
            unsigned q[VEC];
#pragma unroll
            for (unsigned c = 0; c < VEC; ++c) q[c] = ml0 * MS + ((j0 + c) / P) * LD + (j0 + c) % P;
            batched_items<V, WalkIn::NL>(
                [&](unsigned it) {
                    V v{};
                    if (full || (m0 + ml0 + WalkIn::dm(it) < a.M && s0 + (j0 + WalkIn::dj(it)) / PG < a.S))
                        v = *reinterpret_cast<const V*>(xt + i64(WalkIn::dm(it)) * a.xm + WalkIn::dj(it));
                    return v;
                },
                [&](unsigned it, V v) {
                    const T* vs = reinterpret_cast<const T*>(&v);
#pragma unroll
                    for (unsigned c = 0; c < VEC; ++c)
                        buf0[q[c] + WalkIn::dm(it) * MS + (WalkIn::dj(it) / P) * LD] = vs[c];
                });
        } else {
            // Items of VEC words: 16-byte loads of VEC consecutive k of one row (row layout,
            // PG % VEC == 0) or of VEC consecutive rows (column layout, TM % VEC == 0,
            // M % VEC == 0) when the launcher found the pointer and strides aligned (IN_VEC),
            // else single words (VEC = 1).
            typedef Item<T, Spec::IN_VEC> I;
            typedef typename I::type V;
            constexpr unsigned VEC = I::N;
            // item e: its tile row and word
            auto at = [](unsigned e, unsigned& m_l, unsigned& j) {
                if constexpr (Spec::IN_COL) { m_l = (e % (TM / VEC)) * VEC; j = e / (TM / VEC); }
                else { m_l = (e * VEC) / (TS * PG); j = (e * VEC) % (TS * PG); }
            };
            batched_copy<V, E / VEC, NT>(
                [&](unsigned e) {
                    unsigned m_l, j;
                    at(e, m_l, j);
                    const i64 m = m0 + m_l;
                    const i64 s = s0 + j / PG;
                    V v{};
                    if (m < a.M && s < a.S) v = *reinterpret_cast<const V*>(xp + m * a.xm + (s * PG + j % PG) * a.xk);
                    return v;
                },
                [&](unsigned e, V v) {
                    unsigned m_l, j;
                    at(e, m_l, j);
                    const T* vs = reinterpret_cast<const T*>(&v);
#pragma unroll
                    for (unsigned c = 0; c < VEC; ++c) {
                        if constexpr (Spec::IN_COL) buf0[fused_pos<Spec, NF - 1>(m_l + c, j)] = vs[c];
                        else buf0[fused_pos<Spec, NF - 1>(m_l, j + c)] = vs[c];
                    }
                });
        }
    }
    __syncthreads();
    fused_steps<Spec, NF - 1>(buf0, buf1, fsm);
    T* res = (NF % 2 == 1) ? buf1 : buf0;

    // (qg, s) per row -> y[m, qg*S + s]
    {
        T* yp = reinterpret_cast<T*>(a.y) + b * a.yb;
        constexpr unsigned E = TM * TS * QG;
        typedef RowTileWalk<Spec, TS * QG, TS> WalkOut;
        if constexpr (Spec::OUT_VEC && !Spec::OUT_COL && WalkOut::OK) {
            // Row layout, yk = 1: word j of tile row m goes to y[m, (j/TS)·S + s0 + j%TS]; with
            // RowTileWalk the thread's j/TS and j%TS are its own plus constants.
            typedef typename Vec<T>::type V;
            constexpr unsigned VEC = G::VEC, MS = G::mstride_out();
            const unsigned t0 = threadIdx.x * VEC;
            const unsigned j0 = WalkOut::j0(t0), ml0 = WalkOut::m0(t0);
            const i64 sl = j0 % TS;
            T* yt = yp + (m0 + ml0) * a.ym + i64(j0 / TS) * a.S + s0 + sl;
            const T* rt = res + ml0 * MS + j0;
            const bool ok_s = s0 + sl < a.S;
#pragma unroll
            for (unsigned it = 0; it < WalkOut::NL; ++it) {
                if (ok_s && m0 + ml0 + WalkOut::dm(it) < a.M) {
                    const V v = *reinterpret_cast<const V*>(rt + WalkOut::dm(it) * MS + WalkOut::dj(it));
                    *reinterpret_cast<V*>(yt + i64(WalkOut::dm(it)) * a.ym + i64(WalkOut::dj(it) / TS) * a.S) = v;
                }
            }
        } else {
            // Items of VEC words: 16-byte stores of VEC consecutive slices (row layout, TS % VEC
            // == 0, S % VEC == 0) or VEC consecutive rows (column layout) where the launcher
            // allows (OUT_VEC), else single words (VEC = 1).
            typedef Item<T, Spec::OUT_VEC> I;
            typedef typename I::type V;
            constexpr unsigned VEC = I::N;
#pragma unroll 8
            for (unsigned e = threadIdx.x; e < E / VEC; e += NT) {
                unsigned m_l, j;
                if constexpr (Spec::OUT_COL) { m_l = (e % (TM / VEC)) * VEC; j = e / (TM / VEC); }
                else { m_l = (e * VEC) / (TS * QG); j = (e * VEC) % (TS * QG); }
                const i64 m = m0 + m_l;
                const unsigned qg = j / TS, s_l = j % TS;
                const i64 s = s0 + s_l;
                if (m < a.M && s < a.S) {
                    V v;
                    if constexpr (Spec::OUT_COL) {
                        T* vs = reinterpret_cast<T*>(&v);
#pragma unroll
                        for (unsigned c = 0; c < VEC; ++c) vs[c] = res[fused_pos<Spec, -1>(m_l + c, j)];
                    } else {
                        v = *reinterpret_cast<const V*>(res + fused_pos<Spec, -1>(m_l, j));  // TS % VEC == 0
                    }
                    *reinterpret_cast<V*>(yp + m * a.ym + (qg * a.S + s) * a.yk) = v;
                }
            }
        }
    }
}
