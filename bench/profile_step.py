"""cProfile of batch-1 decode (host side): where the per-step Python time goes.

    python bench/profile_step.py --model qwen2.5-1.5b --device cuda [--enforce-eager]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", device=args.device, max_model_len=4096, skip_tokenizer_init=True,
              num_gpu_blocks_override=512, max_num_seqs=8, enforce_eager=args.enforce_eager)
    prompt = list(range(100, 132))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate([prompt], params)
    prof.disable()
    wall = time.perf_counter() - t
    print(f"{args.output_len} tokens in {wall * 1000:.1f} ms under cProfile ({wall / args.output_len * 1000:.2f} ms/step)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
