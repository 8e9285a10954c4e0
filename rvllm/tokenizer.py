"""Tokenizer: HF `tokenizers` + jinja2 chat templates (HF semantics) + incremental detokenization."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rvllm.errors import ModelLoadError

NO_TEMPLATE = "this model has no chat template; pass one with --chat-template"


def _content(tok) -> str | None:
    """tokenizer_config writes special tokens as strings or as {"content": ...} dicts."""
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, hf: tokenizers.Tokenizer, config: dict | None = None):
        self.hf = hf
        self.config = dict(config or {})
        self.bos_token = _content(self.config.get("bos_token"))
        self.eos_token = _content(self.config.get("eos_token"))
        self.bos_token_id = hf.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = hf.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.chat_template = self.config.get("chat_template")  # str, [{"name", "template"}] or None
        special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tid = hf.token_to_id(_content(self.config.get(key)) or "")
            if tid is not None:
                special.add(tid)
        self.all_special_ids = sorted(special)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_file, cfg_file = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{tok_file}: not found (rvllm needs a fast tokenizer's tokenizer.json)")
        try:
            hf = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises bare Exception on bad JSON
            raise ModelLoadError(f"{tok_file}: cannot load ({e})") from None
        config = {}
        try:
            if cfg_file.is_file():
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            # Newer transformers save the template beside the config instead of inside it.
            if not config.get("chat_template") and (path / "chat_template.jinja").is_file():
                config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
            elif not config.get("chat_template") and (path / "chat_template.json").is_file():
                config["chat_template"] = json.loads((path / "chat_template.json").read_text())["chat_template"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path}: cannot read the tokenizer config ({e})") from None
        return cls(hf, config)

    @classmethod
    def from_gguf(cls, model) -> "Tokenizer":
        """From a rvllm.model.gguf_loader.GGUFModel."""
        return cls(tokenizers.Tokenizer.from_str(model.tokenizer_json), model.tokenizer_config)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self.hf.id_to_token(i) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer.json post-processor adds what it adds (as in HF); on top, BOS is prepended when
        tokenizer_config says add_bos_token, and a BOS the text already starts with is not doubled."""
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and bos is not None:
            if ids[:2] == [bos, bos] and text.startswith(self.bos_token):
                ids = ids[1:]
            elif self.add_bos_token and ids[:1] != [bos]:
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _template_source(self, chat_template: str | None, tools) -> str:
        named = self.chat_template if isinstance(self.chat_template, list) else None
        table = {t["name"]: t["template"] for t in named or ()}
        if chat_template is not None:
            return table.get(chat_template, chat_template)  # a template name or the template itself
        if named is None:
            if not self.chat_template:
                raise ValueError(NO_TEMPLATE)
            return self.chat_template
        if tools and "tool_use" in table:
            return table["tool_use"]
        if "default" in table:
            return table["default"]
        raise ValueError(f"this model has named chat templates ({', '.join(table)}) but none is 'default'; "
                         f"pass one with --chat-template")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            tools: list[dict] | None = None, **kwargs) -> str:
        """Render messages the way transformers' apply_chat_template(tokenize=False) does."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: "
                             "the first continues the last message, the second starts a new one")
        template = _compile(self._template_source(chat_template, tools))
        messages = [_flatten_content(m) for m in messages]
        try:
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=tools, bos_token=self.bos_token or "",
                                   eos_token=self.eos_token or "", **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e.message or e}") from None
        except Exception as e:  # the template's own logic failed (e.g. str + None)
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from None
        if continue_final_message:
            text = _cut_after_final_message(text, messages)
        return text


def _flatten_content(message: dict) -> dict:
    """OpenAI content parts -> one string (text parts joined by newlines, as vLLM does)."""
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"message content part of type {kind!r} is not supported (only 'text')")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _cut_after_final_message(text: str, messages: list[dict]) -> str:
    """HF semantics: drop whatever the template put after the last message's content (end-of-turn)."""
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or final.strip() not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the "
                         "rendered chat; this template cannot continue a message")
    loc = text.rindex(final.strip())
    if text[loc : loc + len(final.lstrip())] == final:  # template kept the trailing whitespace
        return text[: loc + len(final.lstrip())]
    return text[: loc + len(final.strip())]


class _GenerationTag(Extension):
    """HF templates may wrap assistant turns in {% generation %} (for training masks); render the body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # HF's override: jinja's own tojson HTML-escapes, which would corrupt prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Sandboxed: chat templates come from downloaded models and from requests (--chat-template).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template syntax error on line {e.lineno}: {e.message}") from None


class IncrementalDetokenizer:
    """Turns streamed token ids into text deltas at O(window) cost per step (vLLM's offsets technique).

    Text is decoded over ids[prefix_offset:]; what it decodes to up to read_offset was emitted at an
    earlier step. The window keeps a few tokens of left context because decoders (SentencePiece's
    leading-space strip) depend on where decoding starts. Trailing U+FFFD is an incomplete UTF-8
    character: held back until completed. The window slides to the newest token boundary that is
    also a character boundary, so it stays a few tokens long even through long emoji runs.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int] = (),
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only HF's slow (Python) tokenizers insert those spaces; `tokenizers` decoding never does, so
        # the flag is kept for vLLM's SamplingParams compatibility and has nothing to change here.
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self._prefix_len = len(self._decode(self.prefix_offset, self.read_offset))  # chars before read_offset
        self._sent = self._prefix_len  # chars of the window's text already emitted
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip_special_tokens)

    @property
    def output_token_ids(self) -> list[int]:
        return self.ids[self.num_prompt_tokens :]

    def add(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text they complete (possibly "")."""
        self.ids.extend(new_token_ids)
        window = self._decode(self.prefix_offset)
        # Text before a trailing run of U+FFFD cannot change with later bytes (UTF-8 self-synchronizes).
        stable = window.rstrip("\ufffd")
        delta = stable[self._sent :]
        self._sent = max(self._sent, len(stable))
        self._slide(len(self.ids) if len(stable) == len(window) else self._last_boundary())
        self.text += delta
        return delta

    def _last_boundary(self) -> int | None:
        """The newest k > read_offset where decoding stops on a whole character. An incomplete tail is
        at most 3 bytes, so it begins in one of the last 3 tokens: looking back 4 is enough."""
        for k in range(len(self.ids) - 1, max(self.read_offset, len(self.ids) - 5), -1):
            if not self._decode(self.prefix_offset, k).endswith("\ufffd"):
                return k
        return None

    def _slide(self, k: int | None) -> None:
        if k is None or k <= self.read_offset:
            return
        head = self._decode(self.read_offset, k)
        if head:  # the window now starts at the old read offset
            self._sent -= self._prefix_len
            self.prefix_offset, self._prefix_len = self.read_offset, len(head)
        else:  # keep the old left context when the new one decodes to nothing (all special tokens)
            self._prefix_len = len(self._decode(self.prefix_offset, k))
        self.read_offset = k

    def flush(self) -> str:
        """At the end of a request: emit held-back bytes too (as U+FFFD, as a full decode shows them)."""
        window = self._decode(self.prefix_offset)
        delta = window[self._sent :]
        self._sent = len(window)
        self.text += delta
        return delta
