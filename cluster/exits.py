"""The exit codes of ``graft``: one table, used by ``main()`` and printed in ``graft --help``.

A scheduler (Ray Jobs, a Kubernetes Job's ``podFailurePolicy``, Airflow) reads the code to decide:
fix the job (2, 3), retry it (4), look at the data (5, 6), or report a bug (70).

Why these numbers: 2 is what argparse already exits with on a bad flag, so usage and spec errors
share it. 3 to 6 are small and free: shells keep 126 (found, not executable), 127 (not found) and
128+n (killed by signal n) for themselves, and 1 is what any Python crash or ``sys.exit("...")``
gives, so graft never uses 1 for a class it knows. 70 is ``EX_SOFTWARE`` of ``sysexits.h``
("internal software error"), under 126. The signal codes are the shell's own on purpose: 130
(SIGINT, Ctrl-C) and 143 (SIGTERM) say the run was stopped, 141 (SIGPIPE) that the reader of graft's
output went away (``graft plan job.yaml --json | head -1``), as for any Unix tool killed by SIGPIPE:
exit 0 would claim the output was all delivered, and ``set -o pipefail`` then treats graft as ``cat``.
"""
from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

from graft.engine.errors import (CheckpointError, GraftError, HeaderError, IntegrityError, NonFiniteError,
                                 NotFoundError, OutputError, PlanError, SpecError, StorageError)

__all__ = ["Exit", "EXITS", "OK", "USAGE", "REFUSED", "RETRYABLE", "INTEGRITY", "NONFINITE", "INTERNAL",
           "FAILED", "INTERRUPTED", "BROKEN_PIPE", "TERMINATED", "exit_for", "epilog"]


@dataclass(frozen=True)
class Exit:
    """One exit code: its number, a short name (the ``exit`` field of ``--json`` errors), and when."""

    code: int
    name: str
    meaning: str


OK = Exit(0, "ok", "done; the output (if any) is committed and complete")
USAGE = Exit(2, "usage", "bad flag or job spec (SpecError): fix the command line or the YAML")
REFUSED = Exit(3, "refused", "the inputs cannot be combined as asked or cannot be used: a refused plan "
                             "(PlanError, QuantizationError), an unreadable checkpoint or header "
                             "(CheckpointError, HeaderError), an unusable output (OutputError), a file "
                             "that is not there (NotFoundError); retrying will not help")
RETRYABLE = Exit(4, "retryable", "a store or the cluster failed after graft's own retries (StorageError, "
                                 "no Ray worker could start); the same command may succeed later and "
                                 "resumes what was kept")
INTEGRITY = Exit(5, "integrity", "bytes do not match what was recorded: graft verify failed, an input "
                                 "changed during the run (IntegrityError)")
NONFINITE = Exit(6, "nonfinite", "an output tensor holds NaN or Inf and the spec does not allow it "
                                 "(allow_nonfinite: true lets it through)")
FAILED = Exit(1, "failed", "any other failure graft reports as one line")
INTERNAL = Exit(70, "internal", "an unexpected exception, a bug in graft: rerun with --debug and report it")
INTERRUPTED = Exit(130, "interrupted", "stopped by Ctrl-C (SIGINT); the same command resumes")
BROKEN_PIPE = Exit(141, "broken_pipe", "the reader of stdout went away (SIGPIPE); nothing more is printed")
TERMINATED = Exit(143, "terminated", "stopped by SIGTERM; the same command resumes")

EXITS: tuple[Exit, ...] = (OK, FAILED, USAGE, REFUSED, RETRYABLE, INTEGRITY, NONFINITE, INTERNAL, INTERRUPTED,
                           BROKEN_PIPE, TERMINATED)

# The most specific class first: NotFoundError is a StorageError, QuantizationError a PlanError.
_BY_ERROR: tuple[tuple[type[GraftError], Exit], ...] = (
    (SpecError, USAGE),
    (NotFoundError, REFUSED),
    (PlanError, REFUSED),
    (CheckpointError, REFUSED),
    (HeaderError, REFUSED),
    (OutputError, REFUSED),
    (StorageError, RETRYABLE),
    (IntegrityError, INTEGRITY),
    (NonFiniteError, NONFINITE),
)


def exit_for(error: BaseException) -> Exit:
    """The exit of a failure: by its class for a ``GraftError`` (a Ray worker that could not start,
    ``WorkerStartError``, is retryable), ``INTERNAL`` for anything else."""
    for cls, code in _BY_ERROR:
        if isinstance(error, cls):
            return code
    driver = sys.modules.get("graft.cluster.driver")  # not imported here: it loads Ray
    if driver is not None and isinstance(error, driver.WorkerStartError):
        return RETRYABLE
    return FAILED if isinstance(error, GraftError) else INTERNAL


def epilog() -> str:
    """The table as ``graft --help`` prints it (with ``RawDescriptionHelpFormatter``)."""
    lines = ["exit codes:"]
    for e in EXITS:
        lines += textwrap.wrap(e.meaning, 96, initial_indent=f"  {e.code:>3}  {e.name:<11}  ",
                               subsequent_indent=" " * 20)
    return "\n".join(lines)
