"""A fault-injecting fsspec filesystem for tests: ``faulty:///abs/dir`` is the local directory
``/abs/dir``, and the rules in its storage options make some calls fail the way remote stores do.

    options = faulty_options(journal, rule("reset", match="model-*.safetensors", after=4096, times=2))
    spec_from_mapping({..., "storage_options": options})

A rule names a fault ``kind``, the operation it hits (``read``, ``stat``, ``list``, ``write``), the
files it hits (an fnmatch pattern on the base name), and how often: ``times=k`` fails the first k
matching calls per file and then behaves (transient), ``times=None`` fails every one (permanent).
``after=n`` lets n bytes of a file through first (read: served by earlier calls; write: written).

Rules travel in the storage options, so Ray workers (other processes) apply them too; each injection
is appended as one line to the ``journal`` file, so a test can count what really happened wherever
it happened. Counters of calls and bytes are per process.
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from graft.engine.storage import TEMP_MARK

__all__ = ["PROTOCOL", "KINDS", "FaultyFileSystem", "Injection", "count", "faulty_options", "faulty_uri",
           "injected", "register", "rule"]

PROTOCOL = "faulty"

# What each kind does when it fires. "slow" and "short" still answer; the others raise.
KINDS = {
    "reset": "ConnectionResetError (ECONNRESET), as a dropped TCP connection",
    "timeout": "TimeoutError, as a read timeout of an HTTP client",
    "slow": "sleep `seconds`, then answer normally",
    "short": "answer a ranged read with half the bytes asked",
    "throttle": "S3 503 SlowDown as s3fs raises it: OSError(EBUSY) caused by botocore's ClientError",
    "payload": "aiohttp's ClientPayloadError (a response body cut short)",
    "denied": "PermissionError (EACCES)",
    "enospc": "OSError(ENOSPC) once `after` bytes are written",
}
_OPS = ("read", "stat", "list", "write")


def rule(kind: str, op: str | None = None, match: str = "*", after: int = 0, times: int | None = 1,
         seconds: float = 0.0) -> dict[str, Any]:
    """One fault rule as plain values (it travels in storage options). ``op`` defaults to
    ``write`` for ``enospc`` and ``read`` otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(KINDS)}")
    op = op or ("write" if kind == "enospc" else "read")
    if op not in _OPS:
        raise ValueError(f"unknown operation {op!r}; one of {', '.join(_OPS)}")
    if kind == "short" and op != "read":
        raise ValueError("a 'short' fault applies to reads only")
    if kind == "enospc" and op != "write":
        raise ValueError("an 'enospc' fault applies to writes only")
    return {"kind": kind, "op": op, "match": match, "after": after, "times": times, "seconds": seconds}


def faulty_uri(path: str) -> str:
    """The faulty:// location of a local directory."""
    return f"{PROTOCOL}://{os.path.abspath(path)}"


def faulty_options(journal: str, *rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """graft ``storage_options`` that apply ``rules`` to every faulty:// location of a job."""
    return {PROTOCOL: {"journal": journal, "rules": list(rules)}}


@dataclass(frozen=True)
class Injection:
    """One fault that fired: its kind, operation, the file's base name and the process it hit."""

    kind: str
    op: str
    file: str
    pid: int


def injected(journal: str) -> list[Injection]:
    """Every fault injected so far under ``journal``, in any process."""
    if not os.path.exists(journal):
        return []
    with open(journal) as f:
        return [Injection(**json.loads(line)) for line in f if line.strip()]


def count(journal: str) -> Counter[tuple[str, str]]:
    """Injections per (kind, op)."""
    return Counter((i.kind, i.op) for i in injected(journal))


class _Tally:
    """Per-process state of one journal's rules: failed calls and bytes let through, per file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.failed: Counter[tuple[int, str]] = Counter()
        self.through: Counter[tuple[int, str]] = Counter()


_TALLIES: dict[str, _Tally] = {}
_TALLIES_LOCK = threading.Lock()


def _tally(journal: str) -> _Tally:
    # fsspec caches one instance per thread; the counts must be shared by all of them.
    with _TALLIES_LOCK:
        return _TALLIES.setdefault(journal, _Tally())


def _raise(kind: str, path: str) -> None:
    if kind == "reset":
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer", path)
    if kind == "timeout":
        raise TimeoutError(f"read timed out after 30s: {path}")
    if kind == "denied":
        raise PermissionError(errno.EACCES, "Access Denied", path)
    if kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", path)
    if kind == "payload":
        from aiohttp import ClientPayloadError

        raise ClientPayloadError("Response payload is not completed")
    if kind == "throttle":
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        err = ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
        raise translate_boto_error(err)
    raise AssertionError(kind)


def _final_name(path: str) -> str:
    """The base name a rule matches: for graft's temporary ``.<name>.graft-tmp-<id>``, ``<name>``
    (so a rule on ``model-*.safetensors`` hits the shard while it is being written)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if TEMP_MARK in name and name.startswith("."):
        name = name[1:name.index(TEMP_MARK)]
    return name


class FaultyFileSystem(AbstractFileSystem):
    """The local filesystem behind ``faulty://``, with the faults of ``rules`` injected."""

    protocol = PROTOCOL
    root_marker = "/"

    def __init__(self, journal: str | None = None, rules: list[dict[str, Any]] | tuple = (),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.journal = journal
        self.rules = [dict(r) for r in rules]
        self.local = LocalFileSystem()
        if self.rules and not journal:
            raise ValueError("faulty:// rules need a journal file to record what they inject")

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len(PROTOCOL) + 3:] if path.startswith(f"{PROTOCOL}://") else path
        return path.rstrip("/") or "/"

    # -- fault decisions ---------------------------------------------------------------------------

    def _firing(self, op: str, path: str, nbytes: int, ranged: bool = True) -> dict[str, Any] | None:
        """The first rule that fires for this call of ``nbytes`` (counted and journaled), or None:
        the call goes through and its bytes count as let through. Only a ranged read can be short
        (a whole-file read has no length to fall short of)."""
        if not self.rules:
            return None
        name = _final_name(path)
        tally = _tally(self.journal)
        with tally.lock:
            matching = [(i, r) for i, r in enumerate(self.rules)
                        if r["op"] == op and fnmatch.fnmatchcase(name, r["match"])
                        and (r["kind"] != "short" or (ranged and nbytes > 1))]
            for i, r in matching:
                key = (i, name)
                if r["after"] > 0 and tally.through[key] + nbytes <= r["after"]:
                    continue  # still within the bytes this rule lets through
                if r["times"] is not None and tally.failed[key] >= r["times"]:
                    continue  # a transient fault that has passed
                tally.failed[key] += 1
                self._record(r["kind"], op, name)
                return r
            for i, _ in matching:
                tally.through[(i, name)] += nbytes
        return None

    def _record(self, kind: str, op: str, name: str) -> None:
        line = json.dumps({"kind": kind, "op": op, "file": name, "pid": os.getpid()}) + "\n"
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())  # one small O_APPEND write: lines of processes never mix
        finally:
            os.close(fd)

    def _strike(self, op: str, path: str, nbytes: int = 0, ranged: bool = True) -> dict[str, Any] | None:
        """Apply the rule that fires: raise, or sleep; returns a rule that changes the answer."""
        r = self._firing(op, path, nbytes, ranged)
        if r is None:
            return None
        if r["kind"] == "slow":
            time.sleep(r["seconds"])
            return None
        if r["kind"] == "short":
            return r
        _raise(r["kind"], path)
        return None

    # -- what graft's Storage calls ----------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        ranged = start is not None and end is not None
        nbytes = end - start if ranged else self.local.size(path)
        shorten = self._strike("read", path, nbytes, ranged)
        data = self.local.cat_file(path, start=start, end=end)
        return data[:len(data) // 2] if shorten is not None else data

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        self._strike("stat", path)
        return self._with_etag(self.local.info(path))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        self._strike("list", path)
        entries = [self._with_etag(e) for e in self.local.ls(path, detail=True)]
        return entries if detail else [e["name"] for e in entries]

    @staticmethod
    def _with_etag(info: dict[str, Any]) -> dict[str, Any]:
        # Object stores give every object a version; so does this one, so graft's checks that an
        # input did not change during a run (a stat per input file) run against it too.
        if info.get("type") == "file":
            info = {**info, "ETag": f'"{info["size"]}-{info["mtime"]!r}"'}
        return info

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        f = self.local._open(path, mode=mode, autocommit=autocommit, **kwargs)
        if "w" in mode and any(r["op"] == "write" for r in self.rules):
            return _FaultyWriteFile(self, path, f)
        return f

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self.local.exists(self._strip_protocol(path))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.local.mv(self._strip_protocol(path1), self._strip_protocol(path2))

    def rm_file(self, path: str) -> None:
        self.local.rm_file(self._strip_protocol(path))

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.local.rm(self._strip_protocol(path), recursive=recursive, maxdepth=maxdepth)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)


class _FaultyWriteFile:
    """A local file opened for writing whose ``write`` calls go through the ``write`` rules; the
    bytes before the limit of a firing ``after`` rule do reach the file, as on a disk filling up."""

    def __init__(self, fs: FaultyFileSystem, path: str, f: Any):
        self._fs, self._path, self._f = fs, path, f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        r = self._fs._firing("write", self._path, len(view))
        if r is None:
            return self._f.write(view)
        if r["kind"] == "slow":
            time.sleep(r["seconds"])
            return self._f.write(view)
        room = max(0, r["after"] - self._f.tell())
        self._f.write(view[:room])
        _raise(r["kind"], self._path)
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyWriteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def register() -> None:
    """Make ``faulty://`` known to fsspec in this process (also a Ray worker setup hook)."""
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


register()
