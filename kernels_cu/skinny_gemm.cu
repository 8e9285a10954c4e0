// Matrix products of decode steps of 3-16 token rows on Hopper (sm_90a; backend/cuda_skinny.py
// routes steps of $RVLLM_SKINNY_ROWS rows here on compute capability 9.0, none by default):
//
//   out[rows, N] = x[rows, K] @ W[N, K]^T (+ bias)                          skinny_gemm_n{8,16}
//   out[rows, I] = silu(x @ Wg^T) * (x @ Wu^T), W = [Wg; Wu] ([2I, K])      skinny_gemm_silu_n{8,16}
//
// At these rows a product costs what reading its weights costs; the arithmetic (tokens as the n of
// wgmma, 8 or 16) is nothing. What the other kernels lose there (bench/NOTES.md #108): cuBLAS shapes
// its tiles so that only part of the SMs read (qwen2.5-1.5b's gate_up at 8 rows: 93 blocks of 192
// weight rows on 132 SMs, ~3.2 TB/s), and gemv_tc.cu holds its loads in registers, 12 warps an SM,
// latency-bound. Here the bulk tensor copy engine (TMA) streams the weights into shared memory,
// SK_STAGES tiles of 8 KiB a block in flight and two blocks an SM, and the work is shared out evenly:
//
// A tile is 64 weight rows (SILU: 32 gate rows and the same 32 up rows, so that one tile has both
// halves of its outputs) by all of K in 64-column steps. The tiles' K steps, laid end to end, are
// `total` = tiles x k_steps iterations; block b of G takes iterations [b total / G, (b+1) total / G)
// ("stream-K"), so every block reads the same bytes whatever the shape. A tile that one block
// covers whole it finishes itself. A tile shared by several blocks: each writes its fp32 partial
// sums to ws (slot 0 for its first tile, 1 for its last), and the last to arrive (split_arrive)
// adds them in block order -- the sum does not depend on which block finished first -- and
// finishes the tile.
//
// Off by default: that hand-over is what it loses. The stream itself runs at ~4.2 TB/s (a copy
// without the hand-over, timing only, was ahead of every default path), but the partials, the
// fence, the counter and the last block's reads come at the end of every block, on the launch's
// critical path: ~3.5-4 us a launch (H200, NOTES #108).
//
// Shared memory: per stage the weight tile (64 rows of 128 bytes) and the token tile (BN rows of
// 128 bytes, zeros past `rows` from the copy engine), both in the 128-byte swizzle that wgmma's
// descriptors name. Lane 0 of a fifth warp issues the copies, STAGES ahead, refilling a slot once
// the warpgroup's four warps have arrived on its `empty` barrier; the warpgroup multiplies (4 wgmma
// of k16 a stage, each stage's group waited on before its slot is released: keeping one group in
// flight, or 12 stages, measured slower; 4 and 6 stages level).
//
// PDL: the weights of the first stages are requested before pdl_wait (no kernel of a step writes
// weights); the tokens, ws and the counters only after it.
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define SK_BM 64        // weight rows a tile: one warpgroup's m64
#define SK_BK 64        // K columns a stage: 128 bytes a row, the swizzle's width
#define SK_CONSUMERS 128            // one warpgroup multiplies
#define SK_THREADS (SK_CONSUMERS + 32)  // and one more warp issues the copies
#define SK_STAGES_N8 8   // backend/cuda_skinny.py's SK_STAGES must match
#define SK_STAGES_N16 8

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// A barrier of the consumer warps only (the copy warp has its own loop, or has left).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(SK_CONSUMERS) : "memory"); }

// First iteration of block b (int arithmetic: the wrapper keeps total x blocks under 2^31; a 64-bit
// division is a long emulated sequence, and thread 0 issuing the copies sits on every warp's path).
__device__ __forceinline__ int sk_start(int b, int total, int blocks) { return b * total / blocks; }
// The block whose iterations include iteration i: the largest b with sk_start(b) <= i.
__device__ __forceinline__ int sk_block_of(int i, int total, int blocks) { return ((i + 1) * blocks + total - 1) / total - 1; }

template <int BN, int STAGES, bool SILU>
__device__ __forceinline__ void skinny_body(scalar_t* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters,
                                            const TensorMap& x_map, const TensorMap& w_map,
                                            const scalar_t* __restrict__ bias, int rows, int n_out, int k_steps,
                                            int tiles, int up_row0) {
  extern __shared__ unsigned char sk_smem_raw[];
  __shared__ unsigned long long full[STAGES];   // the slot's iteration has landed (phase i / STAGES)
  __shared__ unsigned long long empty[STAGES];  // the consumer warps are done with the slot's iteration
  __shared__ float sums[SK_BM][BN + 1];           // a finished tile's fp32 outputs (padded: no bank conflicts)
  __shared__ int last_flag;
  constexpr int A_BYTES = SK_BM * SK_BK * 2, B_BYTES = BN * SK_BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
  constexpr int HALF = SK_BM / 2;  // rows of one copy (the tensor map's box)
  // wgmma's swizzle is on address bits, so every tile starts 1024-byte aligned.
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<unsigned long long>(sk_smem_raw) + 1023) & ~1023ull);
  const int b = blockIdx.x, blocks = gridDim.x, tid = threadIdx.x;
  const int total = tiles * k_steps;
  const int it0 = sk_start(b, total, blocks);
  const int n_it = sk_start(b + 1, total, blocks) - it0;
  const int first_tile = it0 / k_steps;
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
    tma_load(st, w_map, ks * SK_BK, r0, &full[slot]);
    tma_load(st + HALF * SK_BK * 2, w_map, ks * SK_BK, r1, &full[slot]);
  };
  auto load_x = [&](int slot, int ks) {
    tma_load(smem + slot * STAGE_BYTES + A_BYTES, x_map, ks * SK_BK, 0, &full[slot]);
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
    return;
  }
  pdl_wait();

  const int lane = tid & 31, warp = tid >> 5;
  // acc[4j + e]: tile row 16 warp + lane / 4 + 8 (e / 2), token 8j + 2 (lane % 4) + (e % 2).
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  // The tile's outputs from `sums`: bias added (plain) or silu(gate) * up (SILU); consecutive
  // threads take consecutive columns of a token row.
  auto epilogue = [&](int tile) {
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
  };
  // The accumulators hold this block's share of `tile`: finish it, or hand the share over.
  auto finish_tile = [&](int tile) {
    const int lo = tile * k_steps;
    const int b_first = sk_block_of(lo, total, blocks), b_last = sk_block_of(lo + k_steps - 1, total, blocks);
    const int r_lo = 16 * warp + (lane >> 2);
    if (b_first == b_last) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sums[r_lo + 8 * (e >> 1)][8 * j + 2 * (lane & 3) + (e & 1)] = acc[4 * j + e];
      consumers_sync();
      epilogue(tile);
      consumers_sync();  // sums is free again
      return;
    }
    float* part = ws + ((i64)b * 2 + (tile == first_tile ? 0 : 1)) * SK_BM * BN;  // [row][token]
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(part + (r_lo + 8 * h) * BN + 8 * j + 2 * (lane & 3)) =
            make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    consumers_sync();
    if (tid == 0) last_flag = split_arrive(&counters[tile], b_last - b_first + 1);
    consumers_sync();
    if (!last_flag) return;
    // Block b_first's share is in its slot 1 unless the tile is its first; the others start here.
    const float* first = ws + ((i64)b_first * 2 + (sk_start(b_first, total, blocks) == lo ? 0 : 1)) * SK_BM * BN;
    for (int idx = tid; idx < SK_BM * BN; idx += SK_CONSUMERS) {
      float v = ld_cg(first + idx);
      for (int c = b_first + 1; c <= b_last; ++c) v += ld_cg(ws + (i64)c * 2 * SK_BM * BN + idx);
      sums[idx / BN][idx % BN] = v;
    }
    consumers_sync();
    epilogue(tile);
    consumers_sync();
  };

  int c_tile = first_tile, c_ks = it0 % k_steps;  // the iteration the warpgroup multiplies
  for (int i = 0; i < n_it; ++i) {
    const int slot = i % STAGES;
    mbar_wait(&full[slot], (i / STAGES) & 1);
    const unsigned int a_addr = smem_addr(smem + slot * STAGE_BYTES), b_addr = a_addr + A_BYTES;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < SK_BK / 16; ++kk) wgmma_m64k16<BN>(acc, wg_desc(a_addr + kk * 32), wg_desc(b_addr + kk * 32));
    wgmma_commit();
    wgmma_wait<0>();
    if (lane == 0) mbar_arrive(&empty[slot]);  // this warp is done with the slot
    const bool tile_end = c_ks == k_steps - 1 || i + 1 == n_it;
    if (i + 1 == n_it) pdl_launch_dependents();  // the next kernel's weights may come in behind the last tile
    if (tile_end) {
      finish_tile(c_tile);
#pragma unroll
      for (int q = 0; q < BN / 2; ++q) acc[q] = 0.f;
    }
    advance(c_tile, c_ks);
  }
  if (n_it == 0) pdl_launch_dependents();
}

#define SKINNY_ENTRY(FORM, BN, STAGES, SILU)                                                              \
  extern "C" __global__ void __launch_bounds__(SK_THREADS, 2) skinny_gemm##FORM##_n##BN(                \
      scalar_t* __restrict__ out, float* __restrict__ ws, int* __restrict__ counters,                     \
      const __grid_constant__ TensorMap x_map, const __grid_constant__ TensorMap w_map,                   \
      const scalar_t* __restrict__ bias, int rows, int n_out, int k_steps, int tiles, int up_row0) {       \
    skinny_body<BN, STAGES, SILU>(out, ws, counters, x_map, w_map, bias, rows, n_out, k_steps, tiles, up_row0); \
  }

// backend/cuda_skinny.py's SKINNY_TOKENS must match the token tiles here.
SKINNY_ENTRY(, 8, SK_STAGES_N8, false)
SKINNY_ENTRY(, 16, SK_STAGES_N16, false)
SKINNY_ENTRY(_silu, 8, SK_STAGES_N8, true)
SKINNY_ENTRY(_silu, 16, SK_STAGES_N16, true)
