"""Batch-1 decode speed: one prompt of --input-len tokens, --output-len tokens (ignore_eos; greedy unless
--sampling says otherwise).
Prints decode tok/s (after the first token) and the per-step engine time.

    python bench/latency.py --model qwen2.5-1.5b --load-format dummy [--device cuda] [--sampling qwen-chat]
        [--append-results]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SAMPLING, add_engine_args, add_sampling_arg, append_results, profile_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    add_engine_args(ap, input_len=32)
    ap.add_argument("--iters", type=int, default=3)
    add_sampling_arg(ap, "greedy")
    args = ap.parse_args()

    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, device=args.device, max_model_len=4096,
              skip_tokenizer_init=True, num_gpu_blocks_override=512, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling,
              max_num_seqs=8)
    prompt = list(range(100, 100 + args.input_len))
    params = SamplingParams(**SAMPLING[args.sampling], max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(args.iters):
        t = time.perf_counter()
        llm.generate([prompt], params)
        wall = time.perf_counter() - t
        rec = llm.engine.stats().finished[-1]
        rates.append(((args.output_len - 1) / sum(rec.inter_token), wall, rec.ttft))
    best = max(rates)
    mode = "eager" if args.enforce_eager or llm.engine.backend.name == "cpu" else "graphs"
    mode += ", async" if llm.engine.async_scheduling else ", in-order"
    if args.sampling != "greedy":
        mode += f", {args.sampling} sampling"
    table = ("| model | device | mode | in/out | decode tok/s (best of %d) | ms/token | TTFT ms | e2e s |\n"
             "|---|---|---|---|---|---|---|---|\n" % args.iters +
             f"| {args.model} | {llm.engine.backend.name} | {mode} | {args.input_len}/{args.output_len} | {best[0]:.1f} | "
             f"{1000 / best[0]:.2f} | {best[2] * 1000:.1f} | {best[1]:.2f} |")
    if args.profile:
        table += "\n\n" + profile_table(llm, lambda: llm.generate([prompt], params))
    print(table)
    if args.append_results:
        append_results(f"Batch-1 latency {args.model} (bench/latency.py)", table)


if __name__ == "__main__":
    main()
