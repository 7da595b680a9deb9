"""Expert parallelism: a tiny all-sparse Qwen3-MoE training step (loss and every gradient)
on 8 fake CPU devices, mesh fsdp=2 x expert=4, equals the same step on one device; the
expert weights and the batch rows really are split over the expert axis. Plus the
`expert` mesh axis's configuration (sizes, errors, the batch split).

The device count is fixed when JAX starts, so the comparison runs in one subprocess: this
file run as a script (`python tests/test_moe_sharding.py --worker OUT`) computes both
layouts (one compile each) and writes the numbers the test compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from postax.parallel import LOGICAL_RULES, MESH_AXES, MeshConfig, partition_spec
from postax.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
EXPERTS, TOP_K = 8, 2
AUX_COEF, Z_COEF = 0.1, 0.01
SHARDED = dict(data=1, fsdp=2, expert=4, tensor=1)


def _experts_gate(tree):
    """The stacked experts' gate_proj array of a model or of its gradient state."""
    from flax import nnx

    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    (found,) = [
        v[...] for path, v in nnx.to_flat_state(state) if path[-2:] == ("experts", "gate_proj")
    ]
    return found


def _worker(out: Path) -> None:
    """Both layouts' loss and gradients (and the placements) into `out` (an .npz)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import postax
    from postax.models import moe
    from postax.models.stack import stack_layers
    from postax.parallel import batch_sharding, make_mesh, shard_model

    assert jax.device_count() == DEVICES, jax.devices()
    cfg = postax.ModelConfig(
        family="qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (8, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = mask[6, :5] = 0  # left padding: masked tokens leave the loss and the router terms

    def loss_fn(model, tokens, mask):
        out = model.intermediates(tokens, attention_mask=mask, router_logits=True)
        logp = jax.nn.log_softmax(model.logits(out.hidden)[:, :-1].astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        target = mask[:, 1:].astype(jnp.float32)
        ce = jnp.sum(nll * target) / jnp.sum(target)
        aux = moe.load_balancing_loss(out.router_logits, TOP_K, mask)
        z = moe.router_z_loss(out.router_logits, mask)
        return ce + AUX_COEF * aux + Z_COEF * z, out.router_logits

    step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
    results: dict[str, np.ndarray] = {}
    for name, mesh_cfg, devices in (
        ("one", MeshConfig(fsdp=1), jax.devices()[:1]),
        ("sharded", MeshConfig(**SHARDED), jax.devices()),
    ):
        model = postax.build_model(cfg, seed=0)
        # a router 20x the default init: decisive top-k choices (no near-ties that float
        # noise of another reduction order could flip)
        for layer in model.model.layers:
            layer.mlp.gate.weight[...] = layer.mlp.gate.weight[...] * 20
        assert stack_layers(model) == []  # the trainer's layout: the layers under lax.scan
        mesh = make_mesh(mesh_cfg, devices)
        shard_model(model, mesh)
        rows = batch_sharding(mesh)
        x, m = jax.device_put(tokens, rows), jax.device_put(mask, rows)
        (loss, router), grads = step(model, x, m)
        gate = _experts_gate(model)
        results[f"{name}/loss"] = np.asarray(loss)
        results[f"{name}/router"] = np.asarray(router)
        results[f"{name}/gate_spec"] = np.asarray(str(gate.sharding.spec))
        results[f"{name}/gate_shard"] = np.asarray(gate.addressable_shards[0].data.shape)
        results[f"{name}/tokens_shard"] = np.asarray(x.addressable_shards[0].data.shape)
        for path, g in nnx.to_flat_state(grads):
            results[f"{name}/grad/{'.'.join(map(str, path))}"] = np.asarray(g[...])
        grad_gate = _experts_gate(grads)
        results[f"{name}/gate_grad_spec"] = np.asarray(str(grad_gate.sharding.spec))

    # the GPU/TPU grouped product (`jax.lax.ragged_dot`) with its weights split over experts
    sizes = jnp.asarray([3, 0, 5, 2, 7, 1, 0, 6], jnp.int32)
    a = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(EXPERTS, 6, 5)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(24, 5)), jnp.float32)
    ragged = jax.jit(
        jax.value_and_grad(lambda a, w: jnp.sum(jax.lax.ragged_dot(a, w, sizes) * probe), (0, 1))
    )
    mesh = make_mesh(MeshConfig(**SHARDED))
    w_split = jax.device_put(
        w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    )
    for name, weights in (("one", w), ("sharded", w_split)):
        value, (da, dw) = ragged(a, weights)
        results[f"{name}/ragged"] = np.asarray(value)
        results[f"{name}/ragged_da"] = np.asarray(da)
        results[f"{name}/ragged_dw"] = np.asarray(dw)
    np.savez(out, **results)


def _relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("moe_sharding") / "results.npz"
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_expert_parallel_train_step_equals_one_device(layouts):
    grads = sorted(k.removeprefix("one/grad/") for k in layouts if k.startswith("one/grad/"))
    assert any("experts.gate_proj" in k for k in grads) and any("gate.weight" in k for k in grads)
    assert set(grads) == {
        k.removeprefix("sharded/grad/") for k in layouts if k.startswith("sharded/grad/")
    }
    one, sharded = float(layouts["one/loss"]), float(layouts["sharded/loss"])
    assert abs(sharded - one) <= 1e-5 * abs(one)
    assert _relative_error(layouts["sharded/router"], layouts["one/router"]) <= 1e-5
    for name in grads:
        ours, reference = layouts[f"sharded/grad/{name}"], layouts[f"one/grad/{name}"]
        assert np.abs(reference).max() > 0, name  # every parameter takes part in the loss
        assert _relative_error(ours, reference) <= 1e-5, name
    # no top-k choice was a near-tie that a different reduction order could flip
    probs = np.exp(layouts["one/router"] - layouts["one/router"].max(-1, keepdims=True))
    probs = np.sort(probs / probs.sum(-1, keepdims=True), axis=-1)
    assert (probs[..., -TOP_K] - probs[..., -TOP_K - 1]).min() > 1e-5  # float noise: ~1e-7


def test_experts_and_rows_split_over_the_expert_axis(layouts):
    # stacked layers: [layers, expert, embed, mlp] -> (None, expert, fsdp); 8 experts / 4
    assert str(layouts["sharded/gate_spec"]) == "P(None, 'expert', 'fsdp')"
    assert tuple(layouts["sharded/gate_shard"]) == (2, EXPERTS // 4, 32 // 2, 16)
    # (the gradient's placement is XLA's choice: it keeps fsdp but gathers the experts,
    # "P(None, None, 'fsdp')"; the trainer places the updated parameters back)
    assert "'fsdp'" in str(layouts["sharded/gate_grad_spec"])
    assert tuple(layouts["one/gate_shard"]) == (2, EXPERTS, 32, 16)
    # 8 rows over fsdp=2 x expert=4: one row per device
    assert tuple(layouts["sharded/tokens_shard"]) == (1, 12)


def test_ragged_dot_with_experts_split_equals_one_device(layouts):
    """The grouped product GPUs and TPUs run, partitioned by XLA over the expert axis."""
    assert abs(float(layouts["sharded/ragged"]) - float(layouts["one/ragged"])) <= 1e-5 * abs(
        float(layouts["one/ragged"])
    )
    for part in ("ragged_da", "ragged_dw"):
        assert _relative_error(layouts[f"sharded/{part}"], layouts[f"one/{part}"]) <= 1e-5


def test_mesh_config_expert_axis():
    assert MESH_AXES == ("data", "fsdp", "expert", "tensor")
    assert LOGICAL_RULES["expert"] == ("expert",)
    assert MeshConfig().shape(8) == (1, 8, 1, 1)  # the default: every device on fsdp
    assert MeshConfig(expert=4).shape(8) == (1, 2, 4, 1)
    assert MeshConfig(expert=4).batch_shards(8) == 8  # rows split over the expert axis too
    assert MeshConfig(fsdp=2, tensor=4).batch_shards(8) == 2
    with pytest.raises(ConfigError, match=r"mesh data=1 x fsdp=2 x expert=3 x tensor=1 needs 6"):
        MeshConfig(fsdp=2, expert=3).shape(8)
    # expert=1 is left out of messages: they read as before the axis existed
    with pytest.raises(ConfigError, match=r"^mesh data=1 x fsdp=7 x tensor=1 needs 7 devices"):
        MeshConfig(fsdp=7).shape(8)
    with pytest.raises(
        ConfigError, match=r"fsdp=-1 x expert=-1 x tensor=1 is invalid: positive sizes, at most one"
    ):
        MeshConfig(expert=-1)
    with pytest.raises(ConfigError, match=r"expert=0 x tensor=1 is invalid"):
        MeshConfig(expert=0)


def test_partition_spec_of_expert_weights():
    import jax

    mesh = jax.sharding.AbstractMesh((1, 2, 4, 1), MESH_AXES)
    spec = partition_spec(("expert", "embed", "mlp"), (8, 32, 16), mesh)
    assert spec == jax.sharding.PartitionSpec("expert", "fsdp")
    # 6 experts do not split over 4 devices: replicated, the rest still split
    spec = partition_spec(("expert", "embed", "mlp"), (6, 32, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    # activations' batch rows split over data x fsdp x expert
    spec = partition_spec(("batch", None), (8, 5), mesh)
    assert spec == jax.sharding.PartitionSpec(("fsdp", "expert"))


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        raise SystemExit("usage: test_moe_sharding.py --worker OUT.npz")
    _worker(Path(sys.argv[2]))
