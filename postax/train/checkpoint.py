"""Training checkpoints: asynchronous, atomic, pruned, resumable (Orbax).

`CheckpointManager` is a thin, trainer-agnostic wrapper around
`orbax.checkpoint.CheckpointManager`. One checkpoint is one directory
`<directory>/<step>/` holding three Orbax items:

- `state`: a pytree of arrays (params, optimizer state, step counter, RNG
  keys, ...) written with `ocp.args.StandardSave` (OCDBT + Zarr3, one writer
  per shard, so sharded arrays are saved and restored without gathering);
- `extra`: a JSON-serialisable dict (data iterator position, config
  snapshot, ...) written with `ocp.args.JsonSave`; JSON round trips turn
  tuples into lists and keys into strings, so keep it to plain JSON types;
- `prng_impls`: a JSON dict `{tree path: PRNG implementation name}` for the
  typed PRNG keys found in `state` (see below).

Schedule: `save(step, ...)` writes when `step % save_every == 0` (with
`save_every > 0`) or when `force=True` (the trainer forces the final save). A
step that already has a checkpoint is never overwritten: `save` returns False.
`keep_last` newest checkpoints are kept; older ones are deleted only after the
new one has been committed (Orbax deletes in its finalize step, after the
rename), so pruning never leaves the directory without a complete checkpoint.

Asynchronous saves (`async_save=True`, the default): `save` blocks only while
the arrays are copied off the devices, then returns; serialisation and the
commit run in a background thread. The trainer may donate or overwrite the
saved arrays as soon as `save` returns (tested on CPU). On accelerators
Orbax's blocking phase copies the arrays to host memory (its documented
design; not exercised by the CPU tests); on CPU Orbax may still hold the
buffers until the write ends, and JAX then silently declines the donation
(the step allocates fresh buffers) rather than corrupting the checkpoint.
The next `save`, `wait()`, `restore()` and `close()` wait for the save in
flight and re-raise its error.

Several JAX processes (`jax.distributed`; tests/test_multiprocess.py): every
process opens a manager on the same directory (shared storage) and calls
`save`/`restore` with the same steps. Orbax synchronises them through the
coordination service: each process writes the shards its devices hold into
its own OCDBT files (`state/ocdbt.process_<i>`), the primary process (0)
writes the JSON items and the metadata, and the commit (the rename above) runs
once, after every process has written, so the checkpoint appears whole or not
at all. Only the primary deletes the tmp directories a killed run left. A
checkpoint restores onto any process count and mesh over the same global
shapes (saved by 2 processes x 4 devices, restored by 1 x 8 and the other way
round): each process reads the parts of the arrays its devices need. The data
position in `extra` is global (the trainer's iterator state names the next
global batch, not a process's rows), so it is the same on every process and
valid for any process count.

Atomicity (verified against orbax-checkpoint 0.12.8, local file systems):

1. The blocking part of `save` creates `<step>.orbax-checkpoint-tmp/`; the
   background thread writes everything below it (each item first into its
   own `<item>.orbax-checkpoint-tmp/`, renamed to `<item>/` when that item is
   done).
2. The commit writes `commit_success.txt` into the step's tmp directory and
   then renames `<step>.orbax-checkpoint-tmp` to `<step>` (one `rename(2)`,
   atomic on POSIX file systems). This is `AtomicRenameTemporaryPath`, Orbax's
   default for every non-GCS path. On GCS (no atomic rename) Orbax instead
   writes into `<step>/` directly and treats `commit_success.txt` as the commit
   marker (`CommitFileTemporaryPath`).
3. Step discovery (`latest_step`, `restore`) only lists finalized step
   directories; names containing `.orbax-checkpoint-tmp` are never mistaken
   for checkpoints. A process killed at any point of a save (SIGKILL included)
   therefore leaves the previous checkpoint as the latest loadable one.
4. This manager enables `cleanup_tmp_directories`: when it is created it
   deletes the tmp directories a killed process left behind (in a background
   task that the first save waits for). Consequently only one writer may own a
   directory at a time: a second manager opened on a directory while another
   process is saving there would delete that process's in-flight save.

`latest_step()` only reports committed checkpoints: while an asynchronous
save is in flight its step is not reported (Orbax itself lists it as soon as
the save starts).

PRNG keys: typed keys (`jax.random.key`) in `state` are stored as their raw
key data (`jax.random.key_data(key)`, uint32) and the implementation name is
recorded in `prng_impls`; `restore` rebuilds them with
`jax.random.wrap_key_data(data, impl=...)` wherever the abstract state has a
key dtype (e.g. from `jax.eval_shape`). Legacy raw uint32 keys are ordinary
arrays and round-trip as they are. The checkpoint format therefore does not
depend on Orbax's own (version-dependent) handling of key arrays.

Restoring: `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (or of
concrete arrays, whose shape, dtype and sharding are used). Arrays are read
directly into the requested `.sharding` (a `NamedSharding` over any mesh: the
saved and the requested shardings need not agree); leaves without a sharding
land on the first device. Python scalars in the tree come back as Python
scalars.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from postax.models.safetensors_io import CheckpointError
from postax.validation import is_int, require

_ITEMS = ("state", "extra", "prng_impls")


_require = functools.partial(require, prefix="CheckpointConfig.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often training checkpoints are written.

    directory: root directory; one sub-directory per checkpointed step.
    save_every: save every this many steps; 0 saves only when forced (the
      trainer forces a save at the end of the run).
    keep_last: number of most recent checkpoints kept on disk (>= 1).
    async_save: serialise and commit in a background thread.
    """

    directory: str | os.PathLike
    save_every: int = 1000
    keep_last: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        _require(
            isinstance(self.directory, str | os.PathLike) and str(self.directory) != "",
            "directory",
            self.directory,
            "a non-empty path",
        )
        _require(
            is_int(self.save_every) and self.save_every >= 0,
            "save_every",
            self.save_every,
            "an integer >= 0 (0 = only at the end)",
        )
        _require(
            is_int(self.keep_last) and self.keep_last >= 1,
            "keep_last",
            self.keep_last,
            "an integer >= 1",
        )
        _require(isinstance(self.async_save, bool), "async_save", self.async_save, "True or False")


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _keystr(path) -> str:
    return jax.tree_util.keystr(path)


class CheckpointManager:
    """Saves and restores `(state pytree, extra dict)` pairs; see the module docstring."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.directory = os.path.abspath(os.fspath(config.directory))
        options = ocp.CheckpointManagerOptions(
            # The cadence is decided in `save`; Orbax is always asked to write.
            save_interval_steps=1,
            preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_last),
            enable_async_checkpointing=config.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._in_flight: int | None = None

    # -- saving ---------------------------------------------------------------

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would write a checkpoint."""
        every = self.config.save_every
        due = force or (every > 0 and step % every == 0)
        return due and step not in self._manager.all_steps()

    def save(self, step: int, state: Any, extra: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves `state` (pytree of arrays) and `extra` (JSON dict) as checkpoint `step`.

        Returns True when a save was started (asynchronous) or done (synchronous),
        False when the step is not due (see `CheckpointConfig.save_every`) or
        already has a checkpoint.
        """
        if not is_int(step) or step < 0:
            raise ValueError(f"step={step!r} is invalid: an integer >= 0")
        if not self.should_save(step, force=force):
            return False
        try:
            if not isinstance(extra, Mapping):
                raise TypeError(f"got {type(extra).__name__}")
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"extra must be a JSON-serialisable dict: {error}") from error
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        impls = {}
        arrays = []
        for path, leaf in leaves:
            if _is_key(leaf):
                impls[_keystr(path)] = str(jax.random.key_impl(leaf))
                leaf = jax.random.key_data(leaf)
            arrays.append(leaf)
        state = jax.tree_util.tree_unflatten(treedef, arrays)
        self.wait()  # the previous save commits (or raises) before this one starts
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                extra=ocp.args.JsonSave(dict(extra)),
                prng_impls=ocp.args.JsonSave(impls),
            ),
            force=True,
        )
        self._in_flight = step if self.config.async_save else None
        return True

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed; re-raises its error."""
        try:
            self._manager.wait_until_finished()
        except BaseException:
            # A failed save must not stay listed as a checkpoint.
            self._manager.reload()
            raise
        finally:
            self._in_flight = None

    # -- reading --------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the committed checkpoints, ascending."""
        steps = sorted(self._manager.all_steps())
        if self._in_flight is not None:
            if self._manager.is_saving_in_progress():
                steps = [s for s in steps if s != self._in_flight]
            else:
                self._in_flight = None
        return steps

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores checkpoint `step` (default: the latest) as `(state, extra)`.

        `abstract_state` has the structure of the saved state; its leaves are
        `jax.ShapeDtypeStruct`s (with `.sharding` to place the result) or
        concrete arrays used as templates.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; "
                f"available steps: {steps}"
            )
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
        key_paths = {}
        targets = []
        for index, (path, leaf) in enumerate(leaves):
            if _is_key(leaf):
                key_paths[index] = _keystr(path)
                data = jax.eval_shape(jax.random.key_data, leaf)
                leaf = jax.ShapeDtypeStruct(
                    data.shape, data.dtype, sharding=getattr(leaf, "sharding", None)
                )
            targets.append(leaf)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(jax.tree_util.tree_unflatten(treedef, targets)),
                    extra=ocp.args.JsonRestore(),
                    prng_impls=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as e:  # Orbax: the saved tree or shapes differ from abstract_state
            raise CheckpointError(
                f"{self.directory}/{step}: the checkpoint does not fit this run's state (the "
                "model, LoRA, optimizer or scan_layers settings changed since it was saved; "
                "restore them, or "
                f"start afresh in a new directory): {str(e).splitlines()[0][:300]}"
            ) from e
        impls = restored["prng_impls"] or {}
        out = treedef.flatten_up_to(restored["state"])
        for index, path in key_paths.items():
            if path not in impls:
                raise ValueError(
                    f"{path} is a PRNG key in abstract_state but checkpoint step {step} "
                    "stored it as a plain array (pass the key data's ShapeDtypeStruct instead)"
                )
            key = jax.random.wrap_key_data(out[index], impl=impls[path])
            if key.dtype != leaves[index][1].dtype:
                raise ValueError(
                    f"{path}: checkpoint step {step} holds a {key.dtype} key, "
                    f"abstract_state asks for {leaves[index][1].dtype}"
                )
            out[index] = key
        return jax.tree_util.tree_unflatten(treedef, out), dict(restored["extra"] or {})

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Waits for the save in flight and releases Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
