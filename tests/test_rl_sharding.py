"""A GRPO run on 8 fake devices (data x tensor mesh) equals the single-device run.

Both runs go through `postax grpo` in subprocesses (the device count is fixed
when JAX starts). The sampler draws from the sharded policy, the frozen
reference is sharded like it, and the updates split the rows over the data
axis: the same seeds must give the same completions, rewards, losses and
held-out accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "arithmetic"
MODEL = (
    "{family: llama, vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_layers: 2, "
    "num_heads: 4, num_kv_heads: 2, head_dim: 8}"
)


def grpo_run(tmp_path: Path, name: str, devices: int, *overrides: str) -> list[dict]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"output_dir: {tmp_path / name}\n"
        f"tokenizer: {EXAMPLE / 'tokenizer'}\n"
        f"model: {{config: {MODEL}}}\n"
        f"data: {{path: {EXAMPLE / 'train.jsonl'}, batch_size: 4, limit: 32, fields: [answer]}}\n"
        f"eval_data: {{path: {EXAMPLE / 'eval.jsonl'}, batch_size: 1, limit: 8, shuffle: false, "
        "fields: [answer]}\n"
        "rewards: [{name: test_rl_sharding:digit_count, timeout: null}]\n"
        "iterations: 3\n"
        "rollout: {samples_per_prompt: 2, max_new_tokens: 8}\n"
        "policy: {kl_coef: 0.05, kl_estimator: k3}\n"
        # SGD: an update proportional to the gradient, so the float noise of 1 or 8 devices'
        # reduction orders stays noise (Adam's first steps move every entry by about
        # lr * sign(gradient), and the sign of an entry that is noise around 0 is arbitrary)
        "optimizer: {name: sgd, beta1: 0.0, learning_rate: 0.5, schedule: constant}\n"
        "run: {progress: false}\ncheckpoint: {save_every: 0}\nexport: false\n"
    )
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
        PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
    )
    done = subprocess.run(
        [sys.executable, "-m", "postax.cli", "grpo", "--config", str(config), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def digit_count(prompts, completions, **_):
    """Reward: digits in the completion, a tenth each."""
    del prompts
    return [0.1 * sum(ch.isdigit() for ch in c) for c in completions]


def test_grpo_on_eight_devices_equals_one_device(tmp_path):
    single = grpo_run(tmp_path, "one", 1)
    sharded = grpo_run(
        tmp_path, "eight", 8, "run.mesh.data=4", "run.mesh.fsdp=1", "run.mesh.tensor=2"
    )
    iterations = [(a, b) for a, b in zip(single, sharded, strict=True) if "reward" in a]
    assert len(iterations) == 3
    for a, b in iterations:
        assert b["reward"] == a["reward"]  # the same completions were sampled
        assert b["completion_length"] == a["completion_length"]
        for key in ("loss", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert iterations[-1][0]["kl"] > 0  # the policy moved away from the reference
    evaluations = [(a, b) for a, b in zip(single, sharded, strict=True) if "eval_reward" in a]
    assert len(evaluations) == 2  # before and after
    for a, b in evaluations:
        assert b["eval_reward"] == pytest.approx(a["eval_reward"], abs=1e-6)
