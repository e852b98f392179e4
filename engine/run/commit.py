"""What a commit writes besides the shards, and the manifest that binds it all.

``OutputSession.commit`` (``session.py``) calls these in order, between its checks that the run
still holds the output: ``shard_outputs`` (every planned shard committed, at its planned size),
``copy_side_files`` (from their donors, config.json patched to describe the output's weights),
the index and ``transfer_report``, SHA256SUMS, then ``build_manifest`` (the commit marker, written
last): the spec, each input file with its version (and for ``graft diff`` its ``content_sha256``),
each output with its sha256, the plan's summary, the report's and the diff's summaries, the run.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from .. import __version__
from ..compute.report import REPORT_NAME, build as build_report
from ..errors import IntegrityError
from ..formats.manifest import MANIFEST_FORMAT, OutputFile
from ..plan.output_files import apply_patch
from ..plan.spec import JobSpec
from ..plan.tasks import DIFF_STATS, OUTPUT_DIGEST, ShardResult
from ..storage import Storage
from .job import Job
from .provenance import DIFF_KIND, content_digests

__all__ = ["put", "shard_outputs", "copy_side_files", "transfer_report", "build_manifest", "run_times"]


def put(storage: Storage, name: str, data: bytes) -> OutputFile:
    """Write a small output file atomically; its manifest entry."""
    storage.write_bytes(name, data)
    return OutputFile(name, len(data), hashlib.sha256(data).hexdigest())


def shard_outputs(job: Job, results: Mapping[str, ShardResult], out: Storage) -> list[OutputFile]:
    """The planned shards' manifest entries; every one must be committed at its planned size."""
    outputs = []
    for shard in job.plan.shards:
        r = results.get(shard.file)
        if r is None or r.size != shard.size:
            raise IntegrityError(f"{out.url(shard.file)}: shard result missing or of the wrong "
                                 f"size; run the job again")
        outputs.append(OutputFile(r.file, r.size, r.sha256))
    return outputs


def copy_side_files(job: Job, write: Callable[[str, bytes], OutputFile]
                    ) -> tuple[list[OutputFile], dict[str, list[dict[str, Any]]]]:
    """Copy each side file from its donor (patched where the plan says); the files written, and
    per role what it donated (for the manifest's inputs). ``IntegrityError`` for a stored diff's
    file that is not the one its manifest records."""
    outputs: list[OutputFile] = []
    donated: dict[str, list[dict[str, Any]]] = {role: [] for role in job.checkpoints}
    for side in job.plan.side_files:
        donor = job.checkpoints[side.donor].storage
        data = donor.read(side.name)
        want = job.stored_files.get(side.donor, {}).get(side.name)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise IntegrityError(f"{donor.url(side.name)}: not the file its diff's manifest records (sha256): the "
                                 f"diff is damaged; re-create it with graft diff or download it again")
        entry: dict[str, Any] = {"name": side.name, "uri": donor.url(side.name)}
        if side.patch:
            entry["sha256_donated"] = hashlib.sha256(data).hexdigest()
            entry["patched"] = {k: None if v is None else json.loads(v) for k, v in side.patch}
            data = _patched(data, side.patch, donor.url(side.name))
        copied = write(side.name, data)
        outputs.append(copied)
        donated[side.donor].append({**entry, "size": copied.size, "sha256": copied.sha256})
    return outputs, donated


def _patched(data: bytes, patch: tuple[tuple[str, str | None], ...], where: str) -> bytes:
    """A JSON object file with keys set (or removed, for None) as the plan says (``apply_patch``)."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"{where}: not valid JSON ({e}); graft must change it to match the "
                             f"output's weights, fix the file") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{where}: not a JSON object; graft must change it to match the output's "
                             f"weights, fix the file")
    apply_patch(obj, patch)  # the bytes planned on: reads are pinned to the version planned
    return json.dumps(obj, indent=2).encode() + b"\n"


def transfer_report(job: Job, results: Mapping[str, ShardResult]) -> dict[str, Any] | None:
    """The transfer report from every shard's measures (kept shards' from the journal); None
    with ``report: off``."""
    spec = job.spec
    if spec.report == "off":
        return None
    terms = {t.name: tuple((x.diff, x.alpha) for x in t.terms)
             for s in job.plan.shards for t in s.tensors if t.combine}
    measured = [m for r in results.values() for m in r.report]
    # No base measures for a stored diff or an adapter (a LoRA term's base is zeros, not its base's).
    stored = frozenset(i for i, d in enumerate(spec.diffs)
                       if d.stored or "adapter" in job.stored_diffs.get(spec.diff_roles(i)[0], {}))
    return build_report(measured, terms, spec.report, spec.compute_dtype, len(spec.diffs), stored)


def input_contents(job: Job, results: Mapping[str, ShardResult]) -> dict[str, dict[str, str]]:
    """Each hashed input file's ``content_sha256`` (``provenance``), from the digests the shards
    computed while streaming (kept shards' from the journal): graft diff's inputs, a transfer's LoRA
    adapters (not its stored diffs: their manifest, whose sha256 is recorded, binds them)."""
    digests = {k: v for r in results.values() for k, v in r.digests}
    hashed = job.plan.shards[0].settings.hash_roles if job.plan.shards else ()
    if job.spec.kind != DIFF_KIND:
        hashed = tuple(r for r in hashed if "adapter" in job.stored_diffs.get(r, {}))
    seen: dict[int, dict[str, str]] = {}
    out = {}
    for role, c in job.checkpoints.items():
        if not any(c is job.checkpoints[r] for r in hashed):
            continue  # on the Hub: each file's version is its sha256
        if id(c) not in seen:  # a checkpoint both roles name was read under the first
            seen[id(c)] = content_digests(c, role, digests)
        out[role] = seen[id(c)]
    return out


def written_digests(results: Mapping[str, ShardResult]) -> dict[str, dict[str, str]]:
    """graft diff: file -> tensor -> the sha256 of its bytes as written (``tasks.output_digest_key``)."""
    out: dict[str, dict[str, str]] = {}
    for r in results.values():
        for key, digest in r.digests:
            kind, _, rest = key.partition("\t")
            if kind == OUTPUT_DIGEST:
                file, _, tensor = rest.partition("\t")
                out.setdefault(file, {})[tensor] = digest
    return {f: dict(sorted(ts.items())) for f, ts in out.items()}


def diff_summary(job: Job, results: Mapping[str, ShardResult]) -> dict[str, Any]:
    """graft diff: what the written differences measured (``tasks.DIFF_STATS``, every element)."""
    # In name order: the shards' results come in whatever order they finished.
    measured = {name: dict(zip(DIFF_STATS, values))
                for name, values in sorted(m for r in results.values() for m in r.report)}
    names = [t.name for s in job.plan.shards for t in s.tensors]
    inexact = {n: int(v["inexact"]) for n, v in sorted(measured.items()) if v["inexact"]}
    unmeasured = sorted(n for n in names if n not in measured)
    return {
        "dtype": job.spec.diff_dtype, "tensors": len(names),
        "norm": math.sqrt(sum(v["delta_sq"] for v in measured.values())),
        "untouched": sorted(n for n, v in measured.items() if not v["differs"]),
        # Elements whose written difference is not the float64 one: where a float64 transfer
        # from this diff would not give the three-checkpoint float64 run's bits.
        "inexact_elements": sum(inexact.values()), "inexact_tensors": inexact,
        "unmeasured": unmeasured,
        "float64_exact": not inexact and not unmeasured,
    }


def build_manifest(job: Job, results: Mapping[str, ShardResult], outputs: list[OutputFile], sums: OutputFile,
                   donated: Mapping[str, list[dict[str, Any]]], report: dict[str, Any] | None,
                   run: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest: what was asked, read, written and measured; ``run`` describes the run (executor,
    workers, resumed shards, times)."""
    plan, spec = job.plan, job.spec
    contents = input_contents(job, results)
    written = written_digests(results)
    return {
        "format": MANIFEST_FORMAT,
        "graft_version": __version__,
        "kind": spec.kind,
        "formula": _formula(spec),
        "spec": spec.to_dict(),
        "inputs": {
            role: {"uri": c.uri, **({"commit": c.storage.commit} if c.storage.commit else {}),
                   **job.stored_diffs.get(role, {}),
                   "files": [{"name": f.name, "uri": c.storage.url(f.name), "size": f.size,
                              "version": f.version,
                              **({"content_sha256": contents[role][f.name]} if role in contents else {})}
                             for f in c.files] + donated[role]}
            for role, c in job.checkpoints.items()
        },
        "outputs": [{"name": f.name, "size": f.size, "sha256": f.sha256,
                     **({"tensors": written[f.name]} if f.name in written else {})}
                    for f in sorted([*outputs, sums], key=lambda f: f.name)],
        "plan": {"tensors": plan.tensor_count, "combined": plan.combined, "copied": plan.copied,
                 "left_out": list(plan.left_out), "shards": len(plan.shards),
                 "side_files": {s.name: s.donor for s in plan.side_files},
                 "formats": dict(plan.formats),
                 "vocab": dict(plan.vocab),
                 "warnings": list(plan.warnings)},
        **({"diff": diff_summary(job, results)} if spec.kind == DIFF_KIND else {}),
        **({"report": {"file": REPORT_NAME, "mode": report["mode"],
                       "flags": dict(Counter(f["kind"] for f in report["flags"])),
                       "unmeasured": len(report["unmeasured"])}} if report is not None else {}),
        "run": {**run, "bytes_read": sum(r.bytes_read for r in results.values()),
                "bytes_written": sum(f.size for f in outputs)},
    }


def run_times(started: float, finished: float) -> dict[str, Any]:
    """The manifest's start, finish (UTC, to the second) and duration of a run."""
    return {"started": _utc(started), "finished": _utc(finished), "seconds": round(finished - started, 3)}


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


