"""The `distributed:` section (postax.parallel.DistributedConfig): validation, the environment
under the config, JAX's cluster detection as the fallback, and the section in every recipe's
config. No process joins anything here (tests/test_launch.py runs real processes)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from postax.configs import ConfigFileError, load_config
from postax.parallel import (
    DistributedConfig,
    DistributedError,
    detected_cluster,
    from_environment,
    initialize_arguments,
)
from postax.validation import ConfigError

FULL = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
}


def no_cluster() -> None:
    return None


def test_defaults_are_a_single_process_with_jax_timeouts():
    cfg = DistributedConfig()
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.local_device_ids) == (
        None,
        None,
        None,
        None,
    )
    assert (cfg.initialization_timeout, cfg.heartbeat_timeout, cfg.shutdown_timeout) == (
        300,
        100,
        300,
    )
    # nothing named, nothing in the environment, no cluster: nothing to join
    assert initialize_arguments(cfg, {}, no_cluster) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"coordinator": "10.0.0.1"}, "distributed.coordinator='10.0.0.1' is invalid: host:port"),
        ({"coordinator": ":1234"}, "distributed.coordinator=':1234' is invalid"),
        ({"coordinator": "h:70000"}, "port in 1..65535"),
        ({"num_processes": 0}, "distributed.num_processes=0 is invalid: an integer >= 1"),
        ({"num_processes": True}, "distributed.num_processes=True is invalid"),
        ({"process_id": -1}, "distributed.process_id=-1 is invalid: an integer >= 0"),
        (
            {"num_processes": 2, "process_id": 2},
            "distributed.process_id=2 is invalid: below distributed.num_processes=2 "
            "(ids are 0 .. 1)",
        ),
        ({"local_device_ids": ()}, "distributed.local_device_ids=() is invalid"),
        ({"local_device_ids": (0, -1)}, "a list of device ids >= 0"),
        (
            {"initialization_timeout": 0},
            "distributed.initialization_timeout=0 is invalid: a whole number of seconds >= 1",
        ),
        ({"heartbeat_timeout": 2.5}, "distributed.heartbeat_timeout=2.5 is invalid"),
        ({"shutdown_timeout": -3}, "distributed.shutdown_timeout=-3 is invalid"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError) as error:
        DistributedConfig(**fields)
    assert message in str(error.value)


def test_the_environment_fills_what_the_config_leaves_unset():
    cfg = from_environment(DistributedConfig(), {**FULL, "JAX_LOCAL_DEVICE_IDS": "0, 2"})
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    assert cfg.local_device_ids == (0, 2)
    # the config beats the environment, field by field; an empty variable counts as unset
    cfg = from_environment(
        DistributedConfig(coordinator="h:99", process_id=1),
        {**FULL, "JAX_NUM_PROCESSES": ""},
    )
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("h:99", None, 1)


@pytest.mark.parametrize(
    ("environ", "config", "message"),
    [
        ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two' (environment) is invalid"),
        (
            {"JAX_LOCAL_DEVICE_IDS": "0;1"},
            {},
            "JAX_LOCAL_DEVICE_IDS='0;1' (environment) is invalid: comma-separated device ids",
        ),
        (
            {"JAX_PROCESS_ID": "5"},
            {"num_processes": 2},
            "JAX_PROCESS_ID=5 (environment) is invalid: below distributed.num_processes=2",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "nohost"},
            {},
            "JAX_COORDINATOR_ADDRESS='nohost' (environment) is invalid: host:port",
        ),
    ],
)
def test_an_invalid_environment_variable_is_named(environ, config, message):
    with pytest.raises(ConfigError) as error:
        from_environment(DistributedConfig(**config), environ)
    assert message in str(error.value)


def test_initialize_arguments_from_the_environment():
    kwargs, who = initialize_arguments(
        DistributedConfig(initialization_timeout=7, heartbeat_timeout=11, shutdown_timeout=13),
        FULL,
        no_cluster,
    )
    assert kwargs == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "local_device_ids": None,
        "initialization_timeout": 7,
        "heartbeat_timeout_seconds": 11,
        "shutdown_timeout_seconds": 13,
    }
    assert who == "process 3 of 4 at 10.0.0.1:1234"


def test_a_detected_cluster_provides_what_is_unset_and_is_asked_only_then():
    asked = []

    def slurm() -> str:
        asked.append(True)
        return "Slurm"

    kwargs, who = initialize_arguments(DistributedConfig(), {}, slurm)
    assert asked == [True]
    assert (kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"]) == (
        None,
        None,
        None,
    )  # jax.distributed.initialize detects them
    assert who == "a Slurm process at the coordinator of the Slurm job"
    asked.clear()
    initialize_arguments(DistributedConfig(), FULL, slurm)
    assert asked == []  # everything named: no detection


def test_one_process_or_a_partial_setting_without_a_cluster():
    assert initialize_arguments(DistributedConfig(num_processes=1), {}, no_cluster) is None
    with pytest.raises(ConfigError) as error:
        initialize_arguments(DistributedConfig(coordinator="h:1"), {}, no_cluster)
    message = str(error.value)
    assert "distributed.coordinator='h:1' is set but" in message
    assert "distributed.num_processes (or JAX_NUM_PROCESSES)" in message
    assert "distributed.process_id (or JAX_PROCESS_ID)" in message


def test_jax_cluster_detection(monkeypatch):
    for variable in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    assert detected_cluster() is None  # this machine: no cluster, a plain run joins nothing
    slurm = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert detected_cluster() == "Slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job step is a single process
    assert detected_cluster() is None


def test_kubernetes_detection_asks_the_process_count(monkeypatch):
    """An indexed Job is a cluster only with more than one process (a sweep of independent
    one-process Jobs joins nothing); an API that does not answer is a one-line error."""
    from jax._src.clusters import K8sCluster

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setattr(K8sCluster, "is_env_present", classmethod(lambda cls: True))
    for count, found in ((2, "Kubernetes indexed Job"), (1, None)):
        monkeypatch.setattr(
            K8sCluster, "get_process_count", classmethod(lambda cls, count=count: count)
        )
        assert detected_cluster() == found

    def no_answer(cls):
        raise ConnectionError("the API server did not answer")

    monkeypatch.setattr(K8sCluster, "get_process_count", classmethod(no_answer))
    with pytest.raises(DistributedError, match=r"found a Kubernetes indexed Job but could not"):
        detected_cluster()


RECIPES = [
    ("sft", "SFTConfig", "configs/sft/tiny.yaml"),
    ("preference", "PreferenceConfig", "configs/preference/dpo-tiny.yaml"),
    ("reward_model", "RewardModelConfig", None),
    ("distill", "DistillConfig", "configs/distill/tiny.yaml"),
    ("grpo", "GRPOConfig", "configs/grpo/arithmetic.yaml"),
    ("ppo", "PPOConfig", "configs/ppo/arithmetic.yaml"),
]


@pytest.mark.parametrize(("module", "name", "config"), RECIPES)
def test_every_recipe_config_has_the_section(module, name, config):
    cls = getattr(importlib.import_module(f"postax.recipes.{module}"), name)
    field = {f.name: f for f in dataclasses.fields(cls)}["distributed"]
    assert field.default_factory() == DistributedConfig()
    if config is None:
        return
    cfg = load_config(
        cls,
        config,
        ["distributed.coordinator=127.0.0.1:4321", "distributed.local_device_ids=[0]"],
    )
    assert cfg.distributed == DistributedConfig(coordinator="127.0.0.1:4321", local_device_ids=(0,))
    with pytest.raises(ConfigFileError) as error:
        load_config(cls, config, ["distributed.num_processes=0"])
    assert "distributed.num_processes=0 is invalid: an integer >= 1" in str(error.value)
