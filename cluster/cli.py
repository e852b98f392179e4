"""``graft``: run | diff | plan | verify | report | inspect | push | clean | schema.

Every failure graft anticipates is a ``GraftError``: it is printed as one line on stderr naming the
file or tensor and what to do, with the traceback only under ``--debug``, and exits with the code of
its class (``exits.py``; the table is in ``graft --help``). Every command takes ``--json``
(``cli_output.py`` says what it prints). Flags are checked before anything touches storage.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from graft.engine import __version__
from graft.engine.checkpoint import open_checkpoint
from graft.engine.errors import GraftError, Interrupted, Terminated
from graft.engine.job import prepare_job
from graft.engine.session import OutputSession
from graft.engine.manifest import verify_output
from graft.engine.redaction import redact_uri
from graft.engine.specfile import apply_overrides, load_spec, spec_schema

from graft.cluster import exits
from graft.cluster.cli_output import (UsageError, emit, error_line, error_object, failure, plan_summary,
                                      print_plan, reader_gone, silence_closed_streams, unfinished_run_note)
from graft.cluster.cli_flags import (Parser, at_least, common, device, flags_of, positive, run_options,
                                     storage_option)
from graft.cluster.progress import Progress, configure_logging, human_bytes

__all__ = ["main", "build_parser"]


def _log(msg: str) -> None:
    logging.getLogger("graft.cli").info(msg)


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--storage-option PROTO.KEY=VALUE`` as ``storage_options.PROTO.KEY=VALUE``."""
    return [*args.set, *(f"storage_options.{item}" for item in args.storage_option)]


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
    spec = load_spec(args.config, _overrides(args), kind=args.kind)
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
            from graft.engine.local import run_local  # torch loads only for a run

            result = run_local(job, workers=args.workers, on_progress=update, log=log, device=args.device or "cpu",
                               on_shard=on_shard, verify_kept=args.verify_kept, threads=args.threads)
        else:
            from .driver import RayOptions, run_ray  # Ray is imported only when used

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
    from graft.engine.sizing import local_parallelism, machine

    use = local_parallelism(job.plan.shards, machine(), args.workers, args.threads,
                             args.device or "cpu")
    return {"shards_at_once": use.shards, "threads_per_shard": use.threads, "chunks_in_flight_per_shard": use.window,
            "buffer_bytes": use.memory, "cores": use.machine.cores, "available_memory": use.machine.memory,
            "text": use.describe()}


def cmd_plan(args: argparse.Namespace) -> int:
    _check_device(args.device)
    job = prepare_job(load_spec(args.config, _overrides(args), kind=args.kind))  # PlanError: main lists all
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


def _storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option s3.endpoint_url=http://...`` -> ``{"s3": {"endpoint_url": ...}}`` (values
    parsed as YAML)."""
    return apply_overrides({}, [f"storage_options.{item}" for item in items]).get("storage_options", {})


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_output(_location(args.output), _storage_options(args.storage_option))
    result: dict[str, Any] = {"uri": report.uri, "ok": report.ok, "checked": list(report.checked),
                              "problems": list(report.problems)}
    if not report.ok:
        message = f"{report.uri}: verification failed: " + (report.problems or ["no output file to check"])[0]
        result["error"] = failure("VerifyFailed", exits.INTEGRITY, message, report.problems)
    emit(args.json, result, [*(f"{name}: OK" for name in report.checked),
                             *([f"verified {len(report.checked)} file(s) in {report.uri}"] if report.ok else [])])
    for p in report.problems:
        print(f"graft: FAILED: {p}", file=sys.stderr)
    return exits.OK.code if report.ok else exits.INTEGRITY.code


def cmd_report(args: argparse.Namespace) -> int:
    from graft.cluster.report_view import load_report, plot_report
    from graft.engine.report import summary

    report = load_report(_location(args.output), _storage_options(args.storage_option))
    # The picture: where --png says; in prose mode graft-report.png by default; with --json only when asked.
    png = args.png if args.png is not None else ("" if args.json else "graft-report.png")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(summary(report, limit=args.limit)))
    if png:
        plot_report(report, png, title=f"graft transfer report: {redact_uri(args.output)}")
        if args.json:
            _log(f"wrote {png}")
        else:
            print(f"wrote {png}")
    return exits.OK.code


def _stored_as(ckpt: Any) -> str:
    """How a checkpoint stores its weights, or why graft would refuse it (inspect never fails on it)."""
    from graft.engine.errors import CheckpointError, QuantizationError
    from graft.engine.quant import layout_for

    try:
        return layout_for(ckpt, ckpt.read_json("config.json"), "checkpoint").describe()
    except (QuantizationError, CheckpointError) as e:  # a malformed config.json: a plan refuses it
        return f"not transferable by graft: {e}"


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = open_checkpoint(_location(args.path), _storage_options(args.storage_option))
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    result = {
        "uri": ckpt.uri,
        "files": [{"name": f.name, "size": f.size} for f in ckpt.files],
        "bytes": ckpt.total_bytes,
        "dtypes": dict(sorted(dtypes.items())),
        "stored_as": _stored_as(ckpt),
        "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "file": t.file} for n, t in ckpt.tensors.items()},
        "side_files": list(ckpt.side_files),
    }
    width = max((len(n) for n in ckpt.tensors), default=4)
    emit(args.json, result, [
        f"{ckpt.uri}: {len(ckpt.files)} file(s), {len(ckpt.tensors)} tensors, {human_bytes(ckpt.total_bytes)}; "
        "dtypes: " + ", ".join(f"{d} x{n}" for d, n in result["dtypes"].items()),
        f"stored as {result['stored_as']}",
        *(f"  {name:{width}s}  {t.dtype:8s} {str(list(t.shape)):20s} {t.file}" for name, t in ckpt.tensors.items()),
        *(["other files: " + ", ".join(ckpt.side_files)] if ckpt.side_files else []),
    ])
    return exits.OK.code


def cmd_clean(args: argparse.Namespace) -> int:
    from graft.engine.clean import clean_output

    removed = clean_output(_location(args.output), _storage_options(args.storage_option), log=_log)
    output = redact_uri(args.output)
    emit(args.json, {"output": output, "removed": list(removed)},
         [f"removed {len(removed)} file(s) of an unfinished graft run from {output}"])
    return exits.OK.code


def cmd_push(args: argparse.Namespace) -> int:
    from graft.engine.publish import push_output  # the Hub client loads only when pushing

    url = push_output(_location(args.output), args.repo, _storage_options(args.storage_option),
                      private=True if args.private else None, message=args.message,
                      verify=not args.no_verify, log=_log)
    emit(args.json, {"output": args.output, "repo": args.repo, "url": url}, [f"pushed {args.output} to {url}"])
    return exits.OK.code


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(spec_schema(args.kind), indent=2))  # JSON in both modes: --json is accepted, changes nothing
    return exits.OK.code


def _location(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, its exit-code table in the top-level help's epilog."""
    p = Parser(prog="graft", description="Fine-tuning transfer for safetensors checkpoints: out = target + "
               "alpha * (finetuned - base).", epilog=exits.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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

    v = sub.add_parser("verify", help="re-hash an output against SHA256SUMS and its manifest (exit 5 if "
                                      "anything differs)")
    v.add_argument("output")
    storage_option(v, old_short=True)
    common(v)
    v.set_defaults(func=cmd_verify)

    rp = sub.add_parser("report", help="print a committed output's transfer report (norms, cosines, "
                                       "flags) and draw it per layer")
    rp.add_argument("output")
    rp.add_argument("--png", metavar="FILE", default=None,
                    help="where to draw the per-layer picture ('' for none). Default: graft-report.png in the "
                         "current directory, but with --json no picture unless --png is given")
    rp.add_argument("--limit", type=at_least(0), default=5, help="examples shown per kind of flag (default 5)")
    storage_option(rp, old_short=True)
    common(rp)
    rp.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and shards")
    i.add_argument("path")
    storage_option(i, old_short=True)
    common(i)
    i.set_defaults(func=cmd_inspect)

    pu = sub.add_parser("push", help="publish a committed output to the Hugging Face Hub in one commit, "
                                     "with a model card naming its sources")
    pu.add_argument("output", help="a finished graft output (local path or object store URI)")
    pu.add_argument("repo", help="hf://org/name[@branch] (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repository as private")
    pu.add_argument("--message", default=None, help="commit message")
    pu.add_argument("--no-verify", action="store_true",
                    help="skip re-hashing the output against its manifest before uploading")
    storage_option(pu, old_short=True)
    common(pu)
    pu.set_defaults(func=cmd_push)

    c = sub.add_parser("clean", help="remove what an unfinished (failed or interrupted) run left in an "
                                     "output: its kept shards, temporaries and run mark")
    c.add_argument("output")
    storage_option(c, old_short=True)
    common(c)
    c.set_defaults(func=cmd_clean)

    sc = sub.add_parser("schema", help="print the JSON Schema of the job spec, for editors: save it and start "
                                       "a job file with # yaml-language-server: $schema=graft.schema.json")
    sc.add_argument("--diff", dest="kind", action="store_const", const="diff", default="transfer",
                    help="the schema of a graft diff spec")
    common(sc)
    sc.set_defaults(func=cmd_schema)
    return p


def _with_notes(e: BaseException) -> str:
    """The error's message and its notes (e.g. the shards a failed run kept), on one line."""
    return "; ".join([str(e), *getattr(e, "__notes__", [])])


_sigterm_seen = threading.Event()


def _terminate(signum: int, frame: object) -> None:
    # Remembered apart from the exception: code it passes through (Ray's) may re-raise it as a plain
    # KeyboardInterrupt.
    _sigterm_seen.set()
    raise Terminated()


def _fail(error: BaseException, code: exits.Exit, lines: Sequence[str], as_json: bool) -> int:
    """Print a failure: its lines on stderr, and under ``--json`` its object on stdout."""
    for line in lines:
        print(line, file=sys.stderr, flush=True)
    if as_json:
        message = _with_notes(error) if str(error) else lines[0].removeprefix("graft: ")
        print(json.dumps({"error": error_object(error, code, message)}, indent=2))
    return code.code


def _stopped(e: KeyboardInterrupt) -> tuple[exits.Exit, str]:
    term = _sigterm_seen.is_set() or isinstance(e, Terminated) or getattr(e, "terminated", False)
    how = "terminated (SIGTERM)" if term else "interrupted"
    if isinstance(e, Interrupted) and e.committed:
        line = (f"graft: {how} after {e.output} was committed: the output is complete; check it with: "
                f"graft verify {e.output}")
    elif isinstance(e, Interrupted):
        line = (f"graft: {how}: {e.kept} of {e.total} shard(s) are committed and kept in {e.output}; "
                f"run the same command again to resume")
    else:
        line = f"graft: {how} before any output was committed; run the same command again"
    return (exits.TERMINATED if term else exits.INTERRUPTED), line


def _run(argv: list[str]) -> int:
    as_json = "--json" in flags_of(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(e, exits.USAGE, [f"graft: error: {e}"], as_json)
    except SystemExit:  # --help, --version: argparse drops a write error; the closed pipe is still seen
        sys.stdout.flush()
        if reader_gone():
            raise BrokenPipeError() from None
        raise
    configure_logging()
    handler: Callable[[argparse.Namespace], int] = args.func
    # SIGTERM (a scheduler stopping the job, `kill`) stops a run as cleanly as Ctrl-C does.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return handler(args)
    except UsageError as e:  # a flag the command checked itself, before touching anything
        return _fail(e, exits.USAGE, [f"graft: error: {e}"], args.json)
    except GraftError as e:
        if args.debug:
            traceback.print_exc()
        problems = getattr(e, "problems", None) or []
        lines = problems if len(problems) > 1 else [_with_notes(e)]
        return _fail(e, exits.exit_for(e), [f"graft: error: {line}" for line in lines], args.json)
    except KeyboardInterrupt as e:
        code, line = _stopped(e)
        return _fail(e, code, [line], args.json)
    except Exception as e:  # noqa: BLE001 - last resort: still one line, traceback on request
        if isinstance(e, BrokenPipeError) and reader_gone():
            raise
        if args.debug:
            traceback.print_exc()
        return _fail(e, exits.INTERNAL, [f"graft: internal error: {e.__class__.__name__}: {_with_notes(e)} (rerun "
                                         f"with --debug for the traceback and report it)"], args.json)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``graft``'s entry point: the exit code of the command (``graft --help`` lists them)."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        if not reader_gone():
            raise
        # Whoever read graft's output stopped reading (`graft plan job.yaml --json | head -1`): no
        # message (it would go to the same closed pipe, or clutter the terminal), the shell's SIGPIPE code.
        silence_closed_streams()
        return exits.BROKEN_PIPE.code


if __name__ == "__main__":
    sys.exit(main())
