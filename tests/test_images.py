"""Gemma 3 images: the processor against transformers', and image chat messages against
transformers' `Gemma3Processor` (a tiny tokenizer made here with Gemma 3's image tokens, and
Gemma 3's published chat template)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from image_fixtures import GEMMA3_TEMPLATE, IMAGE_TOKENS, make_gemma3_tokenizer_dir
from PIL import Image

from postax.data.images import ImageProcessor, ImageTokens, check_image_file, image_paths
from postax.tokenizer import load_tokenizer
from postax.tokenizer.masks import expand_marker
from postax.validation import ConfigError


def _images():
    """Test images: RGB, RGBA with partial transparency, grayscale, non-square, a palette with
    a transparent index, tiny (1x1 and 2x3) and a gradient larger than the output."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (16, 9), dtype=np.uint8), "L")
    palette = Image.fromarray(rng.integers(0, 4, (8, 8), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette.info["transparency"] = 2
    ramp = np.linspace(0, 255, 64 * 96).reshape(64, 96).astype(np.uint8)
    gradient = Image.fromarray(
        np.stack([ramp, ramp.T[:64, :64].repeat(2, 1)[:, :96], 255 - ramp], -1)
    )
    tiny = Image.new("RGB", (1, 1), (12, 200, 99))
    small = Image.fromarray(rng.integers(0, 256, (3, 2, 3), dtype=np.uint8), "RGB")
    la = Image.fromarray(rng.integers(0, 256, (5, 7, 2), dtype=np.uint8), "LA")
    return {
        "rgb": rgb,
        "rgba": rgba,
        "gray": gray,
        "palette": palette,
        "gradient": gradient,
        "tiny": tiny,
        "small": small,
        "la": la,
    }


@pytest.mark.parametrize("size", [14, 32])
def test_processor_equals_transformers_pil(size):
    from transformers import Gemma3ImageProcessorPil

    reference = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    ours = ImageProcessor(image_size=size)
    for name, image in _images().items():
        want = reference(images=[image.copy()], return_tensors="np")["pixel_values"][0]
        got = ours(image)
        assert got.dtype == np.float32 and got.shape == (3, size, size), name
        # same PIL resize of the same 8-bit image, same float steps: equal to the last bit
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert got.min() >= -1.0 and got.max() <= 1.0


def test_transparency_is_composited_onto_white():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent: white
    np.testing.assert_array_equal(ImageProcessor(image_size=2)(clear), np.ones((3, 2, 2)))


def test_processor_config_errors():
    with pytest.raises(ConfigError, match=r"pan_and_scan=True is invalid: False"):
        ImageProcessor(image_size=8, pan_and_scan=True)
    with pytest.raises(ConfigError, match=r"image_size=0 is invalid"):
        ImageProcessor(image_size=0)
    with pytest.raises(ConfigError, match=r"resample='nearest' is invalid: one of \('bilinear',\)"):
        ImageProcessor(image_size=8, resample="nearest")
    with pytest.raises(ConfigError, match=r"image_std=\(0.5, 0.0, 0.5\) is invalid"):
        ImageProcessor(image_size=8, image_std=(0.5, 0.0, 0.5))


def test_load_and_check_name_the_file(tmp_path):
    processor = ImageProcessor(image_size=4)
    Image.new("RGB", (5, 3), (255, 0, 0)).save(tmp_path / "red.png")
    red = processor.load(tmp_path / "red.png")
    np.testing.assert_array_equal(red[0], np.ones((4, 4)))
    np.testing.assert_array_equal(red[1:], -np.ones((2, 4, 4)))
    check_image_file(tmp_path / "red.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image '.*missing.png' does not exist"):
        check_image_file(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"cannot read image '.*bad.png'"):
        check_image_file(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"cannot read image '.*bad.png'"):
        processor.load(tmp_path / "bad.png")


def test_expand_marker_moves_spans():
    text = "ab<M>cd<M>ef"
    new, spans = expand_marker(text, [(0, 2), (2, 5), (5, 7), (2, 12)], "<M>", "[xxxx]")
    assert new == "ab[xxxx]cd[xxxx]ef"
    assert [new[a:b] for a, b in spans] == ["ab", "[xxxx]", "cd", "[xxxx]cd[xxxx]ef"]
    assert expand_marker("none", [(1, 2)], "<M>", "xx") == ("none", [(1, 2)])


def _conversation(count, directory):
    parts = [{"type": "image", "path": str(directory / f"img{k}.png")} for k in range(count)]
    return [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {
            "role": "user",
            "content": [
                *parts[:1],
                {"type": "text", "text": "What is the weather like?"},
                *parts[1:],
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
        {"role": "user", "content": "And in Paris?"},
        {"role": "assistant", "content": "The capital of France is sunny."},
    ]


@pytest.mark.parametrize("count", [1, 2])
def test_image_chat_ids_equal_gemma3_processor(tmp_path, count):
    from transformers import AutoTokenizer, Gemma3ImageProcessorPil, Gemma3Processor

    directory = make_gemma3_tokenizer_dir(tmp_path / "tok")
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    assert hf_tokenizer.boi_token == "<start_of_image>"  # read from extra_special_tokens
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 8, "width": 8}),
        tokenizer=hf_tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=5,
    )
    images = [Image.new("RGB", (9, 6), (40 * k, 0, 0)) for k in range(count)]
    for k, image in enumerate(images):
        image.save(tmp_path / f"img{k}.png")
    messages = _conversation(count, tmp_path)
    # what a user of transformers runs: the processor loads the images from the paths
    want = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="np"
    )

    tokenizer = load_tokenizer(directory)
    tokens = ImageTokens(tokens_per_image=5)
    encoding = tokenizer.apply_chat_template(
        messages, marker_expansion=(tokens.boi_token, tokens.sequence)
    )
    assert encoding.ids == want["input_ids"][0].tolist()
    assert image_paths(messages) == [str(tmp_path / f"img{k}.png") for k in range(count)]
    ids = np.asarray(encoding.ids)
    soft = tokenizer.token_to_id("<image_soft_token>")
    assert (ids == soft).sum() == 5 * count
    # the assistant mask is what it is without images, shifted past the image tokens
    plain = [
        {**m, "content": [p for p in m["content"] if p["type"] == "text"]}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]
    without = tokenizer.apply_chat_template(plain)
    mask = np.asarray(encoding.assistant_mask, dtype=bool)
    assert tokenizer.decode(ids[mask]) == tokenizer.decode(
        np.asarray(without.ids)[np.asarray(without.assistant_mask, dtype=bool)]
    )
    assert tokenizer.decode(ids[mask]) == (
        "It is sunny.<end_of_turn>The capital of France is sunny.<end_of_turn>"
    )
    assert not mask[np.isin(ids, [tokenizer.token_to_id(t) for t in IMAGE_TOKENS])].any()
    # pixel values of the same images equal the processor's
    pixels = np.stack([ImageProcessor(image_size=8)(image) for image in images])
    np.testing.assert_array_equal(pixels, want["pixel_values"])
    assert json.loads((directory / "tokenizer_config.json").read_text())["extra_special_tokens"]


# -- image SFT data ----------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _image_record(*paths, answer="It is red."):
    parts = [{"type": "image", "path": p} for p in paths]
    return {
        "messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": answer},
        ]
    }


def _image_data(tmp_path, records):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (6, 4), rgb).save(tmp_path / "imgs" / f"{name}.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _image_dataset(tmp_path, records, **overrides):
    from postax.data import DataConfig, SFTDataset
    from postax.data.images import ImageInputs

    directory = make_gemma3_tokenizer_dir(tmp_path / "tok")
    settings = dict(packing=False, batch_size=2, seq_len=64, shuffle=False, max_images_per_row=2)
    config = DataConfig(path=str(_image_data(tmp_path, records)), **{**settings, **overrides})
    inputs = ImageInputs(
        processor=ImageProcessor(image_size=8), tokens=ImageTokens(tokens_per_image=4)
    )
    return SFTDataset(config, load_tokenizer(directory), images=inputs), load_tokenizer(directory)


def test_image_sft_batches(tmp_path):
    records = [
        _image_record("imgs/red.png"),
        _image_record("imgs/green.png", str(tmp_path / "imgs" / "blue.png"), answer="Two."),
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    ]
    dataset, tokenizer = _image_dataset(tmp_path, records)
    assert dataset.document_images(0) == (str(tmp_path / "imgs" / "red.png"),)
    batch = dataset.batch(0, 0)
    processor = ImageProcessor(image_size=8)
    assert batch.images.shape == (2, 2, 3, 8, 8) and batch.images.dtype == np.float32
    red, green, blue = (processor.load(tmp_path / "imgs" / f"{c}.png") for c in COLOURS)
    np.testing.assert_array_equal(batch.images[0, 0], red)
    np.testing.assert_array_equal(batch.images[0, 1], 0)  # padding image
    np.testing.assert_array_equal(batch.images[1], np.stack([green, blue]))
    image_ids = [tokenizer.token_to_id(t) for t in IMAGE_TOKENS]
    soft = tokenizer.token_to_id("<image_soft_token>")
    assert [(row == soft).sum() for row in batch.tokens] == [4, 8]
    assert not batch.loss_mask[np.isin(batch.targets, image_ids)].any()
    trained = [
        tokenizer.decode(t[m > 0]) for t, m in zip(batch.targets, batch.loss_mask, strict=True)
    ]
    assert trained == ["It is red.<end_of_turn>", "Two.<end_of_turn>"]
    assert set(batch.as_dict()) == {
        "tokens",
        "targets",
        "loss_mask",
        "positions",
        "segment_ids",
        "images",
    }
    # the last batch: the text record and an empty row; images all zeros
    last = dataset.batch(0, 1)
    assert last.images.shape == (2, 2, 3, 8, 8) and not last.images.any()


def test_text_data_has_no_images(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    ]
    dataset, _ = _image_dataset(tmp_path, records, batch_size=1)
    batch = dataset.batch(0, 0)
    assert batch.images is None and "images" not in batch.as_dict()


def test_truncation_keeps_whole_image_blocks(tmp_path):
    first, second = _image_record("imgs/red.png"), _image_record("imgs/green.png", answer="Green")
    records = [{"messages": first["messages"] + second["messages"]}]
    full, tokenizer = _image_dataset(tmp_path / "a", records, batch_size=1, seq_len=200)
    ids, _ = full.document(0)
    soft = tokenizer.token_to_id("<image_soft_token>")
    second = np.flatnonzero(ids == soft)[4]  # the second block's first soft token
    cut, _ = _image_dataset(tmp_path / "b", records, batch_size=1, seq_len=int(second) + 1)
    kept, labels = cut.document(0)
    assert len(cut.document_images(0)) == 1  # the block the cut split is left out, with its image
    assert (kept == soft).sum() == 4
    # cut right before the second block's boi; the first answer is still trained
    np.testing.assert_array_equal(kept, ids[: int(second) - 1])
    assert tokenizer.decode(kept[labels]) == "It is red.<end_of_turn>"


def _error(tmp_path, records, **overrides):
    from postax.data import DataError

    with pytest.raises(DataError) as info:
        _image_dataset(tmp_path, records, **overrides)
    return str(info.value)


def test_image_data_errors_name_file_line_and_path(tmp_path):
    good = _image_record("imgs/red.png")
    message = _error(tmp_path, [good, _image_record("imgs/missing.png")])
    path = tmp_path / "train.jsonl"
    assert message == (
        f"{path}:2: field 'messages'[0]['content'][0]['path']: image "
        f"{str(tmp_path / 'imgs' / 'missing.png')!r} does not exist"
    )
    (tmp_path / "imgs" / "bad.png").write_text("not an image")
    message = _error(tmp_path, [_image_record("imgs/bad.png")])
    assert message.startswith(f"{path}:1: field 'messages'[0]['content'][0]['path']: cannot read")
    three = _image_record("imgs/red.png", "imgs/green.png", "imgs/blue.png")
    assert _error(tmp_path, [three]) == (
        f"{path}:1: field 'messages' holds 3 images, more than data.max_images_per_row=2"
    )
    bad_part = {"messages": [{"role": "user", "content": [{"type": "video"}]}, good["messages"][1]]}
    assert _error(tmp_path, [bad_part]).startswith(
        f"{path}:1: field 'messages'[0]['content'][0] must be a content part"
    )
    # image tokens typed into text without image parts: refused in every format
    stray = "look <image_soft_token> here"
    for record in (
        {"text": stray},
        {"prompt": stray, "completion": "ok"},
        {"messages": [{"role": "user", "content": stray}, good["messages"][1]]},
    ):
        message = _error(tmp_path, [record])
        assert message.startswith(f"{path}:1: "), message
        assert "image tokens" in message and "image parts" in message, message


def test_images_for_a_text_only_model_are_refused(tmp_path):
    from postax.data import DataConfig, DataError, SFTDataset

    directory = make_gemma3_tokenizer_dir(tmp_path / "tok")
    path = _image_data(tmp_path, [_image_record("imgs/red.png")])
    with pytest.raises(DataError, match=r"is an image, but the model takes no images"):
        SFTDataset(DataConfig(path=str(path), packing=False), load_tokenizer(directory))


def test_an_image_that_fails_to_decode_names_its_record(tmp_path):
    from postax.data import DataError

    dataset, _ = _image_dataset(tmp_path, [_image_record("imgs/red.png")], batch_size=1)
    png = (tmp_path / "imgs" / "red.png").read_bytes()
    (tmp_path / "imgs" / "red.png").write_bytes(png[: len(png) // 2])  # header intact
    with pytest.raises(DataError, match=r"train.jsonl:1: cannot read image '.*red.png'"):
        dataset.batch(0, 0)


def test_pack_with_images_bounds_tokens_and_images():
    from postax.data.dataset import pack_with_images
    from postax.data.packing import pack

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 300)
    assert pack_with_images(lengths, np.zeros(300, int), 64, 3) == pack(lengths, 64)
    images = rng.integers(0, 3, 300)
    rows = pack_with_images(lengths, images, 64, 3)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(lengths[row].sum() <= 64 and images[row].sum() <= 3 for row in rows)
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    # the image bound binds: two-image documents pair up only under max_images=4
    lengths, images = np.full(6, 10), np.full(6, 2)
    assert len(pack_with_images(lengths, images, 64, 2)) == 6
    assert len(pack_with_images(lengths, images, 64, 4)) == 3


def test_packed_rows_carry_their_documents_images_in_block_order(tmp_path):
    records = [
        _image_record("imgs/red.png"),
        _image_record("imgs/green.png", "imgs/blue.png", answer="Two."),
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        _image_record("imgs/blue.png", answer="Blue."),
    ]
    dataset, tokenizer = _image_dataset(
        tmp_path, records, packing=True, seq_len=200, batch_size=2, max_images_per_row=3
    )
    processor = ImageProcessor(image_size=8)
    soft = tokenizer.token_to_id("<image_soft_token>")
    batch = dataset.batch(0, 0)
    seen = 0
    for r in range(2):
        docs = dataset.row(int(dataset.epoch_order(0)[r]))
        paths = [p for d in docs for p in dataset.document_images(d)]
        assert len(paths) <= 3 and (batch.tokens[r] == soft).sum() == 4 * len(paths)
        for k in range(3):
            want = processor.load(paths[k]) if k < len(paths) else 0
            np.testing.assert_array_equal(batch.images[r, k], want)
        seen += len(docs)
    assert seen == 4 and dataset.stats.rows == 2
