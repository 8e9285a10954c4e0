"""Token-budget scheduler: which requests run this step, and how many of their tokens.

The invariant (vLLM v1): there is no prefill phase or decode phase. Each request has num_tokens
(prompt + outputs so far) and num_computed_tokens (tokens whose KV is in the cache); each step
every scheduled request's num_computed_tokens catches up with its num_tokens, as far as the token
budget allows. A decode is a request one token behind; a chunked prefill is a request the budget
let catch up only partway; a prefix-cache hit starts a request with some tokens already computed;
a preempted request drops back to 0 computed tokens and catches up again (recompute).

Order each step: running requests first, in the order they started; when blocks run out the most
recently started running request is preempted (its blocks freed, put at the front of the waiting
queue). Then waiting requests in arrival order (preempted ones first), unless a preemption happened
this step: a waiting request never pushes a running one out.

Prefix caching: a block is shared only after the step that computed it, so a request never reads
KV that is not written yet. (With async scheduling, "after" means after that step was launched: a
later step that reads the block runs after it on the same CUDA stream.)

Async scheduling (the engine launches step N+1 before it reads step N's tokens): a request whose
token is in flight carries a placeholder (request.py) and is scheduled as a decode of it; one whose
in-flight token is its max_tokens-th is not scheduled again; a preempted one is not readmitted
until its token has landed. A waiting request whose next prefix block is being computed this step
by another request waits one step and then shares it (n > 1 samples of one prompt).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from rvllm.engine.kv_cache_manager import KVCacheManager
from rvllm.engine.request import Request, RequestStatus

RUNNING = RequestStatus.RUNNING


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    start: int  # num_computed_tokens before this step: the runner feeds all_token_ids[start:start + num_new_tokens]
    num_new_tokens: int
    sample: bool  # this chunk reaches the request's last token, so logits for the next token are needed


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_req_ids: list[str]
    finished_req_ids: list[str]  # finished or aborted since the previous schedule(): drop their runner state


class Scheduler:
    def __init__(self, max_num_batched_tokens: int, max_num_seqs: int, block_size: int, num_blocks: int,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None):
        if max_num_batched_tokens <= 0 or max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.max_model_len = max_model_len
        # The engine rejects requests whose prompt + max_tokens exceed this: a request that fits the
        # cache alone always finishes, since the oldest running request is never preempted for a newer one.
        self.max_tokens_in_cache = num_blocks * block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # unfinished ones, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in the order they started running
        self._finished_ids: list[str] = []
        self.num_preemptions = 0

    # ---- requests in and out --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.max_model_len is None:
            request.max_model_len = self.max_model_len
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort waiting, running or preempted requests; their blocks are freed at once."""
        out = []
        for request_id in request_ids:
            request = self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
            if request is not None:
                out.append(request)
        return out

    def finish_request(self, request_id: str, status: RequestStatus, now: float | None = None) -> Request | None:
        """Finish a request from outside the step (stop string, abort); None if unknown or finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self._release(request, time.monotonic() if now is None else now)
        return request

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """Decide this step's requests and token counts; advances their num_computed_tokens already.

        now: time.monotonic() stamp for requests scheduled for the first time (default: read the clock).
        """
        budget = self.max_num_batched_tokens
        kv = self.kv
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # Running requests first, oldest first.
        running, block_size = self.running, self.block_size
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            if request.num_pending and request.reached_length():
                i += 1  # async: its in-flight token is its last; nothing more to compute
                continue
            start = request.num_computed_tokens
            num_tokens = len(request.all_token_ids)
            num_new = num_tokens - start  # >= 1: every step ends with a sampled token
            if num_new > budget:
                num_new = budget
            # Most decode steps still fit in the last block: skip the allocator call then.
            if start + num_new > len(request.block_ids) * block_size:
                while not kv.allocate_slots(request, num_new):
                    # Victims come from the tail, which holds only requests not scheduled yet this step.
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    if victim is request:
                        break
                if request.status is not RUNNING:
                    break
            # Advanced at schedule time, as vLLM does: the runner computes exactly these tokens.
            request.num_computed_tokens = end = start + num_new
            scheduled.append(ScheduledRequest(request, start, num_new, end == num_tokens))
            budget -= num_new
            i += 1

        # Then waiting ones, in arrival order (preempted ones were put at the front).
        if not preempted and self.waiting:
            now = time.monotonic() if now is None else now
            # Blocks this step fills are cached only after it ran. A waiting request whose next prefix
            # block is among them (n > 1 samples, a burst sharing a system prompt) waits a step and
            # then hits it, instead of computing the same prefix a second time.
            filling = self._hashes_filled(scheduled) if kv.enable_caching else None
            deferred: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                request = self.waiting[0]
                if request.num_pending:  # preempted with a token in flight: its ids are not all known yet
                    deferred.append(self.waiting.popleft())
                    continue
                hits, num_cached = kv.get_computed_blocks(request)
                if filling and kv.next_block_hash(request, len(hits)) in filling:
                    deferred.append(self.waiting.popleft())
                    continue
                num_new = min(request.num_tokens - num_cached, budget)
                if not kv.allocate_slots(request, num_new, hits):
                    break  # the cache is full: wait for running requests to finish
                self.waiting.popleft()
                request.num_computed_tokens = num_cached + num_new
                if request.num_cached_tokens < 0:
                    request.num_cached_tokens = num_cached
                if request.times.scheduled is None:
                    request.times.scheduled = now
                request.status = RUNNING
                self.running.append(request)
                sample = num_cached + num_new == request.num_tokens
                scheduled.append(ScheduledRequest(request, num_cached, num_new, sample))
                budget -= num_new
                if filling is not None:
                    filling.update(kv.hashes_filled(request, num_cached, num_cached + num_new))
            self.waiting.extendleft(reversed(deferred))  # keep their places in the queue

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(scheduled, self.max_num_batched_tokens - budget, preempted, finished)

    def update_from_output(self, scheduler_output: SchedulerOutput, sampled: dict[str, int],
                           now: float) -> list[Request]:
        """Append the sampled tokens, check stops, cache newly computed blocks, free finished requests.

        sampled: request id -> token for every scheduled request with sample=True (a missing one is a
        runner bug: KeyError; ids of requests aborted meanwhile are ignored).
        Returns the requests that got a token (finished or not), in scheduled order.
        """
        changed = []
        stopped = False
        block_size = self.block_size
        cache_computed_blocks = self.kv.cache_computed_blocks
        for item in scheduler_output.scheduled:
            request = item.request
            if request.status is not RUNNING:
                if request.status is RequestStatus.PREEMPTED and item.sample and request.num_pending:
                    # Async: preempted by the schedule that followed this step; its token still counts.
                    request.append_output_token(sampled[request.request_id], now)
                    if request.check_stop():
                        self.waiting.remove(request)
                        self._release(request, now)
                    changed.append(request)
                continue  # aborted or finished since schedule(); its blocks are gone
            # The tokens scheduled last step now have KV: share blocks this step filled (before any free).
            start = item.start
            if (start + item.num_new_tokens) // block_size > start // block_size:
                cache_computed_blocks(request)
            if not item.sample:
                continue  # the middle of a chunked prefill: progress kept, no token
            request.append_output_token(sampled[request.request_id], now)
            if request.check_stop():
                stopped = True
                self._release(request, now)
            changed.append(request)
        if stopped:
            self.running = [r for r in self.running if r.status is RUNNING]
        return changed

    # ---- stats ----------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv.pool.prefix_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv.pool.prefix_hits

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- helpers --------------------------------------------------------------------------------
    def _hashes_filled(self, scheduled: list[ScheduledRequest]) -> set[int]:
        block_size, hashes_filled = self.block_size, self.kv.hashes_filled
        out: set[int] = set()
        for s in scheduled:
            end = s.start + s.num_new_tokens
            if end // block_size > s.start // block_size:  # most decodes fill no block
                out.update(hashes_filled(s.request, s.start, end))
        return out

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request, now: float) -> None:
        """A finished request: blocks back to the pool, forgotten here, reported once to the runner."""
        self.kv.free(request)
        del self.requests[request.request_id]
        request.times.finished = now
        self._finished_ids.append(request.request_id)
