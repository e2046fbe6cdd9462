// Shared definitions of the Kron-Matmul kernels (no CUDA or torch headers: NVRTC compiles this
// standalone).
//
// Every launch computes one "rotating step" of the FastKron algorithm over a view of the data as
// rows of length K:
//
//   x[b, m, s*PG + pg]  (row m, slice s of PG elements)   ->   y[b, m, qg*S + s]
//   y[b, m, qg*S + s] = sum_pg x[b, m, s*PG + pg] * G[pg, qg],   G = F_0 ⊗ … ⊗ F_{NF-1}
//
// so the result of slice s for output column qg is stored straight at its final place: after all
// groups of factors have been applied (last group first) the row is in natural order and no
// transpose pass ever runs. Element (b, m, k) of x lives at x + b*xb + m*xm + k*xk (strides in
// elements, 64-bit), likewise y; factor i element (p, q) at f[i] + b*fb[i] + p*f0[i] + q*f1[i], so
// transposed (.mT) and broadcast (stride 0) factors need no copy.
#pragma once

typedef long long i64;

#define KRONEGP_MAX_FUSED 8

struct KronArgs {
    const void* x;
    void* y;
    const void* f[KRONEGP_MAX_FUSED];
    i64 xb, xm, xk;
    i64 yb, ym, yk;
    i64 fb[KRONEGP_MAX_FUSED], f0[KRONEGP_MAX_FUSED], f1[KRONEGP_MAX_FUSED];
    i64 M;  // rows per batch entry
    i64 S;  // slices per row: (input row length) / PG
};

template <class T> struct Vec;
template <> struct Vec<float> { typedef float4 type; static constexpr int N = 4; };
template <> struct Vec<double> { typedef double2 type; static constexpr int N = 2; };
// What one thread moves per access: a Vec when the layout allows 16-byte accesses, else one word.
template <class T, bool VECTOR> struct Item { typedef T type; static constexpr int N = 1; };
template <class T> struct Item<T, true> : Vec<T> {};

__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return cdiv(a, b) * b; }
