// Tensor-core helpers shared by the attention kernels (attention_prefill.cu, attention_decode_tc.cu).
// Fragment layouts of mma.m16n8k16 (PTX ISA; g = lane / 4, c = lane % 4, pairs packed low index first):
//   A 16x16 row-major: a[0] = A[g][2c..2c+1], a[1] = A[g+8][2c..], a[2] = A[g][2c+8..], a[3] = A[g+8][2c+8..]
//   B 16x8 (k x n):    b[0] = B[2c..2c+1][g],  b[1] = B[2c+8..2c+9][g]
//   C 16x8:            c[0..1] = C[g][2c..2c+1], c[2..3] = C[g+8][2c..2c+1]
#pragma once
#include "common.cuh"

__device__ __forceinline__ void mma_16816(float c[4], const unsigned int a[4], const unsigned int b[2]) {
#if defined(RVLLM_BF16)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ldmatrix: four 8x8 16-bit matrices from shared memory; lanes 8i..8i+7 give the row addresses of
// matrix i (16 bytes each), and lane t receives row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1 of
// each: a B fragment of K^T read from K rows. The .trans form receives rows 2 (t % 4), 2 (t % 4) + 1
// of column t / 4: a B fragment of V read from V rows.
__device__ __forceinline__ void ldmatrix_x4(unsigned int r[4], const scalar_t* row) {
  const unsigned int a = (unsigned int)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x2(unsigned int r[2], const scalar_t* row) {  // lanes 0-15 address
  const unsigned int a = (unsigned int)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int r[4], const scalar_t* row) {
  const unsigned int a = (unsigned int)__cvta_generic_to_shared(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// 16 bytes global -> shared without passing through registers (sm_80); `valid` false writes zeros.
__device__ __forceinline__ void cp_async_16(scalar_t* dst, const scalar_t* src, bool valid) {
  const unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {  // at most N of this thread's groups still pending
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
