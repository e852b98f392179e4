"""``graft``: run | diff | plan | verify | report | inspect | push | clean.

Every failure graft anticipates is a ``GraftError``: it is printed as one line on stderr naming the
file or tensor and what to do, with the traceback only under ``--debug``.
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
from graft.engine.errors import GraftError, Interrupted, PlanError, Terminated
from graft.engine.job import prepare_job
from graft.engine.session import OutputSession
from graft.engine.manifest import verify_output
from graft.engine.redaction import redact_uri
from graft.engine.runmark import Observed
from graft.engine.specfile import apply_overrides, load_spec

from graft.cluster.progress import Progress, configure_logging, human_bytes

__all__ = ["main"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def _log(msg: str) -> None:
    logging.getLogger("graft.cli").info(msg)


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.set, kind=args.kind)
    job = prepare_job(spec)
    plan = job.plan
    for w in plan.warnings:
        _log(f"warning: {w}")
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

            result = run_local(job, workers=args.workers, on_progress=update, log=log, device=args.device,
                               on_shard=on_shard, verify_kept=args.verify_kept, threads=args.threads)
        else:
            from .driver import RayOptions, run_ray  # Ray is imported only when used

            opts = RayOptions(address=args.address, workers=args.workers, shards_per_worker=args.shards_per_worker,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                              start_timeout=args.start_timeout)
            result = run_ray(job, opts, on_progress=update, log=_log, on_shard=on_shard,
                             verify_kept=args.verify_kept)
    finally:
        if progress:
            progress.close()
    secs = time.monotonic() - t0
    rate = plan.read_bytes / secs if secs > 0 else 0.0
    print(f"wrote {result.output} ({len(result.results)} shard(s), {human_bytes(plan.write_bytes)}) in "
          f"{secs:.1f}s, {human_bytes(rate)}/s read; check it with: graft verify {result.output}")
    return EXIT_OK


def _plan_summary(job: Any) -> dict[str, Any]:
    plan = job.plan
    return {
        "inputs": {role: {"uri": c.uri, "files": len(c.files), "tensors": len(c.tensors),
                          "bytes": c.total_bytes} for role, c in job.checkpoints.items()},
        "output": redact_uri(job.spec.output),
        "tensors": plan.tensor_count,
        "combined": plan.combined,
        "copied": plan.copied,
        "left_out": list(plan.left_out),
        "shards": [{"file": s.file, "tensors": sum(1 for t in s.tensors if not t.continues), "bytes": s.size}
                   for s in plan.shards],
        "side_files": {s.name: s.donor for s in plan.side_files},
        "formats": dict(plan.formats),
        "vocab": dict(plan.vocab),
        "config_changes": {s.name: {k: (None if v is None else json.loads(v)) for k, v in s.patch}
                           for s in plan.side_files if s.patch},
        "read_bytes": plan.read_bytes,
        "write_bytes": plan.write_bytes,
        "warnings": list(plan.warnings),
    }


def _local_use(job: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What ``graft run --executor local`` with these flags would use on this machine."""
    from graft.engine.sizing import local_parallelism, machine

    use = local_parallelism(job.plan.shards, machine(), args.workers, args.threads, args.device)
    return {"shards_at_once": use.shards, "threads_per_shard": use.threads, "chunks_in_flight_per_shard": use.window,
            "buffer_bytes": use.memory, "cores": use.machine.cores, "available_memory": use.machine.memory,
            "text": use.describe()}


def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, args.set, kind="diff" if args.diff else "transfer")
    try:
        job = prepare_job(spec)
    except PlanError as e:
        for p in e.problems:
            print(f"graft: error: {p}", file=sys.stderr)
        return EXIT_FAIL
    problems, notes = [], []
    try:
        previous = OutputSession.check(job, watch=False).previous
        if previous is not None:
            notes.append(_unfinished_run_note(redact_uri(job.spec.output), previous))
    except GraftError as e:
        problems.append(str(e))
    summary = _plan_summary(job)
    summary["local_run"] = _local_use(job, args)
    summary["problems"] = problems
    summary["notes"] = notes
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        formats = summary["formats"]
        for role, i in summary["inputs"].items():
            print(f"{role:9s} {i['uri']}: {i['files']} file(s), {i['tensors']} tensors, "
                  f"{human_bytes(i['bytes'])}")
            if role in formats:
                print(f"          stored as {formats[role]}")
        print(f"output    {summary['output']}: {len(summary['shards'])} shard(s), "
              f"{summary['tensors']} tensors ({summary['combined']} combined, {summary['copied']} copied)")
        if "output" in formats:
            print(f"          stored as {formats['output']}")
        for name, rows in summary["vocab"].items():
            print(f"  {name}: {rows}")
        for name, change in summary["config_changes"].items():
            for key, value in change.items():
                leaf = key.rpartition(".")[2]  # a key of a text sub-config: text_config.vocab_size
                if leaf == "vocab_size":
                    print(f"  {name}: {key} set to {value} (the output's embedding rows)")
                elif leaf == "tie_word_embeddings":
                    print(f"  {name}: {key} set to {json.dumps(value)} (as the output's LM head is)")
                else:
                    print(f"  {name}: {key} " + ("removed" if value is None else "set to the target's"))
        for s in summary["shards"]:
            print(f"  {s['file']}: {s['tensors']} tensors, {human_bytes(s['bytes'])}")
        for name, donor in summary["side_files"].items():
            print(f"  {name} <- {donor}")
        print(f"reads {human_bytes(summary['read_bytes'])}, writes {human_bytes(summary['write_bytes'])}")
        print(f"--executor local would run {summary['local_run']['text']}")
        for w in summary["warnings"]:
            print(f"warning: {w}")
        for n in notes:
            print(f"note: {n}")
        for p in problems:
            print(f"graft: error: {p}", file=sys.stderr)
    return EXIT_FAIL if problems else EXIT_OK


def _unfinished_run_note(output: str, previous: Observed) -> str:
    """What ``graft run`` will do with an unfinished run's mark (``graft plan`` does not wait to
    find out whether that run is alive)."""
    from graft.engine.runmark import STALE_AFTER_SECONDS, describe, stale_at_once

    if stale_at_once(previous.mark):
        return f"{output} holds an unfinished graft run that stopped; graft run resumes it"
    return (f"{output} holds the mark of an unfinished graft run ({describe(previous.mark)}); graft run "
            f"watches it for up to {STALE_AFTER_SECONDS:.0f}s, then refuses the output if that run is "
            f"alive, or resumes it")


def _storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``-o s3.endpoint_url=http://...`` -> ``{"s3": {"endpoint_url": ...}}`` (values parsed as YAML)."""
    return apply_overrides({}, [f"storage_options.{item}" for item in items]).get("storage_options", {})


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_output(_location(args.output), _storage_options(args.storage_option))
    for name in report.checked:
        print(f"{name}: OK")
    for p in report.problems:
        print(f"graft: FAILED: {p}", file=sys.stderr)
    if report.ok:
        print(f"verified {len(report.checked)} file(s) in {report.uri}")
        return EXIT_OK
    return EXIT_FAIL


def cmd_report(args: argparse.Namespace) -> int:
    from graft.cluster.report_view import load_report, plot_report
    from graft.engine.report import summary

    report = load_report(_location(args.output), _storage_options(args.storage_option))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(summary(report, limit=args.limit)))
    if args.png:
        plot_report(report, args.png, title=f"graft transfer report: {redact_uri(args.output)}")
        if not args.json:
            print(f"wrote {args.png}")
    return EXIT_OK


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
    stored_as = _stored_as(ckpt)
    if args.json:
        print(json.dumps({
            "uri": ckpt.uri,
            "files": [{"name": f.name, "size": f.size} for f in ckpt.files],
            "stored_as": stored_as,
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "file": t.file}
                        for n, t in ckpt.tensors.items()},
            "side_files": list(ckpt.side_files),
        }, indent=2))
        return EXIT_OK
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
    print(f"{ckpt.uri}: {len(ckpt.files)} file(s), {len(ckpt.tensors)} tensors, "
          f"{human_bytes(ckpt.total_bytes)}; dtypes: "
          + ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items())))
    print(f"stored as {stored_as}")
    width = max((len(n) for n in ckpt.tensors), default=4)
    for name, t in ckpt.tensors.items():
        print(f"  {name:{width}s}  {t.dtype:8s} {str(list(t.shape)):20s} {t.file}")
    if ckpt.side_files:
        print("other files: " + ", ".join(ckpt.side_files))
    return EXIT_OK


def cmd_clean(args: argparse.Namespace) -> int:
    from graft.engine.clean import clean_output

    removed = clean_output(_location(args.output), _storage_options(args.storage_option), log=_log)
    print(f"removed {len(removed)} file(s) of an unfinished graft run from {redact_uri(args.output)}")
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    from graft.engine.publish import push_output  # the Hub client loads only when pushing

    url = push_output(_location(args.output), args.repo, _storage_options(args.storage_option),
                      private=True if args.private else None, message=args.message,
                      verify=not args.no_verify, log=_log)
    print(f"pushed {args.output} to {url}")
    return EXIT_OK


def _location(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--debug", action="store_true", help="show tracebacks")


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def storage_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-o", "--storage-option", action="append", default=[], metavar="PROTO.KEY=VALUE",
                    help="fsspec option, e.g. -o s3.endpoint_url=http://minio:9000 (credentials "
                         "come from the environment's standard chain)")


def run_options(r: argparse.ArgumentParser) -> None:
    """The options of the commands that run a job (run, diff): executor, workers, device, ..."""
    r.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default): shard actors on a Ray cluster; local: threads in this process")
    r.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start a private local Ray)")
    r.add_argument("--workers", type=positive, default=None,
                   help="ray: shard actors (default: as many as the cluster's CPUs fit); local: shards "
                        "processed at once (default: one per core, at most one per shard, within half "
                        "the available memory; graft plan says what a run will use)")
    r.add_argument("--threads", type=positive, default=None,
                   help="local: compute threads per shard, chunks computed at once (default: the cores "
                        "shared among the shards at once; 1 with --device cuda)")
    r.add_argument("--shards-per-worker", type=int, default=2,
                   help="ray: shards each actor runs at once (1..8, default 2)")
    r.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs per shard actor, which its shards compute on (default: the cluster's CPUs "
                        "shared among the shards, at most a node's, at least 1; 1 with --gpus-per-worker)")
    r.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="Ray GPUs per shard actor; > 0 runs the arithmetic on CUDA")
    r.add_argument("--verify-kept", action="store_true",
                   help="on resume, re-hash the shards kept from the previous run (in parallel on the "
                        "workers) instead of trusting their journaled size and store version")
    r.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="Ray: fail if no shard actor can be placed for this long (default 600)")
    r.add_argument("--device", default="cpu", help="local executor: cpu or cuda[:N] for the arithmetic")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (dotted keys nest; value parsed as YAML)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.add_argument("-v", "--verbose", action="store_true", help="log each shard")
    common(r)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Fine-tuning transfer for safetensors "
                                "checkpoints: out = target + alpha * (finetuned - base).")
    p.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a transfer job and commit its output")
    r.add_argument("config", help="YAML job spec")
    run_options(r)
    r.set_defaults(func=cmd_run, kind="transfer")

    d = sub.add_parser("diff", help="write finetuned - base as a diff checkpoint (float32 by default) that "
                                    "a transfer can read as diff: instead of finetuned and base")
    d.add_argument("config", help="YAML spec: finetuned, base, output, diff_dtype (float32 | bf16), ...")
    run_options(d)
    d.set_defaults(func=cmd_run, kind="diff")

    pl = sub.add_parser("plan", help="read headers only and show what a run would do")
    pl.add_argument("config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--diff", action="store_true", help="the config is a graft diff spec")
    pl.add_argument("--workers", type=positive, default=None, help="as graft run's, for what a local run would use")
    pl.add_argument("--threads", type=positive, default=None, help="as graft run's, for what a local run would use")
    pl.add_argument("--device", default="cpu", help="as graft run's, for what a local run would use")
    common(pl)
    pl.set_defaults(func=cmd_plan)


    v = sub.add_parser("verify", help="re-hash an output against SHA256SUMS and its manifest")
    v.add_argument("output")
    storage_option(v)
    common(v)
    v.set_defaults(func=cmd_verify)

    rp = sub.add_parser("report", help="print a committed output's transfer report (norms, cosines, "
                                       "flags) and draw it per layer")
    rp.add_argument("output")
    rp.add_argument("--png", metavar="FILE", default="graft-report.png",
                    help="where to draw the per-layer picture (default graft-report.png; '' for none)")
    rp.add_argument("--limit", type=int, default=5, help="examples shown per kind of flag (default 5)")
    rp.add_argument("--json", action="store_true", help="print the whole report as JSON")
    storage_option(rp)
    common(rp)
    rp.set_defaults(func=cmd_report)

    i = sub.add_parser("inspect", help="list a checkpoint's tensors, dtypes, shapes and shards")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    storage_option(i)
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
    storage_option(pu)
    common(pu)
    pu.set_defaults(func=cmd_push)

    c = sub.add_parser("clean", help="remove what an unfinished (failed or interrupted) run left in an "
                                     "output: its kept shards, temporaries and run mark")
    c.add_argument("output")
    storage_option(c)
    common(c)
    c.set_defaults(func=cmd_clean)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    handler: Callable[[argparse.Namespace], int] = args.func
    # SIGTERM (a scheduler stopping the job, `kill`) stops a run as cleanly as Ctrl-C does.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return handler(args)
    except GraftError as e:
        if args.debug:
            traceback.print_exc()
        print(f"graft: error: {_with_notes(e)}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt as e:
        term = _sigterm_seen.is_set() or isinstance(e, Terminated) or getattr(e, "terminated", False)
        how = "terminated (SIGTERM)" if term else "interrupted"
        if isinstance(e, Interrupted) and e.committed:
            print(f"graft: {how} after {e.output} was committed: the output is complete; check it with: "
                  f"graft verify {e.output}", file=sys.stderr)
        elif isinstance(e, Interrupted):
            print(f"graft: {how}: {e.kept} of {e.total} shard(s) are committed and kept in {e.output}; "
                  f"run the same command again to resume", file=sys.stderr)
        else:
            print(f"graft: {how} before any output was committed; run the same command again",
                  file=sys.stderr)
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - last resort: still one line, traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"graft: internal error: {e.__class__.__name__}: {_with_notes(e)} (rerun with --debug for "
              f"the traceback and report it)", file=sys.stderr)
        return EXIT_FAIL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
