"""SHA256SUMS, graft.manifest.json, and verification of a committed output.

``SHA256SUMS`` is in coreutils format (``sha256sum -c SHA256SUMS`` passes in the output directory)
and covers every output file but itself and the manifest. The manifest, written last, is the commit
marker: it lists every output file (SHA256SUMS included) with size and sha256.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import GraftError, IntegrityError
from ..storage import Storage

__all__ = [
    "MANIFEST_NAME",
    "SUMS_NAME",
    "REPORT_NAME",
    "RUN_MARK",
    "MANIFEST_FORMAT",
    "OutputFile",
    "format_sums",
    "parse_sums",
    "hash_file",
    "hash_range",
    "VerifyReport",
    "verify_output",
]

MANIFEST_NAME = "graft.manifest.json"
SUMS_NAME = "SHA256SUMS"
# The other files graft keeps in an output folder, named here because verification must know them:
# the transfer report (covered by SHA256SUMS) and the run mark, the lock and journal of a run in
# progress (``run/runmark.py``; never covered, gone once the output commits).
REPORT_NAME = "graft.report.json"
RUN_MARK = ".graft-run.json"
MANIFEST_FORMAT = "graft.manifest/1"
_HASH_CHUNK = 8 * 2**20
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


@dataclass(frozen=True)
class OutputFile:
    """One committed output file."""

    name: str
    size: int
    sha256: str


def format_sums(files: list[OutputFile]) -> bytes:
    """coreutils ``sha256sum`` text for ``files`` (sorted by name)."""
    return "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name)).encode()


def parse_sums(text: bytes, where: str) -> dict[str, str]:
    """name -> sha256 from coreutils text; raises ``IntegrityError`` on a malformed line."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line)
        if not m:
            raise IntegrityError(f"{where}: line {i} is not '<sha256>  <file>'")
        out[m.group(2)] = m.group(1)
    return out


def hash_file(storage: Storage, name: str, size: int) -> str:
    """sha256 of ``name``, streamed in bounded chunks."""
    return hash_range(storage, name, 0, size)


def hash_range(storage: Storage, name: str, start: int, end: int, version: str | None = None) -> str:
    """sha256 of bytes ``[start, end)`` of ``name`` (of ``version``, where the store pins reads),
    streamed in bounded chunks."""
    h = hashlib.sha256()
    buf = bytearray(min(_HASH_CHUNK, max(end - start, 1)))
    with storage.reader(name, version=version) as r:
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            view = memoryview(buf)[:n]
            r.read_into(pos, view)
            h.update(view)
            pos += n
    return h.hexdigest()


@dataclass
class VerifyReport:
    """Result of ``verify_output``: ``ok`` only if every file matched and nothing is unaccounted for."""

    uri: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.checked)


def verify_output(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> VerifyReport:
    """Re-hash every output file against SHA256SUMS and the manifest."""
    storage = Storage(uri, storage_options)
    report = VerifyReport(storage.display_uri)  # shown by `graft verify`: credentials redacted
    listing = set(storage.list())
    if MANIFEST_NAME not in listing:
        report.problems.append(f"{storage.url(MANIFEST_NAME)}: missing; the output was never "
                               f"committed (the run failed or is still going): run it again")
        return report
    try:
        manifest = json.loads(storage.read(MANIFEST_NAME))
        entries = {e["name"]: OutputFile(e["name"], int(e["size"]), e["sha256"])
                   for e in manifest["outputs"]}
    except (ValueError, KeyError, TypeError) as e:
        report.problems.append(f"{storage.url(MANIFEST_NAME)}: unreadable ({e.__class__.__name__}: {e})")
        return report
    report.manifest = manifest
    sums: dict[str, str] = {}
    if SUMS_NAME not in listing:
        report.problems.append(f"{storage.url(SUMS_NAME)}: missing")
    else:
        try:
            sums = parse_sums(storage.read(SUMS_NAME), storage.url(SUMS_NAME))
        except IntegrityError as e:
            report.problems.append(str(e))
    for name in sorted(set(sums) - set(entries)):
        report.problems.append(f"{storage.url(name)}: in SHA256SUMS but not in the manifest")
    # A run mark the run could not remove after writing its manifest (killed in that instant) is
    # graft's own lock file, not output: it is not in SHA256SUMS and not pushed.
    for name in sorted(listing - set(entries) - {MANIFEST_NAME, RUN_MARK}):
        report.problems.append(f"{storage.url(name)}: not part of the committed output")
    for name, entry in sorted(entries.items()):
        if name not in listing:
            report.problems.append(f"{storage.url(name)}: missing")
            continue
        try:
            size = storage.stat(name).size
            if size != entry.size:
                report.problems.append(f"{storage.url(name)}: {size} bytes, manifest says {entry.size}")
                continue
            digest = hash_file(storage, name, size)
        except GraftError as e:
            report.problems.append(str(e))
            continue
        if digest != entry.sha256:
            report.problems.append(f"{storage.url(name)}: sha256 {digest} does not match the manifest "
                                   f"({entry.sha256}); the file is corrupt")
        elif name != SUMS_NAME and sums.get(name) not in (None, digest):
            report.problems.append(f"{storage.url(name)}: sha256 does not match SHA256SUMS")
        elif name != SUMS_NAME and name not in sums and SUMS_NAME in listing:
            report.problems.append(f"{storage.url(name)}: not listed in SHA256SUMS")
        else:
            report.checked.append(name)
    return report
