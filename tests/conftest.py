"""Shared fixtures: tiny Hugging Face checkpoints written once per test session."""

from __future__ import annotations

import os

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
