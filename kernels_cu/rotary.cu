// Rotary embedding of q and k fused with the paged KV-cache write. One block per token.
//
// A thread takes ROT_VEC adjacent rotation pairs of one head (neox: two 8-byte loads, x[j..j+3]
// and x[j+d/2..]; interleaved: one 16-byte load) or a 16-byte chunk of v, when head_dim / 2 is a
// multiple of ROT_VEC and the rows are 16-byte aligned (every model's case); a thread per pair with
// 2-byte loads otherwise. The element-wise form took 77 us for an 8192-token prompt step of
// qwen2.5-1.5b on an H200 (bench/kernel_timeline.py --prompt-steps, session 11), 5x a pass over its
// bytes.
//
// q, k, v may be strided views of the fused qkv projection: within a token the heads are
// contiguous ([heads, head_dim]) and consecutive tokens are `*_stride` elements apart.
// Writes the rotated q to q_out (contiguous [T, num_heads, head_dim]); writes rotated k and
// v to the cache slot slot_mapping[t] unless it is negative (padding).
// Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], so slot s starts at
// s * num_kv_heads * head_dim.
// cos_sin: [max_pos, head_dim] float32, cos in the first half of a row, sin in the second.
// neox != 0 rotates pairs (x[j], x[j + d/2]); neox == 0 rotates pairs (x[2j], x[2j + 1]).
#include "common.cuh"

#define ROTARY_SMEM_DIM 512  // head sizes up to this keep their cos/sin row in shared memory

// The attention kernel after this one reads before its wait only what no kernel of the step writes
// (its metadata, block tables and cached keys; common.cuh), so it may start as soon as this one
// does: trigger before the wait. When the trigger followed the wait, attention started only once
// the qkv product had finished, and at batch 1 its request lookup, block-table reads and early tile
// copies all lay on the chain after rotary (H200: it began 0.35 us before rotary ended and added
// 5.7 us a layer, bench/kernel_timeline.py --sequence, session 12).
__device__ __forceinline__ void rotary_pdl_enter() {
  pdl_launch_dependents();
  pdl_wait();
}

__device__ __forceinline__ void rotate_heads(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                                             const float* cs, int num_heads, int head_dim,
                                             int neox) {
  const int half = head_dim >> 1;
  for (int idx = threadIdx.x; idx < num_heads * half; idx += blockDim.x) {
    const int h = idx / half, j = idx - h * half;
    const int i1 = neox ? j : 2 * j;
    const int i2 = neox ? j + half : 2 * j + 1;
    const float c = cs[j], s = cs[half + j];
    const float x1 = to_f32(src[h * head_dim + i1]);
    const float x2 = to_f32(src[h * head_dim + i2]);
    dst[h * head_dim + i1] = from_f32(x1 * c - x2 * s);
    dst[h * head_dim + i2] = from_f32(x2 * c + x1 * s);
  }
}

#define ROT_VEC 4

__device__ __forceinline__ bool rot_aligned(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// Pairs j .. j + ROT_VEC - 1 of one head, src -> dst, with their cos (c) and sin (s).
__device__ __forceinline__ void rotate4(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int j,
                                        int half, int neox, const float4& c4, const float4& s4) {
  const float c[4] = {c4.x, c4.y, c4.z, c4.w}, s[4] = {s4.x, s4.y, s4.z, s4.w};
  if (neox) {
    const uint2 a = *reinterpret_cast<const uint2*>(src + j);
    const uint2 b = *reinterpret_cast<const uint2*>(src + j + half);
    const unsigned int ai[2] = {a.x, a.y}, bi[2] = {b.x, b.y};
    unsigned int ra[2], rb[2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float x1l = to_f32((scalar_t)(ai[p] & 0xffffu)), x1h = to_f32((scalar_t)(ai[p] >> 16));
      const float x2l = to_f32((scalar_t)(bi[p] & 0xffffu)), x2h = to_f32((scalar_t)(bi[p] >> 16));
      ra[p] = pack2(x1l * c[2 * p] - x2l * s[2 * p], x1h * c[2 * p + 1] - x2h * s[2 * p + 1]);
      rb[p] = pack2(x2l * c[2 * p] + x1l * s[2 * p], x2h * c[2 * p + 1] + x1h * s[2 * p + 1]);
    }
    *reinterpret_cast<uint2*>(dst + j) = make_uint2(ra[0], ra[1]);
    *reinterpret_cast<uint2*>(dst + j + half) = make_uint2(rb[0], rb[1]);
  } else {
    const uint4 a = *reinterpret_cast<const uint4*>(src + 2 * j);
    const unsigned int ai[4] = {a.x, a.y, a.z, a.w};
    unsigned int r[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float x1 = to_f32((scalar_t)(ai[p] & 0xffffu)), x2 = to_f32((scalar_t)(ai[p] >> 16));
      r[p] = pack2(x1 * c[p] - x2 * s[p], x2 * c[p] + x1 * s[p]);
    }
    *reinterpret_cast<uint4*>(dst + 2 * j) = make_uint4(r[0], r[1], r[2], r[3]);
  }
}

extern "C" __global__ void __launch_bounds__(1024) rotary_cache_kernel(
    scalar_t* __restrict__ q_out,        // [T, num_heads, head_dim]
    scalar_t* __restrict__ k_cache,      // [num_blocks, block_size, num_kv_heads, head_dim]
    scalar_t* __restrict__ v_cache,
    const scalar_t* __restrict__ q, i64 q_stride,
    const scalar_t* __restrict__ k, i64 k_stride,
    const scalar_t* __restrict__ v, i64 v_stride,
    const int* __restrict__ positions,     // [T]
    const int* __restrict__ slot_mapping,  // [T]
    const float* __restrict__ cos_sin, int max_pos,
    int num_heads, int num_kv_heads, int head_dim, int neox) {
  // The position, the slot and the row of the cos/sin table are the step's inputs and a constant
  // table: read before the wait (common.cuh), so that after it only q, k and v are loaded. They were
  // two dependent loads on the chain from the qkv product to attention at batch 1.
  __shared__ float s_cs[ROTARY_SMEM_DIM];
  const i64 t = blockIdx.x;
  int pos = positions[t];
  pos = min(max(pos, 0), max_pos - 1);  // never read outside the table
  const i64 slot = slot_mapping[t];
  const float* cs = cos_sin + (i64)pos * head_dim;
  const i64 kv_row = (i64)num_kv_heads * head_dim;
  const int half = head_dim >> 1;
  if (half % ROT_VEC == 0 && q_stride % 8 == 0 && k_stride % 8 == 0 && v_stride % 8 == 0 && rot_aligned(q) &&
      rot_aligned(k) && rot_aligned(v) && rot_aligned(q_out) && rot_aligned(k_cache) && rot_aligned(v_cache) &&
      rot_aligned(cos_sin)) {
    const int groups = half / ROT_VEC;  // a thread's share of a head
    const int q_items = num_heads * groups, k_items = slot >= 0 ? num_kv_heads * groups : 0;
    const int v_items = slot >= 0 ? (int)(kv_row / 8) : 0;
    // The first item's cos and sin before the wait (the thread's only one when the block has a
    // thread per item, as the backend launches it). k items follow q's: (item % groups) is the
    // pair group either way.
    const int first = threadIdx.x;
    float4 c0 = make_float4(0.f, 0.f, 0.f, 0.f), s0 = c0;
    if (first < q_items + k_items) {
      const int j = (first % groups) * ROT_VEC;
      c0 = *reinterpret_cast<const float4*>(cs + j);
      s0 = *reinterpret_cast<const float4*>(cs + half + j);
    }
    rotary_pdl_enter();
    for (int item = first; item < q_items + k_items + v_items; item += blockDim.x) {
      if (item < q_items + k_items) {
        const int j = (item % groups) * ROT_VEC;
        float4 c4 = c0, s4 = s0;
        if (item != first) {
          c4 = *reinterpret_cast<const float4*>(cs + j);
          s4 = *reinterpret_cast<const float4*>(cs + half + j);
        }
        if (item < q_items) {
          const int h = item / groups;
          rotate4(q_out + (t * num_heads + h) * head_dim, q + t * q_stride + (i64)h * head_dim, j, half, neox, c4, s4);
        } else {
          const int h = (item - q_items) / groups;
          rotate4(k_cache + slot * kv_row + (i64)h * head_dim, k + t * k_stride + (i64)h * head_dim, j, half, neox,
                  c4, s4);
        }
      } else {
        const int e = (item - q_items - k_items) * 8;
        *reinterpret_cast<uint4*>(v_cache + slot * kv_row + e) = *reinterpret_cast<const uint4*>(v + t * v_stride + e);
      }
    }
    return;
  }
  if (head_dim <= ROTARY_SMEM_DIM) {
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) s_cs[i] = cs[i];
    cs = s_cs;
  }
  rotary_pdl_enter();
  __syncthreads();

  rotate_heads(q_out + t * num_heads * head_dim, q + t * q_stride, cs, num_heads, head_dim, neox);

  if (slot < 0) return;
  rotate_heads(k_cache + slot * kv_row, k + t * k_stride, cs, num_kv_heads, head_dim, neox);
  const scalar_t* vt = v + t * v_stride;
  scalar_t* vd = v_cache + slot * kv_row;
  for (int i = threadIdx.x; i < kv_row; i += blockDim.x) vd[i] = vt[i];
}
