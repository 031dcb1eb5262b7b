"""A FastAPI image-classification service on aqueduct.

    POST /classify   body: a .npy image (H x W x 3 uint8)  ->  {"top5": [[class, probability], ...]}
    GET  /healthz    200 when the flow is ready (503 otherwise)
    GET  /metrics    Prometheus

One web process: ``make example-fastapi`` (serves on 127.0.0.1:8081), or
``python -m uvicorn app:app --app-dir examples/fastapi --port 8081``. Several web processes
sharing one flow: see ``shared.py``.
"""

from __future__ import annotations

import os
import sys

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct.exceptions import FlowError  # noqa: E402
from aqueduct.integrations.fastapi import AppIntegrator, RequestStream, get_flow  # noqa: E402
from pipeline import ImageTask, build_flow, run  # noqa: E402

router = APIRouter()


@router.post('/classify')
async def classify(request: Request, flow=Depends(get_flow())) -> dict:
    size = int(request.headers.get('content-length') or 0)
    if not size:
        raise HTTPException(411, 'send the image with a Content-Length')
    task = ImageTask()
    await task.share_value_with_data('image', RequestStream(request), size, max_size=64 << 20)
    try:
        await run(flow, task)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except FlowError as exc:
        raise HTTPException(503, str(exc)) from None
    return {'top5': task.top5, 'served_by': os.getpid()}


app = FastAPI(title='aqueduct example')
AppIntegrator(app, metrics_path='/metrics', health_path='/healthz').add_flow(build_flow())
app.include_router(router)
