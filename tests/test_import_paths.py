"""Public names keep their import paths when modules split into packages."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "postax.sampling.sampler": (
        "Sampler",
        "SamplingConfig",
        "Completion",
        "SamplingError",
        "FINISH_REASONS",
        "RowParams",
        "DecodeState",
    ),
    "postax.tokenizer": (
        "Tokenizer",
        "ChatEncoding",
        "ChatTemplateError",
        "load_tokenizer",
        "TEMPLATE_DIR",
    ),
    "postax.tokenizer_build": ("build_tokenizer",),
    "postax.recipes.rl_common": ("RolloutConfig", "UpdateConfig", "EvalConfig", "RunSettings"),
    "postax.recipes.sft": ("SFTConfig", "SFTAlgorithm", "export", "run", "main"),
    "postax.recipes.grpo": ("GRPOConfig", "PolicyGradientAlgorithm", "run", "main"),
    "postax.recipes.ppo": ("PPOConfig", "PPOAlgorithm", "run", "main"),
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import_from_their_old_paths(module):
    loaded = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(loaded, name)]
    assert not missing, f"{module} lacks {missing}"
