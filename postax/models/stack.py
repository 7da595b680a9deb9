"""Decoder layers stored as one stack and run with `jax.lax.scan`.

A model loaded from a checkpoint holds its layers as a list (`model.layers.0`,
`model.layers.1`, ...): the Hugging Face layout, which LoRA surgery,
quantisation and checkpoint I/O address by name. Traced as a Python loop,
every layer is a separate copy of the same program: compile time grows with
depth (about 1 s per layer of a SmolLM2-sized training step on a CPU core),
and XLA is free to schedule the layers' rematerialised forward passes
early, keeping many layers' activations alive at once.

`LayerStack` holds the same layers as one module whose every Variable has a
leading `[num_layers]` axis (sharding axis name `"layers"`, never split).
The full pass, the KV-cache decode and the backward pass are each one
`lax.scan` over that axis: one layer is compiled, and the backward pass
walks the layers one at a time (with `remat`, only each layer's input is
kept; see `REMAT_POLICIES`).

Stacking needs identical layers (the same module structure and static
attributes: window, rope, LoRA targets). Families whose layers alternate
(Gemma 2 and 3: sliding and global attention) keep the list; `stack_layers`
reports why it left a decoder alone.

Conversion is in place and cheap to reverse: `stack_layers(model)` after
loading and LoRA/quantisation surgery (the trainer does it when
`trainer.scan_layers` is set), `unstack_layers(model)` before anything that
addresses layers by index. Checkpoint writers (`save_model`, adapters, merges)
unstack a shallow copy themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from postax.validation import ConfigError

LAYER_AXIS = "layers"

# What a rematerialised layer keeps for its backward pass (jax.checkpoint policies).
REMAT_POLICIES: dict[str, Callable | None] = {
    # only the layer's input: every activation is recomputed (least memory)
    "full": None,
    # also the outputs of matrix multiplies without batch dimensions (the projections and
    # the MLP): attention scores and elementwise work are recomputed
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _with_layer_axis(variable: nnx.Variable, value: jax.Array) -> nnx.Variable:
    axes = variable.get_metadata().get("out_sharding")
    metadata = {"out_sharding": (LAYER_AXIS, *axes)} if axes else {}
    return variable.replace(value, **metadata)


def _without_layer_axis(variable: nnx.Variable, value: jax.Array) -> nnx.Variable:
    axes = variable.get_metadata().get("out_sharding")
    metadata = {"out_sharding": tuple(axes[1:])} if axes else {}
    return variable.replace(value, **metadata)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def stack_problem(layers: Sequence[nnx.Module]) -> str | None:
    """Why `layers` cannot form a LayerStack (None when they can)."""
    if len(layers) < 2:
        return "fewer than two layers"
    first = nnx.graphdef(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if nnx.graphdef(layer) != first:
            return f"layer {i} differs from layer 0 in structure or static attributes"
    return None


class LayerStack(nnx.Module):
    """`len(layers)` structurally identical layers as one module (`self.layer`) whose
    Variables carry a leading layer axis."""

    def __init__(self, layers: Sequence[nnx.Module]):
        problem = stack_problem(layers)
        if problem:
            raise ValueError(f"cannot stack layers: {problem}")
        graphdef = nnx.graphdef(layers[0])
        states = [nnx.state(layer) for layer in layers]
        stacked = jax.tree.map(
            lambda first, *rest: _with_layer_axis(
                first, jnp.stack([first[...]] + [v[...] for v in rest])
            ),
            *states,
            is_leaf=_is_variable,
        )
        self.layer = nnx.merge(graphdef, stacked)
        self.count = len(layers)

    def __len__(self) -> int:
        return self.count

    def unstacked(self) -> list[nnx.Module]:
        """The layers as separate modules (each Variable a slice: a copy of its values)."""
        graphdef, state = nnx.split(self.layer)
        return [
            nnx.merge(
                graphdef,
                jax.tree.map(
                    lambda v, i=i: _without_layer_axis(v, v[...][i]), state, is_leaf=_is_variable
                ),
            )
            for i in range(self.count)
        ]

    def layer_at(self, index: int) -> nnx.Module:
        """Layer `index` as a module of slices (copies; changes to it stay in it)."""
        graphdef, state = nnx.split(self.layer)
        return nnx.merge(
            graphdef,
            jax.tree.map(
                lambda v: _without_layer_axis(v, v[...][index]), state, is_leaf=_is_variable
            ),
        )

    def call_layer(self, index: int, fn: Callable, *args):
        """`fn(layer index, *args)` on one layer of the stack; random-number state the
        layer advances (dropout) is written back into the stack."""
        layer = self.layer_at(index)
        out = fn(layer, *args)
        advanced = nnx.state(layer, nnx.RngState)
        if jax.tree.leaves(advanced):
            nnx.update(
                self.layer,
                jax.tree.map(
                    lambda whole, part: whole.at[index].set(part),
                    nnx.state(self.layer, nnx.RngState),
                    advanced,
                ),
            )
        return out

    def scan(
        self,
        fn: Callable,
        carry,
        xs=None,
        *,
        start: int = 0,
        stop: int | None = None,
        remat: bool = False,
        policy: str = "full",
    ):
        """`lax.scan` of `fn(layer, carry, x) -> (carry, y)` over layers [start, stop) (and
        `xs`, as long as that range).

        Random-number state the layers advance (dropout) is written back; parameters
        are read-only inside the scan. Returns (carry, stacked ys).
        """
        stop = self.count if stop is None else stop
        graphdef, params, rest = nnx.split(self.layer, nnx.Param, ...)
        if (start, stop) != (0, self.count):
            params, rest = jax.tree.map(lambda x: x[start:stop], (params, rest))

        def body(carry, inputs):
            layer_params, layer_rest, x = inputs
            layer = nnx.merge(graphdef, layer_params, layer_rest)
            carry, y = fn(layer, carry, x)
            return carry, (y, nnx.state(layer, nnx.RngState))

        if remat:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
        carry, (ys, rng_states) = jax.lax.scan(body, carry, (params, rest, xs))
        if jax.tree.leaves(rng_states):
            if (start, stop) != (0, self.count):
                rng_states = jax.tree.map(
                    lambda whole, part: whole.at[start:stop].set(part),
                    nnx.state(self.layer, nnx.RngState),
                    rng_states,
                )
            nnx.update(self.layer, rng_states)
        return carry, ys


def _decoders(model: nnx.Module):
    from postax.models.transformer import Decoder  # the stack is generic; decoders use it

    return [module for _, module in nnx.iter_modules(model) if isinstance(module, Decoder)]


def stack_layers(model: nnx.Module) -> list[str]:
    """Stacks the layer list of every decoder in `model` that allows it, in place.

    Returns the reasons for decoders left as lists (empty when all were stacked).
    The layers' arrays are replaced by the stacked arrays (the old ones are freed
    once nothing else holds them).
    """
    skipped = []
    for decoder in _decoders(model):
        if isinstance(decoder.layers, LayerStack):
            continue
        problem = stack_problem(list(decoder.layers))
        if problem:
            skipped.append(problem)
            continue
        decoder.layers = LayerStack(list(decoder.layers))
    return skipped


def unstack_layers(model: nnx.Module) -> nnx.Module:
    """Turns every LayerStack of `model` back into a layer list, in place; returns model."""
    for decoder in _decoders(model):
        if isinstance(decoder.layers, LayerStack):
            decoder.layers = nnx.List(decoder.layers.unstacked())
    return model


def is_stacked(model: nnx.Module) -> bool:
    return any(isinstance(d.layers, LayerStack) for d in _decoders(model))


def unstacked_copy(model: nnx.Module) -> nnx.Module:
    """`model` itself when it has no stack; else a copy with layer lists (the layers'
    arrays are copied, everything else shared): for writers that address layers by name."""
    if not is_stacked(model):
        return model
    return unstack_layers(nnx.merge(*nnx.split(model)))


def require_layer_list(model: nnx.Module, operation: str) -> None:
    """Raises ConfigError when `model`'s layers are stacked: `operation` addresses layers
    one by one (surgery such as LoRA or quantisation, adapter loading)."""
    if is_stacked(model):
        raise ConfigError(
            f"{operation} needs the model's layers as a list, but they are stacked (a Trainer "
            "with scan_layers stacks them): call postax.models.stack.unstack_layers(model) "
            "first, or apply it before building the Trainer"
        )
