"""CUDA C kernels, compiled at run time by NVRTC (rvllm/backend/nvrtc.py)."""
