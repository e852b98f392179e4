"""The Ray executor on a local Ray (one per module): same bytes as the local executor, worker death
is survived, errors inside workers fail the job cleanly, workers the cluster cannot place fail the
run instead of hanging it, and a slow worker slows nobody else."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import ray
from ray.exceptions import RayActorError

from conftest import poison, shard_bytes
from live_runs import Background, kill_one_worker, shard_in_progress, wait_for
from test_hf_cache import cached  # noqa: F401 - the fixture
from test_transfer_local import assert_not_committed, make_spec
from graft.cluster.actors import ProgressBoard
from graft.cluster.driver import RayOptions, WorkerStartError, _WorkerPool, run_ray
from graft.engine.errors import NonFiniteError, SpecError
from graft.engine.run.job import prepare_job
from graft.engine.run.session import OutputSession
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import verify_output


@pytest.fixture(scope="module", autouse=True)
def module_ray():  # noqa: ANN201
    from conftest import local_ray

    with local_ray():
        yield


def test_ray_output_is_bit_identical_to_the_local_executor(tiny_checkpoints, tmp_path):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(make_spec(tiny_checkpoints, local_out))
    result = run_ray(prepare_job(make_spec(tiny_checkpoints, ray_out)), RayOptions(workers=2))
    assert shard_bytes(ray_out) == shard_bytes(local_out)
    # The transfer report, measured by the actors, is the local executor's (up to float32 summation
    # order, which follows torch's thread count).
    got, want = (json.load(open(os.path.join(d, "graft.report.json")))["tensors"] for d in (ray_out, local_out))
    assert [t["name"] for t in got] == [t["name"] for t in want]
    for g, w in zip(got, want):
        assert g["measured"] == w["measured"] and g["touched"] == w["touched"]
        assert g["ft_delta_norm"] == pytest.approx(w["ft_delta_norm"], rel=1e-5)
    assert result.manifest["run"]["executor"] == "ray" and result.manifest["run"]["workers"] == 2
    assert verify_output(ray_out).ok
    assert ray.is_initialized()  # a cluster graft did not start is left running


def test_ray_runs_a_job_on_the_hugging_face_cache(cached, tiny_checkpoints, tmp_path):
    """The cache's linked files (test_hf_cache.py) on Ray workers: pinned to the blobs, the same bytes."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref))
    run_ray(prepare_job(make_spec(cached, out)), RayOptions(workers=2))
    assert shard_bytes(out) == shard_bytes(ref)
    verify_output(out)


def test_ray_runs_several_diffs_bit_identically_to_the_local_executor(tiny_checkpoints, second_diff, tmp_path):
    from test_diffs import two_diffs

    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(two_diffs(tiny_checkpoints, second_diff, local_out, chunk_size=4096))
    job = prepare_job(two_diffs(tiny_checkpoints, second_diff, ray_out, chunk_size=4096))
    seen: list[int] = []
    run_ray(job, RayOptions(workers=2), on_progress=seen.append)
    assert shard_bytes(ray_out) == shard_bytes(local_out)
    assert sum(seen) == job.plan.read_bytes
    got, want = (json.load(open(os.path.join(d, "graft.report.json"))) for d in (ray_out, local_out))
    assert got["flags"] == want["flags"] and got["diffs"] == 2
    assert verify_output(ray_out).ok


def test_graft_diff_and_a_transfer_from_it_on_ray_are_the_local_executors(tiny_checkpoints, tmp_path):
    from test_diff_artifacts import diff_spec, manifest_of

    local_diff, ray_diff = str(tmp_path / "local-diff"), str(tmp_path / "ray-diff")
    run_local(diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], local_diff, chunk_size=4096))
    run_ray(prepare_job(diff_spec(tiny_checkpoints["finetuned"], tiny_checkpoints["base"], ray_diff,
                                  chunk_size=4096)), RayOptions(workers=2))
    assert shard_bytes(ray_diff) == shard_bytes(local_diff)
    # The input digests the actors computed while streaming bind the same content.
    assert manifest_of(ray_diff)["inputs"] == manifest_of(local_diff)["inputs"]
    assert manifest_of(ray_diff)["diff"] == manifest_of(local_diff)["diff"]
    three, two = str(tmp_path / "three"), str(tmp_path / "two")
    run_local(make_spec(tiny_checkpoints, three, alpha=0.5))
    from graft.engine.plan.specfile import spec_from_mapping

    run_ray(prepare_job(spec_from_mapping({"target": tiny_checkpoints["target"], "diff": ray_diff, "alpha": 0.5,
                                           "output": two})), RayOptions(workers=2))
    assert shard_bytes(two) == shard_bytes(three)
    assert verify_output(two).ok and verify_output(ray_diff).ok


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
    job = prepare_job(make_spec(tiny_checkpoints, out, chunk_size=32, report="off"))
    logs: list[str] = []
    events: list[str] = []
    seen: list[int] = []
    bg = Background(lambda: run_ray(job, RayOptions(workers=2, shards_per_worker=1), log=logs.append,
                                    on_shard=events.append, on_progress=seen.append))
    wait_for(lambda: shard_in_progress(out), "a shard in progress")
    kill_one_worker()
    bg.outcome()
    assert any("died" in line and "running it again" in line for line in logs)
    assert events.count("retried") == 1 and events.count("done") == len(job.plan.shards)
    assert sum(seen) == job.plan.read_bytes  # the lost attempt's partial bytes are not counted twice
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_worker_killed_with_two_shards_in_flight_has_both_redone(tiny_checkpoints, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref_out))
    job = prepare_job(make_spec(tiny_checkpoints, out, chunk_size=32, report="off"))
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


def test_start_timeout_must_be_positive():
    with pytest.raises(SpecError, match=r"--start-timeout\) must be more than 0 seconds, got 0"):
        RayOptions(start_timeout=0)


def test_gpus_per_worker_on_a_cluster_without_gpus_fails_at_once_and_writes_nothing(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    job = prepare_job(make_spec(tiny_checkpoints, out))
    started = time.monotonic()
    run = Background(lambda: run_ray(job, RayOptions(gpus_per_worker=1)))
    with pytest.raises(WorkerStartError, match=r"no node of the Ray cluster can hold a shard worker: each "
                                               r"asks for 1 CPU\(s\) and 1 GPU\(s\) .* has 2 CPUs and 0 GPUs"):
        run.outcome(timeout=30)  # before the fix: shards queued on actors never placed, forever
    assert time.monotonic() - started < 10
    assert assert_not_committed(out) == [] and os.listdir(out) == []
    # With --workers given (an autoscaling cluster may add GPU nodes) it waits, up to the timeout.
    run = Background(lambda: run_ray(job, RayOptions(gpus_per_worker=1, workers=1, start_timeout=2)))
    with pytest.raises(WorkerStartError, match=r"no worker could be placed in 2s"):
        run.outcome(timeout=30)
    assert assert_not_committed(out) == [] and os.listdir(out) == []


def test_a_cluster_with_no_free_cpu_fails_after_the_start_timeout_instead_of_hanging(tiny_checkpoints, tmp_path):
    hog = ProgressBoard.options(num_cpus=2).remote()  # any actor holding both CPUs of the cluster
    ray.get(hog.read.remote())
    try:
        out = str(tmp_path / "out")
        job = prepare_job(make_spec(tiny_checkpoints, out))
        run = Background(lambda: run_ray(job, RayOptions(start_timeout=3), on_progress=lambda n: None))
        with pytest.raises(WorkerStartError, match=r"no worker could be placed in 3s: the cluster has 0 free "
                                                   r"CPUs / 0 free GPUs, each worker asks for 1 CPU\(s\)"):
            run.outcome(timeout=30)
        assert assert_not_committed(out) == [] and os.listdir(out) == []
    finally:
        ray.kill(hog)


def test_workers_the_cluster_cannot_place_leave_their_shards_to_those_that_started(tiny_checkpoints, tmp_path):
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(make_spec(tiny_checkpoints, local_out))
    job = prepare_job(make_spec(tiny_checkpoints, ray_out))
    run = Background(lambda: run_ray(job, RayOptions(workers=3)))  # 2 CPUs: the third never starts
    run.outcome(timeout=60)  # before the fix: its shards waited on it forever
    assert shard_bytes(ray_out) == shard_bytes(local_out)


def test_a_replaced_worker_is_killed_so_it_cannot_commit_after_the_run(tiny_checkpoints, tmp_path):
    job = prepare_job(make_spec(tiny_checkpoints, str(tmp_path / "out")))
    session = OutputSession.open(job)
    pool = _WorkerPool(job, session, RayOptions(workers=1), report_progress=False)
    try:
        old = pool.actors[0]
        ray.get(old.pid.remote())
        # What the driver does when a task reports a RayActorError; an ActorUnavailableError is one
        # while the actor may still be alive and working.
        pool._replace(0)

        def dead() -> bool:  # ray.kill is asynchronous: a call sent at once may still be served
            try:
                ray.get(old.pid.remote(), timeout=60)
            except RayActorError:
                return True
            time.sleep(0.1)
            return False

        wait_for(dead, "the replaced actor to be killed", timeout=30)
    finally:
        pool.kill_all()
        session.stop(RuntimeError("test over"))  # rolls the output back


def _running_workers() -> list[psutil.Process]:
    """This test's ShardWorker processes running a shard (never another session's Ray)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "ray::ShardWorker.run" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_worker_that_stops_answering_does_not_slow_the_others(tiny_checkpoints, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref_out, max_shard_size="1KiB"))
    job = prepare_job(make_spec(tiny_checkpoints, out, max_shard_size="1KiB", chunk_size=1024))
    shards = len(job.plan.shards)
    done_at: list[float] = []
    seen: list[int] = []

    def on_shard(event: str) -> None:
        if event == "done":
            done_at.append(time.monotonic())

    bg = Background(lambda: run_ray(job, RayOptions(workers=2, shards_per_worker=1), on_progress=seen.append,
                                    on_shard=on_shard))
    wait_for(lambda: bool(_running_workers()), "a worker running a shard")
    stopped = _running_workers()[0]
    stopped.send_signal(signal.SIGSTOP)  # a worker on a node that stopped answering
    try:
        since, before = time.monotonic(), len(done_at)
        # It holds at most one shard; the other worker runs the rest.
        wait_for(lambda: len(done_at) >= shards - 1, "the other worker to run the other shards")
        took, handed_off = time.monotonic() - since, len(done_at) - before
    finally:
        stopped.send_signal(signal.SIGCONT)
    bg.outcome()
    # Polling each worker for progress cost the driver up to 0.5 s a loop while one did not answer:
    # at least that much per shard handed to the other worker. Progress must cost it no such wait.
    assert handed_off >= shards // 2 and took < 0.25 * handed_off, (handed_off, took)
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert sum(seen) == job.plan.read_bytes


def test_verify_kept_re_hashes_kept_shards_in_ray_tasks_not_on_the_driver(tiny_checkpoints, tmp_path,
                                                                          monkeypatch):
    """A resumed 405B run must not re-read its kept shards one by one on the driver: with
    ``verify_kept`` they are hashed as Ray tasks, and one whose bytes changed under an unchanged
    version is written again."""
    import json
    import shutil

    from graft.engine.run import session as session_module
    from graft.engine.run.job import fingerprint
    from graft.engine.run.runmark import RUN_MARK
    from graft.engine.storage import Storage

    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    shards = list(run_local(make_spec(tiny_checkpoints, ref)).results)
    os.makedirs(out)
    for r in shards[:3]:
        shutil.copy2(os.path.join(ref, r.file), os.path.join(out, r.file))
    store = Storage(out)
    journal = {r.file: {"size": r.size, "sha256": r.sha256, "version": store.stat(r.file).version}
               for r in shards[:3]}
    job = prepare_job(make_spec(tiny_checkpoints, out))
    with open(os.path.join(out, RUN_MARK), "w") as f:
        json.dump({"token": "crashed", "interrupted": True, "fingerprint": fingerprint(job),
                   "shards": journal}, f)
    rotten = os.path.join(out, shards[1].file)
    st = os.stat(rotten)
    with open(rotten, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    os.utime(rotten, ns=(st.st_atime_ns, st.st_mtime_ns))
    on_driver: list[str] = []
    monkeypatch.setattr(session_module, "hash_file", lambda *a: on_driver.append(a[1]))
    result = run_ray(job, RayOptions(workers=2), verify_kept=True)
    assert on_driver == []
    assert result.manifest["run"]["resumed_shards"] == sorted([shards[0].file, shards[2].file])
    assert shard_bytes(out) == shard_bytes(ref)


def test_a_resized_vocabulary_streams_in_small_chunks_on_ray_to_the_same_bytes(tmp_path):
    """vocab: pad pieces (rows of one checkpoint, zeros for the others) cross to Ray workers and
    split into chunks like any tensor: the same bytes as one local run with the default chunk."""
    from test_vocab import _trio

    from graft.engine.plan.specfile import spec_from_mapping

    trio = _trio(tmp_path / "trio", False)
    local_out, ray_out = str(tmp_path / "local"), str(tmp_path / "ray")
    run_local(spec_from_mapping({**trio, "output": local_out, "vocab": "pad"}))
    run_ray(prepare_job(spec_from_mapping({**trio, "output": ray_out, "vocab": "pad", "chunk_size": 64})),
            RayOptions(workers=2))
    assert shard_bytes(ray_out) == shard_bytes(local_out)
    assert verify_output(ray_out).ok
