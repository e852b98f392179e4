"""The transfer report's sums in one fixed order, so that the same tensor gives the same bits.

``OrderedSum`` adds sum(a * b) to a float64 measure row by row (``tasks.SUM_ROW`` elements of the
tensor a row): the report is then the same file whatever torch's thread count, the chunk size, the
executor, the workers or a resume (a float32 dot product over a block follows how torch splits it
over threads, and sums per chunk follow the chunk size).

``StatsLog`` lets the chunks of one tensor be computed at once on several threads: each chunk's
additions are recorded, then applied to the tensor's measures in chunk order, doing exactly the
operations a chunk computed alone would have done on them (so the bits are the same).
"""
from __future__ import annotations

import torch

from ..plan.tasks import SUM_ROW

__all__ = ["OrderedSum", "StatsLog", "flag_set", "Measures"]


class OrderedSum:
    """Adds sums of products to float64 measures in a fixed order (``SUM_ROW``): each row of a
    call's elements summed in the compute dtype (torch reduces each row of a matrix on one thread),
    then the rows' sums added to the measure one by one (cumsum is serial on a CPU). A measure's
    bits depend only on the elements and where the rows fall: calls that cut a tensor anywhere on
    its rows give the same bits, whatever torch's thread count. On a GPU the same holds for the same
    cuts (its scan is parallel).

    Order of use: ``rows(at, a, b)`` for each measure of one block (at most ``capacity``
    elements, the same count for each), then ``flush(stats)``; or ``add(stats, at, a, b)`` alone
    for any length. One scan per block for all its measures keeps the cost near a dot product's.
    """

    def __init__(self, dtype: torch.dtype, capacity: int, device: torch.device):
        self._cap = -(-max(1, capacity) // SUM_ROW) * SUM_ROW
        self._prod = torch.empty(self._cap, dtype=dtype, device=device)
        self._rows = torch.empty(0, self._cap // SUM_ROW, dtype=dtype, device=device)
        self._seq = torch.empty(0, device=device)
        self._at: list[int] = []  # the measure each pending row of ``_rows`` goes to
        self._n = 0
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def rows(self, at: int, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """Sum a * b (or a * a) row by row, for measure ``at``, until ``flush``."""
        n, i = a.numel(), len(self._at)
        if i == self._rows.shape[0]:  # one more measure than so far: the buffers grow, once
            grown = torch.empty(i + 1, self._rows.shape[1], dtype=self._rows.dtype, device=self._rows.device)
            grown[:i].copy_(self._rows)
            self._rows = grown
            self._seq = torch.empty(2, i + 1, self._rows.shape[1] + 1, dtype=torch.float64, device=self._rows.device)
        self._at.append(at)
        self._n = n
        full, k = n - n % SUM_ROW, -(-n // SUM_ROW)
        p = torch.mul(a, a if b is None else b, out=self._prod[:n])
        rows = self._rows[i, :k]
        if full:
            torch.sum(p[:full].view(-1, SUM_ROW), dim=1, out=rows[:full // SUM_ROW])
        if full < n:  # the tensor's last, partial row
            torch.sum(p[full:], dim=0, keepdim=True, out=rows[k - 1:])

    def flush(self, stats: Measures) -> None:
        """Add the pending rows' sums to ``stats`` (float64), each measure's in row order."""
        m, k = len(self._at), -(-self._n // SUM_ROW)
        if not m:
            return
        key = tuple(self._at)
        if isinstance(stats, StatsLog):
            stats.scan(key, self._rows[:m, :k])
            self._at.clear()
            return
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(key, device=stats.device)
        seq, scan = self._seq[0, :m, :k + 1], self._seq[1, :m, :k + 1]
        seq[:, 0].copy_(stats.index_select(0, index))
        seq[:, 1:].copy_(self._rows[:m, :k])
        torch.cumsum(seq, 1, out=scan)
        stats.index_copy_(0, index, scan[:, k])
        self._at.clear()

    def add(self, stats: Measures, at: int, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """``stats[at]`` += sum(a * b), or sum(a * a), of any length."""
        for s in range(0, a.numel(), self._cap):
            x = a[s:s + self._cap]
            self.rows(at, x, None if b is None else b[s:s + self._cap])
            self.flush(stats)


class StatsLog:
    """One chunk's additions to a tensor's float64 measures, recorded to be applied later with
    ``apply``, in chunk order, by whoever owns the measures (``execute``'s ordered stage).

    ``scan`` records an ``OrderedSum.flush`` (the rows' sums, copied), ``add`` a plain addition
    (counts; ``flags``: indices that say whether something was seen, added only where the measure
    is still 0, as a chunk computed in order would have skipped them once known). Meanwhile the
    chunk knows no flag (``flag_set`` is False) and can ask whether the last rows it recorded for a
    measure are finite (``last_finite``), where in order it would have looked at the running total.
    """

    def __init__(self) -> None:
        self._ops: list[tuple[tuple[int, ...], torch.Tensor] | tuple[list[float], tuple[int, ...]]] = []
        self._last: dict[int, torch.Tensor] = {}

    def scan(self, at: tuple[int, ...], rows: torch.Tensor) -> None:
        kept = rows.clone()
        self._ops.append((at, kept))
        for i, k in enumerate(at):
            self._last[k] = kept[i]

    def add(self, values: list[torch.Tensor | float | int], flags: tuple[int, ...] = ()) -> None:
        self._ops.append(([float(v) for v in values], flags))

    def last_finite(self, at: int) -> bool:
        rows = self._last.get(at)
        return rows is None or bool(torch.isfinite(rows.sum(dtype=torch.float64)))

    def apply(self, stats: torch.Tensor) -> None:
        """The recorded additions, in the order recorded, on ``stats`` (float64, on the CPU)."""
        for op in self._ops:
            if isinstance(op[1], torch.Tensor):
                at, rows = op
                index = torch.tensor(at)
                seq = torch.empty(rows.shape[0], rows.shape[1] + 1, dtype=torch.float64)
                seq[:, 0].copy_(stats.index_select(0, index))
                seq[:, 1:].copy_(rows)
                stats.index_copy_(0, index, torch.cumsum(seq, 1)[:, -1])
            else:
                values, flags = op
                for k in flags:
                    if stats[k]:
                        values[k] = 0.0
                stats += torch.tensor(values, dtype=torch.float64)
        self._ops.clear()
        self._last.clear()


Measures = torch.Tensor | StatsLog


def flag_set(stats: Measures, k: int) -> bool:
    """Whether flag measure ``k`` is already set (a ``StatsLog`` knows none)."""
    return not isinstance(stats, StatsLog) and bool(stats[k])
