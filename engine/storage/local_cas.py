"""Compare-and-swap writes of one small file on local disk (``cas.py`` is the face).

The new content is written whole to a temporary and ``link()``-ed to the name (fails if the name
exists), so no reader ever sees a half-written file; a replace first ``rename()``-s the current
file aside (only one of two racers can) and puts it back when it is not the version expected. The
version is the inode with its modification time: every write is a new inode. Filesystems without
hard links (some FUSE, SMB and FAT mounts) have no compare-and-swap (``hard_links``).
"""
from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING

from ..errors import NotFoundError
from .atomic import TEMP_MARK

if TYPE_CHECKING:
    from .base import Storage

__all__ = ["hard_links", "create", "replace", "read", "aside_prefix"]


_HARD_LINKS: dict[str, bool] = {}


def hard_links(root: str) -> bool:
    """Whether the local filesystem at ``root`` makes hard links (some FUSE, SMB and FAT mounts do
    not: there graft falls back to plain writes, as on a store without conditional writes)."""
    if root not in _HARD_LINKS:
        probe = os.path.join(root, f".graft-link-probe{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with open(probe, "wb"):
                pass
            try:
                os.link(probe, probe + "-2")
                os.unlink(probe + "-2")
                _HARD_LINKS[root] = True
            except OSError:
                _HARD_LINKS[root] = False
            finally:
                os.unlink(probe)
        except OSError:
            return True  # the directory is not there yet (or not writable): the write will say so
    return _HARD_LINKS[root]


def _version(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"


def _aside(storage: Storage, name: str, what: str) -> str:
    return storage.path(f".{name}{TEMP_MARK}{what}-{uuid.uuid4().hex[:12]}")


def _staged(storage: Storage, name: str, data: bytes) -> tuple[str, str]:
    """``data`` written whole and synced to a temporary; its path and the version it will have."""
    tmp = _aside(storage, name, "new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        version = _version(os.fstat(fd))
    finally:
        os.close(fd)
    return tmp, version


def _sync_dir(storage: Storage) -> None:
    fd = os.open(storage.root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create(storage: Storage, name: str, data: bytes) -> str | None:
    tmp, version = _staged(storage, name, data)
    try:
        os.link(tmp, storage.path(name))
    except FileExistsError:
        return None
    finally:
        _unlink(tmp)
    _sync_dir(storage)
    return version


def replace(storage: Storage, name: str, data: bytes, version: str) -> str | None:
    tmp, new_version = _staged(storage, name, data)
    old = _aside(storage, name, "old")
    path = storage.path(name)
    try:
        try:
            os.rename(path, old)  # of two racers, one moves the file; the other finds nothing
        except FileNotFoundError:
            return None
        if _version(os.stat(old)) != version:
            try:
                os.link(old, path)  # not the file expected: put it back as it was
            except FileExistsError:
                pass
            return None
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None  # created anew in the instant the name was free
        _sync_dir(storage)
        return new_version
    finally:
        _unlink(tmp)
        _unlink(old)


def aside_prefix(name: str) -> str:
    """Names starting with this are ``name`` moved aside by a replace in progress (local disk)."""
    return f".{name}{TEMP_MARK}old-"


# A replace leaves the name free for an instant (between moving the old file aside and linking the
# new one). A reader that finds it free while an aside exists looks again for this long; if the name
# is still free, the writer stopped in that instant (killed): the file moved aside is put back.
_GAP_SECONDS = 1.0


def read(storage: Storage, name: str) -> tuple[bytes, str]:
    path = storage.path(name)
    deadline, restored = time.monotonic() + _GAP_SECONDS, False
    while True:
        try:
            with open(path, "rb") as f:
                return f.read(), _version(os.fstat(f.fileno()))
        except FileNotFoundError:
            asides = [e for e in os.listdir(storage.root) if e.startswith(aside_prefix(name))]
            if not asides or restored:
                raise NotFoundError(f"{storage.url(name)}: no such file") from None
            if time.monotonic() < deadline:
                time.sleep(0.01)
                continue
            newest = max(asides, key=lambda e: os.stat(storage.path(e)).st_mtime_ns)
            try:
                os.link(storage.path(newest), path)
            except (FileExistsError, FileNotFoundError):
                pass  # the writer (or another reader) got there first
            restored = True
