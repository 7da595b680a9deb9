"""Gemma 3 vision-language models (Gemma Team 2025, "Gemma 3 Technical Report"):
transformers' `Gemma3ForConditionalGeneration`, the 4B, 12B and 27B releases.

The model is the Gemma 3 text decoder (`gemma.py`, unchanged) whose input embeddings at
image tokens are replaced by image features: a SigLIP tower and Gemma 3's projector
(`vision.py`) turn each image into `mm_tokens_per_image` (256) soft tokens, which take the
places of that many consecutive `image_token_id` tokens in the text (the chat template
writes `boi`, the image tokens and `eoi` for each image; the model only reads the image
tokens). As in transformers, image features replace the *scaled* text embeddings (they are
not multiplied by sqrt(hidden)).

Attention rule (transformers 5's `create_masks_for_vision_model`, applied on every layer
when `token_type_ids` are given, which Gemma 3's processor always gives): a maximal run of
consecutive image tokens is one block, and a query sees a key when it is causal OR both lie
in the same block; sliding layers then AND their window (key > query - window). So an
image's tokens see each other in both directions, text stays causal, and later images are
never visible to earlier ones. postax applies the rule whenever `images` are passed;
without images the model is exactly Gemma 3 text.

Interface (what the SFT recipe and the data pipeline build against):
  - `model(tokens, *, images=None, **kwargs)`, `model.hidden_states(...)`,
    `model.token_logprobs(tokens, targets, *, chunk_size=0, images=None, ...)`,
    `model.intermediates(..., images=None)`; kwargs as in `CausalLM` (positions,
    attention_mask, segment_ids, branch_ids);
  - `images`: float32 pixels [batch, images_per_row, channels, image_size, image_size],
    already resized, rescaled and normalised (Gemma 3: 896 x 896, mean = std = 0.5); the
    k-th block of image tokens in row r takes images[r, k]; rows with fewer blocks than
    images_per_row carry zero padding images, which are encoded and ignored;
  - when `tokens` are concrete (not traced) they are checked against the images: every
    block must have exactly mm_tokens_per_image tokens, a row no more blocks than
    images_per_row, and image tokens without `images` are an error. Under `jax.jit` these
    checks cannot run: the j-th image token of a row then takes the j-th soft token of the
    row's images in order (surplus tokens the last one), and image tokens without images
    are embedded as ordinary tokens (id 0 when the image token id lies outside the
    vocabulary, as transformers does);
  - `model.prefill(tokens, mask, capacity, images=...)` for the sampler: the prompt's
    image blocks attend bidirectionally during prefill (a prompt's last token, fed by the
    first decoding step, must not be an image token); decoding steps are causal, as in
    transformers' `generate`.

Checkpoints: the published files name tensors `language_model.model.*`,
`vision_tower.vision_model.*` and `multi_modal_projector.*`; transformers 5's
`save_pretrained` writes `language_model.model.*`, `vision_tower.*` (no `vision_model`) and
`multi_modal_projector.*`; its modules' own names are `model.language_model.*`,
`model.vision_tower.*` and `model.multi_modal_projector.*`. All of these load
(`checkpoint_name`); saving writes what transformers 5's `save_pretrained` writes
(`saved_name`), and a config.json with `text_config`, `vision_config` (`vision_use_head: false`),
`mm_tokens_per_image`, `image_token_index`, `boi_token_index`, `eoi_token_index`. The
embeddings are tied unless `tie_word_embeddings` at the top level of config.json (which
transformers reads for this class) says otherwise. A checkpoint's attention-pooling head (`vision_use_head: true`, unused by
Gemma 3) is skipped. `postax.load_model(dir, text_only=True)` loads only the language model.

Left out: pan-and-scan crops (a processor feature: the crops are just more images), the
`use_bidirectional_attention` text variant (EmbeddingGemma), position-embedding
interpolation for other image sizes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from postax.models import gemma
from postax.models.config import ConfigError, ModelConfig, RopeConfig, VisionConfig
from postax.models.transformer import (
    CausalLM,
    Intermediates,
    KVCache,
    check_intermediates,
    exact_float32,
    positions_from_mask,
    run_embedded,
)
from postax.models.vision import MultiModalProjector, SiglipVisionTower

ARCHITECTURE = "Gemma3ForConditionalGeneration"
MODEL_TYPES = ("gemma3",)

# transformers' SiglipVisionConfig defaults; published config.json files rely on them.
SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# transformers' Gemma3Config defaults.
GEMMA3_DEFAULTS: dict[str, Any] = {
    "mm_tokens_per_image": 256,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "image_token_index": 262144,
}

# checkpoint prefix -> module prefix, first match wins (transformers 5, then 4.x layouts)
_LOAD_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
# module prefix -> checkpoint prefix (as transformers 5's save_pretrained writes them)
_SAVE_PREFIXES = (("model.", "language_model.model."),)


def _token_id(hf: dict[str, Any], name: str) -> int:
    """`{name}_token_index` or `{name}_token_id` (config.json spells both), else the default."""
    for key in (f"{name}_token_index", f"{name}_token_id"):
        if hf.get(key) is not None:
            return int(hf[key])
    return GEMMA3_DEFAULTS[f"{name}_token_index"]


def vision_from_hf(hf: dict[str, Any]) -> VisionConfig:
    """The VisionConfig of a Gemma3ForConditionalGeneration config.json."""
    v = {**SIGLIP_DEFAULTS, **(hf.get("vision_config") or {})}
    return VisionConfig(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        num_channels=int(v["num_channels"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        activation=v["hidden_act"],
        mm_tokens_per_image=int(
            hf.get("mm_tokens_per_image") or GEMMA3_DEFAULTS["mm_tokens_per_image"]
        ),
        image_token_id=_token_id(hf, "image"),
        boi_token_id=_token_id(hf, "boi"),
        eoi_token_id=_token_id(hf, "eoi"),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    text = gemma.config_from_hf({**hf, "model_type": "gemma3"})
    tied = bool(hf.get("tie_word_embeddings", True))
    return text.replace(tie_word_embeddings=tied, vision=vision_from_hf(hf))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    vision = cfg.vision
    text = gemma.config_to_hf(cfg.replace(vision=None))
    del text["architectures"]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "num_channels": vision.num_channels,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": vision.activation,
            "layer_norm_eps": vision.layer_norm_eps,
            "vision_use_head": False,
        },
        "mm_tokens_per_image": vision.mm_tokens_per_image,
        "image_token_index": vision.image_token_id,
        "boi_token_index": vision.boi_token_id,
        "eoi_token_index": vision.eoi_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": text["eos_token_id"],
        "pad_token_id": cfg.pad_token_id,
    }


def checkpoint_name(name: str) -> str | None:
    """The module path of a checkpoint tensor; None for the unused pooling head."""
    target = name
    for prefix, replacement in _LOAD_PREFIXES:
        if name.startswith(prefix):
            target = replacement + name[len(prefix) :]
            break
    return None if target.startswith("vision_tower.head.") else target


def saved_name(name: str) -> str:
    """The checkpoint name of a module path (as transformers 5's save_pretrained names it)."""
    for prefix, replacement in _SAVE_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


# ------------------------------------------------------------------------- image tokens


def image_blocks(tokens: jax.Array, image_token_id: int) -> jax.Array:
    """Per row, the index of the image block of each token ([b, t] int32), -1 for text.

    A block is a maximal run of consecutive image tokens; blocks count from 0 in each row.
    """
    return _blocks(tokens == image_token_id)


def _blocks(is_image: jax.Array) -> jax.Array:
    starts = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_image, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1, -1)


def image_block_lengths(row: np.ndarray, image_token_id: int) -> list[int]:
    """The lengths of the image-token blocks of one row of token ids, in order."""
    lengths: list[int] = []
    previous = False
    for is_image in np.asarray(row) == image_token_id:
        if is_image:
            if previous:
                lengths[-1] += 1
            else:
                lengths.append(1)
        previous = bool(is_image)
    return lengths


def check_image_tokens(tokens: np.ndarray, images_per_row: int | None, cfg: VisionConfig) -> None:
    """Raises ValueError when rows of token ids [b, t] do not fit images_per_row images each
    (None: no images): every block holds mm_tokens_per_image tokens, and no row has more
    blocks than images."""
    for r, row in enumerate(np.asarray(tokens)):
        lengths = image_block_lengths(row, cfg.image_token_id)
        if not lengths:
            continue
        if images_per_row is None:
            raise ValueError(
                f"row {r} has {len(lengths)} image block(s) (image_token_id="
                f"{cfg.image_token_id}) but no images were given: pass images=[batch, "
                f"images_per_row, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}]"
            )
        bad = [n for n in lengths if n != cfg.mm_tokens_per_image]
        if bad:
            raise ValueError(
                f"row {r} has image blocks of {bad} tokens: each image takes exactly "
                f"mm_tokens_per_image={cfg.mm_tokens_per_image} consecutive image tokens"
            )
        if len(lengths) > images_per_row:
            raise ValueError(
                f"row {r} has {len(lengths)} image blocks but images holds "
                f"{images_per_row} image(s) per row"
            )


def _concrete(x: jax.Array) -> np.ndarray | None:
    """x as a host array, or None while it is traced (under jit checks cannot run)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


class VisionLanguageLM(CausalLM):
    """Gemma 3 with its vision tower: `model(tokens, images=...) -> float32 logits`.

    Attributes follow transformers (after `checkpoint_name`): `model` (the text decoder),
    `lm_head` (None: tied), `vision_tower`, `multi_modal_projector`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        if cfg.vision is None:
            raise ConfigError("vision=None is invalid for a VisionLanguageLM: a VisionConfig")
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = SiglipVisionTower(cfg.vision, **kw)
        self.multi_modal_projector = MultiModalProjector(cfg.vision, cfg.hidden_size, **kw)
        # images the tower encodes at a time (a sequential map over groups of this many): at
        # 896 px one image's tower pass needs ~1.4 GiB of temporaries, so a rollout batch of
        # 128 rows encoded at once would not fit an accelerator; results are the same
        self.images_per_tower_call = 8

    @exact_float32
    def image_features(self, images: jax.Array) -> jax.Array:
        """pixels [b, n, channels, size, size] -> soft tokens [b, n, mm_tokens, hidden], the
        tower run on `images_per_tower_call` images at a time."""
        if images.ndim != 5:
            raise ValueError(
                f"images of shape {tuple(images.shape)} are invalid: expected [batch, "
                "images_per_row, channels, image_size, image_size]"
            )
        b, n = images.shape[:2]
        flat = images.reshape(-1, *images.shape[2:])

        def encode(pixels):
            return self.multi_modal_projector(self.vision_tower(pixels))

        if flat.shape[0] <= self.images_per_tower_call:
            features = encode(flat)
        else:  # groups of images_per_tower_call, one after the other: bounded temporaries
            features = jax.lax.map(
                lambda one: encode(one[None])[0], flat, batch_size=self.images_per_tower_call
            )
        return features.reshape(b, n, *features.shape[1:])

    def embed_inputs(
        self, tokens: jax.Array, images: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        """(input embeddings [b, t, hidden], image block ids [b, t] or None without images)."""
        vision = self.config.vision
        is_image = tokens == vision.image_token_id
        host = _concrete(tokens)
        if host is not None:
            check_image_tokens(host, None if images is None else images.shape[1], vision)
        if vision.image_token_id >= self.config.vocab_size:
            tokens = jnp.where(is_image, 0, tokens)
        x = self.model.embed(tokens)
        if images is None:
            return x, None
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"images has {images.shape[0]} rows but tokens has {tokens.shape[0]}: one row "
                "of images per row of tokens"
            )
        features = self.image_features(images).astype(x.dtype)
        b, n, per_image, hidden = features.shape
        flat = features.reshape(b, n * per_image, hidden)
        # the j-th image token of a row takes the j-th soft token of the row's images
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n * per_image - 1)
        picked = jnp.take_along_axis(flat, index[..., None], axis=1)
        x = jnp.where(is_image[..., None], picked, x)
        return x, _blocks(is_image)

    @exact_float32
    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        images: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        branch_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Final normed hidden states [b, t, embed]; `images` as in the module docstring,
        the other arguments as in `CausalLM.hidden_states`."""
        x, blocks = self.embed_inputs(tokens, images)
        return run_embedded(
            self,
            tokens,
            x,
            image_blocks=blocks,
            positions=positions,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            branch_ids=branch_ids,
        ).hidden

    @exact_float32
    def intermediates(
        self,
        tokens: jax.Array,
        *,
        images: jax.Array | None = None,
        hidden_layers: tuple[int, ...] = (),
        attention_layers: tuple[int, ...] = (),
        router_logits: bool = False,
        **kwargs,
    ) -> Intermediates:
        """`CausalLM.intermediates` with `images`."""
        check_intermediates(self.config, hidden_layers, attention_layers)
        x, blocks = self.embed_inputs(tokens, images)
        return run_embedded(
            self,
            tokens,
            x,
            image_blocks=blocks,
            hidden_layers=hidden_layers,
            attention_layers=attention_layers,
            router_logits=router_logits,
            **kwargs,
        )

    def prefill(
        self,
        prompt_tokens: jax.Array,
        prompt_mask: jax.Array,
        capacity: int,
        *,
        images: jax.Array | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """`CausalLM.prefill` with each prompt's images [b, n, channels, size, size]; image
        blocks attend bidirectionally. The last prompt column must not be an image token."""
        host = _concrete(prompt_tokens)
        if host is not None and np.any(host[:, -1] == self.config.vision.image_token_id):
            raise ValueError(
                "a prompt ends with an image token: end it with text (Gemma 3's template "
                "closes every image with eoi and starts the model turn after it)"
            )
        positions = positions_from_mask(prompt_mask)
        x, blocks = self.embed_inputs(prompt_tokens, images)
        _, cache = self.decode_embedded(
            x[:, :-1],
            self.init_cache(prompt_tokens.shape[0], capacity),
            positions=positions[:, :-1],
            attention_mask=prompt_mask[:, :-1],
            image_blocks=None if blocks is None else blocks[:, :-1],
        )
        return cache, positions


# ------------------------------------------------------------------------------ presets

# SigLIP So400m/14 at 896 px, as in every Gemma 3 multimodal release.
SIGLIP_GEMMA3 = VisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_layers=27,
    num_heads=16,
    image_size=896,
    patch_size=14,
    mm_tokens_per_image=256,
    image_token_id=262144,
    boi_token_id=255999,
    eoi_token_id=256000,
)


def _gemma3(**fields) -> ModelConfig:
    return gemma.gemma_preset(
        "gemma3",
        vocab=262208,
        window=1024,
        local_theta=10000.0,
        rope=RopeConfig(theta=1000000.0, kind="linear", factor=8.0),
        max_position_embeddings=131072,
        **fields,
    ).replace(vision=SIGLIP_GEMMA3)


PRESETS = {
    "Gemma-3-4B-Vision": gemma.PRESETS["Gemma-3-4B"].replace(vision=SIGLIP_GEMMA3),
    "Gemma-3-12B-Vision": _gemma3(
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256.0,
    ),
    "Gemma-3-27B-Vision": _gemma3(
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=62,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168.0,
    ),
}
