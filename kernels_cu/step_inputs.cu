// A step's inputs, from the buffer its host-to-device copy filled (runner/step_inputs.py), into the
// device buffer the forward and the CUDA graphs read, in one kernel before the forward:
//  - dst[0 .. size) = src[0 .. size), except that a token id (dst[ids_at .. ids_at + num_ids))
//    packed as -1 - k becomes prev[k], row k of the previous step's sampled ids (async scheduling's
//    placeholders; prev null: no placeholders);
//  - the block tables from the per-slot table the runner keeps (runner/block_tables.py): row i of
//    the step is slot row_slots[i] of `table` [num_slots, W] after its new ids new_ids[diff_off[i]
//    .. diff_off[i + 1]) are written from column col0[i]. out [r, w] gets the row's first w
//    entries, zero from column ceil(seq_lens[i] / block_size) on and for padding rows (slot -1);
//  - with emb_out (CUDA-graph decode steps, whose graphs then start at the first layer): the
//    embedding rows of the step's token ids, emb_out[t, :] = emb_table[id t, :] (as
//    embedding.cu's kernel), a block a row.
// The staging buffer src is a copy the runner made on another stream (ordered before this kernel by
// an event), so the previous step's kernels may still be reading dst while the next step's inputs
// travel; nothing here is written before the PDL wait.
// One block per table row (grid-stride): a row's writes and its gather meet at a barrier, and no
// other row of the step has its slot; the copy is spread over the same grid. The step's first
// kernel: the attention kernels that read the tables before their PDL wait start only after
// kernels that wait before they trigger (common.cuh).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) unpack_step_inputs_kernel(
    int* __restrict__ dst, const int* __restrict__ src, int size, int ids_at, int num_ids,
    const int* __restrict__ prev, int* __restrict__ out, int* __restrict__ table,
    const int* __restrict__ row_slots, const int* __restrict__ col0, const int* __restrict__ diff_off,
    const int* __restrict__ new_ids, const int* __restrict__ seq_lens, int r, int w, int W, int block_size,
    scalar_t* __restrict__ emb_out, const scalar_t* __restrict__ emb_table, int hidden, int vocab) {
  pdl_enter();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < size; i += gridDim.x * blockDim.x) {
    int v = src[i];
    if (prev != nullptr && v < 0 && (unsigned)(i - ids_at) < (unsigned)num_ids) v = prev[-1 - v];
    dst[i] = v;
  }
  if (emb_out != nullptr) {
    for (int t = blockIdx.x; t < num_ids; t += gridDim.x) {
      int id = src[ids_at + t];
      if (prev != nullptr && id < 0) id = prev[-1 - id];
      embedding_row(emb_out + (i64)t * hidden, emb_table, id, hidden, vocab);
    }
  }
  for (int i = blockIdx.x; i < r; i += gridDim.x) {
    const int slot = row_slots[i];
    int* o = out + (i64)i * w;
    if (slot < 0) {
      for (int c = threadIdx.x; c < w; c += blockDim.x) o[c] = 0;
      continue;
    }
    int* row = table + (i64)slot * W;
    const int b = diff_off[i], e = diff_off[i + 1], c0 = col0[i];
    for (int j = b + threadIdx.x; j < e; j += blockDim.x) {
      const int c = c0 + j - b;
      if (c < W) row[c] = new_ids[j];  // the host checks the width; never write past the row
    }
    __syncthreads();  // this row's writes are visible to the block's reads below
    const int used = min(w, (seq_lens[i] + block_size - 1) / block_size);
    for (int c = threadIdx.x; c < w; c += blockDim.x) o[c] = c < used ? row[c] : 0;
  }
}
