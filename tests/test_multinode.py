"""Multi-node launch: ``train.nnodes``/``node_rank``/``master_addr``/``master_port`` and the environment variables
ms-swift's launcher reads, resolved, checked and handed to ``swift sft``; and (slow) two stage processes as two
nodes of one process each on the loopback address, against one node of two processes, in
``tests/test_logged_numbers_e2e.py`` (it reuses that module's two-process run)."""

from __future__ import annotations

import json
import socket

import pytest

from coordexp.core.config import ConfigError, Params, validate_params
from coordexp.train import stage as training
from coordexp.train.stage import LaunchError, launch_settings


def _params(**train) -> Params:
    return Params.model_validate({"train": train})


def _flags(cli: list[str]) -> dict[str, str]:
    flags = [i for i, a in enumerate(cli) if a.startswith("--")]
    return {cli[i][2:]: cli[i + 1] for i in flags if i + 1 < len(cli) and not cli[i + 1].startswith("--")}


def test_schema_refuses_a_rank_outside_the_nodes():
    with pytest.raises(ConfigError, match="node_rank: 2 is not a node of nnodes: 2"):
        validate_params({"train": {"nnodes": 2, "node_rank": 2}})
    with pytest.raises(ConfigError, match="nnodes"):
        validate_params({"train": {"nnodes": 0}})
    with pytest.raises(ConfigError, match="master_port"):
        validate_params({"train": {"master_port": 70000}})


def test_one_process_gets_no_launcher_variables():
    launch = launch_settings(_params(), {})
    assert (launch.world_size, launch.is_main, launch.env()) == (1, True, {})


def test_one_node_of_several_processes_gets_a_free_port():
    launch = launch_settings(_params(nproc_per_node=2), {})
    env = launch.env()
    assert {k: env[k] for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK")} == {
        "NPROC_PER_NODE": "2",
        "NNODES": "1",
        "NODE_RANK": "0",
    }
    assert "MASTER_ADDR" not in env  # torchrun's 127.0.0.1
    with socket.socket() as sock:  # the port is free: it binds
        sock.bind(("127.0.0.1", int(env["MASTER_PORT"])))


def test_deepspeed_on_one_process_goes_through_torchrun():
    """DeepSpeed initialises a process group even alone: torchrun gives it the rank and rendezvous variables."""
    env = launch_settings(_params(deepspeed="zero2"), {}).env()
    assert (env["NPROC_PER_NODE"], env["NNODES"], env["NODE_RANK"]) == ("1", "1", "0")
    assert int(env["MASTER_PORT"]) > 0


def test_several_nodes_get_every_launcher_variable():
    p = _params(nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400)
    launch = launch_settings(p, {})
    assert (launch.world_size, launch.is_main) == (8, False)
    assert launch.env() == {
        "NPROC_PER_NODE": "4",
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
    }
    # no port set: every node must agree without talking, on torchrun's default
    assert launch_settings(_params(nnodes=2, master_addr="node0"), {}).env()["MASTER_PORT"] == "29500"


def test_several_nodes_need_node_zeros_address():
    with pytest.raises(LaunchError, match=r"train.nnodes: 2 .*train.master_addr \(or MASTER_ADDR"):
        launch_settings(_params(nnodes=2), {})
    with pytest.raises(LaunchError, match="master_addr"):
        launch_settings(_params(), {"NNODES": "3", "NODE_RANK": "1"})


def test_environment_fills_in_the_defaults():
    """One params.yaml on every node; each node's rank (and the rendezvous) from the environment."""
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    launch = launch_settings(_params(), env)
    assert (launch.nnodes, launch.node_rank, launch.master_addr, launch.master_port) == (2, 1, "10.0.0.1", 1234)
    # params and environment agreeing is fine
    same = launch_settings(_params(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=1234), env)
    assert same == launch


@pytest.mark.parametrize(
    ("train", "env", "match"),
    [
        ({"nnodes": 2, "node_rank": 1, "master_addr": "a"}, {"NODE_RANK": "0"}, "train.node_rank: 1 .* NODE_RANK=0"),
        ({"nnodes": 2, "master_addr": "a"}, {"NNODES": "4"}, "train.nnodes: 2 .* NNODES=4"),
        ({"master_addr": "a"}, {"MASTER_ADDR": "b"}, "train.master_addr: a .* MASTER_ADDR=b"),
        ({"master_port": 2000}, {"MASTER_PORT": "2001"}, "train.master_port: 2000 .* MASTER_PORT=2001"),
        ({"nproc_per_node": 2}, {"NPROC_PER_NODE": "4"}, "train.nproc_per_node: 2 .* NPROC_PER_NODE=4"),
        ({}, {"NODE_RANK": "one"}, "NODE_RANK='one' .* not a whole number"),
        ({"nnodes": 2, "master_addr": "a"}, {"NODE_RANK": "2"}, r"NODE_RANK\) 2 is not a node of .* 2: .* 0 \.\. 1"),
        ({}, {"MASTER_PORT": "0"}, "MASTER_PORT=0: not a TCP port"),
    ],
)
def test_contradictions_and_bad_values_are_refused(train, env, match):
    with pytest.raises(LaunchError, match=match):
        launch_settings(_params(**train), env)


def test_swift_gets_exactly_the_resolved_launch(monkeypatch, tmp_path):
    """Inherited launcher variables never reach ms-swift on their own: a stray ``NNODES`` would start torchrun."""
    monkeypatch.setenv("NNODES", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    p = _params()
    env = training.swift_env(p, launch_settings(p, dict(training.os.environ)), tmp_path / "c.json", {"X": "1"})
    assert not {"NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert (env["X"], env["COORDEXP_TRAIN_CONFIG"]) == ("1", str(tmp_path / "c.json"))
    p = _params(nnodes=2, master_addr="127.0.0.1", master_port=2345)
    env = training.swift_env(p, launch_settings(p, {"NODE_RANK": "1"}), tmp_path / "c.json", {})
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_PORT"]) == ("2", "1", "2345")


def test_cpu_processes_across_nodes_sync_through_gloo(monkeypatch, tmp_path):
    """One process per node is still data parallel: the CPU flags depend on the world, not the node."""
    monkeypatch.setattr(training, "_cuda_available", lambda: False)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))

    def flags(p: Params) -> dict[str, str]:
        return _flags(training.swift_cli_args(p, base, base, base, base, tmp_path, launch_settings(p, {})))

    assert "use_cpu" not in flags(_params())
    two_nodes = flags(_params(nnodes=2, master_addr="127.0.0.1"))
    assert (two_nodes["use_cpu"], two_nodes["ddp_backend"]) == ("true", "gloo")


def test_where_the_nodes_meet_is_no_part_of_the_training_fingerprint():
    """An interrupted run resumes after a change of port or address; a change of world size starts over."""
    a = training.training_fingerprint(_params(nnodes=2, master_addr="a", master_port=1))
    assert a == training.training_fingerprint(_params(nnodes=2, node_rank=1, master_addr="b", master_port=2))
    assert a != training.training_fingerprint(_params(nnodes=3, master_addr="a", master_port=1))
