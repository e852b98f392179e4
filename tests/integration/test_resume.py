"""Resume after a crashed driver, and the run mark as a lock a crashed run cannot hold forever."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import shard_bytes, stop_after_first_shard
from live_runs import Background, shard_in_progress, wait_for
from test_transfer_local import make_spec
from graft.engine.errors import OutputError
from graft.engine.run.job import fingerprint, prepare_job
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import verify_output
from graft.engine.run.runmark import RUN_MARK


@pytest.fixture(autouse=True)
def quick_marks(monkeypatch):  # noqa: ANN001, ANN201
    """A mark is judged stale after 1 s unchanged (not 30), heartbeats every 0.1 s."""
    from graft.engine.run import runmark

    monkeypatch.setattr(runmark, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(runmark, "STALE_AFTER_SECONDS", 1.0)


def foreign_mark(**fields) -> dict:  # noqa: ANN003
    return {"token": "someone-else", "host": "elsewhere", "pid": 1, "heartbeat": time.time(),
            "beat": 1, "fingerprint": "", "shards": {}, **fields}


def write_mark(out: str, **fields) -> None:  # noqa: ANN003
    """The mark of a run on another host that is not writing it any more (unless the test does).
    Replaced atomically, as graft writes its marks: a reader never sees it half written."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f"{os.path.basename(out)}{RUN_MARK}.tmp")
    with open(tmp, "w") as f:
        json.dump(foreign_mark(**fields), f)
    os.replace(tmp, os.path.join(out, RUN_MARK))


class ForeignRun(threading.Thread):
    """A live run elsewhere: rewrites its mark every 50 ms, like a heartbeat."""

    def __init__(self, out: str, **fields):  # noqa: ANN003
        super().__init__(daemon=True)
        self.out, self.fields, self.done = out, fields, threading.Event()
        write_mark(out, **fields)
        self.start()

    def run(self) -> None:
        beat = 1
        while not self.done.wait(0.05):
            beat += 1
            write_mark(self.out, **{**self.fields, "beat": beat})

    def __enter__(self) -> ForeignRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def journal(out: str, results, **extra) -> dict:  # noqa: ANN001, ANN003
    """A journal entry per shard as a run writes it: size, sha256, the store's version."""
    from graft.engine.storage import Storage

    store = Storage(out)
    return {r.file: {"size": r.size, "sha256": r.sha256, "version": store.stat(r.file).version, **extra}
            for r in results}


def test_a_crashed_run_of_the_same_job_keeps_only_its_intact_shards(tiny_checkpoints, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, ref))
    job = prepare_job(make_spec(tiny_checkpoints, out))
    shards = [r for r in result.results]
    assert len(shards) >= 3
    # What a killed run leaves: two journaled shards (one since cut short), a stale mark, a temp file.
    os.makedirs(out)
    for r in shards[:2]:
        shutil.copy(os.path.join(ref, r.file), os.path.join(out, r.file))
    entries = journal(out, shards[:2])
    with open(os.path.join(out, shards[1].file), "r+b") as f:
        f.truncate(shards[1].size - 3)
    open(os.path.join(out, f".{shards[2].file}.graft-tmp-abc"), "wb").write(b"partial")
    write_mark(out, fingerprint=fingerprint(job), shards=entries)
    logs: list[str] = []
    resumed = run_local(job, log=logs.append)
    assert resumed.manifest["run"]["resumed_shards"] == [shards[0].file]
    assert any("keeping 1 shard" in line for line in logs)
    assert shard_bytes(out) == shard_bytes(ref)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_kept_shards_are_vouched_for_by_size_and_version_and_hashed_only_on_request(
        tiny_checkpoints, tmp_path, monkeypatch):
    """A resume of a 405B job must not re-read ~750 GB on the driver: the journal's size and store
    version vouch for a kept shard; ``verify_kept`` hashes them (in parallel), and catches a shard
    whose bytes changed under an unchanged version; a changed version is always hashed."""
    from graft.engine.run import session as session_module

    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    shards = list(run_local(make_spec(tiny_checkpoints, ref)).results)
    hashed: list[str] = []
    real_hash = session_module.hash_file
    monkeypatch.setattr(session_module, "hash_file", lambda s, n, size: hashed.append(n) or real_hash(s, n, size))

    def crashed_run(rot: bool, verify_kept: bool) -> tuple[list[str], bytes]:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        for r in shards[:2]:
            shutil.copy2(os.path.join(ref, r.file), os.path.join(out, r.file))
        write_mark(out, fingerprint=fingerprint(prepare_job(make_spec(tiny_checkpoints, out))),
                   shards=journal(out, shards[:2]))
        rotten = os.path.join(out, shards[0].file)
        if rot:  # bit rot: same size, same modification time, other bytes
            st = os.stat(rotten)
            with open(rotten, "r+b") as f:
                f.seek(-1, 2)
                f.write(b"\x00" if open(rotten, "rb").read()[-1:] != b"\x00" else b"\x01")
            os.utime(rotten, ns=(st.st_atime_ns, st.st_mtime_ns))
        hashed.clear()
        again = run_local(make_spec(tiny_checkpoints, out), verify_kept=verify_kept)
        return again.manifest["run"]["resumed_shards"], open(rotten, "rb").read()

    kept, _ = crashed_run(rot=False, verify_kept=False)
    assert kept == sorted(r.file for r in shards[:2]) and hashed == []
    kept, data = crashed_run(rot=True, verify_kept=True)
    assert kept == [shards[1].file] and sorted(hashed) == sorted(r.file for r in shards[:2])
    assert data == open(os.path.join(ref, shards[0].file), "rb").read()  # written again
    assert shard_bytes(out) == shard_bytes(ref)


def test_a_crashed_run_of_another_job_keeps_nothing(tiny_checkpoints, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, ref, alpha=0.5))
    os.makedirs(out)
    first = result.results[0]
    shutil.copy(os.path.join(ref, first.file), os.path.join(out, first.file))
    write_mark(out, fingerprint="another-job", shards=journal(out, [first]))
    again = run_local(make_spec(tiny_checkpoints, out))  # alpha 1: a different job
    assert again.manifest["run"]["resumed_shards"] == []
    assert again.results[0].sha256 != first.sha256


def test_a_changed_job_after_a_stopped_run_is_told_to_graft_clean_and_then_runs(tiny_checkpoints, tmp_path):
    """A stopped run left shards under its own names; the job changed (max_shard_size: other names).
    The refusal names the command that starts over, and after it the changed job runs."""
    from graft.engine.run.clean import clean_output

    out = str(tmp_path / "out")
    stop_after_first_shard(make_spec(tiny_checkpoints, out), out)
    left = sorted(os.listdir(out))
    changed = make_spec(tiny_checkpoints, out, max_shard_size="60KB")
    with pytest.raises(OutputError, match=rf"^{re.escape(out)} is not empty: it holds the files of an unfinished graft "
                                          rf"run of a different job \(.*\); to start this job over there, run: graft "
                                          rf"clean {re.escape(out)} \(the unchanged job that stopped would resume "
                                          rf"instead\), or choose another output$"):
        run_local(changed)
    assert sorted(os.listdir(out)) == left
    clean_output(out)
    run_local(changed)
    assert verify_output(out).ok


# --- staleness judged on this run's own clock ------------------------------------------------------

def test_a_mark_that_keeps_changing_is_a_live_run_whatever_its_clock_says(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    from graft.engine.run.session import OutputSession

    job = prepare_job(make_spec(tiny_checkpoints, out))
    with ForeignRun(out, heartbeat=time.time() - 3600):  # its wall clock is an hour behind ours
        with pytest.raises(OutputError, match="being written by another graft run.*host elsewhere"):
            OutputSession.check(job)
        with pytest.raises(OutputError, match="being written by another graft run.*host elsewhere"):
            run_local(job)
        assert os.listdir(out) == [RUN_MARK]


def test_a_mark_that_does_not_change_is_stale_whatever_its_clock_says(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    write_mark(out, heartbeat=time.time() + 3600)  # its wall clock is an hour ahead: looks fresh
    logs: list[str] = []
    started = time.monotonic()
    run_local(make_spec(tiny_checkpoints, out), log=logs.append)
    assert time.monotonic() - started >= 1.0  # it watched the mark for the stale period first
    assert any("watching it for up to 1s" in line for line in logs)
    assert os.path.exists(os.path.join(out, "graft.manifest.json"))


def test_a_dead_pid_counts_only_in_the_same_process_space(tiny_checkpoints, tmp_path, monkeypatch):
    from graft.engine.run import runmark

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = dict(host=os.uname().nodename, pid=dead.pid)
    out = str(tmp_path / "out")
    os.makedirs(out)
    # Same host name and a pid that is gone here, but another PID namespace (a container): alive.
    with ForeignRun(out, process_space="another-boot:4026531836", **here):
        with pytest.raises(OutputError, match="being written by another graft run"):
            run_local(make_spec(tiny_checkpoints, out))
    # The same process space: its pid is really gone, taken over at once (no watching).
    monkeypatch.setattr(runmark, "STALE_AFTER_SECONDS", 600.0)
    write_mark(out, process_space=runmark._PROCESS_SPACE, **here)
    logs: list[str] = []
    run_local(make_spec(tiny_checkpoints, out), log=logs.append)
    assert not any("watching" in line for line in logs)


# --- compare-and-swap: of two runs, exactly one gets the output --------------------------------------

@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def mark_store(request, tmp_path):  # noqa: ANN001, ANN201
    from cloud_servers import new_root
    from conftest import new_bucket

    from graft.engine.storage import Storage

    if request.param == "local":
        (tmp_path / "out").mkdir()
        return Storage(str(tmp_path / "out"))
    if request.param in ("gcs", "azure"):
        options = request.getfixturevalue(f"{request.param}_server")
        return Storage(f"{new_root(options)}/out", options)
    options = request.getfixturevalue("s3_server")
    return Storage(f"{new_bucket(options)}/out", options)


def test_two_runs_creating_the_mark_at_once_exactly_one_wins(mark_store):
    from graft.engine.run.runmark import RunMark, read_mark

    first, second = RunMark(mark_store, "fp", {}), RunMark(mark_store, "fp", {})
    first.acquire(None)
    with pytest.raises(OutputError, match="being written by another graft run"):
        second.acquire(None)  # it too saw no mark: the store refuses the second create
    assert read_mark(mark_store)["token"] == first.token
    first.release()


def test_two_runs_taking_over_one_stale_mark_exactly_one_wins(mark_store):
    from graft.engine.run.runmark import RunMark, observe, read_mark

    mark_store.write_bytes(RUN_MARK, json.dumps(foreign_mark(interrupted=True)).encode())
    stale = observe(mark_store)
    first, second = RunMark(mark_store, "fp", {}), RunMark(mark_store, "fp", {})
    first.acquire(stale)
    with pytest.raises(OutputError, match="being written by another graft run"):
        second.acquire(stale)  # both judged the same mark stale; only one replaces it
    assert read_mark(mark_store)["token"] == first.token
    first.release()


def test_a_run_that_was_taken_over_finds_out_on_its_next_write_and_never_overwrites_the_owner(mark_store):
    from graft.engine.run.runmark import RunMark, observe, read_mark

    old = RunMark(mark_store, "fp", {})
    old.acquire(None)
    old._stop_heartbeat()  # a run that stalled: its heartbeat stopped long enough to be judged dead
    new = RunMark(mark_store, "fp", {})
    new.acquire(observe(mark_store))
    with pytest.raises(OutputError, match="another graft run took over this output"):
        old.record("model-00001-of-00002.safetensors", 5, "0" * 64, "v1")
    assert read_mark(mark_store)["token"] == new.token and read_mark(mark_store)["shards"] == {}
    new.release()


def test_a_writer_killed_in_the_instant_its_mark_was_moved_aside_leaves_a_resumable_output(
        tiny_checkpoints, tmp_path):
    """On local disk a replace moves the mark aside, then links the new one; a run killed between
    the two leaves no mark at its name. The next run must find the one moved aside (not call the
    output "not empty", which no command could fix) and resume from its journal."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    shards = list(run_local(make_spec(tiny_checkpoints, ref)).results)
    os.makedirs(out)
    shutil.copy2(os.path.join(ref, shards[0].file), os.path.join(out, shards[0].file))
    write_mark(out, interrupted=True, shards=journal(out, shards[:1]),
               fingerprint=fingerprint(prepare_job(make_spec(tiny_checkpoints, out))))
    os.rename(os.path.join(out, RUN_MARK), os.path.join(out, f".{RUN_MARK}.graft-tmp-old-0123456789ab"))
    again = run_local(make_spec(tiny_checkpoints, out))
    assert again.manifest["run"]["resumed_shards"] == [shards[0].file]
    assert shard_bytes(out) == shard_bytes(ref)
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_run_that_loses_the_race_touches_nothing(tiny_checkpoints, tmp_path):
    """Both runs judged the crashed run's mark stale; the one that lost the compare-and-swap must not
    sweep the winner's temporaries nor hash or keep anything."""
    from graft.engine.run.session import OutputSession

    out = str(tmp_path / "out")
    os.makedirs(out)
    write_mark(out, interrupted=True)
    job = prepare_job(make_spec(tiny_checkpoints, out))
    late = OutputSession.check(job)  # judged stale, then paused
    winner = OutputSession.open(job)
    in_flight = os.path.join(out, ".model-00001-of-00004.safetensors.graft-tmp-0123456789ab")
    open(in_flight, "wb").write(b"the winner's shard being written")
    with pytest.raises(OutputError, match="being written by another graft run"):
        OutputSession.take(job, late)
    assert os.path.exists(in_flight) and winner.mark.confirm()
    winner.stop(KeyboardInterrupt())


def test_two_runs_into_one_output_do_not_interleave(tiny_checkpoints, tmp_path):
    out = str(tmp_path / "out")
    first = Background(lambda: run_local(make_spec(tiny_checkpoints, out, chunk_size=64, report="off")))
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
    from graft.engine.run.runmark import read_mark
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
    from graft.engine.run import runmark
    from graft.engine.errors import StorageError
    from graft.engine.storage import Storage

    monkeypatch.setattr(runmark, "HEARTBEAT_SECONDS", 0.01)
    out = tmp_path / "out"
    out.mkdir()
    storage = Storage(str(out))
    mark = runmark.RunMark(storage, "fp", {})
    mark.acquire(None)
    reads = []

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        reads.append(args)
        raise StorageError(f"{out}/{RUN_MARK}: cannot read bytes: failed after 5 attempts: timed out")

    real_read, real_replace = runmark.cas.read, runmark.cas.replace
    monkeypatch.setattr(runmark.cas, "read", failing)
    monkeypatch.setattr(runmark.cas, "replace", failing)
    wait_for(lambda: len(reads) >= 3, "three heartbeats")
    assert not mark.lost
    monkeypatch.setattr(runmark.cas, "read", real_read)
    monkeypatch.setattr(runmark.cas, "replace", real_replace)
    assert mark.confirm()
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
    from graft.engine.run.session import OutputSession

    out = str(tmp_path / "out")
    session = OutputSession.open(prepare_job(make_spec(tiny_checkpoints, out)))
    _taken_over(out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    session.stop(NonFiniteError("boom") if error == "failure" else KeyboardInterrupt())
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_a_run_that_was_taken_over_commits_nothing(tiny_checkpoints, tmp_path):
    from graft.engine.run.session import OutputSession
    from graft.engine.formats.manifest import MANIFEST_NAME

    out = str(tmp_path / "out")
    job = prepare_job(make_spec(tiny_checkpoints, out))
    session = OutputSession.open(job)
    _taken_over(out)
    with pytest.raises(OutputError, match="another graft run took over this output.*nothing was committed"):
        session.commit(executor="local", workers=1)
    assert MANIFEST_NAME not in os.listdir(out)
    session.mark.abandon()


def test_a_filesystem_without_hard_links_falls_back_to_plain_writes(tiny_checkpoints, tmp_path, monkeypatch):
    """Some mounts (FUSE, SMB, FAT) make no hard links: the lock then works like on a store without
    conditional writes (write, re-read after a pause) instead of failing every run."""
    import errno

    from graft.engine.storage import local_cas

    real_link = os.link

    def no_links(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(tmp_path) in str(dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(local_cas, "_HARD_LINKS", {})
    out = str(tmp_path / "out")
    result = run_local(make_spec(tiny_checkpoints, out))
    assert local_cas._HARD_LINKS == {out: False}
    assert os.path.exists(os.path.join(out, "graft.manifest.json")) and result.manifest["run"]["resumed_shards"] == []
