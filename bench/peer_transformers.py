"""The peer: HF transformers on the same model shapes with random weights (GPU machine only; PyTorch
is a reference tool there, never an rvllm dependency).

    python bench/peer_transformers.py --model qwen2.5-1.5b --num-prompts 256 --input-len 128 --output-len 128

Prints continuous batching (`generate_batch`, paged attention) output tok/s for N prompts at once,
and static-cache `generate` batch-1 decode tok/s. Run it in the same device call as
bench/throughput.py and bench/latency.py so the numbers compare.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rvllm.model.config import PRESETS  # noqa: E402

_ARCH_TO_TYPE = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral",
                 "Qwen3ForCausalLM": "qwen3"}


def build_model(name: str, attn: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(PRESETS[name])
    arch = cfg.pop("architectures")[0]
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(_ARCH_TO_TYPE[arch], **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    return model.cuda().eval()


def continuous(name: str, n: int, input_len: int, output_len: int) -> tuple[str, float]:
    import torch
    from transformers.generation import GenerationConfig

    last_error = None
    for attn in ("paged|sdpa", "sdpa_paged"):
        try:
            model = build_model(name, attn)
        except Exception as e:  # the attention name changed across transformers releases
            last_error = e
            continue
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, 30000, (n, input_len), generator=gen).tolist()
        config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        model.generate_batch(inputs=prompts[:4], generation_config=config, progress_bar=False)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        tokens = sum(len(o.generated_tokens) for o in out.values())
        del model
        torch.cuda.empty_cache()
        return attn, tokens / wall
    raise SystemExit(f"generate_batch could not build the model: {last_error}")


def static_batch1(name: str, input_len: int, output_len: int) -> float:
    import torch

    model = build_model(name, "sdpa")
    ids = torch.randint(100, 30000, (1, input_len), device="cuda")
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, cache_implementation="static",
              pad_token_id=0)
    model.generate(ids, **kw)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return output_len / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(PRESETS))
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--compile", action="store_true",
                    help="let transformers torch.compile (inductor); its first use took over 240 s on an H100")
    args = ap.parse_args()
    if not args.compile:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported: torch.compile becomes a no-op
    import transformers

    attn, cb = continuous(args.model, args.num_prompts, args.input_len, args.output_len)
    b1 = static_batch1(args.model, 32, args.output_len)
    mode = "torch.compile" if args.compile else "eager, TORCHDYNAMO_DISABLE=1"
    print(f"| peer | model | workload | output tok/s |\n|---|---|---|---|\n"
          f"| transformers {transformers.__version__} generate_batch ({attn}, {mode}) | {args.model} | "
          f"{args.num_prompts} x {args.input_len}/{args.output_len} | {cb:.0f} |\n"
          f"| transformers {transformers.__version__} generate, static cache, batch 1 (incl. prefill) | "
          f"{args.model} | 32/{args.output_len} | {b1:.1f} |")


if __name__ == "__main__":
    main()
