"""The arithmetic on one chunk of a shard task, and what it measures.

    kernel.py    out = t + sum alpha_i (f_i - b_i) on plain tensors, the NaN/Inf check, the measures
    sums.py      the report's sums in one fixed order (the same bits whatever the threads)
    lowrank.py   a LoRA term's change, chunk by chunk, from its two factors
    codec.py     scaled FP8: decode, combine and encode whole rows (CPU or CUDA)
    devices.py   where a chunk's arithmetic runs: the CPU threads or a GPU with its copy streams
    report.py    the measures turned into the transfer report (norms, cosines, flags, a summary)

May import: ``engine.errors``, ``engine.redaction``, ``engine.storage``, ``engine.formats``,
``engine.plan`` (the tasks and chunks it computes). It reads and writes nothing itself: a chunk's
bytes are handed in and out by ``engine.run.execute``.
"""
