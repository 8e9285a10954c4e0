// Shared helpers for every kernel in kernels_cu/. nvrtc.py pastes this file in place of
// `#include "common.cuh"`, so each kernel file compiles as one translation unit.
//
// No CUDA headers are included: NVRTC ships none built in (cuda_fp16.h and cuda_bf16.h live in
// the toolkit, which a pip-installed CuPy may not have). 16-bit values are raw 16-bit storage
// (`scalar_t`, an unsigned short) converted to and from float with PTX `cvt`, and all math is
// float32. Compile with exactly one of -DRVLLM_FP16 / -DRVLLM_BF16. Needs sm_80 or newer
// (cvt.rn.bf16.f32 and the m16n8k16 tensor-core shape).
#pragma once

typedef unsigned short scalar_t;  // fp16 or bf16 bits, per the RVLLM_* macro
typedef long long i64;

#if defined(RVLLM_BF16) && !defined(RVLLM_FP16)
__device__ __forceinline__ float to_f32(scalar_t x) {
  return __uint_as_float(((unsigned int)x) << 16);
}
__device__ __forceinline__ scalar_t from_f32(float f) {
  scalar_t r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
#elif defined(RVLLM_FP16) && !defined(RVLLM_BF16)
__device__ __forceinline__ float to_f32(scalar_t x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}
__device__ __forceinline__ scalar_t from_f32(float f) {
  scalar_t r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
#else
#error "compile with exactly one of -DRVLLM_FP16 or -DRVLLM_BF16"
#endif

// Two floats -> one 32-bit register of two 16-bit values, `lo` in the low half (the element
// with the lower index, as the mma fragments and little-endian memory both expect).
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  return (unsigned int)from_f32(lo) | ((unsigned int)from_f32(hi) << 16);
}

// Programmatic dependent launch (sm_90+). backend/cuda_launch.py launches every kernel with the
// PDL attribute, so a kernel may start once every block of the kernel before it in the stream has
// called pdl_launch_dependents() (or exited): its blocks fill SMs as the previous kernel's leave,
// and load what does not depend on earlier kernels meanwhile. The contract, for every kernel here:
//  - before pdl_wait(), read only what no kernel of the step writes (weights: backend/cuda.py's
//    weight() waits for the kernels that convert weights, since a test may call a kernel right
//    after), or the step's inputs: its metadata, token ids and block tables, all written by the
//    step's first kernel (unpack_step_inputs_kernel, step_inputs.cu). A kernel may read those
//    before its own wait only if, going back along the kernels before it that trigger before
//    their wait, one comes to a kernel that triggers after its wait, for every kernel before that
//    one has finished by then, or to the start of a CUDA graph, whose first kernels start after
//    all earlier work. The decode attention and rope kernels read them so: before them come
//    rotary and the products, which trigger first, then the previous layer's attention or, in the
//    first layer, the embedding or the graph's start (and at larger steps cuBLAS, whose kernels do
//    not trigger at all);
//  - write nothing before pdl_wait() (an earlier kernel may still read it);
//  - call pdl_wait() in every block. It returns once the previous kernel has finished and its
//    writes are visible; since that kernel waited too, so had every kernel before it.
// pdl_launch_dependents() comes after the wait in most kernels; gemv.cu and rotary.cu trigger first
// (see there).
// On older GPUs, or when launched without the attribute, both are no-ops.
// tests/test_kernels_compile.py checks that every entry point calls the wait.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Floats another block wrote during this kernel (the split decode kernels' partitions, read by the
// block that combines them): through L2, never a stale L1 line.
__device__ __forceinline__ float ld_cg(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float4 ld_cg4(const float* p) {  // 16-byte aligned
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}

// The split decode kernels' hand-off to the block that combines the partitions: thread 0 of each
// block that took part, after a barrier that follows all of the block's writes, counts the block in
// *counter. The last of `participants` gets true, and after its next barrier its threads see every
// other block's writes; it resets the counter for the next launch. A release fence before the count
// and an acquire fence after it, both acq_rel (CUTLASS's GenericBarrier does the same): __threadfence()
// is fence.sc.gpu, sequentially consistent and slower, and the combining block ran one in each of its
// threads.
__device__ __forceinline__ bool split_arrive(int* counter, int participants) {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  const int done = atomicAdd(counter, 1) + 1;
  if (done != participants) return false;
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
  *counter = 0;
  return true;
}

// Both, for kernels with nothing to do before the wait.
__device__ __forceinline__ void pdl_enter() {
  pdl_wait();
  pdl_launch_dependents();
}

#define RVLLM_NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max; every thread gets the result. blockDim.x must be a multiple of 32.
// The leading barrier lets a kernel call these several times in a row.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float s_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) s_part[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  return warp_sum(lane < num_warps ? s_part[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float s_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) s_part[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  return warp_max(lane < num_warps ? s_part[lane] : RVLLM_NEG_INF);
}

// dst[0, n) = src[0, n) by the block: 16 bytes a thread when both are 16-byte aligned and n is a
// multiple of 8, else an element a thread.
__device__ __forceinline__ void copy_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int n) {
  if (((n & 7) == 0) && ((((size_t)src) | ((size_t)dst)) & 15) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int i = threadIdx.x; i < (n >> 3); i += blockDim.x) d4[i] = s4[i];
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

// dst[0, hidden) = row `id` of the embedding table [vocab, hidden] by the block; a zero row for an
// out-of-range id rather than a stray read.
__device__ __forceinline__ void embedding_row(scalar_t* __restrict__ dst, const scalar_t* __restrict__ table,
                                              int id, int hidden, int vocab) {
  if (id < 0 || id >= vocab) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0;
    return;
  }
  copy_row(dst, table + (i64)id * hidden, hidden);
}

// ---- ragged-batch metadata (backend AttentionMetadata) ----------------------------------------

// The inputs every decode attention kernel takes (attention_decode.cu, attention_decode_tc.cu):
// the step's queries, the paged cache and the ragged-batch metadata.
#define DECODE_INPUT_PARAMS \
    const scalar_t* __restrict__ q,        /* [num_tokens, num_heads, HEAD_DIM] */ \
    const scalar_t* __restrict__ k_cache,  /* [num_blocks, block_size, num_kv_heads, HEAD_DIM] */ \
    const scalar_t* __restrict__ v_cache, \
    const int* __restrict__ block_tables,  /* [num_reqs, row stride] */ \
    int max_blocks_per_seq,                /* the row stride of block_tables, unless: */ \
    const int* __restrict__ row_stride_dev,  /* not null: the row stride, read on the device (CUDA graphs) */ \
    const int* __restrict__ query_start_loc,  /* [num_reqs + 1] */ \
    const int* __restrict__ seq_lens,         /* [num_reqs] */ \
    int num_reqs, int num_heads, int num_kv_heads, int block_size
#define DECODE_INPUT_ARGS \
    q, k_cache, v_cache, block_tables, max_blocks_per_seq, row_stride_dev, query_start_loc, seq_lens, \
    num_reqs, num_heads, num_kv_heads, block_size


// The request that owns query row `tok`, or -1 when no request does (padding rows past
// query_start_loc[num_reqs]). query_start_loc is non-decreasing; requests with no query rows
// (equal neighbours) own nothing.
__device__ __forceinline__ int find_request(const int* __restrict__ query_start_loc, int num_reqs, int tok) {
  int lo = 0, hi = num_reqs - 1, found = -1;
  while (lo <= hi) {  // the last request whose first row is <= tok
    const int mid = (lo + hi) >> 1;
    if (query_start_loc[mid] <= tok) {
      found = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  if (found < 0 || tok >= query_start_loc[found + 1]) return -1;
  return found;
}

// Keys visible to query row `tok`: row r of request i sits at position seq_len - q_len + r and
// sees keys [0, that position], so the context length is seq_len - q_len + r + 1. Sets *req
// (-1 for a padding row, which then sees nothing) and, when `cached` is not null, *cached to the
// request's keys from earlier steps (seq_len - q_len): no kernel of this step writes those.
// A decode step's rows are one-row requests in order (query_start_loc[tok] == tok and
// query_start_loc[tok + 1] == tok + 1, then request tok owns row tok): two independent loads
// instead of the binary search's chain of ~log2(num_reqs) dependent ones (8 at 256 rows).
__device__ __forceinline__ int query_context_len(const int* __restrict__ query_start_loc,
                                                 const int* __restrict__ seq_lens, int num_reqs,
                                                 int tok, int* req, int* cached = nullptr) {
  if (tok < num_reqs) {
    const int start = query_start_loc[tok], end = query_start_loc[tok + 1];
    const int len = seq_lens[tok];  // issued with the two above; used only when they match
    if (start == tok && end == tok + 1) {
      *req = tok;
      if (cached != nullptr) *cached = len - 1;
      return len;
    }
  }
  const int r = find_request(query_start_loc, num_reqs, tok);
  *req = r;
  if (r < 0) {
    if (cached != nullptr) *cached = 0;
    return 0;
  }
  const int q_start = query_start_loc[r];
  const int q_len = query_start_loc[r + 1] - q_start;
  if (cached != nullptr) *cached = seq_lens[r] - q_len;
  return seq_lens[r] - q_len + (tok - q_start) + 1;
}
