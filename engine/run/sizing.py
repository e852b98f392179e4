"""How much of the machine a run uses: shards at once, compute threads per shard, buffer memory.

``machine()`` reads what this process may use (CPU affinity and a container's CPU quota; available
memory and a container's memory limit); ``local_parallelism`` sizes a local run from it:

- shards at once: one per core, at most one per pending shard (each shard also writes and hashes
  on threads of its own, so a shard per core keeps every core busy without making one shard the
  bottleneck);
- compute threads per shard: the cores shared among those shards (one shard alone uses them all);
- memory: the shards' buffers (``execute.shard_memory``) within half of the available memory;
  fewer shards at once where they would not fit.

An explicit ``workers`` (shards at once) or ``threads`` is kept as given. On a GPU each shard has
one compute thread (it only queues work on the device); the shards at once all feed that GPU.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

from ..plan.chunks import buffer_sizes, iter_chunks
from ..plan.tasks import COMPUTE_SIZES, CPU_BLOCK, OutScales, ShardTask, Source

__all__ = ["Machine", "Parallelism", "machine", "local_parallelism", "window_for", "shard_memory"]

# The share of available memory a run's buffers may take by default.
MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Machine:
    cores: int
    memory: int  # bytes this process may still allocate


@dataclass(frozen=True)
class Parallelism:
    """What a local run will use: ``shards`` at once, each with ``threads`` compute threads and a
    window of ``window`` chunks, ``memory`` bytes of buffers at most in all."""

    shards: int
    threads: int
    window: int
    memory: int
    machine: Machine

    def describe(self) -> str:
        return (f"{self.shards} shard(s) at once x {self.threads} compute thread(s) on {self.machine.cores} "
                f"core(s); buffers at most {self.memory / 2**20:.0f} MiB ({self.window} chunks in flight "
                f"per shard; {self.machine.memory / 2**30:.1f} GiB available)")


def window_for(threads: int) -> int:
    """Chunks in flight in one shard: one per compute thread, one read ahead, one being written
    (three at least: reading, computing and writing overlap even on one thread)."""
    return max(3, threads + 2)


def shard_memory(task: ShardTask, threads: int) -> int:
    """Bytes of buffers ``execute.execute_shard(task, ..., threads=threads)`` holds at most on a
    CPU: the window's slots and each compute thread's buffers (torch's allocations; the
    interpreter's and libraries' own memory come on top)."""
    chunks = list(iter_chunks(task))
    capacity, out_cap, plain, codec = buffer_sizes(chunks, [c.reads() for c in chunks])
    size = COMPUTE_SIZES[task.settings.compute_dtype]
    slots = min(window_for(threads), max(1, len(chunks))) * (sum(capacity.values()) + out_cap)
    # ChunkKernel: up to five blocks in the compute dtype, and a chunk per LoRA term of a tensor;
    # Transcoder: four chunks and an int32 index.
    lora = [[x.lora for x in t.terms if x.lora is not None] for t in task.tensors]
    per_thread = ((5 * size * min(plain, CPU_BLOCK) + max(map(len, lora), default=0) * size * plain if plain else 0)
                  + (4 * size + 4) * codec)
    # The shard's LoRA factors, held in the compute dtype while it runs (``execute.load_factors``).
    factors = size * sum(math.prod(f.a_shape) + math.prod(f.b_shape) for fs in lora for f in fs)
    return slots + min(threads, max(1, len(chunks))) * per_thread + factors


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _quota_cores() -> float | None:
    """A container's CPU limit (cgroup v2 ``cpu.max``, or v1's CFS quota), or None."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def _limit_memory() -> int | None:
    """What a container's memory limit leaves (cgroup v2, or v1), or None without a limit."""
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, now = _read(limit), _read(used)
        if cap and cap.isdigit() and now and now.isdigit() and int(cap) < 2**60:
            return max(0, int(cap) - int(now))
    return None


def _available_memory() -> int:
    meminfo = _read("/proc/meminfo") or ""
    avail = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")),
                 None)
    if avail is None:  # not Linux: what the machine has
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 8 * 2**30
    limit = _limit_memory()
    return avail if limit is None else min(avail, limit)


def machine() -> Machine:
    """The cores and memory this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _quota_cores()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return Machine(max(1, cores), _available_memory())


def local_parallelism(tasks: Sequence[ShardTask], host: Machine, workers: int | None = None,
                      threads: int | None = None, device: str = "cpu") -> Parallelism:
    """Shards at once and compute threads per shard for running ``tasks`` on ``host``."""
    cores, on_gpu = host.cores, device != "cpu"
    shards = workers if workers is not None else max(1, min(len(tasks), cores))

    def threads_for(n: int) -> int:
        return 1 if on_gpu else threads if threads is not None else max(1, cores // n)

    # Buffers depend on the kinds of tensors a shard holds, not on how many: one shard of each
    # set of kinds is sized (a 671B plan's 163 shards hold a handful of sets).
    reps = list({_kinds(t): t for t in tasks}.values())

    @functools.cache
    def memory(n: int, per: int) -> int:
        return n * max((shard_memory(t, per) for t in reps), default=0)

    budget = int(host.memory * MEMORY_SHARE)
    if workers is None:
        while shards > 1 and memory(shards, threads_for(shards)) > budget:
            shards -= 1
    per = threads_for(shards)
    if threads is None and not on_gpu:
        while per > 1 and memory(shards, per) > budget:
            per -= 1
    return Parallelism(shards, per, window_for(per), memory(shards, per), host)


def _kinds(task: ShardTask) -> tuple:
    """What a shard's buffers depend on: its settings and the set of its tensors' kinds (shape,
    dtypes, scales' layouts, rows a checkpoint lacks)."""
    def scales(s: OutScales | None) -> tuple | None:
        return (s.block, s.dtype) if s else None

    def source(s: Source) -> tuple:
        return s.dtype, s.zero, s.end - s.begin, scales(s.scales)

    return task.settings, frozenset((t.shape, t.dtype, t.combine, t.transcodes, scales(t.scales),
                                     tuple(source(s) for s in t.sources)) for t in task.tensors)
