"""Training checkpoints: bitwise round trips, cadence, pruning, sharding, kill during save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from postax.models.config import ConfigError
from postax.train import CheckpointConfig, CheckpointManager

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def make_manager(directory, **kw) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(directory=directory, **kw))


def train_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "embed": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "layers": [
            {"w": jnp.asarray(rng.standard_normal((3, 3)), jnp.bfloat16)},
            {"w": jnp.asarray(rng.standard_normal((3, 3)), jnp.bfloat16)},
        ],
    }
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7 + seed, jnp.int32),
        "rng": jax.random.key(11 + seed),
        "raw_rng": jax.random.key_data(jax.random.key(3)),
    }


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_bitwise(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(a)) == str(jax.random.key_impl(e))
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def step_dirs(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_config_errors_name_field_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"keep_last=0 .*>= 1"):
        CheckpointConfig(directory=tmp_path, keep_last=0)
    with pytest.raises(ConfigError, match=r"save_every=-1 .*>= 0"):
        CheckpointConfig(directory=tmp_path, save_every=-1)
    with pytest.raises(ConfigError, match=r"async_save=1 .*True or False"):
        CheckpointConfig(directory=tmp_path, async_save=1)
    with pytest.raises(ConfigError, match=r"directory=''"):
        CheckpointConfig(directory="")


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_round_trip_is_bitwise(tmp_path, async_save):
    state = train_state()
    extra = {"data": {"epoch": 1, "position": 42, "order": [3, 1, 2]}, "config": {"lr": 0.01}}
    with make_manager(tmp_path, save_every=1, async_save=async_save) as manager:
        assert manager.save(7, state, extra)
        manager.wait()
        assert step_dirs(tmp_path) == ["7"]
        restored, restored_extra = manager.restore(abstract(state))
    assert_bitwise(restored, state)
    assert restored_extra == extra
    # The restored typed key draws the same numbers as the original.
    np.testing.assert_array_equal(
        jax.random.uniform(restored["rng"], (4,)), jax.random.uniform(state["rng"], (4,))
    )
    # A fresh manager (a resumed process) restores into concrete template arrays too.
    template = jax.tree.map(jnp.zeros_like, train_state(seed=1))
    with make_manager(tmp_path) as manager:
        assert manager.latest_step() == 7
        again, _ = manager.restore(template, step=7)
    assert_bitwise(again, state)


def test_async_save_is_safe_against_donation(tmp_path):
    """The trainer donates its state right after `save` returns; the checkpoint must not change."""
    state = {"w": jnp.arange(64, dtype=jnp.float32), "step": jnp.asarray(1, jnp.int32)}
    expected = jax.tree.map(np.array, state)
    overwrite = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 1, s), donate_argnums=0)
    with make_manager(tmp_path, save_every=1, async_save=True) as manager:
        assert manager.save(1, state, {})
        # On GPU/TPU the arrays were copied to the host and the donation goes through; on CPU
        # Orbax may still reference the buffers, and JAX then skips the donation (copies).
        new = overwrite(state)
        np.testing.assert_array_equal(new["w"], -np.ones(64, np.float32))
        manager.wait()
        restored, extra = manager.restore(abstract(new))
    assert extra == {}
    assert_bitwise(restored, expected)


def test_save_every_cadence_force_and_no_overwrite(tmp_path):
    state = {"w": jnp.zeros(2)}
    with make_manager(tmp_path / "a", save_every=3, keep_last=10) as manager:
        saved = [step for step in range(1, 11) if manager.save(step, state, {"s": step})]
        assert saved == [3, 6, 9]
        assert manager.save(10, state, {"s": 10}, force=True)
        # The final forced save of a step that is already saved is a no-op.
        assert not manager.save(9, state, {"s": -1}, force=True)
        manager.wait()
        assert manager.all_steps() == [3, 6, 9, 10]
        assert manager.restore({"w": jnp.zeros(2)}, step=9)[1] == {"s": 9}
    with make_manager(tmp_path / "b", save_every=0) as manager:
        assert not any(manager.save(step, state, {}) for step in range(0, 5))
        assert manager.latest_step() is None
        assert manager.save(5, state, {}, force=True)
        manager.wait()
        assert manager.latest_step() == 5


def test_keep_last_prunes_on_disk(tmp_path):
    with make_manager(tmp_path, save_every=1, keep_last=2) as manager:
        assert manager.latest_step() is None
        for step in range(1, 6):
            assert manager.save(step, {"w": jnp.full(3, float(step))}, {"step": step})
        manager.wait()
        assert manager.all_steps() == [4, 5]
        assert manager.latest_step() == 5
    assert step_dirs(tmp_path) == ["4", "5"]
    with make_manager(tmp_path, keep_last=2) as manager:
        assert manager.latest_step() == 5
        state, extra = manager.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, step=4)
    np.testing.assert_array_equal(state["w"], np.full(3, 4.0, np.float32))
    assert extra == {"step": 4}


def test_latest_step_counts_only_committed_checkpoints(tmp_path):
    with make_manager(tmp_path, save_every=1) as manager:
        manager.save(1, {"w": jnp.ones(3)}, {})
        manager.wait()
        # Hundreds of leaves: the background write takes a noticeable time.
        big = {f"w{i:03d}": jnp.full((2000,), float(i)) for i in range(500)}
        assert manager.save(2, big, {})
        seen = []
        while True:
            latest = manager.latest_step()
            committed = (tmp_path / "2").exists()
            seen.append(latest)
            assert latest in (1, 2)
            if latest == 2:
                assert committed
                break
            time.sleep(0.001)
        assert seen[0] == 1  # the save was still in flight right after `save` returned
        manager.wait()
        assert manager.all_steps() == [1, 2]


def test_restore_errors(tmp_path):
    with make_manager(tmp_path) as manager:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            manager.restore({"w": jnp.zeros(2)})
        manager.save(2, {"w": jnp.zeros(2)}, {}, force=True)
        with pytest.raises(FileNotFoundError, match=r"step 3 .*available steps: \[2\]"):
            manager.restore({"w": jnp.zeros(2)}, step=3)
        with pytest.raises(TypeError, match="JSON-serialisable"):
            manager.save(4, {"w": jnp.zeros(2)}, {"bad": object()}, force=True)
        # A plain uint32 array was saved: asking for a typed key is an error, not garbage.
        manager.save(5, {"k": jax.random.key_data(jax.random.key(0))}, {}, force=True)
        with pytest.raises(ValueError, match="PRNG key"):
            manager.restore({"k": jax.random.key(1)}, step=5)


def run_python(code: str, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **popen)


SHARDED_CHILD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from postax.train import CheckpointConfig, CheckpointManager

assert jax.device_count() == 4
row = Mesh(np.array(jax.devices()), ("x",))
grid = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
w = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4), NamedSharding(row, P("x")))
keys = jax.device_put(jax.random.split(jax.random.key(5), 4), NamedSharding(row, P("x")))
manager = CheckpointManager(CheckpointConfig(directory=sys.argv[1]))
manager.save(1, {"w": w, "keys": keys}, {}, force=True)
want = {
    "w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(grid, P("b", "a"))),
    "keys": jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=NamedSharding(grid, P())),
}
state, _ = manager.restore(want)
manager.close()
for name in want:
    assert state[name].sharding.is_equivalent_to(want[name].sharding, state[name].ndim), name
np.testing.assert_array_equal(state["w"], np.arange(32, dtype=np.float32).reshape(8, 4))
np.testing.assert_array_equal(jax.random.key_data(state["keys"]), jax.random.key_data(keys))
print("RESHARDED-OK")
"""


def test_restore_lands_on_requested_shardings(tmp_path):
    """Saved over a 4-device row, restored onto a 2x2 grid (4 fake CPU devices)."""
    proc = run_python(SHARDED_CHILD, str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"RESHARDED-OK" in out


KILL_CHILD = """
import sys
import jax.numpy as jnp
from postax.train import CheckpointConfig, CheckpointManager

manager = CheckpointManager(CheckpointConfig(directory=sys.argv[1], keep_last=1))
manager.save(1, {"w": jnp.full((4,), 1.0)}, {"step": 1}, force=True)
manager.wait()
# Hundreds of small leaves make the save take a while without writing much.
big = {f"w{i:03d}": jnp.full((2000,), float(i)) for i in range(500)}
manager.save(2, big, {"step": 2}, force=True)
manager.wait()
"""


def files_under(path: Path) -> list[Path]:
    try:
        return [p for p in path.rglob("*") if p.is_file()]
    except FileNotFoundError:  # renamed while we looked
        return []


def kill_during_save(directory: Path) -> bool:
    """Runs KILL_CHILD, SIGKILLs it while step 2's arrays are being written.

    Returns True if the child was caught mid-save (step 2 not yet committed).
    """
    proc = run_python(KILL_CHILD, str(directory), stderr=subprocess.DEVNULL)
    tmp, final = directory / f"2{TMP_SUFFIX}", directory / "2"
    state_tmp = tmp / f"state{TMP_SUFFIX}"
    deadline = time.monotonic() + 120
    try:
        while not files_under(state_tmp):
            if final.exists():
                return False
            assert proc.poll() is None, "the child ended before saving step 2"
            assert time.monotonic() < deadline, "step 2's arrays were never written"
            time.sleep(0.001)
        # Freeze the child, look, then kill it: what we see is what it leaves.
        os.kill(proc.pid, signal.SIGSTOP)
        mid_save = tmp.exists() and not final.exists()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return mid_save


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    for attempt in range(3):
        directory = tmp_path / f"attempt{attempt}"
        if kill_during_save(directory):
            break
    else:
        pytest.fail("the child finished saving before it could be killed, three times")
    leftovers = step_dirs(directory)
    assert leftovers == ["1", f"2{TMP_SUFFIX}"], leftovers
    assert files_under(directory / f"2{TMP_SUFFIX}" / f"state{TMP_SUFFIX}")  # half-written

    abstract_w = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    manager = make_manager(directory, keep_last=1)
    assert manager.latest_step() == 1
    assert manager.all_steps() == [1]
    state, extra = manager.restore(abstract_w)
    np.testing.assert_array_equal(state["w"], np.ones(4, np.float32))
    assert extra == {"step": 1}

    assert manager.save(2, {"w": jnp.full((4,), 2.0)}, {"step": 2}, force=True)
    manager.close()
    # The half-written tmp directory was cleaned up, step 1 pruned (keep_last=1).
    assert step_dirs(directory) == ["2"]
    manager = make_manager(directory, keep_last=1)
    state, extra = manager.restore(abstract_w)
    manager.close()
    np.testing.assert_array_equal(state["w"], np.full(4, 2.0, np.float32))
    assert extra == {"step": 2}
