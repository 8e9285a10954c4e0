"""Shared bits of the bench scripts: machine description, git commit, RESULTS.md appending."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def commit() -> str:
    """The checkout's commit; $RVLLM_BENCH_COMMIT wins (the device machine's copy of the tree carries
    stale git metadata, so the caller passes the commit it sent)."""
    if os.environ.get("RVLLM_BENCH_COMMIT"):
        return os.environ["RVLLM_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    gpu = os.environ.get("RVLLM_BENCH_GPU")
    if gpu:
        return gpu
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def append_results(title: str, table: str, note: str = "") -> None:
    """Appends a dated section (commit, machine, exact command) to bench/RESULTS.md."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section: date, commit, machine, command, table.\n")
    cmd = " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a") as f:
        f.write(f"\n## {title}\n\n- date: {stamp}\n- commit: {commit()}\n- machine: {machine()}\n"
                f"- command: `python {cmd}`\n")
        if note:
            f.write(f"- note: {note}\n")
        f.write(f"\n{table}\n")


def profile_table(llm, run) -> str:
    """Runs `run()` with the engine's step profiler on (runner/profiling.py) and returns a table of
    mean and median microseconds per phase."""
    from rvllm.runner.profiling import StepProfiler

    runner = llm.engine.runner
    runner.profiler = StepProfiler(llm.engine.backend)
    try:
        run()
    finally:
        prof, runner.profiler = runner.profiler, None
    lines = [f"| phase (us per step, {len(prof.rows)} steps) | mean | median |", "|---|---|---|"]
    lines += [f"| {phase} | {mean:.0f} | {median:.0f} |" for phase, (mean, median) in prof.summary().items()]
    kinds = prof.device_time_by_kind()
    if kinds:
        lines += ["", "| steps | count | device ms (h2d + forward + sample + gap), total |", "|---|---|---|"]
        lines += [f"| {kind} | {n} | {total * 1e3:.1f} |" for kind, (n, total) in kinds.items()]
    return "\n".join(lines)


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "plain": dict(temperature=1.0, top_p=1.0),  # vllm bench throughput's
    # Qwen2.5-Instruct's generation_config.json, which `rvllm serve` applies by default (as vLLM does)
    "qwen-chat": dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    # Llama-3.1-Instruct's: top-p alone
    "llama-chat": dict(temperature=0.6, top_p=0.9),
}


def add_sampling_arg(ap, default: str) -> None:
    ap.add_argument("--sampling", choices=list(SAMPLING), default=default,
                    help="greedy; plain (temperature 1.0, top-p 1.0); qwen-chat (Qwen2.5-Instruct's generation_config: "
                         "temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.05); llama-chat "
                         "(Llama-3.1-Instruct's: temperature 0.6, top-p 0.9)")


def add_engine_args(ap, input_len: int, output_len: int = 128) -> None:
    """The arguments bench/latency.py and bench/throughput.py share: model, load format, device,
    lengths, eager / async switches, --profile and --append-results."""
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--input-len", type=int, default=input_len)
    ap.add_argument("--output-len", type=int, default=output_len)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="default: the engine's (on with CUDA)")
    ap.add_argument("--profile", action="store_true", help="also print the per-step phase breakdown of one more run")
    ap.add_argument("--append-results", action="store_true")
