"""The arithmetic: out = target + alpha * (finetuned - base) on one chunk, rounded once to out's dtype.

The operation order is fixed (difference, scale, add target, one final cast) and never fused into
an FMA (``torch.add(..., alpha=)`` may fuse on CPU), so a float64 run is bit-identical to the float64
reference ``(t.double() + alpha * (f.double() - b.double())).to(dtype)``. With several diffs the
change is summed first, left to right, then added to the target:
``c = a1 * (f1 - b1); c = c + a2 * (f2 - b2); ...; out = (c + t).to(dtype)`` (for one diff, the same
operations as above).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import NonFiniteError
from ..plan.tasks import CPU_BLOCK, STATS, TERM_STATS, stat_names
from .lowrank import LowRankChange
from .sums import Measures, OrderedSum, StatsLog, flag_set

__all__ = ["TORCH_DTYPES", "COMPUTE_DTYPES", "CPU_BLOCK", "STATS", "add_stats", "sampled_ranges", "zeros_in",
           "ChunkKernel", "first_nonfinite", "check_finite", "nonfinite_error", "differs_index",
           "term_sums_index"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "C64": torch.complex64,
}
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def first_nonfinite(values: torch.Tensor) -> int | None:
    """Index of the first NaN/Inf in a 1-D floating tensor, or None if all are finite."""
    if values.numel() == 0:
        return None
    if values.dtype.itemsize == 1:  # FP8: isfinite is not implemented for it
        values = values.float()
    # Fast path, one reduction without a temporary: any NaN or Inf makes the sum NaN or Inf, so a
    # finite sum proves every value finite. A non-finite sum may also be an overflow: look closely.
    # Summed in cache-sized blocks: a sum that widens (bf16 -> float32) converts its input first.
    wide = torch.float64 if values.dtype == torch.float64 else torch.float32
    if all(math.isfinite(float(values[s:s + CPU_BLOCK].sum(dtype=wide)))
           for s in range(0, values.numel(), CPU_BLOCK)):
        return None
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


_DIFFERS, _TARGET_SQ, _OUT_DELTA_SQ, _DELTA_SQ = (STATS.index(k) for k in ("differs", "target_sq", "out_delta_sq",
                                                                           "delta_sq"))
_UNCHANGED = STATS.index("unchanged")
_CHANGE = len(STATS)  # with several diffs: the change's sum of squares, then each further diff's measures


def differs_index(term: int) -> int:
    """Where term ``term``'s ``differs`` flag sits in ``tasks.stat_names``."""
    return _DIFFERS if term == 0 else _CHANGE + 1 + (term - 1) * len(TERM_STATS)


def term_sums_index(term: int) -> int:
    """Where term ``term``'s delta_sq, moved_sq, dot and unchanged start in ``tasks.stat_names``."""
    return _DELTA_SQ if term == 0 else differs_index(term) + 1
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def zeros_in(diff: torch.Tensor) -> torch.Tensor | int:
    """Elements of a difference that are +0 (``f == b``; a -0 difference would need f = -0, b = +0)."""
    if diff.device.type == "cpu":  # count_nonzero on the bits: twice as fast as on the floats
        return diff.numel() - int(torch.count_nonzero(diff.view(_INT_OF_SIZE[diff.dtype.itemsize])))
    return (diff == 0).sum()


def _unchanged(f: torch.Tensor, b: torch.Tensor, diff: torch.Tensor, scratch: np.ndarray | None) -> torch.Tensor | int:
    """Elements where the fine-tune kept the base's value: equal bits when both are stored alike
    (numpy's integer compare into ``scratch``, a reused bool buffer: 4x faster here than torch's,
    and no fresh memory per block), else a zero difference."""
    if f.dtype == b.dtype and scratch is not None:
        ints = _INT_OF_SIZE[f.dtype.itemsize]
        same = np.equal(f.view(ints).numpy(), b.view(ints).numpy(), out=scratch[:f.numel()])
        return int(np.count_nonzero(same))
    return zeros_in(diff)


def sampled_ranges(start: int, count: int, every: int) -> list[tuple[int, int]]:
    """The parts of elements ``[start, start + count)`` of a tensor that the report measures, as
    ranges relative to ``start``: the blocks ``k`` of ``CPU_BLOCK`` elements with ``k % every == 0``
    (``every <= 1``: all of them), the same blocks ``ChunkKernel.combine`` measures."""
    if every <= 1:
        return [(0, count)] if count else []
    end, out = start + count, []
    k = start // CPU_BLOCK
    k += -k % every
    while k * CPU_BLOCK < end:
        out.append((max(start, k * CPU_BLOCK) - start, min(end, (k + 1) * CPU_BLOCK) - start))
        k += every
    return out


def _np(x: torch.Tensor, scratch: torch.Tensor) -> np.ndarray:
    """``x`` as a numpy array of its own values: a view, or (bf16, FP8) widened into ``scratch``
    (a float32 buffer, exact for every narrower float)."""
    if x.dtype in (torch.float32, torch.float64, torch.float16):
        return x.numpy()
    return scratch.copy_(x).numpy()


def _out_delta(out: torch.Tensor, tc: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """out - t in ``scratch``, with ``out`` as written (rounded), ``tc`` the target in the compute dtype."""
    if out.dtype == tc.dtype:
        return torch.sub(out, tc, out=scratch)
    scratch.copy_(out)
    return scratch.sub_(tc)


def add_stats(stats: Measures, values: list[torch.Tensor | float | int], flags: tuple[int, ...] = ()) -> None:
    """Add one chunk's ``STATS`` (numbers, or 0-dim tensors on ``stats``' device) to ``stats``; on a
    GPU without waiting for them. ``flags``: the indices that are flags the caller did not know to
    be set (a ``StatsLog``'s chunk cannot know; ``sums.StatsLog.add``)."""
    if isinstance(stats, StatsLog):
        stats.add(values, flags)
    elif stats.device.type == "cpu":
        stats += torch.tensor([float(v) for v in values], dtype=torch.float64)
    else:
        stats += torch.stack([torch.as_tensor(v, device=stats.device).to(torch.float64) for v in values])


class ChunkKernel:
    """Combines 1-D chunks of up to ``capacity`` elements using reusable compute buffers.

    Contract: ``combine(t, f, b, alpha, out)`` with equal-length 1-D tensors of any floating dtypes,
    all on the kernel's device, writes ``t + alpha * (f - b)`` (computed in the compute dtype) into
    ``out`` (the target's dtype). No allocation happens per call on a CPU; on CUDA the work is queued
    on the current stream. With ``stats`` (a float64 tensor of ``len(STATS)`` on the kernel's
    device) it also adds the chunk's ``STATS`` to it: every element on a GPU; on a CPU, with the
    chunk's first element at index ``start`` of its tensor, the elements of every ``every``-th block
    of ``CPU_BLOCK`` elements of the tensor (its first block always; ``every=1``: all). With
    ``check`` (CPU only) it returns the index of the first NaN/Inf it wrote, or None, checking each
    block while in cache.
    """

    def __init__(self, compute_dtype: str, capacity: int, device: str | torch.device = "cpu"):
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        # On a CPU the chunk goes through in cache-sized blocks: every pass of a block then reads
        # what the previous pass left in cache instead of streaming the whole chunk from memory.
        self.on_cpu = torch.device(device).type == "cpu"
        self.block = max(1, min(capacity, CPU_BLOCK) if self.on_cpu else capacity)
        self._diff = torch.empty(self.block, dtype=self.dtype, device=device)
        self._tmp = torch.empty(self.block, dtype=self.dtype, device=device)
        self._t: torch.Tensor | None = None  # the target in the compute dtype, kept for the stats
        self._same: np.ndarray | None = None  # the stats' bit compare (CPU)
        self._acc: torch.Tensor | None = None  # the summed change of several diffs
        self._wide: torch.Tensor | None = None  # graft diff's float64 check of each difference
        self._zeros: dict[torch.dtype, torch.Tensor] = {}
        self._capacity = capacity
        self._ordered: OrderedSum | None = None  # the report's sums of squares and products
        self._lora: LowRankChange | None = None  # LoRA terms' changes of the chunk (``low_rank``)

    def low_rank(self, slot: int, u: torch.Tensor, v: torch.Tensor, scale: float, start: int,
                 count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of a LoRA change ``scale * U.V`` (``lowrank.py``), in a
        buffer of this kernel's for the tensor's ``slot``-th LoRA term."""
        if self._lora is None:
            self._lora = LowRankChange(self.dtype, self._capacity, self.block, self._diff.device)
        return self._lora.chunk(slot, u, v, scale, start, count)

    def _sums(self) -> OrderedSum:
        if self._ordered is None:
            self._ordered = OrderedSum(self.dtype, self.block, self._diff.device)
        return self._ordered

    def zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` zeros of ``dtype`` on the kernel's device, from a buffer kept for the next chunk (rows
        a checkpoint lacks, a stored difference's base)."""
        have = self._zeros.get(dtype)
        if have is None or have.numel() < n:
            have = self._zeros[dtype] = torch.zeros(max(n, self._capacity), dtype=dtype, device=self._diff.device)
        return have[:n]

    def _as_compute(self, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return x
        scratch.copy_(x)  # exact for every narrower float; float64 -> float32 rounds once
        return scratch

    def combine(self, t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float,
                out: torch.Tensor, stats: Measures | None = None, check: bool = False,
                start: int = 0, every: int = 1) -> int | None:
        return self.combine_terms(t, ((f, b, alpha),), out, stats, check, start, every)

    def combine_terms(self, t: torch.Tensor, terms: tuple[tuple[torch.Tensor, torch.Tensor, float], ...],
                      out: torch.Tensor, stats: Measures | None = None, check: bool = False,
                      start: int = 0, every: int = 1) -> int | None:
        """``t + sum_i alpha_i * (f_i - b_i)`` over ``terms`` of ``(f_i, b_i, alpha_i)``; ``stats``
        then holds ``tasks.stat_names(len(terms))``."""
        n = t.numel()
        many = len(terms) > 1
        if many and self._acc is None:
            self._acc = torch.empty_like(self._diff)
        if stats is not None and self._t is None:
            self._t = torch.empty_like(self._diff)
            self._same = np.empty(self.block, dtype=bool) if self.on_cpu else None
        sums = [0.0] * len(stat_names(len(terms))) if stats is not None and self.on_cpu else None
        flags = [differs_index(i) for i in range(len(terms))]
        # A diff found to touch the tensor already need not be looked at again.
        known = [sums is not None and flag_set(stats, k) for k in flags]  # type: ignore[arg-type]
        if sums is not None:
            for k, was in zip(flags, known):
                sums[k] = float(was)
        # Sampled: the blocks of a fixed grid over the tensor, so which elements are measured does
        # not depend on the chunk size (a piece of the chunk never straddles two grid blocks).
        grid = CPU_BLOCK if sums is not None and every > 1 else 0
        s = 0
        while s < n:
            e = min(n, s + self.block)
            measure = stats is not None
            if grid:
                k = (start + s) // grid
                e = min(e, (k + 1) * grid - start)
                measure = k % every == 0
            if many:
                bad = self._combine_many(t[s:e], tuple((f[s:e], b[s:e], a) for f, b, a in terms), out[s:e],
                                         stats if measure else None, sums, check)
            else:
                f, b, alpha = terms[0]
                bad = self._combine(t[s:e], f[s:e], b[s:e], alpha, out[s:e], stats if measure else None,
                                    sums, check)
            if bad is not None:
                return s + bad
            s = e
        if sums is not None and stats is not None:
            sums[0] += n
            for k, was in zip(flags, known):
                if was:
                    sums[k] = 0.0
            add_stats(stats, sums, tuple(flags))  # type: ignore[arg-type]
        return None

    def difference(self, f: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                   stats: Measures | None = None, check: bool = False) -> int | None:
        """``f - b`` computed in the compute dtype into ``out`` (``graft diff``: no target, no alpha:
        exactly the difference a transfer in that dtype computes). With ``stats`` (a float64 tensor
        of ``len(DIFF_STATS)``) every element is measured; ``inexact`` compares ``out`` as written
        with the float64 difference. Returns the first NaN/Inf's index with ``check``, else None."""
        n = f.numel()
        if stats is not None and self._wide is None:
            self._wide = torch.empty(self.block, dtype=torch.float64, device=self._diff.device)
            self._same = np.empty(self.block, dtype=bool) if self.on_cpu else None
        for s in range(0, n, self.block):
            e = min(n, s + self.block)
            m = e - s
            fb, bb, ob = f[s:e], b[s:e], out[s:e]
            d, tmp = self._diff[:m], self._tmp[:m]
            torch.sub(self._as_compute(fb, d), self._as_compute(bb, tmp), out=d)
            ob.copy_(d)  # one rounding, where the output dtype is narrower (bf16)
            if stats is not None:
                unchanged = _unchanged(fb, bb, d, self._same)
                self._sums().add(stats, 2, ob if ob.dtype == self.dtype else tmp.copy_(ob))  # DIFF_STATS' delta_sq
                add_stats(stats, [m, unchanged < m, 0, unchanged, self._inexact(fb, bb, ob)])
            if check:
                bad = first_nonfinite(ob)
                if bad is not None:
                    return s + bad
        return None

    def _inexact(self, f: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor | int:
        """Elements of ``out`` (a difference as written) that are not the float64 f - b: where a
        float64 transfer from it would not compute what the three-checkpoint one does. Uses
        ``_diff`` and ``_tmp`` as scratch (after ``out`` is written)."""
        assert self._wide is not None
        m = f.numel()
        exact = self._wide[:m]
        if not self.on_cpu:  # same-dtype operands: torch's mixed-dtype compare is 8x slower
            exact.copy_(f)
            exact.sub_(b.to(torch.float64))
            return torch.ne(exact, out.to(torch.float64)).sum()
        # numpy: a float64 subtract and a widening compare in one pass each (4x faster here than
        # torch's copies and mixed-dtype ops); bf16 has no numpy dtype: widened exactly to float32.
        x = exact.numpy()
        np.subtract(_np(f, self._diff[:m]), _np(b, self._tmp[:m]), out=x, dtype=np.float64)
        assert self._same is not None
        return int(np.count_nonzero(np.not_equal(x, _np(out, self._tmp[:m]), out=self._same[:m])))

    def _combine(self, t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float,
                 out: torch.Tensor, stats: Measures | None, sums: list[float] | None,
                 check: bool) -> int | None:
        """One block; measured when ``stats`` is given. ``sums``: a CPU call's running STATS (its
        ``differs`` is looked for in every block until found)."""
        n = t.numel()
        diff, tmp = self._diff[:n], self._tmp[:n]
        fc = self._as_compute(f, diff)
        bc = self._as_compute(b, tmp)
        torch.sub(fc, bc, out=diff)
        if stats is None:
            if sums is not None and not sums[_DIFFERS] and bool(diff.any()):
                sums[_DIFFERS] = 1.0
            if alpha != 1.0:
                diff.mul_(alpha)
            diff.add_(self._as_compute(t, tmp))
            out.copy_(diff)  # the one rounding to the target's dtype (round-to-nearest-even)
            return first_nonfinite(out) if check else None
        assert self._t is not None
        tc = self._as_compute(t, self._t[:n])
        moved = torch.sub(tc, bc, out=tmp)
        ordered = self._sums()
        ordered.rows(_TARGET_SQ, tc)
        self._term_rows(0, diff, moved)
        unchanged = _unchanged(f, b, diff, self._same)
        if alpha != 1.0:
            diff.mul_(alpha)
        diff.add_(tc)
        out.copy_(diff)  # the one rounding to the target's dtype (round-to-nearest-even)
        ordered.rows(_OUT_DELTA_SQ, _out_delta(out, tc, tmp))
        ordered.flush(stats)
        if sums is None:  # on a GPU: counted on the device, read once the shard is done
            add_stats(stats, [n, n, unchanged < n, *[0] * (_UNCHANGED - 3), unchanged])
            return None
        sums[1] += n
        sums[_UNCHANGED] += unchanged
        if unchanged < n:
            sums[_DIFFERS] = 1.0
        # A NaN/Inf in out makes (out - t)^2 summed non-finite; a finite sum proves out finite.
        if check and not _out_delta_finite(stats):
            return first_nonfinite(out)
        return None

    def _term_rows(self, term: int, d: torch.Tensor, moved: torch.Tensor) -> None:
        """A diff's sums of (f - b)^2, (t - b)^2 and (f - b)(t - b) (``term_sums_index``), pending."""
        at, ordered = term_sums_index(term), self._sums()
        ordered.rows(at, d)
        ordered.rows(at + 1, moved)
        ordered.rows(at + 2, d, moved)

    def _combine_many(self, t: torch.Tensor, terms: tuple[tuple[torch.Tensor, torch.Tensor, float], ...],
                      out: torch.Tensor, stats: Measures | None, sums: list[float] | None,
                      check: bool) -> int | None:
        """One block of several diffs: the change summed in ``_acc``, left to right, then the target
        added and one rounding. Measured like ``_combine`` when ``stats`` is given."""
        n = t.numel()
        acc, diff, tmp = self._acc[:n], self._diff[:n], self._tmp[:n]  # type: ignore[index]
        tc = self._as_compute(t, self._t[:n]) if stats is not None else None  # type: ignore[index]
        values: list[Any] = [0.0] * len(stat_names(len(terms)))
        flags = [differs_index(i) for i in range(len(terms))]
        for i, (f, b, alpha) in enumerate(terms):
            d = acc if i == 0 else diff
            fc = self._as_compute(f, d)
            bc = self._as_compute(b, tmp)
            torch.sub(fc, bc, out=d)
            flag = flags[i]
            if stats is not None:
                assert tc is not None
                moved = torch.sub(tc, bc, out=tmp)
                unchanged = _unchanged(f, b, d, self._same)
                self._term_rows(i, d, moved)
                values[term_sums_index(i) + 3] = unchanged
                values[flag] = unchanged < n
            elif sums is not None and not sums[flag] and bool(d.any()):
                sums[flag] = 1.0
            if alpha != 1.0:
                d.mul_(alpha)
            if i:
                acc.add_(diff)
        if stats is not None:
            self._sums().rows(_CHANGE, acc)
        if tc is None:
            tc = self._as_compute(t, tmp)
        acc.add_(tc)
        out.copy_(acc)  # the one rounding to the target's dtype (round-to-nearest-even)
        if stats is None:
            return first_nonfinite(out) if check else None
        self._sums().rows(_TARGET_SQ, tc)
        self._sums().rows(_OUT_DELTA_SQ, _out_delta(out, tc, tmp))
        self._sums().flush(stats)
        values[0] = values[1] = n
        if sums is None:  # on a GPU: counted on the device, read once the shard is done
            add_stats(stats, values)
            return None
        values[0] = 0
        for i, v in enumerate(values):
            if i in flags:  # whether the diff touched the tensor: set, not summed
                if v:
                    sums[i] = 1.0
            else:
                sums[i] += float(v)
        if check and not _out_delta_finite(stats):
            return first_nonfinite(out)
        return None


def _out_delta_finite(stats: Measures) -> bool:
    """Whether the sum of (out - t)^2 so far is finite (a NaN/Inf in out makes it NaN/Inf): of the
    block just recorded in a ``StatsLog``, of the running total in a measures tensor."""
    if isinstance(stats, StatsLog):
        return stats.last_finite(_OUT_DELTA_SQ)
    return math.isfinite(float(stats[_OUT_DELTA_SQ]))


def check_finite(values: torch.Tensor, tensor: str, where: str, offset: int) -> None:
    """Raise ``NonFiniteError`` naming ``tensor`` if ``values`` (elements from ``offset``) hold NaN/Inf."""
    bad = first_nonfinite(values)
    if bad is not None:
        raise nonfinite_error(values[bad].item(), tensor, where, offset + bad)


def nonfinite_error(value: float, tensor: str, where: str, element: int) -> NonFiniteError:
    return NonFiniteError(f"tensor {tensor!r} in {where}: {value} at element {element}; check the "
                          f"inputs, or set allow_nonfinite: true to write it anyway")
