"""Where the engine process's host memory goes: resident memory (anonymous, file-backed) after each
stage of building a GPU engine, to see what the #6 footprint target (all processes <= 350 MB idle)
is up against.

    python bench/rss_stages.py --model qwen2.5-1.5b [--top 12] [--enforce-eager] [--max-num-seqs 256]

--top N lists, after the stages that add most, the N mappings holding most resident memory (a
library's file, or anonymous memory), so a stage's growth can be traced to what holds it.
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


def top_mappings(n: int, pid: int | str = "self") -> list[tuple[str, float]]:
    """The n largest holders of resident memory in /proc/<pid>/smaps, MB: a mapped file's name
    (all its mappings together), or "[anon]" for anonymous memory and the heap."""
    held: dict[str, float] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) > 5 else ""
            name = "[anon]" if not path or path in ("[heap]",) or path.startswith("[anon") else Path(path).name
        elif first == "Rss:":
            held[name] = held.get(name, 0.0) + int(line.split()[1]) / 1024
    return sorted(held.items(), key=lambda kv: -kv[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--top", type=int, default=0, help="list the N largest mappings after the main stages")
    ap.add_argument("--enforce-eager", action="store_true", help="build the LLM without CUDA graphs")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()
    rows = [("python + argparse", rss())]
    tops = []

    def snapshot(stage: str) -> None:
        rows.append((stage, rss()))
        if args.top:
            tops.append((stage, top_mappings(args.top)))
    import numpy  # noqa: F401

    rows.append(("numpy", rss()))
    from rvllm.engine.core import EngineCore  # noqa: F401  (the engine process imports this)

    rows.append(("rvllm.engine.core", rss()))
    import cupy as cp

    snapshot("import cupy")
    cp.zeros(1)
    snapshot("CUDA context + first CuPy kernel")
    from rvllm.backend.cuda import CudaBackend

    b = CudaBackend("bfloat16")
    x, w = b.dummy_weight((64, 256), 1.0, 1), b.dummy_weight((256, 256), 1.0, 2)
    b.linear(x, w)
    b.synchronize()
    snapshot("backend + cuBLAS GEMM")
    del b, x, w
    from rvllm import LLM, SamplingParams

    llm = LLM(args.model, load_format="dummy", device="cuda", skip_tokenizer_init=True, max_model_len=4096,
              max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager)
    gc.collect()
    snapshot("LLM built (weights, KV cache, kernels" + (")" if args.enforce_eager else ", graphs)"))
    llm.generate([list(range(100, 132))] * 4, SamplingParams(max_tokens=16, ignore_eos=True))
    gc.collect()
    snapshot("after a generate")
    from rvllm.engine.core_proc import trim_host_memory  # what the serving engine does once ready

    trim_host_memory()
    snapshot("after malloc_trim(0)")
    print(f"| stage ({args.model}) | RSS MB | anon | file | shmem |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['VmRSS']:.0f} | {r['RssAnon']:.0f} | {r['RssFile']:.0f} | {r.get('RssShmem', 0):.0f} |")
    for stage, top in tops:
        print(f"\nlargest holders after: {stage}")
        for name, mb in top:
            print(f"  {mb:8.1f} MB  {name}")


if __name__ == "__main__":
    main()
