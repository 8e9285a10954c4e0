"""Serving load generator shaped like `vllm bench serve` (random dataset), against any
OpenAI-compatible server (rvllm serve, vllm serve, llama.cpp's server):

    python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 64 \
        --random-input-len 128 --random-output-len 64 [--request-rate 4 | --max-concurrency 8] [--append-results]

Prompts are random token ids (sent as token-id prompts to /v1/completions, so no tokenizer is needed
here and every server sees the same input lengths); --ignore-eos (default on) makes output lengths exact.
Requests stream; TTFT is the time to the first text chunk, ITL the gaps between chunks, TPOT
(e2e - ttft) / (output tokens - 1) per request, as vLLM's benchmark computes them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import append_results  # noqa: E402


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


async def one_request(session, url, model, prompt_ids, output_len, args) -> Result:
    body = {"model": model, "prompt": prompt_ids, "max_tokens": output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    res = Result(prompt_len=len(prompt_ids))
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"].get("message"))
                    return res
                if data.get("usage"):
                    res.output_tokens = data["usage"]["completion_tokens"]
                if data.get("choices"):  # as vLLM's benchmark: any choice chunk is a token arrival
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = repr(e)
    return res


async def run(args) -> tuple[list[Result], float]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        model = args.model
        if model is None:
            async with session.get(args.base_url + "/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
        rng = random.Random(args.seed)
        lo, hi = args.token_id_range
        prompts = [[rng.randrange(lo, hi) for _ in range(args.random_input_len)] for _ in range(args.num_prompts)]
        url = args.base_url + "/v1/completions"
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(p):
            if sem is None:
                return await one_request(session, url, model, p, args.random_output_len, args)
            async with sem:
                return await one_request(session, url, model, p, args.random_output_len, args)

        if args.warmup:
            await one_request(session, url, model, prompts[0][:8], 2, args)
        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def report(results: list[Result], duration: float, args) -> str:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    ttft = ms([r.ttft for r in ok])
    tpot = ms([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    itl = ms([x for r in ok for x in r.itl])
    e2e = ms([r.e2e for r in ok])
    rows = [("Successful requests", f"{len(ok)} / {len(results)}"),
            ("Benchmark duration (s)", f"{duration:.2f}"),
            ("Total input tokens", in_tokens), ("Total generated tokens", out_tokens),
            ("Request throughput (req/s)", f"{len(ok) / duration:.2f}"),
            ("Output token throughput (tok/s)", f"{out_tokens / duration:.2f}"),
            ("Total token throughput (tok/s)", f"{(in_tokens + out_tokens) / duration:.2f}")]
    for name, xs in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl), ("E2E", e2e)):
        rows += [(f"Mean {name} (ms)", f"{mean(xs):.2f}"), (f"Median {name} (ms)", f"{percentile(xs, 50):.2f}"),
                 (f"P99 {name} (ms)", f"{percentile(xs, 99):.2f}")]
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        table += "\n\nErrors: " + "; ".join(errors[:5])
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model name to request (default: the server's first /v1/models entry)")
    ap.add_argument("--api-key")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--random-input-len", type=int, default=128)
    ap.add_argument("--random-output-len", type=int, default=64)
    ap.add_argument("--token-id-range", type=int, nargs=2, default=[1000, 10000], metavar=("LOW", "HIGH"),
                    help="random prompt token ids come from [LOW, HIGH): ordinary tokens in any >=10k vocabulary")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: all at once)")
    ap.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="rvllm", help="what was measured (server name), for RESULTS.md")
    ap.add_argument("--append-results", action="store_true")
    args = ap.parse_args()
    results, duration = asyncio.run(run(args))
    table = report(results, duration, args)
    print(table)
    if args.append_results:
        rate = "inf" if args.request_rate == float("inf") else args.request_rate
        append_results(f"serve: {args.label}, {args.num_prompts} prompts, in {args.random_input_len} / out "
                       f"{args.random_output_len}, rate {rate}, max concurrency {args.max_concurrency or '-'}", table)
    return 0 if any(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
