"""A job's life over its output: prepare, execute the shard tasks, commit, resume, clean, push.

    job.py         prepare (headers + plan), the work's fingerprint, ``RunResult``
    execute.py     one shard task: reads, chunks computed at once, writes hashed in file order
    sizing.py      what a run uses of the machine (cores, memory, shards at once, threads)
    session.py     the output session as a state machine (take, resume, record, commit, ...)
    runmark.py     ``.graft-run.json``: the output's lock and journal of committed shards
    commit.py      what a commit writes: side files, index, report, then the manifest
    provenance.py  diffs as artifacts: inputs' content digests, a stored diff checked
    local.py       the no-Ray executor (threads)
    clean.py       ``graft clean``: remove what a stopped run kept
    publish.py     ``graft push``: one verified Hub commit of a committed output

May import: ``engine.errors``, ``engine.redaction``, ``engine.storage``, ``engine.formats``,
``engine.plan``, ``engine.compute``: the whole engine, which never imports it back. Executors outside the engine (``graft.cluster``'s Ray driver) use
``job``, ``session`` and ``execute`` as ``local.py`` does.
"""
