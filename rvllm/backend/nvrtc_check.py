"""NVRTC through ctypes, without CuPy or a GPU: CI compiles every kernel with it.

The library comes from the `nvidia-cuda-nvrtc-cu12` wheel (the `nvidia.cuda_nvrtc` namespace
package) or, failing that, from the system's libnvrtc. The options come from
rvllm.backend.nvrtc.compile_options, the function the run-time compiler uses.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path


@functools.cache
def load_nvrtc() -> ctypes.CDLL:
    """libnvrtc, or OSError saying where it looked: $RVLLM_NVRTC_LIB, the pip wheels
    (nvidia-cuda-nvrtc-cu12 installs nvidia/cuda_nvrtc/lib, nvidia-cuda-nvrtc 13 nvidia/cu13/lib),
    then the system's library path."""
    candidates: list[str] = []
    if os.environ.get("RVLLM_NVRTC_LIB"):
        candidates.append(os.environ["RVLLM_NVRTC_LIB"])
    try:
        import nvidia  # namespace package shared by NVIDIA's wheels

        for root in nvidia.__path__:
            for sub in ("cuda_nvrtc", "cu13", "cu12"):
                lib = Path(root) / sub / "lib"
                candidates += sorted((str(p) for p in lib.glob("libnvrtc.so*") if "alt" not in p.name), reverse=True)
    except ImportError:
        pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    errors = []
    for path in candidates:
        try:
            # libnvrtc dlopens libnvrtc-builtins by name; load the one beside it first so a
            # wheel's copy is found without LD_LIBRARY_PATH.
            for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so*")):
                if "alt" not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise OSError("libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12); tried: " + ("; ".join(errors) or "nothing"))


def nvrtc_version() -> tuple[int, int]:
    lib = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs() -> list[int]:
    lib = load_nvrtc()
    n = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
    arr = (ctypes.c_int * n.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(arr), "nvrtcGetSupportedArchs")
    return list(arr)


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what} failed: {lib.nvrtcGetErrorString(status).decode()} ({status})")


def compile_source(source: str, name: str, options: tuple[str, ...], ptx: bool = False) -> tuple[bytes, str]:
    """Compile one program; returns (cubin or PTX, log). RuntimeError with the log on failure."""
    lib = load_nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if status != 0:
            raise RuntimeError(f"NVRTC failed to compile kernels_cu/{name} with options {' '.join(options)}:\n{log}")
        get_size, get = (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX) if ptx else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        _check(lib, get_size(prog, ctypes.byref(size)), "nvrtcGet*Size")
        out = ctypes.create_string_buffer(size.value)
        _check(lib, get(prog, out), "nvrtcGet*")
        return out.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_kernel_file(file: str, arch: int | str, dtype: str, head_dim: int | None = None,
                        extra_options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile kernels_cu/<file> exactly as the run-time path does (plus extra_options, e.g.
    ("-Xptxas=-v",) for the register report)."""
    from rvllm.backend.nvrtc import compile_options, kernel_source, target_arch

    return compile_source(kernel_source(file), file,
                          compile_options(target_arch(file, arch), dtype, head_dim) + tuple(extra_options))
