"""Storage faults, injected by ``faulty://`` (tests/faulty_fs.py) under whole jobs: transient
faults are retried with backoff and the output is still bit-identical; permanent ones fail the run
with one line naming the file; and whatever fails, no shard is left at a final name, no manifest is
written and no temporary file survives."""
from __future__ import annotations

import asyncio
import errno
import os
import re
import time
from collections import Counter
from typing import Callable

import pytest

import faulty_fs
from conftest import shard_bytes
from faulty_fs import count, faulty_options, faulty_uri, injected, rule
from graft.engine.storage import retry as retry_mod
from graft.engine.errors import GraftError, IntegrityError, StorageError
from graft.engine.run.local import run_local
from graft.engine.formats.manifest import MANIFEST_NAME, verify_output
from graft.engine.plan.specfile import spec_from_mapping
from graft.engine.storage import Storage, is_transient

ROLES = ("target", "finetuned", "base")
# Small chunks: every tensor takes several range reads, so a fault lands in the middle of one.
CHUNK = 16 * 1024
# Past the 64 KiB header probe of every shard: a fault with this ``after`` hits tensor data reads,
# once the job is planned and its output opened.
PAST_HEADERS = 70_000
SHARD = r"model(-\d+-of-\d+)?\.safetensors"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real backoff, in milliseconds instead of seconds (the attempts are the same)."""
    monkeypatch.setattr(retry_mod, "RETRY_BASE_SECONDS", 0.002)
    monkeypatch.setattr(retry_mod, "RETRY_MAX_SECONDS", 0.02)


@pytest.fixture(scope="module")
def clean_run(tiny_checkpoints, tmp_path_factory) -> tuple[dict[str, bytes], list[str]]:  # noqa: ANN001
    """A clean run on local disk: every output file's bytes, and the plan's warnings (which need
    the three config.json files read)."""
    out = str(tmp_path_factory.mktemp("clean") / "out")
    result = run_local(spec_from_mapping({**tiny_checkpoints, "output": out, "chunk_size": CHUNK}))
    return shard_bytes(out), result.manifest["plan"]["warnings"]


@pytest.fixture(scope="module")
def reference_output(clean_run) -> dict[str, bytes]:  # noqa: ANN001
    return clean_run[0]


def faulty_job(ckpts: dict[str, str], output: str, journal: str, *rules: dict, **extra):  # noqa: ANN201
    """A spec reading every input through faulty:// (the output too if it is a faulty:// URI)."""
    return spec_from_mapping({**{r: faulty_uri(ckpts[r]) for r in ROLES}, "output": output,
                              "chunk_size": CHUNK, "storage_options": faulty_options(journal, *rules),
                              **extra})


def assert_left_nothing(local_out: str) -> None:
    """No shard at a final name, no manifest, no temporary file, no run mark: nothing at all."""
    if os.path.isdir(local_out):
        assert os.listdir(local_out) == []


def assert_kept_for_a_resume(local_out: str) -> list[str]:
    """No manifest, no temporary: only shards committed and journaled before the failure."""
    from test_transfer_local import assert_not_committed

    return assert_not_committed(local_out)


def assert_one_line_naming(err: BaseException, pattern: str) -> None:
    message = str(err)
    assert "\n" not in message
    assert re.match(pattern, message), message


# -- transient faults: retried, output exact --------------------------------------------------------

TRANSIENT = {
    "reset after N bytes": rule("reset", match="*.safetensors", after=PAST_HEADERS, times=2),
    "reset at once": rule("reset", match="*.safetensors", times=1),
    "read timeout": rule("timeout", match="*.safetensors", after=PAST_HEADERS, times=2),
    "short read": rule("short", match="*.safetensors", after=PAST_HEADERS, times=2),
    "slow reads": rule("slow", match="*.safetensors", times=None, seconds=0.002),
    "body cut short (aiohttp)": rule("payload", match="*.safetensors", after=PAST_HEADERS, times=1),
    "S3 503 SlowDown on stat": rule("throttle", op="stat", match="*.safetensors", times=2),
    "reset while listing": rule("reset", op="list", times=2),
    "config.json read": rule("timeout", match="config.json", times=3),
    "side file copied at commit": rule("reset", match="tokenizer.json", times=2),
}


@pytest.mark.parametrize("fault", list(TRANSIENT.values()), ids=list(TRANSIENT))
def test_transient_faults_are_retried_and_the_output_is_bit_identical(tiny_checkpoints, tmp_path, clean_run,
                                                                     fault):
    journal, out = str(tmp_path / "journal"), str(tmp_path / "out")
    result = run_local(faulty_job(tiny_checkpoints, out, journal, fault), workers=2)
    files, warnings = clean_run
    assert shard_bytes(out) == files
    assert result.manifest["plan"]["warnings"] == warnings  # no config.json was given up on
    assert verify_output(out).ok
    hits = count(journal)[(fault["kind"], fault["op"])]
    assert hits > 0, "the fault was never injected"
    if fault["times"] is not None:  # each file failed at most `times` calls before it behaved
        per_file = Counter(i.file for i in injected(journal))
        assert max(per_file.values()) <= fault["times"]


def test_transient_faults_on_the_output_store_too(tiny_checkpoints, tmp_path, reference_output):
    # Reads, stats and listings of the output (resume checks, rollback, commit sweep) are retried
    # like the inputs'; the shards themselves go through the rename-on-commit writer.
    journal, local_out = str(tmp_path / "journal"), str(tmp_path / "out")
    rules = (rule("reset", op="list", times=2), rule("throttle", op="stat", times=1),
             rule("timeout", match="*.safetensors", after=PAST_HEADERS, times=1))
    run_local(faulty_job(tiny_checkpoints, faulty_uri(local_out), journal, *rules), workers=2)
    assert shard_bytes(local_out) == reference_output
    kinds = count(journal)
    assert kinds[("reset", "list")] > 0 and kinds[("timeout", "read")] > 0


# -- permanent faults: a clear error, nothing left --------------------------------------------------

PERMANENT = {
    "reset": (rule("reset", match="*.safetensors", after=PAST_HEADERS, times=None),
              rf"failed after 5 attempts: ConnectionResetError: \[Errno {errno.ECONNRESET}\]"),
    "read timeout": (rule("timeout", match="*.safetensors", after=PAST_HEADERS, times=None),
                     r"failed after 5 attempts: TimeoutError: read timed out"),
    "short reads": (rule("short", match="*.safetensors", after=PAST_HEADERS, times=None),
                    r"failed after 5 attempts: short read \(got \d+ of \d+ bytes\)"),
    "body cut short": (rule("payload", match="*.safetensors", after=PAST_HEADERS, times=None),
                       r"failed after 5 attempts: ClientPayloadError"),
    "access denied": (rule("denied", match="*.safetensors", after=PAST_HEADERS, times=None),
                      r"PermissionError: \[Errno 13\] Access Denied"),
}


@pytest.mark.parametrize("fault, says", list(PERMANENT.values()), ids=list(PERMANENT))
def test_permanent_read_faults_fail_the_run_cleanly_mid_run(tiny_checkpoints, tmp_path, fault, says):
    journal, out = str(tmp_path / "journal"), str(tmp_path / "out")
    events: list[str] = []
    with pytest.raises(GraftError) as failure:
        run_local(faulty_job(tiny_checkpoints, out, journal, fault), workers=2, on_shard=events.append)
    assert isinstance(failure.value, StorageError)
    assert_one_line_naming(failure.value, rf"faulty://{re.escape(os.path.dirname(tiny_checkpoints['target']))}"
                                          rf"/(target|finetuned|base)/{SHARD}: cannot read bytes "
                                          rf"\d+\.\.\d+: {says}")
    assert "failed" in events  # it failed in a shard, after the output was opened
    assert_kept_for_a_resume(out)
    if fault["kind"] == "denied":  # not worth a retry: each call failed once
        assert "attempts" not in str(failure.value)


def test_shards_committed_before_a_later_one_cannot_be_read_are_kept_and_the_rerun_resumes(
        tiny_checkpoints, tmp_path, reference_output):
    journal, out = str(tmp_path / "journal"), str(tmp_path / "out")
    # One worker runs the shards in order; only the target's last shard is unreadable.
    fault = rule("reset", match="model-00004-of-00004.safetensors", after=PAST_HEADERS, times=None)
    events: list[str] = []
    with pytest.raises(StorageError, match=r"/target/model-00004-of-00004\.safetensors: .*failed after 5 "
                                           r"attempts") as failure:
        run_local(faulty_job(tiny_checkpoints, out, journal, fault), workers=1, on_shard=events.append)
    assert events.count("done") >= 1 and events[-1] == "failed"
    kept = assert_kept_for_a_resume(out)
    assert len(kept) == events.count("done") and "run the same command to resume" in failure.value.__notes__[0]
    # The store is back: the same job resumes, keeps what was committed and gives the same bytes.
    logged: list[str] = []
    result = run_local(faulty_job(tiny_checkpoints, out, journal), workers=1, log=logged.append)
    assert sorted(result.manifest["run"]["resumed_shards"]) == kept
    assert any(f"keeping {len(kept)} shard(s)" in line for line in logged)
    assert shard_bytes(out) == reference_output


@pytest.mark.parametrize("fault, says", [
    (rule("throttle", op="stat", match="*.safetensors", times=None),
     rf"/{SHARD}: cannot stat: failed after 5 attempts: OSError: \[Errno {errno.EBUSY}\] Please reduce "
     r"your request rate\."),
    (rule("reset", op="list", match="finetuned", times=None),
     r"/finetuned/?: cannot list the directory: failed after 5 attempts: ConnectionResetError"),
], ids=["S3 503 on every stat", "reset on every listing"])
def test_permanent_faults_while_planning_fail_before_any_output(tiny_checkpoints, tmp_path, fault, says):
    journal, out = str(tmp_path / "journal"), str(tmp_path / "out")
    with pytest.raises(StorageError) as failure:
        run_local(faulty_job(tiny_checkpoints, out, journal, fault))
    assert_one_line_naming(failure.value, rf"faulty://\S+{says}")
    assert not os.path.exists(out)


# -- write faults: never retried, the shard and the run are discarded cleanly --------------------

@pytest.mark.parametrize("fault, what", [
    (rule("enospc", match="model-*.safetensors", after=20_000, times=None), "model-0000\\d-of-00004.safetensors"),
    (rule("enospc", match="model-00004-of-00004.safetensors", times=None), "model-00004-of-00004.safetensors"),
    (rule("enospc", match="SHA256SUMS", times=None), "SHA256SUMS"),
    (rule("enospc", match=MANIFEST_NAME, times=None), re.escape(MANIFEST_NAME)),
], ids=["every shard, part-way", "the last shard", "the checksums", "the manifest"])
def test_a_full_disk_while_writing_fails_the_run_and_keeps_only_whole_shards(tiny_checkpoints, tmp_path, fault,
                                                                           what, reference_output):
    journal, local_out = str(tmp_path / "journal"), str(tmp_path / "out")
    with pytest.raises(StorageError) as failure:
        run_local(faulty_job(tiny_checkpoints, faulty_uri(local_out), journal, fault), workers=2)
    assert_one_line_naming(failure.value, rf"faulty://{re.escape(local_out)}/{what}: cannot write: OSError: "
                                          rf"\[Errno {errno.ENOSPC}\] No space left on device.*; the disk or "
                                          rf"bucket is full \(or over its quota\): free some space and run again$")
    assert count(journal)[("enospc", "write")] >= 1
    kept = assert_kept_for_a_resume(local_out)
    if what in ("SHA256SUMS", re.escape(MANIFEST_NAME)):  # every shard was done: the rerun only commits
        assert len(kept) == 4
        result = run_local(faulty_job(tiny_checkpoints, faulty_uri(local_out), journal), workers=2)
        assert len(result.manifest["run"]["resumed_shards"]) == 4
        assert shard_bytes(local_out) == reference_output


def test_a_connection_reset_while_streaming_a_shard_is_not_retried(tiny_checkpoints, tmp_path):
    # The store may hold part of the stream: the shard is discarded and the run fails, even though
    # the fault would have passed (times=1).
    journal, local_out = str(tmp_path / "journal"), str(tmp_path / "out")
    fault = rule("reset", op="write", match="model-*.safetensors", after=20_000, times=1)
    with pytest.raises(StorageError, match=rf"/{SHARD}: cannot write: ConnectionResetError"):
        run_local(faulty_job(tiny_checkpoints, faulty_uri(local_out), journal, fault), workers=1)
    assert count(journal)[("reset", "write")] == 1
    assert_left_nothing(local_out)


def test_a_full_disk_while_taking_the_run_mark_leaves_nothing(tiny_checkpoints, tmp_path):
    journal, local_out = str(tmp_path / "journal"), str(tmp_path / "out")
    fault = rule("enospc", match=".graft-run.json", times=None)
    with pytest.raises(StorageError, match=r"\.graft-run\.json: cannot write: .*the disk or bucket is full"):
        run_local(faulty_job(tiny_checkpoints, faulty_uri(local_out), journal, fault))
    assert_left_nothing(local_out)


# -- the retry policy itself ------------------------------------------------------------------------

def _one_file_store(tmp_path, journal: str, *rules: dict) -> Storage:  # noqa: ANN001
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "a.bin").write_bytes(bytes(range(256)) * 16)
    return Storage(faulty_uri(str(tmp_path / "store")), faulty_options(journal, *rules))


def test_a_transient_fault_is_tried_exactly_retry_attempts_times_with_growing_pauses(tmp_path, monkeypatch):
    monkeypatch.setattr(retry_mod, "RETRY_BASE_SECONDS", 0.02)
    monkeypatch.setattr(retry_mod, "RETRY_MAX_SECONDS", 1.0)
    journal = str(tmp_path / "journal")
    store = _one_file_store(tmp_path, journal, rule("timeout", times=None))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"a\.bin: cannot read bytes 0\.\.100: failed after 5 attempts: "
                                           r"TimeoutError: .*; check the network or the store and run the "
                                           r"same command again$"):
        store.read("a.bin", 0, 100)
    elapsed = time.monotonic() - t0
    assert count(journal)[("timeout", "read")] == 5
    # Pauses of 0.02, 0.04, 0.08, 0.16 s, each jittered down to no less than half.
    assert elapsed >= 0.5 * (0.02 + 0.04 + 0.08 + 0.16)
    monkeypatch.setattr(retry_mod, "RETRY_ATTEMPTS", 3)
    with pytest.raises(StorageError, match="failed after 3 attempts"):
        store.read("a.bin", 0, 100)
    assert count(journal)[("timeout", "read")] == 5 + 3


def test_a_permanent_error_is_not_retried(tmp_path):
    journal = str(tmp_path / "journal")
    store = _one_file_store(tmp_path, journal, rule("denied", times=None))
    with pytest.raises(StorageError, match=r"a\.bin: cannot read bytes 0\.\.10: PermissionError"):
        store.read("a.bin", 0, 10)
    assert count(journal) == Counter({("denied", "read"): 1})
    store = Storage(store.uri, faulty_options(journal + ".stat", rule("denied", op="stat", times=None)))
    with pytest.raises(StorageError, match=r"a\.bin: cannot stat: PermissionError"):
        store.stat("a.bin")
    assert count(journal + ".stat") == Counter({("denied", "stat"): 1})


def test_a_short_read_of_a_file_that_really_is_short_is_an_integrity_error_at_once(tmp_path):
    journal = str(tmp_path / "journal")
    store = _one_file_store(tmp_path, journal)
    with pytest.raises(IntegrityError, match=r"a\.bin: asked for bytes 4000\.\.5000 but got 96"):
        store.read("a.bin", 4000, 5000)


def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter(monkeypatch):
    monkeypatch.setattr(retry_mod, "RETRY_BASE_SECONDS", 0.25)
    monkeypatch.setattr(retry_mod, "RETRY_MAX_SECONDS", 8.0)
    for attempt, full in [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (5, 4.0), (6, 8.0), (9, 8.0)]:
        pauses = [retry_mod.backoff(attempt) for _ in range(200)]
        assert all(full / 2 <= p <= full for p in pauses), attempt
        assert len(set(pauses)) > 1  # jittered: parallel readers do not retry in step


def _s3_error(code: str, status: int) -> BaseException:
    """An error as s3fs raises it for an S3 error response (its own translation, botocore's cause)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"))


def test_transient_and_permanent_errors_are_told_apart():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    transient = [
        ConnectionResetError(errno.ECONNRESET, "reset"), BrokenPipeError(errno.EPIPE, "pipe"),
        ConnectionAbortedError(), TimeoutError(), asyncio.TimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"), OSError(errno.EAGAIN, "again"),
        aiohttp.ClientPayloadError("cut"), aiohttp.ServerDisconnectedError(),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), EndpointConnectionError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
        _s3_error("SlowDown", 503), _s3_error("InternalError", 500), _s3_error("ServiceUnavailable", 503),
    ]
    permanent = [
        FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "no"), IsADirectoryError(),
        OSError(errno.ENOSPC, "full"), OSError(errno.EDQUOT, "quota"), IntegrityError("changed"),
        StorageError("x"), ValueError("bad"), OSError(errno.EIO, "unknown"),
        _s3_error("AccessDenied", 403), _s3_error("NoSuchKey", 404), _s3_error("PreconditionFailed", 412),
        aiohttp.ClientResponseError(None, (), status=404),  # type: ignore[arg-type]
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []
    # A wrapped cause counts: a library error raised from a dropped connection.
    wrapped = OSError(errno.EIO, "read failed")
    wrapped.__cause__ = ConnectionResetError()
    assert is_transient(wrapped)


def test_local_files_get_one_attempt(tmp_path, monkeypatch):
    # A local disk error is the OS's final word: no pause, no second try, the message as before.
    monkeypatch.setattr(retry_mod, "RETRY_BASE_SECONDS", 60.0)
    calls: list[int] = []

    def dropped() -> bytes:
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(StorageError) as failure:
        Storage(str(tmp_path))._retry("a.bin", "read bytes 0..4", dropped)
    assert calls == [1]
    assert str(failure.value) == f"{tmp_path}/a.bin: cannot read bytes 0..4: ConnectionResetError: [Errno 104] reset"


class _Body:
    """The body of a canned HTTP response, as aiobotocore reads it."""

    def __init__(self, data: bytes):
        self._data = data

    async def read(self, n: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data


def _throttle_gets(fs, limit: int) -> tuple[list[str], Callable[[], None]]:  # noqa: ANN001
    """Answer the first ``limit`` GetObject requests of ``fs``'s S3 client with 503 SlowDown, in
    process, before they reach the server (later ones pass through). Returns the list of requests
    seen (one entry per HTTP attempt, whichever layer made it) and a function that undoes it."""
    from aiobotocore.awsrequest import AioAWSResponse

    sent: list[str] = []

    def slow_down(request, **_: object):  # noqa: ANN001, ANN202 - botocore's event signature
        r = request.headers.get("Range")
        sent.append(r.decode() if isinstance(r, bytes) else str(r))
        if len(sent) > limit:
            return None
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        return AioAWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Body(body))

    events = fs.s3.meta.events
    events.register("before-send.s3.GetObject", slow_down, unique_id="graft-test-slowdown")
    return sent, lambda: events.unregister("before-send.s3.GetObject", unique_id="graft-test-slowdown")


@pytest.mark.parametrize("pinned", [False, True], ids=["plain range", "range pinned to its ETag"])
def test_a_throttled_s3_range_is_requested_exactly_retry_attempts_times(s3_server, pinned):
    """graft's retry layer is the only one: s3fs's and botocore's own retries are off, so a range
    that S3 keeps throttling costs RETRY_ATTEMPTS requests (not 5 x 5 x 5), then one clear error."""
    from conftest import new_bucket

    bucket = new_bucket(s3_server)
    # A filesystem of its own: the client's event handlers must not leak into other tests.
    options = {"s3": {**s3_server["s3"], "skip_instance_cache": True}}
    store = Storage(f"{bucket}/d", options)
    store.write_bytes("a.bin", bytes(range(256)) * 16)
    version = store.stat("a.bin").version if pinned else None
    # Requests past this many pass through: on a stack that multiplies retries the read then
    # succeeds (after RETRY_ATTEMPTS + 1 requests) instead of taking minutes to fail.
    sent, undo = _throttle_gets(store.fs, retry_mod.RETRY_ATTEMPTS + 1)
    try:
        try:
            store.read("a.bin", 0, 100, version=version)
            outcome: BaseException | None = None
        except GraftError as e:
            outcome = e
    finally:
        undo()
    assert len(sent) == retry_mod.RETRY_ATTEMPTS, f"{len(sent)} HTTP requests for one range: {sent}"
    assert all(r == "bytes=0-99" for r in sent)
    assert isinstance(outcome, StorageError), outcome
    assert_one_line_naming(outcome, rf"{bucket}/d/a\.bin: cannot read bytes 0\.\.100: failed after "
                                    rf"{retry_mod.RETRY_ATTEMPTS} attempts: .*reduce your request rate")
    assert store.read("a.bin", 0, 4, version=version) == bytes(range(4))  # the store itself is fine


def _throttle_writes(fs, limit: int) -> tuple[list[str], Callable[[], None]]:  # noqa: ANN001
    """Answer the first ``limit`` PutObject / UploadPart requests of ``fs``'s S3 client with 503
    SlowDown, in process; returns the requests seen and a function that undoes it."""
    from aiobotocore.awsrequest import AioAWSResponse

    sent: list[str] = []

    def slow_down(request, **_: object):  # noqa: ANN001, ANN202 - botocore's event signature
        sent.append(request.method)
        if len(sent) > limit:
            return None
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        return AioAWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Body(body))

    from fsspec.asyn import sync

    sync(fs.loop, fs.set_session)
    events = fs.s3.meta.events
    for op in ("PutObject", "UploadPart"):
        events.register(f"before-send.s3.{op}", slow_down, unique_id=f"graft-test-{op}")
    return sent, lambda: [events.unregister(f"before-send.s3.{op}", unique_id=f"graft-test-{op}")
                          for op in ("PutObject", "UploadPart")]


@pytest.mark.parametrize("throttled", [2, 99], ids=["twice", "always"])
def test_a_throttled_s3_write_is_sent_again_by_one_bounded_layer(s3_server, monkeypatch, throttled):
    """Writes are not retried by graft's layer, so each upload request has exactly one of its own
    (botocore's, RETRY_ATTEMPTS in all): a brief throttle costs nothing, a lasting one fails the
    write after exactly RETRY_ATTEMPTS requests, and reads still make one attempt per graft retry."""
    from conftest import new_bucket

    monkeypatch.setattr(retry_mod, "RETRY_ATTEMPTS", 3)  # botocore's pauses: ~1 + 2 s at most
    options = {"s3": {**s3_server["s3"], "skip_instance_cache": True}}
    store = Storage(f"{new_bucket(s3_server)}/d", options)
    sent, undo = _throttle_writes(store.write_fs, throttled)
    try:
        if throttled < retry_mod.RETRY_ATTEMPTS:
            store.write_bytes("a.bin", b"x" * 1000)
            assert store.read("a.bin") == b"x" * 1000
        else:
            with pytest.raises(StorageError, match=r"a\.bin: cannot commit: .*reduce your request rate"):
                store.write_bytes("a.bin", b"x" * 1000)
            assert "a.bin" not in store.list()
    finally:
        undo()
    assert len(sent) == min(throttled + 1, retry_mod.RETRY_ATTEMPTS)
    assert store.fs.retries == 1 and store.write_fs is not store.fs


# -- the Ray executor: faults in worker processes ---------------------------------------------------

@pytest.fixture(scope="module")
def local_ray_with_faulty_fs():  # noqa: ANN201
    """A local Ray whose workers import tests/faulty_fs.py and register faulty:// as they start."""

    tests_dir = os.path.dirname(os.path.abspath(faulty_fs.__file__))
    path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    from conftest import local_ray

    with local_ray(runtime_env={"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": "faulty_fs.register"}):
        yield


def test_transient_faults_in_ray_workers_are_retried_with_bit_identical_output(
        local_ray_with_faulty_fs, tiny_checkpoints, tmp_path, reference_output):
    from graft.cluster.driver import RayOptions, run_ray
    from graft.engine.run.job import prepare_job

    journal, out = str(tmp_path / "journal"), str(tmp_path / "out")
    rules = (rule("reset", match="*.safetensors", after=PAST_HEADERS, times=1),
             rule("timeout", match="model-00002-*", after=PAST_HEADERS + CHUNK, times=1))
    run_ray(prepare_job(faulty_job(tiny_checkpoints, out, journal, *rules)), RayOptions(workers=2))
    assert shard_bytes(out) == reference_output
    in_workers = [i for i in injected(journal) if i.pid != os.getpid()]
    assert {i.kind for i in in_workers} == {"reset", "timeout"}
