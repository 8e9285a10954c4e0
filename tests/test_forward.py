"""The engine's forward (CPU backend, paged KV, ragged batches) against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

from rvllm.backend.cpu import AttentionMetadata, CpuBackend
from rvllm.model.llama import LlamaModel
from rvllm.model.loader import load_weights, resolve_model
from tests.reference import ReferenceModel
from tests.tiny_models import CONFIGS, write_model

BLOCK = 4


def _meta(reqs, ops):
    """reqs: list of (start, n, block_ids) -> (positions, AttentionMetadata)."""
    positions, slots, qsl, seq_lens, qlens = [], [], [0], [], []
    width = max(len(b) for _, _, b in reqs)
    tables = np.zeros((len(reqs), width), np.int32)
    for i, (start, n, blocks) in enumerate(reqs):
        positions += range(start, start + n)
        slots += [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, start + n)]
        qsl.append(qsl[-1] + n)
        seq_lens.append(start + n)
        qlens.append(n)
        tables[i, : len(blocks)] = blocks
    meta = AttentionMetadata(np.array(qsl, np.int32), np.array(seq_lens, np.int32), tables,
                             np.array(slots, np.int32), max(qlens), max(seq_lens), qlens, seq_lens)
    return np.array(positions, np.int32), meta


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_paged_forward_matches_reference(tmp_path, name):
    model_dir, cfg, tensors = write_model(tmp_path, name, seed=hash(name) % 1000, shards=2)
    source = resolve_model(str(model_dir))
    ops = CpuBackend()
    weights = load_weights(source, ops, max_positions=256)
    model = LlamaModel(source.spec, weights, ops)
    spec = source.spec
    num_blocks = 64
    kv = [(np.full((num_blocks, BLOCK, spec.num_kv_heads, spec.head_dim), np.nan, np.float32),
           np.full((num_blocks, BLOCK, spec.num_kv_heads, spec.head_dim), np.nan, np.float32))
          for _ in range(spec.num_layers)]
    rng = np.random.default_rng(0)
    free = list(rng.permutation(num_blocks))  # scattered, non-contiguous blocks
    lengths = {"A": 37, "B": 25, "C": 41, "D": 3}
    prompts = {k: list(rng.integers(0, cfg["vocab_size"], n)) for k, n in lengths.items()}
    blocks = {k: [int(free.pop()) for _ in range(-(-(n + 1) // BLOCK))] for k, n in lengths.items()}
    ref = ReferenceModel(cfg, tensors)
    ref_logits = {k: ref.forward(p, 0, ref.new_cache()) for k, p in prompts.items()}

    # Step 1: A whole, B's first 20 tokens (chunked), C's first 40. Step 2: B's last 5, C's last 1 (decode), D whole.
    steps = [[("A", 0, 37), ("B", 0, 20), ("C", 0, 40)], [("B", 20, 5), ("C", 40, 1), ("D", 0, 3)]]
    for step in steps:
        ids = [t for k, s, n in step for t in prompts[k][s:s + n]]
        positions, meta = _meta([(s, n, blocks[k]) for k, s, n in step], ops)
        hidden = model.forward(np.array(ids, np.int32), positions, kv, meta)
        logits = model.compute_logits(hidden)
        # the decode path's form (the final norm inside the logits op), into a given buffer: the same
        # step again writes the same keys and values
        out = np.full_like(logits, np.nan)
        assert model.forward_logits(np.array(ids, np.int32), positions, kv, meta, out=out) is out
        np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
        # with the embedding rows gathered by the caller (as CUDA graphs' steps have them); other ids
        # show that the rows, not the ids, are what the forward then reads
        embedded = model.ops.embedding(np.array(ids, np.int32), model.w.embed)
        other = np.zeros(len(ids), np.int32)
        np.testing.assert_allclose(model.forward_logits(other, positions, kv, meta, embedded=embedded), logits,
                                   rtol=1e-5, atol=1e-6)
        row = 0
        for k, s, n in step:
            got, want = logits[row:row + n], ref_logits[k][s:s + n]
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert err < 1e-4, f"{name} request {k} tokens {s}..{s + n}: relative error {err:.2e}"
            row += n


def test_unsupported_and_broken_models(tmp_path):
    import json

    from rvllm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_model(str(tmp_path / "missing"))
    d = tmp_path / "noarch"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="architectures"):
        resolve_model(str(d))
    (d / "config.json").write_text(json.dumps(dict(CONFIGS["llama"], architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(str(d))
    model_dir, _, _ = write_model(tmp_path, "llama")
    st = model_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])  # truncated
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*truncated"):
        load_weights(resolve_model(str(model_dir)), CpuBackend(), 64)
    st.write_bytes(b"\xff" * 64)  # corrupt header
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupt"):
        load_weights(resolve_model(str(model_dir)), CpuBackend(), 64)
