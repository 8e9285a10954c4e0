// The sampler's row machinery (kernels_cu/sampling.cu includes it): loads and passes over a row,
// order-preserving keys and fixed-point masses, block reductions, the radix select, and the kept
// set's thresholds (top-k, top-p; their definitions are at the top of sampling.cu), from a histogram
// of the row or by radix selects over the whole row.
#pragma once
#include "common.cuh"

#define SAMPLER_THREADS 1024
#define NO_TOKEN 0x7fffffff

typedef unsigned int u32;
typedef unsigned long long u64;

// ---- row loads -----------------------------------------------------------------------------------
// Tokens 4g .. 4g + 3 of a row (g < ceil(V / 4)), -inf past V. One 16-byte load when the row is
// 16-byte aligned and V a multiple of 4 (every row of a contiguous [B, V] array then is), else four
// guarded loads. A 1024-thread block with one 4-byte load in flight per thread reached about a third
// of the DRAM bandwidth on an H100 (256 rows x 152k floats: ~300 us a call); four per load
// instruction keep more bytes in flight per SM.
__device__ __forceinline__ void load4(const float* __restrict__ x, int V, int g, float (&v)[4]) {
  if ((V & 3) == 0 && (reinterpret_cast<size_t>(x) & 15) == 0) {  // uniform: the same for the whole row
    const float4 q = reinterpret_cast<const float4*>(x)[g];
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = 4 * g + j < V ? x[4 * g + j] : RVLLM_NEG_INF;
  }
}

// ---- order-preserving keys and fixed-point masses ---------------------------------------------
// Larger float -> larger key; -0 maps to +0's key (they compare equal as floats). NaN: unordered.
__device__ __forceinline__ u32 order_key(float f) {
  u32 b = __float_as_uint(f);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// e^s * 2^40 for s <= 0, rounded down: a row of V < 2^23 tokens sums below 2^63.
__device__ __forceinline__ u64 fixed_mass(float s) {
  return (u64)(expf(s) * 1099511627776.0f);
}

// ---- block reductions (every thread gets the result; a leading barrier allows reuse) ----------
__device__ __forceinline__ u64 block_sum_u64(u64 v) {
  __shared__ u64 s_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) s_part[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? s_part[lane] : 0ull;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (value, index) with the largest value, the smallest index among equal values. NO_TOKEN marks
// "none" (a thread that saw no candidate).
__device__ __forceinline__ void argmax_pair(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

__device__ __forceinline__ void block_argmax(float& v, int& i) {
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    argmax_pair(v, i, ov, oi);
  }
  __syncthreads();
  if (lane == 0) {
    s_v[warp] = v;
    s_i[warp] = i;
  }
  __syncthreads();
  const bool have = lane < (int)(blockDim.x >> 5);
  v = have ? s_v[lane] : RVLLM_NEG_INF;
  i = have ? s_i[lane] : NO_TOKEN;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    argmax_pair(v, i, ov, oi);
  }
}

// ---- radix select -------------------------------------------------------------------------------
// Over the row's keys (8 bits a pass, most significant first), the key K with
//   W(key > K) < target <= W(key >= K),
// W = count (BY_MASS false: K is the target-th largest key) or the sum of the weights (BY_MASS
// true: the value where the mass from the top first reaches target). *above = W(key > K).
// kw(i, key, weight) gives token i's key and weight. Returns false when the row's total W is
// below target (then *key_out is not set); every thread returns the same.
// Its shared memory is at file scope: a kernel instantiates radix_select up to five times (top-k,
// top-p, logprobs, and top-k / top-p over the candidates of kept_threshold_binned), and arrays
// declared inside would be allocated once per instantiation, past the 48 KB of static shared memory.
// Sharing is safe: a call writes s_radix_bin / _above / _found only after a barrier that every
// thread reaches after reading the previous call's values.
__shared__ u64 s_radix_hist[256];
__shared__ u64 s_radix_above;
__shared__ u32 s_radix_bin;
__shared__ int s_radix_found;
__shared__ u64 s_radix_w[32][32];  // per warp: the lanes' weights, for the leader to add (BY_MASS)

template <bool BY_MASS, class KeyWeight>
__device__ bool radix_select(const KeyWeight& kw, int V, u64 target, u32* key_out, u64* above_out) {
  u64* const s_hist = s_radix_hist;
  u64& s_above = s_radix_above;
  u32& s_bin = s_radix_bin;
  int& s_found = s_radix_found;
  u64 (*const s_w)[32] = s_radix_w;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  u32 prefix = 0u, mask = 0u;
  u64 above = 0ull;
#pragma unroll 1
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += blockDim.x) s_hist[b] = 0ull;
    __syncthreads();
    for (int base = 0; base < V; base += blockDim.x) {  // warp-uniform trip count: ballots below
      const int i = base + tid;
      bool in = false;
      u32 bin = 0u;
      u64 w = 0ull;
      if (i < V) {
        u32 k;
        kw(i, k, w);
        in = (k & mask) == prefix && (!BY_MASS || w);
        bin = (k >> shift) & 255u;
      }
      // Most of a row shares a few bins (first pass: sign and exponent): one atomic per bin and
      // warp, by its lowest lane, instead of up to 32 on one address. Integer sums: any order.
      const u32 active = __ballot_sync(0xffffffffu, in);
      if (in) {
        const u32 peers = __match_any_sync(active, bin);
        const int leader = __ffs(peers) - 1;
        if (BY_MASS) {
          s_w[warp][lane] = w;
          __syncwarp(active);
          if (lane == leader) {
            u64 sum = 0ull;
            for (u32 m = peers; m; m &= m - 1u) sum += s_w[warp][__ffs(m) - 1];
            atomicAdd(&s_hist[bin], sum);
          }
          __syncwarp(active);  // s_w is rewritten by the next tile
        } else if (lane == leader) {
          atomicAdd(&s_hist[bin], (u64)__popc(peers));
        }
      }
    }
    __syncthreads();
    if (tid < 32) {  // warp 0 finds the bin: lane l holds bins 255-8l .. 248-8l (descending)
      u64 local = 0ull;
#pragma unroll
      for (int j = 0; j < 8; ++j) local += s_hist[255 - 8 * lane - j];
      u64 incl = local;  // inclusive prefix sum over lanes = mass of bins >= this lane's lowest
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const u32 hits = __ballot_sync(0xffffffffu, above + incl >= target);
      if (hits == 0u) {
        if (lane == 0) s_found = 0;
      } else if (lane == __ffs(hits) - 1) {
        // the crossing is within this lane's 8 bins: everything above them is < target
        u64 c = above + incl - local;
        int b = 255 - 8 * lane;
        for (int j = 0; j < 7; ++j, --b) {
          const u64 h = s_hist[b];
          if (c + h >= target) break;
          c += h;
        }
        s_bin = (u32)b;
        s_above = c;
        s_found = 1;
      }
    }
    __syncthreads();
    if (!s_found) return false;
    prefix |= s_bin << shift;
    mask |= 255u << shift;
    above = s_above;
  }
  *key_out = prefix;
  *above_out = above;
  return true;
}

// ---- passes over a row ----------------------------------------------------------------------------
// f(g, v) for this thread's groups g = g0 + tid, g0 + tid + blockDim.x, ... below g1 (v: tokens
// 4g .. 4g + 3, load4). The next group's load is issued before f works on this one: with one
// 16-byte load in flight per thread, a pass that does arithmetic per token (the race: Philox and
// two logs) read its rows at ~0.9 TB/s where argmax_kernel reads them at ~2.4 (NOTES #42).
template <class F>
__device__ __forceinline__ void for_each_group(const float* __restrict__ x, int V, int g0, int g1, F&& f) {
  int g = g0 + threadIdx.x;
  if (g >= g1) return;
  float v[4];
  load4(x, V, g, v);
  for (;;) {
    const float cur[4] = {v[0], v[1], v[2], v[3]};
    const int next = g + blockDim.x;
    if (next < g1) load4(x, V, next, v);
    f(g, cur);
    if (next >= g1) break;
    g = next;
  }
}

// ---- the kept set's thresholds from a histogram of the row -----------------------------------
// radix_select reads the whole row once per 8 bits of key: top-k and top-p together took seven
// passes over the row with a log per token in four of them (1-1.9 ms a call at 256 rows x 152k,
// NOTES #43). Here one pass counts the tokens (top-k) or sums their masses (top-p alone) per
// value bin of scaled (1/64 wide over (-32, 0]); the bins give where the k-th value or the top-p
// crossing lies; a second pass copies the keys of the tokens that can decide the thresholds (with
// top-k: all down to the k-th value's bin; else the crossing's bin) into shared memory, and the
// exact radix selects run over those few keys. Same definitions, same integer masses: the same
// thresholds as the full-row selects, which remain the fallback when the candidates do not fit
// (or the k-th value lies below -32, or the row has a NaN).
#define SEL_BINS 2048                  // = 2 * SAMPLER_THREADS: a thread scans two bins
#define SEL_BIN_WIDTH_INV 64.f
#define SEL_CAP (SEL_BINS * 12 / 4)    // candidate keys (u32) in the histograms' bytes
static_assert(SEL_BINS == 2 * SAMPLER_THREADS, "kept_threshold_binned scans two bins a thread");

__shared__ __align__(16) unsigned char s_sel[SEL_BINS * 12];  // histograms (u64 mass, u32 count), then candidates
__shared__ u32 s_sel_ncand;
__shared__ int s_sel_bin;

// Larger s -> the same or a smaller bin, so each bin is a range of keys, the highest first. The last
// bin also takes everything at or below -32 (mass 0: e^-32 * 2^40 < 1), -inf and NaN.
__device__ __forceinline__ int sel_bin(float s) {
  return s > -32.f ? max(0, min((int)(-s * SEL_BIN_WIDTH_INV), SEL_BINS - 1)) : SEL_BINS - 1;
}

// In place: h[b] becomes the sum of h[0..b]. Needs blockDim.x * 2 == SEL_BINS.
template <class T>
__device__ void inclusive_scan_bins(T* h) {
  __shared__ T s_warp_total[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T a = h[2 * tid], b = h[2 * tid + 1];
  T incl = a + b;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) s_warp_total[warp] = incl;
  __syncthreads();
  for (int w = 0; w < warp; ++w) incl += s_warp_total[w];
  h[2 * tid] = incl - b;
  h[2 * tid + 1] = incl;
  __syncthreads();
}

// The bin b with S(< b) < target <= S(<= b) over an inclusive scan S; -1 if S's total is below target.
template <class T>
__device__ int crossing_bin(const T* incl, u64 target) {
  __syncthreads();  // s_sel_bin: a previous call's threads may still read it
  if (threadIdx.x == 0) s_sel_bin = -1;
  __syncthreads();
  for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
    const u64 before = b ? (u64)incl[b - 1] : 0ull;
    if (before < target && target <= (u64)incl[b]) s_sel_bin = b;  // one bin at most
  }
  __syncthreads();
  return s_sel_bin;
}

__device__ __forceinline__ u64 top_p_target(double top_p, u64 z) {
  const double t = ceil(top_p * (double)z);
  return t < 1.0 ? 1ull : (u64)t;
}

// The histogram in s_sel (mass [SEL_BINS] u64, then count [SEL_BINS] u32) of tokens 4 g0 .. 4 g1 of
// row x: zeroed, then counts (by_count) or fixed-point masses per value bin (sel_bin). The last bin's
// tokens (mass 0) are counted with one atomic a warp, not one a token on one address. Returns whether
// this thread saw a NaN; the caller's next barrier orders the histogram before its reads.
template <class Scale>
__device__ bool histogram_pass(const float* __restrict__ x, int V, int g0, int g1, const Scale& scale, bool by_count) {
  u64* const mass = reinterpret_cast<u64*>(s_sel);
  u32* const count = reinterpret_cast<u32*>(s_sel + SEL_BINS * 8);
  for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) {
    mass[b] = 0ull;
    count[b] = 0u;
  }
  __syncthreads();
  u32 far = 0u;
  bool nan = false;
  for_each_group(x, V, g0, g1, [&](int g, const float (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * g + j >= V) break;
      const float s = scale(v[j]);
      nan |= s != s;
      const int b = sel_bin(s);
      if (b == SEL_BINS - 1) {
        ++far;
      } else if (by_count) {
        atomicAdd(count + b, 1u);
      } else {
        const u64 w = fixed_mass(s);
        if (w) atomicAdd(mass + b, w);
      }
    }
  });
  for (int o = 16; o > 0; o >>= 1) far += __shfl_xor_sync(0xffffffffu, far, o);
  if (by_count && (threadIdx.x & 31) == 0 && far) atomicAdd(count + SEL_BINS - 1, far);
  return nan;
}

// Appends the keys of tokens 4 g0 .. 4 g1 of row x whose bin lies in [lo, hi] to cand (shared or
// global), counting them all in *ncand; only the first SEL_CAP are kept (more: the caller falls back).
template <class Scale>
__device__ void gather_pass(const float* __restrict__ x, int V, int g0, int g1, const Scale& scale, int lo, int hi,
                            u32* ncand, u32* cand) {
  for_each_group(x, V, g0, g1, [&](int g, const float (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (4 * g + j >= V) break;
      const float s = scale(v[j]);
      const int b = sel_bin(s);
      if (b >= lo && b <= hi) {
        const u32 at = atomicAdd(ncand, 1u);
        if (at < SEL_CAP) cand[at] = order_key(s);
      }
    }
  });
}

// The thresholds from the candidate keys cand[0, n) (shared or global memory): with top-k, every
// token down to the k-th value's bin; with top-p alone, the crossing bin's tokens, mass_above the
// mass of the tokens above them and total_mass the row's. Returns false, with every thread, if a
// select finds no crossing (not expected: then the caller falls back to the full row).
__device__ bool threshold_from_candidates(const u32* cand, u32 n, int top_k, double top_p, bool has_k, bool has_p,
                                          u64 mass_above, u64 total_mass, float* thr_out) {
  const int tid = threadIdx.x;
  float thr = RVLLM_NEG_INF;
  u32 k_key = 0u;
  u64 cnt_gt = 0ull;
  if (has_k) {
    auto by_count = [&](int i, u32& k, u64& w) {
      k = cand[i];
      w = 1ull;
    };
    if (!radix_select<false>(by_count, (int)n, (u64)top_k, &k_key, &cnt_gt)) return false;
    thr = key_value(k_key);
  }
  if (has_p) {
    u64 z = total_mass;
    if (has_k) {  // the mass of the top-k set: above thr_k, plus the ties at the k-th it takes
      u64 zc = 0ull;
      for (int i = tid; i < (int)n; i += blockDim.x)
        if (cand[i] > k_key) zc += fixed_mass(key_value(cand[i]));
      z = block_sum_u64(zc) + (u64)((long long)top_k - (long long)cnt_gt) * fixed_mass(thr);
    }
    const u64 target = top_p_target(top_p, z);
    auto by_mass = [&](int i, u32& k, u64& w) {
      k = cand[i];
      w = fixed_mass(key_value(k));
    };
    u32 p_key;
    u64 unused;
    if (target <= mass_above || !radix_select<true>(by_mass, (int)n, target - mass_above, &p_key, &unused))
      return false;
    thr = fmaxf(thr, key_value(p_key));
  }
  *thr_out = thr;
  return true;
}

// thr = max(thr_k, thr_p) as defined at the top of sampling.cu (top-k when has_k, top-p when has_p,
// at least one). Returns false, with every thread, when the binned path cannot decide.
template <class Scale>
__device__ bool kept_threshold_binned(const float* __restrict__ x, int V, const Scale& scale, int top_k,
                                      double top_p, bool has_k, bool has_p, float* thr_out) {
  u64* const mass = reinterpret_cast<u64*>(s_sel);
  u32* const count = reinterpret_cast<u32*>(s_sel + SEL_BINS * 8);
  u32* const cand = reinterpret_cast<u32*>(s_sel);
  const int tid = threadIdx.x;
  if (tid == 0) s_sel_ncand = 0u;
  const bool nan = histogram_pass(x, V, 0, (V + 3) >> 2, scale, has_k);
  if (__syncthreads_or(nan)) return false;  // a NaN's key is above +inf's, its bin the last: not monotone

  // The candidates: with top-k, every token down to the k-th value's bin (the top-k set and, inside
  // it, top-p's crossing and its Z: no masses needed per bin, only counts, 32-bit atomics); with
  // top-p alone, the tokens of the bin where the mass from the top reaches top_p of the total.
  int lo = 0, hi = 0;
  u64 total_mass = 0ull;
  if (has_k) {
    inclusive_scan_bins(count);
    hi = crossing_bin(count, (u64)top_k);  // found: the row has V > top_k tokens
    if (hi < 0 || hi == SEL_BINS - 1 || count[hi] > SEL_CAP) return false;
  } else {
    inclusive_scan_bins(mass);
    total_mass = mass[SEL_BINS - 1];
    lo = hi = crossing_bin(mass, top_p_target(top_p, total_mass));
    if (lo < 0) return false;  // a row of -inf (no mass)
  }
  const u64 mass_above = lo ? mass[lo - 1] : 0ull;  // tokens of bins < lo (top-p alone): above every candidate
  __syncthreads();  // every thread has read the histograms: the candidates overwrite them

  gather_pass(x, V, 0, (V + 3) >> 2, scale, lo, hi, &s_sel_ncand, cand);
  __syncthreads();
  const u32 n = s_sel_ncand;
  if (n > SEL_CAP) return false;

  return threshold_from_candidates(cand, n, top_k, top_p, has_k, has_p, mass_above, total_mass, thr_out);
}

// The same thresholds by radix selects over the whole row (up to four passes each, plus one for
// top-p's Z): kept_threshold_binned's fallback.
template <class Scale>
__device__ float kept_threshold_full_row(const float* __restrict__ x, int V, const Scale& scale, int top_k,
                                         double top_p, bool has_k, bool has_p) {
  auto scaled = [&](int i) { return scale(x[i]); };
  float thr = RVLLM_NEG_INF;
  u64 cnt_gt = 0ull;
  u32 k_key = 0u;
  if (has_k) {
    auto by_count = [&](int i, u32& k, u64& w) {
      k = order_key(scaled(i));
      w = 1ull;
    };
    if (radix_select<false>(by_count, V, (u64)top_k, &k_key, &cnt_gt)) thr = key_value(k_key);
  }
  if (has_p) {
    u64 z = 0ull;  // the mass top-p is a fraction of
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float s = scaled(i);
      if (!has_k || order_key(s) > k_key) z += fixed_mass(s);
    }
    z = block_sum_u64(z);
    if (has_k) z += (u64)((long long)top_k - (long long)cnt_gt) * fixed_mass(thr);  // ties at the k-th
    auto by_mass = [&](int i, u32& k, u64& w) {
      const float s = scaled(i);
      k = order_key(s);
      w = fixed_mass(s);
    };
    u32 p_key;
    u64 unused;
    if (radix_select<true>(by_mass, V, top_p_target(top_p, z), &p_key, &unused)) thr = fmaxf(thr, key_value(p_key));
  }
  return thr;
}
