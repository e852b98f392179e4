"""graft: fine-tuning transfer for safetensors checkpoints, out = target + alpha * (finetuned - base).

The Python API (docs/api.md). ``import graft`` is cheap: torch loads with the first ``run``, Ray
only with ``run(..., executor="ray")``.

    plan(spec, overrides=())                     -> Job        headers only, nothing written
    run(spec, executor="local", progress=None)   -> RunResult  the output committed
    verify(path)                                 -> VerifyReport

``spec`` is a mapping (the YAML's keys), a path to a YAML job file, or a ``JobSpec``. Every error
graft anticipates is a ``graft.engine.errors.GraftError`` subclass (``SpecError``, ``PlanError``,
``StorageError``, ...). Log lines go to the ``logging`` loggers named ``graft.*``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

from graft.engine import __version__
from graft.engine.plan.spec import JobSpec  # plain dataclasses: no torch, Ray or pydantic

if TYPE_CHECKING:
    from graft.engine.formats.manifest import VerifyReport
    from graft.engine.run.job import Job, RunResult

__all__ = ["__version__", "plan", "run", "verify", "JobSpec", "SpecLike", "ProgressCallback"]

SpecLike = Union[Mapping[str, Any], str, "os.PathLike[str]", "JobSpec"]
# Called with (bytes read so far, bytes the plan reads in all).
ProgressCallback = Callable[[int, int], None]

_logger = logging.getLogger("graft.run")


def _log(message: str) -> None:
    """The engine's log callback: its ``warning: ...`` lines as warnings, the rest as information."""
    _logger.log(logging.WARNING if message.startswith("warning: ") else logging.INFO, message)


def _job_spec(spec: SpecLike, overrides: Sequence[str], kind: str) -> JobSpec:
    from graft.engine.errors import SpecError
    from graft.engine.plan.specfile import apply_overrides, load_spec, spec_from_mapping

    if isinstance(overrides, str):
        raise SpecError(f"overrides={overrides!r}: give a list of key=value strings, e.g. ['alpha=0.5']")
    if isinstance(spec, JobSpec):
        if overrides:
            raise SpecError("overrides: apply them to a mapping or a YAML path; a JobSpec is already "
                            "validated (use dataclasses.replace on it instead)")
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(os.fspath(spec), overrides, kind=kind)
    if isinstance(spec, Mapping):
        return spec_from_mapping(apply_overrides(spec, overrides), kind=kind)
    raise SpecError(f"spec: expected a mapping of keys, a YAML path or a JobSpec, got "
                    f"{type(spec).__name__}")


def plan(spec: SpecLike, overrides: Sequence[str] = (), kind: Literal["transfer", "diff"] = "transfer") -> Job:
    """Validate ``spec``, open its input checkpoints (headers only) and plan the job; nothing is
    written. Returns the engine's ``Job``: ``job.spec`` (the validated ``JobSpec``), ``job.plan``
    (``shards``, ``tensor_count``, ``combined``, ``copied``, ``read_bytes``, ``write_bytes``,
    ``warnings``, ...) and ``job.checkpoints``. ``kind="diff"``: a ``graft diff`` spec.

    Raises ``SpecError`` (every bad key at once, in ``problems``), ``PlanError`` (every reason the
    checkpoints cannot be combined, in ``problems``), ``StorageError``, ``CheckpointError``, ...
    """
    from graft.engine.run.job import prepare_job

    return prepare_job(_job_spec(spec, overrides, kind))


def run(
    spec: SpecLike | Job,
    executor: Literal["local", "ray"] = "local",
    progress: ProgressCallback | bool | None = None,
    overrides: Sequence[str] = (),
    kind: Literal["transfer", "diff"] = "transfer",
    workers: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    address: str | None = None,
) -> RunResult:
    """Run a job and commit its output; on failure keep what is journaled (the same call resumes)
    and raise. ``spec`` may also be a ``Job`` from ``plan``.

    ``executor``: ``"local"`` (default: threads in this process, sized from the machine) or
    ``"ray"`` (shard actors on the Ray cluster at ``address`` or $RAY_ADDRESS, else a private one).
    ``progress``: ``None`` for none, ``True`` for the CLI's progress (a live line on a terminal, else
    ``graft.progress`` log records), or a callable
    ``progress(done_bytes, total_bytes)``. ``workers``, ``threads``, ``device``: as ``graft run``'s
    flags (``threads`` and ``device`` apply to the local executor).
    Returns ``RunResult``: ``output`` (the committed location), ``results`` (one per shard) and
    ``manifest`` (what ``graft.manifest.json`` records).
    """
    from graft.engine.errors import SpecError
    from graft.engine.run.job import Job, prepare_job

    if executor not in ("local", "ray"):
        raise SpecError(f"executor={executor!r}: expected 'local' or 'ray'")
    job = spec if isinstance(spec, Job) else prepare_job(_job_spec(spec, overrides, kind))
    for warning in job.plan.warnings:
        _log(f"warning: {warning}")
    total = job.plan.read_bytes
    bar = None
    on_progress: Callable[[int], None] | None = None
    on_shard: Callable[[str], None] | None = None
    if progress is True:
        import sys

        from graft.cluster.progress import Progress

        bar = Progress(total, sys.stderr, shards=len(job.plan.shards))
        on_progress, on_shard = bar.update, bar.shard
    elif callable(progress):
        done = 0

        def on_progress(n: int) -> None:
            nonlocal done
            done += n
            progress(done, total)
    try:
        if executor == "local":
            from graft.engine.run.local import run_local

            return run_local(job, workers=workers, on_progress=on_progress, log=_log, device=device,
                             on_shard=on_shard, threads=threads)
        from graft.cluster.driver import RayOptions, run_ray

        return run_ray(job, RayOptions(address=address, workers=workers), on_progress=on_progress,
                       log=_log, on_shard=on_shard)
    finally:
        if bar is not None:
            bar.close()


def verify(path: str | os.PathLike[str], storage_options: Mapping[str, Mapping[str, Any]] | None = None,
           ) -> VerifyReport:
    """Re-hash a committed output (a local path or a store URI) against its SHA256SUMS and manifest.
    Returns ``VerifyReport``: ``ok``, ``checked`` (file names that matched), ``problems`` (one line
    each) and ``manifest``. A tampered, missing or extra file is a problem, not an exception; an
    unreachable store raises ``StorageError``."""
    from graft.engine.formats.manifest import verify_output

    where = os.fspath(path)
    return verify_output(where if "://" in where else os.path.abspath(where), storage_options)
