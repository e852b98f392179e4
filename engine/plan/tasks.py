"""The units of work that cross process boundaries.

A ``ShardTask`` is one output file; its ``TensorTask`` entries are logical tensors (what the
arithmetic sees), each read from up to three ``Source`` byte ranges. A quantized source or output
carries its FP8 scale tensor (``Scales`` / ``OutScales``) beside the codes; ``ShardResult`` is what
a finished shard reports back. Everything here is a frozen dataclass of plain values: cheap to
pickle, comparable with ``==``. How a shard splits into chunks and reads is ``chunks.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..formats.safetensors import DTYPE_SIZES

__all__ = [
    "ROLES",
    "REPORT_EVERY",
    "SUM_ROW",
    "STATS",
    "Scales",
    "OutScales",
    "Source",
    "zero_source",
    "LowRank",
    "Term",
    "TensorTask",
    "TERM_STATS",
    "DIFF_STATS",
    "stat_names",
    "ExecSettings",
    "ShardTask",
    "ShardResult",
    "digest_key",
    "output_digest_key",
    "COMPUTE_SIZES",
]

ROLES = ("target", "finetuned", "base")
# The spec's ``report`` key -> ``ExecSettings.report_every``. Sampled: every 32nd block of
# ``CPU_BLOCK`` elements of a tensor, its first always (on the 1.1B bench measuring every
# element costs this CPU-bound 2-core machine ~30% of the job's wall time; bench/NOTES.md section 9).
REPORT_EVERY = {"sampled": 32, "exact": 1, "off": 0}
# The report's sums are the same bits whatever the threads, chunk size, executor or resume: each
# measure is summed per row of SUM_ROW elements of its tensor (rows counted from the tensor's first
# element; every chunk of a combined tensor starts on one, ``chunks.iter_chunks``), and the rows'
# sums are added to the tensor's float64 total one at a time, in row order (``sums.OrderedSum``).
# A float32 dot product over a whole block would follow how torch splits it over threads.
SUM_ROW = 128
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


# Bytes per element of each compute dtype (what a chunk's compute buffers hold).
COMPUTE_SIZES = {"float32": 4, "float64": 8}
# Elements per block of CPU work (1 MiB of float32): measured fastest here, 256Ki vs the whole chunk.
CPU_BLOCK = 1 << 18


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

    def splits_at(self, first: int) -> bool:
        """Code rows from ``first`` on have scales of their own: one scale for the whole tensor, or
        ``first`` on a scale-block boundary."""
        return self.numel == 1 or first % self.block[0] == 0

    def rows(self, first: int, count: int, cols: int) -> Scales:
        """The scales of code rows ``[first, first + count)`` (``splits_at(first)``) as those of a
        ``count`` x ``cols`` tensor: a piece of a resized vocabulary, read where its rows are."""
        if self.numel == 1:  # one scale covers any rows
            return replace(self, block=(count, cols))
        bo, row = self.block[0], self.shape[-1] * DTYPE_SIZES[self.dtype]
        lo, hi = first // bo, -(-(first + count) // bo)
        return replace(self, shape=(hi - lo, self.shape[-1]), block=(min(bo, count), self.block[1]),
                       begin=self.begin + lo * row, end=self.begin + hi * row)


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
    # A stored diff's tensor: the sha256 of bytes [begin, end) its manifest records (checked as they
    # stream, before the shard that read them is committed).
    sha256: str | None = None

    @property
    def zero(self) -> bool:
        """Rows this checkpoint lacks (a vocabulary it does not have): read as zeros, nothing read."""
        return not self.file


def zero_source(role: str, dtype: str) -> Source:
    return Source(role, "", dtype, 0, 0)


@dataclass(frozen=True)
class LowRank:
    """A LoRA adapter's change of one 2-D tensor, computed from its two factors instead of read:
    ``scale * sum_k U[:, k] (x) V[k, :]``, the outer products added in ``k`` order and then scaled (the
    same bits however the tensor is cut into chunks), with ``U, V = B, A`` (the change ``B.A``) or
    ``A^T, B^T`` (``transpose``: ``(B.A)^T``, fan-in-fan-out layers and embeddings). ``a`` (``r x n``)
    and ``b`` (``m x r``) are read whole, once per tensor."""

    a: Source
    b: Source
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    scale: float
    transpose: bool = False

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def nbytes(self) -> int:
        return (self.a.end - self.a.begin) + (self.b.end - self.b.begin)


@dataclass(frozen=True)
class Term:
    """One diff applied to a tensor: ``alpha * (finetuned - base)``; ``diff`` is its index in the
    spec's diffs (0 for a single-diff job). A ``base`` with no file (``Source.zero``) is zeros: the
    ``finetuned`` source is then a stored difference (a ``graft diff`` artifact), or, with ``lora``,
    the change a LoRA adapter's factors give (nothing is read for either source). ``scale``: the
    ``finetuned`` rows are multiplied by it first, in the compute dtype (a LoRA bias, whose change
    is ``s * b``; None for every other term)."""

    finetuned: Source
    base: Source
    alpha: float
    diff: int = 0
    lora: LowRank | None = None
    scale: float | None = None


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
    # The inputs (roles) whose every byte read is hashed (``ShardResult.digests``), binding the output
    # to their content where their store does not vouch for each file's sha256: graft diff's
    # fine-tune and base, a transfer's LoRA adapters; a transfer's stored diffs, to check each
    # tensor against the sha256 the diff's manifest records.
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


OUTPUT_DIGEST = "output"


def output_digest_key(file: str, tensor: str) -> str:
    """How ``ShardResult.digests`` names graft diff's output ``tensor`` in ``file`` (its bytes' sha256,
    which the diff's manifest lists for a transfer to check)."""
    return f"{OUTPUT_DIGEST}\t{file}\t{tensor}"
