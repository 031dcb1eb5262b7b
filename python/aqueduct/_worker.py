"""The loop every worker process runs: take a batch, handle it, answer for each task.

Used by both launchers (:mod:`aqueduct._launch`): called directly in a process forked by the
zygote, or through :func:`spawn_entry` in a ``spawn``/``forkserver`` child.

For each task the worker also decides where it goes next: the first later step whose
``handle_condition`` is true, or back to the caller. Deadlines are checked once more just before
the handler runs, so an expired task never reaches it.

Per-task debug lines (1.15 logged one for every task, always) are written only when
``AQUEDUCT_LOG_TASKS=1`` is set; otherwise the loop pays one boolean test per task. They have
1.15's form, prefixed with the handler's class name: ``[MyHandler] Have message`` for each task a
worker takes, and ``[MyHandler] Task expired. Skip: <task>`` for one it skips. 1.15's worker of a
later step logged the skip when it read an expired task from its queue; here the engine drops the
task before any worker of that step sees it, so the worker that finished the task past its
deadline writes that line, naming the step the task was going to (and the main process writes it
when the engine drops a task that expired while it waited in a later step's queue).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from types import GeneratorType
from typing import Any, Callable, List, Sequence, Tuple

from . import _core, shm, streaming
from ._codec import decode, encode, http_classes
from .exceptions import remote_error_payload
from .handler import BaseTaskHandler
from .logger import log

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_EXPIRED = 2
ROUTE_DONE = _core.ROUTE_DONE

#: ``(step_index, handle_condition, handler class name)`` of every step after this worker's step.
Routes = Sequence[Tuple[int, Callable, str]]

#: Set to ``1`` to log every task a worker receives, skips or handles, at DEBUG level.
LOG_TASKS_ENV = 'AQUEDUCT_LOG_TASKS'


def logging_tasks() -> bool:
    return os.environ.get(LOG_TASKS_ENV, '') not in ('', '0')


def restore_default_signals() -> None:
    """Web servers (uvicorn, gunicorn) install SIGTERM/SIGINT handlers that a forked worker
    inherits; a worker must die on SIGTERM and raise KeyboardInterrupt on SIGINT."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def die_with_parent(expected_parent: int) -> None:
    """Arrange SIGKILL on the parent's death; exit now if the parent is already gone."""
    if _core.die_with_parent() != expected_parent:
        os._exit(1)


def _route(task, routes: Routes) -> int:
    for step, condition, _ in routes:
        if condition(task):
            return step
    return ROUTE_DONE


def _log_skipped(name: str, task) -> None:
    """1.15's lines for an expired task that reaches a step: taken, then skipped."""
    log.debug('[%s] Have message', name)
    log.debug('[%s] Task expired. Skip: %s', name, task)


def _describe(body: bytes, bufs) -> str:
    try:
        return repr(decode(body, bufs))
    except Exception as exc:  # only for a log line: the task is answered for all the same
        return f'<a task that cannot be unpickled: {type(exc).__name__}>'


def serve(worker: _core.Worker, handler: BaseTaskHandler, step_name: str, routes: Routes) -> int:
    """Runs ``on_start``, reports ready, then handles batches until told to stop."""
    name = type(handler).__name__
    log.info('[Worker] initialising handler %s', name)
    try:
        handler.on_start()
    except BaseException as exc:
        worker.start_failed(f'{step_name}: on_start raised {type(exc).__name__}: {exc}\n{traceback.format_exc()}')
        return 1
    worker.ready()
    log.info('[Worker] handler %s ok, starting loop', name)
    log_tasks = logging_tasks()
    while True:
        batch = worker.recv()
        if batch is None:
            return 0
        elapsed = handle_batch(worker, batch, handler, step_name, routes, log_tasks)
        # The batch's objects died with `handle_batch`'s frame: none of them keeps shared memory
        # referenced while this worker waits for the next batch.
        del batch
        worker.finish_batch(elapsed)


def handle_batch(
    worker: _core.Worker,
    batch: list,
    handler: BaseTaskHandler,
    step_name: str,
    routes: Routes,
    log_tasks: bool = False,
) -> float | None:
    """Answers for every task of ``batch``: expired, undecodable, failed, or its result.
    Returns how long the handler took, in seconds (``None`` if it did not run)."""
    send = worker.send_result
    name = type(handler).__name__
    tasks, indices, deadlines = take_batch(worker, batch, name, step_name, log_tasks)
    if not tasks:
        return None
    started = time.perf_counter()
    running = streaming._Running(worker, worker.batch_seq)
    streaming._begin(running, tasks, indices)
    try:
        result = handler.handle(*tasks)  # type: ignore[func-returns-value]  # a generator streams
        if result.__class__ is GeneratorType:
            _drive(result, running, indices)
    except BaseException as exc:
        # Any exception fails this batch only (the caller gets a stand-in for those that are no
        # ``Exception``, see ``HandlerError``). ``SystemExit`` and ``KeyboardInterrupt`` then end
        # the worker too, as they would any program: the flow replaces it.
        elapsed = time.perf_counter() - started
        payload = remote_error_payload(exc, step_name)
        for i in indices:
            send(i, STATUS_ERROR, ROUTE_DONE, payload)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            worker.finish_batch(elapsed)  # the answers above go out before the worker ends
            raise
        return elapsed
    finally:
        streaming._end(tasks)
    elapsed = time.perf_counter() - started
    if log_tasks:
        log.debug('[%s] Handled %d task(s) in %.3f ms (%s)', name, len(tasks), elapsed * 1e3, step_name)
    answer_batch(worker, tasks, indices, deadlines, step_name, routes, log_tasks)
    return elapsed


def take_batch(
    worker: _core.Worker, batch: list, name: str, step_name: str, log_tasks: bool = False
) -> Tuple[List, List[int], List[int]]:
    """Decodes the tasks of ``batch`` the handler is to see; answers at once for those that
    expired or cannot be decoded. Returns the tasks, their indices in the batch and their
    deadlines."""
    send = worker.send_result
    tasks: List = []
    indices: List[int] = []
    deadlines: List[int] = []
    now = time.monotonic_ns()
    for i, (deadline, _priority, body, bufs) in enumerate(batch):
        if deadline and now >= deadline:
            if log_tasks:  # described before the answer hands the task's buffers back
                _log_skipped(name, _describe(body, bufs))
            send(i, STATUS_EXPIRED, ROUTE_DONE, b'')
            continue
        try:
            tasks.append(decode(body, bufs))
        except Exception as exc:
            send(i, STATUS_ERROR, ROUTE_DONE, remote_error_payload(exc, step_name))
            continue
        indices.append(i)
        deadlines.append(deadline)
        if log_tasks:
            log.debug('[%s] Have message', name)
    return tasks, indices, deadlines


def answer_batch(
    worker: _core.Worker,
    tasks: List,
    indices: List[int],
    deadlines: List[int],
    step_name: str,
    routes: Routes,
    log_tasks: bool = False,
) -> None:
    """Sends each handled task on: to the first later step whose condition it meets, or back to
    its caller (an HTTP request as the front's response)."""
    send = worker.send_result
    now = time.monotonic_ns() if log_tasks else 0
    for i, task, deadline in zip(indices, tasks, deadlines, strict=True):
        try:
            route = _route(task, routes)
        except Exception as exc:
            send(i, STATUS_ERROR, ROUTE_DONE, remote_error_payload(exc, step_name, 'a handle_condition after'))
            continue
        if log_tasks and route != ROUTE_DONE and deadline and now >= deadline:
            # The engine drops it before the next step's workers see it (see the module docstring).
            _log_skipped(next(n for step, _, n in routes if step == route), task)
        bufs: List[Any] = []
        if route == ROUTE_DONE and http_classes[task.__class__]:
            try:
                body = task._final_state()
            except Exception as exc:
                send(i, STATUS_ERROR, ROUTE_DONE, remote_error_payload(exc, step_name, 'encoding the response of'))
                continue
        else:
            try:
                body, bufs = encode(task)
            except Exception as exc:
                send(i, STATUS_ERROR, ROUTE_DONE, remote_error_payload(exc, step_name, 'pickling the result of'))
                continue
        send(i, STATUS_OK, route, body, bufs)


def _drive(gen, running: streaming._Running, indices: List[int]) -> None:
    """Runs a generator ``handle``: each ``(task, part)`` it yields is emitted, and the
    ``yield`` evaluates to what :func:`aqueduct.emit` returned. Once no task of the batch has a
    caller waiting for it (every one streams and every caller is gone), the generator is closed."""
    emit = streaming.emit
    try:
        item = next(gen)
        while True:
            if item.__class__ is not tuple or len(item) != 2:
                gen.close()
                raise TypeError(
                    f'a streaming handle() yields (task, part) pairs; it yielded {type(item).__name__} {item!r:.80}'
                )
            alive = emit(item[0], item[1])
            if not alive and _callers_gone(running, indices):
                gen.close()
                return
            item = gen.send(alive)
    except StopIteration:
        return


def _callers_gone(running: streaming._Running, indices: List[int]) -> bool:
    """Whether every task of the batch streams and every one of their callers is gone (a
    ``process()`` caller waits for the result, whatever the others do)."""
    for i in indices:
        streamed, cancelled = running.worker.stream_state(i, running.seq)
        if not (streamed and cancelled):
            return False
    return True


def run(
    region_fd: int,
    doorbell_fd: int,
    pool_fd: int,
    pool_index: int,
    slot: int,
    handler: BaseTaskHandler,
    step_name: str,
    routes: Routes,
) -> int:
    """Entry point of a worker process: the flow's region and doorbell descriptors, the shared
    memory pool's descriptor and this process's index in it, and what to run."""
    restore_default_signals()
    pool = shm.attach_worker_pool(pool_fd, pool_index)
    worker = _core.Worker(region_fd, doorbell_fd, slot, pool)
    try:
        return serve(worker, handler, step_name, routes)
    except KeyboardInterrupt:
        return 0
    except BaseException:
        log.exception('[Worker] %s crashed', step_name)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class InheritedFd:
    """A descriptor handed to a ``spawn``/``forkserver`` child through multiprocessing's own
    descriptor passing: pickling it while the child is being launched registers the fd with
    the launcher, and unpickling in the child yields the child's copy."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return (_detach_fd, (reduction.DupFd(self.fd),))


def _detach_fd(dup) -> int:
    return dup.detach()


def spawn_entry(
    region_fd: int,
    doorbell_fd: int,
    pool_fd: int,
    pool_index: int,
    slot: int,
    handler: BaseTaskHandler,
    step_name: str,
    routes: Routes,
    owner_pid: int,
    owner_is_parent: bool,
) -> None:
    """Target of a ``spawn``/``forkserver`` worker process. ``owner_pid`` is the main process.
    A ``spawn`` child is the main process's own (it dies with its parent); a ``forkserver``
    child is the fork server's, which outlives the main process when that is SIGKILLed, so it
    watches the main process itself and dies with it."""
    if owner_is_parent:
        if _core.die_with_parent() != owner_pid:
            os._exit(1)
    else:
        try:
            _core.exit_with_process(owner_pid)
        except OSError:  # the main process is already gone
            os._exit(1)
    sys.exit(run(region_fd, doorbell_fd, pool_fd, pool_index, slot, handler, step_name, routes))
