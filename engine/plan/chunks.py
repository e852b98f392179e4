"""How one shard splits into the chunks execution streams, and which bytes each chunk reads.

``iter_chunks(task)`` cuts a ``ShardTask`` into ``Chunk`` units in write order (a tensor larger
than ``chunk_size`` is split; a combined tensor's chunks are whole rows of ``SUM_ROW`` elements, at
least one, when the report is measured, so its sums do not depend on the chunk size; on the FP8 codec path a chunk is
whole rows, whole block rows for a block-scaled output); ``Chunk.reads`` says exactly which input
bytes each one needs, and ``shard_read_bytes`` adds them up without making the chunks, so planning
counts what a run will read without reading anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from ..formats.safetensors import DTYPE_SIZES
from .tasks import COMPUTE_SIZES, SUM_ROW, ExecSettings, OutScales, ShardTask, TensorTask

__all__ = ["Read", "Chunk", "iter_chunks", "shard_read_bytes", "buffer_sizes"]


def shard_read_bytes(task: ShardTask) -> int:
    """Input bytes a shard reads: each input byte once, except the inputs of a tensor written with
    one per-tensor scale, which are read twice (the scale depends on every element). A LoRA term's
    factors are read whole, once per tensor (``execute.load_factors``)."""
    n = 0
    for t in task.tensors:
        n += sum(x.lora.nbytes for x in t.terms if x.lora is not None)
        if t.transcodes:
            n += _codec_read_bytes(t, task.settings)
        else:
            n += sum(s.end - s.begin for s in (t.sources if t.combine else (t.target,)))
            if t.copies_raw and t.target.scales is not None:
                n += t.target.scales.end - t.target.scales.begin
    return n


@dataclass(frozen=True)
class Read:
    """Bytes ``[begin, end)`` of ``file`` in role ``role``'s checkpoint: ``kind`` "codes" (the
    values, or FP8 codes) or "scales", holding ``dtype``."""

    role: str
    kind: str
    file: str
    begin: int
    end: int
    version: str | None
    dtype: str

    @property
    def size(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Chunk:
    """Elements ``[start, start + count)`` of one output tensor.

    On the codec path a chunk is whole rows (for a block-scaled output, whole block rows), and
    ``measure`` chunks are the first pass over a tensor written with one per-tensor scale: they
    find its amax and write nothing. ``last``: the tensor's last written chunk; its scale tensor
    follows it in the file.
    """

    tensor: TensorTask
    start: int
    count: int
    measure: bool = False
    last: bool = True

    @property
    def out_bytes(self) -> int:
        return 0 if self.measure else self.count * DTYPE_SIZES[self.tensor.dtype]

    @property
    def rows(self) -> tuple[int, int]:
        """First row and row count (codec chunks are whole rows of a 2-D tensor)."""
        cols = self.tensor.shape[1]
        return self.start // cols, self.count // cols

    def reads(self) -> list[Read]:
        t = self.tensor
        out = []
        for s in (t.sources if t.combine or t.transcodes else (t.target,)):
            if s.zero:
                continue
            size = DTYPE_SIZES[s.dtype]
            out.append(Read(s.role, "codes", s.file, s.begin + self.start * size,
                            s.begin + (self.start + self.count) * size, s.version, s.dtype))
            if s.scales is not None and t.transcodes:
                lo, hi = self.scale_rows(s.scales)
                row = s.scales.grid(*t.shape)[1] * DTYPE_SIZES[s.scales.dtype]
                out.append(Read(s.role, "scales", s.scales.file, s.scales.begin + lo * row,
                                s.scales.begin + hi * row, s.scales.version, s.scales.dtype))
        if self.last and t.copies_raw and t.target.scales is not None:
            sc = t.target.scales
            out.append(Read("target", "scales", sc.file, sc.begin, sc.end, sc.version, sc.dtype))
        return out

    def scale_rows(self, scales: OutScales) -> tuple[int, int]:
        """The rows of ``scales`` that this chunk's rows fall in."""
        return _scale_rows(*self.rows, scales.block[0])


def _scale_rows(first: int, rows: int, bo: int) -> tuple[int, int]:
    """The scale rows that code rows ``[first, first + rows)`` fall in, for blocks of ``bo`` rows."""
    return first // bo, -(-(first + rows) // bo)


def _per_tensor(scales: OutScales | None, shape: tuple[int, ...]) -> bool:
    return scales is not None and tuple(scales.block) == tuple(shape)


def _codec_rows(t: TensorTask, settings: ExecSettings) -> Iterator[tuple[int, int, bool, bool]]:
    """(first row, rows, measure, last) of each chunk of a codec-path tensor."""
    rows, cols = t.shape
    if rows * cols == 0:
        return
    # A block-scaled output needs whole block rows per chunk (a block's scale depends on all of
    # it); inputs' block rows are matched too where that is cheap, so no scale row is read twice.
    align = 1
    if t.scales is not None and not _per_tensor(t.scales, t.shape):
        align = t.scales.block[0]
    for s in t.sources:
        if s.scales is not None and not _per_tensor(s.scales, t.shape):
            both = math.lcm(align, s.scales.block[0])
            if both <= 4 * max(align, s.scales.block[0]):
                align = both
    per_row = cols * COMPUTE_SIZES[settings.compute_dtype]
    step = max(align, settings.chunk_size // per_row // align * align)
    starts = range(0, rows, step)
    if _per_tensor(t.scales, t.shape) and len(starts) > 1:  # first pass: the whole tensor's amax
        for r in starts:
            yield r, min(step, rows - r), True, False
    for r in starts:
        yield r, min(step, rows - r), False, r + step >= rows


def _codec_chunks(t: TensorTask, settings: ExecSettings) -> Iterator[Chunk]:
    cols = t.shape[1]
    for r, n, measure, last in _codec_rows(t, settings):
        yield Chunk(t, r * cols, n * cols, measure=measure, last=last)


def _codec_read_bytes(t: TensorTask, settings: ExecSettings) -> int:
    """What ``Chunk.reads`` of every chunk of ``t`` add up to, without making the chunks (a 671B
    plan has 46k such tensors)."""
    cols = t.shape[1]
    n = 0
    for r, rows, _, _ in _codec_rows(t, settings):
        for s in t.sources:
            if s.zero:  # rows a checkpoint lacks (a resized vocabulary's piece): nothing is read
                continue
            n += rows * cols * DTYPE_SIZES[s.dtype]
            if s.scales is not None:
                lo, hi = _scale_rows(r, rows, s.scales.block[0])
                n += (hi - lo) * s.scales.grid(*t.shape)[1] * DTYPE_SIZES[s.scales.dtype]
    return n


def iter_chunks(task: ShardTask) -> Iterator[Chunk]:
    """The chunks of a shard in write order; a tensor larger than a chunk is split."""
    compute_size = COMPUTE_SIZES[task.settings.compute_dtype]
    for t in task.tensors:
        if t.transcodes:
            yield from _codec_chunks(t, task.settings)
            continue
        per_elem = compute_size if t.combine else DTYPE_SIZES[t.dtype]
        step = max(1, task.settings.chunk_size // per_elem)
        if t.combine and task.settings.report_every:  # whole rows of the report's sums (at least one)
            step = max(SUM_ROW, step - step % SUM_ROW)
        starts = range(0, t.numel, step)
        for start in starts:
            yield Chunk(t, start, min(step, t.numel - start), last=start + step >= t.numel)
        if not starts and t.copies_raw and t.target.scales is not None:
            yield Chunk(t, 0, 0)  # an empty tensor's scales are still written


def buffer_sizes(chunks: list[Chunk], reads: list[list[Read]]) -> tuple[dict[tuple[str, str], int], int, int, int]:
    """For these chunks (and their ``reads()``): the input buffers a chunk in flight needs, one per
    (role, codes | scales), sized for the largest; its output bytes; and the compute capacity in
    elements of the plain and of the codec path."""
    capacity: dict[tuple[str, str], int] = {}
    for chunk_reads in reads:
        for r in chunk_reads:
            capacity[(r.role, r.kind)] = max(capacity.get((r.role, r.kind), 0), r.size)
    computed = [c for c in chunks if c.tensor.combine or c.tensor.transcodes]
    plain = max((c.count for c in computed if not c.tensor.transcodes), default=0)
    codec = max((c.count for c in computed if c.tensor.transcodes), default=0)
    return capacity, max((c.out_bytes for c in computed), default=0), plain, codec
