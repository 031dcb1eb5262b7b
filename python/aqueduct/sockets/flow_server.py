"""The flow server: one process that runs a flow for several client processes.

A client connects to the server's Unix socket; the server opens a *port* in its engine (two
shared-memory rings, see ``aqueduct_core::port``) and passes the port's descriptors, the
engine's doorbell and the shared-memory pool back over the socket (``SCM_RIGHTS``), with what the
client needs to know about the flow (priorities, step names, the first steps' conditions). From
then on the client's tasks go straight into the engine's queues and the results straight back:
the socket only carries the connection's life. When it closes, the server closes the port
(cancelling the client's tasks in flight); once the client process has exited (its pidfd, taken
at connection time, says so) the server frees every piece of shared memory it still held.

Only processes of the server's own user (or of the group given as ``allowed_gid``) are served:
the socket is created 0600 (0660 for the group) in a private directory by default, and the
server checks each client's credentials (``SO_PEERCRED``) before it sends anything. The handshake
is a fixed binary header (:data:`HANDSHAKE`) then JSON, not a pickle; the one pickled part, the
steps' conditions, is only ever sent to an authenticated client. See ``docs/security.md``.

The server stops gracefully on SIGTERM or SIGINT: it stops accepting connections and removes the
socket, waits for its clients to detach (a web server shutting down finishes its requests
first), lets the tasks in flight finish, and stops the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import socket
import struct
from typing import Callable, Dict, NamedTuple, Optional

from .. import _unixsock
from ..flow import Flow, FlowState
from ..logger import log
from .protocol import SocketProtocol

#: Version of the connection handshake (the message that carries the descriptors), and of the
#: task bodies that follow it. Version 1 was a length-prefixed pickle, which let whoever listened
#: at the path run code in the client; version 2 had every task body pickled (version 3 sends a
#: state of plain values in the compact form of ``aqueduct_core::task_state``).
PROTOCOL_VERSION = 3
#: The handshake's first bytes: what tells an aqueduct flow server from anything else at the path.
MAGIC = b'AQFS'
#: The handshake header, big-endian: magic, version, status (ACCEPTED or REFUSED), number of
#: descriptors passed with it, server pid, pool index, queue priorities, then the lengths of the
#: two parts that follow: UTF-8 JSON (step names; or the refusal's reason) and the pickled
#: handle_conditions (0 bytes when they cannot be pickled or the connection is refused).
HANDSHAKE = struct.Struct('>4sHBBIIIII')
ACCEPTED, REFUSED = 0, 1
#: Descriptors an accepted connection receives: pool, port region, port bell, engine doorbell.
HANDSHAKE_FDS = 4
#: Bounds on the two variable parts, which a client checks before it reads them.
MAX_HANDSHAKE_JSON = 1 << 20
MAX_HANDSHAKE_PICKLE = 16 << 20
#: aqueduct 1.15's ``SocketResponse.error`` values (see :mod:`.protocol`): the flow failed a task,
#: or the server failed to handle the message. Here a client gets each task's own exception.
SOCKET_ERROR = 'socket_error'
FLOW_ERROR = 'flow_error'
#: Bytes of each of a port's two rings.
PORT_CAPACITY = 1 << 20


class Handshake(NamedTuple):
    """A decoded :data:`HANDSHAKE` header."""

    status: int
    nfds: int
    server_pid: int
    pool_index: int
    priorities: int
    json_len: int
    pickle_len: int


def encode_handshake(
    status: int, nfds: int = 0, server_pid: int = 0, pool_index: int = 0, priorities: int = 0,
    info: Optional[dict] = None, conditions: bytes = b'',
) -> bytes:  # fmt: skip
    body = json.dumps(info or {}).encode()
    header = HANDSHAKE.pack(
        MAGIC, PROTOCOL_VERSION, status, nfds, server_pid, pool_index, priorities, len(body), len(conditions)
    )
    return header + body + conditions


def decode_handshake(header: bytes, what: str = 'the server') -> Handshake:
    """Checks a :data:`HANDSHAKE` header and returns its fields; raises
    :class:`~aqueduct._unixsock.SocketProtocolError` for anything a flow server does not send."""
    if len(header) != HANDSHAKE.size or header[:4] != MAGIC:
        raise _unixsock.SocketProtocolError(
            f'{what} is not an aqueduct flow server: its answer starts with {header[:8]!r}, '
            f'not the handshake magic {MAGIC!r} (an aqueduct older than this protocol, or another program)'
        )
    _, version, *fields = HANDSHAKE.unpack(header)
    if version != PROTOCOL_VERSION:
        raise _unixsock.SocketProtocolError(
            f'{what} speaks handshake version {version}; this aqueduct speaks {PROTOCOL_VERSION} '
            '(run the same aqueduct version on both sides)'
        )
    hs = Handshake(*fields)
    if hs.status not in (ACCEPTED, REFUSED):
        raise _unixsock.SocketProtocolError(f'{what} sent an unknown handshake status {hs.status}')
    if hs.nfds != (HANDSHAKE_FDS if hs.status == ACCEPTED else 0):
        raise _unixsock.SocketProtocolError(f'{what} announced {hs.nfds} descriptors in its handshake')
    if hs.json_len > MAX_HANDSHAKE_JSON or hs.pickle_len > MAX_HANDSHAKE_PICKLE:
        raise _unixsock.SocketProtocolError(
            f'{what} announced a handshake of {hs.json_len:,} + {hs.pickle_len:,} bytes, more than the '
            f'{MAX_HANDSHAKE_JSON:,} + {MAX_HANDSHAKE_PICKLE:,} allowed'
        )
    return hs


class _Client:
    __slots__ = ('conn', 'pid', 'pidfd', 'port', 'index')

    def __init__(self, conn: socket.socket, pid: int, pidfd: int, port: int, index: int):
        self.conn = conn
        self.pid = pid
        self.pidfd = pidfd
        self.port = port
        self.index = index


class FlowSocketServer(SocketProtocol):
    """Serves ``flow`` to client processes (:class:`aqueduct.sockets.flow.SocketFlow`) on the
    Unix socket ``socket_path``.

    ``flow`` may be stopped (the server starts it in its own process) or initialized with
    ``flow.init_processes()`` by the process that forked the server (the server takes its workers
    over). ``process_timeout_sec`` and ``connection_idle_timeout_sec`` are accepted for
    compatibility with aqueduct 1.15 and unused: each task carries its own timeout, and a
    connection costs nothing while idle. On SIGTERM or SIGINT the server waits up to
    ``shutdown_grace`` seconds for its clients to detach before it stops the flow.

    ``socket_path`` defaults to ``flow.sock`` in the user's private socket directory (aqueduct
    1.15 used ``/tmp/flow.sock``, where any local user could take the path first); an explicit
    path is used as given. Only processes of this user are served, and of group ``allowed_gid``
    too when it is given (the socket is then made 0660 with that group: it needs an explicit
    path in a directory the group can enter).

    ``max_payload_bytes`` (1.15's bound on one pickled message, inherited from
    :class:`~aqueduct.sockets.protocol.SocketProtocol`) may be read and set, and bounds nothing:
    tasks do not cross the socket. A client can fill no more than its connection's two rings
    (``PORT_CAPACITY`` each) and what the shared-memory pool has room for (``AQUEDUCT_SHM_POOL_SIZE``).
    """

    def __init__(
        self,
        flow: Flow,
        socket_path: Optional[str] = None,
        process_timeout_sec: float = 1,
        connection_idle_timeout_sec: int = 900,
        backlog_size: int = 4096,
        start_timeout: Optional[float] = None,
        shutdown_grace: float = 30.0,
        *,
        allowed_gid: Optional[int] = None,
    ) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f'flow must be an aqueduct Flow, got {type(flow).__name__}')
        if allowed_gid is not None and socket_path is None:
            raise ValueError(
                'allowed_gid needs an explicit socket_path: the default one is in a directory only its owner can enter'
            )
        self._flow = flow
        self._socket_path = socket_path if socket_path is not None else default_socket_path()
        self._allowed_gid = allowed_gid
        self._backlog_size = backlog_size
        self._start_timeout = start_timeout
        self._listener: Optional[socket.socket] = None
        self._clients: Dict[int, _Client] = {}
        #: Clients that disconnected, by pidfd, until their process exits and is reaped.
        self._detached_alive: Dict[int, _Client] = {}
        self._closing: Optional[asyncio.Event] = None
        self._hurry: Optional[asyncio.Event] = None
        self._detached: Optional[asyncio.Event] = None
        self._shutdown_grace = shutdown_grace
        self._stopped = False

    @property
    def socket_path(self) -> str:
        return self._socket_path

    def start(self, pid: int = 0) -> None:
        """Serves until SIGTERM or SIGINT (aqueduct 1.15's entry point; ``pid`` is unused)."""
        asyncio.run(self.serve())

    def bind(self) -> None:
        """Creates the listening socket, 0600 (0660 with ``allowed_gid``) whatever the umask.
        Replaces a stale socket of ours at the path; raises
        :class:`~aqueduct._unixsock.UnsafeSocketError` rather than remove anything else (a file
        that is not a socket, another user's socket, a live server's socket)."""
        if self._listener is not None:
            return
        listener = _unixsock.bind_unix(self._socket_path, self._backlog_size, allowed_gid=self._allowed_gid)
        listener.setblocking(False)
        self._listener = listener

    async def serve(self, ready: Optional[Callable[[], None]] = None) -> None:
        """Starts the flow if needed, serves clients, and returns once stopped (SIGTERM, SIGINT,
        :meth:`close`, or the flow stopping for good)."""
        loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._hurry = asyncio.Event()
        self._detached = asyncio.Event()
        flow = self._flow
        # Refuse a path that cannot be ours before any worker starts (bind() checks again).
        _unixsock.check_free(self._socket_path)
        if flow.are_steps_initialized:
            flow.start_inited()
        elif flow.state is FlowState.STOPPED:
            flow.start(timeout=self._start_timeout)
        else:
            flow.attach()
        flow_gone = asyncio.ensure_future(flow.wait_stopped())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            self.bind()  # in the try: if it fails, the flow just started is stopped again
            assert self._listener is not None  # bind() made it
            loop.add_reader(self._listener.fileno(), self._accept)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal)
            log.info('Flow server listening on %s', self._socket_path)
            if ready is not None:
                ready()
            await asyncio.wait({flow_gone, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not flow_gone.done():
                await self._drain_clients(flow_gone)
        finally:
            flow_gone.cancel()
            closing.cancel()
            # The handlers stay during the shutdown: a second signal hurries it instead of killing
            # the server half-way (its sockets left behind, exit status 143).
            try:
                await self._shutdown()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        # The first signal stops the server gracefully; a second one stops it at once.
        closing, hurry = self._closing, self._hurry
        assert closing is not None and hurry is not None  # serve() made them before handling signals
        if closing.is_set():
            hurry.set()
        closing.set()

    async def _drain_clients(self, flow_gone: asyncio.Future) -> None:
        """Stops taking connections and lets connected clients detach first: a web server that
        shuts down (all its processes got the signal) finishes its requests before its web
        workers detach, and those requests still need the flow. Waits at most
        ``shutdown_grace`` seconds, or until a second signal."""
        assert self._detached is not None and self._hurry is not None  # only serve() calls this, once it made them
        self._close_listener()
        if not self._clients:
            return
        log.info('Flow server: waiting for %d clients to detach', len(self._clients))
        waits = {
            asyncio.ensure_future(self._detached.wait()),
            asyncio.ensure_future(self._hurry.wait()),
            flow_gone,
        }
        try:
            await asyncio.wait(waits, timeout=self._shutdown_grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                if w is not flow_gone:
                    w.cancel()

    async def close(self) -> None:
        """Asks a running :meth:`serve` to stop."""
        if self._closing is not None:
            self._closing.set()

    async def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        assert self._hurry is not None  # only serve() calls this, once it made it
        loop = asyncio.get_running_loop()
        self._close_listener()
        # Clients' tasks in flight finish first (within the flow's stop grace), unless a second
        # signal comes: then the stop goes on hard.
        graceful = asyncio.ensure_future(self._flow.stop(graceful=not self._hurry.is_set()))
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            await asyncio.wait({graceful, hurry}, return_when=asyncio.FIRST_COMPLETED)
            if not graceful.done():
                await self._flow.stop(graceful=False)
            await graceful
        finally:
            hurry.cancel()
        for client in list(self._clients.values()):
            self._drop(client, loop)
        # Clients that detached but still run keep their shared memory (they may hold results);
        # it goes when the last process mapping the pool exits.
        for pidfd in list(self._detached_alive):
            loop.remove_reader(pidfd)
            os.close(pidfd)
        self._detached_alive.clear()
        log.info('Flow server on %s stopped', self._socket_path)

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        asyncio.get_running_loop().remove_reader(self._listener.fileno())
        self._listener.close()
        self._listener = None
        try:
            os.unlink(self._socket_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning('flow server: accept failed: %s', exc)
                return
            try:
                self._admit(conn, loop)
            except Exception as exc:
                log.exception('flow server: could not attach a client')
                self._refuse(conn, f'{type(exc).__name__}: {exc}')

    def _admit(self, conn: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        # Who connected, first: a process of another user must get neither the descriptors (with
        # them it could put a task whose unpickling runs its code into a worker) nor the pickle.
        try:
            pid = _unixsock.authenticate(conn, self._allowed_gid, what='a client').pid
        except _unixsock.UnsafeSocketError as exc:
            log.warning('flow server on %s: %s', self._socket_path, exc)
            self._refuse(conn, str(exc))
            return
        flow = self._flow
        engine, pool = flow._driver, flow._pool
        if engine is None or pool is None or not flow.is_running:
            self._refuse(conn, 'the flow is not running')
            return
        # The pidfd is taken now, while the client is alive and waiting for this answer, so it
        # can never name another process that got the same pid later.
        pidfd = os.pidfd_open(pid)
        index = pool.reserve_index()
        if index is None:
            os.close(pidfd)
            self._refuse(conn, 'too many processes use the shared-memory pool')
            return
        try:
            port = engine.open_port(index, PORT_CAPACITY)
        except BaseException:
            os.close(pidfd)
            pool.release_index(index)
            raise
        client = _Client(conn, pid, pidfd, port, index)
        self._clients[conn.fileno()] = client
        region_fd, bell_fd = engine.port_fds(port)
        info: dict = {'step_names': list(flow.view.step_names)}
        try:
            conditions = pickle.dumps([s.handle_condition for s in flow.view.steps])
        except Exception as exc:
            conditions = b''
            info['conditions_error'] = f'{type(exc).__name__}: {exc}'
        if len(conditions) > MAX_HANDSHAKE_PICKLE:  # a client would refuse the whole handshake
            info['conditions_error'] = f'they pickle to {len(conditions):,} bytes, more than {MAX_HANDSHAKE_PICKLE:,}'
            conditions = b''
        message = encode_handshake(
            ACCEPTED, HANDSHAKE_FDS, os.getpid(), index, flow.view.priorities, info, conditions
        )
        conn.setblocking(True)
        conn.settimeout(5.0)
        try:
            # The descriptors travel with the header, the rest after it.
            socket.send_fds(
                conn, [message[: HANDSHAKE.size]], [pool.fileno(), region_fd, bell_fd, engine.doorbell_fd()]
            )
            conn.sendall(message[HANDSHAKE.size :])
        except OSError:
            self._drop(client, loop)
            return
        conn.setblocking(False)
        loop.add_reader(conn.fileno(), self._on_client_readable, conn.fileno())
        log.debug('flow server: client %s attached (port %s, pool index %s)', pid, port, index)

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(encode_handshake(REFUSED, server_pid=os.getpid(), info={'error': reason}))
        except OSError:
            pass
        conn.close()

    def _on_client_readable(self, key: int) -> None:
        client = self._clients.get(key)
        if client is None:
            return
        try:
            data = client.conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if data:
            return  # clients send nothing after the handshake; ignore noise
        self._drop(client, asyncio.get_running_loop())

    def _drop(self, client: _Client, loop: asyncio.AbstractEventLoop) -> None:
        """The client disconnected (or the server stops): close its port now, free its shared
        memory once its process has exited."""
        key = client.conn.fileno()
        self._clients.pop(key, None)
        if not self._clients and self._detached is not None:
            self._detached.set()
        if key >= 0:
            try:
                loop.remove_reader(key)
            except (ValueError, RuntimeError):
                pass
        client.conn.close()
        engine = self._flow._driver
        if engine is not None:
            try:
                engine.close_port(client.port)
            except Exception:  # the engine closed meanwhile
                pass
        pool = self._flow._pool
        if pool is None:
            os.close(client.pidfd)
            return
        self._detached_alive[client.pidfd] = client
        loop.add_reader(client.pidfd, self._reap, client, pool, loop)

    def _reap(self, client: _Client, pool, loop: asyncio.AbstractEventLoop) -> None:
        """The client process exited: undo every reference it still held."""
        self._detached_alive.pop(client.pidfd, None)
        loop.remove_reader(client.pidfd)
        os.close(client.pidfd)
        freed = pool.reap(client.index)
        pool.release_index(client.index)
        log.debug('flow server: client %s exited; %s pages of shared memory freed', client.pid, freed)


def default_socket_path() -> str:
    """``flow.sock`` in the user's private socket directory (see :func:`aqueduct._unixsock.private_dir`)."""
    return _unixsock.default_path('flow.sock')


def load_flow(spec: str) -> Flow:
    """``module:attribute``: a Flow, or a callable that returns one."""
    import importlib

    module_name, _, attr = spec.partition(':')
    if not module_name or not attr:
        raise ValueError(f'expected module:attribute, got {spec!r}')
    obj = importlib.import_module(module_name)
    for part in attr.split('.'):
        obj = getattr(obj, part)
    flow = obj() if callable(obj) and not isinstance(obj, Flow) else obj
    if not isinstance(flow, Flow):
        raise TypeError(f'{spec} is not a Flow nor returns one (got {type(flow).__name__})')
    return flow


def main(argv: Optional[list] = None) -> int:
    """``python -m aqueduct serve module:build_flow [--socket PATH]``: runs a flow server in the
    foreground until SIGTERM or Ctrl-C, for web workers that connect with ``SocketFlow``. With
    ``--http HOST:PORT`` it serves the flow over HTTP instead, from the engine's own HTTP front
    (:mod:`aqueduct.http`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog='python -m aqueduct serve', description=main.__doc__)
    parser.add_argument('flow', help='module:attribute, a Flow or a function returning one')
    parser.add_argument(
        '--socket', default=os.environ.get('_SOCKET_PATH') or None,
        help='the socket path (default: $_SOCKET_PATH, else flow.sock in the private socket directory)',
    )  # fmt: skip
    parser.add_argument(
        '--allowed-gid', type=int, default=env_gid('_SOCKET_ALLOWED_GID'),
        help='also serve processes of this group (default: $_SOCKET_ALLOWED_GID; needs --socket)',
    )  # fmt: skip
    parser.add_argument('--start-timeout', type=float, default=None, help='seconds for every on_start')
    http = parser.add_argument_group('HTTP front (--http)')
    http.add_argument('--http', metavar='HOST:PORT', help='serve the flow over HTTP here (port 0: any free one)')
    http.add_argument(
        '--route', action='append', metavar='PATH=STEP', default=[],
        help='a path and the step its requests enter (index or name); repeatable; default /=0',
    )  # fmt: skip
    http.add_argument('--timeout', type=float, default=5.0, help="each request's deadline in seconds (default 5)")
    http.add_argument(
        '--idle-timeout', type=float, default=None,
        help='the longest a streamed response waits for its next part, in seconds (default: the deadline only)',
    )  # fmt: skip
    http.add_argument('--max-body', type=int, default=16 << 20, help='largest request body in bytes (default 16 MiB)')
    http.add_argument('--max-in-flight', type=int, default=1024, help='requests served at once (default 1024)')
    http.add_argument('--threads', type=int, default=1, help='threads of the HTTP front (default 1)')
    args = parser.parse_args(argv)
    if args.allowed_gid is not None and args.socket is None:
        parser.error('--allowed-gid needs --socket: the default socket is in a directory only its owner can enter')
    sys.path.insert(0, os.getcwd())
    if args.http is not None:
        return _serve_http(parser, args)
    try:
        server = FlowSocketServer(
            load_flow(args.flow), socket_path=args.socket, start_timeout=args.start_timeout,
            allowed_gid=args.allowed_gid,
        )  # fmt: skip
        server.start()
    except _unixsock.UnsafeSocketError as exc:
        print(f'python -m aqueduct serve: {exc}', file=sys.stderr)
        return 1
    return 0


def _serve_http(parser, args) -> int:
    """``serve --http``: the flow behind the engine's HTTP front until SIGTERM or Ctrl-C."""
    import asyncio
    import sys

    from .. import http

    host, sep, port = args.http.rpartition(':')
    if not sep or not port.isdigit():
        parser.error(f'--http takes HOST:PORT, got {args.http!r}')
    routes = {}
    for route in args.route or ['/=0']:
        path, sep, step = route.partition('=')
        if not sep:
            parser.error(f'--route takes PATH=STEP, got {route!r}')
        routes[path] = int(step) if step.isdigit() else step
    flow = load_flow(args.flow)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        started = loop.create_future()
        started.add_done_callback(lambda f: print(f'listening on http://{f.result()[0]}:{f.result()[1]}', flush=True))
        if flow.state is not FlowState.RUNNING:
            flow.start(timeout=args.start_timeout)
        await http.serve(
            flow, host.strip('[]') or '127.0.0.1', int(port), routes=routes, timeout_sec=args.timeout,
            idle_timeout_sec=args.idle_timeout, max_body_bytes=args.max_body, max_in_flight=args.max_in_flight,
            threads=args.threads, started=started,
        )  # fmt: skip

    try:
        asyncio.run(run())
    except (ValueError, TypeError, OSError) as exc:  # a bad option, or the address is taken
        print(f'python -m aqueduct serve: {exc}', file=sys.stderr)
        return 1
    return 0


def env_gid(name: str) -> Optional[int]:
    """An allowed group id from the environment variable ``name`` (unset or empty: none)."""
    value = os.environ.get(name, '')
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'{name} must be a numeric group id, got {value!r}') from None
