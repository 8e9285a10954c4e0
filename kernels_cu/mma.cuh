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

// The online-softmax update of one key tile (NT n-tiles of 8 keys) for the two rows a lane holds
// (g and g + 8): `s` holds the tile's scores in log2 units, -inf where masked; afterwards it holds
// exp2(s - max), and row_max, row_sum and the output accumulators o_acc (OT n-tiles of 8 dims) are
// updated. Each row lives in a quad of lanes. A row that has seen no key yet keeps max -inf: 0 is
// then the base, so exp2(-inf - base) = 0 instead of NaN.
template <int NT, int OT>
__device__ __forceinline__ void online_softmax_tile(float (&s)[NT][4], float (&row_max)[2], float (&row_sum)[2],
                                                    float (&o_acc)[OT][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = RVLLM_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) mx = fmaxf(mx, s[nt][2 * h + e]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float new_max = fmaxf(row_max[h], mx);
    const float base = new_max == RVLLM_NEG_INF ? 0.f : new_max;
    const float alpha = exp2f(row_max[h] - base);
    row_max[h] = new_max;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[nt][2 * h + e] - base);
        s[nt][2 * h + e] = p;
        sum += p;
      }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
    for (int j = 0; j < OT; ++j) {
      o_acc[j][2 * h] *= alpha;
      o_acc[j][2 * h + 1] *= alpha;
    }
  }
}

// P (the probabilities online_softmax_tile left in s) as the A fragment of k-step kk: the
// accumulators of key n-tiles 2kk and 2kk + 1 are its layout, rounded to the 16-bit type.
template <int NT>
__device__ __forceinline__ void p_fragment(unsigned int (&a)[4], const float (&s)[NT][4], int kk) {
  a[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
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
