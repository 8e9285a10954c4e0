// The weight stream of the small-batch products (gemv.cu, gemv_rope.cu): how a block's warps
// share the output units and stream their weight rows, and the per-unit sums. What a unit's
// rows are and what its outputs become is the kernel's (the Rows and Finish types of gemv_stream).
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
#pragma once
#include "gemv_common.cuh"

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

// A Rows type names a unit's weight rows (rows_of(n, r)) and what else the unit's outputs need that
// is loaded with its weights (Extra, by load_extra; gemv_rope.cu's cos, sin and biases), so that it
// travels in the same double-buffered batch and no copy waits on a load.
struct NoExtra {};

// The weight rows of unit n: n, and for the SiLU form n + `second` (the matching up row).
struct RowsStrided {
  using Extra = NoExtra;
  int second;
  __device__ __forceinline__ int operator()(int n, int r) const { return n + r * second; }
  __device__ __forceinline__ void load_extra(Extra&, int, bool) const {}
};

// U chunks of each of R weight rows (the unit's rows, `rows_of(n, r)`), and the unit's extras.
template <int R, int U, class Extra = NoExtra>
struct WeightBatch {
  uint4 v[U][R];
  Extra e;

  template <class Rows>
  __device__ __forceinline__ void load(const GemvWork& w, const scalar_t* __restrict__ W, const Rows& rows_of, int t) {
    const int n = w.unit(t);
    const int c0 = w.seg * w.seg_chunks + (t % w.stretches) * 32 * U + w.lane, end = w.seg_end();
    const bool live = n < w.units;
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int c = c0 + 32 * u;
        v[u][r] = live && c < end ? load_stream(W + (i64)rows_of(n, r) * w.K + (i64)c * 8) : make_uint4(0, 0, 0, 0);
      }
    rows_of.load_extra(e, n, live);
  }
};

// acc[r][m] += this lane's share of stretch t: weights from `b`, inputs x[m * x_stride + k]
// (shared or global memory; the kernels inline this, so the compiler sees which). No branches: a
// chunk past the segment has zero weights and its input reads chunk 0 and is zeroed, so the
// compiler can issue all input loads of the stretch together. Padding rows (m >= rows) read row 0
// (x may have only `rows` rows); their sums are never written.
template <int M, int R, int U, class Extra>
__device__ __forceinline__ void accumulate(float (&acc)[R][M], const WeightBatch<R, U, Extra>& b, const GemvWork& w,
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

// The unit of stretch t is complete in every warp that shares it: sum the warps' partial sums
// into `total` (every lane of the segment-0 warp gets them) and clear `acc`. Returns whether this
// warp writes the unit. Every warp of the block calls this at the same t (stretches and passes are
// block-uniform), so the barrier is reached by all. `red` alternates between two halves by pass,
// so a pass's writes never race the previous pass's reads.
template <int M, int R>
__device__ __forceinline__ bool unit_totals(float (&acc)[R][M], float (&total)[R][M], const GemvWork& w, int t,
                                            float (*red)[GEMV_MAX_WARPS][R][M]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      total[r][m] = warp_sum(acc[r][m]);
      acc[r][m] = 0.f;
    }
  if (w.ks > 1) {
    const int half = (t / w.stretches) & 1, warp = threadIdx.x >> 5;
    if (w.lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) red[half][warp][r][m] = total[r][m];
    }
    __syncthreads();
    if (w.seg != 0) return false;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float s = 0.f;
        for (int k = 0; k < w.ks; ++k) s += red[half][warp + k][r][m];  // fixed order: deterministic
        total[r][m] = s;
      }
  }
  return w.unit(t) < w.units;
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
// `rows_of` names a unit's weight rows and extras (WeightBatch), `finish` writes a finished unit's
// outputs (FinishPlain in gemv.cu, FinishRope in gemv_rope.cu); it is called as
// finish(acc, w, t, red, extras of the batch that held stretch t).
template <int M, int R, int U, class Rows, class Finish>
__device__ __forceinline__ void gemv_stream(WeightBatch<R, U, typename Rows::Extra>& first, const GemvWork& w,
                                            const scalar_t* __restrict__ W,
                                            const Rows& rows_of, const scalar_t* x, i64 x_stride, Finish finish,
                                            int rows) {
  __shared__ float red[2][GEMV_MAX_WARPS][R][M];
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  WeightBatch<R, U, typename Rows::Extra> next;
  const int items = w.num_items();
  for (int t = 0; t < items; t += 2) {
    if (t + 1 < items) next.load(w, W, rows_of, t + 1);
    accumulate<M, R, U>(acc, first, w, t, x, x_stride, rows);
    if (w.ends_unit(t)) finish(acc, w, t, red, first.e);
    if (t + 1 >= items) break;
    if (t + 2 < items) first.load(w, W, rows_of, t + 2);
    accumulate<M, R, U>(acc, next, w, t + 1, x, x_stride, rows);
    if (w.ends_unit(t + 1)) finish(acc, w, t + 1, red, next.e);
  }
}

