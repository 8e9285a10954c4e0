"""The GPU sampler: the NumPy Sampler's semantics (sampler.py is the spec) on CuPy logits.

One call per step: each row's step record (its parameter slot, what changes every call), the
parameter records of rows new to their slots, the sparse edit lists (logit bias, suppressed ids,
allowed-token masks) and the penalty-state diffs are packed on the host into one buffer and copied
to the device once; `process_logits_kernel` applies the edits to a copy of the logits (only when a
row has any), `sample_kernel` samples every row and computes logprobs; one device-to-host copy
brings back the token ids (and the logprob rows when a row asked). All-greedy steps with no edits
and no logprobs run `argmax_kernel` only. The kernels are in kernels_cu/sampling.cu, whose header
states where the results can differ from NumPy's (the random draws themselves, and top-p at a
boundary within float rounding).

Penalties read per-request state kept on the device (penalty_slots.py): output token counts and
prompt membership per slot, updated by diffs. The host uploads a request's prompt and output once,
when it gets a slot; after that the device counts the tokens it samples itself, so a step costs the
host nothing per penalty row and the rows' newest tokens need not be known on the host (the engine
keeps async scheduling on with penalties).

Sampling parameters are per-request state on the device too (param_slots.py): a table of records,
one per slot, that the kernels read; a call uploads only the records of rows whose request is new
to its slot, so the steady state packs one small step record per row and no parameters.
"""
from __future__ import annotations

import numpy as np

from rvllm.backend import nvrtc
from rvllm.sampling.logprobs import LogprobsRow, gather_logprobs, log_softmax
from rvllm.sampling.metadata import GREEDY_TEMPERATURE, SamplingMetadata
from rvllm.sampling.param_slots import NO_SLOT, ParamSlots
from rvllm.sampling.penalty_slots import PenaltySlots, SlotUpdate
from rvllm.sampling.sampler import SamplerOutput

try:  # cupy is optional; guarded like backend/cuda.py
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install
    cp = None

FILE = "sampling.cu"
THREADS = 1024  # SAMPLER_THREADS in sampling.cu
MAX_TOP_LOGPROBS = 20  # sampling.cu; rows asking for more get theirs on the host
MAX_VOCAB = 1 << 23  # fixed-point masses (2^40 per token) must sum below 2^63
_MASK64 = (1 << 64) - 1
ARGMAX_SPLIT_ROWS = 1024  # rows the split argmax keeps scratch for; larger batches use one block a row
_ARGMAX_CHUNK = 2048  # the fewest floats a split argmax block reads
_ALIGN = 16

# Mirrors `struct RowParams` in sampling.cu: a request's record in the parameter table (64 bytes;
# its last 12 are padding).
PARAMS_DTYPE = np.dtype({
    "names": ["top_p", "seed", "temperature", "log_min_p", "repetition_penalty", "frequency_penalty",
              "presence_penalty", "top_k", "num_logprobs", "greedy", "seeded"],
    "formats": ["<f8", "<u8", "<f4", "<f4", "<f4", "<f4", "<f4", "<i4", "<i4", "<i4", "<i4"],
    "offsets": [0, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48],
    "itemsize": 64,
})
# Mirrors `struct RowStep` in sampling.cu: one row of a call (32 bytes; its last 4 are padding).
STEP_DTYPE = np.dtype({
    "names": ["step", "slot", "fresh", "mask_row", "pen_slot", "pen_reset"],
    "formats": ["<u8", "<i4", "<i4", "<i4", "<i4", "<i4"],
    "offsets": [0, 8, 12, 16, 20, 24],
    "itemsize": 32,
})
# What the kernels read about a row (sampling.cu's Row): the record and the Philox counter words.
ROW_DTYPE = np.dtype([(name, PARAMS_DTYPE.fields[name][0]) for name in PARAMS_DTYPE.names]
                     + [("step", "<u8"), ("tag", "<i4"), ("mask_row", "<i4"), ("pen_slot", "<i4"),
                        ("pen_reset", "<i4")])


def argmax_splits(num_rows: int, vocab: int, num_sms: int) -> int:
    """Blocks per row for argmax_kernel: enough for about two blocks per SM over the batch, each
    reading at least _ARGMAX_CHUNK floats; one for batches past ARGMAX_SPLIT_ROWS rows."""
    if num_rows > ARGMAX_SPLIT_ROWS or num_rows < 1:
        return 1
    return max(1, min(-(-vocab // _ARGMAX_CHUNK), -(-2 * num_sms // num_rows)))


class GpuSampler:
    def __init__(self, backend, seed: int = 0, max_num_seqs: int = 256):
        """backend: the CudaBackend in use (its dtype picks the compiled module; the kernels are
        float32 throughout). seed: keys the noise of rows without a seed of their own, together
        with a counter of calls. max_num_seqs: rows per call at most, the penalty state's slots."""
        if cp is None:
            raise RuntimeError("GpuSampler needs cupy (pip install 'rvllm[cuda12]' or 'rvllm[cuda13]')")
        dtype = getattr(backend, "dtype", None)
        self.dtype = dtype if dtype in nvrtc.DTYPES else nvrtc.DTYPES[0]
        self.seed = int(seed) & _MASK64
        self.calls = 0  # the Philox step of unseeded rows
        # The split argmax's per-row scratch: zero, and left zero by every launch (sampling.cu).
        # Allocated here, before any CUDA graph capture, and kept for the graphs' lifetime.
        self._argmax_keys = cp.zeros(ARGMAX_SPLIT_ROWS, np.uint64)
        self._argmax_done = cp.zeros(ARGMAX_SPLIT_ROWS, np.int32)
        self.penalty_slots = PenaltySlots(max_num_seqs)
        self.param_slots = ParamSlots(max_num_seqs)
        # The parameter table (sampling.cu's RowParams per slot): uninitialized, a slot's record is
        # written by the first call that uses the slot (param_slots.py). `_records_vocab`: the
        # vocabulary the records were made for (top-k is clamped to it).
        self._param_table = cp.empty(max_num_seqs * PARAMS_DTYPE.itemsize, np.uint8)
        self._records_vocab = None
        # counts [S, V] int32 and in_prompt [S, V] uint8 (penalty_slots.py), allocated by the first call
        # with a penalty row: many deployments never use penalties, and at S = 256 and V = 152k the
        # counts alone are 155 MB. Allocating there is safe: the sampler is never part of a CUDA graph
        # (graphs.py captures the forward and the logits only). Until then the kernels get a stand-in,
        # never read (no row has a slot).
        self._counts = self._in_prompt = None
        self._no_state = cp.zeros(1, np.int32)
        self.num_sms = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"])

    def _kernel(self, name: str):
        return nvrtc.get_kernel(FILE, name, self.dtype)

    # ---- the step ---------------------------------------------------------------------------------
    def __call__(self, logits, meta: SamplingMetadata) -> SamplerOutput:
        """logits: cupy float32 [B, V], C-contiguous, on the device. Returns host token ids."""
        return self.launch(logits, meta).result()

    def launch(self, logits, meta: SamplingMetadata) -> "PendingSample":
        """Queues the sampling of `logits` on the current stream without waiting for the device:
        inputs go up from pinned memory, the results come back into pinned memory behind an event.
        PendingSample.token_ids is the device array of sampled ids (the next step's inputs may read
        it); .result() waits for the copy and returns the SamplerOutput."""
        num_rows, vocab = self._check(logits, meta)
        step = self.calls
        self.calls += 1
        if num_rows == 0:
            return PendingSample(meta, 0, vocab)
        if meta.all_greedy and not meta.needs_logit_processing and meta.max_num_logprobs is None:
            out = cp.empty(num_rows, dtype=np.int32)
            splits = argmax_splits(num_rows, vocab, self.num_sms)
            self._kernel("argmax_kernel")((num_rows, splits), (THREADS,),
                                          (out, logits, np.int32(vocab), self._argmax_keys, self._argmax_done))
            return PendingSample(meta, num_rows, vocab, out)

        staged, dev, args = self._upload(meta, vocab, step, sampling=True)
        x = self._process(logits, dev, args, step) if meta.needs_logit_processing else logits
        want_lp = meta.max_num_logprobs is not None
        out = cp.empty(num_rows * (3 + 2 * MAX_TOP_LOGPROBS) if want_lp else num_rows, dtype=np.int32)
        counts = self._counts if self._counts is not None else self._no_state
        self._kernel("sample_kernel")((num_rows,), (THREADS,),
                                      (out, x, np.int32(vocab), np.int32(num_rows), *self._row_args(args, step),
                                       counts))
        # Rows asking more logprobs than the kernel keeps get theirs on the host in result(): copy
        # their logits now (a graph replay of the next step reuses the logits buffer).
        big = [i for i, k in enumerate(meta.num_logprobs) if k is not None and k > MAX_TOP_LOGPROBS] \
            if want_lp and vocab > MAX_TOP_LOGPROBS else []
        big_logits = x[cp.asarray(big, dtype=np.int32)] if big else None
        return PendingSample(meta, num_rows, vocab, out, (big, big_logits), keep=(staged, dev))

    def process_logits(self, logits, meta: SamplingMetadata):
        """Penalties, bias, suppressed ids and masks applied to a copy: cupy float32 [B, V].
        Sampler.process_logits's counterpart (bit-identical); tests and debugging."""
        num_rows, vocab = self._check(logits, meta)
        if num_rows == 0:
            return logits.copy()
        staged, dev, args = self._upload(meta, vocab, self.calls, sampling=False)
        out = self._process(logits, dev, args, self.calls)
        cp.cuda.get_current_stream().synchronize()  # `staged` must outlive the copy
        return out

    def release(self, request_ids) -> None:
        """Finished requests: their penalty and parameter slots are free again (eviction would also
        reclaim them)."""
        self.penalty_slots.release(request_ids)
        self.param_slots.release(request_ids)

    def _row_args(self, args, step: int) -> tuple:
        """The kernels' row arguments (sampling.cu load_row): table, fresh records, step records, call counter."""
        return self._param_table, args["fresh"], args["steps"], np.uint64(step & _MASK64)

    def _process(self, logits, dev, args, step: int):
        num_rows, vocab = logits.shape
        out = cp.empty_like(logits)
        counts, in_prompt = (self._counts, self._in_prompt) if self._counts is not None else (self._no_state,) * 2
        self._kernel("process_logits_kernel")(
            (num_rows,), (THREADS,),
            (out, logits, np.int32(vocab), *self._row_args(args, step), counts, in_prompt, args["prompt_off"],
             args["prompt_tok"], args["new_off"], args["new_tok"], args["bias_off"], args["bias_tok"],
             args["bias_val"], args["sup_off"], args["sup_tok"], args["masks"]))
        return out

    def _penalty_updates(self, meta: SamplingMetadata, vocab: int, sampling: bool) -> list[SlotUpdate | None] | None:
        if meta.no_penalties:
            return None
        if self._counts is None or self._counts.shape[1] != vocab:  # first use, or another vocabulary
            shape = (self.penalty_slots.num_slots, vocab)
            self._counts = self._in_prompt = None  # the old pair's memory back to the pool first
            # Uninitialized: a slot is zeroed when a request gets it (SlotUpdate.reset).
            self._counts, self._in_prompt = cp.empty(shape, np.int32), cp.empty(shape, np.uint8)
            self.penalty_slots.clear()
        return self.penalty_slots.plan(meta, sampling)

    def _upload(self, meta: SamplingMetadata, vocab: int, step: int, sampling: bool):
        """pack_step's buffer on the device: one asynchronous copy from pinned memory (a pageable
        copy would wait for the stream). Returns (the pinned buffer, which must live until the copy
        ran, the device buffer, the kernel arguments: views into it, one per section).
        sampling: sample_kernel runs after process_logits_kernel (it counts the sampled tokens)."""
        updates = self._penalty_updates(meta, vocab, sampling)
        if self._records_vocab != vocab:  # top-k is clamped to the vocabulary: every record anew
            self.param_slots.clear()
            self._records_vocab = vocab
        rows = self.param_slots.plan(meta)
        try:
            host, offsets = pack_step(meta, vocab, step, self.seed, updates, rows)
        except Exception:  # (a bad mask) the planned slot updates will not reach the device
            self.penalty_slots.clear()
            self.param_slots.clear()
            raise
        staged = _pinned(host.size, np.uint8)
        staged[:] = host
        dev = cp.empty(host.size, dtype=np.uint8)
        dev.data.copy_from_host_async(staged.ctypes.data, host.size, cp.cuda.get_current_stream())
        return staged, dev, {k: dev[off:off + size] for k, (off, size) in offsets.items()}

    @staticmethod
    def _check(logits, meta: SamplingMetadata) -> tuple[int, int]:
        if not isinstance(logits, cp.ndarray) or logits.dtype != np.float32 or logits.ndim != 2:
            raise ValueError(f"GpuSampler: logits must be a cupy float32 [B, V] array, got "
                             f"{type(logits).__name__} {getattr(logits, 'dtype', '')} {getattr(logits, 'shape', '')}")
        if not logits.flags.c_contiguous:
            raise ValueError(f"GpuSampler: logits must be C-contiguous (strides {logits.strides})")
        num_rows, vocab = logits.shape
        if num_rows != meta.num_rows:
            raise ValueError(f"logits have {num_rows} rows, sampling metadata {meta.num_rows}")
        if not 0 < vocab < MAX_VOCAB:
            raise ValueError(f"GpuSampler: vocabulary size {vocab} outside (0, {MAX_VOCAB})")
        return num_rows, vocab


def _pinned(n: int, dtype) -> np.ndarray:
    """n elements of page-locked host memory from CuPy's pinned pool (freed back to it with the array)."""
    dt = np.dtype(dtype)
    mem = cp.cuda.alloc_pinned_memory(max(n, 1) * dt.itemsize)
    return np.frombuffer(mem, dt, n)


class PendingSample:
    """A launched sampling step: device results, their copy to pinned host memory, an event after it."""

    def __init__(self, meta: SamplingMetadata, num_rows: int, vocab: int, out=None, big=([], None), keep=None):
        """big: (rows that asked more than MAX_TOP_LOGPROBS logprobs, a device copy of their logits)."""
        self.meta, self.num_rows, self.vocab = meta, num_rows, vocab
        self.token_ids = out[:num_rows] if out is not None else None  # device int32 [num_rows]
        self._big, self._big_logits = big
        self._keep = keep  # the input buffers, alive until the kernels ran
        self._host = None
        if out is not None:
            self._host = _pinned(out.size, np.int32)
            stream = cp.cuda.get_current_stream()
            out.data.copy_to_host_async(self._host.ctypes.data, out.nbytes, stream)
            self._event = cp.cuda.Event(disable_timing=True)
            self._event.record(stream)
            self._out = out

    def result(self) -> SamplerOutput:
        """Waits for this step's copy (not for later work on the stream) and unpacks it."""
        n, meta = self.num_rows, self.meta
        if self._host is None:
            return SamplerOutput([], [])
        self._event.synchronize()
        host = self._host
        tokens = host[:n]
        logprobs: list[LogprobsRow | None] = [None] * n
        if host.size > n:  # the logprobs layout (sample_kernel with logprobs)
            chosen = host[n:2 * n].view(np.float32)
            ranks = host[2 * n:3 * n]
            top_ids = host[3 * n:23 * n].reshape(n, MAX_TOP_LOGPROBS)
            top_lps = host[23 * n:43 * n].view(np.float32).reshape(n, MAX_TOP_LOGPROBS)
            big = self._big
            for i, k in enumerate(meta.num_logprobs):
                if k is None or i in big:
                    continue
                m = min(k, self.vocab)
                logprobs[i] = LogprobsRow(int(tokens[i]), float(chosen[i]), int(ranks[i]),
                                          top_ids[i, :m].tolist(), top_lps[i, :m].tolist())
            if big:  # rare: more than the kernel's top-k; the whole rows on the host
                lp = log_softmax(cp.asnumpy(self._big_logits))
                for i, r in zip(big, gather_logprobs(lp, tokens[big], [meta.num_logprobs[i] for i in big])):
                    logprobs[i] = r
        return SamplerOutput(tokens.tolist(), logprobs)


# ---- host-side packing (pure NumPy: the CPU tests check it through an emulation of the kernels) ----

def pack_step(meta: SamplingMetadata, vocab: int, step: int, seed: int,
              updates: list[SlotUpdate | None] | None = None,
              param_rows: tuple[list[int], list[int]] | None = None) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Everything the kernels read but the parameter table, in one uint8 host buffer: the step
    records (STEP_DTYPE, one per row), the parameter records of the fresh rows (PARAMS_DTYPE), the
    CSR lists (penalty-slot updates, bias, suppressed ids) and the allowed-token masks. Returns
    (buffer, {section: (byte offset, byte size)}); sections are 16-byte aligned and never empty.
    step: the call counter (the Philox step of unseeded rows; the kernels get it as an argument);
    seed: the sampler's seed; updates: PenaltySlots.plan's, one per row (needed when a row has a
    penalty); param_rows: ParamSlots.plan's (each row's slot, the fresh rows), None: every row
    fresh, without a slot."""
    n = meta.num_rows
    slots, fresh = param_rows if param_rows is not None else ([NO_SLOT] * n, range(n))
    rows = _row_steps(meta, slots, fresh)
    sections: dict[str, np.ndarray] = {"fresh": _records(meta, fresh, vocab, seed)}
    if updates is None and not meta.no_penalties:
        raise ValueError("pack_step: rows with penalties need their penalty slots (PenaltySlots.plan)")
    prompt_off, new_off = np.zeros(n + 1, np.int32), np.zeros(n + 1, np.int32)
    prompt_tok, new_tok = [], []
    if updates is not None:
        pen_slot, pen_reset = [-1] * n, [False] * n
        prompt_sizes, new_sizes = [0] * n, [0] * n
        for i, u in enumerate(updates):  # one pass: this loop runs for every penalized row every step
            if u is None:
                continue
            pen_slot[i] = u.slot
            if u.reset:  # the prompt's set, once per slot
                pen_reset[i] = True
                prompt_tok.append(np.unique(_in_range(u.prompt, vocab)))
                prompt_sizes[i] = prompt_tok[-1].size
            if len(u.new_tokens):  # none in the steady state
                new_tok.append(_in_range(u.new_tokens, vocab))
                new_sizes[i] = new_tok[-1].size
        rows["pen_slot"] = np.fromiter(pen_slot, np.int32, n)
        rows["pen_reset"] = np.fromiter(pen_reset, np.int32, n)
        if prompt_tok:  # else the offsets stay zero
            np.cumsum(prompt_sizes, out=prompt_off[1:])
        if new_tok:
            np.cumsum(new_sizes, out=new_off[1:])
    sections["prompt_off"], sections["new_off"] = prompt_off, new_off
    sections["prompt_tok"], sections["new_tok"] = (
        np.concatenate(t).astype(np.int32) if t else np.zeros(0, np.int32) for t in (prompt_tok, new_tok))

    bias_off = np.zeros(n + 1, np.int32)
    bias_tok, bias_val = [], []
    if not meta.no_logit_bias:
        for i, bias in enumerate(meta.logit_bias):
            count = 0
            if bias:
                ids = np.fromiter(bias.keys(), np.int64, len(bias))
                vals = np.fromiter(bias.values(), np.float32, len(bias))  # float32 values, as NumPy
                ok = (ids >= 0) & (ids < vocab)
                bias_tok.append(ids[ok])
                bias_val.append(vals[ok])
                count = int(ok.sum())
            bias_off[i + 1] = bias_off[i] + count
    sections["bias_off"] = bias_off
    sections["bias_tok"] = np.concatenate(bias_tok).astype(np.int32) if bias_tok else np.zeros(0, np.int32)
    sections["bias_val"] = np.concatenate(bias_val).astype(np.float32) if bias_val else np.zeros(0, np.float32)

    sup_off = np.zeros(n + 1, np.int32)
    sup_tok = []
    if not meta.no_suppress:
        for i, ids in enumerate(meta.suppress_token_ids):
            a = _in_range(ids, vocab)
            sup_tok.append(a)
            sup_off[i + 1] = sup_off[i] + a.size
    sections["sup_off"] = sup_off
    sections["sup_tok"] = np.concatenate(sup_tok).astype(np.int32) if sup_tok else np.zeros(0, np.int32)

    masks = [(i, m) for i, m in enumerate(meta.allowed_token_masks or ()) if m is not None]
    stacked = np.zeros((len(masks), vocab), np.uint8)
    for j, (i, m) in enumerate(masks):
        m = np.asarray(m, dtype=bool).reshape(-1)
        if m.size != vocab:
            raise ValueError(f"allowed_token_masks[{i}] has {m.size} entries, the vocabulary {vocab}")
        stacked[j] = m
        rows["mask_row"][i] = j
    sections["masks"] = stacked.reshape(-1)

    parts = {"steps": rows.view(np.uint8)}
    parts.update((k, v.view(np.uint8)) for k, v in sections.items())
    offsets, total = {}, 0
    for k, v in parts.items():
        size = max(v.size, 1)  # a kernel argument must point somewhere even when nothing is read
        offsets[k] = (total, size)
        total += -(-size // _ALIGN) * _ALIGN
    host = np.zeros(total, np.uint8)
    for k, v in parts.items():
        host[offsets[k][0]:offsets[k][0] + v.size] = v
    return host, offsets


def _records(meta: SamplingMetadata, rows, vocab: int, seed: int) -> np.ndarray:
    """PARAMS_DTYPE records of these rows (row indices, increasing)."""
    n = len(rows)
    rec = np.zeros(n, dtype=PARAMS_DTYPE)
    if n == 0:
        return rec
    every = n == meta.num_rows

    def column(values, dtype):  # np.fromiter: about twice as fast as np.asarray on a list
        return np.fromiter(values if every else (values[i] for i in rows), dtype, n)

    rec["top_p"] = column(meta.top_p, np.float64)
    temp = column(meta.temperature, np.float64)
    rec["temperature"] = temp  # float32, as NumPy's _Rows
    min_p = column(meta.min_p, np.float32)
    with np.errstate(divide="ignore"):
        rec["log_min_p"] = np.where(min_p > 0, np.log(min_p), np.float32(-np.inf))  # float32 log, as NumPy
    rec["repetition_penalty"] = column(meta.repetition_penalty, np.float64)
    rec["frequency_penalty"] = column(meta.frequency_penalty, np.float64)
    rec["presence_penalty"] = column(meta.presence_penalty, np.float64)
    top_k = column(meta.top_k, np.int64)
    rec["top_k"] = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
    rec["greedy"] = temp < GREEDY_TEMPERATURE
    logprobs = meta.num_logprobs if every else [meta.num_logprobs[i] for i in rows]
    rec["num_logprobs"] = [-1 if k is None else min(k, MAX_TOP_LOGPROBS) for k in logprobs]
    seeds = meta.seeds if every else [meta.seeds[i] for i in rows]
    rec["seed"] = [(s if s is not None else seed) & _MASK64 for s in seeds]
    rec["seeded"] = [s is not None for s in seeds]
    return rec


def _row_steps(meta: SamplingMetadata, slots: list[int], fresh) -> np.ndarray:
    """STEP_DTYPE records, one per row: slot, index of its fresh record, the per-call fields."""
    n = meta.num_rows
    rows = np.zeros(n, dtype=STEP_DTYPE)
    rows["slot"] = np.fromiter(slots, np.int32, n)
    rows["fresh"] = -1
    fresh_idx = np.fromiter(fresh, np.int64, len(fresh))
    rows["fresh"][fresh_idx] = np.arange(len(fresh_idx), dtype=np.int32)
    if meta.seeds.count(None) != n:
        # A seeded row's step is its output length: the same noise after preemption, in any batch.
        rows["step"] = [len(out) if s is not None else 0 for s, out in zip(meta.seeds, meta.output_token_ids)]
    rows["mask_row"] = -1
    rows["pen_slot"] = -1
    return rows


def resolve_rows(table: np.ndarray, fresh: np.ndarray, steps: np.ndarray, call_step: int) -> np.ndarray:
    """sampling.cu's load_row on NumPy arrays: each row's ROW_DTYPE view (its record, from `fresh` or
    the table, and the call's Philox words); writes the fresh records of rows with a slot into the
    table (PARAMS_DTYPE [S]), as the kernels do. The CPU tests' emulation of the kernels runs it."""
    n = steps.size
    out = np.zeros(n, dtype=ROW_DTYPE)
    for r in range(n):
        s = steps[r]
        if s["fresh"] >= 0:
            rec = fresh[s["fresh"]]
            if s["slot"] >= 0:
                table[s["slot"]] = rec
        else:
            rec = table[s["slot"]]
        for name in PARAMS_DTYPE.names:
            out[name][r] = rec[name]
        out["step"][r] = s["step"] if rec["seeded"] else call_step & _MASK64
        out["tag"][r] = 0 if rec["seeded"] else r + 1
        for name in ("mask_row", "pen_slot", "pen_reset"):
            out[name][r] = s[name]
    return out


def _in_range(ids, vocab: int) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab)]
