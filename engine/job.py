"""The job around the shard tasks: open inputs and plan, prepare the output, commit or roll back.

Every executor follows the same order (the local one in ``local.py``, the Ray driver in
``graft.cluster``):

1. ``prepare_job(spec)``: read headers of all three checkpoints and plan (no tensor data moves).
2. ``OutputSession.open(job)``: check the output location is new, empty or an unfinished graft run
   of ours (not a live one: the run mark is a lock); keep the shards a crashed run of the same job
   committed, after checking their size and sha256; take the run mark; sweep temporary leftovers.
3. run ``execute_shard`` for every ``session.pending`` task (any order, any process) and
   ``session.record(result)`` each one as it commits.
4. ``session.commit(...)``: side files, index, SHA256SUMS, then the manifest (the commit marker),
   then remove the run mark. Or ``session.stop(error)`` on failure or Ctrl-C: no manifest, no
   temporary file, the journaled shards kept for a resume (rolled back only when there are none);
   after the manifest is written, nothing is removed. ``clean_output`` removes what a stopped run
   kept.
"""
from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

from . import __version__
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .errors import GraftError, IntegrityError, Interrupted, OutputError, Terminated
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, SUMS_NAME, OutputFile, format_sums, hash_file
from .planner import ROLES, Plan, ShardTask, make_plan
from .runmark import RUN_MARK, STALE_AFTER_SECONDS, RunMark, describe, is_stale, read_mark
from .spec import JobSpec
from .storage import TEMP_MARK, Storage
from .tasks import ShardResult

__all__ = ["RUN_MARK", "Job", "prepare_job", "OutputSession", "clean_output"]



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
    def open_role(role: str) -> tuple[Checkpoint, Any]:
        c = open_checkpoint(getattr(spec, role), spec.storage_options)
        return c, c.read_json("config.json")

    # The three are independent (listings, stats and headers: round trips on an object store), so
    # they are opened at once; an error is reported for the first role in ROLES order that failed.
    with ThreadPoolExecutor(max_workers=len(ROLES)) as pool:
        opened = dict(zip(ROLES, pool.map(open_role, ROLES)))
    checkpoints = {role: c for role, (c, _) in opened.items()}
    configs = {role: config for role, (_, config) in opened.items()}
    return Job(spec, checkpoints, make_plan(spec, checkpoints, configs))


def _still_intact(storage: Storage, name: str, info: Any) -> bool:
    """A shard a crashed run committed is kept only if its size and sha256 are what it journaled."""
    try:
        size = storage.stat(name).size
        return size == int(info["size"]) and hash_file(storage, name, size) == info["sha256"]
    except (GraftError, KeyError, TypeError, ValueError):
        return False


def _patched(data: bytes, patch: tuple[tuple[str, str | None], ...], where: str) -> bytes:
    """A JSON object file with top-level keys set (or removed, for None) as the plan says."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"{where}: not valid JSON ({e}); graft must change it to match the "
                             f"output's weights, fix the file") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{where}: not a JSON object; graft must change it to match the output's "
                             f"weights, fix the file")
    for key, value in patch:
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = json.loads(value)
    return json.dumps(obj, indent=2).encode() + b"\n"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def fingerprint(job: Job) -> str:
    """Identifies the work: the planned shards (names, tensors, byte ranges, settings) and the input
    files' sizes and versions. A resumed run keeps shards only from a run with the same fingerprint."""
    inputs = [(role, [(f.name, f.size, f.version) for f in c.files]) for role, c in job.checkpoints.items()]
    # How the bytes are moved (chunk size, reads in flight) does not change them: a rerun with
    # other I/O settings still keeps the shards already committed.
    shards = [replace(s, settings=replace(s.settings, chunk_size=0, read_concurrency=0))
              for s in job.plan.shards]
    return hashlib.sha256(repr((shards, inputs)).encode()).hexdigest()


@dataclass
class OutputSession:
    """The output location of one run, from preparation to commit or rollback.

    ``pending`` lists the shard tasks still to run (a resumed run keeps shards already committed);
    executors call ``record(result)`` as each shard commits, then ``commit()`` or ``rollback()``.
    """

    job: Job
    storage: Storage
    mark: RunMark
    results: dict[str, ShardResult]
    resumed: tuple[str, ...]
    committed: bool = False  # the manifest is written: nothing may be removed any more

    @classmethod
    def check(cls, job: Job) -> tuple[Storage, list[str], dict[str, Any] | None]:
        """Raise ``OutputError`` unless the output location can take this run; changes nothing.

        Returns the storage, its listing and the stale mark of a crashed run, if any.
        """
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
        previous = read_mark(storage) if RUN_MARK in listing else None
        if previous is not None and not is_stale(previous):
            raise OutputError(f"{uri} is being written by another graft run ({describe(previous)}); "
                              f"wait for it to finish, or if it died, run again after "
                              f"{STALE_AFTER_SECONDS:.0f}s")
        return storage, listing, previous

    @classmethod
    def open(cls, job: Job, log: Callable[[str], None] = lambda s: None) -> OutputSession:
        """Check the output can take this run, keep what a crashed run of the same job committed,
        and take the run mark."""
        storage, listing, previous = cls.check(job)
        storage.makedirs()
        for name in listing:
            if TEMP_MARK in name:
                storage.remove(name)
        fp = fingerprint(job)
        kept: dict[str, ShardResult] = {}
        if previous is not None and previous.get("fingerprint") == fp:
            planned = {s.file: s for s in job.plan.shards}
            for name, info in (previous.get("shards") or {}).items():
                if name in planned and name in listing and _still_intact(storage, name, info):
                    kept[name] = ShardResult(name, int(info["size"]), str(info["sha256"]), 0, 0.0)
            if kept:
                log(f"resuming: keeping {len(kept)} shard(s) already committed and verified")
        mark = RunMark(storage, fp, {n: {"size": r.size, "sha256": r.sha256} for n, r in kept.items()},
                       files=sorted(cls._planned_names(job)))
        mark.acquire(replacing=previous is not None)
        session = cls(job, storage, mark, kept, tuple(sorted(kept)))
        session.abort_uploads(log)  # of a crashed run's killed writers
        return session

    @property
    def pending(self) -> list[ShardTask]:
        return [s for s in self.job.plan.shards if s.file not in self.results]

    def record(self, result: ShardResult) -> None:
        """Note a committed shard (journaled in the run mark for resumption)."""
        self.mark.record(result.file, result.size, result.sha256)
        self.results[result.file] = result

    @staticmethod
    def _planned_names(job: Job) -> set[str]:
        plan = job.plan
        return ({s.file for s in plan.shards} | {f.name for f in plan.side_files}
                | {INDEX_NAME, SUMS_NAME})

    def commit(self, executor: str, workers: int, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
        """Write side files, index, SHA256SUMS and the manifest (last); returns the manifest."""
        plan, out = self.job.plan, self.storage
        if not self.mark.confirm():
            raise OutputError(f"{out.uri}: another graft run took over this output (this run's heartbeat "
                              f"was judged dead); nothing was committed: stop one of the two runs")
        by_file = self.results
        results = list(by_file.values())
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
            data = donor.read(side.name)
            entry: dict[str, Any] = {"name": side.name, "uri": donor.url(side.name)}
            if side.patch:
                entry["sha256_donated"] = hashlib.sha256(data).hexdigest()
                entry["patched"] = {k: None if v is None else json.loads(v) for k, v in side.patch}
                data = _patched(data, side.patch, donor.url(side.name))
            copied = self._put(side.name, data)
            outputs.append(copied)
            donated[side.donor].append({**entry, "size": copied.size, "sha256": copied.sha256})
        if plan.write_index:
            outputs.append(self._put(INDEX_NAME, json.dumps(plan.index_json(), indent=2).encode() + b"\n"))
        # A worker killed mid-shard leaves its temporary (or on S3 its upload) behind; none may
        # outlive the commit.
        for name in self.storage.list():
            if TEMP_MARK in name:
                self.storage.remove(name)
        self.abort_uploads(log)
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
                role: {"uri": c.uri, **({"commit": c.storage.commit} if c.storage.commit else {}),
                       "files": [{"name": f.name, "uri": c.storage.url(f.name), "size": f.size,
                                  "version": f.version} for f in c.files] + donated[role]}
                for role, c in self.job.checkpoints.items()
            },
            "outputs": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                        for f in sorted([*outputs, sums], key=lambda f: f.name)],
            "plan": {"tensors": plan.tensor_count, "combined": plan.combined, "copied": plan.copied,
                     "left_out": list(plan.left_out), "shards": len(plan.shards),
                     "side_files": {s.name: s.donor for s in plan.side_files},
                     "formats": dict(plan.formats),
                     "warnings": list(plan.warnings)},
            "run": {"executor": executor, "workers": workers, "resumed_shards": list(self.resumed),
                    "started": _utc(self.mark.started),
                    "finished": _utc(finished), "seconds": round(finished - self.mark.started, 3),
                    "bytes_read": read, "bytes_written": sum(f.size for f in outputs)},
        }
        out.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
        self.committed = True
        self.mark.release()
        log(f"committed {out.uri} ({len(outputs)} files + {SUMS_NAME} + {MANIFEST_NAME})")
        return manifest

    def _put(self, name: str, data: bytes) -> OutputFile:
        self.storage.write_bytes(name, data)
        return OutputFile(name, len(data), hashlib.sha256(data).hexdigest())

    def abort_uploads(self, log: Callable[[str], None] = lambda s: None) -> int:
        """Abort unfinished multipart uploads of this job's files (S3: what writers killed mid-file
        left). Call only when no writer of this run is working. Best effort: a store that refuses
        (e.g. no permission to list uploads) costs a log line, not the run."""
        ours = self._planned_names(self.job)
        try:
            return len(self.storage.abort_uploads(lambda n: n in ours or TEMP_MARK in n))
        except Exception as e:  # noqa: BLE001
            log(f"warning: could not abort unfinished uploads in {self.storage.uri} ({e}); "
                f"abort them with your store's tools or a lifecycle rule")
            return 0

    def stop(self, error: BaseException) -> BaseException:
        """The run ended early with ``error``; returns what to raise.

        - After the manifest is written the run is committed: nothing is removed but a mark the stop
          caught half-released, and Ctrl-C / SIGTERM become an ``Interrupted`` that says so.
        - Ctrl-C or SIGTERM keeps what is committed for a resume (``suspend``): ``Interrupted``.
        - Any other failure also keeps the journaled shards (hours of work on a large job), with a
          note on ``error`` saying how many and how to resume or clean; with none journaled it
          rolls back, leaving nothing.
        """
        total, uri = len(self.job.plan.shards), self.storage.uri
        terminated = isinstance(error, Terminated)
        if self.committed:
            try:
                self.mark.release()
            except Exception:  # noqa: BLE001 - verify ignores a left-over mark; the output is complete
                pass
            if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
                return Interrupted(uri, total, total, terminated, committed=True)
            return error
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            return Interrupted(uri, self.suspend(), total, terminated)
        if self.mark.shards and not self.mark.lost:
            try:
                kept = self.suspend()
            except Exception as cleanup:  # noqa: BLE001 - the store failing too: report the first error
                error.add_note(f"the output {uri} could not be set aside for a resume ({cleanup}); the next "
                               f"run of the same command checks and keeps what is intact")
                return error
            if kept:
                error.add_note(f"{kept} of {total} shard(s) are committed and kept in {uri}: fix the cause "
                               f"and run the same command to resume (or remove them: graft clean {uri})")
                return error
        self.rollback()
        return error

    def suspend(self) -> int:
        """Keep the committed shards and their journal so the same command resumes; remove the
        temporaries and whatever the commit step had begun to write. Returns the shards kept."""
        if not self._still_ours():
            self.mark.release(remove=False)
            return 0  # the output belongs to the run that took it over
        # Kept: the shards in the journal (the mark's own record of it, which is updated before the
        # file is rewritten: the signal may land in the middle of that). A shard committed in the
        # instant before the signal but not journaled goes, so what is left is what the next run keeps.
        journaled = set(self.mark.shards)
        for name in self.storage.list():
            if TEMP_MARK in name or (name in self._planned_names(self.job) and name not in journaled):
                try:
                    self.storage.remove(name)
                except Exception:  # noqa: BLE001 - best effort: the next run removes them too
                    pass
        self.abort_uploads()
        self.mark.suspend()
        return len(journaled)

    def _still_ours(self) -> bool:
        """Whether the mark is still this run's, read again now; when that cannot be told (the store
        does not answer), it is not: a stopping run then leaves the output for the next one."""
        try:
            return self.mark.confirm()
        except Exception:  # noqa: BLE001
            return False

    def rollback(self) -> list[str]:
        """Remove every file this run may have made visible, temporaries and the mark; best effort."""
        ours = self._still_ours()
        self.mark.release(remove=False)
        if not ours:
            return []  # the output now belongs to the run that took it over: touch nothing
        removed = []
        names = self._planned_names(self.job)
        for name in self.storage.list():
            if name in names or TEMP_MARK in name or name == RUN_MARK:
                try:
                    self.storage.remove(name)
                    removed.append(name)
                except Exception:  # noqa: BLE001 - rollback must try every file
                    pass
        self.abort_uploads()
        return removed


def clean_output(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Remove what an unfinished run left at ``uri`` (``graft clean``): its kept shards, whatever its
    commit had begun to write, temporaries, unfinished uploads and, last, the run mark. Returns the
    names removed. Refuses a committed output (it has a manifest) and a run that is still going.
    Only names the mark lists as the run's own, or temporaries, are touched: a file someone else put
    there stays."""
    storage = Storage(uri, storage_options)
    listing = storage.list()
    if MANIFEST_NAME in listing:
        raise OutputError(f"{storage.uri} holds a committed graft output ({MANIFEST_NAME}); graft clean "
                          f"removes only unfinished runs: delete it with your store's tools if you mean to")
    if RUN_MARK not in listing:
        raise OutputError(f"{storage.uri}: no unfinished graft run here (no {RUN_MARK}); nothing to clean")
    mark = read_mark(storage) or {}
    if not is_stale(mark):
        raise OutputError(f"{storage.uri} is being written by a graft run that is still going "
                          f"({describe(mark)}); stop it first (Ctrl-C keeps its shards), or wait for it")
    ours = {n for n in (mark.get("files") or []) if isinstance(n, str)}
    ours |= {n for n in (mark.get("shards") or {}) if isinstance(n, str)}
    removed = []
    for name in listing:  # names from the listing, never from the mark: a mark cannot point elsewhere
        if name != RUN_MARK and (name in ours or TEMP_MARK in name):
            storage.remove(name)
            removed.append(name)
    storage.abort_uploads(lambda n: n in ours or TEMP_MARK in n)
    storage.remove(RUN_MARK)
    return [*removed, RUN_MARK]
