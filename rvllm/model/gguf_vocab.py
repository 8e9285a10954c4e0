"""GGUF tokenizer.ggml.* metadata -> an HF `tokenizers` JSON, tokenizer_config and generation_config.

GGUF keeps the vocabulary, merges and token types but names the pre-tokenizer only by a hash
label (`tokenizer.ggml.pre`); the split rules for each label are the ones llama.cpp's
llama-vocab.cpp uses, written the way the original HF tokenizer.json writes them.
"""
from __future__ import annotations

import json
from pathlib import Path

from rvllm.errors import ModelLoadError
from rvllm.model.config import ModelSpec

CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # tokenizer.ggml.token_type values

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}


# StarCoder-derived vocabularies (SmolLM2 among them) split every digit alone, then apply GPT-2's regex.
_DIGITS_THEN_GPT2 = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt2", "mpt", "olmo", "jais"), _BYTE_LEVEL),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "dbrx", "smaug-bpe", "falcon3"), _split_then_bytes(_LLAMA3_RE)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), _split_then_bytes(_QWEN2_RE)),
}


def _added(tokens: list[str], types) -> list[dict]:
    return [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": int(t) == CONTROL}
            for i, t in enumerate(types) if int(t) in (CONTROL, USER_DEFINED)]


def _bpe_model(vocab: dict, merges: list, **kw) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges, **kw}


def _gpt2_json(path: Path, meta: dict, tokens: list[str], types) -> dict:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(f"{path}: tokenizer pre-tokenizer {pre!r} is not supported; "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError(f"{path}: BPE tokenizer without tokenizer.ggml.merges")
    return {"normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre],
            "post_processor": {**_BYTE_LEVEL, "trim_offsets": False}, "decoder": _BYTE_LEVEL,
            # Llama 3's tokenizer.json sets ignore_merges: whole-word vocabulary hits skip merging.
            "model": _bpe_model({t: i for i, t in enumerate(tokens)}, list(merges),
                                ignore_merges=pre in ("llama-bpe", "llama3"))}


def _spm_merges(tokens: list[str], scores, types) -> list[str]:
    """SentencePiece BPE keeps scores, not merges: rebuild them like transformers' SentencePieceExtractor
    (every split of a piece into two vocabulary pieces, ranked by the merged piece's score)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for tok, score, t in zip(tokens, scores, types):
        if int(t) != NORMAL:
            continue
        pairs = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((-float(score), f"{a} {b}") for a, b in pairs)
    ranked.sort(key=lambda r: r[0])  # stable: ties keep the id order above
    return [m for _, m in ranked]


def _spm_json(path: Path, meta: dict, tokens: list[str], types) -> dict:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelLoadError(f"{path}: SentencePiece tokenizer without tokenizer.ggml.scores")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]} \
        if prefix else replace
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return {"normalizer": normalizer, "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": _bpe_model({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores, types),
                                unk_token=tokens[unk] if unk is not None else None,
                                fuse_unk=True, byte_fallback=True)}


def tokenizer_files(path: Path, meta: dict, spec: ModelSpec) -> tuple[str, dict, dict]:
    """-> (tokenizer.json text, tokenizer_config dict, generation_config dict)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ModelLoadError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens)")
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else types
    if kind == "gpt2":
        body = _gpt2_json(path, meta, tokens, types)
    elif kind == "llama":
        body = _spm_json(path, meta, tokens, types)
    else:
        raise ModelLoadError(f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama)")
    tok_json = json.dumps({"version": "1.0", "truncation": None, "padding": None,
                           "added_tokens": _added(tokens, types), **body}, ensure_ascii=False)

    def token(key: str):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    cfg = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
           "pad_token": token("padding"),
           # llama.cpp's defaults when the key is absent: SentencePiece adds BOS, GPT-2 BPE does not.
           "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
           "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    named = {k.rsplit(".", 1)[1]: v for k, v in meta.items() if k.startswith("tokenizer.chat_template.")}
    template = meta.get("tokenizer.chat_template")
    if named:
        cfg["chat_template"] = ([{"name": "default", "template": template}] if template else []) + \
            [{"name": k, "template": v} for k, v in named.items()]
    elif template:
        cfg["chat_template"] = template
    eos = list(spec.eos_token_ids)
    gen = {"bos_token_id": spec.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    return tok_json, cfg, gen
