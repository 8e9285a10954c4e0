#!/usr/bin/env bash
# GPU kernel check, for the lent GPU machine. From the repository root:
#   bash bench/gpu_kernel_check.sh
# 1. pytest -m gpu tests/test_kernels_gpu.py (every kernel against the NumPy reference)
# 2. compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over a script that calls every
#    kernel once per dtype and attention path.
# Logs go to $OUT (the device tool's output folder) or /tmp/rvllm-gpu-check; the last lines
# printed are a summary table. Exit status: 0 only if every step passed.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
export RVLLM_CACHE="${RVLLM_CACHE:-/tmp/rvllm-cache}"
LOGS="${OUT:-/tmp/rvllm-gpu-check}"
mkdir -p "$LOGS"

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'EOF'
import cupy
from cupy.cuda import nvrtc
print("cupy", cupy.__version__, "| nvrtc", nvrtc.getVersion(), "| cc", cupy.cuda.Device().compute_capability,
      "| runtime", cupy.cuda.runtime.runtimeGetVersion(), "| driver", cupy.cuda.runtime.driverGetVersion())
EOF

rc_pytest=0
if [ -z "${SKIP_PYTEST:-}" ]; then  # SKIP_PYTEST=1 when the same call runs the GPU tests anyway
  echo "== pytest -m gpu tests/test_kernels_gpu.py"
  python3 -m pytest -m gpu tests/test_kernels_gpu.py -x -q -p no:cacheprovider -rs 2>&1 | tee "$LOGS/pytest.log" | tail -40
  rc_pytest=${PIPESTATUS[0]}
fi

SMOKE=/tmp/rvllm_kernel_smoke.py
cat > "$SMOKE" <<'EOF'
"""Calls every kernel once (both dtypes, both attention paths) on small inputs, for compute-sanitizer.
$SMOKE_DTYPES (default bfloat16,float16) picks the dtypes and their order."""
import os

import numpy as np

from rvllm.backend.cpu import AttentionMetadata
from rvllm.backend.cuda import CudaBackend
from rvllm.model.config import ModelSpec
from rvllm.model.rope import cos_sin_table

rng = np.random.default_rng(0)
vocab, hidden, inter, nh, nkv, bs, num_blocks = 100, 256, 384, 8, 2, 16, 8


def meta(b, qsl, seq_lens, tables, slots):
    q_lens = np.diff(qsl).tolist()
    return AttentionMetadata(b.from_host(np.asarray(qsl, np.int32)), b.from_host(np.asarray(seq_lens, np.int32)),
                             b.from_host(np.asarray(tables, np.int32)), b.from_host(np.asarray(slots, np.int32)),
                             max(q_lens), max(seq_lens), q_lens, list(seq_lens))


for dtype in os.environ.get("SMOKE_DTYPES", "bfloat16,float16").split(","):
    for hd in (64, 128):
        for attention in ("auto", "split"):
            # The small steps (6 and 2 rows) run gemv.cu's products with the auto attention path and
            # gemv_tc.cu's (tensor cores) with the split one.
            b = CudaBackend(dtype, attention=attention, gemv_max_rows=8 if attention == "auto" else 0, gemv_tc_max_rows=8)
            w = lambda *shape: b.weight(rng.standard_normal(shape).astype(np.float32) * shape[-1] ** -0.5)
            spec = ModelSpec(architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=hidden,
                             intermediate_size=inter, num_layers=1, num_heads=nh, num_kv_heads=nkv, head_dim=hd)
            cos_sin = b.from_host(cos_sin_table(spec, 256))
            table, norm_w, head_norm = w(vocab, hidden), w(hidden), w(hd)
            w_qkv, b_qkv, w_gu = w((nh + 2 * nkv) * hd, hidden), w((nh + 2 * nkv) * hd), w(2 * inter, hidden)
            w_down = w(hidden, inter)
            k_cache, v_cache = b.zeros((num_blocks, bs, nkv, hd)), b.zeros((num_blocks, bs, nkv, hd))
            tables = [[2, 5, 0], [7, 1, 3]]
            slot = lambda r, p: tables[r][p // bs] * bs + p % bs
            # Step 1: two prompts (13 and 20 tokens). Step 2: a decode row and a chunk after a prefix.
            # Step 3: decode only.
            steps = [([0, 13, 33], [13, 20], [slot(0, p) for p in range(13)] + [slot(1, p) for p in range(20)],
                      list(range(13)) + list(range(20))),
                     ([0, 1, 6], [14, 25], [slot(0, 13)] + [slot(1, p) for p in range(20, 25)], [13] + list(range(20, 25))),
                     ([0, 1, 2], [15, 26], [slot(0, 14), slot(1, 25)], [14, 25])]
            for i, (qsl, seq_lens, slots, positions) in enumerate(steps):
                print(f"smoke: {dtype} hd={hd} {attention} step {i + 1}", flush=True)  # locates sanitizer reports
                m = meta(b, qsl, seq_lens, tables, slots)
                t = qsl[-1]
                x = b.embedding(b.from_host(rng.integers(0, vocab, t).astype(np.int32)), table)
                h = b.rms_norm(x, norm_w, 1e-5)
                h, res = b.fused_add_rms_norm(h, x, norm_w, 1e-5)
                qkv = b.linear(h, w_qkv, b_qkv)
                q = qkv[:, : nh * hd].reshape(t, nh, hd)
                k = qkv[:, nh * hd: (nh + nkv) * hd].reshape(t, nkv, hd)
                v = qkv[:, (nh + nkv) * hd:].reshape(t, nkv, hd)
                q = b.rms_norm(q, head_norm, 1e-5)
                q = b.rotary_and_cache_write(q, k, v, b.from_host(np.asarray(positions, np.int32)), cos_sin,
                                             k_cache, v_cache, m.slot_mapping, True)
                o = b.paged_attention(q, k_cache, v_cache, m, hd ** -0.5)
                act = b.silu_and_mul(b.linear(h, w_gu))
                logits = b.logits(h, table)
                # gemv.cu at <= 8 rows (steps 2 and 3), the separate kernels + cuBLAS at 33 (step 1)
                fused_qkv, res2 = b.add_norm_linear(x, res, norm_w, 1e-5, w_qkv, b_qkv)
                fused_act, _ = b.add_norm_linear(x, None, norm_w, 1e-5, w_gu, act="silu_and_mul")
                down = b.linear(fused_act, w_down)
                # a step's inputs: ids -1 and -2 read from the sampled ids [5, 6]; block tables by
                # diffs: slot 1 gets ids 4, 9 from column 2; a padding row (slot -1)
                src = b.from_host(np.array([-1, 3, -2, 1, -1, 2, 0, 0, 2, 2, 4, 9, 40, 0], np.int32))
                dst, out_t, slot_t = b.zeros((14,), np.int32), b.zeros((2, 4), np.int32), b.zeros((3, 5), np.int32)
                b.unpack_step_inputs(dst, src, 0, 3, b.from_host(np.array([5, 6], np.int32)), out_t, slot_t,
                                     src[3:5], src[5:7], src[7:10], src[10:12], src[12:14], bs)
                b.synchronize()
                assert b.to_host(dst).tolist()[:3] == [5, 3, 6]
                assert b.to_host(out_t).tolist() == [[0, 0, 4, 0], [0, 0, 0, 0]]
                for name, arr in (("attention", o), ("mlp", act), ("logits", logits), ("fused qkv", fused_qkv),
                                  ("fused residual", res2), ("down", down)):
                    host = b.to_host(arr).astype(np.float32)
                    assert np.isfinite(host).all(), f"{dtype} hd={hd} {attention}: non-finite {name}"
# The sampler's kernels: penalty slots over three calls (reset, counts from the sampled tokens),
# seeded top-k/top-p with logprobs, bias and a suppressed id; the kept-set selection's fallback and the
# split race (plain and greedy rows too); then the all-greedy argmax path.
import cupy as cp

from rvllm.sampling.gpu_sampler import GpuSampler
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling_params import SamplingParams

for dtype in os.environ.get("SMOKE_DTYPES", "bfloat16,float16").split(","):
    print(f"smoke: {dtype} sampler", flush=True)
    sampler = GpuSampler(CudaBackend(dtype), seed=1, max_num_seqs=4)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5,
                             presence_penalty=0.1, logprobs=3, seed=7, logit_bias={5: 2.0}, min_tokens=5),
              SamplingParams(temperature=0.0, presence_penalty=0.3)]
    prompts, outs = [[1, 2, 3], [4, 5]], [[7], [8, 8]]
    for call in range(3):
        meta = SamplingMetadata.from_requests([(p, pr, o, 2) for p, pr, o in zip(params, prompts, outs)], ["a", "b"])
        got = sampler(cp.asarray(rng.standard_normal((2, vocab)), dtype=cp.float32), meta)
        for o, t in zip(outs, got.token_ids):
            assert 0 <= t < vocab
            o.append(t)
    # the kept-set selection's fallback to radix selects over the whole row: more candidates than
    # shared memory holds (one value everywhere), and a top-k cut below -32
    deep = SamplingMetadata.from_requests([(SamplingParams(temperature=1.0, top_p=0.5), [1], [], None),
                                           (SamplingParams(temperature=1.0, top_k=8191), [1], [], None)])
    x = cp.ones((2, 8192), cp.float32)
    x[1] = cp.linspace(0, -4000, 8192, dtype=cp.float32)
    assert len(sampler(x, deep).token_ids) == 2  # 2 rows x 8192: split over 4 blocks a row (select_*, race)
    mixed = SamplingMetadata.from_requests([(SamplingParams(temperature=0.9), [1], [], None),
                                            (SamplingParams(temperature=0.0), [1], [], None),
                                            (SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.01,
                                                            repetition_penalty=1.05), [1, 2], [3], None)])
    assert len(sampler(cp.asarray(rng.standard_normal((3, 8192)), dtype=cp.float32), mixed).token_ids) == 3
    greedy = SamplingMetadata.from_requests([(SamplingParams(temperature=0.0), [1], [], None)] * 3)
    assert len(sampler(cp.asarray(rng.standard_normal((3, vocab)), dtype=cp.float32), greedy).token_ids) == 3
print("smoke: every kernel ran")
EOF

echo "== smoke run (also fills the kernel cache)"
python3 "$SMOKE" 2>&1 | tail -5
rc_smoke=${PIPESTATUS[0]}

declare -A rc_san
for tool in ${SAN_TOOLS:-memcheck racecheck synccheck initcheck}; do
  echo "== compute-sanitizer --tool $tool"
  compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 20 python3 "$SMOKE" > "$LOGS/sanitizer-$tool.log" 2>&1
  rc_san[$tool]=$?
  tail -4 "$LOGS/sanitizer-$tool.log"
done

echo
echo "| step | exit code |"
echo "| --- | --- |"
echo "| pytest -m gpu | $rc_pytest |"
echo "| smoke | $rc_smoke |"
status=$(( rc_pytest != 0 || rc_smoke != 0 ))
for tool in ${SAN_TOOLS:-memcheck racecheck synccheck initcheck}; do
  echo "| sanitizer $tool | ${rc_san[$tool]} |"
  [ "${rc_san[$tool]}" -ne 0 ] && status=1
done
echo "logs: $LOGS"
exit $status
