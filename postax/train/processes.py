"""Several JAX processes, one program: who owns which batch rows, and global arrays from them.

A multi-process run (`jax.distributed`: one process per host, or several local processes on
CPU with gloo collectives) executes the same program everywhere. Each process holds only the
shards of a global array that live on its own (addressable) devices. For a batch, that means:

- `process_rows(sharding, rows)`: the global rows of a `[rows, ...]` batch that this process's
  devices hold under `sharding`. It is derived from the sharding itself
  (`Sharding.addressable_devices_indices_map`), not from an assumed device order, so any mesh
  layout works: rows split over the `data`, `fsdp` and `expert` axes and replicated over `tensor` are
  owned by every process that has one of their devices (then by more than one). Every process
  computes its own rows from the same (global) mesh, so the assignment is deterministic and
  needs no communication; each global row has at least one owner.
- `global_array(local, sharding, rows, global_rows)`: the global array whose rows `rows` (this
  process's, ascending) are `local`, built from one single-device array per addressable device
  (`jax.make_array_from_single_device_arrays`): no process ever sends or receives a whole
  batch.
- `host_batch(batch, mesh, rows=..., global_rows=...)`: the inputs of a jitted function that
  is not the training step (reference and teacher scoring): a global batch that every process
  holds whole is placed replicated; a process-local one is assembled as above.
- `local_rows_of(array)`: the rows of a batch-sharded global array this process holds, back on
  the host, in `process_rows` order (reading per-row results of a global computation).

With one process every device is addressable: `process_rows` is every row and the trainer keeps
its single-process path (`jax.device_put` of the whole batch), bitwise as before.

`is_primary()` is process 0: it alone writes files that are not sharded (metrics, TensorBoard,
plots, the progress line, the Hugging Face export). `agree(flag)` is a collective: whether the
flag holds on every process (for decisions all processes must take together, e.g. whether a
cache is found or has to be computed by a collective pass).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from postax.parallel import DistributedError, batch_sharding


def is_primary() -> bool:
    """Whether this is process 0 (the only one in a single-process run)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    """Whether the run spans more than one JAX process."""
    return jax.process_count() > 1


def _row_span(index: tuple, rows: int) -> range:
    first = index[0] if index else slice(None)
    return range(*first.indices(rows))


def process_rows(sharding: Sharding, rows: int) -> np.ndarray:
    """The global row indices (ascending, int64) of a `[rows, ...]` array under `sharding` that
    this process's devices hold; every row with one process."""
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows={rows!r} is invalid: a positive integer")
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map((rows,)).values():
        held.update(_row_span(index, rows))
    return np.asarray(sorted(held), dtype=np.int64)


def global_array(
    local: np.ndarray, sharding: Sharding, rows: np.ndarray, global_rows: int
) -> jax.Array:
    """The `[global_rows, ...]` array under `sharding` whose rows `rows` (this process's rows,
    `process_rows(sharding, global_rows)`) are `local`; every other row lives on other processes.
    """
    local = np.asarray(local)
    rows = np.asarray(rows)
    if local.shape[0] != len(rows):
        raise ValueError(
            f"a process-local batch of {local.shape[0]} rows for {len(rows)} rows of this "
            f"process (of {global_rows} global rows)"
        )
    position = {int(r): i for i, r in enumerate(rows)}
    shape = (global_rows, *local.shape[1:])
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        span = _row_span(index, global_rows)
        try:
            picked = [position[r] for r in span]
        except KeyError as error:
            raise ValueError(
                f"row {error.args[0]} lives on {device} of this process but is not among its "
                "rows: the batch was cut for another sharding"
            ) from None
        shard = local[np.asarray(picked, dtype=np.int64)][(slice(None), *index[1:])]
        arrays.append(jax.device_put(shard, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


class BatchPlacer:
    """Global batches under `sharding` from host batches that every process holds whole, or
    that hold only this process's rows (`rows(global_rows)`, ascending)."""

    def __init__(self, sharding: Sharding):
        self.sharding = sharding
        self._rows: dict[int, np.ndarray] = {}

    def rows(self, global_rows: int) -> np.ndarray:
        """This process's rows of a global batch of `global_rows` rows (`process_rows`)."""
        if global_rows not in self._rows:
            self._rows[global_rows] = process_rows(self.sharding, global_rows)
        return self._rows[global_rows]

    def _global_rows(self, local_count: int) -> int:
        found = [g for g, rows in self._rows.items() if len(rows) == local_count]
        if len(found) != 1:
            raise ValueError(
                f"a process-local batch of {local_count} rows, but no global batch size asked "
                f"of rows() gives this process {local_count} rows (asked: "
                f"{sorted(self._rows) or 'none'}): ask for rows(global_rows) (the trainer's "
                "local_rows) and lay out those rows"
            )
        return found[0]

    def place(self, batch: Any, *, local: bool) -> dict[str, jax.Array]:
        """`batch` (name -> array) as global arrays: from its rows when `local`, else from this
        process's rows cut out of it. Values that already are global arrays pass through."""
        out = {}
        for name, value in dict(batch).items():
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                out[name] = value
                continue
            value = np.asarray(value)
            global_rows = self._global_rows(value.shape[0]) if local else value.shape[0]
            rows = self.rows(global_rows)
            out[name] = global_array(
                value if local else value[rows], self.sharding, rows, global_rows
            )
        return out


def local_rows_of(array: jax.Array) -> np.ndarray:
    """This process's rows of a global `[rows, ...]` array, in `process_rows` order, on the
    host (a fully addressable array comes back whole)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    rows = process_rows(array.sharding, array.shape[0])
    position = {int(r): i for i, r in enumerate(rows)}
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    for shard in array.addressable_shards:
        span = _row_span(shard.index, array.shape[0])
        picked = np.asarray([position[r] for r in span], dtype=np.int64)
        out[(picked, *shard.index[1:])] = np.asarray(shard.data)
    return out


def agree(flag: bool) -> bool:
    """Whether `flag` is true on every process (a collective: every process must call it)."""
    if not multi_process():
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))
    return bool(np.all(flags))


def check_same_everywhere(what: str, value: Any) -> None:
    """Raises `DistributedError` (one line from the command line) on every process unless
    JSON-like `value` is the same on all of them (a collective: one digest per process is
    exchanged)."""
    if not multi_process():
        return
    text = json.dumps(value, sort_keys=True)
    digest = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if differ:
        raise DistributedError(
            f"{what} differs between processes: processes {differ} disagree with process 0 "
            f"(process {jax.process_index()} has {text[:200]}); every process must run the "
            "same program over the same data"
        )


def primary_first(write: Callable[[], None], written: Callable[[], bool]) -> None:
    """Writes a file every process needs: process 0 calls `write`, all wait for it, then every
    other process calls `write` only if `written()` is false (its own disk; on storage shared
    with process 0 the file is already there). A collective: every process must call it."""
    if not multi_process():
        write()
        return
    if is_primary():
        write()
    multihost_utils.sync_global_devices("postax primary_first")
    if not is_primary() and not written():
        write()


def primary_then_others(compute: Callable[[], Any]) -> Any:
    """`compute()` on process 0, then, after all waited for it, on every other process: for work
    that fills a cache the others then find (converting a GGUF file once, not N times at once).
    A collective: every process must call it. Touches no device in a run that joined
    nothing (a single process)."""
    if not jax.distributed.is_initialized() or not multi_process():
        return compute()
    result = compute() if is_primary() else None
    multihost_utils.sync_global_devices("postax primary_then_others")
    return result if is_primary() else compute()


def gather_to_host(array: jax.Array) -> np.ndarray:
    """The whole value of `array` on every process (a collective when it is not fully
    addressable: every process must call it, in the same order)."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def mesh_of(tree: Any) -> Mesh:
    """The mesh of the first leaf of `tree` placed with a `NamedSharding` (a sharded model)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    raise ValueError("no array of this tree is placed on a mesh (NamedSharding)")


def host_batch(
    batch: dict[str, np.ndarray],
    mesh: Mesh,
    *,
    rows: np.ndarray | None = None,
    global_rows: int | None = None,
) -> dict[str, jax.Array]:
    """Global arrays for a jitted function on `mesh`: a global batch (`rows` None, the same on
    every process) replicated, or this process's `rows` of a `global_rows` batch sharded like
    the trainer's batches (`global_array`)."""
    if rows is None:
        replicated = NamedSharding(mesh, P())
        return {k: jax.device_put(np.asarray(v), replicated) for k, v in batch.items()}
    sharding = batch_sharding(mesh)
    return {k: global_array(v, sharding, rows, global_rows) for k, v in batch.items()}


# -- RL: process-local sampling ---------------------------------------------------------------


def process_share(count: int, process: int | None = None) -> range:
    """The contiguous block of `count` items split over the processes that this process (or
    `process`) takes, as `numpy.array_split` cuts them: the first `count % N` processes one
    more; all of them with one process."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count={count!r} is invalid: an integer >= 0")
    n = jax.process_count()
    p = jax.process_index() if process is None else process
    base, extra = divmod(count, n)
    start = p * base + min(p, extra)
    return range(start, start + base + (1 if p < extra else 0))


def allgather_objects(value: Any) -> list[Any]:
    """Every process's `value` (picklable), in process order, on every process (two
    collectives: the lengths, then the padded bytes). The bytes come only from the processes of
    this run, which run the same program; `[value]` with one process."""
    if not multi_process():
        return [value]
    data = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, : int(n)].tobytes()) for i, n in enumerate(lengths)]


class KeyValueExchange:
    """`allgather_objects` through the coordinator's key-value store instead of a device
    collective: safe from any thread (an RL producer thread exchanges its scored rollouts
    there while the trainer's thread runs collectives, whose order across processes it must
    not disturb).

    `exchange(key, value, poll=None)`: every process's `value` (picklable), in process order;
    `key` (a string naming this exchange, the same on every process, never reused within
    `namespace`) pairs the processes' calls, so an exchange abandoned on some processes (a
    producer thread stopped mid-batch) cannot be confused with a later one. While waiting
    for a peer it calls `poll()` every `POLL_S` seconds (the producer's stop check: raising
    there leaves the exchange). This process's entries are deleted at its next completed
    exchange: by then every process has read the last one (a process posts to its next
    exchange only after reading all of this one), and an abandoned one is read by nobody.
    A peer that has not posted within `timeout_s` seconds (None: wait while the peers live;
    a dead one ends the run through jax.distributed's heartbeats) raises `DistributedError`
    naming it. With one process: `[value]`, no store."""

    POLL_S = 1.0

    def __init__(self, namespace: str, *, timeout_s: float | None = None):
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._pending: list[str] = []  # this process's entries, not yet known to be read

    def __call__(self, key: str, value: Any, *, poll: Callable[[], None] | None = None) -> list:
        if not multi_process():
            return [value]
        client = _store()
        me, count = jax.process_index(), jax.process_count()
        prefix = f"postax/{self.namespace}/{key}"
        mine = f"{prefix}/{me}"
        client.key_value_set_bytes(mine, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        self._pending.append(mine)
        parts = [
            value if process == me else self._read(client, f"{prefix}/{process}", poll)
            for process in range(count)
        ]
        for done in self._pending[:-1]:
            client.key_value_delete(done)
        self._pending = self._pending[-1:]
        return parts

    def _read(self, client, entry: str, poll: Callable[[], None] | None) -> Any:
        waited = 0.0
        while True:
            if poll is not None:
                poll()
            try:
                data = client.blocking_key_value_get_bytes(entry, int(self.POLL_S * 1000))
                return pickle.loads(data)
            except Exception as error:  # DEADLINE_EXCEEDED: not posted yet; anything else: fatal
                if "DEADLINE_EXCEEDED" not in str(error):
                    raise DistributedError(
                        f"process {jax.process_index()}: reading {entry!r} from the "
                        f"coordinator failed: {type(error).__name__}: {error}"
                    ) from error
            waited += self.POLL_S
            if self.timeout_s is not None and waited >= self.timeout_s:
                process = entry.rsplit("/", 1)[1]
                raise DistributedError(
                    f"process {jax.process_index()}: process {process} posted no "
                    f"{entry.rsplit('/', 1)[0]!r} within {self.timeout_s:.0f} s"
                )


def _store():
    """jax.distributed's key-value store client (the coordinator's; Orbax uses it too)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise DistributedError("KeyValueExchange: jax.distributed is not initialised")
    return client


def _local_sharding(sharding: Any, local: Mesh) -> NamedSharding:
    spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
    return NamedSharding(local, spec)


def process_mesh(mesh: Mesh) -> Mesh | None:
    """A global mesh `("processes", *mesh.axis_names)` whose block for process p is p's
    `local_mesh` (its devices, laid out as there): an array sharded over it by a spec of
    `mesh`'s axis names is replicated across the processes and, within each, laid out as on
    its local mesh. None when the processes' local meshes differ in shape or do not follow
    one another in the mesh's device order."""
    blocks = [mesh._local_mesh(p).devices for p in range(jax.process_count())]
    if len({block.shape for block in blocks}) != 1:
        return None
    stacked = np.stack(blocks)
    # a jitted reshard needs the same device order on both sides: the processes' blocks must
    # follow one another in the mesh's own order (process-major, as on GPU hosts)
    if list(stacked.flat) != list(mesh.devices.flat):
        return None
    return Mesh(stacked, ("processes", *mesh.axis_names))


def local_copy(tree: Any, mesh: Mesh, *, via_host: bool = False) -> Any:
    """A copy of `tree` (arrays placed on the global `mesh`, or replicated) whole on this
    process's devices only: placed on `mesh.local_mesh` (this process's devices, the same axis
    names) under the same partition spec. Computations on the copy involve no other process.
    A collective: every process must call it, in the same order. With one process the tree
    itself is returned.

    Device to device: one jitted reshard onto `process_mesh` (the gathers across processes
    run over the devices' interconnect) whose shards on this process's devices are the local
    copy's; no weight passes through the host, and no device holds more than its share of
    the local copy. PRNG keys, arrays not placed on `mesh`, and every array when
    `process_mesh` has none (or with `via_host`: benchmarks/multihost.py compares the two) go
    through the host (`gather_to_host`)."""
    if not multi_process():
        return tree
    local = mesh.local_mesh
    per_process = None if via_host else process_mesh(mesh)
    leaves, treedef = jax.tree.flatten(tree)

    def spec_of(x) -> P:
        return x.sharding.spec if isinstance(x.sharding, NamedSharding) else P()

    on_device = [
        i
        for i, x in enumerate(leaves)
        if per_process is not None
        and isinstance(x, jax.Array)
        and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        and isinstance(x.sharding, NamedSharding)
        and x.sharding.mesh == mesh
    ]
    if on_device:
        targets = tuple(NamedSharding(per_process, spec_of(leaves[i])) for i in on_device)
        moved = _reshard(targets)([leaves[i] for i in on_device])
        for i, y in zip(on_device, moved, strict=True):
            shards = [shard.data for shard in y.addressable_shards]
            sharding = NamedSharding(local, spec_of(leaves[i]))
            leaves[i] = jax.make_array_from_single_device_arrays(y.shape, sharding, shards)
    done = set(on_device)

    def through_host(x):
        if not isinstance(x, jax.Array):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = gather_to_host(jax.random.key_data(x))
            placed = jax.device_put(data, _local_sharding(x.sharding, local))
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(x))
        return jax.device_put(gather_to_host(x), _local_sharding(x.sharding, local))

    leaves = [x if i in done else through_host(x) for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


@functools.lru_cache(maxsize=16)
def _reshard(targets: tuple[NamedSharding, ...]):
    """A jitted identity of a list of arrays onto `targets` (one per layout: its compiled
    programs are cached by jit per shape)."""
    return jax.jit(lambda arrays: arrays, out_shardings=list(targets))
