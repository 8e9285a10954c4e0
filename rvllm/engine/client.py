"""Front-end side of the engine: the core runs in its own process; this talks to it.

A reader thread receives msgspec messages from the pipe and hands them to the event loop, which
updates the OutputProcessor and wakes the generators of the requests that changed. An abort goes
to the core as soon as a consumer stops listening (client disconnect).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import AsyncIterator

import msgspec

from rvllm.config import EngineConfig
from rvllm.engine import messages as m
from rvllm.engine.output_processor import OutputProcessor
from rvllm.errors import RvllmError
from rvllm.outputs import RequestOutput
from rvllm.sampling_params import SamplingParams

log = logging.getLogger("rvllm.client")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what clients call the default model


class EngineDeadError(RuntimeError):
    """The engine core process died; in-flight requests cannot complete."""


class RequestAborted(Exception):
    """The request was aborted through AsyncEngineClient.abort while its stream was being read."""


class _Stream:
    __slots__ = ("event", "error")

    def __init__(self):
        self.event = asyncio.Event()
        self.error: Exception | None = None


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, tokenizer, source):
        self.config = config
        self.tokenizer = tokenizer
        self.generation_defaults = dict(source.generation_config)
        self.info: dict = {}
        self.max_model_len = 0
        self.processor = OutputProcessor(tokenizer)
        self._streams: dict[str, _Stream] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(m.FromEngine)
        self._stats_waiters: list[asyncio.Future] = []
        self._dead = asyncio.Event()
        self._engine_waiting = 0
        self._adds_sent = 0  # compared with the core's count of adds taken: the difference is queued here
        self._adds_seen = 0
        self._send_lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # a shutdown we asked for is not a death

    # ---- lifecycle --------------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig) -> "AsyncEngineClient":
        """Spawn the engine core process, wait until it has loaded the model."""
        from rvllm.model.source import resolve_model
        from rvllm.tokenizer_loader import load_tokenizer

        loop = asyncio.get_running_loop()
        source = await loop.run_in_executor(None, resolve_model, config.model, config.load_format,
                                            config.generation_config)
        tokenizer = load_tokenizer(source, config.tokenizer, config.chat_template)
        if config.model is None:
            if not config.served_model_name:
                config.served_model_name = [DEFAULT_MODEL_NAME]
            config.model = str(source.path)  # resolved (and pulled) once, here
        self = cls(config, tokenizer, source)
        self._loop = loop
        self._proc, self._conn = _spawn_engine_process(config)
        first = await loop.run_in_executor(None, self._recv_first)
        if isinstance(first, m.ErrorOutput):
            await loop.run_in_executor(None, _wait, self._proc, 5)
            raise RvllmError(first.message)
        self.info = first.info
        self.max_model_len = first.info["max_model_len"]
        threading.Thread(target=self._reader, name="rvllm-engine-reader", daemon=True).start()
        return self

    def _recv_first(self):
        try:
            return self._decoder.decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            code = _wait(self._proc, 5) if self._proc else None
            return m.ErrorOutput(f"the engine process exited during startup (exit code {code})")

    async def shutdown(self) -> None:
        if self._proc is None:
            return
        self._closing = True
        try:
            self._send(m.Shutdown())
        except EngineDeadError:
            pass
        await asyncio.get_running_loop().run_in_executor(None, _wait, self._proc, 10)
        if self._proc.poll() is None:
            self._proc.terminate()
            await asyncio.get_running_loop().run_in_executor(None, _wait, self._proc, 10)
        self._proc = None

    @property
    def is_healthy(self) -> bool:
        return not self._dead.is_set()

    async def wait_dead(self) -> None:
        await self._dead.wait()

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields deltas (text, token ids, logprobs since the previous yield) until the request finishes."""
        if self._dead.is_set():
            raise EngineDeadError("the engine process is not running")
        stream = _Stream()
        children = self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        self._streams[request_id] = stream
        finished = False
        try:
            now = time.monotonic()
            for cid, cparams in children:
                self._send(m.AddRequest(cid, list(prompt_token_ids), m.params_to_dict(cparams), now))
                self._adds_sent += 1
            while True:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    raise stream.error
                out = self.processor.make_output(request_id, delta=True)
                if out is not None:
                    finished = out.finished
                    yield out
                if finished:
                    return
        finally:
            if not finished and not self._dead.is_set():
                self._send_abort(self.processor.child_ids(request_id))
            self.processor.remove(request_id)
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Idempotent: aborts the request's children in the engine and ends its stream."""
        ids = self.processor.child_ids(request_id)
        if ids:
            self._send_abort(ids)
        stream = self._streams.get(request_id)
        if stream is not None and stream.error is None:
            stream.error = RequestAborted(f"request {request_id} was aborted")
            stream.event.set()

    def _send_abort(self, ids) -> None:
        try:
            self._send(m.AbortRequests(list(ids)))
        except EngineDeadError:
            pass

    def num_waiting(self) -> int:
        """Requests waiting in the core's queue plus those sent but not yet taken by it."""
        return self._engine_waiting + self._adds_sent - self._adds_seen

    async def get_stats(self) -> m.EngineStats:
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self._send(m.GetStats())
        return await asyncio.wait_for(fut, timeout=30)

    # ---- transport --------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if self._dead.is_set():
            raise EngineDeadError("the engine process is not running")
        try:
            with self._send_lock:
                self._conn.send_bytes(self._encoder.encode(msg))
        except (OSError, ValueError) as e:
            raise EngineDeadError(f"the engine process is not running ({e})") from None

    def _reader(self) -> None:
        while True:
            try:
                msg = self._decoder.decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._on_dead)
                return
            except Exception:  # a message we cannot read: nothing after it can be trusted
                log.exception("cannot decode a message from the engine process")
                self._loop.call_soon_threadsafe(self._on_dead)
                return
            self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg) -> None:
        if isinstance(msg, m.StepOutput):
            self._engine_waiting = msg.num_waiting
            self._adds_seen = msg.num_adds_seen
            errors = [d for d in msg.deltas if d.finish_reason == "error"]
            if errors:
                self._fail_requests(errors)
            changed, to_finish = self.processor.process([d for d in msg.deltas if d.finish_reason != "error"])
            if to_finish:
                try:
                    self._send(m.FinishRequests(to_finish))
                except EngineDeadError:
                    pass
            for rid in changed:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.event.set()
        elif isinstance(msg, m.StatsOutput):
            while self._stats_waiters:
                fut = self._stats_waiters.pop(0)
                if not fut.done():
                    fut.set_result(msg.stats)
                    break
        elif isinstance(msg, m.ErrorOutput):
            log.error("engine error: %s", msg.message)

    def _fail_requests(self, deltas) -> None:
        for d in deltas:
            parent = self.processor.child_to_parent.get(d.request_id)
            stream = self._streams.get(parent)
            if stream is not None and stream.error is None:
                stream.error = ValueError(str(d.stop_reason))
                stream.event.set()

    def _on_dead(self) -> None:
        if self._dead.is_set():
            return
        if not self._closing:
            log.error("the engine process died (exit code %s)", self._proc.poll() if self._proc else None)
        self._dead.set()
        for stream in self._streams.values():
            stream.error = EngineDeadError("the engine process died")
            stream.event.set()
        for fut in self._stats_waiters:
            if not fut.done():
                fut.set_exception(EngineDeadError("the engine process died"))


def _spawn_engine_process(config: EngineConfig) -> tuple[subprocess.Popen, Connection]:
    """Starts `python -m rvllm.engine.core_proc FD` with one end of a socket pair as FD, sends it the
    config, and returns the process and this end as a multiprocessing Connection (send_bytes and
    recv_bytes, as before). multiprocessing's "spawn" Process did the same but also started its
    resource tracker, a third Python process that held 16 MB and tracked nothing rvllm makes
    (bench/NOTES.md #58). The child finds rvllm where this process did, whatever its working directory."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "rvllm.engine.core_proc", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    conn.send_bytes(pickle.dumps(config))
    return proc, conn


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit code, waiting up to `timeout` seconds for it to exit; None if still running."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
