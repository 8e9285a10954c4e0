"""Checkpoint tensors to the GPU through a pinned staging ring: no host copy of the model; and
CudaBackend's transfers between host and device, with the kernel that unpacks a step's uploaded
inputs (DeviceTransfers).

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

from rvllm.bf16 import bf16_bits_to_float32 as bf16_bits_to_f32, float32_to_bf16_bits as f32_to_bf16_bits

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


class DeviceTransfers:
    """CudaBackend's host <-> device transfers, weight uploads and the unpacking of a step's uploaded
    inputs. Uses the backend's `dtype`, `compute_dtype`, `num_sms`, `_uploader` (a StagedUploader),
    `_upload_stream` (None until upload_copy makes it), `_check` and `_kernel`."""

    def _storage(self, dtype) -> np.dtype:
        if dtype is None:
            return self.compute_dtype
        if isinstance(dtype, str) and dtype == "bfloat16" or getattr(dtype, "__name__", None) == "bfloat16":
            return np.dtype(np.uint16)
        dt = np.dtype(dtype)
        return np.dtype(np.uint16) if dt.name == "bfloat16" else dt

    def _to_storage_host(self, arr, dtype: np.dtype) -> np.ndarray:
        a = np.asarray(arr)
        if dtype == np.uint16 and (self.dtype == "bfloat16" and a.dtype != np.uint16):
            return f32_to_bf16_bits(a)
        return np.ascontiguousarray(a, dtype=dtype)

    def pinned_empty(self, n: int, dtype=np.int32) -> np.ndarray:
        """A page-locked host array of n elements (asynchronous copies need one); it keeps its memory."""
        dt = np.dtype(dtype)
        return np.frombuffer(cp.cuda.alloc_pinned_memory(max(n, 1) * dt.itemsize), dt, n)

    def record_event(self, event=None):
        """Records an event on the current stream (a new one when None) and returns it."""
        event = event if event is not None else cp.cuda.Event(disable_timing=True)
        event.record(cp.cuda.get_current_stream())
        return event

    def upload_copy(self, dst, src: np.ndarray, n: int, reusable=None, event=None):
        """dst[:n] = src[:n] by a copy on the upload stream (a stream of the backend's own), after
        `reusable` (an event recorded where dst's last reader was queued) when given; the current
        stream's later work waits for the copy, other work on it does not. src must be pinned and
        stay unchanged until the event returned (`event` recorded again, or a new one) has passed.
        So the next step's inputs travel while the current stream still runs the step before."""
        if dst.dtype != src.dtype or not dst.flags.c_contiguous or n > min(dst.size, src.size):
            raise ValueError(f"upload_copy: {n} elements from {src.dtype} {src.shape} to {dst.dtype} {dst.shape}")
        if self._upload_stream is None:
            self._upload_stream = cp.cuda.Stream(non_blocking=True)
        stream = self._upload_stream
        if reusable is not None:
            stream.wait_event(reusable)
        if n:
            dst.data.copy_from_host_async(src.ctypes.data, n * src.itemsize, stream)
        event = event if event is not None else cp.cuda.Event(disable_timing=True)
        event.record(stream)
        cp.cuda.get_current_stream().wait_event(event)
        return event

    def unpack_step_inputs(self, dst, src, ids_at: int, num_ids: int, prev_sampled, tables, table, row_slots,
                           col0, diff_off, new_ids, seq_lens, block_size: int, embed=None) -> None:
        """CpuBackend.unpack_step_inputs (the spec) in one kernel (step_inputs.cu); dst and src are
        distinct int32 device vectors, tables [r, w] (contiguous), table [num_slots, W]; the index
        arrays int32 vectors on the device (views of src); embed's out contiguous."""
        for name, a in (("dst", dst), ("src", src)):
            self._check(f"step inputs {name}", a, np.int32, ndim=1)
        n = src.shape[0]
        if n > dst.shape[0] or ids_at < 0 or ids_at + num_ids > n:
            raise ValueError(f"unpack_step_inputs: {n} values into {dst.shape[0]}, ids at {ids_at}..{ids_at + num_ids}")
        if prev_sampled is not None:
            self._check("step inputs prev_sampled", prev_sampled, np.int32, ndim=1)
        self._check("block tables out", tables, np.int32, ndim=2)
        self._check("block tables table", table, np.int32, ndim=2)
        r, w = tables.shape
        for name, a, k in (("row_slots", row_slots, r), ("col0", col0, r), ("diff_off", diff_off, r + 1),
                           ("seq_lens", seq_lens, r)):
            self._check(f"block tables {name}", a, np.int32, ndim=1)
            if a.shape[0] != k:
                raise ValueError(f"block tables: {name} has {a.shape[0]} entries for {r} rows")
        self._check("block tables new_ids", new_ids, np.int32, ndim=1)
        if w > table.shape[1]:
            raise ValueError(f"block tables: {w} columns from a table of {table.shape[1]}")
        emb_out = emb_table = np.uint64(0)  # null pointers: no gather
        hidden = vocab = 0
        if embed is not None:
            emb_table, emb_out = embed
            self._check("step inputs embedding table", emb_table, ndim=2)
            self._check("step inputs embedding out", emb_out, ndim=2)
            vocab, hidden = emb_table.shape
            if emb_out.shape[0] < num_ids or emb_out.shape[1] != hidden:
                raise ValueError(f"unpack_step_inputs: {num_ids} embedding rows of {hidden} into {emb_out.shape}")
        # A block per table row and per embedding row, and enough blocks that the copy is a few
        # values a thread.
        blocks = max(1, min(max(r, num_ids if embed is not None else 0, -(-n // 1024)), 4 * self.num_sms))
        self._kernel("step_inputs.cu", "unpack_step_inputs_kernel")(
            (blocks,), (128,),
            (dst, src, np.int32(n), np.int32(ids_at), np.int32(num_ids),
             np.uint64(0) if prev_sampled is None else prev_sampled,
             tables, table, row_slots, col0, diff_off, new_ids, seq_lens, np.int32(r), np.int32(w),
             np.int32(table.shape[1]), np.int32(block_size), emb_out, emb_table, np.int32(hidden), np.int32(vocab)))

    def from_host(self, arr, dtype=None):
        """A host array on the device, converted to `dtype` when given (numpy semantics; "bfloat16"
        means the uint16 bit storage). dtype None keeps the array's dtype."""
        a = np.asarray(arr)
        if dtype is None:
            target = np.dtype(np.uint16) if a.dtype.name == "bfloat16" else a.dtype
        else:
            target = self._storage(dtype)
        return cp.asarray(self._to_storage_host(a, target))

    def to_host(self, arr) -> np.ndarray:
        """A device array on the host; bfloat16 storage comes back as float32."""
        h = cp.asnumpy(arr) if isinstance(arr, cp.ndarray) else np.asarray(arr)
        if self.dtype == "bfloat16" and h.dtype == np.uint16:
            return bf16_bits_to_f32(h)
        return h

    def weight(self, arr, dtype_name: str = "float32"):
        """A checkpoint tensor (bfloat16 arrives as uint16 bits, dtype_name "bfloat16") in this
        backend's 16-bit dtype, on the device, uploaded through pinned staging buffers
        (cuda_upload.py). Conversions from float32 run on the GPU."""
        return self.weight_concat([(arr, dtype_name)])

    def weight_concat(self, parts):
        """[(tensor, dtype_name)] concatenated along the first dimension, on the device: each part is
        uploaded into its row range (no concatenated copy on the host)."""
        arrays = [np.asarray(a) for a, _ in parts]
        rows = sum(a.shape[0] if a.ndim else 1 for a in arrays)
        shape = (rows, *arrays[0].shape[1:]) if arrays[0].ndim else ()
        out = cp.empty(shape, dtype=self.compute_dtype)
        row, converted = 0, False
        for a, (_, dtype_name) in zip(arrays, parts):
            n = a.shape[0] if a.ndim else 1
            dst = out[row: row + n] if a.ndim else out
            row += n
            bf16_bits = dtype_name == "bfloat16" or a.dtype.name == "bfloat16"
            if bf16_bits and a.dtype.itemsize == 2:
                if self.dtype == "bfloat16":
                    self._uploader.copy(dst, a.view(np.uint16))
                    continue
                bits = cp.empty(a.shape, np.uint16)
                self._uploader.copy(bits, a.view(np.uint16))
                dst[...] = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
                converted = True
            elif a.dtype == self.compute_dtype and self.dtype == "float16":
                self._uploader.copy(dst, a)
            else:
                f32 = cp.empty(a.shape, np.float32)
                self._uploader.copy(f32, np.ascontiguousarray(a, dtype=np.float32))
                dst[...] = self._from_f32(f32)
                converted = True
        return self._settled(out) if converted else out

    @staticmethod
    def _settled(w):
        """w, once the kernels that wrote it have finished. gemv.cu's kernels load weights before
        their pdl_wait (common.cuh), which is safe only if no kernel still running writes them; a
        test may call one right after making its weights."""
        cp.cuda.get_current_stream().synchronize()
        return w

    def weights_loaded(self) -> None:
        """Loading is over: wait for the staged copies and free the pinned staging buffers."""
        self._uploader.release()
        # CuPy's pinned pool would keep the freed staging ring (32 MB of locked, resident pages).
        cp.get_default_pinned_memory_pool().free_all_blocks()

    def dummy_weight(self, shape, std: float, seed: int, mean: float = 0.0):
        """Random normal(mean, std) weights generated on the GPU by one kernel of ours (fast for large
        presets, and no CuPy kernel: those load NVRTC; the values differ from
        CpuBackend.dummy_weight's for the same seed)."""
        out = cp.empty(shape, dtype=self.compute_dtype)
        if out.size:
            blocks = min(-(-out.size // 512), 65535)  # two values a thread, grid-stride past that
            self._kernel("embedding.cu", "dummy_normal_kernel")(
                (blocks,), (256,), (out, np.int64(out.size), np.uint64(seed), np.float32(std), np.float32(mean)))
        return self._settled(out)

    def _from_f32(self, x):
        """float32 device array -> this backend's storage, rounded to nearest even."""
        if self.dtype == "float16":
            return x.astype(np.float16)
        b = x.view(np.uint32)
        bits = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        return cp.where(cp.isnan(x), np.uint16(0x7FC0), bits).astype(np.uint16, copy=False)
