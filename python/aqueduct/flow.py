"""``Flow`` and ``FlowStep``: the pipeline and its life cycle.

The main process owns a :class:`aqueduct._core.Engine` (queues, batching, priorities, deadlines
and supervision, in Rust) and runs it from the asyncio event loop that calls
:meth:`Flow.process`:

- ``process()`` pickles the task, submits it (the engine dispatches at once if a worker is
  idle) and awaits a future;
- the engine's file descriptor is registered with ``loop.add_reader``; when it becomes readable
  (a worker rang the doorbell, a batch timer fired, a worker died), one ``poll()`` returns every
  outcome at once and the futures are resolved in bulk;
- while tasks are in flight the loop keeps polling with ``call_soon`` for a short spin window
  after the last completion, because waking a sleeping process costs tens of microseconds on a
  virtual machine, far more than a round trip through shared memory. After the window the loop
  sleeps in its selector as usual: an idle flow costs no CPU.

No thread is ever started, so forking (the zygote) is always safe.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import json
import operator
import os
import signal
import socket
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass
from enum import Enum
from threading import get_ident
from typing import Any, Deque, Dict, List, Tuple, Union

from . import _core, _unixsock, shm, top
from ._codec import decode_state, encode
from ._launch import Launcher, make_launcher
from ._worker import logging_tasks
from .exceptions import (
    FlowError,
    HandlerError,
    HandlerTimeoutError,
    MPStartMethodValueError,
    NotRunningError,
    QueueFullError,
    SharedMemoryExhaustedError,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerDiedError,
    WorkerStartError,
)
from .handler import BaseTaskHandler, HandleConditionType
from .logger import log
from .metrics import Collector, Exporter, MetricsTypes
from .metrics._flow import FlowMetrics
from .task import BaseTask

_START_METHODS = ('fork', 'spawn', 'forkserver')

#: What "no limit" becomes where the engine needs a number of seconds (``inf`` and anything
#: larger): about 31 years, far beyond any deadline and well inside a nanosecond clock.
NO_LIMIT_SECONDS = 1e9

#: This process's pid, kept current across forks without a system call per ``process()``.
_process_id = os.getpid()


def _after_fork_in_child() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)

#: How long a graceful ``stop()`` lets the tasks in flight finish before it stops hard.
DEFAULT_STOP_GRACE = 10.0
#: How long a hard stop waits for the killed workers' exits to be seen before tearing down.
_KILLED_EXIT_WAIT = 2.0

#: Held while a flow checks which event loop serves it and moves to another (rare: not per task).
_bind_lock = threading.Lock()


def seconds_arg(name: str, value, *, positive: bool = False, none_ok: bool = False) -> float | None:
    """A number of seconds given by a user: a ``ValueError`` naming ``name`` for anything but
    a real number ``>= 0`` (``> 0`` if ``positive``; ``None`` too if ``none_ok``). ``inf``, and
    anything past :data:`NO_LIMIT_SECONDS`, means no limit: ``None`` where ``None`` is allowed,
    else :data:`NO_LIMIT_SECONDS`."""
    if value is None and none_ok:
        return None
    if value.__class__ is not float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise ValueError(f'{name} must be a number of seconds, got {value!r}')
    value = float(value)
    if not (value > 0 if positive else value >= 0):  # also refuses nan
        raise ValueError(f'{name} must be a number of seconds {">" if positive else ">="} 0, got {value!r}')
    if value >= NO_LIMIT_SECONDS:
        return None if none_ok else NO_LIMIT_SECONDS
    return value


class FlowStep:
    """One step of a flow: a handler, the processes that run it, and its batching."""

    def __init__(
        self,
        handler: BaseTaskHandler,
        handle_condition: HandleConditionType = operator.truth,
        nprocs: int = 1,
        batch_size: int = 1,
        batch_timeout: float = 0,
        on_start_wait: float = 0,
        *,
        handle_timeout: float | None = None,
    ):
        if not isinstance(handler, BaseTaskHandler):
            raise TypeError(f'handler must be a BaseTaskHandler instance, got {type(handler).__name__}')
        if not callable(handle_condition):
            raise TypeError(f'handle_condition must be callable, got {type(handle_condition).__name__}')
        _check_int('nprocs', nprocs, 1)
        _check_int('batch_size', batch_size, 1)
        # `inf` waits for a full batch however long that takes.
        engine_batch_timeout = seconds_arg('batch_timeout', batch_timeout)
        # How long one batch may run before its worker is killed and replaced: a hung handler
        # (an endless loop, a deadlock, a SIGSTOP) otherwise holds its tasks until they time out.
        self.handle_timeout = seconds_arg('handle_timeout', handle_timeout, positive=True, none_ok=True)
        if on_start_wait:
            warnings.warn('on_start_wait is ignored: workers report readiness themselves', DeprecationWarning, 2)
        self.handler = handler
        self.handle_condition = handle_condition
        self.nprocs = nprocs
        self.batch_size = batch_size
        self.batch_timeout = float(batch_timeout)
        self._engine_batch_timeout = engine_batch_timeout
        self.on_start_wait = on_start_wait


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


@dataclass(frozen=True)
class RestartPolicy:
    """How many times a step's workers may be replaced after dying.

    Each step may restart at most ``max_restarts`` workers within any ``window`` seconds. One
    more death inside the window stops the flow (non-gracefully, logging why): a worker that
    dies on every task would otherwise be restarted forever. ``max_restarts=0`` reproduces
    aqueduct 1.15, which stopped the flow at the first death.

    A handler's exception fails its batch's tasks only; ``stop_on_handler_error=True`` stops the
    flow as well (non-gracefully), as in 1.15, where the exception ended the worker process.
    """

    max_restarts: int = 5
    window: float = 60.0
    stop_on_handler_error: bool = False

    def __post_init__(self) -> None:
        _check_int('max_restarts', self.max_restarts, 0)
        if not isinstance(self.window, (int, float)) or isinstance(self.window, bool) or self.window <= 0:
            raise ValueError(f'window must be a number of seconds > 0, got {self.window!r}')


class FlowState(Enum):
    RUNNING = 'running'
    STARTING = 'starting'
    STOPPING = 'stopping'
    STOPPED = 'stopped'
    STEPS_INITIALIZED = 'steps_initialized'


_running_flows: weakref.WeakSet[Flow] = weakref.WeakSet()
_flow_count = 0


@atexit.register
def _kill_leftover_workers() -> None:
    """A flow that was never stopped must not leave workers behind at interpreter exit."""
    for flow in list(_running_flows):
        # A process forked from the owner (a web server's worker) inherits the flow object but
        # not its workers: only the owner tears them down.
        if flow._owner_pid == os.getpid():
            flow._teardown(kill=True)


def failure_exception(kind: str, step_name: str, detail) -> Exception:
    """The exception for a failed task, from the engine's failure ``kind`` (see
    ``aqueduct._core.Engine``) in the step named ``step_name``."""
    if kind == 'handler':
        return HandlerError.from_remote(detail)
    if kind == 'expired':
        return TaskTimeoutError(f'Task timeout error: the task expired before {step_name} could handle it')
    if kind == 'handler_timeout':
        return HandlerTimeoutError(
            f'the batch holding the task ran longer than the handle_timeout of {step_name}: its worker '
            f'process {detail} was killed and is being replaced',
            step_name,
            detail,
        )
    if kind == 'died':
        return WorkerDiedError(
            f'the worker process {detail} of {step_name} died while holding the task', step_name, detail
        )
    if kind == 'shm_exhausted':
        return SharedMemoryExhaustedError(f'no shared memory left for the task on its way to {step_name}')
    if kind == 'rejected':
        return FlowError(f'the flow refused the task: {detail}')
    return FlowError('the flow was stopped before the task finished')


def check_call(task, priorities: int, timeout_sec) -> float:
    """Raises ``TypeError`` for something that is not a task and ``ValueError`` for a priority or
    a timeout that ``process()`` cannot take; lowers a priority past ``priorities`` to the highest
    level (as 1.15 does); returns the timeout to use (``inf`` and huge timeouts become
    :data:`NO_LIMIT_SECONDS`)."""
    if not isinstance(task, BaseTask):
        raise TypeError(f'process() takes a BaseTask instance, got {type(task).__name__}')
    priority = task.priority
    if priority.__class__ is not int or priority < 0:
        raise ValueError(f'task priority must be an integer >= 0, got {priority!r}')
    if priority >= priorities:
        # As in aqueduct 1.15: a priority past the flow's levels is served at the highest one.
        task.priority = priorities - 1
    if timeout_sec.__class__ is float and 0 < timeout_sec < NO_LIMIT_SECONDS:
        return timeout_sec  # the common case, without a call
    return seconds_arg('timeout_sec', timeout_sec, positive=True)


def entry_step(conditions: List, step_names: List[str], task: BaseTask) -> int | None:
    """The first step whose ``handle_condition`` takes ``task``, or ``None``."""
    for i, condition in enumerate(conditions):
        try:
            if condition(task):
                return i
        except Exception as exc:
            raise FlowError(f'the handle_condition of {step_names[i]} raised {type(exc).__name__}: {exc}') from exc
    return None


def encode_task(task: BaseTask, pool) -> Tuple[bytes, list]:
    """The task's wire form (see ``_codec``), or :class:`TaskSerializationError`."""
    try:
        return encode(task, pool)
    except FlowError:  # the pool is full: already says so
        raise
    except Exception as exc:  # PicklingError, TypeError, RecursionError, a __reduce__ raising...
        raise TaskSerializationError(
            f'{type(task).__name__} cannot be pickled to send it to the workers: {type(exc).__name__}: {exc}'
        ) from exc


def apply_result(task: BaseTask, result: tuple) -> Any:
    """Writes a finished task's ``(body, bufs)`` into the caller's task object; returns the
    processed copy's own ``task.metrics``, if it has any (they are not copied back)."""
    done, state = decode_state(*result)
    if state is None:
        task.update(done)
        return getattr(done, '__dict__', {}).get('metrics')
    task.update_from_state(state)
    return state.get('metrics')


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Flow:
    """A pipeline of steps run by worker processes.

    ``Flow(*steps, metrics_enabled=True, metrics_exporter=None, queue_size=None,
    queue_priorities=1, mp_start_method='fork')``, as in aqueduct 1.15; a step may be a bare
    handler.
    """

    def __init__(
        self,
        *steps: Union[FlowStep, BaseTaskHandler],
        metrics_enabled: bool = True,
        metrics_collector=None,
        metrics_exporter=None,
        queue_size: int | None = None,
        queue_priorities: int = 1,
        mp_start_method: str = 'fork',
        restart_policy: RestartPolicy = RestartPolicy(),
        queue_full: str = 'wait',
        stats_socket: str | bool | None = None,
    ):
        if not steps:
            raise ValueError('a Flow needs at least one step')
        self._steps: List[FlowStep] = [s if isinstance(s, FlowStep) else FlowStep(s) for s in steps]
        if mp_start_method not in _START_METHODS:
            raise MPStartMethodValueError(
                f'mp_start_method must be one of {", ".join(map(repr, _START_METHODS))}, got {mp_start_method!r}'
            )
        if queue_size is not None:
            _check_int('queue_size', queue_size, 1)
        _check_int('queue_priorities', queue_priorities, 1)
        if queue_priorities > 255:
            raise ValueError(f'queue_priorities must be at most 255, got {queue_priorities}')
        if not isinstance(restart_policy, RestartPolicy):
            raise TypeError(f'restart_policy must be a RestartPolicy, got {type(restart_policy).__name__}')
        if queue_full not in ('wait', 'reject'):
            raise ValueError(f"queue_full must be 'wait' or 'reject', got {queue_full!r}")
        self._restart_policy = restart_policy
        global _flow_count
        _flow_count += 1
        self._stats_path = (
            None
            if stats_socket is False
            else stats_socket
            if isinstance(stats_socket, str)
            else top.default_socket_path(_flow_count)
        )
        self._stats_server: asyncio.AbstractServer | None = None
        self._stats_sock: socket.socket | None = None
        self._stats_loop: asyncio.AbstractEventLoop | None = None
        self._reject_when_full = queue_full == 'reject'
        # Per step: times of recent restarts (for the policy) and the total (for health()).
        self._restart_times: List[Deque[float]] = [deque() for _ in self._steps]
        self._restarts: List[int] = [0] * len(self._steps)
        self._deaths: List[int] = [0] * len(self._steps)
        self._mp_start_method = mp_start_method
        self._queue_size = queue_size
        self._queue_priorities = queue_priorities
        if metrics_exporter is not None and not isinstance(metrics_exporter, Exporter):
            kind = type(metrics_exporter).__name__
            raise TypeError(f'metrics_exporter must be an aqueduct.metrics.Exporter, got {kind}')
        if metrics_collector is not None and not isinstance(metrics_collector, Collector):
            kind = type(metrics_collector).__name__
            raise TypeError(f'metrics_collector must be an aqueduct.metrics.Collector, got {kind}')
        if not metrics_enabled:
            log.warning('Metrics collecting is disabled')
        self._metrics_enabled = bool(metrics_enabled)
        self._metrics_exporter = metrics_exporter
        self._metrics = FlowMetrics(self, queue_priorities, metrics_collector)
        #: Per priority: complete, timeout, cancel, error (see `aqueduct.metrics._flow.OUTCOMES`).
        self._outcomes = self._metrics.outcomes
        self._export_timer: asyncio.TimerHandle | None = None
        self._state = FlowState.STOPPED
        self._engine: _core.Engine | None = None
        self._pool: _core.Pool | None = None
        self._launcher: Launcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._step_names = [s.handler.get_step_name(i) for i, s in enumerate(self._steps, 1)]
        self._steps_conditions = [s.handle_condition for s in self._steps]
        self._handler_names = [type(s.handler).__name__ for s in self._steps]
        # Engine task id -> future, and the deadline heap that times them out.
        self._pending: Dict[int, asyncio.Future] = {}
        self._deadlines: List[Tuple[float, int]] = []
        self._deadline_timer: asyncio.TimerHandle | None = None
        # The waiting room of submissions that found their queue full: parked entries by key,
        # and per step, per priority, their keys in arrival order.
        self._parked: Dict[int, list] = {}
        self._parked_seq = 0
        self._waiting_room: List[List[Deque[int]]] = []
        self._idle_waiters: List[asyncio.Future] = []
        self._polling = False
        self._last_progress = 0.0
        self._spin_seconds = 0.0
        self._stopping: asyncio.Task | None = None
        self._stopped_waiters: List[asyncio.Future] = []
        self._slot_pids: Dict[int, int] = {}
        self._slot_alive: Dict[int, bool] = {}
        self._exit_waiters: List[asyncio.Future] = []
        self._owner_pid = 0
        self._loop_thread = 0
        # While a stop is under way: set to escalate a graceful stop into a hard one.
        self._escalate: asyncio.Future | None = None

    # ------------------------------------------------------------------ state

    @property
    def _contexts(self):
        """aqueduct 1.15's handler -> ``ProcessContext`` map: a read-only view of the workers."""
        from .multiprocessing import flow_contexts

        return flow_contexts(self)

    @property
    def state(self) -> FlowState:
        return self._state

    @property
    def is_running(self) -> bool:
        return self._state == FlowState.RUNNING

    def _queue_capacity(self, step: FlowStep) -> int:
        # As in 1.15: room for three batches, and at least 20 tasks.
        return self._queue_size if self._queue_size is not None else max(step.batch_size * 3, 20)

    # ------------------------------------------------------------------ start

    def start(self, timeout: float | None = None) -> None:
        """Starts every worker and blocks until each one's ``on_start`` has finished.

        Raises ``TimeoutError`` if that takes longer than ``timeout`` seconds, and
        :class:`WorkerStartError` if an ``on_start`` raises; either way no process is left behind.
        """
        if self._state not in (FlowState.STOPPED,):
            raise FlowError(f'cannot start a flow that is {self._state.value}')
        if timeout is not None and timeout < 0:
            raise ValueError(f'timeout must be >= 0, got {timeout!r}')
        log.info('Flow is starting')
        self._state = FlowState.STARTING
        try:
            self._start_workers(timeout)
        except BaseException:
            self._teardown(kill=True)
            raise
        self._state = FlowState.RUNNING
        self._owner_pid = os.getpid()
        _running_flows.add(self)
        self._engine.prepare_sleep()
        try:
            # Started from inside an event loop (an app's startup hook): watch the workers and
            # serve stats from now on, not only from the first task.
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass
        log.info('Flow was started')

    def init_processes(self, timeout: float | None = None) -> None:
        """Starts the workers without declaring the flow running (aqueduct 1.15's first half of
        ``start()``, used to fork workers before a server forks its own): state
        ``STEPS_INITIALIZED`` until :meth:`start_inited`."""
        self.start(timeout)
        self._state = FlowState.STEPS_INITIALIZED
        # The process that calls start_inited() watches the workers: often one forked from this
        # one (a flow server), and two processes must never drive the engine at once.
        self._hand_over_watch()

    def start_inited(self) -> None:
        """Declares a flow started with :meth:`init_processes` running."""
        if self._state is not FlowState.STEPS_INITIALIZED:
            raise FlowError(f'start_inited() needs a flow after init_processes(), not one that is {self._state.value}')
        self._state = FlowState.RUNNING
        # The process that forked after init_processes() (a flow server) takes the flow over.
        self._owner_pid = os.getpid()
        try:
            self.attach()
        except RuntimeError:  # no loop runs yet: the first process() binds one, as after start()
            pass

    @property
    def are_steps_initialized(self) -> bool:
        return self._state == FlowState.STEPS_INITIALIZED

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Watches the workers from ``loop`` (default: the running loop) from now on, rather than
        from the first task: worker deaths are handled, metrics exported and stats served even
        before any request. A web app's startup hook calls it; ``start()`` does when a loop runs."""
        if self._engine is None:
            raise NotRunningError('the flow is not started')
        self._bind(loop or asyncio.get_running_loop())

    async def wait_stopped(self) -> None:
        """Returns once the flow has stopped (by ``stop()``, or for good after too many worker
        deaths): what an app watches to stop itself when its flow is gone."""
        while self._state is not FlowState.STOPPED:
            waiter = asyncio.get_running_loop().create_future()
            self._stopped_waiters.append(waiter)
            await waiter

    def _start_workers(self, timeout: float | None) -> None:
        specs = [
            (s.nprocs, s.batch_size, s._engine_batch_timeout, self._queue_capacity(s), s.handle_timeout)
            for s in self._steps
        ]
        self._pool = shm.pool()
        self._engine = engine = _core.Engine(
            specs, self._pool, priorities=self._queue_priorities, metrics=self._metrics_enabled
        )
        # How long the loop keeps polling after a completion while tasks are in flight: the
        # engine's choice (zero when the flow's processes outnumber the CPUs).
        self._spin_seconds = engine.spin_us / 1e6
        self._waiting_room = [[deque() for _ in range(self._queue_priorities)] for _ in self._steps]
        plans = []
        for i, step in enumerate(self._steps):
            routes = [(j, s.handle_condition, self._handler_names[j]) for j, s in enumerate(self._steps) if j > i]
            plans.append((step.handler, self._step_names[i], routes))
        self._launcher = make_launcher(
            self._mp_start_method, engine.region_fd(), engine.doorbell_fd(), self._pool.fileno(), plans
        )
        for slot in range(engine.slot_count):
            self._spawn(slot)
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = 0
        while ready < engine.slot_count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError('Starting timeout expired')
            failure = None
            # Every event of the batch is booked before raising: an exit that came with the
            # failure would otherwise be missed, and the teardown would wait for it in vain.
            for outcome in engine.wait(remaining):
                if outcome[0] != 2:
                    continue
                _, slot, step, pid, event, message = outcome
                if event == 'ready':
                    ready += 1
                elif event == 'start_failed':
                    failure = failure or WorkerStartError(
                        f'{self._step_names[step]} failed to start (pid {pid}): {message}'
                    )
                elif event == 'exited':
                    self._on_exited(slot)
                    failure = failure or WorkerStartError(
                        f'{self._step_names[step]} worker (pid {pid}) exited during start-up'
                    )
            if failure is not None:
                raise failure

    def _spawn(self, slot: int) -> None:
        step = self._engine.slot_step(slot)
        index = self._pool.reserve_index()
        if index is None:
            raise FlowError(f'too many worker processes for the shared-memory pool (at most {shm.MAX_PROCESSES})')
        try:
            pid = self._launcher.spawn(slot, step, index)
        except BaseException:
            self._pool.release_index(index)
            raise
        self._slot_pids[slot] = pid
        self._slot_alive[slot] = True
        # From here the engine owns the index: it reaps the worker's references and releases
        # the index when the worker exits.
        self._engine.worker_spawned(slot, pid, index)

    def _on_exited(self, slot: int) -> None:
        """Bookkeeping once the engine has seen a worker exit: reap it."""
        self._slot_alive[slot] = False
        pid = self._slot_pids.get(slot)
        if pid is not None and self._launcher is not None:
            try:
                self._launcher.reap(pid)
            except FlowError:
                pass

    # ------------------------------------------------------------------ process

    async def process(self, task: BaseTask, timeout_sec: float = 5.0) -> bool:
        """Sends ``task`` through the steps; the handlers' results are written into it.

        Returns ``True``. Raises :class:`NotRunningError` if the flow is not running,
        :class:`TaskTimeoutError` (a ``FlowError``) when ``timeout_sec`` passes,
        :class:`HandlerError` (also an instance of the handler's exception type) when a handler
        raises, and :class:`WorkerDiedError` when the worker holding the task dies.
        """
        if self._state is not FlowState.RUNNING:
            raise NotRunningError('the flow is not running')
        if self._owner_pid != _process_id:
            raise self._foreign_process_error()
        engine = self._engine
        loop = self._loop
        # `get_running_loop()` makes a getpid() system call; the bound loop, running in this
        # very thread, is necessarily the running one.
        if loop is None or self._loop_thread != get_ident() or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._bind_checked(loop)
        timeout_sec = check_call(task, self._queue_priorities, timeout_sec)
        priority = task.priority
        task.set_timeout(timeout_sec)
        step = entry_step(self._steps_conditions, self._step_names, task)
        if step is None:
            return True
        body, bufs = encode_task(task, self._pool)
        deadline = task.expiration_time
        deadline_ns = int(deadline * 1e9)
        future = loop.create_future()
        # [future, step, priority, deadline_ns, body, engine task id once submitted, bufs]
        entry = [future, step, priority, deadline_ns, body, None, bufs]
        try:
            entry[5] = task_id = engine.submit(step, priority, deadline_ns, body, bufs)
        except QueueFullError:
            if self._reject_when_full:
                raise
            # Backpressure: wait in line (no polling) until a completion frees room in the queue.
            self._park(entry, deadline)
        else:
            entry[4] = entry[6] = None  # the engine has them now
            self._pending[task_id] = future
            self._add_deadline(deadline, task_id)
            if not self._polling:
                self._start_polling()
        try:
            result = await future
        except BaseException as exc:
            # The future holds the exception, whose traceback holds this frame: drop the future
            # (and the entry that holds it) so that no cycle keeps the task, and the shared
            # memory its fields use, alive until the cyclic GC runs.
            future = None
            submitted, entry = entry[5], None
            if isinstance(exc, asyncio.CancelledError):
                if submitted is not None and self._pending.pop(submitted, None) is not None and self._engine:
                    self._engine.cancel(submitted)
                self._outcomes[priority][2] += 1
            elif isinstance(exc, TaskTimeoutError):
                self._outcomes[priority][1] += 1
            elif isinstance(exc, FlowError):
                self._outcomes[priority][3] += 1
            raise
        self._outcomes[priority][0] += 1
        own = apply_result(task, result)
        if self._metrics.timers:
            # set_timeout() made the deadline from the clock at the start of this call.
            self._metrics.completed(deadline - timeout_sec, own)
        return True

    def _park(self, entry: list, deadline: float) -> None:
        """Puts a submission that found its queue full in line for its step and priority."""
        self._parked_seq += 1
        key = -self._parked_seq  # negative keys in the deadline heap are parked entries
        self._parked[key] = entry
        self._waiting_room[entry[1]][entry[2]].append(key)
        self._add_deadline(deadline, key)

    def _admit(self) -> None:
        """Submits parked entries while their queues have room, highest priority first, in
        arrival order within a priority."""
        engine = self._engine
        for step, rooms in enumerate(self._waiting_room):
            for room in reversed(rooms):
                while room:
                    entry = self._parked.get(room[0])
                    if entry is None or entry[0].done():  # expired or cancelled while waiting
                        self._parked.pop(room.popleft(), None)
                        continue
                    try:
                        task_id = engine.submit(step, entry[2], entry[3], entry[4], entry[6])
                    except QueueFullError:
                        break
                    key = room.popleft()
                    del self._parked[key]
                    entry[4] = entry[6] = None
                    entry[5] = task_id
                    self._pending[task_id] = entry[0]
                    self._add_deadline(entry[3] / 1e9, task_id)
        if not self._polling and engine.in_flight:
            self._start_polling()

    # ------------------------------------------------------------------ event loop plumbing

    def _foreign_process_error(self) -> FlowError:
        return FlowError(
            f'this flow belongs to process {self._owner_pid}, and process {os.getpid()} was forked from it '
            "after start(): a forked process cannot use its parent's flow (start a flow in each process, "
            'or share one with aqueduct.sockets)'
        )

    def _bind_checked(self, loop: asyncio.AbstractEventLoop) -> None:
        """Moves the flow to ``loop`` (e.g. one ``asyncio.run`` after another), unless the loop
        it serves is still running in another thread: one flow is driven by one event loop."""
        with _bind_lock:
            bound = self._loop
            if (
                bound is not None
                and bound is not loop
                and self._loop_thread != get_ident()
                and bound.is_running()
                and not bound.is_closed()
            ):
                raise FlowError(
                    'this flow is served by an event loop that is running in another thread; call it from '
                    'that loop, e.g. asyncio.run_coroutine_threadsafe(flow.process(task), loop) from other threads'
                )
            self._bind(loop)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watches the engine from ``loop`` (the loop may change, e.g. one per test)."""
        self._stop_watching()
        self._loop = loop
        self._loop_thread = get_ident()
        self._reader_fd = self._engine.fileno()
        loop.add_reader(self._reader_fd, self._on_readable)
        self._polling = False
        self._deadline_timer = None
        if self._deadlines:
            self._arm_deadline_timer()
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        if self._metrics_enabled and self._metrics_exporter is not None:
            self._export_timer = loop.call_later(self._metrics_exporter.export_period, self._export_tick)
        self._metrics.arm(loop)
        if self._stats_sock is not None and self._stats_loop is not loop:
            self._close_stats_server()
        if self._stats_path is not None and self._stats_sock is None:
            self._open_stats_socket(loop)

    def _on_readable(self) -> None:
        """The engine's descriptor is readable: a worker rang, a batch timer fired, or a worker
        exited. Handle everything, then keep spinning if tasks are in flight."""
        engine = self._engine
        if engine is None:
            return
        outcomes = engine.poll()
        if outcomes or self._idle_waiters:
            self._deliver(outcomes)
            self._last_progress = time.perf_counter()
        if not self._polling:
            self._start_polling()

    def _start_polling(self) -> None:
        self._polling = True
        self._last_progress = time.perf_counter()
        self._loop.call_soon(self._poll_tick)

    def _poll_tick(self) -> None:
        engine = self._engine
        if engine is None:
            self._polling = False
            return
        outcomes = engine.poll(False)
        now = time.perf_counter()
        if outcomes or self._idle_waiters:
            self._deliver(outcomes)
            self._last_progress = now
        if engine.in_flight and now - self._last_progress < self._spin_seconds:
            self._loop.call_soon(self._poll_tick)
            return
        if engine.prepare_sleep():
            self._polling = False
        else:
            self._loop.call_soon(self._poll_tick)

    def _deliver(self, outcomes: list) -> None:
        pending = self._pending
        for outcome in outcomes:
            kind = outcome[0]
            if kind == 0:
                future = pending.pop(outcome[1], None)
                if future is not None and not future.done():
                    future.set_result((outcome[2], outcome[3]))
            elif kind == 1:
                future = pending.pop(outcome[1], None)
                if future is not None and not future.done():
                    future.set_exception(self._failure(outcome[2], outcome[3], outcome[4]))
                if outcome[2] in ('expired', 'handler'):
                    self._on_task_failed(outcome[2], outcome[3])
            else:
                self._on_worker_event(*outcome[1:])
        if self._parked:
            self._admit()
        if self._idle_waiters and not pending and not self._parked and not (self._engine and self._engine.in_flight):
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def _failure(self, kind: str, step: int, detail) -> Exception:
        return failure_exception(kind, self._step_names[step] if step >= 0 else '', detail)

    def _on_task_failed(self, kind: str, step: int) -> None:
        if kind == 'expired' and step > 0 and logging_tasks():
            # The engine dropped the task before it reached this step's workers; 1.15's worker
            # of the step logged it when it read the task, so the line is written here instead.
            name = self._handler_names[step]
            log.debug('[%s] Task expired. Skip: dropped before dispatch to %s', name, self._step_names[step])
        elif kind == 'handler' and self._restart_policy.stop_on_handler_error and self._state is FlowState.RUNNING:
            log.error('The handler of %s raised: stopping the flow (stop_on_handler_error)', self._step_names[step])
            self._give_up()

    def _on_worker_event(self, slot: int, step: int, pid: int, event: str, message: str) -> None:
        if event == 'exited':
            self._on_exited(slot)
            if self._state is FlowState.RUNNING:
                log.error('The process %s for %s handler is dead', pid, self._handler_names[step])
                self._deaths[step] += 1
                if self._may_restart(step):
                    self._respawn(slot)
            for waiter in self._exit_waiters:
                if not waiter.done() and not any(self._slot_alive.values()):
                    waiter.set_result(None)
        elif event == 'start_failed':
            log.error('A replacement worker of %s failed to start: %s', self._step_names[step], message)
        elif event == 'ready':
            log.info('Worker %s of %s is ready', pid, self._step_names[step])

    def _may_restart(self, step: int) -> bool:
        """Applies the restart policy; past it, stops the flow and says why."""
        policy = self._restart_policy
        now = time.monotonic()
        recent = self._restart_times[step]
        while recent and now - recent[0] > policy.window:
            recent.popleft()
        if len(recent) < policy.max_restarts:
            recent.append(now)
            return True
        log.error(
            'Workers of %s died %d times within %.0f s (restart_policy allows %d restarts): stopping the flow',
            self._step_names[step],
            len(recent) + 1,
            policy.window,
            policy.max_restarts,
        )
        self._give_up()
        return False

    def _give_up(self) -> None:
        """Stops the flow from inside the event loop (no caller to await it)."""
        if self._state is not FlowState.RUNNING:
            return
        self._stopping = self._loop.create_task(self.stop(graceful=False))

    def _respawn(self, slot: int) -> None:
        step = self._engine.slot_step(slot)
        try:
            self._spawn(slot)
        except Exception:
            log.exception('could not restart a worker of %s: stopping the flow', self._step_names[step])
            self._give_up()
            return
        self._restarts[step] += 1
        log.info('Restarted a worker of %s (pid %s)', self._step_names[step], self._slot_pids[slot])

    # ------------------------------------------------------------------ metrics

    def _export_tick(self) -> None:
        self._export_timer = None
        if self._engine is None:
            return
        self._export_metrics()
        self._export_timer = self._loop.call_later(self._metrics_exporter.export_period, self._export_tick)

    def _export_metrics(self) -> None:
        try:
            self._metrics_exporter.export(self._metrics.period(self._engine))
        except Exception:
            log.exception('the metrics exporter failed')

    def _open_stats_socket(self, loop: asyncio.AbstractEventLoop) -> None:
        """Binds the stats socket now and serves it from ``loop``. The socket object is ours,
        so it can be closed even if the loop goes away first (one loop per test, `asyncio.run`
        in a thread)."""
        path = self._stats_path
        top.remove_stale_sockets()  # those of killed flows, which could not remove their own
        try:
            # 0600 whatever the umask; never replaces a file that is not a socket or a live one.
            sock = _unixsock.bind_unix(path, 8)
        except OSError as exc:
            log.warning('cannot serve flow stats at %s: %s', path, exc)
            return
        self._stats_sock = sock
        self._stats_loop = loop
        loop.create_task(self._serve_stats(sock))
        log.info('Flow stats at %s (python -m aqueduct top %s)', path, path)

    async def _serve_stats(self, sock: socket.socket) -> None:
        try:
            server = await asyncio.start_unix_server(self._send_stats, sock=sock)
        except OSError:
            if self._stats_sock is sock:
                raise
            return  # closed before it could start (the flow was handed over)
        if self._stats_sock is sock:
            self._stats_server = server
        else:  # closed while starting
            server.close()

    def _close_stats_server(self) -> None:
        server, self._stats_server = self._stats_server, None
        sock, self._stats_sock = self._stats_sock, None
        if sock is None:
            return
        if server is not None and not server.get_loop().is_closed():
            server.close()
        sock.close()
        try:
            os.unlink(self._stats_path)
        except OSError:
            pass

    async def _send_stats(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Only this user's processes may read the flow's stats, whatever the socket's mode.
            _unixsock.authenticate(writer.get_extra_info('socket'), what='a stats client')
            writer.write(json.dumps(self.metrics()).encode())
            await writer.drain()
        except _unixsock.UnsafeSocketError as exc:
            log.warning('flow stats at %s: %s', self._stats_path, exc)
        except Exception:  # a client that went away, or a flow that stopped meanwhile
            pass
        finally:
            writer.close()

    @property
    def need_collect_task_timers(self) -> bool:
        """Whether task timings (handle, transfer, batch times, sizes) are collected, as in 1.15."""
        return self._metrics_enabled and self._metrics.collector.is_collectible(MetricsTypes.TASK_TIMERS)

    def metrics(self) -> dict:
        """A snapshot of every metric (histograms as ``(buckets, count, sum)``), the health
        report and the task outcome counts: what Prometheus and ``python -m aqueduct top`` read."""
        return self._metrics.snapshot(self._engine)

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        """What a ``/healthz`` or readiness probe needs, per step: processes alive out of
        ``nprocs``, deaths and restarts so far, tasks queued and tasks held by workers, how long
        the longest-running batch has run (``longest_batch_s``: a hung or stopped worker shows
        here) and how many workers ran past the step's ``handle_timeout`` and are being replaced
        (``overdue``).

        ``ready`` is true when the flow is running with every worker alive and started, and none
        overdue.
        """
        engine = self._engine
        steps = []
        ready = self._state is FlowState.RUNNING
        for i, step in enumerate(self._steps):
            info = {
                'name': self._step_names[i],
                'nprocs': step.nprocs,
                'alive': 0,
                'ready': 0,
                'deaths': self._deaths[i],
                'restarts': self._restarts[i],
                'queued': 0,
                'in_flight': 0,
                'longest_batch_s': None,
                'overdue': 0,
            }
            if engine is not None:
                slots = [s for s in range(engine.slot_count) if engine.slot_step(s) == i]
                states = [engine.slot_state(s) for s in slots]
                info['alive'] = sum(1 for s in slots if self._slot_alive.get(s))
                info['ready'] = sum(1 for st in states if st in ('idle', 'busy'))
                info['queued'] = engine.waiting(i)
                info['in_flight'] = sum(len(engine.held_by(s)) for s in slots)
                running = [t for t in map(engine.batch_running_for, slots) if t is not None]
                info['longest_batch_s'] = max(running, default=None)
                info['overdue'] = sum(1 for s in slots if engine.overran(s))
            ready = ready and info['ready'] == step.nprocs and not info['overdue']
            steps.append(info)
        return {'state': self._state.value, 'ready': ready, 'steps': steps}

    # ------------------------------------------------------------------ deadlines

    def _add_deadline(self, deadline: float, task_id: int) -> None:
        heap = self._deadlines
        if len(heap) > 64 and len(heap) > 2 * (len(self._pending) + len(self._parked)):
            # Most entries belong to finished tasks: rebuild from the live ones.
            heap[:] = [e for e in heap if e[1] in self._pending or e[1] in self._parked]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline, task_id))
        if self._deadline_timer is None or deadline < self._deadline_timer_at:
            self._arm_deadline_timer()

    def _arm_deadline_timer(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        if not self._deadlines:
            self._deadline_timer = None
            return
        at = self._deadlines[0][0]
        self._deadline_timer_at = at
        self._deadline_timer = self._loop.call_at(self._loop.time() + (at - time.monotonic()), self._expire)

    def _expire(self) -> None:
        self._deadline_timer = None
        now = time.monotonic()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if key < 0:
                entry = self._parked.pop(key, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(
                        TaskTimeoutError('Task timeout error: the queue stayed full until the task expired')
                    )
                continue
            future = self._pending.pop(key, None)
            if future is None:
                continue
            if self._engine is not None:
                self._engine.cancel(key)
            if not future.done():
                future.set_exception(TaskTimeoutError('Task timeout error'))
        while heap and heap[0][1] not in self._pending and heap[0][1] not in self._parked:
            heapq.heappop(heap)
        if heap:
            self._arm_deadline_timer()
        if self._idle_waiters and not self._pending:
            self._deliver([])

    # ------------------------------------------------------------------ stop

    async def stop(self, graceful: bool = True, grace_sec: float = DEFAULT_STOP_GRACE) -> None:
        """Stops the flow.

        ``graceful=True`` lets the tasks in flight finish, for at most ``grace_sec`` seconds,
        then stops the workers; it returns as soon as they have exited. Past ``grace_sec`` it
        goes on as a hard stop. ``graceful=False`` fails every pending ``process()`` call with
        :class:`FlowError` and kills the workers at once.

        A second ``stop()`` while one is under way waits for the flow to have stopped; a hard one
        turns a graceful stop under way into a hard stop.
        """
        grace_sec = seconds_arg('grace_sec', grace_sec)
        if self._state is FlowState.STEPS_INITIALIZED:
            # Never run from here, and perhaps taken over by a process forked from this one (a
            # flow server started by hand, as 1.15 did): that process's traffic may be in the
            # engine's rings, so the workers are killed without this process reading them.
            log.info('Flow is stopping')
            self._teardown(kill=True, read=False)
            log.info('Flow was stopped')
            return
        if self._state is FlowState.STOPPING:
            if not graceful and self._escalate is not None and not self._escalate.done():
                self._escalate.set_result(None)
            await self.wait_stopped()
            return
        if self._state is not FlowState.RUNNING:
            log.info('Flow is not running')
            return
        log.info('Flow is stopping')
        self._state = FlowState.STOPPING
        engine = self._engine
        engine.stop_accepting()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        escalate = self._escalate = loop.create_future()
        for entry in self._parked.values():
            if not entry[0].done():
                entry[0].set_exception(NotRunningError('the flow stopped while the task waited for queue space'))
        self._parked.clear()
        ends = loop.time() + grace_sec
        if graceful and (self._pending or engine.in_flight):
            # Tasks of this process, and those submitted through ports by other processes.
            idle = loop.create_future()
            self._idle_waiters.append(idle)
            await asyncio.wait([idle, escalate], timeout=grace_sec, return_when=asyncio.FIRST_COMPLETED)
            if not idle.done():
                idle.cancel()
                self._idle_waiters.remove(idle)
                if not escalate.done():
                    log.warning('tasks still in flight after the grace period of %.1f s: stopping hard', grace_sec)
                graceful = False
        if escalate.done():
            graceful = False
        if not graceful:
            self._deliver(engine.fail_all())
        exited = loop.create_future()
        self._exit_waiters.append(exited)
        for slot, alive in self._slot_alive.items():
            if alive:
                if graceful:
                    engine.send_stop(slot)
                else:
                    try:
                        engine.signal_worker(slot, signal.SIGKILL)
                    except OSError:  # exited already; its exit is on its way
                        pass
        if any(self._slot_alive.values()):
            if not self._polling:
                self._start_polling()
            # A worker finishing its last batch gets the rest of the grace period; a hard stop
            # waits only for the kernel to reap what it killed.
            wait = max(ends - loop.time(), 0.0) if graceful else _KILLED_EXIT_WAIT
            await asyncio.wait(
                [exited, escalate] if graceful else [exited], timeout=wait, return_when=asyncio.FIRST_COMPLETED
            )
            if not exited.done():
                log.warning('workers did not exit in time; killing them')
        self._exit_waiters.remove(exited)
        self._escalate = None
        self._teardown(kill=True)
        log.info('Flow was stopped')

    def _stop_watching(self) -> None:
        """Takes the engine's descriptor out of the event loop it was watched from."""
        if self._loop is not None and self._reader_fd is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._reader_fd)
            except (RuntimeError, ValueError):
                pass
        self._reader_fd = None

    def _hand_over_watch(self) -> None:
        """Stops watching the engine from this process's loop (reader, timers, stats socket)."""
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        self._metrics.disarm()
        self._close_stats_server()
        self._stop_watching()
        self._loop = None

    def _hand_over(self) -> None:
        """In the process that started the flow, after a process forked from it took the flow
        over (``aqueduct.sockets``): forgets the flow without touching its workers, which now
        belong to the other process. Only this process's descriptors and mappings are closed."""
        self._hand_over_watch()
        if self._launcher is not None:
            self._launcher.detach()
        if self._engine is not None:
            self._engine.close()
        self._engine = self._launcher = None
        self._slot_alive.clear()
        self._slot_pids.clear()
        self._state = FlowState.STOPPED
        _running_flows.discard(self)

    def _teardown(self, kill: bool, read: bool = True) -> None:
        """Releases everything: kills and reaps the remaining workers, the launcher, the reader,
        and the engine (which unmaps and closes the shared memory). Safe to call twice.
        ``read=False`` leaves the reaping to the launcher, without reading the engine's rings."""
        engine = self._engine
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        self._metrics.disarm()
        if engine is not None and self._metrics_enabled and self._metrics_exporter is not None:
            self._export_metrics()  # the last period
        self._close_stats_server()
        if engine is not None:
            for slot, alive in list(self._slot_alive.items()):
                if alive and kill:
                    try:
                        engine.signal_worker(slot, signal.SIGKILL)
                    except OSError:
                        pass
            deadline = time.monotonic() + 5.0
            while read and any(self._slot_alive.values()) and time.monotonic() < deadline:
                for outcome in engine.wait(0.1):
                    if outcome[0] == 2 and outcome[4] == 'exited':
                        self._on_exited(outcome[1])
            self._stop_watching()
        if self._launcher is not None:
            self._launcher.close()
        for future in [*self._pending.values(), *(entry[0] for entry in self._parked.values())]:
            if not future.done():
                future.set_exception(FlowError('the flow was stopped before the task finished'))
        self._pending.clear()
        self._parked.clear()
        self._deadlines.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._launcher = None
        if engine is not None:
            engine.close()  # shared memory and descriptors go now, not when the GC gets to it
        self._engine = None
        self._reader_fd = None
        self._polling = False
        self._slot_alive.clear()
        self._slot_pids.clear()
        self._state = FlowState.STOPPED
        _running_flows.discard(self)
        for waiter in self._stopped_waiters:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
        self._stopped_waiters.clear()
