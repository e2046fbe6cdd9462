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
    constexpr int LDB = BQ;
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

    load_stage(0);
    store_stage();
    __syncthreads();
    for (int c = 0; c < NCHUNK; ++c) {
        if (c + 1 < NCHUNK) load_stage(c + 1);
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
        if (c + 1 < NCHUNK) {
            __syncthreads();
            store_stage();
            __syncthreads();
        }
    }

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
