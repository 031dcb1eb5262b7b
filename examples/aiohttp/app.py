"""An aiohttp image-classification service on aqueduct.

    POST /classify   body: a .npy image (H x W x 3 uint8)  ->  {"top5": [[class, probability], ...]}
    GET  /healthz    200 when the flow is ready and shared memory has room (503 otherwise)
    GET  /metrics    Prometheus

One web process: ``make example-aiohttp`` (serves on 127.0.0.1:8080), or
``python examples/aiohttp/app.py --port 8080``. Several web processes sharing one flow: see
``shared.py``. The request body streams straight into shared memory
(``share_request_body``), and the handlers read it from there.

Bodies are untrusted: one over ``MAX_IMAGE_BYTES`` gets 413 before any memory is reserved, one
without a ``Content-Length`` 411, one that takes over a minute to arrive 408, and a request that
finds the shared memory full 503 with ``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct.exceptions import FlowError  # noqa: E402
from aqueduct.integrations.aiohttp import (  # noqa: E402
    PAYLOAD_ERRORS,
    AppIntegrator,
    error_response,
    share_request_body,
)
from pipeline import ImageTask, build_flow, run  # noqa: E402

#: The largest upload accepted (the app's ``client_max_size``): a 4096 x 4096 image fits.
MAX_IMAGE_BYTES = 64 << 20


async def classify(request: web.Request) -> web.Response:
    task = ImageTask()
    try:
        await share_request_body(task, 'image', request)
        await run(request.app['flow'], task)
    except PAYLOAD_ERRORS as exc:  # too large, incomplete, too slow, shared memory full
        return error_response(exc)
    except ValueError as exc:  # raised by the decoder: the client sent something else
        return error_response(exc, 400)
    except FlowError as exc:
        return error_response(exc, 503)
    return web.json_response({'top5': task.top5, 'served_by': os.getpid()})


def add_routes(app: web.Application) -> web.Application:
    app.router.add_post('/classify', classify)
    return app


def create_app() -> web.Application:
    app = web.Application(client_max_size=MAX_IMAGE_BYTES)
    try:
        integrator = AppIntegrator(app, metrics_path='/metrics', health_path='/healthz')
    except TypeError:  # aqueduct 1.15: no optional routes
        integrator = AppIntegrator(app)
    integrator.add_flow(build_flow())
    return add_routes(app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=8080)
    args = parser.parse_args()
    # The app runs on the loop that is current while the flow starts: aqueduct 1.15 ties its
    # flow to that loop (aqueduct-rs binds to whichever loop runs it).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = create_app()
    web.run_app(app, host=args.host, port=args.port, loop=loop, print=lambda *a: print(*a, flush=True))


if __name__ == '__main__':
    main()
