"""Every error class of the live server, with its status and OpenAI-shaped body; the server keeps
serving afterwards. This server runs with an API key and a one-deep waiting queue
(--max-num-seqs 1 --max-queued-requests 1) so 401 and 503 can be provoked."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.server_fixture import MAX_MODEL_LEN, MODEL_NAME, live_server, metric_samples

KEY = "test-key-123"
server = live_server("--max-num-seqs", "1", "--max-queued-requests", "1", api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=120) as c:
        yield c


def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


def test_malformed_json(http):
    err = error_of(http.post("/v1/completions", content=b'{"prompt": "a",', headers={
        "Content-Type": "application/json"}), 400)
    assert "Malformed JSON" in err["message"]


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL_NAME, "prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": 5}, "prompt"),
    ({"model": MODEL_NAME, "prompt": "a", "temperature": -1}, "temperature"),  # SamplingParams' ValueError
    ({"model": MODEL_NAME, "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": MODEL_NAME, "prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": MODEL_NAME, "prompt": "a", "suffix": "z"}, "suffix"),
])
def test_bad_fields_name_the_field(http, body, param):
    assert error_of(http.post("/v1/completions", json=body), 400)["param"] == param


def test_context_length(http):
    long_prompt = [1] * (MAX_MODEL_LEN - 4)
    err = error_of(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": long_prompt,
                                                      "max_tokens": 16}), 400)
    assert err["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{MAX_MODEL_LEN + 12} tokens ({MAX_MODEL_LEN - 4} in the messages, 16 in the completion). "
        "Please reduce the length of the messages or completion.")


def test_unknown_model_is_404_through_the_sdk(server):
    client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "The model `gpt-nope` does not exist." in str(e.value)


def test_unknown_route_and_method(http):
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.get("/v1/chat/completions"), 405)


def test_auth(server):
    url = server.v1 + "/models"
    assert error_of(httpx.get(url), 401)
    assert error_of(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url, headers=server.headers()).status_code == 200
    assert httpx.get(server.base_url + "/health").status_code == 200  # not under /v1


def test_body_over_the_limit_is_413(http):
    body = b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    try:
        resp = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    except httpx.TransportError:
        pytest.fail("the server dropped the connection instead of answering 413")
    error_of(resp, 413)


def test_queue_full_is_503_with_retry_after(server, http):
    """One request runs (max-num-seqs 1), one waits (max-queued-requests 1): a third gets 503."""
    results = []

    def long_request():
        r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Count: 1 2 3", "max_tokens": 32,
                                               "temperature": 0, "ignore_eos": True})
        results.append(r.status_code)

    def wait_metric(name, value):
        deadline = time.monotonic() + 60
        while metric_samples(server).get((name, None), 0) < value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.05)

    threads = [threading.Thread(target=long_request) for _ in range(2)]
    # One at a time: an add not yet seen by the engine counts as waiting, so the second must come
    # after the first is running.
    threads[0].start()
    wait_metric("vllm:num_requests_running", 1)
    threads[1].start()
    wait_metric("vllm:num_requests_waiting", 1)
    # The front end's count learns of the queued request from the next step's output; the engine answers
    # a stats call only between steps, so one more scrape guarantees that output has been read.
    assert metric_samples(server)[("vllm:num_requests_waiting", None)] == 1
    resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
    err = error_of(resp, 503)
    assert int(resp.headers["Retry-After"]) >= 1 and "overloaded" in err["message"]
    for t in threads:
        t.join(120)
    assert results == [200, 200]


def test_still_serving_after_errors(http):
    r = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
