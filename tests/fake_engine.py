"""A stand-in for AsyncEngineClient with the same interface, for server tests that need no model.

Byte-level "tokenizer" (token id = byte value) and a scripted generator: choice i of a request
emits the bytes of `reply` (default "hello world") one token per step, so tests know exactly
which text, token ids and logprobs to expect.
"""
from __future__ import annotations

import asyncio

from rvllm.config import EngineConfig
from rvllm.engine.messages import EngineStats, FinishedRecord
from rvllm.outputs import CompletionOutput, Logprob, RequestOutput


class ByteTokenizer:
    vocab_size = 256
    eos_token_id = 0
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, chat_template=None,
                            continue_final_message=False, tools=None):
        if chat_template == "broken":
            raise RuntimeError("template error")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def lp_dict(tok: int, k: int) -> dict[int, Logprob]:
    """The chosen token at logprob -0.5 (rank 1), plus k alternatives at -1, -2, ..."""
    out = {tok: Logprob(-0.5, 1, chr(tok))}
    for r in range(k):
        alt = 65 + r if 65 + r != tok else 90
        out.setdefault(alt, Logprob(-1.0 - r, r + 2, chr(alt)))
    return out


class FakeEngineClient:
    def __init__(self, reply: str = "hello world", delay: float = 0.0, fail_after: int | None = None,
                 fail_with: Exception | None = None, **config):
        config.setdefault("served_model_name", ["fake-model"])
        self.config = EngineConfig(model="fake-model", **config)
        self.tokenizer = ByteTokenizer()
        self.max_model_len = 64
        self.generation_defaults = {}
        self.reply, self.delay, self.fail_after = reply, delay, fail_after
        self.fail_with = fail_with or RuntimeError("engine exploded")
        self.requests: dict[str, tuple[list[int], object]] = {}
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished: list[FinishedRecord] = []
        self._dead = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, params, prompt=None):
        if len(prompt_token_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise ValueError("too long")
        self.requests[request_id] = (list(prompt_token_ids), params)
        self.running.add(request_id)
        self.prompt_tokens_total += len(prompt_token_ids)
        text = self.reply.encode()[: params.max_tokens]
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [lp_dict(t, params.prompt_logprobs) for t in prompt_token_ids[1:]]
        try:
            for step, tok in enumerate(text):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail_after is not None and step == self.fail_after:
                    raise self.fail_with
                last = step == len(text) - 1
                reason = ("length" if len(text) == params.max_tokens else "stop") if last else None
                outs = [CompletionOutput(i, chr(tok), [tok], None,
                                         [lp_dict(tok, params.logprobs)] if params.logprobs is not None else None,
                                         reason, None) for i in range(params.n)]
                self.generation_tokens_total += params.n
                yield RequestOutput(request_id, prompt, prompt_token_ids, outs, last,
                                    prompt_lps if step == 0 else None)
            self.finished.append(FinishedRecord("stop", 0.01, 0.02, [0.03] * (len(text) - 1), 0.1,
                                                len(prompt_token_ids), len(text) * params.n))
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def num_waiting(self):
        return self.waiting

    async def get_stats(self):
        records, self.finished = self.finished, []
        return EngineStats(num_running=len(self.running), num_waiting=self.waiting,
                           kv_cache_usage=0.1 * len(self.running), prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total, finished=records)

    @property
    def is_healthy(self):
        return not self._dead.is_set()

    async def wait_dead(self):
        await self._dead.wait()

    async def shutdown(self):
        pass
