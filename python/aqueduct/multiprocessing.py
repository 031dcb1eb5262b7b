"""aqueduct 1.15's ``aqueduct.multiprocessing``: starting a function in processes, and the
:class:`ProcessContext` that holds them.

1.15 ran each step in processes started by :func:`start_processes` and kept them in
``Flow._contexts`` (handler -> ``ProcessContext``). Here workers are forked by the engine's
launcher (see ``aqueduct._launch``), but :func:`start_processes` still works for what users started
with it (a flow server process, for instance), and ``Flow._contexts`` is a read-only view of the
flow's real workers in the same shape: per handler, a context whose ``processes`` have ``pid``,
``is_alive()``, ``terminate()``, ``kill()``, ``join()`` and ``exitcode``, as
``multiprocessing.Process`` objects do.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import time
import traceback
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, cast

from .exceptions import AqueductError
from .logger import log

if TYPE_CHECKING:
    from .flow import Flow
    from .handler import BaseTaskHandler

logger = log.getChild('multiprocessing')


class ProcessException(AqueductError):
    """A process of a :class:`ProcessContext` failed; ``error_index`` is its index there."""

    def __init__(self, msg: str, error_index: int, pid: int):
        super().__init__(msg)
        self.error_index = error_index
        self.pid = pid
        self.error_pid = pid


class ProcessRaisedException(ProcessException):
    """The process's function raised; the message holds the child's traceback."""


class ProcessExitedException(ProcessException):
    """The process exited with a non-zero code or was killed by a signal."""

    def __init__(self, msg: str, error_index: int, error_pid: int, exit_code: int, signal_name: Optional[str] = None):
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name


def _run(fn: Callable, index: int, args: tuple, error_queue) -> None:
    """The child's entry point: ``fn(index, *args)``, its traceback sent to the parent if it raises."""
    # A child forked from inside a running event loop (an async test, an app) must be able to
    # run a loop of its own.
    asyncio.events._set_running_loop(None)
    try:
        fn(index, *args)
    except KeyboardInterrupt:
        pass  # the parent interrupted the child: nothing to report
    except Exception:
        text = traceback.format_exc()
        logger.error('process %d raised:\n%s', index, text)
        error_queue.put(text)
        sys.exit(1)


class ProcessContext:
    """Processes started together, with the queues their errors come back through."""

    def __init__(self, processes: Sequence[Any], error_queues: Sequence[Any]):
        self.processes = list(processes)
        self.error_queues = list(error_queues)
        self._sentinels: Optional[Dict[int, int]] = None

    @property
    def sentinels(self) -> Dict[int, int]:
        """Sentinel -> index of the processes not joined yet (taken when first needed: the
        views of a flow's workers open a descriptor for theirs)."""
        if self._sentinels is None:
            self._sentinels = {p.sentinel: i for i, p in enumerate(self.processes)}
        return self._sentinels

    def __repr__(self) -> str:
        return f'<ProcessContext processes: {",".join(map(str, self.processes))}>'

    def pids(self) -> List[int]:
        return [int(p.pid) for p in self.processes]

    def join(self, timeout: Optional[float] = None) -> bool:
        """Waits for the processes; ``True`` once all have exited with code 0, ``False`` if some
        are still running after ``timeout``. If one failed, terminates the others and raises
        :class:`ProcessRaisedException` (with its traceback) or :class:`ProcessExitedException`."""
        sentinels = self.sentinels
        if not sentinels:
            return True
        failed = None
        for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=timeout):
            index = sentinels.pop(cast(int, sentinel))  # wait() returns some of the sentinels given: ints
            process = self.processes[index]
            process.join()
            if process.exitcode != 0:
                failed = index
                break
        if failed is None:
            return not sentinels
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join()
        process = self.processes[failed]
        queue = self.error_queues[failed] if failed < len(self.error_queues) else None
        if queue is not None and not queue.empty():
            text = queue.get()
            raise ProcessRaisedException(
                f'\n\n-- Process {failed} terminated with the following error:\n{text}', failed, process.pid
            )
        code = process.exitcode
        if code < 0:
            name = signal.Signals(-code).name
            raise ProcessExitedException(
                f'process {failed} terminated with signal {name}', failed, process.pid, code, signal_name=name
            )
        raise ProcessExitedException(f'process {failed} terminated with exit code {code}', failed, process.pid, code)

    def close(self) -> None:
        """Releases the descriptors of the error queues and of the processes that have exited
        (not in 1.15, where they waited for the garbage collector)."""
        for queue in self.error_queues:
            queue.close()
        for process in self.processes:
            if not process.is_alive():
                process.close()

    def join_all(self, timeout: Optional[float] = None) -> bool:
        """Waits up to ``timeout`` seconds for each process, whatever its exit code; ``True`` if
        all have exited."""
        done = True
        for process in self.processes:
            if process.is_alive():
                process.join(timeout)
                done = done and not process.is_alive()
        return done


def start_processes(
    fn: Callable,
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = 'spawn',
    on_start_wait: float = 0,
) -> Optional[ProcessContext]:
    """Runs ``fn(i, *args)`` in ``nprocs`` processes (``i`` from 0), as aqueduct 1.15 did.

    With ``join=True`` waits for them all and raises if one fails (see
    :meth:`ProcessContext.join`); with ``join=False`` returns their :class:`ProcessContext`.
    ``on_start_wait`` is deprecated, as in 1.15: seconds to sleep after starting more than one
    process with a start method other than ``fork``.
    """
    ctx = multiprocessing.get_context(start_method)
    processes, queues = [], []
    for i in range(nprocs):
        queue = ctx.SimpleQueue()
        # typeshed's get_context(str) is a BaseContext, without the Process every real context has
        process = ctx.Process(target=_run, args=(fn, i, args, queue), daemon=daemon)  # type: ignore[attr-defined]
        process.start()
        processes.append(process)
        queues.append(queue)
    context = ProcessContext(processes, queues)
    if on_start_wait:
        warnings.warn('on_start_wait is deprecated and ignored by flows; it only sleeps here', DeprecationWarning, 2)
        if nprocs > 1 and start_method != 'fork':
            time.sleep(on_start_wait)
    if not join:
        return context
    try:
        while not context.join():
            pass
    finally:
        context.close()
    return None


# ---------------------------------------------------------------------- Flow._contexts


class WorkerProcess:
    """One worker process of a flow, with the part of ``multiprocessing.Process``'s API that
    callers of 1.15's ``Flow._contexts`` used. It stands for the process that had ``pid`` when
    the view was taken: once that one exits, a replacement is a different ``WorkerProcess``."""

    daemon = True

    def __init__(self, flow: Flow, slot: int, pid: int, name: str):
        self._flow = flow
        # Exit codes the flow's launcher records when it reaps: kept, as they outlive the flow.
        self._exit_codes = flow.view.exit_codes()
        self._slot = slot
        self.pid = self.ident = pid
        self.name = name
        self._exitcode: Optional[int] = None
        self._sentinel: Optional[int] = None

    def __repr__(self) -> str:
        state = 'started' if self.is_alive() else f'stopped exitcode={self.exitcode}'
        return f'<WorkerProcess name={self.name!r} pid={self.pid} {state} daemon>'

    def _tracked(self) -> bool:
        """The flow still counts this very process as its slot's live worker (so its pid has
        not been reaped, nor reused)."""
        return any(w.slot == self._slot and w.pid == self.pid and w.alive for w in self._flow.view.workers())

    def _exited(self, timeout: float = 0.0) -> bool:
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([fd], [], [], timeout)[0])
        finally:
            os.close(fd)

    def is_alive(self) -> bool:
        return self._tracked() and not self._exited()

    def terminate(self) -> None:
        """SIGTERM: the worker dies at once (workers keep SIGTERM's default action)."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._tracked():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def join(self, timeout: Optional[float] = None) -> None:
        """Waits until the process has exited (or ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tracked():
            remaining = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if remaining <= 0 or self._exited(remaining):
                return

    @property
    def exitcode(self) -> Optional[int]:
        """``None`` while running; then the exit code, or ``-signal`` if a signal killed it."""
        if self._exitcode is None and not self.is_alive():
            self._exitcode = self._read_exitcode()
        return self._exitcode

    def _read_exitcode(self) -> Optional[int]:
        code = self._exit_codes.get(self.pid)
        if code is not None:
            return code
        # Exited and not reaped yet (a zombie): the kernel keeps its wait status in /proc.
        try:
            with open(f'/proc/{self.pid}/stat', 'rb') as f:
                fields = f.read().rsplit(b')', 1)[1].split()
            if fields[0] == b'Z':
                return os.waitstatus_to_exitcode(int(fields[-1]))
        except (OSError, IndexError, ValueError):
            pass
        return None

    @property
    def sentinel(self) -> int:
        """A descriptor that becomes readable when the process exits (a pidfd)."""
        if self._sentinel is None:
            self._sentinel = os.pidfd_open(self.pid)
        return self._sentinel

    def close(self) -> None:
        if self._sentinel is not None:
            os.close(self._sentinel)
            self._sentinel = None

    def __del__(self) -> None:
        self.close()


def flow_contexts(flow: Flow) -> Mapping[BaseTaskHandler, ProcessContext]:
    """``Flow._contexts``: per step's handler, a :class:`ProcessContext` of its live workers
    (read-only; empty while the flow is not started)."""
    contexts: Dict[Any, ProcessContext] = {}
    view = flow.view
    if view.started:
        workers = view.workers()
        for step_index, step in enumerate(view.steps):
            processes = [
                WorkerProcess(flow, w.slot, w.pid, f'{view.step_names[step_index]}-{w.slot}')
                for w in workers
                if w.step == step_index
            ]
            contexts[step.handler] = ProcessContext(processes, [])
    return types.MappingProxyType(contexts)


__all__ = [
    'ProcessContext',
    'ProcessException',
    'ProcessExitedException',
    'ProcessRaisedException',
    'WorkerProcess',
    'flow_contexts',
    'start_processes',
]
