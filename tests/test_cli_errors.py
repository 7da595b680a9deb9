"""Every `postax` command turns a user's mistake into one line and exit status 2.

A mistake in a config (unknown key, invalid value, bad YAML, missing file), in
the data (missing file, malformed JSON line, missing field), in a checkpoint
(missing directory, corrupt config.json, tensors that do not fit) or in a path
prints exactly one line to stderr, `postax <command>: <message>`, naming the
file/line/field, and exits 2 - before any model is compiled. Anything else is
an internal error: a traceback and exit 1. `--debug` anywhere on the command
line gives the traceback for a user's mistake too. A missing optional extra
never fails a finished run: without matplotlib a GRPO run warns once at
start-up and writes everything but the plot.

Commands run in-process through `postax.cli.main`, from the repository root,
on the shipped configs with a few overrides and small files written here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest

import postax
from postax.cli import COMMANDS
from postax.cli import main as postax_main
from postax.data.sources import DataError
from postax.recipes import grpo, sft
from postax.tokenizer import copy_tokenizer_files
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SFT_TOKENIZER = ROOT / "examples" / "sft_tiny" / "tokenizer"  # 320 ids
RL_TOKENIZER = ROOT / "examples" / "arithmetic" / "tokenizer"  # 300 ids
TINY = dict(  # a one-layer Llama; vocab_size fits both example tokenizers
    family="llama",
    vocab_size=320,
    hidden_size=32,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Name -> a file or directory: good and broken checkpoints, configs and data files."""
    root = tmp_path_factory.mktemp("cli_errors")
    paths = {name: root / name for name in ("missing_dir", "missing.jsonl", "missing.yaml")}

    checkpoint = root / "checkpoint"  # a real tiny checkpoint with the SFT example's tokenizer
    postax.save_model(postax.build_model(postax.ModelConfig(**TINY), seed=0), checkpoint)
    copy_tokenizer_files(SFT_TOKENIZER, checkpoint)
    mismatched = root / "mismatched"  # config.json says hidden_size 48, the tensors have 32
    shutil.copytree(checkpoint, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    corrupt = root / "corrupt"  # config.json that is not JSON, no tokenizer
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json\n")
    paths |= dict(checkpoint=checkpoint, mismatched=mismatched, corrupt=corrupt)

    (root / "bad.yaml").write_text("output_dir: x\ntrainer: [1\n")
    (root / "a_file").write_text("not a directory\n")
    chat = {
        "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    }
    pair = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}
    prompt = {"prompt": "1+1=", "answer": "2"}
    for kind, good, incomplete in (
        ("chat", chat, {"text_of": "no known field"}),
        ("pairs", pair, {"prompt": "1+1?", "chosen": "2"}),
        ("prompts", prompt, {"question": "1+1=", "answer": "2"}),
    ):
        (root / f"{kind}_bad.jsonl").write_text(json.dumps(good) + "\n{not json\n")
        (root / f"{kind}_incomplete.jsonl").write_text(json.dumps(incomplete) + "\n")
    paths |= {p.name: p for p in root.iterdir() if p.suffix in (".jsonl", ".yaml")}
    paths["a_file"] = root / "a_file"

    # the reward model has no shipped config: the DPO one without its DPO settings
    raw = (ROOT / "configs" / "preference" / "dpo-tiny.yaml").read_text()
    keep = [line for line in raw.splitlines() if not line.startswith(("loss:", "dpo:", "  beta"))]
    keep = [line for line in keep if not line.startswith(("  variant", "reference:"))]
    keep = [line.replace("progress_metrics: [accuracy, margin]", "log_every: 10") for line in keep]
    (root / "reward-model.yaml").write_text("\n".join(keep) + "\n")
    paths["reward-model.yaml"] = root / "reward-model.yaml"
    paths["out"] = root / "out"
    return paths


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to run a recipe command against the inputs: its config, the overrides that point
    it at existing files, the data format it reads, a typo and an invalid value."""

    config: str  # relative to the repository root, or a name in `inputs`
    paths: tuple[str, ...]  # `{name}` is replaced by inputs[name]
    data: str  # chat, pairs or prompts
    typo: tuple[str, str]  # (override, the valid key the message suggests)
    invalid: tuple[str, str]  # (override, message)
    model_key: str = "model.path"  # the checkpoint directory the recipe loads


RECIPES = {
    "sft": Recipe(
        "configs/sft/tiny.yaml",
        (),
        "chat",
        ("trainer.stepz=3", "did you mean 'trainer.steps'?"),
        ("trainer.steps=0", "trainer.steps=0 is invalid: a positive integer"),
    ),
    "preference": Recipe(
        "configs/preference/dpo-tiny.yaml",
        ("model.path={checkpoint}",),
        "pairs",
        ("dpo.betta=0.5", "did you mean 'dpo.beta'?"),
        ("loss=dpo_plus", "loss='dpo_plus' is invalid"),
    ),
    "reward-model": Recipe(
        "reward-model.yaml",
        ("model.path={checkpoint}",),
        "pairs",
        ("margn=0.5", "did you mean 'margin'?"),
        ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 is invalid"),
    ),
    "grpo": Recipe(
        "configs/grpo/arithmetic.yaml",
        ("model.path={checkpoint}", f"tokenizer={RL_TOKENIZER}"),
        "prompts",
        ("rollout.temprature=0.5", "did you mean 'rollout.temperature'?"),
        ("advantage=grpo2", "advantage='grpo2' is invalid"),
    ),
    "ppo": Recipe(
        "configs/ppo/arithmetic.yaml",
        ("model.path={checkpoint}", f"tokenizer={RL_TOKENIZER}"),
        "prompts",
        ("value.lamda=0.9", "did you mean 'value.lam'?"),
        ("value.critic=twin", "value.critic='twin' is invalid"),
    ),
    "distill": Recipe(
        "configs/distill/tiny.yaml",
        ("teacher.path={checkpoint}",),
        "chat",
        ("loss.temprature=2", "did you mean 'loss.temperature'?"),
        ("loss.divergence=kl", "loss.divergence='kl' is invalid"),
        model_key="teacher.path",
    ),
}


def recipe_case(command: str, case: str, inputs: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(argv, strings the one line must contain) of one mistake in one recipe command."""
    recipe = RECIPES[command]
    config = recipe.config if recipe.config.startswith("configs/") else inputs[recipe.config]
    paths = [p.format(**inputs) for p in recipe.paths]
    run = [command, "--config", str(config), f"output_dir={inputs['out'] / command}"]
    model_off = ["model.config=null"] if recipe.model_key == "model.path" else []
    data = recipe.data
    return {
        "typo": (
            [*run, recipe.typo[0]],
            [str(config), recipe.typo[0].split("=")[0], recipe.typo[1]],
        ),
        "invalid value": ([*run, recipe.invalid[0]], [str(config), recipe.invalid[1]]),
        "missing config": (
            [command, "--config", str(inputs["missing.yaml"])],
            [f"{inputs['missing.yaml']}: config file not found"],
        ),
        "bad yaml": (
            [command, "--config", str(inputs["bad.yaml"])],
            [f"{inputs['bad.yaml']}: not valid YAML: line 3"],
        ),
        "missing data": (
            [*run, *paths, f"data.path={inputs['missing.jsonl']}"],
            [f"data path {inputs['missing.jsonl']} does not exist"],
        ),
        "malformed data line": (
            [*run, *paths, f"data.path={inputs[f'{data}_bad.jsonl']}"],
            [f"{inputs[f'{data}_bad.jsonl']}:2: ", "JSON"],
        ),
        "missing data field": (
            [*run, *paths, f"data.path={inputs[f'{data}_incomplete.jsonl']}"],
            [
                f"{inputs[f'{data}_incomplete.jsonl']}:1: ",
                {"chat": "'messages'", "pairs": "'rejected'", "prompts": "'prompt'"}[data],
            ],
        ),
        "missing checkpoint": (
            [*run, *paths, *model_off, f"{recipe.model_key}={inputs['missing_dir']}"],
            [f"{recipe.model_key}='{inputs['missing_dir']}': no such checkpoint directory or file"],
        ),
        "corrupt checkpoint": (
            [*run, *paths, *model_off, f"{recipe.model_key}={inputs['corrupt']}"],
            [f"{inputs['corrupt'] / 'config.json'}: not valid JSON"],
        ),
        "output_dir under a file": (
            [*run, *paths, f"output_dir={inputs['a_file'] / 'run'}"],
            [f"output_dir='{inputs['a_file'] / 'run'}' cannot be created"],
        ),
    }[case]


RECIPE_CASES = (
    "typo",
    "invalid value",
    "missing config",
    "bad yaml",
    "missing data",
    "malformed data line",
    "missing data field",
    "missing checkpoint",
    "corrupt checkpoint",
    "output_dir under a file",
)


def other_case(command: str, case: str, inputs: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Mistakes in the commands that take paths on the command line instead of a config."""
    model, tokenizer = str(inputs["checkpoint"]), str(SFT_TOKENIZER)
    return {
        ("generate", "missing checkpoint"): (
            ["generate", "--model", str(inputs["missing_dir"]), "--prompt", "x"],
            [f"{inputs['missing_dir'] / 'config.json'}: not found"],
        ),
        ("generate", "corrupt checkpoint"): (
            ["generate", "--model", str(inputs["corrupt"]), "--prompt", "x"],
            [f"{inputs['corrupt'] / 'config.json'}: not valid JSON"],
        ),
        ("generate", "mismatched tensors"): (
            ["generate", "--model", str(inputs["mismatched"]), "--prompt", "x"],
            ["model.safetensors: tensor 'model.embed_tokens.weight' has shape (320, 32)"],
        ),
        ("generate", "missing tokenizer"): (
            ["generate", "--model", model, "--tokenizer", str(inputs["corrupt"]), "--prompt", "x"],
            [f"{inputs['corrupt'] / 'tokenizer.json'} not found"],
        ),
        ("generate", "invalid value"): (
            ["generate", "--model", model, "--prompt", "x", "--top-p", "2"],
            ["top_p=2.0 is invalid"],
        ),
        ("generate", "missing data"): (
            [
                "generate",
                "--model",
                model,
                "--tokenizer",
                tokenizer,
                "--input",
                str(inputs["missing.jsonl"]),
            ],
            [f"{inputs['missing.jsonl']}: No such file or directory"],
        ),
        ("convert", "missing checkpoint"): (
            ["convert", str(inputs["missing_dir"]) + ".gguf", str(inputs["out"] / "converted")],
            [f"{inputs['missing_dir']}.gguf"],
        ),
        ("convert", "corrupt checkpoint"): (
            ["convert", str(inputs["bad.yaml"]), str(inputs["out"] / "converted")],
            [str(inputs["bad.yaml"]), "GGUF"],
        ),
        ("export-gguf", "missing checkpoint"): (
            ["export-gguf", str(inputs["missing_dir"]), str(inputs["out"] / "x.gguf")],
            [str(inputs["missing_dir"])],
        ),
        ("export-gguf", "corrupt checkpoint"): (
            ["export-gguf", str(inputs["corrupt"]), str(inputs["out"] / "x.gguf")],
            [str(inputs["corrupt"] / "config.json")],
        ),
        ("launch", "invalid value"): (["launch", "-n", "0", "--", "true"], ["-n=0 is invalid"]),
        ("launch", "missing command"): (["launch", "-n", "1", "--", "/no/such"], ["/no/such"]),
    }[command, case]


OTHER_CASES = {
    "generate": (
        "missing checkpoint",
        "corrupt checkpoint",
        "mismatched tensors",
        "missing tokenizer",
        "invalid value",
        "missing data",
    ),
    "convert": ("missing checkpoint", "corrupt checkpoint"),
    "export-gguf": ("missing checkpoint", "corrupt checkpoint"),
    "launch": ("invalid value", "missing command"),
}
CASES = [(c, case) for c in RECIPES for case in RECIPE_CASES] + [
    (c, case) for c, cases in OTHER_CASES.items() if c in COMMANDS for case in cases
]


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = postax_main(argv)
    return code, capsys.readouterr().err


def assert_one_line(command: str, code: int, err: str, expected: list[str]) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"postax {command}: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_every_command_has_its_mistakes_tested():
    assert set(COMMANDS) <= {command for command, _ in CASES}


@pytest.mark.parametrize(("command", "case"), CASES, ids=[f"{c}-{k}" for c, k in CASES])
def test_a_mistake_is_one_line_and_exit_2(command, case, inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped configs' relative paths, as users run them
    make = recipe_case if command in RECIPES else other_case
    argv, expected = make(command, case, inputs)
    code, err = run(argv, capsys)
    assert_one_line(command, code, err, expected)


def test_a_missing_checkpoint_fails_before_the_data_is_read(inputs, capsys, monkeypatch):
    """The checkpoint directory is checked at start-up: no data line, no data read."""
    monkeypatch.chdir(ROOT)
    read = []
    monkeypatch.setattr(sft, "load_data", lambda *a: read.append(a))
    argv, expected = recipe_case("sft", "missing checkpoint", inputs)
    assert_one_line("sft", *run(argv, capsys), expected)
    assert read == []


def test_tensors_that_do_not_fit_the_config_are_one_line(inputs, capsys, monkeypatch):
    """Found when the model is loaded, after the data (whose summary line comes first)."""
    monkeypatch.chdir(ROOT)
    argv = [
        "sft",
        "--config",
        "configs/sft/tiny.yaml",
        f"output_dir={inputs['out'] / 'mismatched'}",
        "model.config=null",
        f"model.path={inputs['mismatched']}",
        f"data.path={ROOT / 'examples' / 'sft_tiny' / 'eval.jsonl'}",
        "eval_data=null",
    ]
    code, err = run(argv, capsys)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("data: "), err
    assert (
        lines[1].startswith("postax sft: ")
        and "has shape (320, 32), expected (320, 48)" in lines[1]
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.config.family=gpt9", "model.config.family='gpt9' is invalid: one of llama"),
        ("trainer.mesh.fsdp=7", "mesh data=1 x fsdp=7 x tensor=1 needs 7 devices, found "),
        ("lora={rank: 4, targets: [qq_proj]}", "targets contains 'qq_proj'"),
    ],
    ids=["family", "mesh", "lora-targets"],
)
def test_mistakes_found_after_the_data_are_one_line(override, message, inputs, capsys, monkeypatch):
    """Found when the model or the trainer is built: after the data summary, before compiling."""
    monkeypatch.chdir(ROOT)
    small = ["model.config.num_layers=1", "model.config.hidden_size=32", "model.config.head_dim=8"]
    argv = [*recipe_case("sft", "typo", inputs)[0][:-1], "eval_data=null", *small, override]
    code, err = run(argv, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("data: ")]
    assert len(lines) == 1 and lines[0].startswith("postax sft: ") and message in lines[0], err


def test_resuming_with_changed_settings_is_one_line(tmp_path, capsys, monkeypatch):
    """A finished run's output_dir reused with another model or other batching: the checkpoint
    or the data position does not fit, and the message says how to start afresh."""
    monkeypatch.chdir(ROOT)
    argv = [
        "sft",
        "--config",
        "configs/sft/tiny.yaml",
        f"output_dir={tmp_path / 'run'}",
        "model.config.num_layers=1",
        "model.config.hidden_size=32",
        "model.config.head_dim=8",
        "model.config.intermediate_size=32",
        "data.path=examples/sft_tiny/eval.jsonl",
        "data.seq_len=32",
        "data.batch_size=2",
        "eval_data=null",
        "trainer.steps=1",
        "trainer.progress=false",
        "checkpoint.async_save=false",
        "export=false",
    ]
    assert postax_main(argv) == 0
    capsys.readouterr()
    for change, message in (
        ("model.config.hidden_size=64", "the checkpoint does not fit this run's state"),
        ("data.batch_size=4", "data iterator state does not match this dataset"),
    ):
        code, err = run([*argv, "trainer.steps=2", change], capsys)
        assert code == 2, err
        lines = [line for line in err.splitlines() if not line.startswith("data: ")]
        assert len(lines) == 1 and lines[0].startswith("postax sft: "), err
        assert message in lines[0] and "new" in lines[0]


def test_an_unknown_reward_function_is_one_line(inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = [
        *recipe_case("grpo", "typo", inputs)[0][:-1],
        *[p.format(**inputs) for p in RECIPES["grpo"].paths],
        "rewards=[{name: exact_matsh}]",
    ]
    code, err = run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("postax grpo: ") and "exact_matsh" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_argparse_errors_exit_2_with_a_usage_line(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        postax_main([command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: postax {command}" in err and "error:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("boom"), KeyError("boom")])
def test_an_internal_error_prints_the_traceback_and_exits_1(error, inputs, capsys, monkeypatch):
    """Errors that are not the user's (a built-in ValueError included) are never shortened."""
    monkeypatch.chdir(ROOT)

    def broken(cfg):
        raise error

    monkeypatch.setattr(sft, "run", broken)
    code, err = run(recipe_case("sft", "typo", inputs)[0][:-1], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert f"{type(error).__name__}: " in err and "boom" in err
    assert err.splitlines()[-1] == "postax sft: internal error (traceback above)"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (DataError("x.jsonl:3: bad record\n  {'a':\n   1}\n"), "x.jsonl:3: bad record {'a': 1}"),
        (PermissionError(13, "Permission denied", "/root/run"), "/root/run: Permission denied"),
        (
            FileNotFoundError("tokenizer directory t does not exist"),
            "tokenizer directory t does not exist",
        ),
        (ConfigError(""), "ConfigError"),
    ],
    ids=["multi-line", "os-error", "os-error-message", "no-message"],
)
def test_a_mistake_message_is_collapsed_to_one_line(error, line, inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)

    def failing(cfg):
        raise error

    monkeypatch.setattr(sft, "run", failing)
    code, err = run(recipe_case("sft", "typo", inputs)[0][:-1], capsys)
    assert (code, err) == (2, f"postax sft: {line}\n")


def test_ctrl_c_is_one_line_and_exit_130(inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "run", interrupted)
    code, err = run(recipe_case("sft", "typo", inputs)[0][:-1], capsys)
    assert (code, err) == (130, "postax sft: interrupted\n")


@pytest.mark.parametrize("where", ["first", "last"])
def test_debug_anywhere_gives_the_traceback_of_a_mistake(where, inputs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = recipe_case("sft", "typo", inputs)[0]
    argv = ["--debug", *argv] if where == "first" else [*argv, "--debug"]
    code, err = run(argv, capsys)
    assert code == 2  # still the user's mistake
    assert "Traceback (most recent call last)" in err
    assert "ConfigFileError: configs/sft/tiny.yaml: unknown key 'trainer.stepz'" in err


@pytest.mark.parametrize(
    ("override", "package", "expected"),
    [
        ("metrics.tensorboard=true", "tensorboardX", "pip install 'postax[tensorboard]'"),
        ("metrics.wandb_project=postax-runs", "wandb", "pip install wandb"),
    ],
    ids=["tensorboard", "wandb"],
)
def test_a_logger_asked_for_but_missing_fails_at_start_up(
    override, package, expected, inputs, capsys, monkeypatch
):
    """Asked for explicitly, a missing logging package is an error, not skipped: one line
    before anything is written (the run would otherwise train without the expected logs)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    out = inputs["out"] / package
    argv = ["sft", "--config", "configs/sft/tiny.yaml", f"output_dir={out}", override]
    code, err = run(argv, capsys)
    assert_one_line(
        "sft", code, err, [override.replace("postax-runs", "'postax-runs'"), package, expected]
    )
    assert not out.exists()


def test_a_missing_optional_package_of_a_command_is_one_line(inputs, capsys, monkeypatch):
    """An ImportError for an optional package (here as `convert` would raise it for gguf)."""
    monkeypatch.chdir(ROOT)

    def needs_gguf(cfg):
        try:
            raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
        except ModuleNotFoundError as missing:
            raise ImportError("reading GGUF files needs the gguf package") from missing

    monkeypatch.setattr(sft, "run", needs_gguf)
    code, err = run(recipe_case("sft", "typo", inputs)[0][:-1], capsys)
    assert_one_line("sft", code, err, ["needs the gguf package", "pip install 'postax[gguf]'"])


def test_grpo_without_matplotlib_warns_once_and_writes_everything_else(
    tmp_path, capsys, monkeypatch
):
    """A finished run never fails on a missing optional extra: no plot, one start-up warning
    (before the model is built), metrics, checkpoint, export and summary all written."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if `postax[plot]` were not installed
    at_build = []
    build_policy = grpo.build_policy

    def observed_build_policy(*args):
        at_build.append(capsys.readouterr().err)
        return build_policy(*args)

    monkeypatch.setattr(grpo, "build_policy", observed_build_policy)
    model = ", ".join(f"{k}: {json.dumps(v)}" for k, v in TINY.items())
    out = tmp_path / "run"
    code = postax_main(
        [
            "grpo",
            "--config",
            "configs/grpo/arithmetic.yaml",
            f"output_dir={out}",
            "model.path=null",
            f"model.config={{{model}}}",
            f"tokenizer={RL_TOKENIZER}",
            "iterations=1",
            "data.batch_size=4",
            "rollout.samples_per_prompt=8",
            "rollout.max_new_tokens=8",
            "eval_data=null",
            "checkpoint.async_save=false",
            "run.progress=false",
        ]
    )
    err = at_build[0] + capsys.readouterr().err
    assert code == 0, err
    warning = "warning: rewards.png will not be written: matplotlib cannot be imported"
    assert warning in at_build[0]  # at start-up
    assert err.count("rewards.png") == 1 and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["plot"] is None
    assert not (out / "rewards.png").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1]
    assert any((out / "checkpoints").iterdir())
    assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors"))


@pytest.mark.parametrize("max_staleness", [None, 0], ids=["synchronous", "producer-thread"])
def test_a_mistake_found_while_sampling_is_one_line(max_staleness, inputs, capsys, monkeypatch):
    """A mistake the sampler finds (a stop id past the vocabulary) at the first rollout: one
    line and exit 2, also when the asynchronous producer thread finds it (`rollout
    producer: ` before the message) instead of an internal-error traceback."""
    monkeypatch.chdir(ROOT)
    argv = [
        *recipe_case("grpo", "typo", inputs)[0][:-1],
        *[p.format(**inputs) for p in RECIPES["grpo"].paths],
        "eval_data=null",
        "rollout.stop_token_ids=[99999]",
    ]
    if max_staleness is not None:
        argv.append(f"rollout.max_staleness={max_staleness}")
    code, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("data: ")]
    assert code == 2 and len(lines) == 1, err
    prefix = "postax grpo: " + ("" if max_staleness is None else "rollout producer: ")
    assert lines[0].startswith(prefix), lines[0]
    assert "stop_token_ids=(99999,) is invalid: ids must be < 320" in lines[0], lines[0]


def test_an_environment_that_raises_is_one_line(inputs, capsys, monkeypatch):
    """An environment raising at reset (here guess_number on prompts without its `secret`
    field) is one line naming the environment's error, exit 2; --debug adds the traceback."""
    monkeypatch.chdir(ROOT)
    argv = [
        *recipe_case("grpo", "typo", inputs)[0][:-1],
        *[p.format(**inputs) for p in RECIPES["grpo"].paths],
        "eval_data=null",
        "rewards=[]",
        "env=guess_number",
    ]
    code, err = run(argv, capsys)
    lines = [line for line in err.splitlines() if not line.startswith("data: ")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("postax grpo: "), lines[0]
    assert "reset() raised ConfigError" in lines[0] and "'secret'" in lines[0], lines[0]
    code, err = run([*argv, "--debug"], capsys)
    assert code == 2 and "Traceback" in err
