"""The Hugging Face Hub as an input: pinned revisions and checked files for hf:// locations.

Reading goes through the same ``Storage`` as every other store (fsspec's ``HfFileSystem``,
``hf://org/repo[@revision][/dir]``); this module only holds what is particular to the Hub:

- ``pin_revision``: a branch or tag is resolved once, at plan time, to the commit sha it points
  to; the pinned URI (``hf://org/repo@<sha>``) is what every worker reads, so a push to the branch
  during a run cannot mix two versions.
- ``stat_hub_file``: size, version and content digest from the repository tree (LFS sha256 for
  LFS files, the git blob id for the others). ``Storage.read`` checks the digest whenever it reads a
  whole file; tensor data is read by byte range and never downloaded whole.
The Hub is never written to as a job ``output``: a job writes to local disk or an object store
(atomic, resumable, checksummed) and ``graft push`` publishes the committed result
(``publish.py``, above the manifest; nothing below imports it).
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Mapping

from huggingface_hub import HfApi
from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

from .errors import StorageError
from .redaction import redact_text

if TYPE_CHECKING:  # storage imports this module (for hf:// locations), not the other way round
    from .storage import Storage

__all__ = ["hub_api", "pin_revision", "stat_hub_file", "repo_id_of", "first_line"]

_REPO_ID = re.compile(r"^hf://(?:models/)?([\w.-]+/[\w.-]+)")


def hub_api(storage_options: Mapping[str, Any]) -> HfApi:
    # endpoint/token from the hf storage options, else HF_ENDPOINT / HF_TOKEN / the login cache.
    return HfApi(endpoint=storage_options.get("endpoint"), token=storage_options.get("token"))


def pin_revision(storage: Storage) -> tuple[str, str]:
    """(the location at its commit sha, the sha) for an ``hf://`` location."""
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


def stat_hub_file(storage: Storage, name: str) -> tuple[int, str]:
    """What the repository tree records for ``name``: its size and content digest (which is also
    its version)."""
    # A pinned commit never changes, so its (cached) listing is always current.
    entries = storage.fs.ls(storage.root, detail=True, refresh=storage.commit is None)
    for e in entries:
        if e.get("type") == "file" and e["name"].rsplit("/", 1)[-1] == name:
            lfs = e.get("lfs")
            digest = f"sha256:{lfs['sha256']}" if lfs else f"git-sha1:{e['blob_id']}"
            return int(e["size"]), digest
    raise FileNotFoundError(storage.path(name))


def repo_id_of(uri: str) -> str | None:
    """``org/repo`` of an ``hf://`` model location, else None."""
    m = _REPO_ID.match(uri)
    return m.group(1) if m else None


def first_line(e: BaseException) -> str:
    """An error's first line, credentials redacted (the Hub client's messages carry URLs)."""
    text = str(e).strip()
    return redact_text(text.splitlines()[0]) if text else e.__class__.__name__
