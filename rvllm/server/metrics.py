"""Prometheus exposition under vLLM's metric names, so vLLM dashboards and alerts work unchanged.

The engine keeps cumulative totals and a list of finished-request records; `refresh()` pulls both
through `client.get_stats()` (on each scrape and periodically, so the records never pile up) and
turns totals into counter increments. The registry is our own, not prometheus-client's global one,
so several apps (tests) in one process do not collide.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger("rvllm.server")

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > max_value:
                return out
            out.append(value)
        exponent += 1


# EngineStats attribute -> counter name (prometheus-client appends `_total` on exposition).
_TOTALS = {"prompt_tokens_total": "vllm:prompt_tokens", "generation_tokens_total": "vllm:generation_tokens",
           "prefix_cache_queries": "vllm:prefix_cache_queries", "prefix_cache_hits": "vllm:prefix_cache_hits",
           "num_preemptions": "vllm:num_preemptions"}
_TOTAL_DOCS = {"vllm:prompt_tokens": "Number of prefill tokens processed.",
               "vllm:generation_tokens": "Number of generation tokens processed.",
               "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
               "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
               "vllm:num_preemptions": "Cumulative number of preemption from the engine."}


class Metrics:
    def __init__(self, model_name: str, max_model_len: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels, self.model_name = self.registry, ["model_name"], model_name

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.totals = {attr: Counter(name, _TOTAL_DOCS[name], labels, registry=r).labels(model_name)
                       for attr, name in _TOTALS.items()}
        self._last = {attr: 0 for attr in _TOTALS}
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success_family = success
        self.ttft = hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("vllm:request_queue_time_seconds",
                          "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                  token_buckets)
        self.generation_tokens = hist("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                      token_buckets)
        # get_stats() drains the finished-request records: two concurrent refreshes must not interleave.
        self._lock = asyncio.Lock()

    def record(self, stats) -> None:
        """Apply one EngineStats snapshot."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        for attr, counter in self.totals.items():
            value = getattr(stats, attr, 0) or 0
            if value > self._last[attr]:  # cumulative in the engine; a counter only moves forward
                counter.inc(value - self._last[attr])
            self._last[attr] = value
        for rec in stats.finished:
            self.record_finished(rec.finish_reason, rec.queue_time, rec.ttft, rec.inter_token, rec.e2e,
                                 rec.prompt_tokens, rec.generation_tokens)

    def record_finished(self, finish_reason, queue_time, ttft, itls, e2e, prompt_tokens, generation_tokens):
        reason = str(finish_reason)
        counter = self.success.get(reason)
        if counter is None:
            counter = self.success[reason] = self._success_family.labels(self.model_name, reason)
        counter.inc()
        if queue_time is not None:
            self.queue.observe(queue_time)
        if ttft is not None:
            self.ttft.observe(ttft)
        for x in itls or ():
            self.itl.observe(x)
        if e2e is not None:
            self.e2e.observe(e2e)
        self.prompt_tokens.observe(prompt_tokens)
        self.generation_tokens.observe(generation_tokens)

    async def refresh(self, client, timeout: float = 5.0) -> None:
        if not client.is_healthy:
            return  # a dead engine answers nothing; serve the last values
        async with self._lock:
            try:
                self.record(await asyncio.wait_for(client.get_stats(), timeout))
            except Exception:  # a scrape must not fail because one stats call did
                logger.warning("Could not get engine stats for /metrics", exc_info=True)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def refresh_periodically(metrics: Metrics, client, interval: float = 10.0) -> None:
    while True:
        await asyncio.sleep(interval)
        await metrics.refresh(client)
