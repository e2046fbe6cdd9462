// The element-wise part of one block-CG iteration, on row-major (n, t) blocks (t right-hand
// sides side by side), with an optional diagonal preconditioner d (one value per row):
//
//   DOT:        part[0][c] = sum_i p[i,c] * ap[i,c]
//   UPDATE:     x += alpha[c] p;  r -= alpha[c] ap;  part[0][c] = sum_i r d r;  part[1][c] = sum_i r r
//   DIRECTION:  p = d r + beta[c] p
//
// (z = d r is never stored: UPDATE sums r d r, DIRECTION recomputes d r.) Written with torch
// these are ~23 passes over an (n, t) block per iteration (a temporary per product, one per
// reduction); here 2 + 6 + 3. Every pass is bandwidth-bound, so that is the time ratio.
//
// Two layouts. Columns (ROWS = false): the block is (n, t) row-major, element (i, c) at i*t + c.
// Rows (ROWS = true): the block is (t, n), right-hand side c is the contiguous row c*n .. c*n+n-1
// and d is indexed by i directly; blockIdx.y is the row, so every block sums a single column and
// the loop needs no division. Both write the same (gridDim.x, NSUM, t) partial sums.
//
// Columns layout threads: a block has t*k threads and the grid-stride loop advances by a multiple of t, so a
// thread always meets the same column c = threadIdx.x % t and keeps its sums in registers (in
// double, whatever T). The block then adds its k partial sums per column and writes them to
// part[(blockIdx.x * NSUM + q) * t + c]; the caller adds the per-block rows (a deterministic
// order: no atomics). Indices are 64-bit.
#pragma once
#include "kron_common.cuh"

struct CgArgs {
    void* x;
    void* r;
    void* p;
    const void* ap;
    const void* d;     // (n,) diagonal preconditioner, or null for the identity
    const void* coef;  // alpha (UPDATE) or beta (DIRECTION), (t,)
    double* part;      // (gridDim.x, NSUM, t)
    i64 n;             // rows
    i64 t;             // columns
};

#define KRONEGP_CG_DOT 0
#define KRONEGP_CG_UPDATE 1
#define KRONEGP_CG_DIRECTION 2

// How many column sums a step writes.
template <int MODE>
__device__ constexpr int cg_nsum() {
    return MODE == KRONEGP_CG_UPDATE ? 2 : (MODE == KRONEGP_CG_DOT ? 1 : 0);
}

// One element e of a step (both layouts): de is its preconditioner entry (1 without one),
// coef its column's alpha or beta; s0, s1 the thread's running column sums.
template <int MODE, class T>
__device__ __forceinline__ void cg_element(T* __restrict__ x, T* __restrict__ r, T* __restrict__ p,
                                           const T* __restrict__ ap, i64 e, T de, T coef,
                                           double& s0, double& s1) {
    if constexpr (MODE == KRONEGP_CG_DOT) {
        s0 += (double)p[e] * (double)ap[e];
    } else if constexpr (MODE == KRONEGP_CG_UPDATE) {
        const T pe = p[e], ape = ap[e];
        x[e] = x[e] + coef * pe;
        const T re = r[e] - coef * ape;
        r[e] = re;
        s0 += (double)re * (double)(de * re);
        s1 += (double)re * (double)re;
    } else {
        const T ze = de * r[e];
        p[e] = ze + coef * p[e];
    }
}

template <class Spec>
__device__ __forceinline__ void kron_cg_rows(const CgArgs& a) {
    typedef typename Spec::T T;
    constexpr int MODE = Spec::MODE, NT = 256;
    constexpr int NSUM = cg_nsum<MODE>();
    const i64 n = a.n;
    const int c = blockIdx.y;
    const i64 base = (i64)c * n;
    T* __restrict__ x = reinterpret_cast<T*>(a.x) + (a.x ? base : 0);
    T* __restrict__ r = reinterpret_cast<T*>(a.r) + (a.r ? base : 0);
    T* __restrict__ p = reinterpret_cast<T*>(a.p) + base;
    const T* __restrict__ ap = reinterpret_cast<const T*>(a.ap) + (a.ap ? base : 0);
    const T* __restrict__ d = reinterpret_cast<const T*>(a.d);
    T coef = T(0);
    if constexpr (MODE != KRONEGP_CG_DOT) coef = reinterpret_cast<const T*>(a.coef)[c];
    double s0 = 0.0, s1 = 0.0;
    const i64 stride = (i64)gridDim.x * NT;
    for (i64 i = (i64)blockIdx.x * NT + threadIdx.x; i < n; i += stride)
        cg_element<MODE>(x, r, p, ap, i, d ? d[i] : T(1), coef, s0, s1);
    if constexpr (NSUM > 0) {
        // warp shuffles, then one value per warp through shared memory
        __shared__ double sh[NSUM][NT / 32];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            s0 += __shfl_down_sync(0xffffffffu, s0, off);
            if constexpr (NSUM > 1) s1 += __shfl_down_sync(0xffffffffu, s1, off);
        }
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        if (lane == 0) {
            sh[0][warp] = s0;
            if constexpr (NSUM > 1) sh[1][warp] = s1;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double acc0 = 0.0, acc1 = 0.0;
            for (int w = 0; w < NT / 32; ++w) {
                acc0 += sh[0][w];
                if constexpr (NSUM > 1) acc1 += sh[1][w];
            }
            double* out = a.part + (i64)blockIdx.x * NSUM * a.t;
            out[c] = acc0;
            if constexpr (NSUM > 1) out[a.t + c] = acc1;
        }
    }
}

template <class Spec>
__device__ __forceinline__ void kron_cg(const CgArgs& a) {
    typedef typename Spec::T T;
    constexpr int MODE = Spec::MODE, NT_MAX = 1024;
    constexpr int NSUM = cg_nsum<MODE>();
    const i64 t = a.t;
    const i64 total = a.n * t;
    const int c = threadIdx.x % (int)t;
    const i64 stride = (i64)gridDim.x * blockDim.x;       // a multiple of t
    const i64 row_stride = stride / t;
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 row = e / t;
    T* x = reinterpret_cast<T*>(a.x);
    T* r = reinterpret_cast<T*>(a.r);
    T* p = reinterpret_cast<T*>(a.p);
    const T* ap = reinterpret_cast<const T*>(a.ap);
    const T* d = reinterpret_cast<const T*>(a.d);
    T coef = T(0);
    if constexpr (MODE != KRONEGP_CG_DOT) coef = reinterpret_cast<const T*>(a.coef)[c];
    double s0 = 0.0, s1 = 0.0;
    for (; e < total; e += stride, row += row_stride)
        cg_element<MODE>(x, r, p, ap, e, d ? d[row] : T(1), coef, s0, s1);
    if constexpr (NSUM > 0) {
        __shared__ double sh[NSUM][NT_MAX];
        sh[0][threadIdx.x] = s0;
        if constexpr (NSUM > 1) sh[1][threadIdx.x] = s1;
        __syncthreads();
        if (threadIdx.x < t) {
            double acc0 = 0.0, acc1 = 0.0;
            for (int j = threadIdx.x; j < (int)blockDim.x; j += (int)t) {
                acc0 += sh[0][j];
                if constexpr (NSUM > 1) acc1 += sh[1][j];
            }
            double* out = a.part + (i64)blockIdx.x * NSUM * t;
            out[threadIdx.x] = acc0;
            if constexpr (NSUM > 1) out[t + threadIdx.x] = acc1;
        }
    }
}
