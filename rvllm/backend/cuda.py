"""CuPy ops: cuBLAS GEMMs and the CUDA C kernels of kernels_cu/ (compiled by backend/nvrtc.py).

CudaBackend has CpuBackend's methods, argument order and shapes (backend/cpu.py is the reference
semantics). Differences a caller can see:
- Activations, weights and the KV cache are 16-bit: float16, or bfloat16 stored as raw uint16
  (CuPy 14 has no bfloat16 dtype). `compute_dtype` is that storage dtype; `zeros(shape)` with no
  dtype allocates it. `to_host` returns bfloat16 arrays as float32.
- Every op returns a new array; inputs are never modified (the KV cache excepted).
- Integer inputs (token ids, positions, slot mapping, attention metadata) must be int32.
- Ops launch on the current CuPy stream; the model runner makes `self.stream` current for its
  steps and captures CUDA graphs on it (graph_capture, and DecodeWorkspace in cuda_attention.py).
The composite ops (fused.py's) live in cuda_fused.py, the attention wrappers in cuda_attention.py,
the cuBLAS calls in cuda_blas.py, the host <-> device transfers and weight uploads in
cuda_upload.py and the kernel launches in cuda_launch.py.
"""
from __future__ import annotations

import os

import numpy as np

from rvllm.backend import cuda_attention, cuda_blas, cuda_rotary, nvrtc
from rvllm.backend.cuda_fused import FusedOps
from rvllm.backend.cuda_gemv import DEFAULT_MAX_ROWS as _GEMV_MAX_ROWS, SmallBatchGemv
from rvllm.backend.cuda_gemv import DEFAULT_TC_MAX_ROWS as _GEMV_TC_MAX_ROWS
from rvllm.backend.cuda_gemv import DEFAULT_TC_SQUARE_MAX_ROWS as _GEMV_TC_SQUARE_MAX_ROWS
from rvllm.backend.cuda_ksplit import SLICES, KSliceGemm, KSliceSums
from rvllm.backend.cuda_upload import DeviceTransfers, StagedUploader
from rvllm.backend.cuda_skinny import make_skinny
from rvllm.backend.cuda_wgmma import make_wgmma
from rvllm.backend.cuda_probe import cuda_available
from rvllm.backend.cuda_blas import CUDA_R_16BF as _CUDA_R_16BF, CUDA_R_16F as _CUDA_R_16F, CUDA_R_32F as _CUDA_R_32F

try:  # cupy is an optional dependency (the cuda12 / cuda13 extras)
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install
    cp = None

_DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel gets without opting in


def is_cuda_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    return cp is not None and cuda_available()[0]


def _launch_threads(d: int) -> int:
    """Threads for a row kernel: about 4 elements a thread, a multiple of 32, at most 1024."""
    return min(1024, max(32, ((d + 3) // 4 + 31) // 32 * 32))


MAX_SLICES = max(SLICES)  # norm.cu's NORM_MAX_SLICES
_SUMS_THREADS = 256  # fused_add_rms_norm_sums_kernel's launch bound


def _chunk_threads(d: int) -> int:
    """Threads for a row kernel whose threads take 16-byte chunks (8 elements): one chunk a thread
    up to 1024 threads (norm.cu's vector path holds up to 4)."""
    return min(1024, max(32, ((d + 7) // 8 + 31) // 32 * 32))


class CudaBackend(DeviceTransfers, FusedOps):
    name = "cuda"

    def __init__(self, dtype: str = "bfloat16", attention: str | None = None, gemv_max_rows: int | None = None,
                 gemv_tc_max_rows: int | None = None, wgmma_rows: tuple[int, int] | None = None,
                 gemv_tc_square_max_rows: int | None = None, skinny_rows: tuple[int, int] | None = None):
        """dtype: "bfloat16" or "float16". attention: "auto" (decode kernel for decode-only
        steps, tensor-core prefill kernel otherwise) or "split" (the decode kernel for every
        step: slower, a cross-check); default from $RVLLM_ATTENTION, else "auto".
        gemv_max_rows: steps of at most this many token rows run their linear layers on the
        kernels of gemv.cu (0: none; at most 8); default from $RVLLM_GEMV_MAX_ROWS, else 2.
        gemv_tc_max_rows: larger steps of at most this many rows (up to 8) run gemv_tc.cu's
        tensor-core kernels; default from $RVLLM_GEMV_TC_MAX_ROWS, else 0 (off: slower than cuBLAS
        so far, cuda_gemv.DEFAULT_TC_MAX_ROWS).
        gemv_tc_square_max_rows: with those off, plain products with N <= K < 2N (o_proj) of 3 rows
        or more (and more than gemv_max_rows) up to this many (at most 8) still run gemv_tc.cu;
        default from $RVLLM_GEMV_TC_SQUARE_MAX_ROWS, else 8 (cuda_gemv.DEFAULT_TC_SQUARE_MAX_ROWS);
        0 is off.
        wgmma_rows: (lo, hi): on sm_90, steps of lo..hi rows run their products on gemm_wgmma.cu
        instead of cuBLAS where the shapes fit; default from $RVLLM_WGMMA_ROWS ("lo-hi"), else
        cuda_wgmma.DEFAULT_ROWS; (0, 0) is off.
        skinny_rows: (lo, hi): on sm_90, steps of lo..hi rows (at most 16) past gemv_max_rows run
        their products on skinny_gemm.cu, ahead of gemv_tc.cu, wgmma and cuBLAS; default from
        $RVLLM_SKINNY_ROWS ("lo-hi"), else cuda_skinny.DEFAULT_ROWS (3-16); (0, 0) is off."""
        if cp is None:
            raise RuntimeError("CudaBackend needs cupy (pip install 'rvllm[cuda12]' or 'rvllm[cuda13]')")
        if dtype not in nvrtc.DTYPES:
            raise ValueError(f"dtype must be one of {nvrtc.DTYPES}, got {dtype!r}")
        attention = attention or os.environ.get("RVLLM_ATTENTION", "auto")
        if attention not in ("auto", "split"):
            raise ValueError(f"attention must be 'auto' or 'split', got {attention!r}")
        self.dtype = dtype
        self.attention = attention
        self.xp = cp
        self.compute_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else np.float16)
        self._gemm_type = _CUDA_R_16BF if dtype == "bfloat16" else _CUDA_R_16F
        self._alpha = np.array(1.0, dtype=np.float32)  # host scalars for cuBLAS (host pointer mode)
        self._beta0 = np.array(0.0, dtype=np.float32)
        self._beta1 = np.array(1.0, dtype=np.float32)
        self._smem_set: dict[int, int] = {}  # id(kernel) -> dynamic shared memory limit set
        nvrtc.device_cc()  # fail now, not mid-forward, on a GPU older than sm_80
        # The model runner makes this stream current for every step (and captures CUDA graphs on it);
        # ops launch on the current stream. Non-blocking: it does not wait for the legacy default
        # stream, so work queued there (weight loading) is finished with synchronize_device() first.
        self.stream = cp.cuda.Stream(non_blocking=True)
        self._capture_workspace = None  # cuBLAS workspace of captured graphs (graph_capture)
        self._uploader = StagedUploader()  # checkpoint tensors -> device (weight, weight_concat)
        self._upload_stream = None  # the step inputs' copies (upload_copy), made on first use
        if gemv_max_rows is None:
            gemv_max_rows = int(os.environ.get("RVLLM_GEMV_MAX_ROWS", _GEMV_MAX_ROWS))
        if gemv_tc_max_rows is None:
            gemv_tc_max_rows = int(os.environ.get("RVLLM_GEMV_TC_MAX_ROWS", _GEMV_TC_MAX_ROWS))
        if gemv_tc_square_max_rows is None:
            gemv_tc_square_max_rows = int(os.environ.get("RVLLM_GEMV_TC_SQUARE_MAX_ROWS", _GEMV_TC_SQUARE_MAX_ROWS))
        num_sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
        self.num_sms = int(num_sms)
        self.gemv = SmallBatchGemv(self, gemv_max_rows, self.num_sms, gemv_tc_max_rows, gemv_tc_square_max_rows)
        self.wgmma = make_wgmma(self, self.num_sms, wgmma_rows)  # None: off, or not an sm_90 GPU
        self.skinny = make_skinny(self, self.num_sms, skinny_rows)  # the same
        # Long-K products over few output tiles as cuBLAS products of K-slices (cuda_ksplit);
        # $RVLLM_GEMM_K_SLICES=0 leaves them to cublasGemmEx's own split, for comparison.
        self.ksplit = KSliceGemm(self, self.num_sms) if os.environ.get("RVLLM_GEMM_K_SLICES", "1") != "0" else None

    def prepare_kernels(self, head_dim: int) -> None:
        """Starts compiling the kernels a model of this head size needs (those the disk cache
        lacks) in background threads, so that a cold start compiles while the weights load."""
        skip = (() if self.wgmma else ("gemm_wgmma.cu",)) + (() if self.skinny else ("skinny_gemm.cu",))
        nvrtc.precompile(self.dtype, head_dim, skip=skip)

    # ---- memory (host <-> device transfers and weights: cuda_upload.DeviceTransfers) ------------
    @property
    def device_name(self) -> str:
        dev = cp.cuda.Device().id
        name = cp.cuda.runtime.getDeviceProperties(dev)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def zeros(self, shape, dtype=None):
        """Zeros on the device; dtype None means compute_dtype (the KV cache's dtype)."""
        return cp.zeros(shape, dtype=self._storage(dtype))

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def synchronize_device(self) -> None:
        """Wait for all work on every stream of the device."""
        cp.cuda.Device().synchronize()

    def release_cached_memory(self) -> None:
        """Return the pool's unused blocks to the driver, so the next measurement sees live arrays only."""
        cp.get_default_memory_pool().free_all_blocks()

    def kv_cache_budget(self, utilization: float) -> int:
        """Bytes the KV cache may take: `utilization` of the card minus what is in use now. Call it
        after the profiling forward, whose activations CuPy's pool still holds (and will reuse)."""
        self.synchronize()
        free, total = cp.cuda.runtime.memGetInfo()
        pool = cp.get_default_memory_pool()
        # pool.total_bytes(): weights plus the profiling step's peak activations (freed arrays stay in the
        # pool). As in vLLM, the fraction is of the whole card; what other processes hold only caps it by
        # what is actually free.
        own = total * utilization - pool.total_bytes()
        return int(min(own, free + pool.free_bytes() - (256 << 20)))

    # ---- checks -------------------------------------------------------------------------------
    def _check(self, name: str, arr, dtype=None, ndim: int | None = None, contiguous: bool = True):
        if not isinstance(arr, cp.ndarray):
            raise ValueError(f"{name}: expected a cupy array on the GPU, got {type(arr).__name__}")
        dtype = self.compute_dtype if dtype is None else np.dtype(dtype)
        if arr.dtype != dtype:
            want = "bfloat16 (stored as uint16)" if dtype == np.uint16 and self.dtype == "bfloat16" else str(dtype)
            raise ValueError(f"{name}: dtype {arr.dtype}, expected {want}")
        if ndim is not None and arr.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
        if contiguous and not arr.flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous (shape {arr.shape}, strides {arr.strides})")

    def _kernel(self, file: str, kernel: str, head_dim: int | None = None):
        return nvrtc.get_kernel(file, kernel, self.dtype, head_dim)

    def _ensure_smem(self, kernel, nbytes: int) -> None:
        """Opts `kernel` into `nbytes` of dynamic shared memory when that and its static shared
        memory pass the 48 KiB a launch gets without opting in."""
        static = int(kernel.attributes.get("shared_size_bytes", 0))
        if nbytes + static > _DEFAULT_SMEM and self._smem_set.get(id(kernel), 0) < nbytes:
            kernel.max_dynamic_shared_size_bytes = nbytes
            self._smem_set[id(kernel)] = nbytes

    # ---- ops ----------------------------------------------------------------------------------
    def embedding(self, ids, table):
        self._check("embedding ids", ids, np.int32, ndim=1)
        self._check("embedding table", table, ndim=2)
        (num_tokens,), (vocab, hidden) = ids.shape, table.shape
        out = cp.empty((num_tokens, hidden), dtype=self.compute_dtype)  # [T, H]
        if num_tokens:
            self._kernel("embedding.cu", "embedding_kernel")(
                (num_tokens,), (256,), (out, ids, table, np.int32(hidden), np.int32(vocab)))
        return out

    def rms_norm(self, x, weight, eps: float):
        """RMSNorm over the last dim. x may be a strided 2-D or 3-D view whose last dim is
        contiguous (q or k sliced out of the qkv output); the result is contiguous."""
        self._check("rms_norm x", x, contiguous=False)
        self._check("rms_norm weight", weight, ndim=1)
        d = x.shape[-1]
        if weight.shape[0] != d:
            raise ValueError(f"rms_norm: weight has {weight.shape[0]} elements, x's last dim is {d}")
        isz = x.itemsize
        if x.ndim == 0 or x.strides[-1] != isz or any(s < 0 or s % isz for s in x.strides):
            raise ValueError(f"rms_norm x: last dim must be contiguous (shape {x.shape}, strides {x.strides})")
        if x.ndim == 1:
            outer, inner, s_outer, s_inner = 1, 1, d, 0
        elif x.ndim == 2:
            outer, inner, s_outer, s_inner = x.shape[0], 1, x.strides[0] // isz, 0
        elif x.ndim == 3:
            outer, inner, s_outer, s_inner = x.shape[0], x.shape[1], x.strides[0] // isz, x.strides[1] // isz
        else:
            if not x.flags.c_contiguous:
                raise ValueError(f"rms_norm x: a {x.ndim}-D input must be C-contiguous")
            outer, inner, s_outer, s_inner = x.size // max(d, 1), 1, d, 0
        out = cp.empty(x.shape, dtype=self.compute_dtype)
        rows = outer * inner
        if rows and d:
            self._kernel("norm.cu", "rms_norm_kernel")(
                (rows,), (_launch_threads(d),),
                (out, x, np.int64(s_outer), np.int64(s_inner), np.int32(inner), weight, np.int32(d), np.float32(eps)))
        return out

    def fused_add_rms_norm(self, x, residual, weight, eps: float, fill=None):
        """(rms_norm(x + residual), x + residual): the next layer's input and the residual stream.
        x may be a KSliceSums (linear's feeds_add_norm), which the kernel sums as it reads.
        fill: (out [rows, n], row [n]), both C-contiguous in the compute dtype: the same kernel also
        writes `row` into every row of `out` (add_norm_linear's bias, before cuBLAS adds to it)."""
        sums = isinstance(x, KSliceSums)
        if sums:
            self._check("fused_add_rms_norm partial sums", x.parts, dtype=np.float32, ndim=3)
            if x.parts.shape[0] > MAX_SLICES:
                raise ValueError(f"fused_add_rms_norm: {x.parts.shape[0]} partial sums, at most {MAX_SLICES}")
        else:
            self._check("fused_add_rms_norm x", x, ndim=2)
        rows_d = x.shape
        self._check("fused_add_rms_norm residual", residual, ndim=2)
        self._check("fused_add_rms_norm weight", weight, ndim=1)
        if rows_d != residual.shape or weight.shape[0] != rows_d[1]:
            raise ValueError(f"fused_add_rms_norm: shapes x {rows_d}, residual {residual.shape}, weight {weight.shape}")
        rows, d = rows_d
        fill_out, fill_row, fill_n = np.uint64(0), np.uint64(0), 0  # null pointers: no fill
        if fill is not None:
            fill_out, fill_row = fill
            self._check("fused_add_rms_norm fill", fill_out, ndim=2)
            self._check("fused_add_rms_norm fill row", fill_row, ndim=1)
            fill_n = fill_row.shape[0]
            if fill_out.shape != (rows, fill_n):
                raise ValueError(f"fused_add_rms_norm: fill is {fill_out.shape}, expected {(rows, fill_n)}")
        out = cp.empty_like(residual)
        new_residual = cp.empty_like(residual)
        tail = (residual, weight, np.int32(d), np.float32(eps), fill_out, fill_row, np.int32(fill_n))
        if rows and d and sums:
            self._kernel("norm.cu", "fused_add_rms_norm_sums_kernel")(
                (rows,), (min(_SUMS_THREADS, _chunk_threads(d)),),
                (out, new_residual, x.parts, np.int32(x.parts.shape[0])) + tail)
        elif rows and d:
            self._kernel("norm.cu", "fused_add_rms_norm_kernel")((rows,), (_chunk_threads(d),), (out, new_residual, x) + tail)
        return out, new_residual

    def _gemm(self, x, weight, out, out_type: int, beta) -> None:
        """out[T, N] = x[T, K] @ weight[N, K]^T (+ beta * out), fp32 accumulation.

        cuBLAS is column-major: a row-major [R, C] array is a column-major [C, R] one. So
        out^T [N, T] = weight [N, K] (weight^T [K, N] in cuBLAS's eyes, transposed) @ x^T [K, T].
        """
        num_tokens, k = x.shape
        n = weight.shape[0]
        cuda_blas.gemm_ex(n, num_tokens, k, self._alpha.ctypes.data, weight.data.ptr, self._gemm_type, k,
                          x.data.ptr, self._gemm_type, x.strides[0] // x.itemsize,
                          beta.ctypes.data, out.data.ptr, out_type, n)

    def graph_capture(self):
        """Context for capturing this backend's ops into a CUDA graph on self.stream: cuBLAS bound to
        it and to a workspace of its own, allocated once and kept for the graphs' lifetime."""
        if self._capture_workspace is None:
            self._capture_workspace = cp.empty(cuda_blas.CAPTURE_WORKSPACE_BYTES, dtype=np.uint8)
        return cuda_blas.capturing(self.stream, self._capture_workspace)

    def _gemm_input(self, name: str, x):
        self._check(name, x, contiguous=False)
        if x.ndim != 2:
            if not x.flags.c_contiguous:
                raise ValueError(f"{name}: a {x.ndim}-D input must be C-contiguous")
            x = x.reshape(-1, x.shape[-1])
        if x.strides[1] != x.itemsize or x.strides[0] < x.shape[1] * x.itemsize:
            raise ValueError(f"{name}: rows must be contiguous (shape {x.shape}, strides {x.strides})")
        return x

    def linear(self, x, weight, bias=None, feeds_add_norm: bool = False):
        """x @ weight.T (+ bias); weight is [out, in] as in HF checkpoints. x [T, in] -> [T, out].
        feeds_add_norm: the caller passes the result only to an add + norm op (a sublayer's output,
        model/llama.py), so a product in K-slices may return its partial sums (KSliceSums)."""
        x2 = self._gemm_input("linear x", x)
        self._check("linear weight", weight, ndim=2)
        if weight.shape[1] != x2.shape[1]:
            raise ValueError(f"linear: x has {x2.shape[1]} features, weight is {weight.shape}")
        if bias is not None:
            self._check("linear bias", bias, ndim=1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"linear: bias has {bias.shape[0]} elements, weight has {weight.shape[0]} rows")
        small = None
        if self.skinny is not None and x2.shape[0] > self.gemv.max_rows and x2.shape[1]:
            small = self.skinny.linear(x2, weight, bias)  # past gemv.cu's rows, ahead of gemv_tc.cu
        if small is None and x2.shape[0] and x2.shape[1]:
            small = self.gemv.linear(x2, weight, bias)
        if small is None and self.wgmma is not None:
            small = self.wgmma.linear(x2, weight, bias)
        if small is not None:
            return small.reshape(*x.shape[:-1], weight.shape[0])
        if feeds_add_norm and bias is None and self.ksplit is not None and x.ndim == 2 \
                and x2.shape[0] > self.gemv.fused_rows and x2.shape[1]:
            parts = self.ksplit.partials(x2, weight)
            if parts is not None:
                return KSliceSums(parts)
        out = cp.empty((x2.shape[0], weight.shape[0]), dtype=self.compute_dtype)
        beta = self._beta0
        if bias is not None:
            if out.shape[0]:  # the bias in every row; cuBLAS then adds the product (beta = 1)
                self._kernel("embedding.cu", "broadcast_rows_kernel")(
                    (out.shape[0],), (256,), (out, bias, np.int32(out.shape[1])))
            beta = self._beta1
        if out.size and x2.shape[1]:
            if bias is None and self.ksplit is not None and self.ksplit(x2, weight, out):
                return out.reshape(*x.shape[:-1], weight.shape[0])
            self._gemm(x2, weight, out, self._gemm_type, beta)
        elif out.size and bias is None:
            out.fill(0)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    def logits(self, x, lm_head, out=None):
        """[B, H] x [V, H] -> [B, V] float32 logits (cuBLAS writes float32 directly), into `out`
        (a C-contiguous float32 [B, V] array) when given."""
        x2 = self._gemm_input("logits x", x)
        self._check("logits lm_head", lm_head, ndim=2)
        if lm_head.shape[1] != x2.shape[1]:
            raise ValueError(f"logits: x has {x2.shape[1]} features, lm_head is {lm_head.shape}")
        out = self._logits_out("logits", x2, lm_head, out)
        if out.size:
            self._gemm(x2, lm_head, out, _CUDA_R_32F, self._beta0)
        return out

    def _logits_out(self, op: str, x, lm_head, out):
        """`out` checked as the [T, V] float32 result of `op`, or a new one."""
        shape = (x.shape[0], lm_head.shape[0])
        if out is None:
            return cp.empty(shape, dtype=np.float32)
        self._check(f"{op} out", out, np.float32, ndim=2)
        if out.shape != shape:
            raise ValueError(f"{op}: out is {out.shape}, expected {shape}")
        return out

    def silu_and_mul(self, x):
        """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""
        self._check("silu_and_mul x", x, ndim=2)
        num_tokens, two_i = x.shape
        if two_i % 2:
            raise ValueError(f"silu_and_mul: last dim must be even, got {two_i}")
        out = cp.empty((num_tokens, two_i // 2), dtype=self.compute_dtype)
        if out.size:
            if num_tokens > 65535:  # tokens ride on grid.y
                raise ValueError(f"silu_and_mul: {num_tokens} tokens exceed 65535 per call")
            threads, cols_per_block = 128, 128 * 8  # SILU_THREADS, x SILU_COLS_PER_THREAD in activation.cu
            grid = (-(-(two_i // 2) // cols_per_block), num_tokens)
            self._kernel("activation.cu", "silu_and_mul_kernel")(grid, (threads,), (out, x, np.int32(two_i // 2)))
        return out

    def rotary_and_cache_write(self, q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, neox: bool):
        """Rotate q and k; write rotated k and v into the paged cache at slot_mapping (-1 skips).
        q [T, nh, hd], k and v [T, nkv, hd] (strided views of the qkv output are fine).
        Returns the rotated q, contiguous [T, nh, hd]."""
        return cuda_rotary.rotary_and_cache_write(self, q, k, v, positions, cos_sin, k_cache, v_cache,
                                                  slot_mapping, neox)

    def paged_attention(self, q, k_cache, v_cache, meta, scale: float):
        """Causal attention of q [T, nh, hd] over each request's cached K/V -> [T, nh, hd].
        Decode-only steps (max_query_len == 1) use a decode kernel (cuda_attention.decode_build);
        others the tensor-core prefill kernel. Rows no request owns come back as zeros. A `decode_workspace`
        attribute on meta (a cuda_attention.DecodeWorkspace) makes decode steps graph-safe."""
        return cuda_attention.paged_attention(self, q, k_cache, v_cache, meta, scale)

    def decode_short_context(self, num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                             max_context: int) -> int | None:
        """A context length below max_context up to which a decode step of num_tokens rows runs
        another attention kernel (cuda_attention.short_context_limit), or None: CUDA graphs capture
        a second graph for such a step size."""
        return cuda_attention.short_context_limit(num_tokens, num_kv_heads, head_dim, self.num_sms,
                                                  num_heads // num_kv_heads, max_context)

    def decode_workspace(self, max_tokens: int, num_heads: int, head_dim: int, max_context: int, row_stride):
        """Preallocated decode-attention scratch for CUDA graphs (see cuda_attention.DecodeWorkspace)."""
        return cuda_attention.DecodeWorkspace.allocate(max_tokens, num_heads, head_dim, max_context, row_stride)
