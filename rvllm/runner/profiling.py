"""Per-step timings for `bench/latency.py --profile` and `bench/throughput.py --profile`.

Host phases (time.perf_counter, in the engine process): schedule, pack (collect + serialize the
step's inputs), launch (everything the runner does before returning, pack, H2D enqueue and
sampler included), sampler (its part of launch: sampling metadata, parameter packing and upload,
kernel launches), wait (blocked on the step's sampled ids), update (scheduler update + output deltas).
Device phases (CUDA events on the runner's stream): h2d (the wait for the step-input copy, which
runs on the backend's upload stream, and the kernel that unpacks it: placeholders, block tables,
a graph's embedding rows), forward (graph replay or eager forward, logits included), sample
(sampler kernels; the copy of the ids to the host runs on a stream of its own), gap (the stream
idle between the end of the previous step and the start of this one: the GPU waiting on Python).
On the CPU backend only the host phases exist.
"""
from __future__ import annotations

import statistics

HOST_PHASES = ("schedule", "pack", "launch", "sampler", "wait", "update")
DEVICE_PHASES = ("h2d", "forward", "sample", "gap")


class StepProfiler:
    def __init__(self, backend):
        self.cuda = backend.name != "cpu"
        self.rows: list[dict[str, float]] = []
        self._prev_end = None

    def mark(self):
        """A timing event recorded on the current stream (None on the CPU)."""
        if not self.cuda:
            return None
        import cupy as cp

        event = cp.cuda.Event()
        event.record(cp.cuda.get_current_stream())
        return event

    def device_times(self, events) -> dict[str, float]:
        """Seconds between the step's four marks, and the idle gap since the previous step's end."""
        if not self.cuda or events is None or events[0] is None:
            return {}
        import cupy as cp

        start, uploaded, forwarded, end = events
        end.synchronize()
        ms = cp.cuda.get_elapsed_time
        out = {"h2d": ms(start, uploaded) / 1e3, "forward": ms(uploaded, forwarded) / 1e3,
               "sample": ms(forwarded, end) / 1e3}
        if self._prev_end is not None:
            out["gap"] = max(0.0, ms(self._prev_end, start) / 1e3)
        self._prev_end = end
        return out

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)

    def device_time_by_kind(self) -> dict[str, tuple[int, float]]:
        """{"with prompt tokens" | "decode only": (steps, device seconds: h2d + forward + sample + gap)},
        to tell prefill's share of a run from the decode steps'. A step counts as "with prompt tokens"
        when it has more tokens than requests (ModelRunner.launch records the difference); a step whose
        only prompt work is one-token chunks counts as decode only."""
        out: dict[str, tuple[int, float]] = {}
        for r in self.rows:
            if "forward" not in r:
                continue
            kind = "with prompt tokens" if r.get("prompt_tokens", 0) > 0 else "decode only"
            n, total = out.get(kind, (0, 0.0))
            out[kind] = (n + 1, total + sum(r.get(p, 0.0) for p in DEVICE_PHASES))
        return out

    def summary(self) -> dict[str, tuple[float, float]]:
        """phase -> (mean, median) in microseconds over the recorded steps that have it."""
        out = {}
        for phase in HOST_PHASES + DEVICE_PHASES:
            values = [r[phase] * 1e6 for r in self.rows if phase in r]
            if values:
                out[phase] = (statistics.fmean(values), statistics.median(values))
        return out
