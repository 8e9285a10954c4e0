"""Where a decode step's device time goes, kernel by kernel, from a real run's timeline.

Runs N prompts (as bench/throughput.py does) under PyTorch's profiler, which records every kernel
the process launches through CUPTI, CuPy's and cuBLAS's included, graph replays too. On the GPU
machine PyTorch is there for reference checks; rvllm itself never imports it. Steps are cut at the
device-to-host copies of the sampled ids (one a step; they run on a stream of their own, so the
next step's first small kernels may fall before the cut: a step's kernels are a step's worth, not
always its own); a step with the prefill attention kernel is a prompt step, the others are decode
steps. For the decode steps (or, with --prompt-steps, the prompt steps) it prints each kernel's
device time a step, what it adds to the step's chain (its end minus the latest end before it: under
PDL a kernel's duration also counts the time it waits for the one before), the step's period (copy
to copy) and how much of it no kernel ran (launch gaps, waits on the host).

    python bench/kernel_timeline.py --model qwen2.5-1.5b --num-prompts 256 --input-len 128 --output-len 32
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import SAMPLING, add_sampling_arg  # noqa: E402


def short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists, at most 48 characters."""
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"<.*", "", name)
    return name[:48]


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -np.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def cut_steps(events: list[dict], prompt: bool = False) -> list[tuple[float, float, list[dict]]]:
    """(start, end, kernels) of each decode step (prompt=True: each step with prompt tokens), cut at
    the device-to-host copies (each step ends with one)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    copies = sorted(e["ts"] + e["dur"] for e in events
                    if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", ""))
    if kernels:  # the first step starts with the first kernel, not after a copy
        copies.insert(0, kernels[0]["ts"])
    steps, i = [], 0
    for lo, hi in zip(copies, copies[1:]):
        step = []
        while i < len(kernels) and kernels[i]["ts"] < hi:
            if kernels[i]["ts"] >= lo:
                step.append(kernels[i])
            i += 1
        if step and any("prefill" in k["name"] for k in step) == prompt:
            steps.append((lo, hi, step))
    return steps


def report(steps, top: int, kind: str = "decode") -> str:
    n = len(steps)
    periods = [hi - lo for lo, hi, _ in steps]
    busy = [union_length([(k["ts"], k["ts"] + k["dur"]) for k in ks]) for _, _, ks in steps]
    per = defaultdict(lambda: [0.0, 0, 0.0])  # name -> [duration, launches, added to the chain]
    for _, _, ks in steps:
        end = None
        for k in sorted(ks, key=lambda k: k["ts"]):
            p = per[short_name(k["name"])]
            p[0] += k["dur"]
            p[1] += 1
            k_end = k["ts"] + k["dur"]
            p[2] += max(0.0, k_end - (k["ts"] if end is None else end))  # the step's first: its duration
            end = k_end if end is None else max(end, k_end)
    lines = [f"{n} {kind} steps: period median {np.median(periods):.1f} us, kernels busy median {np.median(busy):.1f} us, "
             f"idle median {np.median(np.subtract(periods, busy)):.1f} us",
             "", "| kernel | us a step | launches a step | us a launch | us it adds to the chain a launch |",
             "|---|---|---|---|---|"]
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])
    for name, (dur, count, adds) in rows[:top]:
        lines.append(f"| {name} | {dur / n:.1f} | {count / n:.1f} | {dur / count:.2f} | {adds / count:.2f} |")
    rest = sum(d for _, (d, _, _) in rows[top:])
    lines.append(f"| (others, {max(0, len(rows) - top)} names) | {rest / n:.1f} | | | |")
    lines.append(f"| sum of kernel times | {sum(d for _, (d, _, _) in rows) / n:.1f} | "
                 f"{sum(c for _, (_, c, _) in rows) / n:.1f} | | |")
    return "\n".join(lines)


def run_summary(events) -> str:
    """The whole run: from the first kernel to the last device-to-host copy, how much the prompt
    and decode steps took (their periods), how much of it any kernel ran, and the rest (before
    the first step's copy and after the last: none, as steps are cut at the copies)."""
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not kernels:
        return "no kernels"
    prompt, decode = cut_steps(events, True), cut_steps(events, False)
    span = max(e["ts"] + e["dur"] for e in events if e.get("cat") in ("kernel", "gpu_memcpy")) - min(
        k["ts"] for k in kernels)
    busy = union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])

    def total(steps):
        return sum(hi - lo for lo, hi, _ in steps) / 1e3
    steps = sorted([(lo, hi, ks, "prompt") for lo, hi, ks in prompt] + [(lo, hi, ks, "decode") for lo, hi, ks in decode],
                   key=lambda st: st[0])
    longest = sorted(range(len(steps)), key=lambda i: steps[i][0] - steps[i][1])[:8]
    lines = [f"run: {span / 1e3:.1f} ms from the first kernel to the last copy, kernels busy {busy / 1e3:.1f} ms; "
             f"{len(prompt)} prompt steps {total(prompt):.1f} ms, {len(decode)} decode steps {total(decode):.1f} ms",
             "longest steps (# in order, kind, period us, kernels busy us, kernels): " + "; ".join(
                 f"{i} {steps[i][3]} {steps[i][1] - steps[i][0]:.0f} "
                 f"{union_length([(k['ts'], k['ts'] + k['dur']) for k in steps[i][2]]):.0f} {len(steps[i][2])}"
                 for i in longest)]
    if longest:  # where the longest step waited: its widest gaps between kernels (and before the first)
        lo, hi, ks, _ = steps[longest[0]]
        gaps, end, prev = [], lo, "(the step's start)"
        for k in sorted(ks, key=lambda k: k["ts"]):
            gaps.append((k["ts"] - end, prev, short_name(k["name"])))
            end, prev = max(end, k["ts"] + k["dur"]), short_name(k["name"])
        gaps.append((hi - end, prev, "(the copy that ends the step)"))
        lines.append("its widest gaps (us, after -> before): " + "; ".join(
            f"{g:.0f} {a} -> {b}" for g, a, b in sorted(gaps, reverse=True)[:4]))
    return "\n".join(lines)


def sequence(steps, start: int, count: int) -> str:
    """Kernels start .. start + count - 1 of each step, in launch order, as medians over the steps
    that have that many: when each began and ended (us after the previous kernel in the list
    ended; negative: it was already running, as PDL lets a dependent kernel start early) and how
    much it lengthened the chain (its end minus the latest end before it)."""
    steps = [ks for _, _, ks in steps if len(ks) >= start + count]
    if not steps:
        return f"no step has {start + count} kernels"
    rows = []
    for i in range(start, start + count):
        began, lasted, adds = [], [], []
        for ks in steps:
            ends = [k["ts"] + k["dur"] for k in ks[: i]]
            prev = max(ends) if ends else ks[i]["ts"]
            began.append(ks[i]["ts"] - (ks[i - 1]["ts"] + ks[i - 1]["dur"] if i else ks[i]["ts"]))
            lasted.append(ks[i]["dur"])
            adds.append(max(0.0, ks[i]["ts"] + ks[i]["dur"] - prev))
        rows.append(f"| {i} | {short_name(steps[0][i]['name'])} | {np.median(began):.2f} | {np.median(lasted):.2f} | "
                    f"{np.median(adds):.2f} |")
    head = [f"kernels {start}-{start + count - 1} of {len(steps)} steps (medians, us)", "",
            "| # | kernel | start after the previous one's end | duration | chain lengthened by |",
            "|---|---|---|---|---|"]
    return "\n".join(head + rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--top", type=int, default=24)
    ap.add_argument("--trace", default=None, help="also keep the Chrome trace here")
    ap.add_argument("--prompt-steps", action="store_true", help="report the steps with prompt tokens instead")
    ap.add_argument("--sequence", default=None, metavar="START:COUNT",
                    help="also list kernels START .. START+COUNT-1 of each step in order (one layer's chain)")
    add_sampling_arg(ap, "plain")
    args = ap.parse_args()

    import torch  # the profiler only

    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", device="cuda", max_num_seqs=args.max_num_seqs,
              max_model_len=4096, skip_tokenizer_init=True)
    rng = np.random.default_rng(0)
    vocab = llm.engine.spec.vocab_size

    def prompts():
        return [rng.integers(100, min(vocab, 30000), args.input_len).tolist() for _ in range(args.num_prompts)]

    params = SamplingParams(**SAMPLING[args.sampling], max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts(), params)  # warm-up (fresh prompts below: no prefix-cache hits)
    fresh = prompts()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(fresh, params)
    path = args.trace or os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    print(f"{args.model}, {args.num_prompts} x {args.input_len}/{args.output_len}, {args.sampling} sampling")
    kind = "prompt" if args.prompt_steps else "decode"
    steps = cut_steps(events, args.prompt_steps)
    print(run_summary(events))
    print(report(steps, args.top, kind))
    if args.sequence:
        start, count = (int(v) for v in args.sequence.split(":"))
        print()
        print(sequence(steps, start, count))


if __name__ == "__main__":
    main()
