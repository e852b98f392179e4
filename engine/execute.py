"""Run one shard task: stream input ranges in chunks -> compute -> write + sha256 -> commit.

``execute_shard(task, inputs, output)`` is what every executor (threads, Ray actors) calls. The
chunks of a shard (``tasks.iter_chunks``) flow through a three-stage pipeline:

    read chunk i+1 (reader threads) | compute chunk i (CPU, or queued on a GPU) | write + hash
    chunks i-1, i-2 (the write thread)

A chunk is computed by one of two paths: plain tensors by ``ChunkKernel`` (element ranges), and
tensors with FP8 inputs or output by ``codec.Transcoder`` (whole rows: decode each input, combine,
encode with fresh block scales). A quantized output tensor's scale tensor is gathered while its
chunks go by and written right after its codes.

Memory is bounded by the chunk size whatever the tensor, shard or model size: three slots of input
buffers (being read, being computed, held until its output is written), two output buffers, the
compute buffers, and one scale tensor per quantized tensor in flight (1/16384 of its codes for
128x128 blocks) (plus, on a GPU, device copies of those). Each input byte is read exactly once
(but for tensors written with one per-tensor scale, whose inputs are read twice). The shard
becomes visible only when every byte is written and accounted for; on any error it is discarded.
"""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping

import torch

from .codec import Transcoder
from .errors import GraftError, IntegrityError
from .provenance import check_stored_reads
from .kernel import TORCH_DTYPES, ChunkKernel, check_finite, nonfinite_error
from .safetensors import DTYPE_SIZES, FLOATING_DTYPES, ShardWriter
from .storage import RangeReader, Storage
from .chunks import Chunk, Read, iter_chunks
from .tasks import (DIFF_STATS, ExecSettings, ShardResult, ShardTask, Source, TensorTask, digest_key,
                    output_digest_key, stat_names)

__all__ = ["ShardResult", "Chunk", "Cancelled", "iter_chunks", "execute_shard"]

_SLOTS = 3


class Cancelled(GraftError):
    """The shard was stopped because the run is being abandoned (another shard failed, Ctrl-C)."""


class _Slot:
    """Input buffers for one chunk in flight, one per (role, codes | scales), sized for the largest."""

    def __init__(self, capacity: dict[tuple[str, str], int], pinned: bool):
        self.bufs = {key: torch.empty(n, dtype=torch.uint8, pin_memory=pinned) for key, n in capacity.items()}
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


def _compute(kernel: ChunkKernel | None, codec: Transcoder | None, chunk: Chunk,
             inputs: dict[tuple[str, str], torch.Tensor], out: torch.Tensor, scales: torch.Tensor | None,
             where: str, non_blocking: bool = False, stats: torch.Tensor | None = None,
             check: bool = False, every: int = 1) -> None:
    """One chunk into ``out`` (its output bytes) on the inputs' device: the plain kernel, or the
    codec, whose output scale rows land in ``scales`` (the tensor's whole scale tensor, on the host).
    ``stats``: the tensor's report measures, added to (on a CPU, of every ``every``-th block of the
    tensor; ``kernel.sampled_ranges``); ``check``: the plain kernel refuses NaN/Inf."""
    t = chunk.tensor
    typed = out.view(TORCH_DTYPES[t.dtype])
    if t.transcodes:
        assert codec is not None
        rows = codec.run(chunk, inputs, None if chunk.measure else typed, where, stats, every)
        if rows is not None and scales is not None and t.scales is not None:
            lo, hi = chunk.scale_rows(t.scales)
            scales[lo:hi].copy_(rows, non_blocking=non_blocking)
    else:
        assert kernel is not None

        def rows_of(src: Source) -> torch.Tensor:
            got = inputs.get((src.role, "codes"))
            if got is not None and not src.zero:
                return got
            # Rows the checkpoint lacks count as zeros (a resized vocabulary, ``vocab: pad``), and
            # so does a stored difference's base.
            return kernel.zeros(chunk.count, TORCH_DTYPES[src.dtype])

        if not t.adds_target:  # graft diff: the difference alone
            (term,) = t.terms
            bad = kernel.difference(rows_of(term.finetuned), rows_of(term.base), typed, stats, check)
        else:
            bad = kernel.combine_terms(rows_of(t.target), tuple((rows_of(x.finetuned), rows_of(x.base), x.alpha)
                                                                for x in t.terms),
                                       typed, stats, check, chunk.start, every)
        if bad is not None:
            raise nonfinite_error(typed[bad].item(), t.name, where, chunk.start + bad)


class _CpuCompute:
    """Computes a chunk on the calling thread; ``finish`` has nothing left to wait for."""

    def __init__(self, compute_dtype: str, plain_elems: int, codec_elems: int, out_cap: int):
        self.kernel = ChunkKernel(compute_dtype, plain_elems) if plain_elems else None
        self.codec = Transcoder(compute_dtype, codec_elems) if codec_elems else None
        self.out = [torch.empty(out_cap, dtype=torch.uint8) for _ in range(2)]

    # The plain kernel checks each block for NaN/Inf while it is in cache (the write thread need not).
    checks = True

    def submit(self, i: int, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor],
               scales: torch.Tensor | None, where: str, stats: torch.Tensor | None,
               check: bool, every: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.out[i % 2][:chunk.out_bytes]
        _compute(self.kernel, self.codec, chunk, inputs, out, scales, where, stats=stats, check=check,
                 every=every)
        return out, scales if chunk.last else None

    def finish(self, handle: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return handle


class _CudaCompute:
    """Queues each chunk on a GPU: upload (copy stream) -> compute -> download (compute stream).

    The upload of chunk i+1 overlaps the compute of chunk i, and both overlap the host writing and
    hashing chunk i-1. Host input buffers are pinned so the copies are truly asynchronous; a
    quantized tensor's scale rows come back into its pinned host scale buffer.
    """

    def __init__(self, device: str, compute_dtype: str, plain_elems: int, codec_elems: int,
                 out_cap: int, capacity: dict[tuple[str, str], int]):
        self.device = torch.device(device)
        self.kernel = ChunkKernel(compute_dtype, plain_elems, self.device) if plain_elems else None
        self.codec = Transcoder(compute_dtype, codec_elems, self.device) if codec_elems else None
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.staging = [{k: torch.empty(n, dtype=torch.uint8, device=self.device) for k, n in capacity.items()}
                        for _ in range(2)]
        self.out_dev = [torch.empty(out_cap, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.out_host = [torch.empty(out_cap, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.released: list[torch.cuda.Event | None] = [None, None]

    checks = False  # a check on the device would wait for it: the write thread checks the host copy

    def submit(self, i: int, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor],
               scales: torch.Tensor | None, where: str, stats: torch.Tensor | None,
               check: bool, every: int) -> tuple[torch.cuda.Event, torch.Tensor, torch.Tensor | None]:
        k = i % 2
        staged = {}
        with torch.cuda.stream(self.copy_stream):
            if self.released[k] is not None:  # chunk i-2's compute must be done with staging[k]
                self.copy_stream.wait_event(self.released[k])
            for key, host in inputs.items():
                raw = host.view(torch.uint8)
                dev = self.staging[k][key][:raw.numel()]
                dev.copy_(raw, non_blocking=True)
                staged[key] = dev.view(host.dtype)
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(uploaded)
            out_dev = self.out_dev[k][:chunk.out_bytes]
            # The scale rows go straight to the pinned host buffer, after the compute on this stream.
            _compute(self.kernel, self.codec, chunk, staged, out_dev, scales, where, non_blocking=True,
                     stats=stats)
            out_host = self.out_host[k][:chunk.out_bytes]
            out_host.copy_(out_dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        self.released[k] = done
        return done, out_host, scales if chunk.last else None

    def finish(self, handle: tuple[torch.cuda.Event, torch.Tensor, torch.Tensor | None]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        done, out_host, scales = handle
        done.synchronize()
        return out_host, scales


def _check_inputs_unchanged(task: ShardTask, inputs: Mapping[str, Storage]) -> None:
    """Refuse to commit a shard if an input file it read is no longer the version planned.

    Checked after the last read, so any change before or during this shard's reads is caught and
    bytes of two versions are never committed together. Files on a store that ``pins_reads`` need
    no check: each of their reads was refused unless it was of the planned version.
    """
    planned: dict[tuple[str, str], str] = {}
    for t in task.tensors:
        for s in t.sources:
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


def _capacity(reads: list[list[Read]]) -> dict[tuple[str, str], int]:
    cap: dict[tuple[str, str], int] = {}
    for chunk_reads in reads:
        for r in chunk_reads:
            cap[(r.role, r.kind)] = max(cap.get((r.role, r.kind), 0), r.size)
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
    reads = [c.reads() for c in chunks]
    capacity = _capacity(reads)
    on_gpu = device != "cpu"
    # The transfer report's measures per combined tensor (the pieces of one tensor add up), summed
    # on the compute device and read once the shard is written. One allocation, made before the
    # large buffers: a small tensor per tensor allocated among them as the shard goes cost ~40 MB
    # of resident memory and 10k page faults per job on the bench (the heap could not be reused).
    measured = _measures(task, settings, torch.device(device))
    slots = [_Slot(capacity, pinned=on_gpu) for _ in range(_SLOTS)]
    computed = [c for c in chunks if c.tensor.combine or c.tensor.transcodes]
    plain_elems = max((c.count for c in computed if not c.tensor.transcodes), default=0)
    codec_elems = max((c.count for c in computed if c.tensor.transcodes), default=0)
    out_cap = max((c.out_bytes for c in computed), default=0)
    compute: _CpuCompute | _CudaCompute = (
        _CudaCompute(device, settings.compute_dtype, plain_elems, codec_elems, out_cap, capacity) if on_gpu
        else _CpuCompute(settings.compute_dtype, plain_elems, codec_elems, out_cap))
    readers: dict[tuple[str, str], RangeReader] = {}
    # One thread per input keeps the input streams moving while this thread computes/writes.
    pool = ThreadPoolExecutor(max_workers=max(3, len({r.role for rs in reads for r in rs})), thread_name_prefix=f"graft-read-{task.index}")

    def reader(role: str, file: str, version: str | None) -> RangeReader:
        key = (role, file)
        if key not in readers:
            readers[key] = inputs[role].reader(file, task.settings.read_concurrency, version)
        return readers[key]

    def read_ahead(i: int) -> None:
        if i < len(chunks):
            slot = slots[i % _SLOTS]
            for r in reads[i]:
                dest = memoryview(slot.view(r).numpy())
                slot.pending.append(pool.submit(reader(r.role, r.file, r.version).read_into, r.begin, dest))

    # One thread writes and hashes while this one computes: sha256 and the page-cache copy cost
    # as much CPU as the arithmetic, and writes can block on the disk.
    write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"graft-write-{task.index}")
    written: list[Future[None]] = []

    def check_here(t: TensorTask) -> bool:
        return not settings.allow_nonfinite and t.dtype in FLOATING_DTYPES and t.scales is None

    def stats_of(t: TensorTask) -> torch.Tensor | None:
        return measured.get(t.name)

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

    writer = output.writer(task.file, task.size)
    try:
        shard = ShardWriter(writer, task.header_tensors(), dict(task.metadata))

        def write_chunk(i: int, handle: object) -> None:  # on the write thread, in order
            chunk = chunks[i]
            t = chunk.tensor
            if not chunk.measure:
                if t.copies_raw:  # the target's bytes go out straight from the input slot
                    data, scales = handle  # type: ignore[misc]
                else:
                    data, scales = compute.finish(handle)  # type: ignore[arg-type]
                if check_here(t) and not (compute.checks and t.combine and not t.transcodes):
                    check_finite(data.view(TORCH_DTYPES[t.dtype]), t.name, task.file, chunk.start)
                shard.write(memoryview(data.numpy()))
                if not t.adds_target:
                    if t.name not in written_hashers:
                        written_hashers[t.name] = hashlib.sha256()
                    written_hashers[t.name].update(memoryview(data.numpy()))
                if scales is not None:
                    shard.write(memoryview(scales.view(torch.uint8).reshape(-1).numpy()))
            if on_progress is not None:
                on_progress(sum(r.size for r in reads[i]))

        scales: torch.Tensor | None = None  # the output scale tensor of the tensor being written
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
            if settings.hash_roles:
                hash_reads(i, slot)
            t = chunk.tensor
            if t.copies_raw:
                raw = {(r.role, r.kind): slot.view(r) for r in reads[i]}
                handle: object = (raw[("target", "codes")], raw.get(("target", "scales")) if chunk.last else None)
            else:
                if t.scales is not None and not chunk.measure and scales is None:
                    # Filled row by row as the chunks go by; written after the tensor's last chunk.
                    grid = t.scales.grid(*t.shape)
                    scales = torch.empty(grid, dtype=TORCH_DTYPES[t.scales.dtype], pin_memory=on_gpu)
                handle = compute.submit(i, chunk, slot.typed(reads[i]), None if chunk.measure else scales,
                                        task.file, stats_of(t), check_here(t), settings.report_every)
                if chunk.last:
                    scales = None
            written.append(write_pool.submit(write_chunk, i, handle))
        for fut in written:
            fut.result()
        if settings.hash_roles:
            _hash_scales(task, reader, hashers, settings.hash_roles)
        size, digest = shard.finish()
        _check_inputs_unchanged(task, inputs)
        check_stored_reads(task, inputs, hashers)
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
    report = tuple((name, tuple(v.tolist())) for name, v in measured.items())
    digests = tuple((key, h.hexdigest()) for key, h in hashers.items()) + tuple(
        (output_digest_key(task.file, name), h.hexdigest()) for name, h in written_hashers.items())
    return ShardResult(task.file, size, digest, bytes_read, time.monotonic() - t0, report, digests)


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
