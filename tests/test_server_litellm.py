"""LiteLLM's hosted_vllm provider against a live `rvllm serve`."""
from __future__ import annotations

import os

import pytest

from tests.server_fixture import MODEL_NAME, live_server

# LiteLLM fetches a model price map from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

server = live_server()
MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_litellm_completion(server):
    resp = litellm.completion(model=f"hosted_vllm/{MODEL_NAME}", api_base=server.v1, api_key="unused",
                              messages=MESSAGES, max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens >= 1 and resp.usage.prompt_tokens >= 1


def test_litellm_streaming_matches(server):
    kw = dict(model=f"hosted_vllm/{MODEL_NAME}", api_base=server.v1, api_key="unused", messages=MESSAGES,
              max_tokens=8, temperature=0)
    full = litellm.completion(**kw).choices[0].message.content
    chunks = list(litellm.completion(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_litellm_async_text_completion(server):
    import asyncio

    async def main():
        return await litellm.atext_completion(model=f"hosted_vllm/{MODEL_NAME}", api_base=server.v1,
                                              api_key="unused", prompt="The capital of France is", max_tokens=4,
                                              temperature=0)
    resp = asyncio.run(main())
    assert isinstance(resp.choices[0].text, str) and resp.choices[0].text
