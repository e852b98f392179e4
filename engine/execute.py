"""Run one shard task: stream input ranges in chunks -> kernel -> write + sha256 -> commit.

``execute_shard(task, inputs, output)`` is what every executor (threads, Ray actors) calls. The
chunks of a shard flow through a three-stage pipeline:

    read chunk i+1 (reader threads) | compute chunk i (CPU, or queued on a GPU) | write + hash
    chunks i-1, i-2 (the write thread)

Memory is bounded by the chunk size whatever the tensor, shard or model size: three slots of input
buffers (being read, being computed, held until its output is written), two output buffers, and
the kernel's cache-sized compute blocks (plus, on a GPU, device copies of those). Each input byte is read exactly once. The
shard becomes visible only when every byte is written and accounted for; on any error it is
discarded.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from .errors import GraftError, IntegrityError
from .kernel import TORCH_DTYPES, ChunkKernel, check_finite
from .planner import ShardTask, Source, TensorTask
from .safetensors import DTYPE_SIZES, FLOATING_DTYPES, ShardWriter
from .storage import RangeReader, Storage

__all__ = ["ShardResult", "Chunk", "Cancelled", "iter_chunks", "execute_shard"]

_ROLES = ("target", "finetuned", "base")
_SLOTS = 3


class Cancelled(GraftError):
    """The shard was stopped because the run is being abandoned (another shard failed, Ctrl-C)."""


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard reports back: small plain values only."""

    file: str
    size: int
    sha256: str
    bytes_read: int
    seconds: float


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, start + count)`` of one output tensor."""

    tensor: TensorTask
    start: int
    count: int

    def sources(self) -> list[Source]:
        t = self.tensor
        return [s for s in (t.target, t.finetuned, t.base) if s is not None]

    @property
    def out_bytes(self) -> int:
        return self.count * DTYPE_SIZES[self.tensor.dtype]


def iter_chunks(task: ShardTask) -> Iterator[Chunk]:
    """The chunks of a shard in write order; a tensor larger than a chunk is split."""
    compute_size = 8 if task.settings.compute_dtype == "float64" else 4
    for t in task.tensors:
        per_elem = compute_size if t.combine else DTYPE_SIZES[t.dtype]
        step = max(1, task.settings.chunk_size // per_elem)
        for start in range(0, t.numel, step):
            yield Chunk(t, start, min(step, t.numel - start))


class _Slot:
    """Input buffers for one chunk in flight (one per role), sized for the largest chunk."""

    def __init__(self, capacity: dict[str, int], pinned: bool):
        self.bufs = {role: torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
                     for role, n in capacity.items()}
        self.pending: list[Future[None]] = []

    def view(self, src: Source, count: int) -> torch.Tensor:
        """The bytes of ``count`` elements of ``src`` (uint8)."""
        return self.bufs[src.role][:count * DTYPE_SIZES[src.dtype]]

    def typed(self, src: Source, count: int) -> torch.Tensor:
        return self.view(src, count).view(TORCH_DTYPES[src.dtype])

    def wait(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending.clear()


class _CpuCompute:
    """Computes a chunk on the calling thread; ``finish`` has nothing left to wait for."""

    def __init__(self, compute_dtype: str, max_elems: int, out_cap: int):
        self.kernel = ChunkKernel(compute_dtype, max_elems) if max_elems else None
        self.out = [torch.empty(out_cap, dtype=torch.uint8) for _ in range(2)]

    def submit(self, i: int, chunk: Chunk, slot: _Slot) -> torch.Tensor:
        t = chunk.tensor
        assert self.kernel is not None and t.finetuned is not None and t.base is not None
        out = self.out[i % 2][:chunk.out_bytes]
        self.kernel.combine(slot.typed(t.target, chunk.count), slot.typed(t.finetuned, chunk.count),
                            slot.typed(t.base, chunk.count), t.alpha, out.view(TORCH_DTYPES[t.dtype]))
        return out

    def finish(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class _CudaCompute:
    """Queues each chunk on a GPU: upload (copy stream) -> kernel -> download (compute stream).

    The upload of chunk i+1 overlaps the kernel of chunk i, and both overlap the host writing and
    hashing chunk i-1. Host input buffers are pinned so the copies are truly asynchronous.
    """

    def __init__(self, device: str, compute_dtype: str, max_elems: int, out_cap: int,
                 capacity: dict[str, int]):
        self.device = torch.device(device)
        self.kernel = ChunkKernel(compute_dtype, max_elems, self.device) if max_elems else None
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.staging = [{r: torch.empty(n, dtype=torch.uint8, device=self.device) for r, n in capacity.items()}
                        for _ in range(2)]
        self.out_dev = [torch.empty(out_cap, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.out_host = [torch.empty(out_cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.released: list[torch.cuda.Event | None] = [None, None]

    def submit(self, i: int, chunk: Chunk, slot: _Slot) -> tuple[torch.cuda.Event, torch.Tensor]:
        t = chunk.tensor
        assert self.kernel is not None and t.finetuned is not None and t.base is not None
        k = i % 2
        staged = {}
        with torch.cuda.stream(self.copy_stream):
            if self.released[k] is not None:  # chunk i-2's kernel must be done with staging[k]
                self.copy_stream.wait_event(self.released[k])
            for src in chunk.sources():
                dev = self.staging[k][src.role][:chunk.count * DTYPE_SIZES[src.dtype]]
                dev.copy_(slot.view(src, chunk.count), non_blocking=True)
                staged[src.role] = dev.view(TORCH_DTYPES[src.dtype])
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(uploaded)
            out_dev = self.out_dev[k][:chunk.out_bytes]
            self.kernel.combine(staged["target"], staged["finetuned"], staged["base"], t.alpha,
                                out_dev.view(TORCH_DTYPES[t.dtype]))
            out_host = self.out_host[k][:chunk.out_bytes]
            out_host.copy_(out_dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        self.released[k] = done
        return done, out_host

    def finish(self, handle: tuple[torch.cuda.Event, torch.Tensor]) -> torch.Tensor:
        done, out_host = handle
        done.synchronize()
        return out_host


def _check_inputs_unchanged(task: ShardTask, inputs: Mapping[str, Storage]) -> None:
    """Refuse to commit a shard if an input file it read is no longer the version planned.

    Checked after the last read, so any change before or during this shard's reads is caught and
    bytes of two versions are never committed together. Files on a store that ``pins_reads`` need
    no check: each of their reads was refused unless it was of the planned version.
    """
    planned = {(s.role, s.file): s.version for t in task.tensors for s in (t.target, t.finetuned, t.base)
               if s is not None and s.version is not None and not inputs[s.role].pins_reads}
    keys = sorted(planned)
    if len(keys) > 1:  # one round trip each on an object store: overlap them
        with ThreadPoolExecutor(max_workers=min(len(keys), 8), thread_name_prefix="graft-stat") as pool:
            versions = list(pool.map(lambda k: inputs[k[0]].stat(k[1]).version, keys))
    else:
        versions = [inputs[role].stat(file).version for role, file in keys]
    for (role, file), now in zip(keys, versions):
        version = planned[(role, file)]
        if now != version:
            raise IntegrityError(f"{inputs[role].url(file)}: changed during the run (version {version} "
                                 f"when planned, {now} now); nothing read from it was committed, run "
                                 f"the job again to use the new version")


def _capacity(chunks: list[Chunk]) -> dict[str, int]:
    cap = dict.fromkeys(_ROLES, 0)
    for c in chunks:
        for s in c.sources():
            cap[s.role] = max(cap[s.role], c.count * DTYPE_SIZES[s.dtype])
    return cap


def execute_shard(
    task: ShardTask,
    inputs: Mapping[str, Storage],
    output: Storage,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    device: str = "cpu",
) -> ShardResult:
    """Compute and commit output shard ``task.file`` from the ``inputs`` (keyed by role).

    ``device`` is ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``); float64 results are
    bit-identical on both. Raises ``IntegrityError`` (input shorter than planned),
    ``NonFiniteError``, ``StorageError``, or ``Cancelled`` once ``cancel`` is set (checked between
    chunks); in every error case nothing is left at the shard's final name.
    """
    t0 = time.monotonic()
    settings = task.settings
    chunks = list(iter_chunks(task))
    capacity = _capacity(chunks)
    on_gpu = device != "cpu"
    slots = [_Slot(capacity, pinned=on_gpu) for _ in range(_SLOTS)]
    combined = [c for c in chunks if c.tensor.combine]
    max_elems = max((c.count for c in combined), default=0)
    out_cap = max((c.out_bytes for c in combined), default=0)
    compute: _CpuCompute | _CudaCompute = (
        _CudaCompute(device, settings.compute_dtype, max_elems, out_cap, capacity) if on_gpu
        else _CpuCompute(settings.compute_dtype, max_elems, out_cap))
    readers: dict[tuple[str, str], RangeReader] = {}
    # One thread per role keeps the three input streams moving while this thread computes/writes.
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix=f"graft-read-{task.index}")

    def reader(src: Source) -> RangeReader:
        key = (src.role, src.file)
        if key not in readers:
            readers[key] = inputs[src.role].reader(src.file, task.settings.read_concurrency, src.version)
        return readers[key]

    def read_ahead(i: int) -> None:
        if i < len(chunks):
            chunk, slot = chunks[i], slots[i % _SLOTS]
            for src in chunk.sources():
                dest = memoryview(slot.view(src, chunk.count).numpy())
                slot.pending.append(pool.submit(reader(src).read_into,
                                                src.begin + chunk.start * DTYPE_SIZES[src.dtype], dest))

    # One thread writes and hashes while this one computes: sha256 and the page-cache copy cost
    # as much CPU as the arithmetic, and writes can block on the disk.
    write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"graft-write-{task.index}")
    written: list[Future[None]] = []
    writer = output.writer(task.file)
    try:
        shard = ShardWriter(writer, task.header_tensors(), dict(task.metadata))

        def write_chunk(chunk: Chunk, handle: object) -> None:  # on the write thread, in order
            t = chunk.tensor
            # A copied tensor's bytes go out straight from the input slot.
            data = compute.finish(handle) if t.combine else handle
            if not settings.allow_nonfinite and t.dtype in FLOATING_DTYPES:
                check_finite(data.view(TORCH_DTYPES[t.dtype]), t.name, task.file, chunk.start)
            shard.write(memoryview(data.numpy()))
            if on_progress is not None:
                on_progress(sum(DTYPE_SIZES[s.dtype] * chunk.count for s in chunk.sources()))

        read_ahead(0)
        for i, chunk in enumerate(chunks):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{output.url(task.file)}: cancelled")
            # Chunk i-2 must be written before its input slot is refilled (with chunk i+1) and its
            # output buffer reused (by chunk i); this also surfaces a failed write.
            if i >= 2:
                written[i - 2].result()
            read_ahead(i + 1)
            slot = slots[i % _SLOTS]
            slot.wait()
            handle = compute.submit(i, chunk, slot) if chunk.tensor.combine else slot.view(
                chunk.tensor.target, chunk.count)
            written.append(write_pool.submit(write_chunk, chunk, handle))
        for fut in written:
            fut.result()
        size, digest = shard.finish()
        _check_inputs_unchanged(task, inputs)
        writer.commit()
    except BaseException:
        # No write may be in flight while the temporary file is discarded.
        write_pool.shutdown(wait=True, cancel_futures=True)
        writer.discard()
        raise
    finally:
        write_pool.shutdown(wait=True, cancel_futures=True)
        # Readers are closed only after every read in flight has finished with its buffer.
        pool.shutdown(wait=True, cancel_futures=True)
        for r in readers.values():
            r.close()
    bytes_read = sum(r.bytes_read for r in readers.values())
    return ShardResult(task.file, size, digest, bytes_read, time.monotonic() - t0)
