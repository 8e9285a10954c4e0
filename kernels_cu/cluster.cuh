// Thread block clusters (sm_90) for attention_decode_tc.cu's cluster build and skinny_gemm.cu: the
// cluster's barrier in two halves, a block's rank, and stores into another block's shared memory.
// Below sm_90 they compile to nothing (attention_decode_tc.cu's cluster build traps there).
#pragma once

// The barrier in two halves: arrive (release: this thread's shared-memory writes, local or remote,
// are visible to the cluster once every thread has arrived) and wait (acquire).
__device__ __forceinline__ void cluster_arrive(bool release) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (release) asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  else asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
// Stores v at `p` (an address in this block's shared memory) in the cluster's block `rank`.
__device__ __forceinline__ void cluster_store2(float* p, unsigned int rank, float2 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned int remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(remote) : "r"((unsigned int)__cvta_generic_to_shared(p)), "r"(rank));
  asm volatile("st.shared::cluster.v2.f32 [%0], {%1, %2};" ::"r"(remote), "f"(v.x), "f"(v.y) : "memory");
#endif
}
// Blocks of this block's cluster (1 outside a cluster launch).
__device__ __forceinline__ unsigned int cluster_blocks() {
  unsigned int n = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
  return n;
}
// This block's rank in its cluster.
__device__ __forceinline__ unsigned int cluster_rank() {
  unsigned int r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}
