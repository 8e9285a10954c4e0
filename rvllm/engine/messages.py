"""Messages between the front end and the engine core (msgspec structs, msgpack on the wire)."""
from __future__ import annotations

import dataclasses

import msgspec

from rvllm.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_token_ids: list[int]
    params: dict  # SamplingParams fields (see params_to_dict)
    arrival_time: float


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class FinishRequests(msgspec.Struct, tag="finish"):
    """Requests the front end finished (a stop string matched): freed with finish reason 'stop'."""

    request_ids: list[str]


class GetStats(msgspec.Struct, tag="stats"):
    pass


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class RequestDelta(msgspec.Struct, array_like=True):
    """What one step added to one request."""

    request_id: str
    new_token_ids: list[int]
    # Per new token: (chosen logprob, chosen rank, top ids, top logprobs); None when not asked.
    logprobs: list[tuple[float, int, list[int], list[float]]] | None = None
    # For prompt positions 1..: (token id, logprob, rank, top ids, top logprobs), sent once.
    prompt_logprobs: list[tuple[int, float, int, list[int], list[float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


class FinishedRecord(msgspec.Struct, array_like=True):
    """Per finished request, for the latency histograms."""

    finish_reason: str
    queue_time: float
    ttft: float | None
    inter_token: list[float]
    e2e: float
    prompt_tokens: int
    generation_tokens: int


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished: list[FinishedRecord] = msgspec.field(default_factory=list)


class StepOutput(msgspec.Struct, tag="step"):
    deltas: list[RequestDelta]
    num_waiting: int = 0
    num_running: int = 0
    num_adds_seen: int = 0  # AddRequests the core has taken so far: the front end counts the rest as queued


class StatsOutput(msgspec.Struct, tag="stats_out"):
    stats: EngineStats


class ReadyOutput(msgspec.Struct, tag="ready"):
    """Sent once by the engine process after loading; `info` carries limits and startup timings."""

    info: dict


class ErrorOutput(msgspec.Struct, tag="error"):
    message: str
    fatal: bool = True


ToEngine = AddRequest | AbortRequests | FinishRequests | GetStats | Shutdown
FromEngine = StepOutput | StatsOutput | ReadyOutput | ErrorOutput


def params_to_dict(params: SamplingParams) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "_unset"}


def params_from_dict(d: dict) -> SamplingParams:
    if d.get("logit_bias"):
        d = {**d, "logit_bias": {int(k): v for k, v in d["logit_bias"].items()}}
    return SamplingParams(**d)
