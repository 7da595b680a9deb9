"""The generation engine: `Sampler(model, tokenizer).generate(prompts, config)`.

`generate` returns one `Completion` per sample, in prompt-major order (prompt
0's `num_samples` samples, then prompt 1's, ...). Prompts are strings
(encoded with the tokenizer, which adds bos as its post-processor says),
token-id lists, or chat message lists (rendered with the chat template and
`add_generation_prompt=True`).

How a call runs
---------------
1. Requests become rows (prompt x sample), sorted by prompt length and cut
   into batches with bucketed shapes (postax.sampling.batching). A batch
   prefills each distinct prompt once and copies its cache to the rows of
   its samples.
2. The jitted prefill and decoding loop (postax.sampling.decode) run over a
   preallocated KV cache. Per shape there is one prefill and at most four
   decode-loop variants (static `greedy` and `filters` switches).
   `compile_count` counts actual traces (a `TraceCounter` bumped while
   tracing); each Sampler compiles and counts its own.
3. With stop strings the loop runs in chunks of `stop_check_interval` steps;
   between chunks a `StopScanner` per row decodes the new tokens and marks a
   row done at its first stop string (postax.sampling.stops). Stop ids end a
   row on device; the stop token is included in `token_ids` and
   `stop_reason` is its id.
4. The decode state (`DecodeState`, KV cache included) is donated from call
   to call, so the cache is updated in place.

PRNG: in `generate`, sample_id = prompt_index * num_samples + sample_index and
each row draws from `fold_in(key(seed), sample_id)`, so samples of a prompt
are independent, and a sample does not depend on batch composition, bucket
sizes or `max_batch_size`. (Bitwise equality across batch compositions also
needs the model's batched float arithmetic to agree, which XLA on CPU does in
practice but does not promise.) `seed=None` draws a fresh seed per call; the
seed used is recorded in every Completion.

Live weights: every call splits the model (`nnx.split`) and passes its
current state into the jitted functions, so a trainer updating the same
module is sampled from at once, without copies or a weight sync. The model
graph is a static argument: wrapping layers (LoRA) retraces once.

Beam search (`num_beams > 1`, or `Sampler.beam_search`) runs in its own
jitted loop, see postax.sampling.beam.

Images (a Gemma 3 vision-language model, `postax.models.gemma3_vlm`): `generate(prompts,
images=[...])` takes one entry per prompt, None or that prompt's preprocessed pixels
`[n, channels, size, size]`, in the order of its image blocks. Prompts are checked on the
host (each image block of mm_tokens_per_image tokens has its image, a prompt ends with
text); a batch's images are zero-padded to a power-of-two count per prompt and encoded in
the jitted prefill, where image blocks attend bidirectionally. Beam search takes no images.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.data.images import image_inputs
from postax.host_memory import trim_heap
from postax.models.gemma3_vlm import VisionLanguageLM, check_image_tokens, image_block_lengths
from postax.models.transformer import CausalLM
from postax.sampling.batching import (
    RowResult,
    SampleRow,
    batches,
    prompt_arrays,
    prompt_images,
    row_params,
    rows_bucket,
)
from postax.sampling.beam import beam_batch_inputs, beam_row_results, traced_beam_search
from postax.sampling.config import (
    FINISH_LENGTH,
    FINISH_REASONS,
    FINISH_STOP,
    Completion,
    PromptLike,
    SamplingConfig,
    SamplingError,
)
from postax.sampling.decode import DecodeState, RowParams, decode_steps, prefill
from postax.sampling.stops import StopHit, StopScanner
from postax.shapes import TraceCounter, pow2_bucket
from postax.validation import is_int, require

__all__ = [
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "Completion",
    "DecodeState",
    "PromptLike",
    "RowParams",
    "Sampler",
    "SamplingConfig",
    "SamplingError",
]


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
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("stop_check_interval", stop_check_interval),
        ):
            require(
                is_int(value) and value >= 1, name, value, "an integer >= 1", error=SamplingError
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = pow2_bucket(max_batch_size)
        self.stop_check_interval = stop_check_interval
        self.min_prompt_bucket = min_prompt_bucket
        self.min_new_tokens_bucket = min_new_tokens_bucket
        self.min_batch_bucket = min_batch_bucket
        self.traces = TraceCounter()
        self._prefill = jax.jit(
            functools.partial(prefill, traces=self.traces),
            static_argnames=("graphdef", "new_tokens"),
        )
        self._decode = jax.jit(
            functools.partial(decode_steps, traces=self.traces),
            static_argnames=("graphdef", "greedy", "filters"),
            donate_argnames=("state",),
        )
        self._beam = jax.jit(
            functools.partial(traced_beam_search, traces=self.traces),
            static_argnames=("graphdef", "new_tokens", "num_beams"),
        )

    # -- public -----------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        """Number of distinct traced (hence compiled) shapes so far, all functions together."""
        return self.traces.total()

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
            kwargs = {}
            inputs = image_inputs(self.model.config, self.tokenizer)
            if inputs is not None:  # each image part becomes its whole block of image tokens
                kwargs["marker_expansion"] = (inputs.tokens.boi_token, inputs.tokens.sequence)
            ids = self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True, **kwargs)
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
        *,
        images: Sequence[Any] | None = None,
        **options: Any,
    ) -> list[Completion]:
        """Generates `num_samples` completions per prompt, prompt-major.

        `config` or keyword options (SamplingConfig fields), not both. A single
        string is one prompt; otherwise `prompts` is a list of prompts.
        images (vision-language models): one entry per prompt, None or its pixels
        `[n, channels, size, size]` (see the module docstring).
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
        return self.generate_many([(ids, config) for ids in encoded], beams=beams, images=images)

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
        images: Sequence[Any] | None = None,
    ) -> list[Completion]:
        """Generates for (prompt ids, config) pairs with per-request settings, batched together.

        Completions come back request-major, with `prompt_index` = request
        index. Request i's samples use sample ids offset_i + j under its seed;
        by default offset_i counts the samples of the requests before it, so
        no two samples of a call share a stream. `beams=True` sends every
        request through the beam engine. `images`: one entry per request, as in `generate`.
        """
        compiles = self.compile_count
        fresh_seed = secrets.randbits(32)
        rows: list[SampleRow] = []
        offset = 0
        if images is not None and len(images) != len(requests):
            raise SamplingError(
                f"images has {len(images)} entries for {len(requests)} prompts: one per "
                "prompt (None for a prompt without images)"
            )
        for index, (ids, config) in enumerate(requests):
            ids = tuple(int(i) for i in ids)
            self.check_request(ids, config, f"request {index}")
            pixels = self.check_images(
                ids, None if images is None else images[index], f"request {index}"
            )
            if pixels is not None and (beams or config.num_beams > 1):
                raise SamplingError(f"request {index}: beam search does not take images")
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
                rows.append(
                    SampleRow(
                        ids, config, seed, base + j, tuple(stop_ids), use_beams, index, j, pixels
                    )
                )
        results: dict[int, list[RowResult]] = {}
        sampled = [r for r in rows if not r.beams]
        for batch in batches(sampled, lambda r: 1, self.max_batch_size):
            for row, result in zip(batch, self._run_sampling(batch), strict=True):
                results[id(row)] = [result]
        groups: dict[tuple, list[SampleRow]] = collections.defaultdict(list)
        for row in rows:
            if row.beams:
                groups[(row.config, row.stop_ids)].append(row)
        for (config, _), group in groups.items():
            for batch in batches(group, lambda r: r.config.num_beams, self.max_batch_size):
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
        if self.compile_count != compiles:
            trim_heap()  # the compiler's freed memory back to the OS (postax.host_memory)
        return out

    def check_images(self, ids: Sequence[int], images: Any, where: str) -> np.ndarray | None:
        """A prompt's images as float32 `[n, channels, size, size]` (None for none), checked
        against the model and the prompt's image blocks; SamplingError naming `where`."""
        if not isinstance(self.model, VisionLanguageLM):
            if images is not None:
                raise SamplingError(
                    f"{where}: images were given but the model ({type(self.model).__name__}) "
                    "has no vision tower"
                )
            return None
        vision = self.model.config.vision
        try:
            pixels = None if images is None else np.asarray(images, np.float32)
        except (ValueError, TypeError) as e:
            raise SamplingError(
                f"{where}: images are not an array of preprocessed pixels [n, "
                f"{vision.num_channels}, {vision.image_size}, {vision.image_size}] "
                f"(postax.data.images.ImageProcessor makes them): {e}"
            ) from None
        if pixels is not None and len(pixels) == 0:
            pixels = None
        want = (vision.num_channels, vision.image_size, vision.image_size)
        if pixels is not None and (pixels.ndim != 4 or pixels.shape[1:] != want):
            raise SamplingError(
                f"{where}: images of shape {pixels.shape} are invalid: expected [n, "
                f"{', '.join(map(str, want))}] preprocessed pixels"
            )
        try:
            check_image_tokens(np.asarray([ids]), None if pixels is None else len(pixels), vision)
        except ValueError as e:
            raise SamplingError(f"{where}: {str(e).replace('row 0', 'the prompt')}") from None
        blocks = len(image_block_lengths(ids, vision.image_token_id))
        if pixels is not None and len(pixels) != blocks:
            raise SamplingError(
                f"{where}: {len(pixels)} image(s) given for {blocks} image block(s) in the "
                "prompt: one image per block (a chat's image part makes one block)"
            )
        if ids[-1] == vision.image_token_id:
            raise SamplingError(f"{where}: the prompt ends with an image token: end it with text")
        return pixels

    # -- one batch ----------------------------------------------------------------------------

    def _rows_bucket(self, n: int) -> int:
        return rows_bucket(n, minimum=self.min_batch_bucket, maximum=self.max_batch_size)

    def _decode_text(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _run_sampling(self, rows: list[SampleRow]) -> list[RowResult]:
        graphdef, model_state = nnx.split(self.model)
        distinct = list(dict.fromkeys(r.prompt_key for r in rows))
        height = self._rows_bucket(len(distinct))
        tokens, mask = prompt_arrays(
            [key[0] for key in distinct], height, min_width=self.min_prompt_bucket
        )
        max_new = max(r.config.max_new_tokens for r in rows)
        state = self._prefill(
            graphdef=graphdef,
            model_state=model_state,
            prompt_tokens=tokens,
            prompt_mask=mask,
            images=prompt_images(rows, distinct, height),
            params=row_params(rows, distinct, self._rows_bucket(len(rows))),
            new_tokens=pow2_bucket(max_new, minimum=self.min_new_tokens_bucket),
        )
        greedy = all(r.config.temperature == 0 for r in rows)
        filters = any(r.config.top_k > 0 or r.config.top_p < 1 for r in rows)
        scanners = {
            i: StopScanner(r.config.stop, self._decode_text)
            for i, r in enumerate(rows)
            if r.config.stop
        }
        hits: dict[int, StopHit] = {}
        interval = self.stop_check_interval if scanners else max_new
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
            if not scanners:
                break
            host_tokens, lengths, done = jax.device_get((state.tokens, state.lengths, state.done))
            done = np.array(done)  # writable
            newly_done = False
            for i, scanner in scanners.items():
                hit = None if i in hits else scanner.scan(host_tokens[i, : lengths[i]])
                if hit is not None:
                    hits[i] = hit
                    newly_done |= not done[i]
                    done[i] = True
            if done.all() or limit >= max_new:
                break
            if newly_done:
                state = dataclasses.replace(state, done=jnp.asarray(done))
        host_tokens, host_logprobs, lengths, stopped = jax.device_get(
            (state.tokens, state.logprobs, state.lengths, state.stopped)
        )
        results = []
        for i in range(len(rows)):
            if i in hits:
                hit = hits[i]
                ids = host_tokens[i, : hit.count].tolist()
                logprobs = host_logprobs[i, : hit.count].tolist()
                results.append(RowResult(ids, logprobs, hit.text, FINISH_STOP, hit.stop))
                continue
            ids = host_tokens[i, : lengths[i]].tolist()
            results.append(
                RowResult(
                    ids,
                    host_logprobs[i, : lengths[i]].tolist(),
                    self._decode_text(ids),
                    FINISH_STOP if stopped[i] else FINISH_LENGTH,
                    ids[-1] if stopped[i] else None,
                )
            )
        return results

    def _run_beams(self, rows: list[SampleRow], config: SamplingConfig) -> list[list[RowResult]]:
        graphdef, model_state = nnx.split(self.model)
        inputs = beam_batch_inputs(
            rows,
            config,
            height=self._rows_bucket(len(rows)),
            min_prompt_bucket=self.min_prompt_bucket,
            min_new_tokens_bucket=self.min_new_tokens_bucket,
        )
        output = self._beam(graphdef=graphdef, model_state=model_state, **inputs)
        return beam_row_results(jax.device_get(output), rows, config, self._decode_text)
