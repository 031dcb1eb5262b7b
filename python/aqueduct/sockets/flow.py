"""``SocketFlow``: one flow shared by several web worker processes, with aqueduct 1.15's API.

With gunicorn ``--preload`` (or any server that imports the app once and forks its workers)::

    flow = SocketFlow()
    flow.preload(build_flow())        # in the master: forks the flow server, starts the flow

    # in each web worker (an app startup hook)
    await flow.start()
    # per request
    await flow.process([task], timeout_sec=5)

With ``uvicorn --workers`` (workers that do not share a parent which preloaded the flow), run
the flow server beside the web server with ``python -m aqueduct serve module:build_flow`` and
``await SocketFlow().start()`` in each worker.

Where aqueduct 1.15 pickles every task through a Unix socket to a server that awaits
``flow.process()`` for it, here the socket only sets up a *port*: two shared-memory rings
straight into the flow's engine (``aqueduct_core::port``). Tasks go into the step queues and
results come back without any Python code running for them in the flow server, and large
arrays move through the shared pool by reference, as between steps.

Environment (``{name}_`` prefix, as in 1.15; the default ``name`` gives a leading ``_``):
``SOCKET_PATH`` (default ``flow.sock`` in the user's private socket directory,
``$XDG_RUNTIME_DIR/aqueduct`` or ``<tmp>/aqueduct-<uid>``; 1.15 used ``/tmp/flow.sock``),
``SOCKET_CONNECT_TIMEOUT`` (seconds a ``start()`` keeps retrying while the server is not up yet,
default 10) and ``SOCKET_ALLOWED_GID`` (see ``allowed_gid``).

A client only talks to a server of its own user (or of group ``allowed_gid``): it checks the
listener's credentials before it reads a byte, and reads a bounded binary handshake, not a
pickle. See ``docs/security.md``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import pickle
import select
import signal
import socket
import time
from typing import Any, Callable, List, Optional, Tuple, Union

from .. import _core, _unixsock, shm
from ..exceptions import FlowError, NotRunningError, TaskTimeoutError
from ..flow import Flow, FlowState, _resolve, apply_result, check_call, encode_task, entry_step, failure_exception
from ..logger import log
from ..task import BaseTask
from ..utils import get_env_with_prefix
from .flow_server import (
    ACCEPTED,
    HANDSHAKE,
    HANDSHAKE_FDS,
    FlowSocketServer,
    decode_handshake,
    default_socket_path,
    env_gid,
)

#: Seconds the whole handshake (header, descriptors, body) may take once connected.
HANDSHAKE_TIMEOUT = 30.0


class SocketTaskTimeoutError(TaskTimeoutError, asyncio.TimeoutError):
    """A task's ``timeout_sec`` passed. Also an ``asyncio.TimeoutError``, which is what
    aqueduct 1.15's ``SocketFlow.process`` raised."""


class FlowServerProcess:
    """The flow server process started by :meth:`SocketFlow.preload`."""

    def __init__(self, pid: int, socket_path: str):
        self.pid = pid
        self.socket_path = socket_path
        #: aqueduct 1.15 returned a ``ProcessContext`` whose ``processes`` callers iterated.
        self.processes = [self]
        self._exitcode: Optional[int] = None
        self._owner = os.getpid()

    def is_alive(self) -> bool:
        return self.poll() is None

    def poll(self) -> Optional[int]:
        """The exit code if the server exited (and is reaped now), else ``None``."""
        if self._exitcode is None and os.getpid() == self._owner:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self._exitcode = -1
                return self._exitcode
            if pid:
                self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode

    def terminate(self) -> None:
        """Asks the server to stop gracefully (SIGTERM)."""
        if self.is_alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def join(self, timeout: Optional[float] = None) -> Optional[int]:
        """Waits for the server to exit; returns its exit code (``None`` on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pidfd = None
        try:
            pidfd = os.pidfd_open(self.pid)
        except (ProcessLookupError, OSError):
            pass
        try:
            while self.poll() is None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if remaining == 0.0:
                    return None
                if pidfd is not None:
                    select.select([pidfd], [], [], remaining)
                else:
                    return None
            return self._exitcode
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the server gracefully, then kills it after ``timeout`` seconds."""
        if os.getpid() != self._owner:
            return
        self.terminate()
        if self.join(timeout) is None:
            log.warning('the flow server (pid %s) did not stop in %s s: killing it', self.pid, timeout)
            os.kill(self.pid, signal.SIGKILL)
            self.join()


def _fork_server(server: FlowSocketServer, flow: Flow, timeout: Optional[float]) -> FlowServerProcess:
    """Forks the flow server and waits until it serves (or failed to start: then raises)."""
    handed_over = flow.are_steps_initialized
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the flow server; it never returns into the caller's stack
        code = 1
        try:
            os.close(read_end)
            # Stop gracefully (SIGTERM) when the process that preloaded the flow dies.
            if _core.die_with_parent(signal.SIGTERM) != parent:
                os._exit(1)
            # A process group of its own (its workers join it): a signal to the web server's
            # group (Ctrl-C, `kill -- -pgid`) stops the web workers, which finish their requests
            # and detach; the server stops after them, when the preloading process exits.
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # Forked from inside a running event loop (a test, an app): Python 3.11 does not
            # forget that loop in the child by itself.
            asyncio.events._set_running_loop(None)
            signal.set_wakeup_fd(-1)

            def ready() -> None:
                os.write(write_end, b'ok')
                os.close(write_end)

            try:
                asyncio.run(server.serve(ready))
                code = 0
            except BaseException as exc:
                try:
                    os.write(write_end, f'{type(exc).__name__}: {exc}'.encode())
                    os.close(write_end)
                except OSError:
                    pass
                raise
        finally:
            os._exit(code)
    os.close(write_end)
    if handed_over:
        flow._hand_over()  # the workers belong to the server now
    process = FlowServerProcess(pid, server.socket_path)
    # The server starts the flow (each worker's on_start) before it answers, with 'ok' or
    # with why it failed; if it dies instead, the pipe reports the end of file.
    try:
        answer = os.read(read_end, 4096).decode(errors='replace')
    finally:
        os.close(read_end)
    if answer != 'ok':
        process.join(5.0)
        raise FlowError(f'the flow server failed to start: {answer or "it exited"}')
    atexit.register(process.stop)
    return process


class SocketFlow:
    """A client of a flow served by another process (see the module documentation).

    ``allowed_gid`` (default: ``{name}_SOCKET_ALLOWED_GID``, else none) lets a server of that
    group serve this client, and a client of that group use the server :meth:`preload` starts;
    without it, both must run as the same user. ``socket_path`` overrides ``{name}_SOCKET_PATH``."""

    def __init__(
        self, name: str = '', *, allowed_gid: Optional[int] = None, socket_path: Optional[str] = None
    ) -> None:
        self._name = name
        self._allowed_gid = allowed_gid
        self._socket_path = socket_path
        self._flow: Optional[Flow] = None
        self._server: Optional[FlowServerProcess] = None
        self._client: Optional[_core.PortClient] = None
        self._pool: Optional[_core.Pool] = None
        self._previous_pool: Optional[_core.Pool] = None
        self._stopped_waiters: List[asyncio.Future] = []
        self._sock: Optional[socket.socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._conditions: List[Any] = []
        self._step_names: List[str] = []
        self._priorities = 1
        self._server_pid = 0
        # One timer, at the earliest deadline of the client's calls (the client keeps them all).
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = float('inf')
        # Why the calls still pending fail when this process detaches.
        self._lost_error: Exception = FlowError('the SocketFlow was stopped before the task finished')

    def _env(self, env: str, default: str) -> str:
        return os.getenv(get_env_with_prefix(self._name, env), default)

    @property
    def socket_path(self) -> str:
        """``socket_path`` if given, else ``{name}_SOCKET_PATH``, else the private default."""
        return self._socket_path or self._env('SOCKET_PATH', '') or default_socket_path()

    @property
    def allowed_gid(self) -> Optional[int]:
        if self._allowed_gid is not None:
            return self._allowed_gid
        return env_gid(get_env_with_prefix(self._name, 'SOCKET_ALLOWED_GID'))

    @property
    def is_running(self) -> bool:
        return self._client is not None

    # ------------------------------------------------------------------ server side

    def preload(self, flow: Flow, timeout: Optional[float] = None) -> FlowServerProcess:
        """Forks the flow server, which starts ``flow`` (or takes over one started with
        ``flow.init_processes()``) and serves it on :attr:`socket_path`. Returns once it serves;
        raises if a worker failed to start. Call it in the process that forks the web workers
        (a gunicorn app module loaded with ``--preload``), before it forks them. The server stops
        gracefully when this process exits."""
        if not isinstance(flow, Flow):
            raise TypeError(f'flow must be an aqueduct Flow, got {type(flow).__name__}')
        if flow.state not in (FlowState.STOPPED, FlowState.STEPS_INITIALIZED):
            raise FlowError(f'preload() needs a flow that is stopped or initialized, not {flow.state.value}')
        allowed_gid = self.allowed_gid
        if allowed_gid is not None and not (self._socket_path or self._env('SOCKET_PATH', '')):
            raise ValueError(
                f'allowed_gid needs {get_env_with_prefix(self._name, "SOCKET_PATH")} set: the default socket '
                'is in a directory only its owner can enter'
            )
        path = self.socket_path
        _unixsock.check_free(path)  # here, where it raises for the caller, rather than in the server
        server = FlowSocketServer(flow, socket_path=path, start_timeout=timeout, allowed_gid=allowed_gid)
        self._flow = flow
        self._server = _fork_server(server, flow, timeout)
        return self._server

    # ------------------------------------------------------------------ client side

    async def start(self, connect_timeout: Optional[float] = None) -> None:
        """Connects to the flow server and attaches to its engine. Retries for
        ``connect_timeout`` seconds (default ``SOCKET_CONNECT_TIMEOUT``, else 10) while the server
        is not up yet."""
        if self._client is not None:
            return
        loop = asyncio.get_running_loop()
        path = self.socket_path
        if connect_timeout is None:
            connect_timeout = float(self._env('SOCKET_CONNECT_TIMEOUT', '10'))
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise FlowError(f'no flow server at {path}: {exc}') from exc
                await asyncio.sleep(0.05)  # the server is starting: retry
            except PermissionError as exc:
                sock.close()
                raise FlowError(f'cannot connect to the flow server at {path}: {exc} (another user\'s?)') from exc
        try:
            info, fds = await self._handshake(loop, sock, path)
        except BaseException:
            sock.close()
            raise
        try:
            self._attach(info, fds)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._loop = loop
        client = self._client
        assert client is not None, '_attach set it'
        loop.add_reader(client.fileno(), self._on_bell)
        loop.add_reader(sock.fileno(), self._on_server_readable)
        log.info('Attached to the flow server (pid %s) at %s', self._server_pid, path)

    async def _handshake(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, path: str
    ) -> Tuple[dict, List[int]]:
        what = f'the listener at {path}'
        # Before a byte is read: whoever took the path first must be us (or the allowed group).
        # The kernel recorded the listener's credentials when it called listen().
        _unixsock.authenticate(sock, self.allowed_gid, what=what)
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        fds: List[int] = []
        try:
            # The descriptors come with the header's first bytes.
            header = b''
            while not header:
                remaining = deadline - time.monotonic()
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(sock.fileno(), _resolve, readable)
                try:
                    await asyncio.wait_for(readable, max(remaining, 0.0))
                except TimeoutError:
                    raise _unixsock.SocketProtocolError(
                        f'{what} sent no handshake within {HANDSHAKE_TIMEOUT:g} s'
                    ) from None
                finally:
                    loop.remove_reader(sock.fileno())
                try:
                    header, received, flags, _ = socket.recv_fds(sock, HANDSHAKE.size, HANDSHAKE_FDS)
                except (BlockingIOError, InterruptedError):
                    continue
                fds += received
                if flags & socket.MSG_CTRUNC:
                    raise _unixsock.SocketProtocolError(f'{what} passed more descriptors than a flow server does')
                if not header:
                    raise _unixsock.SocketProtocolError(f'{what} closed the connection before the handshake')
            header = await _unixsock.read_exactly(loop, sock, HANDSHAKE.size, deadline, what, have=header)
            hs = decode_handshake(header, what)
            if len(fds) != hs.nfds:
                raise _unixsock.SocketProtocolError(f'{what} passed {len(fds)} descriptors, not {hs.nfds}')
            body = await _unixsock.read_exactly(loop, sock, hs.json_len + hs.pickle_len, deadline, what)
            info = _decode_info(body[: hs.json_len], hs.status == ACCEPTED, what)
            if hs.status != ACCEPTED:
                raise FlowError(f'the flow server refused the connection: {info.get("error")!r}')
            info.update(server_pid=hs.server_pid, pool_index=hs.pool_index, priorities=hs.priorities)
            # Still bytes: unpickled in _attach, from a server whose uid or gid was checked above.
            info['conditions'] = body[hs.json_len :] or None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return info, fds

    def _attach(self, info: dict, fds: List[int]) -> None:
        pool_fd, region_fd, bell_fd, doorbell_fd = fds
        if self._flow is not None:
            # Forked from the process that preloaded the flow: the conditions are right here.
            conditions = [s.handle_condition for s in self._flow.view.steps]
        elif info.get('conditions') is not None:
            # Only ever from an authenticated server (see _handshake): its own user's process.
            conditions = pickle.loads(info['conditions'])
        else:
            for fd in fds:
                os.close(fd)
            raise FlowError(
                'the flow\'s handle_conditions cannot be pickled, so this process (not forked from the one '
                f'that preloaded the flow) cannot evaluate them: {info.get("conditions_error")}. '
                'Define the conditions at module level.'
            )
        try:
            pool, self._previous_pool = shm.attach_client_pool(pool_fd, info['pool_index'])
        except BaseException:
            for fd in (region_fd, bell_fd, doorbell_fd):
                os.close(fd)
            raise
        self._client = _core.PortClient(region_fd, bell_fd, doorbell_fd, pool)
        self._pool = pool
        self._conditions = conditions
        self._step_names = info['step_names']
        self._priorities = info['priorities']
        self._server_pid = info['server_pid']

    async def stop(self) -> None:
        """Detaches from the flow server. Tasks still in flight fail with ``FlowError``."""
        self._detach(FlowError('the SocketFlow was stopped before the task finished'))

    def _detach(self, error: Exception) -> None:
        client, self._client = self._client, None
        loop = self._loop
        if loop is not None and not loop.is_closed():
            if client is not None:
                loop.remove_reader(client.fileno())
            if self._sock is not None:
                loop.remove_reader(self._sock.fileno())
        if self._sock is not None:
            self._sock.close()  # the server closes the port and cancels what is left
            self._sock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, float('inf')
        if client is not None:
            self._lost_error = error
            client.close()  # every call still pending is answered as lost
        if self._pool is not None:
            shm.detach_client_pool(self._pool, self._previous_pool)
            self._pool = self._previous_pool = None
        for waiter in self._stopped_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._stopped_waiters.clear()

    def health(self) -> dict:
        """What a ``/healthz`` route needs: whether this process is attached to a serving flow
        server. The flow's own health is the server's (``python -m aqueduct top``)."""
        attached = self._client is not None
        return {'state': 'running' if attached else 'stopped', 'ready': attached, 'server_pid': self._server_pid}

    async def wait_stopped(self) -> None:
        """Returns once this process is detached: stopped, or the server has gone."""
        while self._client is not None:
            waiter = asyncio.get_running_loop().create_future()
            self._stopped_waiters.append(waiter)
            await waiter

    # ------------------------------------------------------------------ process

    async def process(self, tasks: Union[List[BaseTask], BaseTask], timeout_sec: float = 5.0) -> bool:
        """Sends each task through the flow; the handlers' results are written into them.

        Returns ``True``. Raises the first failure once every task is settled (the others keep
        their results): ``SocketTaskTimeoutError`` when ``timeout_sec`` passes, the handler's
        exception (a ``HandlerError``), ``WorkerDiedError``, or ``FlowError`` when the server has
        gone.
        """
        client = self._client
        if client is None:
            raise NotRunningError('the SocketFlow is not started: await flow.start() first')
        if isinstance(tasks, BaseTask):
            tasks = [tasks]
        loop = self._loop
        assert loop is not None, 'set with the client'
        submitted: List[Tuple[BaseTask, asyncio.Future, int]] = []
        try:
            for task in tasks:
                entry = self._submit(client, task, timeout_sec, loop.create_future)
                if entry is not None:
                    submitted.append((task, *entry))
        finally:
            client.flush()
            self._arm_timer(client)
        if not submitted:
            return True
        try:
            if len(submitted) == 1:  # the usual call: no gather around a single future
                results = [await submitted[0][1]]
            else:
                results = await asyncio.gather(*(f for _, f, _ in submitted))
        except asyncio.CancelledError:
            # The caller's request was cancelled: the tasks are dropped wherever they are.
            if self._client is client:
                for _, _future, call in submitted:
                    client.cancel(call)
                client.flush()  # the engine drops them now, not at this client's next flush
            raise
        first_error: Exception | None = None
        for (task, _, _), result in zip(submitted, results, strict=True):
            if result.__class__ is _core.Failure:
                first_error = first_error or self._failed(result)
                continue
            apply_result(task, result)
        if first_error is not None:
            try:
                raise first_error
            finally:
                # The error's traceback holds this frame: without this the frame, the error and
                # the client (with the server's shared memory mapped) form a cycle only the
                # cyclic GC would free.
                del first_error, results, submitted, client
        return True

    def stream(self, task: BaseTask, timeout_sec: float = 5.0, *, idle_timeout_sec: Optional[float] = None):
        """Sends ``task`` through the flow and iterates over the partial results its handlers
        emit, as :meth:`aqueduct.Flow.stream` does (``async for part in flow.stream(task)``);
        afterwards the handlers' results are in the task. ``timeout_sec`` covers the whole
        stream (``SocketTaskTimeoutError``); ``idle_timeout_sec`` limits each wait for a part."""
        from ..streaming import TaskStream, _check_idle

        return TaskStream(self, task, timeout_sec, _check_idle(idle_timeout_sec))

    def _start_stream(self, task: BaseTask, timeout_sec: float, idle_ns: int):
        """What :class:`~aqueduct.streaming.TaskStream` submits through: ``(token, call id,
        the call's handle, when it started)``, or ``None`` when no step takes the task. The
        idle limit is kept by the stream itself (a port's client times only deadlines)."""
        from ..streaming import _Call

        client = self._client
        if client is None:
            raise NotRunningError('the SocketFlow is not started: await flow.start() first')
        try:
            submitted = self._submit(client, task, timeout_sec, _Call, stream=True)
        finally:
            client.flush()
            self._arm_timer(client)
        if submitted is None:
            return None
        token, call = submitted
        return token, call, _PortCalls(client), time.monotonic()

    def _finish_stream(self, task: BaseTask, result: Any, started: float) -> None:
        """Applies a streaming call's outcome to its task, as ``process()`` does."""
        if result.__class__ is _core.Failure:
            raise self._failed(result)
        apply_result(task, result)

    @staticmethod
    def _idle_timeout_error() -> Exception:
        return SocketTaskTimeoutError('no part came within idle_timeout_sec')

    def _failed(self, failure) -> Exception:
        kind, step = failure.kind, failure.step
        if kind == 'timeout':
            return SocketTaskTimeoutError('Task timeout error')
        if kind == 'lost':
            # One exception per call: raising a shared one would chain every call's traceback
            # (frames, tasks) onto it, kept as long as this SocketFlow.
            lost = self._lost_error
            return type(lost)(*lost.args)
        name = self._step_names[step] if 0 <= step < len(self._step_names) else ''
        return failure_exception(kind, name, failure.detail)

    def _submit(
        self, client: _core.PortClient, task: BaseTask, timeout_sec: float, token: Callable[[], Any], stream=False
    ) -> Optional[Tuple[Any, int]]:
        """Submits ``task`` with a new ``token()`` as its call's token (a future, or a stream's
        object when ``stream``): ``(token, call id)``, or ``None`` when no step takes it."""
        timeout_sec = check_call(task, self._priorities, timeout_sec)
        task.set_timeout(timeout_sec)
        step = entry_step(self._conditions, self._step_names, task)
        if step is None:
            return None
        body, bufs = encode_task(task, self._pool)
        made = token()
        deadline: float = task.expiration_time  # type: ignore[assignment]  # set_timeout() set it
        return made, client.submit(made, step, task.priority, int(deadline * 1e9), body, bufs, stream=stream)

    def _arm_timer(self, client: _core.PortClient) -> None:
        """Keeps the one timer at the earliest deadline of the client's calls."""
        at = client.next_deadline()
        if at is None or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        assert loop is not None, 'set with the client'
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + (at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float('inf')
        self._on_bell()

    def _on_bell(self) -> None:
        client = self._client
        if client is None:
            return
        while True:
            client.poll()  # resolves the futures of answered and expired calls
            if client.prepare_sleep():
                break
        self._arm_timer(client)

    def _on_server_readable(self) -> None:
        try:
            data = self._sock.recv(4096) if self._sock is not None else b''
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            log.error('The flow server (pid %s) closed the connection', self._server_pid)
            self._detach(FlowError(f'the flow server (pid {self._server_pid}) has gone'))


class _PortCalls:
    """A port client as a stream's handle on its call: what the stream tells it (a part taken,
    the call cancelled) is published to the engine at once."""

    __slots__ = ('_client',)

    #: A port's client times only deadlines: the stream keeps its idle limit in the event loop.
    idle_in_loop = True

    def __init__(self, client: _core.PortClient):
        self._client = client

    @property
    def closed(self) -> bool:
        return self._client.closed

    def part_taken(self, call: int, receipt: int) -> None:
        self._client.part_taken(call, receipt)
        self._client.flush()

    def cancel(self, call: int) -> bool:
        cancelled = self._client.cancel(call)
        self._client.flush()
        return cancelled


def _decode_info(raw: bytes, accepted: bool, what: str) -> dict:
    """The handshake's JSON part: descriptive fields only, checked before use."""
    try:
        info = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise _unixsock.SocketProtocolError(f'{what} sent a handshake that is not JSON: {exc}') from None
    if not isinstance(info, dict):
        raise _unixsock.SocketProtocolError(f'{what} sent a handshake that is not a JSON object')
    if accepted:
        names = info.get('step_names')
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise _unixsock.SocketProtocolError(f'{what} sent a handshake without step names')
    return info


__all__ = ['FlowServerProcess', 'SocketFlow', 'SocketTaskTimeoutError', 'get_env_with_prefix']
