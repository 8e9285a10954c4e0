"""A memory-mapped safetensors reader.

The safetensors package's NumPy loader cannot represent bfloat16, and we want tensors as views of
the mapped file (no host copy of the model), so we read the format directly: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from rvllm.errors import ModelLoadError

# bfloat16 has no NumPy dtype: it is returned as its raw uint16 bits, with dtype name "bfloat16".
_DTYPES = {
    "F64": (np.float64, "float64"), "F32": (np.float32, "float32"), "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"), "I64": (np.int64, "int64"), "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"), "I8": (np.int8, "int8"), "U8": (np.uint8, "uint8"), "BOOL": (np.bool_, "bool"),
}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            size = self.path.stat().st_size
            if size < 8:
                raise ModelLoadError(f"{self.path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise ModelLoadError(f"{self.path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
            header = json.loads(self._file.read(header_len))
        except OSError as e:
            raise ModelLoadError(f"{self.path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        data_len = size - self._data_start
        for name, info in header.items():
            try:
                begin, end = info["data_offsets"]
                np_dtype, _ = _DTYPES[info["dtype"]]
                expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(np_dtype).itemsize
            except (KeyError, TypeError, ValueError):
                raise ModelLoadError(f"{self.path}: corrupt or unsupported entry for tensor {name!r}: {info}") from None
            if end > data_len or end - begin != expected:
                raise ModelLoadError(
                    f"{self.path}: truncated or corrupt: tensor {name!r} needs bytes {begin}..{end} "
                    f"but the data section holds {data_len}")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> tuple[np.ndarray, str]:
        """(a read-only view of the tensor's bytes, its dtype name); bfloat16 comes as uint16 bits."""
        info = self._entries[name]
        np_dtype, dtype_name = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        arr = np.frombuffer(self._mmap, dtype=np_dtype, count=(end - begin) // np.dtype(np_dtype).itemsize,
                            offset=self._data_start + begin)
        return arr.reshape(info["shape"]), dtype_name
