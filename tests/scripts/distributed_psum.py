"""One process of a multi-process run that joins through `postax.parallel.join` (settings from
the environment `postax launch` sets) and checks a collective; tests/test_launch.py starts it.

    python tests/scripts/distributed_psum.py [--loop] [--heartbeat-timeout S]

Prints `process I of N: devices D, psum S` (S: the sum over the D devices of 1, 2, ..., D,
each process giving its own devices' numbers), then exits 0; with `--loop` prints `looping`
and repeats the psum until it is killed or a collective fails.
"""

from __future__ import annotations

import argparse
import sys

from postax.parallel import DistributedConfig, join


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--heartbeat-timeout", type=int, default=100)
    parser.add_argument("--initialization-timeout", type=int, default=60)
    args = parser.parse_args()
    count = join(
        DistributedConfig(
            heartbeat_timeout=args.heartbeat_timeout,
            initialization_timeout=args.initialization_timeout,
        )
    )

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    sharding = NamedSharding(mesh, P("d"))
    first = jax.process_index() * jax.local_device_count()  # this process's devices: first + k
    local = [first + k + 1.0 for k in range(jax.local_device_count())]
    shards = [
        jax.device_put(np.asarray([v], np.float32), d)
        for v, d in zip(local, jax.local_devices(), strict=True)
    ]
    values = jax.make_array_from_single_device_arrays((jax.device_count(),), sharding, shards)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
    result = float(total(values))
    print(
        f"process {jax.process_index()} of {count}: devices {jax.device_count()}, psum {result:g}",
        flush=True,
    )
    if args.loop:
        print("looping", flush=True)
        while True:
            total(values).block_until_ready()
    sys.exit(0)


if __name__ == "__main__":
    main()
