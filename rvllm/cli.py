"""`rvllm serve | generate | chat | pull` with vLLM's flag names."""
from __future__ import annotations

import argparse
import logging
import sys

from rvllm import __version__
from rvllm.config import DEVICES, DTYPES, LOAD_FORMATS, EngineConfig


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory, .gguf file, or preset name with --load-format dummy "
                                   "(default: SmolLM2-135M-Instruct, pulled on first use)")
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf file (default: the model's)")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=int)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on with CUDA)")
    p.add_argument("--generation-config", default="auto",
                   help="'auto' (the model's generation_config.json), 'vllm' (none), or a directory")
    p.add_argument("--chat-template", help="a chat template file or inline template")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


_ENGINE_FLAGS = ("model", "tokenizer", "dtype", "load_format", "max_model_len", "device", "seed", "block_size",
                 "gpu_memory_utilization", "num_gpu_blocks_override", "enable_prefix_caching", "max_num_seqs",
                 "max_num_batched_tokens", "enforce_eager", "async_scheduling", "generation_config", "chat_template", "log_level")
_SERVE_FLAGS = ("host", "port", "api_key", "served_model_name", "max_logprobs", "max_queued_requests",
                "enable_log_requests")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rvllm", description="LLM inference engine and OpenAI-compatible server")
    parser.add_argument("--version", action="version", version=f"rvllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model_tag", nargs="?", metavar="MODEL", help="same as --model")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this key (Authorization: Bearer) on /v1/*; or RVLLM_API_KEY")
    serve.add_argument("--served-model-name", nargs="+")
    serve.add_argument("--max-logprobs", type=int, default=20)
    serve.add_argument("--max-queued-requests", type=int, help="503 when this many requests are waiting")
    serve.add_argument("--enable-log-requests", action="store_true")

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    gen.add_argument("prompt")
    _add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)

    chat = sub.add_parser("chat", help="interactive chat on a terminal (/exit to leave)")
    _add_engine_args(chat)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--system", help="a system prompt")

    sub.add_parser("pull", help="download the default model (SmolLM2-135M-Instruct GGUF) into the cache")
    return parser


def config_from_args(args, names) -> EngineConfig:
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    if getattr(args, "model_tag", None) and not kw.get("model"):
        kw["model"] = args.model_tag
    return EngineConfig(**kw)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging(getattr(args, "log_level", "info"))
    from rvllm.errors import RvllmError

    try:
        if args.command == "pull":
            from rvllm.model.pull import pull

            print(pull())
            return 0
        if args.command == "serve":
            from rvllm.server.app import serve

            return serve(config_from_args(args, _ENGINE_FLAGS + _SERVE_FLAGS))
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            from rvllm.chat_repl import run_chat

            return run_chat(config_from_args(args, _ENGINE_FLAGS), args)
    except (RvllmError, ValueError, OSError) as e:
        print(f"rvllm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _generate(args) -> int:
    from rvllm import SamplingParams
    from rvllm.llm import LLM

    config = config_from_args(args, _ENGINE_FLAGS)
    llm = LLM(**{k: v for k, v in vars(config).items() if k != "extra"})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    out = llm.generate(args.prompt, params)[0]
    print(out.outputs[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
