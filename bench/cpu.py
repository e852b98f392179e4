"""Where graft's CPU goes on the 1.1B job: each stage of a shard measured alone, in CPU-seconds
(user + system, this process) per GB of *input*, so the stages add up to compare with the job's
own figure in bench/results.md.

    python -m bench.cpu        # needs bench/data (make bench generates it)

Stages: reading the three inputs from the page cache into buffers (``preadv``, as graft's local
reader), the arithmetic (``ChunkKernel.combine`` on bf16 chunks, float32 compute), sha256 of the
output, and writing the output past the page cache (graft's ``O_DIRECT`` appender) with fsync.
"""
from __future__ import annotations

import glob
import hashlib
import os
import resource
import tempfile
import time

import torch

from bench.data import ensure
from graft.engine.storage.directio import DirectAppender
from graft.engine.compute.kernel import ChunkKernel

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 4 * 2**20  # elements per chunk: graft's default 16 MiB of float32 compute buffer


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def measure(what: str, fn, per_gb: float) -> None:  # noqa: ANN001
    c0, t0 = cpu(), time.perf_counter()
    fn()
    c, t = cpu() - c0, time.perf_counter() - t0
    print(f"{what:58s} {c:6.2f} CPU-s {t:6.2f} s wall   {c / per_gb:5.2f} CPU-s per GB of input")


def main() -> None:
    data = ensure(os.path.join(HERE, "data"))["llama"]
    files = {role: sorted(glob.glob(os.path.join(path, "*.safetensors"))) for role, path in data.items()}
    in_bytes = sum(os.path.getsize(f) for fs in files.values() for f in fs)
    out_bytes = sum(os.path.getsize(f) for f in files["target"])
    gb = in_bytes / 1e9
    buf = bytearray(CHUNK * 2)

    def read_all() -> None:
        for fs in files.values():
            for f in fs:
                fd = os.open(f, os.O_RDONLY)
                try:
                    size, pos = os.fstat(fd).st_size, 0
                    while pos < size:
                        pos += os.preadv(fd, [memoryview(buf)[:min(len(buf), size - pos)]], pos) or size
                finally:
                    os.close(fd)

    read_all()  # warm the page cache
    print(f"1.1B job: {in_bytes / 1e9:.2f} GB in, {out_bytes / 1e9:.2f} GB out, {os.cpu_count()} cores")
    measure("read 3 inputs from the page cache (preadv, 8 MiB)", read_all, gb)

    kernel = ChunkKernel("float32", CHUNK)
    t, f, b = (torch.randn(CHUNK).to(torch.bfloat16) for _ in range(3))
    out = torch.empty(CHUNK, dtype=torch.bfloat16)
    chunks = out_bytes // (CHUNK * 2)
    measure("arithmetic: bf16 t + (f - b) in float32, rounded to bf16",
            lambda: [kernel.combine(t, f, b, 1.0, out) for _ in range(chunks)], gb)

    block = bytes(CHUNK * 2)
    measure("sha256 of the output", lambda: [hashlib.sha256(block) for _ in range(chunks)], gb)

    def write() -> None:
        with tempfile.NamedTemporaryFile(dir=os.path.join(HERE, "data")) as tmp:
            fd = os.open(tmp.name, os.O_WRONLY)
            try:
                w = DirectAppender(fd)
                for _ in range(chunks):
                    w.write(memoryview(block))
                w.finish()
                os.fsync(fd)
            finally:
                os.close(fd)

    measure("write the output past the page cache (O_DIRECT) + fsync", write, gb)


if __name__ == "__main__":
    main()
