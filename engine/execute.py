"""Run one shard task: stream input ranges in chunks -> kernel -> write + sha256 -> commit.

``execute_shard(task, inputs, output)`` is what every executor (threads, Ray actors) calls. Memory
is bounded by the chunk size, whatever the tensor, shard or model size: two chunk slots of input
buffers (one being computed, one being read ahead), two compute buffers, one output buffer. Each
input byte is read exactly once. The shard becomes visible only when every byte is written and
accounted for; on any error it is discarded.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from .errors import GraftError
from .kernel import TORCH_DTYPES, ChunkKernel, check_finite
from .planner import ShardTask, Source, TensorTask
from .safetensors import DTYPE_SIZES, FLOATING_DTYPES, ShardWriter
from .storage import RangeReader, Storage

__all__ = ["ShardResult", "Chunk", "Cancelled", "iter_chunks", "execute_shard"]

_ROLES = ("target", "finetuned", "base")


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


def iter_chunks(task: ShardTask) -> Iterator[Chunk]:
    """The chunks of a shard in write order; a tensor larger than a chunk is split."""
    compute_size = 8 if task.settings.compute_dtype == "float64" else 4
    for t in task.tensors:
        per_elem = compute_size if t.combine else DTYPE_SIZES[t.dtype]
        step = max(1, task.settings.chunk_size // per_elem)
        for start in range(0, t.numel, step):
            yield Chunk(t, start, min(step, t.numel - start))


def _sources(chunk: Chunk) -> list[Source]:
    t = chunk.tensor
    return [s for s in (t.target, t.finetuned, t.base) if s is not None]


class _Slot:
    """Input buffers for one chunk in flight (one per role), sized for the largest chunk."""

    def __init__(self, capacity: dict[str, int]):
        self.bufs = {role: torch.empty(n, dtype=torch.uint8) for role, n in capacity.items()}
        self.pending: list[Future[None]] = []

    def view(self, src: Source, nbytes: int) -> torch.Tensor:
        return self.bufs[src.role][:nbytes]


def _capacity(task: ShardTask) -> dict[str, int]:
    cap = dict.fromkeys(_ROLES, 0)
    for c in iter_chunks(task):
        for s in _sources(c):
            cap[s.role] = max(cap[s.role], c.count * DTYPE_SIZES[s.dtype])
    return cap


def execute_shard(
    task: ShardTask,
    inputs: Mapping[str, Storage],
    output: Storage,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> ShardResult:
    """Compute and commit output shard ``task.file`` from the ``inputs`` (keyed by role).

    Raises ``IntegrityError`` (input shorter than planned), ``NonFiniteError``, ``StorageError``, or
    ``Cancelled`` once ``cancel`` is set (checked between chunks); in every error case nothing is
    left at the shard's final name.
    """
    t0 = time.monotonic()
    settings = task.settings
    chunks = list(iter_chunks(task))
    capacity = _capacity(task)
    slots = [_Slot(capacity), _Slot(capacity)]
    max_elems = max((c.count for c in chunks if c.tensor.combine), default=0)
    kernel = ChunkKernel(settings.compute_dtype, max_elems) if max_elems else None
    out_cap = max((c.count * DTYPE_SIZES[c.tensor.dtype] for c in chunks if c.tensor.combine), default=0)
    out_buf = torch.empty(out_cap, dtype=torch.uint8)
    readers: dict[tuple[str, str], RangeReader] = {}
    # One thread per role keeps the three input streams moving while this thread computes.
    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix=f"graft-read-{task.index}")

    def reader(src: Source) -> RangeReader:
        key = (src.role, src.file)
        if key not in readers:
            readers[key] = inputs[src.role].reader(src.file)
        return readers[key]

    def submit(chunk: Chunk, slot: _Slot) -> None:
        for src in _sources(chunk):
            size = DTYPE_SIZES[src.dtype]
            nbytes = chunk.count * size
            dest = slot.view(src, nbytes).numpy()
            slot.pending.append(pool.submit(reader(src).read_into, src.begin + chunk.start * size,
                                            memoryview(dest)))

    writer = output.writer(task.file)
    try:
        shard = ShardWriter(writer, task.header_tensors(), dict(task.metadata))
        if chunks:
            submit(chunks[0], slots[0])
        for i, chunk in enumerate(chunks):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{output.url(task.file)}: cancelled")
            slot = slots[i % 2]
            if i + 1 < len(chunks):
                submit(chunks[i + 1], slots[(i + 1) % 2])
            for fut in slot.pending:
                fut.result()
            slot.pending.clear()
            data = _compute(chunk, slot, kernel, out_buf, task.file, settings.allow_nonfinite)
            shard.write(memoryview(data.numpy()))
            if on_progress is not None:
                on_progress(sum(DTYPE_SIZES[s.dtype] * chunk.count for s in _sources(chunk)))
        size, digest = shard.finish()
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    finally:
        # Readers are closed only after every read in flight has finished with its buffer.
        pool.shutdown(wait=True, cancel_futures=True)
        for r in readers.values():
            r.close()
    bytes_read = sum(r.bytes_read for r in readers.values())
    return ShardResult(task.file, size, digest, bytes_read, time.monotonic() - t0)


def _compute(chunk: Chunk, slot: _Slot, kernel: ChunkKernel | None, out_buf: torch.Tensor,
             shard_file: str, allow_nonfinite: bool) -> torch.Tensor:
    """The output bytes of one chunk (a uint8 tensor view, valid until the next call)."""
    t = chunk.tensor
    out_dtype = TORCH_DTYPES[t.dtype]
    nbytes = chunk.count * DTYPE_SIZES[t.dtype]
    if not t.combine:
        data = slot.view(t.target, nbytes)
        if not allow_nonfinite and t.dtype in FLOATING_DTYPES:
            check_finite(data.view(out_dtype), t.name, shard_file, chunk.start)
        return data

    def typed(src: Source) -> torch.Tensor:
        return slot.view(src, chunk.count * DTYPE_SIZES[src.dtype]).view(TORCH_DTYPES[src.dtype])

    assert kernel is not None and t.finetuned is not None and t.base is not None
    out_bytes = out_buf[:nbytes]
    out = out_bytes.view(out_dtype)
    kernel.combine(typed(t.target), typed(t.finetuned), typed(t.base), t.alpha, out)
    if not allow_nonfinite:
        check_finite(out, t.name, shard_file, chunk.start)
    return out_bytes
