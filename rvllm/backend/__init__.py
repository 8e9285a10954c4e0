"""Backend selection: CUDA when CuPy finds a GPU (or --device cuda), else NumPy."""
from __future__ import annotations

import logging

from rvllm.errors import DeviceError

log = logging.getLogger("rvllm")


def select_backend(device: str = "auto", dtype: str = "auto", model_dtype: str = "bfloat16"):
    """device: auto|cuda|cpu. dtype: auto|float32|float16|bfloat16 (auto = the checkpoint's, fp32 on CPU)."""
    if device in ("auto", "cuda"):
        from rvllm.backend.cuda_probe import cuda_available

        ok, why = cuda_available()
        if ok:
            from rvllm.backend.cuda import CudaBackend

            compute = dtype if dtype != "auto" else (model_dtype if model_dtype in ("float16", "bfloat16") else "bfloat16")
            if compute == "float32":
                raise DeviceError("--dtype float32 is not supported on the CUDA backend; use bfloat16 or float16")
            backend = CudaBackend(compute)
            log.info("device: cuda (%s, %s)", backend.device_name, compute)
            return backend
        if device == "cuda":
            raise DeviceError(f"--device cuda: no usable GPU ({why})")
    from rvllm.backend.cpu import CpuBackend

    log.info("device: cpu (NumPy, float32)")
    return CpuBackend()
