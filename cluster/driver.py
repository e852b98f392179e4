"""The Ray driver: plan on the driver, run one task per output shard on ShardWorker actors, commit.

Order of work (the engine's, see ``graft.engine.job``): prepare the job (headers only) -> open the
output session -> start actors -> submit shard tasks, at most ``shards_per_worker`` in flight per
actor -> on a worker's death, replace it and run its shards again -> commit on the driver (index, SHA256SUMS,
manifest last). On any other failure, or Ctrl-C, the actors are killed *before* the output is set
aside for a resume (``OutputSession.stop``), so no shard can land after it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, WorkerCrashedError

from graft.engine.errors import GraftError, SpecError
from graft.engine.job import Job, OutputSession
from graft.engine.local import RunResult
from graft.engine.planner import ShardTask

from .actors import MAX_SHARDS, ShardWorker

__all__ = ["RayOptions", "ShardFailedError", "run_ray", "connect"]

# Tensor bytes never enter the object store, so the embedded cluster needs only a small one.
_EMBEDDED_OBJECT_STORE = 128 * 2**20
_POLL_SECONDS = 0.5
_START_TIMEOUT = 600.0


class ShardFailedError(GraftError):
    """A shard's worker died more often than the retry budget allows."""


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. ``address`` None (and no RAY_ADDRESS): start a private local Ray."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    # Shards each actor runs at once: one shard's reads overlap another's compute, hashing and fsync.
    shards_per_worker: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.shards_per_worker <= MAX_SHARDS:
            raise SpecError(f"shards_per_worker (--shards-per-worker) must be 1 to {MAX_SHARDS}, got "
                            f"{self.shards_per_worker}")


def connect(address: str | None) -> bool:
    """Connect to Ray; returns True if this call started a cluster that the caller must shut down.

    Without an address graft starts its own local Ray (``address="local"``): a bare ``ray.init()``
    would try to join the last cluster started on this machine, even a dead one.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", include_dashboard=False, object_store_memory=_EMBEDDED_OBJECT_STORE,
                 **common)
    return True


def _worker_count(opts: RayOptions, shards: int) -> int:
    if opts.workers is not None:
        return max(1, min(opts.workers, shards))
    cpus = ray.cluster_resources().get("CPU", 1.0)
    fit = int(cpus // opts.cpus_per_worker) if opts.cpus_per_worker > 0 else shards
    return max(1, min(fit, shards))


def run_ray(
    job: Job,
    opts: RayOptions = RayOptions(),
    on_progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    on_shard: Callable[[str], None] | None = None,
) -> RunResult:
    """Run ``job`` on Ray and commit its output; roll back and raise on failure.

    ``on_shard(event)`` hears "done", "retried" (its worker died) and "failed" per shard.
    """
    # The output is checked (and locked) before Ray starts: a refused output costs no start-up.
    session = OutputSession.open(job, log=log)
    kept = sum(t.read_bytes for t in job.plan.shards if t.file in session.results)
    if kept and on_progress is not None:
        on_progress(kept)
    started_here = False
    pool: _WorkerPool | None = None
    try:
        sigterm = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
        started_here = connect(opts.address)
        if callable(sigterm):
            # ray.init installs its own SIGTERM handler (it exits at once); keep the caller's, e.g.
            # the CLI's, which stops the run cleanly.
            signal.signal(signal.SIGTERM, sigterm)
        pool = _WorkerPool(job, session, opts)
        pool.run_all(session, on_progress, log, on_shard or (lambda event: None))
        pool.kill_all()
        manifest = session.commit(executor="ray", workers=pool.size, log=log)
    except BaseException as e:
        if pool is not None:
            pool.kill_all()  # before the rollback or suspend, so no shard can land after it
        raised = session.stop(e)  # Ctrl-C / SIGTERM: kept for a resume; otherwise rolled back
        if raised is e:
            raise
        raise raised from None
    finally:
        if started_here:
            ray.shutdown()
    return RunResult(session.storage.uri, tuple(session.results[s.file] for s in job.plan.shards),
                     manifest)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _WorkerPool:
    """The actors of one run and the bookkeeping of which shard each is running."""

    def __init__(self, job: Job, session: OutputSession, opts: RayOptions):
        self.job = job
        self.opts = opts
        self.size = _worker_count(opts, len(session.pending)) if session.pending else 0
        # Plain values only: the actor rebuilds its Storage objects from these.
        self._ctor = ({role: c.storage.uri for role, c in job.checkpoints.items()},
                      session.storage.uri, job.spec.storage_options, opts.gpus_per_worker > 0)
        self.actors = [self._new_actor() for _ in range(self.size)]
        # ref -> (slot, the actor it was sent to, task); the actor tells a dead slot's first loss
        # (replace it) from the losses of its other tasks (already replaced).
        self.in_flight: dict[ray.ObjectRef, tuple[int, Any, ShardTask]] = {}
        # Replacement actors join the idle pool only once they answer: if the cluster lost the
        # capacity to place one, the surviving workers take all remaining shards instead of shards
        # queueing forever on an actor that never starts.
        self.starting: dict[ray.ObjectRef, int] = {}

    def _new_actor(self) -> Any:
        return ShardWorker.options(num_cpus=self.opts.cpus_per_worker,
                                   num_gpus=self.opts.gpus_per_worker).remote(*self._ctor)

    def run_all(self, session: OutputSession, on_progress: Callable[[int], None] | None,
                log: Callable[[str], None], on_shard: Callable[[str], None]) -> None:
        """Run every pending shard, recording each in ``session`` as it commits."""
        pending: deque[ShardTask] = deque(session.pending)
        attempts = {t.file: 0 for t in pending}
        lanes = self.opts.shards_per_worker
        # One entry per free lane, interleaved so that the first tasks spread over all actors.
        idle: deque[int] = deque(slot for _ in range(lanes) for slot in range(self.size))
        finished_bytes = reported = 0
        stalled_since: float | None = None
        while pending or self.in_flight:
            while pending and idle:
                slot, task = idle.popleft(), pending.popleft()
                attempts[task.file] += 1
                actor = self.actors[slot]
                self.in_flight[actor.run.remote(task)] = (slot, actor, task)
            if self.in_flight or not self.starting:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > _START_TIMEOUT:
                raise ShardFailedError(f"{pending[0].file}: no worker could be started for "
                                       f"{_START_TIMEOUT:.0f}s; check the cluster's free CPUs/GPUs")
            ready, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=_POLL_SECONDS)
            for ref in ready:
                if ref in self.starting:
                    slot = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                        idle.extend([slot] * lanes)
                    except (RayActorError, WorkerCrashedError):
                        self._replace(slot)
                    continue
                slot, actor, task = self.in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as e:
                    on_shard("failed")
                    # A GraftError inside the worker (bad input, NaN, storage) is deterministic or
                    # already retried by the engine: fail the job with the worker's own error.
                    raise (e.cause if isinstance(e.cause, BaseException) else e) from None
                except (RayActorError, WorkerCrashedError) as e:
                    if attempts[task.file] >= self.opts.max_attempts:
                        on_shard("failed")
                        raise ShardFailedError(
                            f"{task.file}: its worker died {attempts[task.file]} times "
                            f"(last: {e.__class__.__name__}); check the workers' memory and logs"
                        ) from None
                    log(f"worker for {task.file} died ({e.__class__.__name__}); running it again")
                    on_shard("retried")
                    if self.actors[slot] is actor:  # the first of its tasks to report the loss
                        idle = deque(s for s in idle if s != slot)
                        self._replace(slot)
                    pending.appendleft(task)
                    continue
                session.record(result)
                on_shard("done")
                finished_bytes += task.read_bytes
                idle.append(slot)
            if on_progress is not None:
                done = finished_bytes + self._live_progress()
                if done > reported:
                    on_progress(done - reported)
                    reported = done

    def _replace(self, slot: int) -> None:
        self.actors[slot] = self._new_actor()
        self.starting[self.actors[slot].pid.remote()] = slot

    def _live_progress(self) -> int:
        files: dict[int, tuple[Any, set[str]]] = {}
        for _, actor, task in self.in_flight.values():
            files.setdefault(id(actor), (actor, set()))[1].add(task.file)
        asks = [(actor.progress.remote(), mine) for actor, mine in files.values()]
        total = 0
        for ref, mine in asks:
            try:
                running = ray.get(ref, timeout=_POLL_SECONDS)
            except (GetTimeoutError, RayActorError, WorkerCrashedError):
                continue  # a dying worker's progress no longer counts
            # Only shards in flight count (a finished one is counted once, in finished_bytes).
            total += sum(done for file, done in running.items() if file in mine)
        return total

    def kill_all(self) -> None:
        """Stop every actor and wait until the tasks they ran are over (none can commit later)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        refs = list(self.in_flight)
        while refs and time.monotonic() < deadline:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=1)
        self.in_flight.clear()
        self.starting.clear()
