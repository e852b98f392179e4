"""One storage contract, run on local disk and on memory:// (S3 joins it with the object-store work)."""
from __future__ import annotations

import uuid

import fsspec
import pytest

from graft.engine.errors import IntegrityError, StorageError
from graft.engine.storage import Storage


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):  # noqa: ANN201
    if request.param == "local":
        yield Storage(str(tmp_path / "d"))
        return
    root = f"memory://contract-{uuid.uuid4().hex}"
    yield Storage(root)
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_write_then_read_stat_list(store):
    store.makedirs()
    store.write_bytes("a.bin", b"0123456789")
    assert store.read("a.bin") == b"0123456789"
    assert store.read("a.bin", 2, 5) == b"234"
    assert store.stat("a.bin").size == 10
    assert store.list() == ["a.bin"]
    assert store.exists("a.bin") and not store.exists("b.bin")


def test_reader_fills_buffers_and_counts_bytes(store):
    store.makedirs()
    store.write_bytes("a.bin", bytes(range(100)))
    buf = bytearray(10)
    with store.reader("a.bin") as r:
        r.read_into(40, memoryview(buf))
        assert bytes(buf) == bytes(range(40, 50)) and r.bytes_read == 10
        with pytest.raises(IntegrityError):
            r.read_into(95, memoryview(bytearray(10)))


def test_read_past_the_end_is_an_integrity_error(store):
    store.makedirs()
    store.write_bytes("a.bin", b"abc")
    with pytest.raises(IntegrityError, match="a.bin"):
        store.read("a.bin", 0, 10)


def test_writer_commits_on_success_and_leaves_nothing_on_error(store):
    store.makedirs()
    with store.writer("ok.bin") as w:
        w.write(b"x" * 5)
        w.write(memoryview(b"yz"))
        assert "ok.bin" not in store.list()  # not visible before commit
    assert store.read("ok.bin") == b"xxxxxyz"
    with pytest.raises(RuntimeError):
        with store.writer("bad.bin") as w:
            w.write(b"partial")
            raise RuntimeError("boom")
    assert store.list() == ["ok.bin"]
    w = store.writer("dropped.bin")
    w.write(b"data")
    w.discard()
    assert store.list() == ["ok.bin"]


def test_list_skips_directories_and_remove_is_idempotent(store):
    store.makedirs()
    store.write_bytes("f.bin", b"1")
    Storage(store.url("sub")).makedirs()
    Storage(store.url("sub")).write_bytes("inner.bin", b"2")
    assert store.list() == ["f.bin"]
    store.remove("f.bin")
    store.remove("f.bin")
    assert store.list() == []


def test_missing_file_errors_name_it(store):
    with pytest.raises(StorageError, match="nope.bin: no such file"):
        store.stat("nope.bin")
    with pytest.raises(StorageError, match="nope.bin: no such file"):
        store.read("nope.bin")


def test_unknown_protocol_says_what_to_install():
    with pytest.raises(StorageError, match="no filesystem for protocol"):
        Storage("nosuchproto://bucket/x")
