"""Device meshes, the mapping of logical axis names onto them, and joining a multi-process run.

A mesh has four axes: `data` (pure data parallelism: params replicated),
`fsdp` (data parallelism with params, gradients and optimizer state sharded,
Rajbhandari et al. 2020, "ZeRO"), `expert` (expert parallelism for
mixture-of-experts layers, Lepikhin et al. 2020, "GShard") and `tensor`
(Megatron-style model parallelism, Shoeybi et al. 2019), in that order from
the outermost to the innermost (`tensor` on the closest devices). Parameters
name their dimensions (vocab, embed, mlp, heads, kv_heads, head_dim, expert);
`LOGICAL_RULES` maps each name to mesh axes. A dimension that a mesh axis does
not divide evenly is replicated instead, so any model runs on any mesh.

The expert axis: the stacked expert weights ([expert, embed, mlp],
`models/moe.py`) split their expert dimension over it, and the batch rows split
over it too, after `data` and `fsdp`. As in GShard and Switch Transformer, the
devices of an expert group are data-parallel for everything that is not an
expert (attention, dense MLPs, embeddings, the router): without that, a mesh
with expert=4 would compute the whole non-expert model four times over. A model
without experts on such a mesh simply runs data-parallel over the axis. The
default `expert: 1` leaves every placement as it was on a three-axis mesh. The
sparse layer itself is written for one device (sort, grouped products, unsort)
and XLA's SPMD partitioner inserts the collectives (gathers of the routed rows
and reductions of the expert products); the result equals one device's, but it
is not the all-to-all exchange of a hand-written expert-parallel layer, so the
axis saves memory (each device holds experts / expert of every sparse layer)
more than time.

Several processes (JAX's multi-controller runtime, `jax.distributed`; docs/multihost.md):
every process runs the same program and `join(DistributedConfig)` joins them, once, before any
device is touched (every recipe does it in `recipes.common.start_run`). The mesh then spans
the devices of all processes. Where the settings come from:

1. the config's `distributed:` section (`coordinator` host:port, `num_processes`,
   `process_id`, `local_device_ids`);
2. for a field the config leaves unset, the environment: `JAX_COORDINATOR_ADDRESS`,
   `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS` (comma-separated), as
   `postax launch` and a cluster job spec set them. The config beats the environment;
3. when neither names anything: JAX's own cluster detection (`jax.distributed.initialize()`
   without arguments: Slurm, Open MPI, Cloud TPU VMs and GKE TPU slices, Kubernetes indexed
   Jobs) if such a cluster with more than one process is detected; else the run stays a
   single process and joins nothing (a laptop run never waits for a coordinator).

`num_processes: 1` alone is a single process too. On CPU the cross-process collectives are
gloo (`jax_cpu_collectives_implementation`), unless the environment chose another
(`JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi`).

Failures end the run within a bounded time, never a silent hang:

- not every process joins within `initialization_timeout` seconds: each waiting process
  prints `distributed: process I of N did not join ... within
  distributed.initialization_timeout=T s ...` and exits with status 2 (a watchdog of ours:
  JAX's own deadline ends the process with an abort and a terse `DEADLINE_EXCEEDED` later);
- a process dies mid-run (killed, out of memory, a lost host): JAX's coordination service
  misses its heartbeats for `heartbeat_timeout` seconds and ends every other process
  (`The following tasks are unhealthy (stopped sending heartbeats): 1`, or `Task 1
  heartbeat timeout`; exit status 134, an abort); a process blocked in a collective with
  the dead one usually fails at once (`Gloo ... failed: Connection closed by peer`); the
  coordinator's process (0) dying ends the others at once (`Failed to send RPC to
  coordination service`);
- a process that fails with a Python error: the `postax` command prints it and ends the
  process without JAX's shutdown barrier (`exit_without_shutdown`), so the others fail at
  their next collective instead of waiting `shutdown_timeout` seconds for it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import types
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from postax.validation import ConfigError, is_int

MESH_AXES = ("data", "fsdp", "expert", "tensor")
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "expert": ("expert",),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes (`MESH_AXES`); one of them may be -1 (all remaining devices).
    `expert` splits the experts of mixture-of-experts layers, and the batch rows with them
    (module docstring)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = tuple(getattr(self, axis) for axis in MESH_AXES)
        if any(not is_int(s) for s in sizes):
            raise ConfigError(f"mesh {self._describe(sizes)} is invalid: whole numbers")
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(
                f"mesh {self._describe(sizes)} is invalid: positive sizes, at most one -1"
            )

    def _describe(self, sizes) -> str:
        """`data=1 x fsdp=7 x tensor=1`, with `expert=E` only when E is not 1."""
        return " x ".join(
            f"{axis}={size}"
            for axis, size in zip(MESH_AXES, sizes, strict=True)
            if axis != "expert" or size != 1
        )

    def shape(self, device_count: int) -> tuple[int, ...]:
        """The axis sizes, in `MESH_AXES` order, on `device_count` devices."""
        sizes = [getattr(self, axis) for axis in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise ConfigError(
                    f"mesh {self._describe(sizes)} does not divide {device_count} devices"
                )
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise ConfigError(
                f"mesh {self._describe(sizes)} needs {math.prod(sizes)} devices, "
                f"found {device_count}"
            )
        return tuple(sizes)

    def batch_shards(self, device_count: int) -> int:
        """Into how many parts the batch rows split: the product of the batch axes' sizes
        (`LOGICAL_RULES["batch"]`: data x fsdp x expert)."""
        sizes = dict(zip(MESH_AXES, self.shape(device_count), strict=True))
        return math.prod(sizes[axis] for axis in LOGICAL_RULES["batch"])


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
    """Rows split over the data, fsdp and expert axes, the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Places every variable of `model` on `mesh` according to its logical axes, in place."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))


# ------------------------------------------------------------------ several processes

# config field -> the environment variable that sets it when the config does not
ENVIRONMENT = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}
COLLECTIVES_VARIABLE = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"
JOIN_TIMEOUT_EXIT = 2  # the exit status of a process whose run did not form in time
# JAX's names of the cluster environments its detection knows -> the names users know
CLUSTER_NAMES = {
    "slurm": "Slurm",
    "ompi": "Open MPI",
    "gcetpu": "Cloud TPU VM",
    "gketpu": "GKE TPU slice",
    "K8sCluster": "Kubernetes indexed Job",
}


class DistributedError(RuntimeError):
    """Joining a multi-process run failed, or its processes disagree (a different checkpoint,
    config or data on one host); the message names the process, the setting and the cause."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run (`distributed:` in every recipe's config).

    coordinator: "host:port" of process 0's coordination service, reachable from every
      process (on one machine "127.0.0.1:PORT").
    num_processes: processes in the run; process_id: this one's, 0 .. num_processes - 1.
    local_device_ids: the local accelerators this process uses (default: all; under Slurm
      and Open MPI on GPUs JAX gives each process one).
    initialization_timeout: seconds every process waits for all of them to join.
    heartbeat_timeout: seconds without heartbeats after which JAX declares a process dead and
      ends the others (JAX's default, 100).
    shutdown_timeout: seconds a finishing process waits for the others at the end (JAX's
      default, 300).

    Unset naming fields come from the environment (`ENVIRONMENT`), else from JAX's cluster
    detection; see the module docstring.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    shutdown_timeout: int = 300

    def __post_init__(self) -> None:
        if isinstance(self.local_device_ids, list):
            object.__setattr__(self, "local_device_ids", tuple(self.local_device_ids))
        check_distributed(self, {})


def _name(field: str, sources: Mapping[str, str]) -> str:
    """How an error names a field: the environment variable it came from, else its config key."""
    return sources.get(field) or f"distributed.{field}"


def check_distributed(cfg, sources: Mapping[str, str]) -> None:
    """ConfigError naming the first invalid setting of `cfg` (a DistributedConfig or anything
    with its fields); `sources` maps a field taken from the environment to its variable
    (`JAX_PROCESS_ID=5 (environment) is invalid: ...`)."""

    def fail(field: str, allowed: str) -> None:
        where = " (environment)" if field in sources else ""
        raise ConfigError(
            f"{_name(field, sources)}={getattr(cfg, field)!r}{where} is invalid: {allowed}"
        )

    if cfg.coordinator is not None:
        host, sep, port = str(cfg.coordinator).rpartition(":")
        if (
            not isinstance(cfg.coordinator, str)
            or not sep
            or not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
        ):
            fail("coordinator", "host:port with a port in 1..65535, e.g. 10.0.0.1:1234")
    if cfg.num_processes is not None and not (is_int(cfg.num_processes) and cfg.num_processes >= 1):
        fail("num_processes", "an integer >= 1")
    if cfg.process_id is not None:
        if not (is_int(cfg.process_id) and cfg.process_id >= 0):
            fail("process_id", "an integer >= 0")
        if cfg.num_processes is not None and cfg.process_id >= cfg.num_processes:
            fail(
                "process_id",
                f"below {_name('num_processes', sources)}={cfg.num_processes} (ids are 0 .. "
                f"{cfg.num_processes - 1})",
            )
    if cfg.local_device_ids is not None and (
        not cfg.local_device_ids or not all(is_int(i) and i >= 0 for i in cfg.local_device_ids)
    ):
        fail("local_device_ids", "null (all local devices) or a list of device ids >= 0")
    for field in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        value = getattr(cfg, field)
        if not (is_int(value) and value >= 1):
            fail(field, "a whole number of seconds >= 1")


def _parse_environment(variable: str, raw: str, field: str):
    text = raw.strip()
    try:
        if field == "coordinator":
            return text
        if field == "local_device_ids":
            return tuple(int(part) for part in text.split(","))
        return int(text)
    except ValueError:
        allowed = (
            "comma-separated device ids, e.g. 0,1" if field == "local_device_ids" else "an integer"
        )
        raise ConfigError(f"{variable}={raw!r} (environment) is invalid: {allowed}") from None


def from_environment(
    cfg: DistributedConfig, environ: Mapping[str, str] | None = None
) -> DistributedConfig:
    """`cfg` with every naming field it leaves unset taken from the environment (`ENVIRONMENT`;
    an empty variable counts as unset). The config beats the environment. ConfigError names
    the variable of an invalid value."""
    environ = os.environ if environ is None else environ
    changes, sources = {}, {}
    for field, variable in ENVIRONMENT.items():
        raw = environ.get(variable, "")
        if getattr(cfg, field) is None and raw.strip():
            changes[field] = _parse_environment(variable, raw, field)
            sources[field] = variable
    if not changes:
        return cfg
    # checked first with each value named by its source, then built (its own check passes)
    check_distributed(types.SimpleNamespace(**{**dataclasses.asdict(cfg), **changes}), sources)
    return dataclasses.replace(cfg, **changes)


def detected_cluster() -> str | None:
    """The cluster that JAX's own detection (`jax.distributed.initialize()` without arguments)
    would join, by the name users know, when it runs more than one process; None on a plain
    machine. A Kubernetes pod counts only as an indexed Job (JOB_COMPLETION_INDEX), and a
    cluster of one process (a Slurm or Open MPI job of one task, a single-host TPU VM, an
    indexed Job of parallelism 1) not at all, so a single-process run there joins nothing.
    A cluster that cannot say its process count is a `DistributedError`."""
    # JAX has no public list of its cluster environments; they register on this class.
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        name = env.name or env.__name__
        if env.opt_in_only_method or name not in CLUSTER_NAMES:
            continue
        if name == "K8sCluster" and "JOB_COMPLETION_INDEX" not in os.environ:
            continue
        if not env.is_env_present():
            continue
        try:
            count = env.get_process_count()
        except Exception as error:  # a metadata server or the Kubernetes API did not answer
            raise DistributedError(
                f"distributed: found a {CLUSTER_NAMES[name]} but could not ask it how many "
                f"processes the run has ({type(error).__name__}: {error}); set "
                "distributed.coordinator, num_processes and process_id (or "
                f"{ENVIRONMENT['num_processes']}=1 for a run of its own)"
            ) from error
        if count < 2:
            continue
        return CLUSTER_NAMES[name]
    return None


def initialize_arguments(
    cfg: DistributedConfig,
    environ: Mapping[str, str] | None = None,
    detect: Callable[[], str | None] = detected_cluster,
) -> tuple[dict, str] | None:
    """(keyword arguments of `jax.distributed.initialize`, a description of this process for
    messages), or None for a single-process run that joins nothing. `detect` (JAX's cluster
    detection) is asked only when the config and the environment leave a naming field unset.
    ConfigError names what is missing or invalid."""
    cfg = from_environment(cfg, environ)
    named = {f: getattr(cfg, f) for f in ("coordinator", "num_processes", "process_id")}
    missing = [f for f, value in named.items() if value is None]
    if cfg.num_processes == 1 and cfg.coordinator is None:
        return None  # one process: nothing to join
    cluster = detect() if missing else None
    if missing and cluster is None:
        if len(missing) == len(named):
            return None  # nothing named, no cluster: a single process
        given = ", ".join(f"{_name(f, {})}={v!r}" for f, v in named.items() if v is not None)
        wanted = ", ".join(f"distributed.{f} (or {ENVIRONMENT[f]})" for f in missing)
        raise ConfigError(
            f"distributed: {given} is set but {wanted} is not, and no cluster that provides it "
            "(Slurm, Open MPI, Cloud TPU, Kubernetes indexed Job) was detected: set all of "
            "coordinator, num_processes and process_id, or none on a single machine"
        )
    if cfg.num_processes is not None and cfg.process_id is not None:
        who = f"process {cfg.process_id} of {cfg.num_processes}"
    elif cluster is not None:
        who = f"a {cluster} process"
    else:
        who = "this process"
    where = cfg.coordinator or f"the coordinator of the {cluster} job"
    kwargs = {
        "coordinator_address": cfg.coordinator,
        "num_processes": cfg.num_processes,
        "process_id": cfg.process_id,
        "local_device_ids": None if cfg.local_device_ids is None else list(cfg.local_device_ids),
        "initialization_timeout": cfg.initialization_timeout,
        "heartbeat_timeout_seconds": cfg.heartbeat_timeout,
        "shutdown_timeout_seconds": cfg.shutdown_timeout,
    }
    return kwargs, f"{who} at {where}"


def _join_timed_out(who: str, timeout: int) -> None:
    """The watchdog's end of a join that did not finish in time (a timer thread): the message,
    then the whole process ends (JAX is still blocked in its join)."""
    print(
        f"distributed: {who} did not join: not every process reached the coordinator within "
        f"distributed.initialization_timeout={timeout} s (a process that did not start or "
        "failed before joining, a wrong coordinator address or port, or a firewall between "
        "the hosts)",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(JOIN_TIMEOUT_EXIT)


def join(cfg: DistributedConfig | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Joins the multi-process run that `cfg` and the environment describe (module docstring);
    returns the number of processes (1: a single process, nothing joined). Call it before
    anything touches a device. A second call (or one after the caller joined by itself)
    checks the process count and returns it."""
    cfg = DistributedConfig() if cfg is None else cfg
    if jax.distributed.is_initialized():
        resolved = from_environment(cfg, environ)
        if resolved.num_processes not in (None, jax.process_count()):
            raise DistributedError(
                f"distributed.num_processes={resolved.num_processes} but this process already "
                f"joined a run of {jax.process_count()} processes"
            )
        return jax.process_count()
    plan = initialize_arguments(cfg, environ)
    if plan is None:
        return 1
    kwargs, who = plan
    from jax._src import xla_bridge  # whether a device was touched: joining is too late then

    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            f"distributed: {who} cannot join: JAX has already started its devices in this "
            "process (join before anything creates an array or asks for jax.devices())"
        )
    if COLLECTIVES_VARIABLE not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    print(
        f"distributed: {who} joining (initialization_timeout={cfg.initialization_timeout} s)",
        file=sys.stderr,
        flush=True,
    )
    watchdog = threading.Timer(
        cfg.initialization_timeout, _join_timed_out, (who, cfg.initialization_timeout)
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as error:
        raise DistributedError(f"distributed: {who} could not join: {error}") from error
    finally:
        watchdog.cancel()
    count = jax.process_count()
    print(
        f"distributed: process {jax.process_index()} of {count} joined "
        f"({jax.local_device_count()} local of {jax.device_count()} devices)",
        file=sys.stderr,
        flush=True,
    )
    return count


def process_count() -> int:
    """Processes in the run this process joined (1 when it joined none); touches no device."""
    return jax.process_count() if jax.distributed.is_initialized() else 1


def exit_without_shutdown(status: int) -> None:
    """Ends a process of a multi-process run that failed: output flushed, then `os._exit`,
    without JAX's shutdown barrier (the others would wait `shutdown_timeout` seconds at it, or
    hang in a collective with a process that is still alive). Nothing happens in a
    single-process run (the caller returns its status as usual)."""
    if process_count() < 2:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
