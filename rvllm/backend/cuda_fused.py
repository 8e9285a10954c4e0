"""CudaBackend's composite ops (backend/fused.py): one kernel where kernels_cu/gemv.cu or gemv_rope.cu
takes the step (decode-sized steps, cuda_gemv.SmallBatchGemv), the separate ops otherwise.

FusedOps is a part of CudaBackend (as cuda_upload.DeviceTransfers is): it uses the backend's `gemv`,
`wgmma`, `_check`, `_gemm` and its basic ops.
"""
from __future__ import annotations

from rvllm.backend import cuda_decode_tc, cuda_rotary
from rvllm.backend.cuda_ksplit import KSliceSums
from rvllm.backend.fused import add_norm_linear as _add_norm_linear, add_norm_logits as _add_norm_logits
from rvllm.backend.fused import add_norm_qkv_rotary as _add_norm_qkv_rotary, split_qkv as _split_qkv

try:  # cupy is an optional dependency (the cuda12 / cuda13 extras)
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install
    cp = None


class FusedOps:
    def add_norm_linear(self, x, residual, norm_weight, eps: float, weight, bias=None, act=None):
        """(act(rms_norm(x + residual) @ weight.T + bias), x + residual); see backend/fused.py.
        One kernel (gemv.cu) for steps of up to gemv.max_rows rows, the separate ops otherwise."""
        x = self._norm_input(x, residual)
        self._check_add_norm(x, residual, norm_weight, weight, bias, act)
        if x.shape[0] and x.shape[1]:
            fused = None if isinstance(x, KSliceSums) else self.gemv.add_norm_linear(x, residual, norm_weight, eps,
                                                                                    weight, bias, act)
            if fused is not None:
                return fused
            if (residual is not None and self.skinny is not None and x.shape[0] > self.gemv.max_rows
                    and self.skinny.fits(*x.shape, weight, act, bias)):
                # The norm kernel (it also sums K-slice partials), then skinny_gemm.cu with the bias
                # or SiLU-and-mul in its epilogue.
                normed, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps)
                out = self.skinny.linear(normed, weight, bias, act)
                if out is None:  # normed's rows not as the copy engine needs them: the general path
                    out = self.linear(normed, weight, bias)
                    out = self.silu_and_mul(out) if act == "silu_and_mul" else out
                return out, residual
            if bias is not None and residual is not None and not (self.wgmma is not None and self.wgmma.fits(x, weight)):
                # cuBLAS with a bias: the norm kernel writes the bias rows that the product adds to.
                y = cp.empty((x.shape[0], weight.shape[0]), dtype=self.compute_dtype)
                normed, residual = self.fused_add_rms_norm(x, residual, norm_weight, eps, fill=(y, bias))
                self._gemm(normed, weight, y, self._gemm_type, self._beta1)
                return (self.silu_and_mul(y) if act == "silu_and_mul" else y), residual
        return _add_norm_linear(self, x, residual, norm_weight, eps, weight, bias, act)

    def _norm_input(self, x, residual):
        """x for the composite ops: a KSliceSums (linear's feeds_add_norm) stays one where the add +
        norm runs as fused_add_rms_norm, which sums it as it reads; where a gemv kernel would take
        the step (or wgmma, or there is no residual to add) it is reduced first."""
        if isinstance(x, KSliceSums) and (residual is None or self.wgmma is not None
                                          or x.shape[0] <= self.gemv.fused_rows):
            return self.ksplit.reduce(x.parts)
        return x

    def _check_add_norm(self, x, residual, norm_weight, weight, bias, act, op: str = "add_norm_linear") -> None:
        """add_norm_linear's (or `op`'s) argument checks (ValueError)."""
        if isinstance(x, KSliceSums):
            self._check(f"{op} partial sums", x.parts, dtype="float32", ndim=3)
        else:
            self._check(f"{op} x", x, ndim=2)
        self._check(f"{op} weight", weight, ndim=2)
        self._check(f"{op} norm weight", norm_weight, ndim=1)
        if residual is not None:
            self._check(f"{op} residual", residual, ndim=2)
            if residual.shape != x.shape:
                raise ValueError(f"{op}: x {x.shape} and residual {residual.shape} differ")
        if weight.shape[1] != x.shape[1] or norm_weight.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: x {x.shape}, norm weight {norm_weight.shape}, weight {weight.shape}")
        if bias is not None:
            self._check(f"{op} bias", bias, ndim=1)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"{op}: bias has {bias.shape[0]} elements, weight has {weight.shape[0]} rows")
        if act == "silu_and_mul" and weight.shape[0] % 2:
            raise ValueError(f"{op}: silu_and_mul needs an even number of weight rows, got {weight.shape[0]}")

    def add_norm_qkv_rotary(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                            k_cache, v_cache, slot_mapping, neox: bool):
        """(rotated q [T, nh, hd], x + residual), rotated k and v into the paged cache; see
        backend/fused.py. One kernel (gemv_rope.cu) for steps of 1-2 rows, the separate ops otherwise."""
        x = self._norm_input(x, residual)
        fused = self._qkv_rotary_gemv(x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                      k_cache, v_cache, slot_mapping, neox)
        if fused is not None:
            return fused
        return _add_norm_qkv_rotary(self, x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                    k_cache, v_cache, slot_mapping, neox)

    def qkv_rotary_attention(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                             k_cache, v_cache, meta, neox: bool, scale: float):
        """(attention output [T, nh, hd], x + residual), rotated k and v into the paged cache; see
        backend/fused.py. Rotary and the cache write run inside the qkv product's kernel where it
        takes them (gemv_rope.cu, 1-2 rows), else inside decode attention where
        cuda_decode_tc.decode_rope takes the step (off by default), else as their own kernel."""
        x = self._norm_input(x, residual)
        q_res = self._qkv_rotary_gemv(x, residual, norm_weight, eps, weight, bias, heads, positions, cos_sin,
                                      k_cache, v_cache, meta.slot_mapping, neox)
        if q_res is None:
            qkv, residual = self.add_norm_linear(x, residual, norm_weight, eps, weight, bias)
            out = cuda_decode_tc.decode_rope(self, qkv, heads, positions, cos_sin, k_cache, v_cache, meta, scale, neox)
            if out is not None:
                return out, residual
            q, k, v = _split_qkv(qkv, heads)
            q_res = self.rotary_and_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
                                                neox), residual
        return self.paged_attention(q_res[0], k_cache, v_cache, meta, scale), q_res[1]

    def _qkv_rotary_gemv(self, x, residual, norm_weight, eps: float, weight, bias, heads, positions, cos_sin,
                         k_cache, v_cache, slot_mapping, neox: bool):
        """Checks add_norm_qkv_rotary's inputs; its result from gemv_rope.cu's one kernel, or None
        where that kernel does not take the step."""
        self._check_add_norm(x, residual, norm_weight, weight, bias, None)
        nh, nkv, hd = heads
        if weight.shape[0] != (nh + 2 * nkv) * hd:
            raise ValueError(f"add_norm_qkv_rotary: weight {weight.shape} is not {(nh + 2 * nkv) * hd} rows of q, k, v")
        cuda_rotary.check_rotary_inputs(self, positions, cos_sin, k_cache, v_cache, slot_mapping, x.shape[0], nkv, hd)
        if not (x.shape[0] and x.shape[1]) or isinstance(x, KSliceSums):
            return None
        return self.gemv.add_norm_qkv_rotary(x, residual, norm_weight, eps, weight, bias, heads, positions,
                                             cos_sin, k_cache, v_cache, slot_mapping, neox)

    def add_norm_logits(self, x, residual, norm_weight, eps: float, lm_head, out=None):
        """rms_norm(x + residual) @ lm_head.T, float32 [T, V] (into `out` when given); see
        backend/fused.py. One kernel (gemv.cu) for 1-row steps, the norm and cuBLAS otherwise."""
        x = self._norm_input(x, residual)
        self._check_add_norm(x, residual, norm_weight, lm_head, None, None, "add_norm_logits")
        out = self._logits_out("add_norm_logits", x, lm_head, out)
        if x.size and not isinstance(x, KSliceSums) and \
                self.gemv.add_norm_logits(x, residual, norm_weight, eps, lm_head, out) is not None:
            return out
        return _add_norm_logits(self, x, residual, norm_weight, eps, lm_head, out)
