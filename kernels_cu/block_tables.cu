// A step's block tables from the per-slot table the runner keeps on the device
// (runner/block_tables.py, runner/step_inputs.py): row i of the step is slot row_slots[i] of
// `table` [num_slots, W] after its new ids new_ids[diff_off[i] .. diff_off[i + 1]) are written
// from column col0[i]. out [r, w] gets the row's first w entries, zero from column
// ceil(seq_lens[i] / block_size) on and for padding rows (slot -1), as the host once packed them.
// One block per row (grid-stride): a row's writes and its gather meet at a barrier, and no other
// row of the step has its slot. The step's first kernel: the attention kernels that read the
// tables before their PDL wait start only after kernels that wait before they trigger (common.cuh).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(128) update_block_tables_kernel(
    int* __restrict__ out, int* __restrict__ table, const int* __restrict__ row_slots,
    const int* __restrict__ col0, const int* __restrict__ diff_off, const int* __restrict__ new_ids,
    const int* __restrict__ seq_lens, int r, int w, int W, int block_size) {
  pdl_enter();
  for (int i = blockIdx.x; i < r; i += gridDim.x) {
    const int slot = row_slots[i];
    int* dst = out + (i64)i * w;
    if (slot < 0) {
      for (int c = threadIdx.x; c < w; c += blockDim.x) dst[c] = 0;
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
    for (int c = threadIdx.x; c < w; c += blockDim.x) dst[c] = c < used ? row[c] : 0;
  }
}
