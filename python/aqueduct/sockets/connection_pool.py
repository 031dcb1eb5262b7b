"""aqueduct 1.15's ``SocketConnectionPool``: a client of a flow server, batch in, batch out.

1.15 kept ``size`` socket connections and pickled each batch through one of them. Here one
connection per process sets up shared-memory rings to the server's engine, and a
:class:`~aqueduct.sockets.flow.SocketFlow` sends the tasks through them; this class gives that
client 1.15's interface: :meth:`SocketConnectionPool.handle` returns the batch it was given, its
tasks updated with the handlers' results (1.15 returned the server's copies), retrying up to
``connection_retries`` times on the errors 1.15 retried on.

``socket_path`` defaults to the flow server's own default (1.15: ``/tmp/flow.sock``);
``connect_timeout_sec`` is how long a connection attempt waits for the server to be there;
``read_timeout_sec`` bounds each batch (a task still unfinished then fails it with
``asyncio.TimeoutError``, as in 1.15); ``size`` is accepted and unused.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import List, Optional

from ..exceptions import FlowError
from ..logger import log
from ..task import BaseTask
from .flow import SocketFlow
from .flow_server import FLOW_ERROR, SOCKET_ERROR  # noqa: F401 - 1.15 imported them from here
from .protocol import SocketProtocol, SocketResponse  # noqa: F401 - likewise


class OpenConnectionError(FlowError):
    """No flow server answered at the socket path in time."""


class SocketServerError(FlowError):
    """The flow server went away while the batch was in it."""


class SocketConnectionPool(SocketProtocol):
    RETRYABLE_EXCEPTIONS = (
        OpenConnectionError,
        SocketServerError,
        ConnectionResetError,
        BrokenPipeError,
        asyncio.IncompleteReadError,
        asyncio.TimeoutError,
    )

    def __init__(
        self,
        socket_path: Optional[str] = None,
        size: int = 10,
        connect_timeout_sec: float = 0.1,
        read_timeout_sec: float = 1,
        connection_retries: int = 1,
    ):
        self._path = socket_path
        self._size = size
        self._connect_timeout = connect_timeout_sec
        self._read_timeout = read_timeout_sec
        self._connection_retries = connection_retries
        self._client = SocketFlow(socket_path=socket_path)
        self._connecting: Optional[asyncio.Future] = None

    async def init(self) -> None:
        """Connects now; as in 1.15, a server that is not there yet is connected to later."""
        with suppress(OpenConnectionError):
            await self._connect()

    async def close(self) -> None:
        await self._client.stop()

    async def _connect(self) -> None:
        if self._client.is_running:
            return
        if self._connecting is None:  # concurrent callers share one attempt
            self._connecting = asyncio.ensure_future(self._client.start(connect_timeout=self._connect_timeout))
        attempt = self._connecting
        try:
            await asyncio.shield(attempt)
        except FlowError as exc:
            raise OpenConnectionError(f'failed to open connection to {self._client.socket_path}: {exc}') from exc
        finally:
            if self._connecting is attempt and attempt.done():
                self._connecting = None

    async def handle(self, data: List[BaseTask]) -> List[BaseTask]:
        """Processes the batch ``data``; returns it, each task updated with its results."""
        tries = 0
        while True:
            tries += 1
            try:
                return await self._handle(data)
            except self.RETRYABLE_EXCEPTIONS:
                if tries >= self._connection_retries:
                    log.exception('sending data to socket failed')
                    raise
            except Exception:
                log.exception('connection pool broken')
                raise

    async def _handle(self, data: List[BaseTask]) -> List[BaseTask]:
        await self._connect()
        try:
            await self._client.process(data, timeout_sec=self._read_timeout)
        except FlowError as exc:
            if not self._client.is_running:  # the server has gone: connect again on a retry
                raise SocketServerError(str(exc)) from exc
            raise
        return data


__all__ = ['OpenConnectionError', 'SocketConnectionPool', 'SocketServerError']
