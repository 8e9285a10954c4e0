"""Every kernel file compiles in every specialization (fp16/bf16 x head sizes) for sm_80 and sm_90.

Runs without a GPU: NVRTC from the nvidia-cuda-nvrtc-cu12 wheel through ctypes, with the same
options (rvllm.backend.nvrtc.compile_options) and the same source preprocessing as run time.
"""
from __future__ import annotations

import re

import pytest

from rvllm.backend import nvrtc
from rvllm.backend.nvrtc_check import compile_kernel_file, load_nvrtc, nvrtc_version

try:
    load_nvrtc()
    _NVRTC_ERROR = None
except OSError as e:  # the test extra installs the wheel; say so rather than skip quietly
    _NVRTC_ERROR = str(e)

ARCHS = (80, 90)
CASES = [(f, dt, hd, arch) for f in nvrtc.KERNELS for dt, hd in nvrtc.specializations(f) for arch in ARCHS
         if nvrtc.compiles_for(f, arch)]  # gemm_wgmma.cu: sm_90a only


def _id(case):
    f, dt, hd, arch = case
    return f"{f.removesuffix('.cu')}-{dt}-{'hd' + str(hd) if hd else 'any'}-sm{arch}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_compiles(case):
    if _NVRTC_ERROR:
        pytest.fail(_NVRTC_ERROR)
    file, dtype, head_dim, arch = case
    cubin, log = compile_kernel_file(file, arch, dtype, head_dim, extra_options=("-Xptxas=-v",))
    assert cubin[:4] == b"\x7fELF", "NVRTC did not return a cubin"
    names, _ = nvrtc.KERNELS[file]
    for name in names:  # extern "C" entry points appear unmangled in the ELF symbol table
        assert name.encode() + b"\0" in cubin, f"{file}: kernel {name} missing from the cubin"
    report = [line.strip() for line in log.splitlines() if re.search(r"registers|spill|warning", line)]
    print(f"\n{_id(case)} (NVRTC {'.'.join(map(str, nvrtc_version()))}): " + " | ".join(report))
    assert "warning" not in log.lower(), log
    # Register arrays must stay in registers: a stack frame means local memory (HOPPER.md).
    frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", log)]
    if file == "attention_prefill.cu":
        assert frames and max(frames) == 0, f"prefill kernel uses local memory:\n{log}"


def test_options_are_shared():
    """The run-time compiler and CI use one option builder; pin what it must contain."""
    opts = nvrtc.compile_options("90", "bfloat16", 128)
    assert "--gpu-architecture=sm_90" in opts and "-DRVLLM_BF16" in opts and "-DHEAD_DIM=128" in opts
    assert "-DRVLLM_FP16" in nvrtc.compile_options(80, "float16")
    assert "--gpu-architecture=compute_90" in nvrtc.compile_options(90, "float16", ptx=True)
    with pytest.raises(ValueError):
        nvrtc.compile_options(90, "float32")


def test_wgmma_file_builds_only_for_sm90a():
    """gemm_wgmma.cu's wgmma exists only on sm_90a: it compiles for that target, and asking for it on
    another architecture is an error, not a build that fails on the GPU."""
    assert nvrtc.target_arch("gemm_wgmma.cu", 90) == "90a" and nvrtc.target_arch("norm.cu", 90) == "90"
    assert not nvrtc.compiles_for("gemm_wgmma.cu", 80) and not nvrtc.compiles_for("gemm_wgmma.cu", 100)
    with pytest.raises(ValueError, match="sm_90a"):
        nvrtc.target_arch("gemm_wgmma.cu", 80)


def test_wgmma_wrapper_choices():
    """cuda_wgmma's host side: the token tile that holds a step, the split of K (one wave of one
    block an SM, at least 4 K tiles a split, no empty split), the opt-in setting's parsing."""
    from rvllm.backend import cuda_wgmma as w

    assert [w.token_tile(r)[0] for r in (1, 64, 65, 128, 129, 256, 300)] == [64, 64, 128, 128, 256, 256, 256]
    for bn, stages in w.WGMMA_BUILDS:  # every build fits an H100's 227 KiB of shared memory a block
        assert w.smem_bytes(bn, stages) <= 227 * 1024
    assert w.choose_splits(12, 140, 132) == 11  # qwen2.5-1.5b down at 256 rows: 12 tiles
    assert w.choose_splits(140, 24, 132) == 1  # gate_up: the tiles alone fill the GPU
    assert w.choose_splits(16, 24, 132) == 6  # qkv: 8 would leave splits of 3 K tiles
    for tiles, k_tiles in ((1, 1), (1, 5), (3, 140), (40, 7)):
        s = w.choose_splits(tiles, k_tiles, 132)
        kps = -(-k_tiles // s)
        assert 1 <= s <= w.MAX_SPLITS and (s - 1) * kps < k_tiles  # the last split has K tiles
    assert w.parse_rows("16-256") == (16, 256) and w.parse_rows("0-0") == (0, 0)
    for bad in ("256", "256-16", "a-b", "1-2-3"):
        with pytest.raises(ValueError, match="RVLLM_WGMMA_ROWS"):
            w.parse_rows(bad)


def test_skinny_wrapper_choices():
    """cuda_skinny's host side: the token tile (wgmma's n) that holds a step, a block of each build
    (its stages, receiving buffer and sums) fits an SM's shared memory, a grid of clusters never has
    more clusters than tiles (each takes whole tiles), the cluster size for a product's tiles and
    steps, the setting's parsing and its default (3-16 rows)."""
    from rvllm.backend import cuda_skinny as s

    assert [s.token_tile(r) for r in (1, 3, 8, 9, 16)] == [8, 8, 8, 16, 16]
    for bn in s.SKINNY_TOKENS:
        assert s.BLOCKS_PER_SM * (s.smem_bytes(bn) + s.static_smem_bytes(bn) + 1024) <= 228 * 1024
    assert s.grid_clusters(280, 33) == 33 and s.grid_clusters(24, 33) == 24 and s.grid_clusters(0, 33) == 1
    assert s.k_steps(14336) == 56 and s.k_steps(1000) == 4 and s.k_steps(256) == 1
    h200 = {2: 66, 4: 30, 8: 15}  # clusters of each size an H200 held at one block an SM
    # The busiest block's steps at 2 / 4 / 8 blocks a cluster, and what each measured at 8 rows:
    assert s.cluster_shape(64, 56, h200) == (2, 64)  # llama-3.1-8b's down: 28 / 42 / 35 (29.6 / 36.6 / 33.3 us)
    assert s.cluster_shape(72, 14, h200) == (8, 15)  # qwen2.5-7b's qkv: 14 / 11 / 9 (14.7 / 13.7 / 13.4)
    assert s.cluster_shape(24, 35, h200) == (4, 24)  # qwen2.5-1.5b's down: 18 / 9 / 9 (11.9 / 9.1 / 9.6)
    assert s.cluster_shape(24, 6, h200) == (2, 24)  # qwen2.5-1.5b's o_proj: 3 / 2 / 2 (3.6 / 4.2 / 5.0)
    assert s.cluster_shape(3, 1, {8: 15}) == (8, 3)  # an override leaves one size
    assert s.parse_rows("3-16") == (3, 16) and s.parse_rows("0-0") == (0, 0)
    assert s.DEFAULT_ROWS == (3, 16)
    for bad in ("16", "16-3", "a-b", "3-32"):
        with pytest.raises(ValueError, match="RVLLM_SKINNY_ROWS"):
            s.parse_rows(bad)


def test_source_has_no_includes_left():
    """nvrtc.kernel_source pastes common.cuh in; NVRTC gets one self-contained program."""
    for file in nvrtc.KERNELS:
        src = nvrtc.kernel_source(file)
        assert not re.search(r"^\s*#\s*include", src, re.MULTILINE), file
        assert "block_sum" in src, file


def test_broken_kernel_reports_file_and_log():
    from rvllm.backend.nvrtc_check import compile_source

    if _NVRTC_ERROR:
        pytest.fail(_NVRTC_ERROR)
    with pytest.raises(RuntimeError, match=r"kernels_cu/broken\.cu[\s\S]*undefined_name"):
        compile_source('extern "C" __global__ void k() { undefined_name = 1; }', "broken.cu",
                       nvrtc.compile_options(90, "float16"))


def test_decode_partition_size_spreads_small_steps_and_respects_the_combine_bound():
    """The decode kernel's partition size (chosen on the host, so checked here without a GPU): short
    partitions for few (row, KV head) pairs, the kernel's maximum for large steps, never more
    partitions than the combine step holds, and never shrinking as the step grows."""
    from rvllm.backend.cuda_attention import partition_size

    limit = nvrtc.DECODE_PARTITION_SIZE
    assert partition_size(1, 2, 8192, 132) == 32
    assert partition_size(1, 2, 8192, 132, threads=512) == 128  # the wide build: 16 warps x 8 keys
    assert partition_size(256, 2, 8192, 132) == limit
    assert partition_size(1, 2, limit * limit, 132) == limit  # 512 partitions of 512 keys
    assert partition_size(1, 2, limit * 32 + 1, 132) == 64  # 32-key partitions would be 513
    sizes = [partition_size(t, 4, 4096, 132) for t in range(1, 600)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 and 32 <= s <= limit for s in sizes)
    for t in (1, 3, 8, 64, 512):
        assert -(-100_000 // partition_size(t, 1, 100_000, 132)) <= limit


def test_decode_workspace_reserves_every_layout():
    """The graphs' decode scratch (sized without knowing the KV-head count) holds the partitions of
    every step size and KV-head count, in whichever build (wide, 128-thread) layout() picks."""
    from rvllm.backend.cuda_attention import DecodeWorkspace

    for num_sms in (1, 132, 1000):
        ws = DecodeWorkspace(None, None, None, None, None, max_tokens=64, num_heads=16, head_dim=128,
                             max_context=4096, num_sms=num_sms)
        reserved = ws.reserved_rows()
        for nkv in (1, 2, 4, 8, 16):
            for t in range(1, 65):
                assert t * ws.num_heads * ws.layout(t, nkv)[1] <= reserved, (num_sms, nkv, t)


def test_decode_build_names_a_compiled_entry_point():
    """Every step size, KV-head count, head size and group gets a decode kernel that kernels_cu/
    compiles (nvrtc.KERNELS) with the thread count that entry point is built for."""
    from rvllm.backend import cuda_attention

    compiled = set(nvrtc.KERNELS["attention_decode.cu"][0]) | set(nvrtc.KERNELS["attention_decode_tc.cu"][0])
    for num_sms in (1, 132):
        for nkv in (1, 2, 8):
            for hd in (64, 80, 128, 256):
                for group in (1, 6, 16, 32):
                    for t in (1, 4, 9, 33, 66, 200, 512, 4096):
                        name, threads = cuda_attention.decode_build(t, nkv, hd, num_sms, group)
                        assert name in compiled, name
                        if name in cuda_attention.DECODE_TC_BUILDS:
                            assert threads == 32 * cuda_attention.DECODE_TC_BUILDS[name][0]
                            assert hd % 16 == 0 and hd <= 128 and group <= 16
                            if name == cuda_attention.DECODE_TC_SPLIT:  # long contexts, few pairs an SM
                                assert t * nkv < cuda_attention._TC_MIN_PAIRS_PER_SM * num_sms
                            else:  # one block an SM at most for the build with the small carveout
                                assert (name == cuda_attention.DECODE_TC_ONE_PER_SM) == (t * nkv <= num_sms)
                        else:
                            assert threads in (nvrtc.DECODE_NUM_THREADS, nvrtc.DECODE_WIDE_THREADS)


def test_tc_split_partition_spreads_the_longest_context_over_the_sms():
    """cuda_attention.tc_split_partition (host side): whole 64-key rounds of the 4-warp build; the
    step's (row, KV head) pairs times the partitions of the longest context stay within about one
    block an SM; contexts up to the graphs' longest fit the partitions the decode workspace
    reserves; RVLLM_DECODE_TC_SPLIT's build takes the small steps with long contexts."""
    from rvllm.backend import cuda_attention
    from rvllm.backend.cuda_attention import tc_split_partition

    assert tc_split_partition(1, 2, 1024, 132) == 64  # qwen2.5-1.5b batch 1: 16 blocks a KV head
    assert tc_split_partition(1, 2, 8192, 132) == 128  # 64 partitions a KV head
    assert tc_split_partition(32, 2, 8192, 132) == 4096
    for t in (1, 2, 3, 8, 16, 32):
        for nkv in (1, 2, 4, 8):
            for ctx in (1, 63, 64, 65, 193, 1000, 4096, 8192):
                size = tc_split_partition(t, nkv, ctx, 132)
                parts = -(-ctx // size)
                assert size % 64 == 0 and t * nkv * parts <= max(132, t * nkv)
                assert parts <= 512  # the scratch's bound (nvrtc.DECODE_PARTITION_SIZE partitions)
    ws = cuda_attention.DecodeWorkspace(None, None, None, None, None, 32, 12, 128, 8192, 132)
    for t in range(1, 33):
        assert t * 12 * -(-8192 // tc_split_partition(t, 2, 8192, 132)) <= ws.reserved_rows()
    assert cuda_attention.decode_build(1, 2, 128, 132, 6, 1024)[0] == cuda_attention.DECODE_TC_SPLIT
    assert cuda_attention.decode_build(1, 2, 128, 132, 6, 100)[0] == cuda_attention.DECODE_TC_ONE_PER_SM


def test_cluster_blocks_spread_few_pairs_over_the_sms():
    """cuda_decode_tc.cluster_blocks (host side): the split build's cluster form takes a power of two
    blocks a cluster, at most 16, with the step's (row, KV head) pairs times the blocks within the
    SMs; none (1: the form combined in L2) when a cluster of 2 would pass them."""
    from rvllm.backend.cuda_decode_tc import cluster_blocks

    assert [cluster_blocks(p, 132) for p in (1, 2, 8, 9, 16, 33, 34, 66, 67)] == [16, 16, 16, 8, 8, 4, 2, 2, 1]
    assert cluster_blocks(2, 132, max_blocks=8) == 8 and cluster_blocks(2, 1) == 1
    for pairs in range(1, 200):
        blocks = cluster_blocks(pairs, 132)
        assert blocks & (blocks - 1) == 0 and blocks <= 16
        assert blocks == 1 or pairs * blocks <= 132
        assert blocks == 16 or pairs * blocks * 2 > 132


def test_gemv_split_k_covers_k_with_short_segments():
    """gemv.cu's work split (host side): in the gemv form ks warps per output unit cover K in
    segments of about one stretch each (of whole stretches past 8 warps); the SiLU form takes a
    unit per warp; the rotary form (gemv_rope.cu) segments of at most 128 chunks up to 8 warps; a
    block holds whole units."""
    from rvllm.backend.cuda_gemv import split_k

    for k in (8, 64, 1536, 4096, 8960, 14336, 18944, 29568):
        chunks = k // 8
        for form in ("gemv", "silu", "rope"):
            ks, rpb, seg = split_k(k, form)
            assert 1 <= ks <= 8 and ks * rpb <= 8 and rpb >= 1
            assert ks * seg >= chunks and (ks - 1) * seg < chunks  # every segment is used
        ks, _, seg = split_k(k, "gemv")
        stretches = -(-seg // 256)
        assert seg <= 256 or ks > 4, "a long K uses more warps before longer segments"
        assert seg > 256 * (stretches - 1) + 128 or stretches == 1, "the last stretch of a segment is over half used"
        assert split_k(k, "silu") == (1, 8, chunks)
        ks, _, seg = split_k(k, "rope")
        assert seg <= 128 or ks == 8
    assert split_k(8960, "gemv") == (5, 1, 224) and split_k(1536, "gemv") == (1, 8, 192)
    assert split_k(14336, "gemv") == (7, 1, 256)  # one whole stretch a segment
    assert split_k(18944, "gemv") == (5, 1, 474)  # two stretches, the second 85% used (8 warps: 16%)
    assert split_k(1536, "rope") == (2, 4, 96) and split_k(3584, "rope") == (4, 2, 112)  # qwen2.5-1.5b, 7b


def test_silu_block_warps_fills_the_last_pass():
    """The SiLU form's block size (host side): 8 warps unless another size wastes at least 3% less
    warp-slot time on a last pass shared by few warps. Resident blocks as cuda_gemv._resident_blocks
    counts them by registers (qwen2.5-1.5b's 3-chunk form 88 a thread, 80 in its bf16 1-row build, the
    4-chunk form 112)."""
    from rvllm.backend.cuda_gemv import silu_block_warps

    def resident(regs):
        return lambda warps: min(2048 // (32 * warps), 65536 // (regs * 32 * warps))

    assert silu_block_warps(8960, 1536, 132, resident(88)) == 6  # qwen2.5-1.5b: 4.24 passes -> 3.77
    assert silu_block_warps(8960, 1536, 132, resident(80)) == 8  # its bf16 1-row build: 3 blocks of 8, 2.83 passes
    assert silu_block_warps(18944, 3584, 132, resident(112)) == 8  # qwen2.5-7b: 6 warps only tie
    assert silu_block_warps(14336, 4096, 132, resident(112)) == 8  # llama-3.1-8b
    assert silu_block_warps(1536, 576, 132, resident(88)) == 8  # smollm2-135m: one pass
    assert silu_block_warps(8960, 7000, 132, resident(88)) == 8  # 6 warps' threads cannot hold a row of K
    for units in range(1, 40000, 997):
        warps = silu_block_warps(units, 1536, 132, resident(88))
        assert 4 <= warps <= 8


def test_k_slices_only_long_k_products_over_few_tiles():
    """backend/cuda_ksplit.k_slices (host side): the down projections of the presets split in K up to
    the row counts measured to gain on an H200 (132 SMs), every other product never; slices are
    16-byte aligned and at least MIN_SLICE_K long."""
    from rvllm.backend.cuda_ksplit import MIN_SLICE_K, k_slices

    assert [k_slices(r, 1536, 8960, 132) for r in (3, 64, 128, 256, 512, 1024)] == [4, 4, 4, 4, 2, 1]  # qwen2.5-1.5b
    assert [k_slices(r, 3584, 18944, 132) for r in (3, 64, 128, 256, 257, 512)] == [2, 2, 2, 2, 1, 1]  # qwen2.5-7b
    assert [k_slices(r, 4096, 14336, 132) for r in (3, 128, 256, 512)] == [2, 2, 2, 1]  # llama-3.1-8b
    # qkv, o_proj and gate_up of the presets (llama-3.1-8b's qkv lost at every row count in K-slices)
    for n, k in ((2048, 1536), (1536, 1536), (17920, 1536), (4608, 3584), (3584, 3584), (6144, 4096), (4096, 4096),
                 (28672, 4096), (576, 1536)):
        assert all(k_slices(r, n, k, 132) == 1 for r in (3, 8, 64, 128, 256, 512)), (n, k)
    for k in range(8, 40000, 8):
        s = k_slices(3, 96, k, 132)
        assert s in (1, 2, 4, 8) and k % (8 * s) == 0 and (s == 1 or k // s >= MIN_SLICE_K)


def test_gemv_silu_stretch_chunks_takes_3_only_with_no_more_stretches():
    """The SiLU form's stretch width (chunks a lane a row): 3 where a unit then needs as many
    stretches as with 4 (so fewer lanes idle), else 4."""
    from rvllm.backend.cuda_gemv import silu_stretch_chunks

    def stretches(k, u):
        return -(-(k // 8) // (32 * u))

    for k in range(8, 16385, 8):
        u = silu_stretch_chunks(k)
        assert u in (3, 4)
        assert (u == 3) == (stretches(k, 3) == stretches(k, 4))
    # qwen2.5-1.5b: two stretches of 96 chunks, not 128 + 64; 7b and Llama 8B keep 4 (fewer stretches)
    assert silu_stretch_chunks(1536) == 3 and silu_stretch_chunks(3584) == 4 and silu_stretch_chunks(4096) == 4


def test_logits_stretch_chunks_takes_6_only_with_no_more_stretches():
    """The logits form's stretch width: 6 chunks a lane where a split_k segment then needs as many
    stretches as with 8, else 8 (whose build has no 6-chunk form's 3 blocks an SM to gain)."""
    from rvllm.backend.cuda_gemv import logits_stretch_chunks, split_k

    for k in range(8, 16385, 8):
        seg = split_k(k, "gemv")[2]
        u = logits_stretch_chunks(k)
        assert u in (6, 8)
        assert (u == 6) == (-(-seg // 192) == -(-seg // 256))
    # qwen2.5-1.5b and SmolLM2: one full 6-chunk stretch; qwen2.5-7b and Llama 8B keep 8 (fewer stretches)
    assert [logits_stretch_chunks(k) for k in (1536, 576, 3584, 4096)] == [6, 6, 8, 8]


def test_square_products_of_3_to_8_rows_go_to_gemv_tc_by_default():
    """The default routing of plain products past the CUDA-core kernels' rows (cuda_gemv's
    DEFAULT_TC_SQUARE_MAX_ROWS): o_proj's shape (N <= K < 2N) at 3-8 rows on gemv_tc.cu, every other
    shape and row count elsewhere (cuBLAS, its K-slices, or gemv.cu)."""
    from rvllm.backend.cuda_gemv import DEFAULT_MAX_ROWS, DEFAULT_TC_SQUARE_MAX_ROWS, SmallBatchGemv
    from rvllm.model.config import preset_spec

    gemv = SmallBatchGemv(None, DEFAULT_MAX_ROWS, 132, 0, DEFAULT_TC_SQUARE_MAX_ROWS)
    for name in ("qwen2.5-1.5b", "qwen2.5-7b", "llama-3.1-8b"):
        s = preset_spec(name)
        o_proj, qkv = (s.hidden_size, s.q_size), (s.q_size + 2 * s.kv_size, s.hidden_size)
        gate_up, down = (2 * s.intermediate_size, s.hidden_size), (s.hidden_size, s.intermediate_size)
        for rows in range(1, 10):
            assert gemv._tc_square(rows, o_proj[1], o_proj[0]) == (3 <= rows <= 8), (name, rows)
            for n, k in (qkv, gate_up, down):
                assert not gemv._tc_square(rows, k, n), (name, rows, n, k)
    assert not gemv._tc_square(4, 1544, 1544)  # K not a multiple of 32: not the tensor-core kernel's
    assert not SmallBatchGemv(None, DEFAULT_MAX_ROWS, 132, 0, 0)._tc_square(4, 1536, 1536)  # off


def test_gemv_tc_split_covers_k_in_segments_of_two_stretches_or_more():
    """gemv_tc.cu's work split: ks warps per tile cover the 32-column steps of K, in segments of at
    least two 4-step stretches unless 8 warps are needed; a block holds whole tiles."""
    from rvllm.backend.cuda_gemv import split_k_tc

    for k in (32, 64, 1536, 3584, 4096, 8960, 14336, 18944):
        steps = k // 32
        ks, rpb, seg = split_k_tc(k)
        assert 1 <= ks <= 8 and ks * rpb <= 8 and rpb >= 1
        assert ks * seg >= steps and (ks - 1) * seg < steps
        assert seg >= 8 or ks == 1 or steps < 16
    assert split_k_tc(1536) == (6, 1, 8) and split_k_tc(64) == (1, 8, 2) and split_k_tc(18944) == (8, 1, 74)


@pytest.mark.parametrize("file", sorted(nvrtc.KERNELS))
def test_every_entry_point_is_registered(file):
    """A kernel missing from nvrtc.KERNELS compiles (and passes the PTX checks) but cannot be
    launched: every extern "C" entry written out in a file must be listed."""
    found = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\([^)]*\))?\s+([\w#]+)\(',
                       nvrtc.kernel_source(file))
    written = {n for n in found if "##" not in n}  # macro-made names (gemv_m##M) are listed by hand
    assert found and written <= set(nvrtc.KERNELS[file][0])


@pytest.mark.parametrize("file", list(nvrtc.KERNELS))
def test_every_kernel_waits_for_the_previous_one_on_sm90(file):
    """cuda_launch.py launches every kernel with programmatic dependent launch on sm_90, so each
    entry point must execute griddepcontrol.wait (common.cuh's pdl_wait) or it could read its input
    before the kernel writing it has finished. Checked in the PTX of each entry; sm_80 has none."""
    from rvllm.backend.nvrtc_check import compile_source

    if _NVRTC_ERROR:
        pytest.fail(_NVRTC_ERROR)
    dtype, head_dim = nvrtc.specializations(file)[0]
    names, _ = nvrtc.KERNELS[file]
    for arch in (a for a in ARCHS if nvrtc.compiles_for(file, a)):
        ptx, _ = compile_source(nvrtc.kernel_source(file), file,
                                nvrtc.compile_options(nvrtc.target_arch(file, arch), dtype, head_dim, ptx=True), ptx=True)
        entries = re.split(r"\.entry\s+", ptx.decode(errors="replace"))[1:]
        found = {e.split("(", 1)[0].strip(): e for e in entries}
        assert set(names) <= set(found), f"{file}: entries {sorted(found)}"
        for name in names:
            waits = "griddepcontrol.wait" in found[name]
            assert waits == (arch >= 90), f"{file}:{name} on sm_{arch}: griddepcontrol.wait {'missing' if arch >= 90 else 'present'}"


def test_pdl_launch_packs_each_argument_into_an_8_byte_slot():
    """The PDL launcher hands the driver one pointer per argument into 8-byte slots (a struct passed
    as bytes gets a slot of its size); numpy scalars keep their width, and an untyped Python number
    is refused rather than guessed."""
    import struct

    import numpy as np

    from rvllm.backend.cuda_launch import _pack

    blob = bytes(range(128))  # a struct by value (a CUtensorMap): its own 128-byte slot
    codes, values = _pack((np.int32(-3), np.float32(1.5), np.int64(-2), np.uint64(7), np.uint32(9), blob))
    fmt = "".join(codes)
    assert fmt == "i4xf4xqQI4x128s"
    assert [struct.calcsize("=" + c) for c in codes] == [8, 8, 8, 8, 8, 128]
    packed = struct.pack("=" + fmt, *values)
    assert len(packed) == 168
    assert struct.unpack_from("=i", packed, 0)[0] == -3 and struct.unpack_from("=f", packed, 8)[0] == 1.5
    assert struct.unpack_from("=q", packed, 16)[0] == -2 and struct.unpack_from("=Q", packed, 24)[0] == 7
    assert struct.unpack_from("=I", packed, 32)[0] == 9 and packed[40:] == blob
    for bad in (3, 1.5, np.float64(1.0)):
        with pytest.raises(TypeError, match="numpy scalar"):
            _pack((bad,))


def test_argmax_splits_spread_small_batches_and_keep_large_ones_whole():
    """argmax_kernel's blocks per row (host side): a batch-1 row of a 152k vocabulary is spread over
    many blocks of at least 2048 floats; batches that fill the GPU, or pass the scratch the kernel
    keeps, use one block a row."""
    from rvllm.sampling.gpu_sampler import ARGMAX_SPLIT_ROWS, argmax_splits

    assert argmax_splits(1, 151936, 132) == 75 and argmax_splits(1, 1000, 132) == 1
    assert argmax_splits(7, 151936, 132) == 38 and argmax_splits(256, 151936, 132) == 2
    assert argmax_splits(ARGMAX_SPLIT_ROWS + 1, 151936, 132) == 1
    for rows in (1, 3, 8, 64, 300, ARGMAX_SPLIT_ROWS):
        for vocab in (1, 2047, 2049, 32000, 151936):
            s = argmax_splits(rows, vocab, 132)
            assert 1 <= s <= max(1, -(-vocab // 2048)) and (s == 1 or rows * (s - 1) < 2 * 132)
