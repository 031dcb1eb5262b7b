"""The streaming benchmark's server on aqueduct-rs's own HTTP front (``aqueduct.http``): the
handler's parts are Server-Sent Events (``aqueduct.http.sse``) that Rust threads write as
they come; no Python runs in the main process per part (see ``stream_servers.py``)."""

from __future__ import annotations

import asyncio
import os
import sys

from aqueduct import BaseTaskHandler, Flow, FlowStep
from aqueduct.http import Request, sse
from aqueduct.http import serve as serve_http

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stream_servers import parts_of  # noqa: E402


class Emit(BaseTaskHandler):
    def handle(self, *tasks: Request):
        asks = [task.json() for task in tasks]
        for i in range(max(ask['parts'] for ask in asks)):
            for task, ask in zip(tasks, asks, strict=True):
                if i < ask['parts']:
                    yield task, sse(parts_of(ask, i))


def serve(port: int) -> None:
    flow = Flow(FlowStep(Emit(), nprocs=2, batch_size=16, batch_timeout=0.005))
    asyncio.run(serve_http(flow, '127.0.0.1', port, routes={'/stream': 0}, timeout_sec=120))
