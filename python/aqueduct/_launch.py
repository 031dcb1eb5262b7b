"""Starting and reaping worker processes, per ``mp_start_method``.

``fork``: a zygote is forked from the main process in ``Flow.start()``, before the flow has
created any thread (it never does) and while the handlers are in their pristine, pre-``on_start``
state. The zygote then forks every worker, the first ones and every replacement, so a
replacement never inherits what the main process became later (threads of a web server, a large
heap, locks held by other threads). The zygote and its workers receive SIGKILL when their parent
dies (``PR_SET_PDEATHSIG``), so a SIGKILLed main process leaves nothing behind.

``spawn`` and ``forkserver``: each worker is a fresh interpreter started by multiprocessing,
which pickles the handler and the conditions (an unpicklable one fails ``start()`` with an error
that names it) and passes the flow's two descriptors with multiprocessing's own fd passing.

Either way the main process watches each worker through a pidfd (in the engine) and asks the
launcher to reap it once the engine has seen it exit, so a pid is never reused under a watcher.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import socket
import sys
from typing import Dict, List, Sequence, Tuple

from . import _worker
from .exceptions import FlowError
from .handler import BaseTaskHandler
from .logger import log

#: What a launcher needs to know about each step: handler, step name, routes after it.
StepPlan = Tuple[BaseTaskHandler, str, _worker.Routes]


class ZygoteGone(FlowError):
    """The fork zygote is not answering: it exited or was killed."""


#: Exit codes a launcher remembers (of the workers it reaped last), for ``Flow._contexts``.
EXIT_CODES_KEPT = 1024


class Launcher:
    #: pid -> exit code (``-signal`` if killed) of workers reaped lately.
    exit_codes: Dict[int, int]

    def _record_exit(self, pid: int, code: int) -> None:
        codes = self.exit_codes
        codes[pid] = code
        if len(codes) > EXIT_CODES_KEPT:
            del codes[next(iter(codes))]

    def spawn(self, slot: int, step: int, pool_index: int) -> int:
        raise NotImplementedError

    def reap(self, pid: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Closes this process's handles only (another process took the workers over)."""


class ForkZygote(Launcher):
    """The ``fork`` launcher: a single-threaded process that forks workers on request.

    Protocol over a socketpair, one line per request: ``spawn <slot> <step> <pool index>``
    answers ``<pid>``;
    ``reap <pid>`` answers ``ok <exit code>`` once the dead worker is reaped; ``exit`` ends the zygote.
    """

    def __init__(self, region_fd: int, doorbell_fd: int, pool_fd: int, plans: Sequence[StepPlan]):
        self.exit_codes = {}
        self._args = (region_fd, doorbell_fd, pool_fd, plans)
        self._fork_zygote()

    def _fork_zygote(self) -> None:
        region_fd, doorbell_fd, pool_fd, plans = self._args
        parent_end, child_end = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        main_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the zygote; it never returns into the caller's stack
            code = 1
            try:
                parent_end.close()
                _worker.die_with_parent(main_pid)
                _worker.restore_default_signals()
                code = _zygote_serve(child_end, region_fd, doorbell_fd, pool_fd, plans)
            finally:
                os._exit(code)
        child_end.close()
        self.pid = pid
        self._sock = parent_end
        self._io = parent_end.makefile('rwb', buffering=0)

    def _request(self, line: str) -> str:
        try:
            self._io.write(line.encode() + b'\n')
            reply = self._io.readline()
        except OSError as exc:
            raise ZygoteGone(f'the worker launcher (zygote, pid {self.pid}) is gone: {exc}') from exc
        if not reply:
            raise ZygoteGone(f'the worker launcher (zygote, pid {self.pid}) exited')
        return reply.decode().strip()

    def spawn(self, slot: int, step: int, pool_index: int) -> int:
        request = f'spawn {slot} {step} {pool_index}'
        try:
            return int(self._request(request))
        except ZygoteGone as exc:
            # Killed from outside (its workers died with it, and are being replaced one by one):
            # a new zygote, forked from the main process as it is now. That is less pristine than
            # the first (the main process may have threads by now), so say so.
            log.warning('%s; starting a new one to fork replacement workers', exc)
            self.detach()
            try:
                os.kill(self.pid, signal.SIGKILL)  # in case it is wedged rather than dead
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._fork_zygote()
            return int(self._request(request))

    def reap(self, pid: int) -> None:
        reply = self._request(f'reap {pid}').split()
        if len(reply) == 2 and reply[1].lstrip('-').isdigit():
            self._record_exit(pid, int(reply[1]))

    def detach(self) -> None:
        self._io.close()
        self._sock.close()

    def close(self) -> None:
        try:
            self._io.write(b'exit\n')
        except OSError:
            pass
        self._io.close()
        self._sock.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _zygote_serve(
    sock: socket.socket, region_fd: int, doorbell_fd: int, pool_fd: int, plans: Sequence[StepPlan]
) -> int:
    io = sock.makefile('rwb', buffering=0)
    zygote_pid = os.getpid()
    children: List[int] = []
    for line in io:
        cmd, *args = line.decode().split()
        if cmd == 'spawn':
            slot, step, pool_index = int(args[0]), int(args[1]), int(args[2])
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # a worker
                code = 1
                try:
                    io.close()
                    sock.close()
                    _worker.die_with_parent(zygote_pid)
                    handler, step_name, routes = plans[step]
                    # Own copies of the descriptors: the inherited numbers stay with the copy of
                    # the main process's engine object, which this process never touches.
                    fds = (os.dup(region_fd), os.dup(doorbell_fd), os.dup(pool_fd))
                    code = _worker.run(*fds, pool_index, slot, handler, step_name, routes)
                finally:
                    os._exit(code)
            children.append(pid)
            io.write(f'{pid}\n'.encode())
        elif cmd == 'reap':
            pid = int(args[0])
            exit_code = ''
            try:
                exit_code = str(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            except ChildProcessError:
                pass
            if pid in children:
                children.remove(pid)
            io.write(f'ok {exit_code}\n'.encode())
        elif cmd == 'exit':
            break
    # The main process is gone or closing: workers must not outlive it.
    for pid in children:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return 0


class MultiprocessingLauncher(Launcher):
    """The ``spawn`` and ``forkserver`` launcher."""

    def __init__(self, method: str, region_fd: int, doorbell_fd: int, pool_fd: int, plans: Sequence[StepPlan]):
        self._ctx = multiprocessing.get_context(method)
        self._method = method
        self._region_fd = region_fd
        self._doorbell_fd = doorbell_fd
        self._pool_fd = pool_fd
        self._plans = plans
        self._procs: Dict[int, multiprocessing.process.BaseProcess] = {}
        self._creator = os.getpid()
        self.exit_codes = {}

    def spawn(self, slot: int, step: int, pool_index: int) -> int:
        handler, step_name, routes = self._plans[step]
        owner = os.getpid()
        args = (
            _worker.InheritedFd(self._region_fd),
            _worker.InheritedFd(self._doorbell_fd),
            _worker.InheritedFd(self._pool_fd),
            pool_index,
            slot,
            handler,
            step_name,
            routes,
            owner,
            self._method == 'spawn',
        )
        # typeshed's get_context(str) is a BaseContext, without the Process every real context has
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker.spawn_entry, args=args, daemon=True, name=f'aqueduct-{step_name}'
        )
        try:
            proc.start()
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise FlowError(
                f'cannot start {step_name} with mp_start_method={self._method!r}: '
                f'{self._unpicklable(handler, routes)} cannot be pickled ({type(exc).__name__}: {exc}). '
                f'Define handlers and conditions at module level, or use mp_start_method="fork".'
            ) from exc
        self._procs[proc.pid] = proc
        return proc.pid

    def _unpicklable(self, handler: BaseTaskHandler, routes: _worker.Routes) -> str:
        """Names what a worker of this step would receive and cannot: its handler, or the
        ``handle_condition`` of a later step (a step's worker routes its results onwards)."""
        candidates: List[Tuple[str, object]] = [('its handler', handler)]
        candidates += [(f'the handle_condition of {self._plans[j][1]}', condition) for j, condition, _ in routes]
        for what, value in candidates:
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - any failure names the culprit
                return what
        return 'its handler or a handle_condition'

    def reap(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        # Only the parent can reap; a process that took the flow over leaves it to the parent.
        if proc is not None and os.getpid() == self._creator:
            proc.join()
            if proc.exitcode is not None:
                self._record_exit(pid, proc.exitcode)
            proc.close()

    def detach(self) -> None:
        self._procs.clear()

    def close(self) -> None:
        if os.getpid() != self._creator:
            for proc in self._procs.values():
                if proc.pid is not None:
                    try:
                        os.kill(proc.pid, 9)
                    except ProcessLookupError:
                        pass
            self._procs.clear()
            return
        for proc in self._procs.values():
            if proc.is_alive():
                log.warning('killing worker %s still alive at shutdown', proc.pid)
                proc.kill()
            proc.join()
        self._procs.clear()


def make_launcher(method: str, region_fd: int, doorbell_fd: int, pool_fd: int, plans: Sequence[StepPlan]) -> Launcher:
    if method == 'fork':
        return ForkZygote(region_fd, doorbell_fd, pool_fd, plans)
    return MultiprocessingLauncher(method, region_fd, doorbell_fd, pool_fd, plans)
