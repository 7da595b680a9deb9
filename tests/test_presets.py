"""Full-size presets build abstractly and have the published parameter counts."""

from __future__ import annotations

import dataclasses

import jax
import pytest
import torch
import transformers
from flax import nnx

import postax
from postax.models.hf import config_to_hf

# Published sizes in billions, to the digits the model cards give (Gemma-3-4B:
# its language model; the 4.3B release adds a vision encoder: Gemma-3-4B-Vision).
PUBLISHED_BILLIONS = {
    "Llama-3-8B": "8.03",
    "Llama-3.1-8B": "8.03",
    "Llama-3.2-1B": "1.24",
    "Llama-3.2-3B": "3.21",
    "Qwen2.5-0.5B": "0.49",
    "Qwen2.5-1.5B": "1.54",
    "Qwen2.5-7B": "7.61",
    "Qwen3-0.6B": "0.6",
    "Qwen3-1.7B": "1.7",
    "Qwen3-8B": "8.2",
    "Qwen3-30B-A3B": "30.5",
    "Qwen3-235B-A22B": "235",
    "Gemma-2B": "2.51",
    "Gemma-2-2B": "2.61",
    "Gemma-2-9B": "9.24",
    "Gemma-3-1B": "1.0",
    "Gemma-3-4B": "3.88",
    "Gemma-3-4B-Vision": "4.3",
    "Gemma-3-12B-Vision": "12.2",
    "Gemma-3-27B-Vision": "27.4",
}


# Building these (transformers' model on the meta device: tens of thousands of expert modules,
# ~20-40 s; postax's abstract model, ~10 s) is slow: their layers are identical, so the count is
# that of one layer and two layers extended to the full depth, checked against the published
# one above; the family's code is checked against transformers at a smaller size (30B-A3B).
CHECKED_BY_A_SMALLER_SIZE = {"Qwen3-235B-A22B"}


def abstract_count(cfg) -> int:
    model = postax.abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    return sum(leaf.size for leaf in leaves)


def test_every_preset_has_a_published_count():
    assert set(PUBLISHED_BILLIONS) == set(postax.PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED_BILLIONS))
def test_preset_parameter_count(name):
    cfg = postax.preset(name)
    if name in CHECKED_BY_A_SMALLER_SIZE:  # identical layers: the count is linear in depth
        one, two = (
            abstract_count(
                dataclasses.replace(
                    cfg,
                    num_layers=n,
                    layer_types=cfg.layer_types and cfg.layer_types[:n],
                    mlp_types=cfg.mlp_types and cfg.mlp_types[:n],
                )
            )
            for n in (1, 2)
        )
        count = one + (cfg.num_layers - 1) * (two - one)
    else:
        count = abstract_count(cfg)
    published = PUBLISHED_BILLIONS[name]
    digits = len(published.partition(".")[2])
    assert abs(count / 1e9 - float(published)) <= 10.0**-digits, count
    if name in CHECKED_BY_A_SMALLER_SIZE:
        return
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert count == sum(p.numel() for p in reference.parameters())


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        postax.ConfigError, match=r"preset='Llama-9' is unknown; available: Llama-3-8B"
    ):
        postax.preset("Llama-9")
