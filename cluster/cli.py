"""``graft``: run | diff | plan | schema | verify | report | inspect | push | clean.

The entry point: the top-level parser (each family of commands adds its own, ``commands/``), and
how a command's end becomes an exit code. Every failure graft anticipates is a ``GraftError``: it is
printed as one line on stderr naming the file or tensor and what to do, with the traceback only
under ``--debug``, and exits with the code of its class (``exits.py``; the table is in ``graft
--help``). Every command takes ``--json`` (``cli_output.py`` says what it prints). Flags are checked
before anything touches storage.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from typing import Callable, Sequence

from graft.cluster import exits
from graft.cluster.cli_flags import Parser, flags_of
from graft.cluster.cli_output import UsageError, error_object, reader_gone, silence_closed_streams
from graft.cluster.commands import FAMILIES
from graft.cluster.progress import configure_logging
from graft.engine import __version__
from graft.engine.errors import GraftError, Interrupted, Terminated

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, its exit-code table in the top-level help's epilog."""
    p = Parser(prog="graft", description="Fine-tuning transfer for safetensors checkpoints: out = target + "
               "alpha * (finetuned - base).", epilog=exits.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"graft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
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
