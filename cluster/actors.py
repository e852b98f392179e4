"""The Ray actors of a run: ShardWorker runs shard tasks with the engine; ProgressBoard is where the
workers post their progress for the driver to read in one call.

Only small values cross the process boundary: the URIs and options a worker is built with, a frozen
``ShardTask`` in, a ``ShardResult`` out, and byte counts to the board. Tensor bytes go straight
between storage and the worker.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Mapping

import ray

from graft.engine.plan.planner import ShardTask
from graft.engine.storage import Storage

if TYPE_CHECKING:
    from graft.engine.run.execute import ShardResult

__all__ = ["MAX_SHARDS", "ProgressBoard", "ShardWorker", "hash_output_file"]


# Threads: up to MAX_SHARDS shards at once (the driver decides how many it sends). No thread is kept
# for answering the driver: it asks a worker only pid(), before sending it any shard.
MAX_SHARDS = 8
# A running shard posts its progress at most this often: the driver reads the board about as often,
# and on a large cluster every post is a call the board must serve.
REPORT_SECONDS = 0.5


@ray.remote(num_cpus=1, max_retries=2)
def hash_output_file(output: str, storage_options: Mapping[str, Mapping[str, Any]], name: str,
                     size: int) -> str:
    """sha256 of a shard a resumed run keeps (``--verify-kept``), read on whichever node has a free
    CPU: a 405B output's 750 GB are re-hashed by the cluster in parallel, not by the driver."""
    from graft.engine.formats.manifest import hash_file

    return hash_file(Storage(output, storage_options), name, size)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Input bytes done by each running shard, as its worker last posted them.

    Workers post without waiting for an answer and the driver reads everything in one call, so
    progress costs the driver no round trip per worker and a slow worker delays nothing. Each entry
    carries the attempt that posted it: the driver counts a shard's bytes only while that attempt is
    the one in flight, so the partial bytes of a worker that died are never added to its retry's.
    A finished attempt's entry is dropped (the driver counts a finished shard from its result).
    """

    def __init__(self) -> None:
        self._done: dict[str, tuple[int, int]] = {}  # file -> (attempt, bytes done)

    def post(self, file: str, attempt: int, done: int) -> None:
        # Posts may arrive out of order: keep the newest attempt and, within it, the largest count.
        if (attempt, done) > self._done.get(file, (0, 0)):
            self._done[file] = (attempt, done)

    def drop(self, file: str, attempt: int) -> None:
        if self._done.get(file, (0, 0))[0] == attempt:
            del self._done[file]

    def read(self) -> dict[str, tuple[int, int]]:
        return dict(self._done)


@ray.remote(max_concurrency=MAX_SHARDS)
class ShardWorker:
    """Runs shard tasks, several at once if the driver sends several, each on ``threads`` compute
    threads, posting each one's progress to the ``board`` it is sent with (if any) at most every
    ``REPORT_SECONDS``."""

    def __init__(self, inputs: Mapping[str, str], output: str,
                 storage_options: Mapping[str, Mapping[str, Any]], use_gpu: bool = False,
                 threads: int = 1):
        # Imported here, not at module level, so that the board's process (which imports this
        # module) does not load torch; and a worker that cannot load it fails to start, clearly.
        import torch

        from graft.engine.run.execute import execute_shard

        # torch's own threads off: each shard's compute threads share the CPUs Ray gave this actor
        # (torch's default, every core of the node for each operation, oversubscribes a node of
        # actors; bench/NOTES.md sections 9 and 15).
        torch.set_num_threads(1)
        self._threads = threads
        self._execute = execute_shard
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: "cuda" is ours.
        self._device = "cuda" if use_gpu else "cpu"
        self._inputs = {role: Storage(uri, storage_options) for role, uri in inputs.items()}
        self._output = Storage(output, storage_options)

    def run(self, task: ShardTask, attempt: int = 1, board: Any = None) -> ShardResult:
        if board is None:
            return self._execute(task, self._inputs, self._output, device=self._device, threads=self._threads)
        done, posted = 0, time.monotonic()

        def advance(n: int) -> None:  # called by execute_shard from this task's thread only
            nonlocal done, posted
            done += n
            if time.monotonic() - posted >= REPORT_SECONDS:
                posted = time.monotonic()
                board.post.remote(task.file, attempt, done)

        try:
            return self._execute(task, self._inputs, self._output, on_progress=advance, device=self._device,
                                 threads=self._threads)
        finally:
            board.drop.remote(task.file, attempt)

    def pid(self) -> int:
        return os.getpid()
