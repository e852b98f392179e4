"""The output location of one run, as a state machine: check, take, resume, commit, stop.

``OutputSession`` is the only code that makes output visible or removes it. ``State`` names each
step and what it may touch; ``stop`` decides, from the state and the journal, whether a failed or
interrupted run is suspended (journaled shards kept for a resume), rolled back, or abandoned to a
run that took the output over. The lock and journal are the run mark (``runmark.py``); what a
commit writes is ``commit.py``; the order executors call it in is ``job.py``'s docstring.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from ..compute.report import REPORT_NAME
from ..errors import Interrupted, OutputError, Terminated
from ..formats.checkpoint import INDEX_NAME
from ..formats.manifest import MANIFEST_NAME, SUMS_NAME, OutputFile, format_sums, hash_file
from ..plan.planner import ShardTask
from ..plan.tasks import ShardResult
from ..redaction import redact_text
from ..storage import TEMP_MARK, Storage
from .commit import build_manifest, copy_side_files, put, run_times, shard_outputs, transfer_report
from .job import Job, fingerprint
from .runmark import RUN_MARK, Observed, RunMark, has_mark, journal_form, kept_result, observe, wait_until_stale

__all__ = ["State", "Checked", "Hasher", "OutputSession", "hash_in_threads"]


class State(str, Enum):
    """Where an output is in its run; each transition says what it may touch.

    ``OPEN`` (checked, mark taken, kept shards being checked) -> ``RUNNING`` (shards commit and are
    journaled) -> ``COMMITTING`` (side files, index, SHA256SUMS, then the manifest) -> ``COMMITTED``
    (nothing may be removed any more). From ``OPEN``, ``RUNNING`` or ``COMMITTING`` a stop goes to
    ``SUSPENDED`` (journaled shards kept for a resume, the rest removed), ``ROLLED_BACK`` (nothing
    was journaled: everything of this run removed) or ``ABANDONED`` (another run took the output
    over: nothing touched)."""

    OPEN = "open"
    RUNNING = "running"
    COMMITTING = "committing"
    COMMITTED = "committed"
    SUSPENDED = "suspended"
    ROLLED_BACK = "rolled back"
    ABANDONED = "abandoned"


_STOPPABLE = (State.OPEN, State.RUNNING, State.COMMITTING)


@dataclass(frozen=True)
class Checked:
    """An output location that can take a run: its storage, listing, and the mark of an unfinished
    run (judged stale, or not watched when checked with ``watch=False``)."""

    storage: Storage
    listing: list[str]
    previous: Observed | None


Hasher = Callable[[Storage, list[tuple[str, int]]], list[str]]


def hash_in_threads(threads: int = 4) -> Hasher:
    """A ``Hasher`` reading the files on ``threads`` threads of this process."""
    def run(storage: Storage, files: list[tuple[str, int]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="graft-hash") as pool:
            return list(pool.map(lambda f: hash_file(storage, f[0], f[1]), files))
    return run


@dataclass
class OutputSession:
    """The output location of one run, from preparation to commit, suspension or rollback.

    ``pending`` lists the shard tasks still to run (a resumed run keeps shards already committed);
    executors call ``verify_kept(...)``, then ``record(result)`` as each shard commits, then
    ``commit()``; on any error ``stop(error)``.
    """

    job: Job
    storage: Storage
    mark: RunMark
    results: dict[str, ShardResult]
    resumed: tuple[str, ...]
    unverified: dict[str, dict[str, Any]] = field(default_factory=dict)  # kept shards still to hash
    state: State = State.OPEN

    def _move(self, to: State, *allowed: State) -> None:
        if self.state not in allowed:
            raise RuntimeError(f"output session: {self.state.value} -> {to.value} is not a transition")
        self.state = to

    @classmethod
    def check(cls, job: Job, log: Callable[[str], None] = lambda s: None, watch: bool = True) -> Checked:
        """Raise ``OutputError`` unless the output location can take this run; changes nothing.

        With a mark of an unfinished run there, ``watch`` waits until it is known stale (up to
        ``STALE_AFTER_SECONDS``, or at once when the mark says its run is over) and refuses a run
        that is alive; without ``watch`` the mark is returned unjudged (``graft plan``).
        """
        storage = Storage(job.spec.output, job.spec.storage_options)
        listing, folders = storage.contents()
        uri = storage.display_uri
        if MANIFEST_NAME in listing:
            raise OutputError(f"{uri} already holds a committed graft output ({MANIFEST_NAME}); "
                              f"choose another output or delete it first")
        ours = cls._planned_names(job) | {RUN_MARK}
        marked = has_mark(listing)
        foreign = [n for n in listing if TEMP_MARK not in n and not (n in ours and marked)]
        previous = observe(storage) if marked else None
        if foreign:
            raise OutputError(cls._not_empty(uri, foreign, previous))
        # A folder inside is somebody's data too (the parent of the inputs, say): graft's own outputs
        # never have one.
        if folders:
            raise OutputError(f"{uri} is not empty (it holds the folder(s) {', '.join(f + '/' for f in folders[:3])}); "
                              f"graft writes only into a new or empty location: choose another output")
        if previous is not None and watch:
            previous = wait_until_stale(storage, previous, log)
        return Checked(storage, listing, previous)

    @staticmethod
    def _not_empty(uri: str, foreign: list[str], previous: Observed | None) -> str:
        """Why a location with files this job would not write is refused, and what to do: the files
        of an unfinished run of another job (its mark lists them) go with ``graft clean``."""
        held = ", ".join(foreign[:3])
        mark = previous.mark if previous is not None else {}
        kept = {n for key in ("files", "shards") for n in (mark.get(key) or ()) if isinstance(n, str)}
        if mark and all(n in kept for n in foreign):
            return (f"{uri} is not empty: it holds the files of an unfinished graft run of a different job ({held}); "
                    f"to start this job over there, run: graft clean {uri} (the unchanged job that stopped "
                    f"would resume instead), or choose another output")
        return (f"{uri} is not empty (it holds {held}); graft writes only into a new or empty location: "
                f"choose another output")

    @classmethod
    def open(cls, job: Job, log: Callable[[str], None] = lambda s: None,
             verify_kept: bool = False) -> OutputSession:
        """``check`` then ``take``."""
        return cls.take(job, cls.check(job, log), log, verify_kept)

    @classmethod
    def take(cls, job: Job, checked: Checked, log: Callable[[str], None] = lambda s: None,
             verify_kept: bool = False) -> OutputSession:
        """Take the run mark (compare-and-swap over the stale one, if any), and only then sweep a
        crashed run's temporaries and keep the shards it journaled for the same job whose size and
        store version are still what it journaled (``verify_kept``: whose sha256 too, checked by
        ``verify_kept`` on the executor's workers)."""
        storage, previous = checked.storage, checked.previous
        storage.makedirs()
        fp = fingerprint(job)
        journal: dict[str, dict[str, Any]] = {}
        if previous is not None and previous.mark.get("fingerprint") == fp:
            planned = {s.file for s in job.plan.shards}
            shards = previous.mark.get("shards")
            journal = {n: i for n, i in (shards.items() if isinstance(shards, dict) else ())
                       if n in planned and isinstance(i, dict)}
        mark = RunMark(storage, fp, journal, files=sorted(cls._planned_names(job)))
        mark.acquire(previous)  # the lock first: a run that loses the race touches nothing
        session = cls(job, storage, mark, {}, ())
        try:
            session._keep(journal, verify_kept, log)
            session.abort_uploads(log)  # of a crashed run's killed writers
        except BaseException as e:
            raise session.stop(e) from None
        return session

    def _keep(self, journal: dict[str, dict[str, Any]], verify_kept: bool,
              log: Callable[[str], None]) -> None:
        with self.mark.held():  # no heartbeat half-way through its own temporaries
            stats = self.storage.list_stats()
            for name in stats:
                if TEMP_MARK in name:
                    self.storage.remove(name)
        dropped = []
        for name, info in journal.items():
            stat = stats.get(name, False)
            if stat is None:
                stat = self.storage.stat(name)
            try:
                size, sha256 = int(info["size"]), str(info["sha256"])
            except (KeyError, TypeError, ValueError):
                stat = False
            version = info.get("version")
            if stat is False or stat.size != size:
                dropped.append(name)
            elif verify_kept or version is None or stat.version != version:
                self.unverified[name] = {**info, "size": size, "sha256": sha256, "version": stat.version}
            else:
                self.results[name] = kept_result(name, size, sha256, info)
        if dropped:
            self.mark.forget(dropped)
        self.resumed = tuple(sorted(self.results))

    def verify_kept(self, hasher: Hasher, log: Callable[[str], None] = lambda s: None) -> None:
        """Hash the kept shards that need it (``--verify-kept``, a changed store version, or a
        journal without versions) with ``hasher``; keep those that match, forget the others."""
        if self.unverified:
            self._hash_kept(hasher, log)
        if self.results:
            log(f"resuming: keeping {len(self.results)} shard(s) already committed")
        self.resumed = tuple(sorted(self.results))
        self._move(State.RUNNING, State.OPEN)

    def _hash_kept(self, hasher: Hasher, log: Callable[[str], None]) -> None:
        names = sorted(self.unverified)
        log(f"checking the sha256 of {len(names)} kept shard(s)")
        digests = hasher(self.storage, [(n, self.unverified[n]["size"]) for n in names])
        bad = []
        for name, digest in zip(names, digests):
            info = self.unverified.pop(name)
            if digest == info["sha256"]:
                result = self.results[name] = kept_result(name, info["size"], digest, info)
                self.mark.record(name, info["size"], digest, info["version"], journal_form(result))
            else:
                bad.append(name)
        if bad:
            self.mark.forget(bad)
            log(f"{len(bad)} kept shard(s) changed since they were journaled: written again")

    @property
    def pending(self) -> list[ShardTask]:
        return [s for s in self.job.plan.shards if s.file not in self.results]

    def record(self, result: ShardResult) -> None:
        """Note a committed shard: journaled in the run mark with its size, sha256 and the store's
        version of it, so a resumed run keeps it without reading it again."""
        if self.state is State.OPEN:
            self._move(State.RUNNING, State.OPEN)
        if self.state is not State.RUNNING:
            raise RuntimeError(f"output session: a shard recorded while {self.state.value}")
        version = self.storage.stat(result.file).version
        self.mark.record(result.file, result.size, result.sha256, version, journal_form(result))
        self.results[result.file] = result

    @staticmethod
    def _planned_names(job: Job) -> set[str]:
        plan = job.plan
        return ({s.file for s in plan.shards} | {f.name for f in plan.side_files}
                | {INDEX_NAME, SUMS_NAME, REPORT_NAME})

    def commit(self, executor: str, workers: int, log: Callable[[str], None] = lambda s: None,
               threads: int | None = None) -> dict[str, Any]:
        """Write side files, index, report, SHA256SUMS and the manifest (last, ``commit.py``);
        returns the manifest."""
        plan, out = self.job.plan, self.storage
        self._move(State.COMMITTING, State.OPEN, State.RUNNING)
        if not self.mark.confirm():
            raise OutputError(f"{out.display_uri}: another graft run took over this output (this run's heartbeat "
                              f"was judged dead); nothing was committed: stop one of the two runs")
        outputs = shard_outputs(self.job, self.results, out)
        copied, donated = copy_side_files(self.job, self._put)
        outputs += copied
        if plan.write_index:
            outputs.append(self._put(INDEX_NAME, json.dumps(plan.index_json(), indent=2).encode() + b"\n"))
        report = transfer_report(self.job, self.results)
        if report is not None:
            outputs.append(self._put(REPORT_NAME, json.dumps(report, indent=1).encode() + b"\n"))
        # A worker killed mid-shard leaves its temporary (or on S3 its upload) behind; none may
        # outlive the commit.
        self._sweep(keep=set(self.results) | {f.name for f in outputs})
        self.abort_uploads(log)
        sums = self._put(SUMS_NAME, format_sums(outputs))
        run = {"executor": executor, "workers": workers, **({"threads": threads} if threads else {}),
               "resumed_shards": list(self.resumed),
               **run_times(self.mark.started, time.time())}
        manifest = build_manifest(self.job, self.results, outputs, sums, donated, report, run)
        if not self.mark.confirm():
            raise OutputError(f"{out.display_uri}: another graft run took over this output while this one was "
                              f"committing; no manifest was written: stop one of the two runs")
        out.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
        self._move(State.COMMITTED, State.COMMITTING)
        self.mark.release()
        log(f"committed {out.display_uri} ({len(outputs)} files + {SUMS_NAME} + {MANIFEST_NAME})")
        return manifest

    def _put(self, name: str, data: bytes) -> OutputFile:
        return put(self.storage, name, data)

    def _sweep(self, keep: set[str]) -> None:
        """Remove temporaries, and this run's planned names not in ``keep``; best effort (the next
        run sweeps again). The mark's own writes wait meanwhile."""
        planned = self._planned_names(self.job)
        with self.mark.held():
            for name in self.storage.list():
                if TEMP_MARK in name or (name in planned and name not in keep):
                    try:
                        self.storage.remove(name)
                    except Exception:  # noqa: BLE001
                        pass

    def abort_uploads(self, log: Callable[[str], None] = lambda s: None) -> int:
        """Abort unfinished multipart uploads of this job's files (S3: what writers killed mid-file
        left). Call only when no writer of this run is working. Best effort: a store that refuses
        (e.g. no permission to list uploads) costs a log line, not the run."""
        ours = self._planned_names(self.job)
        try:
            return len(self.storage.abort_uploads(lambda n: n in ours or TEMP_MARK in n))
        except Exception as e:  # noqa: BLE001
            log(f"warning: could not abort unfinished uploads in {self.storage.display_uri} ({redact_text(str(e))}); "
                f"abort them with your store's tools or a lifecycle rule")
            return 0

    def stop(self, error: BaseException) -> BaseException:
        """The run ended early with ``error``; returns what to raise. Call once no writer of this
        run is working (the Ray driver kills its actors first).

        - ``COMMITTED`` (the manifest is written, or a stop caught the commit just after writing it):
          nothing is removed but the mark; Ctrl-C / SIGTERM become an ``Interrupted`` saying so.
        - ``ABANDONED`` when the mark is no longer this run's: nothing is touched.
        - ``SUSPENDED`` on Ctrl-C / SIGTERM (``Interrupted``), or on any other failure once shards
          are journaled (hours of work on a large job): those shards and the journal are kept,
          marked as interrupted so the next run takes over at once, and a note on ``error`` says how
          many and how to resume or clean.
        - ``ROLLED_BACK`` otherwise: everything this run may have written is removed.
        """
        total, uri = len(self.job.plan.shards), self.storage.display_uri
        interrupt = isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted)
        terminated = isinstance(error, Terminated)
        if self.state is State.COMMITTING and self._manifest_written():
            self.state = State.COMMITTED
        if self.state is State.COMMITTED:
            try:
                self.mark.release()
            except Exception:  # noqa: BLE001 - verify ignores a left-over mark; the output is complete
                pass
            return Interrupted(uri, total, total, terminated, committed=True) if interrupt else error
        if self.state not in _STOPPABLE:
            return error
        if not self._still_ours():
            self._move(State.ABANDONED, *_STOPPABLE)
            self.mark.abandon()
            error.add_note(f"{uri} was taken over by another graft run: this run removed nothing there")
            return error
        if interrupt or self.mark.shards:
            try:
                kept = self._suspend()
            except Exception as cleanup:  # noqa: BLE001 - the store failing too: report the first error
                self.mark.abandon()
                error.add_note(f"the output {uri} could not be set aside for a resume ({cleanup}); the next "
                               f"run of the same command checks and keeps what is intact")
                return error
            if interrupt:
                return Interrupted(uri, kept, total, terminated)
            error.add_note(f"{kept} of {total} shard(s) are committed and kept in {uri}: fix the cause "
                           f"and run the same command to resume (or remove them: graft clean {uri})")
            return error
        self._rollback()
        return error

    def _manifest_written(self) -> bool:
        try:
            return MANIFEST_NAME in self.storage.list()
        except Exception:  # noqa: BLE001 - cannot tell: assume not, and keep the journaled shards
            return False

    def _suspend(self) -> int:
        """``SUSPENDED``: keep the journaled shards and the journal so the same command resumes;
        remove the temporaries and whatever the commit step had begun to write. Returns the shards
        kept. A shard committed in the instant before the stop but not journaled goes, so what is
        left is exactly what the next run keeps."""
        self._move(State.SUSPENDED, *_STOPPABLE)
        journaled = set(self.mark.shards)
        self._sweep(keep=journaled)
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

    def _rollback(self) -> None:
        """``ROLLED_BACK``: remove every file this run may have made visible, temporaries and the
        mark; best effort."""
        self._move(State.ROLLED_BACK, *_STOPPABLE)
        self._sweep(keep=set())
        self.abort_uploads()
        try:
            self.mark.release()
        except Exception:  # noqa: BLE001 - a left-over mark is judged stale by the next run
            self.mark.abandon()
