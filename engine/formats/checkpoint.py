"""A checkpoint: safetensors shard files (+ ``model.safetensors.index.json``) and side files.

``open_checkpoint(uri, storage_options)`` lists the location, reads the index (if any) and every
shard's header, and cross-checks them. Only headers are read; no tensor data, nothing unpickled.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from ..errors import CheckpointError
from ..redaction import redact_uri
from ..storage import TEMP_MARK, FileStat, Storage
from .safetensors import MAX_HEADER_BYTES, Header, TensorEntry, read_header, strict_json_loads

__all__ = ["INDEX_NAME", "SINGLE_NAME", "TensorRef", "Checkpoint", "open_checkpoint", "hf_cache_snapshot",
           "check_shard_name", "unsafe_name"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HEADER_READERS = 16
# An index (or a config.json, read to plan) is read whole: a file this big is not one (the largest
# real indexes are a few MB), and reading it would cost that much memory. Same cap as a safetensors
# header.
MAX_INDEX_BYTES = MAX_HEADER_BYTES


@dataclass(frozen=True)
class TensorRef(TensorEntry):
    """A header entry plus the shard ``file`` (a plain name inside the checkpoint) that holds it."""

    file: str


@dataclass(frozen=True)
class Checkpoint:
    """The weights of one checkpoint, as found in its headers.

    ``uri`` is the location as shown (messages, the manifest): credentials in it are redacted
    (``redaction.redact_uri``); ``storage`` holds the real one. ``tensors`` is ordered as the files
    store them: shard by shard (index order), then by offset. ``side_files`` are the other files at
    the location (config.json, tokenizer files, ...).
    """

    uri: str
    storage: Storage = field(compare=False, repr=False)
    files: tuple[FileStat, ...]
    tensors: dict[str, TensorRef]
    headers: dict[str, Header] = field(compare=False, repr=False)
    side_files: tuple[str, ...] = ()
    sharded: bool = False
    # Sizes of side files the listing already gave (local disk, S3); the others are stat'ed on demand.
    side_sizes: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def version_of(self, file: str) -> str | None:
        """The ETag / version / mtime ``file`` had when the checkpoint was opened."""
        return self._versions.get(file)

    @cached_property
    def _versions(self) -> dict[str, str | None]:
        # Asked once per tensor: a 671B checkpoint has 163 files and 92k tensors.
        return {f.name: f.version for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def side_file_size(self, name: str) -> int:
        """The size of side file ``name``: from the listing where it had one, else one stat (on the
        Hub, from its cached tree listing). No data is read."""
        size = self.side_sizes.get(name)
        return size if size is not None else self.storage.stat(name).size

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A side file graft reads to plan (config.json, tokenizer.json), parsed as a JSON object;
        None if absent. A file that is listed but cannot be read (the store failed, after retries)
        is an error, not a missing config; so is one too big to be one (it would be read whole into
        memory, before any plan could refuse it), and so is one that is not a JSON object (a
        truncated download, an array): it would plan on a guess and be copied into the output."""
        if name not in self.side_files:
            return None
        where = self.storage.url(name)
        size = self.side_file_size(name)
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{where}: {size} bytes, over the {MAX_INDEX_BYTES}-byte "
                                  f"limit for a JSON config; it is not one: remove or rename it")
        try:
            obj = json.loads(self.storage.read(name))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{where}: not valid JSON ({e.__class__.__name__}: {e}); graft reads it "
                                  f"to plan: fix or re-download it") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{where}: not a JSON object (it holds a {type(obj).__name__}); graft "
                                  f"reads it to plan: fix or re-download it")
        return obj


def unsafe_name(name: Any) -> str | None:
    """Why ``name`` cannot be an output file of graft's (None: it can). Output names come from the
    inputs (shards mirror the target's, side files are copied): a path escapes the output, a control
    character (a newline) forges lines of SHA256SUMS, a leading dot or graft's temporary marker makes
    the commit's sweep of temporaries delete the file."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        return "is not a file name"
    if "/" in name or "\\" in name or ":" in name or name.startswith("~"):
        return "is not a plain file name inside the checkpoint"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds a control character"
    if name.startswith(".") or TEMP_MARK in name:
        return f"is hidden or holds graft's temporary marker {TEMP_MARK!r}"
    return None


def check_shard_name(name: Any, where: str) -> str:
    """A shard name (from an index or a listing) must be a plain, safe ``*.safetensors`` file name
    inside the checkpoint (``unsafe_name``): the output mirrors the target's shard names."""
    why = unsafe_name(name)
    if why is not None:
        raise CheckpointError(f"{where}: shard name {name!r} {why}; rename the shard and fix the index so "
                              f"every shard is a plain file next to it")
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{where}: shard {name!r} is not a .safetensors file; graft reads only "
                              f"safetensors")
    return name


def _strict_json(data: bytes, where: str) -> Any:
    try:
        return strict_json_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e.__class__.__name__}: {e}); re-create the "
                              f"index") from None


def _pickle_refusal(uri: str, pickles: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{uri}: holds only pickle weights ({', '.join(pickles[:3])}); graft never unpickles files. "
        f"Convert it in a trusted environment, e.g. AutoModelForCausalLM.from_pretrained(path)"
        f".save_pretrained(new_path, safe_serialization=True), and point graft at new_path"
    )


def hf_cache_snapshot(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """``uri`` itself, unless it is a repository folder of the Hugging Face cache
    (``models--org--name`` holding ``refs/``, ``snapshots/`` and ``blobs/``, what ``hf download`` and
    ``from_pretrained`` leave): then its snapshot of ``refs/main``, or its only snapshot. Raises
    ``CheckpointError`` when several snapshots and no ``main`` leave the choice to the user."""
    repo = Storage(uri, storage_options)
    if not repo.is_local or repo.list() or not {"refs", "snapshots", "blobs"} <= set(repo.subdirectories()):
        return uri
    refs = Storage(f"{repo.uri}/refs", storage_options)
    snapshots = Storage(f"{repo.uri}/snapshots", storage_options).subdirectories()
    if "main" in refs.list():
        commit = refs.read("main").decode("utf-8", "replace").strip()
        if commit in snapshots:
            return f"{repo.uri}/snapshots/{commit}"
    if len(snapshots) == 1:
        return f"{repo.uri}/snapshots/{snapshots[0]}"
    shown = redact_uri(uri)
    raise CheckpointError(f"{shown}: a Hugging Face cache folder with {len(snapshots)} snapshots and no "
                          f"downloaded main; point graft at the one you mean: {shown}/snapshots/<commit> "
                          f"(one of {', '.join(snapshots[:3]) or 'none'})")


def open_checkpoint(uri: str, storage_options: Mapping[str, Mapping[str, Any]] | None = None) -> Checkpoint:
    """Discover and validate the checkpoint at ``uri`` (a directory, its index, one ``.safetensors``
    file, or a Hugging Face cache folder: ``hf_cache_snapshot``)."""
    if not uri.rstrip("/").endswith((".json", ".safetensors")):
        uri = hf_cache_snapshot(uri, storage_options)
    parent, _, fname = uri.rstrip("/").rpartition("/")
    if fname == INDEX_NAME:
        uri = parent or "/"  # the index names the shards beside it: the checkpoint is that directory
    elif fname.endswith(".json"):
        raise CheckpointError(f"{redact_uri(uri)}: a JSON file, not a checkpoint; point graft at the checkpoint's "
                              f"directory (the one holding {INDEX_NAME} or {SINGLE_NAME}) or at one "
                              f".safetensors file")
    shown = redact_uri(uri)  # for messages and the manifest; ``uri`` (credentials and all) for the I/O
    if fname.endswith(".safetensors"):
        storage = Storage(parent or "/", storage_options).pinned()
        known = storage.list_stats()
        listing = list(known)
        if fname not in listing:
            raise CheckpointError(f"{shown}: no such file")
        shard_names = [check_shard_name(fname, shown)]
        weight_map = None
    else:
        storage = Storage(uri, storage_options).pinned()
        known = storage.list_stats()
        listing = list(known)
        if not listing:
            raise CheckpointError(f"{shown}: no such checkpoint directory, or it is empty")
        weight_map = None
        if INDEX_NAME in listing:
            where = storage.url(INDEX_NAME)
            size = (known[INDEX_NAME] or storage.stat(INDEX_NAME)).size
            if size > MAX_INDEX_BYTES:
                raise CheckpointError(f"{where}: {size} bytes, over the {MAX_INDEX_BYTES}-byte limit "
                                      f"for an index; it is not a safetensors index, re-create it")
            index = _strict_json(storage.read(INDEX_NAME), where)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{where}: no 'weight_map' object mapping tensor names to shard "
                                      f"files; re-create the index")
            checked: dict[Any, str] = {}  # 92k entries name a few hundred shards: check each once
            weight_map = {str(k): checked[v] if isinstance(v, str) and v in checked
                          else checked.setdefault(v, check_shard_name(v, where)) for k, v in wm.items()}
            shard_names = sorted(set(weight_map.values()))
            for s in shard_names:
                if s not in listing:
                    raise CheckpointError(f"{where}: names shard {s!r}, which is not in {shown}; "
                                          f"download the missing shard")
        elif SINGLE_NAME in listing:
            shard_names = [SINGLE_NAME]
        else:
            safetensors = [n for n in listing if n.endswith(".safetensors")]
            pickles = [n for n in listing if n.endswith(_PICKLE_SUFFIXES)]
            if len(safetensors) == 1:
                shard_names = [check_shard_name(safetensors[0], shown)]
            elif safetensors:
                raise CheckpointError(f"{shown}: {len(safetensors)} .safetensors files but no "
                                      f"{INDEX_NAME}; add the index that maps tensors to shards")
            elif pickles:
                raise _pickle_refusal(shown, pickles)
            else:
                raise CheckpointError(f"{shown}: no .safetensors weights found (files: "
                                      f"{', '.join(listing[:5])}); point graft at a checkpoint directory")

    def stat_and_header(name: str) -> tuple[FileStat, Header]:
        st = known[name] or storage.stat(name)
        return st, read_header(storage, name, st.size, st.version)

    # Each shard's stat and header are small reads independent of the others': overlap them (on an
    # object store each is a round trip).
    with ThreadPoolExecutor(max_workers=min(_HEADER_READERS, len(shard_names))) as pool:
        found = list(pool.map(stat_and_header, shard_names))
    stats = [st for st, _ in found]
    headers = {st.name: h for st, h in found}

    tensors: dict[str, TensorRef] = {}
    for shard in shard_names:
        for e in headers[shard].tensors:
            if e.name in tensors:
                raise CheckpointError(f"{shown}: tensor {e.name!r} is stored in both "
                                      f"{tensors[e.name].file} and {shard}; remove the duplicate")
            tensors[e.name] = _ref(shard, e)
    if weight_map is not None:
        where = storage.url(INDEX_NAME)
        for name, shard in weight_map.items():
            ref = tensors.get(name)
            if ref is None or ref.file != shard:
                found = f"it is in {ref.file}" if ref else f"{shard} does not hold it"
                raise CheckpointError(f"{where}: maps tensor {name!r} to {shard} but {found}; the "
                                      f"index does not match the shards, re-create it")
        extra = [n for n in tensors if n not in weight_map]
        if extra:
            raise CheckpointError(f"{where}: tensor {extra[0]!r} (in {tensors[extra[0]].file}) is "
                                  f"missing from the weight_map; the index does not match the shards")

    weights = set(shard_names) | {INDEX_NAME}
    side = tuple(n for n in listing if n not in weights and not n.endswith(".safetensors"))
    return Checkpoint(
        uri=shown, storage=storage, files=tuple(stats), tensors=tensors, headers=headers,
        side_files=side, sharded=weight_map is not None,
        side_sizes={n: st.size for n in side if (st := known[n]) is not None},
    )


def _ref(shard: str, e: TensorEntry) -> TensorRef:
    return TensorRef(e.name, e.dtype, e.shape, e.begin, e.end, file=shard)
