"""msgspec structs for the OpenAI request and response bodies, in vLLM's shapes.

Requests are decoded in two steps: bytes -> JSON value (a syntax error is "malformed JSON"), then
value -> Struct with `msgspec.convert` (a type error names the field through msgspec's `$.path`).
Unknown fields are ignored, as OpenAI and vLLM do, but logged so a typo is not silently lost.
Responses are Structs too, so the encoder writes every field the OpenAI SDK parses, nulls included.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Literal

import msgspec
from msgspec import Struct

logger = logging.getLogger("rvllm.server")


# ---- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error a handler answers with `{"error": {...}}` and an HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.headers = message, status, param, headers
        self.type = type or _ERROR_TYPES.get(status, "InternalServerError")


# vLLM names the error type after the status, as the OpenAI SDK's exception classes are named.
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestEntityTooLarge", 503: "ServiceUnavailableError",
                500: "InternalServerError"}


class ErrorInfo(Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(Struct, kw_only=True):
    error: ErrorInfo


def error_body(err: APIError) -> bytes:
    return msgspec.json.encode(ErrorResponse(error=ErrorInfo(
        message=err.message, type=err.type, param=err.param, code=err.status)))


# ---- request bodies ----------------------------------------------------------------------------
class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(Struct, kw_only=True):
    """The sampling fields both endpoints share (OpenAI's plus vLLM's extras). None = not set."""
    model: str | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    user: str | None = None  # accepted for compatibility, unused


class CompletionRequest(_SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: msgspec unions allow one array type, so the
    # element types are checked by the handler (which can name `prompt` in the error).
    prompt: str | list[Any]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default; an explicit null = what fits
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def decode_request(body: bytes, typ: type) -> Any:
    """Bytes -> request Struct, or APIError(400) naming what is wrong."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise APIError(f"Malformed JSON in the request body: {e}") from None
    if not isinstance(raw, dict):
        raise APIError("The request body must be a JSON object")
    unknown = raw.keys() - set(typ.__struct_fields__)
    if unknown:
        logger.warning("Ignoring unknown field(s) in %s: %s", typ.__name__, ", ".join(sorted(unknown)))
    try:
        return msgspec.convert(raw, typ)
    except msgspec.ValidationError as e:
        m = _PATH_RE.search(str(e))
        param = m.group(1) if m and m.group(1) else None
        raise APIError(f"Invalid request: {e}", param=param) from None


# ---- response bodies ---------------------------------------------------------------------------
class UsageInfo(Struct, kw_only=True):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict | None = None


class CompletionLogProbs(Struct, kw_only=True):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamChoice(Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class ChatLogProb(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb, kw_only=True):
    top_logprobs: list[ChatLogProb] = []


class ChatLogProbs(Struct, kw_only=True):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict] = []


class ChatChoice(Struct, kw_only=True):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(Struct, kw_only=True, omit_defaults=True):
    # Unset keys are left out, as vLLM and OpenAI do: the role appears only in a choice's first chunk.
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "rvllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int


class ModelList(Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class TokenizeResponse(Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct, kw_only=True):
    prompt: str
