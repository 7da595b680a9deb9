"""The `postax` command: `postax <command> [arguments] [--debug]`.

Each command lives in its own module and is imported only when it runs, so
`postax generate` never imports the trainer and vice versa.

Errors are handled here, once, for every command. A user's mistake (a config
key or value, a YAML file, a data file or record, a checkpoint or tokenizer
directory, a path: the `USER_ERRORS` classes and file-system errors) prints
one line, `postax <command>: <message>`, to stderr and exits 2; the message
names the file, line or field and what is allowed. Anything else is a bug of
postax: its traceback is printed and the exit status is 1. `--debug`,
anywhere on the command line, prints the traceback for user errors as well
(the exit status stays the same). Ctrl-C prints `postax <command>: interrupted`
and exits 130. Command modules raise; they do not print their own errors.
argparse's own errors (a usage line, exit 2) pass through.

In a multi-process run (`postax.parallel.join`) every message says which process it comes
from (`postax sft: process 1 of 2: ...`). A process that fails by itself (any error above,
Ctrl-C) ends at once, without JAX's shutdown barrier, so the others fail at their next
collective rather than wait for it. A collective that failed because another process ended
reads as such (no traceback without `--debug`); this process then leaves through JAX's
shutdown barrier, which names the process that stopped (`Task 1 heartbeat timeout`) and
aborts within `distributed.heartbeat_timeout` seconds.
"""

from __future__ import annotations

import importlib
import re
import sys
import traceback

import jax
from jax.errors import JaxRuntimeError

from postax.configs import ConfigFileError
from postax.data.sources import DataError
from postax.host_memory import release_freed_buffers
from postax.launch import UsageError
from postax.models.safetensors_io import CheckpointError
from postax.parallel import DistributedError, exit_without_shutdown, process_count
from postax.rl.asynchronous import RolloutProducerError
from postax.rl.envs.protocol import EpisodeError
from postax.sampling.config import SamplingError
from postax.tokenizer.jinja_env import ChatTemplateError
from postax.validation import ConfigError

COMMANDS = {
    "generate": ("postax.sampling.cli", "Generate text from a Hugging Face checkpoint directory."),
    "sft": ("postax.recipes.sft", "Supervised fine-tuning (full, LoRA, QLoRA) from a YAML config."),
    "preference": (
        "postax.recipes.preference",
        "Preference tuning: DPO (sigmoid, IPO, hinge, robust), ORPO, SimPO, KTO (`loss:`).",
    ),
    "reward-model": (
        "postax.recipes.reward_model",
        "Train a reward model (Bradley-Terry) on preference pairs.",
    ),
    "grpo": (
        "postax.recipes.grpo",
        "RL with group advantages: GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++.",
    ),
    "ppo": ("postax.recipes.ppo", "PPO with a value head or a separate critic, GAE, KL penalty."),
    "distill": (
        "postax.recipes.distill",
        "Knowledge distillation (logits, attention, features, GKD).",
    ),
    "convert": (
        "postax.models.gguf_convert_cli",
        "Convert a GGUF file to a Hugging Face checkpoint directory.",
    ),
    "export-gguf": (
        "postax.models.gguf_export_cli",
        "Write a checkpoint as a GGUF file (f32, f16, bf16, q8_0) for llama.cpp.",
    ),
    "launch": (
        "postax.launch",
        "Run a command as N local processes of one multi-process run (-n N -- command).",
    ),
}


def usage() -> str:
    lines = ["usage: postax <command> [arguments] [--debug]", "", "commands:"]
    lines += [f"  {name:<14}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", f"{DEBUG_FLAG}: print the traceback of any error (for bug reports)"]
    return "\n".join(lines)


# Errors a user's input causes; each message names the file/line/field and what is allowed.
# (RecordError and PreferenceRecordError are DataErrors.)
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    ConfigFileError,
    CheckpointError,
    DataError,
    ChatTemplateError,
    SamplingError,
    # an environment that raised or returned something malformed (the message names it, the
    # episode and the turn; --debug shows the environment's own traceback)
    EpisodeError,
    # a multi-process run that did not form (the message names the process and the setting)
    DistributedError,
    # `postax launch`'s own command line
    UsageError,
    # a path the user gave that is missing, a directory (or not one), or not readable/writable
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
# Optional packages (pyproject extras) a command may need -> the extra that installs them.
# A command that needs a missing one is the user's to install, not a bug.
OPTIONAL_PACKAGES = {
    "matplotlib": "postax[plot]",
    "tensorboardX": "postax[tensorboard]",
    "wandb": "wandb",
    "gguf": "postax[gguf]",
}
DEBUG_FLAG = "--debug"
# how a collective (gloo on CPU, the coordination service) reports that another process ended
PEER_FAILURE = re.compile(
    r"Gloo|connection (closed|reset)|coordination service|heartbeat|unhealthy", re.IGNORECASE
)


def missing_optional_package(error: BaseException) -> str | None:
    """The optional package whose absence an ImportError (or the error it was raised from)
    reports, else None."""
    for cause in (error, error.__cause__):
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            package = cause.name.partition(".")[0]
            if package in OPTIONAL_PACKAGES:
                return package
    return None


def user_message(error: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None for an internal error. A user's
    mistake found in the rollout producer thread (`RolloutProducerError`, raised from it)
    reads as in a synchronous run, prefixed `rollout producer: `."""
    if isinstance(error, RolloutProducerError) and error.__cause__ is not None:
        cause = user_message(error.__cause__)
        return None if cause is None else f"rollout producer: {cause}"
    if isinstance(error, USER_ERRORS):
        return one_line(error)
    package = missing_optional_package(error)
    if package is None:
        return None
    message = one_line(error)
    if "pip install" not in message:
        message += f"; install it: pip install '{OPTIONAL_PACKAGES[package]}'"
    return message


def one_line(error: BaseException) -> str:
    """The error's message on one line: its lines, stripped, joined by a space. A file-system
    error reads `<path>: <reason>`; an error without a message is named by its class."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"postax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    release_freed_buffers()  # before models and data are loaded (postax.host_memory)
    try:
        module = importlib.import_module(COMMANDS[command][0])
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C: not an error (a recipe run resumes from its checkpoint)
        if debug:
            traceback.print_exc()
        print(f"postax {command}: {where()}interrupted", file=sys.stderr)
        return failed(130)
    except Exception as error:
        message = user_message(error)
        if message is not None and not debug:
            print(f"postax {command}: {where()}{message}", file=sys.stderr)
            return failed(2)
        if message is None and not debug and (peer := peer_failure(error)) is not None:
            print(f"postax {command}: {where()}{peer}", file=sys.stderr)
            return 1  # JAX's shutdown barrier then names the process that stopped
        traceback.print_exc()
        if message is None:  # a bug of postax, not of the input
            print(f"postax {command}: {where()}internal error (traceback above)", file=sys.stderr)
            return failed(1)
        return failed(2)


def where() -> str:
    """`process I of N: ` in a multi-process run (each process prints its own errors), else
    nothing."""
    count = process_count()
    return f"process {jax.process_index()} of {count}: " if count > 1 else ""


def peer_failure(error: BaseException) -> str | None:
    """The one-line message of a collective that failed in a multi-process run because another
    process ended (gloo reports the closed connection; the coordination service a missing
    task), else None."""
    if process_count() < 2 or not isinstance(error, JaxRuntimeError):
        return None
    if not PEER_FAILURE.search(str(error)):
        return None  # this process's own runtime error (out of memory, ...): a traceback
    return (
        "a collective with the other processes failed: another process has probably failed or "
        f"died ({one_line(error)}); JAX names the process that stopped once its heartbeats are "
        "missed for distributed.heartbeat_timeout seconds, then ends this one"
    )


def failed(status: int) -> int:
    """`status`; in a multi-process run the process ends here, without JAX's shutdown barrier
    (`postax.parallel.exit_without_shutdown`), so the others are not kept waiting for it."""
    exit_without_shutdown(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
