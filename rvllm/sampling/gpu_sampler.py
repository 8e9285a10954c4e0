"""The GPU sampler: the NumPy Sampler's semantics (sampler.py is the spec) on CuPy logits.

One call per step: the per-row parameters and the sparse edit lists (penalties, logit bias,
suppressed ids, allowed-token masks) are packed on the host into one buffer and copied to the
device once; `process_logits_kernel` applies the edits to a copy of the logits (only when a row
has any), `sample_kernel` samples every row and computes logprobs; one device-to-host copy brings
back the token ids (and the logprob rows when a row asked). All-greedy steps with no edits and no
logprobs run `argmax_kernel` only. The kernels are in kernels_cu/sampling.cu, whose header states
where the results can differ from NumPy's (the random draws themselves, and top-p at a boundary
within float rounding).

Penalty lists are rebuilt from the request's token ids on every call (NumPy on the host, O(prompt +
output) per row). The next step is persistent device state per request slot (output counts,
parameters) updated by diffs, as the design's "GPU habits" ask.
"""
from __future__ import annotations

import numpy as np

from rvllm.backend import nvrtc
from rvllm.sampling.logprobs import LogprobsRow, gather_logprobs, log_softmax
from rvllm.sampling.metadata import GREEDY_TEMPERATURE, SamplingMetadata
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

# Mirrors `struct RowParams` in sampling.cu (64 bytes).
ROW_DTYPE = np.dtype({
    "names": ["top_p", "seed", "step", "temperature", "log_min_p", "repetition_penalty",
              "frequency_penalty", "presence_penalty", "top_k", "tag", "num_logprobs", "greedy", "mask_row"],
    "formats": ["<f8", "<u8", "<u8", "<f4", "<f4", "<f4", "<f4", "<f4", "<i4", "<i4", "<i4", "<i4", "<i4"],
    "offsets": [0, 8, 16, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60],
    "itemsize": 64,
})


def argmax_splits(num_rows: int, vocab: int, num_sms: int) -> int:
    """Blocks per row for argmax_kernel: enough for about two blocks per SM over the batch, each
    reading at least _ARGMAX_CHUNK floats; one for batches past ARGMAX_SPLIT_ROWS rows."""
    if num_rows > ARGMAX_SPLIT_ROWS or num_rows < 1:
        return 1
    return max(1, min(-(-vocab // _ARGMAX_CHUNK), -(-2 * num_sms // num_rows)))


class GpuSampler:
    def __init__(self, backend, seed: int = 0):
        """backend: the CudaBackend in use (its dtype picks the compiled module; the kernels are
        float32 throughout). seed: keys the noise of rows without a seed of their own, together
        with a counter of calls."""
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

        staged, dev, args = self._upload(meta, vocab, step)
        x = self._process(logits, dev, args) if meta.needs_logit_processing else logits
        want_lp = meta.max_num_logprobs is not None
        out = cp.empty(num_rows * (3 + 2 * MAX_TOP_LOGPROBS) if want_lp else num_rows, dtype=np.int32)
        self._kernel("sample_kernel")((num_rows,), (THREADS,),
                                      (out, x, np.int32(vocab), np.int32(num_rows), args["params"]))
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
        staged, dev, args = self._upload(meta, vocab, self.calls)
        out = self._process(logits, dev, args)
        cp.cuda.get_current_stream().synchronize()  # `staged` must outlive the copy
        return out

    def _process(self, logits, dev, args):
        num_rows, vocab = logits.shape
        out = cp.empty_like(logits)
        self._kernel("process_logits_kernel")(
            (num_rows,), (THREADS,),
            (out, logits, np.int32(vocab), args["params"], args["pen_off"], args["pen_tok"], args["pen_count"],
             args["pen_in_prompt"], args["bias_off"], args["bias_tok"], args["bias_val"], args["sup_off"],
             args["sup_tok"], args["masks"]))
        return out

    def _upload(self, meta: SamplingMetadata, vocab: int, step: int):
        """pack_step's buffer on the device: one asynchronous copy from pinned memory (a pageable
        copy would wait for the stream). Returns (the pinned buffer, which must live until the copy
        ran, the device buffer, the kernel arguments: views into it, one per section)."""
        host, offsets = pack_step(meta, vocab, step, self.seed)
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

def pack_step(meta: SamplingMetadata, vocab: int, step: int, seed: int) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Everything the kernels read, in one uint8 host buffer: per-row params (ROW_DTYPE), the CSR
    lists (penalties, bias, suppressed ids) and the allowed-token masks. Returns (buffer,
    {section: (byte offset, byte size)}); sections are 16-byte aligned and never empty.
    step: the call counter (the Philox step of unseeded rows); seed: the sampler's seed."""
    n = meta.num_rows
    rows = _row_params(meta, vocab, step, seed)
    sections: dict[str, np.ndarray] = {}
    pen_off = np.zeros(n + 1, np.int32)
    pen = ([], [], [])  # token ids, output counts, in-prompt flags
    if not meta.no_penalties:
        for i in range(n):
            rep, freq, pres = meta.repetition_penalty[i], meta.frequency_penalty[i], meta.presence_penalty[i]
            size = 0
            if rep != 1.0 or freq != 0.0 or pres != 0.0:
                ids, counts = np.unique(_in_range(meta.output_token_ids[i], vocab), return_counts=True)
                flags = np.zeros(ids.size, np.int32)
                if rep != 1.0:  # repetition also covers prompt tokens
                    prompt = np.unique(_in_range(meta.prompt_token_ids[i], vocab))
                    all_ids = np.union1d(ids, prompt)
                    c = np.zeros(all_ids.size, np.int64)
                    c[np.searchsorted(all_ids, ids)] = counts
                    flags = np.isin(all_ids, prompt).astype(np.int32)
                    ids, counts = all_ids, c
                pen[0].append(ids)
                pen[1].append(counts)
                pen[2].append(flags)
                size = ids.size
            pen_off[i + 1] = pen_off[i] + size
    sections["pen_off"] = pen_off
    sections["pen_tok"], sections["pen_count"], sections["pen_in_prompt"] = (
        np.concatenate(p).astype(np.int32) if p else np.zeros(0, np.int32) for p in pen)

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

    parts = {"params": rows.view(np.uint8)}
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


def _row_params(meta: SamplingMetadata, vocab: int, step: int, seed: int) -> np.ndarray:
    n = meta.num_rows
    rows = np.zeros(n, dtype=ROW_DTYPE)
    rows["top_p"] = meta.top_p
    temp = np.asarray(meta.temperature, dtype=np.float64)
    rows["temperature"] = temp.astype(np.float32)  # as NumPy's _Rows: float32
    min_p = np.asarray(meta.min_p, dtype=np.float32)
    with np.errstate(divide="ignore"):
        rows["log_min_p"] = np.where(min_p > 0, np.log(min_p), np.float32(-np.inf))  # float32 log, as NumPy
    rows["repetition_penalty"] = meta.repetition_penalty
    rows["frequency_penalty"] = meta.frequency_penalty
    rows["presence_penalty"] = meta.presence_penalty
    top_k = np.asarray(meta.top_k, dtype=np.int64)
    rows["top_k"] = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
    rows["greedy"] = temp < GREEDY_TEMPERATURE
    rows["num_logprobs"] = [-1 if k is None else min(k, MAX_TOP_LOGPROBS) for k in meta.num_logprobs]
    seeded = np.array([s is not None for s in meta.seeds], dtype=bool)
    rows["seed"] = [(s & _MASK64) if s is not None else (seed & _MASK64) for s in meta.seeds]
    # A seeded row's step is its output length: the same noise after preemption, in any batch.
    rows["step"] = [len(out) if s is not None else step for s, out in zip(meta.seeds, meta.output_token_ids)]
    rows["tag"] = np.where(seeded, 0, np.arange(1, n + 1))
    rows["mask_row"] = -1
    return rows


def _in_range(ids, vocab: int) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab)]
