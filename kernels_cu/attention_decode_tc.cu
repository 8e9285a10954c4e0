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
// prefill kernel; with several warps their partial results meet in shared memory at the end, and
// one warp writes its result itself. The backend uses these where the pairs alone fill the GPU or
// the contexts are short (cuda_attention.decode_build), and picks the entry point (warps, tile,
// stages) by how many pairs each SM gets. Any context length; nothing depends on host values that
// change between steps except through the metadata arrays, so it is graph-safe as it stands. Rows
// that no request owns get zeros.
//
// The split build (`_split_`) adds a third grid dimension: block z takes the z-th partition of
// part_size keys of its row (DecodeSplit, below), for small steps with long contexts, where a block
// per pair left most SMs idle; the last block of a pair to finish combines the partitions. The
// cluster build (`_cluster_`, sm_90) splits the same way over a thread block cluster of the grid's
// z blocks per pair, with partitions sized on the device from the row's context: each block stores
// its partition's share of every output item into the shared memory of the cluster's block that
// combines that item (distributed shared memory), and after one cluster barrier each block combines
// its items: no scratch, no counter, no L2 round trips after the last partition (cluster_combine).
//
// The rope builds (`_rope_` in the name) also do rotary.cu's work, so that the decode steps they
// take (cuda_attention.decode_rope, off by default) need no rotary kernel: q is the qkv product ([T, qkv_stride],
// q, k and v heads in that order), each warp rotates its own query fragments, and the warp whose
// tiles hold the row's new key (the last of its context) rotates that key, writes it and the new v
// into the cache at slot_mapping[row] (-1: nothing), and puts them into the stage of that tile
// itself, whose copy skips the slot. The cos/sin values come from the constant table before the
// wait. Rotation pairs are (j, j + HEAD_DIM / 2) (neox; HEAD_DIM a multiple of 32, so a pair's two
// values sit in one lane's fragments of k-steps ks and ks + HEAD_DIM / 32) or (2j, 2j + 1) (one
// 32-bit fragment register), rounded to 16 bits as rotary.cu does.
//
// Compile-time: HEAD_DIM (a multiple of 16, at most 128), RVLLM_FP16 / RVLLM_BF16.
// Dynamic shared memory: per warp, K and V tiles of every stage, 2 * STAGES * TILE * (HEAD_DIM + 8)
// * 2 bytes (nvrtc.decode_tc_smem_bytes); the combine reuses it.
#include "common.cuh"
#include "mma.cuh"
#include "cluster.cuh"

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<head size>"
#endif
#if (HEAD_DIM % 16) != 0 || HEAD_DIM > 128
#error "attention_decode_tc.cu: HEAD_DIM must be a multiple of 16 and at most 128"
#endif
#define DTC_LD (HEAD_DIM + 8)  // padded shared row (elements): ldmatrix's 8 rows fall in 8 bank groups
#define DTC_CHUNKS (HEAD_DIM / 8)
#define DTC_TILE_SHIFT(T) ((T) == 32 ? 5 : 4)  // log2 of TILE (16 or 32)
#define DTC_OLD (HEAD_DIM + 8)  // padded row (floats) of the warps' partial outputs in the combine
#define LOG2E_F 1.4426950408889634f

#define DECODE_TC_PARAMS \
    scalar_t* __restrict__ out,            /* [num_tokens, num_heads, HEAD_DIM] */ \
    DECODE_INPUT_PARAMS, float scale
#define DECODE_TC_ARGS \
    out, DECODE_INPUT_ARGS, scale
// The rope builds' extra inputs (q is the qkv product): the caches again, as destinations of the
// new keys, the qkv rows' stride, and rotary.cu's inputs.
#define DECODE_TC_ROPE_PARAMS \
    DECODE_TC_PARAMS, scalar_t* __restrict__ k_new_dst, scalar_t* __restrict__ v_new_dst, i64 qkv_stride, \
    const int* __restrict__ positions, const int* __restrict__ slot_mapping, const float* __restrict__ cos_sin, \
    int max_pos, int neox

struct DecodeRope {
  scalar_t* k_dst;  // k_cache and v_cache: only the new keys' slots are written, which no copy reads
  scalar_t* v_dst;
  i64 qkv_stride;
  const int* positions;
  const int* slot_mapping;
  const float* cos_sin;
  int max_pos;
  int neox;
};

// The split build's scratch (a context split over blocks, flash-decoding): block z takes keys
// [z * part_size, (z + 1) * part_size) of its row; with more than one partition it writes its
// normalized output, max (log2 units) and sum to the float32 scratch, and the last block of the
// (row, KV head) to finish (an atomic counter, reset by that block) combines them. part_size 0:
// no split (the other builds).
struct DecodeSplit {
  int* counters;   // [num_tokens * num_kv_heads], zero before and after the kernel
  float* tmp_out;  // [num_tokens, num_heads, max_parts, HEAD_DIM]
  float* tmp_max;  // [num_tokens, num_heads, max_parts]
  float* tmp_sum;
  int max_parts;
  int part_size;   // a multiple of TILE * WARPS
};

// decode_tc's split modes: none, over blocks combined through L2 (DecodeSplit), over a cluster.
#define DTC_WHOLE 0
#define DTC_SPLIT_L2 1
#define DTC_SPLIT_CLUSTER 2
#define DTC_CLUSTER_MAX 16  // blocks a cluster (16: the non-portable size the backend opts into)

// The cluster build's receiving buffer, in static shared memory: block r combines the (head, 4
// columns) items i with i % blocks == r, its j-th being i = j * blocks + r, and every block with keys
// stores its partition q's share of each item into the block that combines it: the 4 normalized
// outputs at [(q * per_rank + j) * 4], then (max (log2 units), sum) at [DTC_CLUSTER_VALUES + (q *
// per_rank + j) * 2], per_rank = ceil(items / blocks) (so q * per_rank + j < items + blocks). Other
// builds get no such array.
#define DTC_CLUSTER_ITEMS (16 * HEAD_DIM / 4 + DTC_CLUSTER_MAX)
#define DTC_CLUSTER_VALUES (4 * DTC_CLUSTER_ITEMS)
template <int SPLIT>
__device__ __forceinline__ float* cluster_share() {
  if constexpr (SPLIT == DTC_SPLIT_CLUSTER) {
    __shared__ __align__(16) float share[6 * DTC_CLUSTER_ITEMS];
    return share;
  } else {
    return nullptr;
  }
}

// Rotates x1, x2 (16-bit pairs, element e of each with cos c[e], sin s[e]) into r1, r2.
__device__ __forceinline__ void rotate_pairs2(unsigned int x1, unsigned int x2, const float* c, const float* s,
                                              unsigned int& r1, unsigned int& r2) {
  const float a0 = to_f32((scalar_t)(x1 & 0xffffu)), a1 = to_f32((scalar_t)(x1 >> 16));
  const float b0 = to_f32((scalar_t)(x2 & 0xffffu)), b1 = to_f32((scalar_t)(x2 >> 16));
  r1 = pack2(a0 * c[0] - b0 * s[0], a1 * c[1] - b1 * s[1]);
  r2 = pack2(b0 * c[0] + a0 * s[0], b1 * c[1] + a1 * s[1]);
}
// Rotates the pair (low, high half) of x with cos c, sin s.
__device__ __forceinline__ unsigned int rotate_interleaved(unsigned int x, float c, float s) {
  const float a = to_f32((scalar_t)(x & 0xffffu)), b = to_f32((scalar_t)(x >> 16));
  return pack2(a * c - b * s, b * c + a * s);
}

// The row's new key and value: loaded from the qkv product, k rotated, both written to the cache
// slot (unless it is -1) and, for a row that has a request, to `stash` ([k | v], HEAD_DIM each) for
// the warp that copies the key's tile. Lane u < HEAD_DIM / 16 takes the 16-byte chunks u and
// u + HEAD_DIM / 16 of each (elements 8u.. and 8u + HEAD_DIM / 2..: neox pairs, or 4 interleaved
// pairs each); kc / ks are their cos and sin, loaded before the wait (new_kv_cos_sin).
__device__ __forceinline__ void new_kv_cos_sin(const float* cs, int lane, int neox, float* kc, float* ks) {
  if (lane >= HEAD_DIM / 16) return;
  const int a = neox ? 8 * lane : 4 * lane, b = neox ? 8 * lane + 4 : 4 * lane + HEAD_DIM / 4;
  const float4 c0 = *reinterpret_cast<const float4*>(cs + a), c1 = *reinterpret_cast<const float4*>(cs + b);
  const float4 s0 = *reinterpret_cast<const float4*>(cs + HEAD_DIM / 2 + a);
  const float4 s1 = *reinterpret_cast<const float4*>(cs + HEAD_DIM / 2 + b);
  kc[0] = c0.x, kc[1] = c0.y, kc[2] = c0.z, kc[3] = c0.w, kc[4] = c1.x, kc[5] = c1.y, kc[6] = c1.z, kc[7] = c1.w;
  ks[0] = s0.x, ks[1] = s0.y, ks[2] = s0.z, ks[3] = s0.w, ks[4] = s1.x, ks[5] = s1.y, ks[6] = s1.z, ks[7] = s1.w;
}
__device__ __forceinline__ void new_kv(const scalar_t* k_src, const scalar_t* v_src, scalar_t* k_dst, scalar_t* v_dst,
                                       scalar_t* stash, int lane, int neox, const float* kc, const float* ks) {
  if (lane >= HEAD_DIM / 16) return;
  const int ea = 8 * lane, eb = 8 * lane + HEAD_DIM / 2;
  const uint4 ka = *reinterpret_cast<const uint4*>(k_src + ea), kb = *reinterpret_cast<const uint4*>(k_src + eb);
  const uint4 va = *reinterpret_cast<const uint4*>(v_src + ea), vb = *reinterpret_cast<const uint4*>(v_src + eb);
  const unsigned int xa[4] = {ka.x, ka.y, ka.z, ka.w}, xb[4] = {kb.x, kb.y, kb.z, kb.w};
  unsigned int ra[4], rb[4];
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    if (neox) {
      rotate_pairs2(xa[p], xb[p], kc + 2 * p, ks + 2 * p, ra[p], rb[p]);
    } else {
      ra[p] = rotate_interleaved(xa[p], kc[p], ks[p]);
      rb[p] = rotate_interleaved(xb[p], kc[4 + p], ks[4 + p]);
    }
  }
  const uint4 oa = make_uint4(ra[0], ra[1], ra[2], ra[3]), ob = make_uint4(rb[0], rb[1], rb[2], rb[3]);
  if (k_dst != nullptr) {
    *reinterpret_cast<uint4*>(k_dst + ea) = oa;
    *reinterpret_cast<uint4*>(k_dst + eb) = ob;
    *reinterpret_cast<uint4*>(v_dst + ea) = va;
    *reinterpret_cast<uint4*>(v_dst + eb) = vb;
  }
  if (stash != nullptr) {
    *reinterpret_cast<uint4*>(stash + ea) = oa;
    *reinterpret_cast<uint4*>(stash + eb) = ob;
    *reinterpret_cast<uint4*>(stash + HEAD_DIM + ea) = va;
    *reinterpret_cast<uint4*>(stash + HEAD_DIM + eb) = vb;
  }
}

// The online combine of partitions' shares of one (head, 4 columns) item, shared by the split
// build's two ends: a share is a partition's normalized output v, its max m (log2 units) and its sum
// s; shares are added N at a time, and a larger maximum rescales what is summed so far (exp2(mx -
// top) is 0 before the first share, whose mx is -inf). A share with m = -inf and s = 0 (a partition
// past the last) adds nothing.
struct ShareCombine {
  float mx = RVLLM_NEG_INF, sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);

  template <int N>
  __device__ __forceinline__ void add(const float (&m)[N], const float (&s)[N], const float4 (&v)[N]) {
    float top = mx;  // finite once a share with keys is in
#pragma unroll
    for (int u = 0; u < N; ++u) top = fmaxf(top, m[u]);
    const float r = exp2f(mx - top);
    sum *= r;
    acc.x *= r, acc.y *= r, acc.z *= r, acc.w *= r;
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const float w = s[u] * exp2f(m[u] - top);
      sum += w;
      acc.x += w * v[u].x;
      acc.y += w * v[u].y;
      acc.z += w * v[u].z;
      acc.w += w * v[u].w;
    }
    mx = top;
  }
  // The item's output: 4 columns from `col` of head `head`.
  __device__ __forceinline__ void store(scalar_t* __restrict__ out, i64 head, int col) const {
    const float inv = 1.f / sum;
    *reinterpret_cast<uint2*>(out + head * HEAD_DIM + col) =
        make_uint2(pack2(acc.x * inv, acc.y * inv), pack2(acc.z * inv, acc.w * inv));
  }
};

// The split build's end: the last block of a (row, KV head) to finish combines the partitions'
// shares (in L2) into the output, weighting partition q by sum_q * 2^(max_q - max), and resets the
// counter for the next launch.
//
// Its time is a chain of L2 round trips after the count, so it makes as few as it can: a thread
// takes (head, 4 columns) items, ITEMS of them together, and loads their partitions' values, maxima
// and sums BATCH partitions at a time, all of a batch's loads issued before any is used, combining
// online (a larger maximum rescales what is summed so far). With the weights first, in a phase of
// their own, then the values a column pair and a batch at a time, the combining block took 5.5 us at
// 9 partitions and 10.2 at 31 from its shares to its end; this way 3.5 and 7.5 (H200, qwen2.5-1.5b
// batch 1 in a real run; every L2 round trip there takes over 1 us, queued behind the next
// kernels' early weight loads; bench/NOTES.md #101).
template <int WARPS>
__device__ __forceinline__ void split_combine(scalar_t* __restrict__ out, const DecodeSplit& split, i64 head0, int group,
                                              int num_parts, int pair) {
  constexpr int THREADS = 32 * WARPS, ITEMS = 2, BATCH = 8, QUADS = HEAD_DIM / 4;
  __shared__ int s_last;
  __syncthreads();  // every thread's share is written
  if (threadIdx.x == 0) s_last = split_arrive(&split.counters[pair], num_parts);
  __syncthreads();
  if (!s_last) return;
  for (int i0 = 0; i0 < group * QUADS; i0 += ITEMS * THREADS) {
    i64 row[ITEMS];  // the item's head's partition 0 in tmp_max / tmp_sum
    int col[ITEMS], live[ITEMS];  // live: partitions to load, 0 for an item past the end
    ShareCombine comb[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int idx = i0 + (int)threadIdx.x + it * THREADS, g = min(idx / QUADS, group - 1);
      row[it] = (head0 + g) * split.max_parts;
      col[it] = 4 * (idx % QUADS);
      live[it] = idx < group * QUADS ? num_parts : 0;
    }
    for (int q0 = 0; q0 < num_parts; q0 += BATCH) {
      float4 v[ITEMS][BATCH];
      float m[ITEMS][BATCH], s[ITEMS][BATCH];
#pragma unroll
      for (int it = 0; it < ITEMS; ++it)
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const bool ok = q0 + u < live[it];
          const i64 r = row[it] + q0 + u;
          v[it][u] = ok ? ld_cg4(split.tmp_out + r * HEAD_DIM + col[it]) : make_float4(0.f, 0.f, 0.f, 0.f);
          m[it][u] = ok ? ld_cg(split.tmp_max + r) : RVLLM_NEG_INF;
          s[it][u] = ok ? ld_cg(split.tmp_sum + r) : 0.f;
        }
#pragma unroll
      for (int it = 0; it < ITEMS; ++it)
        if (live[it] > 0) comb[it].add(m[it], s[it], v[it]);  // partition q0 has keys
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int idx = i0 + (int)threadIdx.x + it * THREADS;
      if (idx < group * QUADS) comb[it].store(out, head0 + idx / QUADS, col[it]);
    }
  }
}

// The cluster build's end, after every block has stored its shares (decode_tc): the barrier, then
// this block's items from its own shared memory, a thread an item, its partitions in turn. No block
// reads another's shared memory, so none needs to wait for the others before it leaves. (Reading
// the shares remotely after the barrier instead, each block having left them in its own memory,
// took 1.6-2 us after the barrier at batch 1 on an H200, bench/NOTES.md #102.)
template <int WARPS>
__device__ __forceinline__ void cluster_combine(scalar_t* __restrict__ out, const float* share, i64 head0, int group,
                                                int num_parts) {
  constexpr int THREADS = 32 * WARPS, QUADS = HEAD_DIM / 4;
  const int blocks = gridDim.z, rank = blockIdx.z, items = group * QUADS, per_rank = (items + blocks - 1) / blocks;
  cluster_arrive(true);
  cluster_wait();
  for (int j = threadIdx.x; j < per_rank && j * blocks + rank < items; j += THREADS) {
    // Online over the partitions, in a loop not unrolled: this tail runs once a launch, its code
    // fetched as it runs, and unrolled over every partition it took 1.3-1.4 us after the barrier at
    // 1,024 keys against 0.7 (H200, bench/NOTES.md #102).
    ShareCombine comb;
#pragma unroll 1
    for (int q = 0; q < num_parts; ++q) {
      const float4 v[1] = {*reinterpret_cast<const float4*>(share + (q * per_rank + j) * 4)};
      const float2 ml = *reinterpret_cast<const float2*>(share + DTC_CLUSTER_VALUES + (q * per_rank + j) * 2);
      const float m[1] = {ml.x}, s[1] = {ml.y};
      comb.add(m, s, v);
    }
    const int i = j * blocks + rank;
    comb.store(out, head0 + i / QUADS, 4 * (i % QUADS));
  }
}

template <int WARPS, int TILE, int STAGES, bool ROPE, int SPLIT = DTC_WHOLE>
__device__ __forceinline__ void decode_tc(DECODE_TC_PARAMS, const DecodeRope rope, const DecodeSplit split = DecodeSplit{}) {
  static_assert(TILE == 16 || TILE == 32, "whole 16-key k-steps of P @ V, at most a lane per key (slot_of)");
  static_assert(2 * STAGES * TILE * DTC_LD * 2 >= (16 * DTC_OLD + 32) * 4, "a warp's partials fit in its stages");
  extern __shared__ __align__(16) unsigned char dtc_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  // This warp's stages: [STAGES][TILE][DTC_LD] of K, then of V.
  scalar_t* s_k = reinterpret_cast<scalar_t*>(dtc_smem) + warp * 2 * STAGES * TILE * DTC_LD;
  scalar_t* s_v = s_k + STAGES * TILE * DTC_LD;
  const int kvh = blockIdx.x, tok = blockIdx.y;
  const int group = num_heads / num_kv_heads;  // <= 16 (the backend checks)
  float* share = cluster_share<SPLIT>();
  // The cluster build stores into other blocks' shared memory, which it may do only once they have
  // started: each block arrives as it starts and waits just before its first such store.
  if constexpr (SPLIT == DTC_SPLIT_CLUSTER) cluster_arrive(false);

  // The metadata chain reads only the step's inputs: before the wait (common.cuh).
  const int row_stride = row_stride_dev != nullptr ? *row_stride_dev : max_blocks_per_seq;
  int req, cached;
  const int ctx = query_context_len(query_start_loc, seq_lens, num_reqs, tok, &req, &cached);
  // The split builds: this block's keys start at key0; its row has num_parts partitions. The cluster
  // build sizes them from the row's context, in whole rounds of the warps' tiles, over the
  // cluster's gridDim.z blocks (so a graph's fixed grid spreads every context over all of them).
  constexpr int ROUND = WARPS * TILE;
  const int part_size = SPLIT == DTC_SPLIT_CLUSTER
                            ? max(1, (max(ctx, 0) + ROUND * (int)gridDim.z - 1) / (ROUND * (int)gridDim.z)) * ROUND
                            : split.part_size;
  const int key0 = SPLIT ? (int)blockIdx.z * part_size : 0;
  const int num_parts = SPLIT == DTC_SPLIT_L2 ? min((max(ctx, 0) + part_size - 1) / part_size, split.max_parts)
                        : SPLIT == DTC_SPLIT_CLUSTER ? (max(ctx, 0) + part_size - 1) / part_size : 1;
  const int key_end = SPLIT ? min(ctx, key0 + part_size) : ctx;  // this block's keys: [key0, key_end)
  const int* btab = block_tables + (req >= 0 ? (i64)req * row_stride : 0);
  const i64 slot_stride = (i64)num_kv_heads * HEAD_DIM;
  const i64 head0 = (i64)tok * num_heads + (i64)kvh * group;
  // The rope builds: the warp that copies the row's new key (key ctx - 1; warp 0 for a padding
  // row, which only writes its slot), and the cos/sin values this lane uses, before the wait
  // (the position and slot are the step's inputs, the table a constant).
  const int new_key = ctx - 1;
  const int writer = ROPE && new_key >= 0 ? (new_key / TILE) % WARPS : 0;
  float qcos[ROPE ? HEAD_DIM / 8 : 1], qsin[ROPE ? HEAD_DIM / 8 : 1], kcos[8], ksin[8];
  i64 new_slot = -1;
  if constexpr (ROPE) {
    const int pos = min(max(rope.positions[tok], 0), rope.max_pos - 1);  // never outside the table
    new_slot = rope.slot_mapping[tok];
    const float* cs = rope.cos_sin + (i64)pos * HEAD_DIM;
    // Query fragments: lane (g, c) holds columns ks * 16 + 2c + {0, 1} and + 8 + {0, 1}.
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 8; ++i) {
      if (rope.neox) {  // k-steps below HEAD_DIM / 32, each column with its own cos/sin
        const int col = (i >> 2) * 16 + 2 * c + ((i >> 1) & 1) * 8 + (i & 1);
        qcos[i] = cs[col];
        qsin[i] = cs[HEAD_DIM / 2 + col];
      } else {  // every k-step, a cos/sin per pair of columns
        const int pair = ((i >> 1) * 16 + 2 * c + (i & 1) * 8) >> 1;
        qcos[i] = cs[pair];
        qsin[i] = cs[HEAD_DIM / 2 + pair];
      }
    }
    if (warp == writer) new_kv_cos_sin(cs, lane, rope.neox, kcos, ksin);
  }

  // This warp's tiles: warp, warp + WARPS, ...; the i-th of them goes to stage i % STAGES.
  const int num_tiles = req >= 0 && key_end > key0 ? (key_end - key0 + TILE - 1) / TILE : 0;
  const int my_tiles = num_tiles > warp ? (num_tiles - warp + WARPS - 1) / WARPS : 0;

  // The keys' cache blocks, read from the block table a window of this warp's tiles at a time: lane
  // l holds entry l of a window (a tile's block, or one of its blocks when block_size < TILE), all
  // loaded together, the next window's while this one is used. A tile's slots are then a shuffle
  // and a multiply-add. (Read a tile ahead, each entry was a load issued behind the tiles' copies and
  // used at once, ncu's largest single stall at 256 rows; in a real run -0.6 us a launch, NOTES #81.)
  // block_size is a power of two (the backend checks).
  const int bs_shift = __ffs(block_size) - 1;
  const int e_shift = bs_shift < DTC_TILE_SHIFT(TILE) ? DTC_TILE_SHIFT(TILE) - bs_shift : 0;  // blocks a tile: 1 << e_shift
  const int w_shift = 5 - e_shift;                                                           // tiles a window: 1 << w_shift
  auto window_blocks = [&](int win) -> int {
    const int i = (win << w_shift) + (lane >> e_shift);
    const int key = key0 + (warp + i * WARPS) * TILE + ((lane & ((1 << e_shift) - 1)) << bs_shift);
    return i < my_tiles && key < ctx ? btab[key >> bs_shift] : 0;
  };
  int win = 0, blk_cur = window_blocks(0), blk_next = window_blocks(1);

  // Lane r < TILE's key of this warp's tile i: its cache slot (block * block_size + offset; -1 past
  // the context; int32 as slot_mapping is). Called for i = 0, 1, 2, ... in order (windows advance
  // one at a time), by the whole warp.
  auto slot_of = [&](int i) -> int {
    if ((i >> w_shift) != win) {
      ++win;
      blk_cur = blk_next;
      blk_next = window_blocks(win + 1);
    }
    const int r = lane % TILE, t = key0 + (warp + i * WARPS) * TILE + r;
    const int src = ((i & ((1 << w_shift) - 1)) << e_shift) + (r >> bs_shift);
    const int blk = __shfl_sync(0xffffffffu, blk_cur, src);
    if (ROPE && t == new_key) return -1;  // the rope builds put the new key into the stage themselves
    return t < key_end ? blk * block_size + (t & (block_size - 1)) : -1;
  };
  // A tile of K and V into stage `stage`: lane takes 16-byte chunks lane, lane + 32, ... (a
  // warp-wide copy is 512 contiguous bytes of a row pair at head size 128). The keys' cache slots
  // come from `slot_lanes` (lane r < TILE holds key r's slot), found an iteration ahead by slot_of,
  // once a key: a chunk's address is then a shuffle and a multiply-add. Keys past the context are
  // zero-filled: a NaN there would survive a zero probability.
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
  // Of the first STAGES - 1 tiles, those whose keys are all from earlier steps (below `cached`,
  // which no kernel of this step writes; the block tables may be read here, common.cuh) are copied
  // before the wait, so that their DRAM round trip overlaps the rotary kernel: in a decode step only
  // the tile holding the row's own new key waits. Tile by tile: a prefix of this warp's tiles (it was
  // all of them or none, and at batch 1 with 4 warps a context under 128 keys loaded nothing early).
  auto prologue_tile = [&](int s) {
    if (s < my_tiles) load_tile(s, slot_of(s));
    else cp_async_commit();  // an empty group keeps the wait counts uniform
  };
  int early = 0;  // such tiles are whole tiles inside the context, so s < my_tiles for each
  while (early < STAGES - 1 && key0 + (warp + early * WARPS + 1) * TILE <= cached) ++early;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < early) prologue_tile(s);
  pdl_enter();
  // The rope builds: the writer warp's new key and value, and their stash ([k | v]) for the copy of
  // the key's tile. Called after the tile copies are issued, and with the query loads in flight.
  scalar_t* s_new = nullptr;
  auto write_new_kv = [&](bool stash) {
    if constexpr (ROPE) {
      __shared__ __align__(16) scalar_t s_new_buf[2 * HEAD_DIM];
      s_new = s_new_buf;
      if (warp == writer) {
        const scalar_t* k_src = q + (i64)tok * rope.qkv_stride + ((i64)num_heads + kvh) * HEAD_DIM;
        const scalar_t* v_src = k_src + (i64)num_kv_heads * HEAD_DIM;
        scalar_t* k_dst = new_slot >= 0 ? rope.k_dst + new_slot * slot_stride + (i64)kvh * HEAD_DIM : nullptr;
        scalar_t* v_dst = new_slot >= 0 ? rope.v_dst + new_slot * slot_stride + (i64)kvh * HEAD_DIM : nullptr;
        new_kv(k_src, v_src, k_dst, v_dst, stash ? s_new : nullptr, lane, rope.neox, kcos, ksin);
        __syncwarp();
      }
    }
  };
  if (req < 0 || ctx <= 0) {  // a padding row: zeros (and its slot written, as rotary.cu would)
    write_new_kv(false);
    cp_async_wait<0>();
    if (!SPLIT || blockIdx.z == 0)
      for (int i = threadIdx.x; i < group * HEAD_DIM; i += 32 * WARPS) out[head0 * HEAD_DIM + i] = 0;
    return;
  }
  // Past the row's context: no keys, no count. (A cluster's block stays for the cluster's barriers,
  // with no tiles; the combine reads only the first num_parts shares.)
  if (SPLIT == DTC_SPLIT_L2 && (int)blockIdx.z >= num_parts) {
    cp_async_wait<0>();
    return;
  }
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s >= early) prologue_tile(s);  // in order after the early ones: group i is still tile i
  // The loop's first copy's slots. Found an iteration ahead rather than at the copy: slot_of is only
  // a shuffle now, but at batch 1 (1-3 tiles a warp) calling it at the copy cost 0.6% (NOTES #84).
  int slot_ahead = STAGES - 1 < my_tiles ? slot_of(STAGES - 1) : -1;

  // The query rows: row m is head kvh * group + m (rows >= group are zeros), as A fragments for
  // every k-step of 16 head dims.
  unsigned int qf[HEAD_DIM / 16][4];
  {
    const bool ok0 = g < group, ok1 = g + 8 < group;
    // The rope builds read the qkv product's rows: q's heads first, `qkv_stride` elements a token.
    const scalar_t* q_heads = ROPE ? q + (i64)tok * rope.qkv_stride + (i64)kvh * group * HEAD_DIM - head0 * HEAD_DIM : q;
    const scalar_t* q0 = q_heads + (head0 + (ok0 ? g : 0)) * HEAD_DIM;
    const scalar_t* q1 = q_heads + (head0 + (ok1 ? g + 8 : 0)) * HEAD_DIM;
#pragma unroll
    for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
      const int col = ks * 16 + 2 * c;
      qf[ks][0] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + col) : 0u;
      qf[ks][1] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + col) : 0u;
      qf[ks][2] = ok0 ? *reinterpret_cast<const unsigned int*>(q0 + col + 8) : 0u;
      qf[ks][3] = ok1 ? *reinterpret_cast<const unsigned int*>(q1 + col + 8) : 0u;
    }
  }
  write_new_kv(true);
  if constexpr (ROPE) {  // fragment register r holds row g (r even) or g + 8, columns + 8 when r >= 2
    if (rope.neox) {
#pragma unroll
      for (int ks = 0; ks < HEAD_DIM / 32; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int i = ks * 4 + (r >> 1) * 2;
          rotate_pairs2(qf[ks][r], qf[ks + HEAD_DIM / 32][r], qcos + i, qsin + i, qf[ks][r], qf[ks + HEAD_DIM / 32][r]);
        }
    } else {
#pragma unroll
      for (int ks = 0; ks < HEAD_DIM / 16; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) qf[ks][r] = rotate_interleaved(qf[ks][r], qcos[ks * 2 + (r >> 1)], qsin[ks * 2 + (r >> 1)]);
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
      slot_ahead = next + 1 < my_tiles ? slot_of(next + 1) : -1;
    } else {
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();  // this tile's group has landed (this lane's copies)
    __syncwarp();                 // ... and every other lane's
    scalar_t* sk = s_k + (i % STAGES) * TILE * DTC_LD;
    scalar_t* sv = s_v + (i % STAGES) * TILE * DTC_LD;
    if (ROPE && tile == new_key / TILE) {  // the writer warp: the new key's row from the stash
      const int r = new_key - tile * TILE;
      for (int idx = lane; idx < 2 * DTC_CHUNKS; idx += 32)
        *reinterpret_cast<uint4*>((idx < DTC_CHUNKS ? sk : sv) + r * DTC_LD + (idx % DTC_CHUNKS) * 8) =
            *reinterpret_cast<const uint4*>(s_new + idx * 8);
      __syncwarp();
    }

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
          const int key = key0 + tile * TILE + nt * 8 + 2 * c + e;
          s[nt][2 * h + e] = key < key_end ? s[nt][2 * h + e] * qk_scale : RVLLM_NEG_INF;
        }
    online_softmax_tile(s, row_max, row_sum, o_acc);

    pv_tile<TILE / 8, HEAD_DIM>(o_acc, s, sv, DTC_LD, lane);  // O += P V
    __syncwarp();  // every lane is done with this stage before the next iteration refills it
  }

  cp_async_wait<0>();
  if constexpr (WARPS == 1) {  // the warp's result is the output: lane (g, c) holds columns j * 8 + 2c, + 1
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = g + 8 * h;
      if (m < group) {
        const float inv = 1.f / row_sum[h];
        scalar_t* dst = out + (head0 + m) * HEAD_DIM + 2 * c;
#pragma unroll
        for (int j = 0; j < HEAD_DIM / 8; ++j)
          *reinterpret_cast<unsigned int*>(dst + j * 8) = pack2(o_acc[j][2 * h] * inv, o_acc[j][2 * h + 1] * inv);
      }
    }
    return;
  }
  // The warps' partial results (unnormalized O, max, sum per row) into shared memory, over this
  // warp's own (drained) tile stages; a warp that got no tile has max -inf, sum 0 and O 0.
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
  // A thread takes column pairs: (row m, columns 2p, 2p + 1) for idx = m * HEAD_DIM / 2 + p. The
  // loop is unrolled over a thread's pairs (16 rows x HEAD_DIM / 2 pairs at most, over the block's
  // threads) so that their shared loads are in flight together: element by element, one dependent
  // chain after another, this took ~1.7 us of a 256-row launch (session 20's clock probe, NOTES #85).
  const int per_warp = 2 * STAGES * TILE * DTC_LD;  // elements of scalar_t
  constexpr int PAIRS = HEAD_DIM / 2, MAX_ITERS = (16 * PAIRS + 32 * WARPS - 1) / (32 * WARPS);
  if (SPLIT == DTC_SPLIT_CLUSTER && num_parts > 1) cluster_wait();  // every block of the cluster has started
#pragma unroll
  for (int it = 0; it < MAX_ITERS; ++it) {
    const int idx = threadIdx.x + it * 32 * WARPS, m = idx / PAIRS, p = idx - m * PAIRS;
    if (m >= group) break;
    float mx = RVLLM_NEG_INF, ml[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      ml[w] = reinterpret_cast<const float*>(reinterpret_cast<const scalar_t*>(dtc_smem) + w * per_warp)[16 * DTC_OLD + m];
      mx = fmaxf(mx, ml[w]);
    }
    float o0 = 0.f, o1 = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float* ow = reinterpret_cast<const float*>(reinterpret_cast<const scalar_t*>(dtc_smem) + w * per_warp);
      const float wgt = exp2f(ml[w] - mx);  // 0 for a warp without tiles
      const float2 v = *reinterpret_cast<const float2*>(ow + m * DTC_OLD + 2 * p);
      o0 += wgt * v.x;
      o1 += wgt * v.y;
      l += wgt * ow[16 * DTC_OLD + 16 + m];
    }
    if (SPLIT == DTC_SPLIT_CLUSTER && (int)blockIdx.z >= num_parts) {
      // no keys: no share
    } else if (!SPLIT || num_parts == 1) {
      *reinterpret_cast<unsigned int*>(out + (head0 + m) * HEAD_DIM + 2 * p) = pack2(o0 / l, o1 / l);
    } else if (SPLIT == DTC_SPLIT_CLUSTER) {  // this partition's share, into the block that combines the item
      const int blocks = gridDim.z, i = m * (HEAD_DIM / 4) + (p >> 1);
      const int per_rank = (group * (HEAD_DIM / 4) + blocks - 1) / blocks, at = (int)blockIdx.z * per_rank + i / blocks;
      cluster_store2(share + at * 4 + (p & 1) * 2, i % blocks, make_float2(o0 / l, o1 / l));
      if ((p & 1) == 0) cluster_store2(share + DTC_CLUSTER_VALUES + at * 2, i % blocks, make_float2(mx, l));
    } else {  // this partition's share: normalized output, max (log2 units), sum
      const i64 row = (head0 + m) * split.max_parts + blockIdx.z;
      *reinterpret_cast<float2*>(split.tmp_out + row * HEAD_DIM + 2 * p) = make_float2(o0 / l, o1 / l);
      if (p == 0) {
        split.tmp_max[row] = mx;
        split.tmp_sum[row] = l;
      }
    }
  }
  if constexpr (SPLIT == DTC_SPLIT_L2) {
    if (num_parts > 1) split_combine<WARPS>(out, split, head0, group, num_parts, tok * num_kv_heads + kvh);
  } else if constexpr (SPLIT == DTC_SPLIT_CLUSTER) {
    if (num_parts > 1) cluster_combine<WARPS>(out, share, head0, group, num_parts);  // num_parts: one value a cluster
  }
}

// Entry points: warps per pair x keys per tile x tiles in flight per warp. More warps per pair for
// steps with fewer pairs per SM (the backend's choice, cuda_attention.decode_build).
#define DECODE_TC_ROPE_ARGS \
  DECODE_TC_ARGS, DecodeRope{k_new_dst, v_new_dst, qkv_stride, positions, slot_mapping, cos_sin, max_pos, neox}
#define DECODE_TC_ENTRY(W, T, S) \
  extern "C" __global__ void __launch_bounds__(32 * W) paged_attention_decode_tc_w##W##_t##T##_s##S##_kernel( \
      DECODE_TC_PARAMS) { \
    decode_tc<W, T, S, false>(DECODE_TC_ARGS, DecodeRope{}); \
  } \
  extern "C" __global__ void __launch_bounds__(32 * W) paged_attention_decode_tc_rope_w##W##_t##T##_s##S##_kernel( \
      DECODE_TC_ROPE_PARAMS) { \
    decode_tc<W, T, S, true>(DECODE_TC_ROPE_ARGS); \
  }
// One warp a pair with 32-key tiles where the pairs fill the SMs (no combine: on an H200 a real
// 256-way run's launches went from 20.6 to 19.2 us against the 2-warp 16-key build, NOTES #86); 4 warps
// a pair below that. See cuda_attention.tc_build.
DECODE_TC_ENTRY(1, 32, 3)
DECODE_TC_ENTRY(4, 16, 3)
// The same 4-warp build for steps of at most one pair per SM. The backend gives it the smallest
// shared-memory carveout that holds a block: left to the driver it took the largest (233 KB, for
// two blocks an SM), while the GEMVs around it run at 132 KB, and an SM changes its carveout only
// when empty, so every switch drained the SMs and undid the PDL overlap on both sides (NOTES #50).
extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_tc_w4_t16_s3_one_per_sm_kernel(DECODE_TC_PARAMS) {
  decode_tc<4, 16, 3, false>(DECODE_TC_ARGS, DecodeRope{});
}
// The 4-warp build split over the context (flash-decoding): grid (num_kv_heads, num_tokens,
// partitions) for small steps with long contexts (cuda_attention.decode_build), where a block per
// (row, KV head) left most SMs idle and each block one long chain of tiles. Each block's tiles of
// keys from earlier steps are copied before the PDL wait, as in the other builds.
extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_tc_split_w4_t16_s3_kernel(
    DECODE_TC_PARAMS, int* __restrict__ counters, float* __restrict__ tmp_out, float* __restrict__ tmp_max,
    float* __restrict__ tmp_sum, int max_parts, int part_size) {
  decode_tc<4, 16, 3, false, DTC_SPLIT_L2>(DECODE_TC_ARGS, DecodeRope{},
                                           DecodeSplit{counters, tmp_out, tmp_max, tmp_sum, max_parts, part_size});
}
// ... over a thread block cluster instead (sm_90): grid (num_kv_heads, num_tokens, blocks) in
// clusters of (1, 1, blocks), blocks <= DTC_CLUSTER_MAX (cuda_decode_tc.cluster_blocks).
extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_tc_cluster_w4_t16_s3_kernel(DECODE_TC_PARAMS) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  decode_tc<4, 16, 3, false, DTC_SPLIT_CLUSTER>(DECODE_TC_ARGS, DecodeRope{});
#else
  asm volatile("trap;");  // no clusters: the backend never launches it here
#endif
}
extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_tc_rope_w4_t16_s3_one_per_sm_kernel(
    DECODE_TC_ROPE_PARAMS) {
  decode_tc<4, 16, 3, true>(DECODE_TC_ROPE_ARGS);
}
