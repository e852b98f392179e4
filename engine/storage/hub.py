"""The Hugging Face Hub as an input store (``hf://org/repo[@revision][/dir]``).

``HubStorage`` reads through fsspec's ``HfFileSystem`` like every other store; what is particular
to the Hub lives here and nowhere else:

- pinning: a branch or tag is resolved once, at plan time, to the commit sha it points to
  (``pinned()``); the pinned URI (``hf://org/repo@<sha>``) is what every worker reads, so a push to
  the branch during a run cannot mix two versions.
- stat: size, version and content digest from the repository tree (LFS sha256 for LFS files, the
  git blob id for the others); a whole-file read is checked against the digest. Tensor data is
  read by byte range and never downloaded whole.
- retries: the Hub client retries a range request itself (huggingface_hub's ``http_backoff``: 6
  attempts on 429/5xx, timeouts and network errors, honouring Retry-After), so graft's layer only
  adds what it does not: a short answer read again.

The Hub is never written to as a job ``output``: a job writes to local disk or an object store
(atomic, resumable, checksummed) and ``graft push`` publishes the committed result
(``publish.py``, above the manifest; nothing below imports it). The Hub client is imported only
when an ``hf://`` location is used.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Mapping

from . import retry
from ..errors import StorageError
from .base import FileStat, Storage
from .generic import FsspecStorage
from .retry import ShortRead

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["HubStorage", "hub_api", "pin_revision", "repo_id_of", "first_line"]

_REPO_ID = re.compile(r"^hf://(?:models/)?([\w.-]+/[\w.-]+)")


def hub_api(storage_options: Mapping[str, Any]) -> HfApi:
    from huggingface_hub import HfApi

    # endpoint/token from the hf storage options, else HF_ENDPOINT / HF_TOKEN / the login cache.
    return HfApi(endpoint=storage_options.get("endpoint"), token=storage_options.get("token"))


def pin_revision(storage: Storage) -> tuple[str, str]:
    """(the location at its commit sha, the sha) for an ``hf://`` location."""
    from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

    try:
        resolved = storage.fs.resolve_path(storage.root)
    except FileNotFoundError as e:
        raise StorageError(f"{storage.display_uri}: no such Hub repository or revision ({first_line(e)}); "
                           f"check the repository id, the @revision, and that your token (HF_TOKEN) "
                           f"may read it") from None
    except (ValueError, NotImplementedError) as e:
        raise StorageError(f"{storage.display_uri}: not a Hub repository location ({e}); write "
                           f"hf://org/repo or hf://org/repo@revision") from None
    except Exception as e:  # noqa: BLE001 - network and HTTP errors of every kind
        raise StorageError(f"{storage.display_uri}: cannot reach the Hub: {e.__class__.__name__}: "
                           f"{first_line(e)}") from None
    if not isinstance(resolved, HfFileSystemResolvedRepositoryPath):
        raise StorageError(f"{storage.display_uri}: not a model, dataset or space repository")
    try:
        info = hub_api(storage.storage_options.get("hf", {})).repo_info(
            resolved.repo_id, revision=resolved.revision, repo_type=resolved.repo_type)
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"{storage.display_uri}: cannot resolve revision {resolved.revision!r}: "
                           f"{e.__class__.__name__}: {first_line(e)}") from None
    sha = str(info.sha)
    pinned = dataclasses.replace(resolved, revision=sha, _raw_revision=sha)
    return f"hf://{pinned.unresolve()}", sha


def repo_id_of(uri: str) -> str | None:
    """``org/repo`` of an ``hf://`` model location, else None."""
    m = _REPO_ID.match(uri)
    return m.group(1) if m else None


def first_line(e: BaseException) -> str:
    """An error's first line, credentials redacted (the Hub client's messages carry URLs); its
    class name when it has none."""
    return retry.first_line(e) or e.__class__.__name__


class HubStorage(FsspecStorage):
    protocols = ("hf",)

    def __init__(self, uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None):
        super().__init__(uri, storage_options)
        m = re.search(r"@([0-9a-f]{40})(?:/|$)", self.uri)
        self.commit = m.group(1) if m else None

    def pinned(self) -> Storage:
        if self.commit is not None:
            return self
        return HubStorage(pin_revision(self)[0], self.storage_options)

    def _stat_once(self, name: str) -> FileStat:
        # A pinned commit never changes, so its (cached) listing is always current.
        entries = self.fs.ls(self.root, detail=True, refresh=self.commit is None)
        for e in entries:
            if e.get("type") == "file" and e["name"].rsplit("/", 1)[-1] == name:
                lfs = e.get("lfs")
                digest = f"sha256:{lfs['sha256']}" if lfs else f"git-sha1:{e['blob_id']}"
                return FileStat(name=name, size=int(e["size"]), version=digest, digest=digest)
        raise FileNotFoundError(self.path(name))

    def _expected_digest(self, name: str) -> str | None:
        return self.stat(name).digest

    def _retryable(self, e: BaseException) -> bool:
        return isinstance(e, ShortRead)  # the Hub client retried everything else already

    def _fetch(self, name: str, start: int | None, end: int | None, version: str | None) -> bytes:
        # The Hub's file objects cache read-ahead blocks by default: ask for exactly the range.
        return self.fs.cat_file(self.path(name), start=start, end=end, cache_type="none")
