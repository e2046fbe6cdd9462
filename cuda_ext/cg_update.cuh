// The element-wise part of one block-CG iteration, on row-major (n, t) blocks (t right-hand
// sides side by side), with an optional diagonal preconditioner d (one value per row):
//
//   DOT:        pap[c] = sum_i p[i,c] * ap[i,c];             then alpha[c]
//   UPDATE:     x += alpha[c] p;  r -= alpha[c] ap;
//               rz'[c] = sum_i r d r;  rr[c] = sum_i r r;    then beta[c], rz, residual, active
//   DIRECTION:  p = d r + beta[c] p
//
// (z = d r is never stored: UPDATE sums r d r, DIRECTION recomputes d r.) Written with torch
// these are ~23 passes over an (n, t) block per iteration (a temporary per product, one per
// reduction); here 2 + 6 + 3. Every pass is bandwidth-bound, so that is the time ratio.
//
// The per-column coefficients never leave the device: the last block of DOT and of UPDATE to
// finish (a counter taken with atomicAdd after each block's partial sums are fenced) adds the
// partial sums of every block in a fixed order and does the iteration's bookkeeping on the t
// columns (what block CG would otherwise spend ~15 tiny torch launches on per iteration):
//
//   keep    = active[c] || (force && !zero[c])              (force: iteration < min_iters)
//   DOT:    alpha = keep ? rz / max(pap, tiny) : 0
//   UPDATE: beta = keep ? rz' / max(rz, tiny) : 0;  if keep: rz = rz', iters += 1,
//           res = sqrt(max(rr, 0)) / bnorm;  active = active && res > tol;  any_active = OR active
//
// with the sums rounded to T first, as the torch path does. Each writes its coefficient to the
// Lanczos record row `rec` when given; the last block sets the counter back to zero.
//
// Two layouts. Columns (ROWS = false): the block is (n, t) row-major, element (i, c) at i*t + c.
// Rows (ROWS = true): the block is (t, n), right-hand side c is the contiguous row c*n .. c*n+n-1
// and d is indexed by i directly; blockIdx.y is the row, so every block sums a single column and
// the loop needs no division. Both write the same (gridDim.x, NSUM, t) partial sums.
//
// Columns layout threads: a block has t*k threads and the grid-stride loop advances by a multiple of t, so a
// thread always meets the same column c = threadIdx.x % t and keeps its sums in registers (in
// double, whatever T). The block then adds its k partial sums per column and writes them to
// part[(blockIdx.x * NSUM + q) * t + c]. Indices are 64-bit.
#pragma once
#include "kron_common.cuh"

struct CgArgs {
    void* x;
    void* r;
    void* p;
    const void* ap;
    const void* d;       // (n,) diagonal preconditioner, or null for the identity
    void* coef;          // (2, t): alpha (DOT writes, UPDATE reads), then beta (UPDATE writes, DIRECTION reads)
    double* part;        // (gridDim.x, NSUM, t)
    i64 n;               // rows
    i64 t;               // columns
    // per-column state (t,), read and written by the last block of DOT and UPDATE
    void* rz;            // T: r'z of the current residual
    void* res;           // T: relative residual
    const void* bnorm;   // T: |b| (1 for a zero column)
    int* active;         // 0/1: still iterating
    const int* zero;     // 0/1: b = 0 (never kept)
    long long* iters;    // iterations each column ran
    void* rec;           // T: this iteration's Lanczos record row (alpha for DOT, beta for UPDATE), or null
    unsigned int* counter;  // blocks done; zero between launches
    int* any_active;     // UPDATE: whether any column is still active
    double tol;
    double tiny;
    int force;           // this iteration runs every non-zero column (iteration < min_iters)
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

// Column c's coefficient for this step: alpha (coef[c]) in UPDATE, beta (coef[t + c]) in
// DIRECTION; DOT has none.
template <int MODE, class T>
__device__ __forceinline__ T cg_coef(const CgArgs& a, i64 c) {
    if constexpr (MODE == KRONEGP_CG_UPDATE) return reinterpret_cast<const T*>(a.coef)[c];
    else if constexpr (MODE == KRONEGP_CG_DIRECTION) return reinterpret_cast<const T*>(a.coef)[a.t + c];
    else return T(0);
}

template <class T>
__device__ __forceinline__ T cg_sqrt(T v) {
    if constexpr (sizeof(T) == 4) return sqrtf(v);
    else return sqrt(v);
}

// After a block wrote its partial sums: whether it is the last block of the launch to finish
// (then every block's sums are visible to it).
__device__ __forceinline__ bool cg_last_block(const CgArgs& a) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int total = gridDim.x * gridDim.y;
        last = atomicAdd(a.counter, 1u) == total - 1u;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// The last block's bookkeeping (see the header comment): one warp per column at a time, its
// lanes adding the gridDim.x partial sums in a fixed order.
template <int MODE, class T>
__device__ void cg_epilogue(const CgArgs& a) {
    constexpr int NSUM = cg_nsum<MODE>();
    const int t = (int)a.t, nparts = (int)gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    T* rz = reinterpret_cast<T*>(a.rz);
    T* res = reinterpret_cast<T*>(a.res);
    const T* bnorm = reinterpret_cast<const T*>(a.bnorm);
    T* coef = reinterpret_cast<T*>(a.coef);
    T* rec = reinterpret_cast<T*>(a.rec);
    const T tiny = (T)a.tiny;
    if (warp < nwarps) {
        for (int c = warp; c < t; c += nwarps) {
            double s0 = 0.0, s1 = 0.0;
            for (int b = lane; b < nparts; b += 32) {
                s0 += __ldcg(a.part + ((i64)b * NSUM) * t + c);
                if constexpr (NSUM > 1) s1 += __ldcg(a.part + ((i64)b * NSUM + 1) * t + c);
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
                s0 += __shfl_xor_sync(0xffffffffu, s0, off);
                if constexpr (NSUM > 1) s1 += __shfl_xor_sync(0xffffffffu, s1, off);
            }
            if (lane == 0) {
                const bool keep = a.active[c] || (a.force && !a.zero[c]);
                if constexpr (MODE == KRONEGP_CG_DOT) {
                    const T pap = (T)s0;
                    const T alpha = keep ? rz[c] / (pap > tiny ? pap : tiny) : T(0);
                    coef[c] = alpha;
                    if (rec) rec[c] = alpha;
                } else {
                    const T rz_new = (T)s0, rr = (T)s1, rz_old = rz[c];
                    const T beta = keep ? rz_new / (rz_old > tiny ? rz_old : tiny) : T(0);
                    coef[t + c] = beta;
                    if (rec) rec[c] = beta;
                    if (keep) {
                        rz[c] = rz_new;
                        a.iters[c] += 1;
                        res[c] = cg_sqrt<T>(rr > T(0) ? rr : T(0)) / bnorm[c];
                    }
                    a.active[c] = a.active[c] && res[c] > (T)a.tol;
                }
            }
        }
    }
    if constexpr (MODE == KRONEGP_CG_UPDATE) {
        __syncthreads();
        if (threadIdx.x == 0) {
            int any = 0;
            for (int c = 0; c < t; ++c) any |= a.active[c];
            *a.any_active = any;
        }
    }
    if (threadIdx.x == 0) *a.counter = 0u;
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
    const T coef = cg_coef<MODE, T>(a, c);
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
        if (cg_last_block(a)) cg_epilogue<MODE, T>(a);
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
    const T coef = cg_coef<MODE, T>(a, c);
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
        if (cg_last_block(a)) cg_epilogue<MODE, T>(a);
    }
}
