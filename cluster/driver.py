"""The Ray driver: plan on the driver, run one task per output shard on ShardWorker actors, commit.

Order of work (the engine's, see ``graft.engine.run.job``): prepare the job (headers only) -> open the
output session -> size the pool from what the cluster can place and start the actors -> submit shard
tasks to the actors that have answered, at most ``shards_per_worker`` in flight per actor -> on a
worker's death, kill it, start a replacement and run its shards again -> commit on the driver
(index, SHA256SUMS, manifest last). On any other failure, or Ctrl-C, the actors are killed *before*
the output is set aside for a resume (``OutputSession.stop``), so no shard can land after it.
Progress comes from a ProgressBoard actor that the workers post to; the driver reads it with one
call per poll that it never waits on.
"""
from __future__ import annotations


import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from graft.engine.plan.chunks import shard_read_bytes
from graft.engine.errors import GraftError, SpecError
from graft.engine.run.job import Job, RunResult
from graft.engine.run.session import OutputSession
from graft.engine.plan.planner import ShardTask
from graft.engine.storage import Storage

from .actors import MAX_SHARDS, ProgressBoard, ShardWorker, hash_output_file

__all__ = ["RayOptions", "ShardFailedError", "WorkerStartError", "run_ray", "connect"]

# Tensor bytes never enter the object store, so the embedded cluster needs only a small one.
_EMBEDDED_OBJECT_STORE = 128 * 2**20
_POLL_SECONDS = 0.5
# How long the first actors to answer run one shard each while others are still starting, so that
# the first shards spread over the actors instead of filling the first one's lanes.
_SPREAD_SECONDS = 2.0


class ShardFailedError(GraftError):
    """A shard's worker died more often than the retry budget allows."""


class WorkerStartError(GraftError):
    """No shard worker can run: the cluster cannot place one, or one failed while starting."""


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. ``address`` None (and no RAY_ADDRESS): start a private local Ray."""

    address: str | None = None
    workers: int | None = None
    # None: sized from the cluster and the job (``_sized``): each actor the CPUs of the cluster
    # shared among the shards, at most a node's, at least 1 (1 for GPU actors).
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    max_attempts: int = 3
    # Shards each actor runs at once: one shard's reads overlap another's compute, hashing and fsync.
    shards_per_worker: int = 2
    # Seconds the run may go without any worker running (none placed yet, or all lost and no
    # replacement placed) before it fails instead of waiting for resources that may never come free.
    start_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not 1 <= self.shards_per_worker <= MAX_SHARDS:
            raise SpecError(f"shards_per_worker (--shards-per-worker) must be 1 to {MAX_SHARDS}, got "
                            f"{self.shards_per_worker}")
        if not self.start_timeout > 0:
            raise SpecError(f"start_timeout (--start-timeout) must be more than 0 seconds, got "
                            f"{self.start_timeout}")


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


def _sized(opts: RayOptions, shards: int) -> RayOptions:
    """``opts`` with ``cpus_per_worker`` set: as given, else the alive nodes' CPUs shared among the
    ``shards`` (a whole number, at most the largest node's, at least 1): a job of fewer shards than
    CPUs gives each actor several, which its shards compute on. GPU actors ask for 1."""
    if opts.cpus_per_worker is not None:
        return opts
    cpus = [int(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node["Alive"]]
    each = 1 if opts.gpus_per_worker > 0 or not cpus else max(1, min(max(cpus), sum(cpus) // max(1, shards)))
    return replace(opts, cpus_per_worker=float(each))


def _asks(opts: RayOptions) -> str:
    return f"{opts.cpus_per_worker:g} CPU(s) and {opts.gpus_per_worker:g} GPU(s)"


def _placeable(opts: RayOptions) -> int | None:
    """How many workers the alive nodes could hold at once, or None if a worker asks for nothing.

    Counted node by node, CPUs and GPUs together: a worker cannot take its CPU on one node and its
    GPU on another, so a CPU-only node adds no GPU worker however many CPUs it has.
    """
    asks = {name: n for name, n in (("CPU", opts.cpus_per_worker), ("GPU", opts.gpus_per_worker)) if n > 0}
    if not asks:
        return None
    # The small slack: Ray keeps resources in fixed point, where 1 CPU holds ten 0.1-CPU workers.
    return sum(min(int(node["Resources"].get(name, 0.0) / n + 1e-6) for name, n in asks.items())
               for node in ray.nodes() if node["Alive"])


def _worker_count(opts: RayOptions, shards: int) -> int:
    """The actors to start: ``opts.workers``, else as many as the cluster can place; at most one
    per shard. Without ``opts.workers``, raises ``WorkerStartError`` at once if no node can hold a
    single worker (e.g. ``--gpus-per-worker`` on a cluster without GPUs); with it, the actors wait
    for an autoscaler to add nodes, up to ``start_timeout``."""
    fit = _placeable(opts)
    if fit == 0 and opts.workers is None:
        total = ray.cluster_resources()
        raise WorkerStartError(
            f"no node of the Ray cluster can hold a shard worker: each asks for {_asks(opts)} "
            f"(--cpus-per-worker/--gpus-per-worker) and the cluster has {total.get('CPU', 0):g} CPUs "
            f"and {total.get('GPU', 0):g} GPUs in all; lower them or add nodes that have them (on an "
            f"autoscaling cluster, give --workers: graft then waits up to --start-timeout for nodes)")
    # An explicit --workers is kept even beyond what fits now: an autoscaling cluster may add nodes,
    # and actors that never start only leave their share to those that do.
    wanted = opts.workers if opts.workers is not None else shards if fit is None else fit
    return max(1, min(wanted, shards))


def run_ray(
    job: Job,
    opts: RayOptions = RayOptions(),
    on_progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda s: None,
    on_shard: Callable[[str], None] | None = None,
    verify_kept: bool = False,
) -> RunResult:
    """Run ``job`` on Ray and commit its output; on failure keep what is journaled (or roll back)
    and raise.

    ``on_shard(event)`` hears "done", "retried" (its worker died) and "failed" per shard.
    ``verify_kept``: re-hash the shards a resumed run keeps, as Ray tasks across the cluster.
    """
    # The output is checked (and locked) before Ray starts: a refused output costs no start-up.
    session = OutputSession.open(job, log=log, verify_kept=verify_kept)
    started_here = False
    pool: _WorkerPool | None = None
    try:
        sigterm = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
        started_here = connect(opts.address)
        if callable(sigterm):
            # ray.init installs its own SIGTERM handler (it exits at once); keep the caller's, e.g.
            # the CLI's, which stops the run cleanly.
            signal.signal(signal.SIGTERM, sigterm)
        session.verify_kept(_cluster_hasher(job, opts), log)
        kept = sum(shard_read_bytes(t) for t in job.plan.shards if t.file in session.results)
        if kept and on_progress is not None:
            on_progress(kept)
        pool = _WorkerPool(job, session, opts, report_progress=on_progress is not None)
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
    return RunResult(session.storage.display_uri, tuple(session.results[s.file] for s in job.plan.shards),
                     manifest)


def _cluster_hasher(job: Job, opts: RayOptions) -> Callable[[Storage, list[tuple[str, int]]], list[str]]:
    """A ``Hasher`` for ``OutputSession.verify_kept`` that reads every file in its own Ray task, in
    parallel across the cluster; fails like the pool does when no task can be placed in time."""
    def run(storage: Storage, files: list[tuple[str, int]]) -> list[str]:
        refs = [hash_output_file.remote(storage.uri, job.spec.storage_options, name, size)
                for name, size in files]
        waiting, last = list(refs), time.monotonic()
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=_POLL_SECONDS)
            if ready:
                last = time.monotonic()
            elif time.monotonic() - last > opts.start_timeout:
                for ref in waiting:
                    ray.cancel(ref, force=True)
                raise WorkerStartError(f"no kept shard could be checked in {opts.start_timeout:g}s: no "
                                       f"Ray task with 1 CPU could be placed; free resources or wait "
                                       f"longer: --start-timeout")
        try:
            return ray.get(refs)
        except RayTaskError as e:
            raise (e.cause if isinstance(e.cause, BaseException) else e) from None
    return run


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _WorkerPool:
    """The actors of one run and the bookkeeping of which shard each is running.

    Every actor, the first ones as much as the replacements of lost ones, joins the pool only once
    it answers (``pid()``): no shard waits on an actor the cluster cannot place, the run goes on
    with the actors that did start, and it fails after ``start_timeout`` without any.
    """

    def __init__(self, job: Job, session: OutputSession, opts: RayOptions, report_progress: bool):
        self.job = job
        self.opts = opts = _sized(opts, len(session.pending))
        self.size = _worker_count(opts, len(session.pending)) if session.pending else 0
        # Plain values only: the actor rebuilds its Storage objects from these. Its shards compute on
        # the CPUs it asks for, shared among the shards it runs at once.
        at_once = min(opts.shards_per_worker, -(-len(session.pending) // max(1, self.size)))
        threads = max(1, int(opts.cpus_per_worker or 1) // max(1, at_once))
        self._ctor = ({role: c.storage.uri for role, c in job.checkpoints.items()},
                      session.storage.uri, job.spec.storage_options, opts.gpus_per_worker > 0, threads)
        self.actors = [self._new_actor() for _ in range(self.size)]
        # After the shard workers: Ray keeps one worker process started per CPU, and a board asked
        # for first would take one a shard worker then waits for (1.3 s of start-up on the 2-core
        # bench; bench/NOTES.md section 14). On the driver's node if it can be: a board on a worker
        # node would be lost with that node. Its handle goes with each shard.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.board = (ProgressBoard.options(scheduling_strategy=here).remote()
                      if report_progress and self.size else None)
        # pid() ref -> slot of the actors not answered yet.
        self.starting: dict[ray.ObjectRef, int] = {a.pid.remote(): slot for slot, a in enumerate(self.actors)}
        # ref -> (slot, the actor it was sent to, task); the actor tells a dead slot's first loss
        # (replace it) from the losses of its other tasks (already replaced).
        self.in_flight: dict[ray.ObjectRef, tuple[int, Any, ShardTask]] = {}

    def _new_actor(self) -> Any:
        return ShardWorker.options(num_cpus=self.opts.cpus_per_worker,
                                   num_gpus=self.opts.gpus_per_worker).remote(*self._ctor)

    def run_all(self, session: OutputSession, on_progress: Callable[[int], None] | None,
                log: Callable[[str], None], on_shard: Callable[[str], None]) -> None:
        """Run every pending shard, recording each in ``session`` as it commits."""
        pending: deque[ShardTask] = deque(session.pending)
        attempts = {t.file: 0 for t in pending}
        lanes = self.opts.shards_per_worker
        idle: deque[int] = deque()  # one entry per free lane of an actor that has answered
        held: list[int] = []  # actors that answered while others were starting: their other lanes
        held_since = 0.0
        finished_bytes = reported = 0
        posted: dict[str, tuple[int, int]] = {}  # the board's last answer: file -> (attempt, bytes)
        asked: ray.ObjectRef | None = None
        next_ask = 0.0
        stalled_since: float | None = None
        while pending or self.in_flight:
            now = time.monotonic()
            if held and (not self.starting or now - held_since >= _SPREAD_SECONDS):
                idle.extend(slot for _ in range(lanes - 1) for slot in held)
                held = []
            while pending and idle:
                slot, task = idle.popleft(), pending.popleft()
                attempts[task.file] += 1
                actor = self.actors[slot]
                self.in_flight[actor.run.remote(task, attempts[task.file], self.board)] = (slot, actor, task)
            if self.in_flight or not self.starting:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = now
            elif now - stalled_since > self.opts.start_timeout:
                raise WorkerStartError(self._unplaced())
            if self.board is not None and asked is None and now >= next_ask:
                asked, next_ask = self.board.read.remote(), now + _POLL_SECONDS
            waiting = [*self.in_flight, *self.starting, *([asked] if asked is not None else [])]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=_POLL_SECONDS)
            for ref in ready:
                if asked is not None and ref == asked:
                    asked = None
                    try:
                        posted = ray.get(ref)
                    except (RayActorError, WorkerCrashedError):
                        log("the progress board was lost; progress counts finished shards only")
                        self.board, posted = None, {}
                    continue
                if ref in self.starting:
                    slot = self.starting.pop(ref)
                    try:
                        ray.get(ref)
                    except (RayActorError, WorkerCrashedError) as e:
                        if getattr(e, "actor_init_failed", False):  # would fail the same way again
                            raise WorkerStartError(
                                f"a shard worker failed to start ({str(e).strip().splitlines()[-1]}); "
                                f"check that graft and its storage extras are installed on every node"
                            ) from None
                        self._replace(slot)
                        continue
                    idle.append(slot)
                    if lanes > 1:
                        held_since = held_since if held else time.monotonic()
                        held.append(slot)
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
                        held = [s for s in held if s != slot]
                        self._replace(slot)
                    pending.appendleft(task)
                    continue
                session.record(result)
                on_shard("done")
                finished_bytes += shard_read_bytes(task)
                idle.append(slot)
            if on_progress is not None:
                # Only the attempts in flight count: a finished shard is counted once, in
                # finished_bytes, and a lost attempt's partial bytes not at all.
                running = {task.file: attempts[task.file] for _, _, task in self.in_flight.values()}
                done = finished_bytes + sum(n for file, (attempt, n) in posted.items()
                                            if running.get(file) == attempt)
                if done > reported:
                    on_progress(done - reported)
                    reported = done

    def _replace(self, slot: int) -> None:
        """Kill the slot's actor and start another in its place.

        The old one is killed even if it looks dead: a RayActorError can also mean it is only
        unreachable for now (ActorUnavailableError), and left alive it could still commit a shard
        or leave a temporary behind after the run has ended."""
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()
        self.starting[self.actors[slot].pid.remote()] = slot

    def _unplaced(self) -> str:
        free = ray.available_resources()
        return (f"no worker could be placed in {self.opts.start_timeout:g}s: the cluster has "
                f"{free.get('CPU', 0):g} free CPUs / {free.get('GPU', 0):g} free GPUs, each worker asks "
                f"for {_asks(self.opts)}; free resources or lower --cpus-per-worker/--gpus-per-worker "
                f"(or wait longer: --start-timeout)")

    def kill_all(self) -> None:
        """Stop every actor and wait until the tasks they ran are over (none can commit later)."""
        for actor in [*self.actors, *([self.board] if self.board is not None else [])]:
            ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 30
        refs = list(self.in_flight)
        while refs and time.monotonic() < deadline:
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=1)
        self.in_flight.clear()
        self.starting.clear()
