"""Helpers for tests that act on a run while it is going: run it in a thread, wait for a shard in
progress, find and kill Ray workers."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable


def shards_in_progress(out: str) -> int:
    """How many output shards are being written now (their temporary files)."""
    return sum(n.startswith(".model") and ".graft-tmp-" in n for n in os.listdir(out)) if os.path.isdir(out) else 0


def shard_in_progress(out: str) -> bool:
    return shards_in_progress(out) > 0


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def worker_pids() -> list[int]:
    """PIDs of ShardWorker processes that are running a shard right now."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::ShardWorker.run" in line]


def kill_one_worker() -> int:
    wait_for(lambda: bool(worker_pids()), "a worker running a shard")
    pid = worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    return pid


class Background(threading.Thread):
    """Runs ``fn`` in a thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def outcome(self, timeout: float = 300) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "job did not finish"
        if self.error is not None:
            raise self.error
        return self.result
