"""The job around the shard tasks: open inputs and plan, prepare the output, commit or roll back.

Every executor follows the same order (the local one in ``local.py``, the Ray driver in
``graft.cluster``):

1. ``prepare_job(spec)``: read headers of all three checkpoints and plan (no tensor data moves).
2. ``OutputSession.open(job)``: check the output location is new, empty or an unfinished graft run
   of ours; mark it as in progress; sweep temporary leftovers.
3. run ``execute_shard`` for every ``job.plan.shards`` task (any order, any process).
4. ``session.commit(results, ...)``: side files, index, SHA256SUMS, then the manifest (the commit
   marker), then remove the in-progress mark. Or ``session.rollback()`` on failure: no manifest, no
   file at any final shard name, no temporary file.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .errors import IntegrityError, OutputError
from .execute import ShardResult
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, SUMS_NAME, OutputFile, format_sums
from .planner import ROLES, Plan, make_plan
from .spec import JobSpec
from .storage import TEMP_MARK, Storage

__all__ = ["RUN_MARK", "Job", "prepare_job", "OutputSession"]

# Present in the output only while a run is going (or after a crash): marks the location as ours.
RUN_MARK = ".graft-run.json"


@dataclass(frozen=True)
class Job:
    """A planned job: the spec, the opened input checkpoints and the plan."""

    spec: JobSpec
    checkpoints: dict[str, Checkpoint] = field(compare=False)
    plan: Plan

    def input_storages(self) -> dict[str, Storage]:
        return {role: c.storage for role, c in self.checkpoints.items()}


def prepare_job(spec: JobSpec) -> Job:
    """Open the three checkpoints (headers only) and plan the job. Raises ``GraftError`` subclasses."""
    checkpoints = {role: open_checkpoint(getattr(spec, role), spec.storage_options) for role in ROLES}
    configs = {role: c.read_json("config.json") for role, c in checkpoints.items()}
    return Job(spec, checkpoints, make_plan(spec, checkpoints, configs))


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@dataclass
class OutputSession:
    """The output location of one run, from preparation to commit or rollback."""

    job: Job
    storage: Storage
    started: float

    @classmethod
    def check(cls, job: Job) -> tuple[Storage, list[str]]:
        """Raise ``OutputError`` unless the output location can take this run; changes nothing."""
        storage = Storage(job.spec.output, job.spec.storage_options)
        listing = storage.list()
        uri = storage.uri
        if MANIFEST_NAME in listing:
            raise OutputError(f"{uri} already holds a committed graft output ({MANIFEST_NAME}); "
                              f"choose another output or delete it first")
        ours = cls._planned_names(job) | {RUN_MARK}
        foreign = [n for n in listing if TEMP_MARK not in n
                   and not (n in ours and RUN_MARK in listing)]
        if foreign:
            raise OutputError(f"{uri} is not empty (it holds {', '.join(foreign[:3])}); "
                              f"graft writes only into a new or empty location: choose another output")
        return storage, listing

    @classmethod
    def open(cls, job: Job) -> OutputSession:
        """Check the output can take this run and mark it in progress."""
        storage, listing = cls.check(job)
        storage.makedirs()
        for name in listing:
            if TEMP_MARK in name:
                storage.remove(name)
        started = time.time()
        mark = {"graft_version": __version__, "started": _utc(started), "host": socket.gethostname(),
                "pid": os.getpid()}
        storage.write_bytes(RUN_MARK, json.dumps(mark).encode())
        return cls(job, storage, started)

    @staticmethod
    def _planned_names(job: Job) -> set[str]:
        plan = job.plan
        return ({s.file for s in plan.shards} | {f.name for f in plan.side_files}
                | {INDEX_NAME, SUMS_NAME})

    def commit(self, results: Sequence[ShardResult], executor: str, workers: int,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
        """Write side files, index, SHA256SUMS and the manifest (last); returns the manifest."""
        plan, out = self.job.plan, self.storage
        by_file = {r.file: r for r in results}
        outputs: list[OutputFile] = []
        for shard in plan.shards:
            r = by_file.get(shard.file)
            if r is None or r.size != shard.size:
                raise IntegrityError(f"{out.url(shard.file)}: shard result missing or of the wrong "
                                     f"size; run the job again")
            outputs.append(OutputFile(r.file, r.size, r.sha256))
        donated: dict[str, list[dict[str, Any]]] = {role: [] for role in self.job.checkpoints}
        for side in plan.side_files:
            donor = self.job.checkpoints[side.donor].storage
            copied = self._put(side.name, donor.read(side.name))
            outputs.append(copied)
            donated[side.donor].append({"name": side.name, "uri": donor.url(side.name),
                                        "size": copied.size, "sha256": copied.sha256})
        if plan.write_index:
            outputs.append(self._put(INDEX_NAME, json.dumps(plan.index_json(), indent=2).encode() + b"\n"))
        # A worker killed mid-shard leaves its temporary behind; none may outlive the commit.
        for name in self.storage.list():
            if TEMP_MARK in name:
                self.storage.remove(name)
        sums = self._put(SUMS_NAME, format_sums(outputs))
        finished = time.time()
        read = sum(r.bytes_read for r in results)
        manifest = {
            "format": MANIFEST_FORMAT,
            "graft_version": __version__,
            "formula": "out = target + alpha * (finetuned - base), per tensor, rounded once to the "
                       "target's dtype",
            "spec": self.job.spec.to_dict(),
            "inputs": {
                role: {"uri": c.uri,
                       "files": [{"name": f.name, "uri": c.storage.url(f.name), "size": f.size,
                                  "version": f.version} for f in c.files] + donated[role]}
                for role, c in self.job.checkpoints.items()
            },
            "outputs": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                        for f in sorted([*outputs, sums], key=lambda f: f.name)],
            "plan": {"tensors": plan.tensor_count, "combined": plan.combined, "copied": plan.copied,
                     "left_out": list(plan.left_out), "shards": len(plan.shards),
                     "side_files": {s.name: s.donor for s in plan.side_files},
                     "warnings": list(plan.warnings)},
            "run": {"executor": executor, "workers": workers, "started": _utc(self.started),
                    "finished": _utc(finished), "seconds": round(finished - self.started, 3),
                    "bytes_read": read, "bytes_written": sum(f.size for f in outputs)},
        }
        out.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
        out.remove(RUN_MARK)
        log(f"committed {out.uri} ({len(outputs)} files + {SUMS_NAME} + {MANIFEST_NAME})")
        return manifest

    def _put(self, name: str, data: bytes) -> OutputFile:
        self.storage.write_bytes(name, data)
        return OutputFile(name, len(data), hashlib.sha256(data).hexdigest())

    def rollback(self) -> list[str]:
        """Remove every file this run may have made visible, temporaries and the mark; best effort."""
        removed = []
        names = self._planned_names(self.job)
        for name in self.storage.list():
            if name in names or TEMP_MARK in name or name == RUN_MARK:
                try:
                    self.storage.remove(name)
                    removed.append(name)
                except Exception:  # noqa: BLE001 - rollback must try every file
                    pass
        return removed
