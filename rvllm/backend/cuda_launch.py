"""Kernel launches with programmatic dependent launch (PDL) on Hopper and newer.

A decode step at batch 1 is ~200 short kernels in a row, and each boundary costs the tail of one
kernel (its last blocks finishing, SMs idle) plus the start of the next (its first loads in
flight). With the PDL launch attribute a kernel's blocks may start while the previous kernel is
still running; every kernel in kernels_cu/ issues what does not depend on that kernel (weights,
the step's inputs) and then waits for it (`pdl_wait` in common.cuh). Stream capture turns these
launches into programmatic edges of the CUDA graph, so the graphs replay the overlap.

CuPy's RawKernel launch takes no launch attributes, so this calls the driver's cuLaunchKernelEx
through ctypes with the CUfunction CuPy loaded. Where PDL is off (RVLLM_PDL=0, a GPU older than
sm_90, a driver without cuLaunchKernelEx) the kernel is launched by CuPy as before; the kernels'
wait is then a no-op. The same call launches thread block clusters (sm_90; the cluster dimension
attribute), for the kernels built for them.
"""
from __future__ import annotations

import ctypes
import os
import struct
import threading

import numpy as np

try:
    import cupy as cp
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    cp = None

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CLUSTER_DIMENSION = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
_PORTABLE_CLUSTER = 8  # blocks: more needs the attribute above (16 at most on sm_90)


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


# Each argument gets an 8-byte slot; the driver reads each through its own pointer, so the slot's
# padding is never seen.
_SLOT = {np.dtype(np.int32): "i4x", np.dtype(np.uint32): "I4x", np.dtype(np.float32): "f4x",
         np.dtype(np.int64): "q", np.dtype(np.uint64): "Q"}


class _Driver:
    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        self.lib = lib
        self.launch = lib.cuLaunchKernelEx  # AttributeError on drivers before CUDA 12
        self.launch.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.launch.restype = ctypes.c_int
        self.error_name = lib.cuGetErrorName
        self.error_name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.set_attribute = lib.cuFuncSetAttribute
        self.set_attribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.max_active_clusters = lib.cuOccupancyMaxActiveClusters
        self.max_active_clusters.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                             ctypes.POINTER(_LaunchConfig)]
        self.local = threading.local()  # per thread: the config and the argument slots it fills

    def slots(self, fmt: str, sizes: tuple[int, ...]):
        """The argument buffer for one argument layout: a slot of each size, and a pointer to each."""
        cache = self.local.__dict__.setdefault("slots", {})
        if fmt not in cache:
            offsets = [sum(sizes[:i]) for i in range(len(sizes))] or [0]
            buf = ctypes.create_string_buffer(max(8, sum(sizes)))
            ptrs = (ctypes.c_void_p * len(offsets))(*[ctypes.addressof(buf) + o for o in offsets])
            cache[fmt] = (buf, ptrs)
        return cache[fmt]

    def config(self, grid: tuple, block: tuple, shared_mem: int, pdl: bool, cluster: int) -> _LaunchConfig:
        """This thread's launch config for one launch: PDL when `pdl`, clusters of `cluster` blocks along
        the grid's z when cluster > 1 (its attributes: [cluster dimension, PDL], passed from the first
        or from the second)."""
        local = self.local.__dict__
        if "config" not in local:
            attrs = (_LaunchAttribute * 2)(_LaunchAttribute(id=_CLUSTER_DIMENSION),
                                           _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION))
            attrs[1].value[0] = 1
            local["attrs"] = attrs
            local["from_first"] = ctypes.cast(attrs, ctypes.POINTER(_LaunchAttribute))
            local["from_second"] = ctypes.cast(ctypes.addressof(attrs) + ctypes.sizeof(_LaunchAttribute),
                                               ctypes.POINTER(_LaunchAttribute))
            local["config"] = _LaunchConfig()
        cfg, attrs = local["config"], local["attrs"]
        if cluster > 1:
            attrs[0].value[0], attrs[0].value[1], attrs[0].value[2] = 1, 1, cluster
            cfg.attrs, cfg.num_attrs = local["from_first"], 2 if pdl else 1
        else:
            cfg.attrs, cfg.num_attrs = local["from_second"], 1 if pdl else 0
        cfg.grid[:] = [int(g) for g in (tuple(grid) + (1, 1))[:3]]
        cfg.block[:] = [int(b) for b in (tuple(block) + (1, 1))[:3]]
        cfg.shared_mem = int(shared_mem)
        cfg.stream = cp.cuda.get_current_stream().ptr
        return cfg

    def check(self, status: int, name: str) -> None:
        if status:
            text = ctypes.c_char_p()
            self.error_name(status, ctypes.byref(text))
            raise RuntimeError(f"cuLaunchKernelEx({name}) failed: {(text.value or b'?').decode()} ({status})")


_driver: _Driver | None = None
_enabled: dict[int, bool] = {}  # device id -> PDL used
_formats: dict[str, tuple] = {}  # argument codes -> their packer and each argument's size


def _get_driver() -> _Driver:
    global _driver
    if _driver is None:
        _driver = _Driver()
    return _driver


# cuTensorMapEncodeTiled's enums (cuda.h; stable since CUDA 12.0)
_TMA_DTYPE = {np.dtype(np.float16): 6, np.dtype(np.uint16): 9}  # FLOAT16; bfloat16 is stored as uint16
_TMA_SWIZZLE_128B, _TMA_L2_PROMOTION_256B = 3, 3


def tensor_map_2d(arr, box_rows: int, box_cols: int) -> bytes:
    """A CUtensorMap (128 bytes, passed to a kernel by value) of the 2-D 16-bit device array `arr`
    (rows of stride arr.strides[0], 16-byte aligned): boxes of box_rows x box_cols elements, stored
    in shared memory in the 128-byte swizzle, elements past the array read as zeros."""
    drv = _get_driver()
    fn = drv.lib.cuTensorMapEncodeTiled
    rows, cols = arr.shape
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    out = ctypes.create_string_buffer(128)
    status = fn(out, ctypes.c_int(_TMA_DTYPE[np.dtype(arr.dtype)]), u32(2), ctypes.c_void_p(arr.data.ptr),
                (u64 * 2)(cols, rows), (u64 * 1)(arr.strides[0]), (u32 * 2)(box_cols, box_rows), (u32 * 2)(1, 1),
                ctypes.c_int(0), ctypes.c_int(_TMA_SWIZZLE_128B), ctypes.c_int(_TMA_L2_PROMOTION_256B), ctypes.c_int(0))
    drv.check(status, f"cuTensorMapEncodeTiled({rows} x {cols}, box {box_rows} x {box_cols})")
    return out.raw


def pdl_enabled() -> bool:
    """PDL on the current device: sm_90 or newer, a driver with cuLaunchKernelEx, RVLLM_PDL not 0."""
    global _driver
    dev = cp.cuda.runtime.getDevice()
    on = _enabled.get(dev)
    if on is None:
        on = os.environ.get("RVLLM_PDL", "1") != "0" and int(cp.cuda.Device(dev).compute_capability) >= 90
        if on and _driver is None:
            try:
                _driver = _Driver()
            except (OSError, AttributeError):
                on = False
        _enabled[dev] = on
    return on


_clusters: dict[int, bool] = {}  # device id -> thread block clusters launchable


def clusters_available() -> bool:
    """Thread block clusters on the current device: sm_90 or newer and a driver with cuLaunchKernelEx
    (whatever RVLLM_PDL says)."""
    dev = cp.cuda.runtime.getDevice()
    on = _clusters.get(dev)
    if on is None:
        on = int(cp.cuda.Device(dev).compute_capability) >= 90
        if on:
            try:
                _get_driver()
            except (OSError, AttributeError):
                on = False
        _clusters[dev] = on
    return on


def _pack(args: tuple) -> tuple[list[str], list]:
    codes, values = [], []
    for a in args:
        if cp is not None and isinstance(a, cp.ndarray):
            codes.append("Q")
            values.append(a.data.ptr)
        elif isinstance(a, np.generic) and a.dtype in _SLOT:
            codes.append(_SLOT[a.dtype])
            values.append(a)
        elif isinstance(a, bytes) and len(a) % 8 == 0:  # a struct by value (tensor_map_2d)
            codes.append(f"{len(a)}s")
            values.append(a)
        else:  # a Python int would have no width: every kernel argument is typed at the call
            raise TypeError(f"kernel argument of type {type(a).__name__}: pass a cupy array, a numpy "
                            f"scalar of int32, uint32, int64, uint64 or float32, or a struct as bytes")
    return codes, values


class Kernel:
    """One compiled kernel (nvrtc.get_kernel): called like a cupy.RawKernel."""

    def __init__(self, raw, name: str):
        self.raw = raw
        self.name = name
        self._function = None  # the CUfunction, once loaded
        self._carveout = None
        self._non_portable = False  # opted into clusters past the portable size

    @property
    def attributes(self):
        return self.raw.attributes

    @property
    def preferred_shared_memory_carveout(self) -> int | None:
        """The carveout this process asked for (percent of the largest), None when never set."""
        return self._carveout

    @preferred_shared_memory_carveout.setter
    def preferred_shared_memory_carveout(self, percent: int) -> None:
        self.raw.preferred_shared_memory_carveout = percent  # a hint: the driver still fits one block
        self._carveout = percent

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.raw.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, nbytes: int) -> None:
        self.raw.max_dynamic_shared_size_bytes = nbytes  # an attribute of the CUfunction both launches use

    @property
    def function(self) -> int:
        """The CUfunction."""
        if self._function is None:
            self._function = self.raw.kernel.ptr
        return self._function

    def _allow_cluster(self, driver: _Driver, cluster: int) -> None:
        """Opts this kernel into clusters past the portable size (once) when `cluster` needs it."""
        if cluster > _PORTABLE_CLUSTER and not self._non_portable:
            driver.check(driver.set_attribute(self.function, _NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                         f"{self.name}: cuFuncSetAttribute(non-portable cluster size)")
            self._non_portable = True

    def max_active_clusters(self, grid: tuple, block: tuple, shared_mem: int, cluster: int) -> int:
        """How many clusters of `cluster` blocks (along z) of this launch shape the GPU holds at once
        (cuOccupancyMaxActiveClusters; 0: none fits)."""
        driver = _get_driver()
        self._allow_cluster(driver, cluster)
        n = ctypes.c_int(0)
        cfg = driver.config(grid, block, shared_mem, False, cluster)
        status = driver.max_active_clusters(ctypes.byref(n), self.function, ctypes.byref(cfg))
        return n.value if status == 0 else 0

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, cluster: int = 1) -> None:
        """cluster > 1: thread block clusters of that many blocks along z (sm_90; grid[2] a multiple
        of it)."""
        pdl = pdl_enabled()
        if not pdl and cluster == 1 and not any(isinstance(a, bytes) for a in args):  # CuPy passes no structs
            self.raw(grid, block, args, shared_mem=shared_mem)
            return
        driver = _get_driver()
        codes, values = _pack(args)
        fmt = "".join(codes)
        known = _formats.get(fmt)
        if known is None:
            known = _formats[fmt] = (struct.Struct("=" + fmt), tuple(struct.calcsize("=" + c) for c in codes))
        packer, sizes = known
        buf, ptrs = driver.slots(fmt, sizes)
        packer.pack_into(buf, 0, *values)
        self._allow_cluster(driver, cluster)
        cfg = driver.config(grid, block, shared_mem, pdl, cluster)
        driver.check(driver.launch(ctypes.byref(cfg), self.function, ptrs, None), self.name)
