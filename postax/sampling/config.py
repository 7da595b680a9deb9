"""What a caller passes to the sampler and what comes back: options, completions, errors.

`SamplingConfig` holds one request's options, validated on construction;
`Completion` is one generated sample. A completion ends for one of the
`FINISH_REASONS`: `FINISH_STOP` (a stop token id or a stop string) or
`FINISH_LENGTH` (its `max_new_tokens` budget ran out).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from postax.validation import is_int, is_number, require

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH)

PromptLike = str | Sequence[int] | Sequence[Mapping[str, Any]]


class SamplingError(ValueError):
    """A sampling option or a prompt is invalid; the message names it and what is allowed."""


_require = functools.partial(require, error=SamplingError)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to generate. Every field is validated on construction.

    max_new_tokens: most tokens to generate per sample (stop token included).
    temperature: 0 is greedy (argmax); > 0 divides the logits.
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass
      (1 = off). min_p: keep tokens with p >= min_p * max p (0 = off).
      See postax.sampling.strategies for order and ties.
    num_samples: samples per prompt (with beams: best beams returned).
    stop_token_ids: ids that end a sample (kept in the output). None uses
      the tokenizer's eos ids (else the model config's); () disables.
    stop: strings that end a sample (cut from the text; see postax.sampling.stops).
    seed: PRNG seed (0 <= seed < 2**32); None draws a fresh one per call.
    num_beams: > 1 runs beam search (deterministic, over raw log-probs: no
      temperature/filters/stop strings).
    length_penalty: beam score = sum log-prob / generated_length**length_penalty.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    num_samples: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, (list, int)) and not isinstance(
            self.stop_token_ids, bool
        ):
            ids = [self.stop_token_ids] if is_int(self.stop_token_ids) else self.stop_token_ids
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        _require(
            is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            "max_new_tokens",
            self.max_new_tokens,
            "an integer >= 1",
        )
        _require(
            is_number(self.temperature) and 0 <= self.temperature < math.inf,
            "temperature",
            self.temperature,
            "a finite number >= 0 (0 = greedy)",
        )
        _require(
            is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            self.top_k,
            "an integer >= 0 (0 = off)",
        )
        _require(
            is_number(self.top_p) and 0 < self.top_p <= 1,
            "top_p",
            self.top_p,
            "a number in (0, 1] (1 = off)",
        )
        _require(
            is_number(self.min_p) and 0 <= self.min_p <= 1,
            "min_p",
            self.min_p,
            "a number in [0, 1] (0 = off)",
        )
        _require(
            is_int(self.num_samples) and self.num_samples >= 1,
            "num_samples",
            self.num_samples,
            "an integer >= 1",
        )
        _require(
            self.stop_token_ids is None
            or (
                isinstance(self.stop_token_ids, tuple)
                and all(is_int(i) and i >= 0 for i in self.stop_token_ids)
            ),
            "stop_token_ids",
            self.stop_token_ids,
            "None (the tokenizer's eos ids) or a list of token ids >= 0",
        )
        _require(
            isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            self.stop,
            "a list of non-empty strings",
        )
        _require(
            self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**32),
            "seed",
            self.seed,
            "None or an integer in [0, 2**32)",
        )
        _require(
            is_int(self.num_beams) and self.num_beams >= 1,
            "num_beams",
            self.num_beams,
            "an integer >= 1",
        )
        _require(
            is_number(self.length_penalty) and math.isfinite(self.length_penalty),
            "length_penalty",
            self.length_penalty,
            "a finite number",
        )
        if self.num_beams > 1:
            _require(
                self.num_samples <= self.num_beams,
                "num_samples",
                self.num_samples,
                f"at most num_beams={self.num_beams} (the best beams are returned)",
            )
            for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
                _require(
                    getattr(self, name) == off,
                    name,
                    getattr(self, name),
                    f"must be {off} (off) with num_beams > 1: beam search is deterministic",
                )
            _require(
                not self.stop,
                "stop",
                self.stop,
                "stop strings are not supported with num_beams > 1",
            )


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated sample.

    token_ids: generated ids (a stop token included; cut after a stop string).
    logprobs: log-prob of each generated token under the distribution it was
      drawn from (after temperature, top-k, top-p, min-p); for greedy and
      beam search, the temperature-1 log-prob with the same filters.
    text: decoded `token_ids` without special tokens, cut before a stop
      string; None without a tokenizer.
    finish_reason: one of FINISH_REASONS: "stop" (stop id or stop string) or
      "length".
    stop_reason: the stop token id or stop string, None for "length".
    score: beam search's length-penalised score; None when sampling.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None
    seed: int
    config: SamplingConfig
    score: float | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sequence_logprob(self) -> float:
        return float(sum(self.logprobs))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's output record)."""
        out = {
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprobs": list(self.logprobs),
            "finish_reason": self.finish_reason,
            "stop_reason": self.stop_reason,
            "prompt_length": self.prompt_length,
            "num_tokens": self.num_tokens,
            "seed": self.seed,
        }
        if self.score is not None:
            out["score"] = self.score
        return out
