// Small-batch matrix products (1 to 8 token rows: decode steps) and what sits around them in a
// Llama layer. At such row counts a linear layer is a read of its weight matrix, so these kernels
// are built to keep the most weight bytes in flight: each weight element is read once with 16-byte
// loads, and the norm and the activation are folded into the product:
//
//   gemv_m<M>:               out = x @ W^T (+ bias)                          o_proj, down
//   add_norm_gemv_m<M>:      s = a + b (or a), out = rms_norm(s) @ W^T (+ bias), s_out = s     qkv
//   add_norm_gemv_silu_m<M>: same prologue; W = [gate; up] ([2I, K]), out = silu(g) * u ([M, I])
//   add_norm_gemv_silu_u3_m<M>: the same with 3-chunk stretches (U = 3, below; M = 1, 2)
//   add_norm_logits(_u6)_m1: s = a + b (or a), out = rms_norm(s) @ W^T in float32 (M = 1): the
//                            final norm and the logits of a 1-row decode step
//
// M (1, 2, 4, 8) is the row count compiled for; `rows` <= M is the real one (the rest is padding
// that is neither read nor written). W is [N, K] row-major (HF's [out, in]); K is a multiple of 8
// and every row pointer is 16-byte aligned (the wrapper in backend/cuda_gemv.py checks).
//
// Rounding follows the separate kernels: s, the normed input, the product and g and u are rounded
// to the 16-bit type where the unfused path stores them, so in fp16 only fp32 summation order
// differs. In bf16 the normed input is staged without its 1 / rms (rounded as s * w_norm), which
// the finish applies to the sums (gemv_common.cuh, stage_add_norm).
#include "gemv_stream.cuh"

__device__ __forceinline__ void store_out(scalar_t* p, float v) { *p = from_f32(v); }
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }  // the logits

// The plain and SiLU forms' outputs: lane m writes row m's value of the unit.
template <int M, int R, bool SILU, class OutT = scalar_t>
struct FinishPlain {
  OutT* __restrict__ out;
  const scalar_t* __restrict__ bias;
  int rows;
  float inv_rms;  // this lane's row's 1 / rms where the prologue deferred it (stage_add_norm), else 1

  __device__ __forceinline__ void operator()(float (&acc)[R][M], const GemvWork& w, int t,
                                             float (*red)[GEMV_MAX_WARPS][R][M], const NoExtra&) {
    float total[R][M];
    if (!unit_totals<M, R>(acc, total, w, t, red)) return;
    const int n = w.unit(t);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (w.lane != m || m >= rows) continue;
      if (SILU) {
        const int inter = w.units;
        const float g = to_f32(from_f32(total[0][m] * inv_rms)), u = to_f32(from_f32(total[R - 1][m] * inv_rms));
        out[(i64)m * inter + n] = from_f32(g / (1.f + expf(-g)) * u);  // as silu_and_mul_kernel (OutT: scalar_t)
      } else {
        const float b = bias != nullptr ? to_f32(bias[n]) : 0.f;
        store_out(out + (i64)m * w.units + n, total[0][m] * inv_rms + b);
      }
    }
  }
};

// The SiLU form with stretches of U chunks a lane (entry point add_norm_gemv_silu<SUFFIX>_m<M>), in
// blocks resident at least B to an SM.
#define SILU_ENTRY_POINT(M, U, B, SUFFIX)                                                             \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, B) add_norm_gemv_silu##SUFFIX##_m##M( \
      scalar_t* __restrict__ out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,       \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                 \
      const scalar_t* __restrict__ W, int rows, int inter, int K, int ks, int seg_chunks) {           \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    const GemvWork w = gemv_work(inter, K, ks, seg_chunks, U);                                        \
    WeightBatch<2, U> first;                                                                          \
    first.load(w, W, RowsStrided{inter}, 0);                                                          \
    const NormWeights nw{norm_w};                                                                     \
    nw.prefetch(K);                                                                                   \
    gemv_pdl_enter();                                                                                 \
    const float inv_rms = stage_add_norm<M>(xs, s_out, a, b, nw, eps, rows, K);                       \
    gemv_stream<M, 2, U>(first, w, W, RowsStrided{inter}, xs, K, FinishPlain<M, 2, true>{out, nullptr, rows, inv_rms}, rows); \
  }

// Launch: blockDim.x = 32 * ks * rpb (at most GEMV_MAX_WARPS warps), seg_chunks = ceil((K / 8) / ks).
#define GEMV_ENTRY_POINTS(M)                                                                          \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, 2) gemv_m##M(                        \
      scalar_t* __restrict__ out, const scalar_t* __restrict__ x, i64 x_stride,                       \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int N, int K,      \
      int ks, int seg_chunks) {                                                                       \
    const GemvWork w = gemv_work(N, K, ks, seg_chunks, 8);                                            \
    WeightBatch<1, 8> first;                                                                          \
    first.load(w, W, RowsStrided{0}, 0);                                                                           \
    gemv_pdl_enter(); /* the first weights are in flight while the previous kernel finishes */        \
    gemv_stream<M, 1, 8>(first, w, W, RowsStrided{0}, x, x_stride, FinishPlain<M, 1, false>{out, bias, rows, 1.f}, rows); \
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
    first.load(w, W, RowsStrided{0}, 0); /* before the prologue: the weight stream runs while the norm waits */    \
    const NormWeights nw{norm_w};                                                                                  \
    nw.prefetch(K);                                                                                                \
    gemv_pdl_enter();                                                                                 \
    const float inv_rms = stage_add_norm<M>(xs, s_out, a, b, nw, eps, rows, K);                       \
    gemv_stream<M, 1, 8>(first, w, W, RowsStrided{0}, xs, K, FinishPlain<M, 1, false>{out, bias, rows, inv_rms}, rows); \
  }                                                                                                   \
  SILU_ENTRY_POINT(M, 4, 2, )

// The final norm and the logits (float32, as cuBLAS writes them on the general path) of a 1-row
// decode step: the gemv form's add_norm prologue without s_out (nothing reads the residual after
// the last layer), replacing the norm kernel and cuBLAS's product of lm_head. Stretches of U chunks
// a lane in blocks resident B to an SM: U = 6 at 3 blocks (80 registers) where that takes K in as
// many stretches as U = 8 does (backend/cuda_gemv.logits_stretch_chunks; K = 1536 is one stretch of
// 192 chunks, 64 lanes' slots empty at U = 8). H200, qwen2.5-1.5b's lm_head (151936 x 1536), us a
// call: U = 8 at 2 blocks 112.2, U = 6 at 2 blocks 109.7, at 3 blocks 106.0-106.4; cuBLAS 110-117
// (bench/NOTES.md #93). Not at 2 rows: there this form took 135 us against 114-118 for the norm
// kernel and cuBLAS.
#define LOGITS_ENTRY_POINT(U, B, SUFFIX)                                                              \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, B) add_norm_logits##SUFFIX##_m1(   \
      float* __restrict__ out, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,        \
      const scalar_t* __restrict__ norm_w, float eps, const scalar_t* __restrict__ W, int rows, int N, \
      int K, int ks, int seg_chunks) {                                                                \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                        \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                            \
    const GemvWork w = gemv_work(N, K, ks, seg_chunks, U);                                            \
    WeightBatch<1, U> first;                                                                          \
    first.load(w, W, RowsStrided{0}, 0);                                                              \
    const NormWeights nw{norm_w};                                                                     \
    nw.prefetch(K);                                                                                   \
    gemv_pdl_enter();                                                                                 \
    const float inv_rms = stage_add_norm<1>(xs, nullptr, a, b, nw, eps, rows, K);                    \
    gemv_stream<1, 1, U>(first, w, W, RowsStrided{0}, xs, K,                                          \
                         FinishPlain<1, 1, false, float>{out, nullptr, rows, inv_rms}, rows);         \
  }

GEMV_ENTRY_POINTS(1)
GEMV_ENTRY_POINTS(2)
GEMV_ENTRY_POINTS(4)
GEMV_ENTRY_POINTS(8)
// 3-chunk stretches for the steps the backend runs here by default (1-2 rows; at 4 and 8 rows this
// form would spill registers). One row in bf16: 3 blocks of 8 warps an SM in 80 registers (96 let
// 2 of 8 or 3 of 6), so more of the weight stream is in flight. H200, qwen2.5-1.5b's gate_up
// (17920 x 1536) graph-timed: 14.83-14.86 -> 14.04-14.08 us a call, 32 bytes spilled (bench/NOTES.md
// #94). fp16, whose prologue norms the rows before staging them, would spill 140 bytes at 80
// registers and keeps 2 (not measured).
#if NORM_DEFERRED
#define SILU_U3_M1_BLOCKS 3
#else
#define SILU_U3_M1_BLOCKS 2
#endif
SILU_ENTRY_POINT(1, 3, SILU_U3_M1_BLOCKS, _u3)
SILU_ENTRY_POINT(2, 3, 2, _u3)
LOGITS_ENTRY_POINT(8, 2, )
LOGITS_ENTRY_POINT(6, 3, _u6)
