"""Device meshes and the mapping of logical axis names onto them.

A mesh has three axes: `data` (pure data parallelism: params replicated),
`fsdp` (data parallelism with params, gradients and optimizer state sharded,
Rajbhandari et al. 2020, "ZeRO") and `tensor` (Megatron-style model
parallelism, Shoeybi et al. 2019). Parameters name their dimensions
(vocab, embed, mlp, heads, kv_heads, head_dim); `LOGICAL_RULES` maps each
name to mesh axes. A dimension that a mesh axis does not divide evenly is
replicated instead, so any model runs on any mesh.

Multi-host: call `initialize_distributed()` (jax.distributed.initialize)
on every host before building the mesh; the mesh then spans all hosts'
devices and batches are assembled from per-host shards.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from postax.validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh={sizes!r} is invalid: positive sizes, at most one -1")

    def shape(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ConfigError(f"mesh {sizes} does not divide {device_count} devices")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise ConfigError(
                f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                f"{math.prod(sizes)} devices, found {device_count}"
            )
        return tuple(sizes)


def initialize_distributed(**kwargs) -> None:
    """Joins a multi-host run (a no-op on a single process)."""
    if jax.process_count() == 1 and not kwargs:
        return
    jax.distributed.initialize(**kwargs)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = cfg.shape(len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for logical `axes`, replicating dimensions a mesh axis does not divide."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(
            a for a in LOGICAL_RULES.get(name, ()) if a not in used and mesh.shape[a] > 1
        )
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    while spec and spec[-1] is None:  # P('x', None) and P('x') are the same placement
        spec.pop()
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding per variable of an nnx.State, from its logical axis names."""

    def sharding(variable):
        axes = variable.get_metadata().get("out_sharding") or (None,) * variable[...].ndim
        return NamedSharding(mesh, partition_spec(tuple(axes), variable[...].shape, mesh))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data and fsdp axes, the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Places every variable of `model` on `mesh` according to its logical axes, in place."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
