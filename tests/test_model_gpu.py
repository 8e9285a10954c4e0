"""The whole model and engine on the GPU against the CPU backend and HF transformers (-m gpu).

HF transformers + PyTorch exist only on the GPU machine and only as a reference here.
"""
from __future__ import annotations

import numpy as np
import pytest

from rvllm.backend.cuda import is_cuda_available
from tests.tiny_models import CONFIGS, write_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_cuda_available(), reason="no CUDA device")]

STEPS = 32


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    shared = [int(t) for t in rng.integers(3, vocab, 40)]
    return [shared + [int(t) for t in rng.integers(3, vocab, n)] for n in (1, 9)] + \
        [[int(t) for t in rng.integers(3, vocab, n)] for n in (5, 70)]


def _hf_greedy(model_dir, prompts, steps):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    outs, logits0 = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            logits0.append(model(ids).logits[0, -1].float().cpu().numpy())
            gen = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                                 pad_token_id=0, eos_token_id=None)
            outs.append(gen[0, len(p):].tolist())
    return outs, logits0


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    # A sharp lm_head keeps the greedy choice far from ties, so bf16 rounding cannot flip it.
    d, cfg, tensors = write_model(tmp_path_factory.mktemp("gpu"), request.param, seed=11, sharp=True)
    return d, cfg


def test_gpu_logits_and_greedy_match_hf_and_cpu(tiny):
    from rvllm import LLM, SamplingParams

    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"])
    hf_tokens, hf_logits = _hf_greedy(d, prompts, STEPS)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    gpu = LLM(str(d), device="cuda", dtype="bfloat16", block_size=16, skip_tokenizer_init=True)
    cpu = LLM(str(d), device="cpu", block_size=16, skip_tokenizer_init=True)
    gpu_out = gpu.generate(prompts, params)
    cpu_out = cpu.generate(prompts, params)
    for p, g, c, hf_t, hf_l in zip(prompts, gpu_out, cpu_out, hf_tokens, hf_logits):
        assert g.outputs[0].token_ids == hf_t, "GPU greedy differs from HF transformers"
        assert c.outputs[0].token_ids == hf_t, "CPU greedy differs from HF transformers"
        hf_lp = hf_l - hf_l.max() - np.log(np.exp(hf_l - hf_l.max()).sum())
        for tok, lp in g.outputs[0].logprobs[0].items():
            assert abs(lp.logprob - hf_lp[tok]) < 5e-2 * max(1.0, abs(hf_lp[tok]))


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=7), dict(num_gpu_blocks_override=12),
                                dict(enable_prefix_caching=False)],
                         ids=["default", "chunked", "preempt", "no-prefix-cache"])
def test_gpu_engine_scheduling_and_seeds_match_cpu(tiny, kw):
    from rvllm import LLM, SamplingParams

    d, cfg = tiny
    prompts = _prompts(cfg["vocab_size"], seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=42, max_tokens=16, ignore_eos=True)
    cpu = LLM(str(d), device="cpu", block_size=16, skip_tokenizer_init=True)
    want_greedy = [o.outputs[0].token_ids for o in cpu.generate(prompts, greedy)]
    gpu = LLM(str(d), device="cuda", block_size=16, skip_tokenizer_init=True, **kw)
    got = [o.outputs[0].token_ids for o in gpu.generate(prompts, greedy)]
    assert got == want_greedy
    if "num_gpu_blocks_override" in kw:
        assert gpu.engine.stats().num_preemptions > 0
    # Seeded sampling draws the same noise on both backends; the sharp tiny model keeps choices identical.
    want_seeded = [o.outputs[0].token_ids for o in cpu.generate(prompts, seeded)]
    got_seeded = [o.outputs[0].token_ids for o in gpu.generate(prompts, seeded)]
    assert got_seeded == want_seeded
