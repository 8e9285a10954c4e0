"""Which tokenizer a model uses: its own directory's, its GGUF's, or (dummy presets) SmolLM2's."""
from __future__ import annotations

import logging
from pathlib import Path

from rvllm.errors import ModelLoadError
from rvllm.tokenizer import Tokenizer

log = logging.getLogger("rvllm")


def load_tokenizer(source, tokenizer: str | None = None, chat_template: str | None = None) -> Tokenizer:
    """source: a loader.ModelSource. `tokenizer` overrides with an HF directory or a .gguf file."""
    if tokenizer:
        tok = _from_path(Path(tokenizer))
    elif source.kind == "gguf":
        tok = Tokenizer.from_gguf(source.gguf)
    elif source.path is not None and (source.path / "tokenizer.json").is_file():
        tok = Tokenizer.from_dir(source.path)
    else:
        # Dummy presets have no tokenizer of their own. SmolLM2's (49,152 ids) fits every preset's vocabulary,
        # so text prompts still work for benchmarks and smoke tests.
        from rvllm.model.pull import PullError, ensure_default_model

        log.info("no tokenizer for %s; using SmolLM2's", source.name)
        try:
            tok = _from_path(ensure_default_model())
        except PullError as e:
            raise ModelLoadError(f"{source.name} has no tokenizer of its own and SmolLM2's could not be fetched "
                                 f"({e}); pass --tokenizer with a tokenizer directory or .gguf file") from None
    if chat_template:
        path = Path(chat_template)
        tok.chat_template = path.read_text() if path.is_file() else chat_template
    return tok


def _from_path(path: Path) -> Tokenizer:
    if path.is_file() and path.suffix == ".gguf":
        from rvllm.model.gguf_loader import read_gguf

        return Tokenizer.from_gguf(read_gguf(path))
    if path.is_dir():
        return Tokenizer.from_dir(path)
    raise ModelLoadError(f"{path}: not a tokenizer directory or .gguf file")
