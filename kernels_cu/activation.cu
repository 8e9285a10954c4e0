// SiLU-and-mul: x = [gate | up] along the last dim -> silu(gate) * up. One block per token.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) silu_and_mul_kernel(
    scalar_t* __restrict__ out,      // [num_tokens, inter]
    const scalar_t* __restrict__ x,  // [num_tokens, 2 * inter]
    int inter) {
  const i64 t = blockIdx.x;
  const scalar_t* gate = x + t * 2 * inter;
  const scalar_t* up = gate + inter;
  scalar_t* dst = out + t * inter;
  for (int j = threadIdx.x; j < inter; j += blockDim.x) {
    const float g = to_f32(gate[j]);
    // g / (1 + e^-g): for very negative g, e^-g is inf and the quotient is -0, not NaN.
    dst[j] = from_f32(g / (1.f + expf(-g)) * to_f32(up[j]));
  }
}
