"""Scaled FP8: decode codes to real values, encode real values to codes and scales, on any device.

A scaled FP8 tensor is codes (F8_E4M3 or F8_E5M2, 2-D ``[rows, cols]``) plus one scale per block of
``block = (bo, bi)`` codes (``[ceil(rows/bo), ceil(cols/bi)]`` scales; edge blocks may be partial; a
per-tensor scale is one block covering everything, a per-channel scale blocks of ``(1, cols)``).
The real value of a code is ``code x scale`` (DeepSeek-V3's ``weight_scale_inv`` and
compressed-tensors' ``weight_scale`` both multiply).

The encoding rule (docs/quantized.md), for a block of real values ``W`` computed in the
compute dtype::

    amax   = max |W| over the block
    scale  = scale_dtype(float32(amax / FMAX))      FMAX = 448 (E4M3) or 57344 (E5M2)
             (scale_fmt ue8m0: amax / FMAX rounded up to a power of two first)
    scale  = 1 where that is 0 (an all-zero block, or an amax so small the scale underflows)
    code   = code_dtype(float32(clamp(W / compute(scale), -FMAX, FMAX)))

Every cast rounds to nearest even. The float32 steps are explicit because torch's own casts from
float64 to BF16 or FP8 go through float32 anyway; writing them out keeps CPU and GPU identical.
Only non-finite values are refused: a block holding NaN or Inf has no honest scale.

Order of use: ``Transcoder(compute_dtype, capacity, device)``, then ``run(...)`` once per chunk of
whole rows (see ``graft.engine.plan.tasks.Chunk``).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..errors import NonFiniteError
from .kernel import (COMPUTE_DTYPES, CPU_BLOCK, TORCH_DTYPES, add_stats, differs_index, sampled_ranges,
                     term_sums_index, zeros_in)
from ..plan.chunks import Chunk
from ..plan.tasks import STATS, Source, stat_names
from .sums import Measures, OrderedSum, flag_set

__all__ = ["FP8_MAX", "decode_into", "block_amax", "scales_from_amax", "encode_into", "TensorScales", "Transcoder"]

FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
_CODE_NAMES = {TORCH_DTYPES[name]: name for name in FP8_MAX}


def _expand_rows(scales: torch.Tensor, bo: int, row_in: int, rows: int) -> torch.Tensor:
    """One scale row per code row: ``scales`` rows cover blocks of ``bo`` code rows, the first of
    which starts ``row_in`` rows before the chunk's first row. Small: rows x (cols / bi)."""
    if bo == 1:
        return scales[:rows]
    return scales.repeat_interleave(bo, dim=0)[row_in:row_in + rows]


def _blockwise(x: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], row_in: int,
               divide: bool) -> None:
    """``x`` (``[rows, cols]``) multiplied (or divided) in place by the scale of each element's block."""
    rows, cols = x.shape
    bi = block[1]
    per_row = _expand_rows(scales, block[0], row_in, rows)
    full = cols // bi
    op = torch.Tensor.div_ if divide else torch.Tensor.mul_
    if full:
        op(x[:, :full * bi].view(rows, full, bi), per_row[:, :full].unsqueeze(2))
    if cols > full * bi:
        op(x[:, full * bi:], per_row[:, full:full + 1])


def _code_table(code_dtype: torch.dtype, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The value of each of the 256 FP8 codes, by torch's own conversion (so exactly the same)."""
    return torch.arange(256, dtype=torch.uint8).view(code_dtype).to(dtype).to(device)


def decode_into(out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor | None,
                block: tuple[int, int] | None, row_in: int = 0,
                index: torch.Tensor | None = None, table: torch.Tensor | None = None) -> None:
    """Real values of ``codes`` (``[rows, cols]``, any float dtype) into ``out`` (compute dtype).

    ``scales`` (``[scale rows, scale cols]``) are the scale rows this chunk's rows fall in; without
    them the codes are plain values. Exact in float64 (an FP8 code times an F32 scale needs at most
    28 significant bits); in float32 the product rounds once. FP8 codes are looked up in ``table``
    (``_code_table``) through the int32 ``index`` scratch when both are given: the same values as
    a cast, four times faster on a CPU.
    """
    if table is not None and index is not None and codes.dtype in _CODE_NAMES:
        index.view(codes.shape).copy_(codes.view(torch.uint8))
        torch.index_select(table, 0, index, out=out.view(-1))
    else:
        out.copy_(codes)
    if scales is not None and block is not None:
        _blockwise(out, scales.to(out.dtype), block, row_in, divide=False)


def block_amax(x: torch.Tensor, block: tuple[int, int], scratch: torch.Tensor) -> torch.Tensor:
    """max |x| per block of ``x`` (``[rows, cols]``, rows starting at a block boundary); ``scratch``
    (same shape and dtype) receives |x|. Returns ``[ceil(rows/bo), ceil(cols/bi)]``; NaN propagates."""
    rows, cols = x.shape
    bo, bi = block
    torch.abs(x, out=scratch)
    full = cols // bi
    parts = []
    if full:
        parts.append(scratch[:, :full * bi].view(rows, full, bi).amax(dim=2))
    if cols > full * bi:
        parts.append(scratch[:, full * bi:].amax(dim=1, keepdim=True))
    per_row = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if bo == 1:
        return per_row
    whole = rows // bo
    parts = []
    if whole:
        parts.append(per_row[:whole * bo].view(whole, bo, -1).amax(dim=1))
    if rows > whole * bo:
        parts.append(per_row[whole * bo:].amax(dim=0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def scales_from_amax(amax: torch.Tensor, code_dtype: str, scale_dtype: str, pow2: bool = False) -> torch.Tensor:
    """The stored scales (``scale_dtype``) for blocks of the given amax (compute dtype); ``pow2``:
    each rounded up to the nearest power of two (scale_fmt ue8m0), so no code saturates."""
    scales = amax / FP8_MAX[code_dtype]
    if pow2:
        mantissa, exponent = torch.frexp(scales)  # scales = mantissa * 2**exponent, mantissa in [0.5, 1)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # already a power of two
        scales = torch.ldexp(torch.ones_like(scales), exponent)  # 0 (an all-zero block) becomes 1
    scales = scales.to(torch.float32).to(TORCH_DTYPES[scale_dtype])
    return scales.masked_fill_(scales == 0, 1.0)


def encode_into(codes: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                row_in: int, scratch32: torch.Tensor) -> None:
    """FP8 ``codes`` of ``x`` (compute dtype, divided in place) with the stored ``scales``.

    ``scratch32`` is a float32 ``[rows, cols]`` buffer for the explicit float32 step; it may be
    ``x`` itself when ``x`` is float32.
    """
    fmax = FP8_MAX[_CODE_NAMES[codes.dtype]]
    _blockwise(x, scales.to(x.dtype), block, row_in, divide=True)
    x.clamp_(-fmax, fmax)
    if scratch32 is not x:
        scratch32.copy_(x)
    codes.copy_(scratch32)



class TensorScales:
    """The one scale of each tensor written with a per-tensor scale over several chunks, shared by
    the transcoders of one shard's compute threads: its measure chunks' amax (the max is the same
    whatever order they finish in), then the scale made from it once, for every write chunk."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._amax: dict[str, torch.Tensor] = {}
        self._fixed: dict[str, torch.Tensor] = {}

    def measured(self, name: str, amax: torch.Tensor) -> None:
        with self._lock:
            prev = self._amax.get(name)
            self._amax[name] = amax if prev is None else torch.maximum(prev, amax)

    def known(self, name: str) -> bool:
        """Whether ``name`` was measured (its chunks carry one scale), once its measure chunks are done."""
        with self._lock:
            return name in self._amax or name in self._fixed

    def scale(self, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The scale ``make(amax)`` of ``name``, made once (kept for the shard's life: its chunks
        may finish in any order; one 1x1 tensor each)."""
        with self._lock:
            if name not in self._fixed:
                self._fixed[name] = make(self._amax[name])
            return self._fixed[name]


class Transcoder:
    """Computes codec chunks (``Chunk.tensor.transcodes``) with reusable compute buffers.

    ``run(chunk, inputs, out)``: ``inputs`` maps ``(role, "codes" | "scales")`` to 1-D typed tensors
    holding exactly what ``chunk.reads()`` read, on this transcoder's device; ``out`` receives the
    chunk's output values (codes or plain). Returns the output scale tensor's rows that the chunk
    covers (``chunk.scale_rows(tensor.scales)``), or None for a plain output and a measure chunk.

    A tensor written with one per-tensor scale over several chunks arrives as measure chunks, then
    write chunks: the measure chunks only accumulate its amax.
    """

    def __init__(self, compute_dtype: str, capacity: int, device: str | torch.device = "cpu",
                 scales: TensorScales | None = None):
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        self.device = torch.device(device)
        # Shared with the shard's other transcoders, whose threads compute its other chunks.
        self.scales = scales or TensorScales()
        self._a = torch.empty(capacity, dtype=self.dtype, device=self.device)
        self._b = torch.empty(capacity, dtype=self.dtype, device=self.device)
        self._c: torch.Tensor | None = None  # the decoded target, for the transfer report
        self._d: torch.Tensor | None = None  # a further diff's difference
        self._sums: OrderedSum | None = None  # the report's sums, in their fixed order
        self._capacity = capacity
        self._index = torch.empty(capacity, dtype=torch.int32, device=self.device)
        self._tables = {code: _code_table(code, self.dtype, self.device) for code in _CODE_NAMES}

    def _decode(self, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor], src: Source,
                into: torch.Tensor) -> None:
        t = chunk.tensor
        if src.zero:  # a stored difference's base: zeros
            into.zero_()
            return
        rows, cols = chunk.rows[1], t.shape[1]
        codes = inputs[(src.role, "codes")].view(rows, cols)
        index, table = self._index[:rows * cols], self._tables.get(codes.dtype)
        if src.scales is None:
            decode_into(into, codes, None, None, 0, index, table)
            return
        lo, _ = chunk.scale_rows(src.scales)
        grid_cols = src.scales.grid(*t.shape)[1]
        scales = inputs[(src.role, "scales")].view(-1, grid_cols)
        decode_into(into, codes, scales, src.scales.block, chunk.rows[0] - lo * src.scales.block[0],
                    index, table)

    def _sum(self, stats: Measures, at: int, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """``stats[at]`` += sum(a * b) in the report's fixed order (``sums.OrderedSum``)."""
        if self._sums is None:
            cap = self._capacity if self.device.type != "cpu" else min(self._capacity, CPU_BLOCK)
            self._sums = OrderedSum(self.dtype, cap, self.device)
        self._sums.add(stats, at, a, b)

    def values(self, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor],
               ranges: list[tuple[int, int]] | None = None,
               parts: dict[str, list] | None = None,
               look: tuple[bool, ...] = (), stats: Measures | None = None) -> torch.Tensor:
        """t + sum_i alpha_i * (f_i - b_i) over the chunk's rows (or t alone), in the compute dtype;
        the same operation order as ``ChunkKernel``: each difference, scaled, summed left to right,
        then the target added. With ``ranges`` (of a combined tensor; ``kernel.sampled_ranges``)
        the sums of target_sq, change_sq and each diff's delta_sq, moved_sq and dot are added to
        ``stats`` (``tasks.stat_names``), and ``parts`` gets, per range, ``common`` [elements] and,
        per diff, ``terms`` [unchanged]; and ``differs``, whether any element of each diff differs
        (looked for only where ``look`` says). The decoded target is left in
        ``self._c`` for ``run`` to measure the output against."""
        t = chunk.tensor
        rows, cols = chunk.rows[1], t.shape[1]
        acc = self._a[:rows * cols].view(rows, cols)
        tmp = self._b[:rows * cols].view(rows, cols)
        if not t.combine:
            self._decode(chunk, inputs, t.target, acc)
            return acc
        measuring = ranges is not None and parts is not None and stats is not None
        target = tmp
        if measuring:
            if self._c is None:
                self._c = torch.empty_like(self._a)
            target = self._c[:rows * cols].view(rows, cols)
            self._decode(chunk, inputs, t.target, target)
            parts.update(differs=[], terms=[], common=[])  # type: ignore[union-attr]
        for i, term in enumerate(t.terms):
            if i == 0:
                d = acc
            else:
                if self._d is None:
                    self._d = torch.empty_like(self._a)
                d = self._d[:rows * cols].view(rows, cols)
            self._decode(chunk, inputs, term.finetuned, d)
            self._decode(chunk, inputs, term.base, tmp)
            d.sub_(tmp)
            if measuring:
                assert parts is not None and ranges is not None
                dv, tv, bv = d.view(-1), target.view(-1), tmp.view(-1)
                parts["differs"].append(dv.any() if i < len(look) and look[i] else 0)
                got = []
                for lo, hi in ranges:
                    moved = torch.sub(tv[lo:hi], bv[lo:hi], out=bv[lo:hi])  # the base is not needed after
                    dr = dv[lo:hi]
                    at = term_sums_index(i)
                    self._sum(stats, at, dr)  # type: ignore[arg-type]
                    self._sum(stats, at + 1, moved)  # type: ignore[arg-type]
                    self._sum(stats, at + 2, dr, moved)  # type: ignore[arg-type]
                    got.append([zeros_in(dr)])
                parts["terms"].append(got)
            if term.alpha != 1.0:
                d.mul_(term.alpha)
            if i:
                acc.add_(d)
        if measuring:
            assert parts is not None and ranges is not None
            av, tv = acc.view(-1), target.view(-1)
            for lo, hi in ranges:
                self._sum(stats, STATS.index("target_sq"), tv[lo:hi])  # type: ignore[arg-type]
                if len(t.terms) > 1:
                    self._sum(stats, len(STATS), av[lo:hi])  # type: ignore[arg-type]  # change_sq
            parts["common"] = [[hi - lo] for lo, hi in ranges]
        elif t.adds_target:
            self._decode(chunk, inputs, t.target, target)
        if t.adds_target:  # (graft diff writes the difference alone)
            acc.add_(target)
        return acc

    def _add_measures(self, stats: Measures, parts: dict[str, list], ranges: list[tuple[int, int]],
                      terms: int, result: torch.Tensor | None) -> None:
        """Add a chunk's measures to ``stats`` (laid out as ``tasks.stat_names(terms)``): ``parts``
        counts per measured range (from ``values``), plus (out - t)^2 over those ranges from
        ``result`` (the rounded output, or an FP8 output's codes decoded with their scales)."""
        assert result is not None and self._c is not None
        names = stat_names(terms)
        sums: list[torch.Tensor | float | int] = [0] * len(names)
        sums[0] = result.numel()
        measured, out_delta = names.index("measured"), names.index("out_delta_sq")
        for r, (lo, hi) in enumerate(ranges):
            sums[measured] = sums[measured] + parts["common"][r][0]
            change = self._b[lo:hi]
            change.copy_(result[lo:hi])
            change.sub_(self._c[lo:hi])
            self._sum(stats, out_delta, change)
            for i in range(terms):
                unchanged = term_sums_index(i) + 3
                sums[unchanged] = sums[unchanged] + parts["terms"][i][r][0]
        for i in range(terms):
            sums[differs_index(i)] = parts["differs"][i]
        add_stats(stats, sums, tuple(differs_index(i) for i in range(terms)))

    def run(self, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor],
            out: torch.Tensor | None, where: str, stats: Measures | None = None,
            every: int = 1) -> torch.Tensor | None:
        """One chunk; with ``stats`` (a combined tensor's float64 ``STATS`` on this device) the
        chunk's measures are added there, over the blocks ``kernel.sampled_ranges(..., every)``
        picks: for an FP8 output, (out - t) is measured on the written codes, decoded."""
        t = chunk.tensor
        measuring = stats is not None and t.combine and t.adds_target and not chunk.measure
        ranges = sampled_ranges(chunk.start, chunk.count, every) if measuring else None
        parts: dict[str, list] = {}
        # Whether each diff touched the tensor is looked for until known (on a GPU: every chunk).
        on_cpu = stats is not None and (not isinstance(stats, torch.Tensor) or stats.device.type == "cpu")
        look = tuple(not (measuring and on_cpu and flag_set(stats, differs_index(i)))  # type: ignore[arg-type]
                     for i in range(len(t.terms)))
        w = self.values(chunk, inputs, ranges, parts, look, stats if measuring else None)
        rows, cols = w.shape
        if t.scales is None:
            assert out is not None
            out.view(rows, cols).copy_(w)  # the one rounding to a plain output dtype
            if measuring:
                assert stats is not None
                self._add_measures(stats, parts, ranges or [], len(t.terms), out)
            return None
        scratch = self._b[:rows * cols].view(rows, cols)
        # Measured over several chunks first; a per-tensor scale over one chunk is just one block.
        if chunk.measure:
            self.scales.measured(t.name, torch.abs(w, out=scratch).amax().reshape(1, 1))
            return None
        assert out is not None
        if self.scales.known(t.name):  # the scale the measure chunks found, the same for every chunk
            def make(amax: torch.Tensor) -> torch.Tensor:
                _check_amax(amax, t.name, where)
                return scales_from_amax(amax, t.dtype, t.scales.dtype, t.scales.pow2)

            scales = self.scales.scale(t.name, make)
            row_in = chunk.rows[0]
        else:
            amax = block_amax(w, t.scales.block, scratch)
            _check_amax(amax, t.name, where)
            scales = scales_from_amax(amax, t.dtype, t.scales.dtype, t.scales.pow2)
            row_in = 0
        scratch32 = w if w.dtype == torch.float32 else self._b.view(torch.float32)[:rows * cols].view(rows, cols)
        codes = out.view(rows, cols)
        encode_into(codes, w, scales, t.scales.block, row_in, scratch32)
        if measuring:
            # (out - t) on what is written: the codes decoded with their new scales (rounding to FP8
            # can keep every code of the target, and the report must say so); only the measured rows.
            assert stats is not None
            for lo, hi in ranges or []:
                r0, r1 = lo // cols, -(-hi // cols)
                decode_into(w[r0:r1], codes[r0:r1], scales, t.scales.block, row_in + r0,
                            self._index[:(r1 - r0) * cols], self._tables[codes.dtype])
            self._add_measures(stats, parts, ranges or [], len(t.terms), w.view(-1))
        return scales


def _check_amax(amax: torch.Tensor, tensor: str, where: str) -> None:
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteError(f"tensor {tensor!r} in {where}: NaN or Inf in the result, which FP8 "
                             f"codes with a finite block scale cannot hold; check the inputs, or write "
                             f"it with output_format: bf16 and allow_nonfinite: true")
