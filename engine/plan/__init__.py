"""From a job spec to the frozen tasks a worker runs: pure, headers only, ``==``-comparable.

    spec.py, specfile.py     the frozen ``JobSpec``; the YAML edge (pydantic, one-line errors)
    compat.py                do the checkpoints belong together (every problem at once)
    quant.py                 how each checkpoint stores a weight (plain, FP8 layouts), as ``Source``s
    vocab.py, vocab_plan.py  resized vocabularies: row maps, tied heads, the pieces of each tensor
    output_files.py          the output's shard files, side files and config patches
    tasks.py, chunks.py      what crosses to a worker (``ShardTask``, ...) and how a shard splits
    lora_plan.py             a LoRA adapter's terms: the factors of each weight it changes
    planner.py               all of the above assembled into a ``Plan``

May import: ``engine.errors``, ``engine.redaction``, ``engine.storage``, ``engine.formats``.
Never the arithmetic, torch or a run: a plan is made without moving tensor data.
"""
