"""CUDA graphs for decode steps (-m gpu): the same tokens and logits as eager steps.

Engines are made with enforce_eager=True and graphs captured explicitly through
runner.capture_graphs, so these tests do not depend on how the engine core wires the flag;
test_enforce_eager_controls_capture checks that wiring.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from rvllm.backend import cuda_attention
from rvllm.backend.cpu import CpuBackend
from rvllm.backend.cuda import is_cuda_available
from rvllm.runner.graphs import batch_size_buckets, choose_bucket
from tests.tiny_models import write_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_cuda_available(), reason="no CUDA device")]

MAX_SEQS = 32  # buckets 1, 2, 4, 8, 16, 24, 32
BATCHES = [1, 3, 8, 9, 17]
CPU = CpuBackend()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    # A sharp lm_head keeps greedy choices far from ties, so 16-bit rounding differences between
    # the eager and the captured GEMMs cannot flip them. qwen2 has a qkv bias (an elementwise copy
    # inside the graph), qwen3 per-head q/k norms.
    return write_model(tmp_path_factory.mktemp("graphs"), request.param, seed=7, sharp=True)


def _llm(model_dir, graphs: bool, **kw):
    from rvllm import LLM

    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", block_size=16, skip_tokenizer_init=True,
              num_gpu_blocks_override=512, max_num_seqs=MAX_SEQS, enforce_eager=True, **kw)
    if graphs:
        llm.engine.runner.capture_graphs(MAX_SEQS)
        assert llm.engine.runner.graphs.buckets == batch_size_buckets(MAX_SEQS)
    return llm


@pytest.fixture(scope="module", params=[0, 192], ids=["short-context-off", "short-context-graphs"])
def engines(tiny, request):
    """(eager engine, engine with graphs, short-context limit): with a limit (192 by default),
    short decode steps run the tensor-core kernel, and the graphs hold a second, short-context graph
    per bucket; the setting holds while the tests of this instance run."""
    saved = cuda_attention.TC_SHORT_CONTEXT
    cuda_attention.TC_SHORT_CONTEXT = request.param
    try:
        d = tiny[0]
        yield _llm(d, graphs=False), _llm(d, graphs=True), request.param
    finally:
        cuda_attention.TC_SHORT_CONTEXT = saved


def _prompts(vocab, n, seed):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, int(rng.integers(3, 41)))] for _ in range(n)]


@pytest.mark.parametrize("batch", BATCHES)
def test_greedy_graphs_match_eager(tiny, engines, batch):
    """Requests stop at different lengths, so the decode batch shrinks across bucket boundaries."""
    from rvllm import SamplingParams

    _, cfg, _ = tiny
    eager, graphs, _ = engines
    prompts = _prompts(cfg["vocab_size"], batch, seed=batch)
    params = [SamplingParams(temperature=0.0, max_tokens=5 + 3 * (i % 4), ignore_eos=True) for i in range(batch)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    before = graphs.engine.runner.graphs.num_replays
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    assert graphs.engine.runner.graphs.num_replays > before, "no decode step replayed a graph"
    assert got == want


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_logits_graph_vs_eager(tiny, engines, batch):
    """One decode step run eagerly and then from the graphs on the same inputs: with short-context
    graphs, the bucket's short one (these contexts are short: the tensor-core decode kernel, as the
    eager step) and its graph for every context (the split kernel). Logits agree within bf16
    tolerance (the GEMMs differ only in the padded row count)."""
    from rvllm import SamplingParams

    _, cfg, _ = tiny
    core, short_limit = engines[1].engine, engines[2]
    runner = core.runner
    ids = [f"logits-{batch}-{i}" for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for rid, p in zip(ids, _prompts(cfg["vocab_size"], batch, seed=100 + batch)):
        core.add_request(rid, p, params)
    try:
        sched = core.scheduler.schedule()  # the prompts
        out = runner.execute(sched)
        core.scheduler.update_from_output(sched, out.sampled, time.monotonic())
        sched = core.scheduler.schedule()  # one decode token each
        assert [s.num_new_tokens for s in sched.scheduled] == [1] * batch
        graphs = runner.graphs
        with runner.stream:
            _, _, logits, bucket = runner.forward_step(sched, use_graphs=False)
            assert bucket is None
            eager = runner.ops.to_host(logits)
            short_before = graphs.num_short_replays
            _, hidden, logits, bucket = runner.forward_step(sched, use_graphs=True)
            assert bucket == choose_bucket(graphs.buckets, batch) and hidden is None
            assert (bucket in graphs.short_graphs) == bool(short_limit)
            assert graphs.num_short_replays == short_before + bool(short_limit)
            short = runner.ops.to_host(logits)
            saved, graphs.short_graphs = graphs.short_graphs, {}
            try:
                _, _, logits, _ = runner.forward_step(sched, use_graphs=True)
            finally:
                graphs.short_graphs = saved
            full = runner.ops.to_host(logits)
    finally:
        core.abort_requests(ids)
    for graph in (short, full):
        assert graph.shape == eager.shape == (batch, cfg["vocab_size"])
        assert np.isfinite(graph).all()
        err = np.linalg.norm(graph - eager) / np.linalg.norm(eager)
        assert err < 2e-2, f"relative error {err:.3e}"
    # The first replay runs the eager step's kernels: the same choices. With short-context graphs the
    # full graph's split kernel rounds differently from the eager step's tensor-core one, so a near
    # tie may flip: its choice must be within bf16 rounding of the best eager logit.
    assert (short.argmax(axis=1) == eager.argmax(axis=1)).all()
    rows = np.arange(batch)
    best = eager.max(axis=1)
    assert (eager[rows, full.argmax(axis=1)] >= best - 2e-2 * np.abs(eager).max(axis=1)).all()


def test_enforce_eager_controls_capture(tiny):
    """The engine captures graphs unless enforce_eager (EngineCore passes the flag to the runner)."""
    from rvllm import LLM

    d = tiny[0]
    kw = dict(device="cuda", block_size=16, skip_tokenizer_init=True, num_gpu_blocks_override=64, max_num_seqs=20)
    on = LLM(str(d), **kw)
    assert on.engine.runner.graphs is not None and on.engine.runner.graphs.buckets == [1, 2, 4, 8, 16, 20]
    off = LLM(str(d), enforce_eager=True, **kw)
    assert off.engine.runner.graphs is None


# ---- the fixed-grid (graph) decode attention against the CPU reference --------------------------

@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def gpu(request):
    from rvllm.backend.cuda import CudaBackend

    return CudaBackend(request.param)


def _fixed_step(gpu, seed: str, lens, group: int, num_sms: int | None = None):
    """A fixed (graph) decode step of one row per context in `lens` and two padding requests (seq_len
    0), 2 KV heads of `group` query heads of size 128, 16-token blocks: a block table whose row stride
    is read on the device and differs from the view's width, and a decode workspace for contexts up to
    2048 (for num_sms SMs). Returns (the CPU's attention output, q, k and v caches on the device, the
    step's metadata, the workspace, the scale)."""
    from rvllm.backend.cuda import cp
    from rvllm.backend.cuda_attention import DecodeWorkspace
    from rvllm.runner.step_inputs import StepMetadata
    from tests.test_kernels_gpu import _attention_case

    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    pad, nkv, hd, bs = 2, 2, 128, 16
    (q, kc, vc, meta), (q_d, kc_d, vc_d, _) = _attention_case(gpu, rng, [(1, n) for n in lens], nkv, group, hd,
                                                              block_size=bs, pad_rows=pad)
    scale = hd ** -0.5
    ref = CPU.paged_attention(q, kc, vc, meta, scale)  # rows past the real requests: zeros
    r, w = len(lens) + pad, meta.block_tables.shape[1]
    wide = w + 37  # the view is wider than the rows: only the device stride is right
    flat = np.full(r * wide, -7, np.int32)  # garbage past the compact rows: never read
    flat[: len(lens) * w] = meta.block_tables.ravel()
    flat[len(lens) * w: r * w] = 0
    tables = cp.asarray(flat).reshape(r, wide)
    qsl = cp.asarray(np.arange(r + 1, dtype=np.int32))  # every request, padding ones too, owns one row
    seq_lens = cp.asarray(np.asarray(lens + [0] * pad, np.int32))
    ws = DecodeWorkspace.allocate(r, nkv * group, hd, 2048, cp.asarray(np.array([w], np.int32)), num_sms=num_sms)
    m = StepMetadata(qsl, seq_lens, tables, None, max_query_len=1, max_seq_len=1,  # the workspace's 2048 counts
                     query_lens_host=[1] * r, seq_lens_host=lens + [0] * pad, decode_workspace=ws)
    return ref, q_d, kc_d, vc_d, m, ws, scale


@pytest.mark.parametrize("build", list(cuda_attention.DECODE_SPLIT_BUILDS))
@pytest.mark.parametrize("lens", [[1, 511, 512, 513, 1500, 2048], [129, 2048]], ids=["6-requests", "2-requests"])
@pytest.mark.parametrize("num_sms", [1, 1000], ids=["blocks-loop-over-partitions", "a-block-per-partition"])
def test_fixed_grid_decode_attention(gpu, monkeypatch, build, num_sms, lens):
    """Each build of the split kernel in a fixed (graph) step: contexts across partition boundaries
    (with 1000 SMs: a warp's 8 keys per partition, 32 in the 128-thread builds and 128 in the wide
    one; 512 with one SM), two padding requests (seq_len 0), and a block table whose row stride is
    read on the device and differs from the view's width."""
    from tests.test_kernels_gpu import _force_decode_build, check

    _force_decode_build(monkeypatch, build)
    threads = cuda_attention.DECODE_SPLIT_BUILDS[build]
    ref, q_d, kc_d, vc_d, m, ws, scale = _fixed_step(gpu, f"fixed-{gpu.dtype}-{num_sms}-{len(lens)}", lens, 4, num_sms)
    r, nkv = len(lens) + 2, 2
    ws.tmp_out.fill(np.nan)
    out = gpu.paged_attention(q_d, kc_d, vc_d, m, scale)
    size, parts, grid_parts = ws.layout(r, nkv, threads)
    assert size == (512 if num_sms == 1 else threads // 32 * 8)
    check(gpu, out, ref, f"fixed-grid decode (grid {grid_parts} of {parts} partitions of {size} keys)")


@pytest.mark.parametrize("build", ["w1_t32_s3", "w4_t16_s3"])
def test_fixed_grid_decode_attention_tensor_cores(gpu, monkeypatch, build):
    """The tensor-core decode kernel in a fixed (graph) step: the block table's row stride read on
    the device, a view wider than the rows, padding requests; every context from one graph grid."""
    from tests.test_kernels_gpu import check

    name = f"paged_attention_decode_tc_{build}_kernel"
    monkeypatch.setattr(cuda_attention, "_TC_MIN_PAIRS_PER_SM", 0)
    monkeypatch.setattr(cuda_attention, "tc_build", lambda pairs, num_sms: name)
    ref, q_d, kc_d, vc_d, m, _, scale = _fixed_step(gpu, f"fixed-tc-{gpu.dtype}-{build}", [1, 33, 200, 1500], 7)
    out = gpu.paged_attention(q_d, kc_d, vc_d, m, scale)
    check(gpu, out, ref, "fixed-grid tensor-core decode")


@pytest.mark.parametrize("form", ["l2", "cluster"])
@pytest.mark.parametrize("num_sms", [1000, 56], ids=["64-key-partitions", "512-key-partitions"])
def test_fixed_grid_decode_attention_tensor_core_split(gpu, monkeypatch, num_sms, form):
    """The tensor-core build split over the context in a fixed (graph) step: the block table's row
    stride read on the device, padding requests; launched twice.
    - l2: partitions for the workspace's longest context (not the step's), the scratch and counters
      from the workspace (the counters return to zero);
    - cluster (sm_90): every context over the grid's blocks a cluster (16 or 8 with 1000 SMs, 4 or
      fewer with 56), sized on the device; the form combined in L2 must not run."""
    from rvllm.backend import cuda_decode_tc, cuda_launch
    from rvllm.backend.cuda import cp
    from tests.test_kernels_gpu import check

    name = cuda_attention.DECODE_TC_SPLIT
    monkeypatch.setattr(cuda_attention, "decode_build", lambda *a: (name, 128))
    monkeypatch.setattr(gpu, "num_sms", num_sms)
    if form == "cluster":
        if not cuda_launch.clusters_available():
            pytest.skip("thread block clusters need sm_90")
        monkeypatch.setattr(cuda_decode_tc, "_tc_split_launch", lambda *a: pytest.fail("the form combined in L2 ran"))
    else:
        monkeypatch.setattr(cuda_attention, "TC_CLUSTER", False)
    lens = [1, 33, 200, 1500, 2048]
    ref, q_d, kc_d, vc_d, m, ws, scale = _fixed_step(gpu, f"fixed-tc-split-{gpu.dtype}-{num_sms}", lens, 6, num_sms)
    assert cuda_attention.tc_split_partition(len(lens) + 2, 2, 2048, num_sms) == (64 if num_sms == 1000 else 512)
    for _ in range(2):
        if form == "l2":  # the cluster form uses neither the scratch nor the counters
            ws.tmp_out.fill(np.nan)
        out = gpu.paged_attention(q_d, kc_d, vc_d, m, scale)
        check(gpu, out, ref, f"fixed-grid tensor-core split decode ({form})")
        if form == "l2":
            assert not cp.asnumpy(ws.counters).any()


def test_async_scheduling_matches_in_order_steps(tiny):
    """Graph replays with inputs filled from the previous step's sampled ids on the device give the
    tokens and logprobs of in-order steps; requests end at different steps while one is in flight."""
    from rvllm import SamplingParams

    d, cfg, _ = tiny
    prompts = _prompts(cfg["vocab_size"], 24, seed=3)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i, max_tokens=1 + 3 * (i % 5), ignore_eos=True,
                             logprobs=2 if i % 3 == 0 else None) for i in range(24)]
    runs = []
    for async_scheduling in (False, True):
        llm = _llm(d, graphs=True, async_scheduling=async_scheduling)
        outs = llm.generate(prompts, params)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                      None if o.outputs[0].logprobs is None else
                      [{t: round(v.logprob, 4) for t, v in e.items()} for e in o.outputs[0].logprobs]) for o in outs])
        placeholders = llm.engine.runner.num_placeholder_tokens
        assert (placeholders > 0) == async_scheduling
        assert llm.engine.runner.graphs.num_replays > 0
        del llm
    assert runs[1] == runs[0]


def test_penalties_keep_async_scheduling_and_match_in_order_steps(tiny):
    """Requests with repetition, frequency and presence penalties (the GPU sampler's per-slot state
    on the device) give the same tokens with async scheduling as in order, and no longer turn it off:
    placeholder tokens are read on the device while penalized requests run. 24 requests, ending at
    different steps (slot eviction and reuse are covered by tests/test_penalty_slots.py)."""
    from rvllm import SamplingParams

    d, cfg, _ = tiny
    prompts = _prompts(cfg["vocab_size"], 24, seed=5)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=100 + i, max_tokens=2 + 3 * (i % 4),
                             ignore_eos=True, repetition_penalty=1.3 if i % 3 else 1.0,
                             frequency_penalty=0.5 if i % 4 else 0.0, presence_penalty=0.2 if i % 5 else 0.0)
              for i in range(24)]
    runs = []
    for async_scheduling in (False, True):
        llm = _llm(d, graphs=True, async_scheduling=async_scheduling)
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        assert (llm.engine.runner.num_placeholder_tokens > 0) == async_scheduling
        del llm
    assert runs[1] == runs[0]
