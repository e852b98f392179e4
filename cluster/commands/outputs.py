"""The commands on a committed output: ``verify``, ``report``, ``push``, ``clean``; and ``inspect``,
which lists any checkpoint (an input or an output).

Each takes a local path or a store URI and ``--storage-option``; none reads a job spec.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from graft.cluster import exits
from graft.cluster.cli_flags import at_least, common, location, storage_option, storage_options
from graft.cluster.cli_output import emit, failure
from graft.cluster.progress import human_bytes
from graft.engine.formats.checkpoint import open_checkpoint
from graft.engine.formats.manifest import verify_output
from graft.engine.redaction import redact_uri

__all__ = ["register"]


def _log(msg: str) -> None:
    logging.getLogger("graft.cli").info(msg)


def register(sub: Any) -> None:
    """Add this family's commands to ``graft``'s subparsers."""
    _add(sub, "verify", cmd_verify, "re-hash an output against SHA256SUMS and its manifest (exit 5 if anything "
         "differs)", ["output"])
    _add(sub, "report", cmd_report, "print a committed output's transfer report (norms, cosines, flags) and draw "
         "it per layer", ["output"], _report_flags)
    _add(sub, "inspect", cmd_inspect, "list a checkpoint's tensors, dtypes, shapes and shards", ["path"])
    _add(sub, "push", cmd_push, "publish a committed output to the Hugging Face Hub in one commit, with a model "
         "card naming its sources", ["output", "repo"], _push_flags)
    _add(sub, "clean", cmd_clean, "remove what an unfinished (failed or interrupted) run left in an output: its "
         "kept shards, temporaries and run mark", ["output"])


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], text: str, positional: list[str],
         flags: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """One command of this family: its positional arguments, its own flags, then the shared ones."""
    p = sub.add_parser(name, help=text)
    for arg in positional:
        p.add_argument(arg, help=_POSITIONAL_HELP.get((name, arg)))
    if flags:
        flags(p)
    storage_option(p, old_short=True)
    common(p)
    p.set_defaults(func=func)


_POSITIONAL_HELP = {("push", "output"): "a finished graft output (local path or object store URI)",
                    ("push", "repo"): "hf://org/name[@branch] (created if missing)"}


def _report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--png", metavar="FILE", default=None,
                   help="where to draw the per-layer picture ('' for none). Default: graft-report.png in the "
                        "current directory, but with --json no picture unless --png is given")
    p.add_argument("--limit", type=at_least(0), default=5, help="examples shown per kind of flag (default 5)")


def _push_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-hashing the output against its manifest before uploading")


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_output(location(args.output), storage_options(args.storage_option))
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
    from graft.engine.compute.report import summary

    report = load_report(location(args.output), storage_options(args.storage_option))
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
    from graft.engine.errors import CheckpointError, PlanError, QuantizationError
    from graft.engine.formats.adapter import is_adapter, read_adapter
    from graft.engine.plan.quant import layout_for

    try:
        if is_adapter(ckpt):  # a PEFT adapter: a diff, given as diff
            return read_adapter(ckpt, "adapter").describe() + "; give it as diff"
        return layout_for(ckpt, ckpt.read_json("config.json"), "checkpoint").describe()
    except (QuantizationError, CheckpointError, PlanError) as e:  # a plan refuses it the same way
        return f"not transferable by graft: {e}"


def cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = open_checkpoint(location(args.path), storage_options(args.storage_option))
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
    from graft.engine.run.clean import clean_output

    removed = clean_output(location(args.output), storage_options(args.storage_option), log=_log)
    output = redact_uri(args.output)
    emit(args.json, {"output": output, "removed": list(removed)},
         [f"removed {len(removed)} file(s) of an unfinished graft run from {output}"])
    return exits.OK.code


def cmd_push(args: argparse.Namespace) -> int:
    from graft.engine.run.publish import push_output  # the Hub client loads only when pushing

    url = push_output(location(args.output), args.repo, storage_options(args.storage_option),
                      private=True if args.private else None, message=args.message,
                      verify=not args.no_verify, log=_log)
    emit(args.json, {"output": args.output, "repo": args.repo, "url": url}, [f"pushed {args.output} to {url}"])
    return exits.OK.code
