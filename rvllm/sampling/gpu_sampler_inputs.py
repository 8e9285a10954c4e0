"""What GpuSampler's kernels (kernels_cu/sampling.cu) read, packed on the host: the layouts of the
parameter and step records, and pack_step, which lays out one call's inputs in one uint8 buffer for
one host-to-device copy.

Pure NumPy, no device: the CPU tests run the kernels' NumPy emulation on the very buffer pack_step
builds (resolve_rows is sampling.cu's load_row), which pins the layout without a GPU.
"""
from __future__ import annotations

import numpy as np

from rvllm.sampling.metadata import GREEDY_TEMPERATURE, SamplingMetadata
from rvllm.sampling.param_slots import NO_SLOT
from rvllm.sampling.penalty_slots import SlotUpdate

MAX_TOP_LOGPROBS = 20  # sampling.cu; rows asking for more get theirs on the host
MASK64 = (1 << 64) - 1  # seeds and Philox steps are uint64 on the device
_ALIGN = 16

# Mirrors `struct RowParams` in sampling.cu: a request's record in the parameter table (64 bytes;
# its last 12 are padding).
PARAMS_DTYPE = np.dtype({
    "names": ["top_p", "seed", "temperature", "log_min_p", "repetition_penalty", "frequency_penalty",
              "presence_penalty", "top_k", "num_logprobs", "greedy", "seeded"],
    "formats": ["<f8", "<u8", "<f4", "<f4", "<f4", "<f4", "<f4", "<i4", "<i4", "<i4", "<i4"],
    "offsets": [0, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48],
    "itemsize": 64,
})
# Mirrors `struct RowStep` in sampling.cu: one row of a call (32 bytes; its last 4 are padding).
STEP_DTYPE = np.dtype({
    "names": ["step", "slot", "fresh", "mask_row", "pen_slot", "pen_reset"],
    "formats": ["<u8", "<i4", "<i4", "<i4", "<i4", "<i4"],
    "offsets": [0, 8, 12, 16, 20, 24],
    "itemsize": 32,
})
# What the kernels read about a row (sampling.cu's Row): the record and the Philox counter words.
ROW_DTYPE = np.dtype([(name, PARAMS_DTYPE.fields[name][0]) for name in PARAMS_DTYPE.names]
                     + [("step", "<u8"), ("tag", "<i4"), ("mask_row", "<i4"), ("pen_slot", "<i4"),
                        ("pen_reset", "<i4")])


def pack_step(meta: SamplingMetadata, vocab: int, step: int, seed: int,
              updates: list[SlotUpdate | None] | None = None,
              param_rows: tuple[list[int], list[int]] | None = None) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Everything the kernels read but the parameter table, in one uint8 host buffer: the step
    records (STEP_DTYPE, one per row), the parameter records of the fresh rows (PARAMS_DTYPE), the
    CSR lists (penalty-slot updates, bias, suppressed ids) and the allowed-token masks. Returns
    (buffer, {section: (byte offset, byte size)}); sections are 16-byte aligned and never empty.
    step: the call counter (the Philox step of unseeded rows; the kernels get it as an argument);
    seed: the sampler's seed; updates: PenaltySlots.plan's, one per row (needed when a row has a
    penalty); param_rows: ParamSlots.plan's (each row's slot, the fresh rows), None: every row
    fresh, without a slot."""
    n = meta.num_rows
    slots, fresh = param_rows if param_rows is not None else ([NO_SLOT] * n, range(n))
    rows = _row_steps(meta, slots, fresh)
    sections: dict[str, np.ndarray] = {"fresh": _records(meta, fresh, vocab, seed)}
    if updates is None and not meta.no_penalties:
        raise ValueError("pack_step: rows with penalties need their penalty slots (PenaltySlots.plan)")
    prompt_off, new_off = np.zeros(n + 1, np.int32), np.zeros(n + 1, np.int32)
    prompt_tok, new_tok = [], []
    if updates is not None:
        pen_slot, pen_reset = [-1] * n, [False] * n
        prompt_sizes, new_sizes = [0] * n, [0] * n
        for i, u in enumerate(updates):  # one pass: this loop runs for every penalized row every step
            if u is None:
                continue
            pen_slot[i] = u.slot
            if u.reset:  # the prompt's set, once per slot
                pen_reset[i] = True
                prompt_tok.append(np.unique(_in_range(u.prompt, vocab)))
                prompt_sizes[i] = prompt_tok[-1].size
            if len(u.new_tokens):  # none in the steady state
                new_tok.append(_in_range(u.new_tokens, vocab))
                new_sizes[i] = new_tok[-1].size
        rows["pen_slot"] = np.fromiter(pen_slot, np.int32, n)
        rows["pen_reset"] = np.fromiter(pen_reset, np.int32, n)
        if prompt_tok:  # else the offsets stay zero
            np.cumsum(prompt_sizes, out=prompt_off[1:])
        if new_tok:
            np.cumsum(new_sizes, out=new_off[1:])
    sections["prompt_off"], sections["new_off"] = prompt_off, new_off
    sections["prompt_tok"], sections["new_tok"] = (
        np.concatenate(t).astype(np.int32) if t else np.zeros(0, np.int32) for t in (prompt_tok, new_tok))

    bias_off = np.zeros(n + 1, np.int32)
    bias_tok, bias_val = [], []
    if not meta.no_logit_bias:
        for i, bias in enumerate(meta.logit_bias):
            count = 0
            if bias:
                ids = np.fromiter(bias.keys(), np.int64, len(bias))
                vals = np.fromiter(bias.values(), np.float32, len(bias))  # float32 values, as NumPy
                ok = (ids >= 0) & (ids < vocab)
                bias_tok.append(ids[ok])
                bias_val.append(vals[ok])
                count = int(ok.sum())
            bias_off[i + 1] = bias_off[i] + count
    sections["bias_off"] = bias_off
    sections["bias_tok"] = np.concatenate(bias_tok).astype(np.int32) if bias_tok else np.zeros(0, np.int32)
    sections["bias_val"] = np.concatenate(bias_val).astype(np.float32) if bias_val else np.zeros(0, np.float32)

    sup_off = np.zeros(n + 1, np.int32)
    sup_tok = []
    if not meta.no_suppress:
        for i, ids in enumerate(meta.suppress_token_ids):
            a = _in_range(ids, vocab)
            sup_tok.append(a)
            sup_off[i + 1] = sup_off[i] + a.size
    sections["sup_off"] = sup_off
    sections["sup_tok"] = np.concatenate(sup_tok).astype(np.int32) if sup_tok else np.zeros(0, np.int32)

    masks = [(i, m) for i, m in enumerate(meta.allowed_token_masks or ()) if m is not None]
    stacked = np.zeros((len(masks), vocab), np.uint8)
    for j, (i, m) in enumerate(masks):
        m = np.asarray(m, dtype=bool).reshape(-1)
        if m.size != vocab:
            raise ValueError(f"allowed_token_masks[{i}] has {m.size} entries, the vocabulary {vocab}")
        stacked[j] = m
        rows["mask_row"][i] = j
    sections["masks"] = stacked.reshape(-1)

    parts = {"steps": rows.view(np.uint8)}
    parts.update((k, v.view(np.uint8)) for k, v in sections.items())
    offsets, total = {}, 0
    for k, v in parts.items():
        size = max(v.size, 1)  # a kernel argument must point somewhere even when nothing is read
        offsets[k] = (total, size)
        total += -(-size // _ALIGN) * _ALIGN
    host = np.zeros(total, np.uint8)
    for k, v in parts.items():
        host[offsets[k][0]:offsets[k][0] + v.size] = v
    return host, offsets


def _records(meta: SamplingMetadata, rows, vocab: int, seed: int) -> np.ndarray:
    """PARAMS_DTYPE records of these rows (row indices, increasing)."""
    n = len(rows)
    rec = np.zeros(n, dtype=PARAMS_DTYPE)
    if n == 0:
        return rec
    every = n == meta.num_rows

    def column(values, dtype):  # np.fromiter: about twice as fast as np.asarray on a list
        return np.fromiter(values if every else (values[i] for i in rows), dtype, n)

    rec["top_p"] = column(meta.top_p, np.float64)
    temp = column(meta.temperature, np.float64)
    rec["temperature"] = temp  # float32, as NumPy's _Rows
    min_p = column(meta.min_p, np.float32)
    with np.errstate(divide="ignore"):
        rec["log_min_p"] = np.where(min_p > 0, np.log(min_p), np.float32(-np.inf))  # float32 log, as NumPy
    rec["repetition_penalty"] = column(meta.repetition_penalty, np.float64)
    rec["frequency_penalty"] = column(meta.frequency_penalty, np.float64)
    rec["presence_penalty"] = column(meta.presence_penalty, np.float64)
    top_k = column(meta.top_k, np.int64)
    rec["top_k"] = np.where((top_k > 0) & (top_k < vocab), top_k, 0)
    rec["greedy"] = temp < GREEDY_TEMPERATURE
    logprobs = meta.num_logprobs if every else [meta.num_logprobs[i] for i in rows]
    rec["num_logprobs"] = [-1 if k is None else min(k, MAX_TOP_LOGPROBS) for k in logprobs]
    seeds = meta.seeds if every else [meta.seeds[i] for i in rows]
    rec["seed"] = [(s if s is not None else seed) & MASK64 for s in seeds]
    rec["seeded"] = [s is not None for s in seeds]
    return rec


def _row_steps(meta: SamplingMetadata, slots: list[int], fresh) -> np.ndarray:
    """STEP_DTYPE records, one per row: slot, index of its fresh record, the per-call fields."""
    n = meta.num_rows
    rows = np.zeros(n, dtype=STEP_DTYPE)
    rows["slot"] = np.fromiter(slots, np.int32, n)
    rows["fresh"] = -1
    fresh_idx = np.fromiter(fresh, np.int64, len(fresh))
    rows["fresh"][fresh_idx] = np.arange(len(fresh_idx), dtype=np.int32)
    if meta.seeds.count(None) != n:
        # A seeded row's step is its output length: the same noise after preemption, in any batch.
        rows["step"] = [len(out) if s is not None else 0 for s, out in zip(meta.seeds, meta.output_token_ids)]
    rows["mask_row"] = -1
    rows["pen_slot"] = -1
    return rows


def resolve_rows(table: np.ndarray, fresh: np.ndarray, steps: np.ndarray, call_step: int) -> np.ndarray:
    """sampling.cu's load_row on NumPy arrays: each row's ROW_DTYPE view (its record, from `fresh` or
    the table, and the call's Philox words); writes the fresh records of rows with a slot into the
    table (PARAMS_DTYPE [S]), as the kernels do. The CPU tests' emulation of the kernels runs it."""
    n = steps.size
    out = np.zeros(n, dtype=ROW_DTYPE)
    for r in range(n):
        s = steps[r]
        if s["fresh"] >= 0:
            rec = fresh[s["fresh"]]
            if s["slot"] >= 0:
                table[s["slot"]] = rec
        else:
            rec = table[s["slot"]]
        for name in PARAMS_DTYPE.names:
            out[name][r] = rec[name]
        out["step"][r] = s["step"] if rec["seeded"] else call_step & MASK64
        out["tag"][r] = 0 if rec["seeded"] else r + 1
        for name in ("mask_row", "pen_slot", "pen_reset"):
            out[name][r] = s[name]
    return out


def _in_range(ids, vocab: int) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab)]
