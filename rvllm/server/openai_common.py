"""What the completions and chat handlers share: request checks, SamplingParams from a request,
running one or several engine streams with abort-on-exit, SSE writing and logprob formatting."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator

import msgspec
from aiohttp import web

from rvllm.sampling_params import SamplingParams
from rvllm.server.protocol import APIError, ErrorInfo, ErrorResponse

logger = logging.getLogger("rvllm.server")

# Request fields copied to SamplingParams as they are, when the client set them (None = unset, so
# SamplingParams can tell which ones generation_config.json defaults may fill).
_PASSTHROUGH = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "seed", "min_tokens", "ignore_eos", "skip_special_tokens",
                "spaces_between_special_tokens", "include_stop_str_in_output", "stop", "stop_token_ids")
_SP_FIELDS = set(_PASSTHROUGH) | {"max_tokens", "logprobs", "prompt_logprobs", "logit_bias"}

encoder = msgspec.json.Encoder()


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Serving:
    """Per-app state the handlers read: the engine client and the server's settings."""

    def __init__(self, client, served_model_names: list[str], chat_template: str | None = None):
        self.client = client
        self.tokenizer = client.tokenizer
        # Token ids are checked against the model's vocabulary, which can exceed the tokenizer's (a dummy
        # preset borrows SmolLM2's tokenizer); the engine reports it once it has loaded the model.
        self.vocab_size: int = (getattr(client, "info", None) or {}).get("vocab_size") or client.tokenizer.vocab_size
        self.max_model_len: int = client.max_model_len
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.chat_template = chat_template
        config = client.config
        self.max_logprobs: int = getattr(config, "max_logprobs", None) or 20
        self.max_queued: int | None = getattr(config, "max_queued_requests", None)
        self.log_requests: bool = bool(getattr(config, "enable_log_requests", False))
        self._live: set[asyncio.Queue] = set()  # one queue per running generation

    # ---- checks every generation request goes through --------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", 404, param="model")

    def check_queue(self) -> None:
        if self.max_queued is not None and self.client.num_waiting() >= self.max_queued:
            raise APIError(f"The server is overloaded: {self.max_queued} requests are already waiting. "
                           "Retry later.", 503, headers={"Retry-After": "1"})

    def check_tokens(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError("The prompt is empty.", param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(f"Token id {bad} is out of vocabulary (size {self.vocab_size}).", param=param)

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """vLLM's context-length check; None means whatever fits after the prompt."""
        limit = self.max_model_len
        if max_tokens is None:
            if prompt_len >= limit:
                raise APIError(f"This model's maximum context length is {limit} tokens. However, your request "
                               f"has {prompt_len} input tokens. Please reduce the length of the input messages.",
                               param="messages")
            return limit - prompt_len
        if max_tokens < 1:
            raise APIError(f"{param} must be at least 1, got {max_tokens}.", param=param)
        if prompt_len + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                           "completion). Please reduce the length of the messages or completion.", param=param)
        return max_tokens

    def check_logprobs(self, n: int | None, param: str) -> None:
        if n is not None and (n < 0 or n > self.max_logprobs):
            raise APIError(f"Requested sample logprobs of {n}, which is greater than max allowed: "
                           f"{self.max_logprobs}" if n > 0 else f"{param} must be >= 0, got {n}", param=param)

    def sampling_params(self, req, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        kwargs: dict[str, Any] = {k: getattr(req, k) for k in _PASSTHROUGH if getattr(req, k) is not None}
        kwargs["max_tokens"] = max_tokens
        if logprobs is not None:
            kwargs["logprobs"] = logprobs
        if prompt_logprobs is not None:
            kwargs["prompt_logprobs"] = prompt_logprobs
        if req.logit_bias:
            try:
                bias = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise APIError("logit_bias keys must be token ids (integers as strings).", param="logit_bias") from None
            if any(not 0 <= t < self.vocab_size for t in bias):
                raise APIError("logit_bias has a token id out of vocabulary.", param="logit_bias")
            kwargs["logit_bias"] = bias
        for t in kwargs.get("stop_token_ids") or ():
            if not 0 <= t < self.vocab_size:
                raise APIError(f"stop_token_ids has a token id out of vocabulary: {t}", param="stop_token_ids")
        try:
            params = SamplingParams(**kwargs).with_generation_defaults(self.client.generation_defaults or {})
        except ValueError as e:
            # SamplingParams' messages start with the field name ("top_p must be in (0, 1], got 2.0").
            first = str(e).split(" ", 1)[0]
            raise APIError(str(e), param=first if first in _SP_FIELDS else None) from None
        return params

    def log_request(self, request_id: str, prompt_lens: list[int], params: SamplingParams) -> None:
        if self.log_requests:
            logger.info("Received request %s: prompt_tokens=%s, params=%r", request_id, prompt_lens, params)

    # ---- running engine streams --------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return len(self._live)

    def abort_all(self, err: Exception) -> None:
        """End every running generation with `err` (shutdown past its timeout)."""
        for queue in self._live:
            queue.put_nowait((-1, None, err))

    async def generate(self, request_id: str, prompts: list[tuple[str | None, list[int]]],
                       params_list: list[SamplingParams]) -> AsyncIterator[tuple[int, Any]]:
        """Yield (prompt_index, RequestOutput) from one engine stream per prompt, interleaved as they come.

        Whatever ends the iteration early (client disconnect -> CancelledError, a write failing, an
        error in another prompt's stream, abort_all) aborts the unfinished engine requests."""
        client = self.client
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        unfinished = set(ids)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in client.generate(ids[i], prompts[i][1], params_list[i], prompt=prompts[i][0]):
                    queue.put_nowait((i, out, None))
                queue.put_nowait((i, None, None))
            except Exception as e:  # incl. RequestAborted: handed to the consumer, which raises it in the handler
                queue.put_nowait((i, None, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        self._live.add(queue)
        try:
            live = len(tasks)
            while live:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    live -= 1
                    continue
                if out.finished:
                    unfinished.discard(ids[i])
                yield i, out
        finally:
            self._live.discard(queue)
            for t in tasks:
                t.cancel()
            for rid in unfinished:
                try:  # shielded: this finally may itself be running because the handler was cancelled
                    await asyncio.shield(client.abort(rid))
                except Exception:  # the engine may be gone already; nothing left to abort then
                    logger.debug("abort of %s failed", rid, exc_info=True)


SERVING = web.AppKey("serving", Serving)


def engine_error(e: BaseException) -> APIError:
    """Map an exception from the engine stream to what the client sees (no internals)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(str(e))
    from rvllm.engine.client import EngineDeadError  # lazy: only needed on this error path
    if isinstance(e, EngineDeadError):
        return APIError("The engine process died; the server is shutting down.", 503,
                        type="EngineDeadError")
    logger.error("Request failed", exc_info=e)
    return APIError("Internal server error.", 500)


class SSEWriter:
    """Server-sent events. The response is prepared on the first event, so an error before the
    first token is still an ordinary JSON error with its HTTP status."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, payload: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                        "Cache-Control": "no-cache"})
            await self.response.prepare(self.request)
        await self.response.write(b"data: " + payload + b"\n\n")

    async def send_struct(self, obj) -> None:
        await self.send(encoder.encode(obj))

    async def fail(self, err: APIError) -> web.StreamResponse:
        """An error midway: an error event, then [DONE]. Before anything was sent: raise it."""
        if self.response is None:
            raise err
        await self.send_struct(ErrorResponse(error=ErrorInfo(message=err.message, type=err.type,
                                                             param=err.param, code=err.status)))
        return await self.done()

    async def done(self) -> web.StreamResponse:
        await self.send(b"[DONE]")
        await self.response.write_eof()
        return self.response

    async def run(self, stream, produce) -> web.StreamResponse:
        """One streamed engine request: `produce()` sends the events, then [DONE] follows; an engine
        failure becomes an error event (a JSON error before the first event); the engine stream is
        closed either way. A client that went away (ConnectionResetError) propagates: Serving.generate's
        cleanup has aborted the engine request."""
        try:
            await produce()
            return await self.done()
        except ConnectionResetError:
            raise
        except Exception as e:
            return await self.fail(engine_error(e))
        finally:
            await stream.aclose()


def json_response(obj, status: int = 200) -> web.Response:
    return web.Response(body=encoder.encode(obj), status=status, content_type="application/json")


# ---- logprob formatting ------------------------------------------------------------------------
def clamp(x: float) -> float:
    return max(x, -9999.0)  # vLLM's floor: JSON has no -inf


def token_str(tokenizer, token_id: int, lp) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)
