// Small-batch matrix products (1 to 8 token rows: decode steps) and what sits around them in a
// Llama layer. At such row counts a linear layer is a read of its weight matrix, so these kernels
// are built to keep the most weight bytes in flight: each weight element is read once with 16-byte
// loads, and the norm and the activation are folded into the product:
//
//   gemv_m<M>:               out = x @ W^T (+ bias)                          o_proj, down
//   add_norm_gemv_m<M>:      s = a + b (or a), out = rms_norm(s) @ W^T (+ bias), s_out = s     qkv
//   add_norm_gemv_silu_m<M>: same prologue; W = [gate; up] ([2I, K]), out = silu(g) * u ([M, I])
//   add_norm_gemv_silu_u3_m<M>: the same with 3-chunk stretches (U = 3, below; M = 1, 2)
//
// M (1, 2, 4, 8) is the row count compiled for; `rows` <= M is the real one (the rest is padding
// that is neither read nor written). W is [N, K] row-major (HF's [out, in]); K is a multiple of 8
// and every row pointer is 16-byte aligned (the wrapper in backend/cuda_gemv.py checks).
//
// Work split. A "unit" is one output column n (or, for the SiLU form, the pair gate n / up n).
// `ks` warps share a unit, each taking one segment of K; a block holds `rpb` units side by side
// (ks * rpb warps) and loops over passes of rpb units (the grid is sized to fill the GPU once, so
// the norm prologue runs once per block). A warp's work is a sequence of stretches of 32 * U
// 16-byte chunks (one load per lane per chunk); the next stretch, of the same unit or of the next
// pass, is loaded while the current one is multiplied, so a warp always has two in flight. With a
// long K (down: 8960) the segments make each warp's chain of dependent loads short; the partial
// sums of a unit meet in shared memory. (A warp per unit over all of K reached 1.1 TB/s on the
// down projection, bench/NOTES.md.) The SiLU form runs a warp per unit all the same (ks = 1, the
// host's choice, backend/cuda_gemv.split_k): its K is the hidden size, and the block-wide barrier
// that ends each split unit cost more than the longer chains (NOTES #55). Its stretches are of
// U = 4 chunks a lane (two rows each), or 3 where that takes a unit in as many stretches with none
// part-empty (backend/cuda_gemv.silu_stretch_chunks: K = 1536 is two stretches of 96 chunks instead
// of 128 + 64; H200, qwen2.5-1.5b batch 1 +0.8-1.3%, bench/NOTES.md #77).
//
// Rounding matches the separate kernels: s, the normed input, the product and g and u are rounded
// to the 16-bit type exactly where the unfused path stores them, so only fp32 summation order
// differs.
#include "gemv_common.cuh"

#define GEMV_MAX_WARPS 8

// Where this warp works: the block-uniform pass sequence and its own unit slot and K segment.
struct GemvWork {
  int units, K, chunks, ks, rpb, seg_chunks, stretches, passes;
  int slot, seg, lane;

  // Stretch t of this warp's sequence (t = pass_index * stretches + s).
  __device__ __forceinline__ int unit(int t) const {
    return (blockIdx.x + (t / stretches) * gridDim.x) * rpb + slot;
  }
  __device__ __forceinline__ int seg_end() const { return min(chunks, (seg + 1) * seg_chunks); }
  __device__ __forceinline__ int num_items() const {  // passes of this block times stretches
    const int mine = passes > (int)blockIdx.x ? (passes - (int)blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    return mine * stretches;
  }
  __device__ __forceinline__ bool ends_unit(int t) const { return t % stretches == stretches - 1; }
};

// U chunks of each of R weight rows (the unit's rows: n, and for the SiLU form n + `second`).
template <int R, int U>
struct WeightBatch {
  uint4 v[U][R];

  __device__ __forceinline__ void load(const GemvWork& w, const scalar_t* __restrict__ W, int second, int t) {
    const int n = w.unit(t);
    const int c0 = w.seg * w.seg_chunks + (t % w.stretches) * 32 * U + w.lane, end = w.seg_end();
    const bool live = n < w.units;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int c = c0 + 32 * u;
        v[u][r] = live && c < end ? load_stream(W + (i64)(n + r * second) * w.K + (i64)c * 8) : make_uint4(0, 0, 0, 0);
      }
  }
};

// acc[r][m] += this lane's share of stretch t: weights from `b`, inputs x[m * x_stride + k]
// (shared or global memory; the kernels inline this, so the compiler sees which). No branches: a
// chunk past the segment has zero weights and its input reads chunk 0 and is zeroed, so the
// compiler can issue all input loads of the stretch together. Padding rows (m >= rows) read row 0
// (x may have only `rows` rows); their sums are never written.
template <int M, int R, int U>
__device__ __forceinline__ void accumulate(float (&acc)[R][M], const WeightBatch<R, U>& b, const GemvWork& w,
                                           int t, const scalar_t* x, i64 x_stride, int rows) {
  const int c0 = w.seg * w.seg_chunks + (t % w.stretches) * 32 * U + w.lane, end = w.seg_end();
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + 32 * u;
    const bool in = c < end;
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) unpack8(b.v[u][r], wf[r]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      uint4 xv = *reinterpret_cast<const uint4*>(x + (m < rows ? m : 0) * x_stride + (i64)(in ? c : 0) * 8);
      if (!in) xv = make_uint4(0, 0, 0, 0);
      float xf[8];
      unpack8(xv, xf);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
    }
  }
}

// The unit of stretch t is complete in every warp that shares it: sum the warps' partial sums and
// write the outputs. Every warp of the block calls this at the same t (stretches and passes are
// block-uniform), so the barrier is reached by all. `red` alternates between two halves by pass,
// so a pass's writes never race the previous pass's reads.
template <int M, int R, bool SILU>
__device__ __forceinline__ void finish_unit(float (&acc)[R][M], const GemvWork& w, int t, float (*red)[GEMV_MAX_WARPS][R][M],
                                            scalar_t* __restrict__ out, const scalar_t* __restrict__ bias, int rows) {
  float total[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      total[r][m] = warp_sum(acc[r][m]);
      acc[r][m] = 0.f;
    }
  const int n = w.unit(t);
  if (w.ks > 1) {
    const int half = (t / w.stretches) & 1, warp = threadIdx.x >> 5;
    if (w.lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) red[half][warp][r][m] = total[r][m];
    }
    __syncthreads();
    if (w.seg != 0) return;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float s = 0.f;
        for (int k = 0; k < w.ks; ++k) s += red[half][warp + k][r][m];  // fixed order: deterministic
        total[r][m] = s;
      }
  }
  if (n >= w.units) return;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (w.lane != m || m >= rows) continue;
    if (SILU) {
      const int inter = w.units;
      const float g = to_f32(from_f32(total[0][m])), u = to_f32(from_f32(total[R - 1][m]));
      out[(i64)m * inter + n] = from_f32(g / (1.f + expf(-g)) * u);  // as silu_and_mul_kernel
    } else {
      const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
      out[(i64)m * w.units + n] = from_f32(total[0][m] + b);
    }
  }
}

__device__ __forceinline__ GemvWork gemv_work(int units, int K, int ks, int seg_chunks, int U) {
  GemvWork w;
  w.units = units;
  w.K = K;
  w.chunks = K >> 3;
  w.ks = ks;
  w.rpb = (blockDim.x >> 5) / ks;
  w.seg_chunks = seg_chunks;
  w.stretches = (seg_chunks + 32 * U - 1) / (32 * U);
  w.passes = (units + w.rpb - 1) / w.rpb;
  const int warp = threadIdx.x >> 5;
  w.slot = warp / ks;
  w.seg = warp - w.slot * ks;
  w.lane = threadIdx.x & 31;
  return w;
}

// The stream of this warp: `first` holds stretch 0 already (a kernel issues it before its
// prologue). Unrolled by two so that the two batches never need a register copy (a copy would
// wait for the loads it copies).
template <int M, int R, int U, bool SILU>
__device__ __forceinline__ void gemv_stream(WeightBatch<R, U>& first, const GemvWork& w, const scalar_t* __restrict__ W,
                                            int second, const scalar_t* x, i64 x_stride, scalar_t* __restrict__ out,
                                            const scalar_t* __restrict__ bias, int rows) {
  __shared__ float red[2][GEMV_MAX_WARPS][R][M];
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  WeightBatch<R, U> next;
  const int items = w.num_items();
  for (int t = 0; t < items; t += 2) {
    if (t + 1 < items) next.load(w, W, second, t + 1);
    accumulate<M, R, U>(acc, first, w, t, x, x_stride, rows);
    if (w.ends_unit(t)) finish_unit<M, R, SILU>(acc, w, t, red, out, bias, rows);
    if (t + 1 >= items) break;
    if (t + 2 < items) first.load(w, W, second, t + 2);
    accumulate<M, R, U>(acc, next, w, t + 1, x, x_stride, rows);
    if (w.ends_unit(t + 1)) finish_unit<M, R, SILU>(acc, w, t + 1, red, out, bias, rows);
  }
}

// The SiLU form with stretches of U chunks a lane (entry point add_norm_gemv_silu<SUFFIX>_m<M>).
#define SILU_ENTRY_POINT(M, U, SUFFIX)                                                                \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, 2) add_norm_gemv_silu##SUFFIX##_m##M( \
      scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,       \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                 \
      const scalar_t* __restrict__ W, int rows, int inter, int K, int ks, int seg_chunks) {           \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    const GemvWork w = gemv_work(inter, K, ks, seg_chunks, U);                                        \
    WeightBatch<2, U> first;                                                                          \
    first.load(w, W, inter, 0);                                                                       \
    gemv_pdl_enter();                                                                                 \
    stage_add_norm<M>(xs, s_out, a, b, norm_w, eps, rows, K);                                         \
    gemv_stream<M, 2, U, true>(first, w, W, inter, xs, K, out, nullptr, rows);                        \
  }

// Launch: blockDim.x = 32 * ks * rpb (at most GEMV_MAX_WARPS warps), seg_chunks = ceil((K / 8) / ks).
#define GEMV_ENTRY_POINTS(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, 2) gemv_m##M(                        \
      scalar_t* __restrict__ out, const scalar_t* __restrict__ x, i64 x_stride,                       \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int N, int K,      \
      int ks, int seg_chunks) {                                                                       \
    const GemvWork w = gemv_work(N, K, ks, seg_chunks, 8);                                            \
    WeightBatch<1, 8> first;                                                                          \
    first.load(w, W, 0, 0);                                                                           \
    gemv_pdl_enter(); /* the first weights are in flight while the previous kernel finishes */        \
    gemv_stream<M, 1, 8, false>(first, w, W, 0, x, x_stride, out, bias, rows);                        \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, 2) add_norm_gemv_m##M(               \
      scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,       \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                 \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int N, int K,      \
      int ks, int seg_chunks) {                                                                       \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    const GemvWork w = gemv_work(N, K, ks, seg_chunks, 8);                                            \
    WeightBatch<1, 8> first;                                                                          \
    first.load(w, W, 0, 0); /* before the prologue: the weight stream runs while the norm waits */    \
    gemv_pdl_enter();                                                                                 \
    stage_add_norm<M>(xs, s_out, a, b, norm_w, eps, rows, K);                                         \
    gemv_stream<M, 1, 8, false>(first, w, W, 0, xs, K, out, bias, rows);                              \
  }                                                                                                   \
  SILU_ENTRY_POINT(M, 4, )

GEMV_ENTRY_POINTS(1)
GEMV_ENTRY_POINTS(2)
GEMV_ENTRY_POINTS(4)
GEMV_ENTRY_POINTS(8)
// 3-chunk stretches for the steps the backend runs here by default (1-2 rows; at 4 and 8 rows this
// form would spill registers).
SILU_ENTRY_POINT(1, 3, _u3)
SILU_ENTRY_POINT(2, 3, _u3)
