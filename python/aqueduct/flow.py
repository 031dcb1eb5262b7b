"""``Flow`` and ``FlowStep``: the pipeline and its life cycle.

The main process owns a :class:`aqueduct._core.Driver`: the Rust engine (queues, batching,
priorities, supervision) and the host policy around it (caller deadlines, the waiting room for
full queues, restarts, stopping, outcome counts), and runs it from the asyncio event loop that
calls :meth:`Flow.process`:

- ``process()`` pickles the task, submits it with a future (the engine dispatches at once if a
  worker is idle) and awaits the future;
- the engine's file descriptor is registered with ``loop.add_reader``; when it becomes readable
  (a worker rang the doorbell, a timer fired, a worker died), one ``poll()`` resolves every
  finished call's future and returns the few events this module acts on (start a replacement,
  give up, a stop's progress);
- while tasks are in flight the loop keeps polling with ``call_soon`` for a short spin window
  after the last completion, because waking a sleeping process costs tens of microseconds on a
  virtual machine, far more than a round trip through shared memory. After the window the loop
  sleeps in its selector as usual: an idle flow costs no CPU.

No thread is ever started, so forking (the zygote) is always safe.
"""

from __future__ import annotations

import asyncio
import atexit
import operator
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from enum import Enum
from threading import get_ident
from typing import Any, List, Literal, Tuple, Union, overload

from . import _core, shm
from ._codec import COMPACT_BODY, decode, decode_state, encode
from ._launch import Launcher, make_launcher
from ._stats import StatsServer
from ._worker import logging_tasks
from .exceptions import (
    FlowError,
    HandlerError,
    HandlerTimeoutError,
    MPStartMethodValueError,
    NotRunningError,
    SharedMemoryExhaustedError,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerDiedError,
    WorkerStartError,
)
from .executors import Executor, ExecutorWorker
from .handler import BaseTaskHandler, HandleConditionType
from .logger import log
from .metrics import Collector, Exporter, MetricsTypes
from .metrics._flow import FlowMetrics
from .task import BASE_FIELDS, BaseTask, plain_update
from .view import FlowView

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


@overload
def seconds_arg(name: str, value: Any, *, positive: bool = False, none_ok: Literal[False] = False) -> float: ...
@overload
def seconds_arg(name: str, value: Any, *, positive: bool = False, none_ok: bool) -> float | None: ...
def seconds_arg(name: str, value: Any, *, positive: bool = False, none_ok: bool = False) -> float | None:
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


# After an error in a poll of the engine, how soon polling starts again.
_POLL_RETRY_S = 0.001


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
        executor: Executor | None = None,
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
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(f'executor must be an aqueduct.executors.Executor, got {type(executor).__name__}')
        #: Where the step's batches run (``None``: the flow's own worker processes).
        self.executor = executor
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
        # A number of seconds > 0 (nan refused); `inf` means "within any time" (see `_window`).
        seconds_arg('window', self.window, positive=True)

    @property
    def _window(self) -> float:
        """The window in seconds as the driver takes it (``inf`` and huge ones: no limit)."""
        return seconds_arg('window', self.window, positive=True)


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
    """The exception for a failed task, from the driver's failure ``kind`` (see
    ``aqueduct._core.Failure``) in the step named ``step_name``."""
    if kind == 'handler':
        return HandlerError.from_remote(detail)
    if kind == 'timeout':
        return TaskTimeoutError('Task timeout error')
    if kind == 'expired':
        return TaskTimeoutError(f'Task timeout error: the task expired before {step_name} could handle it')
    if kind == 'timeout_waiting':
        return TaskTimeoutError('Task timeout error: the queue stayed full until the task expired')
    if kind == 'idle_timeout':
        return TaskTimeoutError('Task timeout error: no partial result came within the stream\'s idle_timeout_sec')
    # An executor's worker (a thread, a Ray actor) has no pid: 0.
    worker = f'worker process {detail}' if detail else 'worker (on its executor)'
    if kind == 'handler_timeout':
        return HandlerTimeoutError(
            f'the batch holding the task ran longer than the handle_timeout of {step_name}: its '
            f'{worker} was killed and is being replaced',
            step_name,
            detail,
        )
    if kind == 'died':
        return WorkerDiedError(f'the {worker} of {step_name} died while holding the task', step_name, detail)
    if kind == 'shm_exhausted':
        return SharedMemoryExhaustedError(f'no shared memory left for the task on its way to {step_name}')
    if kind == 'rejected':
        return FlowError(f'the flow refused the task: {detail}')
    if kind == 'not_running':
        return NotRunningError('the flow stopped while the task waited for queue space')
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


class _AlwaysTrue(dict):
    """task class -> whether its instances are always true (it defines neither ``__bool__`` nor
    ``__len__``), so that the default ``handle_condition``, ``operator.truth``, takes them all."""

    def __missing__(self, cls: type) -> bool:
        found = self[cls] = not hasattr(cls, '__bool__') and not hasattr(cls, '__len__')
        return found


_always_true = _AlwaysTrue()


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
    processed copy's own ``task.metrics``, if it has any (they are not copied back).

    A class that overrides ``update`` (or ``update_from_state``) gets its processed copy
    through it, as in 1.15; for the others the fields are written in directly."""
    body = result[0]
    cls = task.__class__
    if not plain_update[cls]:
        done = decode(*result)
        task.update(done)
        return getattr(done, '__dict__', {}).get('metrics')
    own = task.__dict__
    if body and body[0] == COMPACT_BODY and not own.get('_shared_fields'):
        # A state of plain values: no metrics object in it, no shared fields on either side.
        _core.decode_into(body, own, BASE_FIELDS)
        return None
    done, state = decode_state(*result)
    if state is None:
        task.update(done)
        return getattr(done, '__dict__', {}).get('metrics')
    task.update_from_state(state)
    return state.get('metrics')


def _resolve(waiter: asyncio.Future, value: Any = None) -> None:
    if not waiter.done():
        waiter.set_result(value)


class Flow:
    """A pipeline of steps run by worker processes.

    ``Flow(*steps, metrics_enabled=True, metrics_exporter=None, queue_size=None,
    queue_priorities=1, mp_start_method='fork')``, as in aqueduct 1.15; a step may be a bare
    handler.

    The flow is a thin adapter over ``aqueduct._core.Driver``, which decides everything about
    calls (deadlines, the waiting room for full queues, outcome counts), supervision (restarts
    and their policy) and stopping; what stays here is Python's part: pickling tasks, asyncio
    futures and the event loop, starting processes, logging and metrics export.
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
        self._stats = StatsServer(
            self, None if stats_socket is False else stats_socket if isinstance(stats_socket, str) else _flow_count
        )
        self._reject_when_full = queue_full == 'reject'
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
        self.view = FlowView(self)
        exporting = self._metrics_enabled and metrics_exporter is not None
        self._metrics = FlowMetrics(self.view, metrics_collector, exporting=exporting)
        self._export_timer: asyncio.TimerHandle | None = None
        self._state = FlowState.STOPPED
        self._driver: _core.Driver | None = None
        self._pool: _core.Pool | None = None
        self._launcher: Launcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader_fd: int | None = None
        self._step_names = [s.handler.get_step_name(i) for i, s in enumerate(self._steps, 1)]
        self._steps_conditions = [s.handle_condition for s in self._steps]
        #: The first step takes every task whose truth value is True (1.15's default condition).
        self._enters_first_step = bool(self._steps) and self._steps_conditions[0] is operator.truth
        self._handler_names = [type(s.handler).__name__ for s in self._steps]
        self._polling = False
        #: The HTTP front polling this flow's engine from its own thread (`aqueduct.http`):
        #: while set, the loop watches the driver's `notify_fd()` instead of its descriptor.
        self._front: Any = None
        self._stopping: asyncio.Task | None = None
        self._stopped_waiters: List[asyncio.Future] = []
        # While a stop is under way: resolved with the driver's 'drained' / 'grace_expired',
        # and when every worker has exited; set to escalate a graceful stop into a hard one.
        self._drained: asyncio.Future | None = None
        self._exited: asyncio.Future | None = None
        self._escalate: asyncio.Future | None = None
        self._owner_pid = 0
        self._loop_thread = 0

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
    def stats_socket_path(self) -> str | None:
        """Where the flow serves its stats (``python -m aqueduct top PATH``), or ``None``."""
        return self._stats.path

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
        if self._live().polls_exits:
            # Not an error, but it costs wake-ups, and whoever profiles the flow should know.
            log.info('Worker exits are watched by polling every 50 ms (no pidfd_open, or AQUEDUCT_EXIT_WATCH=poll)')
        self._state = FlowState.RUNNING
        self._owner_pid = os.getpid()
        _running_flows.add(self)
        self._live().prepare_sleep()
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
        if any(step.executor is not None for step in self._steps):
            # The process that takes the flow over would not have the executor's workers.
            raise FlowError('init_processes() cannot hand over a flow with executor steps: call start()')
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
        if self._driver is None:
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
        policy = self._restart_policy
        self._pool = shm.pool()
        self._driver = driver = _core.Driver(
            specs,
            self._pool,
            self._step_names,
            self._queue_priorities,
            reject_when_full=self._reject_when_full,
            max_restarts=policy.max_restarts,
            restart_window=policy._window,
            stop_on_handler_error=policy.stop_on_handler_error,
            metrics=self._metrics_enabled,
        )
        plans = [(step.handler, self._step_names[i], self._routes(i)) for i, step in enumerate(self._steps)]
        self._launcher = make_launcher(
            self._mp_start_method, driver.region_fd(), driver.doorbell_fd(), self._pool.fileno(), plans
        )
        for slot in range(driver.slot_count):
            self._spawn(slot)
        deadline = None if timeout is None else time.monotonic() + timeout
        ready = 0
        while ready < driver.slot_count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError('Starting timeout expired')
            failure = None
            # Every event of the batch is booked before raising: an exit that came with the
            # failure would otherwise be missed, and the teardown would wait for it in vain.
            for event in driver.wait(remaining)[1]:
                kind, name, pid = event.kind, self._step_names[event.step] if event.step >= 0 else '', event.pid
                if kind == 'ready':
                    ready += 1
                elif kind == 'start_failed':
                    where = f'pid {pid}' if pid else f'slot {event.slot}, on its executor'
                    failure = failure or WorkerStartError(f'{name} failed to start ({where}): {event.message}')
                elif kind == 'exited':
                    self._reap(pid)
                    failure = failure or WorkerStartError(f'{name} worker (pid {pid}) exited during start-up')
            if failure is not None:
                raise failure

    def _routes(self, step: int) -> list:
        """Where results of ``step`` may go next: the later steps, with their conditions."""
        return [(j, s.handle_condition, self._handler_names[j]) for j, s in enumerate(self._steps) if j > step]

    def _spawn(self, slot: int) -> None:
        driver, pool, launcher = self._live(), self._pool, self._launcher
        assert pool is not None and launcher is not None, 'set together with the driver'
        step = driver.slot_step(slot)
        executor = self._steps[step].executor
        if executor is not None:
            # The slot's end of the rings, in this process, for the executor to serve.
            endpoint = _core.Worker(os.dup(driver.region_fd()), os.dup(driver.doorbell_fd()), slot, pool)
            exited = driver.exit_notifier(slot).notify
            driver.executor_started(slot)
            worker = ExecutorWorker(
                slot, self._step_names[step], self._steps[step].handler, self._routes(step), endpoint, exited
            )
            try:
                executor.start_worker(worker)
            except BaseException:
                exited()  # the slot is not served: the engine treats it as gone
                raise
            return
        index = pool.reserve_index()
        if index is None:
            raise FlowError(f'too many worker processes for the shared-memory pool (at most {shm.MAX_PROCESSES})')
        try:
            pid = launcher.spawn(slot, step, index)
        except BaseException:
            pool.release_index(index)
            raise
        # From here the driver owns the index: the engine reaps the worker's references and
        # releases the index when the worker exits.
        driver.worker_spawned(slot, pid, index)

    def _reap(self, pid: int) -> None:
        """Collects a worker process the engine has seen exit."""
        # An executor's worker has no pid (0): the fork launcher would wait for any child.
        if self._launcher is not None and pid > 0:
            try:
                self._launcher.reap(pid)
            except FlowError:
                pass

    def _live(self) -> _core.Driver:
        """The driver of a started flow (the callers run only while there is one)."""
        driver = self._driver
        if driver is None:
            raise NotRunningError('the flow is not started')
        return driver

    def _stop_workers(self, hard: bool) -> bool:
        """Tells every live worker to stop (``hard``: now); returns whether any is alive."""
        any_alive = self._live().stop_workers(hard)
        if hard:
            self._stop_executors()
        return any_alive

    def _stop_executors(self, close: bool = False) -> None:
        """A hard stop of every executor-served slot (threads cannot be killed: they are asked)."""
        driver = self._driver
        for i, step in enumerate(self._steps):
            executor = step.executor
            if executor is None:
                continue
            if driver is not None:
                for slot in range(driver.slot_count):
                    if driver.slot_step(slot) == i:
                        executor.stop_worker(slot, True)
            if close:
                executor.close()

    def _stop_overdue(self, slot: int, step: int) -> None:
        """An executor's worker ran past the step's ``handle_timeout``: its executor ends it (a
        Ray actor is killed; a thread cannot be, and keeps the slot until its handler returns)."""
        executor = self._steps[step].executor
        log.error('A worker of %s ran past its handle_timeout: stopping it', self._handler_names[step])
        if executor is not None:
            try:
                executor.stop_worker(slot, True)
            except Exception:
                log.exception('the executor of %s failed to stop slot %d', self._step_names[step], slot)

    def _any_alive(self) -> bool:
        driver = self._driver
        return driver is not None and any(driver.worker(s)[1] for s in range(driver.slot_count))

    # ------------------------------------------------------------------ process

    async def process(self, task: BaseTask, timeout_sec: float = 5.0) -> bool:
        """Sends ``task`` through the steps; the handlers' results are written into it.

        Returns ``True``. Raises :class:`NotRunningError` if the flow is not running,
        :class:`TaskTimeoutError` (a ``FlowError``) when ``timeout_sec`` passes,
        :class:`HandlerError` (also an instance of the handler's exception type) when a handler
        raises, and :class:`WorkerDiedError` when the worker holding the task dies.
        """
        prepared = self._prepare_call(task, timeout_sec)
        if prepared is None:
            return True
        driver, loop, step, body, bufs = prepared
        deadline: float = task.expiration_time  # type: ignore[assignment]  # set_timeout() set it
        future: asyncio.Future | None = loop.create_future()
        # The driver times the call out at its deadline, waits for room if the queue is full
        # (or raises QueueFullError when the flow rejects), and resolves the future.
        call = driver.submit(future, step, task.priority, int(deadline * 1e9), body, bufs)
        del body, bufs
        if not self._polling:
            self._start_polling()
        try:
            result = await future  # type: ignore[misc]  # not None: created above
        except asyncio.CancelledError:
            # The caller's request was cancelled: drop the task wherever it is. The cancelled
            # future holds the error, whose traceback holds this frame: let go of it, so that no
            # cycle keeps the task (and its shared memory) alive until the cyclic GC runs.
            future = None
            if self._driver is driver:
                driver.cancel(call)
            raise
        if result.__class__ is _core.Failure:
            raise self._failed(result)
        own = apply_result(task, result)
        if self._metrics.timers:
            # set_timeout() made the deadline from the clock at the start of this call.
            self._metrics.completed(deadline - timeout_sec, own)
        return True

    def _prepare_call(
        self, task: BaseTask, timeout_sec: float
    ) -> tuple[_core.Driver, asyncio.AbstractEventLoop, int, bytes, list] | None:
        """What ``process()`` and ``stream()`` do before submitting: the checks, the deadline,
        the entry step and the encoding. ``None`` when no step takes the task."""
        if self._state is not FlowState.RUNNING:
            raise NotRunningError('the flow is not running')
        if self._owner_pid != _process_id:
            raise self._foreign_process_error()
        driver = self._driver
        if driver is None:
            raise NotRunningError('the flow is not started')
        loop = self._loop
        # `get_running_loop()` makes a getpid() system call; the bound loop, running in this
        # very thread, is necessarily the running one.
        if loop is None or self._loop_thread != get_ident() or not loop.is_running():
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._bind_checked(loop)
        timeout_sec = check_call(task, self._queue_priorities, timeout_sec)
        task.set_timeout(timeout_sec)
        step = 0
        if not (self._enters_first_step and _always_true[type(task)]):  # else step 0, as found
            entered = entry_step(self._steps_conditions, self._step_names, task)
            if entered is None:
                return None
            step = entered
        body, bufs = encode_task(task, self._pool)
        return driver, loop, step, body, bufs

    def stream(self, task: BaseTask, timeout_sec: float = 5.0, *, idle_timeout_sec: float | None = None):
        """Sends ``task`` through the steps and iterates over the partial results its handlers
        emit (:mod:`aqueduct.streaming`); afterwards the handlers' results are in the task, as
        after :meth:`process`. ``timeout_sec`` covers the whole stream; ``idle_timeout_sec``
        limits the wait for each part (and for the result after the last one). Raises in the
        loop what ``process()`` raises. Leaving the loop early cancels the task.

            async for part in flow.stream(task):
                ...
        """
        from .streaming import TaskStream, _check_idle

        return TaskStream(self, task, timeout_sec, _check_idle(idle_timeout_sec))

    def _start_stream(self, task: BaseTask, timeout_sec: float, idle_ns: int):
        """Submits a streaming call (``idle_ns``: the idle limit, 0 for none): ``(token, call id,
        driver, when the call started)``, or ``None`` when no step takes the task."""
        from .streaming import _Call

        prepared = self._prepare_call(task, timeout_sec)
        if prepared is None:
            return None
        driver, _loop, step, body, bufs = prepared
        deadline: float = task.expiration_time  # type: ignore[assignment]  # set_timeout() set it
        token = _Call()
        call = driver.submit_stream(
            token, step, task.priority, int(deadline * 1e9), idle_ns, body, bufs
        )
        del body, bufs
        if not self._polling:
            self._start_polling()
        return token, call, driver, deadline - timeout_sec

    def _finish_stream(self, task: BaseTask, result: Any, started: float) -> None:
        """Applies a streaming call's outcome to its task, as ``process()`` does."""
        if result.__class__ is _core.Failure:
            raise self._failed(result)
        own = apply_result(task, result)
        if self._metrics.timers:
            self._metrics.completed(started, own)

    @staticmethod
    def _idle_timeout_error() -> Exception:
        # The driver keeps a stream's idle limit (`idle_timeout` failures): for the protocol.
        return TaskTimeoutError('no part came within idle_timeout_sec')

    def _failed(self, failure) -> Exception:
        """The exception for a call the driver failed."""
        kind, step = failure.kind, failure.step
        if kind == 'expired' and step > 0 and logging_tasks():
            # The engine dropped the task before it reached this step's workers; 1.15's worker
            # of the step logged it when it read the task, so the line is written here instead.
            name = self._handler_names[step]
            log.debug('[%s] Task expired. Skip: dropped before dispatch to %s', name, self._step_names[step])
        return failure_exception(kind, self._step_names[step] if step >= 0 else '', failure.detail)

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
        if self._front is not None:
            self._reader_fd = self._live().notify_fd()
            loop.add_reader(self._reader_fd, self._on_forwarded)
        else:
            self._reader_fd = self._live().fileno()
            loop.add_reader(self._reader_fd, self._on_readable)
        self._polling = False
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        if self._metrics_enabled and self._metrics_exporter is not None:
            self._export_timer = loop.call_later(self._metrics_exporter.export_period, self._export_tick)
        self._metrics.arm(loop)
        self._stats.serve(loop)

    def _on_readable(self) -> None:
        """The engine's descriptor is readable: a worker rang, a timer fired (a batch's, a
        call's deadline, a restart's backoff, a stop's grace), or a worker exited. Handle
        everything, then keep spinning if tasks are in flight."""
        driver = self._driver
        if driver is None:
            return
        if self._polling:  # a pass is scheduled, and decides what comes next
            _, events = driver.poll()
            if events:
                self._on_events(events)
            return
        try:
            # The first pass of a new spin window, here rather than one loop iteration later:
            # when it finds nothing more coming (no spin budget: more processes than CPUs) the
            # loop goes back to sleep without another pass.
            driver.open_spin_window()
            _, events, again = driver.poll_pass(True)
            if events:
                self._on_events(events)
        except BaseException:
            # As in `_poll_tick`: the window is open (workers do not ring), so polling must
            # start again shortly, or callers would wait for their deadlines.
            self._bound_loop().call_later(_POLL_RETRY_S, self._poll_again)
            raise
        if again and not self._polling:
            self._polling = True
            self._bound_loop().call_soon(self._poll_tick)

    def _on_forwarded(self) -> None:
        """The HTTP front's poller found outcomes of this loop's calls or worker events."""
        driver = self._driver
        if driver is not None:
            events = driver.take_forwarded()
            if events:
                self._on_events(events)

    def _attach_front(self, front) -> None:
        """The HTTP front polls the engine from now on (see `aqueduct.http`)."""
        self._front = front
        self._bind(self._bound_loop())

    def _detach_front(self, front) -> None:
        """Polling comes back to the event loop (the front stopped, or the flow stops)."""
        if self._front is not front:
            return
        front.stop_polling()
        self._front = None
        if self._driver is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            self._on_forwarded()  # what the front's poller found last
            self._bind(loop)
            self._start_polling()

    def _start_polling(self) -> None:
        if self._front is not None:  # its poller polls: wake it to open a spin window
            driver = self._driver
            if driver is not None:
                driver.kick_poller()
            return
        driver = self._driver
        if driver is not None:
            driver.open_spin_window()
        self._bound_loop().call_soon(self._poll_tick)
        self._polling = True

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the flow is watched from (every caller runs after `_bind`)."""
        loop = self._loop
        assert loop is not None, 'the flow is bound to a loop before it polls'
        return loop

    def _poll_tick(self) -> None:
        driver = self._driver
        if driver is None:
            self._polling = False
            return
        try:
            # The driver decides whether to pass again (the spin budget, results still coming,
            # nobody else wanting the CPU) or to sleep until the descriptor is readable.
            _, events, again = driver.poll_pass()
            if events:
                self._on_events(events)
            if again:
                self._bound_loop().call_soon(self._poll_tick)
            else:
                self._polling = False
        except BaseException:
            # The loop reports it. Polling starts again shortly: left as it was, nothing would
            # poll (the doorbell flag is down, so workers would not ring) and callers would wait
            # for their deadlines.
            self._polling = False
            self._bound_loop().call_later(_POLL_RETRY_S, self._poll_again)
            raise

    def _poll_again(self) -> None:
        if not self._polling and self._driver is not None:
            self._start_polling()

    def _on_events(self, events: list) -> None:
        """Acts on what the driver reports: workers that exited or are to be replaced, a flow
        to give up, a stop's progress."""
        for event in events:
            kind = event.kind
            if kind == 'exited':
                self._reap(event.pid)
                if not event.expected and event.pid:
                    log.error('The process %s for %s handler is dead', event.pid, self._handler_names[event.step])
                elif not event.expected:
                    name = self._handler_names[event.step]
                    log.error('The worker of slot %d for %s handler (on its executor) is gone', event.slot, name)
            elif kind == 'respawn':
                self._respawn(event.slot, event.step)
            elif kind == 'stop_worker':
                self._stop_overdue(event.slot, event.step)
            elif kind == 'give_up':
                log.error('%s', event.message)
                self._give_up()
            elif kind in ('drained', 'grace_expired'):
                if self._drained is not None:
                    _resolve(self._drained, kind)
            elif kind == 'all_exited':
                if self._exited is not None:
                    _resolve(self._exited)
            elif kind == 'start_failed':
                log.error('A replacement worker of %s failed to start: %s', self._step_names[event.step], event.message)
            elif kind == 'ready':
                log.info('Worker %s of %s is ready', event.pid, self._step_names[event.step])

    def _give_up(self) -> None:
        """Stops the flow from inside the event loop (no caller to await it)."""
        if self._state is not FlowState.RUNNING:
            return
        self._stopping = self._bound_loop().create_task(self.stop(graceful=False))

    def _respawn(self, slot: int, step: int) -> None:
        # The driver asks while the flow runs or a graceful stop drains (a replacement serves
        # what the dead worker never began), never once the workers are being stopped.
        if self._driver is None or self._state not in (FlowState.RUNNING, FlowState.STOPPING):
            return
        try:
            self._spawn(slot)
        except Exception:
            log.exception('could not start a replacement worker of %s', self._step_names[step])
            self._on_events(self._live().respawn_failed(slot))
            return
        log.info('Restarted a worker of %s (pid %s)', self._step_names[step], self._live().worker(slot)[0])

    # ------------------------------------------------------------------ metrics

    def _export_tick(self) -> None:
        self._export_timer = None
        exporter = self._metrics_exporter
        if self._driver is None or exporter is None:
            return
        self._export_metrics()
        self._export_timer = self._bound_loop().call_later(exporter.export_period, self._export_tick)

    def _export_metrics(self) -> None:
        exporter = self._metrics_exporter
        if exporter is None:
            return
        try:
            exporter.export(self._metrics.period())
        except Exception:
            log.exception('the metrics exporter failed')

    @property
    def need_collect_task_timers(self) -> bool:
        """Whether task timings (handle, transfer, batch times, sizes) are collected, as in 1.15."""
        return self._metrics_enabled and self._metrics.collector.is_collectible(MetricsTypes.TASK_TIMERS)

    def metrics(self) -> dict:
        """A snapshot of every metric (histograms as ``(buckets, count, sum)``), the health
        report and the task outcome counts: what Prometheus and ``python -m aqueduct top`` read."""
        return self._metrics.snapshot(self.health())

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        """What a ``/healthz`` or readiness probe needs, per step: processes alive out of
        ``nprocs``, deaths and restarts so far, tasks queued, calls waiting for room in a full
        queue (``waiting_for_room``) and tasks held by workers, how long
        the longest-running batch has run (``longest_batch_s``: a hung or stopped worker shows
        here) and how many workers ran past the step's ``handle_timeout`` and are being replaced
        (``overdue``).

        ``ready`` is true when the flow is running with every worker alive and started, and none
        overdue.
        """
        reports = self.view.step_health()
        steps = []
        ready = self._state is FlowState.RUNNING
        for i, step in enumerate(self._steps):
            h = reports[i] if reports else None
            info = {
                'name': self._step_names[i],
                'nprocs': step.nprocs,
                'alive': h.alive if h else 0,
                'ready': h.ready if h else 0,
                'deaths': h.deaths if h else 0,
                'restarts': h.restarts if h else 0,
                'queued': h.waiting if h else 0,
                'waiting_for_room': h.waiting_room if h else 0,
                'in_flight': h.in_flight if h else 0,
                'longest_batch_s': h.longest_batch_s if h else None,
                'overdue': h.overdue if h else 0,
            }
            ready = ready and info['ready'] == step.nprocs and not info['overdue']
            steps.append(info)
        return {'state': self._state.value, 'ready': ready, 'steps': steps}

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
                if self._driver is not None:
                    self._on_events(self._driver.begin_stop(False, 0.0))
            await self.wait_stopped()
            return
        if self._state is not FlowState.RUNNING:
            log.info('Flow is not running')
            return
        log.info('Flow is stopping')
        self._state = FlowState.STOPPING
        driver = self._live()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        if self._front is not None:
            # The stop is the loop's to drive; the front keeps answering (503 from now on).
            self._detach_front(self._front)
        escalate = self._escalate = loop.create_future()
        drained = self._drained = loop.create_future()
        exited = self._exited = loop.create_future()
        ends = loop.time() + grace_sec
        # Calls waiting for queue room fail now; a graceful stop waits (the driver's grace timer
        # bounds it) for the tasks in flight, this process's and port clients'.
        self._on_events(driver.begin_stop(graceful, grace_sec))
        if graceful:
            if not drained.done():
                if not self._polling:
                    self._start_polling()
                # The driver's grace timer ends the wait; the timeout only guards against a
                # loop that stops watching the descriptor.
                await asyncio.wait([drained], timeout=grace_sec + 1.0)
            if not drained.done() or drained.result() != 'drained':
                if not escalate.done():
                    log.warning('tasks still in flight after the grace period of %.1f s: stopping hard', grace_sec)
                if not drained.done():
                    self._on_events(driver.begin_stop(False, 0.0))
                graceful = False
        if escalate.done():
            graceful = False
        if self._stop_workers(not graceful):
            if not self._polling:
                self._start_polling()
            # A worker finishing its last batch gets the rest of the grace period; a hard stop
            # waits only for the kernel to reap what it killed.
            wait = max(ends - loop.time(), 0.0) if graceful else _KILLED_EXIT_WAIT
            waits = [exited, escalate] if graceful else [exited]
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done() and escalate.done():
                self._stop_workers(True)
                await asyncio.wait([exited], timeout=_KILLED_EXIT_WAIT)
            if not exited.done():
                log.warning('workers did not exit in time; killing them')
        self._escalate = self._drained = self._exited = None
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
        self._stats.close()
        self._stop_watching()
        self._loop = None

    def _hand_over(self) -> None:
        """In the process that started the flow, after a process forked from it took the flow
        over (``aqueduct.sockets``): forgets the flow without touching its workers, which now
        belong to the other process. Only this process's descriptors and mappings are closed."""
        self._hand_over_watch()
        if self._launcher is not None:
            self._launcher.detach()
        if self._driver is not None:
            self._driver.close()
        self._driver = self._launcher = None
        self._state = FlowState.STOPPED
        _running_flows.discard(self)

    def _teardown(self, kill: bool, read: bool = True) -> None:
        """Releases everything: kills and reaps the remaining workers, the launcher, the reader,
        and the driver (which unmaps and closes the shared memory). Safe to call twice.
        ``read=False`` leaves the reaping to the launcher, without reading the engine's rings."""
        driver = self._driver
        if self._front is not None:
            self._front.stop_polling()
            self._front = None
        if self._export_timer is not None:
            self._export_timer.cancel()
            self._export_timer = None
        self._metrics.disarm()
        if driver is not None and self._metrics_enabled and self._metrics_exporter is not None:
            self._export_metrics()  # the last period
        self._stats.close()
        if driver is not None:
            if read:
                # Every call still pending fails (FlowError: stopped) before its future goes.
                driver.begin_stop(False, 0.0)
            if kill:
                self._stop_workers(True)
            deadline = time.monotonic() + 5.0
            while read and self._any_alive() and time.monotonic() < deadline:
                for event in driver.wait(0.1)[1]:
                    if event.kind == 'exited':
                        self._reap(event.pid)
            self._stop_watching()
        if self._launcher is not None:
            self._launcher.close()
        self._launcher = None
        self._stop_executors(close=True)
        if driver is not None:
            driver.close()  # shared memory and descriptors go now, not when the GC gets to it
        self._driver = None
        self._reader_fd = None
        self._polling = False
        self._state = FlowState.STOPPED
        _running_flows.discard(self)
        for waiter in self._stopped_waiters:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
        self._stopped_waiters.clear()
