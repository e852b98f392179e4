"""The safetensors header: golden bytes, round trips, and one test per hostile header."""
from __future__ import annotations

import json
import struct

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load, save

from graft.engine.errors import HeaderError, IntegrityError
from graft.engine.safetensors import MAX_HEADER_BYTES, ShardWriter, build_header, parse_header, read_header
from graft.engine.storage import Storage


def test_header_bytes_are_golden():
    prefix, offsets = build_header([("a", "F32", [2]), ("b", "BF16", [])], {"format": "pt"})
    assert prefix == (
        b"\x90\x00\x00\x00\x00\x00\x00\x00"
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"BF16","shape":[],"data_offsets":[8,10]}}' + b" " * 5
    )
    assert offsets == [(0, 8), (8, 10)]


def test_header_matches_the_reference_writer_byte_for_byte():
    tensors = {"w": torch.ones(3, 5, dtype=torch.bfloat16), "bias": torch.zeros(7), "ids": torch.arange(4)}
    ref = save(tensors, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", ref[:8])
    order = list(json.loads(ref[8:8 + n]))[1:]  # the reference writer's tensor order
    mine, _ = build_header([(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[
        tensors[k].dtype], list(tensors[k].shape)) for k in order], {"format": "pt"})
    assert mine == ref[:8 + n]


def test_streamed_shard_is_read_back_by_the_reference_reader(tmp_path):
    out = Storage(str(tmp_path))
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor(1.5, dtype=torch.bfloat16)
    with out.writer("x.safetensors") as w:
        sw = ShardWriter(w, [("a", "F32", (2, 3)), ("b", "BF16", ()), ("e", "F16", (0, 4))],
                         {"format": "pt"})
        raw = a.numpy().tobytes()
        sw.write(raw[:5])  # arbitrary chunk boundaries
        sw.write(raw[5:])
        sw.write(b.view(torch.int16).numpy().tobytes())
        size, digest = sw.finish()
    data = (tmp_path / "x.safetensors").read_bytes()
    assert size == len(data)
    import hashlib
    assert digest == hashlib.sha256(data).hexdigest()
    back = load(data)
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b) and back["e"].shape == (0, 4)


def test_shard_writer_refuses_more_or_fewer_bytes_than_planned(tmp_path):
    out = Storage(str(tmp_path))
    w = out.writer("x.safetensors")
    sw = ShardWriter(w, [("a", "F32", (2,))])
    with pytest.raises(IntegrityError, match="more tensor data than planned"):
        sw.write(b"\0" * 9)
    sw.write(b"\0" * 4)
    with pytest.raises(IntegrityError, match="planned"):
        sw.finish()
    w.discard()
    assert list(tmp_path.iterdir()) == []


def test_reference_files_parse_with_absolute_offsets():
    tensors = {"zero_dim": torch.tensor(2.0), "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
               "名前": torch.ones(4, dtype=torch.float16), "ids": torch.arange(3, dtype=torch.int32)}
    raw = save(tensors, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", raw[:8])
    h = parse_header(raw[:8], raw[8:8 + n], len(raw), "mem.safetensors")
    assert {e.name for e in h.tensors} == set(tensors)
    assert h.metadata == {"format": "pt"} and h.data_start == 8 + n
    for e in h.tensors:
        want = tensors[e.name]
        assert e.shape == tuple(want.shape)
        assert raw[e.begin:e.end] == want.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _file(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _parse(raw: bytes) -> None:
    n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    parse_header(raw[:8], raw[8:8 + n], len(raw), "bad.safetensors")


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

HOSTILE = {
    "length_over_cap": struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
    "length_past_eof": struct.pack("<Q", 50) + b"{}",
    "shorter_than_8_bytes": b"\x02\x00\x00",
    "not_utf8": _file(None, raw_header=b'{"a\xff":1}'),
    "not_starting_with_brace": _file(None, raw_header=b' {"a":{}}'),
    "duplicate_key": _file(None, b"\0" * 8, raw_header=(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')),
    "nan_constant": _file(None, raw_header=b'{"__metadata__":{"x":NaN}}'),
    "top_level_array": _file(None, raw_header=b"[1,2]"),
    "metadata_not_strings": _file({"__metadata__": {"steps": 3}}),
    "unknown_dtype": _file({"a": {"dtype": "F4X", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative_dim": _file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "float_dim": _file({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
    "bool_dim": _file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets_wrong_length": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8),
    "offsets_reversed": _file({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
    "size_mismatch": _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "gap": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "overlap": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "trailing_bytes": _file(GOOD, b"\0" * 9),
    "tensor_past_eof": _file(GOOD, b"\0" * 4),
    "extra_entry_key": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}},
                             b"\0" * 8),
    "entry_not_object": _file({"a": [1, 2, 3]}),
    "deep_nesting": _file(None, raw_header=b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "huge_shape": _file({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, b"\0" * 8),
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_header_is_refused_naming_the_file(raw):
    with pytest.raises(HeaderError) as e:
        _parse(raw)
    assert str(e.value).startswith("bad.safetensors: invalid safetensors header")
    assert "\n" not in str(e.value)


def test_a_valid_minimal_file_parses():
    _parse(_file(GOOD, b"\0" * 8))
    _parse(_file({}, b""))  # no tensors at all is a valid (empty) file


class CountingFileSystem(MemoryFileSystem):
    """An in-memory filesystem that counts the bytes it serves: a real fsspec backend, not a mock."""

    protocol = "counting"
    served = 0

    @classmethod
    def _strip_protocol(cls, path):  # noqa: ANN001, ANN206
        return super()._strip_protocol(path.removeprefix("counting://"))

    def cat_file(self, path, start=None, end=None, **kwargs):  # noqa: ANN001, ANN201
        data = super().cat_file(path, start=start, end=end, **kwargs)
        CountingFileSystem.served += len(data)
        return data


def test_read_header_reads_only_the_length_and_the_header():
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    raw = save({"big": torch.zeros(1_000_000)}, metadata={"format": "pt"})
    fs = fsspec.filesystem("counting")
    fs.pipe_file("/ckpt/model.safetensors", raw)
    try:
        storage = Storage("counting:///ckpt")
        CountingFileSystem.served = 0
        h = read_header(storage, "model.safetensors", len(raw))
        assert CountingFileSystem.served == h.data_start < 200
    finally:
        fs.rm("/ckpt", recursive=True)
