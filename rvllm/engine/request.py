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


# An output token sampled on the device whose value the host does not know yet (async scheduling).
PLACEHOLDER = -1


class Request:
    """Token ids (prompt + output), how many have KV in the cache, blocks, status, params.

    The invariant the scheduler keeps: num_computed_tokens catches up with num_tokens; there is no
    prefill or decode phase, only tokens whose KV is not computed yet.

    Async scheduling: when a step that samples this request is launched, a PLACEHOLDER is appended
    for the token it will produce (`append_placeholder`), so the next step can be scheduled before
    the token is known; the runner feeds the placeholder from the device. `append_output_token` then
    fills the oldest placeholder. At most the newest `num_pending` output tokens are placeholders.
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
        self.num_pending = 0  # trailing output tokens that are PLACEHOLDERs (async scheduling)
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
        """Output tokens known on the host (placeholders of steps in flight not counted)."""
        return len(self.output_token_ids) - self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def append_placeholder(self) -> None:
        """A step that samples this request was launched: its token takes a place now."""
        self.output_token_ids.append(PLACEHOLDER)
        self.all_token_ids.append(PLACEHOLDER)
        self.num_pending += 1

    def append_output_token(self, token_id: int, now: float) -> None:
        """A sampled token: it fills the oldest placeholder, or is appended when there is none."""
        pending = self.num_pending
        if pending:  # all_token_ids ends with output_token_ids: the same place from the end in both
            self.output_token_ids[-pending] = token_id
            self.all_token_ids[-pending] = token_id
            self.num_pending = pending - 1
        else:
            self.output_token_ids.append(token_id)
            self.all_token_ids.append(token_id)
        t = self.times
        if t.first_token is None:
            t.first_token = now
        else:
            t.inter_token.append(now - t.last_token)
        t.last_token = now

    def reached_length(self) -> bool:
        """max_tokens or the context length is reached counting placeholders: no step need run
        for this request again; its last pending token finishes it."""
        max_tokens = self.sampling_params.max_tokens
        return ((max_tokens is not None and len(self.output_token_ids) >= max_tokens)
                or (self.max_model_len is not None and len(self.all_token_ids) >= self.max_model_len))

    def check_stop(self) -> bool:
        """After a new token: set a finished status if a stop condition holds. Returns finished.
        The token checked is the newest known one; a finished request drops later placeholders
        (the tokens of a step launched before the stop was known)."""
        params = self.sampling_params
        n_out = len(self.output_token_ids) - self.num_pending
        last = self.output_token_ids[n_out - 1]
        status = None
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif last in params.stop_token_ids:
                status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
        if status is None and params.max_tokens is not None and n_out >= params.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is None and self.max_model_len is not None and len(self.prompt_token_ids) + n_out >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return False
        self.status = status
        if self.num_pending:
            del self.output_token_ids[n_out:]
            del self.all_token_ids[len(self.prompt_token_ids) + n_out:]
            self.num_pending = 0
        return True
