"""Streaming: a handler sends partial results of its tasks, the caller reads them as they come.

**In a handler** (any step), either call :func:`emit` for a task of the batch, or write
``handle`` as a generator that yields ``(task, part)`` pairs; both may be mixed::

    class Generate(BaseTaskHandler):
        def handle(self, *tasks):
            for _ in range(max_tokens):
                for task in tasks:
                    token = self.model.next_token(task)
                    task.text += token
                    yield task, token        # or: aqueduct.emit(task, token)

A part is any picklable value; large arrays in it travel through the shared-memory pool as a
task's fields do. The task's final state is what the handler leaves in it, as for
:meth:`Flow.process`. ``emit`` returns ``False`` (and the ``yield`` evaluates to ``False``)
once the task's caller has gone away: cancelled, broken out of its loop, past its deadline; the
part is dropped and the handler may stop working on that task. When every task of a batch that
streams has lost its caller, the runtime closes a generator handler (``GeneratorExit`` at its
``yield``), so a loop that never checks stops anyway.

**The caller**::

    async for part in flow.stream(task, timeout_sec=30, idle_timeout_sec=5):
        ...
    # here the task holds its final state, as after `await flow.process(task)`

Semantics, the same whichever step streams:

- **Bounded buffering, backpressure.** A worker may run at most
  :data:`STREAM_WINDOW` parts ahead of its caller for each task; the next ``emit`` waits until
  the caller takes one. A slow consumer holds its worker back (and with it the other tasks of
  the batch); it never makes memory grow. The deadline (``timeout_sec``) covers the whole
  stream, so a consumer that stops reading fails its stream at the deadline and frees the
  worker.
- **Cancellation.** Leaving the loop early (``break``, an exception, the task of an HTTP
  request cancelled), ``aclose()``, or the stream object being dropped cancels the task: the
  handler's next ``emit`` returns ``False``, no more parts are sent, a task not begun never
  runs.
- **Faults** raise in the loop after the parts already delivered, with the exceptions of
  :meth:`Flow.process`: the handler's exception (``HandlerError``), ``WorkerDiedError``,
  ``TaskTimeoutError`` at the deadline, and ``TaskTimeoutError`` when ``idle_timeout_sec``
  passes with no part (nor the result).
- **Any step may stream**: its parts go to the caller, not to the next step, which sees the task
  as the handler left it. ``process()`` of a flow whose steps stream works as before: the parts
  are dropped in the worker, before they are encoded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

from . import _core
from ._codec import decode_value, encode_value, http_classes

if TYPE_CHECKING:  # pragma: no cover
    from typing import Protocol

    from .task import BaseTask

    class _Source(Protocol):
        """What a stream submits through: a ``Flow``, or a ``SocketFlow``."""

        def _start_stream(self, task: BaseTask, timeout_sec: float, idle_ns: int) -> Any: ...
        def _finish_stream(self, task: BaseTask, result: Any, started: float) -> None: ...
        def _idle_timeout_error(self) -> Exception: ...

__all__ = ['STREAM_WINDOW', 'TaskStream', 'emit']

#: Parts of one task a worker may send before its caller has taken them (the engine's window).
STREAM_WINDOW: int = _core.STREAM_WINDOW


class _Running:
    """A batch a worker is handling: the worker's endpoint and the batch's sequence number."""

    __slots__ = ('worker', 'seq')

    def __init__(self, worker: Any, seq: int):
        self.worker = worker
        self.seq = seq


#: ``id(task)`` -> ``(batch, position)`` for every task of a batch being handled in this
#: process (several at once for an executor's slots, which are threads). Threads a handler
#: starts find their tasks here too; once the batch ends its tasks are gone from it.
_handled: Dict[int, Tuple[_Running, int]] = {}
#: Why this process's handlers cannot stream at all (a Ray actor: ``aqueduct.ray``), or None.
_cannot_stream: Optional[str] = None


def _begin(running: _Running, tasks: List[Any], positions: List[int]) -> None:
    for task, position in zip(tasks, positions, strict=True):
        _handled[id(task)] = (running, position)


def _end(tasks: List[Any]) -> None:
    for task in tasks:
        _handled.pop(id(task), None)


def emit(task: Any, part: Any) -> bool:
    """Sends ``part`` to the caller of ``task`` (a task of the batch the handler is handling),
    after waiting while the caller is :data:`STREAM_WINDOW` parts behind. Returns ``False`` when
    that caller is gone (the part is dropped; the handler may stop working on the task), ``True``
    otherwise, also when the caller awaits only the result (``process()``: the part is dropped
    without being encoded). May be called from threads the handler starts, until ``handle()``
    returns."""
    entry = _handled.get(id(task))
    if entry is None:
        if _cannot_stream is not None:
            raise TypeError(_cannot_stream)
        if not _handled:
            raise RuntimeError('aqueduct.emit() sends a partial result from a handler: call it while handle() runs')
        raise ValueError(f'aqueduct.emit(): {task!r} is not one of the tasks handle() was given')
    running, index = entry
    streamed, cancelled = running.worker.stream_state(index, running.seq)
    if cancelled:
        return False
    if not streamed:
        return True
    bufs: List[Any]
    if http_classes[task.__class__]:
        body, bufs = task._part_state(part), []
    else:
        body, bufs = encode_value(part)
    return running.worker.send_part(index, running.seq, body, bufs) != 'cancelled'


class _Call:
    """The driver's token for a streaming call: its parts in arrival order, then its outcome."""

    __slots__ = ('parts', 'outcome', 'waiter')

    def __init__(self) -> None:
        self.parts: Deque[Tuple[bytes, List[Any], int]] = deque()
        self.outcome: Any = None
        self.waiter: Optional[asyncio.Future] = None

    def _part(self, body: bytes, bufs: List[Any], receipt: int) -> None:
        self.parts.append((body, bufs, receipt))
        self._wake()

    def set_result(self, outcome: Any) -> None:
        self.outcome = outcome
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class TaskStream:
    """An asynchronous iterator over a task's partial results (:meth:`Flow.stream`). The task is
    submitted at the first ``__anext__``; when the iteration ends, the task holds its final
    state. Use ``async with`` (or ``aclose()``) to cancel it deterministically when leaving
    early; dropping the object cancels it too."""

    def __init__(self, flow: _Source, task: BaseTask, timeout_sec: float, idle_ns: int):
        self._flow = flow
        self._task = task
        self._timeout_sec = timeout_sec
        self._idle_ns = idle_ns
        self._call: Optional[_Call] = None
        self._id: Optional[int] = None
        self._driver: Any = None
        self._deadline_started = 0.0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._finished = False
        self._idle_in_loop = False

    def __aiter__(self) -> TaskStream:
        return self

    async def __aenter__(self) -> TaskStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        call = self._call
        if call is None:
            call = self._start()
            if call is None:  # no step takes the task: it is done as it is
                self._finished = True
                raise StopAsyncIteration
        if call.waiter is not None:  # refused, not cancelled: the stream is the other reader's
            raise RuntimeError('a stream is read by one consumer: another one awaits its next part')
        try:
            while not call.parts and call.outcome is None and not self._finished:
                call.waiter = asyncio.get_running_loop().create_future()
                try:
                    if self._idle_in_loop:
                        await self._wait_idle(call.waiter)
                    else:
                        await call.waiter
                finally:
                    call.waiter = None
        except BaseException:  # cancelled while waiting (or idle too long): the task goes too
            self._cancel()
            raise
        if self._finished:  # closed (``aclose()``) by another task meanwhile
            raise StopAsyncIteration
        if call.parts:
            body, bufs, receipt = call.parts.popleft()
            driver = self._driver
            if driver is not None and not driver.closed:
                driver.part_taken(self._id, receipt)
            try:
                return decode_value(body, bufs)
            except BaseException:
                self._cancel()
                raise
        self._finished = True
        self._flow._finish_stream(self._task, call.outcome, self._deadline_started)
        raise StopAsyncIteration

    async def _wait_idle(self, waiter: asyncio.Future) -> None:
        """Waits for the next part or the outcome for at most the idle limit, for a front end
        whose calls have none in the engine (``SocketFlow``)."""
        try:
            await asyncio.wait_for(waiter, self._idle_ns / 1e9)
        except TimeoutError:
            raise self._flow._idle_timeout_error() from None

    def _start(self) -> Optional[_Call]:
        started = self._flow._start_stream(self._task, self._timeout_sec, self._idle_ns)
        if started is None:
            return None
        self._call, self._id, self._driver, self._deadline_started = started
        self._idle_in_loop = bool(self._idle_ns) and getattr(self._driver, 'idle_in_loop', False)
        self._loop = asyncio.get_running_loop()
        return self._call

    async def aclose(self) -> None:
        """Stops reading: cancels the task if it is still in the flow."""
        self._cancel()

    def _cancel(self) -> None:
        if self._finished:
            return
        self._finished = True
        driver, self._driver = self._driver, None
        _cancel_call(driver, self._id, self._call)

    def __del__(self) -> None:
        # A finalizer may run anywhere Python allocates, the driver's own delivery of parts
        # included (under its lock, which is not reentrant): the cancel waits for the loop.
        if self._finished or self._call is None or self._loop is None:
            return
        self._finished = True
        try:
            self._loop.call_soon_threadsafe(_cancel_call, self._driver, self._id, self._call)
        except RuntimeError:  # the loop is closed: the flow that served it has gone with it
            pass


def _cancel_call(driver: Any, call_id: Optional[int], call: Optional[_Call]) -> None:
    """Cancels a streaming call and gives back the room of the parts its caller never read."""
    if driver is None or call_id is None or driver.closed:
        return
    driver.cancel(call_id)
    if call is not None:
        while call.parts:
            _, _, receipt = call.parts.popleft()
            driver.part_taken(call_id, receipt)
        call._wake()  # a consumer awaiting its next part in another task: it ends


def _check_idle(idle_timeout_sec: Optional[float]) -> int:
    """``idle_timeout_sec`` as the driver takes it: nanoseconds, 0 for none."""
    if idle_timeout_sec is None:
        return 0
    if isinstance(idle_timeout_sec, bool) or not isinstance(idle_timeout_sec, (int, float)):
        raise TypeError(f'idle_timeout_sec must be a number of seconds or None, got {type(idle_timeout_sec).__name__}')
    if not idle_timeout_sec > 0:  # nan too
        raise ValueError(f'idle_timeout_sec must be > 0, got {idle_timeout_sec!r}')
    if idle_timeout_sec == float('inf'):
        return 0
    return max(1, int(min(idle_timeout_sec, 1e9) * 1e9))

