"""A FastAPI image-classification service on aqueduct.

    POST /classify   body: a .npy image (H x W x 3 uint8)  ->  {"top5": [[class, probability], ...]}
    GET  /healthz    200 when the flow is ready and shared memory has room (503 otherwise)
    GET  /metrics    Prometheus

One web process: ``make example-fastapi`` (serves on 127.0.0.1:8081), or
``python -m uvicorn app:app --app-dir examples/fastapi --port 8081``. Several web processes
sharing one flow: see ``shared.py``.

Bodies are untrusted: one over ``MAX_IMAGE_BYTES`` gets 413 before any memory is reserved, one
without a ``Content-Length`` 411, one that takes over a minute to arrive 408, and a request that
finds the shared memory full 503 with ``Retry-After``.
"""

from __future__ import annotations

import os
import sys

from fastapi import APIRouter, Depends, FastAPI, Request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct.exceptions import FlowError  # noqa: E402
from aqueduct.integrations.fastapi import (  # noqa: E402
    PAYLOAD_ERRORS,
    AppIntegrator,
    error_response,
    get_flow,
    share_request_body,
)
from pipeline import ImageTask, build_flow, run  # noqa: E402

#: The largest upload accepted: a 4096 x 4096 image fits. Starlette has no limit of its own.
MAX_IMAGE_BYTES = 64 << 20

router = APIRouter()


@router.post('/classify')
async def classify(request: Request, flow=Depends(get_flow())):
    task = ImageTask()
    try:
        # The limit is given here, not with AppIntegrator(client_max_size=): shared.py serves
        # this same route from an app without an integrator.
        await share_request_body(task, 'image', request, client_max_size=MAX_IMAGE_BYTES)
        await run(flow, task)
    except PAYLOAD_ERRORS as exc:  # too large, incomplete, too slow, shared memory full
        return error_response(exc)
    except ValueError as exc:  # raised by the decoder: the client sent something else
        return error_response(exc, 400)
    except FlowError as exc:
        return error_response(exc, 503)
    return {'top5': task.top5, 'served_by': os.getpid()}


app = FastAPI(title='aqueduct example')
AppIntegrator(app, metrics_path='/metrics', health_path='/healthz').add_flow(build_flow())
app.include_router(router)
