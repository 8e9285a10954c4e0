"""The HTTP layer against a scripted fake engine (tests/fake_engine.py): request parsing, response
shapes, SSE framing, errors and aborts, in milliseconds and without a model."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_engine import FakeEngineClient
from rvllm.server.app import build_app, drain
from rvllm.server.openai_common import SERVING


def call(fake, fn, **app_kwargs):
    """Run `await fn(http_client)` against build_app(fake) on a fresh loop."""
    async def main():
        server = TestServer(build_app(fake, **app_kwargs))  # runs with handler_cancellation=True
        async with TestClient(server) as http:
            return await fn(http)
    return asyncio.run(main())


def post(path, body, **kw):
    async def fn(http):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        r = await http.post(path, data=data, **kw)
        return r.status, await r.text(), r.headers
    return fn


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    parts = [p for p in text.split("\n\n") if p]
    assert all(p.startswith("data: ") for p in parts)
    return [json.loads(p[6:]) for p in parts[:-1]]


def test_completion_shape_n_and_prompt_lists():
    fake = FakeEngineClient()
    status, text, _ = call(fake, post("/v1/completions", {"model": "fake-model", "prompt": [[104, 105], [1, 2, 3]],
                                                           "n": 2, "max_tokens": 5}))
    assert status == 200, text
    body = json.loads(text)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt_idx * n + i
    assert all(c["text"] == "hello" and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25,
                             "prompt_tokens_details": None}
    params = [p for _, p in fake.requests.values()]
    assert all(p.max_tokens == 5 and p.n == 2 for p in params)


def test_completion_echo_and_logprobs():
    fake = FakeEngineClient()
    status, text, _ = call(fake, post("/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True,
                                                           "logprobs": 1}))
    assert status == 200, text
    choice = json.loads(text)["choices"][0]
    assert choice["text"] == "hihe"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["h", "i", "h", "e"]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == [-0.5, -0.5, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][2] == {"h": -0.5, "A": -1.0}


def test_completion_stream_with_usage():
    fake = FakeEngineClient()
    status, text, headers = call(fake, post("/v1/completions", {
        "prompt": "x", "max_tokens": 3, "stream": True, "logprobs": 0,
        "stream_options": {"include_usage": True}}))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "hel"
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "length"]
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events[:-1]] == [[0], [1], [2]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_chat_non_stream_logprobs_and_params():
    fake = FakeEngineClient()
    status, text, _ = call(fake, post("/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", "text": "hey"}]}],
        "max_completion_tokens": 2, "logprobs": True, "top_logprobs": 2, "logit_bias": {"65": 1.5},
        "stop": "zz", "seed": 7, "temperature": 0.5}))
    assert status == 200, text
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "he", "tool_calls": []}
    first = choice["logprobs"]["content"][0]
    assert first["token"] == "h" and first["logprob"] == -0.5 and first["bytes"] == [104]
    assert [t["token"] for t in first["top_logprobs"]] == ["h", "A"]
    prompt_ids, params = next(iter(fake.requests.values()))
    assert bytes(prompt_ids) == b"<user>hey\n<assistant>"
    assert params.logit_bias == {65: 1.5} and params.stop == ["zz"] and params.seed == 7
    assert params.max_tokens == 2 and params.logprobs == 2


def test_chat_default_max_tokens_fills_context():
    fake = FakeEngineClient()
    call(fake, post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}))
    prompt_ids, params = next(iter(fake.requests.values()))
    assert params.max_tokens == fake.max_model_len - len(prompt_ids)


def test_chat_stream_role_first():
    fake = FakeEngineClient()
    status, text, _ = call(fake, post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "n": 2, "stream": True}))
    events = sse_events(text)
    by_choice = {0: [], 1: []}
    for e in events:
        assert e["object"] == "chat.completion.chunk"
        by_choice[e["choices"][0]["index"]].append(e["choices"][0])
    for chunks in by_choice.values():
        assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in chunks[1:])
        assert "".join(c["delta"]["content"] for c in chunks) == "hel"
        assert chunks[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("path,body,status,param,fragment", [
    ("/v1/completions", b"{not json", 400, None, "Malformed JSON"),
    ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "Expected"),
    ("/v1/completions", {"prompt": "a", "top_p": 2.0}, 400, "top_p", "top_p must be"),
    ("/v1/completions", {"prompt": "a", "stop": [1]}, 400, "stop[0]", "Expected"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix", "suffix"),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": [999]}, 400, "prompt", "out of vocabulary"),
    ("/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "logprobs", "max allowed"),
    ("/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model", "The model `nope` does not exist."),
    ("/v1/completions", {"prompt": "a" * 60, "max_tokens": 10}, 400, "max_tokens",
     "This model's maximum context length is 64 tokens. However, you requested 70 tokens (60 in the messages, "
     "10 in the completion). Please reduce the length of the messages or completion."),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "chat_template": "broken"}, 400,
     "messages", "chat template"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "text"),
    ("/v1/nope", {}, 404, None, "Not found"),
])
def test_errors(path, body, status, param, fragment):
    got, text, _ = call(FakeEngineClient(max_logprobs=5), post(path, body))
    err = json.loads(text)["error"]
    assert got == status and err["code"] == status and err["param"] == param
    assert fragment in err["message"] and isinstance(err["type"], str)


def test_method_not_allowed_and_unknown_fields():
    async def fn(http):
        r = await http.get("/v1/completions")
        r2 = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "frobnicate": 1})
        return r.status, await r.json(), r2.status
    status, body, ok = call(FakeEngineClient(), fn)
    assert status == 405 and body["error"]["code"] == 405
    assert ok == 200  # unknown fields are ignored (and logged)


def test_body_too_large_is_json_413():
    status, text, _ = call(FakeEngineClient(), post("/v1/completions", b'{"prompt": "' + b"a" * 5000 + b'"}'),
                           max_body_bytes=1024)
    assert status == 413 and json.loads(text)["error"]["code"] == 413


def test_api_key():
    fake = FakeEngineClient(api_key="sekret")

    async def fn(http):
        no = await http.post("/v1/completions", json={"prompt": "a"})
        wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        ok = await http.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        health = await http.get("/health")  # only /v1/* is guarded
        return no.status, (await no.json())["error"]["code"], wrong.status, ok.status, health.status
    assert call(fake, fn) == (401, 401, 401, 200, 200)


def test_queue_full_503():
    fake = FakeEngineClient(max_queued_requests=2)
    fake.waiting = 2
    status, text, headers = call(fake, post("/v1/completions", {"prompt": "a"}))
    assert status == 503 and headers["Retry-After"] and json.loads(text)["error"]["code"] == 503


def test_stream_failure_midway_is_an_error_event():
    fake = FakeEngineClient(fail_after=2)
    status, text, _ = call(fake, post("/v1/completions", {"prompt": "a", "max_tokens": 5, "stream": True}))
    events = sse_events(text)
    assert status == 200 and [e["choices"][0]["text"] for e in events[:2]] == ["h", "e"]
    assert events[-1]["error"]["code"] == 500 and "exploded" not in events[-1]["error"]["message"]


def test_disconnect_aborts_the_request():
    fake = FakeEngineClient(delay=0.05)

    async def fn(http):
        r = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "stream": True})
        await r.content.readline()  # the first event arrived: generation is under way
        r.close()  # hang up
        for _ in range(100):
            if fake.aborted:
                break
            await asyncio.sleep(0.01)
        return list(fake.aborted), set(fake.running)
    aborted, running = call(fake, fn)
    assert len(aborted) == 1 and aborted[0].startswith("cmpl-") and not running


def test_models_tokenize_detokenize_version_health_metrics():
    fake = FakeEngineClient()

    async def fn(http):
        models = await (await http.get("/v1/models")).json()
        tok = await (await http.post("/tokenize", json={"prompt": "hi", "return_token_strs": True})).json()
        chat_tok = await (await http.post("/tokenize", json={"messages": [{"role": "user", "content": "a"}]})).json()
        detok = await (await http.post("/detokenize", json={"tokens": [104, 105]})).json()
        version = await (await http.get("/version")).json()
        health = (await http.get("/health")).status
        await http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4})
        metrics = await (await http.get("/metrics")).text()
        return models, tok, chat_tok, detok, version, health, metrics
    models, tok, chat_tok, detok, version, health, metrics = call(fake, fn)
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == "fake-model" and card["owned_by"] == "rvllm"
    assert card["max_model_len"] == 64
    assert tok == {"count": 2, "max_model_len": 64, "tokens": [104, 105], "token_strs": ["h", "i"]}
    assert chat_tok["count"] == len("<user>a\n<assistant>")
    assert detok == {"prompt": "hi"} and "version" in version and health == 200
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for fam in text_string_to_metric_families(metrics) for s in fam.samples}
    assert samples[("vllm:prompt_tokens_total", None)] == 3
    assert samples[("vllm:generation_tokens_total", None)] == 4
    assert samples[("vllm:request_success_total", "stop")] == 1
    assert samples[("vllm:e2e_request_latency_seconds_count", None)] == 1
    assert samples[("vllm:inter_token_latency_seconds_count", None)] == 3
    assert samples[("vllm:kv_cache_usage_perc", None)] == 0.0
    assert ("vllm:prefix_cache_queries_total", None) in samples


def test_engine_death_maps_to_503_and_health_fails():
    from rvllm.engine.client import EngineDeadError

    fake = FakeEngineClient(fail_after=1, fail_with=EngineDeadError("the engine process died"))

    async def fn(http):
        r = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
        fake._dead.set()
        return r.status, await r.json(), (await http.get("/health")).status
    status, body, health = call(fake, fn)
    assert status == 503 and body["error"]["type"] == "EngineDeadError" and health == 503


def test_enable_log_requests(caplog):
    fake = FakeEngineClient(enable_log_requests=True)
    with caplog.at_level("INFO", logger="rvllm.server"):
        call(fake, post("/v1/completions", {"prompt": "abc", "max_tokens": 2, "temperature": 0.3}))
    line = next(r.getMessage() for r in caplog.records if "Received request cmpl-" in r.getMessage())
    assert "prompt_tokens=[3]" in line and "temperature=0.3" in line


def test_shutdown_timeout_ends_open_streams_with_an_error_event():
    """A stream still running when the shutdown timeout ends gets an error event and [DONE], not a cut."""
    fake = FakeEngineClient(delay=0.2)

    async def main():
        server = TestServer(build_app(fake))
        await server.start_server(shutdown_timeout=0.5)
        http = TestClient(server)
        r = await http.post("/v1/completions", json={"prompt": "a", "max_tokens": 10, "stream": True})
        first = await r.content.readline()  # generation is under way
        draining = asyncio.create_task(drain(server.runner, server.app[SERVING], 0.5))  # what SIGTERM does
        body = await r.content.read()
        await draining
        await http.close()
        return (first + body).decode(), list(fake.aborted)
    body, aborted = asyncio.run(main())
    events = sse_events(body)
    assert events[-1]["error"]["code"] == 503 and len(aborted) == 1
    assert events[:-1] and all(e["choices"][0]["finish_reason"] is None for e in events[:-1]), events
