// The GPU sampler (rvllm/sampling/gpu_sampler.py): float32 logits [B, V], blocks of SAMPLER_THREADS
// threads, one a row (large batches) or several a row (small batches: argmax, race, select kernels);
// every pass over a row is coalesced (`i = tid; i += blockDim`, or four tokens a thread: load4).
// Row passes, keys, masses, radix selects and the binned thresholds are in sampling_select.cuh.
//
// The NumPy sampler (rvllm/sampling/sampler.py) is the spec. Kernels:
//   process_logits_kernel  bring the row's penalty slot up to date, copy the row with penalties,
//                          then logit bias -> suppressed ids -> mask (the same float32
//                          operations as NumPy: bit-identical results)
//   sample_kernel          per row: argmax (greedy rows), or temperature / top-k / top-p / min-p
//                          and the exponential race (random rows); counts the chosen token in the
//                          row's penalty slot; then, for rows that ask, the chosen token's logprob
//                          and rank and the top-k logprobs (k <= 20)
//   argmax_kernel          the all-greedy fast path (and the row max of the split thresholds)
//   select_count_kernel,   small batches: the kept-set thresholds split over blocks (a histogram,
//   select_gather_kernel,  the candidate keys, the radix selects), written to `stats` for
//   select_kernel          race_kernel (sample_kernel's stats mode writes the same, a block a row)
//   race_kernel            small batches without logprobs: the race (or argmax) of each row split
//                          over blocks, above the thresholds in `stats`
//   philox_kernel          raw Philox4x32-10 blocks, for the known-answer test
//
// Kept-set semantics (random rows), on scaled = (x - row_max) / temperature, as in NumPy:
//   top-k: thr_k = the k-th largest scaled value (with multiplicity); exact, by a radix select.
//   top-p: thr_p = min{ v : M(v) < top_p * Z }, M(v) = mass of the tokens with scaled > v, Z = the
//          mass of the whole row (or of the top-k set: M(thr_k) + (k - #{scaled > thr_k}) e^thr_k).
//          That is NumPy's "smallest prefix of the sorted row whose mass reaches top_p" stated on
//          values, so ties need no order. Found by a radix select weighted by mass.
//   min-p: log(min_p) (computed on the host in float32, as NumPy does).
//   kept: scaled >= max(thr_k, thr_p, log min_p) and scaled > -inf (ties with the last kept kept).
// The radix selects run over the few tokens of the value bins where thr_k and thr_p lie, which one
// histogram pass over the row finds (kept_threshold_binned); over the whole row when those tokens
// do not fit in shared memory (kept_threshold_full_row). Both give the same thresholds.
// Masses are fixed point, round(e^scaled * 2^40) in 64-bit integers (e^scaled <= 1: the row max
// has scaled = 0): sums are exact and independent of summation order, so the selection is
// deterministic. NumPy sums float64 (top-k rows) or float32 (top-p-only rows) instead; the two
// agree except when top_p * Z lands within ~1e-7 (relative) of a prefix mass.
//
// The race: argmax over kept tokens of scaled - log(q), q ~ Exp(1) (= argmax e^scaled / q, the
// NumPy formulation, in log space so no underflow). q = -log(u), u from Philox4x32-10:
//   key = (seed lo, seed hi), counter = (token >> 2, step lo, step hi, tag), word token & 3,
// seeded rows: seed = the request's seed, step = its output tokens so far, tag = 0 (the same
// token whatever the batch); unseeded rows: the sampler's seed, its call counter, tag = row + 1.
// The noise differs from NumPy's (different generator): same distribution, not the same draws.
// Plain random rows (no top-k, top-p, min-p or logprobs) race on x / T instead of scaled, in one
// pass over the row (sample_kernel); the emulation in tests/test_sampler_gpu.py does the same.
//
// Penalty state (rvllm/sampling/penalty_slots.py): per slot s, counts[s * V + v] (occurrences of
// token v in the request's output) and seen[s * V + v] (1: v is in its prompt or its output; the
// repetition penalty's set). A row with a penalty has a slot (RowStep.pen_slot) that no other row of
// the launch has, so its block owns it; the kernels that sample count the token and mark it seen.
//
// Sampling parameters (rvllm/sampling/param_slots.py): a table of RowParams, one record per slot,
// kept on the device across calls. A call sends, per row, a RowStep: the row's slot and what
// changes every call; and only the records of rows whose request is new to its slot (`fresh`).
// load_row reads a row's record from `fresh` or the table and writes fresh records into the table
// (process_logits_kernel and sample_kernel both do: a call may run either alone, and both write the
// same bytes). A slot belongs to one row of a call, so no two blocks touch one record.
#include "sampling_select.cuh"

#define MAX_TOP_LOGPROBS 20  // gpu_sampler_inputs.py: MAX_TOP_LOGPROBS

// A request's sampling parameters, the same every call: one record per slot of the parameter
// table. gpu_sampler_inputs.py PARAMS_DTYPE mirrors this layout (tests/test_sampler_gpu.py compares them).
struct RowParams {
  double top_p;        // >= 1: off
  u64 seed;            // Philox key: the request's seed, or the sampler's for unseeded requests
  float temperature;
  float log_min_p;     // -inf: off
  float repetition_penalty;
  float frequency_penalty;
  float presence_penalty;
  int top_k;           // 0: off (the host maps k <= 0 and k >= V to 0)
  int num_logprobs;    // -1: none; else the top-k logprobs wanted (0..MAX_TOP_LOGPROBS)
  int greedy;          // 1: argmax
  int seeded;          // 1: the noise follows the request (Philox step = its output length, tag 0)
  int pad_[3];
};

// One row of a call: where its record is, and what changes every call. gpu_sampler_inputs.py
// STEP_DTYPE mirrors this layout.
struct RowStep {
  u64 step;            // seeded rows: the request's output tokens so far (others: the call counter)
  int slot;            // the record's slot in the table; -1: none (a row without a request id)
  int fresh;           // index of the row's record in this call's `fresh` records; -1: the table's
  int mask_row;        // row of the allowed-token masks, -1: none
  int pen_slot;        // penalty state slot, -1: none (the row has no penalty)
  int pen_reset;       // 1: the penalty slot is new to this request: zero it and mark the prompt first
  int pad_;
};

// What a kernel reads about its row: the record and this call's Philox counter words 1-3.
struct Row {
  RowParams p;
  u64 step;            // Philox counter words 1, 2
  int tag;             // Philox counter word 3: 0 for seeded rows (the same noise in any batch), else row + 1
  RowStep s;
};

// Every thread of the row's block calls it (the reads are broadcasts); thread 0 stores a fresh
// record in the table (ordered before the next call's reads by the stream).
__device__ __forceinline__ void load_row(Row& r, RowParams* __restrict__ table, const RowParams* __restrict__ fresh,
                                         const RowStep* __restrict__ steps, u64 call_step, int row) {
  r.s = steps[row];
  if (r.s.fresh >= 0) {
    r.p = fresh[r.s.fresh];
    if (r.s.slot >= 0 && threadIdx.x == 0) table[r.s.slot] = r.p;
  } else {
    r.p = table[r.s.slot];
  }
  r.step = r.p.seeded ? r.s.step : call_step;
  r.tag = r.p.seeded ? 0 : row + 1;
}

// ---- Philox4x32-10 (Salmon et al. 2011; Random123's reference rounds) --------------------------
__device__ __forceinline__ void philox4x32_10(u32& c0, u32& c1, u32& c2, u32& c3, u32 k0, u32 k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
}

// The Exp(1) draws of tokens 4g .. 4g + 3 come from one Philox call (counter word 0 = g): token
// 4g + j uses output word j. One call serves the four (sample_kernel gives a thread four adjacent
// tokens), where a call per token computed each word four times.
__device__ __forceinline__ void philox_words(const Row& r, u32 group, u32 (&w)[4]) {
  u32 c0 = group, c1 = (u32)r.step, c2 = (u32)(r.step >> 32), c3 = (u32)r.tag;
  philox4x32_10(c0, c1, c2, c3, (u32)r.p.seed, (u32)(r.p.seed >> 32));
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// log(q) of the Exp(1) draw with random word w: u = (23 random bits + 0.5) / 2^23 lies strictly
// inside (0, 1) and is exact in float32, so q = -log(u) is finite and > 0. The bits k + 0.5 come
// without an integer conversion (a quarter-rate instruction, like the filter's exponentials): the
// float with bits 0x4B000000 | k is 2^23 + k, and 2^23 + k - (2^23 - 0.5) = k + 0.5, exact.
__device__ __forceinline__ float uniform_of(u32 w) {
  return (__uint_as_float(0x4B000000u | (w >> 9)) - 8388607.5f) * 1.1920928955078125e-07f;  // 2^-23
}
__device__ __forceinline__ float log_exp_noise(u32 w) { return logf(-logf(uniform_of(w))); }

// 2^x by the SFU (ex2.approx, relative error ~2^-22); results below 2^-126 flush to 0.
__device__ __forceinline__ float ex2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#define RACE_LOG2E 1.4426950408889634f

// Whether the race value sc - log(q) of the draw with word w can exceed `bar`. In exact arithmetic
// it does iff q < exp(sc - bar), i.e. u > exp(-exp(sc - bar)): two fast exponentials, where the race
// value costs two accurate logs. The threshold is lowered by a relative margin mu (times
// margin_factor = 1 - mu, once a group) that covers what the exact path's comparison could decide
// differently. At the boundary q = exp(sc - bar) <= 16.7 (past it the threshold is below every u,
// which is > 2^-24), and an error d in log(q) moves u by a relative 16.7 d there. d is at most the
// two logs' errors (a ulp of log(q) <= 1.9e-6, and ~1.2e-7 through q) plus the rounding of
// sc - log(q) next to bar (|bar| 2^-24): 3.4e-5 + |bar| 1e-6 in u; the exponentials and their
// arguments' rounding add ~5e-6. mu = 2^-12 + |bar| 2^-18 is over 3 times that, so no token the exact
// comparison takes is filtered out. A `bar` below the lane's current best (it grew since) only lets
// more tokens through.
__device__ __forceinline__ float margin_factor(float bar) {
  return 1.f - fminf(fmaf(fabsf(bar), 3.814697265625e-06f, 2.44140625e-04f), 1.f);  // 2^-18, 2^-12
}
__device__ __forceinline__ bool may_beat(float sc, u32 w, float bar, float factor) {
  if (!(bar > RVLLM_NEG_INF)) return true;
  const float t = ex2_fast(-ex2_fast((sc - bar) * RACE_LOG2E) * RACE_LOG2E);  // 0 when sc - bar is large
  return uniform_of(w) > t * factor;
}

// The largest race value the lanes of this warp still in their loop hold (their own `best`). A
// token below it can neither win its row nor tie the winner, whichever lane holds it, so the
// filters test against it: a warp takes a branch when any of its lanes does, and against each
// lane's own best some lane passed in most groups (the exact values then cost every lane their
// time). Shared each group, the whole warp skips the exact values in all but a few groups.
__device__ __forceinline__ float warp_best(float best) {
  return key_value(__reduce_max_sync(__activemask(), order_key(best)));
}

// ---- the race ------------------------------------------------------------------------------------
// A plain random row (no top-k, top-p, min-p or logprobs) keeps every token above -inf and races
// on x / T: argmax of x / T - log q is the draw that (x - max) / T - log q gives, up to the rounding
// of the subtraction, so the pass that finds the row max is skipped (row_max = 0 makes the race
// exactly that: x - 0 is x).
__device__ __forceinline__ bool plain_row(const RowParams& p, int V) {
  return !p.greedy && !(p.top_k > 0 && p.top_k < V) && !(p.top_p < 1.0) && !(p.log_min_p > RVLLM_NEG_INF) &&
         p.num_logprobs < 0;
}

__device__ __forceinline__ float finite_or_zero(float m) {  // NumPy: a row max that is not finite is 0
  return (m > RVLLM_NEG_INF && m < -RVLLM_NEG_INF) ? m : 0.f;
}

// scaled = (x - row_max) / T: the same two float32 operations as NumPy, so the same values and ties.
// At T = 1 the division is exact, so it is skipped (an IEEE division is ~10 instructions a token).
struct Scale {
  float row_max, temp;
  bool unit_temp;
  __device__ Scale(float m, float t) : row_max(m), temp(t), unit_temp(t == 1.f) {}
  __device__ __forceinline__ float operator()(float xv) const {
    const float d = __fsub_rn(xv, row_max);
    return unit_temp ? d : __fdiv_rn(d, temp);
  }
};

// The race over tokens 4g .. 4g + 3 (v, from load4, -inf past the row): the kept ones (scaled >=
// thr, > -inf) take their noise from one Philox call; (best, best_i) keeps the largest scaled -
// log q. Called in increasing g by each thread, so the first of equal values stays. The exact
// value of a token is computed only when it can matter (NOTES #62-#63): the group's draws only when
// some kept token could reach the warp's best (a race value is at most scaled + 16.64: u <= 1 -
// 2^-24 gives log q >= -16.64; most of a language model's row lies further below its top), and a
// token's two logs only when may_beat says it can exceed it. The tokens are the same as when every
// value was computed. UNIT: the row's temperature is 1 (scale's division skipped, without a branch
// a token).
template <bool UNIT>
__device__ __forceinline__ void race_group(const Row& rw, const Scale& scale, float thr, int g, const float (&v)[4],
                                           float& best, int& best_i) {
  const float bar = fmaxf(best, warp_best(best));
  float sc[4], top = RVLLM_NEG_INF;
  bool keep[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    sc[j] = UNIT ? __fsub_rn(v[j], scale.row_max) : scale(v[j]);
    keep[j] = sc[j] >= thr && sc[j] > RVLLM_NEG_INF;
    if (keep[j]) top = fmaxf(top, sc[j]);
  }
  // none kept (below the top-k / top-p / min-p cut, or -inf), or none can reach bar: 0.11 of margin
  // above 16.64 and |bar| 2^-18 cover the rounding of scaled - log q
  if (!(top > RVLLM_NEG_INF) || top + 16.75f + fabsf(bar) * 3.814697265625e-06f < bar) return;
  u32 w[4];
  philox_words(rw, (u32)g, w);
  const float factor = margin_factor(bar);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (!keep[j] || !may_beat(sc[j], w[j], bar, factor)) continue;
    const float r = sc[j] - log_exp_noise(w[j]);
    if (r > best) {
      best = r;
      best_i = 4 * g + j;
    }
  }
}

// The race over groups g0 + tid, g0 + tid + blockDim.x, ... below g1 of row x (for_each_group).
template <bool UNIT>
__device__ __forceinline__ void race_pass(const float* __restrict__ x, int V, int g0, int g1, const Row& rw,
                                          const Scale& scale, float thr, float& best, int& best_i) {
  for_each_group(x, V, g0, g1,
                 [&](int g, const float (&v)[4]) { race_group<UNIT>(rw, scale, thr, g, v, best, best_i); });
}

// ---- kernels -------------------------------------------------------------------------------------

// logits[b, :] in place, in NumPy's order: repetition (tokens in the prompt or the output: > 0
// divided, else multiplied), frequency * output count + presence subtracted (output tokens), logit
// bias added, suppressed ids set to -inf, tokens outside the allowed mask set to -inf. In place:
// the sampled rows' logits have no other reader (the runner's prompt logprobs come from their own
// product), and GpuSampler.process_logits copies first.
// A row with a penalty slot first brings it up to date: zeroed and its prompt's tokens marked seen
// when pen_reset, then the output tokens the device has not counted yet counted and marked seen
// (per row CSR lists of unique prompt ids and of new output ids). Only seen tokens can change (a
// token with a count is seen), so the dense pass reads `seen` (a byte a token) and touches the
// logits and counts only in groups of four with a seen token: a chat row's few hundred tokens,
// where it read and wrote every token's logit and count (13 bytes a token, ~0.5 GB a call at 256
// rows x 152k). Bias and suppressed ids are per row CSR lists too (offsets [B + 1], bias tokens
// unique within a row). Out-of-range tokens are skipped.
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) process_logits_kernel(
    float* __restrict__ logits, int V, RowParams* __restrict__ table, const RowParams* __restrict__ fresh,
    const RowStep* __restrict__ steps, u64 call_step, int* __restrict__ counts, unsigned char* __restrict__ seen,
    const int* __restrict__ prompt_off, const int* __restrict__ prompt_tok, const int* __restrict__ new_off,
    const int* __restrict__ new_tok, const int* __restrict__ bias_off, const int* __restrict__ bias_tok,
    const float* __restrict__ bias_val, const int* __restrict__ sup_off, const int* __restrict__ sup_tok,
    const unsigned char* __restrict__ masks) {
  pdl_enter();
  const int row = blockIdx.x, tid = threadIdx.x;
  float* x = logits + (size_t)row * V;
  Row r;
  load_row(r, table, fresh, steps, call_step, row);
  const RowParams& p = r.p;
  const int slot = r.s.pen_slot;  // uniform over the block
  int* cnt = counts + (size_t)max(slot, 0) * V;
  unsigned char* sn = seen + (size_t)max(slot, 0) * V;
  if (slot >= 0) {
    if (r.s.pen_reset) {
      for (int i = tid; i < V; i += blockDim.x) {
        cnt[i] = 0;
        sn[i] = 0;
      }
      __syncthreads();
      for (int j = prompt_off[row] + tid; j < prompt_off[row + 1]; j += blockDim.x) {
        const int t = prompt_tok[j];
        if (t >= 0 && t < V) sn[t] = 1;
      }
    }
    for (int j = new_off[row] + tid; j < new_off[row + 1]; j += blockDim.x) {
      const int t = new_tok[j];
      if (t >= 0 && t < V) {
        atomicAdd(cnt + t, 1);  // repeated tokens: several threads, one counter
        sn[t] = 1;
      }
    }
    __syncthreads();  // the slot's writes, visible to the whole block below

    const float rep = p.repetition_penalty, freq = p.frequency_penalty, pres = p.presence_penalty;
    // As NumPy, each penalty only where it is on (x - 0 would turn -0 into +0 for freq = pres = -0).
    const bool with_rep = rep != 1.f, with_fp = freq != 0.f || pres != 0.f;
    auto penalized = [&](float v, int c) {  // a seen token's logit
      if (with_rep) v = v > 0.f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      // NumPy: x -= freq * count + presence, each op rounded to float32 (no fused multiply-add)
      if (with_fp && c > 0) v = __fsub_rn(v, __fadd_rn(__fmul_rn(freq, (float)c), pres));
      return v;
    };
    // V a multiple of 4 makes every row of the logits and counts 16-byte aligned when the arrays
    // are, and `seen` 4-byte aligned.
    const bool vec = (V & 3) == 0 && ((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(cnt)) & 15) == 0 &&
                     (reinterpret_cast<size_t>(sn) & 3) == 0;
    if (vec) {
      for (int g = tid; g < (V >> 2); g += blockDim.x) {
        const uchar4 s4 = reinterpret_cast<const uchar4*>(sn)[g];
        if (!(s4.x | s4.y | s4.z | s4.w)) continue;
        float4 v = reinterpret_cast<const float4*>(x)[g];
        const int4 c = with_fp ? reinterpret_cast<const int4*>(cnt)[g] : make_int4(0, 0, 0, 0);
        if (s4.x) v.x = penalized(v.x, c.x);
        if (s4.y) v.y = penalized(v.y, c.y);
        if (s4.z) v.z = penalized(v.z, c.z);
        if (s4.w) v.w = penalized(v.w, c.w);
        reinterpret_cast<float4*>(x)[g] = v;
      }
    } else {
      for (int i = tid; i < V; i += blockDim.x)
        if (sn[i]) x[i] = penalized(x[i], with_fp ? cnt[i] : 0);
    }
  }
  __syncthreads();  // the penalties' writes before the edits below (a token may have both)
  for (int j = bias_off[row] + tid; j < bias_off[row + 1]; j += blockDim.x) {
    const int t = bias_tok[j];
    if (t >= 0 && t < V) x[t] = __fadd_rn(x[t], bias_val[j]);
  }
  __syncthreads();
  for (int j = sup_off[row] + tid; j < sup_off[row + 1]; j += blockDim.x) {
    const int t = sup_tok[j];
    if (t >= 0 && t < V) x[t] = RVLLM_NEG_INF;
  }
  if (r.s.mask_row >= 0) {
    __syncthreads();
    const unsigned char* m = masks + (size_t)r.s.mask_row * V;
    for (int i = tid; i < V; i += blockDim.x)
      if (!m[i]) x[i] = RVLLM_NEG_INF;
  }
}

// ---- rows split over blocks (grid (B, splits): argmax_kernel, race_kernel, select_*_kernel) -------
// This block's chunk of its row: groups [*g0, *g1), whole groups of 4 tokens (load4), so tokens past
// the chunk's end within its last group are past V (-inf from load4).
__device__ __forceinline__ void split_chunk(int V, int* g0, int* g1) {
  const int splits = gridDim.y, chunk = ((V + splits - 1) / splits + 3) & ~3;
  const int start = blockIdx.y * chunk, end = min(V, start + chunk);
  *g0 = start / 4;
  *g1 = (end + 3) / 4;
}

// The argmax over tokens 4g .. 4g + 3 (a thread's groups in increasing order: the first of equal
// values stays).
__device__ __forceinline__ void argmax_group(int g, const float (&v)[4], float& best, int& best_i) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (v[j] > best) {
      best = v[j];
      best_i = 4 * g + j;
    }
  }
}

// The order of (value, index) pairs as one 64-bit integer: larger values first, then smaller
// indices; 0 is below every pair with a value above -inf. -0 counts as +0 (they compare equal).
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
  const unsigned int u = __float_as_uint(v + 0.f);
  const unsigned int ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ((unsigned long long)ordered << 32) | (0xffffffffu - (unsigned int)i);
}

// Thread 0 of each of a row's blocks: the block's best (value, index) goes into keys[row] with a
// 64-bit atomicMax, and the row's last block (counted in done[row]) gets the row's best key in *key
// (0: no token above -inf) and leaves keys[row], done[row] zero for the next launch (both start
// zeroed: gpu_sampler.py). Returns whether this is that block; with one block a row, it always is.
__device__ __forceinline__ bool split_row_best(unsigned long long* keys, int* done, int row, float best, int best_i,
                                               unsigned long long* key) {
  *key = best_i == NO_TOKEN ? 0ull : argmax_key(best, best_i);
  const int splits = gridDim.y;
  if (splits == 1) return true;
  if (*key) atomicMax(keys + row, *key);
  __threadfence();  // the key before the count
  if (atomicAdd(done + row, 1) != splits - 1) return false;
  *key = atomicExch(keys + row, 0ull);
  done[row] = 0;
  return true;
}

__device__ __forceinline__ int key_index(unsigned long long key) {  // 0 for no token, as NumPy's argmax of -inf
  return key == 0ull ? 0 : (int)(0xffffffffu - (unsigned int)(key & 0xffffffffu));
}

// out[b] = argmax of row b (first index among equal maxima; 0 for a row of -inf). Grid (B, splits):
// a batch-1 row is 152k floats, which one block read in ~60 us on an H100, so small batches split
// each row over `splits` blocks. Each block's best pair goes into keys[b] with a 64-bit atomicMax;
// the last block of the row (counted in done[b]) writes the index and leaves keys[b] and done[b]
// zero for the next launch (both start zeroed: gpu_sampler.py).
// max_out (null, or [B]): the row's max value goes there instead of its index to out (-inf for a row
// of -inf or NaN): the first step of a small batch's split thresholds (select_kernel).
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) argmax_kernel(
    int* __restrict__ out, const float* __restrict__ logits, int V, unsigned long long* __restrict__ keys,
    int* __restrict__ done, float* __restrict__ max_out) {
  pdl_enter();
  const int row = blockIdx.x;
  float best = RVLLM_NEG_INF;
  int best_i = NO_TOKEN, g0, g1;
  split_chunk(V, &g0, &g1);
  for_each_group(logits + (size_t)row * V, V, g0, g1,
                 [&](int g, const float (&v)[4]) { argmax_group(g, v, best, best_i); });
  block_argmax(best, best_i);
  unsigned long long k;
  if (threadIdx.x != 0 || !split_row_best(keys, done, row, best, best_i, &k)) return;
  if (max_out)  // the key's high word is order_key(max + 0): key_value inverts it
    max_out[row] = k == 0ull ? RVLLM_NEG_INF : key_value((u32)(k >> 32));
  else
    out[row] = key_index(k);
}

// A sampled token in its row's penalty slot: counted, and seen (the repetition penalty's set).
__device__ __forceinline__ void count_token(int* counts, unsigned char* seen, int slot, int V, int token) {
  atomicAdd(counts + (size_t)slot * V + token, 1);
  seen[(size_t)slot * V + token] = 1;
}

// out (int32): [0, B) token ids; for rows with num_logprobs >= 0 also
//   [B + b] chosen logprob (float bits), [2B + b] its rank (tokens with logprob >= it),
//   [3B + 20b + j] top ids, [23B + 20b + j] top logprobs (float bits), j < num_logprobs, best first,
//   equal logprobs in token-id order.
// Logprobs are the log-softmax of the processed logits (before temperature), as in NumPy.
// A row with a penalty slot counts its token there and marks it seen (the host counts it as known to
// the device).
// stats (null in the engine's calls; [B] for GpuSampler.kept_thresholds at batches that do not split):
// the kernel stops before the race and writes, for each random row that is not plain, (row max,
// kept-set threshold max(thr_k, thr_p, log min_p) on scaled values), as select_kernel does.
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) sample_kernel(
    int* __restrict__ out, const float* __restrict__ logits, int V, int B, RowParams* __restrict__ table,
    const RowParams* __restrict__ fresh, const RowStep* __restrict__ steps, u64 call_step, int* __restrict__ counts,
    unsigned char* __restrict__ seen, float2* __restrict__ stats) {
  pdl_enter();
  __shared__ float s_top_v[MAX_TOP_LOGPROBS];
  __shared__ int s_top_i[MAX_TOP_LOGPROBS];
  __shared__ int s_warp_eq[32];
  __shared__ int s_gt_slot;
  const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* x = logits + (size_t)row * V;
  Row rw;  // `r` names a race value below
  load_row(rw, table, fresh, steps, call_step, row);
  const RowParams& p = rw.p;
  const bool plain = plain_row(p, V);  // uniform over the block
  if (stats && (plain || p.greedy)) return;  // race_kernel needs nothing for these rows
  const int groups = (V + 3) >> 2;
  float row_max = 0.f;
  int token = 0;  // every token -inf: token 0, as the argmax gives
  if (!plain) {
    // argmax and row max (a thread's tokens in increasing order: the first of equal values stays)
    float mx = RVLLM_NEG_INF;
    int arg = NO_TOKEN;
    for_each_group(x, V, 0, groups, [&](int g, const float (&v)[4]) { argmax_group(g, v, mx, arg); });
    block_argmax(mx, arg);
    if (arg != NO_TOKEN) token = arg;
    row_max = finite_or_zero(mx);
  }

  if (!p.greedy) {
    const Scale scale(row_max, p.temperature);
    float thr = RVLLM_NEG_INF;
    const bool has_k = p.top_k > 0 && p.top_k < V, has_p = p.top_p < 1.0;
    if ((has_k || has_p) && !kept_threshold_binned(x, V, scale, p.top_k, p.top_p, has_k, has_p, &thr))
      thr = kept_threshold_full_row(x, V, scale, p.top_k, p.top_p, has_k, has_p);
    thr = fmaxf(thr, p.log_min_p);
    if (stats) {
      if (tid == 0) stats[row] = make_float2(row_max, thr);
      return;
    }
    float best = RVLLM_NEG_INF;
    int best_i = NO_TOKEN;
    if (scale.unit_temp)
      race_pass<true>(x, V, 0, groups, rw, scale, thr, best, best_i);
    else
      race_pass<false>(x, V, 0, groups, rw, scale, thr, best, best_i);
    block_argmax(best, best_i);
    if (best_i != NO_TOKEN) token = best_i;  // else every token is -inf: keep the argmax (0)
  }
  if (tid == 0) {
    out[row] = token;
    if (rw.s.pen_slot >= 0) count_token(counts, seen, rw.s.pen_slot, V, token);
  }
  if (p.num_logprobs < 0) return;  // uniform over the block

  // ---- logprobs: log_softmax(x) = (x - row_max) - log(sum exp(x - row_max)) ----
  float se = 0.f;
  for (int i = tid; i < V; i += blockDim.x) se += expf(x[i] - row_max);
  const float lse = logf(block_sum(se));
  auto logprob = [&](int i) { return __fsub_rn(__fsub_rn(x[i], row_max), lse); };
  const float chosen = logprob(token);
  const int k = min(min(p.num_logprobs, MAX_TOP_LOGPROBS), V);
  u32 kth = 0u;
  u64 n_gt = 0ull;
  if (k > 0) {
    auto by_count = [&](int i, u32& key, u64& w) {
      key = order_key(logprob(i));
      w = 1ull;
    };
    radix_select<false>(by_count, V, (u64)k, &kth, &n_gt);  // k <= V: always found
  }
  const int need_eq = k - (int)n_gt;  // tokens equal to the k-th logprob to take, lowest ids first
  if (tid == 0) s_gt_slot = 0;
  __syncthreads();
  u64 rank = 0ull;
  int eq_seen = 0;  // tokens equal to the k-th seen in earlier tiles (same in every thread)
  const int num_warps = blockDim.x >> 5;
  for (int base = 0; base < V; base += blockDim.x) {  // tiles in token order
    const int i = base + tid;
    const bool valid = i < V;
    const float l = valid ? logprob(i) : RVLLM_NEG_INF;
    if (valid && l >= chosen) ++rank;
    if (k > 0) {
      const u32 key = order_key(l);
      if (valid && key > kth) {
        const int slot = atomicAdd(&s_gt_slot, 1);  // < n_gt <= k - 1
        s_top_v[slot] = l;
        s_top_i[slot] = i;
      }
      const bool eq = valid && key == kth;
      const u32 bal = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) s_warp_eq[warp] = __popc(bal);
      __syncthreads();
      int before = 0, total = 0;
      for (int w = 0; w < num_warps; ++w) {
        const int c = s_warp_eq[w];
        before += w < warp ? c : 0;
        total += c;
      }
      if (eq) {
        const int ord = eq_seen + before + __popc(bal & ((1u << lane) - 1u));
        if (ord < need_eq) {
          s_top_v[(int)n_gt + ord] = l;
          s_top_i[(int)n_gt + ord] = i;
        }
      }
      eq_seen += total;
      __syncthreads();  // s_warp_eq is rewritten by the next tile
    }
  }
  rank = block_sum_u64(rank);  // its barriers also order the s_top writes before the sort
  if (tid == 0) {
    // insertion sort, best first, equal logprobs by token id
    for (int a = 1; a < k; ++a) {
      const float v = s_top_v[a];
      const int id = s_top_i[a];
      int b = a - 1;
      while (b >= 0 && (s_top_v[b] < v || (s_top_v[b] == v && s_top_i[b] > id))) {
        s_top_v[b + 1] = s_top_v[b];
        s_top_i[b + 1] = s_top_i[b];
        --b;
      }
      s_top_v[b + 1] = v;
      s_top_i[b + 1] = id;
    }
    out[B + row] = __float_as_int(chosen);
    out[2 * B + row] = (int)rank;
    for (int j = 0; j < k; ++j) {
      out[3 * B + MAX_TOP_LOGPROBS * row + j] = s_top_i[j];
      out[23 * B + MAX_TOP_LOGPROBS * row + j] = __float_as_int(s_top_v[j]);
    }
  }
}

// The race of small batches, split over blocks as argmax_kernel is (grid (B, splits)): one block
// a row ran the race pass of a batch-1 row in ~75 us on an H200 (the pass is arithmetic per token,
// on one SM). Greedy rows take the argmax, plain rows race on x / T, other rows on (x - row max) / T
// above the threshold that select_kernel left in stats. Each block's best (value,
// index) goes into keys[b] with a 64-bit atomicMax; the last block of the row writes the token,
// counts it in the row's penalty slot and leaves keys[b], done[b] zero (the argmax scratch).
// Rows asking for logprobs do not come here. The tokens are sample_kernel's: the same draws per
// token, the same order among equal values.
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) race_kernel(
    int* __restrict__ out, const float* __restrict__ logits, int V, RowParams* __restrict__ table,
    const RowParams* __restrict__ fresh, const RowStep* __restrict__ steps, u64 call_step, int* __restrict__ counts,
    unsigned char* __restrict__ seen, const float2* __restrict__ stats, unsigned long long* __restrict__ keys,
    int* __restrict__ done) {
  pdl_enter();
  const int row = blockIdx.x;
  Row rw;
  load_row(rw, table, fresh, steps, call_step, row);
  const RowParams& p = rw.p;
  float row_max = 0.f, thr = RVLLM_NEG_INF;
  if (!p.greedy && !plain_row(p, V)) {
    const float2 st = stats[row];
    row_max = st.x;
    thr = st.y;
  }
  const Scale scale(row_max, p.temperature);
  float best = RVLLM_NEG_INF;
  int best_i = NO_TOKEN, g0, g1;
  split_chunk(V, &g0, &g1);
  const float* x = logits + (size_t)row * V;
  if (p.greedy)
    for_each_group(x, V, g0, g1, [&](int g, const float (&v)[4]) { argmax_group(g, v, best, best_i); });
  else if (scale.unit_temp)
    race_pass<true>(x, V, g0, g1, rw, scale, thr, best, best_i);
  else
    race_pass<false>(x, V, g0, g1, rw, scale, thr, best, best_i);
  block_argmax(best, best_i);
  unsigned long long k;
  if (threadIdx.x != 0 || !split_row_best(keys, done, row, best, best_i, &k)) return;
  const int token = key_index(k);
  out[row] = token;
  if (rw.s.pen_slot >= 0) count_token(counts, seen, rw.s.pen_slot, V, token);
}

// ---- the thresholds of a small batch, split over blocks (race_kernel's rows) --------------------
// sample_kernel's stats mode works a block a row; at batch 1 its passes (max, histogram, candidates)
// ran on one SM (~100-180 us for a 152k-token row with top-k and top-p, H200). Here the passes are
// split over blocks as argmax_kernel is: argmax_kernel (max_out) finds each row's max;
// select_count_kernel adds each chunk's per-bin counts (top-k rows) or masses (top-p alone) into the
// row's histogram in global memory; select_gather_kernel finds the bins that decide the thresholds
// from it (kept_threshold_binned's choice) and appends the keys of its chunk's tokens in them to the
// row's candidates; select_kernel (a block a row) runs the radix selects over those, writes stats
// and leaves the scratch zero for the next call. Rows the split passes cannot decide (a NaN, the
// k-th value below -32, too many candidates) get the full-row selects in select_kernel, as in
// sample_kernel; rows with min-p alone need only the max.
// Scratch per row, zero between calls: count [SEL_BINS] (u32), mass [SEL_BINS] (u64), ncand, flags
// (1: a NaN); written before read: cand [SEL_CAP].

struct SelectScratch {
  u32* count;
  u64* mass;
  u32* ncand;
  u32* flags;
  u32* cand;
  const float* row_max;
};
// The scratch as kernel arguments (one per pointer: the launcher passes no structs), and the struct.
#define SELECT_SCRATCH_PARAMS \
    u32* __restrict__ sc_count, u64* __restrict__ sc_mass, u32* __restrict__ sc_ncand, u32* __restrict__ sc_flags, \
    u32* __restrict__ sc_cand, const float* __restrict__ sc_row_max
#define SELECT_SCRATCH {sc_count, sc_mass, sc_ncand, sc_flags, sc_cand, sc_row_max}

__device__ __forceinline__ bool top_k_row(const RowParams& p, int V) {
  return !p.greedy && p.top_k > 0 && p.top_k < V;
}

__device__ __forceinline__ bool top_p_only_row(const RowParams& p, int V) {
  return !p.greedy && !top_k_row(p, V) && p.top_p < 1.0;
}

extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) select_count_kernel(
    const float* __restrict__ logits, int V, RowParams* __restrict__ table, const RowParams* __restrict__ fresh,
    const RowStep* __restrict__ steps, u64 call_step, SELECT_SCRATCH_PARAMS) {
  pdl_enter();
  const SelectScratch sc SELECT_SCRATCH;
  u64* const mass = reinterpret_cast<u64*>(s_sel);
  u32* const count = reinterpret_cast<u32*>(s_sel + SEL_BINS * 8);
  const int row = blockIdx.x, tid = threadIdx.x;
  Row rw;
  load_row(rw, table, fresh, steps, call_step, row);
  const bool by_count = top_k_row(rw.p, V);
  if (!by_count && !top_p_only_row(rw.p, V)) return;  // uniform over the block
  const Scale scale(finite_or_zero(sc.row_max[row]), rw.p.temperature);
  int g0, g1;
  split_chunk(V, &g0, &g1);
  const bool nan = histogram_pass(logits + (size_t)row * V, V, g0, g1, scale, by_count);
  if (__syncthreads_or(nan) && tid == 0) atomicOr(sc.flags + row, 1u);
  const size_t at = (size_t)row * SEL_BINS;
  for (int b = tid; b < SEL_BINS; b += blockDim.x) {
    if (by_count && count[b]) atomicAdd(sc.count + at + b, count[b]);
    if (!by_count && mass[b]) atomicAdd(sc.mass + at + b, mass[b]);
  }
}

// The bins [*lo, *hi] whose tokens decide the row's thresholds, from its summed histogram (every
// block of select_gather_kernel scans it), as kept_threshold_binned chooses them; *mass_above and
// *total_mass for top-p alone. False when the split path cannot decide the row. Zeroes the row's
// histogram behind it when `clear` (select_kernel: the last reader).
__device__ bool split_window(const SelectScratch& sc, int row, const RowParams& p, int V, bool clear, int* lo,
                             int* hi, u64* mass_above, u64* total_mass) {
  u64* const mass = reinterpret_cast<u64*>(s_sel);
  u32* const count = reinterpret_cast<u32*>(s_sel + SEL_BINS * 8);
  const bool by_count = top_k_row(p, V);
  const size_t at = (size_t)row * SEL_BINS;
  for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {  // each thread zeroes the bins it read
    if (by_count) {
      count[b] = sc.count[at + b];
      if (clear) sc.count[at + b] = 0u;
    } else {
      mass[b] = sc.mass[at + b];
      if (clear) sc.mass[at + b] = 0ull;
    }
  }
  __syncthreads();
  *mass_above = *total_mass = 0ull;
  if (by_count) {
    inclusive_scan_bins(count);
    *lo = 0;
    *hi = crossing_bin(count, (u64)p.top_k);
    return *hi >= 0 && *hi < SEL_BINS - 1 && count[*hi] <= SEL_CAP;
  }
  inclusive_scan_bins(mass);
  *total_mass = mass[SEL_BINS - 1];
  *lo = *hi = crossing_bin(mass, top_p_target(p.top_p, *total_mass));
  if (*lo < 0) return false;
  *mass_above = *lo ? mass[*lo - 1] : 0ull;
  return true;
}

extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) select_gather_kernel(
    const float* __restrict__ logits, int V, RowParams* __restrict__ table, const RowParams* __restrict__ fresh,
    const RowStep* __restrict__ steps, u64 call_step, SELECT_SCRATCH_PARAMS) {
  pdl_enter();
  const SelectScratch sc SELECT_SCRATCH;
  const int row = blockIdx.x;
  Row rw;
  load_row(rw, table, fresh, steps, call_step, row);
  if (!top_k_row(rw.p, V) && !top_p_only_row(rw.p, V)) return;
  int lo, hi;
  u64 mass_above, total_mass;
  if (sc.flags[row] || !split_window(sc, row, rw.p, V, false, &lo, &hi, &mass_above, &total_mass)) return;
  const Scale scale(finite_or_zero(sc.row_max[row]), rw.p.temperature);
  int g0, g1;
  split_chunk(V, &g0, &g1);
  gather_pass(logits + (size_t)row * V, V, g0, g1, scale, lo, hi, sc.ncand + row, sc.cand + (size_t)row * SEL_CAP);
}

// stats[b] = (row max, threshold) for the random rows with a cut, as sample_kernel's stats mode.
extern "C" __global__ void __launch_bounds__(SAMPLER_THREADS) select_kernel(
    const float* __restrict__ logits, int V, RowParams* __restrict__ table, const RowParams* __restrict__ fresh,
    const RowStep* __restrict__ steps, u64 call_step, SELECT_SCRATCH_PARAMS, float2* __restrict__ stats) {
  pdl_enter();
  const SelectScratch sc SELECT_SCRATCH;
  const int row = blockIdx.x, tid = threadIdx.x;
  Row rw;
  load_row(rw, table, fresh, steps, call_step, row);
  const RowParams& p = rw.p;
  if (p.greedy || plain_row(p, V)) return;
  const float row_max = finite_or_zero(sc.row_max[row]);
  const bool has_k = top_k_row(p, V), has_p = p.top_p < 1.0;
  float thr = RVLLM_NEG_INF;
  bool decided = !has_k && !has_p;  // min-p alone
  if (!decided) {
    const u32 nan = sc.flags[row], n = sc.ncand[row];  // read by every thread before thread 0 zeroes them
    int lo, hi;
    u64 mass_above, total_mass;
    const bool window = split_window(sc, row, p, V, true, &lo, &hi, &mass_above, &total_mass);
    // every candidate gathered: with top-k the window's count is known; else all that fitted
    const bool ok = !nan && window && (has_k ? n == reinterpret_cast<const u32*>(s_sel + SEL_BINS * 8)[hi]
                                             : n <= SEL_CAP);
    if (tid == 0) {
      sc.flags[row] = 0u;
      sc.ncand[row] = 0u;
    }
    __syncthreads();  // the histograms are read: the candidates overwrite them
    if (ok) {
      u32* c = reinterpret_cast<u32*>(s_sel);
      for (u32 i = tid; i < n; i += blockDim.x) c[i] = sc.cand[(size_t)row * SEL_CAP + i];
      __syncthreads();
      decided = threshold_from_candidates(c, n, p.top_k, p.top_p, has_k, has_p, mass_above, total_mass, &thr);
    }
  }
  if (!decided)
    thr = kept_threshold_full_row(logits + (size_t)row * V, V, Scale(row_max, p.temperature), p.top_k, p.top_p,
                                  has_k, has_p);
  if (tid == 0) stats[row] = make_float2(row_max, fmaxf(thr, p.log_min_p));
}

// Raw Philox4x32-10: in [n, 6] = (counter 0..3, key 0..1) -> out [n, 4].
extern "C" __global__ void philox_kernel(u32* __restrict__ out, const u32* __restrict__ in, int n) {
  pdl_enter();
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const u32* a = in + 6 * t;
  u32 c0 = a[0], c1 = a[1], c2 = a[2], c3 = a[3];
  philox4x32_10(c0, c1, c2, c3, a[4], a[5]);
  out[4 * t] = c0;
  out[4 * t + 1] = c1;
  out[4 * t + 2] = c2;
  out[4 * t + 3] = c3;
}
