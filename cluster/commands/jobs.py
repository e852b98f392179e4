"""The commands that run or plan a job from its spec: ``run``, ``diff``, ``plan``, ``schema``.

``run`` and ``diff`` share their flags (``cli_flags.run_options``); the flags of one executor are
refused with the other, and a CUDA device that is not there, before the spec is read.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from graft.cluster import exits
from graft.cluster.cli_flags import common, device, overrides, positive, run_options, storage_option
from graft.cluster.cli_output import (UsageError, emit, error_line, error_object, plan_summary, print_plan,
                                      unfinished_run_note)
from graft.cluster.progress import Progress, human_bytes
from graft.engine.errors import GraftError
from graft.engine.plan.specfile import load_spec, spec_schema
from graft.engine.redaction import redact_uri
from graft.engine.run.job import prepare_job
from graft.engine.run.session import OutputSession

__all__ = ["register"]


def _log(msg: str) -> None:
    logging.getLogger("graft.cli").info(msg)


def register(sub: Any) -> None:
    """Add this family's commands to ``graft``'s subparsers."""
    r = sub.add_parser("run", help="run a transfer job and commit its output")
    r.add_argument("config", help="YAML job spec (graft schema prints its JSON Schema)")
    run_options(r)
    r.set_defaults(func=cmd_run, kind="transfer")

    d = sub.add_parser("diff", help="write finetuned - base as a diff checkpoint (float32 by default) that "
                                    "a transfer can read as diff: instead of finetuned and base")
    d.add_argument("config", help="YAML spec: finetuned, base, output, diff_dtype (float32 | bf16), ...")
    run_options(d)
    d.set_defaults(func=cmd_run, kind="diff")

    pl = sub.add_parser("plan", help="read headers only and show what a run would do (graft run CONFIG --plan "
                                     "and graft diff CONFIG --plan are the same)")
    pl.add_argument("config")
    pl.add_argument("--diff", dest="kind", action="store_const", const="diff", default="transfer",
                    help="the config is a graft diff spec (the same as graft diff CONFIG --plan)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as graft run's")
    storage_option(pl)
    pl.add_argument("--workers", type=positive, default=None, help="as graft run's, for what a local run would use")
    pl.add_argument("--threads", type=positive, default=None, help="as graft run's, for what a local run would use")
    pl.add_argument("--device", type=device, default=None, help="as graft run's, for what a local run would use")
    common(pl)
    pl.set_defaults(func=cmd_plan)

    sc = sub.add_parser("schema", help="print the JSON Schema of the job spec, for editors: save it and start "
                                       "a job file with # yaml-language-server: $schema=graft.schema.json")
    sc.add_argument("--diff", dest="kind", action="store_const", const="diff", default="transfer",
                    help="the schema of a graft diff spec")
    common(sc)
    sc.set_defaults(func=cmd_schema)


def _check_run_flags(args: argparse.Namespace) -> None:
    """The flags of one executor refused with the other, and a CUDA device that is not there: a
    usage error before the spec is read or the output touched."""
    ray_only = {"--address": args.address, "--shards-per-worker": args.shards_per_worker,
                "--cpus-per-worker": args.cpus_per_worker, "--gpus-per-worker": args.gpus_per_worker,
                "--start-timeout": args.start_timeout}
    if args.executor == "local":
        given = [flag for flag, value in ray_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} applies to --executor ray only; with --executor local use "
                             f"--workers, --threads and --device")
    else:
        for flag, value in (("--threads", args.threads), ("--device", args.device)):
            if value is not None:
                raise UsageError(f"{flag} applies to --executor local only; on Ray use --workers, "
                                 f"--cpus-per-worker and --gpus-per-worker")
    _check_device(args.device)


def _check_device(device: str | None) -> None:
    if device is None or device == "cpu":
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise UsageError(f"argument --device: {device} is not a CUDA device here (torch sees {count}); "
                         f"use --device cpu" + (f" or cuda:0..{count - 1}" if count else ""))


def cmd_run(args: argparse.Namespace) -> int:
    if args.plan:  # graft run CONFIG --plan: the same as graft plan CONFIG
        return cmd_plan(args)
    _check_run_flags(args)
    spec = load_spec(args.config, overrides(args), kind=args.kind)
    job = prepare_job(spec)
    plan = job.plan
    for w in plan.warnings:
        logging.getLogger("graft.cli").warning(f"warning: {w}")
    formats = dict(plan.formats)
    if any(not v.startswith("plain") for v in formats.values()):
        _log("formats: " + "; ".join(f"{role} {v}" for role, v in formats.items()))
    _log(f"{plan.tensor_count} tensors ({plan.combined} combined, {plan.copied} copied) into "
         f"{len(plan.shards)} shard(s); reading {human_bytes(plan.read_bytes)}, writing "
         f"{human_bytes(plan.write_bytes)} to {redact_uri(spec.output)}")
    progress = None if args.quiet else Progress(plan.read_bytes, sys.stderr, shards=len(plan.shards))
    t0 = time.monotonic()
    log = _log if args.verbose else (lambda s: None)
    update = progress.update if progress else None
    on_shard = progress.shard if progress else None
    try:
        if args.executor == "local":
            from graft.engine.run.local import run_local  # torch loads only for a run

            result = run_local(job, workers=args.workers, on_progress=update, log=log, device=args.device or "cpu",
                               on_shard=on_shard, verify_kept=args.verify_kept, threads=args.threads)
        else:
            from graft.cluster.driver import RayOptions, run_ray  # Ray is imported only when used

            given = {k: getattr(args, k) for k in ("shards_per_worker", "cpus_per_worker", "gpus_per_worker",
                                                   "start_timeout") if getattr(args, k) is not None}
            opts = RayOptions(address=args.address, workers=args.workers, **given)
            result = run_ray(job, opts, on_progress=update, log=_log, on_shard=on_shard,
                             verify_kept=args.verify_kept)
    finally:
        if progress:
            progress.close()
    secs = time.monotonic() - t0
    rate = plan.read_bytes / secs if secs > 0 else 0.0
    done = {"output": result.output, "shards": len(result.results), "write_bytes": plan.write_bytes,
            "read_bytes": plan.read_bytes, "seconds": round(secs, 3), "read_bytes_per_second": round(rate),
            "warnings": list(plan.warnings), "verify_command": f"graft verify {result.output}"}
    emit(args.json, done, [f"wrote {result.output} ({len(result.results)} shard(s), {human_bytes(plan.write_bytes)}) "
                           f"in {secs:.1f}s, {human_bytes(rate)}/s read; check it with: graft verify {result.output}"])
    return exits.OK.code


def _local_use(job: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What ``graft run --executor local`` with these flags would use on this machine."""
    from graft.engine.run.sizing import local_parallelism, machine

    use = local_parallelism(job.plan.shards, machine(), args.workers, args.threads,
                             args.device or "cpu")
    return {"shards_at_once": use.shards, "threads_per_shard": use.threads, "chunks_in_flight_per_shard": use.window,
            "buffer_bytes": use.memory, "cores": use.machine.cores, "available_memory": use.machine.memory,
            "text": use.describe()}


def cmd_plan(args: argparse.Namespace) -> int:
    _check_device(args.device)
    job = prepare_job(load_spec(args.config, overrides(args), kind=args.kind))  # PlanError: main lists all
    notes: list[str] = []
    refused: GraftError | None = None
    try:
        previous = OutputSession.check(job, watch=False).previous
        if previous is not None:
            notes.append(unfinished_run_note(redact_uri(job.spec.output), previous))
    except GraftError as e:
        refused = e
    problems = [str(refused)] if refused else []
    summary = plan_summary(job)
    summary["local_run"] = _local_use(job, args)
    summary["problems"] = problems
    summary["notes"] = notes
    code = exits.exit_for(refused) if refused else exits.OK
    if refused:
        summary["error"] = error_object(refused, code, str(refused))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_plan(summary)
    for p in problems:
        error_line(p)
    return code.code


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(spec_schema(args.kind), indent=2))  # JSON in both modes: --json is accepted, changes nothing
    return exits.OK.code
