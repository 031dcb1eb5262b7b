"""A base for clients of a flow server, as in aqueduct 1.15 (``aqueduct.integrations.zero``).

Subclass it in the process that serves requests (a worker of any RPC or web framework), name the
flow (the ``{name}_`` prefix of the environment the :class:`~aqueduct.sockets.flow.SocketFlow`
reads), and build tasks in :meth:`BaseFlowClient.process`::

    class Detector(BaseFlowClient):
        _name = 'detector'          # DETECTOR_SOCKET_PATH, ...

        async def process(self, image: bytes) -> bool:
            task = DetectTask(image)
            await self._flow.process([task], timeout_sec=2)
            return task.found

    client = Detector()
    await client.connect()          # at the server's startup
    ...
    await client.disconnect()       # at its shutdown

The flow itself runs in a flow server (``SocketFlow(name).preload(flow)`` in a parent process, or
``python -m aqueduct serve``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..sockets.flow import SocketFlow


class BaseFlowClient(ABC):
    """A :class:`SocketFlow` named :attr:`_name`, connected by :meth:`connect`."""

    #: The flow's name: the prefix of the environment variables its SocketFlow reads.
    _name = ''

    def __init__(self) -> None:
        self._flow = SocketFlow(self._name)

    async def connect(self) -> None:
        """Attaches to the flow server (waiting for it while it starts, see ``SocketFlow.start``)."""
        await self._flow.start()

    async def disconnect(self) -> None:
        """Detaches; tasks still in flight fail with ``FlowError``."""
        await self._flow.stop()

    @abstractmethod
    async def process(self, *args: Any, **kwargs: Any) -> Any:
        """Builds tasks from the arguments and sends them with ``await self._flow.process(tasks)``."""
        raise NotImplementedError


__all__ = ['BaseFlowClient']
