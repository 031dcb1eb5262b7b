"""The FastAPI service of ``app.py`` with several web processes sharing one flow.

With gunicorn (the master imports this module once, then forks the web workers)::

    gunicorn shared:app --chdir examples/fastapi --preload --workers 2 \\
        --worker-class uvicorn.workers.UvicornWorker --bind 127.0.0.1:8081

``preload()`` forks the flow server from the master; each web worker attaches to it at startup
and submits straight into the flow's queues through shared memory.

With ``uvicorn --workers 2`` every worker imports the module on its own, so the flow server runs
beside it instead, and this module only attaches (``AQUEDUCT_FLOW_SERVER=external``)::

    python -m aqueduct serve pipeline:build_flow &       # from examples/
    AQUEDUCT_FLOW_SERVER=external uvicorn shared:app --app-dir examples/fastapi --workers 2
"""

from __future__ import annotations

import os
import sys

from fastapi import FastAPI
from fastapi.responses import JSONResponse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import router  # noqa: E402
from aqueduct.integrations.fastapi import flow_lifespan  # noqa: E402
from aqueduct.sockets import SocketFlow  # noqa: E402
from pipeline import build_flow  # noqa: E402

socket_flow = SocketFlow()
if os.environ.get('AQUEDUCT_FLOW_SERVER') != 'external':
    socket_flow.preload(build_flow())

app = FastAPI(title='aqueduct example (shared flow)', lifespan=flow_lifespan(socket_flow))
app.state.flow = socket_flow
app.include_router(router)


@app.get('/healthz')
async def healthz() -> JSONResponse:
    health = socket_flow.health()
    return JSONResponse(health, status_code=200 if health['ready'] else 503)
