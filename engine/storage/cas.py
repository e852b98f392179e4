"""Compare-and-swap writes of one small file: what makes the run mark a lock and not a convention.

Three calls, each naming the file's *version* (a token that changes with every write):

- ``create(storage, name, data)``: write ``name`` only if it does not exist; its new version, or
  None when it existed.
- ``replace(storage, name, data, version)``: write ``name`` only if it is still at ``version``; its
  new version, or None when someone else wrote (or removed) it since.
- ``read(storage, name)``: its bytes and their version; ``NotFoundError`` when absent.

``supported(storage)`` says whether the store offers them; each store implements them with its own
preconditions (``Storage.put_if`` / ``read_versioned``): local disk with ``link()`` and
rename-aside (``local_cas.py``), S3 with ``If-None-Match`` / ``If-Match`` on the ETag, GCS with
``ifGenerationMatch`` on the generation, Azure with ``If-None-Match`` / ``If-Match`` on the ETag.
Elsewhere (``memory://``, ...) the caller falls back to plain writes and says so (last writer wins).

An answer lost after a write landed reads as a failed condition on the next call; callers that
must tell the two apart read the file back and look for their own token in it.
"""
from __future__ import annotations

from .base import Storage
from .local_cas import aside_prefix

__all__ = ["supported", "create", "replace", "read", "aside_prefix"]


def supported(storage: Storage) -> bool:
    return storage.conditional_writes()


def _require(storage: Storage) -> None:
    if not supported(storage):
        raise NotImplementedError(f"{storage.protocol}: no conditional writes")


def create(storage: Storage, name: str, data: bytes) -> str | None:
    _require(storage)
    return storage.put_if(name, data, None)


def replace(storage: Storage, name: str, data: bytes, version: str) -> str | None:
    _require(storage)
    return storage.put_if(name, data, version)


def read(storage: Storage, name: str) -> tuple[bytes, str]:
    _require(storage)
    return storage.read_versioned(name)
