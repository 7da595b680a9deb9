"""Typed model configuration shared by every family.

A `ModelConfig` describes one decoder-only transformer completely: the family
files (`llama.py`, `qwen.py`, `gemma.py`) only translate Hugging Face
`config.json` dictionaries to and from it. Every switch that separates the
families (q/k/v bias, q/k norm, sandwich norms, soft-capping, sliding windows,
embedding scaling, norm offset) is a field here, not a subclass.

A vision-language model (Gemma 3 with its SigLIP tower, `gemma3_vlm.py`) is a
`ModelConfig` whose `vision` field holds a `VisionConfig`: the text fields
describe its language model, as for a text-only model of the family.
"""

from __future__ import annotations

import dataclasses
import math

from postax.validation import ConfigError
from postax.validation import require as _require

ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = ("dense", "sparse")
ROPE_KINDS = ("default", "linear", "llama3")


__all__ = ["ConfigError", "ModelConfig", "RopeConfig", "VisionConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding (Su et al. 2021, "RoFormer") frequencies.

    kind:
      - "default": inv_freq[i] = theta ** (-2i / rotary_dim).
      - "linear": positions divided by `factor` (position interpolation,
        Chen et al. 2023); Gemma 3 uses it on its global layers.
      - "llama3": the Llama 3.1 frequency-dependent scaling (low frequencies
        divided by `factor`, high frequencies kept, a smooth ramp between).
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(self.theta > 0, "rope.theta", self.theta, "must be > 0")
        _require(self.kind in ROPE_KINDS, "rope.kind", self.kind, f"one of {ROPE_KINDS}")
        _require(self.factor > 0, "rope.factor", self.factor, "must be > 0")
        if self.kind == "llama3":
            _require(
                self.high_freq_factor > self.low_freq_factor,
                "rope.high_freq_factor",
                self.high_freq_factor,
                f"must exceed low_freq_factor={self.low_freq_factor}",
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The image side of a vision-language model (Gemma 3): a SigLIP vision tower (Zhai et
    al. 2023, "Sigmoid Loss for Language Image Pre-Training") and the projector into the text
    model (`postax.models.vision`).

    Tower: square images of `image_size` pixels cut into `patch_size` patches, a ViT encoder of
    `num_layers` pre-norm blocks (LayerNorm with `layer_norm_eps`, `num_heads`-head
    bidirectional attention, an MLP of `intermediate_size` with `activation`).
    Projector: the patch grid average-pooled to `mm_tokens_per_image` tokens (a square number
    whose side divides the patch grid's), a Gemma RMSNorm and a linear map to the text width.
    Text side: each image is `mm_tokens_per_image` consecutive `image_token_id` tokens, wrapped
    by `boi_token_id` and `eoi_token_id` (written by the chat template, not by the model).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    activation: str = "gelu_pytorch_tanh"
    mm_tokens_per_image: int = 256
    image_token_id: int = 262144
    boi_token_id: int | None = 255999
    eoi_token_id: int | None = 256000

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "image_size",
            "patch_size",
            "num_channels",
            "mm_tokens_per_image",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0, f"vision.{name}", value, "a positive integer"
            )
        _require(
            self.hidden_size % self.num_heads == 0,
            "vision.num_heads",
            self.num_heads,
            f"must divide vision.hidden_size={self.hidden_size}",
        )
        _require(
            self.image_size % self.patch_size == 0,
            "vision.patch_size",
            self.patch_size,
            f"must divide vision.image_size={self.image_size}",
        )
        side = math.isqrt(self.mm_tokens_per_image)
        _require(
            side * side == self.mm_tokens_per_image and self.patches_per_side % side == 0,
            "vision.mm_tokens_per_image",
            self.mm_tokens_per_image,
            f"a square number whose root divides the {self.patches_per_side} patches per side",
        )
        _require(
            self.activation in ACTIVATIONS,
            "vision.activation",
            self.activation,
            f"one of {ACTIVATIONS}",
        )
        _require(
            self.layer_norm_eps > 0, "vision.layer_norm_eps", self.layer_norm_eps, "must be > 0"
        )
        _require(
            isinstance(self.image_token_id, int) and self.image_token_id >= 0,
            "vision.image_token_id",
            self.image_token_id,
            "an integer >= 0",
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pool_size(self) -> int:
        """Side of the square of patches averaged into one image token."""
        return self.patches_per_side // math.isqrt(self.mm_tokens_per_image)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only causal language model.

    `family` selects the Hugging Face architecture used when saving
    (`llama`, `qwen2`, `qwen3`, `gemma`, `gemma2`, `gemma3`). `layer_types`
    gives each layer "full_attention" or "sliding_attention"; sliding layers
    attend to the last `sliding_window` positions (the query included) and use
    `local_rope` when it is set (Gemma 3), `rope` otherwise. `vision` (Gemma 3 only) adds
    an image tower and projector: the model is then a `gemma3_vlm.VisionLanguageLM`.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    local_rope: RopeConfig | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    mlp_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, name, value, "a positive integer")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"must divide num_heads={self.num_heads} (grouped-query attention)",
        )
        _require(
            self.activation in ACTIVATIONS, "activation", self.activation, f"one of {ACTIVATIONS}"
        )
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _require(
            len(self.layer_types) == self.num_layers,
            "layer_types",
            self.layer_types,
            f"one entry per layer ({self.num_layers})",
        )
        for kind in self.layer_types:
            _require(kind in LAYER_TYPES, "layer_types", kind, f"entries in {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types:
            _require(
                isinstance(self.sliding_window, int) and self.sliding_window > 0,
                "sliding_window",
                self.sliding_window,
                "a positive integer when any layer is 'sliding_attention'",
            )
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "None or > 0")
        self._check_experts()
        if self.vision is not None:
            _require(
                isinstance(self.vision, VisionConfig),
                "vision",
                self.vision,
                "None or a VisionConfig",
            )
            _require(
                self.family == "gemma3",
                "family",
                self.family,
                "'gemma3' for a model with a vision tower (the only vision-language family)",
            )

    def _check_experts(self) -> None:
        _require(
            isinstance(self.num_experts, int) and self.num_experts >= 0,
            "num_experts",
            self.num_experts,
            "an integer >= 0 (0: no sparse layers)",
        )
        object.__setattr__(self, "mlp_types", tuple(self.mlp_types))
        _require(
            len(self.mlp_types) in (0, self.num_layers),
            "mlp_types",
            self.mlp_types,
            f"one entry per layer ({self.num_layers}), or () for all alike",
        )
        for kind in self.mlp_types:
            _require(kind in MLP_TYPES, "mlp_types", kind, f"entries in {MLP_TYPES}")
        if not any(self.is_sparse(i) for i in range(self.num_layers)):
            return
        _require(
            self.num_experts > 0,
            "num_experts",
            self.num_experts,
            "a positive integer when any layer is 'sparse'",
        )
        _require(
            isinstance(self.num_experts_per_tok, int)
            and 0 < self.num_experts_per_tok <= self.num_experts,
            "num_experts_per_tok",
            self.num_experts_per_tok,
            f"an integer in [1, num_experts={self.num_experts}]",
        )
        _require(
            isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
            "moe_intermediate_size",
            self.moe_intermediate_size,
            "a positive integer when any layer is 'sparse'",
        )

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k: query_pre_attn_scalar**-0.5 (Gemma 2/3) or head_dim**-0.5."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def rope_for_layer(self, index: int) -> RopeConfig:
        if self.layer_types[index] == "sliding_attention" and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def is_sparse(self, index: int) -> bool:
        """Whether layer `index` has a mixture-of-experts MLP."""
        if not self.mlp_types:
            return self.num_experts > 0
        return self.mlp_types[index] == "sparse"

    def window_for_layer(self, index: int) -> int | None:
        return self.sliding_window if self.layer_types[index] == "sliding_attention" else None

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)
