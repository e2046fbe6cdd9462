// Eigendecomposition of small symmetric matrices (N ≤ ~168), one thread block per matrix, by
// one-sided (Hestenes) Jacobi in double precision with the matrix resident in shared memory.
//
// Why: Kronecker methods eigendecompose each factor K_k (typically 10–200 rows) at every set of
// hyperparameters. cuSOLVER's eigh of a 128-row matrix is a chain of ~130–250 launch-bound
// kernels (~5 ms for three), and the host's LAPACK needs a device→host copy, which synchronises:
// the GPU idles for the ~2.5 ms a step spends there. Here the decomposition is one launch that
// the host does not wait for.
//
// Method. B = sym(A) + s·I with s = SHIFT·‖A‖_F (A's lower triangle is read, as LAPACK's eigh
// does). With SHIFT > 1, B is positive definite for every symmetric A (‖A‖_F ≥ |λ|), which one-
// sided Jacobi needs to return eigenvectors rather than singular vectors (B's singular vectors
// are its eigenvectors only when no two eigenvalues are opposite). U = B·G where G is an
// orthonormal float64 start (the identity, or the eigenvectors of a nearby matrix: a training
// loop's factors change little between steps). Plane rotations of column pairs (p, q),
//     d = ‖u_q‖² − ‖u_p‖²,  t = 2·sign(d)·u_pᵀu_q / (|d| + √(d² + 4(u_pᵀu_q)²)),  c = 1/√(1 + t²), s = c·t,
//     u_p ← c·u_p − s·u_q,  u_q ← s·u_p + c·u_q
// (t = tan θ zeroes u_pᵀu_q), make the columns of U mutually orthogonal (U = B·V with V
// orthogonal, so UᵀU = Vᵀ B² V is diagonal): each column is then μ_j v_j with v_j an
// eigenvector and μ_j = λ_j + s > 0. Eigenvector q_j = u_j / ‖u_j‖; eigenvalue λ_j = q_jᵀ A q_j
// (the Rayleigh quotient: ‖u_j‖ − s would lose small eigenvalues' digits to the shift). No V is
// accumulated: only U lives in shared memory (N² doubles).
//
// Order: the round-robin ("circle") tournament over NPAD = N rounded up to even columns (an odd
// N gets one zero column, never rotated): NPAD − 1 rounds per sweep, each a set of NPAD/2
// disjoint pairs, all rotated at once by groups of LANES threads (a column's dot products
// reduced by shuffles within the group); a __syncthreads between rounds. Stopping rule at the
// sweep loop. A matrix that has not converged after max_sweeps (or holds NaN/Inf) gets NaN
// eigenvalues, so that the failure shows downstream instead of passing silently.
//
// Output per matrix: λ ascending (a rank sort, ties by column index), Q (N × N row-major,
// Q[:, k] the eigenvector of λ[k]), in T; optionally the eigenvectors in float64, unsorted
// (keep: the next start; not written for NaN/Inf input); the sweep count (int).
#pragma once
#include "kron_common.cuh"

#define KRONEGP_EIGH_MAX_BATCH 8

struct EighArgs {
    const void* a[KRONEGP_EIGH_MAX_BATCH];      // (N, N) row-major, lower triangle read
    double* start[KRONEGP_EIGH_MAX_BATCH];      // (N, N) orthonormal start (read), or null (identity)
    double* keep[KRONEGP_EIGH_MAX_BATCH];       // (N, N): the eigenvectors in float64 (written; may be start), or null
    void* lam[KRONEGP_EIGH_MAX_BATCH];          // (N,)
    void* q[KRONEGP_EIGH_MAX_BATCH];            // (N, N) row-major
    int* sweeps;                                 // (batch,)
    double* scratch;                             // (batch, N, N), when a start is given
    double shift;                                // SHIFT: s = shift·‖A‖_F
    double tol;
    int max_sweeps;
};

// Sum over the LANES lanes of a group (mask: the group's lanes).
template <int LANES>
__device__ __forceinline__ double eigh_group_sum(double v, unsigned mask) {
#pragma unroll
    for (int off = LANES / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, LANES);
    return v;
}

// Column at position i of round r in the circle tournament of n players (n even).
__device__ __forceinline__ int eigh_player(int i, int r, int n) {
    return i == 0 ? 0 : (i - 1 + r) % (n - 1) + 1;
}

template <class Spec>
__device__ __forceinline__ void kron_jacobi_eigh(const EighArgs& a) {
    typedef typename Spec::T T;
    constexpr int N = Spec::N, NPAD = N + (N & 1), NT = Spec::NT;
    constexpr int LANES = Spec::LANES, GROUPS = NT / LANES, PAIRS = NPAD / 2;
    constexpr int E = (N + LANES - 1) / LANES;         // a lane's share of a column
    constexpr int JT = 8, JBLK = (N + JT - 1) / JT;    // the products' column tiles
    static_assert(NT % 32 == 0 && NT <= 1024 && 32 % LANES == 0, "threads");
    // Groups of fewer than 16 lanes walk a column's elements in rotated orders: group g starts at
    // block g % ROT of LANES doubles, so the groups of a warp touch different banks (every column
    // starts at bank 0 when N is a multiple of 16: without the rotation, 8-lane groups made each
    // 64-bit access of a warp take 4 shared-memory wavefronts instead of 2).
    constexpr int ROT = LANES < 16 ? 16 / LANES : 1;

    extern __shared__ double smem[];
    double* u = smem;                    // NPAD columns of N: u[j * N + i] = U[i, j]
    double* sig = smem + NPAD * N;       // column norms
    double* lamv = sig + NPAD;           // Rayleigh quotients
    int* ranks = reinterpret_cast<int*>(lamv + NPAD);
    __shared__ double red[32];
    __shared__ double s_shift;
    __shared__ bool s_finite;

    const int b = blockIdx.x;
    const T* A = reinterpret_cast<const T*>(a.a[b]);
    const double* G = a.start[b];
    const int tid = threadIdx.x, lane = tid % LANES, group = tid / LANES;
    const unsigned mask = LANES == 32 ? 0xffffffffu : ((1u << LANES) - 1u) << (tid & 31 & ~(LANES - 1));
    const int order = group % ROT;  // the element block this group starts at (LANES doubles apart)

    // B = sym(A) (column j of B = row j), its Frobenius norm, then the shift.
    double ss = 0.0;
    for (int e = tid; e < N * N; e += NT) {
        const int j = e / N, i = e % N;
        const double v = (double)(i <= j ? A[(i64)j * N + i] : A[(i64)i * N + j]);
        u[j * N + i] = v;
        ss += v * v;
    }
    if (NPAD != N)
        for (int i = tid; i < N; i += NT) u[N * N + i] = 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (tid % 32 == 0) red[tid / 32] = ss;
    __syncthreads();
    if (tid == 0) {
        double t = 0.0;
        for (int w = 0; w < NT / 32; ++w) t += red[w];
        const double s = a.shift * sqrt(t);
        s_finite = isfinite(s);
        s_shift = s > 0.0 && s_finite ? s : 1.0;  // A = 0: B = I
    }
    __syncthreads();
    const double shift = s_shift;
    // U is kept scaled by a power of two near 1/s (exact): its columns' squared norms are then
    // O(1), so a rotation's angle can be computed in float32 (below).
    const double scale = exp2(-(double)ilogb(shift));
    const bool finite = s_finite;
    for (int e = tid; e < N * N; e += NT) u[e] = (u[e] + (e / N == e % N ? shift : 0.0)) * scale;
    __syncthreads();

    if (G != nullptr) {
        // U = B·G: U[i, j] = Σ_k B[i, k] G[k, j] = Σ_k u[k * N + i] G[k * N + j], through
        // a.scratch (global memory) since B is read whole for every column of U. A thread makes
        // JT columns of one row: one shared load of B per k feeds JT independent FMA chains,
        // and G's JT values are the same address for the whole warp (a broadcast).
        double* w = a.scratch + (i64)b * N * N;
        for (int e = tid; e < N * JBLK; e += NT) {
            const int i = e % N, j0 = (e / N) * JT;
            double acc[JT];
#pragma unroll
            for (int c = 0; c < JT; ++c) acc[c] = 0.0;
            for (int k = 0; k < N; ++k) {
                const double bik = u[k * N + i];
                const double* g = G + (i64)k * N + j0;
#pragma unroll
                for (int c = 0; c < JT; ++c)
                    if (N % JT == 0 || j0 + c < N) acc[c] += bik * g[c];
            }
#pragma unroll
            for (int c = 0; c < JT; ++c)
                if (N % JT == 0 || j0 + c < N) w[(j0 + c) * N + i] = acc[c];
        }
        __syncthreads();
        for (int e = tid; e < N * N; e += NT) u[e] = w[e];
        __syncthreads();
    }

    // Sweeps. A pair is rotated when its cos² = γ²/(αβ) exceeds tol2 = tol²; each thread keeps
    // the largest cos² it met in the sweep, reduced over the block at the sweep's end. Stop
    // after a sweep whose largest cosine was at most 10·tol (its rotations took those pairs
    // below it: a start that is accurate to tol — the previous result for the same matrix —
    // then takes one sweep instead of several slow ones inside the cluster of tiny
    // eigenvalues), or after one whose largest cosine is cos_k ≤ 0.1·√tol while convergence is
    // visibly quadratic (cos_k ≤ 10·cos_{k−1}²): the next sweep would leave cos ≈ cos_k² ≤
    // tol/100, below what it would find to rotate (the factor 100 is a margin: a cluster of
    // nearly equal eigenvalues converges more slowly than the quadratic rate). A warm start
    // converges that way (e.g. cosines 1e-3, 4e-6, 8e-11 in float64: stop after the third); a cold
    // start of a kernel matrix converges linearly for a while and stops the plain way.
    __shared__ double red_max[2][32];
    const double tol2 = a.tol * a.tol;
    double prev = -1.0;
    int sweep = 0;
    bool converged = false;
    while (sweep < a.max_sweeps) {
        ++sweep;
        double mx = 0.0;
        for (int r = 0; r < NPAD - 1; ++r) {
            for (int k = group; k < PAIRS; k += GROUPS) {
                const int p = eigh_player(k, r, NPAD), q = eigh_player(NPAD - 1 - k, r, NPAD);
                double* up = u + p * N;
                double* uq = u + q * N;
                double xp[E], xq[E];
                // two partial sums each: half the length of the dependent FMA chains
                double sa[2] = {0.0, 0.0}, sb[2] = {0.0, 0.0}, sg[2] = {0.0, 0.0};
#pragma unroll
                for (int m = 0; m < E; ++m) {
                    const int i = lane + ((m + order) % E) * LANES;
                    xp[m] = (N % LANES == 0 || i < N) ? up[i] : 0.0;
                    xq[m] = (N % LANES == 0 || i < N) ? uq[i] : 0.0;
                    sa[m & 1] += xp[m] * xp[m];
                    sb[m & 1] += xq[m] * xq[m];
                    sg[m & 1] += xp[m] * xq[m];
                }
                double alpha = sa[0] + sa[1], beta = sb[0] + sb[1], gamma = sg[0] + sg[1];
                alpha = eigh_group_sum<LANES>(alpha, mask);
                beta = eigh_group_sum<LANES>(beta, mask);
                gamma = eigh_group_sum<LANES>(gamma, mask);
                const double ab = alpha * beta, g2 = gamma * gamma;
                // cos² for the stopping rule only: float32 suffices (α, β are O(1), see scale)
                if (ab > 0.0) mx = fmax(mx, (double)__fdividef((float)g2, (float)ab));
                if (g2 > tol2 * ab) {
                    // t = tan θ, the smaller root of t² + 2ζt − 1 = 0, ζ = (β − α)/(2γ), in float32:
                    // an angle off by 1e-7 (relative) leaves u_pᵀu_q at 1e-7 of its value for the
                    // next sweep, where convergence is quadratic anyway; c and s are then formed
                    // in float64 from it, so the rotation itself is orthogonal to float64 rounding.
                    const float df = (float)(beta - alpha), gf = (float)gamma;
                    const float tf = __fdividef((df >= 0.0f ? 2.0f : -2.0f) * gf, fabsf(df) + __fsqrt_rn(df * df + 4.0f * gf * gf));
                    const double t = (double)tf;
                    const double c = rsqrt(1.0 + t * t), s = c * t;
#pragma unroll
                    for (int m = 0; m < E; ++m) {
                        const int i = lane + ((m + order) % E) * LANES;
                        if (N % LANES == 0 || i < N) {
                            up[i] = c * xp[m] - s * xq[m];
                            uq[i] = s * xp[m] + c * xq[m];
                        }
                    }
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        if (tid % 32 == 0) red_max[sweep & 1][tid / 32] = mx;
        __syncthreads();
        double m = 0.0;
        for (int w = 0; w < NT / 32; ++w) m = fmax(m, red_max[sweep & 1][w]);
        if (m <= 100.0 * tol2 || (prev >= 0.0 && m <= 0.01 * a.tol && m <= 100.0 * prev * prev)) {
            converged = true;
            break;
        }
        prev = m;
    }

    // Eigenvectors: the columns normalised. Eigenvalues: their Rayleigh quotients q_jᵀ A q_j
    // (A read again from global memory), not ‖u_j‖ − s, which would lose the digits of small
    // eigenvalues to the cancellation against the shift.
    for (int j = group; j < N; j += GROUPS) {
        double s = 0.0;
#pragma unroll
        for (int m = 0; m < E; ++m) {
            const int i = lane + m * LANES;
            if (N % LANES == 0 || i < N) s += u[j * N + i] * u[j * N + i];
        }
        s = eigh_group_sum<LANES>(s, mask);
        if (lane == 0) sig[j] = sqrt(s);
    }
    __syncthreads();
    for (int e = tid; e < N * N; e += NT) u[e] /= sig[e / N];
    __syncthreads();
    // W = A·Q tile by tile (a thread: one row i, JT columns; A's row i from global memory, read
    // through its lower triangle), then λ_j = Σ_i Q[i, j] W[i, j] summed over a warp's rows by
    // shuffles and over warps by shared atomics.
    for (int j = tid; j < NPAD; j += NT) lamv[j] = 0.0;
    __syncthreads();
    for (int e0 = 0; e0 < N * JBLK; e0 += NT) {
        const int e = e0 + tid;
        const bool live = e < N * JBLK;
        const int i = live ? e % N : 0, j0 = live ? (e / N) * JT : 0;
        double acc[JT];
#pragma unroll
        for (int c = 0; c < JT; ++c) acc[c] = 0.0;
        if (live) {
            for (int k = 0; k < N; ++k) {
                const double aik = (double)(k <= i ? A[(i64)i * N + k] : A[(i64)k * N + i]);
#pragma unroll
                for (int c = 0; c < JT; ++c)
                    if (N % JT == 0 || j0 + c < N) acc[c] += aik * u[(j0 + c) * N + k];
            }
#pragma unroll
            for (int c = 0; c < JT; ++c)
                acc[c] = (N % JT == 0 || j0 + c < N) ? acc[c] * u[(j0 + c) * N + i] : 0.0;
        }
        // A warp's rows share one column tile when N ≥ 32 (e = j-tile · N + i); otherwise add
        // each thread's own values.
        if (N % 32 == 0) {
#pragma unroll
            for (int c = 0; c < JT; ++c) {
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
            }
            if (live && tid % 32 == 0)
#pragma unroll
                for (int c = 0; c < JT; ++c) atomicAdd(&lamv[j0 + c], acc[c]);
        } else if (live) {
#pragma unroll
            for (int c = 0; c < JT; ++c)
                if (j0 + c < N) atomicAdd(&lamv[j0 + c], acc[c]);
        }
    }
    __syncthreads();
    T* lam = reinterpret_cast<T*>(a.lam[b]);
    T* Q = reinterpret_cast<T*>(a.q[b]);
    const bool ok = converged && finite;
    for (int j = tid; j < N; j += NT) {
        // Ascending; NaN last; ties by index: always a permutation.
        const double vj = lamv[j];
        const bool nj = vj != vj;
        int rank = 0;
        for (int i = 0; i < N; ++i) {
            const double vi = lamv[i];
            const bool ni = vi != vi;
            rank += ni != nj ? nj : (ni ? i < j : (vi < vj || (vi == vj && i < j)));
        }
        ranks[j] = rank;
        lam[rank] = (T)(ok ? vj : __longlong_as_double(0x7ff8000000000000ll));
    }
    __syncthreads();
    for (int e = tid; e < N * N; e += NT) {
        const int j = e / N, i = e % N;
        Q[(i64)i * N + ranks[j]] = (T)u[e];
        // unsorted: a start needs no order; none from NaN/Inf input, which would start every later call there at NaN
        if (finite && a.keep[b] != nullptr) a.keep[b][(i64)i * N + j] = u[e];
    }
    if (tid == 0) a.sweeps[b] = sweep;
}
