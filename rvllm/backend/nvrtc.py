"""Compile kernels_cu/*.cu with NVRTC for the GPU in use, cache the cubins on disk, hand back kernels.

One compiled module per (file, SM, dtype, head size). The cubin is stored under
`$RVLLM_CACHE/kernels/` (default `~/.cache/rvllm/kernels/`) keyed by a hash of the source, the
options and the CUDA runtime version, so a warm start compiles nothing and does not load NVRTC at
all (reading NVRTC's own version loaded its library, ~33 MB of the engine's memory, into every
start: bench/NOTES.md #58). A cubin stays valid code for its SM whatever NVRTC built it; after
changing NVRTC within one CUDA version, delete the directory to rebuild with the new one. Compile
errors are raised as RuntimeError naming the kernel file, with NVRTC's log.

The pure-Python half of this module (sources, options, the specialization table) imports no
CuPy: CI uses it to compile every kernel through NVRTC alone (tests/test_kernels_compile.py,
rvllm/backend/nvrtc_check.py), with exactly the options used at run time. Only the functions
that load kernels import cupy.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from rvllm.backend.cuda_launch import Kernel

DTYPES = ("float16", "bfloat16")
# attention_decode_tc.cu's entry points: (warps per (row, KV head) pair, keys per tile, tiles in flight per warp)
DECODE_TC_BUILDS = ((1, 32, 3), (4, 16, 3))
# The 4-warp build again, as its own entry point for steps of at most one (row, KV head) pair per
# SM, so that it can carry its own shared-memory carveout (cuda_attention.DECODE_TC_ONE_PER_SM).
DECODE_TC_ONE_PER_SM = "paged_attention_decode_tc_w4_t16_s3_one_per_sm_kernel"
# The 4-warp build split over the context with a combine (small steps, long contexts).
DECODE_TC_SPLIT = "paged_attention_decode_tc_split_w4_t16_s3_kernel"
# ... and combined through a thread block cluster's shared memory instead (sm_90), at most this many blocks a
# cluster (DTC_CLUSTER_MAX).
DECODE_TC_CLUSTER = "paged_attention_decode_tc_cluster_w4_t16_s3_kernel"
DECODE_TC_CLUSTER_MAX = 16


def decode_tc_kernel(warps: int, tile: int, stages: int) -> str:
    """The entry point's name for one of DECODE_TC_BUILDS (attention_decode_tc.cu's DECODE_TC_ENTRY)."""
    return f"paged_attention_decode_tc_w{warps}_t{tile}_s{stages}_kernel"


def decode_tc_rope_kernel(name: str) -> str:
    """The rope build of attention_decode_tc.cu's entry point `name` (rotary and the KV-cache write too)."""
    return name.replace("paged_attention_decode_tc_", "paged_attention_decode_tc_rope_", 1)


_DECODE_TC_NAMES = tuple(decode_tc_kernel(*b) for b in DECODE_TC_BUILDS) + (DECODE_TC_ONE_PER_SM,)


# Head sizes compiled by default for the attention kernels. Others that are multiples of 16
# (the prefill kernel's mma k-step) up to 128 also compile on demand.
HEAD_DIMS = (64, 80, 96, 128)
MIN_COMPUTE_CAPABILITY = 80  # cvt.rn.bf16.f32 and mma.m16n8k16 need sm_80

# file -> (kernel entry points, whether the file is specialized on head size)
KERNELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "embedding.cu": (("embedding_kernel", "broadcast_rows_kernel", "dummy_normal_kernel"), False),
    "step_inputs.cu": (("unpack_step_inputs_kernel",), False),
    "norm.cu": (("rms_norm_kernel", "fused_add_rms_norm_kernel", "fused_add_rms_norm_sums_kernel"), False),
    "activation.cu": (("silu_and_mul_kernel",), False),
    "rotary.cu": (("rotary_cache_kernel",), False),
    "attention_decode.cu": (("paged_attention_split_kernel", "paged_attention_split_lean_kernel",
                             "paged_attention_split_wide_kernel"), True),
    "attention_decode_tc.cu": (_DECODE_TC_NAMES + tuple(decode_tc_rope_kernel(n) for n in _DECODE_TC_NAMES)
                               + (DECODE_TC_SPLIT, DECODE_TC_CLUSTER), True),
    "attention_prefill.cu": (("paged_attention_prefill_kernel",), True),
    "gemv.cu": (tuple(f"{kind}_m{m}" for m in (1, 2, 4, 8)
                      for kind in ("gemv", "add_norm_gemv", "add_norm_gemv_silu"))
                + ("add_norm_gemv_silu_u3_m1", "add_norm_gemv_silu_u3_m2", "add_norm_logits_m1", "add_norm_logits_u6_m1"),
                False),
    "gemv_rope.cu": (tuple(f"add_norm_gemv_rope{u}_m{m}" for u in ("", "_u3") for m in (1, 2)), False),
    "gemv_tc.cu": (("gemv_tc", "add_norm_gemv_tc", "add_norm_gemv_silu_tc"), False),
    "gemm_reduce.cu": (("k_slices_reduce_kernel",), False),
    "gemm_wgmma.cu": (("gemm_wgmma_n64", "gemm_wgmma_n128", "gemm_wgmma_n256", "gemm_wgmma_reduce"), False),
    "skinny_gemm.cu": (("skinny_gemm_n8", "skinny_gemm_n16", "skinny_gemm_silu_n8", "skinny_gemm_silu_n16"), False),
    "sampling.cu": (("process_logits_kernel", "sample_kernel", "argmax_kernel", "race_kernel", "select_count_kernel",
                     "select_gather_kernel", "select_kernel", "philox_kernel"), False),
}

# Files written for one architecture's own instructions (wgmma needs sm_90a, which no other GPU
# runs): compiled only for it, and used by the backend only on that compute capability.
ARCH_SPECIFIC = {"gemm_wgmma.cu": 90, "skinny_gemm.cu": 90}


def compiles_for(file: str, arch: int | str) -> bool:
    """Whether kernels_cu/<file> has a build for compute capability `arch` (digits, e.g. 90)."""
    need = ARCH_SPECIFIC.get(file)
    return need is None or int(str(arch).rstrip("a")) == need


def target_arch(file: str, arch: int | str) -> str:
    """The architecture to compile kernels_cu/<file> for on `arch`: the arch itself, or "90a" (the
    architecture-specific target) for the ARCH_SPECIFIC files."""
    if not compiles_for(file, arch):
        raise ValueError(f"kernels_cu/{file} is built only for sm_{ARCH_SPECIFIC[file]}a, not sm_{arch}")
    return f"{ARCH_SPECIFIC[file]}a" if file in ARCH_SPECIFIC else str(arch)


# Must match attention_decode.cu.
DECODE_PARTITION_SIZE = 512
DECODE_NUM_THREADS = 128
DECODE_WIDE_THREADS = 512  # paged_attention_split_wide_kernel
DECODE_GCHUNK = 8
# Must match attention_decode_tc.cu.
DECODE_TC_MAX_GROUP = 16  # query heads per KV head: the 16 rows of one mma tile

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernels_dir():
    """kernels_cu/: the rvllm.kernels_cu package when rvllm is installed (pyproject maps it), else
    the directory beside rvllm/ in a source checkout run through PYTHONPATH."""
    try:
        return resources.files("rvllm.kernels_cu")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels_cu"


def kernel_source(file: str) -> str:
    """The source of kernels_cu/<file> with its local #include "..." lines pasted in (NVRTC
    then needs no include path)."""
    root = kernels_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:  # headers use #pragma once; pasting twice would redefine
            return ""
        seen.add(name)
        text = (root / name).read_text()
        return _INCLUDE.sub(lambda m: f'// ---- {m.group(1)} ----\n{expand(m.group(1))}', text)

    return expand(file)


def specializations(file: str, head_dims=HEAD_DIMS) -> list[tuple[str, int | None]]:
    """Every (dtype, head_dim) that `file` is compiled for; head_dim is None for files that do
    not depend on it."""
    _, per_head_dim = KERNELS[file]
    dims = tuple(head_dims) if per_head_dim else (None,)
    return [(dtype, hd) for dtype in DTYPES for hd in dims]


def compile_options(arch: int | str, dtype: str, head_dim: int | None = None, ptx: bool = False) -> tuple[str, ...]:
    """NVRTC options for one specialization; the single definition used at run time and in CI.

    arch: compute capability as digits ("90", 80). ptx=True targets the virtual architecture
    (compute_XX, PTX the driver compiles) for GPUs newer than the NVRTC in use knows.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    target = f"compute_{arch}" if ptx else f"sm_{arch}"
    opts = [
        "-std=c++17",
        f"--gpu-architecture={target}",
        "-lineinfo",  # source lines for compute-sanitizer and ncu; no effect on the code
        "-DRVLLM_BF16" if dtype == "bfloat16" else "-DRVLLM_FP16",
    ]
    if head_dim is not None:
        opts.append(f"-DHEAD_DIM={int(head_dim)}")
    return tuple(opts)


def decode_smem_bytes(head_dim: int, group: int, threads: int = DECODE_NUM_THREADS) -> int:
    """Dynamic shared memory of the decode kernel's build with `threads` threads (attention_decode.cu)."""
    floats = group * DECODE_PARTITION_SIZE + (threads // 32) * DECODE_GCHUNK * head_dim + 2 * group
    return 4 * floats


def decode_tc_smem_bytes(head_dim: int, warps: int, tile: int, stages: int) -> int:
    """Dynamic shared memory of attention_decode_tc.cu's build with `warps` warps, `tile`-key tiles
    and `stages` tiles in flight per warp: each warp's K and V tiles of every stage, padded rows."""
    return warps * 2 * stages * tile * (head_dim + 8) * 2


def prefill_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of attention_prefill.cu: two stages of a 32-key K tile and V tile,
    padded rows (PREFILL_STAGES, BLOCK_N, KV_LD there)."""
    return 2 * 2 * 32 * (head_dim + 8) * 2


def cache_dir() -> Path:
    root = os.environ.get("RVLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rvllm")
    return Path(root) / "kernels"


def cache_key(source: str, options: tuple[str, ...], toolchain) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(options), repr(tuple(toolchain))):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


# ---- run time (imports cupy) ------------------------------------------------------------------

@functools.cache
def device_cc() -> int:
    """The current device's compute capability (90 for sm_90), checked against the kernels' minimum.
    Touches the CUDA device, not NVRTC."""
    import cupy

    cc = int(cupy.cuda.Device().compute_capability)
    if cc < MIN_COMPUTE_CAPABILITY:
        raise RuntimeError(
            f"rvllm's CUDA kernels need compute capability >= {MIN_COMPUTE_CAPABILITY / 10:.1f}; "
            f"this GPU has {cc / 10:.1f}"
        )
    return cc


@functools.cache
def device_arch() -> tuple[str, bool]:
    """(arch digits, ptx) to compile for the current device: cubin for its own SM when this NVRTC
    knows it, else PTX for the newest architecture NVRTC supports. Loads NVRTC."""
    from cupy.cuda import nvrtc

    cc = device_cc()
    try:
        supported = [int(a) for a in nvrtc.getSupportedArchs()]
    except Exception:  # older bindings: assume NVRTC knows the device
        supported = [cc]
    if cc in supported:
        return str(cc), False
    older = [a for a in supported if a <= cc]
    return str(max(older) if older else cc), True


def _nvrtc_compile(source: str, file: str, options: tuple[str, ...], ptx: bool) -> bytes:
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source, file, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(
                f"NVRTC failed to compile kernels_cu/{file} ({e}) with options {' '.join(options)}:\n{log}"
            ) from None
        out = nvrtc.getPTX(prog) if ptx else nvrtc.getCUBIN(prog)
        return out.encode() if isinstance(out, str) else bytes(out)
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def _toolchain() -> tuple:
    """What a cache key names besides the source and the options: the CUDA runtime CuPy runs on."""
    import cupy

    return ("cuda runtime", int(cupy.cuda.runtime.runtimeGetVersion()))


def _cache_path(file: str, dtype: str, head_dim: int | None, arch: str, ptx: bool) -> Path:
    key = cache_key(kernel_source(file), compile_options(target_arch(file, arch), dtype, head_dim, ptx=ptx), _toolchain())
    return cache_dir() / f"{Path(file).stem}-{dtype}-{head_dim or 0}-sm{arch}-{key}.{'ptx' if ptx else 'cubin'}"


def _compiled_path(file: str, dtype: str, head_dim: int | None) -> Path:
    """The cached cubin (or PTX) of one module, compiled first when the cache lacks it. A cubin for
    the device's own SM is looked for first, so a warm start never loads NVRTC."""
    if file not in KERNELS:
        raise ValueError(f"unknown kernel file {file!r}; known: {', '.join(KERNELS)}")
    path = _cache_path(file, dtype, head_dim, str(device_cc()), False)
    if path.is_file():
        return path
    arch, ptx = device_arch()
    path = _cache_path(file, dtype, head_dim, arch, ptx)
    if not path.is_file():
        binary = _nvrtc_compile(kernel_source(file), file, compile_options(target_arch(file, arch), dtype, head_dim, ptx=ptx),
                                ptx)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(binary)
            os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none
        except OSError:  # cache not writable: keep this process going from a temporary file
            path = Path(tempfile.mkdtemp(prefix="rvllm-kernels-")) / path.name
            path.write_bytes(binary)
    return path


# Modules being compiled in the background (precompile), by load_module's arguments.
_precompiling: dict[tuple, Future] = {}
_precompile_lock = threading.Lock()


def precompile(dtype: str, head_dim: int, skip: tuple[str, ...] = ()) -> None:
    """Starts compiling, in threads, every module a model of this dtype and head size uses that the
    disk cache lacks (load_module then waits for its own), so that a cold start compiles while the
    weights load instead of at each module's first use. (Whether the files also compile side by side
    depends on the binding releasing the GIL; not measured: bench/NOTES.md #20.) `skip`: files the
    backend will not use (gemm_wgmma.cu while it is off)."""
    device_cc()  # once, on this thread: it touches the CUDA device
    keys = [(file, dtype, head_dim if per_hd else None) for file, (_, per_hd) in KERNELS.items()
            if compiles_for(file, device_cc()) and file not in skip]
    pool = ThreadPoolExecutor(max_workers=min(len(keys), os.cpu_count() or 1), thread_name_prefix="nvrtc")
    with _precompile_lock:
        for key in keys:
            if key not in _precompiling:
                _precompiling[key] = pool.submit(_compiled_path, *key)
    pool.shutdown(wait=False)


@functools.cache
def load_module(file: str, dtype: str, head_dim: int | None = None):
    """The cupy.RawModule of kernels_cu/<file> for this GPU, compiled once and cached on disk."""
    import cupy

    with _precompile_lock:
        pending = _precompiling.pop((file, dtype, head_dim), None)
    path = pending.result() if pending is not None else _compiled_path(file, dtype, head_dim)
    return cupy.RawModule(path=str(path))


@functools.cache
def get_kernel(file: str, kernel: str, dtype: str, head_dim: int | None = None):
    """One compiled kernel (a cuda_launch.Kernel around a cupy.RawKernel: it launches with PDL where it
    can), cached per (file, kernel, dtype, head_dim)."""
    names, per_head_dim = KERNELS[file]
    if kernel not in names:
        raise ValueError(f"kernels_cu/{file} has no kernel {kernel!r}; it has {', '.join(names)}")
    if per_head_dim and head_dim is None:
        raise ValueError(f"kernels_cu/{file} is compiled per head size: pass head_dim")
    raw = load_module(file, dtype, head_dim if per_head_dim else None).get_function(kernel)
    return Kernel(raw, f"{file}:{kernel}")
