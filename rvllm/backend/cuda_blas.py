"""cuBLAS matrix products for the CUDA backend: gemmEx (and its strided-batched form) with fp32
accumulation, eager or captured.

Eager calls go through CuPy's wrappers (cupy_backends.cuda.libs.cublas.gemmEx, gemmStridedBatchedEx),
which bind CuPy's handle to the current stream first. They refuse to run while the stream is capturing a
CUDA graph (CuPy's setStream raises NotImplementedError), although cuBLAS supports capture. So
inside `capturing()` the same cuBLAS function is called through ctypes on the same library and handle,
after the handle was bound to the capture stream and to a fixed workspace before capture began
(cuBLAS then allocates nothing during capture, and replays use that workspace).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

try:
    import cupy as cp
    from cupy_backends.cuda.libs import cublas as _cublas
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None
    _cublas = None

# CUDA library enums (cudaDataType_t, cublasComputeType_t); stable across CUDA 11-13.
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14
CUBLAS_COMPUTE_32F = 68
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0
# cuBLAS's recommended workspace on Hopper (32 MiB; 4 MiB is enough before it).
CAPTURE_WORKSPACE_BYTES = 32 << 20

_capture_fn = None  # cublasGemmEx through ctypes while capturing, else None
_capture_batched_fn = None  # cublasGemmStridedBatchedEx likewise


@functools.cache
def loaded_library(stem: str):
    """The shared library `stem` ("libcublas", "libcublasLt") as this process loaded it (found in
    /proc/self/maps), opened again through ctypes: the same library instance, so handles made by
    CuPy are valid for it. Else the newest CUDA's by name; None when neither loads."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and os.path.basename(parts[5]).startswith(stem + ".so"):
                    return ctypes.CDLL(parts[5])
    except OSError:
        pass
    for name in (f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _libcublas():
    lib = loaded_library("libcublas")
    if lib is not None:
        return lib
    raise RuntimeError("CUDA graph capture: libcublas is not loaded in this process")


@functools.cache
def _ctypes_functions():
    lib = _libcublas()
    vp, i = ctypes.c_void_p, ctypes.c_int
    gemm = lib.cublasGemmEx
    gemm.restype = i
    gemm.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
    batched = lib.cublasGemmStridedBatchedEx
    batched.restype = i
    ll = ctypes.c_longlong
    batched.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, ll, vp, i, i, ll, vp, vp, i, i, ll, i, i, i]
    set_ws = lib.cublasSetWorkspace_v2
    set_ws.restype = i
    set_ws.argtypes = [vp, vp, ctypes.c_size_t]
    return gemm, set_ws, batched


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status} (during CUDA graph capture)")


def gemm_ex(m: int, n: int, k: int, alpha_ptr: int, a_ptr: int, a_type: int, lda: int, b_ptr: int,
            b_type: int, ldb: int, beta_ptr: int, c_ptr: int, c_type: int, ldc: int) -> None:
    """cublasGemmEx(handle, OP_T, OP_N, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) (column-major
    terms), fp32 compute, host pointer mode, on the current stream (the capture stream inside
    `capturing`)."""
    handle = cp.cuda.device.get_cublas_handle()
    if _capture_fn is not None:
        _check(_capture_fn(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, alpha_ptr, a_ptr, a_type, lda,
                           b_ptr, b_type, ldb, beta_ptr, c_ptr, c_type, ldc, CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT), "cublasGemmEx")
        return
    _cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    _cublas.gemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, alpha_ptr, a_ptr, a_type, lda,
                   b_ptr, b_type, ldb, beta_ptr, c_ptr, c_type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)


def gemm_strided_batched_ex(m: int, n: int, k: int, alpha_ptr: int, a_ptr: int, a_type: int, lda: int, stride_a: int,
                            b_ptr: int, b_type: int, ldb: int, stride_b: int, beta_ptr: int, c_ptr: int, c_type: int,
                            ldc: int, stride_c: int, batch: int) -> None:
    """cublasGemmStridedBatchedEx with OP_T, OP_N: `batch` products as gemm_ex's, matrix i's A, B and C
    at i times the strides (in elements) from a, b and c; fp32 compute, on the current stream (the
    capture stream inside `capturing`)."""
    handle = cp.cuda.device.get_cublas_handle()
    args = (handle, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, alpha_ptr, a_ptr, a_type, lda, stride_a, b_ptr, b_type, ldb,
            stride_b, beta_ptr, c_ptr, c_type, ldc, stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
    if _capture_batched_fn is not None:
        _check(_capture_batched_fn(*args), "cublasGemmStridedBatchedEx")
        return
    _cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    _cublas.gemmStridedBatchedEx(*args)


@contextlib.contextmanager
def capturing(stream, workspace):
    """GEMMs inside this block may be captured on `stream` (make it current and begin capture
    inside). workspace: a device buffer of CAPTURE_WORKSPACE_BYTES or more that outlives the graphs."""
    global _capture_fn, _capture_batched_fn
    gemm, set_ws, batched = _ctypes_functions()
    handle = cp.cuda.device.get_cublas_handle()
    _cublas.setStream(handle, stream.ptr)  # not capturing yet: CuPy allows it
    _check(set_ws(handle, workspace.data.ptr, workspace.nbytes), "cublasSetWorkspace")  # after setStream, which resets it
    _cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
    _capture_fn, _capture_batched_fn = gemm, batched
    try:
        yield
    finally:
        _capture_fn = _capture_batched_fn = None
        # The next eager call's setStream puts the default workspace back.
