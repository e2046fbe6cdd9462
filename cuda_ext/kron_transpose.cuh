// Transpose of a wide (D × N) row-major matrix into a tall-skinny (N × D) one, D small (≤ 32),
// batched over blockIdx.z (batch strides a.xb, a.yb). N = a.M.
//
// kron_matmul with T ≤ 32 right-hand sides runs in the rotating form (kronegp/_cuda/axis_gemm.py:
// every vendor GEMM has the T columns inside its long side, never as its short side), which
// leaves the result as yᵀ (T, K); this copy puts it back. torch's generic strided copy moves a
// (K, 11) → (11, K) transpose at ~0.8 TB/s;
// here a block owns TILE consecutive rows n: their TILE·D elements are one contiguous run of
// the tall matrix and D runs of TILE elements of the wide one, so both global sides are
// coalesced and the turn happens in shared memory (row pitch TILE + 1: lanes with consecutive
// d land in distinct banks).
#pragma once
#include "kron_common.cuh"

template <class Spec>
__device__ __forceinline__ void kron_transpose(const KronArgs& a) {
    typedef typename Spec::T T;
    constexpr int D = Spec::D, TILE = Spec::TILE, NT = Spec::NT, PITCH = TILE + 1;
    __shared__ T s[D * PITCH];
    const i64 n_total = a.M;
    const i64 n0 = (i64)blockIdx.x * TILE;
    const T* x = reinterpret_cast<const T*>(a.x) + (i64)blockIdx.z * a.xb;
    T* y = reinterpret_cast<T*>(a.y) + (i64)blockIdx.z * a.yb;
    // x (D, N) -> y (N, D)
#pragma unroll 4
    for (int e = threadIdx.x; e < TILE * D; e += NT) {
        const int d = e / TILE, j = e % TILE;
        if (n0 + j < n_total) s[d * PITCH + j] = x[d * n_total + n0 + j];
    }
    __syncthreads();
#pragma unroll 4
    for (int e = threadIdx.x; e < TILE * D; e += NT) {
        const int j = e / D, d = e % D;
        if (n0 + j < n_total) y[n0 * D + e] = s[d * PITCH + j];
    }
}
