"""POST /v1/completions: vLLM's shapes, streaming and not.

Several prompts run as one engine request each; choice indexes are prompt_idx * n + i, as vLLM
numbers them. With echo, the prompt text (and, with logprobs, its token logprobs) comes first.
"""
from __future__ import annotations

import time
from aiohttp import web

from rvllm.server import protocol as P
from rvllm.server.openai_common import (SERVING, SSEWriter, Serving, clamp, engine_error, json_response,
                                        random_id, token_str)


def _prompts(serving: Serving, prompt) -> list[tuple[str | None, list[int]]]:
    """str | list[str] | list[int] | list[list[int]] -> [(text or None, token ids)]."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        items = prompt
    elif prompt and all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                        for p in prompt):
        items = prompt
    else:
        raise P.APIError("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists, and not empty.", param="prompt")
    out = []
    for item in items:
        ids = serving.tokenizer.encode(item) if isinstance(item, str) else list(item)
        serving.check_tokens(ids, "prompt")
        out.append((item if isinstance(item, str) else None, ids))
    return out


class _Logprobs:
    """Builds the completions logprobs object incrementally (text_offset continues across deltas)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def make(self, token_ids, positions) -> P.CompletionLogProbs:
        out = P.CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for tid, pos in zip(token_ids, positions):
            chosen = pos.get(tid) if pos else None
            tok = token_str(self.tokenizer, tid, chosen)
            out.tokens.append(tok)
            out.text_offset.append(self.offset)
            self.offset += len(tok)
            out.token_logprobs.append(clamp(chosen.logprob) if chosen else None)
            # vLLM: the chosen token plus the top-k, keyed by their text.
            out.top_logprobs.append({token_str(self.tokenizer, t, lp): clamp(lp.logprob) for t, lp in pos.items()}
                                    if pos else None)
        return out

    def extend(self, a: P.CompletionLogProbs, b: P.CompletionLogProbs) -> P.CompletionLogProbs:
        a.text_offset += b.text_offset
        a.token_logprobs += b.token_logprobs
        a.tokens += b.tokens
        a.top_logprobs += b.top_logprobs
        return a


async def create_completion(request: web.Request) -> web.StreamResponse:
    serving: Serving = request.app[SERVING]
    req: P.CompletionRequest = P.decode_request(await request.read(), P.CompletionRequest)
    serving.check_model(req.model)
    if req.suffix is not None:
        raise P.APIError("suffix is not currently supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise P.APIError("best_of other than n is not supported", param="best_of")
    if req.stream_options is not None and not req.stream:
        raise P.APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    serving.check_logprobs(req.logprobs, "logprobs")
    serving.check_logprobs(req.prompt_logprobs, "prompt_logprobs")
    serving.check_queue()

    prompts = _prompts(serving, req.prompt)
    # echo + logprobs needs the prompt's logprobs from the engine.
    prompt_lp = req.prompt_logprobs if req.prompt_logprobs is not None else (
        req.logprobs if req.echo and req.logprobs is not None else None)
    params = [serving.sampling_params(req, serving.resolve_max_tokens(len(ids), req.max_tokens), req.logprobs,
                                      prompt_lp) for _, ids in prompts]
    n = params[0].n
    request_id = random_id("cmpl")
    serving.log_request(request_id, [len(ids) for _, ids in prompts], params[0])
    ctx = dict(serving=serving, req=req, prompts=prompts, n=n, request_id=request_id,
               model=req.model or serving.model_name, created=int(time.time()))
    stream = serving.generate(request_id, prompts, params)
    if req.stream:
        return await _stream(request, stream, **ctx)
    return await _collect(stream, **ctx)


def _echo_prefix(serving, prompt, prompt_logprobs, lpb: _Logprobs | None, want_logprobs: bool):
    text, ids = prompt
    if text is None:
        text = serving.tokenizer.decode(ids, skip_special_tokens=False)
    lps = None
    if want_logprobs:
        positions = prompt_logprobs if prompt_logprobs is not None else [None] * len(ids)
        lps = lpb.make(ids, positions)
    return text, lps


async def _stream(request, stream, *, serving, req, prompts, n, request_id, model, created):
    sse = SSEWriter(request)
    want_lp = req.logprobs is not None
    lp_builders, prompt_lps = {}, {}
    completion_tokens = 0
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    prompt_tokens = sum(len(ids) for _, ids in prompts)

    def usage() -> P.UsageInfo:
        return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)

    async def produce():
        nonlocal completion_tokens
        async for i, ro in stream:
            if ro.prompt_logprobs is not None:
                prompt_lps[i] = ro.prompt_logprobs
            for o in ro.outputs:
                index = i * n + o.index
                lpb = lp_builders.get(index)
                first = lpb is None
                if first:
                    lpb = lp_builders[index] = _Logprobs(serving.tokenizer)
                text, lps = o.text, None
                if first and req.echo:  # the prompt (and its logprobs) lead the choice's first chunk
                    etext, lps = _echo_prefix(serving, prompts[i], prompt_lps.get(i), lpb, want_lp)
                    text = etext + text
                if want_lp:
                    delta = lpb.make(o.token_ids, o.logprobs or [])
                    lps = lpb.extend(lps, delta) if lps is not None else delta
                if not first and not text and not o.token_ids and o.finish_reason is None:
                    continue
                completion_tokens += len(o.token_ids)
                await sse.send_struct(P.CompletionStreamResponse(
                    id=request_id, created=created, model=model, usage=usage() if continuous else None,
                    choices=[P.CompletionStreamChoice(index=index, text=text, logprobs=lps,
                                                      finish_reason=o.finish_reason, stop_reason=o.stop_reason)]))
        if include_usage:
            await sse.send_struct(P.CompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=usage()))

    return await sse.run(stream, produce)


async def _collect(stream, *, serving, req, prompts, n, request_id, model, created):
    want_lp = req.logprobs is not None
    texts, tokens, lps, finish, stop, prompt_lps = {}, {}, {}, {}, {}, {}
    builders = {}
    try:
        async for i, ro in stream:
            if ro.prompt_logprobs is not None:
                prompt_lps[i] = ro.prompt_logprobs
            for o in ro.outputs:
                index = i * n + o.index
                texts[index] = texts.get(index, "") + o.text
                tokens.setdefault(index, []).extend(o.token_ids)
                if want_lp:
                    lps.setdefault(index, []).extend(o.logprobs or [])
                if o.finish_reason is not None:
                    finish[index], stop[index] = o.finish_reason, o.stop_reason
    except Exception as e:
        raise engine_error(e) from None
    finally:
        await stream.aclose()
    choices = []
    for index in sorted(texts):
        i = index // n
        lpb = builders.setdefault(index, _Logprobs(serving.tokenizer))
        text, logprobs = texts[index], None
        if req.echo:
            etext, elps = _echo_prefix(serving, prompts[i], prompt_lps.get(i), lpb, want_lp)
            text = etext + text
            if want_lp:
                logprobs = lpb.extend(elps, lpb.make(tokens[index], lps[index]))
        elif want_lp:
            logprobs = lpb.make(tokens[index], lps[index])
        choices.append(P.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=finish.get(index), stop_reason=stop.get(index),
                                          prompt_logprobs=_prompt_lp_json(prompt_lps.get(i), serving)
                                          if req.prompt_logprobs is not None else None))
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    completion_tokens = sum(len(t) for t in tokens.values())
    return json_response(P.CompletionResponse(
        id=request_id, created=created, model=model, choices=choices,
        usage=P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)))


def _prompt_lp_json(positions, serving):
    """vLLM's prompt_logprobs field: per prompt position, {token_id: {logprob, rank, decoded_token}}."""
    if positions is None:
        return None
    return [None if pos is None else {str(t): {"logprob": clamp(lp.logprob), "rank": lp.rank,
                                               "decoded_token": token_str(serving.tokenizer, t, lp)}
                                      for t, lp in pos.items()} for pos in positions]
