// Small-batch matrix products on tensor cores: steps of 3 to 8 token rows, where gemv.cu's kernels,
// which multiply every weight chunk once per row on CUDA cores, are compute-bound and lose to
// cuBLAS (bench/NOTES.md #56). Off by default (backend/cuda_gemv.DEFAULT_TC_MAX_ROWS): it is correct
// but only level with cuBLAS (it wins o_proj and loses qkv; NOTES #57, #59). The same three forms as
// gemv.cu, with a prologue of its own (tc_stage_add_norm):
//
//   gemv_tc:               out = x @ W^T (+ bias)                                  o_proj, down
//   add_norm_gemv_tc:      s = a + b (or a), out = rms_norm(s) @ W^T (+ bias), s_out = s   qkv
//   add_norm_gemv_silu_tc: same prologue; W = [gate; up] ([2I, K]), out = silu(g) * u
//
// The weights are the A operand of mma.m16n8k16 (16 weight rows) and the token rows the B operand
// (its 8 columns are the at most 8 tokens; columns past `rows` are zeros, never written), so a
// tile's accumulator holds 16 outputs of every token. Tile t of the gemv form is weight rows
// 16t .. 16t + 15; of the SiLU form, gate rows 8t .. 8t + 7 (A rows 0-7) and the matching up rows
// (A rows 8-15), so a lane holds g and u of the same output.
//
// Loads: for each 32 columns of K ("a step") lane (g, c) (g = lane / 4, c = lane % 4) loads the
// 16 bytes at columns 8c .. 8c + 7 of weight rows g and g + 8 and of token row g. The fragment
// layouts want columns 2c, 2c + 1, 2c + 8, 2c + 9 of a 16-column k-step, but a dot product does not
// care about the order of K as long as both operands use the same one: the step's first mma takes
// pairs 0 and 1 of each lane's chunks as its k-columns (2c, 2c + 8), the second pairs 2 and 3. Every
// column of the step is used once, by the same lane quad in A and B.
//
// Work split as in gemv.cu: `ks` warps share a tile, each taking a segment of the K steps in
// stretches of GTC_U steps, the next stretch loaded while the current one is multiplied; `rpb`
// tiles side by side fill a block, which loops over passes. K is a multiple of 32 (the wrapper in
// backend/cuda_gemv.py checks). Rounding is gemv.cu's: only fp32 summation order differs.
#include "gemv_common.cuh"
#include "mma.cuh"

#define GTC_MAX_WARPS 8
#define GTC_ROWS 8  // tokens: the n of the mma; the normed rows staged in shared memory
#define GTC_U 4     // K steps (32 columns) per stretch: 4 x 2 rows x 16 bytes a lane in flight

struct TcWork {
  int tiles, K, steps, ks, rpb, seg_steps, stretches, passes;
  int slot, seg, lane, g, c;

  __device__ __forceinline__ int tile(int t) const { return (blockIdx.x + (t / stretches) * gridDim.x) * rpb + slot; }
  __device__ __forceinline__ int seg_end() const { return min(steps, (seg + 1) * seg_steps); }
  __device__ __forceinline__ int first_step(int t) const { return seg * seg_steps + (t % stretches) * GTC_U; }
  __device__ __forceinline__ int num_items() const {
    const int mine = passes > (int)blockIdx.x ? (passes - (int)blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    return mine * stretches;
  }
  __device__ __forceinline__ bool ends_tile(int t) const { return t % stretches == stretches - 1; }
};

__device__ __forceinline__ TcWork tc_work(int tiles, int K, int ks, int seg_steps) {
  TcWork w;
  w.tiles = tiles;
  w.K = K;
  w.steps = K >> 5;
  w.ks = ks;
  w.rpb = (blockDim.x >> 5) / ks;
  w.seg_steps = seg_steps;
  w.stretches = (seg_steps + GTC_U - 1) / GTC_U;
  w.passes = (tiles + w.rpb - 1) / w.rpb;
  const int warp = threadIdx.x >> 5;
  w.slot = warp / ks;
  w.seg = warp - w.slot * ks;
  w.lane = threadIdx.x & 31;
  w.g = w.lane >> 2;
  w.c = w.lane & 3;
  return w;
}

// The weight row behind A row i (0..15) of tile `tile`, or -1 past the matrix. gemv form: row
// 16 tile + i of N; SiLU form: gate row 8 tile + i (i < 8) or up row inter + 8 tile + i - 8 (N = inter).
template <bool SILU>
__device__ __forceinline__ int tc_row(int tile, int i, int N) {
  if (SILU) {
    const int n = tile * 8 + (i & 7);
    return n < N ? (i < 8 ? n : N + n) : -1;
  }
  const int n = tile * 16 + i;
  return n < N ? n : -1;
}

// GTC_U steps of weight rows g and g + 8 of this warp's tile.
struct TcBatch {
  uint4 v[GTC_U][2];

  template <bool SILU>
  __device__ __forceinline__ void load(const TcWork& w, const scalar_t* __restrict__ W, int N, int t) {
    const int tile = w.tile(t), s0 = w.first_step(t), end = w.seg_end();
    const bool live = tile < w.tiles;
    const int r0 = live ? tc_row<SILU>(tile, w.g, N) : -1, r1 = live ? tc_row<SILU>(tile, w.g + 8, N) : -1;
#pragma unroll
    for (int u = 0; u < GTC_U; ++u) {
      const int col = (s0 + u) * 32 + w.c * 8;
      const bool in = s0 + u < end;
      v[u][0] = in && r0 >= 0 ? load_stream(W + (i64)r0 * w.K + col) : make_uint4(0, 0, 0, 0);
      v[u][1] = in && r1 >= 0 ? load_stream(W + (i64)r1 * w.K + col) : make_uint4(0, 0, 0, 0);
    }
  }
};

// acc += this lane's share of stretch t: two mma per step. x rows past `rows` (and steps past the
// segment, whose weights are zeros) read row 0 / step 0 and are zeroed, so the loads issue together.
__device__ __forceinline__ void tc_accumulate(float (&acc)[4], const TcBatch& b, const TcWork& w, int t,
                                              const scalar_t* x, i64 x_stride, int rows) {
  const int s0 = w.first_step(t), end = w.seg_end();
  const bool tok = w.g < rows;
#pragma unroll
  for (int u = 0; u < GTC_U; ++u) {
    const bool in = s0 + u < end;
    uint4 xv = *reinterpret_cast<const uint4*>(x + (tok ? w.g : 0) * x_stride + (in ? s0 + u : 0) * 32 + w.c * 8);
    if (!tok || !in) xv = make_uint4(0, 0, 0, 0);
    const unsigned int a1[4] = {b.v[u][0].x, b.v[u][1].x, b.v[u][0].y, b.v[u][1].y};
    const unsigned int b1[2] = {xv.x, xv.y};
    mma_16816(acc, a1, b1);
    const unsigned int a2[4] = {b.v[u][0].z, b.v[u][1].z, b.v[u][0].w, b.v[u][1].w};
    const unsigned int b2[2] = {xv.z, xv.w};
    mma_16816(acc, a2, b2);
  }
}

// The tile of stretch t is complete in every warp that shares it: sum the warps' accumulators (in a
// fixed order) and write. acc[0..1] are A row g for tokens 2c and 2c + 1, acc[2..3] A row g + 8.
// Block-uniform like gemv.cu's finish_unit; `red` alternates halves by pass.
template <bool SILU>
__device__ __forceinline__ void tc_finish(float (&acc)[4], const TcWork& w, int t, float (*red)[GTC_MAX_WARPS][4][32],
                                          scalar_t* __restrict__ out, const scalar_t* __restrict__ bias, int N,
                                          int rows) {
  float total[4] = {acc[0], acc[1], acc[2], acc[3]};
  acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
  if (w.ks > 1) {
    const int half = (t / w.stretches) & 1, warp = threadIdx.x >> 5;
#pragma unroll
    for (int j = 0; j < 4; ++j) red[half][warp][j][w.lane] = total[j];
    __syncthreads();
    if (w.seg != 0) return;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float s = 0.f;
      for (int k = 0; k < w.ks; ++k) s += red[half][warp + k][j][w.lane];
      total[j] = s;
    }
  }
  const int tile = w.tile(t);
  if (tile >= w.tiles) return;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int token = 2 * w.c + e;
    if (token >= rows) continue;
    if (SILU) {
      const int n = tile * 8 + w.g;
      if (n >= N) continue;
      const float gv = to_f32(from_f32(total[e])), uv = to_f32(from_f32(total[2 + e]));
      out[(i64)token * N + n] = from_f32(gv / (1.f + expf(-gv)) * uv);  // as silu_and_mul_kernel
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = tile * 16 + w.g + 8 * h;
        if (n >= N) continue;
        const float bv = bias != nullptr ? to_f32(bias[n]) : 0.f;
        out[(i64)token * N + n] = from_f32(total[2 * h + e] + bv);
      }
    }
  }
}

// The add_norm forms' prologue: xs[m, :] = rms_norm(a[m] + b[m]) for m < rows (block 0 also stores
// a[m] + b[m] into s_out when b is given); rows from `rows` on are left unwritten (tc_accumulate
// zeroes those tokens). A warp takes whole rows, so the rows' round trips to L2 overlap and a row's
// sum is a warp shuffle. (gemv_common's stage_add_norm, one row after another with a block-wide
// sum each, cost ~1 us a row: 11.0 us for qwen2.5-1.5b's qkv at 8 rows against 3.4 us to read its
// weights, bench/NOTES.md #58.) A lane issues the loads of GTC_NORM_GROUP chunks before using any,
// and rescales only the chunks it wrote itself, so no barrier is needed before the last.
#define GTC_NORM_GROUP 8
__device__ __forceinline__ void tc_stage_add_norm(scalar_t* xs, scalar_t* s_out, const scalar_t* __restrict__ a,
                                                  const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w,
                                                  float eps, int rows, int K) {
  const bool store = b != nullptr && s_out != nullptr && blockIdx.x == 0;
  const int chunks = K >> 3, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int m = threadIdx.x >> 5; m < rows; m += warps) {
    const i64 row = (i64)m * K;
    float ss = 0.f;
    for (int c0 = lane; c0 < chunks; c0 += 32 * GTC_NORM_GROUP) {
      uint4 av[GTC_NORM_GROUP], bv[GTC_NORM_GROUP];
#pragma unroll
      for (int u = 0; u < GTC_NORM_GROUP; ++u) {
        const int c = c0 + 32 * u;
        av[u] = bv[u] = make_uint4(0, 0, 0, 0);
        if (c < chunks) {
          av[u] = *reinterpret_cast<const uint4*>(a + row + c * 8);
          if (b != nullptr) bv[u] = *reinterpret_cast<const uint4*>(b + row + c * 8);
        }
      }
#pragma unroll
      for (int u = 0; u < GTC_NORM_GROUP; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) continue;
        const uint4 sv = b != nullptr ? add8(av[u], bv[u]) : av[u];
        if (store) *reinterpret_cast<uint4*>(s_out + row + c * 8) = sv;
        *reinterpret_cast<uint4*>(xs + row + c * 8) = sv;
        ss += sum_squares8(sv);
      }
    }
    const float inv_rms = rsqrtf(warp_sum(ss) / (float)K + eps);
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) rms_scale8(reinterpret_cast<uint4*>(xs + row + c * 8), norm_w + c * 8, inv_rms);
  }
  __syncthreads();
}

template <bool SILU>
__device__ __forceinline__ void tc_stream(TcBatch& first, const TcWork& w, const scalar_t* __restrict__ W, int N,
                                          const scalar_t* x, i64 x_stride, scalar_t* __restrict__ out,
                                          const scalar_t* __restrict__ bias, int rows) {
  __shared__ float red[2][GTC_MAX_WARPS][4][32];
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  TcBatch next;
  const int items = w.num_items();
  for (int t = 0; t < items; t += 2) {
    if (t + 1 < items) next.load<SILU>(w, W, N, t + 1);
    tc_accumulate(acc, first, w, t, x, x_stride, rows);
    if (w.ends_tile(t)) tc_finish<SILU>(acc, w, t, red, out, bias, N, rows);
    if (t + 1 >= items) break;
    if (t + 2 < items) first.load<SILU>(w, W, N, t + 2);
    tc_accumulate(acc, next, w, t + 1, x, x_stride, rows);
    if (w.ends_tile(t + 1)) tc_finish<SILU>(acc, w, t + 1, red, out, bias, N, rows);
  }
}

// Launch: blockDim.x = 32 * ks * rpb (at most GTC_MAX_WARPS warps), seg_steps = ceil((K / 32) / ks);
// tiles = ceil(N / 16) (ceil(inter / 8) for the SiLU form); dynamic shared memory GTC_ROWS * K * 2
// bytes for the add_norm forms.
extern "C" __global__ void __launch_bounds__(32 * GTC_MAX_WARPS, 2) gemv_tc(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ x, i64 x_stride, const scalar_t* __restrict__ W,
    const scalar_t* __restrict__ bias, int rows, int N, int K, int ks, int seg_steps) {
  const TcWork w = tc_work((N + 15) / 16, K, ks, seg_steps);
  TcBatch first;
  first.load<false>(w, W, N, 0);
  gemv_pdl_enter();
  tc_stream<false>(first, w, W, N, x, x_stride, out, bias, rows);
}

extern "C" __global__ void __launch_bounds__(32 * GTC_MAX_WARPS, 2) add_norm_gemv_tc(
    scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps, const scalar_t* __restrict__ W,
    const scalar_t* __restrict__ bias, int rows, int N, int K, int ks, int seg_steps) {
  extern __shared__ __align__(16) unsigned char gtc_smem[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(gtc_smem);
  const TcWork w = tc_work((N + 15) / 16, K, ks, seg_steps);
  TcBatch first;
  first.load<false>(w, W, N, 0);
  gemv_pdl_enter();
  tc_stage_add_norm(xs, s_out, a, b, norm_w, eps, rows, K);
  tc_stream<false>(first, w, W, N, xs, K, out, bias, rows);
}

extern "C" __global__ void __launch_bounds__(32 * GTC_MAX_WARPS, 2) add_norm_gemv_silu_tc(
    scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps, const scalar_t* __restrict__ W,
    int rows, int inter, int K, int ks, int seg_steps) {
  extern __shared__ __align__(16) unsigned char gtc_smem[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(gtc_smem);
  const TcWork w = tc_work((inter + 7) / 8, K, ks, seg_steps);
  TcBatch first;
  first.load<true>(w, W, inter, 0);
  gemv_pdl_enter();
  tc_stage_add_norm(xs, s_out, a, b, norm_w, eps, rows, K);
  tc_stream<true>(first, w, W, inter, xs, K, out, nullptr, rows);
}
