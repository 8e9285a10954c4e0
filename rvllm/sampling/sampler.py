"""The NumPy reference sampler: one batched call per step over every row that samples.

Order of operations (per row), as vLLM/HF do it:
  1. penalties: repetition (prompt + output tokens: logit > 0 -> divide, else multiply), then
     frequency (count in the OUTPUT tokens) and presence (1 if in the output), both subtracted;
  2. logit bias (added), suppressed ids (min_tokens: EOS/stop ids) and allowed-token masks (-inf).
  3. LOGPROBS are taken here: log_softmax of this processed distribution, i.e. after penalties and
     bias, before temperature/top-k/top-p/min-p. This is this project's choice (vLLM's default
     returns the raw model logprobs); it keeps logprobs independent of the sampling knobs.
  4. greedy rows (temperature < 1e-5) take the argmax of the processed logits;
  5. random rows: temperature, then top-k, top-p (smallest set with cumulative prob >= top_p,
     at least one token, vLLM semantics), then min-p (drop prob < min_p * max prob) -- the HF
     warper order; vLLM v1 applies min-p before top-k/top-p, which keeps a slightly smaller set
     when both top-p and min-p bind. Tokens tied with the last kept one are kept (vLLM and HF
     mask `logit < threshold`). Then sample by the exponential race argmax(p / q), q ~ Exp(1),
     which needs no normalization and batches.

All three filters keep a prefix of the row sorted by logit, so they reduce to one threshold per
row. Rows with top-k or top-p work on their m largest logits only (found in O(V), see _top_m_ids):
the threshold, the noise and the race are over [rows, m], not [rows, V]; a row whose kept set may
run past the m candidates (a wide nucleus, a tie at the edge) is redone over its whole sorted row.

Seeded rows draw their noise from Philox keyed by (seed, number of output tokens so far), indexed
by token id: the same request gives the same token whatever else is in the batch, and after
preemption.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rvllm.sampling.logprobs import LogprobsRow, gather_logprobs, log_softmax, to_logprob_dicts  # noqa: F401
from rvllm.sampling.metadata import GREEDY_TEMPERATURE, SamplingMetadata

_MASK64 = (1 << 64) - 1
_TINY = np.finfo(np.float32).tiny


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobsRow | None]  # None for rows that did not ask for logprobs


def seeded_exponentials(seed: int, step: int, vocab: int, out: np.ndarray | None = None) -> np.ndarray:
    """Exp(1) noise for one seeded row at one step, from Philox keyed by (seed, step) only.

    Different steps get different keys (independent streams), not overlapping counter ranges."""
    gen = np.random.Generator(np.random.Philox(key=(seed & _MASK64) | (step << 64)))
    return gen.standard_exponential(vocab, dtype=np.float32, out=out)


class Sampler:
    def __init__(self, top_p_candidates: int = 1024):
        # Top-p-only rows look for their nucleus among this many largest logits first (a partition,
        # O(V)); a row whose nucleus is larger falls back to a full sort.
        self.top_p_candidates = top_p_candidates

    def __call__(self, logits: np.ndarray, meta: SamplingMetadata, rng: np.random.Generator) -> SamplerOutput:
        num_rows, vocab = logits.shape  # [B, V]
        if num_rows != meta.num_rows:
            raise ValueError(f"logits have {num_rows} rows, sampling metadata {meta.num_rows}")
        if meta.all_greedy and not meta.needs_logit_processing and meta.max_num_logprobs is None:
            return SamplerOutput(logits.argmax(axis=1).tolist(), [None] * num_rows)

        x = self.process_logits(logits, meta)  # [B, V] float32
        tokens = np.empty(num_rows, dtype=np.int64)
        greedy = np.asarray(meta.temperature, dtype=np.float64) < GREEDY_TEMPERATURE  # as meta's flags
        if meta.all_greedy:
            tokens[:] = x.argmax(axis=1)
        elif meta.all_random:
            tokens[:] = self._sample_random(x, meta, np.arange(num_rows), rng)
        else:
            tokens[greedy] = x[greedy].argmax(axis=1)
            rows = np.flatnonzero(~greedy)
            tokens[rows] = self._sample_random(x[rows], meta, rows, rng)

        logprobs: list[LogprobsRow | None] = [None] * num_rows
        if meta.max_num_logprobs is not None:
            rows = [i for i, k in enumerate(meta.num_logprobs) if k is not None]
            lp = log_softmax(x if len(rows) == num_rows else x[rows])
            for i, row in zip(rows, gather_logprobs(lp, tokens[rows], [meta.num_logprobs[i] for i in rows])):
                logprobs[i] = row
        return SamplerOutput(tokens.tolist(), logprobs)

    # ---- 1-2: penalties, bias, suppression --------------------------------------------------------
    @staticmethod
    def process_logits(logits: np.ndarray, meta: SamplingMetadata) -> np.ndarray:
        """Penalties, logit bias, suppressed ids and masks; returns float32 [B, V] (a copy if edited)."""
        if not meta.needs_logit_processing:
            return np.asarray(logits, dtype=np.float32)
        # Always a fresh C-contiguous copy: the caller's logits stay intact, and the flat view
        # below must alias x (reshape of a non-contiguous array would silently copy).
        x = np.array(logits, dtype=np.float32, order="C")
        num_rows, vocab = x.shape
        flat = x.reshape(-1)  # edits below are sparse: flat index = row * V + token

        def flat_ids(rows, ids_of) -> np.ndarray:
            parts = []
            for i in rows:
                ids = np.asarray(ids_of(i), dtype=np.int64).reshape(-1)
                # Out-of-range ids (bad logit_bias keys, tokenizer ids past a padded vocab) would land
                # in the next row; they are dropped here, the server validates them for the user.
                parts.append(ids[(ids >= 0) & (ids < vocab)] + i * vocab)
            return np.concatenate(parts) if parts else np.empty(0, np.int64)

        if not meta.no_penalties:
            rep = np.asarray(meta.repetition_penalty, dtype=np.float32)
            rows = np.flatnonzero(rep != 1.0)
            if rows.size:
                idx = np.unique(flat_ids(rows, lambda i: list(meta.prompt_token_ids[i])
                                         + list(meta.output_token_ids[i])))
                vals, r = flat[idx], rep[idx // vocab]
                flat[idx] = np.where(vals > 0, vals / r, vals * r)
            freq = np.asarray(meta.frequency_penalty, dtype=np.float32)
            pres = np.asarray(meta.presence_penalty, dtype=np.float32)
            rows = np.flatnonzero((freq != 0.0) | (pres != 0.0))
            if rows.size:
                idx, counts = np.unique(flat_ids(rows, lambda i: meta.output_token_ids[i]), return_counts=True)
                r = idx // vocab
                flat[idx] -= freq[r] * counts.astype(np.float32) + pres[r]
        if not meta.no_logit_bias:
            for i, bias in enumerate(meta.logit_bias):
                if bias:
                    ids = np.fromiter(bias.keys(), np.int64, len(bias))
                    vals = np.fromiter(bias.values(), np.float32, len(bias))
                    ok = (ids >= 0) & (ids < vocab)
                    flat[ids[ok] + i * vocab] += vals[ok]  # dict keys are unique: no repeated index
        if not meta.no_suppress:
            rows = [i for i, s in enumerate(meta.suppress_token_ids) if s]
            flat[flat_ids(rows, lambda i: meta.suppress_token_ids[i])] = -np.inf
        for i, mask in enumerate(meta.allowed_token_masks or ()):
            if mask is not None:
                x[i, ~np.asarray(mask, dtype=bool)] = -np.inf
        return x

    # ---- 5: temperature, top-k, top-p, min-p, the race ---------------------------------------------
    def _sample_random(self, x: np.ndarray, meta: SamplingMetadata, rows: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
        """x: [R, V] processed logits of the random rows; rows: their indices into meta."""
        tokens = np.empty(len(rows), dtype=np.int64)
        for idx, r, ids, scaled, keep in self._groups(x, _Rows.build(meta, rows, x)):
            tokens[idx] = self._race(r, ids, scaled, keep, x.shape[1], rng)
        return tokens

    def kept_tokens(self, logits: np.ndarray, meta: SamplingMetadata) -> list[np.ndarray | None]:
        """The sorted token ids each random row can sample (None for greedy rows); tests, debugging."""
        x = self.process_logits(logits, meta)
        rows = np.flatnonzero(np.asarray(meta.temperature, dtype=np.float64) >= GREEDY_TEMPERATURE)
        out: list[np.ndarray | None] = [None] * x.shape[0]
        for idx, _, ids, scaled, keep in self._groups(x[rows], _Rows.build(meta, rows, x[rows])):
            for j, i in enumerate(idx):
                ok = scaled[j] > -np.inf if keep is None else keep[j] & (scaled[j] > -np.inf)
                out[rows[i]] = np.sort(np.flatnonzero(ok) if ids is None else ids[j][ok])
        return out

    def _groups(self, x, r: "_Rows"):
        """Yield (row positions, their params, ids | None, scaled [n, m], keep [n, m] | None).

        ids None: the whole vocabulary in token order (rows without top-k/top-p); otherwise the
        token ids of the m candidates, by descending logit."""
        num, vocab = x.shape
        filtered = (r.top_k < vocab) | (r.top_p < 1.0)
        full = np.flatnonzero(~filtered)
        if full.size:
            sub, rf = (x, r) if full.size == num else (x[full], r.take(full))
            scaled = sub - rf.row_max[:, None]  # [n, V], max 0: exp cannot overflow at tiny temperatures
            scaled /= rf.temp[:, None]
            keep = scaled >= _log_min_p(rf.min_p)[:, None] if (rf.min_p > 0).any() else None
            yield full, rf, None, scaled, keep
        cand = np.flatnonzero(filtered)
        if cand.size:
            sub, rc = (x, r) if cand.size == num else (x[cand], r.take(cand))
            ids, scaled, keep, incomplete = self._candidates(sub, rc)
            if not incomplete.any():
                yield cand, rc, ids, scaled, keep
                return
            ok, redo = np.flatnonzero(~incomplete), np.flatnonzero(incomplete)
            if ok.size:
                yield cand[ok], rc.take(ok), ids[ok], scaled[ok], keep[ok]
            rr = rc.take(redo)
            ids, scaled, keep, _ = self._candidates(sub[redo], rr, m=vocab)
            yield cand[redo], rr, ids, scaled, keep

    def _candidates(self, x, r: "_Rows", m: int | None = None):
        """Top-k / top-p / min-p over each row's m largest logits.

        Returns ids [n, m] (descending logit), scaled [n, m], keep [n, m], incomplete [n]."""
        n, vocab = x.shape
        p_only = r.top_k >= vocab
        if m is None:
            # One candidate more than the largest top-k, so that the last candidate is kept only
            # when the kept set may continue past the cut (a tie with the k-th logit).
            m = max(int(r.top_k[~p_only].max(initial=0)) + 1, self.top_p_candidates if p_only.any() else 1)
        m = min(m, vocab)
        if m < vocab:
            ids = _top_m_ids(x, m)  # [n, m] the m largest, unordered
        else:
            ids = np.broadcast_to(np.arange(vocab), (n, vocab))
        vals = np.take_along_axis(x, ids, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)  # [n, m]
        scaled = np.take_along_axis(vals, order, axis=1) - r.row_max[:, None]
        scaled /= r.temp[:, None]  # [n, m] descending; same float ops as the full path

        rows, pos = np.arange(n), np.arange(m)
        in_k = pos < r.top_k[:, None]
        e = np.exp(scaled.astype(np.float64)) * in_k
        cum = np.cumsum(e, axis=1)  # sequential prefix sums: a row's values do not depend on m
        k_last = np.minimum(r.top_k, m) - 1
        z = cum[rows, k_last]  # mass of the top-k set
        if p_only.any():
            # A top-p-only row's mass is its whole row (a float32 per-row sum: batch-independent).
            po = np.flatnonzero(p_only)
            whole = x[po] - r.row_max[po, None]
            whole /= r.temp[po, None]
            z[po] = np.exp(whole).sum(axis=1)
        with_p = r.top_p < 1.0
        target = r.top_p * z
        # Keep a token while the mass before it is < top_p: the smallest prefix reaching top_p.
        n_keep = np.where(with_p, np.count_nonzero((cum - e < target[:, None]) & in_k, axis=1), k_last + 1)
        thr = scaled[rows, np.maximum(n_keep, 1) - 1]
        if (r.min_p > 0).any():
            thr = np.maximum(thr, _log_min_p(r.min_p))  # p >= min_p * max_p <=> scaled >= log(min_p)
        keep = scaled >= thr[:, None]
        # Every token left out is <= the last candidate. If that one is kept (a nucleus not reached
        # within the candidates, or a tie at the cut), left-out tokens may belong too: redo the row.
        # A last candidate at -inf is kept only formally; left-out tokens are -inf too and never drawn.
        incomplete = (m < vocab) & keep[:, -1] & (scaled[:, -1] > -np.inf)
        return ids, scaled, keep, incomplete

    @staticmethod
    def _race(r: "_Rows", ids, scaled, keep, vocab: int, rng) -> np.ndarray:
        """argmax(p / q), q ~ Exp(1): a sample from p without normalizing it."""
        n, cols = scaled.shape
        probs = np.exp(scaled)  # unnormalized, max 1
        if keep is not None:
            probs *= keep  # multiply by a bool mask: much faster than np.where on random masks
        unseeded = [j for j, s in enumerate(r.seeds) if s is None]
        if ids is None and len(unseeded) == n:
            return _inverse_cdf(probs, rng)
        noise = np.empty((n, cols), dtype=np.float32)
        if len(unseeded) == n:
            rng.standard_exponential(dtype=np.float32, out=noise)
        elif unseeded:
            noise[unseeded] = rng.standard_exponential((len(unseeded), cols), dtype=np.float32)
        for j, (seed, step) in enumerate(zip(r.seeds, r.steps)):
            if seed is not None:  # a seeded row's noise is a function of (seed, step, token id) only
                if ids is None:
                    seeded_exponentials(seed, step, vocab, out=noise[j])
                else:
                    noise[j] = seeded_exponentials(seed, step, vocab)[ids[j]]
        # Exp(1) draws can be exactly 0 (float32 ziggurat); 0/0 would be NaN and argmax picks NaN.
        np.maximum(noise, _TINY, out=noise)
        np.divide(probs, noise, out=noise)
        best = noise.argmax(axis=1)
        return best if ids is None else ids[np.arange(n), best]


def _inverse_cdf(probs: np.ndarray, rng, chunk: int = 256) -> np.ndarray:
    """One uniform per row against the running sum of its (unnormalized) probabilities: the same
    distribution as the race without drawing V exponentials per row. Two levels, because NumPy's
    cumsum along rows of a [256, 49152] array alone costs ~75 ms: sums of 256-token chunks locate
    the chunk, then a running sum inside that one chunk locates the token."""
    n, vocab = probs.shape
    rows = np.arange(n)
    starts = np.arange(0, vocab, chunk)
    csum = np.cumsum(np.add.reduceat(probs, starts, axis=1, dtype=np.float64), axis=1)  # [n, chunks]
    u = (1.0 - rng.random(n)) * csum[:, -1]  # in (0, total]: never lands on a zero-probability head
    c = np.minimum((csum < u[:, None]).sum(axis=1), len(starts) - 1)  # the chunk holding u
    within = u - np.where(c > 0, csum[rows, c - 1], 0.0)
    cols = c[:, None] * chunk + np.arange(chunk)  # [n, chunk]
    valid = cols < vocab
    seg = np.where(valid, probs[rows[:, None], np.minimum(cols, vocab - 1)], 0.0)
    j = (np.cumsum(seg, axis=1) < within[:, None]).sum(axis=1)
    # Rounding can push u just past the chunk's end: fall back to its last token that can be drawn.
    last = chunk - 1 - np.argmax((seg > 0)[:, ::-1], axis=1)
    return c * chunk + np.minimum(j, last)


def _top_m_ids(x: np.ndarray, m: int) -> np.ndarray:
    """Ids of each row's m largest logits, unordered: [n, m].

    Prune first: split each row into nb >= m disjoint sets, take each set's max; the m-th largest of
    those nb maxima is a logit t <= the row's m-th largest (they are nb distinct entries), so
    {x >= t} holds the top m. With sets of 8 that is typically ~m to 2m tokens, and partitioning
    them is far cheaper than partitioning all V."""
    n, vocab = x.shape
    block = min(8, vocab // m)
    if block >= 2:
        nb = vocab // block
        # Interleaved sets {j, j + nb, ...}: the max over axis 1 is an elementwise max of `block`
        # contiguous slices, which vectorizes (a max over contiguous groups of 8 does not).
        set_max = x[:, :nb * block].reshape(n, block, nb).max(axis=1)  # [n, nb]
        t = np.partition(set_max, nb - m, axis=1)[:, nb - m]  # [n]
        rows, cols = np.nonzero(x >= t[:, None])  # row-major: each row's candidates together
        counts = np.bincount(rows, minlength=n)
        width = int(counts.max())
        if width * 4 <= vocab:  # else (flat rows, many ties, -inf sets) pruning buys little
            slot = np.arange(rows.size) - (np.cumsum(counts) - counts)[rows]
            cand = np.zeros((n, width), dtype=np.int64)
            vals = np.full((n, width), -np.inf, dtype=x.dtype)  # pads lose: each row has >= m real
            cand[rows, slot] = cols
            vals[rows, slot] = x[rows, cols]
            return np.take_along_axis(cand, np.argpartition(vals, width - m, axis=1)[:, width - m:], axis=1)
    return np.argpartition(x, vocab - m, axis=1)[:, vocab - m:]


def _log_min_p(min_p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(min_p)  # min_p = 0 -> -inf: keeps everything


@dataclass
class _Rows:
    """Per-row sampling parameters of the random rows, as arrays."""
    temp: np.ndarray  # [n] float32
    top_k: np.ndarray  # [n] int64; vocab = off
    top_p: np.ndarray  # [n] float64
    min_p: np.ndarray  # [n] float32
    row_max: np.ndarray  # [n] float32, 0 for a row with every token forbidden (no NaN from -inf - -inf)
    seeds: list
    steps: list  # output tokens so far: the seeded noise's step

    @classmethod
    def build(cls, meta: SamplingMetadata, rows: np.ndarray, x: np.ndarray) -> "_Rows":
        vocab = x.shape[1]
        top_k = np.asarray(meta.top_k, dtype=np.int64)[rows]
        row_max = x.max(axis=1)
        row_max[~np.isfinite(row_max)] = 0.0
        return cls(np.asarray(meta.temperature, dtype=np.float32)[rows],
                   np.where((top_k > 0) & (top_k < vocab), top_k, vocab),
                   np.asarray(meta.top_p, dtype=np.float64)[rows],
                   np.asarray(meta.min_p, dtype=np.float32)[rows], row_max,
                   [meta.seeds[i] for i in rows], [len(meta.output_token_ids[i]) for i in rows])

    def take(self, idx: np.ndarray) -> "_Rows":
        return _Rows(self.temp[idx], self.top_k[idx], self.top_p[idx], self.min_p[idx], self.row_max[idx],
                     [self.seeds[i] for i in idx], [self.steps[i] for i in idx])
