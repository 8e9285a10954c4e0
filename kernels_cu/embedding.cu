// Embedding gather: out[t, :] = table[ids[t], :]. One block per token.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) embedding_kernel(
    scalar_t* __restrict__ out,          // [num_tokens, hidden]
    const int* __restrict__ ids,         // [num_tokens]
    const scalar_t* __restrict__ table,  // [vocab, hidden]
    int hidden, int vocab) {
  pdl_enter();
  const i64 t = blockIdx.x;
  const int id = ids[t];
  scalar_t* dst = out + t * hidden;
  if (id < 0 || id >= vocab) {  // out-of-range id: a zero row rather than a stray read
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0;
    return;
  }
  const scalar_t* src = table + (i64)id * hidden;
  if (((hidden & 7) == 0) && ((((size_t)src) | ((size_t)dst)) & 15) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < (hidden >> 3); i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = src[i];
  }
}

// Async scheduling: an input id -1 - k stands for row k of the previous step's sampled ids, which
// the host has not read yet (runner/step_inputs.py packs them so). Runs before the forward.
extern "C" __global__ void fill_placeholders_kernel(int* __restrict__ ids, const int* __restrict__ prev, int n) {
  pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const int v = ids[i];
    if (v < 0) ids[i] = prev[-1 - v];
  }
}
