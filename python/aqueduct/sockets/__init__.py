"""One flow shared by several processes: :class:`SocketFlow` (clients, aqueduct 1.15's API)
and :class:`FlowSocketServer` (the process that runs the flow). See :mod:`.flow`."""

from .flow import FlowServerProcess, SocketFlow, SocketTaskTimeoutError
from .flow_server import FlowSocketServer

__all__ = ['FlowServerProcess', 'FlowSocketServer', 'SocketFlow', 'SocketTaskTimeoutError']
