// Matrix products of decode-sized steps on Hopper's warpgroup tensor-core instructions (wgmma,
// sm_90a only; backend/cuda_wgmma.py routes steps of $RVLLM_WGMMA_ROWS rows here on compute
// capability 9.0, none by default: this kernel is correct but slower than cuBLAS, bench/NOTES.md #70):
//
//   out[rows, N] = x[rows, K] @ W[N, K]^T (+ bias)
//
// At 16-256 token rows cuBLAS runs these products well under both the read rate of the weights and
// the tensor cores' rate (bench/RESULTS.md, op times at 256 rows: qwen2.5-1.5b down 17.7 us for
// 7 GFLOP and 27.5 MB); an own kernel could also fuse the SiLU and the bias into its epilogue.
//
// Roles are swapped against the usual GEMM so that the token rows are wgmma's N: a block takes 128
// weight rows (A, two warpgroups of m64) against all of a tile's BN tokens (B, n = BN), so one copy
// of the weights serves every token and the accumulators (BN / 2 floats a thread) hold 128 outputs
// of BN tokens. K goes in 64-column tiles (one 128-byte row per matrix row) through STAGES
// shared-memory slots. One thread has the bulk tensor copy engine (TMA) fill them, in the 128-byte
// swizzle wgmma's descriptors name (16-byte chunk c of row r at chunk c ^ (r % 8), rows 128 bytes
// apart, groups of 8 rows 1024 bytes apart), with zeros for token rows past `rows`. (A first form
// with cp.async from every thread was held to ~44 GB/s an SM, ~1 us a K tile at 256 tokens, whatever
// the number of busy SMs: bench/NOTES.md #69.)
//
// Split K: gridDim.z blocks share an output tile, each taking `kps` K tiles. With one split the
// block writes `out` (+ bias). With more, each writes its fp32 sums to ws[split][rows][N] and
// gemm_wgmma_reduce adds the splits in order (+ bias): the result does not depend on which block
// finished first, and the summation is the same for every run. (A stream-K split, the K iterations
// of all tiles shared out evenly over one block an SM, was tried and was slower: bench/NOTES.md #71.)
//
// PDL: the weights of the first stages are requested before pdl_wait (no kernel of a step writes
// weights); x only after it.
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

#define WG_BM 128   // weight rows a block: two warpgroups of 64
#define WG_BK 64    // K columns a stage: 128 bytes a row, the swizzle's width
#define WG_THREADS 256

template <int BN, int STAGES>
__device__ __forceinline__ void gemm_wgmma_body(scalar_t* __restrict__ out, float* __restrict__ ws,
                                                const TensorMap& x_map, const TensorMap& w_map,
                                                const scalar_t* __restrict__ bias, int rows, int N, int K, int kps) {
  extern __shared__ unsigned char wg_smem_raw[];
  __shared__ unsigned long long full[STAGES];  // tile t of the slot has landed (phase t / STAGES)
  // wgmma's swizzle is on address bits, so every tile starts 1024-byte aligned.
  scalar_t* smem = reinterpret_cast<scalar_t*>((reinterpret_cast<unsigned long long>(wg_smem_raw) + 1023) & ~1023ull);
  constexpr int A_ELEMS = WG_BM * WG_BK, STAGE_ELEMS = (WG_BM + BN) * WG_BK;
  constexpr int STAGE_BYTES = STAGE_ELEMS * 2;
  // One wgmma group stays in flight across the barrier, so the slot refilled at tile t is that of
  // tile t - 2: tiles t + 1 .. t + STAGES - 2 are requested while tile t is multiplied.
  constexpr int AHEAD = STAGES - 2;
  const int n0 = blockIdx.x * WG_BM, t0 = blockIdx.y * BN;
  const int k_tiles = K / WG_BK;
  const int kt0 = blockIdx.z * kps, nk = max(0, min(k_tiles, kt0 + kps) - kt0);
  const bool issuer = threadIdx.x == 0;

  if (issuer) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) mbar_init(&full[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // visible to the copy engine
  }
  __syncthreads();
  if (issuer) {  // the weights of the first tiles before the wait: no kernel of a step writes weights
    for (int s = 0; s < AHEAD && s < nk; ++s) {
      mbar_expect(&full[s], STAGE_BYTES);
      tma_load(smem + s * STAGE_ELEMS, w_map, (kt0 + s) * WG_BK, n0, &full[s]);
    }
  }
  pdl_wait();
  if (issuer)
    for (int s = 0; s < AHEAD && s < nk; ++s)
      tma_load(smem + s * STAGE_ELEMS + A_ELEMS, x_map, (kt0 + s) * WG_BK, t0, &full[s]);

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  const int wg = threadIdx.x >> 7;
  for (int t = 0; t < nk; ++t) {
    mbar_wait(&full[t % STAGES], (t / STAGES) & 1);
    __syncthreads();  // both warpgroups are past tile t - 1's wait: tile t - 2's slot is no longer read
    const int nt = t + AHEAD;
    if (issuer && nt < nk) {
      scalar_t* st = smem + (nt % STAGES) * STAGE_ELEMS;
      mbar_expect(&full[nt % STAGES], STAGE_BYTES);
      tma_load(st, w_map, (kt0 + nt) * WG_BK, n0, &full[nt % STAGES]);
      tma_load(st + A_ELEMS, x_map, (kt0 + nt) * WG_BK, t0, &full[nt % STAGES]);
    }
    const scalar_t* st = smem + (t % STAGES) * STAGE_ELEMS;
    const unsigned int a_addr = smem_addr(st + wg * 64 * WG_BK), b_addr = smem_addr(st + A_ELEMS);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WG_BK / 16; ++kk) wgmma_m64k16<BN>(acc, wg_desc(a_addr + kk * 32), wg_desc(b_addr + kk * 32));
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  pdl_launch_dependents();

  // d[4j + e]: weight row n0 + 64 wg + 16 warp + l / 4 + 8 (e / 2), token t0 + 8j + 2 (l % 4) + (e % 2).
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int n_lo = n0 + wg * 64 + warp * 16 + (lane >> 2);
  const bool split = gridDim.z > 1;
  float* part = ws + (i64)blockIdx.z * rows * N;
  float b_lo = 0.f, b_hi = 0.f;
  if (!split && bias != nullptr) {
    if (n_lo < N) b_lo = to_f32(bias[n_lo]);
    if (n_lo + 8 < N) b_hi = to_f32(bias[n_lo + 8]);
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = n_lo + 8 * (e >> 1), tok = t0 + 8 * j + 2 * (lane & 3) + (e & 1);
      if (n < N && tok < rows) {
        if (split) part[(i64)tok * N + n] = acc[4 * j + e];
        else out[(i64)tok * N + n] = from_f32(acc[4 * j + e] + ((e >> 1) ? b_hi : b_lo));
      }
    }
  }
}

#define GEMM_WGMMA_ENTRY(BN, STAGES)                                                                          \
  extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) gemm_wgmma_n##BN(                              \
      scalar_t* __restrict__ out, float* __restrict__ ws, const __grid_constant__ TensorMap x_map,          \
      const __grid_constant__ TensorMap w_map, const scalar_t* __restrict__ bias, int rows, int N, int K, int kps) { \
    gemm_wgmma_body<BN, STAGES>(out, ws, x_map, w_map, bias, rows, N, K, kps);                                \
  }

// Stages: as many as ~192 KiB of shared memory holds (16 KiB of weights + BN x 128 bytes a stage).
// backend/cuda_wgmma.py's WGMMA_BUILDS must match.
GEMM_WGMMA_ENTRY(64, 8)
GEMM_WGMMA_ENTRY(128, 6)
GEMM_WGMMA_ENTRY(256, 4)

// out[t, n] = sum over splits s of ws[s, t, n] (in order of s) + bias[n]; 4 outputs a thread
// (N is a multiple of 128).
extern "C" __global__ void gemm_wgmma_reduce(scalar_t* __restrict__ out, const float* __restrict__ ws,
                                             const scalar_t* __restrict__ bias, int rows, int N, int splits) {
  pdl_wait();
  pdl_launch_dependents();
  const i64 quads = (i64)rows * N / 4;  // per split, and the stride from one split to the next
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < quads; i += (i64)gridDim.x * blockDim.x) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      const float4 p = __ldcg(reinterpret_cast<const float4*>(ws) + s * quads + i);
      v.x += p.x;
      v.y += p.y;
      v.z += p.z;
      v.w += p.w;
    }
    const int n = (int)((i * 4) % N);
    if (bias != nullptr) {
      v.x += to_f32(bias[n]);
      v.y += to_f32(bias[n + 1]);
      v.z += to_f32(bias[n + 2]);
      v.w += to_f32(bias[n + 3]);
    }
    uint2 o;
    o.x = pack2(v.x, v.y);
    o.y = pack2(v.z, v.w);
    reinterpret_cast<uint2*>(out)[i] = o;
  }
}
