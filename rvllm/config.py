"""EngineConfig: every engine and server setting, with vLLM's names, validated once."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEVICES = ("auto", "cuda", "cpu")


@dataclass
class EngineConfig:
    # model
    model: str | None = None  # HF directory, .gguf file, or a preset name with load_format="dummy"
    tokenizer: str | None = None  # defaults to the model's own
    skip_tokenizer_init: bool = False  # vLLM's name: token ids in, token ids out, no text
    dtype: str = "auto"
    load_format: str = "auto"
    max_model_len: int | None = None
    generation_config: str = "auto"  # "auto" (the model's generation_config.json), "vllm" (none), or a dir
    chat_template: str | None = None  # a file path or an inline template
    seed: int = 0
    # device and cache
    device: str = "auto"
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # CPU: KV cache size; None = enough for max_num_seqs full contexts, capped
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    # Launch step N+1 before reading step N's tokens (vLLM's --async-scheduling). None: on for CUDA.
    async_scheduling: bool | None = None
    # scheduler
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    max_logprobs: int = 20
    # server
    served_model_name: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queued_requests: int | None = None
    enable_log_requests: bool = False
    log_level: str = "info"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def check(ok, name, allowed):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        check(self.dtype in DTYPES, "dtype", f"one of {', '.join(DTYPES)}")
        check(self.load_format in LOAD_FORMATS, "load_format", f"one of {', '.join(LOAD_FORMATS)}")
        check(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}")
        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "a power of two from 1 to 128")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "in (0, 1]")
        check(self.max_num_seqs >= 1, "max_num_seqs", ">= 1")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens", ">= 1")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
              "num_gpu_blocks_override", ">= 1")
        check(self.max_logprobs >= 0, "max_logprobs", ">= 0")
        check(self.max_queued_requests is None or self.max_queued_requests >= 0, "max_queued_requests", ">= 0")
        if self.api_key is None:
            self.api_key = os.environ.get("RVLLM_API_KEY") or None
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def model_name(self) -> str:
        """The name clients use: the first --served-model-name, else the model path or preset."""
        if self.served_model_name:
            return self.served_model_name[0]
        return self.model or "SmolLM2-135M-Instruct"
