"""The job around the shard tasks: open inputs and plan, prepare the output, commit or stop.

Every executor follows the same order (the local one in ``local.py``, the Ray driver in
``graft.cluster``):

1. ``prepare_job(spec)``: read headers of all three checkpoints and plan (no tensor data moves).
2. ``OutputSession.open(job)``: check the output location is new, empty or an unfinished graft run
   (``check``: a mark still changing is a live run, refused); take the run mark with a
   compare-and-swap write (``take``), and only then sweep temporaries and keep the shards a crashed
   run of the same job journaled, where their size and store version are unchanged.
3. ``session.verify_kept(hasher)``: hash the kept shards that need it (``--verify-kept``) on the
   executor's workers; then run ``execute_shard`` for every ``session.pending`` task (any order, any
   process) and ``session.record(result)`` each one as it commits.
4. ``session.commit(...)``: side files, index, SHA256SUMS, then the manifest (the commit marker),
   then remove the run mark. Or ``session.stop(error)`` on failure or Ctrl-C: no manifest, no
   temporary file, the journaled shards kept for a resume (rolled back only when there are none);
   after the manifest is written, nothing is removed. ``clean_output`` removes what a stopped run
   kept. ``State`` names each step and what it may touch.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from datetime import datetime, timezone
from typing import Any, Callable

from . import __version__, cas
from .checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from .errors import IntegrityError, Interrupted, OutputError, Terminated
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, SUMS_NAME, OutputFile, format_sums, hash_file
from .tasks import DIFF_STATS, STATS, TERM_STATS
from .planner import Plan, ShardTask, make_diff_plan, make_plan
from .provenance import DIFF_KIND, content_digests, stored_diff
from .report import REPORT_NAME, build as build_report
from .runmark import RUN_MARK, Observed, RunAlive, RunMark, describe, observe, wait_until_stale
from .redaction import redact_text
from .spec import JobSpec
from .storage import TEMP_MARK, Storage
from .tasks import ShardResult

__all__ = ["RUN_MARK", "Job", "RunResult", "prepare_job", "State", "Checked", "OutputSession", "hash_in_threads",
           "clean_output"]



@dataclass(frozen=True)
class Job:
    """A planned job: the spec, the opened input checkpoints and the plan."""

    spec: JobSpec
    checkpoints: dict[str, Checkpoint] = field(compare=False)
    plan: Plan
    # Each stored diff's role -> what its manifest says (``provenance.stored_diff``).
    stored_diffs: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    def input_storages(self) -> dict[str, Storage]:
        return {role: c.storage for role, c in self.checkpoints.items()}


@dataclass(frozen=True)
class RunResult:
    """A committed run, whichever executor ran it: where it is, the shard results, and the
    manifest written."""

    output: str
    results: tuple[ShardResult, ...]
    manifest: dict[str, Any]


def prepare_job(spec: JobSpec) -> Job:
    """Open the input checkpoints (headers only) and plan the job. Raises ``GraftError`` subclasses.
    A location named by several roles (two diffs from one base) is opened, and read, once."""
    def open_at(uri: str) -> tuple[Checkpoint, Any]:
        c = open_checkpoint(uri, spec.storage_options)
        return c, c.read_json("config.json")

    roles = spec.roles
    uris = list(dict.fromkeys(roles.values()))
    # They are independent (listings, stats and headers: round trips on an object store), so they
    # are opened at once; an error is reported for the first role, in the spec's order, that failed.
    with ThreadPoolExecutor(max_workers=min(len(uris), 8)) as pool:
        opened = dict(zip(uris, pool.map(open_at, uris)))
    checkpoints = {role: opened[uri][0] for role, uri in roles.items()}
    configs = {role: opened[uri][1] for role, uri in roles.items()}
    if spec.kind == DIFF_KIND:
        return Job(spec, checkpoints, make_diff_plan(spec, checkpoints, configs))
    stored = {roles[0]: stored_diff(checkpoints[roles[0]], roles[0])
              for i, d in enumerate(spec.diffs) if d.stored for roles in (spec.diff_roles(i),)}
    return Job(spec, checkpoints, make_plan(spec, checkpoints, configs), stored)


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


def _journal_form(result: ShardResult) -> dict[str, Any]:
    """What a shard measured, as the journal keeps it: its report measures (JSON: NaN/Inf as
    strings) and the digests of the inputs it read."""
    out: dict[str, Any] = {}
    if result.report:
        out["report"] = {name: [v if math.isfinite(v) else repr(v) for v in values] for name, values in result.report}
    if result.digests:
        out["digests"] = dict(result.digests)
    return out


def _kept(name: str, size: int, sha256: str, info: dict[str, Any]) -> ShardResult:
    """A kept shard's result, with what its journal entry says it measured."""
    digests = info.get("digests")
    digests = tuple((str(k), str(v)) for k, v in digests.items()) if isinstance(digests, dict) else ()
    return ShardResult(name, size, sha256, 0, 0.0, _journaled_report(info), digests)


def _journaled_report(info: dict[str, Any]) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """A kept shard's report measures back from its journal entry; none if absent or malformed."""
    entries = info.get("report")
    extra = len(STATS) + 1  # several diffs: the change, then TERM_STATS per further diff
    try:
        return tuple((str(n), tuple(float(v) for v in vs)) for n, vs in entries.items()
                     if len(vs) in (len(STATS), len(DIFF_STATS))
                     or (len(vs) > extra and (len(vs) - extra) % len(TERM_STATS) == 0)
                     ) if isinstance(entries, dict) else ()
    except (TypeError, ValueError):
        return ()


def _formula(spec: JobSpec) -> str:
    if spec.kind == DIFF_KIND:
        return (f"out = finetuned - base, per tensor, computed in float32 (the difference a float32 "
                f"transfer computes), written as {spec.diff_dtype}")
    if len(spec.diffs) == 1:
        return "out = target + alpha * (finetuned - base), per tensor, rounded once to the target's dtype"
    return ("out = target + sum_i alpha_i * (finetuned_i - base_i), the change summed left to right then "
            "added to the target, per tensor, rounded once to the target's dtype")


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def fingerprint(job: Job) -> str:
    """Identifies the work: the planned shards (names, tensors, byte ranges, settings) and the input
    files' sizes and versions. A resumed run keeps shards only from a run with the same fingerprint."""
    inputs = [(role, [(f.name, f.size, f.version) for f in c.files]) for role, c in job.checkpoints.items()]
    # How the bytes are moved (chunk size, reads in flight) does not change them: a rerun with
    # other I/O settings still keeps the shards already committed.
    shards = [replace(s, settings=replace(s.settings, chunk_size=0, read_concurrency=0, report_every=0))
              for s in job.plan.shards]
    return hashlib.sha256(repr((shards, inputs)).encode()).hexdigest()


def _has_mark(listing: list[str]) -> bool:
    """The run mark is there, or is being replaced this instant (moved aside, on local disk)."""
    return RUN_MARK in listing or any(n.startswith(cas.aside_prefix(RUN_MARK)) for n in listing)


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
        listing = storage.list()
        uri = storage.display_uri
        if MANIFEST_NAME in listing:
            raise OutputError(f"{uri} already holds a committed graft output ({MANIFEST_NAME}); "
                              f"choose another output or delete it first")
        ours = cls._planned_names(job) | {RUN_MARK}
        marked = _has_mark(listing)
        foreign = [n for n in listing if TEMP_MARK not in n and not (n in ours and marked)]
        if foreign:
            raise OutputError(f"{uri} is not empty (it holds {', '.join(foreign[:3])}); "
                              f"graft writes only into a new or empty location: choose another output")
        previous = observe(storage) if marked else None
        if previous is not None and watch:
            previous = wait_until_stale(storage, previous, log)
        return Checked(storage, listing, previous)

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
                self.results[name] = _kept(name, size, sha256, info)
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
                result = self.results[name] = _kept(name, info["size"], digest, info)
                self.mark.record(name, info["size"], digest, info["version"], _journal_form(result))
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
        self.mark.record(result.file, result.size, result.sha256, version, _journal_form(result))
        self.results[result.file] = result

    @staticmethod
    def _planned_names(job: Job) -> set[str]:
        plan = job.plan
        return ({s.file for s in plan.shards} | {f.name for f in plan.side_files}
                | {INDEX_NAME, SUMS_NAME, REPORT_NAME})

    def commit(self, executor: str, workers: int, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
        """Write side files, index, SHA256SUMS and the manifest (last); returns the manifest."""
        plan, out = self.job.plan, self.storage
        self._move(State.COMMITTING, State.OPEN, State.RUNNING)
        if not self.mark.confirm():
            raise OutputError(f"{out.display_uri}: another graft run took over this output (this run's heartbeat "
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
        report = self._report()
        if report is not None:
            outputs.append(self._put(REPORT_NAME, json.dumps(report, indent=1).encode() + b"\n"))
        # A worker killed mid-shard leaves its temporary (or on S3 its upload) behind; none may
        # outlive the commit.
        self._sweep(keep=set(self.results) | {f.name for f in outputs})
        self.abort_uploads(log)
        sums = self._put(SUMS_NAME, format_sums(outputs))
        finished = time.time()
        read = sum(r.bytes_read for r in results)
        spec = self.job.spec
        contents = self._input_contents() if spec.kind == DIFF_KIND else {}
        manifest = {
            "format": MANIFEST_FORMAT,
            "graft_version": __version__,
            "kind": spec.kind,
            "formula": _formula(spec),
            "spec": spec.to_dict(),
            "inputs": {
                role: {"uri": c.uri, **({"commit": c.storage.commit} if c.storage.commit else {}),
                       **self.job.stored_diffs.get(role, {}),
                       "files": [{"name": f.name, "uri": c.storage.url(f.name), "size": f.size,
                                  "version": f.version,
                                  **({"content_sha256": contents[role][f.name]} if role in contents else {})}
                                 for f in c.files] + donated[role]}
                for role, c in self.job.checkpoints.items()
            },
            "outputs": [{"name": f.name, "size": f.size, "sha256": f.sha256}
                        for f in sorted([*outputs, sums], key=lambda f: f.name)],
            "plan": {"tensors": plan.tensor_count, "combined": plan.combined, "copied": plan.copied,
                     "left_out": list(plan.left_out), "shards": len(plan.shards),
                     "side_files": {s.name: s.donor for s in plan.side_files},
                     "formats": dict(plan.formats),
                     "vocab": dict(plan.vocab),
                     "warnings": list(plan.warnings)},
            **({"diff": self._diff_summary()} if spec.kind == DIFF_KIND else {}),
            **({"report": {"file": REPORT_NAME, "mode": report["mode"],
                           "flags": dict(Counter(f["kind"] for f in report["flags"])),
                           "unmeasured": len(report["unmeasured"])}} if report is not None else {}),
            "run": {"executor": executor, "workers": workers, "resumed_shards": list(self.resumed),
                    "started": _utc(self.mark.started),
                    "finished": _utc(finished), "seconds": round(finished - self.mark.started, 3),
                    "bytes_read": read, "bytes_written": sum(f.size for f in outputs)},
        }
        if not self.mark.confirm():
            raise OutputError(f"{out.display_uri}: another graft run took over this output while this one was "
                              f"committing; no manifest was written: stop one of the two runs")
        out.write_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2).encode() + b"\n")
        self._move(State.COMMITTED, State.COMMITTING)
        self.mark.release()
        log(f"committed {out.display_uri} ({len(outputs)} files + {SUMS_NAME} + {MANIFEST_NAME})")
        return manifest

    def _input_contents(self) -> dict[str, dict[str, str]]:
        """graft diff: each input file's ``content_sha256`` (``provenance``), from the digests the
        shards computed while streaming (kept shards' from the journal)."""
        digests = {k: v for r in self.results.values() for k, v in r.digests}
        hashed = self.job.plan.shards[0].settings.hash_roles if self.job.plan.shards else ()
        seen: dict[int, dict[str, str]] = {}
        out = {}
        for role, c in self.job.checkpoints.items():
            if not any(c is self.job.checkpoints[r] for r in hashed):
                continue  # on the Hub: each file's version is its sha256
            if id(c) not in seen:  # a checkpoint both roles name was read under the first
                seen[id(c)] = content_digests(c, role, digests)
            out[role] = seen[id(c)]
        return out

    def _diff_summary(self) -> dict[str, Any]:
        """graft diff: what the written differences measured (``tasks.DIFF_STATS``, every element)."""
        measured = {name: dict(zip(DIFF_STATS, values)) for r in self.results.values() for name, values in r.report}
        names = [t.name for s in self.job.plan.shards for t in s.tensors]
        inexact = {n: int(v["inexact"]) for n, v in sorted(measured.items()) if v["inexact"]}
        unmeasured = sorted(n for n in names if n not in measured)
        return {
            "dtype": self.job.spec.diff_dtype, "tensors": len(names),
            "norm": math.sqrt(sum(v["delta_sq"] for v in measured.values())),
            "untouched": sorted(n for n, v in measured.items() if not v["differs"]),
            # Elements whose written difference is not the float64 one: where a float64 transfer
            # from this diff would not give the three-checkpoint float64 run's bits.
            "inexact_elements": sum(inexact.values()), "inexact_tensors": inexact,
            "unmeasured": unmeasured,
            "float64_exact": not inexact and not unmeasured,
        }

    def _report(self) -> dict[str, Any] | None:
        """The transfer report from every shard's measures (kept shards' from the journal); None
        with ``report: off``."""
        spec = self.job.spec
        if spec.report == "off":
            return None
        terms = {t.name: tuple((x.diff, x.alpha) for x in t.terms)
                 for s in self.job.plan.shards for t in s.tensors if t.combine}
        measured = [m for r in self.results.values() for m in r.report]
        stored = frozenset(i for i, d in enumerate(spec.diffs) if d.stored)
        return build_report(measured, terms, spec.report, spec.compute_dtype, len(spec.diffs), stored)

    def _put(self, name: str, data: bytes) -> OutputFile:
        self.storage.write_bytes(name, data)
        return OutputFile(name, len(data), hashlib.sha256(data).hexdigest())

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


def clean_output(uri: str, storage_options: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Remove what an unfinished run left at ``uri`` (``graft clean``): its kept shards, whatever its
    commit had begun to write, temporaries, unfinished uploads and, last, the run mark. Returns the
    names removed. Refuses a committed output (it has a manifest) and a run that is still going
    (its mark changes while watched). Takes the mark over first, like a run would, so a clean and
    a resuming run cannot both act. Only names the mark lists as the run's own, or temporaries,
    are touched: a file someone else put there stays."""
    storage = Storage(uri, storage_options)
    listing = storage.list()
    if MANIFEST_NAME in listing:
        raise OutputError(f"{storage.display_uri} holds a committed graft output ({MANIFEST_NAME}); graft clean "
                          f"removes only unfinished runs: delete it with your store's tools if you mean to")
    seen = observe(storage) if _has_mark(listing) else None
    if seen is None:
        raise OutputError(f"{storage.display_uri}: no unfinished graft run here (no {RUN_MARK}); nothing to clean")
    try:
        seen = wait_until_stale(storage, seen, log)
    except RunAlive as e:
        raise OutputError(f"{storage.display_uri} is being written by a graft run that is still going "
                          f"({describe(e.seen.mark)}); stop it first (Ctrl-C keeps its shards), or wait "
                          f"for it") from None
    mark = seen.mark
    ours = {n for n in (mark.get("files") or []) if isinstance(n, str)}
    ours |= {n for n in (mark.get("shards") or {}) if isinstance(n, str)}
    cleaner = RunMark(storage, "graft clean", {}, files=sorted(ours))
    cleaner.acquire(seen)
    removed = []
    try:
        with cleaner.held():
            for name in storage.list():  # names from the listing, never the mark: it cannot point elsewhere
                if name != RUN_MARK and (name in ours or TEMP_MARK in name):
                    storage.remove(name)
                    removed.append(name)
        storage.abort_uploads(lambda n: n in ours or TEMP_MARK in n)
    except BaseException:
        try:
            cleaner.suspend()  # marked as stopped: the next graft clean (or run) takes over at once
        except Exception:  # noqa: BLE001 - the store failing again: the mark goes stale by itself
            cleaner.abandon()
        raise
    cleaner.release()
    return [*removed, RUN_MARK]
