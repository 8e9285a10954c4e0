"""The engine core's own process: receive requests, step while there is work, send deltas back.

The HTTP event loop never waits on a model step because steps run here. Messages are msgspec
msgpack over a socket pair, read and written as a multiprocessing Connection (see messages.py).
The front end starts it as `python -m rvllm.engine.core_proc FD` (client._spawn_engine_process)
and sends the pickled EngineConfig first.
"""
from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection

import msgspec

from rvllm.engine import messages as m

log = logging.getLogger("rvllm.engine")


def run_engine_process(config, conn, log_level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The front end owns shutdown: SIGINT from a terminal goes to the whole group, ignore it here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _leave_a_core_to_the_front_end()
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(m.ToEngine)
    try:
        from rvllm.engine.core import EngineCore

        core = EngineCore(config)
    except Exception as e:  # load errors reach the user as one line through the front end
        log.debug("engine failed to start", exc_info=True)
        conn.send_bytes(encoder.encode(m.ErrorOutput(f"{e}", fatal=True)))
        return
    quiet_gc()
    trim_host_memory()
    conn.send_bytes(encoder.encode(m.ReadyOutput(core.info())))
    log.info("engine core ready (pid %d)", os.getpid())
    _loop(core, conn, encoder, decoder)


def quiet_gc() -> None:
    """Keep the cyclic collector out of the middle of steps: what is loaded so far lives as long as the
    process (freeze it), and a generation-0 pass every 50k container allocations instead of 700 (every
    request brings token lists). bench/scheduler.py, mixed prefill + decode: p99 2830 -> 1015 us."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def trim_host_memory() -> None:
    """Hand the C allocator's free pages back to the system (glibc's malloc_trim; elsewhere a no-op).
    Loading frees much of what it allocated (kernel compiles, file reads, the capture's temporaries),
    but glibc keeps freed pages inside its heaps: after a start that compiled the kernels, ~100 MB
    (H200, qwen2.5-1.5b, bench/rss_stages.py: 584 -> 482 MB anonymous); after a warm start, a few MB
    (bench/NOTES.md #58)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the C library this process already has
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _leave_a_core_to_the_front_end() -> None:
    """BLAS threads busy-wait for work; when they outnumber the cores left after the HTTP front end,
    every matrix product stalls (seen on 2 cores: 20 ms for a product worth 0.2 ms). Runs before
    NumPy is imported in this process; a user's own setting wins."""
    threads = str(max(1, (os.cpu_count() or 2) - 1))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)


def _loop(core, conn, encoder, decoder) -> None:
    adds_seen = 0
    while True:
        # Idle: block until a message comes. Busy: take whatever is queued, then step.
        timeout = 0 if core.has_unfinished_requests() else None
        while conn.poll(timeout):
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the front end is gone
            msg = decoder.decode(raw)
            if isinstance(msg, m.Shutdown):
                return
            adds_seen += isinstance(msg, m.AddRequest)
            reply = _handle(core, msg, adds_seen)
            if reply is not None:
                conn.send_bytes(encoder.encode(reply))
            timeout = 0
        if core.has_unfinished_requests():
            deltas = core.step()
            sched = core.scheduler
            conn.send_bytes(encoder.encode(m.StepOutput(deltas, sched.num_waiting, sched.num_running, adds_seen)))


def _handle(core, msg, adds_seen: int):
    if isinstance(msg, m.AddRequest):
        try:
            core.add_request(msg.request_id, msg.prompt_token_ids, m.params_from_dict(msg.params), msg.arrival_time)
        except ValueError as e:
            return m.StepOutput([m.RequestDelta(msg.request_id, [], finish_reason="error", stop_reason=str(e))],
                                core.scheduler.num_waiting, core.scheduler.num_running, adds_seen)
    elif isinstance(msg, m.AbortRequests):
        core.abort_requests(msg.request_ids)
    elif isinstance(msg, m.FinishRequests):
        for rid in msg.request_ids:
            core.finish_by_stop_string(rid)
    elif isinstance(msg, m.GetStats):
        return m.StatsOutput(core.stats(drain=True))
    return None


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[0]))
    try:
        config = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the front end is gone before sending the config
    run_engine_process(config, conn, config.log_level)


if __name__ == "__main__":
    main(sys.argv[1:])
