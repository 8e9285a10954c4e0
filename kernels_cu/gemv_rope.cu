// The start of a decode step's attention half in one kernel, for 1-2 token rows:
//
//   add_norm_gemv_rope[_u3]_m<M>:  s = a + b (or a), qkv = rms_norm(s) @ W^T (+ bias), s_out = s,
//                                  then rotary on q and k, q to q_out, k and v into the paged cache
//
// It replaces gemv.cu's add_norm_gemv followed by rotary.cu's rotary_cache_kernel: at batch 1 the
// rotary kernel added ~1 us a layer to the chain of a qwen2.5-1.5b token (H200, session 16's
// bench/kernel_timeline.py --sequence; 1.0 us a call alone, bench/op_times.py).
//
// The weight stream is gemv.cu's SiLU form (gemv_stream.cuh, two rows a unit): a unit is one
// rotation pair of one head of the qkv product (heads in W's order: num_heads of q, then
// num_kv_heads of k, then of v), rows i1 and i2 of that head (neox: j and j + d/2; interleaved:
// 2j and 2j + 1), so the lane that finishes the unit holds both values a rotation needs. v heads
// are paired the same way and copied unrotated. Rounding is the unfused path's: the product plus
// bias is rounded to the 16-bit type (where add_norm_gemv stores it), then rotated in fp32 and
// rounded again (rotary.cu).
//
// Each lane m < rows reads token m's position and cache slot before the PDL wait (step inputs, as
// rotary.cu reads them), and loads its unit's cos, sin and biases with the unit's weights (RowsRope,
// the batch's extras), so no load sits between a unit's last product and its stores. Fetched a unit
// ahead in the epilogue instead, each unit's stores waited on them (H200, a call at qwen2.5-7b's
// size 16.7 us, against 14.7 without them and 11.3 for the product alone). A negative slot (a
// padding row) writes nothing to the cache. Cache layout and cos_sin table as rotary.cu.
//
// The backend runs it only where one pass of the grid holds every unit (cuda_gemv): a warp's later
// units still cost more than the rotary kernel saves (qwen2.5-7b: 12.4-12.8 us against 12.45 for the
// two kernels; qwen2.5-1.5b, one pass: 3.89 against 4.89).
#include "gemv_stream.cuh"

// What a unit's outputs need besides its sums, loaded with its weights (gemv_stream.cuh), for this
// lane's token: the pair's cos and sin, and the biases of its two rows, kept as loaded (converting
// them at the load would wait for it there).
struct RopeExtra {
  float c, s;
  scalar_t b1, b2;
};

// Unit n's weight rows: rotation pair j of head h. head_dim / 2 = 1 << half_shift (the wrapper
// checks): with a division here, in the address of every stretch's loads and in the epilogue, the
// kernel took 16.7 us a call at qwen2.5-7b's size against 13.4 for a copy with adjacent rows and no
// division (H200, bench/NOTES.md #78).
struct RowsRope {
  using Extra = RopeExtra;
  int half_shift, neox;
  const scalar_t* __restrict__ bias;  // [W's rows] or null
  const float* __restrict__ cos_sin;  // [max_pos, head_dim]
  int max_pos;
  int pos;        // this lane's token's position as loaded (lane m < rows): used only in load_cos
  bool active;    // lane m < rows (known without a load)
  bool with_cos;  // false: pos may not have arrived yet (load_cos later)

  __device__ __forceinline__ int head(int n) const { return n >> half_shift; }
  __device__ __forceinline__ int pair(int n) const { return n & ((1 << half_shift) - 1); }
  __device__ __forceinline__ int operator()(int n, int r) const {
    const int j = pair(n);
    return (head(n) << (half_shift + 1)) + (neox ? j + (r << half_shift) : 2 * j + r);
  }
  __device__ __forceinline__ void load_cos(Extra& e, int n) const {
    const int p = min(max(pos, 0), max_pos - 1);  // never read outside the table
    const float* cs = cos_sin + ((i64)p << (half_shift + 1)) + pair(n);
    e.c = cs[0];
    e.s = cs[1 << half_shift];
  }
  __device__ __forceinline__ void load_extra(Extra& e, int n, bool live) const {
    if (!active || !live) return;
    e.b1 = bias != nullptr ? bias[(*this)(n, 0)] : from_f32(0.f);
    e.b2 = bias != nullptr ? bias[(*this)(n, 1)] : from_f32(0.f);
    if (with_cos) load_cos(e, n);
  }
};

template <int M>
struct FinishRope {
  scalar_t* __restrict__ q_out;    // [rows, num_heads, head_dim]
  scalar_t* __restrict__ k_cache;  // [num_blocks, block_size, num_kv_heads, head_dim]
  scalar_t* __restrict__ v_cache;
  RowsRope rows_of;
  int num_heads, num_kv_heads, rows;
  int slot;  // this lane's token's cache slot (lane m < rows)
  float inv_rms;  // this lane's row's 1 / rms where the prologue deferred it (stage_add_norm), else 1

  __device__ __forceinline__ void operator()(float (&acc)[2][M], const GemvWork& w, int t,
                                             float (*red)[GEMV_MAX_WARPS][2][M], const RopeExtra& e) {
    float total[2][M];
    if (!unit_totals<M, 2>(acc, total, w, t, red)) return;
    const int n = w.unit(t), half = 1 << rows_of.half_shift, d = 2 * half;
    const int h = rows_of.head(n), j = rows_of.pair(n);
    const int i1 = rows_of.neox ? j : 2 * j, i2 = rows_of.neox ? j + half : 2 * j + 1;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (w.lane != m || m >= rows) continue;
      const float x1 = to_f32(from_f32(total[0][m] * inv_rms + to_f32(e.b1)));
      const float x2 = to_f32(from_f32(total[1][m] * inv_rms + to_f32(e.b2)));
      scalar_t* dst;
      bool rotate = true;
      if (h < num_heads) {
        dst = q_out + ((i64)m * num_heads + h) * d;
      } else {
        if (slot < 0) continue;
        const bool is_k = h < num_heads + num_kv_heads;
        dst = (is_k ? k_cache : v_cache) + ((i64)slot * num_kv_heads + h - num_heads - (is_k ? 0 : num_kv_heads)) * d;
        rotate = is_k;
      }
      dst[i1] = from_f32(rotate ? x1 * e.c - x2 * e.s : x1);
      dst[i2] = from_f32(rotate ? x2 * e.c + x1 * e.s : x2);
    }
  }
};

// Launch as gemv.cu's SiLU form (backend/cuda_gemv.py): units = (num_heads + 2 * num_kv_heads) *
// head_dim / 2, head_dim = 2 << half_shift, ks warps a unit, seg_chunks; dynamic shared memory M * K
// elements. The first batch is requested before the wait with its biases but not its cos and sin,
// whose address needs the position (a load): those follow the norm prologue, by when it has come.
// (Before the wait instead: the same within 0.05 us a call at qwen2.5-1.5b's size, H200.)
#define ROPE_ENTRY_POINT(M, U, SUFFIX)                                                                   \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_MAX_WARPS, 2) add_norm_gemv_rope##SUFFIX##_m##M( \
      scalar_t* __restrict__ q_out, scalar_t* __restrict__ s_out, const scalar_t* __restrict__ a,          \
      const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w, float eps,                    \
      const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias, int rows, int units, int K,     \
      scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache, const int* __restrict__ positions, \
      const int* __restrict__ slot_mapping, const float* __restrict__ cos_sin, int max_pos,               \
      int num_heads, int num_kv_heads, int half_shift, int neox, int ks, int seg_chunks) {               \
    extern __shared__ __align__(16) unsigned char gemv_smem[];                                           \
    scalar_t* xs = reinterpret_cast<scalar_t*>(gemv_smem);                                               \
    const GemvWork w = gemv_work(units, K, ks, seg_chunks, U);                                           \
    const int lane = threadIdx.x & 31;                                                                   \
    RowsRope rows_of{half_shift, neox, bias, cos_sin, max_pos, 0, lane < rows, false};                   \
    int slot = -1;                                                                                       \
    if (lane < rows) { /* step inputs: before the wait, used only after it */                            \
      rows_of.pos = positions[lane];                                                                     \
      slot = slot_mapping[lane];                                                                         \
    }                                                                                                    \
    WeightBatch<2, U, RopeExtra> first;                                                                  \
    first.load(w, W, rows_of, 0);                                                                        \
    const NormWeights nw{norm_w};                                                                        \
    nw.prefetch(K);                                                                                      \
    gemv_pdl_enter();                                                                                    \
    const float inv_rms = stage_add_norm<M>(xs, s_out, a, b, nw, eps, rows, K);                          \
    rows_of.with_cos = true;                                                                             \
    if (lane < rows && w.unit(0) < w.units) rows_of.load_cos(first.e, w.unit(0));                        \
    gemv_stream<M, 2, U>(first, w, W, rows_of, xs, K,                                                    \
                         FinishRope<M>{q_out, k_cache, v_cache, rows_of, num_heads, num_kv_heads, rows, slot, inv_rms}, rows); \
  }

ROPE_ENTRY_POINT(1, 4, )
ROPE_ENTRY_POINT(2, 4, )
ROPE_ENTRY_POINT(1, 3, _u3)
ROPE_ENTRY_POINT(2, 3, _u3)
