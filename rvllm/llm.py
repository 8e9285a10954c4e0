"""LLM: the offline API (generate, chat) over an in-process EngineCore, shaped like vLLM's."""
from __future__ import annotations

import gc
import itertools
import logging
from typing import Sequence

from rvllm.config import EngineConfig
from rvllm.engine.core import EngineCore
from rvllm.engine.output_processor import OutputProcessor
from rvllm.outputs import RequestOutput
from rvllm.sampling_params import SamplingParams
from rvllm.tokenizer_loader import load_tokenizer

log = logging.getLogger("rvllm")


class LLM:
    """`LLM(model=None, dtype="auto", device="auto", max_model_len=None, load_format="auto", seed=0, ...)`.

    Every EngineConfig field is a keyword with vLLM's name (enable_prefix_caching, max_num_seqs,
    max_num_batched_tokens, block_size, num_gpu_blocks_override, ...). model=None is the default
    model (SmolLM2-135M-Instruct), pulled on first use.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = None if self.config.skip_tokenizer_init else load_tokenizer(
            self.engine.source, self.config.tokenizer, self.config.chat_template)
        self.generation_defaults = dict(self.engine.source.generation_config)
        self._counter = itertools.count()
        # What loading built lives as long as the engine: keep it out of every later full collection
        # (each took 12-14 ms, about every 130 steps at 256 decode rows: bench/host_step.py). The
        # collection thresholds stay the caller's; `rvllm serve`'s engine process also raises them
        # (engine/core_proc.quiet_gc).
        gc.collect()
        gc.freeze()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token ids, or a list of token id lists."""
        items = _normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(items)} prompts")
        requests = []
        for (text, ids), params in zip(items, params_list):
            if ids is None and self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this LLM was made with skip_tokenizer_init=True")
            if ids is None:
                ids = self.tokenizer.encode(text)
            requests.append((text, ids, params.with_generation_defaults(self.generation_defaults)))
        return self._run(requests)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools=None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
            continue_final_message=continue_final_message, tools=tools) for conv in conversations]
        # The template already carries BOS where the model wants it.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate([{"prompt": p, "prompt_token_ids": i} for p, i in zip(prompts, ids)], sampling_params)
        return outs

    def _run(self, requests) -> list[RequestOutput]:
        proc = OutputProcessor(self.tokenizer)
        order = []
        engine = self.engine
        try:
            for text, ids, params in requests:
                rid = str(next(self._counter))
                for cid, cparams in proc.add_request(rid, text, ids, params):
                    engine.add_request(cid, ids, cparams)
                order.append(rid)
            while engine.has_unfinished_requests():
                _changed, to_abort = proc.process(engine.step())
                for cid in to_abort:
                    engine.finish_by_stop_string(cid)
        except BaseException:
            engine.abort_requests([c for rid in order for c in proc.child_ids(rid)])
            raise
        return [proc.make_output(rid, delta=False) for rid in order]


def _normalize_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    if isinstance(prompts, str):
        return [(prompts, None)]
    if isinstance(prompts, dict):
        prompts = [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [(None, list(prompts))]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, None))
        elif isinstance(p, dict):
            out.append((p.get("prompt"), p.get("prompt_token_ids")))
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append((None, list(p)))
        else:
            raise TypeError("prompts must be a str, a list of str, token ids, or a list of token id lists")
    return out
