"""A tiny Qwen3-MoE through the preference (DPO), distillation, GRPO and PPO recipes, with the
router terms of the `router:` section in their losses (`postax.recipes.router_terms`).

Each recipe runs twice from the same initial weights and data: once with router coefficients
0 and once with aux 0.1, z 0.01. The first step's loss is computed before any update, so the
two first losses differ by exactly 0.1 * moe_aux_loss + 0.01 * moe_z_loss (the logged terms,
equal in both runs): the terms enter the loss with the weights the config gives. (GRPO, PPO: the
first iteration samples the same completions from the same initial policy; its one update
step's loss is computed before the update.) DPO then trains on (the loss falls over the run,
the router terms are logged every step) and exports a checkpoint that loads back as the same
MoE.
"""

from __future__ import annotations

import json

import pytest

import postax
from postax.data import DataConfig
from postax.data.preference import PreferenceDataConfig
from postax.losses.distill import DistillLossConfig
from postax.losses.router import RouterLossConfig
from postax.recipes import distill, preference
from postax.recipes.common import ModelSource
from postax.tokenizer import build_tokenizer
from postax.train.optim import OptimizerConfig
from postax.train.trainer import TrainerConfig

MOE = dict(
    family="qwen3_moe",
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    qk_norm=True,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    norm_topk_prob=True,
)
ON = RouterLossConfig(aux_loss_coef=0.1, z_loss_coef=0.01)
OFF = RouterLossConfig()
ITEMS = ["apple", "river", "chair", "cloud", "stone", "train", "lamp", "garden"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_recipes")
    pairs = [
        {
            "prompt": f"Tell me about the {i}.",
            "chosen": f" The {i} is good.",
            "rejected": f" The {i} is bad.",
        }
        for i in ITEMS
    ]
    texts = [r[k] for r in pairs for k in r]
    build_tokenizer(texts * 4, root / "tokenizer", vocab_size=300)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def metrics(output_dir) -> list[dict]:
    """The training steps' rows of metrics.jsonl (not the data statistics of step 0)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def first_losses_differ_by_the_router_terms(off: list[dict], on: list[dict]) -> None:
    for run in (off, on):
        assert {"moe_aux_loss", "moe_z_loss", "moe_load_max_over_mean/layer1"} <= run[0].keys()
    assert on[0]["moe_aux_loss"] == pytest.approx(off[0]["moe_aux_loss"], rel=1e-6)
    assert on[0]["moe_aux_loss"] > 2.0  # top-2 of 8: at least k, the balanced value
    terms = 0.1 * on[0]["moe_aux_loss"] + 0.01 * on[0]["moe_z_loss"]
    assert on[0]["loss"] - off[0]["loss"] == pytest.approx(terms, rel=1e-4)


def test_dpo_on_a_mixture_of_experts_adds_the_router_terms_and_trains(files):
    def run(name: str, router: RouterLossConfig, steps: int) -> list[dict]:
        cfg = preference.PreferenceConfig(
            output_dir=str(files / name),
            tokenizer=str(files / "tokenizer"),
            model=ModelSource(config=postax.ModelConfig(**MOE), seed=1),
            data=PreferenceDataConfig(path=str(files / "pairs.jsonl"), seq_len=24, batch_size=4),
            trainer=TrainerConfig(steps=steps, log_every=1, progress=False),
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"),
            router=router,
            export=name == "on",
        )
        preference.run(cfg)
        return metrics(files / name)

    off, on = run("off", OFF, 1), run("on", ON, 8)
    first_losses_differ_by_the_router_terms(off, on)
    assert len(on) == 8 and all("moe_aux_loss" in row for row in on)
    assert sum(r["loss"] for r in on[-3:]) < sum(r["loss"] for r in on[:3])
    exported = postax.load_model(files / "on" / "final")
    assert exported.config.num_experts == 8 and exported.config.family == "qwen3_moe"


def test_distillation_into_a_mixture_of_experts_adds_the_router_terms(files):
    def run(name: str, router: RouterLossConfig) -> list[dict]:
        teacher = dict(MOE, family="qwen3", num_experts=0, num_experts_per_tok=0)
        cfg = distill.DistillConfig(
            output_dir=str(files / name),
            tokenizer=str(files / "tokenizer"),
            model=ModelSource(config=postax.ModelConfig(**MOE), seed=1),
            teacher=ModelSource(config=postax.ModelConfig(**teacher), seed=2),
            data=DataConfig(path=str(files / "text.jsonl"), seq_len=16, batch_size=4),
            loss=DistillLossConfig(hard_label_weight=0.1),
            trainer=TrainerConfig(steps=1, log_every=1, progress=False),
            router=router,
            export=False,
        )
        distill.run(cfg)
        return metrics(files / name)

    first_losses_differ_by_the_router_terms(run("distill-off", OFF), run("distill-on", ON))


def digit_fraction(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_rl_on_a_mixture_of_experts_adds_the_router_terms(files, recipe):
    from postax.losses.policy import PolicyLossConfig
    from postax.recipes import grpo, ppo
    from postax.recipes.common import CheckpointSettings
    from postax.recipes.rl_common.config import RunSettings, UpdateConfig
    from postax.rl.producer import RolloutConfig
    from postax.rl.prompts import PromptDataConfig
    from postax.rl.rewards import RewardConfig

    prompts = [{"prompt": f"Tell me about the {i}."} for i in ITEMS]
    (files / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    module, config_class = {"grpo": (grpo, grpo.GRPOConfig), "ppo": (ppo, ppo.PPOConfig)}[recipe]

    def run(name: str, router: RouterLossConfig) -> list[dict]:
        cfg = config_class(
            output_dir=str(files / name),
            tokenizer=str(files / "tokenizer"),
            model=ModelSource(config=postax.ModelConfig(**MOE), seed=1),
            data=PromptDataConfig(path=str(files / "prompts.jsonl"), batch_size=2),
            rewards=(RewardConfig(name=f"{__name__}:digit_fraction", timeout=None),),
            iterations=1,
            rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=6, temperature=1.0),
            policy=PolicyLossConfig(kl_coef=0.0),
            update=UpdateConfig(epochs=1, minibatches=1),  # the one step's loss: before it
            checkpoint=CheckpointSettings(save_every=0),
            run=RunSettings(progress=False),
            router=router,
            export=False,
        )
        module.run(cfg)
        return metrics(files / name)

    off, on = run(f"{recipe}-off", OFF), run(f"{recipe}-on", ON)
    first_losses_differ_by_the_router_terms(off, on)


def test_reward_model_on_a_mixture_of_experts_adds_the_router_terms(files):
    from postax.recipes import reward_model

    def run(name: str, router: RouterLossConfig) -> list[dict]:
        cfg = reward_model.RewardModelConfig(
            output_dir=str(files / name),
            tokenizer=str(files / "tokenizer"),
            model=ModelSource(config=postax.ModelConfig(**MOE), seed=1),
            data=PreferenceDataConfig(path=str(files / "pairs.jsonl"), seq_len=24, batch_size=4),
            trainer=TrainerConfig(steps=1, log_every=1, progress=False),
            router=router,
            export=name == "rm-on",
        )
        reward_model.run(cfg)
        return metrics(files / name)

    first_losses_differ_by_the_router_terms(run("rm-off", OFF), run("rm-on", ON))
    # the export is a Qwen3MoeForSequenceClassification transformers loads whole, same rewards
    import numpy as np
    import torch
    import transformers

    from postax.models.reward import load_reward_model

    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        files / "rm-on" / "final", output_loading_info=True
    )
    assert type(loaded).__name__ == "Qwen3MoeForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = np.random.RandomState(0).randint(1, 300, (2, 10))
    ours = np.asarray(load_reward_model(files / "rm-on" / "final")(tokens))
    with torch.no_grad():
        theirs = loaded.eval()(torch.as_tensor(tokens)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
