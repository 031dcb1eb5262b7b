"""Steps whose workers are Ray actors: ``FlowStep(Model(), nprocs=8, executor=RayExecutor())``.

This module owns the Ray side of the executor seam (:mod:`aqueduct.executors`). Each of the
step's ``nprocs`` slots is served by a Ray actor (one actor per ``batches_per_actor`` slots),
placed by Ray with the executor's ``num_cpus``, ``num_gpus`` and ``resources``, and by a thread
of this process, the slot's local end: it takes a batch from the slot's rings (formed by the
engine like any other: batch size and timeout, priorities, deadlines), decodes its tasks, hands
them to the actor in one call, and answers every task through the rings from what the actor
returns. So outcomes, metrics, ``health()``, ``top`` and the restart policy are the engine's, as
for a worker process; only the handler runs elsewhere. An actor serving two slots has the
second's batch queued while it runs the first's: it does not wait a round trip between batches.

What crosses to the actor is the tasks' state, not our wire form: Ray serializes it, and an
argument over its inline limit (100 KiB) goes into Ray's object store once, read in place by an
actor on the same node. Shared fields (``share_value``) go as their data: the shared-memory pool
is this machine's. The handler sees a writable copy of each array field, as in a worker process.
What comes back is what the handler changed (a field that still holds the immutable object it
came with, or an array still bitwise as it came, is not sent back); the local end applies that
to its copy of each task and sends the task on.

Faults: an actor that dies, or its node, makes the local ends of its slots report their workers
gone (``exited()``): the engine fails exactly the tasks of the batches the actor held with
``WorkerDiedError``, puts the batches sent ahead but not begun back on the queue and asks for
replacements under the step's ``RestartPolicy``, served by a new actor. An actor that cannot be
placed within ``start_timeout_sec`` (no node has the resources, the cluster is gone) is a worker
that failed to start. ``stop()`` kills every actor of the flow, and shuts down the Ray instance
the executor started itself (``address=None`` with no Ray running in this process).

``ray`` is imported only when a flow with such a step starts (``pip install aqueduct-rs[ray]``).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from numbers import Real
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import _worker
from ._codec import _wire_keys
from .exceptions import FlowError, remote_error_payload
from .executors import Executor, ExecutorWorker
from .logger import log

#: What the actor answers a batch with.
_OK = 0
_FAILED = 1
#: Objects a handler cannot have changed in place: not sent back when the field still holds them.
_IMMUTABLE = (bytes, str, int, float, complex, bool, type(None))

#: How often a slot waiting for its actor (to start, to answer, for a batch) looks whether it
#: was killed or its actor is gone.
_POLL_SEC = 0.25
#: How long this process, as a Ray driver this module connected, keeps trying to reach a Ray
#: head that went away. Ray's default (60 s) ends the process after that: the service with it.
_GCS_RECONNECT_SEC = 24 * 3600
_GCS_RECONNECT_ENV = 'RAY_gcs_rpc_server_reconnect_timeout_s'

#: How long ``close()`` waits for the slots' local ends, in all.
_CLOSE_WAIT_SEC = 10.0

#: Ray instances this module started (``ray.init`` with ``address=None``), and how many
#: executors use each: the last one to close shuts it down.
_started_lock = threading.Lock()
_started_users = 0


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')
    return float(value)


class RayExecutor(Executor):
    """Serves each slot of a step from a Ray actor.

    ``num_cpus``, ``num_gpus``, ``resources`` and ``memory`` (bytes) are the actor's Ray
    resource request; ``runtime_env`` its Ray runtime environment (the actors must be able to
    import the handler's and the tasks' classes). ``address``: the cluster to connect to when
    this process is not connected to Ray yet (``None``: the one ``ray.init()`` finds, or a new
    local instance; ``init_options`` go to that ``ray.init``). ``start_timeout_sec``: how long an
    actor may take to be placed and run ``on_start``. ``batches_per_actor``: how many of the
    step's slots (``nprocs``) one actor serves, each with a batch at the actor at once (``2``:
    its next batch is queued while it runs one; ``nprocs=8`` then makes 4 actors).
    """

    def __init__(
        self,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: Optional[Mapping[str, float]] = None,
        address: Optional[str] = None,
        *,
        memory: Optional[int] = None,
        runtime_env: Optional[Dict[str, Any]] = None,
        start_timeout_sec: float = 300.0,
        init_options: Optional[Dict[str, Any]] = None,
        batches_per_actor: int = 1,
    ) -> None:
        self.num_cpus = _number('num_cpus', num_cpus)
        self.num_gpus = _number('num_gpus', num_gpus)
        if resources is not None and not isinstance(resources, Mapping):
            raise TypeError(f'resources must be a mapping of resource name to amount, got {type(resources).__name__}')
        self.resources = {}
        for key, amount in (resources or {}).items():
            if not isinstance(key, str) or not key or key in ('CPU', 'GPU', 'memory'):
                raise ValueError(f'resources: {key!r} is not a custom resource name (use num_cpus, num_gpus, memory)')
            self.resources[key] = _number(f'resources[{key!r}]', amount)
        if address is not None and not isinstance(address, str):
            raise TypeError(f'address must be a str or None, got {type(address).__name__}')
        self.address = address
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
            raise ValueError(f'memory must be a number of bytes > 0, got {memory!r}')
        self.memory = memory
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise TypeError(f'runtime_env must be a dict, got {type(runtime_env).__name__}')
        self.runtime_env = runtime_env
        self.start_timeout_sec = _number('start_timeout_sec', start_timeout_sec)
        if init_options is not None and not isinstance(init_options, dict):
            raise TypeError(f'init_options must be a dict, got {type(init_options).__name__}')
        self.init_options = dict(init_options or {})
        if isinstance(batches_per_actor, bool) or not isinstance(batches_per_actor, int) or batches_per_actor < 1:
            raise ValueError(f'batches_per_actor must be an int >= 1, got {batches_per_actor!r}')
        self.batches_per_actor = batches_per_actor
        self._lock = threading.Lock()
        self._slots: Dict[int, _Slot] = {}
        #: The live actors of each step (by step name), each serving up to batches_per_actor slots.
        self._actors: Dict[str, List[_Actor]] = {}
        self._started_ray = False
        self._actor_class: Any = None

    # ----------------------------------------------------------------- the seam

    def start_worker(self, worker: ExecutorWorker) -> None:
        ray = self._connect()
        with self._lock:
            if worker.slot in self._slots:
                raise FlowError(f'{worker.step_name}: slot {worker.slot} is served already (one RayExecutor per flow)')
            slot = self._slots[worker.slot] = _Slot(self, ray, worker)
        slot.thread.start()

    def stop_worker(self, slot: int, hard: bool) -> None:
        with self._lock:
            served = self._slots.get(slot)
        if served is not None and hard:
            served.kill()

    def close(self) -> None:
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            slot.kill()
        # A local end ends as soon as its call fails; one blocked on a cluster that is gone is
        # a daemon thread, not waited for past the deadline.
        deadline = time.monotonic() + _CLOSE_WAIT_SEC
        for slot in slots:
            slot.thread.join(max(deadline - time.monotonic(), 0))
        self._release_ray()

    @property
    def actors(self) -> List[Any]:
        """The live actors' handles (for tests and tools)."""
        with self._lock:
            return [actor.handle for actors in self._actors.values() for actor in actors]

    # ----------------------------------------------------------------- Ray itself

    def _connect(self) -> Any:
        """The ``ray`` module, connected (started here when this process is not)."""
        global _started_users
        try:
            import ray
        except ImportError as exc:
            raise FlowError('RayExecutor needs Ray: pip install "aqueduct-rs[ray]"') from exc
        with _started_lock:
            if not self._started_ray and not ray.is_initialized():
                options = {'include_dashboard': False, 'log_to_driver': True, **self.init_options}
                # Ray reads its configuration from the environment when it connects; a value
                # the user set is kept.
                saved = os.environ.get(_GCS_RECONNECT_ENV)
                os.environ.setdefault(_GCS_RECONNECT_ENV, str(_GCS_RECONNECT_SEC))
                try:
                    ray.init(address=self.address, **options)
                finally:
                    if saved is None:
                        os.environ.pop(_GCS_RECONNECT_ENV, None)
                self._started_ray = True
                _started_users = 1
            elif not self._started_ray and _started_users:
                self._started_ray = True  # a Ray instance another executor started: share it
                _started_users += 1
        if self._actor_class is None:
            self._actor_class = ray.remote(_RayWorker)
        return ray

    def _release_ray(self) -> None:
        global _started_users
        with _started_lock:
            if not self._started_ray:
                return
            self._started_ray = False
            _started_users -= 1
            if _started_users == 0:
                import ray

                ray.shutdown()

    def _new_actor(self, worker: ExecutorWorker) -> Any:
        options: Dict[str, Any] = {
            'num_cpus': self.num_cpus,
            'num_gpus': self.num_gpus,
            'max_restarts': 0,  # the flow's RestartPolicy replaces actors, not Ray
            'max_task_retries': 0,  # a batch is never run twice
        }
        if self.resources:
            options['resources'] = self.resources
        if self.memory is not None:
            options['memory'] = self.memory
        if self.runtime_env is not None:
            options['runtime_env'] = self.runtime_env
        # Ray pickles the handler (by value when its class lives in ``__main__``).
        return self._actor_class.options(**options).remote(worker.handler, worker.step_name)

    def _forget(self, slot: int) -> None:
        with self._lock:
            self._slots.pop(slot, None)

    def _join(self, worker: ExecutorWorker) -> _Actor:
        """The actor that serves this slot: one of the step's with room for another slot's
        batches, or a new one."""
        with self._lock:
            actors = self._actors.setdefault(worker.step_name, [])
            for actor in actors:
                if not actor.gone and len(actor.slots) < self.batches_per_actor:
                    actor.slots.add(worker.slot)
                    return actor
            actor = _Actor(worker.step_name, worker.slot)
            actors.append(actor)
        # Outside the lock: creating an actor waits on Ray's control plane, which may be gone.
        try:
            handle = self._new_actor(worker)
            actor.created(handle, handle.start.remote())
        except Exception as exc:
            actor.failed(exc)
        return actor

    def _leave(self, slot: int, actor: _Actor, gone: bool) -> None:
        """The slot no longer uses ``actor``; the actor ends when it is ``gone`` (dead, failed
        to start: its other slots' calls fail too) or serves no slot any more."""
        with self._lock:
            actor.slots.discard(slot)
            if gone:
                actor.gone = True
            if actor.slots and not actor.gone:
                return
            actors = self._actors.get(actor.step_name, [])
            if actor in actors:
                actors.remove(actor)
        actor.kill()


class _Actor:
    """A Ray actor and the slots it serves (several: their batches queue at the actor, so it
    never waits for the next call between two batches)."""

    def __init__(self, step_name: str, slot: int) -> None:
        self.step_name = step_name
        self.slots = {slot}
        self.gone = False
        self.handle: Any = None
        self.ready: Any = None  # the result of its start(): None, or why on_start failed
        self.error: Optional[BaseException] = None  # why it could not be created
        self._made = threading.Event()

    def created(self, handle: Any, ready: Any) -> None:
        self.handle, self.ready = handle, ready
        self._made.set()
        if self.gone:  # killed while it was being created
            self.kill()

    def failed(self, error: BaseException) -> None:
        self.error, self.gone = error, True
        self._made.set()

    def wait_made(self, timeout: float) -> bool:
        return self._made.wait(timeout)

    def kill(self) -> None:
        """Ends the actor, without waiting: ``ray.kill`` asks Ray's control plane, which may be
        unreachable (a cluster that went away), and a stop must not wait for it."""
        self.gone = True
        handle = self.handle
        if handle is not None:
            threading.Thread(target=_kill_quietly, args=(handle,), name='ray-kill', daemon=True).start()


def _kill_quietly(handle: Any) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone, or Ray is
        pass


class _Slot:
    """One slot's local end: a thread between the slot's rings and its actor."""

    def __init__(self, executor: RayExecutor, ray: Any, worker: ExecutorWorker) -> None:
        self.executor = executor
        self.ray = ray
        self.worker = worker
        self.actor: Optional[_Actor] = None
        self.killed = False
        self.actor_gone = False  # the actor died or did not start: no slot may use it again
        self.thread = threading.Thread(target=self._run, name=f'ray-{worker.step_name}-{worker.slot}', daemon=True)

    def kill(self) -> None:
        """Ends the slot's actor now (a hard stop): a call waiting on it fails (the other slots'
        the actor serves too), and the thread ends."""
        self.killed = True
        actor = self.actor
        if actor is not None:
            actor.kill()

    def _run(self) -> None:
        worker = self.worker
        try:
            if self._start():
                self._serve()
        except Exception:
            self.actor_gone = True
            log.exception('[RayExecutor] the local end of %s slot %d failed', worker.step_name, worker.slot)
        finally:
            try:
                if self.actor is not None:
                    self.executor._leave(worker.slot, self.actor, self.actor_gone)
                self.executor._forget(worker.slot)
            finally:
                worker.exited()  # whatever failed above, the engine learns the slot is not served

    def _start(self) -> bool:
        worker, ray = self.worker, self.ray
        endpoint = worker.endpoint
        deadline = time.monotonic() + self.executor.start_timeout_sec
        try:
            actor = self.actor = self.executor._join(worker)
            done = False
            # In slices: a stop while the actor waits for a node ends the wait.
            while not done and not self.killed and time.monotonic() < deadline:
                slice_sec = min(_POLL_SEC, max(deadline - time.monotonic(), 0))
                if not actor.wait_made(slice_sec):
                    continue
                if actor.error is not None:
                    raise actor.error
                done = bool(ray.wait([actor.ready], timeout=slice_sec)[0])
            if self.killed:
                return False
            if not done:
                raise TimeoutError(
                    f'no Ray actor could be placed and started within {self.executor.start_timeout_sec:g} s '
                    f'(num_cpus={self.executor.num_cpus:g}, num_gpus={self.executor.num_gpus:g}, '
                    f'resources={self.executor.resources})'
                )
            failure = ray.get(actor.ready)
        except Exception as exc:
            self.actor_gone = True
            endpoint.start_failed(f'{worker.step_name}: its Ray actor did not start: {type(exc).__name__}: {exc}')
            _unlink(exc)
            return False
        if failure is not None:
            self.actor_gone = True
            endpoint.start_failed(failure)
            return False
        if self.killed:
            return False
        endpoint.ready()
        return True

    def _serve(self) -> None:
        worker = self.worker
        endpoint, step_name = worker.endpoint, worker.step_name
        name = type(worker.handler).__name__
        log_tasks = _worker.logging_tasks()
        actor = self.actor
        assert actor is not None, 'set by _start'
        while True:
            # In slices: a slot whose actor died serving a sibling slot, or that was killed,
            # takes no batch it cannot run (a worker process that is dead takes none either).
            if self.killed or actor.gone:
                self.actor_gone = True
                return
            batch = endpoint.recv(_POLL_SEC)
            if batch is None:
                return
            if not batch:
                continue
            tasks, indices, deadlines = _worker.take_batch(endpoint, batch, name, step_name, log_tasks)
            del batch
            elapsed = None
            if tasks:
                outcome = self._call(actor, tasks)
                if outcome is None:
                    return  # the actor is gone: the engine fails this batch and replaces it
                status, elapsed, answer = outcome
                if status == _OK:
                    kept, at, due = _apply_all(endpoint, tasks, indices, deadlines, answer, step_name)
                    _worker.answer_batch(endpoint, kept, at, due, step_name, worker.routes, log_tasks)
                    del kept
                else:
                    for i in indices:
                        endpoint.send_result(i, _worker.STATUS_ERROR, _worker.ROUTE_DONE, answer)
                # Nothing of this batch is held while the slot waits for the next one (the
                # pool's memory, the object store's copies of the answer).
                del answer
            del tasks
            endpoint.finish_batch(elapsed)

    def _call(self, actor: _Actor, tasks: list) -> Optional[tuple]:
        """The actor's answer for ``tasks``: ``(status, elapsed, answer)``, a failure of this
        batch alone when Ray could not run the call, or ``None`` when the actor is gone (dead,
        its node lost, or the slot killed while it waited)."""
        ray, worker = self.ray, self.worker
        try:
            pending = actor.handle.handle.remote([_outbound(t) for t in tasks])
            while True:
                try:
                    return ray.get(pending, timeout=_POLL_SEC)
                except ray.exceptions.GetTimeoutError as exc:
                    _unlink(exc)
                    if self.killed:
                        self.actor_gone = True
                        return None
        except Exception as exc:
            if isinstance(exc, _deaths()):
                log.error('[RayExecutor] the actor of %s slot %d is gone: %s', worker.step_name, worker.slot, exc)
                _unlink(exc)
                self.actor_gone = True
                return None
            # Ray could not run the call (arguments it cannot serialize, or the actor cannot
            # deserialize, a full object store): this batch fails, the actor serves on.
            payload = _ray_failure(exc, worker.step_name)
            _unlink(exc)
            return _FAILED, None, payload


def _apply_all(
    endpoint: Any, tasks: list, indices: list, deadlines: list, answer: list, step_name: str
) -> Tuple[list, list, list]:
    """Applies the actor's answer to each task; one that cannot take it (``share_value`` of a
    field whose value cannot be shared) fails alone. Returns the others' tasks, indices and
    deadlines."""
    kept: Tuple[list, list, list] = ([], [], [])
    for task, i, deadline, changes in zip(tasks, indices, deadlines, answer, strict=True):
        try:
            if changes.__class__ is tuple:
                _apply(task, changes)
            else:
                task = changes  # a task that went whole (``__slots__``, its own pickling) comes back whole
        except Exception as exc:
            payload = remote_error_payload(exc, step_name, 'applying the Ray actor\'s answer to')
            endpoint.send_result(i, _worker.STATUS_ERROR, _worker.ROUTE_DONE, payload)
            continue
        kept[0].append(task)
        kept[1].append(i)
        kept[2].append(deadline)
    return kept


def _unlink(exc: BaseException) -> None:
    """Ray keeps the error of a call with the call's result: cut its link to this thread's
    frames, which hold the slot's end of the rings (its descriptors go when the thread ends,
    not when the garbage collector finds the cycle)."""
    seen = set()
    link: Optional[BaseException] = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


def _deaths() -> tuple:
    """Ray's errors that mean the actor is gone (not that one call failed)."""
    from ray import exceptions as e

    return tuple(
        getattr(e, n)
        for n in ('RayActorError', 'WorkerCrashedError', 'LocalRayletDiedError', 'NodeDiedError', 'OutOfMemoryError')
        if hasattr(e, n)
    )


def _ray_failure(exc: BaseException, step_name: str) -> bytes:
    cause = getattr(exc, 'cause', None) or exc
    return remote_error_payload(FlowError(f'Ray could not run the batch: {type(cause).__name__}: {cause}'), step_name)


# --------------------------------------------------------------------- the tasks' state


def _outbound(task: Any) -> Any:
    """What goes to the actor for ``task``: a plain task's class and fields (shared fields as
    their data), any other task as itself."""
    cls = type(task)
    if _wire_keys[cls] is None:
        return task
    state = task.__dict__
    if '_shared_fields' in state:
        state = {k: v for k, v in state.items() if k != '_shared_fields'}
    return (cls, state)


def _rebuild(wire: Any) -> Any:
    if wire.__class__ is not tuple:
        return wire
    cls, state = wire
    task = cls.__new__(cls)
    task.__dict__.update(state)
    return task


def _changes(task: Any, before: Optional[Dict[str, Any]], received: Dict[str, Any]) -> Any:
    """What the actor sends back for ``task``: for a plain task, the fields the handler may have
    changed (``changed``), the names of those it changed in place (``in_place``: same object,
    an array written to), of those it shared (``share_value`` there) and of those it deleted;
    any other task whole. ``received`` maps a field to the read-only array Ray delivered, which
    the handler saw as a writable copy."""
    if before is None:
        return task
    now = task.__dict__
    shared_here = now.pop('_shared_fields', None) or {}
    changed, in_place = {}, []
    for key, value in now.items():
        if key in before and before[key] is value:
            original = received.get(key)
            if original is not None and _same_bytes(value, original):
                continue  # the handler's copy still holds what was sent
            if original is None and isinstance(value, _IMMUTABLE):
                continue
            in_place.append(key)
        changed[key] = value
    deleted = [key for key in before if key not in now]
    return changed, in_place, list(shared_here), deleted


def _ndarray() -> Any:
    """numpy's array type, if numpy is loaded (an array field means it is); else ``None``."""
    numpy = sys.modules.get('numpy')
    return getattr(numpy, 'ndarray', None)


def _writable_arrays(state: Dict[str, Any]) -> Dict[str, Any]:
    """Replaces each read-only numpy array among ``state``'s fields (Ray hands large ones over
    in place, read-only) with a writable copy of the same layout, as a worker process's handler
    gets (fields that were one array stay one array); returns the originals, by field."""
    ndarray = _ndarray()
    if ndarray is None:
        return {}
    received: Dict[str, Any] = {}
    copies: Dict[int, Any] = {}
    for key, value in state.items():
        if isinstance(value, ndarray) and not value.flags.writeable and not value.dtype.hasobject:
            received[key] = value
            copy = copies.get(id(value))
            if copy is None:
                copy = copies[id(value)] = value.copy(order='K')
            state[key] = copy
    return received


def _same_bytes(copy: Any, original: Any) -> bool:
    """Whether the handler left its copy of an array as it came (bitwise: a NaN is itself)."""
    if copy.shape != original.shape or copy.dtype != original.dtype:
        return False
    import numpy

    if original.flags.c_contiguous and copy.flags.c_contiguous:
        a, b = copy.reshape(-1), original.reshape(-1)
    elif original.flags.f_contiguous and copy.flags.f_contiguous:
        a, b = copy.T.reshape(-1), original.T.reshape(-1)
    else:
        return False
    return bool(numpy.array_equal(a.view(numpy.uint8), b.view(numpy.uint8)))


def _apply(task: Any, changes: Any) -> None:
    """Brings this process's copy of ``task`` up to date with the actor's, as a worker process's
    answer would: an array shared here and changed in place there is written into the shared
    memory and stays shared; a shared field the handler replaced or deleted is no longer shared;
    a field the handler shared is shared here."""
    changed, in_place, shared_there, deleted = changes
    fields = task.__dict__
    shared = fields.get('_shared_fields')
    for key, value in changed.items():
        if shared and key in shared:
            mine = fields.get(key)
            if key in in_place and _same_layout(mine, value):
                mine[...] = value
                continue
            del shared[key]  # replaced by the handler: no longer shared, as in a worker process
        fields[key] = _own(value)
    for key in deleted:
        fields.pop(key, None)
        if shared:
            shared.pop(key, None)
    for key in shared_there:
        if key in fields and key not in task._shared_fields:
            task.share_value(key)


def _own(value: Any) -> Any:
    """A writable copy of an array Ray handed over read-only (a view on its object store, which
    the caller should not hold); anything else as it is."""
    ndarray = _ndarray()
    if ndarray is not None and isinstance(value, ndarray) and not value.flags.writeable:
        return value.copy(order='K')
    return value


def _same_layout(mine: Any, theirs: Any) -> bool:
    ndarray = _ndarray()
    return (
        ndarray is not None
        and isinstance(mine, ndarray)
        and isinstance(theirs, ndarray)
        and theirs.dtype == mine.dtype
        and theirs.shape == mine.shape
        and mine.flags.writeable
    )


class _RayWorker:
    """The actor: one handler, on a Ray worker."""

    def __init__(self, handler: Any, step_name: str) -> None:
        from . import streaming

        self.step_name = step_name
        self.handler = handler
        streaming._cannot_stream = f'{step_name} runs on a RayExecutor: its handler cannot stream (aqueduct.emit)'

    def start(self) -> Optional[str]:
        """Runs ``on_start``; returns why it failed, or ``None``."""
        try:
            self.handler.on_start()
        except BaseException as exc:
            import traceback

            return f'{self.step_name}: on_start raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}'
        return None

    def handle(self, wire: List[Any]) -> tuple:
        tasks = [_rebuild(w) for w in wire]
        plain = [w.__class__ is tuple for w in wire]
        received = [_writable_arrays(t.__dict__) if p else {} for t, p in zip(tasks, plain, strict=True)]
        before = [dict(t.__dict__) if p else None for t, p in zip(tasks, plain, strict=True)]
        started = time.perf_counter()
        try:
            result = self.handler.handle(*tasks)
            if hasattr(result, 'send') and hasattr(result, 'throw'):
                result.close()
                raise TypeError('a streaming handle() (a generator) cannot run on a RayExecutor step')
        except BaseException as exc:
            elapsed = time.perf_counter() - started
            payload = remote_error_payload(exc, self.step_name)
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                import ray

                ray.actor.exit_actor()  # the batch fails with WorkerDiedError; a new actor replaces it
            return _FAILED, elapsed, payload
        elapsed = time.perf_counter() - started
        return _OK, elapsed, [_changes(t, b, r) for t, b, r in zip(tasks, before, received, strict=True)]


__all__ = ['RayExecutor']
