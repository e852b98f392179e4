"""What ``graft`` shows on stderr while it works: bytes done of the planned total, throughput, ETA,
and the log lines of the ``graft.*`` loggers (``configure_logging``: the command's handler)."""
from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import TextIO

__all__ = ["Progress", "human_bytes", "configure_logging"]

_progress_log = logging.getLogger("graft.progress")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a test or a host may swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


class _Iso8601Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = datetime.datetime.fromtimestamp(record.created).astimezone()
        return stamp.isoformat(timespec="milliseconds")


def configure_logging(tty: bool | None = None) -> None:
    """The ``graft`` command's handler for the ``graft.*`` loggers, on stderr: ``graft: message``
    on a terminal, each line led by an ISO-8601 timestamp otherwise (a log file, a scheduler's log
    collector). Idempotent; a library user configures ``logging`` as for any library instead."""
    root = logging.getLogger("graft")
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    tty = sys.stderr.isatty() if tty is None else tty
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("graft: %(message)s") if tty
                         else _Iso8601Formatter("%(asctime)s graft: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Bytes done / total, throughput and ETA: a bar redrawn on ``stream`` when it is a TTY, records of
    the ``graft.progress`` logger otherwise (timestamped by the command's handler)."""

    def __init__(self, total: int, stream: TextIO, tty: bool | None = None, interval: float | None = None,
                 shards: int = 0):
        self.total = max(total, 1)
        self.done = 0
        self.shards = shards
        self.events = {"done": 0, "retried": 0, "failed": 0}
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.t0 = time.monotonic()
        self._last = self.t0 if not self.tty else 0.0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        line = (f"{pct:5.1f}% {human_bytes(self.done)}/{human_bytes(self.total)} read, "
                f"{human_bytes(rate)}/s, ETA {eta_s}")
        if self.shards:
            extra = "".join(f", {n} {k}" for k, n in self.events.items() if k != "done" and n)
            line += f", shards {self.events['done']}/{self.shards} done{extra}"
        return line

    def shard(self, event: str) -> None:
        """Count a shard event (done, retried, failed); shown with the next line."""
        self.events[event] = self.events.get(event, 0) + 1

    def update(self, n: int) -> None:
        self.done += n
        self._render()

    def _render(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.line()}   ")
            self.stream.flush()
        else:
            _progress_log.info(self.line())

    def close(self) -> None:
        """Show the final state (every shard event counted), then end the bar's line."""
        self._render(final=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
