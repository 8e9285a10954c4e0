"""SamplingMetadata: the per-step sampling inputs, one row per request that samples this step.

The runner builds it (usually through `from_requests`) and hands it to the sampler together with
the `[num_rows, vocab]` logits. Everything here is plain Python lists so that the engine side can
build it without NumPy; the flags computed in `__post_init__` let the sampler skip whole stages in
the common cases (all greedy, no penalties, no top-k/top-p, no logprobs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Iterable, Sequence

from rvllm.sampling_params import SamplingParams, penalized

# Same cut-off as SamplingParams.greedy: below this temperature a row takes the argmax.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingMetadata:
    temperature: list[float]
    top_p: list[float]
    top_k: list[int]  # 0 = off
    min_p: list[float]
    presence_penalty: list[float]
    frequency_penalty: list[float]
    repetition_penalty: list[float]
    logit_bias: list[dict[int, float] | None]
    seeds: list[int | None]
    # The request's generated tokens so far; frequency/presence penalties count these, and its
    # length is the step number that seeds a seeded row's noise (so preemption replays the same noise).
    output_token_ids: list[list[int]] = field(repr=False)
    prompt_token_ids: list[list[int]] = field(repr=False)
    # Tokens forbidden this step (EOS and stop ids while the request is short of min_tokens).
    suppress_token_ids: list[list[int]]
    num_logprobs: list[int | None]
    # Structured output later: per row a bool [vocab] array (True = allowed) or None.
    allowed_token_masks: list | None = None
    # Per row the request's id, or None: keys the GPU sampler's per-request penalty state
    # (penalty_slots.py). Rows without one get fresh state for the call (a full upload).
    request_ids: Sequence[str | None] | None = None
    # Per row the request's SamplingParams, or None: with request_ids, keys the GPU sampler's table
    # of parameter records on the device (param_slots.py): a row whose params did not change since
    # the last call sends no record. The columns above are what the samplers read.
    sampling_params: Sequence[SamplingParams | None] | None = None

    # ---- derived flags (computed, not passed) -----------------------------------------------
    num_rows: int = field(init=False)
    all_greedy: bool = field(init=False)
    all_random: bool = field(init=False)
    no_penalties: bool = field(init=False)
    penalized_rows: list[int] = field(init=False)  # rows whose penalties change their logits
    no_logit_bias: bool = field(init=False)
    no_suppress: bool = field(init=False)
    no_top_k_top_p: bool = field(init=False)  # over the random rows only; greedy rows ignore them
    no_min_p: bool = field(init=False)
    any_seeded: bool = field(init=False)
    max_num_logprobs: int | None = field(init=False)  # None: no row wants logprobs

    def __post_init__(self) -> None:
        n = len(self.temperature)
        lists = (self.top_p, self.top_k, self.min_p, self.presence_penalty, self.frequency_penalty,
                 self.repetition_penalty, self.logit_bias, self.seeds, self.output_token_ids,
                 self.prompt_token_ids, self.suppress_token_ids, self.num_logprobs)
        if any(len(x) != n for x in lists) or any(x is not None and len(x) != n
                                                  for x in (self.allowed_token_masks, self.request_ids,
                                                            self.sampling_params)):
            raise ValueError("SamplingMetadata: every per-row list must have one entry per row")
        self.num_rows = n
        # Rows usually share one SamplingParams: when every column holds a single value (list.count
        # runs in C, identity first), row 0 stands for all rows in the flags below.
        uniform = n > 0 and all(c.count(c[0]) == n for c in (
            self.temperature, self.top_p, self.top_k, self.min_p, self.presence_penalty,
            self.frequency_penalty, self.repetition_penalty, self.seeds, self.num_logprobs))
        rows = range(1) if uniform else range(n)
        greedy = [self.temperature[i] < GREEDY_TEMPERATURE for i in rows]
        self.all_greedy = all(greedy)
        self.all_random = not any(greedy)
        pen = [i for i in rows if penalized(self.repetition_penalty[i], self.frequency_penalty[i],
                                            self.presence_penalty[i])]
        self.penalized_rows = list(range(n)) if uniform and pen else pen
        self.no_penalties = not pen
        self.no_logit_bias = not any(self.logit_bias)
        self.no_suppress = not any(self.suppress_token_ids)
        random_rows = [i for i, g in zip(rows, greedy) if not g]
        self.no_top_k_top_p = all(self.top_k[i] <= 0 and self.top_p[i] >= 1.0 for i in random_rows)
        self.no_min_p = all(self.min_p[i] <= 0.0 for i in random_rows)
        self.any_seeded = any(self.seeds[i] is not None for i in random_rows)
        wanted = [self.num_logprobs[i] for i in rows if self.num_logprobs[i] is not None]
        self.max_num_logprobs = max(wanted) if wanted else None

    @property
    def needs_logit_processing(self) -> bool:
        """True when the logits must be copied and edited before sampling."""
        return not (self.no_penalties and self.no_logit_bias and self.no_suppress
                    and not any(m is not None for m in (self.allowed_token_masks or ())))

    @classmethod
    def from_requests(
        cls,
        rows: Sequence[tuple[SamplingParams, Sequence[int], Sequence[int], Iterable[int] | int | None]],
        request_ids: Sequence[str] | None = None,
    ) -> "SamplingMetadata":
        """rows: (params, prompt_token_ids, output_token_ids, eos_token_ids) per sampling request;
        request_ids: their ids, in the same order (the runner's StepBatch.sample_ids).

        The id lists are kept by reference (not copied): the sampler only reads them.
        """
        n = len(rows)
        param_list = list(map(itemgetter(0), rows))
        if n and param_list.count(param_list[0]) == n:
            # The common case, every row's params equal (list.count runs in C, identity first):
            # the columns repeat one tuple of values.
            any_min_tokens = param_list[0].min_tokens > 0
            cols = [[v] * n for v in _row_values(param_list[0])]
        else:
            # One tuple of values per distinct SamplingParams (requests usually share a few), then columns.
            per_params: dict[int, tuple] = {}
            values = []
            for sp in param_list:
                v = per_params.get(id(sp))
                if v is None:
                    v = per_params[id(sp)] = _row_values(sp)
                values.append(v)
            any_min_tokens = any(sp.min_tokens for sp in param_list)
            cols = [list(c) for c in zip(*values)] if values else [[] for _ in range(10)]
        suppress: list[list[int]] = [[]] * n  # rows with nothing to suppress share one empty list (read only)
        if any_min_tokens:
            for i, (sp, _, out, eos) in enumerate(rows):
                if len(out) < sp.min_tokens:
                    # vLLM: min_tokens holds back every token that would stop the request. With
                    # ignore_eos, EOS does not stop it, so EOS stays allowed.
                    ids = list(sp.stop_token_ids or ())
                    if not sp.ignore_eos and eos is not None:
                        ids += [eos] if isinstance(eos, int) else list(eos)
                    suppress[i] = ids
        return cls(
            temperature=cols[0], top_p=cols[1], top_k=cols[2], min_p=cols[3], presence_penalty=cols[4],
            frequency_penalty=cols[5], repetition_penalty=cols[6], logit_bias=cols[7], seeds=cols[8],
            output_token_ids=list(map(itemgetter(2), rows)),
            prompt_token_ids=list(map(itemgetter(1), rows)),
            suppress_token_ids=suppress,
            num_logprobs=cols[9],
            request_ids=request_ids,
            sampling_params=param_list,
        )


def _row_values(sp: SamplingParams) -> tuple:
    """One request's sampling values, in from_requests' column order."""
    return (float(sp.temperature), float(sp.top_p), max(int(sp.top_k), 0), float(sp.min_p),
            float(sp.presence_penalty), float(sp.frequency_penalty), float(sp.repetition_penalty),
            sp.logit_bias or None, sp.seed, sp.logprobs)
