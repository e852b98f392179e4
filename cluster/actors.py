"""ShardWorker: a Ray actor that builds its storage once and runs shard tasks with the engine.

Only small values cross the process boundary: the URIs and options it is built with, a frozen
``ShardTask`` in, a ``ShardResult`` out. Tensor bytes go straight between storage and the worker.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ray

from graft.engine.execute import ShardResult, execute_shard
from graft.engine.planner import ShardTask
from graft.engine.storage import Storage

__all__ = ["ShardWorker"]


# max_concurrency=2: progress() must answer while run() is busy in the other thread.
@ray.remote(max_concurrency=2)
class ShardWorker:
    """Runs shard tasks; ``progress()`` reports the input bytes processed by the task in flight."""

    def __init__(self, inputs: Mapping[str, str], output: str,
                 storage_options: Mapping[str, Mapping[str, Any]], use_gpu: bool = False):
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: "cuda" is ours.
        self._device = "cuda" if use_gpu else "cpu"
        self._inputs = {role: Storage(uri, storage_options) for role, uri in inputs.items()}
        self._output = Storage(output, storage_options)
        self._task: str | None = None
        self._done = 0

    def _advance(self, n: int) -> None:
        self._done += n

    def run(self, task: ShardTask) -> ShardResult:
        self._task, self._done = task.file, 0
        return execute_shard(task, self._inputs, self._output, on_progress=self._advance,
                             device=self._device)

    def progress(self) -> tuple[str | None, int]:
        """(shard file, input bytes done): the file tells the driver which task the count is for."""
        return self._task, self._done

    def pid(self) -> int:
        return os.getpid()
