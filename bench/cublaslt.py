"""cuBLASLt through ctypes, for bench/gemm_algos.py: one matrix product
`out[T, N] = x[T, K] @ w[N, K]^T (+ bias)` with an algorithm the caller picks from cuBLASLt's
heuristic list.

cublasGemmEx (the backend's path, rvllm/backend/cuda_blas.py) asks the heuristic for one algorithm
and runs it; cuBLASLt lists several (tile shape, split-K, stages), which gemm_algos.py times at the
model's shapes. The measurement (bench/RESULTS.md, session 6) found a few % at most, so the backend
does not use this. cublasLtMatmul takes the stream and workspace as arguments: safe inside CUDA
graph capture.

Column-major terms, as in cuda_blas.py: D [N, T] = op(A) [N, K] @ B [K, T] with A = w viewed as a
column-major [K, N] matrix (transposed) and B = x viewed as column-major [K, T].
"""
from __future__ import annotations

import ctypes
import functools

from rvllm.backend.cuda_blas import loaded_library

CUBLAS_COMPUTE_32F = 68
CUDA_R_32F = 0
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
# cublasLtMatmulDescAttributes_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_EPILOGUE_DEFAULT, _EPILOGUE_BIAS = 1, 4
_PREF_MAX_WORKSPACE_BYTES = 1
# cublasLtMatmulAlgoConfigAttributes_t (for describing an algorithm)
_CONFIG_ID, _CONFIG_TILE_ID, _CONFIG_SPLITK_NUM, _CONFIG_STAGES_ID = 0, 1, 2, 6


class Algo(ctypes.Structure):
    """cublasLtMatmulAlgo_t: 64 opaque bytes, valid for the cuBLAS version that made it."""
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t."""
    _fields_ = [("algo", Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@functools.cache
def _lib():
    """libcublasLt as loaded by libcublas in this process, else by name."""
    lib = loaded_library("libcublasLt")
    if lib is not None:
        return _bind(lib)
    raise RuntimeError("cuBLASLt: libcublasLt is not loadable in this process")


def _bind(lib):
    vp, i, u64, i64, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "cublasLtCreate": [vp],
        "cublasLtMatmulDescCreate": [vp, i, i],
        "cublasLtMatmulDescSetAttribute": [vp, i, vp, sz],
        "cublasLtMatrixLayoutCreate": [vp, i, u64, u64, i64],
        "cublasLtMatmulPreferenceCreate": [vp],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i, vp, sz],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i, vp, vp],
        "cublasLtMatmulAlgoConfigGetAttribute": [vp, i, vp, sz, vp],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for name, argtypes in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i, argtypes
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt: {what} failed with status {status}")


@functools.cache
def _handle() -> int:
    h = ctypes.c_void_p()
    _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
    return h.value


def _layout(dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    out = ctypes.c_void_p()
    _check(_lib().cublasLtMatrixLayoutCreate(ctypes.byref(out), dtype, rows, cols, ld), "cublasLtMatrixLayoutCreate")
    return out


class LinearPlan:
    """Descriptors for out[T, N] (dtype out_type, row stride N) = x[T, K] (row stride ldx) @ w[N, K]^T,
    plus a bias of N elements in the epilogue when `bias` (a device pointer of out_type) is set.
    Descriptors live as long as the plan; plans are few (one per shape), so they are not freed."""

    def __init__(self, t: int, n: int, k: int, ldx: int, in_type: int, out_type: int, bias_ptr: int = 0):
        lib = _lib()
        self.shape = (t, n, k)
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate")
        for attr, value in ((_DESC_TRANSA, CUBLAS_OP_T), (_DESC_TRANSB, CUBLAS_OP_N)):
            v = ctypes.c_int32(value)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "MatmulDescSetAttribute")
        self.bias_ptr = bias_ptr
        if bias_ptr:
            ep, ptr = ctypes.c_uint32(_EPILOGUE_BIAS), ctypes.c_void_p(bias_ptr)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_EPILOGUE, ctypes.byref(ep), 4), "epilogue")
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr), 8), "bias")
        self.a = _layout(in_type, k, n, k)      # w, read transposed
        self.b = _layout(in_type, k, t, ldx)    # x
        self.d = _layout(out_type, n, t, n)     # out
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def heuristics(self, count: int, workspace_bytes: int) -> list[HeuristicResult]:
        """Up to `count` algorithms cuBLASLt proposes for this shape, in its order of preference."""
        lib = _lib()
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
        ws = ctypes.c_uint64(workspace_bytes)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
               "MatmulPreferenceSetAttribute")
        results = (HeuristicResult * count)()
        found = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(_handle(), self.desc, self.a, self.b, self.d, self.d, pref, count,
                                                  results, ctypes.byref(found)), "MatmulAlgoGetHeuristic")
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def run(self, algo: Algo, w_ptr: int, x_ptr: int, out_ptr: int, workspace_ptr: int, workspace_bytes: int,
            stream_ptr: int) -> None:
        """Enqueues the product on `stream_ptr` (capturable)."""
        _check(_lib().cublasLtMatmul(_handle(), self.desc, ctypes.byref(self._alpha), w_ptr, self.a, x_ptr, self.b,
                                     ctypes.byref(self._beta), out_ptr, self.d, out_ptr, self.d, ctypes.byref(algo),
                                     workspace_ptr, workspace_bytes, stream_ptr), "cublasLtMatmul")


def describe(algo: Algo) -> str:
    """'id/tile/splitK/stages' of an algorithm, for benchmark tables."""
    vals = []
    for attr in (_CONFIG_ID, _CONFIG_TILE_ID, _CONFIG_SPLITK_NUM, _CONFIG_STAGES_ID):
        v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
        status = _lib().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4,
                                                             ctypes.byref(written))
        vals.append(str(v.value) if status == 0 else "?")
    return "/".join(vals)
