"""The streaming benchmark's server on aqueduct-rs: aiohttp + ``Flow.stream``, Server-Sent
Events (see ``stream_servers.py``)."""

from __future__ import annotations

import os
import sys

from aiohttp import web
from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep
from aqueduct.integrations.aiohttp import AppIntegrator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stream_servers import parts_of  # noqa: E402


class Job(BaseTask):
    def __init__(self, request: dict):
        super().__init__()
        self.request = request


class Emit(BaseTaskHandler):
    def handle(self, *tasks: Job):
        for i in range(max(t.request['parts'] for t in tasks)):
            for task in tasks:
                if i < task.request['parts']:
                    yield task, parts_of(task.request, i)


async def stream(request: web.Request) -> web.StreamResponse:
    task = Job(await request.json())
    response = web.StreamResponse(headers={'Content-Type': 'text/event-stream'})
    await response.prepare(request)
    async with request.app['flow'].stream(task, timeout_sec=120) as parts:
        async for part in parts:
            await response.write(f'data: {part}\n\n'.encode())
    await response.write_eof()
    return response


def serve(port: int) -> None:
    app = web.Application()
    AppIntegrator(app).add_flow(Flow(FlowStep(Emit(), nprocs=2, batch_size=16, batch_timeout=0.005)))
    app.router.add_post('/stream', stream)
    web.run_app(app, host='127.0.0.1', port=port, print=None)
