"""Front-end side of a request: n-way fan-out, incremental detokenization, stop strings, outputs.

Both the offline LLM and the server use it. The engine core sends token ids; this turns them into
RequestOutputs. A stop string is found here (it needs text), and the request is then finished in
the core through the `to_abort` list.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rvllm.outputs import CompletionOutput, Logprob, RequestOutput
from rvllm.sampling_params import SamplingParams
from rvllm.tokenizer import IncrementalDetokenizer


def child_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


@dataclass
class _Choice:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    text: str = ""  # decided text (stop strings resolved)
    sent: int = 0  # characters of `text` already emitted (streaming)
    token_ids: list[int] = field(default_factory=list)
    sent_tokens: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    sent_logprobs: int = 0
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reported_finished: bool = False


class _ParentState:
    def __init__(self, request_id, prompt, prompt_token_ids, params: SamplingParams, tokenizer):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_logprobs = None
        self.num_cached_tokens = 0
        self.choices: dict[str, _Choice] = {}


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id, prompt, prompt_token_ids, params: SamplingParams):
        """Registers a request; returns the (child id, child params) pairs to send to the engine."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        state = _ParentState(request_id, prompt, prompt_token_ids, params, self.tokenizer)
        children = []
        for i in range(params.n):
            cp = params if params.n == 1 else params.clone(n=1, seed=None if params.seed is None else params.seed + i)
            cid = child_id(request_id, i, params.n)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, cp.skip_special_tokens,
                                           cp.spaces_between_special_tokens) if self.tokenizer else None
            state.choices[cid] = _Choice(i, cp, detok, logprobs=[] if cp.logprobs is not None else None,
                                         cumulative_logprob=0.0 if cp.logprobs is not None else None)
            self.child_to_parent[cid] = request_id
            children.append((cid, cp))
        self.parents[request_id] = state
        return children

    def child_ids(self, request_id) -> list[str]:
        state = self.parents.get(request_id)
        return list(state.choices) if state else []

    def remove(self, request_id) -> None:
        state = self.parents.pop(request_id, None)
        if state:
            for cid in state.choices:
                self.child_to_parent.pop(cid, None)

    def process(self, deltas) -> tuple[set[str], list[str]]:
        """Apply engine deltas. Returns (parent ids that changed, child ids to finish in the engine)."""
        changed, to_abort = set(), []
        for d in deltas:
            pid = self.child_to_parent.get(d.request_id)
            if pid is None:
                continue  # aborted by the front end meanwhile
            state = self.parents[pid]
            choice = state.choices[d.request_id]
            if choice.finish_reason is not None:
                continue
            changed.add(pid)
            state.num_cached_tokens = d.num_cached_tokens
            if d.prompt_logprobs is not None:
                self._add_prompt_logprobs(state, d.prompt_logprobs)
            if self._apply(choice, d):
                to_abort.append(d.request_id)
        return changed, to_abort

    def _apply(self, c: _Choice, d) -> bool:
        """Returns True when a stop string finished the choice (the engine must be told)."""
        c.token_ids.extend(d.new_token_ids)
        if d.logprobs and c.logprobs is not None:
            for tok, (lp, rank, top_ids, top_lps) in zip(d.new_token_ids, d.logprobs):
                c.logprobs.append(self._logprob_dict(tok, lp, rank, top_ids, top_lps))
                c.cumulative_logprob += lp
        new_ids = d.new_token_ids
        stopped_by_token = d.finish_reason == "stop" and d.stop_reason is None or isinstance(d.stop_reason, int)
        if stopped_by_token and not c.params.include_stop_str_in_output and new_ids:
            new_ids = new_ids[:-1]  # the EOS / stop token's text is not part of the output
        if c.detok is not None and new_ids:
            c.text += c.detok.add(new_ids)
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
            if c.detok is not None:
                c.text += c.detok.flush()  # bytes of an unfinished character, as a full decode shows them
        if c.params.stop and c.finish_reason is None:
            return self._check_stop_strings(c)
        if c.params.stop and d.finish_reason is not None:
            self._check_stop_strings(c)  # a stop string in the last token still truncates the text
        return False

    def _check_stop_strings(self, c: _Choice) -> bool:
        # Only text not yet emitted can hold a new match (emitted text was checked already).
        search_from = max(0, c.sent - max(len(s) for s in c.params.stop) + 1)
        best = None
        for s in c.params.stop:
            i = c.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        c.text = c.text[: i + len(s)] if c.params.include_stop_str_in_output else c.text[:i]
        was_finished = c.finish_reason is not None
        c.finish_reason, c.stop_reason = "stop", s
        return not was_finished

    def _emittable(self, c: _Choice) -> int:
        """How much of c.text can be shown: all of it when finished, else minus a possible stop-string start."""
        if c.finish_reason is not None or not c.params.stop:
            return len(c.text)
        hold = 0
        for s in c.params.stop:
            for k in range(min(len(s) - 1, len(c.text)), 0, -1):
                if c.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(c.text) - hold

    def _logprob_dict(self, tok, lp, rank, top_ids, top_lps) -> dict[int, Logprob]:
        dec = self.tokenizer.decode if self.tokenizer else (lambda ids: None)
        out = {int(tok): Logprob(float(lp), int(rank), dec([int(tok)]))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            if int(t) not in out:
                out[int(t)] = Logprob(float(v), r, dec([int(t)]))
        return out

    def _add_prompt_logprobs(self, state: _ParentState, entries) -> None:
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        for tok, lp, rank, top_ids, top_lps in entries:
            state.prompt_logprobs.append(self._logprob_dict(tok, lp, rank, top_ids, top_lps))

    # ---- outputs ----------------------------------------------------------------------------------
    def make_output(self, request_id: str, delta: bool) -> RequestOutput | None:
        """The current RequestOutput; with delta=True only what is new since the last call (None if nothing)."""
        state = self.parents[request_id]
        outs = []
        for c in sorted(state.choices.values(), key=lambda c: c.index):
            upto = self._emittable(c)
            if delta:
                just_finished = c.finish_reason is not None and not c.reported_finished
                if upto <= c.sent and len(c.token_ids) == c.sent_tokens and not just_finished:
                    continue
                text, ids = c.text[c.sent: upto], c.token_ids[c.sent_tokens:]
                lps = c.logprobs[c.sent_logprobs:] if c.logprobs is not None else None
            else:
                text, ids, lps = c.text[:upto], list(c.token_ids), c.logprobs
            c.sent, c.sent_tokens = max(c.sent, upto), len(c.token_ids)
            c.sent_logprobs = len(c.logprobs) if c.logprobs is not None else 0
            if c.finish_reason is not None:
                c.reported_finished = True
            outs.append(CompletionOutput(c.index, text, ids, c.cumulative_logprob, lps, c.finish_reason,
                                         c.stop_reason))
        finished = all(c.finish_reason is not None for c in state.choices.values())
        if delta and not outs:
            return None
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outs, finished,
                             state.prompt_logprobs, state.num_cached_tokens)

    def is_finished(self, request_id: str) -> bool:
        state = self.parents.get(request_id)
        return state is None or all(c.finish_reason is not None for c in state.choices.values())
