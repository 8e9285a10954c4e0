"""Checkpoint tensors to the GPU through a pinned staging ring: no host copy of the model.

A memory-mapped safetensors tensor is read in chunks into one of two page-locked buffers and each
chunk is sent with an asynchronous copy on the current stream; while one buffer's copy runs, the
next chunk is read into the other. The file is read once, only one chunk per buffer is ever held
on the host, and no pageable copy makes the host wait for the GPU. The buffers are freed by
`release()` when loading is done (page-locked memory counts against the host's resident memory).
Concatenated weights (q|k|v, gate|up) are uploaded part by part into row ranges of one device
array, so they are not concatenated on the host either.
"""
from __future__ import annotations

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

CHUNK_BYTES = 16 << 20


class StagedUploader:
    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._buffers: list[np.ndarray] = []
        self._events: list = []
        self._next = 0
        self.bytes_uploaded = 0

    def _buffer(self) -> tuple[np.ndarray, object]:
        """The next staging buffer, once the copy that last read it has finished."""
        if not self._buffers:
            for _ in range(2):
                mem = cp.cuda.alloc_pinned_memory(self.chunk_bytes)
                self._buffers.append(np.frombuffer(mem, np.uint8, self.chunk_bytes))
                self._events.append(None)
        i = self._next
        self._next ^= 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        return self._buffers[i], i

    def copy(self, dst, host: np.ndarray) -> None:
        """dst (a C-contiguous device array, or a row range of one) = host, bytes as they are."""
        src = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        if src.size != dst.nbytes:
            raise ValueError(f"staged upload: {src.size} bytes into a {dst.nbytes}-byte destination")
        stream = cp.cuda.get_current_stream()
        for off in range(0, src.size, self.chunk_bytes):
            k = min(self.chunk_bytes, src.size - off)
            buf, i = self._buffer()
            buf[:k] = src[off:off + k]  # reads the file (page faults on the mapping) into pinned memory
            (dst.data + off).copy_from_host_async(buf.ctypes.data, k, stream)
            event = self._events[i] or cp.cuda.Event(disable_timing=True)
            event.record(stream)
            self._events[i] = event
        self.bytes_uploaded += src.size

    def release(self) -> None:
        """Waits for the last copies and frees the staging buffers."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._buffers, self._events, self._next = [], [], 0
