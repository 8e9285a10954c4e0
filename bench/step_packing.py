"""The host's step packing (runner/step_inputs.collect + serialize) for R decode rows at a given
context length, in the steady state (each request's block list grows by one block every block-size
steps), CPU only: median microseconds a step.

    python bench/step_packing.py [--rows 256] [--contexts 128 2048 8192]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rvllm.engine.request import Request  # noqa: E402
from rvllm.engine.scheduler import ScheduledRequest, SchedulerOutput  # noqa: E402
from rvllm.runner.block_tables import BlockTableSlots  # noqa: E402
from rvllm.runner.step_inputs import collect, serialize  # noqa: E402
from rvllm.sampling_params import SamplingParams  # noqa: E402

BLOCK_SIZE = 16


def median_step_us(rows: int, context: int, steps: int) -> float:
    reqs = []
    for i in range(rows):
        req = Request(str(i), [1] * (context + steps + BLOCK_SIZE), SamplingParams())
        req.block_ids = list(range(i * 1000, i * 1000 + -(-context // BLOCK_SIZE)))  # ids stay below 2^31 / 16
        reqs.append(req)
    table_slots = BlockTableSlots(rows)  # the runner's: block tables go as diffs
    times = []
    for s in range(steps):
        pos = context + s
        for req in reqs:
            if len(req.block_ids) * BLOCK_SIZE <= pos:
                req.block_ids.append(req.block_ids[-1] + 1)
        sched = SchedulerOutput([ScheduledRequest(req, pos, 1, True) for req in reqs], rows, [], [])
        t = time.perf_counter()
        serialize(collect(sched, BLOCK_SIZE, None, table_slots), rows, rows)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 2048, 8192])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    print("| decode rows | context | collect + serialize, median us a step |")
    print("|---|---|---|")
    for c in args.contexts:
        print(f"| {args.rows} | {c} | {median_step_us(args.rows, c, args.steps):.0f} |")


if __name__ == "__main__":
    main()
