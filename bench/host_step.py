"""The host's Python work per engine step at N decode rows, CPU only, no model forward.

Drives the real scheduler, step packing, sampling metadata, GPU-sampler packing and engine update
code of an EngineCore (tiny dummy model, CPU backend) through the async-scheduling step of
EngineCore.step: schedule step N+1 and pack it, then apply step N's tokens. The forward and the
sampling kernels are skipped (random token ids stand in for the sampled ones), so the numbers are
the host's part of a GPU step. Phases, per step:

    schedule    Scheduler.schedule
    collect     runner/step_inputs.collect (SchedulerOutput -> Python lists; block tables as diffs)
    serialize   runner/step_inputs.serialize (lists -> one int32 buffer)
    metadata    SamplingMetadata.from_requests
    pack_step   ParamSlots.plan and gpu_sampler_inputs.pack_step (and PenaltySlots.plan with --penalties)
    glue        the runner's request id -> row map, the engine's placeholders, the sampled ids into
                RunnerOutput.sampled (PendingStep.result)
    update      Scheduler.update_from_output
    deltas      EngineCore._deltas

    python bench/host_step.py [--rows 256] [--steps 200] [--penalties] [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

PHASES = ("schedule", "collect", "serialize", "metadata", "pack_step", "glue", "update", "deltas")
MODEL = str(Path(__file__).with_name("models") / "tiny-llama")


class _Sampled:
    """A launched sample as GpuSampler's PendingSample hands it over: result() unpacks host ids."""

    def __init__(self, tokens: np.ndarray):
        self.token_ids = tokens

    def result(self):
        from rvllm.sampling.sampler import SamplerOutput

        return SamplerOutput(self.token_ids.tolist(), [None] * len(self.token_ids))


class HostStep:
    """EngineCore.step's async path with the device work left out, timed per phase."""

    def __init__(self, rows: int, input_len: int, steps: int, penalties: bool, seed: int = 0):
        from rvllm import LLM, SamplingParams
        from rvllm.runner.block_tables import BlockTableSlots
        from rvllm.sampling.param_slots import ParamSlots
        from rvllm.sampling.penalty_slots import PenaltySlots

        self.llm = LLM(MODEL, load_format="dummy", device="cpu", max_num_seqs=rows, async_scheduling=True,
                       max_model_len=input_len + steps + 64, skip_tokenizer_init=True, seed=seed)
        core = self.core = self.llm.engine
        self.vocab = core.spec.vocab_size
        self.rng = np.random.default_rng(seed)
        pen = dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1) if penalties else {}
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=10 ** 6, ignore_eos=True, **pen)
        for i in range(rows):
            core.add_request(f"r{i}", self.rng.integers(3, self.vocab, input_len).tolist(), params)
        self.rows = rows
        self.slots = PenaltySlots(rows)
        self.param_slots = ParamSlots(rows)  # GpuSampler's (parameter records sent as diffs)
        self.table_slots = BlockTableSlots(rows)  # the runner's (block tables sent as diffs)
        self.prev_rows: dict[str, int] = {}
        self.inflight = None
        self.calls = 0

    def step(self, t: dict[str, list[float]] | None) -> bool:
        """One step; appends each phase's seconds to t. Returns whether every row was a decode."""
        from rvllm.runner.model_runner import PendingStep
        from rvllm.runner.step_inputs import collect, serialize
        from rvllm.sampling.gpu_sampler_inputs import pack_step
        from rvllm.sampling.metadata import SamplingMetadata

        core, clock = self.core, time.perf_counter
        c0 = clock()
        sched = core.scheduler.schedule()
        c1 = clock()
        batch = collect(sched, core.config.block_size, self.prev_rows, self.table_slots)
        c2 = clock()
        bucket = batch.num_reqs if batch.decode_only else 0  # a graph replay pads to its bucket
        serialize(batch, bucket, bucket)
        c3 = clock()
        meta = SamplingMetadata.from_requests(batch.sample_rows, batch.sample_ids)
        c4 = clock()
        updates = None if meta.no_penalties else self.slots.plan(meta, True)
        pack_step(meta, self.vocab, self.calls, 0, updates, self.param_slots.plan(meta))
        self.calls += 1
        c5 = clock()
        self.prev_rows = dict(zip(batch.sample_ids, range(len(batch.sample_ids))))  # as ModelRunner.launch
        for item in sched.scheduled:
            if item.sample:
                item.request.append_placeholder()
        c6 = clock()
        tokens = self.rng.integers(3, self.vocab, len(batch.sample_ids), dtype=np.int32)  # "sampled"
        update = deltas = 0.0
        if self.inflight is not None:
            prev_sched, pending = self.inflight
            g0 = clock()
            out = pending.result()
            g1 = clock()
            changed = core.scheduler.update_from_output(prev_sched, out.sampled, time.monotonic())
            g2 = clock()
            core._deltas(changed, out, prev_sched)
            g3 = clock()
            c6 += g1 - g0  # the glue's share
            update, deltas = g2 - g1, g3 - g2
        pending = PendingStep(core.runner, batch)
        pending.sample = _Sampled(tokens)
        self.inflight = (sched, pending)
        if t is not None:
            for k, v in zip(PHASES, (c1 - c0, c2 - c1, c3 - c2, c4 - c3, c5 - c4, c6 - c5, update, deltas)):
                t[k].append(v)
        return batch.decode_only and batch.num_reqs == len(sched.scheduled) == self.rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps (>= 50)")
    ap.add_argument("--penalties", action="store_true", help="repetition, frequency and presence penalties")
    ap.add_argument("--cprofile", action="store_true", help="profile the timed steps instead of timing phases")
    args = ap.parse_args()

    h = HostStep(args.rows, args.input_len, args.steps + 40, args.penalties)
    warm = 0
    while warm < 20:  # prefill, then 20 steps with every row a decode (slots and buffers warm)
        warm = warm + 1 if h.step(None) else 0
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            h.step(times)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    for _ in range(args.steps):
        assert h.step(times), "a timed step was not all decodes"
    totals = [sum(v) for v in zip(*times.values())]
    lines = [f"host step, {args.rows} decode rows, {args.input_len}-token prompts, temperature 1.0 / top_p 1.0"
             f"{', penalties' if args.penalties else ''}; {args.steps} steps (us)", "",
             "| phase | median | mean |", "|---|---|---|"]
    for k, v in list(times.items()) + [("total", totals)]:
        lines.append(f"| {k} | {np.median(v) * 1e6:.0f} | {np.mean(v) * 1e6:.0f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
