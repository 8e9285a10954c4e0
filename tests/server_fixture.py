"""A live `rvllm serve` subprocess on 127.0.0.1 for the server tests (real model, real HTTP).

`live_server(*args)` makes a module-scoped fixture: the server starts once per test module, and
is stopped with SIGTERM (then SIGKILL) at teardown. `start_server` / `stop_server` are there for
tests that need their own process (signals, engine death).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import pytest

MODEL_NAME = "smol"  # --served-model-name, so tests do not depend on the cache path
MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT_S = 180


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: str
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *extra: str, api_key: str | None = None) -> LiveServer:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="rvllm-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "rvllm.cli", "serve", "--model", str(model_path), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", MODEL_NAME,
           *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if k != "RVLLM_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = LiveServer(proc, port, log.name, api_key)
    try:
        _wait_healthy(server)
    except BaseException:  # includes pytest-timeout's Failed: never leave a server behind
        stop_server(server, sig=signal.SIGKILL)
        raise
    return server


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=1) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"rvllm serve exited with {server.proc.returncode} during startup:\n"
                                   f"{server.log()[-4000:]}")
            try:
                if http.get(server.base_url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    raise RuntimeError(f"rvllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()[-4000:]}")


def stop_server(server: LiveServer, sig=signal.SIGTERM, timeout: float = 40) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    return server.proc.returncode


def live_server(*extra: str, api_key: str | None = None):
    """A module-scoped fixture running `rvllm serve` with the given extra flags."""

    @pytest.fixture(scope="module")
    def fixture(smollm2_path):
        server = start_server(smollm2_path, *extra, api_key=api_key)
        try:
            yield server
        finally:
            stop_server(server)

    return fixture


def metric_samples(server: LiveServer) -> dict:
    """/metrics parsed: {(sample name, finished_reason label or None): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return {(s.name, s.labels.get("finished_reason")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}
