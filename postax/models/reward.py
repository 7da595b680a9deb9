"""Reward models: a causal LM's decoder with a scalar head, in Hugging Face's
`*ForSequenceClassification` layout (num_labels = 1).

The setup is the one of Ouyang et al. 2022 ("Training language models to
follow instructions with human feedback", sec. 3.5): take a (supervised
fine-tuned) language model, remove its unembedding layer, and put a linear
head on the final hidden state that maps a prompt x and a response y to one
number r(x, y). Human comparisons "y_w is preferred to y_l" are modelled
with Bradley-Terry (Bradley & Terry 1952),

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)),

and the reward model is trained on -log sigmoid(r(x, y_w) - r(x, y_l))
averaged over comparison pairs (the paper puts all K-choose-2 pairs of one
prompt in the same batch). Only differences of rewards are identified, so
the paper shifts the trained model by a bias to give the labelers'
demonstrations a mean reward of 0 before RL; here that offset is the
caller's (the head has no bias, as in Hugging Face). The pairwise loss is a
pure function in `postax.losses`, not here: this module is the model.

Which token is scored: attention is causal, so only the hidden state of the
last real token of the sequence has seen the whole prompt and response; the
reward is the head applied to that one state. Rows may be right-padded (the
usual batch layout for scoring) or left-padded (the sampler's layout): the
last real token is the rightmost position whose attention mask is 1, and
positions count real tokens only, so both layouts give the same reward.
Deviation from transformers: its `*ForSequenceClassification` picks the
rightmost token whose id differs from `pad_token_id`, so when the pad token
equals the eos token a completion ending in eos is scored one token early;
the attention mask has no such ambiguity. (Parity holds whenever no real
token is the pad id, which is what the tests compare.)

Hugging Face layout: the decoder's tensors keep their causal-LM names
(`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
`model.norm.weight`), there is no `lm_head`, and the head is
`score.weight` of shape [num_labels, hidden] = [1, hidden] without bias.
`config.json` names the architecture (`LlamaForSequenceClassification`,
`Qwen2ForSequenceClassification`, `Qwen3ForSequenceClassification`,
`GemmaForSequenceClassification`, `Gemma2ForSequenceClassification`,
`Gemma3TextForSequenceClassification`; multimodal
`Gemma3ForSequenceClassification` loads its language model), the number of
labels (`id2label` with one entry; transformers' default without it is 2)
and `pad_token_id`, which transformers needs to find the last token of each
row in batches of more than one.

`RewardScorer` turns (prompt, completion) strings or chat conversations into
right-padded batches of bucketed shapes and scores them with one jitted
forward pass per shape: what RL reward functions call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models import hf
from postax.models.config import ConfigError, ModelConfig
from postax.models.layers import Linear, make_param, matmul_transposed
from postax.models.transformer import CausalLM, Decoder, exact_float32
from postax.shapes import TraceCounter, pow2_bucket

# family -> architecture written by `save_reward_model`.
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification",
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3": "Gemma3TextForSequenceClassification",
}
# architecture -> Hugging Face model_type, for every architecture `load_reward_model` reads.
ARCHITECTURE_MODEL_TYPES = {
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "Qwen3MoeForSequenceClassification": "qwen3_moe",
    "GemmaForSequenceClassification": "gemma",
    "Gemma2ForSequenceClassification": "gemma2",
    "Gemma3TextForSequenceClassification": "gemma3_text",
    "Gemma3ForSequenceClassification": "gemma3",
}
# transformers' PretrainedConfig default when config.json has neither num_labels nor id2label.
DEFAULT_NUM_LABELS = 2
# std of a fresh score head: transformers' initializer_range default, what
# AutoModelForSequenceClassification gives a head it initialises on top of a causal LM.
SCORE_STD = 0.02


def last_token_index(valid: jax.Array) -> jax.Array:
    """Index [b] of the rightmost True of valid [b, t] (0 for a row without any)."""
    index = jnp.arange(valid.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(valid.astype(bool), index, 0), axis=-1)


class RewardModel(nnx.Module):
    """Decoder plus scalar head: `model(tokens) -> float32 rewards [b]`.

    `model` is the same `Decoder` a `CausalLM` holds and `score` is a
    `Linear(hidden, 1)` without bias, so module paths are the Hugging Face
    tensor names (`model.layers.0...`, `score.weight`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
        decoder: Decoder | None = None,
        score_std: float = SCORE_STD,
    ):
        """decoder: an existing decoder to use (shared, not copied); else a random one.

        A reward model scores text: a vision-language config (Gemma 3) gives its language
        model only (the config without `vision`), so that the checkpoint it writes is the text
        `*ForSequenceClassification` its tensors are."""
        param_dtype = dtype if param_dtype is None else param_dtype
        cfg = dataclasses.replace(cfg, vision=None) if cfg.vision is not None else cfg
        self.config = cfg
        self.model = (
            Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if decoder is None
            else decoder
        )
        self.score = Linear(
            cfg.hidden_size,
            1,
            axes=(None, "embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if score_std != SCORE_STD:
            self.score.weight = make_param(
                rngs, (1, cfg.hidden_size), (None, "embed"), param_dtype, std=score_std
            )
        self.dtype = dtype

    @classmethod
    def from_causal_lm(
        cls, causal_lm: CausalLM, *, rngs: nnx.Rngs, score_std: float = SCORE_STD
    ) -> RewardModel:
        """A reward model on the causal LM's decoder with a new N(0, score_std^2) head.

        The decoder is shared, not copied: its Variables are the causal LM's,
        so training either model changes both (drop the causal LM, or keep it
        only as a view of the same weights). The LM head is left behind.
        """
        return cls(
            causal_lm.config,
            dtype=causal_lm.dtype,
            param_dtype=causal_lm.model.embed_tokens.weight.dtype,
            rngs=rngs,
            decoder=causal_lm.model,
            score_std=score_std,
        )

    def hidden_states(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """Final normed hidden states [b, t, embed]: `CausalLM.hidden_states`, run on
        this model's decoder (the same function, so both forward passes agree)."""
        return CausalLM.hidden_states(self, tokens, **kwargs)

    @exact_float32
    def score_hidden(self, hidden: jax.Array, index: jax.Array) -> jax.Array:
        """float32 head outputs at hidden[b, index[b, ...]]: index [b] -> [b], [b, k] -> [b, k]."""
        flat = index.reshape(index.shape[0], -1)
        picked = jnp.take_along_axis(hidden, flat[..., None], axis=1)  # [b, k, embed]
        w = self.score.weight[...].astype(self.dtype)
        out = matmul_transposed(picked.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return out[..., 0].reshape(index.shape)

    def rewards_and_router(
        self, tokens: jax.Array, *, attention_mask: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """float32 rewards [b] (as `__call__` with `attention_mask`) and, from the same pass of
        a mixture-of-experts decoder, (router logits [sparse layers, b, t, experts], the
        real-token mask [b, t]) (`postax.recipes.router_terms`)."""
        out = CausalLM.intermediates(
            self, tokens, router_logits=True, attention_mask=attention_mask
        )
        valid = attention_mask.astype(bool)
        return self.score_hidden(out.hidden, last_token_index(valid)), (out.router_logits, valid)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """float32 rewards [b]: the head on each row's last real token.

        Real tokens are those with attention_mask 1 (right or left padding);
        without a mask, those with a nonzero segment id (packed rows pad with
        segment 0; the row's last document is scored); without either, all.
        """
        hidden = self.hidden_states(
            tokens, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids
        )
        if attention_mask is not None:
            valid = attention_mask
        elif segment_ids is not None:
            valid = segment_ids != 0
        else:
            valid = jnp.ones(tokens.shape, bool)
        return self.score_hidden(hidden, last_token_index(valid))


def build_reward_model(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    seed: int = 0,
) -> RewardModel:
    """A randomly initialised reward model (std 0.02 normal weights)."""
    return RewardModel(
        cfg,
        dtype=hf._dtype(dtype),
        param_dtype=hf._dtype(param_dtype or dtype),
        rngs=nnx.Rngs(seed),
    )


def abstract_reward_model(
    cfg: ModelConfig, *, dtype: str = "float32", param_dtype: str | None = None
) -> RewardModel:
    """The reward model with jax.ShapeDtypeStruct leaves: shapes without memory."""
    return nnx.eval_shape(lambda: build_reward_model(cfg, dtype=dtype, param_dtype=param_dtype))


def _num_labels(config: Mapping[str, Any]) -> tuple[int, str]:
    """(num_labels, where it came from) as transformers reads them from config.json."""
    if config.get("num_labels") is not None:
        return int(config["num_labels"]), "num_labels"
    if config.get("id2label"):
        return len(config["id2label"]), f"id2label with {len(config['id2label'])} entries"
    return DEFAULT_NUM_LABELS, "transformers' default: config.json has no num_labels or id2label"


def reward_config_from_hf(config: Mapping[str, Any], source: Path | str) -> ModelConfig:
    """The ModelConfig of a `*ForSequenceClassification` config.json with one label.

    A clear ConfigError naming `source` when the architecture is not a
    supported sequence-classification model or num_labels is not 1.
    """
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in ARCHITECTURE_MODEL_TYPES]
    if not known:
        raise ConfigError(
            f"{source}: architectures={architectures!r} is not a supported reward model; "
            f"supported: {', '.join(ARCHITECTURE_MODEL_TYPES)} "
            "(a causal LM checkpoint becomes one with RewardModel.from_causal_lm)"
        )
    num_labels, origin = _num_labels(config)
    if num_labels != 1:
        raise ConfigError(
            f"{source}: num_labels={num_labels} ({origin}); a reward model has one "
            "output: num_labels must be 1"
        )
    model_type = config.get("model_type") or ARCHITECTURE_MODEL_TYPES[known[0]]
    return hf.config_from_hf({**config, "model_type": model_type}, source)


def load_reward_model(
    path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None
) -> RewardModel:
    """Loads a Hugging Face `*ForSequenceClassification` checkpoint with num_labels = 1.

    Tensors stream one at a time as in `load_model`; a missing, unexpected
    or mis-shaped tensor (a `score.weight` that is not [1, hidden]) is an
    error naming it.
    """
    path = Path(path)
    cfg = reward_config_from_hf(hf.read_hf_config(path), path / "config.json")
    return hf.load_weights(path, abstract_reward_model(cfg, dtype=dtype, param_dtype=param_dtype))


def reward_config_to_hf(cfg: ModelConfig, *, pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json for `transformers.AutoModelForSequenceClassification` with one label."""
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ConfigError(
            "pad_token_id=None is invalid for a reward model checkpoint: transformers' "
            "*ForSequenceClassification needs it to find each row's last token in batches of "
            "more than one; pass save_reward_model(..., pad_token_id=tokenizer.pad_token_id)"
        )
    return {
        **hf.config_to_hf(cfg),
        "architectures": [ARCHITECTURES[cfg.family]],
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "pad_token_id": int(pad),
    }


def save_reward_model(
    model: RewardModel,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    pad_token_id: int | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes config.json and safetensors that `AutoModelForSequenceClassification` loads.

    pad_token_id: written to config.json (default: the model config's; one
    of them must be set). dtype and sharding as in `save_model`.
    """
    return hf.write_checkpoint(
        model,
        path,
        reference=abstract_reward_model(model.config),
        hf_config=reward_config_to_hf(model.config, pad_token_id=pad_token_id),
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
    )


Prompt = str | Sequence[Mapping[str, Any]]


class RewardScorer:
    """Scores (prompt, completion) pairs with a reward model, in bucketed jitted batches.

    A prompt is a string (scored text: prompt + completion, encoded with the
    tokenizer's special tokens) or a list of chat messages (scored ids:
    the chat template applied to the messages plus the completion as the
    assistant turn, as `transformers`' `apply_chat_template(..., tokenize=True)`
    gives them to published reward models). Rows are sorted by length,
    right-padded to a power-of-two width (at least `min_width`) and batched
    in power-of-two row counts up to `batch_size`, so a stream of calls
    compiles at most once per (rows, width) bucket; `compile_count` counts
    the compilations. The model is passed to the jitted function on every
    call, so the scorer always reads the model's current parameters.
    """

    def __init__(self, model: RewardModel, tokenizer: Any, *, min_width: int = 16):
        if not (isinstance(min_width, int) and min_width > 0):
            raise ConfigError(f"min_width={min_width!r} is invalid: a positive integer")
        self.model = model
        self.tokenizer = tokenizer
        self.min_width = min_width
        self.traces = TraceCounter()

        def forward(model, tokens, attention_mask):
            self.traces.bump("forward", tokens)  # runs once per trace, i.e. per compilation
            return model(tokens, attention_mask=attention_mask)

        self._forward = nnx.jit(forward)

    @property
    def compile_count(self) -> int:
        """How many times the forward pass has been traced (compiled) so far."""
        return self.traces.total()

    def token_ids(self, prompt: Prompt, completion: str) -> list[int]:
        """The ids that are scored for one pair."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt + completion))
        messages = [*prompt, {"role": "assistant", "content": completion}]
        return self.tokenizer.encode_chat(messages)

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], *, batch_size: int = 16
    ) -> np.ndarray:
        """float32 rewards [n] of prompts[i] + completions[i]."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts and {len(completions)} completions; "
                "they pair one to one"
            )
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ConfigError(f"batch_size={batch_size!r} is invalid: a positive integer")
        rows = [self.token_ids(p, c) for p, c in zip(prompts, completions, strict=True)]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"pair {i}: prompt and completion encode to no tokens")
        out = np.zeros(len(rows), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            height = min(batch_size, pow2_bucket(len(chunk)))
            width = pow2_bucket(max(len(rows[i]) for i in chunk), minimum=self.min_width)
            tokens = np.full((height, width), pad, np.int32)
            mask = np.zeros((height, width), np.int32)
            for r, i in enumerate(chunk):
                tokens[r, : len(rows[i])] = rows[i]
                mask[r, : len(rows[i])] = 1
            rewards = self._forward(self.model, jnp.asarray(tokens), jnp.asarray(mask))
            out[chunk] = np.asarray(rewards)[: len(chunk)]
        return out
