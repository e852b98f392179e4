"""The job around the shard tasks: open inputs and plan; the order every executor follows.

Every executor follows the same order (the local one in ``local.py``, the Ray driver in
``graft.cluster``):

1. ``prepare_job(spec)`` (here): read the headers of every input checkpoint and plan (no tensor
   data moves).
2. ``OutputSession.open(job)`` (``session.py``): check the output location is new, empty or an
   unfinished graft run (``check``: a mark still changing is a live run, refused); take the run
   mark with a compare-and-swap write (``take``), and only then sweep temporaries and keep the
   shards a crashed run of the same job journaled, where their size and store version are unchanged.
3. ``session.verify_kept(hasher)``: hash the kept shards that need it (``--verify-kept``) on the
   executor's workers; then run ``execute_shard`` for every ``session.pending`` task (any order, any
   process) and ``session.record(result)`` each one as it commits.
4. ``session.commit(...)``: side files, index, report, SHA256SUMS, then the manifest (the commit
   marker; what each holds is ``commit.py``), then remove the run mark. Or ``session.stop(error)``
   on failure or Ctrl-C: no manifest, no temporary file, the journaled shards kept for a resume
   (rolled back only when there are none); after the manifest is written, nothing is removed.
   ``clean.py`` (``graft clean``) removes what a stopped run kept.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from ..formats.adapter import is_adapter, read_adapter, refuse_adapter_as_weights
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..plan.planner import Plan, make_diff_plan, make_plan
from ..plan.spec import JobSpec
from ..plan.tasks import ShardResult
from ..storage import Storage
from .provenance import DIFF_KIND, expect_stored, refuse_diff_as_weights, stored_diff

__all__ = ["Job", "RunResult", "prepare_job", "fingerprint"]


@dataclass(frozen=True)
class Job:
    """A planned job: the spec, the opened input checkpoints and the plan."""

    spec: JobSpec
    checkpoints: dict[str, Checkpoint] = field(compare=False)
    plan: Plan
    # Each stored diff's role -> what its manifest says (``provenance.stored_diff``).
    stored_diffs: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    # Each stored diff's role -> file name -> the sha256 its manifest records (side files are checked).
    stored_files: dict[str, dict[str, str]] = field(default_factory=dict, compare=False)

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
    stored_roles = {spec.diff_roles(i)[0] for i, d in enumerate(spec.diffs) if d.stored}
    # A diff's fine-tune may be a PEFT LoRA adapter (adapter_config.json): given as ``diff``, with the
    # base it was trained on where it holds whole tensors. Nowhere else: it holds factors, not weights.
    changes = {spec.diff_roles(i)[0] for i in range(len(spec.diffs))} if spec.kind != DIFF_KIND else set()
    adapters = {role: read_adapter(checkpoints[role], role) for role in sorted(changes)
                if is_adapter(checkpoints[role])}
    for role, c in checkpoints.items():
        if role not in adapters:
            refuse_adapter_as_weights(c, role)
        if role not in stored_roles:
            refuse_diff_as_weights(c, role)
    if spec.kind == DIFF_KIND:
        return Job(spec, checkpoints, make_diff_plan(spec, checkpoints, configs))
    stored = {role: stored_diff(checkpoints[role], role) for role in sorted(stored_roles - set(adapters))}
    plan = make_plan(spec, checkpoints, configs, adapters)
    if stored:
        plan = expect_stored(plan, {role: d.tensors for role, d in stored.items()})
    return Job(spec, checkpoints, plan, {**{role: d.record for role, d in stored.items()},
                                         **{role: a.record() for role, a in adapters.items()}},
               {role: d.files for role, d in stored.items()})


def fingerprint(job: Job) -> str:
    """Identifies the work: the planned shards (names, tensors, byte ranges, settings) and the input
    files' sizes and versions. A resumed run keeps shards only from a run with the same fingerprint."""
    inputs = [(role, [(f.name, f.size, f.version) for f in c.files]) for role, c in job.checkpoints.items()]
    # How the bytes are moved (chunk size, reads in flight) does not change them: a rerun with
    # other I/O settings still keeps the shards already committed.
    shards = [replace(s, settings=replace(s.settings, chunk_size=0, read_concurrency=0, report_every=0))
              for s in job.plan.shards]
    return hashlib.sha256(repr((shards, inputs)).encode()).hexdigest()
