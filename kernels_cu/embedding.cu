// Embedding gather: out[t, :] = table[ids[t], :]. One block per token. Also the other copies of
// rows the engine makes (a bias under a product) and dummy weights. (Decode steps that replay a
// CUDA graph gather their rows in step_inputs.cu instead.)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) embedding_kernel(
    scalar_t* __restrict__ out,          // [num_tokens, hidden]
    const int* __restrict__ ids,         // [num_tokens]
    const scalar_t* __restrict__ table,  // [vocab, hidden]
    int hidden, int vocab) {
  pdl_enter();
  const i64 t = blockIdx.x;
  embedding_row(out + t * hidden, table, ids[t], hidden, vocab);
}

// out[r, :] = row[:] for r < gridDim.x: a linear layer's bias laid under the cuBLAS product that then
// adds to it (beta = 1). (CuPy's broadcast copy did this, an elementwise kernel that it compiles with
// NVRTC, whose library then held ~33 MB of every engine's memory: bench/NOTES.md #58.)
extern "C" __global__ void __launch_bounds__(256) broadcast_rows_kernel(
    scalar_t* __restrict__ out, const scalar_t* __restrict__ row, int n) {
  pdl_enter();
  copy_row(out + (i64)blockIdx.x * n, row, n);
}

// Dummy weights: out[i] = mean + std * z_i, z_i ~ N(0, 1) by Box-Muller from two uniforms that a
// hash of (seed, i / 2) gives, so the values depend on the seed and the index alone, not on the grid.
// (For --load-format dummy; cupy.random with CuPy's elementwise kernels did it before, which loaded
// NVRTC into every engine that started on dummy weights.)
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

extern "C" __global__ void __launch_bounds__(256) dummy_normal_kernel(
    scalar_t* __restrict__ out, i64 n, unsigned long long seed, float stddev, float mean) {
  pdl_enter();
  const unsigned long long key = splitmix64(seed);
  for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; 2 * p < n; p += (i64)gridDim.x * blockDim.x) {
    const unsigned long long h = splitmix64(key ^ (unsigned long long)p);
    const float u1 = ((float)(h >> 40) + 1.f) * 5.9604644775390625e-08f;  // (0, 1]: 24 bits, 2^-24
    const float u2 = (float)((h >> 16) & 0xFFFFFFu) * 5.9604644775390625e-08f;  // [0, 1)
    const float r = sqrtf(-2.f * logf(u1));
    float s, c;
    sincospif(2.f * u2, &s, &c);
    out[2 * p] = from_f32(mean + stddev * r * c);
    if (2 * p + 1 < n) out[2 * p + 1] = from_f32(mean + stddev * r * s);
  }
}
