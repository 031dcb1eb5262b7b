"""The stats socket every flow serves: where it lives, who may read it, and what it answers.

A flow serves one snapshot of its metrics (``Flow.metrics()``, as JSON) per connection on a Unix
socket, ``aqueduct-<pid>-<n>.sock`` in the user's private socket directory
(``$XDG_RUNTIME_DIR/aqueduct`` or ``<tmp>/aqueduct-<uid>``), to processes of its own user only;
``python -m aqueduct top`` reads it. This module owns the sockets' names, the server, and the
removal of sockets that killed flows left behind.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import socket
import stat
import tempfile
from typing import Any, List, Optional

from . import _unixsock
from .logger import log

SOCKET_GLOB = 'aqueduct-*.sock'


def default_socket_path(flow_number: int) -> Optional[str]:
    """The stats socket of this process's ``flow_number``-th flow, in the private directory;
    ``None`` (no stats socket) when that directory is not safe to use."""
    try:
        directory = _unixsock.private_dir()
    except OSError as exc:
        log.warning('flow stats are off: %s (pass stats_socket=PATH to serve them elsewhere)', exc)
        return None
    return os.path.join(directory, f'aqueduct-{os.getpid()}-{flow_number}.sock')


def _scan(directory: str, live: Optional[list]) -> None:
    """This user's stats sockets in ``directory``: those of live processes go into ``live`` (as
    ``(mtime, path)``), those of dead ones are removed (a killed flow never removes its own)."""
    uid = os.geteuid()
    for path in glob.glob(os.path.join(glob.escape(directory), SOCKET_GLOB)):
        try:
            pid = int(os.path.basename(path).split('-')[1])
            st = os.lstat(path)
        except (ValueError, IndexError, OSError):
            continue
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != uid:
            continue  # not ours: neither shown nor touched
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _unixsock.remove_if_stale(path)  # only if nobody answers on it (another pid namespace)
            continue
        except PermissionError:
            pass  # alive, as another user: the pid was reused; leave the socket alone
        if live is not None:
            live.append((st.st_mtime, path))


def remove_stale_sockets() -> None:
    """Removes this user's stats sockets whose flow process is dead: in the private directory,
    and where aqueduct put them before (the temporary directory itself)."""
    try:
        _scan(_unixsock.private_dir(), None)
    except OSError:
        pass
    _scan(tempfile.gettempdir(), None)


def find_sockets() -> List[str]:
    """Stats sockets of this user's live flows, newest first (and removes those of dead ones).
    Only the private directory is searched: a socket anyone else could have put there is never
    picked."""
    live: list = []
    _scan(_unixsock.private_dir(), live)
    _scan(tempfile.gettempdir(), None)
    return [path for _, path in sorted(live, reverse=True)]


class StatsServer:
    """Serves one flow's stats socket from the event loop that watches the flow.

    ``where`` is a path, a flow number (the default path of this process's n-th flow) or
    ``None`` (no socket). The socket object is ours, so it can be closed even if the loop goes
    away first (one loop per test, ``asyncio.run`` in a thread)."""

    def __init__(self, flow: Any, where: str | int | None):
        self._flow = flow
        #: The socket's path, or ``None`` when the flow serves no stats.
        self.path: Optional[str] = where if isinstance(where, str) or where is None else default_socket_path(where)
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serves from ``loop`` from now on (binding the socket the first time)."""
        if self._sock is not None and self._loop is not loop:
            self.close()
        if self.path is None or self._sock is not None:
            return
        remove_stale_sockets()  # those of killed flows, which could not remove their own
        try:
            # 0600 whatever the umask; never replaces a file that is not a socket or a live one.
            sock = _unixsock.bind_unix(self.path, 8)
        except OSError as exc:
            log.warning('cannot serve flow stats at %s: %s', self.path, exc)
            return
        self._sock = sock
        self._loop = loop
        loop.create_task(self._start(sock))
        log.info('Flow stats at %s (python -m aqueduct top %s)', self.path, self.path)

    async def _start(self, sock: socket.socket) -> None:
        try:
            server = await asyncio.start_unix_server(self._answer, sock=sock)
        except OSError:
            if self._sock is sock:
                raise
            return  # closed before it could start (the flow was handed over)
        if self._sock is sock:
            self._server = server
        else:  # closed while starting
            server.close()

    def close(self) -> None:
        server, self._server = self._server, None
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if server is not None and not server.get_loop().is_closed():
            server.close()
        sock.close()
        assert self.path is not None  # serve() binds a socket only when there is a path
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # Only this user's processes may read the flow's stats, whatever the socket's mode.
            _unixsock.authenticate(writer.get_extra_info('socket'), what='a stats client')
            writer.write(json.dumps(self._flow.metrics()).encode())
            await writer.drain()
        except _unixsock.UnsafeSocketError as exc:
            log.warning('flow stats at %s: %s', self.path, exc)
        except Exception:  # a client that went away, or a flow that stopped meanwhile
            pass
        finally:
            writer.close()
