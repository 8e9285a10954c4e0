"""Offline throughput, shaped like `vllm bench throughput`: N random prompts of --input-len tokens,
--output-len tokens each (ignore_eos), all submitted at once; prints output tokens/s.

    python bench/throughput.py --model qwen2.5-1.5b --load-format dummy --num-prompts 256 \
        --input-len 128 --output-len 128 [--device cuda] [--sampling qwen-chat] [--runs 5] [--append-results]

--runs N times N runs in one process, each on fresh prompts (the same prompts again would hit the
prefix cache), and reports the median run: a single half-second run on a shared machine moves by a
few percent from run to run, more than many changes it is asked to judge.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import SAMPLING, add_engine_args, add_sampling_arg, append_results, profile_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    add_engine_args(ap, input_len=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the engine's default when unset")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=1, help="timed runs on fresh prompts; the median is reported")
    add_sampling_arg(ap, "plain")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    from rvllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              async_scheduling=args.async_scheduling,
              skip_tokenizer_init=True)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    vocab = llm.engine.spec.vocab_size
    new_prompts = lambda: [rng.integers(100, min(vocab, 30000), args.input_len).tolist()  # noqa: E731
                           for _ in range(args.num_prompts)]
    params = SamplingParams(**SAMPLING[args.sampling], max_tokens=args.output_len, ignore_eos=True)
    llm.generate(new_prompts()[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    runs = []  # (wall s, output tokens)
    for _ in range(args.runs):
        prompts = new_prompts()
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        runs.append((time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)))
    wall, n_out = sorted(runs, key=lambda r: r[1] / r[0])[len(runs) // 2]  # the median run (upper, if even)
    n_in = args.num_prompts * args.input_len
    mode = "eager" if args.enforce_eager or llm.engine.backend.name == "cpu" else "graphs"
    mode += ", async" if llm.engine.async_scheduling else ", in-order"
    if args.sampling != "plain":
        mode += f", {args.sampling} sampling"
    table = ("| model | device | mode | prompts | in/out | load s | wall s | req/s | output tok/s | total tok/s |\n"
             "|---|---|---|---|---|---|---|---|---|---|\n"
             f"| {args.model} | {llm.engine.backend.name} | {mode} | {args.num_prompts} | {args.input_len}/{args.output_len} | "
             f"{load_s:.1f} | {wall:.2f} | {args.num_prompts / wall:.2f} | {n_out / wall:.0f} | "
             f"{(n_in + n_out) / wall:.0f} |")
    if args.runs > 1:
        table += "\n\nruns, output tok/s: " + " / ".join(f"{n / w:.0f}" for w, n in runs)
    if args.profile:  # fresh prompts: the timed run's would all hit the prefix cache
        fresh = new_prompts()
        table += "\n\n" + profile_table(llm, lambda: llm.generate(fresh, params))
    print(table)
    if args.append_results:
        append_results(f"Throughput {args.model} (bench/throughput.py)", table)


if __name__ == "__main__":
    main()
