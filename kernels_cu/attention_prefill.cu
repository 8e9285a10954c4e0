// Prefill attention over the paged KV cache for a ragged batch, FlashAttention-2 style:
// tiles of queries against tiles of keys/values, online softmax in registers, tensor-core
// mma.sync.m16n8k16 (fp16/bf16 in, float32 accumulate); no score matrix in memory.
//
// GQA: a block takes one request and one KV head, and its BLOCK_M "query rows" are (token, head)
// pairs of that head's group: row m is token m / group, query head kv_head * group + m % group.
// So every K/V tile loaded into shared memory serves the whole group.
// Causality: query row r of request i sits at position seq_len - q_len + r and sees keys
// 0..that position (cached prefix and chunked prefill included).
//
// grid (ceil(max_query_len * group / BLOCK_M), num_kv_heads, num_reqs), 128 threads (4 warps,
// 16 query rows each). Static shared memory: K and V tiles, 2 * BLOCK_N * (HEAD_DIM + 8) * 2 B.
// Compile-time: HEAD_DIM (a multiple of 16, at most 128 here), RVLLM_FP16 / RVLLM_BF16.
// The mma.m16n8k16 fragment layouts are in mma.cuh.
#include "common.cuh"
#include "mma.cuh"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif
#if (HEAD_DIM % 16) != 0 || HEAD_DIM > 128
#error "attention_prefill.cu: HEAD_DIM must be a multiple of 16 and at most 128"
#endif
#define BLOCK_M 64
#define BLOCK_N 64
#define NUM_THREADS 128
#define KV_LD (HEAD_DIM + 8)  // padded shared row (elements): 16-byte aligned, fewer bank conflicts
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ unsigned int ld_u32(const scalar_t* p) {  // 4-byte aligned pair
  return *reinterpret_cast<const unsigned int*>(p);
}

// On sm_90, at most 170 registers a thread, so that 3 blocks fit an SM's register file (the ldmatrix
// form took 176 unbounded and ran 2 blocks an SM on an H200: 90 us where the element-wise form, at
// 167, took 79). sm_80 spills under that cap (tests/test_kernels_compile.py), and no sm_80 GPU has
// measured either form, so it keeps the compiler's choice.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PREFILL_MIN_BLOCKS 3
#else
#define PREFILL_MIN_BLOCKS 1
#endif
extern "C" __global__ void __launch_bounds__(NUM_THREADS, PREFILL_MIN_BLOCKS) paged_attention_prefill_kernel(
    scalar_t* __restrict__ out,            // [num_tokens, num_heads, HEAD_DIM]
    const scalar_t* __restrict__ q,        // [num_tokens, num_heads, HEAD_DIM]
    const scalar_t* __restrict__ k_cache,  // [num_blocks, block_size, num_kv_heads, HEAD_DIM]
    const scalar_t* __restrict__ v_cache,
    const int* __restrict__ block_tables,  // [num_reqs, max_blocks_per_seq]
    int max_blocks_per_seq,
    const int* __restrict__ query_start_loc,  // [num_reqs + 1]
    const int* __restrict__ seq_lens,         // [num_reqs]
    int num_heads, int num_kv_heads, int block_size, float scale) {
  pdl_enter();
  const int m_tile = blockIdx.x, kvh = blockIdx.y, req = blockIdx.z;
  const int group = num_heads / num_kv_heads;
  const int q_start = query_start_loc[req];
  const int q_len = query_start_loc[req + 1] - q_start;
  const int seq_len = seq_lens[req];
  const int rows = q_len * group;  // (token, head) rows of this request and KV head
  const int m0 = m_tile * BLOCK_M;
  if (m0 >= rows) return;
  const int ctx_start = seq_len - q_len;  // position of query row 0

  __shared__ __align__(16) scalar_t s_k[BLOCK_N * KV_LD];
  __shared__ __align__(16) scalar_t s_v[BLOCK_N * KV_LD];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;

  // This thread's two query rows (fragment rows g and g + 8 of its warp's 16).
  int row_m[2], row_pos[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = m0 + warp * 16 + g + 8 * h;
    row_m[h] = m;
    row_ok[h] = m < rows;
    row_pos[h] = row_ok[h] ? ctx_start + m / group : -1;
  }

  // Q fragments for all HEAD_DIM / 16 k-steps, straight from global memory (read once).
  unsigned int qf[HEAD_DIM / 16][4];
  {
    const scalar_t* qrow[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = row_ok[h] ? row_m[h] : 0;
      const int tok = q_start + m / group, head = kvh * group + m % group;
      qrow[h] = q + ((i64)tok * num_heads + head) * HEAD_DIM;
    }
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
      const int col = ks * 16 + 2 * c;
      qf[ks][0] = row_ok[0] ? ld_u32(qrow[0] + col) : 0u;
      qf[ks][1] = row_ok[1] ? ld_u32(qrow[1] + col) : 0u;
      qf[ks][2] = row_ok[0] ? ld_u32(qrow[0] + col + 8) : 0u;
      qf[ks][3] = row_ok[1] ? ld_u32(qrow[1] + col + 8) : 0u;
    }
  }

  float o_acc[HEAD_DIM / 8][4];
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[j][e] = 0.f;
  float row_max[2] = {RVLLM_NEG_INF, RVLLM_NEG_INF};  // in log2 units (scores * scale * log2 e)
  float row_sum[2] = {0.f, 0.f};

  // Keys needed by the last valid row of this block.
  const int last_m = min(m0 + BLOCK_M, rows) - 1;
  const int kv_end = min(seq_len, ctx_start + last_m / group + 1);
  const i64 slot_stride = (i64)num_kv_heads * HEAD_DIM;
  const int* btab = block_tables + (i64)req * max_blocks_per_seq;
  const float qk_scale = scale * LOG2E;

  for (int n0 = 0; n0 < kv_end; n0 += BLOCK_N) {
    // Load the K and V tiles (16-byte chunks); rows past kv_end are zero, never garbage
    // (a NaN there would survive the 0 probability in P @ V).
    __syncthreads();  // the previous tile is no longer in use
    for (int idx = threadIdx.x; idx < BLOCK_N * (HEAD_DIM / 8); idx += NUM_THREADS) {
      const int r = idx / (HEAD_DIM / 8), ch = idx - r * (HEAD_DIM / 8);
      const int t = n0 + r;
      uint4 kk = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (t < kv_end) {
        const i64 block = btab[t / block_size];
        const i64 off = (block * block_size + t % block_size) * slot_stride + (i64)kvh * HEAD_DIM + ch * 8;
        kk = *reinterpret_cast<const uint4*>(k_cache + off);
        vv = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      *reinterpret_cast<uint4*>(s_k + r * KV_LD + ch * 8) = kk;
      *reinterpret_cast<uint4*>(s_v + r * KV_LD + ch * 8) = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x BLOCK_N keys, fragments by ldmatrix (mma.cuh). Element-wise
    // shared loads (two 4-byte loads an mma for K, four 2-byte loads an mma for V) made the kernel
    // 79 us for an 8192-token step of 128-token prompts (qwen2.5-1.5b, H200, session 11).
    float s[BLOCK_N / 8][4];
    qk_tile<BLOCK_N / 8, HEAD_DIM>(s, qf, s_k, KV_LD, lane);

    // Mask (causal, and keys past the block's last row), then the online softmax update.
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < BLOCK_N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = n0 + nt * 8 + 2 * c + e;
          const float v = s[nt][2 * h + e] * qk_scale;
          s[nt][2 * h + e] = key > row_pos[h] || key >= kv_end ? RVLLM_NEG_INF : v;
        }
    online_softmax_tile(s, row_max, row_sum, o_acc);

    pv_tile<BLOCK_N / 8, HEAD_DIM>(o_acc, s, s_v, KV_LD, lane);  // O += P V
  }

  // Normalize and write the valid rows.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!row_ok[h]) continue;
    const int m = row_m[h];
    const int tok = q_start + m / group, head = kvh * group + m % group;
    scalar_t* orow = out + ((i64)tok * num_heads + head) * HEAD_DIM;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j) {
      const int col = j * 8 + 2 * c;
      *reinterpret_cast<unsigned int*>(orow + col) = pack2(o_acc[j][2 * h] * inv, o_acc[j][2 * h + 1] * inv);
    }
  }
}
