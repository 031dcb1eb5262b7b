"""An aiohttp service streaming generated tokens as they come.

    POST /generate {"prompt": ..., "tokens": n}
        Server-Sent Events: one ``data:`` event per token, then ``event: done`` with the text
    POST /generate?format=text   the same tokens as a chunked plain-text body

``make example-streaming`` serves on 127.0.0.1:8084, or ``python examples/streaming/app.py
--port 8084``. Try ``curl -N -d '{"prompt": "hi", "tokens": 20}' 127.0.0.1:8084/generate``.

A client that hangs up mid-stream cancels its task: the generator in the worker is closed and
the worker moves on to other requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aqueduct.exceptions import FlowError  # noqa: E402
from aqueduct.integrations.aiohttp import AppIntegrator  # noqa: E402
from generate import Prompt, build_flow  # noqa: E402

#: The most tokens one request may ask for.
MAX_TOKENS = 4096


def prompt_of(doc) -> Prompt:
    """The request's prompt, or ``ValueError`` naming what is wrong with it."""
    if not isinstance(doc, dict) or not isinstance(doc.get('prompt'), str):
        raise ValueError('expected {"prompt": "...", "tokens": n}')
    tokens = doc.get('tokens', 16)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_TOKENS:
        raise ValueError(f'"tokens" must be an integer from 1 to {MAX_TOKENS}')
    return Prompt(doc['prompt'], tokens)


async def generate(request: web.Request) -> web.StreamResponse:
    try:
        task = prompt_of(await request.json())
    except ValueError as exc:  # bad JSON is a ValueError too
        return web.json_response({'error': str(exc)}, status=400)
    sse = request.query.get('format') != 'text'
    content_type = 'text/event-stream' if sse else 'text/plain; charset=utf-8'
    response = web.StreamResponse(headers={'Content-Type': content_type, 'Cache-Control': 'no-cache'})
    await response.prepare(request)
    try:
        # `async with`: a client that hangs up (the write below raises) cancels the task now.
        async with request.app['flow'].stream(task, timeout_sec=60, idle_timeout_sec=10) as tokens:
            async for token in tokens:
                await response.write(f'data: {json.dumps(token)}\n\n'.encode() if sse else token.encode())
    except FlowError as exc:  # a handler error, a timeout, a dead worker: after the tokens sent
        if sse:
            await response.write(f'event: error\ndata: {json.dumps(str(exc))}\n\n'.encode())
        return response
    if sse:
        await response.write(f'event: done\ndata: {json.dumps(task.answer)}\n\n'.encode())
    await response.write_eof()
    return response


def create_app() -> web.Application:
    app = web.Application()
    AppIntegrator(app).add_flow(build_flow())
    app.router.add_post('/generate', generate)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=8084)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port)


if __name__ == '__main__':
    main()
