// RMSNorm and fused residual-add + RMSNorm. One block per row; float32 sums.
#include "common.cuh"

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight.
// Rows are addressed as (outer, inner) with element strides so that a strided view such as q
// sliced out of the fused qkv output ([T, heads, head_dim] with a token stride wider than
// heads * head_dim) needs no copy: row r = o * inner + i starts at x + o * stride_outer +
// i * stride_inner. The last dimension is contiguous; out is contiguous [rows, d].
extern "C" __global__ void __launch_bounds__(1024) rms_norm_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x, i64 stride_outer, i64 stride_inner, int inner,
    const scalar_t* __restrict__ weight,  // [d]
    int d, float eps) {
  pdl_enter();
  const i64 row = blockIdx.x;
  const i64 o = row / inner, i = row % inner;
  const scalar_t* xr = x + o * stride_outer + i * stride_inner;
  scalar_t* yr = out + row * d;
  float ss = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const float v = to_f32(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv_rms = rsqrtf(ss / (float)d + eps);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    yr[j] = from_f32(to_f32(xr[j]) * inv_rms * to_f32(weight[j]));
  }
}

// residual_out = x + residual (rounded to the storage type, as HF and vLLM do), then
// out = rms_norm(residual_out). All arrays contiguous [rows, d]. residual_out may alias
// residual: each thread reads an element before it writes the same element.
// fill (optional, null: none): fill[row, :] = fill_row[:] (fill_n elements), the bias of the
// product that follows, which cuBLAS then adds to (beta = 1). A separate broadcast kernel took
// 3.6 us per layer at 256 rows on an H100 (bench/op_times.py).
//
// Rows of d % 8 == 0 elements at 16-byte aligned addresses (every model's hidden size) take the
// vector path: a thread holds up to NORM_MAX_CHUNKS 16-byte chunks of the row in registers, all of
// its loads issued before any is used, and the norm weight is loaded before the PDL wait. The
// element-wise loop it replaced (2-byte loads, the row re-read for the second pass) took 5.7 us a
// call at 256 x 1536 on an H200, twice a layer (bench/kernel_timeline.py, session 11); the
// backend launches d / 8 threads for it (CudaBackend.fused_add_rms_norm).
//
// fused_add_rms_norm_sums_kernel is the same with x given as `slices` float32 partial products
// [slices, rows, d] of a product split over K (backend/cuda_ksplit.py's KSliceSums), added in
// order of slice and rounded as gemm_reduce.cu's reduce kernel does: the result is the same as
// that kernel's output passed as x, and the reduce kernel leaves the chain.
#define NORM_VEC 8
#define NORM_MAX_CHUNKS 4
#define NORM_MAX_SLICES 8  // cuda_ksplit.SLICES

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// x: the array, or (parts not null) the partial products, each slice `slice_elems` floats.
struct NormInput {
  const scalar_t* __restrict__ x;
  const float* __restrict__ parts;
  int slices;
  i64 slice_elems;

  // Elements [at, at + 8) as 16-bit values; every slice's loads are issued before the sums.
  __device__ __forceinline__ uint4 load8(i64 at) const {
    if (parts == nullptr) return *reinterpret_cast<const uint4*>(x + at);
    float4 lo[NORM_MAX_SLICES], hi[NORM_MAX_SLICES];
#pragma unroll
    for (int s = 0; s < NORM_MAX_SLICES; ++s)
      if (s < slices) {
        const float4* p = reinterpret_cast<const float4*>(parts + s * slice_elems + at);
        lo[s] = p[0];
        hi[s] = p[1];
      }
#pragma unroll
    for (int s = 1; s < NORM_MAX_SLICES; ++s)
      if (s < slices) {
        lo[0].x += lo[s].x; lo[0].y += lo[s].y; lo[0].z += lo[s].z; lo[0].w += lo[s].w;
        hi[0].x += hi[s].x; hi[0].y += hi[s].y; hi[0].z += hi[s].z; hi[0].w += hi[s].w;
      }
    return make_uint4(pack2(lo[0].x, lo[0].y), pack2(lo[0].z, lo[0].w), pack2(hi[0].x, hi[0].y), pack2(hi[0].z, hi[0].w));
  }

  __device__ __forceinline__ scalar_t at(i64 i) const {
    if (parts == nullptr) return x[i];
    float acc = parts[i];
    for (int s = 1; s < slices; ++s) acc += parts[s * slice_elems + i];
    return from_f32(acc);
  }

  __device__ __forceinline__ bool aligned() const { return aligned16(parts == nullptr ? (const void*)x : parts); }
};

__device__ __forceinline__ void fused_add_rms_norm_vec(
    scalar_t* __restrict__ out, scalar_t* residual_out, const NormInput& x,
    const scalar_t* residual, const scalar_t* __restrict__ weight, int d, float eps,
    scalar_t* __restrict__ fill, const scalar_t* __restrict__ fill_row, int fill_n) {
  const i64 base = (i64)blockIdx.x * d;
  uint4 w[NORM_MAX_CHUNKS], xv[NORM_MAX_CHUNKS], rv[NORM_MAX_CHUNKS];
#pragma unroll
  for (int c = 0; c < NORM_MAX_CHUNKS; ++c) {  // a weight: before the wait
    const int j = (threadIdx.x + c * blockDim.x) * NORM_VEC;
    if (j < d) w[c] = *reinterpret_cast<const uint4*>(weight + j);
  }
  pdl_enter();
#pragma unroll
  for (int c = 0; c < NORM_MAX_CHUNKS; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * NORM_VEC;
    if (j < d) {
      xv[c] = x.load8(base + j);
      rv[c] = *reinterpret_cast<const uint4*>(residual + base + j);
    }
  }
  if (fill != nullptr) {
    scalar_t* f = fill + (i64)blockIdx.x * fill_n;
    for (int j = threadIdx.x * NORM_VEC; j < fill_n; j += blockDim.x * NORM_VEC)
      *reinterpret_cast<uint4*>(f + j) = *reinterpret_cast<const uint4*>(fill_row + j);
  }
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < NORM_MAX_CHUNKS; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * NORM_VEC;
    if (j < d) {
      const unsigned int* xp = reinterpret_cast<const unsigned int*>(&xv[c]);
      const unsigned int* rp = reinterpret_cast<const unsigned int*>(&rv[c]);
      unsigned int* sp = reinterpret_cast<unsigned int*>(&rv[c]);  // the sum replaces the residual
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const scalar_t lo = from_f32(to_f32((scalar_t)(xp[p] & 0xffffu)) + to_f32((scalar_t)(rp[p] & 0xffffu)));
        const scalar_t hi = from_f32(to_f32((scalar_t)(xp[p] >> 16)) + to_f32((scalar_t)(rp[p] >> 16)));
        const float flo = to_f32(lo), fhi = to_f32(hi);
        ss += flo * flo + fhi * fhi;
        sp[p] = (unsigned int)lo | ((unsigned int)hi << 16);
      }
      *reinterpret_cast<uint4*>(residual_out + base + j) = rv[c];
    }
  }
  ss = block_sum(ss);
  const float inv_rms = rsqrtf(ss / (float)d + eps);
#pragma unroll
  for (int c = 0; c < NORM_MAX_CHUNKS; ++c) {
    const int j = (threadIdx.x + c * blockDim.x) * NORM_VEC;
    if (j < d) {
      const unsigned int* sp = reinterpret_cast<const unsigned int*>(&rv[c]);
      const unsigned int* wp = reinterpret_cast<const unsigned int*>(&w[c]);
      uint4 o;
      unsigned int* op = reinterpret_cast<unsigned int*>(&o);
#pragma unroll
      for (int p = 0; p < 4; ++p)
        op[p] = pack2(to_f32((scalar_t)(sp[p] & 0xffffu)) * inv_rms * to_f32((scalar_t)(wp[p] & 0xffffu)),
                      to_f32((scalar_t)(sp[p] >> 16)) * inv_rms * to_f32((scalar_t)(wp[p] >> 16)));
      *reinterpret_cast<uint4*>(out + base + j) = o;
    }
  }
}

__device__ __forceinline__ void fused_add_rms_norm(
    scalar_t* __restrict__ out, scalar_t* residual_out, const NormInput& x, const scalar_t* residual,
    const scalar_t* __restrict__ weight, int d, float eps,
    scalar_t* __restrict__ fill, const scalar_t* __restrict__ fill_row, int fill_n) {
  const bool vec = d % NORM_VEC == 0 && d <= NORM_MAX_CHUNKS * NORM_VEC * (int)blockDim.x &&
                   aligned16(out) && aligned16(residual_out) && x.aligned() && aligned16(residual) &&
                   aligned16(weight) && (fill == nullptr || (fill_n % NORM_VEC == 0 && aligned16(fill) && aligned16(fill_row)));
  if (vec) {
    fused_add_rms_norm_vec(out, residual_out, x, residual, weight, d, eps, fill, fill_row, fill_n);
    return;
  }
  pdl_enter();
  const i64 base = (i64)blockIdx.x * d;
  if (fill != nullptr) {
    scalar_t* f = fill + (i64)blockIdx.x * fill_n;
    for (int j = threadIdx.x; j < fill_n; j += blockDim.x) f[j] = fill_row[j];
  }
  float ss = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    const scalar_t s = from_f32(to_f32(x.at(base + j)) + to_f32(residual[base + j]));
    residual_out[base + j] = s;
    const float v = to_f32(s);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float inv_rms = rsqrtf(ss / (float)d + eps);
  // Same j for the same thread as above: it re-reads only what it wrote itself.
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    out[base + j] = from_f32(to_f32(residual_out[base + j]) * inv_rms * to_f32(weight[j]));
  }
}

extern "C" __global__ void __launch_bounds__(1024) fused_add_rms_norm_kernel(
    scalar_t* __restrict__ out,
    scalar_t* residual_out,
    const scalar_t* __restrict__ x,
    const scalar_t* residual,
    const scalar_t* __restrict__ weight,
    int d, float eps,
    scalar_t* __restrict__ fill, const scalar_t* __restrict__ fill_row, int fill_n) {
  fused_add_rms_norm(out, residual_out, NormInput{x, nullptr, 1, 0}, residual, weight, d, eps, fill, fill_row, fill_n);
}

// At most 256 threads (CudaBackend.fused_add_rms_norm): the registers for every slice's loads
// (a 1024-thread bound caps a thread at 64).
extern "C" __global__ void __launch_bounds__(256) fused_add_rms_norm_sums_kernel(
    scalar_t* __restrict__ out,
    scalar_t* residual_out,
    const float* __restrict__ parts, int slices,
    const scalar_t* residual,
    const scalar_t* __restrict__ weight,
    int d, float eps,
    scalar_t* __restrict__ fill, const scalar_t* __restrict__ fill_row, int fill_n) {
  fused_add_rms_norm(out, residual_out, NormInput{nullptr, parts, slices, (i64)gridDim.x * d}, residual, weight, d,
                     eps, fill, fill_row, fill_n);
}
