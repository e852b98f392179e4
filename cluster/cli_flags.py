"""The flags ``graft``'s commands share, and the argparse types that check each value before any
command runs: a bad value is a one-line usage error (exit 2) naming the flag and what it accepts.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, Sequence

from graft.cluster.cli_output import UsageError
from graft.engine.plan.specfile import apply_overrides

__all__ = ["Parser", "positive", "more_than", "at_least", "device", "storage_option_item",
           "common", "storage_option", "run_options", "flags_of", "overrides", "storage_options", "location",
           "MAX_SHARDS_PER_WORKER"]

# cluster.actors.MAX_SHARDS (threads an actor keeps for shards); importing it here would load Ray.
MAX_SHARDS_PER_WORKER = 8


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ``UsageError`` (one line, and a JSON object under
    ``--json``) instead of printing the usage block and exiting inside argparse."""

    def error(self, message: str) -> Any:  # argparse's hook; never returns
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return at_least(1)(text)


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number " + (f"from {low} to {high}" if high is not None else f"of at least {low}"))
        return n
    return parse


def more_than(low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or at least ``low`` when ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not (x >= low if inclusive else x > low) or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {'of at least' if inclusive else 'above'} {low:g}")
        return x
    return parse


def device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is checked later,
    by the command, before the spec is read)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N (N: the GPU's index)")
    return text


def storage_option_item(text: str) -> str:
    """An argparse type: ``PROTO.KEY=VALUE`` (``s3.endpoint_url=http://minio:9000``)."""
    if not re.fullmatch(r"[A-Za-z][\w+-]*\.[^=]+=.*", text, flags=re.S):
        raise argparse.ArgumentTypeError(f"{text!r} is not PROTO.KEY=VALUE, e.g. s3.endpoint_url=http://minio:9000")
    return text


class _DeprecatedShort(argparse.Action):
    """``-o``: the old spelling of ``--storage-option``, still accepted, with a warning."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"graft: warning: {option_string} is deprecated; use --storage-option {values}", file=sys.stderr)
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])


def common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (on failure: {\"error\": {kind, exit, exit_code, "
                         "message, problems}}); progress and log lines stay on stderr")
    sp.add_argument("--debug", action="store_true", help="show tracebacks")


def storage_option(sp: argparse.ArgumentParser, old_short: bool = False) -> None:
    """``--storage-option PROTO.KEY=VALUE``, the spec's ``storage_options`` key, on every command."""
    sp.add_argument("--storage-option", action="append", default=[], metavar="PROTO.KEY=VALUE",
                    type=storage_option_item,
                    help="a storage option, as the spec's storage_options.PROTO.KEY (on run, diff and plan "
                         "the same as --set storage_options.PROTO.KEY=VALUE), e.g. --storage-option "
                         "s3.endpoint_url=http://minio:9000; credentials come from the environment's "
                         "standard chain. Repeatable")
    if old_short:  # kept for scripts; hidden from help: -o reads as "output"
        sp.add_argument("-o", dest="storage_option", action=_DeprecatedShort, type=storage_option_item,
                        help=argparse.SUPPRESS)


def run_options(r: argparse.ArgumentParser) -> None:
    """The options of the commands that run a job (run, diff): executor, workers, device, ...
    Flags of one executor are refused with the other (``commands.jobs._check_run_flags``)."""
    r.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default): shard actors on a Ray cluster (starts a private Ray unless --address "
                        "or $RAY_ADDRESS; a few seconds); local: this process, no Ray")
    r.add_argument("--plan", action="store_true",
                   help="read headers only and show what the run would do (the same as graft plan; "
                        "graft diff CONFIG --plan is graft plan --diff CONFIG)")
    r.add_argument("--workers", type=positive, default=None,
                   help="how many shards are processed at once. ray: the number of shard actors (default: as "
                        "many as the cluster's CPUs fit), each running up to --shards-per-worker shards; local: "
                        "shards in flight in this process (default: one per core, at most one per shard, within "
                        "half the available memory; graft plan says what a run will use)")
    r.add_argument("--threads", type=positive, default=None,
                   help="local only: compute threads per shard, chunks computed at once (default: the cores "
                        "shared among the shards at once; 1 with --device cuda)")
    r.add_argument("--device", type=device, default=None,
                   help="local only: cpu (default), cuda or cuda:N for the arithmetic; on Ray use --gpus-per-worker")
    r.add_argument("--address", default=None,
                   help="ray only: the cluster to join (default: $RAY_ADDRESS, else start a private local Ray)")
    r.add_argument("--shards-per-worker", type=at_least(1, MAX_SHARDS_PER_WORKER), default=None,
                   help=f"ray only: shards each actor runs at once, one's reads overlapping another's compute "
                        f"(1..{MAX_SHARDS_PER_WORKER}, the threads an actor keeps; default 2)")
    r.add_argument("--cpus-per-worker", type=more_than(0), default=None,
                   help="ray only: Ray CPUs per shard actor, which its shards compute on (> 0; default: the "
                        "cluster's CPUs shared among the shards, at most a node's, at least 1; 1 with "
                        "--gpus-per-worker)")
    r.add_argument("--gpus-per-worker", type=more_than(0, inclusive=True), default=None,
                   help="ray only: Ray GPUs per shard actor (>= 0, default 0); > 0 runs the arithmetic on CUDA")
    r.add_argument("--start-timeout", type=more_than(0), default=None, metavar="SECONDS",
                   help="ray only: fail if no shard actor can be placed for this long (> 0, default 600)")
    r.add_argument("--verify-kept", action="store_true",
                   help="on resume, re-hash the shards kept from the previous run (in parallel on the "
                        "workers) instead of trusting their journaled size and store version")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (dotted keys nest; value parsed as YAML). Repeatable")
    storage_option(r)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.add_argument("-v", "--verbose", action="store_true", help="log each shard")
    common(r)


def flags_of(argv: Sequence[str]) -> set[str]:
    """The long flags on a command line (``--json=...`` counted as ``--json``), read before argparse
    runs, so that a usage error can still answer in JSON."""
    return {a.partition("=")[0] for a in argv if a.startswith("--")}


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--storage-option PROTO.KEY=VALUE`` as ``storage_options.PROTO.KEY=VALUE``."""
    return [*args.set, *(f"storage_options.{item}" for item in args.storage_option)]


def storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option s3.endpoint_url=http://...`` -> ``{"s3": {"endpoint_url": ...}}`` (values
    parsed as YAML)."""
    return apply_overrides({}, [f"storage_options.{item}" for item in items]).get("storage_options", {})


def location(path: str) -> str:
    """A command's path argument: a store URI as given, a local path made absolute."""
    return path if "://" in path else os.path.abspath(path)
