"""A captured CUDA graph kept only in its executable form.

cupy's Stream.end_capture returns a Graph that holds the captured graph (cudaGraph_t) as well as
its instantiation (cudaGraphExec_t) for as long as it lives, though only the instantiation is
replayed. The captured graph keeps its own copy of every node on the host: for qwen2.5-1.5b's 35
decode buckets, dropping them took the engine's anonymous memory after building from 524 to 450 MB
(H200, bench/rss_stages.py; bench/NOTES.md #58). An instantiated graph does not refer back to the
graph it came from (CUDA allows destroying the graph right after instantiation), so this
instantiates the capture and destroys the graph.
"""
from __future__ import annotations

try:
    from cupy_backends.cuda.api import runtime
except Exception:  # ImportError, or a broken CUDA install (cuda.py says the same)
    runtime = None


class ExecGraph:
    """An instantiated CUDA graph: launch() and upload() on a cupy stream; destroyed with the object."""

    __slots__ = ("_exec",)

    def __init__(self, exec_handle: int):
        self._exec = exec_handle

    @classmethod
    def end_capture(cls, stream) -> "ExecGraph":
        """Ends the capture that stream.begin_capture() started and instantiates it."""
        graph = runtime.streamEndCapture(stream.ptr)
        try:
            return cls(runtime.graphInstantiate(graph))
        finally:
            runtime.graphDestroy(graph)

    def launch(self, stream) -> None:
        runtime.graphLaunch(self._exec, stream.ptr)

    def upload(self, stream) -> None:
        runtime.graphUpload(self._exec, stream.ptr)

    def __del__(self):
        handle, self._exec = self._exec, 0
        if handle and runtime is not None:
            try:
                runtime.graphExecDestroy(handle)
            except Exception:  # interpreter shutdown, or the context already gone
                pass
