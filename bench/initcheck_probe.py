"""Is an initcheck report on silu_and_mul after a cuBLAS GEMM ours? Run under
`compute-sanitizer --tool initcheck`: case 1 reads a cuBLAS output, case 2 the same shape written by a
CuPy kernel. Reports for case 1 alone mean the sanitizer did not see cuBLAS's stores."""
import sys

from rvllm.backend.cuda import CudaBackend

import numpy as np

b = CudaBackend(sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
n = int(sys.argv[3]) if len(sys.argv) > 3 else 512
rng = np.random.default_rng(0)
h = b.weight(rng.standard_normal((33, 256)).astype(np.float32))  # uploaded as gpu_kernel_check.sh's smoke does
w = b.weight(rng.standard_normal((n, 256)).astype(np.float32))
if sys.argv[1] == "cublas":
    y = b.linear(h, w)
else:
    y = b.zeros((33, n))
    y[...] = 1
b.silu_and_mul(y)
b.synchronize()
print("probe", sys.argv[1], "ran")
