"""SchedulerOutput -> one flat ragged batch -> model forward -> sampler -> token ids.

The runner owns the device side of the engine: the backend, the model, the paged KV cache and the
sampler. It reads the scheduled requests (token ids, block ids, sampling params) and returns, per
request that reached the end of its tokens, the next token id (and logprobs when asked).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from rvllm.backend.cpu import AttentionMetadata
from rvllm.model.llama import LlamaModel
from rvllm.sampling.logprobs import gather_logprobs, log_softmax
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling.sampler import Sampler

log = logging.getLogger("rvllm.runner")


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> next token id
    # request id -> (chosen logprob, chosen rank, top ids, top logprobs) for the sampled token
    logprobs: dict[str, tuple] = field(default_factory=dict)
    # request id -> [(token id, its logprob, its rank, top ids, top logprobs)] for prompt tokens 1.., in order
    prompt_logprobs: dict[str, list] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, spec, weights, backend, num_blocks: int, block_size: int, seed: int = 0):
        self.spec = spec
        self.ops = backend
        self.model = LlamaModel(spec, weights, backend)
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # [num_blocks, block_size, num_kv_heads, head_dim] per layer, for K and for V.
        self.kv_caches = [(backend.zeros(shape, backend.compute_dtype), backend.zeros(shape, backend.compute_dtype))
                          for _ in range(spec.num_layers)]
        self.sampler = Sampler()
        self.rng = np.random.default_rng(seed)
        self.timings: dict[str, float] = {}

    def profile_run(self, num_tokens: int, num_seqs: int) -> None:
        """One forward of `num_tokens` prompt tokens (as one request) plus logits for `num_seqs` rows,
        so the device allocator has seen the step's peak activation memory before the KV cache is sized."""
        num_tokens = min(num_tokens, self.num_blocks * self.block_size)
        blocks = list(range(-(-num_tokens // self.block_size)))
        ops = self.ops
        meta = AttentionMetadata(
            ops.from_host(np.array([0, num_tokens], np.int32)), ops.from_host(np.array([num_tokens], np.int32)),
            ops.from_host(np.array([blocks], np.int32)),
            ops.from_host(np.arange(num_tokens, dtype=np.int32)), num_tokens, num_tokens, [num_tokens], [num_tokens])
        ids = ops.from_host(np.zeros(num_tokens, np.int32))
        positions = ops.from_host(np.arange(num_tokens, dtype=np.int32) % self.model.w.cos_sin.shape[0])
        hidden = self.model.forward(ids, positions, self.kv_caches, meta)
        rows = ops.from_host(np.arange(min(num_seqs, num_tokens), dtype=np.int64))
        self.model.compute_logits(hidden[rows])
        ops.synchronize()

    @staticmethod
    def kv_bytes_per_block(spec, block_size: int, itemsize: int) -> int:
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize

    def execute(self, sched) -> RunnerOutput:
        if not sched.scheduled:
            return RunnerOutput()
        t0 = time.perf_counter()
        batch = self._pack(sched)
        t1 = time.perf_counter()
        hidden = self.model.forward(batch.input_ids, batch.positions, self.kv_caches, batch.meta)  # [T, H]
        out = RunnerOutput()
        if batch.sample_rows:
            logits = self.model.compute_logits(hidden[batch.logits_indices])  # [B, V]
            logits = self.ops.to_host(logits)
            meta = SamplingMetadata.from_requests(batch.sample_rows)
            result = self.sampler(logits, meta, self.rng)
            for req_id, tok, lp in zip(batch.sample_ids, result.token_ids, result.logprobs):
                out.sampled[req_id] = int(tok)
                if lp is not None:
                    out.logprobs[req_id] = (lp.logprob, lp.rank, lp.top_ids, lp.top_logprobs)
        if batch.prompt_logprob_rows:
            self._prompt_logprobs(hidden, batch, out)
        t2 = time.perf_counter()
        self.timings = {"pack": t1 - t0, "forward_and_sample": t2 - t1}
        return out

    # ---- packing --------------------------------------------------------------------------------
    def _pack(self, sched) -> "_Batch":
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        b = _Batch()
        for sr in sched.scheduled:
            req, start, n = sr.request, sr.start, sr.num_new_tokens
            end = start + n
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            qsl.append(qsl[-1] + n)
            seq_lens.append(end)
            query_lens.append(n)
            tables.append(blocks[: -(-end // bs)])
            params = req.sampling_params
            if params.prompt_logprobs is not None and req.prompt_logprobs_done < min(end, req.num_prompt_tokens - 1):
                # Position p predicts prompt token p + 1; positions already sent (before a preemption) are skipped.
                first, last = max(start, req.prompt_logprobs_done), min(end, req.num_prompt_tokens - 1)
                b.prompt_logprob_rows.append((req, qsl[-2] + first - start, first, last))
                req.prompt_logprobs_done = last
            if sr.sample:
                b.logits_indices.append(qsl[-1] - 1)
                b.sample_ids.append(req.request_id)
                b.sample_rows.append((params, req.prompt_token_ids, req.output_token_ids, req.eos_token_ids))
        width = max(len(t) for t in tables)
        table_arr = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table_arr[i, : len(t)] = t
        ops = self.ops
        b.input_ids = ops.from_host(np.asarray(input_ids, dtype=np.int32))
        b.positions = ops.from_host(np.asarray(positions, dtype=np.int32))
        b.meta = AttentionMetadata(
            query_start_loc=ops.from_host(np.asarray(qsl, dtype=np.int32)),
            seq_lens=ops.from_host(np.asarray(seq_lens, dtype=np.int32)),
            block_tables=ops.from_host(table_arr),
            slot_mapping=ops.from_host(np.asarray(slots, dtype=np.int32)),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_host=query_lens, seq_lens_host=seq_lens,
        )
        b.logits_indices = ops.from_host(np.asarray(b.logits_indices, dtype=np.int64))
        return b

    def _prompt_logprobs(self, hidden, batch: "_Batch", out: RunnerOutput) -> None:
        """Logprobs of prompt tokens 1.. from the raw logits (the position before each predicts it)."""
        for req, row0, start, last in batch.prompt_logprob_rows:
            rows = self.ops.from_host(np.arange(row0, row0 + (last - start), dtype=np.int64))
            logprobs = log_softmax(self.ops.to_host(self.model.compute_logits(hidden[rows])))
            targets = np.asarray(req.prompt_token_ids[start + 1: last + 1])
            k = req.sampling_params.prompt_logprobs
            entries = gather_logprobs(logprobs, targets, [k] * len(targets))
            out.prompt_logprobs.setdefault(req.request_id, []).extend(
                (e.token_id, e.logprob, e.rank, e.top_ids, e.top_logprobs) for e in entries)


class _Batch:
    def __init__(self):
        self.input_ids = self.positions = self.meta = None
        self.logits_indices: list = []
        self.sample_ids: list[str] = []
        self.sample_rows: list = []
        self.prompt_logprob_rows: list = []
