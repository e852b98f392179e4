"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster): a head with no CPUs and
two 1-CPU worker nodes, so the two shard actors must run on different nodes."""
from __future__ import annotations

import os

import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import shard_bytes
from live_runs import Background, shards_in_progress, wait_for
from test_transfer_local import make_spec
from graft.cluster.driver import RayOptions, run_ray
from graft.engine.run.job import prepare_job
from graft.engine.run.local import run_local


@pytest.fixture(scope="module")
def cluster():  # noqa: ANN201
    assert not ray.is_initialized()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "object_store_memory": 100 * 2**20})
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_two_nodes_give_the_same_bytes_as_one_process(cluster, tiny_checkpoints, tmp_path):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(make_spec(tiny_checkpoints, local_out))
    run_ray(prepare_job(make_spec(tiny_checkpoints, ray_out)), RayOptions())
    assert shard_bytes(ray_out) == shard_bytes(local_out)


def test_losing_a_node_mid_run_still_completes_bit_identical(cluster, tiny_checkpoints, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref_out))
    job = prepare_job(make_spec(tiny_checkpoints, out, chunk_size=32, report="off"))
    logs: list[str] = []
    # One shard at a time per actor, and both actors busy before a node goes: whichever node is
    # removed then holds a shard in flight (on a loaded machine one actor can start seconds late).
    bg = Background(lambda: run_ray(job, RayOptions(workers=2, shards_per_worker=1), log=logs.append))
    wait_for(lambda: shards_in_progress(out) >= 2, "a shard in progress on each node")
    victim = next(n for n in cluster.worker_nodes)
    cluster.remove_node(victim)
    bg.outcome(timeout=600)
    assert any("running it again" in line for line in logs), logs
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]
