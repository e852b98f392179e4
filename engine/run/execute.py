"""Run one shard task: stream input ranges in chunks -> compute -> write + sha256 -> commit.

``execute_shard(task, inputs, output, threads=N)`` is what every executor (threads, Ray actors)
calls. The chunks of a shard (``tasks.iter_chunks``) flow through three stages:

    reads (reader threads) -> compute (``threads`` threads, several chunks at once; on a GPU, one
    thread queuing them on the device) -> the ordered stage: each chunk in file order written
    (one thread) while it is hashed (another)

A chunk is computed by one of two paths: plain tensors by ``ChunkKernel`` (element ranges), and
tensors with FP8 inputs or output by ``codec.Transcoder`` (whole rows: decode each input, combine,
encode with fresh block scales). A quantized output tensor's scale tensor is filled by its chunks
and written right after its codes. Chunks of one tensor computed at once leave their transfer
report measures in a ``sums.StatsLog`` each, applied by the ordered stage in chunk order: the
report's bits do not depend on the threads.

Memory is bounded by the chunk size whatever the tensor, shard or model size (``sizing.shard_memory``): a
window of ``window_for(threads)`` chunks in flight, each holding a slot (its input buffers and its
output buffer) from its reads until its bytes are written and hashed; each compute thread's buffers;
one scale tensor per quantized tensor in flight (1/16384 of its codes for 128x128 blocks) (plus, on
a GPU, device copies of two chunks); with a LoRA adapter, the shard's factors (r rows or columns of
each tensor it changes, in the compute dtype) and each compute thread's change buffers (two per
adapter, a chunk each). Each input byte is read exactly once (but for tensors written with one
per-tensor scale, whose inputs are read twice). The shard becomes visible only when every
byte is written and accounted for; on any error it is discarded.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch

from ..compute.devices import CpuCompute, CudaCompute
from ..compute.kernel import COMPUTE_DTYPES, TORCH_DTYPES, check_finite
from ..compute.sums import StatsLog
from ..errors import GraftError, IntegrityError
from ..formats.safetensors import DTYPE_SIZES, FLOATING_DTYPES, ShardWriter
from ..plan.chunks import Chunk, Read, buffer_sizes, iter_chunks
from ..storage import RangeReader, Storage
from .provenance import check_stored_reads
from .sizing import window_for
from ..plan.tasks import (DIFF_STATS, ExecSettings, ShardResult, ShardTask, Source, TensorTask, digest_key,
                          output_digest_key, stat_names)

__all__ = ["ShardResult", "Chunk", "Cancelled", "iter_chunks", "execute_shard"]


class Cancelled(GraftError):
    """The shard was stopped because the run is being abandoned (another shard failed, Ctrl-C)."""


class _Slot:
    """One chunk in flight: its input buffers, one per (role, codes | scales), sized for the
    largest, and its output buffer."""

    def __init__(self, capacity: dict[tuple[str, str], int], out_cap: int, pinned: bool):
        self.bufs = {key: torch.empty(n, dtype=torch.uint8, pin_memory=pinned) for key, n in capacity.items()}
        self.out = torch.empty(out_cap, dtype=torch.uint8, pin_memory=pinned)
        self.pending: list[Future[None]] = []

    def view(self, read: Read) -> torch.Tensor:
        """The buffer ``read`` lands in (uint8, exactly its size)."""
        return self.bufs[(read.role, read.kind)][:read.size]

    def typed(self, reads: list[Read]) -> dict[tuple[str, str], torch.Tensor]:
        return {(r.role, r.kind): self.view(r).view(TORCH_DTYPES[r.dtype]) for r in reads}

    def wait(self) -> None:
        for fut in self.pending:
            fut.result()
        self.pending.clear()


def _check_inputs_unchanged(task: ShardTask, inputs: Mapping[str, Storage]) -> None:
    """Refuse to commit a shard if an input file it read is no longer the version planned.

    Checked after the last read, so any change before or during this shard's reads is caught and
    bytes of two versions are never committed together. Files on a store that ``pins_reads`` need
    no check: each of their reads was refused unless it was of the planned version.
    """
    planned: dict[tuple[str, str], str] = {}
    for t in task.tensors:
        for s in (*t.sources, *(f for x in t.terms if x.lora is not None for f in (x.lora.a, x.lora.b))):
            for file, version in ((s.file, s.version), *(((s.scales.file, s.scales.version),) if s.scales else ())):
                if version is not None and not inputs[s.role].pins_reads:
                    planned[(s.role, file)] = version
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


def execute_shard(
    task: ShardTask,
    inputs: Mapping[str, Storage],
    output: Storage,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    device: str = "cpu",
    threads: int = 1,
) -> ShardResult:
    """Compute and commit output shard ``task.file`` from the ``inputs`` (keyed by role).

    ``device`` is ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``); ``threads``: compute
    threads on a CPU (chunks computed at once; one on a GPU). The file's bytes are the same on
    both and whatever ``threads``. Raises ``IntegrityError`` (input shorter than planned),
    ``NonFiniteError``, ``StorageError``, or ``Cancelled`` once ``cancel`` is set (checked between
    chunks); in every error case nothing is left at the shard's final name.
    """
    t0 = time.monotonic()
    settings = task.settings
    chunks = list(iter_chunks(task))
    reads = [c.reads() for c in chunks]
    capacity, out_cap, plain_elems, codec_elems = buffer_sizes(chunks, reads)
    on_gpu = device != "cpu"
    threads = 1 if on_gpu else max(1, threads)
    # The transfer report's measures per combined tensor (the pieces of one tensor add up), summed
    # on the compute device and read once the shard is written. One allocation, made before the
    # large buffers: a small tensor per tensor allocated among them as the shard goes cost ~40 MB
    # of resident memory and 10k page faults per job on the bench (the heap could not be reused).
    measured = _measures(task, settings, torch.device(device))
    free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(min(window_for(threads), max(1, len(chunks)))):
        free.put(_Slot(capacity, out_cap, pinned=on_gpu))
    compute: CpuCompute | CudaCompute = (
        CudaCompute(device, settings.compute_dtype, plain_elems, codec_elems, out_cap, capacity) if on_gpu
        else CpuCompute(settings.compute_dtype, plain_elems, codec_elems))
    readers: dict[tuple[str, str], RangeReader] = {}  # made on this thread only
    roles = len({r.role for rs in reads for r in rs})
    # Reads of every chunk in the window may be in flight; local reads are copies from the page
    # cache, object store reads wait on the network: threads are cheap either way.
    read_pool = ThreadPoolExecutor(max_workers=max(3, min(32, roles * (threads + 1))),
                                   thread_name_prefix=f"graft-read-{task.index}")
    compute_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"graft-compute-{task.index}")
    # The ordered stage: one thread writes each chunk while another hashes it (sha256 costs about
    # as much CPU as the arithmetic, and writes can block on the disk).
    order_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"graft-write-{task.index}")
    abort = threading.Event()
    computed: list[Future[Any]] = [Future() for _ in chunks]
    slot_of: dict[int, _Slot] = {}

    def reader(role: str, file: str, version: str | None) -> RangeReader:
        key = (role, file)
        if key not in readers:
            readers[key] = inputs[role].reader(file, task.settings.read_concurrency, version)
        return readers[key]

    def check_here(t: TensorTask) -> bool:
        return not settings.allow_nonfinite and t.dtype in FLOATING_DTYPES and t.scales is None

    def run_chunk(i: int, slot: _Slot, scales: torch.Tensor | None) -> tuple[Any, StatsLog | None]:
        """Chunk i's output (a handle for ``compute.finish``, or the target's raw bytes) and, on a
        CPU, the report measures it left for the ordered stage."""
        chunk = chunks[i]
        t = chunk.tensor
        if t.copies_raw:  # the target's bytes go out straight from the input slot
            raw = {(r.role, r.kind): slot.view(r) for r in reads[i]}
            data = raw[("target", "codes")]
            if check_here(t) and not on_gpu:
                check_finite(data.view(TORCH_DTYPES[t.dtype]), t.name, task.file, chunk.start)
            return (data, raw.get(("target", "scales")) if chunk.last else None), None
        stats = measured.get(t.name)
        log = StatsLog() if stats is not None and not on_gpu else None
        out = slot.out[:chunk.out_bytes]
        handle = compute.submit(chunk, slot.typed(reads[i]), out, None if chunk.measure else scales, task.file,
                                log if log is not None else stats, check_here(t), settings.report_every)
        if check_here(t) and not on_gpu and not chunk.measure and (t.transcodes or not t.combine):
            check_finite(out.view(TORCH_DTYPES[t.dtype]), t.name, task.file, chunk.start)
        return handle, log

    def compute_chunk(i: int, slot: _Slot, scales: torch.Tensor | None, after: tuple[Future[Any], ...]) -> None:
        done = computed[i]
        if not done.set_running_or_notify_cancel():
            return
        try:
            if abort.is_set():
                raise Cancelled(f"{output.url(task.file)}: cancelled")
            slot.wait()
            for fut in after:  # a per-tensor scale needs every measure chunk's amax first
                fut.result()
            done.set_result(run_chunk(i, slot, scales))
        except BaseException as e:  # noqa: BLE001 - handed to the ordered stage, which raises it in order
            done.set_exception(e)

    # graft diff: sha256 of every input tensor's bytes as they stream by (codes: in order, chunk by
    # chunk; scale tensors, whose rows two chunks may both read, whole at the end). Each under the
    # first output tensor that reads it: a tied head reads its embedding's bytes again.
    hashers: dict[str, Any] = {}
    owners: dict[str, str] = {}

    def hash_reads(i: int, slot: _Slot) -> None:
        chunk = chunks[i]
        if chunk.measure:
            return
        for r in reads[i]:
            if r.kind == "codes" and r.role in settings.hash_roles:
                begin = r.begin - chunk.start * DTYPE_SIZES[r.dtype]
                key = digest_key(r.role, r.file, begin)
                if owners.setdefault(key, chunk.tensor.name) != chunk.tensor.name:
                    continue
                if key not in hashers:
                    hashers[key] = hashlib.sha256()
                hashers[key].update(memoryview(slot.view(r).numpy()))

    # graft diff: each difference's sha256 as written (the diff's manifest lists them, and a
    # transfer from the diff checks what it reads against them).
    written_hashers: dict[str, Any] = {}

    # A LoRA term's factors, read whole once per tensor before its chunks (they are small: r rows or
    # columns of the tensor), in the compute dtype on the compute device.
    compute.factors = load_factors(task, reader, device, hashers)
    if compute.factors and on_progress is not None:
        on_progress(sum(x.lora.nbytes for t in task.tensors for x in t.terms if x.lora is not None))

    writer = output.writer(task.file, task.size)
    try:
        shard = ShardWriter(writer, task.header_tensors(), dict(task.metadata))

        def account(i: int, pieces: list[memoryview], log: StatsLog | None) -> None:
            """On the hashing thread, in order: the file's sha256, the diff's sums, the measures."""
            t = chunks[i].tensor
            if settings.hash_roles:
                hash_reads(i, slot_of[i])
            for piece in pieces:
                shard.hash(piece)
            if pieces and not t.adds_target:
                written_hashers.setdefault(t.name, hashlib.sha256()).update(pieces[0])
            if log is not None:
                log.apply(measured[t.name])

        def write_in_order() -> None:
            for i, chunk in enumerate(chunks):
                if abort.is_set() or (cancel is not None and cancel.is_set()):
                    raise Cancelled(f"{output.url(task.file)}: cancelled")
                handle, log = computed[i].result()  # re-raises the chunk's read or compute error
                t = chunk.tensor
                pieces: list[memoryview] = []
                if not chunk.measure:
                    data, scales = handle if t.copies_raw else compute.finish(handle)
                    if on_gpu and check_here(t):
                        check_finite(data.view(TORCH_DTYPES[t.dtype]), t.name, task.file, chunk.start)
                    pieces.append(memoryview(data.numpy()))
                    if scales is not None:
                        pieces.append(memoryview(scales.view(torch.uint8).reshape(-1).numpy()))
                hashed = order_pool.submit(account, i, pieces, log)
                try:
                    for piece in pieces:
                        shard.write(piece, hashed=False)
                finally:
                    hashed.result()
                if on_progress is not None:
                    on_progress(sum(r.size for r in reads[i]))
                free.put(slot_of.pop(i))

        writing = order_pool.submit(write_in_order)

        def take_slot() -> _Slot:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{output.url(task.file)}: cancelled")
                if writing.done():  # it failed (it needs every chunk to finish)
                    writing.result()
                try:
                    return free.get(timeout=0.05)
                except queue.Empty:
                    pass

        scales: torch.Tensor | None = None  # the output scale tensor of the tensor being computed
        measures: dict[str, list[Future[Any]]] = {}  # each per-tensor-scaled tensor's measure chunks
        for i, chunk in enumerate(chunks):
            slot = slot_of[i] = take_slot()
            for r in reads[i]:
                dest = memoryview(slot.view(r).numpy())
                slot.pending.append(read_pool.submit(reader(r.role, r.file, r.version).read_into, r.begin, dest))
            t = chunk.tensor
            if chunk.measure:
                measures.setdefault(t.name, []).append(computed[i])
            elif not t.copies_raw and t.scales is not None and scales is None:
                # Filled row by row as the chunks go by; written after the tensor's last chunk.
                scales = torch.empty(t.scales.grid(*t.shape), dtype=TORCH_DTYPES[t.scales.dtype], pin_memory=on_gpu)
            compute_pool.submit(compute_chunk, i, slot, None if chunk.measure else scales,
                                () if chunk.measure else tuple(measures.get(t.name, ())))
            if chunk.last and not t.copies_raw:
                scales = None
        writing.result()
        if settings.hash_roles:
            _hash_scales(task, reader, hashers, settings.hash_roles)
        size, digest = shard.finish()
        _check_inputs_unchanged(task, inputs)
        check_stored_reads(task, inputs, hashers)
        writer.commit()
    except BaseException:
        abort.set()
        for fut in computed:  # chunks not started never will be: the ordered stage stops at them
            fut.cancel()
        # No write may be in flight while the temporary file is discarded.
        compute_pool.shutdown(wait=True, cancel_futures=True)
        order_pool.shutdown(wait=True, cancel_futures=True)
        writer.discard()
        raise
    finally:
        compute_pool.shutdown(wait=True, cancel_futures=True)
        order_pool.shutdown(wait=True, cancel_futures=True)
        # Readers are closed only after every read in flight has finished with its buffer.
        read_pool.shutdown(wait=True, cancel_futures=True)
        for r in readers.values():
            r.close()
    bytes_read = sum(r.bytes_read for r in readers.values())
    report = tuple((name, tuple(v.tolist())) for name, v in measured.items())
    digests = tuple((key, h.hexdigest()) for key, h in hashers.items()) + tuple(
        (output_digest_key(task.file, name), h.hexdigest()) for name, h in written_hashers.items())
    return ShardResult(task.file, size, digest, bytes_read, time.monotonic() - t0, report, digests)


def load_factors(task: ShardTask, reader: Callable[[str, str, str | None], RangeReader], device: str,
                 hashers: dict[str, Any] | None = None) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]]:
    """Each LoRA term's ``(U, V, scale)`` (``tasks.LowRank``), by (tensor, diff): its two factors read
    whole and arranged so that the change is ``scale * U.V``, in the compute dtype on ``device``.
    The bytes of factors of a role in ``hash_roles`` are hashed into ``hashers`` (by ``digest_key``)."""
    dtype = COMPUTE_DTYPES[task.settings.compute_dtype]
    out: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]] = {}

    def whole(src: Source) -> torch.Tensor:
        buf = _read_whole(reader, src)
        key = digest_key(src.role, src.file, src.begin)
        if hashers is not None and src.role in task.settings.hash_roles and key not in hashers:
            hashers[key] = hashlib.sha256(memoryview(buf.view(torch.uint8).numpy()))
        return buf

    for t in task.tensors:
        for x in t.terms:
            low = x.lora
            if low is None or (t.name, x.diff) in out:
                continue
            a = whole(low.a).view(low.a_shape)
            b = whole(low.b).view(low.b_shape)
            u, v = (a.t(), b.t()) if low.transpose else (b, a)
            out[(t.name, x.diff)] = (u.to(device=device, dtype=dtype).contiguous(),
                                     v.to(device=device, dtype=dtype).contiguous(), low.scale)
    return out


def _read_whole(reader: Callable[[str, str, str | None], RangeReader], src: Source) -> torch.Tensor:
    buf = torch.empty(src.end - src.begin, dtype=torch.uint8)
    reader(src.role, src.file, src.version).read_into(src.begin, memoryview(buf.numpy()))
    return buf.view(TORCH_DTYPES[src.dtype])


def _measures(task: ShardTask, settings: ExecSettings, device: torch.device) -> dict[str, torch.Tensor]:
    """Each measured tensor's row (``tasks.stat_names``, or ``DIFF_STATS`` for graft diff) of one
    zeroed float64 tensor on ``device``."""
    if not settings.report_every:
        return {}
    sizes: dict[str, int] = {}
    for t in task.tensors:
        if not t.combine or (not t.adds_target and t.transcodes):  # graft diff measures the plain path
            continue
        sizes[t.name] = len(stat_names(len(t.terms)) if t.adds_target else DIFF_STATS)
    if not sizes:
        return {}
    rows = torch.zeros(len(sizes), max(sizes.values()), dtype=torch.float64, device=device)
    return {name: rows[i, :n] for i, (name, n) in enumerate(sizes.items())}


def _hash_scales(task: ShardTask, reader: Callable[[str, str, str | None], RangeReader],
                 hashers: dict[str, Any], roles: tuple[str, ...]) -> None:
    """sha256 of each input scale tensor the shard read, read again whole (1/16384 of its codes)."""
    for t in task.tensors:
        for s in t.sources:
            sc = s.scales
            if sc is None or s.zero or s.role not in roles:
                continue
            key = digest_key(s.role, sc.file, sc.begin)
            if key in hashers:
                continue
            buf = bytearray(sc.end - sc.begin)
            reader(s.role, sc.file, sc.version).read_into(sc.begin, memoryview(buf))
            hashers[key] = hashlib.sha256(buf)
