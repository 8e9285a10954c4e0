// Decode attention on tensor cores, for decode steps with many (row, KV head) pairs.
//
// attention_decode.cu's builds work key by key on CUDA cores (unpacking, a dot product per query
// head, shuffles, the block-table lookup: ~70 instructions a key by a count of the source, not
// measured), and at 256 rows they are bound by issue and latency (session 3's ncu: 0.53 instructions
// issued per cycle) rather than by the ~50 MB of K/V a layer reads (37 us per layer for
// qwen2.5-1.5b at 256 rows x 192 keys on an H100, 45% of the read rate). Here the query heads of a
// GQA group are the M rows of mma.m16n8k16 (group <= 16; rows past the group are zeros, never
// written), so at head size 128 a 16-key tile costs 16 + 16 mma and 8 + 8 ldmatrix.x4 per warp.
//
// One block per (query row, KV head) pair: grid (num_kv_heads, num_tokens), WARPS warps. Warp w
// takes tiles w, w + WARPS, ... of TILE keys and streams them through its own shared memory, STAGES
// tiles in flight (cp.async: no registers held by loads in flight), with the online softmax of the
// prefill kernel; the warps' partial results meet in shared memory at the end. No split over
// blocks: the backend uses it where the pairs alone fill the GPU (cuda_attention.decode_build),
// and picks the entry point (warps, tile, stages) by how many pairs each SM gets. Any context length;
// nothing depends on host values that change between steps except through the metadata arrays,
// so it is graph-safe as it stands. Rows that no request owns get zeros.
//
// Compile-time: HEAD_DIM (a multiple of 16, at most 128), RVLLM_FP16 / RVLLM_BF16.
// Dynamic shared memory: per warp, K and V tiles of every stage, 2 * STAGES * TILE * (HEAD_DIM + 8)
// * 2 bytes (nvrtc.decode_tc_smem_bytes); the combine reuses it.
#include "common.cuh"
#include "mma.cuh"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif
#if (HEAD_DIM % 16) != 0 || HEAD_DIM > 128
#error "attention_decode_tc.cu: HEAD_DIM must be a multiple of 16 and at most 128"
#endif
#define DTC_LD (HEAD_DIM + 8)  // padded shared row (elements): ldmatrix's 8 rows fall in 8 bank groups
#define DTC_CHUNKS (HEAD_DIM / 8)
#define DTC_OLD (HEAD_DIM + 8)  // padded row (floats) of the warps' partial outputs in the combine
#define LOG2E_F 1.4426950408889634f

#define DECODE_TC_PARAMS \
    scalar_t* __restrict__ out,            /* [num_tokens, num_heads, HEAD_DIM] */ \
    DECODE_INPUT_PARAMS, float scale
#define DECODE_TC_ARGS \
    out, DECODE_INPUT_ARGS, scale

template <int WARPS, int TILE, int STAGES>
__device__ __forceinline__ void decode_tc(DECODE_TC_PARAMS) {
  static_assert(TILE == 16 || TILE == 32, "whole 16-key k-steps of P @ V, at most a lane per key (slot_of)");
  static_assert(WARPS >= 2, "the warps' partials always meet in shared memory");
  static_assert(2 * STAGES * TILE * DTC_LD * 2 >= (16 * DTC_OLD + 32) * 4, "a warp's partials fit in its stages");
  extern __shared__ __align__(16) unsigned char dtc_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  // This warp's stages: [STAGES][TILE][DTC_LD] of K, then of V.
  scalar_t* s_k = reinterpret_cast<scalar_t*>(dtc_smem) + warp * 2 * STAGES * TILE * DTC_LD;
  scalar_t* s_v = s_k + STAGES * TILE * DTC_LD;
  const int kvh = blockIdx.x, tok = blockIdx.y;
  const int group = num_heads / num_kv_heads;  // <= 16 (the backend checks)

  // The metadata chain reads only the step's inputs: before the wait (common.cuh).
  const int row_stride = row_stride_dev != nullptr ? *row_stride_dev : max_blocks_per_seq;
  int req, cached;
  const int ctx = query_context_len(query_start_loc, seq_lens, num_reqs, tok, &req, &cached);
  const int* btab = block_tables + (req >= 0 ? (i64)req * row_stride : 0);
  const i64 slot_stride = (i64)num_kv_heads * HEAD_DIM;
  const i64 head0 = (i64)tok * num_heads + (i64)kvh * group;

  // A tile of K and V into stage `stage`: lane takes 16-byte chunks lane, lane + 32, ... (a
  // warp-wide copy is 512 contiguous bytes of a row pair at head size 128). The keys' cache slots
  // come from `slot_lanes` (lane r < TILE holds key r's slot, block * block_size + offset, -1 past
  // the context; int32 as slot_mapping is), found an iteration ahead by slot_of so that the
  // block-table load is not in series with the K/V copies, and once a key: a chunk's address is
  // then a shuffle and a multiply-add (it was a division by block_size and 64-bit arithmetic per
  // chunk, 8 a lane a tile). Keys past the context are zero-filled: a NaN there would survive a
  // zero probability.
  auto slot_of = [&](int tile) -> int {
    const int t = tile * TILE + lane % TILE;
    return t < ctx ? btab[t / block_size] * block_size + t % block_size : -1;
  };
  const scalar_t* k_head = k_cache + (i64)kvh * HEAD_DIM;
  const scalar_t* v_head = v_cache + (i64)kvh * HEAD_DIM;
  auto load_tile = [&](int stage, int slot_lanes) {
    scalar_t* sk = s_k + stage * TILE * DTC_LD;
    scalar_t* sv = s_v + stage * TILE * DTC_LD;
#pragma unroll
    for (int idx = lane; idx < TILE * DTC_CHUNKS; idx += 32) {
      const int r = idx / DTC_CHUNKS, ch = idx - r * DTC_CHUNKS;
      const int slot = __shfl_sync(0xffffffffu, slot_lanes, r);
      const i64 off = slot >= 0 ? (i64)slot * slot_stride + ch * 8 : 0;
      cp_async_16(sk + r * DTC_LD + ch * 8, k_head + off, slot >= 0);
      cp_async_16(sv + r * DTC_LD + ch * 8, v_head + off, slot >= 0);
    }
    cp_async_commit();
  };
  // This warp's tiles: warp, warp + WARPS, ...; the i-th of them goes to stage i % STAGES.
  const int num_tiles = req >= 0 ? (ctx + TILE - 1) / TILE : 0;
  const int my_tiles = num_tiles > warp ? (num_tiles - warp + WARPS - 1) / WARPS : 0;
  // Of the first STAGES - 1 tiles, those whose keys are all from earlier steps (below `cached`,
  // which no kernel of this step writes; the block tables may be read here, common.cuh) are copied
  // before the wait, so that their DRAM round trip overlaps the rotary kernel: in a decode step only
  // the tile holding the row's own new key waits. Tile by tile: a prefix of this warp's tiles (it was
  // all of them or none, and at batch 1 with 4 warps a context under 128 keys loaded nothing early).
  auto prologue_tile = [&](int s) {
    if (s < my_tiles) load_tile(s, slot_of(warp + s * WARPS));
    else cp_async_commit();  // an empty group keeps the wait counts uniform
  };
  int early = 0;  // such tiles are whole tiles inside the context, so s < my_tiles for each
  while (early < STAGES - 1 && (warp + early * WARPS + 1) * TILE <= cached) ++early;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < early) prologue_tile(s);
  // The slots of the loop's first copy, read ahead (block tables only, as above).
  int slot_ahead = STAGES - 1 < my_tiles ? slot_of(warp + (STAGES - 1) * WARPS) : -1;
  pdl_enter();
  if (req < 0 || ctx <= 0) {  // a padding row: zeros
    cp_async_wait<0>();
    for (int i = threadIdx.x; i < group * HEAD_DIM; i += 32 * WARPS) out[head0 * HEAD_DIM + i] = 0;
    return;
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s >= early) prologue_tile(s);  // in order after the early ones: group i is still tile i

  // The query rows: row m is head kvh * group + m (rows >= group are zeros), as A fragments for
  // every k-step of 16 head dims.
  unsigned int qf[HEAD_DIM / 16][4];
  {
    const bool ok0 = g < group, ok1 = g + 8 < group;
    const scalar_t* q0 = q + (head0 + (ok0 ? g : 0)) * HEAD_DIM;
    const scalar_t* q1 = q + (head0 + (ok1 ? g + 8 : 0)) * HEAD_DIM;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
      const int col = ks * 16 + 2 * c;
      qf[ks][0] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + col) : 0u;
      qf[ks][1] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + col) : 0u;
      qf[ks][2] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + col + 8) : 0u;
      qf[ks][3] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + col + 8) : 0u;
    }
  }

  float o_acc[HEAD_DIM / 8][4];
#pragma unroll
  for (int j = 0; j < HEAD_DIM / 8; ++j) o_acc[j][0] = o_acc[j][1] = o_acc[j][2] = o_acc[j][3] = 0.f;
  float row_max[2] = {RVLLM_NEG_INF, RVLLM_NEG_INF};  // log2 units (scores * scale * log2 e)
  float row_sum[2] = {0.f, 0.f};
  const float qk_scale = scale * LOG2E_F;

  for (int i = 0; i < my_tiles; ++i) {
    const int tile = warp + i * WARPS, next = i + STAGES - 1;
    if (next < my_tiles) {
      load_tile(next % STAGES, slot_ahead);  // the stage computed last iteration
      slot_ahead = next + 1 < my_tiles ? slot_of(warp + (next + 1) * WARPS) : -1;
    } else {
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();  // this tile's group has landed (this lane's copies)
    __syncwarp();                 // ... and every other lane's
    const scalar_t* sk = s_k + (i % STAGES) * TILE * DTC_LD;
    const scalar_t* sv = s_v + (i % STAGES) * TILE * DTC_LD;

    // S = Q K^T: 16 rows x TILE keys (n-tiles of 8 keys).
    float s[TILE / 8][4];
    qk_tile<TILE / 8, HEAD_DIM>(s, qf, sk, DTC_LD, lane);

    // Mask keys past the context, then the online softmax update.
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < TILE / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = tile * TILE + nt * 8 + 2 * c + e;
          s[nt][2 * h + e] = key < ctx ? s[nt][2 * h + e] * qk_scale : RVLLM_NEG_INF;
        }
    online_softmax_tile(s, row_max, row_sum, o_acc);

    pv_tile<TILE / 8, HEAD_DIM>(o_acc, s, sv, DTC_LD, lane);  // O += P V
    __syncwarp();  // every lane is done with this stage before the next iteration refills it
  }

  // The warps' partial results (unnormalized O, max, sum per row) into shared memory, over this
  // warp's own (drained) tile stages; a warp that got no tile has max -inf, sum 0 and O 0.
  cp_async_wait<0>();
  // Rows padded by 8 floats: the 8 rows a store instruction spans (g) fall in different banks
  // (ncu counted 7.6-way conflicts on these stores unpadded).
  float* s_o = reinterpret_cast<float*>(s_k);  // [16][DTC_OLD]
  float* s_ml = s_o + 16 * DTC_OLD;            // [2][16]: max, sum
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = g + 8 * h;
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j)
      *reinterpret_cast<float2*>(s_o + m * DTC_OLD + j * 8 + 2 * c) = make_float2(o_acc[j][2 * h], o_acc[j][2 * h + 1]);
    if (c == 0) {
      s_ml[m] = row_max[h];
      s_ml[16 + m] = row_sum[h];
    }
  }
  __syncthreads();
  const int per_warp = 2 * STAGES * TILE * DTC_LD;  // elements of scalar_t
  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += 32 * WARPS) {
    const int m = idx / HEAD_DIM, d = idx - m * HEAD_DIM;
    float mx = RVLLM_NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float* ml = reinterpret_cast<const float*>(reinterpret_cast<const scalar_t*>(dtc_smem) + w * per_warp) + 16 * DTC_OLD;
      mx = fmaxf(mx, ml[m]);
    }
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float* ow = reinterpret_cast<const float*>(reinterpret_cast<const scalar_t*>(dtc_smem) + w * per_warp);
      const float wgt = exp2f(ow[16 * DTC_OLD + m] - mx);  // 0 for a warp without tiles
      o += wgt * ow[m * DTC_OLD + d];
      l += wgt * ow[16 * DTC_OLD + 16 + m];
    }
    out[(head0 + m) * HEAD_DIM + d] = from_f32(o / l);
  }
}

// Entry points: warps per pair x keys per tile x tiles in flight per warp. More warps per pair for
// steps with fewer pairs per SM (the backend's choice, cuda_attention.decode_build).
#define DECODE_TC_ENTRY(W, T, S) \
  extern "C" __global__ void __launch_bounds__(32 * W) paged_attention_decode_tc_w##W##_t##T##_s##S##_kernel( \
      DECODE_TC_PARAMS) { \
    decode_tc<W, T, S>(DECODE_TC_ARGS); \
  }
// On an H200 (bench/op_times.py --attention-variants, session 7) these beat the 1-warp 32-key, the
// 2-warp 3-stage and the 4-warp 2-stage builds end to end or per op; see cuda_attention.tc_build.
DECODE_TC_ENTRY(2, 16, 2)
DECODE_TC_ENTRY(2, 16, 3)
DECODE_TC_ENTRY(4, 16, 3)
// The same 4-warp build for steps of at most one pair per SM. The backend gives it the smallest
// shared-memory carveout that holds a block: left to the driver it took the largest (233 KB, for
// two blocks an SM), while the GEMVs around it run at 132 KB, and an SM changes its carveout only
// when empty, so every switch drained the SMs and undid the PDL overlap on both sides (NOTES #50).
extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_tc_w4_t16_s3_one_per_sm_kernel(DECODE_TC_PARAMS) {
  decode_tc<4, 16, 3>(DECODE_TC_ARGS);
}
