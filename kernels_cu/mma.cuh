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

// S = Q K^T for 16 query rows x NT n-tiles of 8 keys. qf: Q's A fragments for each k-step of 16 of
// the HD head dims; k_rows: the keys' rows in shared memory (HD elements each, `ld` apart). K's B
// fragments come by ldmatrix, an x4 for two k-steps of an n-tile (matrices: dims 16 ks, +8, +16,
// +24), an x2 for an odd last k-step (head sizes 80, 112). Both attention kernels' inner loops.
template <int NT, int HD>
__device__ __forceinline__ void qk_tile(float (&s)[NT][4], const unsigned int (&qf)[HD / 16][4],
                                        const scalar_t* k_rows, int ld, int lane) {
  const int mrow = lane & 7, mat = lane >> 3;  // lane supplies row mrow of matrix mat
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    const scalar_t* krow = k_rows + (nt * 8 + mrow) * ld;
#pragma unroll
    for (int ks = 0; ks + 1 < HD / 16; ks += 2) {
      unsigned int b[4];
      ldmatrix_x4(b, krow + ks * 16 + mat * 8);
      const unsigned int b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_16816(s[nt], qf[ks], b0);
      mma_16816(s[nt], qf[ks + 1], b1);
    }
    if ((HD / 16) % 2) {  // lanes 0-15 address the x2
      unsigned int b[2];
      ldmatrix_x2(b, krow + (HD - 16) + (mat & 1) * 8);
      mma_16816(s[nt], qf[HD / 16 - 1], b);
    }
  }
}

// O += P V for the probabilities online_softmax_tile left in s (NT n-tiles of 8 keys: NT / 2
// k-steps) and V's rows in shared memory (HD elements each, `ld` apart): V's B fragments come
// transposed by ldmatrix (matrices: keys +0 / +8, dims +0 / +8), two output n-tiles an x4.
template <int NT, int HD>
__device__ __forceinline__ void pv_tile(float (&o_acc)[HD / 8][4], const float (&s)[NT][4], const scalar_t* v_rows,
                                        int ld, int lane) {
  const int mrow = lane & 7, mat = lane >> 3;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    unsigned int a[4];
    p_fragment(a, s, kk);
    const scalar_t* vrow = v_rows + (kk * 16 + (mat & 1) * 8 + mrow) * ld + (mat >> 1) * 8;
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {  // n-tiles 2j and 2j + 1
      unsigned int b[4];
      ldmatrix_x4_trans(b, vrow + j * 16);
      const unsigned int b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma_16816(o_acc[2 * j], a, b0);
      mma_16816(o_acc[2 * j + 1], a, b1);
    }
  }
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
