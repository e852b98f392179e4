"""The Ray executor on a local Ray (one per module): same bytes as the local executor, worker death
is survived, errors inside workers fail the job cleanly."""
from __future__ import annotations

import os

import pytest
import ray

from conftest import poison, shard_bytes
from live_runs import Background, kill_one_worker, shard_in_progress, wait_for
from test_transfer_local import assert_not_committed, make_spec
from graft.cluster.driver import RayOptions, run_ray
from graft.engine.errors import NonFiniteError, SpecError
from graft.engine.job import prepare_job
from graft.engine.local import run_local
from graft.engine.manifest import verify_output


@pytest.fixture(scope="module", autouse=True)
def local_ray():  # noqa: ANN201
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_output_is_bit_identical_to_the_local_executor(tiny_checkpoints, tmp_path):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(make_spec(tiny_checkpoints, local_out))
    result = run_ray(prepare_job(make_spec(tiny_checkpoints, ray_out)), RayOptions(workers=2))
    assert shard_bytes(ray_out) == shard_bytes(local_out)
    assert result.manifest["run"]["executor"] == "ray" and result.manifest["run"]["workers"] == 2
    assert verify_output(ray_out).ok
    assert ray.is_initialized()  # a cluster graft did not start is left running


@pytest.mark.parametrize("trio", ["fp8_trio", "FP8"])
def test_ray_transfers_fp8_trios_bit_identically_to_the_local_executor(request, ct_trio, tmp_path, trio):
    paths = request.getfixturevalue(trio) if trio == "fp8_trio" else ct_trio(trio)
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    common = dict(alpha=0.7, chunk_size=96 * 4 * 10)  # several chunks per tensor (and a first pass)
    run_local(make_spec(paths, local_out, **common))
    job = prepare_job(make_spec(paths, ray_out, **common))
    seen: list[int] = []
    run_ray(job, RayOptions(workers=2), on_progress=seen.append)
    assert shard_bytes(ray_out) == shard_bytes(local_out)
    assert sum(seen) == job.plan.read_bytes
    assert verify_output(ray_out).ok


@pytest.mark.parametrize("workers, shards_per_worker", [(2, 1), (1, 3)])
def test_progress_counts_every_input_byte_once(tiny_checkpoints, tmp_path, workers, shards_per_worker):
    job = prepare_job(make_spec(tiny_checkpoints, str(tmp_path / "out"), chunk_size=2048))
    seen: list[int] = []
    run_ray(job, RayOptions(workers=workers, shards_per_worker=shards_per_worker), on_progress=seen.append)
    assert all(n > 0 for n in seen) and sum(seen) == job.plan.read_bytes


def test_one_actor_runs_several_shards_at_once_with_the_same_bytes(tiny_checkpoints, tmp_path):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(make_spec(tiny_checkpoints, local_out))
    job = prepare_job(make_spec(tiny_checkpoints, ray_out, chunk_size=256))
    assert len(job.plan.shards) >= 2
    bg = Background(lambda: run_ray(job, RayOptions(workers=1, shards_per_worker=2)))
    wait_for(lambda: sum(".graft-tmp-" in n for n in os.listdir(ray_out)) >= 2
             if os.path.isdir(ray_out) else False, "two shards in progress at once")
    bg.outcome()
    assert shard_bytes(ray_out) == shard_bytes(local_out)


def test_shards_per_worker_out_of_range_is_a_clear_error():
    with pytest.raises(SpecError, match=r"--shards-per-worker\) must be 1 to 8, got 0"):
        RayOptions(shards_per_worker=0)


def test_worker_killed_mid_shard_is_redone_with_bit_identical_output(tiny_checkpoints, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref_out))
    # Small chunks make each shard take a few seconds, so the kill lands mid-shard.
    job = prepare_job(make_spec(tiny_checkpoints, out, chunk_size=32))
    logs: list[str] = []
    events: list[str] = []
    bg = Background(lambda: run_ray(job, RayOptions(workers=2, shards_per_worker=1), log=logs.append,
                                    on_shard=events.append))
    wait_for(lambda: shard_in_progress(out), "a shard in progress")
    kill_one_worker()
    bg.outcome()
    assert any("died" in line and "running it again" in line for line in logs)
    assert events.count("retried") == 1 and events.count("done") == len(job.plan.shards)
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_worker_killed_with_two_shards_in_flight_has_both_redone(tiny_checkpoints, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref_out))
    job = prepare_job(make_spec(tiny_checkpoints, out, chunk_size=32))
    events: list[str] = []
    bg = Background(lambda: run_ray(job, RayOptions(workers=1, shards_per_worker=2), on_shard=events.append))
    wait_for(lambda: os.path.isdir(out) and sum(".graft-tmp-" in n for n in os.listdir(out)) >= 2,
             "two shards in progress on the one worker")
    kill_one_worker()
    bg.outcome()  # one replacement actor, which then runs everything that is left
    assert events.count("retried") == 2 and events.count("done") == len(job.plan.shards)
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_an_error_inside_a_worker_fails_the_job_and_commits_nothing(copy_checkpoints, tmp_path):
    victim = poison(copy_checkpoints["finetuned"], float("nan"))
    out = str(tmp_path / "out")
    with pytest.raises(NonFiniteError, match=victim.replace(".", r"\.")):
        run_ray(prepare_job(make_spec(copy_checkpoints, out)), RayOptions(workers=2))
    assert_not_committed(out)  # shards that committed before the failure are kept for a resume
