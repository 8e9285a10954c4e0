// The bulk tensor copy engine (TMA) and mbarriers for the Hopper kernels (gemm_wgmma.cu,
// skinny_gemm.cu; sm_90a), and the wgmma shared-memory descriptor of a tile they fill.
#pragma once

// A CUtensorMap (cuda.h's opaque 128-byte, 64-byte aligned type; NVRTC has no cuda.h), made on the
// host by cuTensorMapEncodeTiled (backend/cuda_launch.tensor_map_2d) and passed by value.
struct __align__(64) TensorMap {
  unsigned long long v[16];
};

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}

// Descriptor of a K-major operand at shared address `addr` (1024-byte aligned tile, plus 32 bytes a
// k16 step): start address, leading byte offset 16 (unused by swizzled K-major), stride byte offset
// 1024 (from one 8-row group to the next), 128-byte swizzle.
__device__ __forceinline__ unsigned long long wg_desc(unsigned int addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(16 >> 4) << 16) |
         ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// One arrival that also announces `bytes` of bulk copies completing on the barrier.
__device__ __forceinline__ void mbar_expect(unsigned long long* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// The bulk tensor copy engine (TMA) copies a box of `map` (64 columns x its box rows, 128-byte
// swizzle, zeros past the matrix) at column k, row `row` into `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap& map, int k, int row, unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(k), "r"(row), "r"(smem_addr(bar))
      : "memory");
}
