"""CUDA graphs for pure-decode steps: one graph per batch-size bucket, captured at startup.

With RVLLM_DECODE_TC_SHORT_CONTEXT (192 tokens by default; 0 turns it off), small buckets get a
second graph for short contexts: where a step whose contexts all fit the limit
(backend.decode_short_context) runs another attention kernel than the bucket's graph holds (the
tensor-core decode kernel, which streams a short context in one block), that step replays the
short graph, captured with the limit as its longest context.

A decode step (every request has one new token and samples) is padded to the smallest bucket that
holds it (see step_inputs.py for the padding rows) and replays that bucket's graph: the forward
and the logits GEMM, with no Python in between. What makes a replay valid:
- inputs live at fixed addresses: the step-input device buffer (one copy per step before the
  replay), the KV cache, the weights, the decode-attention scratch (backend.decode_workspace,
  sized for `max_context`) and one logits buffer [max bucket, vocab] shared by every graph;
- nothing captured depends on host values that change between steps: the decode kernel's grid is
  fixed per bucket and it reads the block tables' row stride on the device; steps with a context
  longer than `max_context` run eagerly instead;
- activations are allocated during capture from a memory pool of the graphs' own, which nothing
  else allocates from; graphs share it (they replay one at a time on one stream);
- everything is captured on backend.stream (cuBLAS and kernels launch on the current stream), and
  the sampler runs after the replay, outside the graph.
"""
from __future__ import annotations

import bisect
import logging
import time

from rvllm.backend.cuda_graph import ExecGraph
from rvllm.runner.step_inputs import StepBatch, StepLayout, StepMetadata, serialize

log = logging.getLogger("rvllm.runner")

MAX_CAPTURE_BATCH = 512
# Contexts up to this many tokens replay graphs; longer ones run eagerly (vLLM's max_seq_len_to_capture).
MAX_CAPTURE_CONTEXT = 8192


def batch_size_buckets(max_num_seqs: int, cap: int = MAX_CAPTURE_BATCH) -> list[int]:
    """1, 2, 4, 8, then multiples of 8, up to min(max_num_seqs, cap), which is always the last."""
    top = max(1, min(max_num_seqs, cap))
    sizes = [b for b in (1, 2, 4) if b < top] + list(range(8, top + 1, 8))
    if not sizes or sizes[-1] != top:
        sizes.append(top)
    return sizes


def choose_bucket(buckets: list[int], num_reqs: int) -> int | None:
    """The smallest bucket holding num_reqs requests, or None when none does."""
    i = bisect.bisect_left(buckets, num_reqs)
    return buckets[i] if i < len(buckets) else None


class CudaGraphs:
    """Captured decode graphs of one ModelRunner, by bucket."""

    def __init__(self, runner, max_num_seqs: int, max_context: int = MAX_CAPTURE_CONTEXT):
        """runner: the ModelRunner whose model, KV cache and step buffers the graphs use (no reference
        to the runner itself is kept: a cycle would keep a dropped engine's memory until a full GC)."""
        import cupy as cp

        self.ops = runner.ops
        self.model = runner.model
        self.kv_caches = runner.kv_caches
        self.inputs = runner.inputs
        self.buckets = batch_size_buckets(max_num_seqs)
        self.max_context = max(1, min(max_context, runner.max_model_len))
        self.max_blocks = -(-self.max_context // runner.block_size)  # block table width the graphs' views have
        self.graphs: dict[int, object] = {}
        self.short_graphs: dict[int, tuple[int, object]] = {}  # bucket -> (context limit, graph)
        self.pool = cp.cuda.MemoryPool()
        spec = runner.spec
        top = self.buckets[-1]
        self.logits = self.ops.zeros((top, spec.vocab_size), "float32")  # [max bucket, V]: every graph's output
        # Every graph's input rows: the runner gathers a step's embeddings into them as it unpacks the
        # step's inputs (StepBuffers.load), so the graphs start at the first layer's kernel.
        self.embedded = self.ops.zeros((top, spec.hidden_size))  # [max bucket, H]
        self.workspace = self.ops.decode_workspace(top, spec.num_heads, spec.head_dim, self.max_context,
                                                   self.inputs.row_stride)
        self.capture_seconds = 0.0
        self.capture_phases: dict[str, float] = {}
        self.num_replays = 0
        self.num_short_replays = 0

    def layout(self, bucket: int) -> StepLayout:
        return StepLayout(bucket, bucket, self.max_blocks)

    def bucket_for(self, batch: StepBatch) -> int | None:
        """The bucket whose graph runs this step, or None for an eager step."""
        if not batch.decode_only or not self.graphs or batch.max_seq_len > self.max_context:
            return None
        bucket = choose_bucket(self.buckets, batch.num_reqs)
        return bucket if bucket in self.graphs else None

    def capture(self) -> None:
        """Warm up and capture every bucket (and its short-context graph, if any), largest first (the
        pool grows once, then is reused)."""
        t0 = time.perf_counter()
        phases = {"warm-up": 0.0, "capture": 0.0, "upload": 0.0}  # host seconds, summed over buckets
        stream = self.ops.stream
        self.ops.synchronize_device()  # weights and the KV cache were written on other streams
        spec = self.model.spec
        with stream, self.ops.graph_capture():  # cuBLAS bound to the stream and a fixed workspace
            for bucket in reversed(self.buckets):
                self.graphs[bucket] = self._capture(bucket, self.max_context, phases)
                short = self.ops.decode_short_context(bucket, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                      self.max_context)
                if short is not None:
                    self.short_graphs[bucket] = (short, self._capture(bucket, short, phases))
            stream.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.capture_phases = phases

    def _capture(self, bucket: int, max_context: int, phases: dict[str, float]):
        """The graph of a `bucket`-row decode step with contexts up to max_context (uploaded)."""
        import cupy as cp

        stream = self.ops.stream
        ids, positions, meta, out = self._inputs(bucket, max_context)
        # Warm-up with the same calls: compiles kernels, sets their attributes, lets cuBLAS pick and
        # load its kernels, all of which must not happen during capture. One layer does it (every
        # layer runs the same kernels on the same shapes) at 1/num_layers of the cost: the full
        # forward was 60% of capture time (bench/RESULTS.md).
        t = time.perf_counter()
        self._forward(ids, positions, meta, out, num_layers=1)
        stream.synchronize()
        phases["warm-up"] += time.perf_counter() - t
        t = time.perf_counter()
        with cp.cuda.using_allocator(self.pool.malloc):
            stream.begin_capture()
            try:
                self._forward(ids, positions, meta, out)
            except BaseException:
                try:
                    ExecGraph.end_capture(stream)
                except Exception:  # the capture may be invalidated already; the first error matters
                    pass
                raise
            graph = ExecGraph.end_capture(stream)  # without the captured graph's host copy of its nodes
        phases["capture"] += time.perf_counter() - t
        t = time.perf_counter()
        graph.upload(stream)
        phases["upload"] += time.perf_counter() - t
        return graph

    def _inputs(self, bucket: int, max_context: int):
        """Uploads an all-padding step of `bucket` rows and returns the graph's fixed views
        (max_context: the longest context the graph holds, which picks the attention kernel)."""
        lay = self.layout(bucket)
        data, padding = serialize(StepBatch(), bucket, bucket)
        inputs = self.inputs
        inputs.load(data, padding, 1)  # every row padding: zeros in the block tables
        ids, positions, slots, qsl, seq_lens, _, tables = inputs.views(lay, self.max_blocks)
        meta = StepMetadata(qsl, seq_lens, tables, slots, max_query_len=1, max_seq_len=max_context,
                            query_lens_host=[1] * bucket, seq_lens_host=[0] * bucket,
                            decode_workspace=self.workspace)
        return ids, positions, meta, self.logits[:bucket]

    def _forward(self, ids, positions, meta, out, num_layers: int | None = None) -> None:
        self.model.forward_logits(ids, positions, self.kv_caches, meta, out, num_layers,
                                  self.embedded[: ids.shape[0]])  # [B, V], a row a request

    def replay(self, bucket: int, max_seq_len: int | None = None):
        """Runs the bucket's graph on backend.stream (inputs already uploaded there, the embedding rows
        gathered into `embedded` by StepBuffers.load): its short-context
        graph when it has one and no context of the step (max_seq_len) is longer. Returns the logits
        [bucket, V], valid until the next replay."""
        short = self.short_graphs.get(bucket)
        if short is not None and max_seq_len is not None and max_seq_len <= short[0]:
            graph = short[1]
            self.num_short_replays += 1
        else:
            graph = self.graphs[bucket]
        graph.launch(self.ops.stream)
        self.num_replays += 1
        return self.logits[:bucket]

    def release(self) -> None:
        self.ops.synchronize_device()
        self.graphs.clear()
        self.short_graphs.clear()
        self.pool.free_all_blocks()
