"""The safetensors header as a specification: what graft writes is byte-identical to the reference
writer, what the reference writes is accepted, and every hostile header is refused with a
``HeaderError`` that names the file (never a ``RecursionError``, never a read of the data region).
"""
from __future__ import annotations

import collections
import json
import struct

import fsspec
import pytest
import safetensors
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load, save, save_file

import hashlib

from conftest import PrivateMemoryFileSystem
from graft.engine.errors import HeaderError, IntegrityError
from graft.engine.formats.safetensors import (
    HEADER_PROBE,
    MAX_HEADER_BYTES,
    ShardWriter,
    build_header,
    parse_header,
    read_header,
)
from graft.engine.storage import Storage

_DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64", torch.float8_e4m3fn: "F8_E4M3",
}


def _reference_header(blob: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8:8 + n])


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- golden bytes -------------------------------------------------------------------------------


def test_build_header_emits_these_exact_bytes_for_two_tensors():
    prefix, offsets = build_header([("w", "F16", [2, 2]), ("n", "I64", [0])], {"format": "pt"})
    json_text = (
        b'{"__metadata__":{"format":"pt"},'
        b'"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},'
        b'"n":{"dtype":"I64","shape":[0],"data_offsets":[8,8]}}'
    )
    assert len(json_text) == 140  # padded with 4 spaces to 144 = 0x90, a multiple of 8
    assert prefix == b"\x90\x00\x00\x00\x00\x00\x00\x00" + json_text + b"    "
    assert offsets == [(0, 8), (8, 8)]


def test_build_header_in_reference_order_equals_the_reference_writers_first_bytes():
    # The reference writer lays tensors out by dtype size, largest first, then by name
    # (checked empirically; equal-size dtypes are covered by the next test).
    tensors = {
        "b": torch.zeros(3), "a": torch.zeros(2), "c": torch.zeros(2, 2, dtype=torch.bfloat16),
        "z": torch.zeros(1, dtype=torch.int64), "e": torch.zeros(5, dtype=torch.uint8),
    }
    ref = save(tensors, metadata={"format": "pt"})
    n, header = _reference_header(ref)
    assert list(header) == ["__metadata__", "z", "a", "b", "c", "e"]
    mine, offsets = build_header(
        [("z", "I64", [1]), ("a", "F32", [2]), ("b", "F32", [3]), ("c", "BF16", [2, 2]), ("e", "U8", [5])],
        {"format": "pt"})
    assert mine == ref[:8 + n]
    assert offsets == [(0, 8), (8, 16), (16, 28), (28, 36), (36, 41)]
    assert len(ref) == 8 + n + 41


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None], ids=["format-pt", "no-metadata"])
def test_build_header_equals_the_first_bytes_of_the_reference_writer(metadata):
    tensors = {
        "model.embed": torch.randn(7, 3, dtype=torch.bfloat16),
        "norm": torch.randn(3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "ids": torch.arange(5),
        "mask": torch.ones(3, dtype=torch.bool),
        "ß.ü.权重": torch.ones(2, dtype=torch.int8),
    }
    ref = save(tensors, metadata=metadata)
    n, ref_header = _reference_header(ref)
    # Equal-size dtypes are ordered by the reference's dtype enum (BF16 before F16, I64 before F64),
    # so the layout order is taken from the reference's own header.
    order = [k for k in ref_header if k != "__metadata__"]
    mine, offsets = build_header(
        [(k, _DTYPE_NAMES[tensors[k].dtype], list(tensors[k].shape)) for k in order], metadata)
    assert mine == ref[:8 + n]
    assert offsets == [tuple(ref_header[k]["data_offsets"]) for k in order]
    assert 8 + n + offsets[-1][1] == len(ref)


# --- accepting what the reference writes ---------------------------------------------------------


def test_parse_header_accepts_every_reference_file_and_offsets_are_absolute(tmp_path):
    tensors = {
        "bf16.weight": torch.randn(4, 3).to(torch.bfloat16),
        "f16": torch.randn(5, dtype=torch.float16),
        "f32": torch.randn(2, 2),
        "f64.scalar": torch.tensor(3.25, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(4).to(torch.float8_e4m3fn),
        "zero.size": torch.zeros(0, 8),
        "zero.size.bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "unicode.名前.ñ.🙂": torch.ones(2, dtype=torch.int32),
    }
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt", "note": "ü"})
    data = (tmp_path / "ref.safetensors").read_bytes()
    storage = Storage(str(tmp_path))

    header = read_header(storage, "ref.safetensors", len(data))

    (n,) = struct.unpack("<Q", data[:8])
    assert header.data_start == 8 + n
    assert header.file_size == len(data)
    assert header.metadata == {"format": "pt", "note": "ü"}
    assert {e.name for e in header.tensors} == set(tensors)
    assert [e.begin for e in header.tensors] == sorted(e.begin for e in header.tensors)
    for e in header.tensors:
        t = tensors[e.name]
        assert e.dtype == _DTYPE_NAMES[t.dtype]
        assert e.shape == tuple(t.shape)
        assert e.numel == t.numel()
        assert data[e.begin:e.end] == _raw_bytes(t), e.name  # absolute offsets in the file
    assert header.tensors[-1].end == len(data)


def test_parse_header_accepts_a_header_without_tensors():
    text = b'{"__metadata__":{"format":"pt"}}'
    text += b" " * (-len(text) % 8)
    header = parse_header(struct.pack("<Q", len(text)), text, 8 + len(text), "empty.safetensors")
    assert header.tensors == ()
    assert header.metadata == {"format": "pt"}


# --- hostile inputs: one test each ----------------------------------------------------------------


def _file(header: bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def _refused(tmp_path, raw: bytes, reason: str, name: str = "hostile.safetensors") -> str:
    """Write ``raw`` as a file, read its header, and return the HeaderError message."""
    (tmp_path / name).write_bytes(raw)
    storage = Storage(str(tmp_path))
    with pytest.raises(HeaderError) as caught:
        read_header(storage, name, len(raw))
    msg = str(caught.value)
    assert storage.url(name) in msg, msg
    assert reason in msg, msg
    return msg


def test_header_length_over_the_limit_is_refused(tmp_path):
    _refused(tmp_path, struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
             f"exceeds the {MAX_HEADER_BYTES}-byte limit")


def test_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    _refused(tmp_path, _file(b"{}", length=3000), "runs past the end")


def test_file_shorter_than_the_length_prefix_is_refused(tmp_path):
    _refused(tmp_path, b"\x02\x00\x00\x00\x00", "too short for the 8-byte header length")


def test_parse_header_refuses_a_prefix_shorter_than_eight_bytes():
    with pytest.raises(HeaderError, match=r"^tiny\.safetensors: .*too short"):
        parse_header(b"\x02\x00", b"", 2, "tiny.safetensors")


def test_empty_file_is_refused(tmp_path):
    _refused(tmp_path, b"", "too short")


def test_non_utf8_header_is_refused(tmp_path):
    _refused(tmp_path, _file(b'{"a\xff":{}}'), "not UTF-8")


def test_header_not_starting_with_a_brace_is_refused(tmp_path):
    _refused(tmp_path, _file(b'  {"__metadata__":{}}'), "does not start with '{'")


def test_zero_length_header_is_refused(tmp_path):
    _refused(tmp_path, _file(b""), "does not start with '{'")


def test_duplicate_tensor_key_is_refused(tmp_path):
    entry = json.dumps(_entry())
    _refused(tmp_path, _file(f'{{"a":{entry},"a":{entry}}}', b"\0" * 4), "duplicate key 'a'")


def test_nan_constant_is_refused(tmp_path):
    _refused(tmp_path, _file('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4),
             "NaN")


def test_infinity_constant_is_refused(tmp_path):
    _refused(tmp_path, _file('{"__metadata__":{"x":Infinity}}'), "Infinity")


def test_top_level_array_is_refused(tmp_path):
    msg = _refused(tmp_path, _file(json.dumps([{"a": _entry()}]), b"\0" * 4), "")
    assert "'{'" in msg or "not a JSON object" in msg


def test_metadata_with_a_non_string_value_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"__metadata__": {"format": "pt", "step": 3}})),
             "__metadata__ must map strings to strings")


def test_metadata_that_is_not_an_object_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"__metadata__": ["pt"]})), "__metadata__ must map strings")


def test_unknown_dtype_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": _entry(dtype="F128")}), b"\0" * 4),
             "unknown dtype 'F128'")


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], ["1"], 4, None],
                         ids=["negative", "float", "bool", "string", "not-a-list", "null"])
def test_invalid_shape_entry_is_refused(tmp_path, shape):
    header = {"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}}
    _refused(tmp_path, _file(json.dumps(header), b"\0"), "invalid shape")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 4], [4, 0], [0, 4.0], ["0", 4], [False, 4], [-4, 0], 4],
                         ids=["one", "three", "reversed", "float", "string", "bool", "negative",
                              "not-a-list"])
def test_invalid_data_offsets_are_refused(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    _refused(tmp_path, _file(json.dumps(header), b"\0" * 4), "invalid data_offsets")


def test_shape_times_dtype_size_different_from_offset_span_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": _entry(shape=[2], offsets=[0, 4])}), b"\0" * 4),
             "is 8 bytes but data_offsets span 4")


def test_gap_between_tensors_is_refused(tmp_path):
    header = {"a": _entry(offsets=[0, 4]), "b": _entry(offsets=[8, 12])}
    _refused(tmp_path, _file(json.dumps(header), b"\0" * 12), "'b' leaves a gap before it")


def test_gap_before_the_first_tensor_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": _entry(offsets=[4, 8])}), b"\0" * 8),
             "'a' leaves a gap before it")


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": _entry(shape=[2], offsets=[0, 8]), "b": _entry(offsets=[4, 8])}
    _refused(tmp_path, _file(json.dumps(header), b"\0" * 8), "overlaps the previous tensor")


def test_identical_offsets_for_two_tensors_are_refused(tmp_path):
    header = {"a": _entry(offsets=[0, 4]), "b": _entry(offsets=[0, 4])}
    _refused(tmp_path, _file(json.dumps(header), b"\0" * 4), "overlaps the previous tensor")


def test_trailing_bytes_after_the_tensor_data_are_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": _entry()}), b"\0" * 12),
             "tensor data ends at byte")


def test_tensor_past_the_end_of_the_file_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": _entry(shape=[4], offsets=[0, 16])}), b"\0" * 8),
             "past the end of the file")


def test_extra_key_in_a_tensor_entry_is_refused(tmp_path):
    entry = dict(_entry(), offset_hint=0)
    _refused(tmp_path, _file(json.dumps({"a": entry}), b"\0" * 4),
             "must have exactly the keys dtype, shape, data_offsets")


def test_missing_key_in_a_tensor_entry_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": {"dtype": "F32", "shape": [1]}}), b"\0" * 4),
             "must have exactly the keys")


def test_tensor_entry_that_is_not_an_object_is_refused(tmp_path):
    _refused(tmp_path, _file(json.dumps({"a": [0, 4]}), b"\0" * 4), "must have exactly the keys")


def test_shape_whose_size_has_too_many_digits_to_print_is_a_header_error_not_a_value_error(tmp_path):
    # Found by test_fuzz_headers: 300 dimensions of 2**64 - 1 multiply out to a 5780-digit byte count,
    # which the message could not print (int max str digits); multiplying further was also slow.
    header = {"a": {"dtype": "F32", "shape": [2**64 - 1] * 300, "data_offsets": [0, 4]}}
    _refused(tmp_path, _file(json.dumps(header), b"\0" * 4),
             f"is more than {2**64 - 1} bytes but data_offsets span 4")


def test_dimension_of_2_64_or_more_is_refused_as_the_reference_refuses_it(tmp_path):
    # Found by test_fuzz_headers: a zero-size tensor could carry any dimension, even one thousands of
    # digits long; the reference reader (a Rust usize) refuses one past 2**64 - 1.
    raw = _file(json.dumps({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}))
    with pytest.raises(safetensors.SafetensorError, match="usize"):
        safetensors.deserialize(raw)
    _refused(tmp_path, raw, "invalid shape [0, 18446744073709551616]")

    largest = _file(json.dumps({"a": {"dtype": "F32", "shape": [0, 2**64 - 1], "data_offsets": [0, 0]}}))
    (tmp_path / "largest.safetensors").write_bytes(largest)
    header = read_header(Storage(str(tmp_path)), "largest.safetensors", len(largest))
    assert header.tensors[0].shape == (0, 2**64 - 1)


@pytest.mark.parametrize("header", [
    '{"a\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"__metadata__":{"format":"\\udc00"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"__metadata__":{"\\ud83d":"pt"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
], ids=["tensor-name", "metadata-value", "metadata-key"])
def test_lone_surrogate_escape_is_refused_because_it_cannot_be_written_back(tmp_path, header):
    # Found by test_fuzz_headers: json.loads turns "\ud800" into a str that UTF-8 cannot encode, so the
    # job failed only when build_header wrote the output. The reference reader refuses it too.
    raw = _file(header, b"\0")
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(raw)
    _refused(tmp_path, raw, "lone surrogate")


def test_a_surrogate_pair_escape_is_one_valid_character(tmp_path):
    raw = _file('{"\\ud83d\\ude00":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0")
    (tmp_path / "pair.safetensors").write_bytes(raw)
    header = read_header(Storage(str(tmp_path)), "pair.safetensors", len(raw))
    assert [e.name for e in header.tensors] == ["\U0001f600"]


def test_read_header_of_a_file_shorter_than_8_bytes_says_what_parse_header_says(tmp_path):
    with pytest.raises(HeaderError) as direct:
        parse_header(b"abc", b"", 3, Storage(str(tmp_path)).url("s.safetensors"))
    assert str(direct.value) == _refused(tmp_path, b"abc", "too short", name="s.safetensors")


def test_deeply_nested_json_is_a_header_error_not_a_recursion_error(tmp_path):
    depth = 100_000
    header = '{"a":' + "[" * depth + "]" * depth + "}"
    _refused(tmp_path, _file(header), "nested too deeply")


def test_deeply_nested_metadata_objects_are_a_header_error(tmp_path):
    depth = 100_000
    header = '{"__metadata__":' + '{"x":' * depth + '"v"' + "}" * depth + "}"
    _refused(tmp_path, _file(header), "nested too deeply")


# --- read_header: one round trip for the header, bounded reads ------------------------------------


class _CountingMemoryFileSystem(PrivateMemoryFileSystem, MemoryFileSystem):
    """An in-memory filesystem of its own (own store) that counts the bytes each file serves."""

    protocol = "graftcountingmem"
    store: dict = {}
    pseudo_dirs = [""]
    served: collections.Counter = collections.Counter()
    reads: collections.Counter = collections.Counter()

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        self.served[self._strip_protocol(path)] += len(data)
        self.reads[self._strip_protocol(path)] += 1
        return data

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:  # every read must go through cat_file, where it is counted
            raise AssertionError(f"unexpected open({path!r}, {mode!r})")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation(_CountingMemoryFileSystem.protocol, _CountingMemoryFileSystem,
                               clobber=True)
def _served_reads(tmp_path, blob: bytes):
    """read_header on ``blob`` in a counting store: (header, bytes served, number of reads)."""
    storage = Storage(f"{_CountingMemoryFileSystem.protocol}://{tmp_path.name}")
    storage.fs.pipe_file(storage.path("m.safetensors"), blob)
    path = storage.path("m.safetensors")
    _CountingMemoryFileSystem.served.clear()
    _CountingMemoryFileSystem.reads.clear()
    try:
        header = read_header(storage, "m.safetensors", len(blob))
        return header, _CountingMemoryFileSystem.served[path], _CountingMemoryFileSystem.reads[path]
    finally:
        storage.fs.rm(storage.root, recursive=True)


def test_read_header_takes_one_read_of_the_probe_size(tmp_path):
    blob = save({"big": torch.randn(256, 256), "small": torch.ones(3, dtype=torch.bfloat16)})
    (n,) = struct.unpack("<Q", blob[:8])
    assert 8 + n < HEADER_PROBE < len(blob)
    header, served, reads = _served_reads(tmp_path, blob)
    assert {e.name for e in header.tensors} == {"big", "small"}
    assert (served, reads) == (HEADER_PROBE, 1)


def test_read_header_never_reads_past_a_small_file(tmp_path):
    blob = save({"x": torch.ones(3)})
    assert len(blob) < HEADER_PROBE
    header, served, reads = _served_reads(tmp_path, blob)
    assert [e.name for e in header.tensors] == ["x"]
    assert (served, reads) == (len(blob), 1)


def test_a_header_longer_than_the_probe_costs_one_more_read_of_exactly_the_rest(tmp_path):
    # Many small tensors: a header of a few hundred KB (a big MoE shard has such headers).
    blob = save({f"model.layers.{i}.experts.{j}.w": torch.ones(1) for i in range(40) for j in range(100)})
    (n,) = struct.unpack("<Q", blob[:8])
    assert 8 + n > HEADER_PROBE
    header, served, reads = _served_reads(tmp_path, blob)
    assert len(header.tensors) == 4000
    assert (served, reads) == (8 + n, 2)