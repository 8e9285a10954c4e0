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

// The shared prologue: xs[m, :] = rms_norm(a[m] + b[m]) for m < rows (zeros for padding rows);
// block 0 also stores the sum into s_out when b is given. Returns after a barrier.
//
// It sits between the wait and the first product, so its latency is the kernel's: a thread takes
// whole 16-byte chunks (at most NORM_CHUNKS of them, the wrapper checks K <= 8 * NORM_CHUNKS *
// threads) and issues all its loads of a row before using any, so a row costs one round trip to
// L2 and one block-wide sum. (One 2-byte element per iteration was a chain of K / threads
// dependent loads: ~5 us of a 7b product, bench/NOTES.md #18.) a, b and s_out are 16-byte aligned.
#define NORM_CHUNKS 4
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

// *x, a chunk of 8 summed values, scaled in place by the row's 1 / rms and the norm weights w[0, 8),
// rounded as the norm kernels round.
__device__ __forceinline__ void rms_scale8(uint4* x, const scalar_t* __restrict__ w, float inv_rms) {
  float xf[8], wf[8];
  unpack8(*x, xf);
  unpack8(*reinterpret_cast<const uint4*>(w), wf);
  *x = make_uint4(pack2(xf[0] * inv_rms * wf[0], xf[1] * inv_rms * wf[1]),
                  pack2(xf[2] * inv_rms * wf[2], xf[3] * inv_rms * wf[3]),
                  pack2(xf[4] * inv_rms * wf[4], xf[5] * inv_rms * wf[5]),
                  pack2(xf[6] * inv_rms * wf[6], xf[7] * inv_rms * wf[7]));
}

template <int M>
__device__ __forceinline__ void stage_add_norm(scalar_t* xs, scalar_t* s_out, const scalar_t* __restrict__ a,
                                               const scalar_t* __restrict__ b, const scalar_t* __restrict__ norm_w,
                                               float eps, int rows, int K) {
  const bool store = b != nullptr && s_out != nullptr && blockIdx.x == 0;
  const int chunks = K >> 3;
  // The rescale reads norm_w after the block-wide sum; start this thread's chunks towards L1 now.
#pragma unroll
  for (int u = 0; u < NORM_CHUNKS; ++u) {
    const int c = threadIdx.x + u * blockDim.x;
    if (c < chunks) asm volatile("prefetch.global.L1 [%0];" ::"l"(norm_w + c * 8));
  }
#pragma unroll 1
  for (int m = 0; m < M; ++m) {
    float ss = 0.f;
    if (m < rows) {
      const i64 row = (i64)m * K;
      uint4 av[NORM_CHUNKS], bv[NORM_CHUNKS];
#pragma unroll
      for (int u = 0; u < NORM_CHUNKS; ++u) {  // every load first
        const int c = threadIdx.x + u * blockDim.x;
        av[u] = bv[u] = make_uint4(0, 0, 0, 0);
        if (c < chunks) {
          av[u] = *reinterpret_cast<const uint4*>(a + row + c * 8);
          if (b != nullptr) bv[u] = *reinterpret_cast<const uint4*>(b + row + c * 8);
        }
      }
#pragma unroll
      for (int u = 0; u < NORM_CHUNKS; ++u) {
        const int c = threadIdx.x + u * blockDim.x;
        if (c >= chunks) continue;
        const uint4 sv = b != nullptr ? add8(av[u], bv[u]) : av[u];
        if (store) *reinterpret_cast<uint4*>(s_out + row + c * 8) = sv;
        *reinterpret_cast<uint4*>(xs + row + c * 8) = sv;
        ss += sum_squares8(sv);
      }
    }
    ss = block_sum(ss);  // `rows` is uniform over the block, so every thread gets here
    const float inv_rms = rsqrtf(ss / (float)K + eps);
    // Each thread rescales the chunks it wrote itself: no barrier needed in between.
#pragma unroll
    for (int u = 0; u < NORM_CHUNKS; ++u) {
      const int c = threadIdx.x + u * blockDim.x;
      if (c >= chunks) continue;
      uint4* x = reinterpret_cast<uint4*>(xs + (i64)m * K + c * 8);
      if (m >= rows) {
        *x = make_uint4(0, 0, 0, 0);
        continue;
      }
      rms_scale8(x, norm_w + c * 8, inv_rms);
    }
  }
  __syncthreads();
}

// PDL (common.cuh), with the trigger before the wait: the next kernel may then start while this
// one still waits (its pre-wait reads are weights or step metadata, which no kernel writes), and its
// blocks take the SM slots this grid leaves free to start their own weight loads.
__device__ __forceinline__ void gemv_pdl_enter() {
  pdl_launch_dependents();
  pdl_wait();
}
