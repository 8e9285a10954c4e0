"""The GPU sampler: the NumPy Sampler's semantics (sampler.py is the spec) on CuPy logits.

One call per step: each row's step record (its parameter slot, what changes every call), the
parameter records of rows new to their slots, the sparse edit lists (logit bias, suppressed ids,
allowed-token masks) and the penalty-state diffs are packed on the host into one buffer
(gpu_sampler_inputs.py) and copied to the device once; `process_logits_kernel` applies the edits to
a copy of the logits (only when a row has any), `sample_kernel` samples every row and computes
logprobs; one device-to-host copy, on a stream of its own, brings back the token ids (and the
logprob rows when a row asked).
All-greedy steps with no edits and no logprobs run `argmax_kernel` only. Small batches without
logprobs race in `race_kernel`, each row split over blocks, after the rows' thresholds (when a row
has a top-k, top-p or min-p cut) were found split over blocks too (`select_*_kernel`). The kernels are in
kernels_cu/sampling.cu, whose header states where the results can differ from NumPy's (the random
draws themselves, and top-p at a boundary within float rounding).

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
from rvllm.sampling.gpu_sampler_inputs import MASK64, MAX_TOP_LOGPROBS, PARAMS_DTYPE, pack_step
from rvllm.sampling.logprobs import LogprobsRow, gather_logprobs, log_softmax
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling.param_slots import ParamSlots
from rvllm.sampling.penalty_slots import PenaltySlots, SlotUpdate
from rvllm.sampling.sampler import SamplerOutput

try:  # cupy is optional; guarded like backend/cuda.py
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install
    cp = None

FILE = "sampling.cu"
THREADS = 1024  # SAMPLER_THREADS in sampling.cu
MAX_VOCAB = 1 << 23  # fixed-point masses (2^40 per token) must sum below 2^63
ARGMAX_SPLIT_ROWS = 1024  # rows the split argmax keeps scratch for; larger batches use one block a row
_ARGMAX_CHUNK = 2048  # the fewest floats a split argmax block reads
# Calls whose rows split into at least this many blocks each (argmax_splits: batches up to 87 rows
# on 132 SMs) find their thresholds and race split over blocks (select_*_kernel, race_kernel);
# larger ones run sample_kernel, a block a row.
SPLIT_RACE_MIN_SPLITS = 4
SEL_BINS, SEL_CAP = 2048, 6144  # sampling_select.cuh: value bins, candidate keys a row


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
        self.seed = int(seed) & MASK64
        self.calls = 0  # the Philox step of unseeded rows
        # The split argmax's per-row scratch: zero, and left zero by every launch (sampling.cu).
        # Allocated here, before any CUDA graph capture, and kept for the graphs' lifetime.
        self._argmax_keys = cp.zeros(ARGMAX_SPLIT_ROWS, np.uint64)
        self._argmax_done = cp.zeros(ARGMAX_SPLIT_ROWS, np.int32)
        self._stats = cp.empty(2 * ARGMAX_SPLIT_ROWS, np.float32)  # (row max, threshold) a row, for race_kernel
        self._select = None  # the split thresholds' scratch (_select_scratch)
        self.split_race_min_splits = SPLIT_RACE_MIN_SPLITS
        self.penalty_slots = PenaltySlots(max_num_seqs)
        self.param_slots = ParamSlots(max_num_seqs)
        # The parameter table (sampling.cu's RowParams per slot): uninitialized, a slot's record is
        # written by the first call that uses the slot (param_slots.py). `_records_vocab`: the
        # vocabulary the records were made for (top-k is clamped to it).
        self._param_table = cp.empty(max_num_seqs * PARAMS_DTYPE.itemsize, np.uint8)
        self._records_vocab = None
        # counts [S, V] int32 and seen [S, V] uint8 (penalty_slots.py), allocated by the first call
        # with a penalty row: many deployments never use penalties, and at S = 256 and V = 152k the
        # counts alone are 155 MB. Allocating there is safe: the sampler is never part of a CUDA graph
        # (graphs.py captures the forward and the logits only). Until then the kernels get a stand-in,
        # never read (no row has a slot).
        self._counts = self._seen = None
        self._no_state = cp.zeros(1, np.int32)
        # The sampled ids go to the host on a stream of their own, so the next step's input copy
        # and kernels, queued behind the sampler on the compute stream, need not wait for it.
        self._copy_stream = cp.cuda.Stream(non_blocking=True)
        self.num_sms = int(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"])

    def _kernel(self, name: str):
        return nvrtc.get_kernel(FILE, name, self.dtype)

    # ---- the step ---------------------------------------------------------------------------------
    def __call__(self, logits, meta: SamplingMetadata) -> SamplerOutput:
        """logits: cupy float32 [B, V], C-contiguous, on the device (edited in place: launch). Returns
        host token ids."""
        return self.launch(logits, meta).result()

    def launch(self, logits, meta: SamplingMetadata) -> "PendingSample":
        """Queues the sampling of `logits` on the current stream without waiting for the device:
        inputs go up from pinned memory, the results come back into pinned memory behind an event.
        PendingSample.token_ids is the device array of sampled ids (the next step's inputs may read
        it); .result() waits for the copy and returns the SamplerOutput. Penalties, logit bias,
        suppressed ids and masks are applied to `logits` in place (the runner does not read them again)."""
        num_rows, vocab = self._check(logits, meta)
        step = self.calls
        self.calls += 1
        if num_rows == 0:
            return PendingSample(meta, 0, vocab)
        if meta.all_greedy and not meta.needs_logit_processing and meta.max_num_logprobs is None:
            out = cp.empty(num_rows, dtype=np.int32)
            splits = argmax_splits(num_rows, vocab, self.num_sms)
            self._kernel("argmax_kernel")((num_rows, splits), (THREADS,),
                                          (out, logits, np.int32(vocab), self._argmax_keys, self._argmax_done,
                                           np.uint64(0)))
            return PendingSample(meta, num_rows, vocab, out, copy_stream=self._copy_stream)

        staged, dev, args = self._upload(meta, vocab, step, sampling=True)
        x = self._process(logits, dev, args, step) if meta.needs_logit_processing else logits
        want_lp = meta.max_num_logprobs is not None
        out = cp.empty(num_rows * (3 + 2 * MAX_TOP_LOGPROBS) if want_lp else num_rows, dtype=np.int32)
        counts, seen = self._penalty_state()
        row_args = self._row_args(args, step)
        splits = argmax_splits(num_rows, vocab, self.num_sms)
        if want_lp or splits < self.split_race_min_splits:
            self._kernel("sample_kernel")((num_rows,), (THREADS,),  # stats: null (sample every row)
                                          (out, x, np.int32(vocab), np.int32(num_rows), *row_args, counts, seen,
                                           np.uint64(0)))
        else:
            if not (meta.no_top_k_top_p and meta.no_min_p):  # the thresholds first (random rows with a cut)
                self._thresholds(x, meta, splits, row_args, self._stats)
            self._kernel("race_kernel")((num_rows, splits), (THREADS,),
                                        (out, x, np.int32(vocab), *row_args, counts, seen, self._stats,
                                         self._argmax_keys, self._argmax_done))
        # Rows asking more logprobs than the kernel keeps get theirs on the host in result(): copy
        # their logits now (a graph replay of the next step reuses the logits buffer).
        big = [i for i, k in enumerate(meta.num_logprobs) if k is not None and k > MAX_TOP_LOGPROBS] \
            if want_lp and vocab > MAX_TOP_LOGPROBS else []
        big_logits = x[cp.asarray(big, dtype=np.int32)] if big else None
        return PendingSample(meta, num_rows, vocab, out, (big, big_logits), keep=(staged, dev),
                             copy_stream=self._copy_stream)

    def kept_thresholds(self, logits, meta: SamplingMetadata) -> np.ndarray:
        """Per row, the threshold on (x - max) / T above which a sampling call keeps tokens (the top-k,
        top-p and min-p cut), computed as that call would (split over blocks or a block a row: _thresholds);
        NaN for greedy and plain rows. Samples nothing; tests and debugging."""
        num_rows, vocab = self._check(logits, meta)
        staged, dev, args = self._upload(meta, vocab, self.calls, sampling=False)
        x = self._process(logits.copy(), dev, args, self.calls) if meta.needs_logit_processing else logits
        stats = cp.full((num_rows, 2), np.nan, np.float32)
        self._thresholds(x, meta, argmax_splits(num_rows, vocab, self.num_sms), self._row_args(args, self.calls), stats)
        cp.cuda.get_current_stream().synchronize()  # `staged` must outlive the copy
        return stats[:, 1].get()

    def _thresholds(self, x, meta: SamplingMetadata, splits: int, row_args: tuple, stats) -> None:
        """stats [B, 2] = (row max, kept-set threshold) of the random rows with a top-k, top-p or min-p
        cut: split over blocks as the race is (argmax_kernel's max, then select_*_kernel) when the
        call's rows split, else sample_kernel's stats mode, a block a row."""
        num_rows, vocab = x.shape
        v = np.int32(vocab)
        if splits < self.split_race_min_splits:
            self._kernel("sample_kernel")((num_rows,), (THREADS,),
                                          (self._no_state, x, v, np.int32(num_rows), *row_args, self._no_state,
                                           self._no_state, stats))
            return
        sc = self._select_scratch(num_rows)
        scratch = tuple(sc[k] for k in ("count", "mass", "ncand", "flags", "cand", "row_max"))  # SELECT_SCRATCH_PARAMS
        self._kernel("argmax_kernel")((num_rows, splits), (THREADS,),
                                      (self._no_state, x, v, self._argmax_keys, self._argmax_done, sc["row_max"]))
        if not meta.no_top_k_top_p:  # rows with min-p alone need only the max
            for name in ("select_count_kernel", "select_gather_kernel"):
                self._kernel(name)((num_rows, splits), (THREADS,), (x, v, *row_args, *scratch))
        self._kernel("select_kernel")((num_rows,), (THREADS,), (x, v, *row_args, *scratch, stats))

    def _select_scratch(self, num_rows: int) -> dict:
        """The split thresholds' per-row scratch (sampling.cu SelectScratch), for at least num_rows rows:
        count, mass, ncand and flags zero (and left zero by select_kernel); cand and row_max are
        written before they are read."""
        if self._select is None or self._select["ncand"].size < num_rows:
            self._select = None  # the old buffers back to the pool first
            self._select = {"count": cp.zeros(num_rows * SEL_BINS, np.uint32),
                            "mass": cp.zeros(num_rows * SEL_BINS, np.uint64),
                            "ncand": cp.zeros(num_rows, np.uint32), "flags": cp.zeros(num_rows, np.uint32),
                            "cand": cp.empty(num_rows * SEL_CAP, np.uint32), "row_max": cp.empty(num_rows, np.float32)}
        return self._select

    def process_logits(self, logits, meta: SamplingMetadata):
        """Penalties, bias, suppressed ids and masks applied to a copy: cupy float32 [B, V].
        Sampler.process_logits's counterpart (bit-identical); tests and debugging."""
        num_rows, vocab = self._check(logits, meta)
        if num_rows == 0:
            return logits.copy()
        staged, dev, args = self._upload(meta, vocab, self.calls, sampling=False)
        out = self._process(logits.copy(), dev, args, self.calls)
        cp.cuda.get_current_stream().synchronize()  # `staged` must outlive the copy
        return out

    def release(self, request_ids) -> None:
        """Finished requests: their penalty and parameter slots are free again (eviction would also
        reclaim them)."""
        self.penalty_slots.release(request_ids)
        self.param_slots.release(request_ids)

    def _row_args(self, args, step: int) -> tuple:
        """The kernels' row arguments (sampling.cu load_row): table, fresh records, step records, call counter."""
        return self._param_table, args["fresh"], args["steps"], np.uint64(step & MASK64)

    def _penalty_state(self) -> tuple:
        """(counts, seen) for the kernels: the state, or a never-read stand-in before first use."""
        return (self._counts, self._seen) if self._counts is not None else (self._no_state,) * 2

    def _process(self, logits, dev, args, step: int):
        """Penalties, bias, suppressed ids and masks applied to `logits` in place (returned)."""
        num_rows, vocab = logits.shape
        self._kernel("process_logits_kernel")(
            (num_rows,), (THREADS,),
            (logits, np.int32(vocab), *self._row_args(args, step), *self._penalty_state(), args["prompt_off"],
             args["prompt_tok"], args["new_off"], args["new_tok"], args["bias_off"], args["bias_tok"],
             args["bias_val"], args["sup_off"], args["sup_tok"], args["masks"]))
        return logits

    def _penalty_updates(self, meta: SamplingMetadata, vocab: int, sampling: bool) -> list[SlotUpdate | None] | None:
        if meta.no_penalties:
            return None
        if self._counts is None or self._counts.shape[1] != vocab:  # first use, or another vocabulary
            shape = (self.penalty_slots.num_slots, vocab)
            self._counts = self._seen = None  # the old pair's memory back to the pool first
            # Uninitialized: a slot is zeroed when a request gets it (SlotUpdate.reset).
            self._counts, self._seen = cp.empty(shape, np.int32), cp.empty(shape, np.uint8)
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

    def __init__(self, meta: SamplingMetadata, num_rows: int, vocab: int, out=None, big=([], None), keep=None,
                 copy_stream=None):
        """big: (rows that asked more than MAX_TOP_LOGPROBS logprobs, a device copy of their logits).
        copy_stream: where the copy of `out` to the host runs, after the current stream's work so far
        (an event), so that work queued later on the current stream does not wait for the copy; the
        current stream itself when None. `out` stays referenced until result() has waited for it."""
        self.meta, self.num_rows, self.vocab = meta, num_rows, vocab
        self.token_ids = out[:num_rows] if out is not None else None  # device int32 [num_rows]
        self._big, self._big_logits = big
        self._keep = keep  # the input buffers, alive until the kernels ran
        self._host = None
        if out is not None:
            self._host = _pinned(out.size, np.int32)
            stream = cp.cuda.get_current_stream()
            if copy_stream is not None:
                sampled = cp.cuda.Event(disable_timing=True)
                sampled.record(stream)
                copy_stream.wait_event(sampled)
                stream = copy_stream
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
