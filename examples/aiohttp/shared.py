"""The aiohttp service of ``app.py`` with several web processes sharing one flow.

    gunicorn shared:app --chdir examples/aiohttp --preload --workers 2 \\
        --worker-class aiohttp.GunicornWebWorker --bind 127.0.0.1:8080

``--preload`` makes the gunicorn master import this module once, before it forks the web
workers: ``preload()`` then forks the flow server, which starts the flow's workers. Each web
worker attaches to it when it starts (``await socket_flow.start()``) and submits straight into
the flow's queues through shared memory. The flow server stops when the master exits.
``make example-aiohttp-shared`` runs it. The module uses aqueduct 1.15's API only.
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import MAX_IMAGE_BYTES, add_routes  # noqa: E402
from aqueduct.sockets.flow import SocketFlow  # noqa: E402
from pipeline import build_flow  # noqa: E402

socket_flow = SocketFlow()
socket_flow.preload(build_flow())


async def attach(app: web.Application) -> None:
    await socket_flow.start()


async def detach(app: web.Application) -> None:
    await socket_flow.stop()


async def healthz(request: web.Request) -> web.Response:
    attached = getattr(socket_flow, 'is_running', True)
    return web.json_response({'attached': attached}, status=200 if attached else 503)


app = web.Application(client_max_size=MAX_IMAGE_BYTES)
app['flow'] = socket_flow
app.on_startup.append(attach)
app.on_shutdown.append(detach)
add_routes(app)
app.router.add_get('/healthz', healthz)
