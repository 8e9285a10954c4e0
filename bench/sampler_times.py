"""Device time of the GPU sampler's kernels on synthetic logits (needs a GPU).

Rows of two shapes: "flat" (normal, sd 1, as with dummy weights) and "lm" (normal, sd 2.5, with a
dozen tokens 15-30 above, as in a language model's row). For each shape and sampling setting, the
device time of GpuSampler.launch (its copies and kernels; CUDA events around --iters launches,
queued behind ~10 ms of other GPU work so that the host's packing is not timed). Rows carry request
ids, prompts and growing outputs, as in decode, so penalties run in their steady state. Penalties
edit the logits in place, so each call penalizes the same seen tokens again (a few hundred of a
row): that changes their values, not the work a call does.

    python bench/sampler_times.py [--rows 256] [--vocab 151936] [--iters 20]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import SAMPLING  # noqa: E402

SETTINGS = {
    "temperature 1.0": dict(temperature=1.0),
    "temperature 0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "temperature 0.7, top-k 20": dict(temperature=0.7, top_k=20),
    "Qwen2.5 chat: temperature 0.7, top-k 20, top-p 0.8, repetition 1.05": SAMPLING["qwen-chat"],
    "greedy": dict(temperature=0.0),
}
PROMPT_LEN = 128


def logits(kind: str, rows: int, vocab: int, rng) -> np.ndarray:
    if kind == "flat":
        return rng.normal(0, 1, size=(rows, vocab)).astype(np.float32)
    x = rng.normal(0, 2.5, size=(rows, vocab)).astype(np.float32)
    for r in range(rows):
        x[r, rng.choice(vocab, 12, replace=False)] = rng.uniform(15, 30, size=12)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    import cupy as cp

    from rvllm.backend.cuda import CudaBackend
    from rvllm.sampling.gpu_sampler import GpuSampler
    from rvllm.sampling.metadata import SamplingMetadata
    from rvllm.sampling_params import SamplingParams

    sampler = GpuSampler(CudaBackend("bfloat16"), seed=0, max_num_seqs=args.rows)
    rng = np.random.default_rng(0)
    busy = cp.ones(1 << 28, np.float32)  # 1 GiB: ~0.7 ms an in-place multiply on an H100
    print(f"| logits ({args.rows} x {args.vocab}, {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}) "
          f"| sampling | us a call |")
    print("|---|---|---|")
    for kind in ("flat", "lm"):
        x = cp.asarray(logits(kind, args.rows, args.vocab, rng))
        for label, sp in SETTINGS.items():
            params = SamplingParams(**sp)
            # Requests in decode: each call's outputs one token longer than the last call's (new
            # lists, the same prompts), so the penalty state is in its steady state (nothing uploaded).
            ids = [f"{kind}-{label}-{r}" for r in range(args.rows)]
            prompts = [rng.integers(0, args.vocab, PROMPT_LEN).tolist() for _ in range(args.rows)]
            metas = [SamplingMetadata.from_requests([(params, prompts[r], [0] * c, None) for r in range(args.rows)],
                                                    request_ids=ids) for c in range(args.iters + 1)]
            sampler.launch(x, metas[0]).result()  # warm-up: compiles, allocates, fills the slots
            start, end = cp.cuda.Event(), cp.cuda.Event()
            for _ in range(14):  # the host queues the launches while the GPU works through this
                busy *= 1.0
            start.record()
            for meta in metas[1:]:
                pending = sampler.launch(x, meta)
            end.record()
            pending.result()
            end.synchronize()
            print(f"| {kind} | {label} | {cp.cuda.get_elapsed_time(start, end) * 1e3 / args.iters:.1f} |")


if __name__ == "__main__":
    main()
