// What the small-batch products share: the 16-byte weight stream, unpacking, the add + RMSNorm
// prologue that stages the normed rows in shared memory, and the PDL entry (gemv.cu, gemv_tc.cu).
#pragma once
#include "common.cuh"

// 16 bytes of weights that are read once: bypass L1 (the activations stay there). volatile keeps
// the load where it is written: without it the compiler may sink a prefetch to its first use.
__device__ __forceinline__ uint4 load_stream(const scalar_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ void unpack8(const uint4 u, float* f) {
  const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = to_f32((scalar_t)(w[i] & 0xffffu));
    f[2 * i + 1] = to_f32((scalar_t)(w[i] >> 16));
  }
}

// The shared prologue: stages rows m < rows of the normed input in shared memory (zeros for
// padding rows); block 0 also stores the sum into s_out when b is given. Returns after a barrier.
//
// It sits between the wait and the first product, so its latency is the kernel's: a thread takes
// whole 16-byte chunks (at most NORM_CHUNKS of them, the wrapper checks K <= 8 * NORM_CHUNKS *
// threads) and issues all its loads of a row before using any, so a row costs one round trip to
// L2. (One 2-byte element per iteration was a chain of K / threads dependent loads: ~5 us of a 7b
// product, bench/NOTES.md #18.) Its norm weights are prefetched before the PDL wait (NormWeights)
// and loaded with a and b. a, b and s_out are 16-byte aligned.
//
// bf16: the row's 1 / rms is left out of the staged values (xs = s * w_norm) and applied to the
// products' sums instead (the product is linear in its input), so the prologue needs no block-wide
// sum before it stages: each warp leaves its share of the sum of squares in shared memory, the one
// barrier that publishes xs publishes them too, and the function returns this lane's row's 1 / rms
// (lane m finishes row m's outputs, gemv.cu / gemv_rope.cu). The rounding point moves from
// s * inv_rms * w to s * w: one bf16 rounding either way, and bf16 has float32's range.
// fp16: s * w could overflow where the normed value does not (a residual of a few thousand in a
// channel with a large norm weight), so the rows are normed before staging, after a block-wide
// sum, and the function returns 1 (the unfused path's rounding).
#define NORM_CHUNKS 4
#if defined(RVLLM_BF16)
#define NORM_DEFERRED 1
#else
#define NORM_DEFERRED 0
#endif
__device__ __forceinline__ uint4 add8(const uint4 x, const uint4 y) {  // rounded per element, as the unfused add
  const unsigned int xw[4] = {x.x, x.y, x.z, x.w}, yw[4] = {y.x, y.y, y.z, y.w};
  unsigned int sw[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const scalar_t lo = from_f32(to_f32((scalar_t)(xw[i] & 0xffffu)) + to_f32((scalar_t)(yw[i] & 0xffffu)));
    const scalar_t hi = from_f32(to_f32((scalar_t)(xw[i] >> 16)) + to_f32((scalar_t)(yw[i] >> 16)));
    sw[i] = (unsigned int)lo | ((unsigned int)hi << 16);
  }
  return make_uint4(sw[0], sw[1], sw[2], sw[3]);
}
__device__ __forceinline__ float sum_squares8(const uint4 s) {
  float f[8], ss = 0.f;
  unpack8(s, f);
#pragma unroll
  for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
  return ss;
}

// A chunk of 8 summed values scaled by the row's 1 / rms and the norm weights `w`, rounded as the
// norm kernels round (inv_rms = 1: the deferred form's s * w, exactly).
__device__ __forceinline__ uint4 scale8(const uint4 x, const uint4 w, float inv_rms) {
  float xf[8], wf[8];
  unpack8(x, xf);
  unpack8(w, wf);
  return make_uint4(pack2(xf[0] * inv_rms * wf[0], xf[1] * inv_rms * wf[1]),
                    pack2(xf[2] * inv_rms * wf[2], xf[3] * inv_rms * wf[3]),
                    pack2(xf[4] * inv_rms * wf[4], xf[5] * inv_rms * wf[5]),
                    pack2(xf[6] * inv_rms * wf[6], xf[7] * inv_rms * wf[7]));
}
// The same, in place, with w from memory (gemv_tc.cu's prologue).
__device__ __forceinline__ void rms_scale8(uint4* x, const scalar_t* __restrict__ w, float inv_rms) {
  *x = scale8(*x, *reinterpret_cast<const uint4*>(w), inv_rms);
}

// The norm weights, requested towards L1 before the PDL wait (weights: no kernel writes them), so
// that the prologue's loads of them, issued with a's and b's, hit L1. (Held in registers across
// the wait instead, they made the 2-row and 4-row forms spill.)
struct NormWeights {
  const scalar_t* __restrict__ w;

  __device__ __forceinline__ void prefetch(int K) const {
#pragma unroll
    for (int u = 0; u < NORM_CHUNKS; ++u) {
      const int c = threadIdx.x + u * blockDim.x;
      if (c < (K >> 3)) asm volatile("prefetch.global.L1 [%0];" ::"l"(w + c * 8));
    }
  }
};

#define GEMV_MAX_WARPS 8  // warps of a block (the small-batch products' launch bounds)

template <int M>
__device__ __forceinline__ float stage_add_norm(scalar_t* xs, scalar_t* s_out, const scalar_t* __restrict__ a,
                                                const scalar_t* __restrict__ b, const NormWeights& nw, float eps,
                                                int rows, int K) {
  const bool store = b != nullptr && s_out != nullptr && blockIdx.x == 0;
  const int chunks = K >> 3, lane = threadIdx.x & 31;
#if NORM_DEFERRED
  __shared__ float ss_part[M][GEMV_MAX_WARPS];  // row m's sum of squares, by warp
#endif
#pragma unroll 1
  for (int m = 0; m < M; ++m) {  // `rows` is uniform over the block: every thread takes the same rows
    const i64 row = (i64)m * K;
    float ss = 0.f;
    uint4 sv[NORM_CHUNKS], wv[NORM_CHUNKS];
#pragma unroll
    for (int u = 0; u < NORM_CHUNKS; ++u) sv[u] = wv[u] = make_uint4(0, 0, 0, 0);
    if (m < rows) {
      uint4 bv[NORM_CHUNKS];
#pragma unroll
      for (int u = 0; u < NORM_CHUNKS; ++u) {  // every load first
        const int c = threadIdx.x + u * blockDim.x;
        bv[u] = wv[u] = make_uint4(0, 0, 0, 0);
        if (c < chunks) {
          sv[u] = *reinterpret_cast<const uint4*>(a + row + c * 8);
          if (b != nullptr) bv[u] = *reinterpret_cast<const uint4*>(b + row + c * 8);
          wv[u] = *reinterpret_cast<const uint4*>(nw.w + c * 8);
        }
      }
#pragma unroll
      for (int u = 0; u < NORM_CHUNKS; ++u) {
        const int c = threadIdx.x + u * blockDim.x;
        if (c >= chunks) continue;
        if (b != nullptr) sv[u] = add8(sv[u], bv[u]);
        if (store) *reinterpret_cast<uint4*>(s_out + row + c * 8) = sv[u];
        ss += sum_squares8(sv[u]);
      }
    }
#if NORM_DEFERRED
    ss = warp_sum(ss);
    if (lane == 0) ss_part[m][threadIdx.x >> 5] = ss;
    const float inv_rms = 1.f;
#else
    ss = block_sum(ss);
    const float inv_rms = rsqrtf(ss / (float)K + eps);
#endif
#pragma unroll
    for (int u = 0; u < NORM_CHUNKS; ++u) {
      const int c = threadIdx.x + u * blockDim.x;
      if (c < chunks)
        *reinterpret_cast<uint4*>(xs + row + c * 8) = m < rows ? scale8(sv[u], wv[u], inv_rms) : make_uint4(0, 0, 0, 0);
    }
  }
  __syncthreads();
#if NORM_DEFERRED
  float ss = 0.f;
  if (lane < M && lane < rows) {
    for (int k = 0; k < (int)(blockDim.x >> 5); ++k) ss += ss_part[lane][k];  // fixed order: every warp agrees
  }
  return lane < M && lane < rows ? rsqrtf(ss / (float)K + eps) : 1.f;
#else
  (void)lane;
  return 1.f;
#endif
}

// PDL (common.cuh), with the trigger before the wait: the next kernel may then start while this
// one still waits (its pre-wait reads are weights or step metadata, which no kernel writes), and its
// blocks take the SM slots this grid leaves free to start their own weight loads.
__device__ __forceinline__ void gemv_pdl_enter() {
  pdl_launch_dependents();
  pdl_wait();
}
