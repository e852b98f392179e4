"""Property-based fuzzing of the two readers that take untrusted bytes: the safetensors header reader
(``parse_header``, ``read_header``) and the index reader (``open_checkpoint``).

For random and mutated inputs a call either succeeds, and then what it returns agrees with the bytes
(and with the reference reader, ``safetensors.deserialize``), or it raises a ``GraftError``: any other
exception is a bug. Every read goes through a filesystem that records it; a read outside its file,
a single read over the header cap, or a read of a file outside the checkpoint is a bug too.

`make test` runs these with the "ci" Hypothesis profile, `make fuzz` with "long" (tests/conftest.py).
Some examples lower HEADER_PROBE and the caps so that small inputs reach the second header read and
the cap checks.
"""
from __future__ import annotations

import json
import math
import struct
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from unittest import mock

import fsspec
import safetensors
import torch
from fsspec.implementations.memory import MemoryFileSystem
from hypothesis import event, given, note
from hypothesis import strategies as st
from safetensors.torch import save

from conftest import PrivateMemoryFileSystem
from graft.engine.formats import checkpoint as checkpoint_module
from graft.engine.formats import safetensors as safetensors_module
from graft.engine.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from graft.engine.errors import GraftError
from graft.engine.formats.safetensors import DTYPE_SIZES, Header, build_header, parse_header, read_header
from graft.engine.storage import Storage

_REAL_PROBE = safetensors_module.HEADER_PROBE
_REAL_CAP = safetensors_module.MAX_HEADER_BYTES
_DTYPES = sorted(DTYPE_SIZES)
_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}


# --- a filesystem that records every read ---------------------------------------------------------


class _RecordingFileSystem(PrivateMemoryFileSystem, MemoryFileSystem):
    """An in-memory filesystem of its own (own store) that records every read, and in ``problems``
    every read that breaks a rule: a range outside the file, one read of more than the header cap, a
    read of a file outside ``allowed``, a file opened for reading (a read that bypasses the record).

    Problems are recorded, not raised: ``Storage`` turns an exception of the filesystem into a
    ``StorageError``, which the properties accept.
    """

    protocol = "graftfuzzmem"
    store: dict = {}
    pseudo_dirs = [""]
    reads: list[tuple[str, int, int]] = []
    problems: list[str] = []
    allowed = "/"

    def cat_file(self, path, start=None, end=None, **kwargs):
        p = self._strip_protocol(path)
        if not p.startswith(self.allowed):
            self.problems.append(f"read {p!r}, outside {self.allowed!r}")
        if p in self.store:
            size = self.store[p].size
            begin, stop = (0 if start is None else start), (size if end is None else end)
            self.reads.append((p, begin, stop))
            if not 0 <= begin <= stop <= size:
                self.problems.append(f"read {p!r} [{start}, {end}) outside the {size}-byte file")
            if stop - begin > 8 + safetensors_module.MAX_HEADER_BYTES:
                self.problems.append(f"read {p!r} [{begin}, {stop}): {stop - begin} bytes in one read, "
                                     f"over the cap")
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self.problems.append(f"open({path!r}, {mode!r}) bypasses the recorded reads")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation(_RecordingFileSystem.protocol, _RecordingFileSystem, clobber=True)
_FS = _RecordingFileSystem
_ROOT = "/fuzz"


@contextmanager
def _fresh_store(limits: tuple[int, int], allowed: str) -> Iterator[None]:
    """An empty recording store, reads allowed under ``allowed``, and the readers' constants set to
    ``limits`` = (HEADER_PROBE, cap of a header and of an index)."""
    probe, cap = limits
    _FS.store.clear()
    _FS.pseudo_dirs[:] = [""]
    _FS.reads.clear()
    _FS.problems.clear()
    _FS.allowed = allowed
    with mock.patch.object(safetensors_module, "HEADER_PROBE", probe), \
            mock.patch.object(safetensors_module, "MAX_HEADER_BYTES", cap), \
            mock.patch.object(checkpoint_module, "MAX_INDEX_BYTES", cap):
        yield


def _put(path: str, data: bytes) -> None:
    _FS().pipe_file(path, data)


# (HEADER_PROBE, cap): the real values, and small ones that short inputs reach (the probe never over
# the cap, as in the real values).
_LIMITS = st.sampled_from([(_REAL_PROBE, _REAL_CAP), (8, _REAL_CAP), (16, 64), (64, 512), (200, 200)])


def _outcome(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or the ``GraftError`` it raised; any other exception fails the example."""
    try:
        got = call()
    except GraftError as e:
        note(f"refused with {e.__class__.__name__}: {str(e)[:300]}")
        event(f"refused: {e.__class__.__name__}")  # the mix shows with --hypothesis-show-statistics
        return e
    event("accepted")
    return got


def _assert_no_problem_reads() -> None:
    assert not _FS.problems, _FS.problems[:5]


# --- what an accepted header must satisfy ----------------------------------------------------------


def _announced(blob: bytes) -> int | None:
    """The header length the file announces, when it is within the cap and the file."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    return n if n <= safetensors_module.MAX_HEADER_BYTES and 8 + n <= len(blob) else None


def _assert_consistent(header: Header, blob: bytes) -> None:
    """An accepted header describes ``blob``: tensors tile the data region exactly, each tensor's
    size is dtype x shape, and the reference reader finds the same tensors with the same bytes."""
    n = _announced(blob)
    assert n is not None
    assert header.file_size == len(blob)
    assert header.data_start == 8 + n
    cursor = header.data_start
    for e in header.tensors:
        assert e.dtype in DTYPE_SIZES
        assert all(type(d) is int and 0 <= d < 2**64 for d in e.shape), e.shape
        assert e.begin == cursor <= e.end <= len(blob)
        assert e.nbytes == math.prod(e.shape) * DTYPE_SIZES[e.dtype]
        cursor = e.end
    assert cursor == len(blob)
    assert len({e.name for e in header.tensors}) == len(header.tensors)
    for e in header.tensors:
        e.name.encode("utf-8")  # a lone surrogate could not be written to an output header
    if header.metadata is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())
        json.dumps(header.metadata, ensure_ascii=False).encode("utf-8")
    # graft is at least as strict as the reference: whatever it accepts, the reference reads the same.
    reference = dict(safetensors.deserialize(blob))
    assert set(reference) == {e.name for e in header.tensors}
    for e in header.tensors:
        assert reference[e.name]["dtype"] == e.dtype
        assert tuple(reference[e.name]["shape"]) == e.shape
        assert bytes(reference[e.name]["data"]) == blob[e.begin:e.end]


def _assert_header_reads_bounded(path: str, blob: bytes) -> None:
    """At most two reads of ``path``: the probe, then exactly the rest of an announced header."""
    reads = [(b, e) for p, b, e in _FS.reads if p == path]
    assert len(reads) <= 2, reads
    allowed = min(len(blob), safetensors_module.HEADER_PROBE)
    n = _announced(blob)
    if n is not None:
        allowed = max(allowed, 8 + n)
    assert sum(e - b for b, e in reads) <= allowed, (reads, allowed)


# --- inputs: JSON text that json.dumps cannot write, and well-formed files -------------------------


class _Raw:
    """JSON text spliced in as it is: huge integers, NaN, deep nesting, garbage.

    Not a ``str`` subclass: Hypothesis 6.170 may replay a generated value as a string choice, and
    fails on a subclass of str there (FlakyStrategyDefinition).
    """

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"_Raw({self.text[:20]!r}{'...' if len(self.text) > 20 else ''})"


class _Obj(list):
    """A JSON object as ``[key, value]`` pairs, so that a key can appear twice."""


def _dump(v: Any, ascii_only: bool) -> str:
    if isinstance(v, _Raw):
        return v.text
    if isinstance(v, (_Obj, dict)):
        pairs = v if isinstance(v, _Obj) else v.items()
        return "{" + ",".join(f"{_dump(k, ascii_only)}:{_dump(x, ascii_only)}" for k, x in pairs) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_dump(x, ascii_only) for x in v) + "]"
    return json.dumps(v, ensure_ascii=ascii_only)


def _encode(v: Any, ascii_only: bool) -> bytes:
    """JSON bytes; lone surrogates written raw (``ascii_only=False``) become invalid UTF-8."""
    return _dump(v, ascii_only).encode("utf-8", "surrogatepass")


def _pattern(size: int) -> bytes:
    return bytes((7 * i + 1) % 251 for i in range(size))


# Any character, lone surrogates included, and characters that are plain but easy to mishandle.
_ANY_CHAR = st.one_of(st.characters(exclude_categories=()),
                      st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
                      st.sampled_from(list("/\\.:~\x00\n\"'{}[] ")))
_ANY_TEXT = st.text(_ANY_CHAR, max_size=8)
_WRITABLE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
# Valid JSON once escaped ("\\ud800"), but not Unicode: it cannot be written back as UTF-8.
_LONE_SURROGATE_TEXT = st.builds(lambda a, c, b: a + c + b, _WRITABLE_TEXT,
                                 st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
                                 _WRITABLE_TEXT)
_TENSOR_NAMES = _WRITABLE_TEXT.filter(lambda s: s != "__metadata__")
_SHAPES = st.lists(st.integers(0, 3), max_size=3)
_TENSORS = st.lists(st.tuples(_TENSOR_NAMES, st.sampled_from(_DTYPES), _SHAPES), max_size=4,
                    unique_by=lambda t: t[0])
_METADATA = st.none() | st.dictionaries(_WRITABLE_TEXT, _WRITABLE_TEXT, max_size=2)


def _graft_file(tensors: list, metadata: dict | None) -> bytes:
    prefix, offsets = build_header(tensors, metadata)
    return prefix + _pattern(offsets[-1][1] if offsets else 0)


def _reference_file(tensors: list, metadata: dict | None) -> bytes:
    sd = {name: torch.zeros(shape, dtype=_TORCH_DTYPES[dtype]) for name, dtype, shape in tensors}
    if not sd and metadata == {}:
        # safetensors 0.8.0 writes '{},"__metadata__":{}}' for this, which its own reader refuses too.
        metadata = None
    return save(sd, metadata=metadata)


@st.composite
def _valid_files(draw) -> bytes:
    """A well-formed file from graft's header writer or the reference writer (safetensors.torch)."""
    tensors, metadata = draw(_TENSORS), draw(_METADATA)
    return draw(st.sampled_from([_graft_file, _reference_file]))(tensors, metadata)


# Integers where readers break: signs, 2**53, 2**63, 2**64, and past Python's 4300-digit str limit.
_INTS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([-1, -2**63, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**64 + 1, 2**128]),
    st.integers(-2**70, 2**70),
    st.integers(1, 5000).map(lambda k: _Raw("9" * k)),
)
_NOT_INTS = st.one_of(
    st.floats(), st.booleans(), st.none(), st.text(max_size=4), st.just([]), st.just({}),
    st.sampled_from([_Raw("1e400"), _Raw("-0"), _Raw("1.0"), _Raw("2E1"), _Raw("NaN"), _Raw("-Infinity")]),
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _INTS, st.floats(), _ANY_TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def _nested(draw) -> _Raw:
    """Arrays or objects nested up to well past the interpreter's recursion limit."""
    depth = draw(st.one_of(st.integers(1, 1200), st.sampled_from([3000, 100_000])))
    if draw(st.booleans()):
        return _Raw("[" * depth + "]" * depth)
    return _Raw('{"a":' * depth + "1" + "}" * depth)


# --- mutations of a header (a top-level _Obj of [name, entry] pairs) -------------------------------


def _entry(draw, top: _Obj) -> list:
    """A tensor pair of ``top`` to mutate; one is added when there is none."""
    pairs = [p for p in top if p[0] != "__metadata__" and isinstance(p[1], dict)]
    if not pairs:
        top.append(["t", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}])
        pairs = [top[-1]]
    return draw(st.sampled_from(pairs))


def _set_offsets(draw, top: _Obj) -> None:
    entry = _entry(draw, top)[1]
    old = entry.get("data_offsets")
    begin, end = old if isinstance(old, list) and len(old) == 2 and all(type(o) is int for o in old) else (0, 1)
    delta = draw(st.integers(-9, 9))
    entry["data_offsets"] = draw(st.one_of(
        st.lists(_INTS, min_size=2, max_size=2),
        st.just([end, begin]),  # reversed
        st.sampled_from([[begin + delta, end + delta], [begin, end + delta], [begin + delta, end]]),
        st.lists(_INTS, max_size=4),
        st.lists(_NOT_INTS, min_size=2, max_size=2),
        _NOT_INTS,
        st.just([[begin], [end]]),
    ))


def _set_shape(draw, top: _Obj) -> None:
    entry = _entry(draw, top)[1]
    huge = st.one_of(st.integers(1, 4299).map(lambda k: _Raw("9" * k)), st.sampled_from([2**64 - 1, 2**64]))
    entry["shape"] = draw(st.one_of(
        st.lists(_INTS, max_size=4),
        # dtype x shape far past any file: slow to multiply out, and too many digits to print
        st.tuples(st.integers(2000, 4299), st.integers(2, 300)).map(lambda t: [_Raw("9" * t[0])] * t[1]),
        st.integers(1, 600).map(lambda m: [2**64 - 1] * m),
        st.lists(huge, max_size=4).map(lambda s: [0, *s]),  # zero elements, absurd dimensions
        st.lists(huge, max_size=4).map(lambda s: [*s, 0]),
        st.lists(_NOT_INTS, min_size=1, max_size=3),
        _NOT_INTS,
        st.just([[2], [3]]),
    ))


def _set_dtype(draw, top: _Obj) -> None:
    entry = _entry(draw, top)[1]
    old = entry.get("dtype")
    entry["dtype"] = draw(st.one_of(
        st.sampled_from(_DTYPES),
        st.just(old.lower() if isinstance(old, str) else "f32"),
        st.sampled_from(["F128", "F4", "F6_E2M3", "F8_E4M3FN", "float32", "", "F32 ", " F32", "Ｆ32"]),
        _ANY_TEXT, _NOT_INTS, st.lists(st.sampled_from(_DTYPES), max_size=2),
    ))


def _rename(draw, top: _Obj) -> None:
    pair = _entry(draw, top)
    others = [p[0] for p in top if isinstance(p[0], str)]
    pair[0] = draw(st.one_of(_ANY_TEXT, _LONE_SURROGATE_TEXT, st.sampled_from(["__metadata__", "", *others]),
                             st.text(min_size=200, max_size=400)))


def _duplicate(draw, top: _Obj) -> None:
    name, entry = _entry(draw, top)
    copy = dict(entry) if draw(st.booleans()) else {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    top.insert(draw(st.integers(0, len(top))), [name, copy])


def _reshape_entry(draw, top: _Obj) -> None:
    pair = _entry(draw, top)
    entry = pair[1]
    choice = draw(st.integers(0, 3)) if entry else 1
    if choice == 0:
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif choice == 1:
        entry[draw(_ANY_TEXT)] = draw(_JSON)
    elif choice == 2:
        pair[1] = draw(_JSON)
    else:  # one key twice inside the entry
        key = draw(st.sampled_from(sorted(entry)))
        pair[1] = _Obj([[k, v] for k, v in entry.items()] + [[key, entry[key]]])


def _set_metadata(draw, top: _Obj) -> None:
    value = draw(st.one_of(
        _JSON,
        st.dictionaries(_ANY_TEXT, _ANY_TEXT, max_size=3),
        st.dictionaries(_LONE_SURROGATE_TEXT | _WRITABLE_TEXT, _LONE_SURROGATE_TEXT, min_size=1, max_size=2),
        st.dictionaries(_WRITABLE_TEXT, _JSON, min_size=1, max_size=2),
        _nested(),
    ))
    top[:] = [p for p in top if p[0] != "__metadata__" or draw(st.booleans())]  # maybe keep a second one
    top.insert(draw(st.sampled_from([0, len(top)])), ["__metadata__", value])


def _nest(draw, top: _Obj) -> None:
    pair = _entry(draw, top)
    slot = draw(st.sampled_from(["entry", "dtype", "shape", "data_offsets", "metadata"]))
    if slot == "entry":
        pair[1] = draw(_nested())
    elif slot == "metadata":
        top.insert(0, ["__metadata__", draw(_nested())])
    else:
        pair[1][slot] = draw(_nested())


def _drop(draw, top: _Obj) -> None:
    if top:
        del top[draw(st.integers(0, len(top) - 1))]


def _swap_offsets(draw, top: _Obj) -> None:
    a, b = _entry(draw, top)[1], _entry(draw, top)[1]
    a["data_offsets"], b["data_offsets"] = b.get("data_offsets"), a.get("data_offsets")


_HEADER_MUTATIONS = [_set_offsets, _set_shape, _set_dtype, _rename, _duplicate, _reshape_entry,
                     _set_metadata, _nest, _drop, _swap_offsets]


# --- mutations of the bytes of a file ---------------------------------------------------------------


def _set_length(draw, blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    length = draw(st.one_of(
        st.sampled_from([0, 1, 2, n - 1, n + 1, len(blob) - 8, len(blob) - 7, 64, 65, 256, 257, 512, 513,
                         _REAL_CAP, _REAL_CAP + 1, 2**63, 2**64 - 1]),
        st.integers(0, 2**64 - 1),
        st.integers(0, len(blob)),
    ))
    return struct.pack("<Q", length % 2**64) + blob[8:]


def _truncate(draw, blob: bytes) -> bytes:
    return blob[:draw(st.integers(0, len(blob)))]


def _append(draw, blob: bytes) -> bytes:
    return blob + draw(st.binary(min_size=1, max_size=16))


def _flip(draw, blob: bytes) -> bytes:
    if not blob:
        return blob
    i = draw(st.integers(0, len(blob) - 1))
    return blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1:]


def _splice_into_header(draw, blob: bytes) -> bytes:
    """Bytes inserted inside the header (its length updated): invalid UTF-8, a BOM, NUL, whitespace."""
    (n,) = struct.unpack("<Q", blob[:8])
    piece = draw(st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\x00", b" ",
                                  b"\n", b"\t", b"\x0b", b"\x80"]) | st.binary(min_size=1, max_size=4))
    i = 8 + draw(st.integers(0, n))
    return struct.pack("<Q", (n + len(piece)) % 2**64) + blob[8:i] + piece + blob[i:]


def _pad(draw, blob: bytes) -> bytes:
    """Padding at the end of the header, as writers align it: spaces (valid) or other bytes."""
    (n,) = struct.unpack("<Q", blob[:8])
    piece = draw(st.sampled_from([b" ", b"\x00", b"\t", b"\r\n"])) * draw(st.integers(1, 9))
    return struct.pack("<Q", (n + len(piece)) % 2**64) + blob[8:8 + n] + piece + blob[8 + n:]


_BYTE_MUTATIONS = [_set_length, _truncate, _append, _flip, _splice_into_header, _pad]


@st.composite
def _mutated_files(draw) -> bytes:
    """A well-formed file, its header parsed, mutated and re-serialized, then its bytes mutated."""
    blob = draw(_valid_files())
    (n,) = struct.unpack("<Q", blob[:8])
    top = _Obj([k, v] for k, v in json.loads(blob[8:8 + n]).items())
    # Few mutations at a time: each one alone is what reaches a check; most pairs stop at the first.
    for mutate in draw(st.lists(st.sampled_from(_HEADER_MUTATIONS), min_size=1, max_size=2)):
        mutate(draw, top)
    if draw(st.integers(0, 19)) == 0:  # not an object at all
        top = draw(st.one_of(_JSON, _nested()))
    text = _encode(top, ascii_only=draw(st.booleans()))
    blob = struct.pack("<Q", len(text)) + text + blob[8 + n:]
    if draw(st.integers(0, 2)) == 0:
        for mutate in draw(st.lists(st.sampled_from(_BYTE_MUTATIONS), min_size=1, max_size=2)):
            if len(blob) >= 8:
                blob = mutate(draw, blob)
    return blob


# --- header reader properties -----------------------------------------------------------------------


def _check_read_header(blob: bytes, limits: tuple[int, int]) -> Any:
    """read_header on ``blob`` in the recording store: typed error or consistent header, bounded reads,
    and the same verdict as parse_header on the whole file."""
    with _fresh_store(limits, allowed=f"{_ROOT}/"):
        storage = Storage(f"{_FS.protocol}://{_ROOT}")
        _put(storage.path("f.safetensors"), blob)
        got = _outcome(lambda: read_header(storage, "f.safetensors", len(blob)))
        _assert_no_problem_reads()
        _assert_header_reads_bounded(storage.path("f.safetensors"), blob)
        if isinstance(got, Header):
            _assert_consistent(got, blob)
        n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
        direct = _outcome(lambda: parse_header(blob[:8], blob[8:8 + n], len(blob), storage.url("f.safetensors")))
        if isinstance(got, Header):
            assert got == direct
        else:
            assert type(direct) is type(got) and str(direct) == str(got)
        return got


@given(blob=st.binary(max_size=200), limits=_LIMITS)
def test_read_header_of_arbitrary_bytes(blob, limits):
    _check_read_header(blob, limits)


@given(header=st.one_of(st.binary(max_size=120), _JSON.map(lambda v: _encode(v, False))),
       data=st.binary(max_size=40), limits=_LIMITS)
def test_read_header_of_arbitrary_header_bytes_behind_a_matching_length(header, data, limits):
    _check_read_header(struct.pack("<Q", len(header)) + header + data, limits)


@given(blob=_valid_files(), probe=st.sampled_from([8, 9, 16, 100, _REAL_PROBE]))
def test_read_header_accepts_every_well_formed_file(blob, probe):
    got = _check_read_header(blob, (probe, _REAL_CAP))
    assert isinstance(got, Header), got


@given(blob=_mutated_files(), limits=_LIMITS)
def test_read_header_of_mutated_files(blob, limits):
    _check_read_header(blob, limits)


@given(prefix=st.binary(max_size=10), header=st.binary(max_size=64) | _JSON.map(lambda v: _encode(v, True)),
       file_size=st.one_of(st.integers(0, 200), st.integers(0, 2**70)))
def test_parse_header_with_arbitrary_arguments(prefix, header, file_size):
    got = _outcome(lambda: parse_header(prefix, header, file_size, "x.safetensors"))
    if isinstance(got, Header):
        (n,) = struct.unpack("<Q", prefix)
        assert len(header) == n and got.data_start == 8 + n <= file_size == got.file_size
        cursor = got.data_start
        for e in got.tensors:
            assert e.begin == cursor and e.nbytes == math.prod(e.shape) * DTYPE_SIZES[e.dtype]
            cursor = e.end
        assert cursor == file_size
    else:
        assert str(got).startswith("x.safetensors: ")


# --- index reader properties ------------------------------------------------------------------------


_SHARD_NAMES = st.one_of(
    _ANY_TEXT.map(lambda s: s + ".safetensors"),
    st.sampled_from(["../outside.safetensors", "/outside.safetensors", f"{_ROOT}/outside.safetensors",
                     "sub/x.safetensors", "x\\y.safetensors", "C:x.safetensors", "~x.safetensors", "..", ".",
                     "", "x\x00.safetensors", INDEX_NAME, "config.json", "x.SAFETENSORS", ".safetensors",
                     "x.safetensors/", "outside.safetensors", "model.safetensors", "pytorch_model.bin"]),
    _JSON,
)


def _plain(name: Any) -> bool:
    """Whether a file of this name can be stored directly in the checkpoint directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


@st.composite
def _checkpoints(draw) -> tuple[dict[str, bytes], Any, str]:
    """A sharded checkpoint, then mutated: ``(files, index, uri suffix)``, where ``index`` is the
    index's bytes (or None for no index) and the suffix is "" or a file name the URI points at."""
    n_shards = draw(st.integers(1, 3))
    shards = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    tensors = draw(st.lists(st.tuples(_TENSOR_NAMES, st.sampled_from(_DTYPES), _SHAPES), min_size=n_shards,
                            max_size=5, unique_by=lambda t: t[0]))
    where = [i % n_shards for i in range(len(tensors))]
    layout: dict[str, list] = {s: [t for t, w in zip(tensors, where) if shards[w] == s] for s in shards}
    weight_map = _Obj([t[0], shards[w]] for t, w in zip(tensors, where))
    top = _Obj([["metadata", {"total_size": 0}], ["weight_map", weight_map]])
    side: dict[str, bytes] = {}
    suffix = ""

    def rename_shard() -> None:
        old, new = draw(st.sampled_from(shards)), draw(_SHARD_NAMES)
        for pair in weight_map:
            if pair[1] == old:
                pair[1] = new
        # The file renamed too, or only its name in the index.
        if draw(st.booleans()) and old in layout and _plain(new) and new not in layout:
            layout[new] = layout.pop(old)

    def map_entry() -> None:
        choice = draw(st.integers(0, 3))
        if choice == 0 and weight_map:
            del weight_map[draw(st.integers(0, len(weight_map) - 1))]
        elif choice == 1:  # a tensor no shard holds, in a shard that may not exist
            weight_map.append([draw(_ANY_TEXT), draw(st.sampled_from(shards) | _SHARD_NAMES)])
        elif choice == 2 and weight_map:  # retarget, or a key twice
            pair = draw(st.sampled_from(list(weight_map)))
            weight_map.append([pair[0], draw(st.sampled_from(shards))])
            if draw(st.booleans()):
                weight_map.remove(pair)
        elif weight_map:
            draw(st.sampled_from(list(weight_map)))[1] = draw(_JSON)

    def tensor_in_two_shards() -> None:
        a, b = draw(st.sampled_from(shards)), draw(st.sampled_from(shards))
        if layout.get(a) and b in layout and a != b and layout[a][0] not in layout[b]:
            layout[b] = [*layout[b], layout[a][0]]

    def index_structure() -> None:
        choice = draw(st.integers(0, 3))
        if choice < 2:  # weight_map or metadata of another type, nested, huge
            key = ("weight_map", "metadata")[choice]
            value = draw(st.one_of(_JSON, _nested(), st.just({}), st.just(_Raw("9" * 5000))))
            for pair in top:
                if pair[0] == key:
                    pair[1] = value
        elif choice == 2:
            top.append(["weight_map", draw(st.just(_Obj(weight_map)) | _JSON)])
        elif top:
            del top[draw(st.integers(0, len(top) - 1))]

    def files_around() -> None:
        nonlocal suffix
        choice = draw(st.integers(0, 4))
        if choice == 0 and len(layout) > 1:
            del layout[draw(st.sampled_from(sorted(layout)))]
        elif choice == 1:
            side["extra.safetensors"] = _graft_file([("extra", "U8", [1])], None)
        elif choice == 2:
            side["pytorch_model.bin"] = b"\x80\x05not a pickle"
        elif choice == 3:
            side["config.json"] = b"{}"
        else:
            suffix = draw(st.sampled_from(sorted(layout) + ["missing.safetensors"]))

    mutations = [rename_shard, map_entry, tensor_in_two_shards, index_structure, files_around]
    for mutate in draw(st.lists(st.sampled_from(mutations), max_size=3)):
        mutate()
    files = {name: _graft_file(ts, {"format": "pt"}) for name, ts in layout.items()}
    files.update(side)
    if draw(st.integers(0, 5)) == 0 and files:  # one shard's bytes mutated as in the header tests
        victim = draw(st.sampled_from(sorted(files)))
        files[victim] = draw(_mutated_files()) if draw(st.booleans()) else _flip(draw, files[victim])

    index: bytes | None = _encode(top, ascii_only=draw(st.booleans()))
    choice = draw(st.integers(0, 9))
    if choice == 0:
        index = None
    elif choice == 1:
        index = draw(st.binary(max_size=64))
    elif choice == 2:
        index = _flip(draw, index)
    elif choice == 3:
        index = b"\xef\xbb\xbf" + index
    elif choice == 4:
        index = index + b" " * draw(st.sampled_from([64, 256, 600]))  # over the lowered caps
    return files, index, suffix


@given(checkpoint=_checkpoints(), limits=_LIMITS)
def test_open_checkpoint_of_mutated_indexes_and_shards(checkpoint, limits):
    files, index, suffix = checkpoint
    directory = f"{_ROOT}/ckpt"
    with _fresh_store(limits, allowed=f"{directory}/"):
        # A valid file next to the checkpoint: an index that reaches it has escaped the directory.
        _put(f"{_ROOT}/outside.safetensors", _graft_file([("outside", "U8", [1])], None))
        for name, data in files.items():
            _put(f"{directory}/{name}", data)
        if index is not None:
            _put(f"{directory}/{INDEX_NAME}", index)
        uri = f"{_FS.protocol}://{directory}" + (f"/{suffix}" if suffix else "")

        got = _outcome(lambda: open_checkpoint(uri))

        _assert_no_problem_reads()
        for path, begin, end in _FS.reads:
            name = path.rsplit("/", 1)[-1]
            if name == INDEX_NAME:
                assert end - begin <= checkpoint_module.MAX_INDEX_BYTES
            else:
                _assert_header_reads_bounded(path, files[name])
        if isinstance(got, Checkpoint):
            _assert_checkpoint_consistent(got, files, index if not suffix else None)


def _assert_checkpoint_consistent(ckpt: Checkpoint, files: dict[str, bytes], index: bytes | None) -> None:
    assert {f.name: f.size for f in ckpt.files} == {f.name: len(files[f.name]) for f in ckpt.files}
    assert set(ckpt.headers) == {f.name for f in ckpt.files}
    for name, header in ckpt.headers.items():
        _assert_consistent(header, files[name])
    assert set(ckpt.tensors) == {e.name for h in ckpt.headers.values() for e in h.tensors}
    for name, ref in ckpt.tensors.items():
        header = ckpt.headers[ref.file]
        assert ref.name == name
        assert header.data_start <= ref.begin <= ref.end <= header.file_size == len(files[ref.file])
        assert ref.nbytes == math.prod(ref.shape) * DTYPE_SIZES[ref.dtype]
    assert ckpt.sharded == (index is not None)
    if ckpt.sharded:
        # Accepted, so the index is strict JSON: the plain parser reads the same weight_map.
        weight_map = json.loads(index)["weight_map"]
        assert {n: r.file for n, r in ckpt.tensors.items()} == weight_map
