"""The no-Ray executor: shard tasks on a thread pool in this process.

Also the reference path the tests compare the Ray executor against. Order of calls is the one in
``job.py``: prepare -> open the output -> execute every shard -> commit, or roll back on any error.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterator

import torch

from ..plan.chunks import shard_read_bytes
from ..plan.spec import JobSpec
from .execute import execute_shard
from .job import Job, RunResult, prepare_job
from .session import OutputSession, hash_in_threads
from .sizing import Parallelism, local_parallelism, machine

__all__ = ["RunResult", "run_local"]  # RunResult is job.py's (the Ray driver returns it too)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's own threads off for the run: each shard's compute threads share the cores, one chunk
    each. torch's default (every core for each operation, of every thread) oversubscribes: on the
    2-core bench 2 shards x 2 threads cost 18% of the job's wall time and 14% of its CPU
    (bench/NOTES.md section 9); one shard computing with torch's 2 threads took 1.55 s where one
    thread took 1.15 s, its write thread needing the second core (section 15). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_local(
    spec: JobSpec | Job,
    workers: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    device: str = "cpu",
    on_shard: Callable[[str], None] | None = None,
    verify_kept: bool = False,
    threads: int | None = None,
) -> RunResult:
    """Run the whole job in this process with ``workers`` shards in flight, each computing on
    ``threads`` threads (both sized from the machine where not given: ``sizing.py``); commit or
    roll back.

    ``device``: ``"cpu"`` or a CUDA device for the arithmetic (reads and writes stay on the host).
    ``on_shard(event)`` hears "done" per committed shard and "failed" for the shard that fails.
    ``verify_kept``: hash the shards a resumed run keeps (else their size and store version vouch).
    """
    shard_event = on_shard or (lambda event: None)
    job = spec if isinstance(spec, Job) else prepare_job(spec)
    session = OutputSession.open(job, log=log, verify_kept=verify_kept)
    inputs = job.input_storages()
    lock = threading.Lock()
    cancel = threading.Event()

    def progress(n: int) -> None:
        if on_progress is not None:
            with lock:
                on_progress(n)

    use: Parallelism = local_parallelism(session.pending, machine(), workers, threads, device)
    log(f"using {use.describe()}")
    try:
        session.verify_kept(hash_in_threads(use.shards), log)
        kept = sum(shard_read_bytes(t) for t in job.plan.shards if t.file in session.results)
        if kept and on_progress is not None:
            on_progress(kept)
        with one_torch_thread(), \
                ThreadPoolExecutor(max_workers=use.shards, thread_name_prefix="graft-shard") as pool:
            futures = [pool.submit(execute_shard, task, inputs, session.storage, progress, cancel,
                                   device, use.threads)
                       for task in session.pending]
            try:
                for f in as_completed(futures):
                    try:
                        r = f.result()  # re-raises the first failure
                    except BaseException:
                        shard_event("failed")
                        raise
                    session.record(r)
                    shard_event("done")
                    log(f"shard {r.file}: {r.size} bytes in {r.seconds:.2f}s")
            except BaseException:
                # Stop the other shards at their next chunk instead of letting them run to the end.
                cancel.set()
                for f in futures:
                    f.cancel()
                raise
        manifest = session.commit(executor="local", workers=use.shards, log=log, threads=use.threads)
    except BaseException as e:
        raised = session.stop(e)  # Ctrl-C / SIGTERM: kept for a resume; otherwise rolled back
        if raised is e:
            raise
        raise raised from None
    return RunResult(session.storage.display_uri, tuple(session.results[s.file] for s in job.plan.shards), manifest)
