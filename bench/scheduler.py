"""Scheduler + block pool cost per step, without a model (sampled tokens are made up).

    python bench/scheduler.py [--steps 500] [--append-results]

Scenarios:
  decode  256 running requests with 1000-2000 token contexts, every step a pure decode step.
  mixed   up to 256 running requests, new 200-1000 token prompts (half share a 256-token system
          prompt) arriving every step, so prefills are chunked into the budget next to decodes.
Target: schedule() + update_from_output() <= 1 ms per step on the 2-core CI machine.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results  # noqa: E402
from rvllm.engine.core_proc import quiet_gc  # noqa: E402
from rvllm.engine.request import Request  # noqa: E402
from rvllm.engine.scheduler import Scheduler  # noqa: E402
from rvllm.sampling_params import SamplingParams  # noqa: E402

BLOCK_SIZE = 16
VOCAB = 32000


class Scenario:
    def __init__(self, name: str, budget: int, num_blocks: int, seed: int = 0):
        self.name = name
        self.sched = Scheduler(budget, 256, BLOCK_SIZE, num_blocks, max_model_len=8192)
        self.rng = random.Random(seed)
        self.system_prompt = [self.rng.randrange(VOCAB) for _ in range(256)]
        self.next_id = 0

    def add(self, prompt_len: int, max_tokens: int, shared_prefix: bool = False) -> None:
        prompt = [self.rng.randrange(VOCAB) for _ in range(prompt_len)]
        if shared_prefix:
            prompt[:256] = self.system_prompt
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.sched.add_request(Request(f"req-{self.next_id}", prompt, params))
        self.next_id += 1

    def step(self, times: dict[str, list[float]] | None) -> None:
        """One step; records wall µs of schedule() and update_from_output(), and their thread CPU µs
        (the machine is shared: wall time includes waiting for a core, CPU time does not)."""
        sched = self.sched
        c0, t0 = time.thread_time(), time.perf_counter()
        out = sched.schedule()
        c1, t1 = time.thread_time(), time.perf_counter()
        sampled = {s.request.request_id: (s.start * 7919 + s.num_new_tokens) % VOCAB for s in out.scheduled if s.sample}
        c2, t2 = time.thread_time(), time.perf_counter()
        sched.update_from_output(out, sampled, t2)
        c3, t3 = time.thread_time(), time.perf_counter()
        if times is not None:
            times["schedule"].append((t1 - t0) * 1e6)
            times["update"].append((t3 - t2) * 1e6)
            times["cpu"].append((c1 - c0 + c3 - c2) * 1e6)
            times["tokens"].append(out.num_batched_tokens)
            times["reqs"].append(len(out.scheduled))


def run_decode(steps: int) -> dict[str, list[float]]:
    sc = Scenario("decode", budget=8192, num_blocks=256 * (2000 + steps + 64) // BLOCK_SIZE)
    for _ in range(256):
        sc.add(sc.rng.randrange(1000, 2000), max_tokens=steps + 100)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sc.sched.requests.values()):
        sc.step(None)  # prefill everything first: the measured steps are pure decode
    times = {"schedule": [], "update": [], "cpu": [], "tokens": [], "reqs": []}
    for _ in range(steps):
        sc.step(times)
    assert min(times["reqs"]) == 256 and max(times["tokens"]) == 256
    return times


def run_mixed(steps: int) -> dict[str, list[float]]:
    sc = Scenario("mixed", budget=2048, num_blocks=16384)
    times = {"schedule": [], "update": [], "cpu": [], "tokens": [], "reqs": []}
    for i in range(steps + 200):
        for _ in range(2):  # ~2 arrivals per step keeps the waiting queue non-empty
            sc.add(sc.rng.randrange(200, 1000), max_tokens=sc.rng.randrange(64, 256),
                   shared_prefix=sc.rng.random() < 0.5)
        sc.step(times if i >= 200 else None)  # the first 200 steps fill the batch
    return times


def summarize(us: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(us, n=100)
    return statistics.fmean(us), statistics.median(us), q[98]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()

    rows = []
    quiet_gc()  # the engine process's collector settings
    for name, fn in (("256 decodes, 1-2k context", run_decode), ("mixed prefill + decode", run_mixed)):
        gc.collect()
        times = fn(args.steps)
        total = [a + b for a, b in zip(times["schedule"], times["update"])]
        cells = " | ".join("{:.0f} / {:.0f} / {:.0f}".format(*summarize(times[k])) for k in ("schedule", "update"))
        cells += " | " + "{:.0f} / {:.0f} / {:.0f}".format(*summarize(total))
        cells += " | " + "{:.0f} / {:.0f} / {:.0f}".format(*summarize(times["cpu"]))
        rows.append(f"| {name} | {statistics.fmean(times['reqs']):.0f} | {statistics.fmean(times['tokens']):.0f} | {cells} |")
    table = ("| scenario | reqs/step | tokens/step | schedule() µs | update_from_output() µs | total µs "
             "| total CPU µs |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
             + "\n\nEach cell: mean / p50 / p99 per step. Wall time, except CPU (thread time, not counting waits for a core).")
    print(table)
    if args.append_results:
        append_results("Scheduler + block pool per step, no model (bench/scheduler.py)", table,
                       f"{args.steps} measured steps per scenario, block size {BLOCK_SIZE}, target total <= 1000 µs")


if __name__ == "__main__":
    main()
