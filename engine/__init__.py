"""graft.engine: the pure fine-tuning-transfer engine (no Ray, no CLI).

Its packages read as the pipeline, each importing only those above it in this list:

    errors.py, redaction.py   what every stage shares: the typed errors, credentials kept out of text
    storage/                  bytes in and out of one location (local, S3, GCS, Azure, the Hub)
    formats/                  what the bytes mean: safetensors, checkpoints, the output's manifest
    plan/                     spec -> plan -> shard tasks and their chunks (headers only, pure)
    compute/                  the arithmetic on one chunk (CPU or GPU, FP8 codec) and the report
    run/                      a job's life over its output: execute, session, commit, resume,
                              clean, push; the local executor

``tests/unit/test_import_graph.py`` holds the engine to that order (and to no cycle, no Ray).
"""
__version__ = "0.1.0"
