"""The safetensors format: strict header parsing, header building, and a streaming shard writer.

A file is ``u64-le N`` + ``N`` bytes of JSON + tensor data. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section) plus an
optional ``"__metadata__"`` string map. Because every offset is in the header, a writer that knows
the layout can emit the header first and then stream the data: that is what ``ShardWriter`` does.

The reader is at least as strict as the reference implementation: header length capped and inside
the file, UTF-8 JSON object with no duplicate keys, names and metadata that are valid Unicode, known
dtypes, dimensions below 2**64, ``shape x itemsize == end - begin``, data offsets contiguous from 0 with
no gap or overlap, and data ending exactly at the end of the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import HeaderError, IntegrityError
from ..storage import AtomicWriter, Storage

__all__ = [
    "MAX_HEADER_BYTES",
    "DTYPE_SIZES",
    "FLOATING_DTYPES",
    "TensorEntry",
    "Header",
    "strict_json_loads",
    "parse_header",
    "read_header",
    "build_header",
    "ShardWriter",
]

MAX_HEADER_BYTES = 100_000_000
# The first read of a header asks for this much: typical headers (a few KB to tens of KB) fit in one
# round trip; the data after a shorter header is read and dropped (at most 64 KiB per file).
HEADER_PROBE = 64 * 1024

# Byte-aligned dtypes of the safetensors format, with their sizes in bytes.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# Dtypes on which out = t + alpha * (f - b) is computed; every other dtype is carried from the target.
# F8_E8M0 is a pure exponent (block-scale) format: arithmetic on it is meaningless, so it is carried.
FLOATING_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header. ``tensors`` are in file order (by offset)."""

    file: str
    file_size: int
    data_start: int
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] | None = field(default=None, compare=False)


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys and NaN/Infinity; raises ``ValueError`` (or
    ``RecursionError`` for absurd nesting)."""
    return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant)



# The largest dimension the reference reader accepts (a Rust usize).
_MAX_DIM = 2**64 - 1
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


def _is_unicode(s: str) -> bool:
    """False for a string holding a lone surrogate: JSON allows the escape ``\\ud800``, but such a name
    cannot be written back as UTF-8, so the job would fail only when it writes its output."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """``prod(shape) * itemsize``, or None once it is past ``_MAX_DIM`` (no file is that big): a
    hostile shape of many huge dimensions would otherwise build an integer that takes minutes to
    compute and has too many digits to print."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > _MAX_DIM:
            return None
    return n


def parse_header(prefix: bytes, header: bytes, file_size: int, where: str) -> Header:
    """Validate the 8-byte length ``prefix`` and the JSON ``header`` of a file of ``file_size`` bytes.

    ``where`` names the file in errors. Raises ``HeaderError`` on any violation.
    """
    def fail(msg: str) -> HeaderError:
        return HeaderError(f"{where}: invalid safetensors header: {msg}; the file is corrupt or not "
                           f"safetensors, re-download or re-export it")

    if len(prefix) != 8:
        raise fail(f"file is {file_size} bytes, too short for the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise fail(f"header length {n} runs past the end of the {file_size}-byte file")
    if len(header) != n:
        raise fail(f"read {len(header)} header bytes, expected {n}")
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise fail("header does not start with '{'")
    try:
        obj = strict_json_loads(text)
    except RecursionError:
        raise fail("JSON nested too deeply") from None
    except ValueError as e:
        raise fail(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise fail("header is not a JSON object")

    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise fail("__metadata__ must map strings to strings")
        if not all(_is_unicode(k) and _is_unicode(v) for k, v in metadata.items()):
            raise fail("__metadata__ holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode")

    data_start = 8 + n
    data_len = file_size - data_start
    entries: list[TensorEntry] = []
    for name, info in obj.items():
        if not _is_unicode(name):
            raise fail(f"tensor name {name!r} holds a lone surrogate escape, which is not Unicode")
        if type(info) is not dict or info.keys() != _ENTRY_KEYS:
            raise fail(f"tensor {name!r} must have exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r} "
                       f"(supported: {', '.join(DTYPE_SIZES)})")
        # type(x) is int: JSON gives exact ints, never bool subclasses here (true is bool).
        if type(shape) is not list or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
            raise fail(f"tensor {name!r} has invalid shape {shape!r}")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]):
            raise fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_len:
            raise fail(f"tensor {name!r} ends at data byte {end}, past the end of the file "
                       f"({data_len} data bytes)")
        expected = _nbytes(shape, DTYPE_SIZES[dtype])
        if expected != end - begin:
            size = f"{expected} bytes" if expected is not None else f"more than {_MAX_DIM} bytes"
            raise fail(f"tensor {name!r}: shape {shape} x {dtype} is {size} but "
                       f"data_offsets span {end - begin}")
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))

    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = data_start
    for e in entries:
        if e.begin != cursor:
            kind = "overlaps the previous tensor" if e.begin < cursor else "leaves a gap before it"
            raise fail(f"tensor {e.name!r} {kind} (starts at data byte {e.begin - data_start}, "
                       f"expected {cursor - data_start})")
        cursor = e.end
    if cursor != file_size:
        raise fail(f"tensor data ends at byte {cursor} but the file has {file_size} bytes")
    return Header(where, file_size, data_start, tuple(entries), metadata)


def read_header(storage: Storage, name: str, file_size: int, version: str | None = None) -> Header:
    """Read and validate the header of ``name``: the 8-byte length and the header it announces.

    One read of the first ``HEADER_PROBE`` bytes usually holds both (one round trip on an object
    store); a longer header costs one more read of exactly the rest. Never reads past the file or
    more than the header cap. ``version`` pins the reads where the store can (``Storage.read``).
    """
    where = storage.url(name)
    if file_size < 8:
        return parse_header(b"", b"", file_size, where)  # raises, as for any other short file
    head = storage.read(name, 0, min(file_size, HEADER_PROBE), version=version)
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        return parse_header(head[:8], b"", file_size, where)  # raises with the precise reason
    if 8 + n > len(head):
        head += storage.read(name, len(head), 8 + n, version=version)
    return parse_header(head[:8], head[8:8 + n], file_size, where)


def build_header(
    tensors: Sequence[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Serialize a header for ``(name, dtype, shape)`` tensors laid out in the given order.

    Returns the full prefix (8-byte length + JSON padded with spaces to a multiple of 8, as the
    reference writer does) and each tensor's ``(begin, end)`` data offsets.
    """
    obj: dict[str, Any] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    offsets: list[tuple[int, int]] = []
    cursor = 0
    for name, dtype, shape in tensors:
        if name in obj:
            raise HeaderError(f"tensor {name!r} appears twice in one output shard")
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        offsets.append((cursor, cursor + size))
        cursor += size
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class ShardWriter:
    """Streams one safetensors file: header first, then tensor data in layout order, hashed as written.

    Order of calls: ``ShardWriter(writer, tensors, metadata)`` (writes the header), ``write(chunk)``
    for every byte of every tensor in order, then ``finish()``, which checks that exactly the planned
    number of bytes arrived and returns ``(size, sha256)``. Committing the underlying ``AtomicWriter``
    is the caller's decision.
    """

    def __init__(self, out: AtomicWriter, tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self._out = out
        self._hash = hashlib.sha256()
        prefix, offsets = build_header(tensors, metadata)
        self.size = len(prefix) + (offsets[-1][1] if offsets else 0)
        self._written = 0
        self._emit(prefix)

    def _emit(self, data: bytes | memoryview, hashed: bool = True) -> None:
        if hashed:
            self._hash.update(data)
        self._out.write(data)
        self._written += len(data)

    def write(self, data: bytes | memoryview, hashed: bool = True) -> None:
        """Write ``data``, the next bytes. ``hashed=False``: the caller gives the same bytes, in the
        same order, to ``hash`` (on another thread, so that hashing and writing overlap)."""
        data = memoryview(data).cast("B")
        if self._written + len(data) > self.size:
            raise IntegrityError(f"{self._out.storage.url(self._out.name)}: more tensor data than "
                                 f"planned ({self._written + len(data)} > {self.size} bytes)")
        self._emit(data, hashed)

    def hash(self, data: bytes | memoryview) -> None:
        """Add the next bytes written with ``write(..., hashed=False)`` to the file's sha256."""
        self._hash.update(memoryview(data).cast("B"))

    def finish(self) -> tuple[int, str]:
        if self._written != self.size:
            raise IntegrityError(f"{self._out.storage.url(self._out.name)}: wrote {self._written} "
                                 f"bytes, planned {self.size}")
        return self.size, self._hash.hexdigest()
