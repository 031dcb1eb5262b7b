"""The FastAPI twin of ``app.py``: tokens streamed as Server-Sent Events (or chunked text with
``?format=text``) through ``StreamingResponse``.

``make example-streaming-fastapi`` serves on 127.0.0.1:8085 (uvicorn).
"""

from __future__ import annotations

import json
import os
import sys
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import prompt_of  # noqa: E402
from aqueduct.exceptions import FlowError  # noqa: E402
from aqueduct.integrations.fastapi import flow_lifespan  # noqa: E402
from generate import Prompt, build_flow  # noqa: E402

flow = build_flow()
app = FastAPI(lifespan=flow_lifespan(flow))


async def events(task: Prompt, sse: bool) -> AsyncIterator[bytes]:
    # StreamingResponse closes this generator when the client hangs up; `async with` then
    # cancels the task at once.
    try:
        async with flow.stream(task, timeout_sec=60, idle_timeout_sec=10) as tokens:
            async for token in tokens:
                yield f'data: {json.dumps(token)}\n\n'.encode() if sse else token.encode()
    except FlowError as exc:
        if sse:
            yield f'event: error\ndata: {json.dumps(str(exc))}\n\n'.encode()
        return
    if sse:
        yield f'event: done\ndata: {json.dumps(task.answer)}\n\n'.encode()


@app.post('/generate')
async def generate(request: Request, format: str = 'sse'):
    try:
        task = prompt_of(await request.json())
    except ValueError as exc:
        return JSONResponse({'error': str(exc)}, status_code=400)
    sse = format != 'text'
    media = 'text/event-stream' if sse else 'text/plain; charset=utf-8'
    return StreamingResponse(events(task, sse), media_type=media, headers={'Cache-Control': 'no-cache'})
