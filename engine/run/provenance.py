"""Diffs as artifacts: what binds a ``graft diff`` output to its inputs, and an output to its diffs.

- ``content_digests``: a ``content_sha256`` per input file of a diff job, from the sha256 of every
  tensor's bytes, computed by the workers while they stream them (``ShardResult.digests``); tensors
  the diff did not read (integer buffers, tensors only in the base) and each file's header are read
  here, at commit (small). The digest of a file is the sha256 of the text
  ``header <sha256 of its first 8 + header-length bytes>\\n`` followed by one line
  ``<sha256 of the tensor's bytes>  <name>\\n`` per tensor in the order of their bytes in the file:
  anyone can recompute it from the file alone (``file_content_sha256``), and it changes with any
  byte of the file.
- ``stored_diff``: reads and checks the manifest of a location given as a ``diff`` input (it must be a
  committed ``graft diff`` output) and returns what the transfer's manifest records of it: the
  sha256 of that manifest, so provenance chains. ``refuse_diff_as_weights``: a diff given as a
  target, fine-tune or base is refused.
- ``StoredDiff`` / ``expect_stored`` / ``check_stored_reads``: the sha256 a diff's manifest
  records for each of its tensors (``graft diff`` hashes each difference as it writes it) goes with
  the tensor's source to the worker, which hashes the bytes as they stream and refuses to commit a
  shard computed from others. Tensors a transfer does not read (alpha 0 by rule) are not checked:
  nothing of them reaches the output. A side file the diff donates is checked against the sha256
  its manifest records when it is copied (``commit.copy_side_files``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..errors import IntegrityError, PlanError
from ..formats.checkpoint import Checkpoint
from ..formats.manifest import MANIFEST_NAME, hash_range
from ..plan.tasks import ShardTask, Source, TensorTask, digest_key

__all__ = ["DIFF_KIND", "content_digests", "file_content_sha256", "stored_diff", "refuse_diff_as_weights",
           "StoredDiff", "expect_stored", "check_stored_reads"]

DIFF_KIND = "diff"


def _sha256_range(ckpt: Checkpoint, file: str, begin: int, end: int) -> str:
    return hash_range(ckpt.storage, file, begin, end, ckpt.version_of(file))


def _file_digest(ckpt: Checkpoint, file: str, tensor_digest: Any) -> str:
    header = ckpt.headers[file]
    lines = [f"header {_sha256_range(ckpt, file, 0, header.data_start)}\n"]
    for e in sorted(header.tensors, key=lambda e: e.begin):
        lines.append(f"{tensor_digest(e)}  {e.name}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def file_content_sha256(ckpt: Checkpoint, file: str) -> str:
    """A file's ``content_sha256``, computed by reading it (what ``content_digests`` gives without
    reading the tensors again)."""
    return _file_digest(ckpt, file, lambda e: _sha256_range(ckpt, file, e.begin, e.end))


def content_digests(ckpt: Checkpoint, role: str, digests: Mapping[str, str]) -> dict[str, str]:
    """``content_sha256`` of each file of ``ckpt`` (read under ``role``), from the workers' tensor
    ``digests`` (keyed by ``digest_key``); what they did not read is read and hashed here."""
    out = {}
    for f in ckpt.files:
        def tensor_digest(e: Any, name: str = f.name) -> str:
            got = digests.get(digest_key(role, name, e.begin))
            return got if got is not None else _sha256_range(ckpt, name, e.begin, e.end)

        out[f.name] = _file_digest(ckpt, f.name, tensor_digest)
    return out


def _manifest(ckpt: Checkpoint) -> tuple[bytes, Any]:
    """The raw bytes of the location's graft manifest and its JSON (None if not JSON)."""
    data = ckpt.storage.read(MANIFEST_NAME)
    try:
        return data, json.loads(data)
    except ValueError:
        return data, None


def refuse_diff_as_weights(ckpt: Checkpoint, role: str) -> None:
    """``PlanError`` if ``ckpt``, given as ``role`` (a target, fine-tune or base: weights), is a
    ``graft diff`` output: its tensors are differences, and would be taken as whole weights (the
    run would write target + (diff - base), with only a dtype warning)."""
    if MANIFEST_NAME not in ckpt.side_files:
        return
    manifest = _manifest(ckpt)[1]
    if isinstance(manifest, dict) and manifest.get("kind") == DIFF_KIND:
        where = role.rpartition(".")[0]
        use = f"{where}.diff" if where else "diff"
        raise PlanError(f"{role} ({ckpt.uri}) is a graft diff (its {MANIFEST_NAME} says kind: {DIFF_KIND}), not "
                        f"a checkpoint of weights: give it as {use} instead, without a base")


def _diff_manifest(ckpt: Checkpoint, role: str) -> tuple[bytes, dict[str, Any]]:
    """The manifest of a location given as a diff; ``PlanError`` unless it is a ``graft diff`` output."""
    if MANIFEST_NAME not in ckpt.side_files:
        raise PlanError(f"{role} ({ckpt.uri}) is not a graft diff (no {MANIFEST_NAME}): a diff input must be "
                        f"written by graft diff; give a fine-tune and its base as finetuned and base instead")
    data, manifest = _manifest(ckpt)
    if not isinstance(manifest, dict) or manifest.get("kind") != DIFF_KIND:
        raise PlanError(f"{role} ({ckpt.uri}) is a graft output but not a diff ({MANIFEST_NAME} has no "
                        f"kind: {DIFF_KIND}); a diff input must be written by graft diff")
    return data, manifest


@dataclass(frozen=True)
class StoredDiff:
    """What a transfer takes from the manifest of a stored diff it reads: ``record`` (what its own
    manifest records of it: the sha256 of that manifest, its dtype and the inputs it was taken from),
    ``tensors`` ((file, first byte) -> sha256 of each tensor: ``graft diff`` hashes each difference as
    it writes it) and ``files`` (file name -> sha256, side files too)."""

    record: dict[str, Any]
    tensors: dict[tuple[str, int], str]
    files: dict[str, str]


def stored_diff(ckpt: Checkpoint, role: str) -> StoredDiff:
    """The manifest of the stored diff read as ``role``, read once (``StoredDiff``). ``PlanError``
    unless ``ckpt`` is a committed ``graft diff`` output (a checkpoint of weights given as a diff would
    add whole weights) whose manifest lists its tensors for every shard (an older graft's does not)."""
    data, manifest = _diff_manifest(ckpt, role)
    record = {"manifest_sha256": hashlib.sha256(data).hexdigest(),
              "dtype": manifest.get("spec", {}).get("diff_dtype"),
              "from": {r: i.get("uri") for r, i in (manifest.get("inputs") or {}).items()}}
    outputs = [o for o in manifest.get("outputs") or [] if isinstance(o, dict)]
    listed = {o.get("name"): o.get("tensors") for o in outputs}
    tensors = {}
    for f in ckpt.files:
        sums = listed.get(f.name)
        if not isinstance(sums, dict):
            raise PlanError(f"{role} ({ckpt.uri}): its {MANIFEST_NAME} records no sha256 of the tensors of "
                            f"{f.name} (a diff written by an older graft), so what a transfer reads of it "
                            f"cannot be checked: re-create it with graft diff")
        for e in ckpt.headers[f.name].tensors:
            if isinstance(sums.get(e.name), str):
                tensors[(f.name, e.begin)] = sums[e.name]
    files = {o["name"]: o["sha256"] for o in outputs
             if isinstance(o.get("name"), str) and isinstance(o.get("sha256"), str)}
    return StoredDiff(record, tensors, files)


def expect_stored(plan: Any, roles: Mapping[str, Mapping[tuple[str, int], str]]) -> Any:
    """``plan`` with each stored diff's sources carrying the sha256 its manifest records
    (``Source.sha256``), and their bytes hashed as they stream (``ExecSettings.hash_roles``), so a
    shard computed from damaged diff bytes is never committed (``execute``)."""
    def expected(s: Source) -> Source:
        sha = roles.get(s.role, {}).get((s.file, s.begin))
        return replace(s, sha256=sha) if sha is not None else s

    def tensor(t: TensorTask) -> TensorTask:
        if not any(x.finetuned.role in roles for x in t.terms):
            return t
        return replace(t, terms=tuple(replace(x, finetuned=expected(x.finetuned)) for x in t.terms))

    shards = tuple(replace(s, tensors=tuple(tensor(t) for t in s.tensors),
                           settings=replace(s.settings, hash_roles=tuple(sorted({*s.settings.hash_roles, *roles}))))
                   for s in plan.shards)
    return replace(plan, shards=shards)


def check_stored_reads(task: ShardTask, inputs: Mapping[str, Any], hashers: Mapping[str, Any]) -> None:
    """``IntegrityError`` if a stored diff's tensor that shard ``task`` read (``hashers``: the sha256
    of each input tensor's bytes as they streamed, by ``digest_key``) is not what the diff's
    manifest records (``Source.sha256``): called before the shard is committed. ``inputs``: the
    role's storages (for the file's URL)."""
    for t in task.tensors:
        for s in t.sources:
            if s.sha256 is None:
                continue
            got = hashers.get(digest_key(s.role, s.file, s.begin))
            if got is None or got.hexdigest() != s.sha256:
                raise IntegrityError(f"{inputs[s.role].url(s.file)}: the bytes of tensor {t.name!r} are not those "
                                     f"its diff's manifest records (sha256): the diff is damaged; re-create it "
                                     f"with graft diff or download it again")
