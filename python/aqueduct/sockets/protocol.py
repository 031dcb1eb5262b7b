"""aqueduct 1.15's ``aqueduct.sockets.protocol``: the framing of its socket messages.

In 1.15 every batch of tasks crossed the flow server's socket as one length-prefixed pickle (at
most :attr:`SocketProtocol.max_payload_bytes`), and came back in a :class:`SocketResponse`. Here
the socket only sets up a connection's shared-memory rings (see :mod:`aqueduct.sockets.flow_server`)
and tasks never cross it, so nothing here is used by the engine. The names are kept because 1.15's
``FlowSocketServer`` and ``SocketConnectionPool`` derived from :class:`SocketProtocol` (and code
reads or sets ``max_payload_bytes`` on them); its framing methods still work on any asyncio stream.
"""

from __future__ import annotations

from asyncio import StreamReader, StreamWriter
from dataclasses import dataclass, field
from typing import List, Optional

from ..task import BaseTask

#: 1.15's bound on one message, 16 MiB.
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
#: Bytes of the big-endian length before each message.
LENGTH_BYTES = 4


@dataclass
class SocketResponse:
    """1.15's answer to a batch: the processed tasks, or an ``error`` (``flow_server.FLOW_ERROR``
    or ``SOCKET_ERROR``)."""

    ok: bool = False
    result: List[BaseTask] = field(default_factory=list)
    error: Optional[str] = None


class SocketProtocol:
    """Length-prefixed messages of at most ``max_payload_bytes`` (``None``: no bound on reading)."""

    max_payload_bytes: Optional[int] = DEFAULT_MAX_PAYLOAD_BYTES

    async def _read_msg(self, reader: StreamReader) -> bytes:
        size = int.from_bytes(await reader.readexactly(LENGTH_BYTES), 'big')
        if self.max_payload_bytes is not None and size > self.max_payload_bytes:
            raise ValueError(f'Payload too large: {size} bytes, more than max_payload_bytes={self.max_payload_bytes}')
        return await reader.readexactly(size)

    async def _write_msg(self, writer: StreamWriter, data: bytes) -> None:
        if self.max_payload_bytes is not None and len(data) > self.max_payload_bytes:
            raise ValueError(
                f'Payload too large: {len(data)} bytes, more than max_payload_bytes={self.max_payload_bytes}'
            )
        writer.write(len(data).to_bytes(LENGTH_BYTES, 'big') + data)
        await writer.drain()


__all__ = ['DEFAULT_MAX_PAYLOAD_BYTES', 'SocketProtocol', 'SocketResponse']
