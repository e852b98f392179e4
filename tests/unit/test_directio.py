"""Local output written past the page cache (O_DIRECT): the bytes, the fall-back, the errors."""
from __future__ import annotations

import errno
import fcntl
import os

import pytest

import graft.engine.storage.directio as directio
import graft.engine.storage.writers as writers_mod
from graft.engine.storage.directio import ALIGN, DirectAppender
from graft.engine.errors import StorageError
from graft.engine.storage import Storage

BLOCK = 4 * ALIGN  # small blocks so that every path (partial, whole, many blocks) runs in a test


def _pieces(seed: int) -> list[bytes]:
    """Sizes around every boundary: empty, sub-alignment, alignment +-1, a block +-1, several blocks,
    and one above the size where numpy does the copy."""
    sizes = [0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 100_003]
    return [bytes((seed + i * 31 + k) % 251 for k in range(n)) for i, n in enumerate(sizes)]


def _append(path: str, pieces: list[bytes], block: int = BLOCK) -> bool:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        app = DirectAppender(fd, block)
        for p in pieces:
            app.write(p)
        direct = app.direct
        app.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    return direct


@pytest.mark.parametrize("order", ["as-is", "reversed"])
def test_every_size_round_trips_in_order(tmp_path, order):
    pieces = _pieces(3)
    if order == "reversed":
        pieces = pieces[::-1]
    _append(str(tmp_path / "f.bin"), pieces)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_whole_blocks_bypass_the_page_cache_where_the_filesystem_allows(tmp_path):
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        app = DirectAppender(fd, BLOCK)
        if not app.direct:
            app.close()
            pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        app.write(b"x" * (BLOCK + 10))
        app.finish()  # the unaligned tail goes through the page cache: O_DIRECT is off again
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == b"x" * (BLOCK + 10)


def test_a_filesystem_that_refuses_o_direct_up_front_gets_ordinary_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(directio, "_set_direct", lambda fd, on: False)
    pieces = _pieces(5)
    assert _append(str(tmp_path / "f.bin"), pieces) is False
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_a_filesystem_that_refuses_direct_writes_midway_loses_nothing(tmp_path, monkeypatch):
    # No filesystem mountable here accepts O_DIRECT at open and then refuses the write (some FUSE
    # and network filesystems do): the refusal, EINVAL from write(2) while O_DIRECT is set, is
    # simulated from the third direct write on.
    real_write, direct_writes = os.write, []

    def write(fd: int, data: memoryview) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_writes.append(len(data))
            if len(direct_writes) >= 3:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", write)
    pieces = _pieces(7) * 3
    assert _append(str(tmp_path / "f.bin"), pieces) is False
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)
    assert len(direct_writes) == 3


def test_a_failed_device_write_surfaces_and_names_the_file(tmp_path, monkeypatch):
    def full(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(directio.os, "write", full)
    store = Storage(str(tmp_path))
    with pytest.raises(StorageError, match=r"big\.bin: cannot (write|commit).*the disk is full"):
        with store.writer("big.bin") as w:
            for _ in range(4):
                w.write(b"y" * directio.BLOCK)
    assert sorted(os.listdir(tmp_path)) == []  # no temporary file, nothing at the final name


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_the_local_writer_gives_the_same_bytes_either_way(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(writers_mod, "_DIRECT_WRITES", direct)
    store = Storage(str(tmp_path))
    pieces = _pieces(11) + [os.urandom(directio.BLOCK + 12345)]
    with store.writer("out.bin") as w:
        for p in pieces:
            w.write(memoryview(p))
    assert w.bytes_written == sum(map(len, pieces))
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    assert os.listdir(tmp_path) == ["out.bin"]


def test_discard_after_direct_writes_leaves_nothing(tmp_path):
    store = Storage(str(tmp_path))
    w = store.writer("gone.bin")
    w.write(b"z" * (directio.BLOCK * 2 + 1))
    w.discard()
    w.discard()  # twice is harmless
    assert os.listdir(tmp_path) == []
