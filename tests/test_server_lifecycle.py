"""Disconnects, metrics bookkeeping, SIGTERM and engine death against live `rvllm serve` processes."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.server_fixture import MODEL_NAME, live_server, metric_samples, start_server, stop_server

server = live_server()


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stream_events(base_url, body, on_first=None, path="/v1/completions") -> list:
    """POST a streaming request; returns the parsed events (the last one is "[DONE]" if it came)."""
    events = []
    with httpx.stream("POST", base_url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 1 and on_first:
                on_first()
    return events


def test_metrics_counters_move_by_the_right_amounts(server):
    before = metric_samples(server)
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 5,
                                                     "temperature": 0, "ignore_eos": True}, timeout=120).json()
    after = metric_samples(server)

    def delta(name, label=None):
        return after.get((name, label), 0) - before.get((name, label), 0)

    usage = r["usage"]
    assert usage["completion_tokens"] == 5
    assert delta("vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:request_success_total", "length") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert delta("vllm:request_prompt_tokens_sum") == usage["prompt_tokens"]
    assert delta("vllm:request_generation_tokens_sum") == 5
    assert delta("vllm:prefix_cache_queries_total") >= 0 and ("vllm:num_preemptions_total", None) in after
    assert after[("vllm:num_requests_running", None)] == 0


def test_disconnect_mid_stream_aborts_and_frees_the_kv_cache(server):
    idle = metric_samples(server)
    assert idle[("vllm:num_requests_running", None)] == 0
    got = []
    with httpx.stream("POST", server.v1 + "/completions", timeout=120, json={
            "model": MODEL_NAME, "prompt": "Write a long story:", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line)
            if len(got) == 3:
                during = metric_samples(server)
                break  # leaving the stream closes the connection with the request unfinished
    assert during[("vllm:num_requests_running", None)] == 1
    assert during[("vllm:kv_cache_usage_perc", None)] > idle[("vllm:kv_cache_usage_perc", None)]
    wait_for(lambda: metric_samples(server)[("vllm:num_requests_running", None)] == 0, 10, "the abort")
    after = metric_samples(server)
    assert after[("vllm:kv_cache_usage_perc", None)] == idle[("vllm:kv_cache_usage_perc", None)]
    assert after.get(("vllm:request_success_total", "abort"), 0) == idle.get(
        ("vllm:request_success_total", "abort"), 0) + 1
    # Well short of 1500 tokens: the engine stopped when the client left.
    assert after[("vllm:generation_tokens_total", None)] - idle[("vllm:generation_tokens_total", None)] < 200


def test_sigterm_lets_streams_finish_and_exits_0(smollm2_path):
    srv = start_server(smollm2_path)
    results: list[list] = [None, None]
    started = threading.Barrier(3)

    def run(i):
        results[i] = stream_events(srv.base_url, {"model": MODEL_NAME, "prompt": f"Story {i}:",
                                                          "max_tokens": 12, "ignore_eos": True},
                                   on_first=started.wait)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        started.wait(60)  # both streams are producing tokens
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections once shutting down
            httpx.get(srv.base_url + "/health", timeout=2)
        for t in threads:
            t.join(60)
        code = srv.proc.wait(40)
    finally:
        stop_server(srv, sig=signal.SIGKILL)
    assert code == 0, srv.log()[-3000:]
    for events in results:
        assert events[-1] == "[DONE]"
        last = events[-2]
        # Finished in full (the shutdown waits for in-flight requests up to its timeout) or with an error event.
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_engine_death_fails_requests_and_exits_nonzero(smollm2_path):
    srv = start_server(smollm2_path)
    try:
        # The engine core is the server's `python -m rvllm.engine.core_proc` child.
        children = _children(srv.proc.pid)
        engine_pids = [p for p in children if b"rvllm.engine.core_proc" in open(f"/proc/{p}/cmdline", "rb").read()]
        assert engine_pids, "no engine child process found"
        assert children == engine_pids, "the server should run no process but the engine core"
        events = stream_events(srv.base_url, {"model": MODEL_NAME, "prompt": "Go:", "max_tokens": 1500,
                                                      "ignore_eos": True},
                               on_first=lambda: [os.kill(p, signal.SIGKILL) for p in engine_pids])
        code = srv.proc.wait(40)
    finally:
        stop_server(srv, sig=signal.SIGKILL)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert code != 0
