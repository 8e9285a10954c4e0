"""Is an initcheck report on silu_and_mul after a cuBLAS GEMM ours? Run under
`compute-sanitizer --tool initcheck`: case 1 reads a cuBLAS output, case 2 the same shape written by a
CuPy kernel. Reports for case 1 alone mean the sanitizer did not see cuBLAS's stores."""
import sys

from rvllm.backend.cuda import CudaBackend

b = CudaBackend("bfloat16", gemv_max_rows=0)
h, w = b.dummy_weight((33, 256), 1.0, 1), b.dummy_weight((512, 256), 1.0, 2)
if sys.argv[1] == "cublas":
    y = b.linear(h, w)
else:
    y = b.zeros((33, 512))
    y[...] = 1
b.silu_and_mul(y)
b.synchronize()
print("probe", sys.argv[1], "ran")
