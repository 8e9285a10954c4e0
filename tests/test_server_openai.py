"""The official openai SDK against a live `rvllm serve` (SmolLM2-135M, CPU): completions and chat,
sync and async, streaming and not. Responses are re-validated with the SDK's pydantic models
(the SDK itself builds them without validation), so a missing or mistyped field fails here."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.server_fixture import MODEL_NAME, live_server

server = live_server()
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def validated(model_cls, obj):
    return model_cls.model_validate(obj.to_dict(), strict=False)


def validated_completion_chunk(chunk):
    # The SDK parses completion chunks as Completion, whose finish_reason type omits the null that
    # OpenAI itself streams until the last chunk; fill it in to check every other field.
    d = chunk.to_dict()
    for c in d["choices"]:
        assert "finish_reason" in c
        c["finish_reason"] = c["finish_reason"] or "length"
    return Completion.model_validate(d)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME] and models[0].owned_by == "rvllm"


def test_completion_non_streaming(client, server):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    validated(Completion, resp)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and isinstance(resp.created, int)
    assert resp.model == MODEL_NAME and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("length", "stop")
    prompt_len = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()["count"]
    usage = resp.usage
    assert usage.prompt_tokens == prompt_len and 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Greedy is deterministic: the same request gives the same text.
    again = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text


def test_completion_streaming_matches_non_streaming(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        validated_completion_chunk(c)
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens


def test_completion_n_and_prompt_list(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=4,
                                     temperature=0.8, seed=1)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason in ("length", "stop") for c in resp.choices)
    if all(c.finish_reason == "length" for c in resp.choices):
        assert resp.usage.completion_tokens == 16  # 2 prompts x n=2 x 4 tokens


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and top.get(tok) == pytest.approx(chosen)
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert "".join(lp.tokens) == resp.choices[0].text


def test_completion_echo(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                     logprobs=1)
    choice = resp.choices[0]
    assert choice.text.startswith(PROMPT)
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.tokens) == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_stop_string_and_stop_reason(client):
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    stop = full.strip()[:2] if "." not in full else "."
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert choice.model_extra["stop_reason"] == stop
    assert full.startswith(choice.text)


def test_seed_reproducibility(client):
    kw = dict(model=MODEL_NAME, prompt="Tell me a story:", max_tokens=8, temperature=1.0)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b


def test_chat_non_streaming_and_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=2)
    validated(ChatCompletion, resp)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert isinstance(item.token, str) and item.logprob <= 0 and isinstance(item.bytes, list)
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely


def test_chat_max_completion_tokens_and_n(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=3, n=2,
                                          temperature=0.7, seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in resp.choices) and resp.usage.completion_tokens == 6


def test_chat_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        validated(ChatCompletionChunk, c)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_async_client_concurrent(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        plain = aclient.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0)
        streams = [aclient.completions.create(model=MODEL_NAME, prompt=f"Number {i}:", max_tokens=6,
                                              temperature=0, stream=True) for i in range(3)]
        first, *streamed = await asyncio.gather(plain, *streams)
        texts = []
        for s in streamed:
            texts.append("".join([c.choices[0].text async for c in s]))
        await aclient.close()
        return first, texts
    first, texts = asyncio.run(main())
    assert first.choices[0].message.content and all(texts)
