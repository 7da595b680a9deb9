"""Images for vision-language fine-tuning: Gemma 3's image processor and image chat messages.

**Processor** (`ImageProcessor`). Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025,
section 2.1) feeds its SigLIP encoder square images of `image_size` pixels (896 for the
published 4B/12B/27B models). `ImageProcessor` reproduces transformers' PIL-backed
`Gemma3ImageProcessorPil` with the defaults of `preprocessor_config.json` (transformers 5.24):

1. convert to RGB; an image with transparency (RGBA, LA, a palette with a transparent index) is
   composited onto a white background first, as `transformers.image_transforms.convert_to_rgb`
   does (a plain `Image.convert("RGB")` would drop the alpha channel instead);
2. resize to `image_size` x `image_size` with PIL's bilinear filter (`resample=2`), on the
   8-bit image, ignoring the aspect ratio;
3. rescale by 1/255 (in float64, then float32, as `rescale` does);
4. normalise with mean 0.5 and std 0.5 per channel (so values lie in [-1, 1]);
5. channels first: float32 [3, image_size, image_size].

tests/test_images.py pins the result to `Gemma3ImageProcessorPil`: equal to the last bit (same
PIL resize of the same 8-bit image, same float steps). transformers' default `Gemma3ImageProcessor`
is the torchvision backend (it falls back to the PIL one without torchvision); its tensor resize
is not PIL's, so its values may differ by a few 8-bit steps: not measured here (torchvision is
not a dependency).

Deviation: pan-and-scan (Gemma 3's optional crops of wide or tall images, each an extra image
with its own tokens; off by default in transformers and in the published configs) is not
implemented; `ImageProcessor(pan_and_scan=True)` is refused with an error naming it.

**Chat messages** (`ImageTokens`, `image_paths`). A message's content may be a list of parts,
`{"type": "text", "text": ...}` and `{"type": "image", "path": ...}`. The chat template renders an
image part as its begin-of-image marker (Gemma 3: `<start_of_image>`), and each marker is then
replaced in the rendered text, as transformers' `Gemma3Processor` does, by
`ImageTokens.sequence` (`"\\n\\n" + boi + image_token * tokens_per_image + eoi + "\\n\\n"`)
before the text is encoded (`Tokenizer.apply_chat_template(..., marker_expansion=...)`), so the
ids equal the processor's and the assistant mask follows the moved text. The data layer then
takes the loss off every image token (boi, the soft tokens, eoi).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from postax.validation import ConfigError, is_int

RESAMPLE = ("bilinear",)  # transformers' Gemma 3 default (PIL resample=2)
IMAGE_PART = "image"
TEXT_PART = "text"
IMAGE_PATH_KEY = "path"
# Gemma 3's image tokens (tokenizer_config.json: boi_token, image_token, eoi_token)
GEMMA3_BOI, GEMMA3_IMAGE, GEMMA3_EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"


class ImageError(ValueError):
    """An image cannot be read or decoded; the message names the file."""


def _pil():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - Pillow ships with the test extras
        raise ImportError(
            "images need Pillow: pip install 'postax[vision]' (or pip install pillow)"
        ) from error
    return Image


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageProcessor:
    """Gemma 3's image preprocessing (see the module docstring for each step).

    Attributes:
        image_size: Output height and width in pixels (the vision config's `image_size`).
        resample: The resize filter: "bilinear" (PIL's, as transformers' Gemma 3 uses).
        rescale_factor: Multiplies the 8-bit values (1/255: values in [0, 1]).
        image_mean, image_std: Per-channel normalisation after rescaling.
        pan_and_scan: Must be False: Gemma 3's pan-and-scan crops are not implemented.
    """

    image_size: int
    resample: str = "bilinear"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pan_and_scan: bool = False

    def __post_init__(self) -> None:
        def invalid(field: str, allowed: str) -> ConfigError:
            value = getattr(self, field)
            return ConfigError(f"image processor {field}={value!r} is invalid: {allowed}")

        if not is_int(self.image_size) or self.image_size < 1:
            raise invalid("image_size", "an int >= 1")
        if self.resample not in RESAMPLE:
            raise invalid("resample", f"one of {RESAMPLE}")
        if not isinstance(self.rescale_factor, (int, float)) or self.rescale_factor <= 0:
            raise invalid("rescale_factor", "a number > 0")
        for field in ("image_mean", "image_std"):
            value = getattr(self, field)
            if isinstance(value, list):  # from YAML
                value = tuple(value)
                object.__setattr__(self, field, value)
            if not (
                isinstance(value, tuple)
                and len(value) == 3
                and all(isinstance(v, (int, float)) for v in value)
            ):
                raise invalid(field, "three numbers (one per RGB channel)")
        if any(s <= 0 for s in self.image_std):
            raise invalid("image_std", "numbers > 0")
        if self.pan_and_scan is not False:
            raise invalid(
                "pan_and_scan",
                "False: Gemma 3's pan-and-scan crops are not implemented (each image is "
                "resized whole to image_size x image_size)",
            )

    def __call__(self, image: Any) -> np.ndarray:
        """float32 [3, image_size, image_size] from a PIL image."""
        Image = _pil()
        rgb = to_rgb(image)
        resized = rgb.resize((self.image_size, self.image_size), resample=Image.Resampling.BILINEAR)
        pixels = (
            np.asarray(resized, dtype=np.uint8).astype(np.float64) * self.rescale_factor
        ).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """`self(image)` of the image file at `path`; `ImageError` naming it if it cannot be
        read or decoded."""
        Image = _pil()
        try:
            with Image.open(path) as image:
                image.load()
                return self(image)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ImageError(f"cannot read image {os.fspath(path)!r}: {error}") from error

    def zeros(self, count: int) -> np.ndarray:
        """float32 [count, 3, image_size, image_size] of zeros: padding images."""
        return np.zeros((count, 3, self.image_size, self.image_size), dtype=np.float32)


def to_rgb(image: Any):
    """An RGB PIL image; transparency composited onto white (transformers' `convert_to_rgb`)."""
    Image = _pil()
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_image_file(path: str | os.PathLike) -> None:
    """Raise `ImageError` unless `path` is a file that Pillow recognises as an image (only the
    header is read: decoding waits for the batch that needs it)."""
    Image = _pil()
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; touch it to be explicit
    except FileNotFoundError as error:
        raise ImageError(f"image {os.fspath(path)!r} does not exist") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {os.fspath(path)!r}: {error}") from error


# -- chat messages with image parts ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageTokens:
    """How a model marks an image in its input, Gemma 3's way.

    Attributes:
        boi_token: The begin-of-image marker the chat template writes for an image part
            (`<start_of_image>`), also the first token of the expansion.
        image_token: The soft token repeated `tokens_per_image` times (`<image_soft_token>`):
            the positions the projected image embeddings fill.
        eoi_token: The end-of-image marker (`<end_of_image>`).
        tokens_per_image: Soft tokens per image (the model's `mm_tokens_per_image`, 256 for the
            published models).
    """

    boi_token: str = GEMMA3_BOI
    image_token: str = GEMMA3_IMAGE
    eoi_token: str = GEMMA3_EOI
    tokens_per_image: int = 256

    def __post_init__(self) -> None:
        for field in ("boi_token", "image_token", "eoi_token"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"image tokens {field}={value!r} is invalid: a token string")
        if len({self.boi_token, self.image_token, self.eoi_token}) != 3:
            raise ConfigError(
                f"image tokens boi_token, image_token and eoi_token must differ, got "
                f"{self.boi_token!r}, {self.image_token!r}, {self.eoi_token!r}"
            )
        if not is_int(self.tokens_per_image) or self.tokens_per_image < 1:
            raise ConfigError(
                f"image tokens tokens_per_image={self.tokens_per_image!r} is invalid: an int >= 1"
            )

    @property
    def sequence(self) -> str:
        """The text each rendered `boi_token` becomes (transformers' `full_image_sequence`)."""
        return f"\n\n{self.boi_token}{self.image_token * self.tokens_per_image}{self.eoi_token}\n\n"


def image_paths(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """The `path` of every image part of `messages`, in order (string contents have none)."""
    paths = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            paths.extend(
                part[IMAGE_PATH_KEY]
                for part in content
                if isinstance(part, Mapping) and part.get("type") == IMAGE_PART
            )
    return paths


def resolve_path(path: str, base: Path | None) -> Path:
    """An image path from a record: relative paths are relative to `base` (the data file's
    directory); absolute ones stay."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() or base is None else base / candidate


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageInputs:
    """What a vision-language model needs from the data: how images are preprocessed and
    how the text marks them (both from the model's config)."""

    processor: ImageProcessor
    tokens: ImageTokens

    def __post_init__(self) -> None:
        if not isinstance(self.processor, ImageProcessor):
            raise TypeError(f"processor must be an ImageProcessor, got {self.processor!r}")
        if not isinstance(self.tokens, ImageTokens):
            raise TypeError(f"tokens must be ImageTokens, got {self.tokens!r}")


def image_inputs(model_config, tokenizer) -> ImageInputs | None:
    """How the data must present images to `model_config`'s model (a `ModelConfig`: its image
    size and image tokens, named by `tokenizer`), or None for a text-only model."""
    vision = model_config.vision
    if vision is None:
        return None

    def token(field: str, default: str) -> str:
        token_id = getattr(vision, field)
        if token_id is None:
            return default
        try:
            return tokenizer.id_to_token(token_id)
        except IndexError as error:
            raise ConfigError(
                f"model vision.{field}={token_id} is not a token of the tokenizer at "
                f"{tokenizer.source} ({tokenizer.vocab_size} tokens)"
            ) from error

    tokens = ImageTokens(
        boi_token=token("boi_token_id", GEMMA3_BOI),
        image_token=token("image_token_id", GEMMA3_IMAGE),
        eoi_token=token("eoi_token_id", GEMMA3_EOI),
        tokens_per_image=vision.mm_tokens_per_image,
    )
    return ImageInputs(processor=ImageProcessor(image_size=vision.image_size), tokens=tokens)
