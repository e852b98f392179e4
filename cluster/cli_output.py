"""What ``graft`` prints: one JSON object or prose on stdout, one error line on stderr, and how it
stays quiet when its reader goes away.

The ``--json`` contract, for every command: stdout holds exactly one JSON object and nothing else
(progress and log lines go to stderr). On success it has the fields the prose shows. On failure it
holds ``"error": {"kind", "exit", "exit_code", "message", "problems"}``: ``kind`` the error's class
(``PlanError``, ``UsageError``, ...), ``exit`` and ``exit_code`` the row of the exit-code table
(``cluster/exits.py``), ``problems`` every problem found (one entry, the message, when the error knows
only one). Commands that got as far as a result (``plan``, ``verify``) keep its fields beside
``error``. The one error line on stderr is printed in both modes.

``graft plan``'s result is built here too (``plan_summary``), and its prose drawn from that same dict.
"""
from __future__ import annotations

import json
import os
import select
import sys
from typing import Any, Iterable, Mapping, Sequence

from graft.engine.redaction import redact_uri
from graft.engine.run.runmark import Observed

from graft.cluster.exits import Exit
from graft.cluster.progress import human_bytes

__all__ = ["UsageError", "emit", "error_line", "error_object", "failure", "reader_gone", "silence_closed_streams",
           "plan_summary", "print_plan", "unfinished_run_note"]


class UsageError(Exception):
    """A bad command line (argparse's errors and graft's own flag checks): exit 2, one line."""


def emit(as_json: bool, result: Mapping[str, Any], prose: Iterable[str]) -> None:
    """``result`` as one JSON object on stdout, or the ``prose`` lines."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for line in prose:
            print(line)


def failure(kind: str, code: Exit, message: str, problems: Sequence[str] = ()) -> dict[str, Any]:
    """The ``error`` member of a failed command's JSON object."""
    return {"kind": kind, "exit": code.name, "exit_code": code.code, "message": message,
            "problems": list(problems) or [message]}


def error_object(error: BaseException, code: Exit, message: str) -> dict[str, Any]:
    """``failure`` for an exception: its class, and its ``problems`` when it lists them (``PlanError``,
    ``SpecError``)."""
    return failure(error.__class__.__name__, code, message, getattr(error, "problems", None) or ())


def error_line(message: str) -> None:
    print(f"graft: error: {message}", file=sys.stderr, flush=True)


def reader_gone() -> bool:
    """Whether stdout or stderr is a pipe whose reading end was closed (``| head -1``): poll reports
    an error on such a pipe. A ``BrokenPipeError`` from a store's socket is not one of these."""
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # pytest's capture, a closed stream
            continue
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poll.poll(0)):
            return True
    return False


def silence_closed_streams() -> None:
    """Point stdout and stderr at /dev/null so that nothing more is written to the closed pipe,
    not even by the interpreter's last flush at exit ("Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    os.close(devnull)


def plan_summary(job: Any) -> dict[str, Any]:
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
        "lora": plan.lora(),
        "config_changes": {s.name: {k: (None if v is None else json.loads(v)) for k, v in s.patch}
                           for s in plan.side_files if s.patch},
        "read_bytes": plan.read_bytes,
        "write_bytes": plan.write_bytes,
        "warnings": list(plan.warnings),
    }


def print_plan(summary: dict[str, Any]) -> None:
    """``graft plan``'s prose: the same fields as its ``--json``."""
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
    for role, changed in summary["lora"].items():
        ranks = sorted({c["rank"] for c in changed.values() if "rank" in c})
        biases = sum(1 for c in changed.values() if c.get("bias"))
        shown = ", ".join(list(changed)[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        what = [f"rank {'/'.join(map(str, ranks))}"] if ranks else []
        what += [f"{biases} by a LoRA bias"] if biases else []
        print(f"  {role}: LoRA changes {len(changed)} tensor(s), {', '.join(what)}: {shown}")
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
    for n in summary["notes"]:
        print(f"note: {n}")


def unfinished_run_note(output: str, previous: Observed) -> str:
    """What ``graft run`` will do with an unfinished run's mark (``graft plan`` does not wait to
    find out whether that run is alive)."""
    from graft.engine.run.runmark import STALE_AFTER_SECONDS, describe, stale_at_once

    if stale_at_once(previous.mark):
        return f"{output} holds an unfinished graft run that stopped; graft run resumes it"
    return (f"{output} holds the mark of an unfinished graft run ({describe(previous.mark)}); graft run "
            f"watches it for up to {STALE_AFTER_SECONDS:.0f}s, then refuses the output if that run is "
            f"alive, or resumes it")
