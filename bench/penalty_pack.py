"""Host cost per step of the GPU sampler's packing for 256 rows with penalties (1000-token prompts,
500-token outputs, one new token a step), pure NumPy, no GPU. Run it in an older tree too
(`git archive 8801c5e | tar -x -C /tmp/s4; PYTHONPATH=/tmp/s4 python bench/penalty_pack.py`): before
session 5 the packing rebuilt every penalized row's counts each step (no PenaltySlots there).
"""
import time
import numpy as np
from rvllm.sampling.metadata import SamplingMetadata
from rvllm.sampling_params import SamplingParams
from rvllm.sampling import gpu_sampler as g

try:
    from rvllm.sampling.gpu_sampler_inputs import pack_step
except ImportError:  # a tree from before the packing left gpu_sampler.py
    pack_step = g.pack_step

rng = np.random.default_rng(0)
V, n = 151936, 256
sp = SamplingParams(temperature=0.7, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1)
prompts = [rng.integers(0, V, 1000).tolist() for _ in range(n)]
outs = [rng.integers(0, V, 500).tolist() for _ in range(n)]
ids = [f"r{i}" for i in range(n)]
new = hasattr(g, "PenaltySlots")
slots = g.PenaltySlots(n) if new else None
times = []
for step in range(20):
    meta = SamplingMetadata.from_requests([(sp, p, o, None) for p, o in zip(prompts, outs)], *( [ids] if new else []))
    t = time.perf_counter()
    if new:
        pack_step(meta, V, step, 0, slots.plan(meta, True))
    else:
        pack_step(meta, V, step, 0)
    times.append(time.perf_counter() - t)
    for o in outs:
        o.append(int(rng.integers(0, V)))
print(f"{'plan + pack_step' if new else 'pack_step'}: first step {times[0] * 1e3:.2f} ms, median of the next 19 {np.median(times[1:]) * 1e3:.2f} ms")
