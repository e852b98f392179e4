"""Where a chunk's arithmetic runs: ``CpuCompute`` on the calling threads, ``CudaCompute`` queued
on a GPU. Both take a chunk's input buffers and fill its output buffer (``execute.py`` owns the
buffers, the order and the threads); ``finish(handle)`` waits for a chunk's result.
"""
from __future__ import annotations

import threading
from typing import Mapping

import torch

from ..plan.chunks import Chunk
from ..plan.tasks import Source, Term
from .codec import TensorScales, Transcoder
from .kernel import TORCH_DTYPES, ChunkKernel, nonfinite_error
from .sums import Measures, StatsLog

__all__ = ["CpuCompute", "CudaCompute", "Factors"]

# Each LoRA term's (U, V, scale) by (tensor, diff): ``execute.load_factors``.
Factors = Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor, float]]


def _compute(kernel: ChunkKernel | None, codec: Transcoder | None, chunk: Chunk,
             inputs: dict[tuple[str, str], torch.Tensor], out: torch.Tensor, scales: torch.Tensor | None,
             where: str, non_blocking: bool = False, stats: Measures | None = None,
             check: bool = False, every: int = 1, factors: Factors | None = None) -> None:
    """One chunk into ``out`` (its output bytes) on the inputs' device: the plain kernel, or the
    codec, whose output scale rows land in ``scales`` (the tensor's whole scale tensor, on the host).
    ``stats``: the tensor's report measures, added to (on a CPU, of every ``every``-th block of the
    tensor; ``kernel.sampled_ranges``); ``check``: the plain kernel refuses NaN/Inf; ``factors``: each
    LoRA term's ``(U, V, scale)`` by (tensor, diff), whose change stands in for ``finetuned - 0``."""
    t = chunk.tensor
    typed = out.view(TORCH_DTYPES[t.dtype])
    if t.transcodes:
        assert codec is not None
        rows = codec.run(chunk, inputs, None if chunk.measure else typed, where, stats, every)
        if rows is not None and scales is not None and t.scales is not None:
            lo, hi = chunk.scale_rows(t.scales)
            scales[lo:hi].copy_(rows, non_blocking=non_blocking)
    else:
        assert kernel is not None

        def rows_of(src: Source) -> torch.Tensor:
            got = inputs.get((src.role, "codes"))
            if got is not None and not src.zero:
                return got
            # Rows the checkpoint lacks count as zeros (a resized vocabulary, ``vocab: pad``), and
            # so does a stored difference's base.
            return kernel.zeros(chunk.count, TORCH_DTYPES[src.dtype])

        def change_of(i: int, term: Term) -> torch.Tensor:
            """What the tensor's ``i``-th term adds before alpha: the fine-tune's rows, a LoRA bias's
            scaled rows, or a LoRA term's change (into the kernel's buffer for the tensor's n-th
            LoRA term)."""
            if term.scale is not None:  # a LoRA bias: s * b, in the compute dtype
                return torch.mul(rows_of(term.finetuned).to(kernel.dtype), term.scale)
            if term.lora is None:
                return rows_of(term.finetuned)
            assert factors is not None
            u, v, scale = factors[(t.name, term.diff)]
            slot = sum(1 for x in t.terms[:i] if x.lora is not None)
            return kernel.low_rank(slot, u, v, scale, chunk.start, chunk.count)

        if not t.adds_target:  # graft diff: the difference alone
            (term,) = t.terms
            bad = kernel.difference(rows_of(term.finetuned), rows_of(term.base), typed, stats, check)
        else:
            bad = kernel.combine_terms(rows_of(t.target), tuple((change_of(i, x), rows_of(x.base), x.alpha)
                                                                for i, x in enumerate(t.terms)),
                                       typed, stats, check, chunk.start, every)
        if bad is not None:
            raise nonfinite_error(typed[bad].item(), t.name, where, chunk.start + bad)


class CpuCompute:
    """Computes chunks on the calling threads, each with its own compute buffers (made on its first
    chunk) and one ``TensorScales`` for all; ``finish`` has nothing left to wait for. The plain
    kernel checks each block for NaN/Inf while it is in cache (``execute`` checks the other paths'
    output on the compute thread)."""

    def __init__(self, compute_dtype: str, plain_elems: int, codec_elems: int):
        scales = TensorScales()
        self._make = lambda: (ChunkKernel(compute_dtype, plain_elems) if plain_elems else None,
                              Transcoder(compute_dtype, codec_elems, scales=scales) if codec_elems else None)
        self._mine = threading.local()
        self.factors: Factors = {}  # set by ``execute`` before the first chunk

    def submit(self, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor], out: torch.Tensor,
               scales: torch.Tensor | None, where: str, stats: StatsLog | None,
               check: bool, every: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not hasattr(self._mine, "buffers"):
            self._mine.buffers = self._make()
        kernel, codec = self._mine.buffers
        _compute(kernel, codec, chunk, inputs, out, scales, where, stats=stats, check=check, every=every,
                 factors=self.factors)
        return out, scales if chunk.last else None

    def finish(self, handle: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return handle


class CudaCompute:
    """Queues each chunk on a GPU: upload (copy stream) -> compute -> download (compute stream).

    The upload of chunk i+1 overlaps the compute of chunk i, and both overlap the host writing and
    hashing the chunks before. Host buffers (the slots) are pinned so the copies are truly
    asynchronous; the result comes back into its slot's output buffer, and a quantized tensor's
    scale rows into its pinned host scale buffer. One thread submits, in chunk order.
    """

    def __init__(self, device: str, compute_dtype: str, plain_elems: int, codec_elems: int,
                 out_cap: int, capacity: dict[tuple[str, str], int]):
        self.device = torch.device(device)
        self.kernel = ChunkKernel(compute_dtype, plain_elems, self.device) if plain_elems else None
        self.codec = Transcoder(compute_dtype, codec_elems, self.device) if codec_elems else None
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.staging = [{k: torch.empty(n, dtype=torch.uint8, device=self.device) for k, n in capacity.items()}
                        for _ in range(2)]
        self.out_dev = [torch.empty(out_cap, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.released: list[torch.cuda.Event | None] = [None, None]
        # No check on the device (it would wait for it): ``execute``'s write thread checks the host copy.
        self._count = 0
        self.factors: Factors = {}  # set by ``execute`` before the first chunk, on this device

    def submit(self, chunk: Chunk, inputs: dict[tuple[str, str], torch.Tensor], out: torch.Tensor,
               scales: torch.Tensor | None, where: str, stats: torch.Tensor | None,
               check: bool, every: int) -> tuple[torch.cuda.Event, torch.Tensor, torch.Tensor | None]:
        k = self._count % 2
        self._count += 1
        staged = {}
        with torch.cuda.stream(self.copy_stream):
            if self.released[k] is not None:  # the compute of two chunks ago must be done with staging[k]
                self.copy_stream.wait_event(self.released[k])
            for key, host in inputs.items():
                raw = host.view(torch.uint8)
                dev = self.staging[k][key][:raw.numel()]
                dev.copy_(raw, non_blocking=True)
                staged[key] = dev.view(host.dtype)
            uploaded = torch.cuda.Event()
            uploaded.record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(uploaded)
            out_dev = self.out_dev[k][:chunk.out_bytes]
            # The scale rows go straight to the pinned host buffer, after the compute on this stream.
            _compute(self.kernel, self.codec, chunk, staged, out_dev, scales, where, non_blocking=True,
                     stats=stats, factors=self.factors)
            out.copy_(out_dev, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        self.released[k] = done
        return done, out, scales if chunk.last else None

    def finish(self, handle: tuple[torch.cuda.Event, torch.Tensor, torch.Tensor | None]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        done, out, scales = handle
        done.synchronize()
        return out, scales
