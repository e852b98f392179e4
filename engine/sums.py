"""The transfer report's sums in one fixed order, so that the same tensor gives the same bits.

``OrderedSum`` adds sum(a * b) to a float64 measure row by row (``tasks.SUM_ROW`` elements of the
tensor a row): the report is then the same file whatever torch's thread count, the chunk size, the
executor, the workers or a resume (a float32 dot product over a block follows how torch splits it
over threads, and sums per chunk follow the chunk size).
"""
from __future__ import annotations

import torch

from .tasks import SUM_ROW

__all__ = ["OrderedSum"]


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

    def flush(self, stats: torch.Tensor) -> None:
        """Add the pending rows' sums to ``stats`` (float64), each measure's in row order."""
        m, k = len(self._at), -(-self._n // SUM_ROW)
        if not m:
            return
        key = tuple(self._at)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(key, device=stats.device)
        seq, scan = self._seq[0, :m, :k + 1], self._seq[1, :m, :k + 1]
        seq[:, 0].copy_(stats.index_select(0, index))
        seq[:, 1:].copy_(self._rows[:m, :k])
        torch.cumsum(seq, 1, out=scan)
        stats.index_copy_(0, index, scan[:, k])
        self._at.clear()

    def add(self, stats: torch.Tensor, at: int, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """``stats[at]`` += sum(a * b), or sum(a * a), of any length."""
        for s in range(0, a.numel(), self._cap):
            x = a[s:s + self._cap]
            self.rows(at, x, None if b is None else b[s:s + self._cap])
            self.flush(stats)
