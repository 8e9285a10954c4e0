// Rotary embedding of q and k fused with the paged KV-cache write. One block per token.
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
  if (head_dim <= ROTARY_SMEM_DIM) {
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) s_cs[i] = cs[i];
    cs = s_cs;
  }
  pdl_enter();
  __syncthreads();

  rotate_heads(q_out + t * num_heads * head_dim, q + t * q_stride, cs, num_heads, head_dim, neox);

  if (slot < 0) return;
  const i64 kv_row = (i64)num_kv_heads * head_dim;
  rotate_heads(k_cache + slot * kv_row, k + t * k_stride, cs, num_kv_heads, head_dim, neox);
  const scalar_t* vt = v + t * v_stride;
  scalar_t* vd = v_cache + slot * kv_row;
  for (int i = threadIdx.x; i < kv_row; i += blockDim.x) vd[i] = vt[i];
}
