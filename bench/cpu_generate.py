"""Load time and decode tokens/s of the default model (SmolLM2-135M-Instruct) on the CPU backend.

    python bench/cpu_generate.py [--batch 1 16] [--max-tokens 64] [--append-results]

Targets (issue 2, 2-core machine): load < 3 s, batch 1 >= 15 tok/s, batch 16 >= 150 tok/s.
Decode tok/s counts generated tokens after each request's first one, over the time between its
first and last token, summed over the batch (prefill excluded); total tok/s includes prefill.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    base = tok.encode("Write a short story about a robot who learns to paint. " * 8)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate([base[: args.prompt_len]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up

    rows = [("load (s)", f"{load_s:.2f}", "< 3")]
    targets = {1: 15, 16: 150}
    for b in args.batch:
        prompts = [base[i: i + args.prompt_len] for i in range(b)]  # distinct prompts: no prefix sharing
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = llm.engine.stats()
        decode_time = max(sum(r.inter_token) for r in stats.finished[-b:])
        decode_tokens = n_out - b
        rows.append((f"batch {b}: decode tok/s", f"{decode_tokens / decode_time:.1f}",
                     f">= {targets[b]}" if b in targets else ""))
        rows.append((f"batch {b}: total tok/s (incl. prefill)", f"{n_out / wall:.1f}", ""))
    table = "| metric | value | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {v} | {t} |" for a, v, t in rows)
    print(table)
    if args.append_results:
        append_results("CPU generate, SmolLM2-135M-Instruct Q4_1 (bench/cpu_generate.py)", table,
                       f"prompt {args.prompt_len} tokens, {args.max_tokens} output tokens, greedy, ignore_eos")


if __name__ == "__main__":
    main()
