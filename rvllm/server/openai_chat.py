"""POST /v1/chat/completions: vLLM's shapes, streaming and not.

The chat template is rendered on the front end (a per-request `chat_template` wins over the
server's), tokenized without adding special tokens (the template writes them), and checked
against max_model_len before the engine sees it.
"""
from __future__ import annotations

import time
from aiohttp import web

from rvllm.server import protocol as P
from rvllm.server.openai_common import (SERVING, SSEWriter, Serving, clamp, engine_error, json_response,
                                        random_id, token_str)


def template_messages(messages: list[P.ChatMessage]) -> list[dict]:
    """ChatMessage structs -> the dicts a HF chat template expects (text parts joined by newlines)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise P.APIError(f"Only text content parts are supported, got type {part.type!r}.",
                                     param=f"messages[{i}].content")
            content = "\n".join(part.text for part in content)
        d = {"role": m.role, "content": content if content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def render_chat(serving: Serving, messages: list[P.ChatMessage], *, add_generation_prompt: bool,
                continue_final_message: bool, chat_template: str | None, tools=None) -> str:
    if not messages:
        raise P.APIError("messages must not be empty.", param="messages")
    if add_generation_prompt and continue_final_message:
        raise P.APIError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                         param="continue_final_message")
    try:
        return serving.tokenizer.apply_chat_template(
            template_messages(messages), add_generation_prompt=add_generation_prompt,
            chat_template=chat_template or serving.chat_template,
            continue_final_message=continue_final_message, tools=tools)
    except P.APIError:
        raise
    except Exception as e:  # a template error is the request's (or the template's) problem, not a crash
        raise P.APIError(f"Could not apply the chat template: {e}", param="messages") from None


def _chat_logprobs(tokenizer, token_ids, positions, top_n: int) -> P.ChatLogProbs:
    content = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid) if pos else None
        tok = token_str(tokenizer, tid, chosen)
        # OpenAI's top_logprobs: the top_n most likely tokens, best first (the chosen one only if it is among them).
        ranked = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:top_n] if pos else []
        top = []
        for t, lp in ranked:
            s = token_str(tokenizer, t, lp)
            top.append(P.ChatLogProb(token=s, logprob=clamp(lp.logprob), bytes=list(s.encode("utf-8"))))
        content.append(P.ChatLogProbsContent(token=tok, logprob=clamp(chosen.logprob) if chosen else -9999.0,
                                             bytes=list(tok.encode("utf-8")), top_logprobs=top))
    return P.ChatLogProbs(content=content)


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    serving: Serving = request.app[SERVING]
    req: P.ChatCompletionRequest = P.decode_request(await request.read(), P.ChatCompletionRequest)
    serving.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise P.APIError("Stream options can only be defined when `stream=True`.", param="stream_options")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise P.APIError("response_format other than text (structured output) is not supported yet.",
                         param="response_format")
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise P.APIError("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    serving.check_logprobs(req.top_logprobs, "top_logprobs")
    serving.check_queue()

    prompt = render_chat(serving, req.messages, add_generation_prompt=req.add_generation_prompt,
                         continue_final_message=req.continue_final_message, chat_template=req.chat_template,
                         tools=req.tools)
    ids = serving.tokenizer.encode(prompt, add_special_tokens=False)
    serving.check_tokens(ids, "messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(req, serving.resolve_max_tokens(len(ids), requested, param), top_n)
    request_id = random_id("chatcmpl")
    serving.log_request(request_id, [len(ids)], params)
    ctx = dict(serving=serving, req=req, prompt_len=len(ids), request_id=request_id, top_n=top_n,
               model=req.model or serving.model_name, created=int(time.time()))
    stream = serving.generate(request_id, [(prompt, ids)], [params])
    if req.stream:
        return await _stream(request, stream, **ctx)
    return await _collect(stream, **ctx)


async def _stream(request, stream, *, serving, req, prompt_len, request_id, top_n, model, created):
    sse = SSEWriter(request)
    started: set[int] = set()
    completion_tokens = 0
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def chunk(choices, usage=None):
        return P.ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices,
                                              usage=usage)

    def usage():
        return P.UsageInfo(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                           total_tokens=prompt_len + completion_tokens)

    async def produce():
        nonlocal completion_tokens
        async for _, ro in stream:
            for o in ro.outputs:
                if o.index not in started:  # vLLM: each choice opens with the role and empty content
                    started.add(o.index)
                    await sse.send_struct(chunk([P.ChatStreamChoice(
                        index=o.index, delta=P.DeltaMessage(role="assistant", content=""))]))
                if not o.text and not o.token_ids and o.finish_reason is None:
                    continue
                completion_tokens += len(o.token_ids)
                lps = (_chat_logprobs(serving.tokenizer, o.token_ids, o.logprobs or [], top_n)
                       if top_n is not None else None)
                await sse.send_struct(chunk([P.ChatStreamChoice(
                    index=o.index, delta=P.DeltaMessage(content=o.text), logprobs=lps,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason)], usage() if continuous else None))
        if include_usage:
            await sse.send_struct(chunk([], usage()))

    return await sse.run(stream, produce)


async def _collect(stream, *, serving, req, prompt_len, request_id, top_n, model, created):
    texts, tokens, lps, finish, stop = {}, {}, {}, {}, {}
    try:
        async for _, ro in stream:
            for o in ro.outputs:
                texts[o.index] = texts.get(o.index, "") + o.text
                tokens.setdefault(o.index, []).extend(o.token_ids)
                lps.setdefault(o.index, []).extend(o.logprobs or [])
                if o.finish_reason is not None:
                    finish[o.index], stop[o.index] = o.finish_reason, o.stop_reason
    except Exception as e:
        raise engine_error(e) from None
    finally:
        await stream.aclose()
    choices = [P.ChatChoice(index=i, message=P.ChatResponseMessage(content=texts[i]),
                            logprobs=_chat_logprobs(serving.tokenizer, tokens[i], lps[i], top_n)
                            if top_n is not None else None,
                            finish_reason=finish.get(i), stop_reason=stop.get(i))
               for i in sorted(texts)]
    completion_tokens = sum(len(t) for t in tokens.values())
    return json_response(P.ChatCompletionResponse(
        id=request_id, created=created, model=model, choices=choices,
        usage=P.UsageInfo(prompt_tokens=prompt_len, completion_tokens=completion_tokens,
                          total_tokens=prompt_len + completion_tokens)))
