"""The streaming examples over real HTTP on 127.0.0.1 (``examples/streaming``): Server-Sent
Events and chunked text from aiohttp, FastAPI and the engine's own HTTP front, a bad request, and a client that hangs up
mid-stream (its task is cancelled)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'examples' / 'streaming'))

import app as aiohttp_example  # noqa: E402
from generate import next_token  # noqa: E402

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def aiohttp_service():
    app = aiohttp_example.create_app()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f'http://127.0.0.1:{port}', app['flow']
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fastapi_service():
    import uvicorn

    sys.modules.pop('fastapi_app', None)  # a fresh flow for each test
    import fastapi_app

    server = uvicorn.Server(uvicorn.Config(fastapi_app.app, host='127.0.0.1', port=0, log_level='warning'))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn sets the flag when it listens; it offers no event
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f'http://127.0.0.1:{port}', fastapi_app.flow
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def front_service():
    from aqueduct.http import HttpFront

    sys.modules.pop('front', None)
    import front

    flow = front.build_flow()
    flow.start(timeout=30)
    try:
        async with HttpFront(flow, port=0, routes={'/generate': 0}, timeout_sec=60) as served:
            yield served.url, flow
    finally:
        await flow.stop()


SERVICES = {'aiohttp': aiohttp_service, 'fastapi': fastapi_service, 'front': front_service}


def expected(prompt: str, tokens: int) -> list:
    return [next_token(prompt, i) for i in range(tokens)]


async def read_events(response) -> list:
    """``(event, data)`` of each Server-Sent Event, as they come."""
    events, event, data = [], 'message', None
    async for raw in response.content:
        line = raw.decode().rstrip('\n')
        if line.startswith('event: '):
            event = line[7:]
        elif line.startswith('data: '):
            data = json.loads(line[6:])
        elif line == '' and data is not None:
            events.append((event, data))
            event, data = 'message', None
    return events


@pytest.mark.parametrize('kind', list(SERVICES))
async def test_tokens_as_server_sent_events(kind):
    async with SERVICES[kind]() as (base, _flow), aiohttp.ClientSession() as session:
        async with session.post(base + '/generate', json={'prompt': 'hello', 'tokens': 25}) as response:
            assert response.status == 200
            assert response.headers['Content-Type'].startswith('text/event-stream')
            events = await read_events(response)
        tokens = expected('hello', 25)
        assert events[:-1] == [('message', t) for t in tokens]
        assert events[-1] == ('done', ''.join(tokens))


@pytest.mark.parametrize('kind', list(SERVICES))
async def test_tokens_as_chunked_text_and_many_at_once(kind):
    async with SERVICES[kind]() as (base, _flow), aiohttp.ClientSession() as session:

        async def one(i: int) -> str:
            body = {'prompt': f'p{i}', 'tokens': 10 + i}
            async with session.post(base + '/generate?format=text', json=body) as response:
                assert response.status == 200
                return await response.text()

        texts = await asyncio.gather(*(one(i) for i in range(20)))
        assert texts == [''.join(expected(f'p{i}', 10 + i)) for i in range(20)]


@pytest.mark.parametrize('kind', list(SERVICES))
async def test_a_bad_request_is_a_400(kind):
    async with SERVICES[kind]() as (base, _flow), aiohttp.ClientSession() as session:
        for body in ({'prompt': 1}, {'prompt': 'x', 'tokens': 0}, {'prompt': 'x', 'tokens': True}, [1]):
            async with session.post(base + '/generate', json=body) as response:
                assert response.status == 400, body
                assert 'error' in await response.json()


@pytest.mark.parametrize('kind', list(SERVICES))
async def test_a_client_that_hangs_up_cancels_its_stream(kind):
    async with SERVICES[kind]() as (base, flow):
        reader, writer = await asyncio.open_connection(*base[7:].split(':'))
        body = json.dumps({'prompt': 'long', 'tokens': 4096}).encode()
        writer.write(
            b'POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
            + f'Content-Length: {len(body)}\r\n\r\n'.encode()
            + body
        )
        await writer.drain()
        seen = b''
        while seen.count(b'data: ') < 3:
            chunk = await reader.read(4096)
            assert chunk, 'the server closed before streaming'
            seen += chunk
        writer.close()
        # The server finds out at its next write; then the task is cancelled. Nothing signals
        # that over HTTP: poll the flow's own count of cancelled calls.
        for _ in range(500):
            if flow.metrics()['outcomes'][0]['cancel'] == 1 and flow.health()['steps'][0]['in_flight'] == 0:
                break
            await asyncio.sleep(0.01)
        assert flow.metrics()['outcomes'][0]['cancel'] == 1
        assert flow.health()['steps'][0]['in_flight'] == 0, 'the worker let go of the task'
