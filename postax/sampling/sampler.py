"""The generation engine: prefill once, then a jitted `lax.while_loop` over a KV cache.

`Sampler(model, tokenizer).generate(prompts, config)` returns one `Completion`
per sample, in prompt-major order (prompt 0's `num_samples` samples, then
prompt 1's, ...). Prompts are strings (encoded with the tokenizer, which adds
bos as its post-processor says), token-id lists, or chat message lists
(rendered with the chat template and `add_generation_prompt=True`).

How a batch runs
----------------
1. Rows (prompt x sample) are sorted by prompt length and cut into batches of
   at most `max_batch_size` rows. A batch prefills each distinct prompt once
   and copies its cache to the rows of its samples.
2. Shapes are bucketed so that a stream of varied requests compiles a bounded
   number of times: prompt length P and the new-token budget N to powers of
   two (from 16), rows B and distinct prompts to powers of two (from
   `min_batch_bucket`), stop ids per row to powers of two (from 4). Extra
   rows are born finished. The cache holds P + N slots. Per shape there is
   one prefill and at most four decode-loop variants: two static switches
   keep unused code out of the loop, `greedy` (every row has temperature 0:
   no random draws) and `filters` (some row uses top-k or top-p).
   `compile_count` counts actual traces (a counter bumped while tracing).
3. Prefill writes the first P - 1 prompt columns into the cache (their logits
   are never used, so XLA drops the output projection); every row's last
   prompt token sits in column P - 1 (left padding), and decoding step 0
   feeds it. Each loop step: one `model.decode` of one token per row, logit
   processing (`strategies.process_logits`), sampling, stop-id and length
   checks. The loop exits early when every row is done.
4. Everything sampling-related is a traced per-row value (temperature, top-k,
   top-p, min-p, max_new_tokens, stop ids, PRNG keys), so requests with
   different settings share one batch and one compilation. The decode state
   (`DecodeState`, KV cache included) is donated from call to call, so the
   cache is updated in place.

Stop strings need text, so with stop strings the loop runs in chunks of
`stop_check_interval` steps; between chunks the host decodes each active
row, and a row whose text contains a stop string is marked done. The output
is cut at the first token whose decoded prefix contains a stop string (that
token included in `token_ids` and `logprobs`); `text` ends right before the
stop string; `finish_reason` is "stop" and `stop_reason` the string. Stop
ids end a row on device; the stop token is included in `token_ids` and
`stop_reason` is its id. Special tokens are never in `text`
(`skip_special_tokens=True`), so stop strings match the visible text only.

PRNG: each row's key is `fold_in(key(seed), sample_id)` and step s uses
`fold_in(row_key, s)`. In `generate`, sample_id = prompt_index *
num_samples + sample_index, so samples of a prompt are independent, and a
sample does not depend on batch composition, bucket sizes or
`max_batch_size`. (Bitwise equality across batch compositions also needs the
model's batched float arithmetic to agree, which XLA on CPU does in practice
but does not promise.) `seed=None` draws a fresh seed per call; the seed used
is recorded in every Completion.

Live weights: every call splits the model (`nnx.split`) and passes its
current state into the jitted functions, so a trainer updating the same
module is sampled from at once, without copies or a weight sync. The model
graph is a static argument: wrapping layers (LoRA) retraces once.

Beam search (`num_beams > 1`, or `Sampler.beam_search`) runs in its own
jitted loop, see postax.sampling.beam.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models.transformer import CausalLM, KVCache
from postax.sampling import beam as beam_search
from postax.sampling.strategies import first_argmax, process_logits, sample
from postax.validation import is_int, is_number, require

FINISH_REASONS = ("stop", "length")
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
    stop: strings that end a sample (cut from the text; see module docstring).
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
    finish_reason: "stop" (stop id or stop string) or "length".
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row sampling parameters, all traced: rows with different settings share a batch."""

    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    max_new_tokens: jax.Array  # [B] int32 (0 for filler rows)
    stop_ids: jax.Array  # [B, S] int32, -1 = unused
    keys: jax.Array  # [B] PRNG keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while-loop carry: everything one decoding step reads and writes."""

    cache: KVCache
    params: RowParams
    tokens: jax.Array  # [B, N] int32 generated ids (pad after a row finishes)
    logprobs: jax.Array  # [B, N] float32
    last_token: jax.Array  # [B] int32, fed at the next step
    positions: jax.Array  # [B] int32, position of last_token
    lengths: jax.Array  # [B] int32, tokens generated
    done: jax.Array  # [B] bool
    stopped: jax.Array  # [B] bool, ended on a stop id
    step: jax.Array  # int32 scalar, steps run so far


def _pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1): the bucket of every static size."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


@dataclasses.dataclass
class _Row:
    """One sample to generate, as the host sees it."""

    prompt_ids: tuple[int, ...]
    config: SamplingConfig
    seed: int
    sample_id: int
    stop_ids: tuple[int, ...]
    beams: bool  # run by the beam-search engine
    prompt_index: int
    sample_index: int


@dataclasses.dataclass
class _RowResult:
    token_ids: list[int]
    logprobs: list[float]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None
    score: float | None = None


class Sampler:
    """Generates from a live `CausalLM` (the same module a trainer updates).

    Args:
        model: the model; its current weights are read on every call.
        tokenizer: a postax Tokenizer (needed for string and chat prompts,
            text output, stop strings and default stop ids); may be None.
        max_batch_size: most rows (prompts x samples, or x beams) per device batch.
        stop_check_interval: decoding steps between host checks for stop strings.
        min_prompt_bucket, min_new_tokens_bucket: smallest length buckets.
        min_batch_bucket: smallest row bucket (fewer shapes for varied batch sizes).
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        *,
        max_batch_size: int = 64,
        stop_check_interval: int = 16,
        min_prompt_bucket: int = 16,
        min_new_tokens_bucket: int = 16,
        min_batch_bucket: int = 1,
    ):
        _require(
            is_int(max_batch_size) and max_batch_size >= 1,
            "max_batch_size",
            max_batch_size,
            "an integer >= 1",
        )
        _require(
            is_int(stop_check_interval) and stop_check_interval >= 1,
            "stop_check_interval",
            stop_check_interval,
            "an integer >= 1",
        )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = _pow2(max_batch_size)
        self.stop_check_interval = stop_check_interval
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_tokens_bucket = min_new_tokens_bucket
        self.min_batch_bucket = min_batch_bucket
        self.traces: collections.Counter = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("graphdef", "new_tokens"))
        self._decode = jax.jit(
            self._decode_fn,
            static_argnames=("graphdef", "greedy", "filters"),
            donate_argnames=("state",),
        )
        self._beam = jax.jit(
            self._beam_fn, static_argnames=("graphdef", "new_tokens", "num_beams", "num_stop")
        )

    # -- public -----------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        """Number of distinct traced (hence compiled) shapes so far, all functions together."""
        return sum(self.traces.values())

    def encode_prompt(self, prompt: PromptLike, *, where: str = "prompt") -> list[int]:
        """Token ids of a string, chat message list or id list; errors name `where`."""
        vocab = self.model.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SamplingError(f"{where} is a string but the Sampler has no tokenizer")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            if self.tokenizer is None:
                raise SamplingError(f"{where} is a chat but the Sampler has no tokenizer")
            ids = self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
        elif not isinstance(prompt, bytes) and (
            isinstance(prompt, Sequence) or hasattr(prompt, "__array__")
        ):
            ids = np.asarray(prompt).tolist() if hasattr(prompt, "__array__") else list(prompt)
            ids = ids if isinstance(ids, list) else [ids]
            bad = [i for i in ids if not is_int(i) or not 0 <= i < vocab]
            if bad:
                raise SamplingError(
                    f"{where} has invalid token ids {bad[:5]}: expected integers in [0, {vocab})"
                )
        else:
            raise SamplingError(
                f"{where} is a {type(prompt).__name__}: expected a string, a list of token ids "
                "or a list of chat messages ({'role', 'content'} dicts)"
            )
        if not ids:
            raise SamplingError(f"{where} is empty: it needs at least one token")
        return [int(i) for i in ids]

    def default_stop_ids(self) -> tuple[int, ...]:
        """The tokenizer's eos ids, else the model config's eos id(s), else none."""
        if self.tokenizer is not None:
            return tuple(self.tokenizer.eos_token_ids)
        eos = self.model.config.eos_token_id
        if eos is None:
            return ()
        return (eos,) if is_int(eos) else tuple(eos)

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        config: SamplingConfig | None = None,
        **options: Any,
    ) -> list[Completion]:
        """Generates `num_samples` completions per prompt, prompt-major.

        `config` or keyword options (SamplingConfig fields), not both. A single
        string is one prompt; otherwise `prompts` is a list of prompts.
        """
        beams = options.pop("_beams", False)
        if config is not None and options:
            raise SamplingError(f"pass a SamplingConfig or keyword options, not both: {options}")
        config = config if config is not None else SamplingConfig(**options)
        if isinstance(prompts, str):
            prompts = [prompts]
        elif hasattr(prompts, "__array__"):  # a [batch, length] array of ids
            prompts = np.asarray(prompts).tolist()
        if not isinstance(prompts, Sequence) or (prompts and is_int(prompts[0])):
            raise SamplingError(
                "prompts must be a list of prompts (strings, token-id lists or chat message "
                "lists); wrap a single token-id list in a list"
            )
        encoded = [self.encode_prompt(p, where=f"prompts[{i}]") for i, p in enumerate(prompts)]
        return self.generate_many([(ids, config) for ids in encoded], beams=beams)

    def beam_search(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        config: SamplingConfig | None = None,
        **options: Any,
    ) -> list[Completion]:
        """Like `generate`, but always through the beam-search engine (even with num_beams=1).

        `generate` uses it whenever num_beams > 1; with one beam and no stop
        ids it equals greedy decoding.
        """
        return self.generate(prompts, config, _beams=True, **options)

    def check_request(self, ids: Sequence[int], config: SamplingConfig, where: str) -> None:
        """Raises SamplingError (naming `where`) if (prompt ids, config) cannot run."""
        vocab = self.model.config.vocab_size
        if not ids:
            raise SamplingError(f"{where}: the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise SamplingError(f"{where}: prompt token ids must be in [0, {vocab})")
        stop_ids = config.stop_token_ids or ()
        if any(i >= vocab for i in stop_ids):
            raise SamplingError(
                f"{where}: stop_token_ids={stop_ids!r} is invalid: ids must be < {vocab}"
            )
        if config.stop and self.tokenizer is None:
            raise SamplingError(f"{where}: stop strings need a tokenizer; the Sampler has none")

    def generate_many(
        self,
        requests: Sequence[tuple[Sequence[int], SamplingConfig]],
        *,
        seed_offsets: Sequence[int] | None = None,
        beams: bool = False,
    ) -> list[Completion]:
        """Generates for (prompt ids, config) pairs with per-request settings, batched together.

        Completions come back request-major, with `prompt_index` = request
        index. Request i's samples use sample ids offset_i + j under its seed;
        by default offset_i counts the samples of the requests before it, so
        no two samples of a call share a stream. `beams=True` sends every
        request through the beam engine.
        """
        fresh_seed = secrets.randbits(32)
        rows: list[_Row] = []
        offset = 0
        for index, (ids, config) in enumerate(requests):
            ids = tuple(int(i) for i in ids)
            self.check_request(ids, config, f"request {index}")
            stop_ids = config.stop_token_ids
            stop_ids = self.default_stop_ids() if stop_ids is None else stop_ids
            seed = fresh_seed if config.seed is None else config.seed
            base = offset if seed_offsets is None else int(seed_offsets[index])
            offset += config.num_samples
            use_beams = beams or config.num_beams > 1
            if use_beams and config.num_samples > config.num_beams:
                raise SamplingError(
                    f"request {index}: num_samples={config.num_samples} is invalid: at most "
                    f"num_beams={config.num_beams} with beam search"
                )
            for j in range(1 if use_beams else config.num_samples):
                rows.append(_Row(ids, config, seed, base + j, tuple(stop_ids), use_beams, index, j))
        results: dict[int, list[_RowResult]] = {}
        sampled = [r for r in rows if not r.beams]
        for batch in self._batches(sampled, lambda r: 1):
            for row, result in zip(batch, self._run_sampling(batch), strict=True):
                results[id(row)] = [result]
        groups: dict[tuple, list[_Row]] = collections.defaultdict(list)
        for row in rows:
            if row.beams:
                groups[(row.config, row.stop_ids)].append(row)
        for (config, _), group in groups.items():
            for batch in self._batches(group, lambda r: r.config.num_beams):
                for row, result in zip(batch, self._run_beams(batch, config), strict=True):
                    results[id(row)] = result
        out = []
        for row in rows:
            for k, result in enumerate(results[id(row)]):
                out.append(
                    Completion(
                        prompt_index=row.prompt_index,
                        sample_index=row.sample_index + k,
                        prompt_ids=row.prompt_ids,
                        token_ids=tuple(result.token_ids),
                        logprobs=tuple(result.logprobs),
                        text=result.text,
                        finish_reason=result.finish_reason,
                        stop_reason=result.stop_reason,
                        seed=row.seed,
                        config=row.config,
                        score=result.score,
                    )
                )
        return out

    # -- host side ------------------------------------------------------------------------

    def _batches(self, rows: list[_Row], width) -> list[list[_Row]]:
        """Rows sorted by prompt length, cut into batches of <= max_batch_size device rows."""
        ordered = sorted(rows, key=lambda r: len(r.prompt_ids))
        batches, current, used = [], [], 0
        for row in ordered:
            if current and used + width(row) > self.max_batch_size:
                batches.append(current)
                current, used = [], 0
            current.append(row)
            used += width(row)
        if current:
            batches.append(current)
        return batches

    def _rows_bucket(self, n: int) -> int:
        return min(self.max_batch_size, _pow2(max(n, self.min_batch_bucket)))

    def _prompt_arrays(self, prompts: list[tuple[int, ...]], batch: int):
        """Left-padded [batch, P] tokens and mask (extra rows repeat prompt 0)."""
        width = _pow2(max(self.min_prompt_bucket, max(len(p) for p in prompts)))
        tokens = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), np.int32)
        for i in range(batch):
            p = prompts[i] if i < len(prompts) else prompts[0]
            tokens[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        return tokens, mask

    def _decode_text(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _run_sampling(self, rows: list[_Row]) -> list[_RowResult]:
        graphdef, model_state = nnx.split(self.model)
        distinct = list(dict.fromkeys(r.prompt_ids for r in rows))
        prompt_of = {p: i for i, p in enumerate(distinct)}
        n_rows = self._rows_bucket(len(rows))
        tokens, mask = self._prompt_arrays(distinct, self._rows_bucket(len(distinct)))
        max_new = max(r.config.max_new_tokens for r in rows)
        new_tokens = _pow2(max(self.min_new_tokens_bucket, max_new))
        num_stop = _pow2(max(4, max(len(r.stop_ids) for r in rows)))
        stop_ids = np.full((n_rows, num_stop), -1, np.int32)
        for i, r in enumerate(rows):
            stop_ids[i, : len(r.stop_ids)] = r.stop_ids

        def column(get, dtype, filler):
            return np.array([get(r) for r in rows] + [filler] * (n_rows - len(rows)), dtype)

        inputs = dict(
            row_prompt=column(lambda r: prompt_of[r.prompt_ids], np.int32, 0),
            temperature=column(lambda r: r.config.temperature, np.float32, 0.0),
            top_k=column(lambda r: r.config.top_k, np.int32, 0),
            top_p=column(lambda r: r.config.top_p, np.float32, 1.0),
            min_p=column(lambda r: r.config.min_p, np.float32, 0.0),
            max_new_tokens=column(lambda r: r.config.max_new_tokens, np.int32, 0),
            seeds=column(lambda r: r.seed, np.uint32, 0),
            sample_ids=column(lambda r: r.sample_id, np.uint32, 0),
            stop_ids=stop_ids,
        )
        state = self._prefill(
            graphdef=graphdef,
            model_state=model_state,
            prompt_tokens=tokens,
            prompt_mask=mask,
            new_tokens=new_tokens,
            **inputs,
        )
        greedy = all(r.config.temperature == 0 for r in rows)
        filters = any(r.config.top_k > 0 or r.config.top_p < 1 for r in rows)
        stops = [r.config.stop for r in rows]
        checked = [0] * len(rows)  # tokens of each row known to hold no stop string
        string_stop: dict[int, tuple[int, str, str]] = {}
        interval = self.stop_check_interval if any(stops) else max_new
        limit = 0
        while True:
            limit = min(limit + interval, max_new)
            state = self._decode(
                graphdef=graphdef,
                model_state=model_state,
                state=state,
                limit=limit,
                greedy=greedy,
                filters=filters,
            )
            if not any(stops):
                break
            host_tokens, lengths, done = jax.device_get((state.tokens, state.lengths, state.done))
            done = np.array(done)  # writable
            newly_done = False
            for i, row_stops in enumerate(stops):
                if not row_stops or i in string_stop or checked[i] == lengths[i]:
                    continue
                found = self._find_stop(host_tokens[i, : lengths[i]], row_stops, checked[i])
                checked[i] = int(lengths[i])
                if found is not None:
                    string_stop[i] = found
                    if not done[i]:
                        done[i] = True
                        newly_done = True
            if done.all() or limit >= max_new:
                break
            if newly_done:
                state = dataclasses.replace(state, done=jnp.asarray(done))
        host_tokens, host_logprobs, lengths, stopped = jax.device_get(
            (state.tokens, state.logprobs, state.lengths, state.stopped)
        )
        results = []
        for i in range(len(rows)):
            if i in string_stop:
                count, stop, text = string_stop[i]
                ids = host_tokens[i, :count].tolist()
                results.append(
                    _RowResult(ids, host_logprobs[i, :count].tolist(), text, "stop", stop)
                )
                continue
            ids = host_tokens[i, : lengths[i]].tolist()
            reason = "stop" if stopped[i] else "length"
            results.append(
                _RowResult(
                    ids,
                    host_logprobs[i, : lengths[i]].tolist(),
                    self._decode_text(ids),
                    reason,
                    ids[-1] if stopped[i] else None,
                )
            )
        return results

    def _find_stop(
        self, ids: np.ndarray, stops: tuple[str, ...], checked: int
    ) -> tuple[int, str, str] | None:
        """(tokens to keep, the stop string, text before it) for the first stop string, if any.

        `checked`: a prefix of that many tokens is already known to hold none.
        """
        text = self._decode_text(ids)
        if not any(s in text for s in stops):
            return None
        for count in range(checked + 1, len(ids) + 1):
            prefix = self._decode_text(ids[:count])
            hits = sorted((prefix.find(s), s) for s in stops if s in prefix)
            if hits:
                position, stop = hits[0]
                return count, stop, prefix[:position]
        # Only reachable if decoding is not prefix-stable: keep every token, cut the text.
        position, stop = min((text.find(s), s) for s in stops if s in text)
        return len(ids), stop, text[:position]

    def _run_beams(self, rows: list[_Row], config: SamplingConfig) -> list[list[_RowResult]]:
        graphdef, model_state = nnx.split(self.model)
        beams = config.num_beams
        n_prompts = self._rows_bucket(len(rows))
        tokens, mask = self._prompt_arrays([r.prompt_ids for r in rows], n_prompts)
        new_tokens = _pow2(max(self.min_new_tokens_bucket, config.max_new_tokens))
        stop = rows[0].stop_ids
        num_stop = _pow2(max(4, len(stop))) if stop else 0
        stop_ids = np.full((num_stop,), -1, np.int32)
        stop_ids[: len(stop)] = stop
        out = self._beam(
            graphdef=graphdef,
            model_state=model_state,
            prompt_tokens=tokens,
            prompt_mask=mask,
            real_prompts=np.arange(n_prompts) < len(rows),
            max_new_tokens=np.int32(config.max_new_tokens),
            length_penalty=np.float32(config.length_penalty),
            stop_ids=stop_ids,
            new_tokens=new_tokens,
            num_beams=beams,
            num_stop=num_stop,
        )
        seqs, logprobs, lengths, scores = jax.device_get(
            (out.sequences, out.logprobs, out.lengths, out.scores)
        )
        results = []
        for i, _row in enumerate(rows):
            per_prompt = []
            for k in range(config.num_samples):
                n = int(lengths[i, k])
                ids = seqs[i, k, :n].tolist()
                stopped = bool(n) and ids[-1] in stop
                per_prompt.append(
                    _RowResult(
                        ids,
                        logprobs[i, k, :n].tolist(),
                        self._decode_text(ids),
                        "stop" if stopped else "length",
                        ids[-1] if stopped else None,
                        float(scores[i, k]),
                    )
                )
            results.append(per_prompt)
        return results

    # -- traced -------------------------------------------------------------------------------

    def _count(self, name: str, *keys) -> None:
        """Called while tracing: one more compiled shape (`keys`: arrays or static values)."""
        self.traces[(name, *(tuple(k.shape) if hasattr(k, "shape") else k for k in keys))] += 1

    def _prefill_fn(
        self,
        *,
        graphdef,
        model_state,
        prompt_tokens,
        prompt_mask,
        new_tokens: int,
        row_prompt,
        temperature,
        top_k,
        top_p,
        min_p,
        max_new_tokens,
        seeds,
        sample_ids,
        stop_ids,
    ) -> DecodeState:
        self._count("prefill", prompt_tokens, row_prompt, stop_ids, new_tokens)
        model = nnx.merge(graphdef, model_state)
        n_prompts, width = prompt_tokens.shape
        n_rows = row_prompt.shape[0]
        cache, positions = model.prefill(prompt_tokens, prompt_mask, width + new_tokens)
        if n_rows != n_prompts or n_prompts > 1:
            cache = jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, row_prompt, 0), cache)
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, sample_ids)
        params = RowParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            max_new_tokens=max_new_tokens,
            stop_ids=stop_ids,
            keys=keys,
        )
        return DecodeState(
            cache=cache,
            params=params,
            tokens=jnp.zeros((n_rows, new_tokens), jnp.int32),
            logprobs=jnp.zeros((n_rows, new_tokens), jnp.float32),
            last_token=prompt_tokens[row_prompt, -1],
            positions=positions[row_prompt, -1],
            lengths=jnp.zeros((n_rows,), jnp.int32),
            done=max_new_tokens <= 0,
            stopped=jnp.zeros((n_rows,), bool),
            step=jnp.zeros((), jnp.int32),
        )

    def _decode_fn(
        self, *, graphdef, model_state, state: DecodeState, limit, greedy: bool, filters: bool
    ) -> DecodeState:
        """Runs decoding steps until `limit` steps in total or every row is done.

        Static switches keep unused code out of the compiled loop: `greedy`
        (every row has temperature 0: no noise is drawn) and `filters` (some
        row uses top-k or top-p). Their values stay traced.
        """
        self._count(
            "decode", state.tokens, state.params.stop_ids, state.cache.valid, greedy, filters
        )
        model = nnx.merge(graphdef, model_state)
        params = state.params

        def cond(s: DecodeState):
            return (s.step < limit) & ~jnp.all(s.done)

        def body(s: DecodeState) -> DecodeState:
            logits, cache = model.decode(
                s.last_token[:, None], s.cache, positions=s.positions[:, None]
            )
            logprobs = process_logits(
                logits[:, 0],
                temperature=params.temperature,
                top_k=params.top_k if filters else 0,
                top_p=params.top_p if filters else 1.0,
                min_p=params.min_p,
            )
            if greedy:
                token = first_argmax(logprobs)
                token_logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
            else:
                keys = jax.vmap(jax.random.fold_in, (0, None))(params.keys, s.step)
                token, token_logprob = sample(keys, logprobs, params.temperature)
            token = jnp.where(s.done, 0, token)
            token_logprob = jnp.where(s.done, 0.0, token_logprob)
            hit_stop = jnp.any(token[:, None] == params.stop_ids, axis=-1) & ~s.done
            lengths = s.lengths + (~s.done).astype(jnp.int32)
            return DecodeState(
                cache=cache,
                params=params,
                tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, 1),
                logprobs=jax.lax.dynamic_update_slice_in_dim(
                    s.logprobs, token_logprob[:, None], s.step, 1
                ),
                last_token=token,
                positions=s.positions + 1,
                lengths=lengths,
                done=s.done | hit_stop | (lengths >= params.max_new_tokens),
                stopped=s.stopped | hit_stop,
                step=s.step + 1,
            )

        return jax.lax.while_loop(cond, body, state)

    def _beam_fn(
        self,
        *,
        graphdef,
        model_state,
        prompt_tokens,
        prompt_mask,
        real_prompts,
        max_new_tokens,
        length_penalty,
        stop_ids,
        new_tokens: int,
        num_beams: int,
        num_stop: int,
    ) -> beam_search.BeamOutput:
        self._count("beam", prompt_tokens, stop_ids, new_tokens, num_beams)
        model = nnx.merge(graphdef, model_state)
        return beam_search.beam_search(
            model,
            prompt_tokens,
            prompt_mask,
            real_prompts=real_prompts,
            max_new_tokens=max_new_tokens,
            length_penalty=length_penalty,
            stop_ids=stop_ids,
            new_tokens=new_tokens,
            num_beams=num_beams,
        )
