"""The units of work that cross process boundaries, and how one shard splits into chunks.

A ``ShardTask`` is one output file; its ``TensorTask`` entries are logical tensors (what the
arithmetic sees), each read from up to three ``Source`` byte ranges. A quantized source or output
carries its FP8 scale tensor (``Scales`` / ``OutScales``) beside the codes. ``iter_chunks`` cuts a
shard into the ``Chunk`` units that execution streams, and ``Chunk.reads`` says exactly which bytes
each one needs, so planning can count them without reading anything. Everything here is a frozen
dataclass of plain values: cheap to pickle, comparable with ``==``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from .safetensors import DTYPE_SIZES

__all__ = [
    "ROLES",
    "REPORT_EVERY",
    "STATS",
    "Scales",
    "OutScales",
    "Source",
    "zero_source",
    "Term",
    "TensorTask",
    "TERM_STATS",
    "DIFF_STATS",
    "stat_names",
    "ExecSettings",
    "ShardTask",
    "ShardResult",
    "digest_key",
    "Read",
    "Chunk",
    "iter_chunks",
]

ROLES = ("target", "finetuned", "base")
# The spec's ``report`` key -> ``ExecSettings.report_every``. Sampled: every 32nd block of
# ``kernel.CPU_BLOCK`` elements of a tensor, its first always (on the 1.1B bench measuring every
# element costs this CPU-bound 2-core machine ~30% of the job's wall time; bench/NOTES.md section 9).
REPORT_EVERY = {"sampled": 32, "exact": 1, "off": 0}
# What the arithmetic measures of each combined tensor for the transfer report, summed over its
# chunks (``kernel.py`` measures, ``report.py`` turns them into norms, cosines and flags): its
# elements; the elements measured (all, or on a CPU by default one cache block in
# ``ExecSettings.report_every``); whether any element of the fine-tune differs from the base
# (checked on every element); then over the measured elements: sum of t^2, of (out - t)^2 with out
# as written (rounded), of (f - b)^2, of (t - b)^2 (how far the new base moved), of (f - b)(t - b),
# and the count of f == b.
STATS = ("elements", "measured", "differs", "target_sq", "out_delta_sq", "delta_sq", "moved_sq", "dot",
         "unchanged")
# A tensor combined from several diffs measures the first diff in ``STATS`` (its ``differs``
# included), then the sum of squares of the whole change sum_i alpha_i (f_i - b_i) before the target
# is added, then these for each further diff (``stat_names``).
TERM_STATS = ("differs", "delta_sq", "moved_sq", "dot", "unchanged")


# What ``graft diff`` measures of every difference it writes (each element, on the plain path):
# elements; whether any differs; sum of (as written)^2; the count of f == b; and the elements where
# the written difference is not the float64 difference f - b (where a float64 transfer from the diff
# would not give the three-checkpoint run's bits).
DIFF_STATS = ("elements", "differs", "delta_sq", "unchanged", "inexact")


def stat_names(terms: int) -> tuple[str, ...]:
    """The measures of a tensor combined from ``terms`` diffs, in the order the arithmetic adds them."""
    if terms <= 1:
        return STATS
    return STATS + ("change_sq",) + tuple(f"{k}.{i}" for i in range(1, terms) for k in TERM_STATS)

_COMPUTE_SIZES = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class OutScales:
    """The scale tensor an FP8 output tensor is written with: ``name``, ``dtype`` and stored ``shape``
    (the target's), one scale per ``block`` = (rows, cols) of codes (the whole tensor for a
    per-tensor scale, (1, cols) per output channel); ``pow2`` as the target's scales are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    block: tuple[int, int]
    pow2: bool = False  # each scale rounded up to a power of two (scale_fmt ue8m0)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Scale rows and columns over a ``rows`` x ``cols`` tensor (partial edge blocks count)."""
        return -(-rows // self.block[0]), -(-cols // self.block[1])


@dataclass(frozen=True)
class Scales(OutScales):
    """An input's stored scale tensor: bytes ``[begin, end)`` of ``file``."""

    file: str = ""
    begin: int = 0
    end: int = 0
    version: str | None = None

    def as_output(self) -> OutScales:
        return OutScales(self.name, self.dtype, self.shape, self.block, self.pow2)


@dataclass(frozen=True)
class Source:
    """Bytes ``[begin, end)`` of ``file`` in the checkpoint playing ``role``, holding ``dtype``; for
    a quantized input those are the FP8 codes and ``scales`` their scale tensor."""

    role: str
    file: str
    dtype: str
    begin: int
    end: int
    version: str | None = None  # the file's ETag / version / mtime when it was planned
    scales: Scales | None = None

    @property
    def zero(self) -> bool:
        """Rows this checkpoint lacks (a vocabulary it does not have): read as zeros, nothing read."""
        return not self.file


def zero_source(role: str, dtype: str) -> Source:
    return Source(role, "", dtype, 0, 0)


@dataclass(frozen=True)
class Term:
    """One diff applied to a tensor: ``alpha * (finetuned - base)``; ``diff`` is its index in the
    spec's diffs (0 for a single-diff job). A ``base`` with no file (``Source.zero``) is zeros: the
    ``finetuned`` source is then a stored difference (a ``graft diff`` artifact)."""

    finetuned: Source
    base: Source
    alpha: float
    diff: int = 0


@dataclass(frozen=True)
class TensorTask:
    """One logical output tensor: ``target + sum_i alpha_i * (finetuned_i - base_i)`` over its
    ``terms`` (in order), or the target alone when it has none. A target of no checkpoint at all
    (role ``""``, ``graft diff``) is not added: the change is written alone. ``scales``: the output
    is FP8 codes followed by this scale tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    target: Source
    terms: tuple[Term, ...] = ()
    scales: OutScales | None = None
    # Rows [first, first + shape[0]) of a tensor of ``rows`` rows whose rows come from different
    # places (a resized vocabulary): its pieces follow each other in the shard, the first carries
    # the header entry. None: the whole tensor.
    piece: tuple[int, int] | None = None

    @property
    def combine(self) -> bool:
        return bool(self.terms)

    @property
    def adds_target(self) -> bool:
        """False for a difference written alone (``graft diff``); rows a target lacks (role set, no
        file) are zeros, and are added."""
        return self.target.role != ""

    @property
    def continues(self) -> bool:
        """A piece after the first of a tensor written in pieces (it has no header entry of its own)."""
        return self.piece is not None and self.piece[0] > 0

    @property
    def sources(self) -> tuple[Source, ...]:
        """Every source the tensor reads, each once (diffs may share a base, or a checkpoint)."""
        out = [self.target]
        for term in self.terms:
            for s in (term.finetuned, term.base):
                if s not in out:
                    out.append(s)
        return tuple(out)

    @property
    def copies_raw(self) -> bool:
        """The target's stored bytes (codes, then scales) are the output's, unchanged."""
        return (not self.combine and self.dtype == self.target.dtype
                and self.scales == (self.target.scales.as_output() if self.target.scales else None))

    @property
    def transcodes(self) -> bool:
        """Some input is dequantized or the output quantized: the codec path (2-D, whole rows)."""
        return not self.copies_raw and (self.scales is not None or any(s.scales for s in self.sources))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Output bytes: the codes (or plain values), plus the scale tensor if any."""
        return self.numel * DTYPE_SIZES[self.dtype] + (self.scales.nbytes if self.scales else 0)

    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The output tensors this logical tensor is written as, in file order (none for a piece
        after the first: its bytes continue the first piece's tensor)."""
        if self.piece is not None:
            return [] if self.continues else [(self.name, self.dtype, (self.piece[1], *self.shape[1:]))]
        out = [(self.name, self.dtype, self.shape)]
        if self.scales is not None:
            out.append((self.scales.name, self.scales.dtype, self.scales.shape))
        return out


@dataclass(frozen=True)
class ExecSettings:
    """Job-wide execution settings every shard task needs."""

    compute_dtype: str
    chunk_size: int
    allow_nonfinite: bool
    read_concurrency: int = 1
    # The transfer report: 0 measures nothing; else a CPU measures every ``report_every``-th block
    # of each combined tensor (``kernel.sampled_ranges``), a GPU all of it.
    report_every: int = REPORT_EVERY["sampled"]
    # graft diff: the inputs (roles) whose every byte read is hashed (``ShardResult.digests``),
    # binding the diff to their content: those whose store does not vouch for each file's sha256.
    hash_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardTask:
    """One output file: its tensors in write order, its header metadata, its exact byte size."""

    index: int
    file: str
    tensors: tuple[TensorTask, ...]
    metadata: tuple[tuple[str, str], ...]
    size: int
    settings: ExecSettings

    @property
    def read_bytes(self) -> int:
        """Input bytes this shard reads: each input byte once, except the inputs of a tensor written
        with one per-tensor scale, which are read twice (the scale depends on every element)."""
        n = 0
        for t in self.tensors:
            if t.transcodes:
                n += _codec_read_bytes(t, self.settings)
            else:
                n += sum(s.end - s.begin for s in (t.sources if t.combine else (t.target,)))
                if t.copies_raw and t.target.scales is not None:
                    n += t.target.scales.end - t.target.scales.begin
        return n

    def header_tensors(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [s for t in self.tensors for s in t.stored()]


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard reports back: small plain values only."""

    file: str
    size: int
    sha256: str
    bytes_read: int
    seconds: float
    # The transfer report's measures of this shard's combined tensors: (name, ``kernel.STATS``).
    report: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # With ``ExecSettings.hash_roles``: (``"role\tfile\tbegin"`` of each input tensor's codes or
    # scales read, sha256 of those bytes).
    digests: tuple[tuple[str, str], ...] = ()


def digest_key(role: str, file: str, begin: int) -> str:
    """How ``ShardResult.digests`` names the input tensor at byte ``begin`` of ``file`` in ``role``."""
    return f"{role}\t{file}\t{begin}"


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
    per_row = cols * _COMPUTE_SIZES[settings.compute_dtype]
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
            n += rows * cols * DTYPE_SIZES[s.dtype]
            if s.scales is not None:
                lo, hi = _scale_rows(r, rows, s.scales.block[0])
                n += (hi - lo) * s.scales.grid(*t.shape)[1] * DTYPE_SIZES[s.scales.dtype]
    return n


def iter_chunks(task: ShardTask) -> Iterator[Chunk]:
    """The chunks of a shard in write order; a tensor larger than a chunk is split."""
    compute_size = _COMPUTE_SIZES[task.settings.compute_dtype]
    for t in task.tensors:
        if t.transcodes:
            yield from _codec_chunks(t, task.settings)
            continue
        per_elem = compute_size if t.combine else DTYPE_SIZES[t.dtype]
        step = max(1, task.settings.chunk_size // per_elem)
        starts = range(0, t.numel, step)
        for start in starts:
            yield Chunk(t, start, min(step, t.numel - start), last=start + step >= t.numel)
        if not starts and t.copies_raw and t.target.scales is not None:
            yield Chunk(t, 0, 0)  # an empty tensor's scales are still written
