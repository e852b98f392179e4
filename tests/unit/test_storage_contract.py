"""One storage contract, run unchanged on a local directory, memory://, a real S3 server (moto on
127.0.0.1), the Google Cloud Storage emulator and Azurite (``cloud_servers``)."""
from __future__ import annotations

import threading
import time
import uuid

import fsspec
import fsspec.implementations.memory
import pytest

from conftest import new_bucket, unfinished_uploads
from graft.engine.errors import IntegrityError, StorageError
from graft.engine.storage import Storage


@pytest.fixture(params=["local", "memory", "s3", "gcs", "azure"])
def store(request, tmp_path):  # noqa: ANN201
    """An empty, existing directory of its own on the backend under test."""
    if request.param in ("gcs", "azure"):
        from cloud_servers import leftovers, new_root

        options = request.getfixturevalue(f"{request.param}_server")
        root = new_root(options)
        yield Storage(f"{root}/store", options)
        assert leftovers(options, root) == []  # every writer committed, or dropped its blocks / session
        return
    if request.param == "local":
        s = Storage(str(tmp_path / "store"))
        s.makedirs()
        yield s
        return
    if request.param == "s3":
        options = request.getfixturevalue("s3_server")
        bucket = new_bucket(options)
        yield Storage(f"{bucket}/store", options)
        assert unfinished_uploads(options, bucket) == []  # every writer completed or aborted
        return
    root = f"memory://graft-contract-{uuid.uuid4().hex}"
    s = Storage(root)
    s.makedirs()
    yield s
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _everything_under(store: Storage) -> list[str]:
    """Every entry below the directory, hidden temporary files and sub-directories included."""
    root = store.root.rstrip("/")
    return sorted(p[len(root) + 1:] for p in store.fs.find(store.root, withdirs=True)
                  if p.rstrip("/") != root)


def test_write_bytes_then_read_stat_and_list(store):
    store.write_bytes("a.bin", b"0123456789")
    store.write_bytes("b.json", b"{}")
    assert store.read("a.bin") == b"0123456789"
    assert store.stat("a.bin").size == 10
    assert store.stat("a.bin").name == "a.bin"
    assert store.list() == ["a.bin", "b.json"]
    assert store.exists("a.bin") and not store.exists("c.bin")


def test_write_bytes_replaces_an_existing_file(store):
    store.write_bytes("a.bin", b"old contents")
    store.write_bytes("a.bin", b"new")
    assert store.read("a.bin") == b"new"
    assert store.list() == ["a.bin"]


@pytest.mark.parametrize("start,end", [(0, 1), (2, 5), (0, 100), (99, 100), (37, 37), (50, 64)])
def test_read_returns_exactly_the_asked_range(store, start, end):
    data = bytes(range(100))
    store.write_bytes("a.bin", data)
    assert store.read("a.bin", start, end) == data[start:end]


@pytest.mark.parametrize("start,end", [(0, 101), (95, 120), (200, 210)])
def test_read_past_the_end_is_an_integrity_error(store, start, end):
    store.write_bytes("a.bin", bytes(100))
    with pytest.raises(IntegrityError) as caught:
        store.read("a.bin", start, end)
    assert "a.bin" in str(caught.value)


def test_reader_fills_caller_buffers_and_counts_bytes(store):
    data = bytes(range(256)) * 4
    store.write_bytes("a.bin", data)
    first, second = bytearray(10), bytearray(300)
    with store.reader("a.bin") as r:
        r.read_into(40, memoryview(first))
        r.read_into(700, memoryview(second))
        assert r.bytes_read == 310
    assert bytes(first) == data[40:50]
    assert bytes(second) == data[700:1000]


def test_reader_fills_a_slice_of_a_larger_buffer(store):
    store.write_bytes("a.bin", b"abcdefgh")
    buf = bytearray(b"........")
    with store.reader("a.bin") as r:
        r.read_into(2, memoryview(buf)[3:6])
    assert bytes(buf) == b"...cde.."


def test_reader_read_past_the_end_is_an_integrity_error(store):
    store.write_bytes("a.bin", bytes(100))
    with store.reader("a.bin") as r:
        with pytest.raises(IntegrityError) as caught:
            r.read_into(90, memoryview(bytearray(20)))
    assert "a.bin" in str(caught.value)


def test_writer_context_manager_commits_on_success(store):
    with store.writer("out.bin") as w:
        w.write(b"hello ")
        w.write(memoryview(b"world"))
        assert not store.exists("out.bin")  # invisible until commit
    assert w.bytes_written == 11
    assert store.read("out.bin") == b"hello world"
    assert _everything_under(store) == ["out.bin"]


def test_explicit_commit_publishes_the_file(store):
    w = store.writer("out.bin")
    w.write(b"x" * 1000)
    w.commit()
    assert store.stat("out.bin").size == 1000
    assert _everything_under(store) == ["out.bin"]


def test_exception_inside_the_writer_leaves_nothing_behind(store):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.writer("out.bin") as w:
            w.write(b"partial data")
            raise Boom()
    assert not store.exists("out.bin")
    assert store.list() == []
    assert _everything_under(store) == []  # no temporary file either


def test_exception_inside_the_writer_keeps_the_previous_file(store):
    store.write_bytes("out.bin", b"committed")
    with pytest.raises(RuntimeError):
        with store.writer("out.bin") as w:
            w.write(b"replacement")
            raise RuntimeError("fail mid-write")
    assert store.read("out.bin") == b"committed"
    assert _everything_under(store) == ["out.bin"]


def test_discard_leaves_nothing_behind(store):
    w = store.writer("out.bin")
    w.write(b"abc" * 100)
    w.discard()
    assert not store.exists("out.bin")
    assert _everything_under(store) == []


def test_discard_before_any_write_leaves_nothing_behind(store):
    store.writer("out.bin").discard()
    assert _everything_under(store) == []


def test_list_leaves_out_sub_directories(store):
    store.write_bytes("top.bin", b"1")
    sub = Storage(store.uri + "/sub", store.storage_options)
    sub.makedirs()
    sub.write_bytes("inner.bin", b"2")
    assert store.list() == ["top.bin"]
    assert sub.list() == ["inner.bin"]
    assert store.subdirectories() == ["sub"] and sub.subdirectories() == []


def test_list_of_a_missing_directory_is_empty(store):
    assert Storage(store.uri + "/absent", store.storage_options).list() == []
    assert Storage(store.uri + "/absent", store.storage_options).subdirectories() == []


def test_remove_deletes_and_tolerates_a_missing_file(store):
    store.write_bytes("a.bin", b"1")
    store.remove("a.bin")
    assert store.list() == []
    store.remove("a.bin")  # already gone: fine
    store.remove("never-existed.bin")
    assert store.list() == []


def test_stat_of_a_missing_file_is_a_storage_error(store):
    with pytest.raises(StorageError) as caught:
        store.stat("missing.bin")
    assert str(caught.value) == f"{store.url('missing.bin')}: no such file"


def test_read_of_a_missing_file_is_a_storage_error(store):
    with pytest.raises(StorageError, match="missing.bin: no such file"):
        store.read("missing.bin")


def test_url_names_the_file_inside_the_directory(store):
    assert store.url("a.bin") == f"{store.uri}/a.bin"
    assert store.path("a.bin").endswith("/a.bin")


def test_an_empty_file_round_trips(store):
    store.write_bytes("empty.bin", b"")
    assert store.stat("empty.bin").size == 0
    assert store.read("empty.bin") == b""
    assert store.read("empty.bin", 0, 0) == b""
    assert store.list() == ["empty.bin"]


def test_reading_a_missing_file_through_a_reader_is_a_storage_error(store):
    with pytest.raises(StorageError, match="missing.bin"):
        with store.reader("missing.bin") as r:
            r.read_into(0, memoryview(bytearray(4)))


def test_unknown_protocol_says_what_to_install():
    with pytest.raises(StorageError, match="no filesystem for protocol 'nosuchproto'.*pip install"):
        Storage("nosuchproto://bucket/x")


@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_reader_splits_large_ranges_into_parts_and_still_fills_exactly(store, concurrency):
    data = bytes(range(251)) * 15000  # ~3.6 MiB, not a multiple of any part size
    store.write_bytes("big.bin", data)
    buf = bytearray(len(data))
    with store.reader("big.bin", concurrency) as r:
        r.read_into(5, memoryview(buf)[1:-4])
        assert r.bytes_read == len(data) - 5
        with pytest.raises(IntegrityError, match="big.bin"):
            r.read_into(100, memoryview(bytearray(len(data))))
    assert bytes(buf[1:-4]) == data[5:]
    assert buf[0] == 0 and bytes(buf[-4:]) == bytes(4)


class _CountingMemoryFS(fsspec.implementations.memory.MemoryFileSystem):
    """memory:// that records how many range reads are in flight at once."""

    protocol = "countingmem"
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def cat_file(self, path, start=None, end=None, **kwargs):  # noqa: ANN001, ANN201
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.most = max(cls.most, cls.in_flight)
        try:
            time.sleep(0.05)  # long enough for the other parts to start
            return super().cat_file(path, start=start, end=end, **kwargs)
        finally:
            with cls.lock:
                cls.in_flight -= 1


def test_remote_reader_keeps_several_ranges_in_flight():
    fsspec.register_implementation("countingmem", _CountingMemoryFS, clobber=True)
    store = Storage(f"countingmem://graft-{uuid.uuid4().hex}")
    data = bytes(range(256)) * (4 * 2**12)  # 4 MiB: four 1 MiB parts
    store.fs.pipe_file(store.path("a.bin"), data)
    buf = bytearray(len(data))
    _CountingMemoryFS.most = 0
    with store.reader("a.bin", 4) as r:
        r.read_into(0, memoryview(buf))
    assert bytes(buf) == data
    assert _CountingMemoryFS.most == 4
    _CountingMemoryFS.most = 0
    with store.reader("a.bin", 1) as r:
        r.read_into(0, memoryview(buf))
    assert _CountingMemoryFS.most == 1


def test_s3_connection_pool_covers_the_reads_in_flight_unless_set():
    default = Storage("s3://bucket/x", {"s3": {"anon": True}})
    assert default.fs.config_kwargs["max_pool_connections"] >= 3 * 8
    mine = Storage("s3://bucket/y", {"s3": {"anon": True, "config_kwargs": {"max_pool_connections": 5}}})
    assert mine.fs.config_kwargs["max_pool_connections"] == 5


def test_s3_retries_are_graft_s_alone_unless_botocore_s_are_set():
    # s3fs and botocore each retry on their own; stacked under graft's layer they multiply.
    default = Storage("s3://bucket/r", {"s3": {"anon": True}})
    assert default.fs.retries == 1
    assert default.fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 1}
    assert default.fs.s3.meta.config.retries["total_max_attempts"] == 1  # the client botocore built
    mine = Storage("s3://bucket/q", {"s3": {"anon": True, "config_kwargs": {"retries": {"mode": "adaptive"}}}})
    assert mine.fs.config_kwargs["retries"] == {"mode": "adaptive"}
    assert mine.fs.retries == 1


def test_check_digest_accepts_the_right_hashes_and_names_the_file_otherwise():
    import hashlib

    from graft.engine.storage import check_digest

    data = b"weights"
    check_digest("x", data, f"sha256:{hashlib.sha256(data).hexdigest()}")
    git = hashlib.sha1(b"blob 7\0weights").hexdigest()  # what `git hash-object` prints for the file
    check_digest("x", data, f"git-sha1:{git}")
    with pytest.raises(IntegrityError, match=r"^hf://o/r@s/config\.json: content does not match its recorded sha256"):
        check_digest("hf://o/r@s/config.json", b"other", f"sha256:{hashlib.sha256(data).hexdigest()}")
    with pytest.raises(IntegrityError, match="git-sha1"):
        check_digest("f", b"other", f"git-sha1:{git}")


def test_a_local_write_larger_than_the_writeback_step_round_trips(tmp_path):
    # Past 64 MiB the local writer starts the kernel's writeback as it goes; the bytes must not care.
    store = Storage(str(tmp_path))
    piece = bytes(range(256)) * 4096  # 1 MiB
    with store.writer("big.bin") as w:
        for i in range(70):
            w.write(piece[i:] + piece[:i])
    with open(tmp_path / "big.bin", "rb") as f:
        for i in range(70):
            assert f.read(len(piece)) == piece[i:] + piece[:i]


@pytest.mark.parametrize("uri, kind", [("/data/x", "LocalStorage"), ("file:///data/x", "LocalStorage"),
                                       ("s3://bucket/x", "S3Storage"), ("hf://org/repo", "HubStorage"),
                                       ("memory://x", "FsspecStorage")])
def test_the_store_is_chosen_by_protocol_and_kept_by_copies(uri, kind):
    import copy
    import pickle

    if kind == "HubStorage":
        pytest.importorskip("huggingface_hub")
    store = Storage(uri, {"s3": {"anon": True}})
    assert type(store).__name__ == kind and isinstance(store, Storage)
    for twin in (pickle.loads(pickle.dumps(store)), copy.copy(store)):
        assert type(twin) is type(store) and twin.uri == store.uri
