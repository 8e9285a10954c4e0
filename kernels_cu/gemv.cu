// Small-batch matrix products (1 to 8 token rows: decode steps) and what sits around them in a
// Llama layer. At such row counts a linear layer is a read of its weight matrix; cuBLAS reached
// 0.6-2.2 TB/s of the H100's ~3 TB/s there (ncu, bench/RESULTS.md), and the RMSNorm and SiLU
// kernels between the products cost as much again in launches. These kernels stream each weight
// row once with 16-byte loads and fold the norm and the activation into the product:
//
//   gemv_m<M>:               out = x @ W^T (+ bias)                          o_proj, down
//   add_norm_gemv_m<M>:      s = a + b (or a), out = rms_norm(s) @ W^T (+ bias), s_out = s     qkv
//   add_norm_gemv_silu_m<M>: same prologue; W = [gate; up] ([2I, K]), out = silu(g) * u ([M, I])
//
// M (1, 2, 4, 8) is the row count compiled for; `rows` <= M is the real one (the rest is padding
// that is neither read nor written). W is [N, K] row-major (HF's [out, in]); K is a multiple of 8
// and every row pointer is 16-byte aligned (the wrapper in backend/cuda_gemv.py checks).
// A warp computes whole output rows: its lanes stride over K in 8-value chunks, fp32 accumulators,
// one warp reduction per row; warps loop over rows (the grid is sized to fill the GPU once).
//
// Rounding matches the separate kernels: s, the normed input, the product and g and u are rounded
// to the 16-bit type exactly where the unfused path stores them, so only fp32 summation order
// differs.
#include "common.cuh"

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / 32)

// 16 bytes of weights that are read once: bypass L1 (the activations stay there). volatile keeps
// the load where it is written: without it the compiler may sink a prefetch to its first use.
__device__ __forceinline__ uint4 load_stream(const scalar_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ void unpack8(const uint4 u, float* f) {
  const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = to_f32((scalar_t)(w[i] & 0xffffu));
    f[2 * i + 1] = to_f32((scalar_t)(w[i] >> 16));
  }
}

// U 8-value chunks of each of R weight rows, one lane's share of a stretch of 32 * U chunks.
// Loads are predicated, not looped, so a short row (K = 1536 is 6 chunks a lane) is one batch
// of independent loads rather than a chain of dependent ones.
template <int R, int U>
struct WeightBatch {
  uint4 v[U][R];

  __device__ __forceinline__ void load(const scalar_t* const (&w)[R], int c0, int chunks) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        v[u][r] = c0 + 32 * u < chunks ? load_stream(w[r] + (i64)(c0 + 32 * u) * 8) : make_uint4(0, 0, 0, 0);
  }
};

// acc[r][m] = sum_k w[r][k] * x[m * x_stride + k] for this warp's R weight rows, reduced over the
// warp (every lane holds the sums). `batch` holds the first stretch already (a kernel issues it
// before its prologue); while one stretch is multiplied the next is in flight. x may be shared or
// global memory (the kernels inline this, so the compiler sees which).
template <int M, int R, int U>
__device__ __forceinline__ void warp_dot_rows(float (&acc)[R][M], WeightBatch<R, U>& batch,
                                              const scalar_t* const (&w)[R], const scalar_t* x, i64 x_stride,
                                              int K, int lane) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  const int chunks = K >> 3;
  for (int c0 = lane; c0 < chunks; c0 += 32 * U) {
    WeightBatch<R, U> next;
    const bool more = c0 + 32 * U < chunks;  // uniform over the warp
    if (more) next.load(w, c0 + 32 * U, chunks);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c < chunks) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) unpack8(batch.v[u][r], wf[r]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          unpack8(*reinterpret_cast<const uint4*>(x + m * x_stride + (i64)c * 8), xf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
        }
      }
    }
    if (more) batch = next;
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
}

// Rows n, n + num_warps, ... of this warp; the first one's weights are prefetched by the caller.
template <int M>
__device__ __forceinline__ void gemv_rows(WeightBatch<1, 8>& first, scalar_t* __restrict__ out, const scalar_t* x,
                                          i64 x_stride, const scalar_t* __restrict__ W,
                                          const scalar_t* __restrict__ bias, int rows, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int num_warps = gridDim.x * GEMV_WARPS;
  for (int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5); n < N; n += num_warps) {
    const scalar_t* const w[1] = {W + (i64)n * K};
    if (n >= num_warps) first.load(w, lane, K >> 3);  // rows after the first: fetched here
    float acc[1][M];
    warp_dot_rows<M, 1, 8>(acc, first, w, x, x_stride, K, lane);
    const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (lane == m && m < rows) out[(i64)m * N + n] = from_f32(acc[0][m] + b);
  }
}

template <int M>
__device__ __forceinline__ void gemv_silu_rows(WeightBatch<2, 4>& first, scalar_t* __restrict__ out,
                                               const scalar_t* x, i64 x_stride, const scalar_t* __restrict__ W,
                                               int rows, int inter, int K) {
  const int lane = threadIdx.x & 31;
  const int num_warps = gridDim.x * GEMV_WARPS;
  for (int j = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5); j < inter; j += num_warps) {
    const scalar_t* const w[2] = {W + (i64)j * K, W + (i64)(inter + j) * K};
    if (j >= num_warps) first.load(w, lane, K >> 3);
    float acc[2][M];
    warp_dot_rows<M, 2, 4>(acc, first, w, x, x_stride, K, lane);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (lane == m && m < rows) {
        const float g = to_f32(from_f32(acc[0][m])), u = to_f32(from_f32(acc[1][m]));
        out[(i64)m * inter + j] = from_f32(g / (1.f + expf(-g)) * u);  // as silu_and_mul_kernel
      }
    }
  }
}

// The first stretch of this warp's first row(s), issued before anything else so that the weight
// stream is already running while a kernel's prologue (the norm) waits on its own loads.
template <int R, int U>
__device__ __forceinline__ void prefetch_first(WeightBatch<R, U>& batch, const scalar_t* __restrict__ W,
                                               int units, int second_offset, int K) {
  const int unit = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
  if (unit >= units) return;
  const scalar_t* w[R];
#pragma unroll
  for (int r = 0; r < R; ++r) w[r] = W + (i64)(unit + r * second_offset) * K;
  batch.load(reinterpret_cast<const scalar_t* const (&)[R]>(w), threadIdx.x & 31, K >> 3);
}

// The shared prologue: xs[m, :] = rms_norm(a[m] + b[m]) for m < rows (zeros for padding rows);
// block 0 also stores the sum into s_out when b is given. Returns after a barrier.
template <int M>
__device__ __forceinline__ void stage_add_norm(scalar_t* xs, scalar_t* s_out, const scalar_t* __restrict__ a,
                                               const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w,
                                               float eps, int rows, int K) {
  const bool store = b != nullptr && s_out != nullptr && blockIdx.x == 0;
#pragma unroll 1
  for (int m = 0; m < M; ++m) {
    float ss = 0.f;
    if (m < rows) {
      for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const i64 i = (i64)m * K + k;
        const scalar_t s = b != nullptr ? from_f32(to_f32(a[i]) + to_f32(b[i])) : a[i];
        if (store) s_out[i] = s;
        xs[i] = s;
        const float v = to_f32(s);
        ss += v * v;
      }
    }
    ss = block_sum(ss);  // `rows` is uniform over the block, so every thread gets here
    const float inv_rms = rsqrtf(ss / (float)K + eps);
    // Each thread rescales the elements it wrote itself (same k): no barrier needed in between.
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const i64 i = (i64)m * K + k;
      xs[i] = m < rows ? from_f32(to_f32(xs[i]) * inv_rms * to_f32(norm_w[k])) : (scalar_t)0;
    }
  }
  __syncthreads();
}

#define GEMV_ENTRY_POINTS(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_m##M(                               \
      scalar_t* __restrict__ out, const scalar_t* __restrict__ x, i64 x_stride,                       \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int N, int K) {    \
    WeightBatch<1, 8> first;                                                                          \
    prefetch_first<1, 8>(first, W, N, 0, K);                                                          \
    gemv_rows<M>(first, out, x, x_stride, W, bias, rows, N, K);                                       \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) add_norm_gemv_m##M(                      \
      scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,       \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                 \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int N, int K) {    \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    WeightBatch<1, 8> first;                                                                          \
    prefetch_first<1, 8>(first, W, N, 0, K);                                                          \
    stage_add_norm<M>(xs, s_out, a, b, norm_w, eps, rows, K);                                         \
    gemv_rows<M>(first, out, xs, K, W, bias, rows, N, K);                                             \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) add_norm_gemv_silu_m##M(                 \
      scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,       \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                 \
      const scalar_t* __restrict__ W, int rows, int inter, int K) {                                   \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    WeightBatch<2, 4> first;                                                                          \
    prefetch_first<2, 4>(first, W, inter, inter, K);                                                  \
    stage_add_norm<M>(xs, s_out, a, b, norm_w, eps, rows, K);                                         \
    gemv_silu_rows<M>(first, out, xs, K, W, rows, inter, K);                                          \
  }

GEMV_ENTRY_POINTS(1)
GEMV_ENTRY_POINTS(2)
GEMV_ENTRY_POINTS(4)
GEMV_ENTRY_POINTS(8)
