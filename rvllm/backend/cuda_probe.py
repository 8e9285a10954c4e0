"""Is there a usable CUDA GPU? Answered without importing cupy when it is not installed."""
from __future__ import annotations

import functools
import importlib.util


@functools.cache
def cuda_available() -> tuple[bool, str]:
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed (pip install 'rvllm[cuda12]' or 'rvllm[cuda13]')"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy raises several types when the driver or device is missing
        return False, f"CuPy found no CUDA device: {e}"
    if n < 1:
        return False, "CuPy found no CUDA device"
    return True, ""
