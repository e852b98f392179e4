"""What bytes on disk mean: the safetensors format, a checkpoint as its shards and index, and the
files that make a committed output (SHA256SUMS, graft.manifest.json, verification).

    safetensors.py   the strict header parser, the header builder, the streaming ``ShardWriter``
    checkpoint.py    shards + index -> tensor name -> (file, dtype, shape, byte range)
    manifest.py      SHA256SUMS, the manifest, ``verify_output``; the names of an output's own files
    adapter.py       a PEFT LoRA adapter: the factors of each weight it changes, or why it is refused

May import: ``engine.errors``, ``engine.redaction``, ``engine.storage``. Nothing here knows a job:
no spec, plan, arithmetic or run.
"""
