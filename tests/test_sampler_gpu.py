"""The GPU sampler (kernels_cu/sampling.cu, rvllm/sampling/gpu_sampler.py) against the NumPy Sampler.

Two halves:
- CPU (always run): a NumPy Philox4x32-10 against Random123's known answers, and a NumPy emulation
  of the kernels' algorithm (radix selects over order keys, fixed-point masses, the thresholds, the
  race, the penalty slots' updates and counts) reading the very buffer `pack_step` builds, against
  Sampler.process_logits, Sampler.kept_tokens and gather_logprobs. This pins the semantics and the
  buffer layout.
- GPU (-m gpu; skipped without a CUDA device): the kernels themselves against the NumPy Sampler.
  Every device allocation starts filled with 0xFF bytes (NaN floats, -1 ints), so an output the
  kernels forgot to write shows up.
Chi-square critical values are for alpha = 1e-3; the data are seeded, so the tests are deterministic.
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from rvllm.backend.cuda import is_cuda_available
from rvllm.sampling.gpu_sampler_inputs import MAX_TOP_LOGPROBS, PARAMS_DTYPE, STEP_DTYPE, pack_step, resolve_rows
from rvllm.sampling.param_slots import NO_SLOT, ParamSlots
from rvllm.sampling.logprobs import gather_logprobs, log_softmax
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling.penalty_slots import PLACEHOLDER, PenaltySlots
from rvllm.sampling.sampler import Sampler
from rvllm.sampling_params import SamplingParams
from tests.test_sampler import meta_for

requires_gpu = pytest.mark.skipif(not is_cuda_available(), reason="no CUDA device (cupy missing or no GPU)")
gpu = [pytest.mark.gpu, requires_gpu]

M32 = 0xFFFFFFFF
KAT = [  # Random123 kat_vectors: (counter, key, output)
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32,) * 4, (M32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """Upper critical value of chi-square(dof) at alpha = 1e-3 (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_matches_distribution(tokens, probs):
    """Pearson chi-square of the sampled counts against probs; cells expecting < 5 are pooled."""
    n = len(tokens)
    counts = np.bincount(np.asarray(tokens), minlength=len(probs)).astype(np.float64)
    assert counts[probs <= 0].sum() == 0, "sampled a token outside the support"
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & (probs > 0)].sum()] if (~big & (probs > 0)).any() else [])
    exp = list(expected[big]) + ([expected[~big & (probs > 0)].sum()] if (~big & (probs > 0)).any() else [])
    obs, exp = np.asarray(obs), np.asarray(exp)
    assert len(exp) >= 2, "test design: need at least two cells"
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    assert stat < chi2_critical(dof), (stat, dof, chi2_critical(dof))


def target_probs(logits_row, kept, temperature):
    """The distribution a random row samples from: softmax(x / T) over its kept set (float64)."""
    x = np.asarray(logits_row, np.float64) / temperature
    p = np.zeros(x.size)
    p[kept] = np.exp(x[kept] - x[kept].max())
    return p / p.sum()


# ---- NumPy Philox4x32-10 and the noise, as sampling.cu computes them ------------------------------

def philox(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(v, np.uint64) & np.uint64(M32) for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    m0, m1, mask = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(M32)
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & mask
            k1 = (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = m0 * c[0], m1 * c[2]  # < 2^64: exact
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
    return [v.astype(np.uint32) for v in c]


def log_exp_noise(seed: int, step: int, tag: int, tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, np.int64)
    words = philox(tokens >> 2, step & M32, step >> 32, tag, seed & M32, (seed >> 32) & M32)
    w = np.choose(tokens & 3, words)
    u = ((w >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    return np.log(-np.log(u))


def test_philox_matches_random123_known_answers():
    for ctr, key, want in KAT:
        got = philox(*ctr, *key)
        assert [int(v) for v in got] == list(want)


def test_exponential_noise_is_finite_and_exp1():
    t = np.arange(200_000)
    ln_q = log_exp_noise(12345, 7, 0, t)
    q = np.exp(ln_q.astype(np.float64))
    assert np.isfinite(ln_q).all() and (q > 0).all()
    assert abs(q.mean() - 1) < 0.01 and abs(q.var() - 1) < 0.03
    assert not np.array_equal(ln_q, log_exp_noise(12345, 8, 0, t)), "the step must change the noise"


# ---- a NumPy emulation of sampling.cu, fed by pack_step's buffer ---------------------------------

def unpack(host, offsets, n, vocab):
    def sec(name, dtype):
        off, size = offsets[name]
        return host[off:off + size // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize].view(dtype)
    out = {k: sec(k, np.int32) for k in ("prompt_off", "prompt_tok", "new_off", "new_tok", "bias_off",
                                          "bias_tok", "sup_off", "sup_tok")}
    out["bias_val"] = sec("bias_val", np.float32)
    out["masks"] = sec("masks", np.uint8)
    out["steps"] = host[offsets["steps"][0]:offsets["steps"][0] + n * STEP_DTYPE.itemsize].view(STEP_DTYPE)
    out["fresh"] = sec("fresh", PARAMS_DTYPE)
    return out


def order_key(f: np.ndarray) -> np.ndarray:
    b = np.asarray(f, np.float32).view(np.uint32).copy()
    b[b == 0x80000000] = 0
    return np.where(b & 0x80000000, ~b, b | np.uint32(0x80000000)).astype(np.uint32)


def key_value(k: int) -> np.float32:
    b = (k & 0x7FFFFFFF) if k & 0x80000000 else (~k & M32)
    return np.array([b], np.uint32).view(np.float32)[0]


def fixed_mass(s: np.ndarray) -> np.ndarray:
    return (np.exp(np.asarray(s, np.float32)) * np.float32(2.0 ** 40)).astype(np.uint64)


def radix_select(keys, weights, target):
    """radix_select in sampling.cu, including its warp-0 walk (lanes of 8 bins, first lane to hit)."""
    prefix = mask = above = 0
    for shift in (24, 16, 8, 0):
        sel = (keys & np.uint32(mask)) == np.uint32(prefix)
        hist = np.zeros(256, np.uint64)
        np.add.at(hist, ((keys[sel] >> np.uint32(shift)) & np.uint32(255)).astype(np.int64), weights[sel])
        hist = [int(h) for h in hist]
        local = [sum(hist[255 - 8 * lane - j] for j in range(8)) for lane in range(32)]
        incl = np.cumsum(local).tolist()
        hits = [lane for lane in range(32) if above + incl[lane] >= target]
        if not hits:
            return None
        lane = hits[0]
        c, b = above + incl[lane] - local[lane], 255 - 8 * lane
        for _ in range(7):
            if c + hist[b] >= target:
                break
            c += hist[b]
            b -= 1
        prefix |= b << shift
        mask |= 255 << shift
        above = c
    return prefix, above


def top_p_target(top_p: float, z: int) -> int:
    return max(1, math.ceil(top_p * float(z)))


def full_row_threshold(scaled, k: int, top_p: float) -> np.float32:
    """max(thr_k, thr_p) (sampling.cu's definitions; -inf when neither is on) by radix selects over
    the whole row: kept_threshold_full_row."""
    keys = order_key(scaled)
    thr = np.float32(-np.inf)
    if k:
        k_key, cnt_gt = radix_select(keys, np.ones(keys.size, np.uint64), k)
        thr = key_value(k_key)
    if top_p < 1.0:
        mass = fixed_mass(scaled)
        z = int(mass[keys > k_key].sum()) + (k - cnt_gt) * int(fixed_mass(np.float32(thr))) if k else int(mass.sum())
        found = radix_select(keys, mass, top_p_target(top_p, z))
        if found:
            thr = np.fmax(thr, key_value(found[0]))  # fmaxf: a NaN loses
    return thr


SEL_BINS, SEL_CAP = 2048, 2048 * 12 // 4  # sampling.cu


def sel_bins(scaled) -> np.ndarray:
    """sampling.cu sel_bin: trunc(-s * 64) for s > -32 (clamped to the bins), else the last bin."""
    s = np.asarray(scaled, np.float32)
    b = np.full(s.shape, SEL_BINS - 1, np.int64)
    ok = s > np.float32(-32)
    with np.errstate(invalid="ignore", over="ignore"):
        b[ok] = np.clip(np.trunc(-s[ok] * np.float32(64)), 0, SEL_BINS - 1).astype(np.int64)
    return b


def crossing_bin(incl: np.ndarray, target: int) -> int:
    """The bin b with S(< b) < target <= S(<= b) over the inclusive sums incl; -1 if none."""
    incl = [int(v) for v in incl]
    before = [0] + incl[:-1]
    return next((b for b in range(len(incl)) if before[b] < target <= incl[b]), -1)


def binned_threshold(scaled, k: int, top_p: float):
    """kept_threshold_binned: the same threshold as full_row_threshold from a histogram of the row by
    value bins (counts with top-k, masses with top-p alone) and radix selects over the tokens that
    can decide it (with top-k every token down to the k-th value's bin, else the top-p crossing's
    bin); None where the kernel falls back to the full row (a NaN, the k-th value below -32, more
    candidates than fit)."""
    scaled = np.asarray(scaled, np.float32)
    if np.isnan(scaled).any():
        return None
    keys, bins = order_key(scaled), sel_bins(scaled)
    if k:
        count_incl = np.cumsum(np.bincount(bins, minlength=SEL_BINS))
        lo, hi = 0, crossing_bin(count_incl, k)
        if hi < 0 or hi == SEL_BINS - 1 or count_incl[hi] > SEL_CAP:
            return None
        mass_above = 0
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            mass = fixed_mass(scaled)
        mass_h = np.zeros(SEL_BINS, np.uint64)
        np.add.at(mass_h, bins, mass)
        mass_incl = np.cumsum(mass_h)
        total = int(mass_incl[-1])
        lo = hi = crossing_bin(mass_incl, top_p_target(top_p, total))
        if lo < 0:
            return None
        mass_above = int(mass_incl[lo - 1]) if lo else 0
    cand = keys[(bins >= lo) & (bins <= hi)]
    if cand.size > SEL_CAP:
        return None
    cand_mass = fixed_mass(np.array([key_value(int(c)) for c in cand], np.float32))
    thr = np.float32(-np.inf)
    if k:
        k_key, cnt_gt = radix_select(cand, np.ones(cand.size, np.uint64), k)
        thr = key_value(k_key)
    if top_p < 1.0:
        z = total if not k else int(cand_mass[cand > k_key].sum()) + (k - cnt_gt) * int(fixed_mass(np.float32(thr)))
        target = top_p_target(top_p, z)
        found = radix_select(cand, cand_mass, target - mass_above) if target > mass_above else None
        if not found:
            return None
        thr = np.fmax(thr, key_value(found[0]))  # fmaxf: a NaN loses
    return thr


class DeviceState:
    """GpuSampler's per-request state with NumPy arrays standing in for the device's: the host's slot
    bookkeeping, counts [S, V] and seen [S, V] (penalties) and the parameter table [S]. All
    start as garbage, as the device's (cp.empty): a slot must be reset or written before it is read."""

    def __init__(self, vocab: int, num_slots: int = 256):
        self.slots = PenaltySlots(num_slots)
        self.counts = np.full((num_slots, vocab), 7, np.int32)
        self.seen = np.full((num_slots, vocab), 3, np.uint8)
        self.param_slots = ParamSlots(num_slots)
        self.param_table = np.frombuffer(np.random.default_rng(0).bytes(num_slots * PARAMS_DTYPE.itemsize),
                                         PARAMS_DTYPE).copy()


def emulate(logits, meta, step=0, seed=0, state=None, sample=True):
    """(processed logits, tokens, kept masks (None for greedy rows), logprob rows) as the kernels
    compute them. state: the penalty state (DeviceState) kept across calls; fresh when None.
    sample: the call samples (GpuSampler.launch: sample_kernel counts the tokens in the slots), else
    it only processes (GpuSampler.process_logits)."""
    n, vocab = logits.shape
    state = state if state is not None else DeviceState(vocab)
    updates = None if meta.no_penalties else state.slots.plan(meta, sampling=sample)
    host, offsets = pack_step(meta, vocab, step, seed, updates, state.param_slots.plan(meta))
    s = unpack(host, offsets, n, vocab)
    p = resolve_rows(state.param_table, s["fresh"], s["steps"], step)
    x = np.array(logits, np.float32)
    if meta.needs_logit_processing:
        for r in range(n):
            row = x[r]
            slot = p["pen_slot"][r]
            if slot >= 0:  # the slot's update, then the penalties on the seen tokens
                cnt, seen = state.counts[slot], state.seen[slot]
                if p["pen_reset"][r]:
                    cnt[:] = 0
                    seen[:] = 0
                    seen[s["prompt_tok"][s["prompt_off"][r]:s["prompt_off"][r + 1]]] = 1
                new = s["new_tok"][s["new_off"][r]:s["new_off"][r + 1]]
                np.add.at(cnt, new, 1)
                seen[new] = 1
                rep, freq, pres = (p[f][r] for f in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
                on = seen != 0
                if rep != 1:
                    row[on] = np.where(row[on] > 0, row[on] / rep, row[on] * rep)
                hit = on & (cnt > 0)
                if freq != 0 or pres != 0:
                    row[hit] -= freq * cnt[hit].astype(np.float32) + pres
            for j in range(s["bias_off"][r], s["bias_off"][r + 1]):
                row[s["bias_tok"][j]] += s["bias_val"][j]
            row[s["sup_tok"][s["sup_off"][r]:s["sup_off"][r + 1]]] = -np.inf
            if p["mask_row"][r] >= 0:
                m = s["masks"][p["mask_row"][r] * vocab:(p["mask_row"][r] + 1) * vocab]
                row[m == 0] = -np.inf
    tokens, kept, rows = [], [], []
    for r in range(n):
        xr, pr = x[r], p[r]
        mx = xr.max()
        token = int(xr.argmax()) if mx > -np.inf else 0
        row_max = mx if np.isfinite(mx) else np.float32(0)
        keep = None
        plain = (not pr["greedy"] and pr["top_k"] == 0 and pr["top_p"] >= 1.0 and pr["log_min_p"] == -np.inf
                 and pr["num_logprobs"] < 0)
        if plain:  # sample_kernel's one-pass race on x / T over every token above -inf
            keep = xr > -np.inf
            if keep.any():
                ids = np.flatnonzero(keep)
                t = pr["temperature"]
                race = (xr[ids] if t == 1 else xr[ids] / t) - log_exp_noise(int(pr["seed"]), int(pr["step"]),
                                                                           int(pr["tag"]), ids)
                token = int(ids[np.argmax(race)])
        elif not pr["greedy"]:
            scaled = (xr - row_max) / pr["temperature"]
            thr = np.fmax(full_row_threshold(scaled, int(pr["top_k"]), float(pr["top_p"])), pr["log_min_p"])
            keep = (scaled >= thr) & (scaled > -np.inf)
            if keep.any():
                ids = np.flatnonzero(keep)
                race = scaled[ids] - log_exp_noise(int(pr["seed"]), int(pr["step"]), int(pr["tag"]), ids)
                token = int(ids[np.argmax(race)])
        tokens.append(token)
        kept.append(keep)
        if sample and pr["pen_slot"] >= 0:
            state.counts[pr["pen_slot"], token] += 1
            state.seen[pr["pen_slot"], token] = 1
        if pr["num_logprobs"] >= 0:
            lse = np.log(np.exp(xr - row_max).sum(dtype=np.float32))
            lp = (xr - row_max) - lse
            kk = min(int(pr["num_logprobs"]), vocab)
            top = np.lexsort((np.arange(vocab), -lp))[:kk]
            if kk:  # the kernel's selection: the radix select's k-th key, then the lowest ids among ties
                kth, n_gt = radix_select(order_key(lp), np.ones(vocab, np.uint64), kk)
                lk = order_key(lp)
                assert (lk > kth).sum() == n_gt and set(top) == set(np.flatnonzero(lk > kth)) | set(
                    np.flatnonzero(lk == kth)[:kk - n_gt])
            rows.append((float(lp[token]), int((lp >= lp[token]).sum()), top.tolist(), lp[top].tolist()))
        else:
            rows.append(None)
    return x, tokens, kept, rows


def random_params(rng, n, vocab, greedy_share=0.2):
    params = []
    for _ in range(n):
        kind = rng.integers(8)
        sp = dict(temperature=0.0 if rng.random() < greedy_share else float(rng.choice([0.5, 1.0, 1.7])))
        if kind in (1, 4, 6):
            sp["top_k"] = int(rng.choice([1, 2, 5, 40, vocab - 1, vocab, vocab + 5]))
        if kind in (2, 4, 5, 6):
            sp["top_p"] = float(rng.choice([0.05, 0.5, 0.9, 0.999]))
        if kind in (3, 5, 6):
            sp["min_p"] = float(rng.choice([0.01, 0.1, 0.5]))
        if rng.random() < 0.3:
            sp["seed"] = int(rng.integers(-2**63, 2**63))
        params.append(SamplingParams(**sp))
    return params


def crafted_logits(rng, n, vocab, kind):
    if kind == "normal":
        return rng.normal(0, 2, size=(n, vocab)).astype(np.float32)
    if kind == "ties":  # multiples of 1/4: many ties, including at the top-k / top-p edges
        return (np.round(rng.normal(0, 1.5, size=(n, vocab)) * 4) / 4).astype(np.float32)
    x = rng.normal(-4, 1, size=(n, vocab)).astype(np.float32)  # "peaked": a few dominant tokens, -inf holes
    for r in range(n):
        x[r, rng.choice(vocab, 4, replace=False)] = rng.normal(6, 2, size=4)
        x[r, rng.choice(vocab, vocab // 10, replace=False)] = -np.inf
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "peaked"])
@pytest.mark.parametrize("vocab", [50, 1000])
def test_emulated_kernels_keep_the_numpy_kept_set(rng, kind, vocab):
    n = 48
    logits = crafted_logits(rng, n, vocab, kind)
    params = random_params(rng, n, vocab)
    meta = meta_for(params)
    _, tokens, kept, _ = emulate(logits, meta, step=3, seed=99)
    want = Sampler().kept_tokens(logits, meta)
    for r in range(n):
        if want[r] is None:
            assert kept[r] is None and tokens[r] == int(logits[r].argmax())
        else:
            np.testing.assert_array_equal(np.flatnonzero(kept[r]), want[r], err_msg=f"row {r}: {params[r]}")
            assert tokens[r] in want[r]


def penalty_case(rng, n, vocab):
    params, prompts, outputs = [], [], []
    for i in range(n):
        sp = {}
        if i % 4 != 3:
            sp = dict(repetition_penalty=float(rng.choice([1.0, 0.7, 1.3])),
                      frequency_penalty=float(rng.choice([0.0, 0.5, -0.25])),
                      presence_penalty=float(rng.choice([0.0, 0.3, -1.5])))
        if i % 3 == 0:  # includes ids out of range: ignored
            keys = rng.choice(vocab + 10, 5, replace=False) - 5
            sp["logit_bias"] = {int(k): float(v) for k, v in zip(keys, rng.normal(0, 3, 5))}
        if i % 5 == 1:
            sp["min_tokens"] = 5
            sp["stop_token_ids"] = [int(t) for t in rng.integers(0, vocab, 3)] + [vocab + 3]
        sp["temperature"] = 0.0 if i % 2 else 1.0
        sp["logprobs"] = [None, 0, 3, 20][i % 4]
        params.append(SamplingParams(**sp))
        prompts.append(rng.integers(-2, vocab + 2, rng.integers(0, 30)).tolist())
        outputs.append(rng.integers(0, min(vocab, 40), rng.integers(0, 20)).tolist())  # repeats
    eos = [int(rng.integers(0, vocab)) for _ in range(n)]
    meta = meta_for(params, prompts, outputs, eos)
    if n > 2:  # an allowed-token mask on one row (structured output later)
        masks = [None] * n
        masks[1] = rng.random(vocab) < 0.5
        meta = SamplingMetadata(**{f: getattr(meta, f) for f in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
            "logit_bias", "seeds", "output_token_ids", "prompt_token_ids", "suppress_token_ids", "num_logprobs")},
            allowed_token_masks=masks)
    return meta


def test_emulated_processing_and_logprobs_match_numpy(rng):
    n, vocab = 24, 300
    logits = crafted_logits(rng, n, vocab, "ties")
    meta = penalty_case(rng, n, vocab)
    x, tokens, _, rows = emulate(logits, meta)
    want = Sampler.process_logits(logits, meta)
    np.testing.assert_array_equal(x, want)
    lp = log_softmax(want)
    for r in range(n):
        if meta.num_logprobs[r] is None:
            assert rows[r] is None
            continue
        ref = gather_logprobs(lp[r:r + 1], [tokens[r]], [meta.num_logprobs[r]])[0]
        chosen, rank, ids, vals = rows[r]
        assert abs(chosen - ref.logprob) < 1e-5 and rank == ref.rank
        np.testing.assert_allclose(vals, ref.top_logprobs, atol=1e-5)
        assert ids == ref.top_ids or np.allclose(lp[r, ids], lp[r, ref.top_ids])  # ties: any order of equals


def threshold_rows(rng, n, vocab, kind):
    """Rows for the kept-set thresholds: crafted_logits' kinds, and rows that send the binned
    selection to its fallback: "narrow" (thousands of tokens a value bin), "constant" (every token
    in one bin), "wide" (values spread over thousands: deep top-k cuts lie below -32), "nan"."""
    if kind in ("normal", "ties", "peaked"):
        return crafted_logits(rng, n, vocab, kind)
    if kind == "narrow":
        return rng.normal(0, 0.05, size=(n, vocab)).astype(np.float32)
    if kind == "constant":
        return np.full((n, vocab), 1.5, np.float32)
    if kind == "wide":
        return np.stack([rng.permutation(np.linspace(0, -4000, vocab)) for _ in range(n)]).astype(np.float32)
    x = rng.normal(0, 2, size=(n, vocab)).astype(np.float32)
    x[:, 3] = np.nan
    return x


def threshold_cases(rng, vocab, count):
    """(k, top_p, temperature) with at least one cut on; k as the kernel sees it (0: off)."""
    cases = []
    while len(cases) < count:
        k = int(rng.choice([0, 0, 1, 2, 5, 20, 40, vocab - 1]))
        top_p = float(rng.choice([1.0, 0.05, 0.5, 0.8, 0.9, 0.999]))
        if k or top_p < 1.0:
            cases.append((k, top_p, float(rng.choice([0.3, 0.7, 1.0, 1.7]))))
    return cases


def scaled_row(x, temperature):
    """sample_kernel's scaled values: (x - row max) / T in float32. Its max pass skips NaN (`v > mx`);
    a row max that is not finite counts as 0."""
    mx = np.nanmax(x)
    return (x - (mx if np.isfinite(mx) else np.float32(0))) / np.float32(temperature)


def test_binned_thresholds_equal_the_full_row_selects(rng):
    """kept_threshold_binned's algorithm (NumPy) gives full_row_threshold's exact thresholds wherever
    it decides, and every fallback condition is reached."""
    decided = fallbacks = 0
    for kind in ("normal", "ties", "peaked", "narrow", "constant", "wide", "nan"):
        for vocab in (50, 1000, 7000):
            x = threshold_rows(rng, 1, vocab, kind)[0]
            for k, top_p, t in threshold_cases(rng, vocab, 6):
                s = scaled_row(x, t)
                got = binned_threshold(s, k, top_p)
                if got is None:
                    fallbacks += 1
                    continue
                decided += 1
                want = full_row_threshold(s, k, top_p)
                assert got == want or (np.isneginf(got) and np.isneginf(want)), (kind, vocab, k, top_p, t, got, want)
    assert decided > 80 and fallbacks > 10, (decided, fallbacks)
    # each fallback: a NaN; the k-th value below -32; more candidates than shared memory holds
    assert binned_threshold(scaled_row(threshold_rows(rng, 1, 1000, "nan")[0], 1.0), 5, 1.0) is None
    assert binned_threshold(scaled_row(threshold_rows(rng, 1, 1000, "wide")[0], 1.0), 999, 1.0) is None
    assert binned_threshold(scaled_row(threshold_rows(rng, 1, 7000, "constant")[0], 1.0), 0, 0.5) is None


def test_emulated_race_matches_the_distribution():
    logits = np.random.default_rng(5).normal(0, 1, size=(1, 24)).astype(np.float32)
    for sp in (SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_k=6, min_p=0.05)):
        meta = meta_for([sp])
        kept = Sampler().kept_tokens(logits, meta)[0]
        draws = [emulate(logits, meta, step=s, seed=1)[1][0] for s in range(4000)]
        assert_matches_distribution(draws, target_probs(logits[0], kept, sp.temperature))


def test_pack_step_layout():
    meta = meta_for([SamplingParams(temperature=0.5, top_k=3, seed=-1, logprobs=25),
                     SamplingParams(top_p=0.5, min_p=0.25)], outputs=[[1, 2], [3]])
    host, offsets = pack_step(meta, 100, step=7, seed=11)
    assert all(off % 16 == 0 for off, _ in offsets.values())
    s = unpack(host, offsets, 2, 100)
    fresh, steps = s["fresh"][:2], s["steps"]
    assert fresh["seed"].tolist() == [2**64 - 1, 11] and fresh["seeded"].tolist() == [1, 0]
    assert steps["slot"].tolist() == [NO_SLOT] * 2 and steps["fresh"].tolist() == [0, 1]
    assert steps["step"].tolist() == [2, 0]  # seeded rows only: the output length
    table = np.zeros(4, PARAMS_DTYPE)
    p = resolve_rows(table, s["fresh"], steps, 7)
    assert not table.view(np.uint8).any(), "rows without a slot leave the table alone"
    assert p["seed"].tolist() == [2**64 - 1, 11] and p["step"].tolist() == [2, 7] and p["tag"].tolist() == [0, 2]
    assert p["top_k"].tolist() == [3, 0] and p["num_logprobs"].tolist() == [MAX_TOP_LOGPROBS, -1]
    assert p["log_min_p"][1] == np.log(np.float32(0.25)) and p["log_min_p"][0] == -np.inf
    assert p["greedy"].tolist() == [0, 0] and p["mask_row"].tolist() == [-1, -1]
    assert p["pen_slot"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="penalty slots"):
        pack_step(meta_for([SamplingParams(presence_penalty=1.0)]), 100, step=0, seed=0)


def test_pack_step_carries_the_slot_updates():
    """A new slot gets its prompt's unique in-range ids and the whole output; a known one only the
    tokens the device has not counted."""
    slots = PenaltySlots(4)
    prompt = [5, 5, 7, -1, 200]
    sp = SamplingParams(repetition_penalty=1.5)
    meta = meta_for([sp, SamplingParams()], prompts=[prompt, [1]], outputs=[[3, 3, 150], [2]])
    meta.request_ids = ["a", "b"]
    host, offsets = pack_step(meta, 100, 0, 0, slots.plan(meta, sampling=True))
    s = unpack(host, offsets, 2, 100)
    assert s["steps"]["pen_slot"].tolist() == [slots.slot_of("a"), -1] and s["steps"]["pen_reset"].tolist() == [1, 0]
    assert s["prompt_off"].tolist() == [0, 2, 2] and s["prompt_tok"][:2].tolist() == [5, 7]
    assert s["new_off"].tolist() == [0, 2, 2] and s["new_tok"][:2].tolist() == [3, 3]  # 150 >= V: dropped
    meta = meta_for([sp], prompts=[prompt], outputs=[[3, 3, 150, PLACEHOLDER]])
    meta.request_ids = ["a"]
    host, offsets = pack_step(meta, 100, 1, 0, slots.plan(meta, sampling=True))
    s = unpack(host, offsets, 1, 100)
    assert s["steps"]["pen_reset"].tolist() == [0] and s["prompt_off"].tolist() == [0, 0]
    assert s["new_off"].tolist() == [0, 0]  # the placeholder: counted by the device when it sampled it
    meta = meta_for([sp], prompts=[prompt], outputs=[[3, 3, 150, 9, 4, 8]])
    meta.request_ids = ["a"]
    host, offsets = pack_step(meta, 100, 2, 0, slots.plan(meta, sampling=False))
    s = unpack(host, offsets, 1, 100)
    assert s["new_off"].tolist() == [0, 1] and s["new_tok"][:1].tolist() == [8]  # 9, 4: sampled on the device


@pytest.mark.parametrize("struct,dtype", [("RowParams", PARAMS_DTYPE), ("RowStep", STEP_DTYPE)])
def test_kernel_structs_match_their_dtypes(struct, dtype):
    """sampling.cu's structs RowParams and RowStep against PARAMS_DTYPE and STEP_DTYPE: the same
    fields, offsets and size (a multiple of 16, so sections of them stay aligned)."""
    import re
    from pathlib import Path

    src = (Path(__file__).parent.parent / "kernels_cu" / "sampling.cu").read_text()
    body = re.search(r"struct " + struct + r" \{(.*?)\};", src, re.S).group(1)
    sizes = {"double": 8, "u64": 8, "float": 4, "int": 4}
    offset, fields = 0, {}
    for ctype, name, count in re.findall(r"^\s*(\w+)\s+(\w+)(?:\[(\d+)\])?;", body, re.M):
        size = sizes[ctype]
        offset = -(-offset // size) * size
        fields[name] = offset
        offset += size * int(count or 1)
    size = -(-offset // 8) * 8
    assert {k: v for k, v in fields.items() if not k.endswith("_")} == {
        name: dtype.fields[name][1] for name in dtype.names}
    assert size == dtype.itemsize and size % 16 == 0


def penalty_steps(process, sample, rng, vocab, num_slots=256, steps=8):
    """The same requests over several sampling calls, as the engine drives them: outputs grow by the
    sampled tokens, a token sampled by the previous call is sometimes still a placeholder (async
    scheduling), rows come and go (preemption; with fewer than 5 slots, eviction), one id is reused
    by a new request, one row has no id. Each call's process(logits, meta) must equal NumPy's
    processing of the real outputs; then sample(logits, meta) gives the tokens the outputs grow by."""
    sps = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
           SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3),
           SamplingParams(temperature=0.0, repetition_penalty=0.8, frequency_penalty=-0.25, presence_penalty=1.5),
           SamplingParams(temperature=1.0),
           SamplingParams(temperature=0.0, frequency_penalty=1.0, logit_bias={3: 2.0}),
           SamplingParams(temperature=0.0, presence_penalty=-1.5, repetition_penalty=1.2)]
    ids = ["r0", "r1", "r2", "r3", "r4", None]

    def new_request():
        return rng.integers(-2, vocab + 2, rng.integers(1, 30)).tolist(), rng.integers(0, 40, rng.integers(0, 9)).tolist()

    reqs = [new_request() for _ in sps]  # (prompt, real output); the prompt list is the request's own
    last = set()  # rows sampled by the previous call
    for step in range(steps):
        if step == 3:
            reqs[2] = new_request()  # "r2" finished; a new request took its id
            last.discard(2)
        rows = range(6) if step == 1 else rng.choice(6, int(rng.integers(3, 7)), replace=False)
        rows = sorted([i for i in rows if i == 3] + [i for i in rows if i != 3][:num_slots])  # r3: no penalty
        shown = []  # what the engine's lists hold: the previous call's token may still be a placeholder
        for i in rows:
            out = list(reqs[i][1])
            if i in last and ids[i] is not None and rng.random() < 0.6:  # a row without an id: all known
                out[-1] = PLACEHOLDER
            shown.append(out)
        logits = rng.normal(0, 2, size=(len(rows), vocab)).astype(np.float32)
        meta = meta_for([sps[i] for i in rows], [reqs[i][0] for i in rows], shown)
        meta.request_ids = [ids[i] for i in rows]
        want = Sampler.process_logits(logits, meta_for([sps[i] for i in rows], [reqs[i][0] for i in rows],
                                                        [reqs[i][1] for i in rows]))
        np.testing.assert_array_equal(process(logits, meta), want, err_msg=f"call {step}")
        for i, tok in zip(rows, sample(logits, meta)):
            reqs[i][1].append(int(tok))
        last = set(rows)


def test_emulated_penalty_state_follows_requests_over_calls(rng):
    for num_slots in (256, 3):  # 3: five penalized requests take turns in the slots
        state = DeviceState(300, num_slots)
        penalty_steps(lambda x, m, st=state: emulate(x, m, state=st, sample=False)[0],
                      lambda x, m, st=state: emulate(x, m, state=st)[1], rng, 300, num_slots)


# ---- the kernels on a GPU ---------------------------------------------------------------------------



@pytest.fixture(scope="module")
def sampler(poisoned_allocations):
    from rvllm.backend.cuda import CudaBackend
    from rvllm.sampling.gpu_sampler import GpuSampler

    return GpuSampler(CudaBackend("bfloat16"), seed=1234)


def dev(x):
    import cupy as cp

    return cp.asarray(np.ascontiguousarray(x, dtype=np.float32))


# 1001 and 49153: vocabularies that are not a multiple of 4 (sampling.cu's load4 takes its scalar path;
# 49153 at batch 1 also splits the argmax over blocks).
SIZES = [(b, v) for b in (1, 7, 256) for v in (1000, 49152, 151936)] + [(7, 1001), (1, 49153)]
SIZE_IDS = [f"B{b}-V{v}" for b, v in SIZES]


@pytest.mark.parametrize("b,vocab", SIZES, ids=SIZE_IDS)
@pytest.mark.gpu
@requires_gpu
def test_philox_kernel_and_greedy_fast_path(sampler, rng, b, vocab):
    import cupy as cp

    from rvllm.backend import nvrtc

    if b == 1 and vocab == 1000:  # the raw generator, once
        ctr = rng.integers(0, 2**32, size=(500, 6), dtype=np.uint64).astype(np.uint32)
        ctr[:3] = [list(c) + list(k) for c, k, _ in KAT]
        out = cp.empty((500, 4), np.uint32)
        nvrtc.get_kernel("sampling.cu", "philox_kernel", sampler.dtype)((2,), (256,), (out, cp.asarray(ctr), np.int32(500)))
        want = np.stack(philox(*ctr.T.astype(np.uint64)), axis=1)
        np.testing.assert_array_equal(out.get(), want)
    logits = rng.normal(0, 3, size=(b, vocab)).astype(np.float32)
    logits[:, vocab // 3] = logits[:, 2 * vocab // 3] = logits.max(axis=1) + 1  # a tie: the first index wins
    if b > 1:
        logits[1] = -np.inf  # every token forbidden: token 0, as NumPy's argmax
    got = sampler(dev(logits), meta_for([SamplingParams(temperature=0.0)] * b))
    assert got.token_ids == logits.argmax(axis=1).tolist() and got.logprobs == [None] * b


@pytest.mark.parametrize("b,vocab", SIZES, ids=SIZE_IDS)
@pytest.mark.gpu
@requires_gpu
def test_processing_is_bit_identical_and_logprobs_match(sampler, rng, b, vocab):
    logits = crafted_logits(rng, b, vocab, "ties" if b == 7 else "normal")
    meta = penalty_case(rng, b, vocab)
    want = Sampler.process_logits(logits, meta)
    np.testing.assert_array_equal(sampler.process_logits(dev(logits), meta).get(), want)

    out = sampler(dev(logits), meta)
    lp = log_softmax(want)
    greedy = np.asarray(meta.temperature) < 1e-5
    for r in range(b):
        tok = out.token_ids[r]
        if greedy[r]:
            assert tok == int(want[r].argmax())
        else:
            assert want[r, tok] > -np.inf
        k = meta.num_logprobs[r]
        if k is None:
            assert out.logprobs[r] is None
            continue
        row = out.logprobs[r]
        ref = gather_logprobs(lp[r:r + 1], [tok], [k])[0]
        assert row.token_id == tok and abs(row.logprob - ref.logprob) < 1e-4
        if greedy[r] or b == 7:  # an exact rank needs no rounding ties: the argmax, or logits on a grid
            assert row.rank == ref.rank
        else:
            assert abs(row.rank - ref.rank) <= 2
        order = np.lexsort((np.arange(vocab), -lp[r]))[:k]  # best first, ties by id: the kernel's order
        assert row.top_ids == order.tolist()
        np.testing.assert_allclose(row.top_logprobs, lp[r, order], atol=1e-4)


@pytest.mark.parametrize("b,vocab", SIZES, ids=SIZE_IDS)
@pytest.mark.gpu
@requires_gpu
def test_sampled_tokens_lie_in_the_numpy_kept_set(sampler, rng, b, vocab):
    kind = ["normal", "ties", "peaked"][(b + vocab) % 3]
    logits = crafted_logits(rng, b, vocab, kind)
    params = random_params(rng, b, vocab)
    meta = meta_for(params)
    kept = Sampler().kept_tokens(logits, meta)
    x = dev(logits)
    for _ in range(8 if b * vocab > 10**7 else 30):
        out = sampler(x, meta)
        for r, tok in enumerate(out.token_ids):
            if kept[r] is None:
                assert tok == int(logits[r].argmax())
            else:
                assert np.isin(tok, kept[r]), f"row {r} ({params[r]}): token {tok} not kept"


DIST_CASES = [
    (64, dict(temperature=1.0)),
    (64, dict(temperature=0.7, top_k=10)),
    (64, dict(temperature=1.3, top_p=0.8)),
    (64, dict(temperature=1.0, min_p=0.1)),
    (64, dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02)),
    (151936, dict(temperature=1.0, top_k=12)),
    (151936, dict(temperature=0.9, top_p=0.9)),
]


@pytest.mark.parametrize("vocab,sp", DIST_CASES, ids=[f"V{v}-" + "-".join(f"{k}{w}" for k, w in s.items()) for v, s in DIST_CASES])
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.gpu
@requires_gpu
def test_sampled_frequencies_match_the_target_distribution(sampler, vocab, sp, seeded):
    rng = np.random.default_rng(vocab + len(sp))
    row = rng.normal(0, 1, size=vocab).astype(np.float32)
    if vocab > 1000:  # a small head over a long, low tail
        row -= 12
        row[rng.choice(vocab, 16, replace=False)] = rng.normal(0, 1, size=16)
    b, calls = 256, 40
    params = SamplingParams(**sp)
    x = dev(np.tile(row, (b, 1)))
    kept = Sampler().kept_tokens(row[None, :], meta_for([params]))[0]
    draws = []
    for c in range(calls):
        if seeded:  # the same seed at many steps: the noise of (seed, step) is fresh per step
            meta = meta_for([SamplingParams(**sp, seed=77)] * b, outputs=[[0] * (c * b + i) for i in range(b)])
        else:
            meta = meta_for([params] * b)
        draws += sampler(x, meta).token_ids
    assert_matches_distribution(draws, target_probs(row, kept, params.temperature))


@pytest.mark.gpu
@requires_gpu
def test_seeded_rows_reproduce_across_batches_positions_and_calls(sampler, rng):
    vocab = 49152
    target = rng.normal(0, 1, size=vocab).astype(np.float32)
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=2024)
    out_ids = [5, 6, 7]
    results = []
    for b, pos in ((1, 0), (7, 3), (256, 200)):
        logits = rng.normal(0, 1, size=(b, vocab)).astype(np.float32)
        logits[pos] = target
        params = random_params(rng, b, vocab)
        outputs = [rng.integers(0, vocab, rng.integers(0, 9)).tolist() for _ in range(b)]
        params[pos], outputs[pos] = sp, out_ids
        results.append(sampler(dev(logits), meta_for(params, outputs=outputs)).token_ids[pos])
    assert len(set(results)) == 1, results
    # other steps give other draws; unseeded rows differ between calls
    steps = {sampler(dev(target[None]), meta_for([sp], outputs=[[0] * s])).token_ids[0] for s in range(20)}
    assert len(steps) > 1
    unseeded = {sampler(dev(target[None]), meta_for([SamplingParams(temperature=1.0)])).token_ids[0] for _ in range(20)}
    assert len(unseeded) > 1


@pytest.mark.gpu
@requires_gpu
def test_more_than_20_logprobs_fall_back_to_the_host(sampler, rng):
    vocab = 1000
    logits = rng.normal(0, 2, size=(2, vocab)).astype(np.float32)
    meta = meta_for([SamplingParams(temperature=0.0, logprobs=25), SamplingParams(temperature=0.0, logprobs=2)])
    out = sampler(dev(logits), meta)
    ref = gather_logprobs(log_softmax(logits), logits.argmax(axis=1), [25, 2])
    for got, want in zip(out.logprobs, ref):
        assert got.top_ids == want.top_ids and got.rank == want.rank
        np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, atol=1e-4)


@pytest.mark.gpu
@requires_gpu
def test_penalty_state_follows_requests_over_calls(sampler, rng):
    """The device's penalty slots against NumPy over calls with the same requests (penalty_steps):
    diffs only, placeholders counted by sample_kernel, a reused id, and with 3 slots evictions."""
    from types import SimpleNamespace

    from rvllm.sampling.gpu_sampler import GpuSampler

    few = GpuSampler(SimpleNamespace(dtype=sampler.dtype), seed=3, max_num_seqs=3)
    for gs in (sampler, few):
        for vocab in (1000, 151936):  # another vocabulary: the state is reallocated, every slot reset
            penalty_steps(lambda x, m, gs=gs: gs.process_logits(dev(x), m).get(),
                          lambda x, m, gs=gs: gs(dev(x), m).token_ids, rng, vocab, gs.penalty_slots.num_slots)
    assert sampler.penalty_slots.slot_of("r0") is not None
    sampler.release(["r0", "r1"])
    assert sampler.penalty_slots.slot_of("r0") is None


@pytest.mark.gpu
@requires_gpu
def test_parameter_table_rows_sample_as_fresh_rows(sampler, rng):
    """The device's parameter table (param_slots.py, sampling.cu load_row) against rows that bring
    their records every call: two samplers with one seed get the same logits and requests, one with
    request ids (records from the table, sent only when a request is new to its slot or changed its
    params; 4 slots for 9 requests: evictions, and 5-row calls without slots), one without. Every
    call's tokens and logprobs must be equal."""
    from types import SimpleNamespace

    from rvllm.sampling.gpu_sampler import GpuSampler

    vocab, pool = 1000, 9
    backend = SimpleNamespace(dtype=sampler.dtype)
    slotted, fresh = GpuSampler(backend, seed=21, max_num_seqs=4), GpuSampler(backend, seed=21, max_num_seqs=8)
    params = dict(zip(range(pool), random_params(rng, pool, vocab)))
    for r in range(pool):
        if r % 3 == 0:
            params[r] = SamplingParams(temperature=params[r].temperature, top_k=params[r].top_k, logprobs=3)
    outputs = {r: [] for r in range(pool)}
    table_rows = 0
    for call in range(60):
        rows = [int(r) for r in rng.choice(pool, int(rng.integers(1, 6)), replace=False)]
        if rng.random() < 0.1:
            params[rows[0]] = random_params(rng, 1, vocab)[0]
        if rng.random() < 0.05:
            slotted.release([f"r{int(rng.integers(pool))}"])
        logits = dev(crafted_logits(rng, len(rows), vocab, "normal"))
        meta = meta_for([params[r] for r in rows], outputs=[outputs[r] for r in rows])
        with_ids = meta_for([params[r] for r in rows], outputs=[outputs[r] for r in rows])
        with_ids.request_ids = [f"r{r}" for r in rows]
        table_rows += sum(slotted.param_slots.slot_of(i) is not None for i in with_ids.request_ids)
        a, b = slotted(logits, with_ids), fresh(logits, meta)
        assert a.token_ids == b.token_ids, f"call {call}"
        assert [None if x is None else (x.token_id, x.logprob, x.top_ids) for x in a.logprobs] == \
            [None if x is None else (x.token_id, x.logprob, x.top_ids) for x in b.logprobs], f"call {call}"
        for r, t in zip(rows, a.token_ids):
            outputs[r] = outputs[r] + [t]
    assert table_rows > 40, table_rows  # rows whose record the table held before their call


@pytest.mark.gpu
@requires_gpu
def test_rows_not_16_byte_aligned_sample_as_aligned_ones(sampler, rng):
    """Logits starting one float past an aligned address (a C-contiguous view at an offset): the
    kernels' four-token loads fall back to scalar ones, with the same results as on an aligned copy."""
    import cupy as cp

    from types import SimpleNamespace

    from rvllm.sampling.gpu_sampler import GpuSampler

    b, vocab = 5, 4096
    logits = crafted_logits(rng, b, vocab, "ties")
    buf = cp.empty(b * vocab + 1, np.float32)
    buf[1:] = cp.asarray(logits.reshape(-1))
    shifted = buf[1:].reshape(b, vocab)
    assert shifted.flags.c_contiguous and shifted.data.ptr % 16 == 4
    params = random_params(rng, b, vocab, greedy_share=0.4) + [SamplingParams(temperature=0.0)] * 2
    for meta_params in (params[:b], params[-2:] + params[:b - 2], [SamplingParams(temperature=0.0)] * b):
        a = GpuSampler(SimpleNamespace(dtype=sampler.dtype), seed=9)
        c = GpuSampler(SimpleNamespace(dtype=sampler.dtype), seed=9)
        assert a(shifted, meta_for(meta_params)).token_ids == c(dev(logits), meta_for(meta_params)).token_ids


# 1000, 1001, 8192 at these batches: a block a row (sample_kernel's stats mode); 151936 and 16387:
# split over blocks (argmax_kernel's max, select_*_kernel)
THRESHOLD_SIZES = [(24, 1000), (9, 1001), (96, 8192), (12, 151936), (3, 16387)]


@pytest.mark.parametrize("kind", ["normal", "ties", "peaked", "narrow", "constant", "wide", "nan"])
@pytest.mark.parametrize("b,vocab", THRESHOLD_SIZES, ids=[f"B{b}-V{v}" for b, v in THRESHOLD_SIZES])
@pytest.mark.gpu
@requires_gpu
def test_kept_thresholds_match_the_full_row_selects(sampler, rng, kind, b, vocab):
    """The kernels' top-k / top-p threshold, bit for bit, against the NumPy radix selects over the
    whole row: a block a row and split over blocks, through the binned path and through its fallback
    (narrow, constant, wide and nan rows at the larger sizes)."""
    logits = threshold_rows(rng, b, vocab, kind)
    cases = threshold_cases(rng, vocab, b)
    params = [SamplingParams(temperature=t, top_k=k or -1, top_p=p) for k, p, t in cases]
    got = sampler.kept_thresholds(dev(logits), meta_for(params))
    for r, (k, top_p, t) in enumerate(cases):
        want = np.fmax(full_row_threshold(scaled_row(logits[r], t), k, top_p), np.float32(-np.inf))  # the min-p fmaxf
        assert got[r] == want or (np.isneginf(got[r]) and np.isneginf(want)), (r, k, top_p, t, got[r], want)


SPLIT_SIZES = [(1, 151936), (7, 16387), (24, 49152)]  # 16387: not a multiple of 4


@pytest.mark.parametrize("b,vocab", SPLIT_SIZES, ids=[f"B{b}-V{v}" for b, v in SPLIT_SIZES])
@pytest.mark.gpu
@requires_gpu
def test_split_race_samples_the_single_block_tokens(sampler, rng, b, vocab):
    """race_kernel (a small batch's rows split over blocks) against sample_kernel's own race: the same
    tokens over three calls of the same requests, with greedy, plain, top-k / top-p / min-p and seeded
    rows, and repetition penalties whose counts come from the sampled tokens."""
    from types import SimpleNamespace

    from rvllm.sampling.gpu_sampler import GpuSampler, argmax_splits

    split, whole = (GpuSampler(SimpleNamespace(dtype=sampler.dtype), seed=5, max_num_seqs=32) for _ in range(2))
    whole.split_race_min_splits = 1 << 30
    assert argmax_splits(b, vocab, split.num_sms) >= split.split_race_min_splits  # the split path runs
    params = [SamplingParams(**{**vars_of(sp), "repetition_penalty": 1.3 if r % 3 == 0 else 1.0})
              for r, sp in enumerate(random_params(rng, b, vocab, greedy_share=0.3))]
    ids = [f"r{r}" for r in range(b)]
    prompts = [rng.integers(0, vocab, 20).tolist() for _ in range(b)]
    outputs = [[] for _ in range(b)]
    for call in range(3):
        logits = crafted_logits(rng, b, vocab, ["normal", "ties", "peaked"][call])
        meta = SamplingMetadata.from_requests(list(zip(params, prompts, [list(o) for o in outputs], [None] * b)), ids)
        got, want = split(dev(logits), meta).token_ids, whole(dev(logits), meta).token_ids  # penalties: in place
        assert got == want, f"call {call}: {params}"
        for o, t in zip(outputs, got):
            o.append(t)


def vars_of(sp: SamplingParams) -> dict:
    """The arguments that rebuild sp: random_params sets only these."""
    return {k: getattr(sp, k) for k in ("temperature", "top_k", "top_p", "min_p", "seed")}


RACE_ROWS = [  # (logit offset, spread, temperature, top_k): flat and spread rows, |race values| up to ~1e4
    (0.0, 1.0, 1.0, 0), (0.0, 1.0, 0.05, 0), (1e4, 1.0, 1.0, 0), (-1e4, 1.0, 1.0, 0),
    (0.0, 30.0, 0.7, 0), (0.0, 3.0, 1.3, 50), (5e3, 10.0, 0.5, 0), (0.0, 0.01, 1.0, 0),
]


@pytest.mark.parametrize("b", [8, 96], ids=["split-race", "one-block-a-row"])
@pytest.mark.gpu
@requires_gpu
def test_race_picks_the_emulated_winner(sampler, rng, b):
    """The kernels' race (race_kernel at 8 rows, sample_kernel at 96) picks the token whose race value
    x / T - log(q) (plain rows; (x - max) / T for cut rows) is the emulation's largest, up to rounding:
    the draws are the same Philox words, and the logs differ from NumPy's by an ulp. Seeded rows, so
    the noise depends only on the request. Rows of large |x / T| make the race values' rounding
    coarse, where sampling.cu's filter of hopeless draws (may_beat) must still keep every winner."""
    vocab = 49152
    for call in range(3):
        cases = [RACE_ROWS[(r + call) % len(RACE_ROWS)] for r in range(b)]
        logits = np.stack([off + spread * rng.standard_normal(vocab) for off, spread, _, _ in cases]).astype(np.float32)
        params = [SamplingParams(temperature=t, top_k=k, seed=1000 + r) for r, (_, _, t, k) in enumerate(cases)]
        outputs = [[0] * (call + r % 5) for r in range(b)]
        meta = meta_for(params, outputs=outputs)
        got = sampler(dev(logits), meta).token_ids
        _, want, kept, _ = emulate(logits, meta, sample=False)
        for r, (_, _, t, k) in enumerate(cases):
            x = logits[r]
            scaled = x / np.float32(t) if k == 0 else (x - x.max()) / np.float32(t)
            ids = np.array([got[r], want[r]])
            race = scaled[ids] - log_exp_noise(1000 + r, len(outputs[r]), 0, ids)
            assert kept[r][got[r]], f"call {call} row {r}: token {got[r]} not kept"
            assert race[0] >= race[1] - 4e-6 * (1 + abs(race[1])), \
                f"call {call} row {r} {cases[r]}: kernel's token {got[r]} races {race[0]}, the emulation's {want[r]} {race[1]}"
