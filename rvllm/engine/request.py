"""One object per request, owned by the engine core. Pure Python."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from rvllm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # blocks freed; waits again and recomputes its tokens so far
    FINISHED_STOPPED = 3  # EOS, a stop token id (or a stop string, via abort from the front end)
    FINISHED_LENGTH = 4  # max_tokens or the model's context length
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class RequestTimes:
    """Timestamps (time.monotonic) for the metrics endpoint."""

    arrival: float = field(default_factory=time.monotonic)
    queued: float | None = None
    scheduled: float | None = None  # first time scheduled
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    inter_token: list[float] = field(default_factory=list)  # seconds between consecutive output tokens


class Request:
    """Token ids (prompt + output), how many have KV in the cache, blocks, status, params.

    The invariant the scheduler keeps: num_computed_tokens catches up with num_tokens; there is no
    prefill or decode phase, only tokens whose KV is not computed yet.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids: tuple[int, ...] = (), max_model_len: int | None = None,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first scheduling; -1 = not yet
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of this request's full blocks, filled lazily
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.prompt_logprobs_done = 0  # prompt positions whose logprobs were sent (a recompute skips them)
        self.times = RequestTimes()
        if arrival_time is not None:
            self.times.arrival = arrival_time
        self.times.queued = self.times.arrival

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def append_output_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        t = self.times
        if t.first_token is None:
            t.first_token = now
        else:
            t.inter_token.append(now - t.last_token)
        t.last_token = now

    def check_stop(self) -> bool:
        """After a new token: set a finished status if a stop condition holds. Returns finished."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        n_out = self.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if params.max_tokens is not None and n_out >= params.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
