"""rvllm: an LLM inference engine and OpenAI-compatible server in Python, without PyTorch."""
__version__ = "0.1.0"

from rvllm.sampling_params import SamplingParams  # noqa: E402
from rvllm.outputs import CompletionOutput, RequestOutput  # noqa: E402


def __getattr__(name):
    # LLM pulls in the model loader and engine; import it lazily so `import rvllm` stays light.
    if name == "LLM":
        from rvllm.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
