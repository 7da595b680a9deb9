"""Mixture of experts and the Qwen3-MoE family: parity with transformers' Qwen3MoeForCausalLM
(logits, router logits, auxiliary loss, greedy generation, checkpoints both ways), the
grouped dispatch against the dense reference (values and gradients), the auxiliary losses
against numpy, LoRA on attention."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import postax
from hf_fixtures import VOCAB, randomize, relative_error
from postax.models import moe
from postax.models.hf import model_tensors, param_name
from postax.models.lora import LoRAConfig, apply_lora
from postax.models.stack import stack_layers
from postax.sampling import Sampler

EXPERTS, TOP_K = 8, 2
EOS = 2
# all layers sparse (scannable) / a dense layer between sparse ones, unnormalised top-k
CONFIGS = {
    "sparse": dict(num_hidden_layers=2, norm_topk_prob=True, mlp_only_layers=[]),
    "mixed": dict(num_hidden_layers=3, norm_topk_prob=False, mlp_only_layers=[1]),
}
TOKENS = np.random.default_rng(0).integers(3, VOCAB, (2, 9))
MASK = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])


def make_hf(kind: str) -> transformers.PreTrainedModel:
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
        **CONFIGS[kind],
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize(model, 0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (transformers model, its save_pretrained directory)."""
    out = {}
    for kind in CONFIGS:
        hf = make_hf(kind)
        path = tmp_path_factory.mktemp(f"qwen3_moe_{kind}")
        hf.save_pretrained(path)
        out[kind] = (hf, path)
    return out


def hf_outputs(hf, tokens, mask):
    with torch.no_grad():
        out = hf(
            torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            output_router_logits=True,
        )
    routers = np.stack([r.numpy() for r in out.router_logits])
    return out.logits.numpy(), routers.reshape(len(routers), *tokens.shape, -1), float(out.aux_loss)


_intermediates = nnx.jit(
    lambda model, tokens, mask: model.intermediates(tokens, attention_mask=mask, router_logits=True)
)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_router_logits_and_aux_loss_match_transformers(kind, checkpoints):
    hf, path = checkpoints[kind]
    model = postax.load_model(path)
    assert model.config.mlp_types == (() if kind == "sparse" else ("sparse", "dense", "sparse"))
    logits, routers, aux = hf_outputs(hf, TOKENS, MASK)
    if kind == "sparse":
        assert stack_layers(model) == []  # all-sparse layers scan
    else:
        assert stack_layers(model) == [
            "layer 1 differs from layer 0 in structure or static attributes"
        ]
    out = _intermediates(model, jnp.asarray(TOKENS), jnp.asarray(MASK))
    ours = np.asarray(model.logits(out.hidden))
    real = MASK.astype(bool)
    assert relative_error(ours[real], logits[real]) <= 1e-4
    assert relative_error(out.router_logits, routers) <= 1e-4
    ours_aux = moe.load_balancing_loss(out.router_logits, TOP_K, jnp.asarray(MASK))
    assert abs(float(ours_aux) - aux) <= 1e-5 * abs(aux)


def test_postax_checkpoint_loads_in_transformers(checkpoints, tmp_path):
    hf, path = checkpoints["mixed"]
    model = postax.load_model(path)
    postax.save_model(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["mlp_only_layers"] == [1] and hf_config["num_experts"] == EXPERTS
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    logits, _, _ = hf_outputs(hf, TOKENS, MASK)
    again, _, _ = hf_outputs(back.eval(), TOKENS, MASK)
    assert relative_error(again, logits) <= 1e-6  # the same float32 weights


def test_fused_expert_tensors_load(checkpoints, tmp_path):
    """transformers 5's in-memory layout (gate_up_proj, down_proj [experts, hidden, mlp])."""
    hf, path = checkpoints["sparse"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    fused, per_expert = postax.load_model(tmp_path), postax.load_model(path)
    a, b = model_tensors(fused), model_tensors(per_expert)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    del state["model.layers.1.mlp.experts.down_proj"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(postax.CheckpointError, match=r"experts\.0\.down_proj\.weight"):
        postax.load_model(tmp_path)


def test_expert_weights_have_logical_axes(checkpoints):
    model = postax.abstract_model(postax.load_model(checkpoints["sparse"][1]).config)
    axes = {
        param_name(p): v.get_metadata().get("out_sharding")
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert axes["model.layers.0.mlp.experts.gate_proj"] == ("expert", "embed", "mlp")
    assert axes["model.layers.0.mlp.experts.down_proj"] == ("expert", "mlp", "embed")
    assert axes["model.layers.0.mlp.gate.weight"] == (None, "embed")


def test_greedy_generation_matches_transformers(checkpoints):
    hf, path = checkpoints["sparse"]
    model = postax.load_model(path)
    stack_layers(model)
    prompts = [[5, 17, 33, 9, 61], [44, 3, 90, 12, 7, 71, 25], [80, 14, 6]]
    out = Sampler(model).generate(prompts, max_new_tokens=6, temperature=0, stop_token_ids=[EOS])
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=0,
            eos_token_id=EOS,
        )
    for completion, expected in zip(out, ref[:, width:].tolist(), strict=True):
        expected = expected[: expected.index(EOS) + 1] if EOS in expected else expected
        assert list(completion.token_ids) == expected


def _loss(model, tokens):
    out = model.intermediates(tokens, router_logits=True)
    logp = jax.nn.log_softmax(model.logits(out.hidden)[:, :-1], axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    aux = moe.load_balancing_loss(out.router_logits, TOP_K)
    return nll + 0.1 * aux + 0.01 * moe.router_z_loss(out.router_logits)


def _layer_objective(mlp, x, probe):
    y, logits = mlp(x)
    aux = moe.load_balancing_loss(logits[None], TOP_K) + moe.router_z_loss(logits[None])
    return jnp.sum(y * probe) + 0.1 * aux, y


_layer_value_and_grad = nnx.jit(nnx.value_and_grad(_layer_objective, argnums=(0, 1), has_aux=True))


def test_grouped_dispatch_equals_dense_values_and_gradients(checkpoints):
    """One sparse layer of the checkpoint: output, router terms and every gradient (router,
    experts, input) agree between the sorted grouped dispatch and all experts densely."""
    mlp = postax.load_model(checkpoints["sparse"][1]).model.layers[0].mlp
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(4, 16, 32)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        (_, grouped), (grouped_params, grouped_x) = _layer_value_and_grad(mlp, x, probe)
        moe.set_dispatch(mlp, "dense")
        (_, dense), (dense_params, dense_x) = _layer_value_and_grad(mlp, x, probe)
    assert relative_error(grouped, dense) <= 1e-6
    assert relative_error(grouped_x, dense_x) <= 1e-5
    flat_dense = dict(nnx.to_flat_state(dense_params))
    assert len(flat_dense) == 4  # router, gate, up, down
    for path, g in nnx.to_flat_state(grouped_params):
        assert relative_error(g[...], flat_dense[path][...]) <= 1e-5, path


@pytest.mark.parametrize(
    "sizes",
    [(5, 0, 3, 9, 0, 1, 2, 4), (0, 0, 24, 0, 0, 0, 0, 0), (100, 0, 150, 50)],
    ids=["gathered weights", "one group", "one-hot weights"],
)
def test_blocked_grouped_matmul_equals_ragged_dot(sizes):
    rng = np.random.default_rng(2)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.normal(size=(sum(sizes), 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), 6, 5)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(sum(sizes), 5)), jnp.float32)

    def loss(f, x, w):
        return jnp.sum(f(x, w, group_sizes) * probe)

    blocked = jax.jit(
        jax.value_and_grad(lambda x, w: loss(moe._blocked_grouped_matmul, x, w), (0, 1))
    )
    ragged = jax.jit(jax.value_and_grad(lambda x, w: loss(jax.lax.ragged_dot, x, w), (0, 1)))
    with jax.default_matmul_precision("highest"):
        (a, (ax, aw)), (b, (bx, bw)) = blocked(x, w), ragged(x, w)
    assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b))
    assert relative_error(ax, bx) <= 1e-5 and relative_error(aw, bw) <= 1e-5


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_route_normalises_the_top_k():
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.5]], np.float32)
    probs = _softmax(logits.astype(np.float64))
    for normalize in (False, True):
        weights, experts = moe.route(jnp.asarray(logits), 2, normalize)
        np.testing.assert_array_equal(np.asarray(experts), [[1, 2], [0, 3]])
        want = np.take_along_axis(probs, np.array([[1, 2], [0, 3]]), axis=-1)
        if normalize:
            want = want / want.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-6)


@jax.jit
def _router_terms(logits, mask):
    return (
        moe.load_balancing_loss(logits, TOP_K, mask),
        moe.router_z_loss(logits, mask),
        moe.expert_load(logits, TOP_K, mask),
    )


def test_auxiliary_losses_and_load_against_numpy():
    rng = np.random.default_rng(3)
    layers, batch, seq = 3, 2, 5
    logits = rng.normal(size=(layers, batch, seq, EXPERTS)).astype(np.float32) * 2
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    x = logits.reshape(layers, -1, EXPERTS).astype(np.float64)
    m = mask.reshape(-1)
    probs = _softmax(x)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[..., :TOP_K]
    counts = np.zeros_like(probs)
    for l_ in range(layers):
        for t in range(x.shape[1]):
            counts[l_, t, chosen[l_, t]] = 1.0
    rows = layers * m.sum()
    f = (counts * m[None, :, None]).sum((0, 1)) / rows
    p = (probs * m[None, :, None]).sum((0, 1)) / rows
    want_aux = EXPERTS * np.sum(f * p)
    lse = np.log(np.exp(x).sum(-1))
    want_z = (lse**2 * m).sum() / rows
    share = (counts * m[None, :, None]).sum(1) / (TOP_K * m.sum())
    aux, z, load = _router_terms(jnp.asarray(logits), jnp.asarray(mask))
    np.testing.assert_allclose(float(aux), want_aux, rtol=1e-5)
    np.testing.assert_allclose(float(z), want_z, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(load["fraction"]), share, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(load["max_over_mean"]), EXPERTS * share.max(-1), rtol=1e-6
    )
    # balanced routing gives k: uniform probabilities, every expert chosen equally often
    uniform = np.zeros((1, EXPERTS, EXPERTS), np.float32)
    uniform[0] = np.eye(EXPERTS) * 1e-3  # each token prefers a different expert
    balanced = _router_terms(jnp.asarray(uniform), jnp.ones(EXPERTS))[0]
    assert abs(float(balanced) - TOP_K) < 1e-2


def test_lora_on_attention_trains_only_the_adapters(checkpoints):
    model = postax.load_model(checkpoints["sparse"][1])
    apply_lora(
        model, LoRAConfig(targets=("q_proj", "k_proj", "v_proj", "o_proj")), rngs=nnx.Rngs(0)
    )
    stack_layers(model)  # the trainer's layout: router logits and gradients through the scan
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
            model, tokens
        )
        optimizer.update(model, grads)
        return loss

    assert np.isfinite(float(step(model, optimizer, jnp.asarray(TOKENS))))
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora_b = [p for p in before if p[-1] == "lora_b"]
    assert len(lora_b) == 4 and all(np.abs(after[p][...]).max() > 0 for p in lora_b)
    for p, value in before.items():
        if not isinstance(after[p], nnx.LoRAParam):
            np.testing.assert_array_equal(np.asarray(after[p][...]), value, err_msg=str(p))
