"""A LoRA term's change, formed chunk by chunk from its two factors (``tasks.LowRank``).

``LowRankChange.chunk`` gives the elements ``[start, start + count)`` (row-major) of
``scale * U.V``, ``U`` being ``rows x r`` and ``V`` ``r x cols`` in the compute dtype: each element is
``u_0 v_0``, then ``+ u_k v_k`` for k = 1 .. r-1, then ``* scale``, every product and sum rounded on
its own in ``k`` order (two separate operations, never a fused multiply-add). The bits then do not
depend on the chunk, the block, the threads or the device, which a matrix product's would (its
summation order follows how the library tiles it). A chunk that begins or ends inside a row takes
that part of the row; whole rows go a cache block at a time.
"""
from __future__ import annotations

import torch

__all__ = ["LowRankChange"]


class LowRankChange:
    """The change of a chunk, in buffers reused from chunk to chunk: ``capacity`` elements per LoRA
    term of a tensor (``slot``), and one ``block`` of scratch."""

    def __init__(self, dtype: torch.dtype, capacity: int, block: int, device: torch.device):
        self.dtype, self.capacity, self.block, self.device = dtype, capacity, block, device
        self._out: list[torch.Tensor] = []
        self._tmp = torch.empty(block, dtype=dtype, device=device)

    def chunk(self, slot: int, u: torch.Tensor, v: torch.Tensor, scale: float, start: int,
              count: int) -> torch.Tensor:
        while len(self._out) <= slot:
            self._out.append(torch.empty(self.capacity, dtype=self.dtype, device=self.device))
        out = self._out[slot][:count]
        cols = v.shape[1]
        pos = 0
        while pos < count:
            row, col = divmod(start + pos, cols)
            if col == 0 and count - pos >= cols:  # whole rows, a cache block of them at a time
                rows = min((count - pos) // cols, max(1, self.block // cols))
                self._outer_sum(out[pos:pos + rows * cols].view(rows, cols), u[row:row + rows], v, scale)
                pos += rows * cols
            else:  # the part of one row a chunk begins or ends in
                n = min(cols - col, count - pos)
                self._outer_sum(out[pos:pos + n].view(1, n), u[row:row + 1], v[:, col:col + n], scale)
                pos += n
        return out

    def _outer_sum(self, out: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        tmp = self._tmp[:out.numel()].view(out.shape) if out.numel() <= self.block else torch.empty_like(out)
        torch.mul(u[:, 0:1], v[0:1], out=out)
        for k in range(1, u.shape[1]):
            torch.mul(u[:, k:k + 1], v[k:k + 1], out=tmp)
            out.add_(tmp)
        out.mul_(scale)
