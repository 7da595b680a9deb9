"""GGUF import and export on tiny random models (postax.models.gguf, gguf_export, gguf_tokenizer).

Round trips: a transformers model and tokenizer directory -> `export_gguf` -> read back by
postax's import and by transformers' own GGUF loader (`load_gguf_checkpoint`, the function
`from_pretrained(..., gguf_file=)` uses; called directly because `from_pretrained` insists on the
`accelerate` package, which is not a test dependency). Logits are float32. Measured on f32
round trips: transformers' reader gives exactly the source model's logits (the same weights in
the same torch code), postax's import within 2.6e-6 relative (JAX vs torch arithmetic, as for
safetensors checkpoints); the bound is 1e-5.

transformers' reader hard-codes what the file does not say (Qwen3 head_dim 128, Gemma 2/3
query scaling 256, soft-capping 50/30, Gemma 3 layer pattern 6, no rope scaling, no Llama
biases, no `gemma` architecture): the configs it reads (`HF_READABLE`) keep those defaults; the
others are checked against postax's import only, which reads the `postax.*` keys the export
writes.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from tokenizers.trainers import BpeTrainer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

import postax
from hf_fixtures import randomize, relative_error
from postax.cli import main as cli_main
from postax.models import CheckpointError, apply_lora, save_adapter
from postax.models.gguf import (
    GGUFError,
    GGUFFile,
    dequantizable_types,
    dequantize_tensor,
    gguf_tensor_name,
    permute_qk,
    unpermute_qk,
)
from postax.models.gguf_export import add_metadata_value, export_gguf
from postax.models.gguf_tokenizer import load_gguf_tokenizer, tokenizer_from_gguf
from postax.models.lora import LoRAConfig
from postax.tokenizer import load_tokenizer
from tokenizer_fixtures import CHATML, CHATML_TEMPLATE, CORPUS, make_tokenizer_dir

Q = gguf.GGMLQuantizationType
TEXTS = (
    "Hello world! The quick brown fox, 2024.",
    "  leading spaces\n\nand\ttabs  ",
    "naïve café, 日本語 🙂 <|im_end|> done",
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And 12 + 30?"},
]

_GEMMA = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)
CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        dict(
            hidden_size=64,  # rows of 64: q8_0 blocks of 32 apply to every matrix
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=128,  # transformers' reader ignores key_length: Qwen3Config's default
            tie_word_embeddings=False,
        ),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(**_GEMMA, num_hidden_layers=3, head_dim=256, sliding_window=4),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(**_GEMMA, num_hidden_layers=6, head_dim=256, sliding_window=4),
    ),
    # What transformers' GGUF reader cannot express: postax's import only.
    "llama_rope3_bias": (
        transformers.LlamaConfig,
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "gemma": (
        transformers.GemmaConfig,
        dict(**_GEMMA, num_hidden_layers=2, head_dim=16),
    ),
    "gemma2_custom": (
        transformers.Gemma2Config,
        dict(
            **_GEMMA,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3_custom": (
        transformers.Gemma3TextConfig,
        dict(
            **_GEMMA,
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            rope_theta=1000000.0,
            rope_local_base_freq=20000.0,
        ),
    ),
}
HF_READABLE = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


def hf_gguf_model(path) -> transformers.PreTrainedModel:
    """A transformers model read from a GGUF file by transformers' own GGUF loader."""
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    config = transformers.AutoConfig.for_model(**parsed["config"])
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def logits_of(model, tokens=TOKENS) -> np.ndarray:
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.as_tensor(tokens)).logits.float().numpy()
    return np.asarray(model(tokens), np.float32)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(
        tmp_path_factory.mktemp("tok"), CHATML_TEMPLATE, tokens=CHATML, template_file=True
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """name -> (transformers model, its save_pretrained directory with the tokenizer)."""
    vocab = load_tokenizer(tokenizer_dir).vocab_size
    out = {}
    for index, (name, (config_cls, fields)) in enumerate(CONFIGS.items()):
        config = config_cls(vocab_size=vocab, bos_token_id=None, eos_token_id=7, **fields)
        torch.manual_seed(index)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        randomize(model, index)
        path = tmp_path_factory.mktemp(name)
        model.eval().save_pretrained(path)
        for file in tokenizer_dir.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
        out[name] = (model, path)
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """name -> the f32 GGUF export of that checkpoint."""
    out = tmp_path_factory.mktemp("gguf")
    return {
        name: export_gguf(path, out / f"{name}.gguf", type="f32")
        for name, (_, path) in checkpoints.items()
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_round_trip_matches_source(name, checkpoints, exported):
    source, directory = checkpoints[name]
    expected = logits_of(source)
    ours = postax.load_model(exported[name])
    assert relative_error(logits_of(ours), expected) <= 1e-5
    assert ours.config == postax.load_model(directory).config.replace(
        bos_token_id=ours.config.bos_token_id,
        eos_token_id=ours.config.eos_token_id,
        pad_token_id=ours.config.pad_token_id,
        max_position_embeddings=ours.config.max_position_embeddings,
    )
    if name in HF_READABLE:
        assert relative_error(logits_of(hf_gguf_model(exported[name])), expected) <= 1e-5


# Measured on the tiny llama (max |error| / max |logit|; random weights of std 0.15, so
# coarser than a trained model): f16 1.5e-3, bf16 1.2e-2, q8_0 3.5e-2.
@pytest.mark.parametrize(("kind", "bound"), [("f16", 3e-3), ("bf16", 3e-2), ("q8_0", 6e-2)])
def test_lossy_exports_within_bound(kind, bound, checkpoints, tmp_path):
    source, directory = checkpoints["llama"]
    path = export_gguf(directory, tmp_path / f"{kind}.gguf", type=kind)
    types = {t.name: t.tensor_type.name for t in GGUFFile(path).reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"
    expected = logits_of(source)
    ours, theirs = logits_of(postax.load_model(path)), logits_of(hf_gguf_model(path))
    assert relative_error(ours, expected) <= bound
    assert relative_error(theirs, ours) <= 1e-5


def test_tensor_names_match_the_gguf_package(checkpoints):
    for name in ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"):
        model, _ = checkpoints[name]
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)
        table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
        for param in model.state_dict():
            if param == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            stem, suffix = param.rsplit(".", 1)
            assert gguf_tensor_name(param, name) == f"{table.get_name(stem)}.{suffix}", param


def test_qk_permutation_round_trip_and_rope_equivalence():
    rows = np.arange(4)[:, None] * np.ones((1, 3))
    # one head of 4 rows: rotate-half halves (0, 1 | 2, 3) become interleaved pairs (0, 2, 1, 3)
    np.testing.assert_array_equal(permute_qk(rows, 1)[:, 0], [0, 2, 1, 3])
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 3), 3), w)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w[:, 0], 3), 3), w[:, 0])
    # rope on permuted rows with interleaved pairs == rope on the original with rotate-half
    x, pos, d = rng.normal(size=5), 3.0, 8
    angles = pos * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angles), np.sin(angles)
    q = (w @ x).reshape(3, d)
    half = np.concatenate(
        [q[:, : d // 2] * cos - q[:, d // 2 :] * sin, q[:, d // 2 :] * cos + q[:, : d // 2] * sin],
        axis=1,
    )
    p = (permute_qk(w, 3) @ x).reshape(3, d)
    pairs = np.empty_like(p)
    pairs[:, 0::2] = p[:, 0::2] * cos - p[:, 1::2] * sin
    pairs[:, 1::2] = p[:, 1::2] * cos + p[:, 0::2] * sin
    np.testing.assert_allclose(permute_qk(half.reshape(-1), 3).reshape(3, d), pairs, atol=1e-12)


def _write(path, tensors: dict[str, tuple[np.ndarray, Q]], arch="llama", meta=None):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        add_metadata_value(writer, key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_dequantize_every_quantizable_type(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(size=(4, 256)).astype(np.float32)
    quantizable = []
    for qtype in Q:
        try:
            gguf.quants.quantize(values, qtype)
        except (NotImplementedError, ValueError, gguf.quants.QuantError):
            continue
        quantizable.append(qtype)
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1} <= set(quantizable)
    tensors = {f"t{i}": (gguf.quants.quantize(values, q), q) for i, q in enumerate(quantizable)}
    file = _write(tmp_path / "q.gguf", tensors)
    for i, qtype in enumerate(quantizable):
        ours = dequantize_tensor(file.tensors[f"t{i}"], file.path)
        assert ours.shape == values.shape and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(tensors[f"t{i}"][0], qtype))
        # each type's own error: bits per weight decide it (Q4 ~ 1/16 of the block range;
        # 4-bit floats with a power-of-two scale ~0.2; the ternary TQ types keep sign and zero)
        bound = 0.6 if qtype.name.startswith("TQ") else 0.3 if "FP4" in qtype.name else 0.15
        assert relative_error(ours, values) <= bound, qtype.name
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"} <= set(dequantizable_types())


def test_dequantize_hand_built_blocks(tmp_path):
    # Q8_0: float16 scale d, 32 int8 q: x = d * q
    q8 = np.arange(-16, 16, dtype=np.int8)
    block8 = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), q8.view(np.uint8)])
    # Q4_1: float16 d, float16 m, 16 bytes: x[j] = d * low nibble + m, x[j + 16] = d * high + m
    nibbles = np.arange(32) % 16
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    block41 = np.concatenate([np.array([0.25, -1.0], np.float16).view(np.uint8), packed])
    file = _write(
        tmp_path / "hand.gguf",
        {"q8": (block8.reshape(1, -1), Q.Q8_0), "q41": (block41.reshape(1, -1), Q.Q4_1)},
    )
    np.testing.assert_array_equal(dequantize_tensor(file.tensors["q8"], file.path)[0], 0.5 * q8)
    np.testing.assert_array_equal(
        dequantize_tensor(file.tensors["q41"], file.path)[0], 0.25 * nibbles - 1.0
    )


def test_bpe_tokenizer_rebuilt_from_gguf_encodes_like_the_source(exported, tokenizer_dir, tmp_path):
    source = load_tokenizer(tokenizer_dir)
    rebuilt = load_gguf_tokenizer(exported["llama"], tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(
        exported["llama"].parent, gguf_file=exported["llama"].name
    )
    assert GGUFFile(exported["llama"]).get("tokenizer.ggml.pre") == "llama-bpe"
    for text in TEXTS:
        assert rebuilt.encode(text) == source.encode(text) == theirs.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.encode_chat(MESSAGES, add_generation_prompt=True) == source.encode_chat(
        MESSAGES, add_generation_prompt=True
    )
    assert (rebuilt.eos_token, rebuilt.pad_token) == (source.eos_token, source.pad_token)
    assert rebuilt.chat_templates == source.chat_templates


def _sentencepiece_dir(path):
    """A SentencePiece-style tokenizer (byte-fallback BPE over U+2581-spaced text, byte tokens
    <0x00>..<0xFF> in the vocabulary), as transformers' fast Llama 2 tokenizer is built."""
    specials = ["<unk>", "<s>", "</s>"]
    normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "chat_template": CHATML_TEMPLATE.replace("<|im_start|>", "<s>").replace(
            "<|im_end|>", "</s>"
        ),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    directory = _sentencepiece_dir(tmp_path / "spm")
    source = load_tokenizer(directory)
    config = transformers.LlamaConfig(
        vocab_size=source.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    path = export_gguf(directory, tmp_path / "spm.gguf", type="f32")
    file = GGUFFile(path)
    assert file.get("tokenizer.ggml.model") == "llama"
    types = file.get("tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == 3 and types[3] == 6  # unknown, control, byte <0x00>
    rebuilt = load_gguf_tokenizer(path)
    # the same tokenizer with merges recovered from the scores alone
    meta = {k: file.get(k) for k in file.reader.fields if k.startswith("tokenizer.")}
    del meta["tokenizer.ggml.merges"]
    backend, _ = tokenizer_from_gguf(_write(tmp_path / "nomerges.gguf", {}, meta=meta))
    texts = (*TEXTS, "Paris weather today, again and again")
    for text in texts:
        expected = source.encode(text)
        assert rebuilt.encode(text) == expected, text
        assert backend.encode(text).ids == expected, text
        assert rebuilt.decode(expected, skip_special_tokens=True) == text
    assert rebuilt.add_bos_token and rebuilt.bos_token_id == 1
    assert (rebuilt.pad_token, rebuilt.unk_token) == ("<unk>", "<unk>")


def test_lora_adapter_exported_merged(checkpoints, tmp_path):
    _, directory = checkpoints["qwen3"]
    model = postax.load_model(directory)
    apply_lora(
        model,
        LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
        rngs=__import__("flax").nnx.Rngs(1),
    )
    for module in postax.models.lora.lora_modules(model).values():
        module.lora_b[...] = np.full(module.lora_b.shape, 0.05, np.float32)
    expected = logits_of(model)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="--base"):
        export_gguf(tmp_path / "adapter", tmp_path / "x.gguf")
    path = export_gguf(tmp_path / "adapter", tmp_path / "merged.gguf", type="f32", base=directory)
    assert relative_error(logits_of(postax.load_model(path)), expected) <= 1e-5


def test_cli_convert_and_export(checkpoints, exported, tmp_path):
    source, directory = checkpoints["qwen2"]
    assert cli_main(["convert", str(exported["qwen2"]), str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert relative_error(logits_of(reloaded), logits_of(source)) <= 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "hf")
    assert hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)[
        "input_ids"
    ] == ours.encode_chat(MESSAGES)
    assert (
        cli_main(["export-gguf", str(directory), str(tmp_path / "q.gguf"), "--type", "q8_0"]) == 0
    )
    assert GGUFFile(tmp_path / "q.gguf").get("general.file_type") == int(
        gguf.LlamaFileType.MOSTLY_Q8_0
    )
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone


def test_errors_name_the_problem(tmp_path, exported):
    with pytest.raises(GGUFError, match="file not found"):
        postax.load_model(tmp_path / "missing.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        postax.load_model(tmp_path / "fake.gguf")
    embd = np.zeros((8, 4), np.float32)
    phi = _write(tmp_path / "phi.gguf", {"token_embd.weight": (embd, Q.F32)}, arch="phi3")
    with pytest.raises(GGUFError, match=r"unsupported architecture 'phi3'.*llama, qwen2, qwen3"):
        postax.load_model(phi.path)
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.model='bert'.*gpt2, llama"):
        tokenizer_from_gguf(_write(tmp_path / "bert.gguf", {}, meta=meta))
    f64 = _write(tmp_path / "f64.gguf", {"token_embd.weight": (embd.astype(np.float64), Q.F64)})
    with pytest.raises(GGUFError, match=r"type F64.*supported: F32, F16"):
        dequantize_tensor(f64.tensors["token_embd.weight"], f64.path)
    with pytest.raises(GGUFError, match="type='q4_k' is invalid"):
        export_gguf(tmp_path, tmp_path / "x.gguf", type="q4_k")
    with pytest.raises(GGUFError, match=r"neither config\.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
