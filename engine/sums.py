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
    """Adds sum(a * b) over 1-D tensors to one float64 measure, in a fixed order (``SUM_ROW``):
    each row of the call's elements summed in the compute dtype (torch reduces each row of a matrix
    on one thread), then the rows' sums added to the total one by one (cumsum is serial on a CPU).
    The total's bits depend only on the elements and where the rows fall: calls that cut a tensor
    anywhere on its rows give the same bits, whatever torch's thread count. On a GPU the same holds
    for the same cuts (its scan is parallel)."""

    def __init__(self, dtype: torch.dtype, capacity: int, device: torch.device):
        self._cap = max(SUM_ROW, capacity - capacity % SUM_ROW)
        rows = self._cap // SUM_ROW
        self._prod = torch.empty(self._cap, dtype=dtype, device=device)
        self._rows = torch.empty(rows, dtype=dtype, device=device)
        self._seq = torch.empty(2, rows + 1, dtype=torch.float64, device=device)  # the row sums, their scan

    def add(self, total: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> None:
        """``total`` (a 0-dim float64 view of a measure) += sum(a * b), or sum(a * a)."""
        for s in range(0, a.numel(), self._cap):
            x = a[s:s + self._cap]
            self._add(total, x, x if b is None else b[s:s + self._cap])

    def _add(self, total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        n = a.numel()
        full, k = n - n % SUM_ROW, -(-n // SUM_ROW)
        p = torch.mul(a, b, out=self._prod[:n])
        rows = self._rows[:k]
        if full:
            torch.sum(p[:full].view(-1, SUM_ROW), dim=1, out=rows[:full // SUM_ROW])
        if full < n:  # the tensor's last, partial row
            torch.sum(p[full:], dim=0, keepdim=True, out=rows[k - 1:])
        seq, scan = self._seq[0, :k + 1], self._seq[1, :k + 1]
        seq[0].copy_(total)
        seq[1:].copy_(rows)
        torch.cumsum(seq, 0, out=scan)
        total.copy_(scan[k])
