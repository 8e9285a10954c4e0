// Paged attention, split over the context (flash-decoding), without tensor cores.
//
// The backend uses it for decode steps (one query row per request), and it is correct for any
// ragged step: every query row is handled on its own with its causal context length (see
// query_context_len in common.cuh), which makes it the reference path for the prefill kernel.
//
// One kernel, grid (num_kv_heads, num_tokens, grid_parts), NUM_THREADS threads (WIDE_THREADS in the
// wide build, below). One block takes
// one query row, one KV head and all `group` query heads that share it (GQA), and partitions
// blockIdx.z, blockIdx.z + grid_parts, ... of `part_size` keys (those that start inside the
// row's context): each K/V row is loaded once for the whole group. The backend picks part_size
// (at most PARTITION_SIZE, the shared-memory bound) from the step's size: a batch-1 step has only
// num_kv_heads (row, KV head) pairs, so its contexts are cut into 32-key partitions to spread over
// many blocks, each of which then loads its keys in one round trip; large steps use 512. A context of one partition is
// written to the output directly. Otherwise each partition's normalized output and its softmax
// max and sum go to float32 scratch, and the last block of a (row, KV head) to finish, found with
// an atomic counter, combines the partitions into the output and resets the counter (a separate
// combine kernel cost a launch and 5 us at batch 1). Eager steps
// launch one block per partition (grid_parts = partitions of the longest context); CUDA graphs
// launch a grid fixed at capture and the blocks loop, so the same graph serves any context up to
// max_parts * part_size. Partitions past a row's context are neither computed nor read.
// A query row that no request owns gets a zero output row, like the CPU reference.
//
// Compile-time: HEAD_DIM (any multiple of 8 up to 256), RVLLM_FP16 / RVLLM_BF16.
#include "common.cuh"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif
#ifndef PARTITION_SIZE
#define PARTITION_SIZE 512
#endif
#define NUM_THREADS 128
#define WIDE_THREADS 512
#define GCHUNK 8                       // query heads of the group held in registers at once
// A lane holds head dims 64 c + 2 lane and 64 c + 2 lane + 1 (c < PPL) of a K or V row: one 4-byte
// load per pair, kept packed until used, so a key in flight costs a lane PPL registers, half what
// converting each 2-byte element to float at load time cost, with half the load instructions. On an
// H100 (bench/op_times.py, 256 rows x 192 keys, lean build) 39.7 -> 37.0 us; keeping sixteen keys in
// flight instead of eight with the registers this frees was slower (42.2 us).
#define PPL ((HEAD_DIM + 63) / 64)
#define DPL (2 * PPL)                  // head dims per lane
// Keys a warp loads before using any: a warp per key in turn made a chain of dependent loads
// (21 us for a 44-token context at batch 1 on an H100, ncu); eight at a time overlap them.
#define KEYS_IN_FLIGHT (HEAD_DIM > 128 ? 4 : 8)

// The two 16-bit values of a packed pair as floats: the lower-index element is the low half.
__device__ __forceinline__ float lo_f32(unsigned int w) { return to_f32((scalar_t)(w & 0xffffu)); }
__device__ __forceinline__ float hi_f32(unsigned int w) { return to_f32((scalar_t)(w >> 16)); }

// Sums N values (N a multiple of 32) over the warp and scatters the sums: afterwards lane l holds
// in v[0 .. N/32) the sums of values (N/32) * l + i. Each step halves the values a lane keeps and
// swaps the other half with its partner lane: N - N/32 shuffles in all.
template <int N, int OFFSET>
struct WarpReduceScatter {
  static __device__ __forceinline__ void run(float* v, int lane) {
    const bool upper = (lane & OFFSET) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float send = upper ? v[i] : v[i + N / 2];
      const float keep = upper ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
    WarpReduceScatter<N / 2, OFFSET / 2>::run(v, lane);
  }
};
template <int N>
struct WarpReduceScatter<N, 0> {
  static __device__ __forceinline__ void run(float*, int) {}
};

// Dynamic shared memory (floats): s_logits [group][PARTITION_SIZE], s_red [warps][GCHUNK]
// [HEAD_DIM], s_stats [2][group]. The backend computes the same size (nvrtc.py / cuda.py).
// The kernel's parameters, shared by its two builds (below).
#define SPLIT_ATTENTION_PARAMS \
    scalar_t* __restrict__ out,    /* [num_tokens, num_heads, HEAD_DIM] */ \
    int* __restrict__ counters,    /* [num_tokens * num_kv_heads], zero before and after the kernel */ \
    float* __restrict__ tmp_out,   /* [num_tokens, num_heads, max_parts, HEAD_DIM] */ \
    float* __restrict__ tmp_max,   /* [num_tokens, num_heads, max_parts] */ \
    float* __restrict__ tmp_sum,   /* [num_tokens, num_heads, max_parts] */ \
    DECODE_INPUT_PARAMS, int max_parts, int part_size, float scale
#define SPLIT_ATTENTION_ARGS \
    out, counters, tmp_out, tmp_max, tmp_sum, DECODE_INPUT_ARGS, max_parts, part_size, scale

template <bool SMALL_STEP, int THREADS>
__device__ __forceinline__ void split_attention(SPLIT_ATTENTION_PARAMS) {
  constexpr int WARPS = THREADS / 32;
  static_assert(KEYS_IN_FLIGHT % 4 == 0, "the score reduce-scatter takes keys four at a time");
  const int kvh = blockIdx.x, tok = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // The metadata chain (the request lookup, then the block table) reads only the step's inputs,
  // so it runs before pdl_wait(), while the kernels before this one (rotary, the qkv product)
  // finish; see common.cuh.
  const int row_stride = row_stride_dev != nullptr ? *row_stride_dev : max_blocks_per_seq;
  const scalar_t* q_tok = q + ((i64)tok * num_heads + (i64)kvh * group) * HEAD_DIM;
  float qr[GCHUNK][DPL];
  auto load_q = [&](int g0) {
#pragma unroll
    for (int gg = 0; gg < GCHUNK; ++gg) {
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = 64 * (c >> 1) + 2 * lane + (c & 1);  // the dims of the K pairs (PPL)
        qr[gg][c] = (g0 + gg < group && d < HEAD_DIM) ? to_f32(q_tok[(g0 + gg) * HEAD_DIM + d]) * scale : 0.f;
      }
    }
  };
  // The wide build (512 threads) cannot hold q as well within its 128 registers a thread.
  const bool q_held = SMALL_STEP && THREADS <= 128 && group <= GCHUNK;
  int req;
  const int ctx = query_context_len(query_start_loc, seq_lens, num_reqs, tok, &req);
  // The combine kernel reads exactly partitions [0, num_parts) of each row.
  const int num_parts = min((max(ctx, 0) + part_size - 1) / part_size, max_parts);
  const i64 slot_stride = (i64)num_kv_heads * HEAD_DIM;
  const int* btab = block_tables + (req >= 0 ? (i64)req * row_stride : 0);  // a padding row reads none
  if (SMALL_STEP && req >= 0 && (int)blockIdx.z < num_parts) {
    // Small steps (this build): start this block's first partition of K and V towards L2, a
    // thread per 32-byte sector, before the wait. The newest key may still be being written by
    // the rotary kernel: L2 is where that write lands, so a prefetch cannot make it stale.
    const int start = blockIdx.z * part_size, n = min(part_size, ctx - start);
    constexpr int sectors = (HEAD_DIM + 15) / 16;
    for (int j = threadIdx.x; j < n * sectors; j += THREADS) {
      const int i = j / sectors, t = start + i;
      const i64 row = ((i64)btab[t / block_size] * block_size + t % block_size) * slot_stride + (i64)kvh * HEAD_DIM
                      + (j - i * sectors) * 16;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(k_cache + row));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(v_cache + row));
    }
  }
  pdl_enter();
  if (q_held) load_q(0);
  if (req < 0 || num_parts <= 0) {  // a padding row: zeros, written once
    if (blockIdx.z == 0) {
      scalar_t* o = out + ((i64)tok * num_heads + (i64)kvh * group) * HEAD_DIM;
      for (int i = threadIdx.x; i < group * HEAD_DIM; i += THREADS) o[i] = 0;
    }
    return;
  }
  if ((int)blockIdx.z >= num_parts) return;

  extern __shared__ float smem[];
  float* s_logits = smem;
  float* s_red = s_logits + group * PARTITION_SIZE;
  float* s_stats = s_red + WARPS * GCHUNK * HEAD_DIM;  // [0, group): max, [group, 2 group): sum

  // Every iteration ends with a barrier (step 3), so the next one may rewrite shared memory.
  for (int part = blockIdx.z; part < num_parts; part += gridDim.z) {
    const int start = part * part_size;
    const int n = min(part_size, ctx - start);

    // 1. Scores: a warp per key, lanes across head dims, all group heads per K load.
    for (int g0 = 0; g0 < group; g0 += GCHUNK) {
      if (!q_held) load_q(g0);
      for (int i0 = warp; i0 < n; i0 += WARPS * KEYS_IN_FLIGHT) {
        unsigned int kv[KEYS_IN_FLIGHT][PPL];  // packed pairs (PPL)
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u) {  // all loads first: KEYS_IN_FLIGHT rows in flight
          const int i = i0 + u * WARPS;
          const int t = start + min(i, n - 1);
          const i64 block = btab[t / block_size];
          const i64 row = (block * block_size + t % block_size) * slot_stride + (i64)kvh * HEAD_DIM;
          // Rows start at even elements (HEAD_DIM is a multiple of 8): 4-byte aligned pairs.
          const unsigned int* kr = reinterpret_cast<const unsigned int*>(k_cache + row);
#pragma unroll
          for (int c = 0; c < PPL; ++c) {
            const int d = 64 * c + 2 * lane;
            kv[u][c] = (i < n && d < HEAD_DIM) ? kr[32 * c + lane] : 0u;
          }
          // Step 3 reads this key's V row: start it towards L2 now (a lane per 32-byte sector), so
          // that a short partition pays one DRAM round trip for K and V, not two.
          if (g0 == 0 && i < n && lane * 16 < HEAD_DIM)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(v_cache + row + lane * 16));
        }
        // The lanes' partial dot products of 4 keys x GCHUNK heads (32 values) are summed over
        // the warp with one reduce-scatter (31 shuffles; a warp_sum per value took 160), which
        // leaves lane l with the sum for key l / GCHUNK, head l % GCHUNK.
#pragma unroll
        for (int h = 0; h < KEYS_IN_FLIGHT / 4; ++h) {
          float part[4 * GCHUNK];
#pragma unroll
          for (int u = 0; u < 4; ++u)
#pragma unroll
            for (int gg = 0; gg < GCHUNK; ++gg) {
              float acc = 0.f;
#pragma unroll
              for (int c = 0; c < PPL; ++c)
                acc += qr[gg][2 * c] * lo_f32(kv[4 * h + u][c]) + qr[gg][2 * c + 1] * hi_f32(kv[4 * h + u][c]);
              part[u * GCHUNK + gg] = acc;
            }
          WarpReduceScatter<4 * GCHUNK, 16>::run(part, lane);
          const int i = i0 + (4 * h + lane / GCHUNK) * WARPS, gg = lane % GCHUNK;
          if (g0 + gg < group && i < n) s_logits[(g0 + gg) * PARTITION_SIZE + i] = part[0];
        }
      }
    }
    __syncthreads();

    // 2. Softmax over this partition, a warp per query head: keep max and sum, store exp().
    for (int g = warp; g < group; g += WARPS) {
      float* lg = s_logits + g * PARTITION_SIZE;
      float m = RVLLM_NEG_INF;
      for (int i = lane; i < n; i += 32) m = fmaxf(m, lg[i]);
      m = warp_max(m);
      float l = 0.f;
      for (int i = lane; i < n; i += 32) {
        const float p = expf(lg[i] - m);
        lg[i] = p;
        l += p;
      }
      l = warp_sum(l);
      if (lane == 0) {
        s_stats[g] = m;
        s_stats[group + g] = l;
      }
    }
    __syncthreads();

    // 3. P @ V: a warp per key again, each V row loaded once for the group; then sum the warps.
    for (int g0 = 0; g0 < group; g0 += GCHUNK) {
      float acc[GCHUNK][DPL];
#pragma unroll
      for (int gg = 0; gg < GCHUNK; ++gg)
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[gg][c] = 0.f;
      for (int i0 = warp; i0 < n; i0 += WARPS * KEYS_IN_FLIGHT) {
        unsigned int vv[KEYS_IN_FLIGHT][PPL];  // packed pairs, as K
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u) {
          const int i = i0 + u * WARPS;
          const int t = start + min(i, n - 1);
          const i64 block = btab[t / block_size];
          const unsigned int* vr = reinterpret_cast<const unsigned int*>(
              v_cache + (block * block_size + t % block_size) * slot_stride + (i64)kvh * HEAD_DIM);
#pragma unroll
          for (int c = 0; c < PPL; ++c) {
            const int d = 64 * c + 2 * lane;
            vv[u][c] = (i < n && d < HEAD_DIM) ? vr[32 * c + lane] : 0u;
          }
        }
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u) {
          const int i = i0 + u * WARPS;
#pragma unroll
          for (int gg = 0; gg < GCHUNK; ++gg) {
            const float p = (g0 + gg < group && i < n) ? s_logits[(g0 + gg) * PARTITION_SIZE + i] : 0.f;
#pragma unroll
            for (int c = 0; c < PPL; ++c) {
              acc[gg][2 * c] += p * lo_f32(vv[u][c]);
              acc[gg][2 * c + 1] += p * hi_f32(vv[u][c]);
            }
          }
        }
      }
#pragma unroll
      for (int gg = 0; gg < GCHUNK; ++gg)
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
          const int d = 64 * (c >> 1) + 2 * lane + (c & 1);
          if (d < HEAD_DIM) s_red[(warp * GCHUNK + gg) * HEAD_DIM + d] = acc[gg][c];
        }
      __syncthreads();
      for (int idx = threadIdx.x; idx < GCHUNK * HEAD_DIM; idx += THREADS) {
        const int gg = idx / HEAD_DIM, d = idx - gg * HEAD_DIM;
        const int g = g0 + gg;
        if (g < group) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < WARPS; ++w) s += s_red[(w * GCHUNK + gg) * HEAD_DIM + d];
          if (num_parts == 1) {  // the whole context in one partition: the output itself
            out[((i64)tok * num_heads + (i64)kvh * group + g) * HEAD_DIM + d] = from_f32(s / s_stats[group + g]);
            continue;
          }
          const i64 row = ((i64)tok * num_heads + (i64)kvh * group + g) * max_parts + part;
          tmp_out[row * HEAD_DIM + d] = s / s_stats[group + g];
          if (d == 0) {
            tmp_max[row] = s_stats[g];
            tmp_sum[row] = s_stats[group + g];
          }
        }
      }
      __syncthreads();  // s_red is rewritten by the next group chunk (and s_logits by the next partition)
    }
  }  // partitions

  if (num_parts == 1) return;  // written above; no scratch, no counter

  // 4. The last block of this (row, KV head) combines the partitions (all blocks' scratch is in L2).
  __shared__ int s_last;
  __syncthreads();  // every thread's scratch is written
  if (threadIdx.x == 0) s_last = split_arrive(&counters[tok * num_kv_heads + kvh], min((int)gridDim.z, num_parts));
  __syncthreads();
  if (!s_last) return;
  const i64 head0 = (i64)tok * num_heads + (i64)kvh * group;
  // Per head: the weight of partition p is sum_p * exp(max_p - max), stored in s_logits[g][p].
  for (int g = warp; g < group; g += WARPS) {
    const i64 row0 = (head0 + g) * max_parts;
    float* w = s_logits + g * PARTITION_SIZE;
    float m = RVLLM_NEG_INF;
    for (int p = lane; p < num_parts; p += 32) m = fmaxf(m, ld_cg(tmp_max + row0 + p));
    m = warp_max(m);
    float l = 0.f;
    for (int p = lane; p < num_parts; p += 32) {
      const float wp = ld_cg(tmp_sum + row0 + p) * expf(ld_cg(tmp_max + row0 + p) - m);
      w[p] = wp;
      l += wp;
    }
    l = warp_sum(l);
    if (lane == 0) s_stats[g] = 1.f / l;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += THREADS) {
    const int g = idx / HEAD_DIM, d = idx - g * HEAD_DIM;
    const i64 row0 = (head0 + g) * max_parts;
    const float* w = s_logits + g * PARTITION_SIZE;
    float acc = 0.f;
    for (int p = 0; p < num_parts; ++p) acc += w[p] * ld_cg(tmp_out + (row0 + p) * HEAD_DIM + d);
    out[(head0 + g) * HEAD_DIM + d] = from_f32(acc * s_stats[g]);
  }
}

// Two builds of the kernel. Small steps (few blocks, each one chain of dependent loads) want their
// first partition's K and V on the way to L2 before the wait and the query rows held in registers
// for the whole kernel; that holds 32 more registers, which at batch 256 costs a block per SM (168
// registers: 3 blocks; ncu: 2.6 active warps per scheduler, 0.53 instructions issued per cycle),
// and a step that large would prefetch a whole layer's cache into L2. The lean build loads the
// query rows per group chunk and is held to 4 blocks per SM at head sizes <= 128. The backend
// picks by step size (cuda_attention.py).
extern "C" __global__ void __launch_bounds__(NUM_THREADS) paged_attention_split_kernel(SPLIT_ATTENTION_PARAMS) {
  split_attention<true, NUM_THREADS>(SPLIT_ATTENTION_ARGS);
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS, HEAD_DIM <= 128 ? 4 : 2)
    paged_attention_split_lean_kernel(SPLIT_ATTENTION_PARAMS) {
  split_attention<false, NUM_THREADS>(SPLIT_ATTENTION_ARGS);
}

// The wide build, for the smallest steps (batch 1-4): 16 warps x 8 keys in flight take a 128-key
// partition in one round trip for K and one for V, where the 4-warp build needs 32-key partitions
// (four blocks and a cross-block combine for a 128-token context) or four round trips. Its s_red
// is 16 warps' worth (64 KB at head size 128): the backend uses it up to head size 128.
extern "C" __global__ void __launch_bounds__(WIDE_THREADS) paged_attention_split_wide_kernel(SPLIT_ATTENTION_PARAMS) {
  split_attention<true, WIDE_THREADS>(SPLIT_ATTENTION_ARGS);
}
