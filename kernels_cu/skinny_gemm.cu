// Matrix products of decode steps of 3-16 token rows on Hopper (sm_90a; backend/cuda_skinny.py routes
// them here on compute capability 9.0; $RVLLM_SKINNY_ROWS sets the rows):
//
//   out[rows, N] = x[rows, K] @ W[N, K]^T (+ bias)                          skinny_gemm_n{8,16}
//   out[rows, I] = silu(x @ Wg^T) * (x @ Wu^T), W = [Wg; Wu] ([2I, K])      skinny_gemm_silu_n{8,16}
//
// At these rows a product costs what reading its weights costs; the arithmetic (tokens as the n of
// wgmma, 8 or 16) is nothing. What the other kernels lose there (bench/NOTES.md #108): cuBLAS shapes
// its tiles so that only part of the SMs read (qwen2.5-1.5b's gate_up at 8 rows: 93 blocks of 192
// weight rows on 132 SMs, ~3.2 TB/s), and gemv_tc.cu holds its loads in registers, 12 warps an SM,
// latency-bound. Here the bulk tensor copy engine (TMA) streams the weights into shared memory,
// STAGES steps of 32 KiB a block in flight, and the work is shared out evenly:
//
// A tile is 64 weight rows (SILU: 32 gate rows and the same 32 up rows, so that one tile has both
// halves of its outputs) by all of K in steps of SK_KSUB x 64 columns. The grid is thread block
// clusters of 2, 4 or 8 blocks (the wrapper picks the size per product: each cluster takes whole
// tiles, so the size sets how evenly tiles spread over the SMs); cluster c of C takes tiles
// [c tiles / C, (c+1) tiles / C), whose K steps laid end to end its blocks share evenly ("stream-K"
// inside the cluster). A tile that one block covers whole it finishes itself. A tile shared by
// several blocks is finished by the one holding its first K steps, for which it is the last tile:
// the others store their fp32 shares into its shared memory (distributed shared memory,
// recv[rank]), and after the cluster's barrier it adds them in rank order -- the same sum every run
// -- and finishes the tile. (A first form shared all the tiles' K steps over the whole grid and
// handed split tiles over through global memory -- partials, a fence, a counter, the last block's
// reads: ~3.5-4 us at the end of every launch, slower than cuBLAS; #108.)
//
// Shared memory: per stage SK_KSUB weight sub-tiles (64 rows of 128 bytes) and as many token
// sub-tiles (BN rows of 128 bytes, zeros past `rows` or K from the copy engine), all in the 128-byte
// swizzle that wgmma's descriptors name. A step reads 512 contiguous bytes of each weight row: with
// 128 (one sub-tile a stage, 8 stages, two blocks an SM) llama-3.1-8b's products at 8 rows took
// 3-26% longer, with 128 at 20 stages and one block an SM longer still (#110). Lane 0 of a fifth warp issues the copies, STAGES ahead, refilling a slot once the
// warpgroup's four warps have arrived on its `empty` barrier; the warpgroup multiplies (4 wgmma of
// k16 a sub-tile, each stage's group waited on before its slot is released: keeping one group in
// flight measured slower).
//
// PDL: the weights of the first stages are requested before pdl_wait (no kernel of a step writes
// weights); the tokens only after it.
#include "common.cuh"
#include "cluster.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define SK_BM 64        // weight rows a tile: one warpgroup's m64
#define SK_BK 64        // K columns of one copy: 128 bytes a row, the swizzle's width
#define SK_KSUB 4       // copies of SK_BK columns a stage: a K step; backend/cuda_skinny.py's KSUB
#define SK_CONSUMERS 128            // one warpgroup multiplies
#define SK_THREADS (SK_CONSUMERS + 32)  // and one more warp issues the copies
#define SK_STAGES_N8 5   // backend/cuda_skinny.py's SK_STAGES must match
#define SK_STAGES_N16 4
#define SK_CLUSTER_MAX 8  // blocks a cluster at most (the portable size); backend/cuda_skinny.py's CLUSTER_SIZES

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// A barrier of the consumer warps only (the copy warp has its own loop).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(SK_CONSUMERS) : "memory"); }

// The first iteration of share s of n over `total` iterations (int arithmetic: the wrapper keeps the
// products under 2^31).
__device__ __forceinline__ int sk_start(int s, int total, int n) { return s * total / n; }
// The share whose iterations include iteration i: the largest s with sk_start(s) <= i.
__device__ __forceinline__ int sk_share_of(int i, int total, int n) { return ((i + 1) * n + total - 1) / total - 1; }

template <int BN, int STAGES, bool SILU>
__device__ __forceinline__ void skinny_body(scalar_t* __restrict__ out, const TensorMap& x_map, const TensorMap& w_map,
                                            const scalar_t* __restrict__ bias, int rows, int n_out, int k_steps,
                                            int tiles, int up_row0) {
  extern __shared__ unsigned char sk_smem_raw[];
  __shared__ unsigned long long full[STAGES];   // the slot's iteration has landed (phase i / STAGES)
  __shared__ unsigned long long empty[STAGES];  // the consumer warps are done with the slot's iteration
  __shared__ float sums[SK_BM][BN + 1];         // a finished tile's fp32 outputs (padded: no bank conflicts)
  __shared__ __align__(16) float recv[SK_CLUSTER_MAX][SK_BM * BN];  // the split tile this block finishes: rank r's share
  // A stage: SK_KSUB weight sub-tiles of SK_BM x SK_BK, then as many token sub-tiles of BN x SK_BK.
  constexpr int A_SUB = SK_BM * SK_BK * 2, B_SUB = BN * SK_BK * 2;
  constexpr int A_BYTES = SK_KSUB * A_SUB, STAGE_BYTES = A_BYTES + SK_KSUB * B_SUB;
  constexpr int HALF = SK_BM / 2;  // rows of one copy (the tensor map's box)
  // wgmma's swizzle is on address bits, so every tile starts 1024-byte aligned.
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<unsigned long long>(sk_smem_raw) + 1023) & ~1023ull);
  const int tid = threadIdx.x;
  // Cluster c of the grid's clusters takes whole tiles [t0, t1); its blocks share their K steps.
  const int rank = (int)cluster_rank(), cs = (int)cluster_blocks(), clusters = gridDim.z / cs, c = blockIdx.z / cs;
  const int t0 = sk_start(c, tiles, clusters), t1 = sk_start(c + 1, tiles, clusters);
  const int base = t0 * k_steps, total = (t1 - t0) * k_steps;
  const int it0 = base + sk_start(rank, total, cs);
  const int n_it = base + sk_start(rank + 1, total, cs) - it0;
  const int first_tile = it0 / k_steps;
  // Ranks holding tile t's first and last K steps (the first one finishes it).
  auto first_rank = [&](int t) { return sk_share_of(t * k_steps - base, total, cs); };
  auto last_rank = [&](int t) { return sk_share_of((t + 1) * k_steps - 1 - base, total, cs); };
  // Positions (tile, K step) move by one iteration at a time, without divisions.
  auto advance = [&](int& tile, int& ks) {
    if (++ks == k_steps) {
      ks = 0;
      ++tile;
    }
  };

  // The weight rows of a tile's two 32-row boxes: rows r and r + 32 of the tile, or for SILU the
  // tile's gate rows and its up rows.
  auto load_w = [&](int slot, int tile, int ks) {
    unsigned char* st = smem + slot * STAGE_BYTES;
    const int r0 = SILU ? tile * HALF : tile * SK_BM, r1 = SILU ? up_row0 + tile * HALF : tile * SK_BM + HALF;
#pragma unroll
    for (int j = 0; j < SK_KSUB; ++j) {
      tma_load(st + j * A_SUB, w_map, (ks * SK_KSUB + j) * SK_BK, r0, &full[slot]);
      tma_load(st + j * A_SUB + HALF * SK_BK * 2, w_map, (ks * SK_KSUB + j) * SK_BK, r1, &full[slot]);
    }
  };
  auto load_x = [&](int slot, int ks) {
#pragma unroll
    for (int j = 0; j < SK_KSUB; ++j)
      tma_load(smem + slot * STAGE_BYTES + A_BYTES + j * B_SUB, x_map, (ks * SK_KSUB + j) * SK_BK, 0, &full[slot]);
  };

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], SK_CONSUMERS / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();
  cluster_arrive(true);  // this block has started: the others may store into its recv (after their wait)
  if (tid >= SK_CONSUMERS) {  // the copy warp: its lane 0 keeps STAGES iterations requested
    if (tid == SK_CONSUMERS) {
      const int pre = min(STAGES, n_it);
      int tile = first_tile, ks = it0 % k_steps;
      for (int s = 0; s < pre; ++s) {
        mbar_expect(&full[s], STAGE_BYTES);
        load_w(s, tile, ks);
        advance(tile, ks);
      }
      pdl_wait();
      int x_tile = first_tile, x_ks = it0 % k_steps;
      for (int s = 0; s < pre; ++s) {
        load_x(s, x_ks);
        advance(x_tile, x_ks);
      }
      for (int i = STAGES; i < n_it; ++i) {
        const int slot = i % STAGES;
        mbar_wait(&empty[slot], ((i / STAGES) + 1) & 1);  // its use at i - STAGES is over
        mbar_expect(&full[slot], STAGE_BYTES);
        load_w(slot, tile, ks);
        load_x(slot, ks);
        advance(tile, ks);
      }
    } else {
      pdl_wait();
    }
    __syncwarp();
    pdl_launch_dependents();
    cluster_wait();  // the two cluster barriers, as the consumers pass them
    cluster_arrive(true);
    cluster_wait();
    return;
  }
  pdl_wait();

  const int lane = tid & 31, warp = tid >> 5;
  const int r_lo = 16 * warp + (lane >> 2);  // acc[4j + e]: tile row r_lo + 8 (e / 2), token 8j + 2 (lane % 4) + (e % 2)
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  // The tile's outputs from `sums`: bias added (plain) or silu(gate) * up (SILU); consecutive
  // threads take consecutive columns of a token row.
  auto epilogue = [&](int tile) {
    consumers_sync();
    if (SILU) {
      for (int idx = tid; idx < HALF * BN; idx += SK_CONSUMERS) {
        const int tok = idx / HALF, r = idx % HALF, n = tile * HALF + r;
        const float g = sums[r][tok], u = sums[HALF + r][tok];
        if (tok < rows && n < n_out) out[(i64)tok * n_out + n] = from_f32(g / (1.f + expf(-g)) * u);  // as silu_and_mul_kernel
      }
    } else {
      for (int idx = tid; idx < SK_BM * BN; idx += SK_CONSUMERS) {
        const int tok = idx / SK_BM, r = idx % SK_BM, n = tile * SK_BM + r;
        if (tok < rows && n < n_out)
          out[(i64)tok * n_out + n] = from_f32(sums[r][tok] + (bias != nullptr ? to_f32(bias[n]) : 0.f));
      }
    }
    consumers_sync();  // sums is free again
  };
  auto acc_to_sums = [&]() {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) sums[r_lo + 8 * (e >> 1)][8 * j + 2 * (lane & 3) + (e & 1)] = acc[4 * j + e];
  };

  bool started_seen = false;  // this thread has passed the wait of the cluster's first barrier
  int owned = -1;             // the split tile this block finishes after the last barrier
  int c_tile = first_tile, c_ks = it0 % k_steps;  // the iteration the warpgroup multiplies
  for (int i = 0; i < n_it; ++i) {
    const int slot = i % STAGES;
    mbar_wait(&full[slot], (i / STAGES) & 1);
    const unsigned int a_addr = smem_addr(smem + slot * STAGE_BYTES), b_addr = a_addr + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < SK_KSUB; ++j)
#pragma unroll
      for (int kk = 0; kk < SK_BK / 16; ++kk)
        wgmma_m64k16<BN>(acc, wg_desc(a_addr + j * A_SUB + kk * 32), wg_desc(b_addr + j * B_SUB + kk * 32));
    wgmma_commit();
    wgmma_wait<0>();
    if (lane == 0) mbar_arrive(&empty[slot]);  // this warp is done with the slot
    if (i + 1 == n_it) pdl_launch_dependents();  // the next kernel's weights may come in behind the last tile
    if (c_ks == k_steps - 1 || i + 1 == n_it) {
      const int fr = first_rank(c_tile);
      if (fr == rank && last_rank(c_tile) == rank) {  // whole: finish it now
        acc_to_sums();
        epilogue(c_tile);
      } else if (fr == rank) {  // this block's last tile, begun here: finished after the last barrier
        owned = c_tile;
        break;  // acc stays as it is
      } else {  // begun by rank fr: this share goes into its recv[rank]
        if (!started_seen) cluster_wait();
        started_seen = true;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            cluster_store2(&recv[rank][(r_lo + 8 * h) * BN + 8 * j + 2 * (lane & 3)], fr,
                            make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]));
      }
#pragma unroll
      for (int q = 0; q < BN / 2; ++q) acc[q] = 0.f;
    }
    advance(c_tile, c_ks);
  }
  if (n_it == 0) pdl_launch_dependents();
  if (!started_seen) cluster_wait();
  cluster_arrive(true);  // every share stored into another block is visible after the wait
  cluster_wait();
  if (owned >= 0) {  // own share first, then ranks fr + 1 .. last in order: the same sum every run
    const int lr = last_rank(owned);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int idx = (r_lo + 8 * (e >> 1)) * BN + 8 * j + 2 * (lane & 3) + (e & 1);
        float v = acc[4 * j + e];
        for (int r = rank + 1; r <= lr; ++r)
          if (sk_start(r + 1, total, cs) > sk_start(r, total, cs)) v += recv[r][idx];  // empty shares stored nothing
        acc[4 * j + e] = v;
      }
    acc_to_sums();
    epilogue(owned);
  }
}

#define SKINNY_ENTRY(FORM, BN, STAGES, SILU)                                                              \
  extern "C" __global__ void __launch_bounds__(SK_THREADS, 1) skinny_gemm##FORM##_n##BN(                \
      scalar_t* __restrict__ out, const __grid_constant__ TensorMap x_map,                              \
      const __grid_constant__ TensorMap w_map, const scalar_t* __restrict__ bias, int rows, int n_out,    \
      int k_steps, int tiles, int up_row0) {                                                            \
    skinny_body<BN, STAGES, SILU>(out, x_map, w_map, bias, rows, n_out, k_steps, tiles, up_row0);          \
  }

// backend/cuda_skinny.py's SKINNY_TOKENS must match the token tiles here.
SKINNY_ENTRY(, 8, SK_STAGES_N8, false)
SKINNY_ENTRY(, 16, SK_STAGES_N16, false)
SKINNY_ENTRY(_silu, 8, SK_STAGES_N8, true)
SKINNY_ENTRY(_silu, 16, SK_STAGES_N16, true)
