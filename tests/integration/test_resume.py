"""Resume after a crashed driver, and the run mark as a lock a crashed run cannot hold forever."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import shard_bytes
from live_runs import Background, shard_in_progress, wait_for
from test_transfer_local import make_spec
from graft.engine.errors import OutputError
from graft.engine.job import fingerprint, prepare_job
from graft.engine.local import run_local
from graft.engine.runmark import RUN_MARK, STALE_AFTER_SECONDS


def write_mark(out: str, **fields) -> None:  # noqa: ANN003
    mark = {"token": "someone-else", "host": "elsewhere", "pid": 1, "heartbeat": time.time(),
            "fingerprint": "", "shards": {}, **fields}
    with open(os.path.join(out, RUN_MARK), "w") as f:
        json.dump(mark, f)


def test_a_crashed_run_of_the_same_job_keeps_only_its_intact_shards(tiny_checkpoints, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, ref))
    job = prepare_job(make_spec(tiny_checkpoints, out))
    shards = [r for r in result.results]
    assert len(shards) >= 3
    # What a killed run leaves: two journaled shards (one since corrupted), a stale mark, a temp file.
    os.makedirs(out)
    for r in shards[:2]:
        shutil.copy(os.path.join(ref, r.file), os.path.join(out, r.file))
    with open(os.path.join(out, shards[1].file), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"\xff\xff\xff")
    open(os.path.join(out, f".{shards[2].file}.graft-tmp-abc"), "wb").write(b"partial")
    write_mark(out, heartbeat=time.time() - STALE_AFTER_SECONDS - 1, fingerprint=fingerprint(job),
               shards={r.file: {"size": r.size, "sha256": r.sha256} for r in shards[:2]})
    logs: list[str] = []
    resumed = run_local(job, log=logs.append)
    assert resumed.manifest["run"]["resumed_shards"] == [shards[0].file]
    assert any("keeping 1 shard" in line for line in logs)
    assert shard_bytes(out) == shard_bytes(ref)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_crashed_run_of_another_job_keeps_nothing(tiny_checkpoints, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, ref, alpha=0.5))
    os.makedirs(out)
    first = result.results[0]
    shutil.copy(os.path.join(ref, first.file), os.path.join(out, first.file))
    write_mark(out, heartbeat=0, fingerprint="another-job",
               shards={first.file: {"size": first.size, "sha256": first.sha256}})
    again = run_local(make_spec(tiny_checkpoints, out))  # alpha 1: a different job
    assert again.manifest["run"]["resumed_shards"] == []
    assert again.results[0].sha256 != first.sha256


def test_a_live_run_locks_the_output_and_a_stale_one_does_not(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    write_mark(out)  # another host, fresh heartbeat: a live run
    with pytest.raises(OutputError, match="being written by another graft run.*host elsewhere"):
        run_local(make_spec(tiny_checkpoints, out))
    assert os.listdir(out) == [RUN_MARK]
    write_mark(out, heartbeat=time.time() - STALE_AFTER_SECONDS - 5)  # its heartbeat stopped
    run_local(make_spec(tiny_checkpoints, out))
    write_dead = str(tmp_path / "out2")
    os.makedirs(write_dead)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_mark(write_dead, host=os.uname().nodename, pid=dead.pid)  # this host, process gone
    run_local(make_spec(tiny_checkpoints, write_dead))


def test_two_runs_into_one_output_do_not_interleave(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    first = Background(lambda: run_local(make_spec(tiny_checkpoints, out, chunk_size=64)))
    wait_for(lambda: shard_in_progress(out), "the first run to start")
    with pytest.raises(OutputError, match="being written by another graft run"):
        run_local(make_spec(tiny_checkpoints, out))
    first.outcome()
    assert os.path.exists(os.path.join(out, "graft.manifest.json"))


def _session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines()[1:] if int(line.split()[1]) == sid]


def test_driver_killed_mid_run_then_the_same_command_completes_bit_identical(tiny_checkpoints, tmp_path):
    import yaml

    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    run_local(make_spec(tiny_checkpoints, ref))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_checkpoints, "output": out, "chunk_size": 32}))
    cmd = [sys.executable, "-m", "graft.cluster.cli", "run", str(cfg), "-q", "-v", "--workers", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        def one_journaled_one_going() -> bool:
            # A shard counts as done once the driver journaled it in the run mark (a shard renamed
            # into place but not yet journaled is redone on resume, which is also correct).
            try:
                with open(os.path.join(out, RUN_MARK)) as f:
                    journaled = json.load(f).get("shards") or {}
            except (OSError, ValueError):
                return False
            return bool(journaled) and shard_in_progress(out)
        wait_for(one_journaled_one_going, "a journaled shard and one in progress", timeout=180)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and every process of its group
        driver.wait()
        wait_for(lambda: not _session_processes(driver.pid), "the killed run's workers to exit", 60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    left = os.listdir(out)
    assert "graft.manifest.json" not in left and RUN_MARK in left
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming: keeping" in again.stderr
    assert shard_bytes(out) == shard_bytes(ref)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_refused_output_fails_before_ray_starts(tiny_checkpoints, tmp_path):
    import ray

    from graft.cluster.driver import RayOptions, run_ray

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert not ray.is_initialized()
    with pytest.raises(OutputError, match="not empty"):
        run_ray(prepare_job(make_spec(tiny_checkpoints, str(out))), RayOptions())
    assert not ray.is_initialized()
    assert os.listdir(out) == ["notes.txt"]


# --- the mark read honestly, ownership checked before anything is committed or removed ------------

def test_a_mark_that_cannot_be_read_is_an_error_never_a_missing_mark(tmp_path):
    """One failed read of a live run's mark must not make another run overwrite it, nor make the run
    itself think it was taken over."""
    from faulty_fs import faulty_options, faulty_uri, rule

    from graft.engine.errors import StorageError
    from graft.engine.runmark import read_mark
    from graft.engine.storage import Storage

    out = tmp_path / "out"
    out.mkdir()
    options = faulty_options(str(tmp_path / "journal"), rule("denied", match=RUN_MARK, times=None))
    store = Storage(faulty_uri(str(out)), options)
    assert read_mark(store) is None  # really absent
    write_mark(str(out))
    with pytest.raises(StorageError, match=r"\.graft-run\.json: cannot read"):
        read_mark(store)


def test_a_heartbeat_that_cannot_read_the_mark_does_not_give_the_run_up(tmp_path, monkeypatch):
    from graft.engine import runmark
    from graft.engine.errors import StorageError
    from graft.engine.storage import Storage

    monkeypatch.setattr(runmark, "HEARTBEAT_SECONDS", 0.01)
    out = tmp_path / "out"
    out.mkdir()
    storage = Storage(str(out))
    mark = runmark.RunMark(storage, "fp", {})
    mark.acquire(replacing=False)
    reads = []

    def failing_read(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        reads.append(args)
        raise StorageError(f"{out}/{RUN_MARK}: cannot read bytes: failed after 5 attempts: timed out")

    monkeypatch.setattr(storage, "read", failing_read)
    wait_for(lambda: len(reads) >= 3, "three heartbeats")
    assert not mark.lost
    mark.release()


def _taken_over(out: str) -> None:
    """Another run replaced this run's mark (it judged this run's heartbeat dead) and committed a
    shard of its own."""
    write_mark(out, shards={"model-00001-of-00004.safetensors": {"size": 5, "sha256": "x"}})
    with open(os.path.join(out, "model-00001-of-00004.safetensors"), "wb") as f:
        f.write(b"other")


@pytest.mark.parametrize("error", ["failure", "interrupt"])
def test_a_run_that_was_taken_over_removes_nothing_when_it_stops(tiny_checkpoints, tmp_path, error):
    from graft.engine.errors import NonFiniteError
    from graft.engine.job import OutputSession

    out = str(tmp_path / "out")
    session = OutputSession.open(prepare_job(make_spec(tiny_checkpoints, out)))
    _taken_over(out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    session.stop(NonFiniteError("boom") if error == "failure" else KeyboardInterrupt())
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_run_that_was_taken_over_commits_nothing(tiny_checkpoints, tmp_path):
    from graft.engine.job import OutputSession
    from graft.engine.manifest import MANIFEST_NAME

    out = str(tmp_path / "out")
    job = prepare_job(make_spec(tiny_checkpoints, out))
    session = OutputSession.open(job)
    _taken_over(out)
    with pytest.raises(OutputError, match="another graft run took over this output.*nothing was committed"):
        session.commit(executor="local", workers=1)
    assert MANIFEST_NAME not in os.listdir(out)
    session.mark.release(remove=False)
