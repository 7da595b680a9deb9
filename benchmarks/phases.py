"""Helpers for benchmark phases that run in their own process; importable without jax.

A phase (postax, a torch loop, TRL, transformers) runs in a fresh subprocess
so that its peak RSS (VmHWM, see `common.peak_rss_bytes`) is its own. TRL
phases may run under another interpreter (`--trl-python`, a virtual
environment with trl, torch and transformers but neither jax nor postax), so
nothing here imports jax, and the torch / TRL code imports only what that
environment has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cores() -> int:
    """Usable CPU cores of this process (torch's thread count in every torch phase)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def peak_rss_mb() -> float:
    """VmHWM of this process in MiB (`common.peak_rss_bytes` without importing jax)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_phase(command: list[str], result: Path) -> dict:
    """Runs one phase in a fresh process (cwd the repository root); returns the JSON it wrote.

    The phase's output goes to this process's stdout/stderr as it comes.
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(command, cwd=ROOT, env=env)
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return json.loads(result.read_text())


def trl_python(path: str | None) -> str:
    """The interpreter of the TRL phases: --trl-python, or this one when it imports trl."""
    if path is None:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit(
                "trl is not installed here: pass --trl-python PATH, the python of a virtual "
                "environment with trl (see benchmarks/README.md)"
            ) from None
        return sys.executable
    if shutil.which(path) is None:
        raise SystemExit(f"--trl-python {path}: not an executable")
    return path


def word_vocabulary(vocab: int) -> dict[str, int]:
    """One token per word: "w<id>" is token <id> for 3 <= id < vocab."""
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    return words


def word_tokenizer(vocab: int, *, eos: bool):
    """A transformers fast tokenizer over `word_vocabulary`; with eos=False it names no eos token."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(word_vocabulary(vocab), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<eos>" if eos else None,
    )


def torch_causal_lm(checkpoint: Path):
    """transformers' model of a checkpoint directory, float32, torch threads = cores."""
    import torch
    import transformers

    torch.set_num_threads(cores())
    return transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--shape and --model (`common.ModelChoice`, `common.model_choice`)."""
    parser.add_argument(
        "--shape", help="random weights of this shape: bench (default), smollm2-135m"
    )
    parser.add_argument(
        "--model", metavar="DIR", help="a Hugging Face checkpoint directory instead of --shape"
    )


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--settings, --remat-policy, --logits-chunk (`common.TrainSettings`, `common.train_settings`)."""
    parser.add_argument(
        "--settings",
        help="postax training settings, comma-separated: default, memory (default: default "
        "for the bench model, default,memory for --shape smollm2-135m and --model)",
    )
    parser.add_argument("--remat-policy", default="full", help="of the memory settings")
    parser.add_argument(
        "--logits-chunk", type=int, default=128, help="positions per chunk in the memory settings"
    )
