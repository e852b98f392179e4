"""ShardWorker: a Ray actor that builds its storage once and runs shard tasks with the engine.

Only small values cross the process boundary: the URIs and options it is built with, a frozen
``ShardTask`` in, a ``ShardResult`` out. Tensor bytes go straight between storage and the worker.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping

import ray

from graft.engine.execute import ShardResult, execute_shard
from graft.engine.planner import ShardTask
from graft.engine.storage import Storage

__all__ = ["MAX_SHARDS", "ShardWorker"]


# Threads: up to MAX_SHARDS shards at once (the driver decides how many it sends), plus one so that
# progress() answers while they run.
MAX_SHARDS = 8


@ray.remote(max_concurrency=MAX_SHARDS + 1)
class ShardWorker:
    """Runs shard tasks, several at once if the driver sends several; ``progress()`` reports the
    input bytes each running task has processed."""

    def __init__(self, inputs: Mapping[str, str], output: str,
                 storage_options: Mapping[str, Mapping[str, Any]], use_gpu: bool = False):
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: "cuda" is ours.
        self._device = "cuda" if use_gpu else "cpu"
        self._inputs = {role: Storage(uri, storage_options) for role, uri in inputs.items()}
        self._output = Storage(output, storage_options)
        self._done: dict[str, int] = {}
        self._lock = threading.Lock()

    def run(self, task: ShardTask) -> ShardResult:
        def advance(n: int) -> None:
            with self._lock:
                self._done[task.file] += n

        with self._lock:
            self._done[task.file] = 0
        try:
            return execute_shard(task, self._inputs, self._output, on_progress=advance, device=self._device)
        finally:
            with self._lock:
                del self._done[task.file]

    def progress(self) -> dict[str, int]:
        """Input bytes done so far by each shard file running now."""
        with self._lock:
            return dict(self._done)

    def pid(self) -> int:
        return os.getpid()
