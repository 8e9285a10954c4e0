"""SamplingParams: vLLM's fields, names and defaults, validated once at construction."""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field, fields

# Fields a model's generation_config.json may set, as vLLM applies them ("auto" generation config).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def penalized(repetition: float, frequency: float, presence: float) -> bool:
    """Whether these penalty values change the logits (1, 0 and 0 leave them as they are). The one
    statement of that rule: the engine (per request) and the sampling metadata (per row) call it."""
    return repetition != 1.0 or frequency != 0.0 or presence != 0.0


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (plus the chosen token's)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Fields the caller left unset, so generation_config.json defaults may fill them (vLLM semantics).
    _unset: frozenset = field(default=frozenset(), repr=False, compare=False)

    @property
    def has_penalties(self) -> bool:
        return penalized(self.repetition_penalty, self.frequency_penalty, self.presence_penalty)

    def __init__(self, **kwargs):
        names = {f.name for f in fields(self) if f.name != "_unset"}
        unknown = set(kwargs) - names
        if unknown:
            raise ValueError(f"SamplingParams got unknown field(s): {', '.join(sorted(unknown))}")
        for f in fields(self):
            if f.name == "_unset":
                continue
            default = f.default if f.default is not None or f.default_factory is None else None
            setattr(self, f.name, kwargs.get(f.name, default))
        self._unset = frozenset(names - set(kwargs))
        self._normalize()
        self._validate()

    # ---- construction helpers --------------------------------------------------------------------
    def _normalize(self) -> None:
        # Conversions that fail raise ValueError naming the field (not a bare TypeError/ValueError
        # from int()/float()), so the server can answer 400 with the field's name.
        def convert(name, fn):
            try:
                setattr(self, name, fn(getattr(self, name)))
            except (TypeError, ValueError):
                raise ValueError(f"{name} has an invalid value: {getattr(self, name)!r}") from None

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        convert("stop", lambda v: list(v or []))
        convert("stop_token_ids", lambda v: [_as_int(t) for t in (v or [])])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            convert("logit_bias", lambda v: {_as_int(k): float(b) for k, b in dict(v).items()})

    def _validate(self) -> None:
        def check(ok: bool, name: str, allowed: str):
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        # Float fields: a finite real number first (a string or None would otherwise raise TypeError
        # in the comparisons, and inf/NaN would reach the sampler: an infinite temperature gives NaN).
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            check(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
                  name, "a finite number")
        check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        check(self.temperature >= 0.0, "temperature", ">= 0")
        check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "-1, 0 (off) or a positive integer")
        check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]")
        # vLLM only requires > 0 (1 = off, > 1 discourages repeats, < 1 encourages them).
        check(self.repetition_penalty > 0.0, "repetition_penalty", "> 0")
        check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
              "max_tokens", "an integer >= 1 or None")
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
              "logprobs", "an integer >= 0 or None")
        check(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
              "prompt_logprobs", "an integer >= 0 or None")
        check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        if self.logit_bias:
            check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias", "values in [-100, 100]")

    # ---- engine-facing helpers ------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def with_generation_defaults(self, defaults: dict) -> "SamplingParams":
        """Fill fields the caller did not set from the model's generation_config.json."""
        updates = {k: v for k, v in defaults.items() if k in GENERATION_CONFIG_FIELDS and k in self._unset}
        if not updates:
            return self
        out = copy.copy(self)
        for k, v in updates.items():
            setattr(out, k, v)
        out._normalize()
        out._validate()
        return out

    def clone(self, **changes) -> "SamplingParams":
        """A copy with `changes` applied, normalized and validated like a new one; changed fields
        count as set by the caller (generation-config defaults no longer fill them)."""
        unknown = set(changes) - {f.name for f in fields(self) if f.name != "_unset"}
        if unknown:
            raise ValueError(f"SamplingParams got unknown field(s): {', '.join(sorted(unknown))}")
        out = copy.copy(self)
        for k, v in changes.items():
            setattr(out, k, v)
        out._unset = self._unset - set(changes)
        out._normalize()
        out._validate()
        return out


def _as_int(v) -> int:
    """int(v) for integers and integral floats (JSON "50256" keys arrive as strings); no bools."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    return int(v)
