"""The arithmetic: out = target + alpha * (finetuned - base) on one chunk, rounded once to out's dtype.

The operation order is fixed (difference, scale, add target, one final cast) and never fused into
an FMA (``torch.add(..., alpha=)`` may fuse on CPU), so a float64 run is bit-identical to the float64
reference ``(t.double() + alpha * (f.double() - b.double())).to(dtype)``.
"""
from __future__ import annotations

import math

import torch

from .errors import NonFiniteError

__all__ = ["TORCH_DTYPES", "COMPUTE_DTYPES", "CPU_BLOCK", "ChunkKernel", "first_nonfinite", "check_finite"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "C64": torch.complex64,
}
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
# Elements per block of CPU work (1 MiB of float32): measured fastest here, 256Ki vs the whole chunk.
CPU_BLOCK = 1 << 18


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


class ChunkKernel:
    """Combines 1-D chunks of up to ``capacity`` elements using two reusable compute buffers.

    Contract: ``combine(t, f, b, alpha, out)`` with equal-length 1-D tensors of any floating dtypes,
    all on the kernel's device, writes ``t + alpha * (f - b)`` (computed in the compute dtype) into
    ``out`` (the target's dtype). No allocation happens per call; on CUDA the work is queued on the
    current stream.
    """

    def __init__(self, compute_dtype: str, capacity: int, device: str | torch.device = "cpu"):
        self.dtype = COMPUTE_DTYPES[compute_dtype]
        # On a CPU the chunk goes through in cache-sized blocks: every pass of a block then reads
        # what the previous pass left in cache instead of streaming the whole chunk from memory.
        on_cpu = torch.device(device).type == "cpu"
        self.block = max(1, min(capacity, CPU_BLOCK) if on_cpu else capacity)
        self._diff = torch.empty(self.block, dtype=self.dtype, device=device)
        self._tmp = torch.empty(self.block, dtype=self.dtype, device=device)

    def _as_compute(self, x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype:
            return x
        scratch.copy_(x)  # exact for every narrower float; float64 -> float32 rounds once
        return scratch

    def combine(self, t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float,
                out: torch.Tensor) -> None:
        n = t.numel()
        for s in range(0, n, self.block):
            e = min(n, s + self.block)
            self._combine(t[s:e], f[s:e], b[s:e], alpha, out[s:e])

    def _combine(self, t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, alpha: float,
                 out: torch.Tensor) -> None:
        n = t.numel()
        diff, tmp = self._diff[:n], self._tmp[:n]
        fc = self._as_compute(f, diff)
        bc = self._as_compute(b, tmp)
        torch.sub(fc, bc, out=diff)
        if alpha != 1.0:
            diff.mul_(alpha)
        diff.add_(self._as_compute(t, tmp))
        out.copy_(diff)  # the one rounding to the target's dtype (round-to-nearest-even)


def check_finite(values: torch.Tensor, tensor: str, where: str, offset: int) -> None:
    """Raise ``NonFiniteError`` naming ``tensor`` if ``values`` (elements from ``offset``) hold NaN/Inf."""
    bad = first_nonfinite(values)
    if bad is not None:
        v = values[bad].item()
        raise NonFiniteError(
            f"tensor {tensor!r} in {where}: {v} at element {offset + bad}; check the inputs, "
            f"or set allow_nonfinite: true to write it anyway"
        )
