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
// 16 query rows each). Dynamic shared memory: PREFILL_STAGES stages of K and V tiles,
// PREFILL_STAGES * 2 * BLOCK_N * (HEAD_DIM + 8) * 2 B (nvrtc.prefill_smem_bytes).
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
#define BLOCK_N 32  // keys a tile (64 took 236-252 registers, or spilled under the cap below)
#define NUM_THREADS 128
#define KV_LD (HEAD_DIM + 8)  // padded shared row (elements): 16-byte aligned, fewer bank conflicts
#define PREFILL_STAGES 2     // K/V tiles in shared memory: the next one copies while this one is used
#define KV_CHUNKS (HEAD_DIM / 8)
#define TILE_CHUNKS (BLOCK_N * KV_CHUNKS)
#define CHUNKS_PER_THREAD ((TILE_CHUNKS + NUM_THREADS - 1) / NUM_THREADS)  // a tile's 16-byte chunks a thread copies
#define SLOTS_AT_ONCE 2  // block-table loads in flight before their copies (registers)
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

  extern __shared__ __align__(16) unsigned char prefill_smem[];  // [stage][K tile, V tile]
  scalar_t* const s_kv = reinterpret_cast<scalar_t*>(prefill_smem);

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

  // A tile of K and V into stage `st`, by cp.async (no registers held while the copies fly): thread
  // t copies chunks t, t + NUM_THREADS, ..., their cache slots looked up SLOTS_AT_ONCE at a time, then
  // their copies issued. The copies went through registers, one chunk's block-table load, then its K
  // and V loads, then its stores, one chunk after another, no tile ahead: on an H200 a layer of an
  // 8192-token step of 128-token prompts took 70.2 us, now 55.7-58.4; of 1024-token ones 257, now 194-209
  // (NOTES #80). Rows past kv_end are zero-filled, never garbage (a NaN would survive a 0 probability).
  auto load_tile = [&](int st, int n0) {
    scalar_t* sk = s_kv + st * 2 * BLOCK_N * KV_LD;
    scalar_t* sv = sk + BLOCK_N * KV_LD;
#pragma unroll
    for (int j0 = 0; j0 < CHUNKS_PER_THREAD; j0 += SLOTS_AT_ONCE) {
      int slot[SLOTS_AT_ONCE];
#pragma unroll
      for (int j = 0; j < SLOTS_AT_ONCE; ++j) {
        const int idx = threadIdx.x + (j0 + j) * NUM_THREADS, t = n0 + idx / KV_CHUNKS;
        slot[j] = t < kv_end && idx < TILE_CHUNKS ? btab[t / block_size] * block_size + t % block_size : -1;
      }
#pragma unroll
      for (int j = 0; j < SLOTS_AT_ONCE; ++j) {
        const int idx = threadIdx.x + (j0 + j) * NUM_THREADS, r = idx / KV_CHUNKS, ch = idx - r * KV_CHUNKS;
        if (idx >= TILE_CHUNKS) continue;  // the last round's spare lanes, or a batch past CHUNKS_PER_THREAD
        const i64 off = slot[j] >= 0 ? (i64)slot[j] * slot_stride + (i64)kvh * HEAD_DIM + ch * 8 : 0;
        cp_async_16(sk + r * KV_LD + ch * 8, k_cache + off, slot[j] >= 0);
        cp_async_16(sv + r * KV_LD + ch * 8, v_cache + off, slot[j] >= 0);
      }
    }
    cp_async_commit();
  };
  const int num_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
  if (num_tiles > 0) load_tile(0, 0);

  for (int i = 0; i < num_tiles; ++i) {
    const int n0 = i * BLOCK_N;
    // The next tile into the other stage (every warp left it at the end of the last iteration),
    // then wait for this one: this thread's copies, then (the barrier) everyone's.
    if (i + 1 < num_tiles) load_tile((i + 1) % PREFILL_STAGES, n0 + BLOCK_N);
    else cp_async_commit();  // an empty group keeps the wait count uniform
    cp_async_wait<1>();
    __syncthreads();
    const scalar_t* s_k = s_kv + (i % PREFILL_STAGES) * 2 * BLOCK_N * KV_LD;
    const scalar_t* s_v = s_k + BLOCK_N * KV_LD;

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
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
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
