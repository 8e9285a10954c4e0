"""EngineCore: schedule -> execute -> update, one step at a time, or pipelined (async scheduling:
schedule and launch step N+1, then read and apply step N's tokens, so the GPU never waits on Python).

It owns the scheduler (pure Python) and the model runner (device side). The front end (LLM or the
server's engine client) adds and aborts requests and turns the returned deltas into outputs.
"""
from __future__ import annotations

import logging
import time

from rvllm.config import EngineConfig
from rvllm.engine.messages import EngineStats, FinishedRecord, RequestDelta
from rvllm.engine.request import Request, RequestStatus
from rvllm.engine.scheduler import Scheduler
from rvllm.errors import RvllmError
from rvllm.sampling_params import SamplingParams
from rvllm.sampling.penalty_slots import state_bytes as penalty_state_bytes

log = logging.getLogger("rvllm.engine")

# CPU KV cache when nothing else says: enough for every sequence at full length, at most this much.
_CPU_KV_CACHE_CAP_BYTES = 1 << 30


def default_max_num_batched_tokens(config: EngineConfig, max_model_len: int) -> int:
    # vLLM's default with chunked prefill is 8192 on GPUs; the CPU does smaller steps so decodes stay responsive.
    if config.max_num_batched_tokens:
        return config.max_num_batched_tokens
    return 8192 if config.device != "cpu" else 2048


class EngineCore:
    def __init__(self, config: EngineConfig):
        from rvllm.backend import select_backend
        from rvllm.model.loader import load_weights, resolve_model
        from rvllm.runner.model_runner import ModelRunner

        t0 = time.monotonic()
        self.config = config
        self.source = resolve_model(config.model, config.load_format, config.generation_config)
        spec = self.source.spec
        self.spec = spec
        self.max_model_len = config.max_model_len or spec.max_position_embeddings
        if config.max_model_len and config.max_model_len > spec.max_position_embeddings:
            log.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                        config.max_model_len, spec.max_position_embeddings)
        self.backend = select_backend(config.device, config.dtype, spec.torch_dtype)
        weights = load_weights(self.source, self.backend, self.max_model_len, config.seed)
        self.load_seconds = time.monotonic() - t0
        t1 = time.monotonic()
        self.max_num_batched_tokens = default_max_num_batched_tokens(config, self.max_model_len)
        if self.backend.name != "cpu" and not config.num_gpu_blocks_override:
            # Profile the largest step with a KV cache just big enough for it, then size the real one.
            self.backend.release_cached_memory()
            probe = ModelRunner(spec, weights, self.backend, -(-self.max_num_batched_tokens // config.block_size),
                                config.block_size, config.seed, max_num_seqs=config.max_num_seqs,
                                max_num_batched_tokens=self.max_num_batched_tokens)
            probe.profile_run(self.max_num_batched_tokens, config.max_num_seqs)
            del probe
        num_blocks = self._num_blocks()
        self.runner = ModelRunner(spec, weights, self.backend, num_blocks, config.block_size, config.seed,
                                  max_num_seqs=config.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                  cuda_graphs=not config.enforce_eager)
        self.kv_seconds = time.monotonic() - t1
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
            block_size=config.block_size, num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching, max_model_len=self.max_model_len)
        self.eos_token_ids = tuple(spec.eos_token_ids) or ()
        gen_eos = self.source.generation_config.get("eos_token_id")
        if gen_eos is not None:
            self.eos_token_ids = tuple(gen_eos) if isinstance(gen_eos, list) else (int(gen_eos),)
        # Async scheduling: step N+1 is launched before step N's tokens are read, so the host's
        # scheduling and packing overlap the GPU's work. The GPU sampler keeps penalty state on the
        # device (it counts what it samples); the NumPy sampler needs a penalized request's real
        # output tokens when its step is packed: there, while one is in the engine, steps run in order.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.backend.name != "cpu")
        self._inflight = None  # (SchedulerOutput, PendingStep, schedule seconds): launched, not read yet
        self._sync_ids: set[str] = set()
        self._requests: dict[str, Request] = {}
        self._finished_records: list[FinishedRecord] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info("KV cache: %d blocks of %d tokens (%d tokens); max concurrency at %d tokens: %.1fx",
                 num_blocks, config.block_size, num_blocks * config.block_size, self.max_model_len,
                 num_blocks * config.block_size / self.max_model_len)

    def _num_blocks(self) -> int:
        cfg, spec = self.config, self.spec
        if cfg.num_gpu_blocks_override:
            return cfg.num_gpu_blocks_override
        from rvllm.runner.model_runner import ModelRunner

        itemsize = 4 if self.backend.name == "cpu" else 2
        per_block = ModelRunner.kv_bytes_per_block(spec, cfg.block_size, itemsize)
        if self.backend.name == "cpu":
            budget = cfg.kv_cache_memory_bytes or min(
                _CPU_KV_CACHE_CAP_BYTES, per_block * cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size))
        else:
            # The GPU sampler's penalty state is allocated on first use, after the cache: keep room for it.
            budget = cfg.kv_cache_memory_bytes or (self.backend.kv_cache_budget(cfg.gpu_memory_utilization)
                                                   - penalty_state_bytes(cfg.max_num_seqs, spec.vocab_size))
        num = int(budget // per_block)
        if num < -(-self.max_model_len // cfg.block_size):
            log.warning("the KV cache (%d blocks) holds less than one max_model_len sequence", num)
        if num < 1:
            raise RvllmError("no memory left for the KV cache; lower --max-model-len or raise the memory budget")
        return num

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Validates and queues a request; raises ValueError for one that can never run."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt ({n} tokens) is longer than the maximum model length ({self.max_model_len})")
        vocab = self.spec.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        capacity = self.num_blocks * self.config.block_size
        if n + 1 > capacity:
            raise ValueError(f"the prompt ({n} tokens) does not fit the KV cache ({capacity} tokens)")
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids,
                      min(self.max_model_len, capacity), arrival_time)
        self._requests[request_id] = req
        if params.has_penalties and not self.runner.penalties_on_device:
            self._sync_ids.add(request_id)
        self.scheduler.add_request(req)
        self.prompt_tokens_total += n

    def abort_requests(self, request_ids) -> None:
        ids = [r for r in request_ids if r in self._requests]
        for req in self.scheduler.abort_requests(ids):
            self._finish(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        if not self.async_scheduling:
            t0 = time.perf_counter()
            sched = self.scheduler.schedule()
            t1 = time.perf_counter()
            return self._complete_step(sched, self.runner.launch(sched), t1 - t0)
        deltas = self._finish_inflight() if self._sync_ids else []
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        t1 = time.perf_counter()
        launched = None
        if sched.scheduled:
            launched = self.runner.launch(sched)
            for item in sched.scheduled:
                if item.sample:
                    item.request.append_placeholder()
        deltas += self._finish_inflight()  # the previous step: the GPU has this one queued behind it
        if launched is not None:
            self._inflight = (sched, launched, t1 - t0)
        return deltas

    def _finish_inflight(self) -> list[RequestDelta]:
        """Waits for the launched step's tokens and applies them (async scheduling)."""
        if self._inflight is None:
            return []
        sched, pending, schedule_seconds = self._inflight
        self._inflight = None
        return self._complete_step(sched, pending, schedule_seconds)

    def _complete_step(self, sched, pending, schedule_seconds: float) -> list[RequestDelta]:
        """Waits for a launched step's tokens, updates the scheduler, returns the output deltas."""
        out = pending.result()
        t0 = time.perf_counter()
        changed = self.scheduler.update_from_output(sched, out.sampled, time.monotonic())
        deltas = self._deltas(changed, out, sched)
        prof = self.runner.profiler
        if prof is not None and pending.profile is not None:
            row = {"schedule": schedule_seconds, "update": time.perf_counter() - t0}
            row.update((k, v) for k, v in pending.profile.items() if k != "events")
            row.update(prof.device_times(pending.profile["events"]))
            prof.add(row)
        return deltas

    def _deltas(self, changed, out, sched) -> list[RequestDelta]:
        deltas = []
        sampled, logprobs, prompt_logprobs = out.sampled, out.logprobs, out.prompt_logprobs
        requests = list(changed)
        if prompt_logprobs:
            # A chunk in the middle of a prompt samples nothing but may carry prompt logprobs.
            changed_ids = {r.request_id for r in changed}
            # By object, not id: with async scheduling a step may finish after its request was aborted
            # and a new request took the same id.
            requests += [it.request for it in sched.scheduled
                         if it.request.request_id in prompt_logprobs and it.request.request_id not in changed_ids
                         and self._requests.get(it.request.request_id) is it.request]
        num_new = 0
        for req in requests:  # runs for every request every step: lookups of empty dicts are skipped
            rid = req.request_id
            if rid in sampled:
                new = [sampled[rid]]
                num_new += 1
            else:
                new = []
            lp = logprobs.get(rid) if logprobs else None
            plp = prompt_logprobs.get(rid) if prompt_logprobs else None
            finished = req.status.finished
            cached = req.num_cached_tokens
            deltas.append(RequestDelta(
                rid, new, [lp] if lp is not None else None, plp,
                req.finish_reason if finished else None, req.stop_reason, cached if cached > 0 else 0))
            if finished:
                self._finish(req)
        self.generation_tokens_total += num_new
        return deltas

    def _finish(self, req: Request) -> None:
        self._requests.pop(req.request_id, None)
        self._sync_ids.discard(req.request_id)
        t = req.times
        now = t.finished or time.monotonic()
        self._finished_records.append(FinishedRecord(
            req.finish_reason or "abort", (t.scheduled or now) - t.arrival,
            (t.first_token - t.arrival) if t.first_token else None, list(t.inter_token),
            now - t.arrival, req.num_prompt_tokens, req.num_output_tokens))
        del self._finished_records[:-10000]  # bounded if nobody drains them

    def finish_by_stop_string(self, request_id: str) -> None:
        if request_id in self._requests:
            req = self._requests[request_id]
            self.scheduler.finish_request(request_id, RequestStatus.FINISHED_STOPPED)
            self._finish(req)

    def stats(self, drain: bool = True) -> EngineStats:
        s = self.scheduler
        records = self._finished_records
        if drain:
            self._finished_records = []
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total, finished=list(records))

    def info(self) -> dict:
        """Limits and timings the front end needs (sent once over the wire)."""
        return {"max_model_len": self.max_model_len, "num_blocks": self.num_blocks,
                "block_size": self.config.block_size, "device": self.backend.name,
                "load_seconds": self.load_seconds, "kv_seconds": self.kv_seconds,
                "vocab_size": self.spec.vocab_size, "eos_token_ids": list(self.eos_token_ids),
                "max_num_batched_tokens": self.max_num_batched_tokens}
