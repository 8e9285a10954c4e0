// out[t, n] = sum over s of parts[s, t, n], in order of s, rounded to the 16-bit type: the second half
// of a product split over K into cuBLAS products of K-slices (backend/cuda_ksplit.py). The order is
// fixed, so the result does not depend on the run. 8 outputs a thread (16-byte stores); `elems` (the
// size of one slice's [rows, N] partials) is a multiple of 8 and every pointer 16-byte aligned.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) k_slices_reduce_kernel(
    scalar_t* __restrict__ out, const float* __restrict__ parts, i64 elems, int slices) {
  pdl_enter();
  const i64 octets = elems / 8;
  for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < octets; i += (i64)gridDim.x * blockDim.x) {
    const float4* p = reinterpret_cast<const float4*>(parts) + 2 * i;
    float4 lo = p[0], hi = p[1];
    for (int s = 1; s < slices; ++s) {
      const float4 a = p[s * (elems / 4)], b = p[s * (elems / 4) + 1];
      lo.x += a.x; lo.y += a.y; lo.z += a.z; lo.w += a.w;
      hi.x += b.x; hi.y += b.y; hi.z += b.z; hi.w += b.w;
    }
    reinterpret_cast<uint4*>(out)[i] = make_uint4(pack2(lo.x, lo.y), pack2(lo.z, lo.w), pack2(hi.x, hi.y), pack2(hi.z, hi.w));
  }
}
