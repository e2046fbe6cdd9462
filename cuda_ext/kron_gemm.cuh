// Single-factor kernel for large factors: one rotating step done as a register-tiled GEMM.
//
// The input is viewed as the matrix A[rho, p] = x[b, m, s*P + p] with rho enumerating (m, s)
// pairs (m fastest when the rows of x are its contiguous axis, s fastest otherwise, so that
// consecutive rho are consecutive in memory); the product A·F, entry (rho, q), is stored at
// y[b, m, q*S + s]: FastKron's rotated store, no transpose pass.
//
// Block tile BR rows × BQ columns, depth KC per shared-memory stage; each thread accumulates
// TR × TQ outputs in registers, reading A and F from shared memory as 16-byte vectors (the
// thread's rows and columns come in groups of VEC consecutive ones). The next stage is loaded
// from global memory into registers while the current one is multiplied.
#pragma once
#include "kron_common.cuh"
#include "kron_mma.cuh"

// The staged main loop of both bodies: stage 0 into shared memory, then per chunk c load chunk
// c+1 into registers, multiply chunk c from shared memory (mul(), one chunk of KC), and store the
// next one in its place.
template <int NCHUNK, class LoadStage, class StoreStage, class Mul>
__device__ __forceinline__ void staged_chunks(LoadStage load_stage, StoreStage store_stage, Mul mul) {
    load_stage(0);
    store_stage();
    __syncthreads();
    for (int c = 0; c < NCHUNK; ++c) {
        if (c + 1 < NCHUNK) load_stage(c + 1);
        mul();
        if (c + 1 < NCHUNK) {
            __syncthreads();
            store_stage();
            __syncthreads();
        }
    }
}

// Tensor-core variant (Spec::MMA, sm_80+): the same block tile and stages, the products as warp
// MMAs (fp64 DMMA m8n8k4; TF32 m16n8k8, MMA = 1; split TF32, MMA = 3: see kron_fused.cuh). Warp w
// owns rows [w·RW, (w+1)·RW) of the block tile and all BQ columns; fragments are read from the
// k-major stages As[k][row], Bs[k][col]. Epilogue: the rotated store of each accumulator.
template <class Spec, class LoadStage, class StoreStage>
__device__ __forceinline__ void kron_gemm_mma(const KronArgs& a, const typename Spec::T* As,
                                              const typename Spec::T* Bs, LoadStage load_stage,
                                              StoreStage store_stage) {
    typedef typename Spec::T T;
    constexpr bool F64 = sizeof(T) == 8;
    constexpr int VEC = Vec<T>::N;
    constexpr int P = Spec::P, Q = Spec::Q, BR = Spec::BR, BQ = Spec::BQ, KC = Spec::KC;
    constexpr int LDA = BR + VEC, LDB = BQ + 8;
    constexpr int NCHUNK = cdiv(P, KC);
    constexpr int NW = Spec::NT / 32;
    constexpr int RW = BR / NW;                 // rows per warp
    constexpr int MT = F64 ? 8 : 16, KT = F64 ? 4 : 8;
    constexpr int NMT = RW / MT, NNT = BQ / 8;
    static_assert(RW % MT == 0 && BQ % 8 == 0 && KC % KT == 0, "MMA tiles must cover the block tile");
    const unsigned lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wr = (threadIdx.x >> 5) * RW;
    constexpr int NACC = F64 ? 2 : 4;
    T acc[NMT][NNT][NACC];
#pragma unroll
    for (int i = 0; i < NMT; ++i)
#pragma unroll
        for (int j = 0; j < NNT; ++j)
#pragma unroll
            for (int e = 0; e < NACC; ++e) acc[i][j][e] = T(0);

    staged_chunks<NCHUNK>(load_stage, store_stage, [&]() {
#pragma unroll
        for (int k0 = 0; k0 < KC; k0 += KT) {
            if constexpr (F64) {
                double af[NMT];
#pragma unroll
                for (int i = 0; i < NMT; ++i) af[i] = As[(k0 + t) * LDA + wr + i * MT + g];
#pragma unroll
                for (int j = 0; j < NNT; ++j) {
                    const double bf = Bs[(k0 + t) * LDB + j * 8 + g];
#pragma unroll
                    for (int i = 0; i < NMT; ++i) mma_f64(acc[i][j], af[i], bf);
                }
            } else {
                unsigned ahi[NMT][4], alo[NMT][4];
#pragma unroll
                for (int i = 0; i < NMT; ++i) {
                    const int r = wr + i * MT + g;
                    const float av[4] = {As[(k0 + t) * LDA + r], As[(k0 + t) * LDA + r + 8],
                                         As[(k0 + t + 4) * LDA + r], As[(k0 + t + 4) * LDA + r + 8]};
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        ahi[i][e] = to_tf32(av[e]);
                        if constexpr (Spec::MMA == 3) alo[i][e] = to_tf32(av[e] - __uint_as_float(ahi[i][e]));
                    }
                }
#pragma unroll
                for (int j = 0; j < NNT; ++j) {
                    const float b0 = Bs[(k0 + t) * LDB + j * 8 + g], b1 = Bs[(k0 + t + 4) * LDB + j * 8 + g];
                    const unsigned bhi[2] = {to_tf32(b0), to_tf32(b1)};
                    unsigned blo[2];
                    if constexpr (Spec::MMA == 3) {
                        blo[0] = to_tf32(b0 - __uint_as_float(bhi[0]));
                        blo[1] = to_tf32(b1 - __uint_as_float(bhi[1]));
                    }
#pragma unroll
                    for (int i = 0; i < NMT; ++i) {
                        if constexpr (Spec::MMA == 3) {
                            mma_tf32(acc[i][j], alo[i], bhi);
                            mma_tf32(acc[i][j], ahi[i], blo);
                        }
                        mma_tf32(acc[i][j], ahi[i], bhi);
                    }
                }
            }
        }
    });

    // rotated store: (rho, q) -> y[m, q*S + s]
    T* yp = reinterpret_cast<T*>(a.y) + (i64)blockIdx.z * a.yb;
    const i64 rows = a.M * a.S;
    const i64 r0 = (i64)blockIdx.x * BR;
    const int q0 = blockIdx.y * BQ;
    const i64 ystep = a.S * a.yk;
#pragma unroll
    for (int i = 0; i < NMT; ++i)
#pragma unroll
        for (int h = 0; h < (F64 ? 1 : 2); ++h) {
            const i64 rho = r0 + wr + i * MT + g + h * 8;
            if (rho >= rows) continue;
            i64 m, s;
            if constexpr (Spec::M_FAST) { m = rho % a.M; s = rho / a.M; }
            else { m = rho / a.S; s = rho % a.S; }
            T* yrow = yp + m * a.ym + s * a.yk;
#pragma unroll
            for (int j = 0; j < NNT; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int q = q0 + j * 8 + 2 * t + e;
                    if (q < Q) yrow[q * ystep] = acc[i][j][h * 2 + e];
                }
        }
}

template <class Spec>
__device__ __forceinline__ void kron_gemm(const KronArgs& a) {
    typedef typename Spec::T T;
    typedef typename Vec<T>::type V;
    constexpr int VEC = Vec<T>::N;
    constexpr int P = Spec::P, Q = Spec::Q;
    constexpr int BR = Spec::BR, BQ = Spec::BQ, KC = Spec::KC, TR = Spec::TR, TQ = Spec::TQ;
    constexpr int NT = Spec::NT;
    constexpr int NTR = BR / TR, NTQ = BQ / TQ;
    static_assert(NTR * NTQ == NT, "thread tile does not cover the block tile");
    static_assert(TR % VEC == 0 && TQ % VEC == 0, "thread tile must be whole vectors");
    constexpr int LDA = BR + VEC;  // padding shifts the k-rows of A across banks on store
    // MMA B fragments read 4 k-rows at one column: pad them 8 words apart (banks)
    constexpr int LDB = BQ + (Spec::MMA ? 8 : 0);
    constexpr int LA = cdiv(BR * KC, NT);  // A elements loaded per thread per stage
    constexpr int LB = cdiv(KC * BQ, NT);
    constexpr int NCHUNK = cdiv(P, KC);

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* As = reinterpret_cast<T*>(smem_raw);  // [KC][LDA]
    T* Bs = As + KC * LDA;                   // [KC][LDB]

    const i64 b = blockIdx.z;
    const i64 rows = a.M * a.S;
    const i64 r0 = (i64)blockIdx.x * BR;
    const int q0 = blockIdx.y * BQ;
    const T* xp = reinterpret_cast<const T*>(a.x) + b * a.xb;
    const T* fp = reinterpret_cast<const T*>(a.f[0]) + b * a.fb[0];
    const i64 fs0 = a.f0[0], fs1 = a.f1[0];
    const int tid = threadIdx.x;

    // Each thread loads the same A rows at every stage: resolve their offsets once.
    i64 abase[LA];
    int arow[LA], akk[LA];
#pragma unroll
    for (int i = 0; i < LA; ++i) {
        const int e = tid + i * NT;
        int rl, kk;
        if constexpr (Spec::IN_COL) { rl = e % BR; kk = e / BR; }
        else { rl = e / KC; kk = e % KC; }
        arow[i] = rl;
        akk[i] = kk;
        const i64 rho = r0 + rl;
        i64 m, s;
        if constexpr (Spec::M_FAST) { m = rho % a.M; s = rho / a.M; }
        else { m = rho / a.S; s = rho % a.S; }
        abase[i] = (e < BR * KC && rho < rows) ? m * a.xm + s * P * a.xk : -1;
    }

    T ra[LA], rb[LB];
    auto load_stage = [&](int c) {
        const int p0 = c * KC;
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int p = p0 + akk[i];
            ra[i] = (abase[i] >= 0 && p < P) ? xp[abase[i] + p * a.xk] : T(0);
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = tid + i * NT;
            const int kk = e / BQ, j = e % BQ;
            const int p = p0 + kk, q = q0 + j;
            rb[i] = (e < KC * BQ && p < P && q < Q) ? fp[p * fs0 + q * fs1] : T(0);
        }
    };
    auto store_stage = [&]() {
#pragma unroll
        for (int i = 0; i < LA; ++i)
            if (tid + i * NT < BR * KC) As[akk[i] * LDA + arow[i]] = ra[i];
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int e = tid + i * NT;
            if (e < KC * BQ) Bs[(e / BQ) * LDB + e % BQ] = rb[i];
        }
    };

    const int tr = tid % NTR, tq = tid / NTR;
    T acc[TR][TQ];
#pragma unroll
    for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TQ; ++j) acc[i][j] = T(0);

    if constexpr (Spec::MMA != 0) {
        kron_gemm_mma<Spec>(a, As, Bs, load_stage, store_stage);
        return;
    }
    staged_chunks<NCHUNK>(load_stage, store_stage, [&]() {
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) {
            T av[TR], bv[TQ];
#pragma unroll
            for (int g = 0; g < TR / VEC; ++g) {
                const V t = *reinterpret_cast<const V*>(As + kk * LDA + g * NTR * VEC + tr * VEC);
                if constexpr (VEC == 4) { av[4*g] = t.x; av[4*g+1] = t.y; av[4*g+2] = t.z; av[4*g+3] = t.w; }
                else { av[2*g] = t.x; av[2*g+1] = t.y; }
            }
#pragma unroll
            for (int g = 0; g < TQ / VEC; ++g) {
                const V t = *reinterpret_cast<const V*>(Bs + kk * LDB + g * NTQ * VEC + tq * VEC);
                if constexpr (VEC == 4) { bv[4*g] = t.x; bv[4*g+1] = t.y; bv[4*g+2] = t.z; bv[4*g+3] = t.w; }
                else { bv[2*g] = t.x; bv[2*g+1] = t.y; }
            }
#pragma unroll
            for (int i = 0; i < TR; ++i)
#pragma unroll
                for (int j = 0; j < TQ; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
        }
    });

    // rotated store: (rho, q) -> y[m, q*S + s]
    T* yp = reinterpret_cast<T*>(a.y) + b * a.yb;
    const i64 ystep = a.S * a.yk;
#pragma unroll
    for (int i = 0; i < TR; ++i) {
        const i64 rho = r0 + (i / VEC) * NTR * VEC + tr * VEC + i % VEC;
        if (rho >= rows) continue;
        i64 m, s;
        if constexpr (Spec::M_FAST) { m = rho % a.M; s = rho / a.M; }
        else { m = rho / a.S; s = rho % a.S; }
        T* yrow = yp + m * a.ym + s * a.yk;
#pragma unroll
        for (int j = 0; j < TQ; ++j) {
            const int q = q0 + (j / VEC) * NTQ * VEC + tq * VEC + j % VEC;
            if (q < Q) yrow[q * ystep] = acc[i][j];
        }
    }
}
