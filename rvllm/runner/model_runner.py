"""SchedulerOutput -> one flat ragged batch -> model forward -> sampler -> token ids.

The runner owns the device side of the engine: the backend, the model, the paged KV cache, the
step-input buffers, the CUDA graphs and the sampler. It reads the scheduled requests (token ids,
block ids, sampling params) and returns, per request that reached the end of its tokens, the next
token id (and logprobs when asked).

A step on the GPU: the inputs are packed from Python lists into one pinned buffer and copied to the
device in one asynchronous copy (step_inputs.py); a pure-decode step replays the CUDA graph of its
batch-size bucket (graphs.py), any other step runs the forward eagerly; GpuSampler samples from the
logits on the device (the NumPy Sampler on the CPU backend). Everything runs on backend.stream; the
only host sync is reading the sampled tokens.

`launch` queues a step and returns a PendingStep without waiting; `PendingStep.result()` waits for
that step's sampled ids. The engine's async scheduling launches step N+1 before reading step N: a
decode whose input token is still a placeholder gets it from step N's sampled ids on the device.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from rvllm.backend.cpu import AttentionMetadata
from rvllm.model.llama import LlamaModel
from rvllm.runner.step_inputs import StepBuffers, StepLayout, StepMetadata, collect, serialize
from rvllm.sampling.gpu_sampler import GpuSampler
from rvllm.sampling.logprobs import gather_logprobs, log_softmax
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling.sampler import Sampler


log = logging.getLogger("rvllm.runner")

# Token rows the step buffers hold when the engine does not say (they grow on demand in eager mode).
_DEFAULT_MAX_TOKENS = 8192


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> next token id
    # request id -> (chosen logprob, chosen rank, top ids, top logprobs) for the sampled token
    logprobs: dict[str, tuple] = field(default_factory=dict)
    # request id -> [(token id, its logprob, its rank, top ids, top logprobs)] for prompt tokens 1.., in order
    prompt_logprobs: dict[str, list] = field(default_factory=dict)


class _Done:
    """A sampling result that is already on the host (the CPU backend samples synchronously)."""

    def __init__(self, result):
        self._result = result
        self.token_ids = np.asarray(result.token_ids, np.int32)

    def result(self):
        return self._result


class PendingStep:
    """A launched step (ModelRunner.launch); result() waits for its sampled ids and returns them."""

    def __init__(self, runner, batch, hidden=None):
        self.runner, self.batch, self.hidden = runner, batch, hidden  # hidden: for prompt logprobs
        self.sample = None
        self.profile: dict | None = None  # with a profiler: host seconds and the step's CUDA events

    def sample_ids_device(self):
        return self.sample.token_ids if self.sample is not None else None

    def result(self) -> RunnerOutput:
        out = RunnerOutput()
        batch = self.batch
        if batch is None:
            return out
        if self.sample is not None:
            t0 = time.perf_counter()
            result = self.sample.result()
            if self.profile is not None:
                self.profile["wait"] = time.perf_counter() - t0
            out.sampled = dict(zip(batch.sample_ids, map(int, result.token_ids)))  # no Python loop per row
            if result.logprobs.count(None) != len(result.logprobs):  # some row asked for logprobs
                for req_id, lp in zip(batch.sample_ids, result.logprobs):
                    if lp is not None:
                        out.logprobs[req_id] = (lp.logprob, lp.rank, lp.top_ids, lp.top_logprobs)
        if batch.prompt_logprob_rows:
            with self.runner._on_stream():
                self.runner._prompt_logprobs(self.hidden, batch, out)
        return out


class ModelRunner:
    def __init__(self, spec, weights, backend, num_blocks: int, block_size: int, seed: int = 0, *,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, cuda_graphs: bool = False):
        """max_num_seqs, max_num_batched_tokens: the scheduler's limits (they size the step buffers
        and the graph buckets). cuda_graphs: capture decode graphs now (CUDA only; the engine passes
        `not enforce_eager`)."""
        self.spec = spec
        self.ops = backend
        self.model = LlamaModel(spec, weights, backend)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = int(weights.cos_sin.shape[0])  # the loader sizes the rotary table to it
        self.stream = getattr(backend, "stream", None)  # CUDA: every step runs on it
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        with self._on_stream():
            # [num_blocks, block_size, num_kv_heads, head_dim] per layer, for K and for V.
            self.kv_caches = [(backend.zeros(shape, backend.compute_dtype), backend.zeros(shape, backend.compute_dtype))
                              for _ in range(spec.num_layers)]
            max_reqs = max(1, max_num_seqs)
            max_tokens = max(max_num_batched_tokens or _DEFAULT_MAX_TOKENS, min(max_reqs, 512))
            max_width = -(-self.max_model_len // block_size)
            max_rows = min(max_reqs, max_tokens)
            # Room for a step whose every row sends its whole block list (block_tables.py).
            self.inputs = StepBuffers(backend, StepLayout(max_tokens, max_rows, max_width, max_rows * max_width).size,
                                      max_reqs, max_width)
            self.sampler = Sampler()
            self.rng = np.random.default_rng(seed)
            self.gpu_sampler = GpuSampler(backend, seed, max_reqs) if backend.name == "cuda" else None
            self.graphs = None
            # The last launch's sampled ids (device) and request id -> row: placeholders read them.
            self._prev_sampled = None
            self._prev_rows: dict[str, int] = {}
            self.num_placeholder_tokens = 0  # input tokens read from the device (async scheduling)
            self.profiler = None  # a runner/profiling.StepProfiler while benchmarks profile steps
            self._pack_seconds = 0.0
            self._uploaded_mark = None
            if self.stream is not None:
                backend.synchronize_device()  # weights were loaded on another stream
            if cuda_graphs and backend.name == "cuda":
                self.capture_graphs(max_num_seqs)

    def _on_stream(self):
        return self.stream if self.stream is not None else contextlib.nullcontext()

    @property
    def penalties_on_device(self) -> bool:
        """The sampler keeps penalty state on the device and counts the tokens it samples itself, so
        penalized requests need not have their newest tokens on the host (async scheduling keeps
        going). False for the NumPy sampler, which reads each request's output tokens."""
        return self.gpu_sampler is not None

    def capture_graphs(self, max_num_seqs: int) -> None:
        from rvllm.runner.graphs import CudaGraphs

        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        with self._on_stream():
            graphs = CudaGraphs(self, max_num_seqs)
            graphs.capture()
        self.graphs = graphs
        log.info("CUDA graphs: %d decode batch sizes (%d..%d, contexts up to %d tokens; %d with a short-context "
                 "graph) captured in %.2f s (%s)", len(graphs.buckets), graphs.buckets[0], graphs.buckets[-1],
                 graphs.max_context, len(graphs.short_graphs), graphs.capture_seconds,
                 ", ".join(f"{k} {v:.2f} s" for k, v in graphs.capture_phases.items()))

    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One forward of `num_tokens` prompt tokens (as one request) plus logits for `num_seqs` rows,
        so the device allocator has seen the step's peak activation memory before the KV cache is sized."""
        num_tokens = min(num_tokens, self.num_blocks * self.block_size)
        blocks = list(range(-(-num_tokens // self.block_size)))
        ops = self.ops
        with self._on_stream():
            meta = AttentionMetadata(
                ops.from_host(np.array([0, num_tokens], np.int32)), ops.from_host(np.array([num_tokens], np.int32)),
                ops.from_host(np.array([blocks], np.int32)),
                ops.from_host(np.arange(num_tokens, dtype=np.int32)), num_tokens, num_tokens, [num_tokens], [num_tokens])
            ids = ops.from_host(np.zeros(num_tokens, np.int32))
            positions = ops.from_host(np.arange(num_tokens, dtype=np.int32) % self.model.w.cos_sin.shape[0])
            hidden = self.model.forward(ids, positions, self.kv_caches, meta)
            self.model.compute_logits(hidden[: min(num_seqs, num_tokens)])
            ops.synchronize()

    @staticmethod
    def kv_bytes_per_block(spec, block_size: int, itemsize: int) -> int:
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize

    def execute(self, sched) -> RunnerOutput:
        """Runs one step and returns its tokens (launch, then wait for its result)."""
        return self.launch(sched).result()

    def launch(self, sched) -> "PendingStep":
        """Queues one step on the device and returns without waiting for it: the inputs are uploaded,
        the forward and the sampler launched, the sampled ids' copy to the host queued. Placeholder
        tokens (async scheduling, engine/request.py) are read from the previous launch's sampled ids
        on the device. PendingStep.result() waits for this step only."""
        if sched.finished_req_ids:  # before this step's rows take slots
            self.inputs.table_slots.release(sched.finished_req_ids)
            if self.gpu_sampler is not None:
                self.gpu_sampler.release(sched.finished_req_ids)
        if not sched.scheduled:
            return PendingStep(self, None)
        prof = self.profiler
        with self._on_stream():
            t0 = time.perf_counter()
            start = prof.mark() if prof else None
            batch, hidden, logits, _ = self.forward_step(sched)
            forwarded = prof.mark() if prof else None
            pending = PendingStep(self, batch, hidden)
            t_sample = time.perf_counter()
            if batch.sample_rows:
                pending.sample = self._launch_sample(logits, batch)
            t_sample = time.perf_counter() - t_sample
            self._prev_sampled = pending.sample_ids_device()
            self._prev_rows = dict(zip(batch.sample_ids, range(len(batch.sample_ids))))
            if prof:
                pending.profile = {"pack": self._pack_seconds, "launch": time.perf_counter() - t0, "sampler": t_sample,
                                   "events": (start, self._uploaded_mark, forwarded, prof.mark()),
                                   "prompt_tokens": batch.num_tokens - batch.num_reqs}
        return pending

    def forward_step(self, sched, use_graphs: bool = True):
        """Packs and uploads the step, runs the forward -> (StepBatch, hidden [T, H] or None for a
        decode step (a graph replay, or model.forward_logits eagerly), logits [S, V] of the rows that
        sample or None, graph bucket or None). Runs on the current stream (execute makes
        backend.stream current); tests call it directly."""
        t0 = time.perf_counter()
        try:
            batch = collect(sched, self.block_size, self._prev_rows, self.inputs.table_slots)
            bucket = self.graphs.bucket_for(batch) if self.graphs is not None and use_graphs else None
            data, lay = serialize(batch, bucket or 0, bucket or 0)
            if not self.inputs.fits(lay.size):  # only when the engine did not pass its limits
                if self.graphs is not None:  # they hold views of the old buffers
                    log.warning("a step of %d tokens outgrew the step buffers: CUDA graphs dropped", batch.num_tokens)
                    self.graphs.release()
                    self.graphs = None
                    bucket = None
                    data, lay = serialize(batch)
                self.inputs.grow(lay.size)
            self._pack_seconds = time.perf_counter() - t0
            # Placeholder ids (-1 - k) become row k of the previous launch's sampled ids, on the device;
            # a graph's step gathers its embedding rows here too (the graph starts at the first layer).
            embed = (self.model.w.embed, self.graphs.embedded[: lay.n]) if bucket is not None else None
            self.inputs.load(data, lay, self.block_size, self._prev_sampled if batch.num_placeholders else None,
                             embed)
        except BaseException:
            self.inputs.table_slots.forget_all()  # collect() counted block ids the device did not get
            raise
        self.num_placeholder_tokens += batch.num_placeholders
        if self.profiler:
            self._uploaded_mark = self.profiler.mark()
        if bucket is not None:
            logits = self.graphs.replay(bucket, batch.max_seq_len)
            return batch, None, logits[: batch.num_reqs], bucket  # decode: every row samples
        hidden, logits = self._forward_eager(batch, lay)
        return batch, hidden, logits, None

    def _forward_eager(self, batch, lay: StepLayout):
        """(hidden [T, H], logits of the sampled rows [S, V] or None); a decode step (every row samples,
        no prompt logprobs) runs forward_logits, whose final norm is inside the logits op, and has no
        hidden."""
        ids, positions, slots, qsl, seq_lens, logits_idx, tables = self.inputs.views(lay)
        meta = StepMetadata(qsl, seq_lens, tables, slots, max_query_len=max(batch.query_lens),
                            max_seq_len=batch.max_seq_len, query_lens_host=batch.query_lens,
                            seq_lens_host=batch.seq_lens)
        num_sample = len(batch.logits_indices) if batch.sample_rows else 0
        if num_sample == batch.num_tokens and not batch.prompt_logprob_rows:  # a decode step: every row samples
            return None, self.model.forward_logits(ids, positions, self.kv_caches, meta)  # [T, V]
        hidden = self.model.forward(ids, positions, self.kv_caches, meta)  # [T, H]
        if not num_sample:
            return hidden, None
        if num_sample == batch.num_tokens:  # every row samples: no gather
            rows = hidden
        else:
            rows = self.ops.embedding(logits_idx[:num_sample], hidden)  # a row gather (no CuPy kernel)
        return hidden, self.model.compute_logits(rows)  # [S, V]

    def _launch_sample(self, logits, batch):
        meta = SamplingMetadata.from_requests(batch.sample_rows, batch.sample_ids)
        if self.gpu_sampler is not None:
            return self.gpu_sampler.launch(logits, meta)
        return _Done(self.sampler(self.ops.to_host(logits), meta, self.rng))

    def _prompt_logprobs(self, hidden, batch, out: RunnerOutput) -> None:
        """Logprobs of prompt tokens 1.. from the raw logits (the position before each predicts it)."""
        for req, row0, start, last in batch.prompt_logprob_rows:
            logprobs = log_softmax(self.ops.to_host(self.model.compute_logits(hidden[row0: row0 + (last - start)])))
            targets = np.asarray(req.prompt_token_ids[start + 1: last + 1])
            k = req.sampling_params.prompt_logprobs
            entries = gather_logprobs(logprobs, targets, [k] * len(targets))
            out.prompt_logprobs.setdefault(req.request_id, []).extend(
                (e.token_id, e.logprob, e.rank, e.top_ids, e.top_logprobs) for e in entries)
