"""Where the engine process's host memory goes: resident memory (anonymous, file-backed) after each
stage of building a GPU engine, to see what the #6 footprint target (all processes <= 350 MB idle)
is up against.

    python bench/rss_stages.py --model qwen2.5-1.5b
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss() -> dict[str, float]:
    """VmRSS and its anonymous / file / shared-memory parts, MB (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1]) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    args = ap.parse_args()
    rows = [("python + argparse", rss())]
    import numpy  # noqa: F401

    rows.append(("numpy", rss()))
    from rvllm.engine.core import EngineCore  # noqa: F401  (the engine process imports this)

    rows.append(("rvllm.engine.core", rss()))
    import cupy as cp

    rows.append(("import cupy", rss()))
    cp.zeros(1)
    rows.append(("CUDA context + first CuPy kernel", rss()))
    from rvllm.backend.cuda import CudaBackend

    b = CudaBackend("bfloat16")
    x, w = b.dummy_weight((64, 256), 1.0, 1), b.dummy_weight((256, 256), 1.0, 2)
    b.linear(x, w)
    b.synchronize()
    rows.append(("backend + cuBLAS GEMM", rss()))
    del b, x, w
    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", device="cuda", skip_tokenizer_init=True, max_model_len=4096,
              max_num_seqs=256)
    gc.collect()
    rows.append(("LLM built (weights, KV cache, kernels, graphs)", rss()))
    llm.generate([list(range(100, 132))] * 4, SamplingParams(max_tokens=16, ignore_eos=True))
    gc.collect()
    rows.append(("after a generate", rss()))
    print(f"| stage ({args.model}) | RSS MB | anon | file | shmem |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['VmRSS']:.0f} | {r['RssAnon']:.0f} | {r['RssFile']:.0f} | {r.get('RssShmem', 0):.0f} |")


if __name__ == "__main__":
    main()
