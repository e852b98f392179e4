"""The requests graft makes to S3 (on the moto server, the real S3 wire protocol). Uploads: parts
sized from the file's size, several in flight while the writer goes on, one PutObject for a small
file, nothing at the key before commit and no upload left after a failure. Reads: ranges of at
least 8 MiB (AWS's guidance for ranged GETs). Listings: one LIST of the prefix itself, never its
parent."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import new_bucket, unfinished_uploads
from graft.engine.storage import s3write
from graft.engine.errors import StorageError
from graft.engine.storage.s3write import MAX_PARTS, part_size
from graft.engine.storage import Storage


def test_part_size_fits_any_s3_object_in_ten_thousand_parts():
    assert part_size(0) == part_size(10 * 2**20) == 64 * 2**20
    five_tb = 5 * 10**12
    size = part_size(five_tb)
    assert size * MAX_PARTS >= five_tb and size % 2**20 == 0 and size < 2 * five_tb // MAX_PARTS
    assert part_size(1, floor=2**20) == 5 * 2**20  # never under S3's 5 MiB minimum


@pytest.fixture
def store(s3_server):  # noqa: ANN001, ANN201
    return Storage(f"{new_bucket(s3_server)}/out", s3_server)


def _watch_parts(monkeypatch) -> dict[str, int]:  # noqa: ANN001
    """Count parts and the most on the wire at once (each upload held 0.2 s so overlaps show)."""
    seen = {"parts": 0, "now": 0, "most": 0}
    lock = threading.Lock()
    real = s3write.S3PartWriter._upload

    def upload(self, number, body):  # noqa: ANN001, ANN202
        with lock:
            seen["parts"] += 1
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
        try:
            time.sleep(0.2)
            return real(self, number, body)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(s3write.S3PartWriter, "_upload", upload)
    return seen


def test_parts_go_up_several_at_once_and_the_object_appears_whole_at_commit(store, monkeypatch):
    monkeypatch.setattr(s3write, "MIN_PART", 5 * 2**20)
    seen = _watch_parts(monkeypatch)
    data = bytes(range(256)) * (4 * 2**20 * 4 // 256) + b"tail"  # 16 MiB + 4 bytes: 4 parts
    w = store.writer("shard.safetensors", len(data))
    started = time.monotonic()
    for i in range(0, len(data), 2**20):
        w.write(data[i:i + 2**20])
    writing = time.monotonic() - started
    assert "shard.safetensors" not in store.list()  # nothing at the key before commit
    w.commit()
    assert store.read("shard.safetensors") == data
    assert seen["parts"] == 4 and seen["most"] >= 3  # 3 full parts were in flight together
    assert writing < 0.5  # the writer never waited on an upload (3 x 0.2 s one at a time)
    assert unfinished_uploads(store.storage_options, store.uri) == []


def test_a_small_file_is_one_put(store, monkeypatch):
    seen = _watch_parts(monkeypatch)
    store.write_bytes("config.json", b"{}")
    assert store.read("config.json") == b"{}" and seen["parts"] == 0


def test_a_failed_part_fails_the_file_and_leaves_no_object_and_no_upload(store, monkeypatch):
    monkeypatch.setattr(s3write, "MIN_PART", 5 * 2**20)
    real = s3write.S3PartWriter._upload

    def second_fails(self, number, body):  # noqa: ANN001, ANN202
        if number == 2:
            raise OSError("connection reset by peer")
        return real(self, number, body)

    monkeypatch.setattr(s3write.S3PartWriter, "_upload", second_fails)
    data = b"x" * (12 * 2**20)
    with pytest.raises(StorageError, match=r"out/shard\.safetensors: cannot (write|commit): .*reset"):
        with store.writer("shard.safetensors", len(data)) as w:
            w.write(data)
    assert "shard.safetensors" not in store.list()
    assert unfinished_uploads(store.storage_options, store.uri) == []


def test_s3_reads_are_ranges_of_at_least_8_mib(s3_server):
    from fsspec.asyn import sync

    store = Storage(f"{new_bucket(s3_server)}/in", {"s3": {**s3_server["s3"], "skip_instance_cache": True}})
    data = bytes(range(256)) * (24 * 2**20 // 256)
    store.write_bytes("a.bin", data)
    ranges: list[str] = []
    sync(store.fs.loop, store.fs.set_session)
    store.fs.s3.meta.events.register("before-send.s3.GetObject",
                                     lambda request, **_: ranges.append(request.headers.get("Range")))
    buf = bytearray(16 * 2**20)
    with store.reader("a.bin", 4) as r:  # four parts allowed, but 16 MiB makes only two of 8 MiB
        r.read_into(2**20, memoryview(buf))
    assert bytes(buf) == data[2**20:17 * 2**20]
    got = sorted(r.decode() if isinstance(r, bytes) else r for r in ranges)
    assert got == [f"bytes={2**20}-{9 * 2**20 - 1}", f"bytes={9 * 2**20}-{17 * 2**20 - 1}"]


@pytest.fixture
def listings(monkeypatch) -> list[str]:  # noqa: ANN001
    """The prefix of every ListObjectsV2 request any S3 client of this process sends."""
    from urllib.parse import parse_qs, urlsplit

    from aiobotocore.endpoint import AioEndpoint

    seen: list[str] = []
    real = AioEndpoint._send

    async def send(self, request):  # noqa: ANN001, ANN202
        query = parse_qs(urlsplit(request.url).query, keep_blank_values=True)
        if "list-type" in query:
            seen.append(query["prefix"][0])
        return await real(self, request)

    monkeypatch.setattr(AioEndpoint, "_send", send)
    return seen


def test_listing_an_empty_prefix_is_one_request_of_that_prefix(s3_server, listings):
    # s3fs's ls of a prefix with nothing under it also lists the parent, every page of it: for a new
    # output beside many runs, pages of LISTs per listing.
    bucket = new_bucket(s3_server)
    Storage(f"{bucket}/runs/old", s3_server).write_bytes("x", b"x")
    store = Storage(f"{bucket}/runs/new", s3_server)
    assert store.list() == [] and store.subdirectories() == []
    assert listings == ["runs/new/", "runs/new/"]
    assert store.contents() == ([], []) and listings[2:] == ["runs/new/"]  # files and folders: one LIST


def test_an_s3_run_lists_its_output_three_times_and_never_its_parent(s3_server, tiny_checkpoints, listings):
    from graft.engine.run.local import run_local
    from graft.engine.plan.specfile import spec_from_mapping

    out = f"{new_bucket(s3_server)}/runs/out"
    run_local(spec_from_mapping({**tiny_checkpoints, "output": out, "storage_options": s3_server}), workers=2)
    # The check (files and folders at once), the stale temporaries after the mark, the sweep at commit.
    assert listings == ["runs/out/"] * 3
