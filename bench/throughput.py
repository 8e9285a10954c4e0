"""Offline throughput, shaped like `vllm bench throughput`: N random prompts of --input-len tokens,
--output-len tokens each (ignore_eos), all submitted at once; prints output tokens/s.

    python bench/throughput.py --model qwen2.5-1.5b --load-format dummy --num-prompts 256 \
        --input-len 128 --output-len 128 [--device cuda] [--sampling qwen-chat] [--append-results]
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
    add_sampling_arg(ap, "plain")
    args = ap.parse_args()

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
    prompts = [rng.integers(100, min(vocab, 30000), args.input_len).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(**SAMPLING[args.sampling], max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
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
    if args.profile:  # fresh prompts: the timed run's would all hit the prefix cache
        fresh = [rng.integers(100, min(vocab, 30000), args.input_len).tolist() for _ in range(args.num_prompts)]
        table += "\n\n" + profile_table(llm, lambda: llm.generate(fresh, params))
    print(table)
    if args.append_results:
        append_results(f"Throughput {args.model} (bench/throughput.py)", table)


if __name__ == "__main__":
    main()
