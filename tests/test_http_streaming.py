"""Streamed responses of the Rust HTTP front (``aqueduct.http``), over real HTTP on 127.0.0.1:
a handler's parts as Server-Sent Events, JSON lines, text and bytes, written as they come;
batches of streams; failures after the status is sent (an ``event: error``, or the body cut
short); clients that hang up or stop reading (the task is cancelled, the worker freed); the
deadline and the idle limit over a stream; ``sse()``'s checks."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import pickle
import select
import signal

import aiohttp
import pytest
from aqueduct import FlowStep
from aqueduct.http import Request, ServerSentEvent, sse

from .conftest import until
from .http_handlers import Describe, Stream
from .test_http_front import error_of, serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start_method() -> str:
    """Forked workers: the pipes the handlers report on are inherited."""
    return 'fork'


@pytest.fixture
def told():
    """A pipe a :class:`Stream` handler writes ``gone <parts>`` to when its caller has left."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def read_told(fd: int) -> str:
    def wait() -> str:
        ready, _, _ = select.select([fd], [], [], 20)
        assert ready, 'the handler was not told that its caller left'
        return os.read(fd, 64).decode().strip()

    return await asyncio.to_thread(wait)


def events(text: str) -> list:
    """Server-Sent Events as ``(event, id, data)``."""
    found = []
    for block in text.split('\n\n'):
        if not block:
            continue
        fields: dict = {}
        for line in block.split('\n'):
            name, _, value = line.partition(': ')
            fields.setdefault(name, []).append(value)
        found.append((fields.get('event', [None])[0], fields.get('id', [None])[0], '\n'.join(fields.get('data', []))))
    return found


async def post(session, front, ask: dict, path: str = '/'):
    return await session.post(front.url + path, json=ask)


async def test_server_sent_events_arrive_as_the_handler_sends_them(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        ask = {'parts': 5, 'kind': 'sse', 'status': 201, 'headers': {'x-model': 'tiny'}}
        async with await post(session, front, ask) as response:
            assert response.status == 201
            assert response.headers['content-type'] == 'text/event-stream'
            assert response.headers['cache-control'] == 'no-cache'
            assert response.headers['x-model'] == 'tiny'
            assert response.headers['transfer-encoding'] == 'chunked'
            assert 'content-length' not in response.headers
            text = (await response.read()).decode()
        assert events(text) == [('token', str(n), json.dumps({'n': n}, separators=(',', ':'))) for n in range(5)]
        metrics = flow.metrics()
        assert sum(step['stream_parts'] for step in metrics['steps']) >= 5


async def test_parts_are_written_before_the_handler_returns(make_flow):
    """The client reads the first part while the handler still sleeps before the second."""
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow, timeout_sec=30) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 2, 'kind': 'text', 'pause': 20}) as response:
            first = await asyncio.wait_for(response.content.readline(), 10)
            assert first == b'part 0\n'
            assert response.headers['content-type'] == 'text/plain; charset=utf-8'


@pytest.mark.parametrize(
    ('kind', 'content_type', 'expected'),
    [
        ('json', 'application/x-ndjson', b'{"n":0}\n{"n":1}\n{"n":2}\ndone'),
        ('text', 'text/plain; charset=utf-8', b'part 0\npart 1\npart 2\ndone'),
        ('bytes', 'application/octet-stream', b'\x00\x00\x01\x01\x02\x02done'),
    ],
)
async def test_kinds_of_parts_and_the_final_response_as_the_last_chunk(make_flow, kind, content_type, expected):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 3, 'kind': kind, 'size': 2, 'final': 'done'}) as response:
            assert response.status == 200
            assert response.headers['content-type'] == content_type
            assert await response.read() == expected


async def test_a_handler_that_sends_no_part_answers_as_before(make_flow, told):
    flow = make_flow(FlowStep(Stream(told[1]), nprocs=2))
    async with serving(flow, timeout_sec=30) as front, aiohttp.ClientSession() as session:
        ask = {'parts': 0, 'final': {'whole': True}, 'status': 202, 'delay': 1}
        answer = asyncio.ensure_future(post(session, front, ask))
        # A request in flight that has sent no part is not counted as a stream (once it is
        # answered nothing is: the count must be read while it is in flight)...
        await until(lambda: flow._driver.pending == 1)
        assert [step['streams_open'] for step in flow.metrics()['steps']] == [0]
        # ... one that has sent a part is.
        async with await post(session, front, {'forever': True, 'kind': 'sse'}) as streaming:
            await streaming.content.readuntil(b'\n\n')
            assert [step['streams_open'] for step in flow.metrics()['steps']] == [1]
        async with await answer as response:
            assert response.status == 202
            assert response.headers['content-type'] == 'application/json'
            assert response.headers['content-length'] == str(len(b'{"whole":true}'))
            assert await response.json() == {'whole': True}
        assert (await read_told(told[0])).startswith('gone ')
        await until(lambda: all(step['streams_open'] == 0 for step in flow.metrics()['steps']))


async def test_a_batch_of_requests_streams_one_response_each(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1, batch_size=8, batch_timeout=0.2))

    async def one(session, front, n):
        async with await post(session, front, {'parts': 4 + n, 'kind': 'json', 'final': n}) as response:
            lines = (await response.read()).splitlines()
        return [json.loads(line) for line in lines]

    async with serving(flow) as front, aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(one(session, front, n) for n in range(8)))
    for n, answer in enumerate(answers):
        assert answer == [{'n': i} for i in range(4 + n)] + [n]


async def test_megabyte_parts(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    size = 1 << 20
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 10, 'kind': 'bytes', 'size': size}) as response:
            body = await response.read()
    expected = b''.join(bytes([n]) * size for n in range(10))
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()


async def test_a_handler_exception_after_parts_ends_an_event_stream_with_an_error_event(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 5, 'kind': 'sse', 'fail_after': 2}) as response:
            assert response.status == 200
            found = events((await response.read()).decode())
        assert [e[1] for e in found[:2]] == ['0', '1']
        kind, _, data = found[2]
        assert kind == 'error'
        doc = error_of(data.encode())
        assert doc['error'] == 'handler_error'
        assert 'failed after 2 parts' in doc['message']
        assert len(found) == 3
        # The worker goes on serving.
        async with await post(session, front, {'parts': 1, 'kind': 'text'}) as response:
            assert await response.read() == b'part 0\n'


async def test_an_event_stream_is_known_whatever_the_case_of_its_content_type(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        ask = {'parts': 5, 'kind': 'sse', 'fail_after': 1, 'headers': {'Content-Type': 'Text/Event-Stream'}}
        async with await post(session, front, ask) as response:
            found = events((await response.read()).decode())
        assert found[-1][0] == 'error', 'ended with an error event, not cut short'


async def test_a_failure_after_parts_cuts_any_other_body_short(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 5, 'kind': 'text', 'fail_after': 2}) as response:
            assert response.status == 200
            assert await response.content.readline() == b'part 0\n'
            assert await response.content.readline() == b'part 1\n'
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()


async def test_a_client_hanging_up_mid_stream_cancels_its_task(make_flow, told):
    told_r, told_w = told
    flow = make_flow(FlowStep(Stream(told_w), nprocs=1))
    async with serving(flow) as front:
        async with aiohttp.ClientSession() as session:
            async with await post(session, front, {'forever': True, 'kind': 'sse'}) as response:
                for _ in range(3):
                    assert (await response.content.readline()).startswith(b'event: token')
                    await response.content.readuntil(b'\n\n')
        # The session is closed: the connection with it.
        assert (await read_told(told_r)).startswith('gone ')
        await until(lambda: front._server.in_flight == 0)
        async with aiohttp.ClientSession() as session, await post(session, front, {'parts': 1}) as response:
            assert await response.read() == b'part 0\n'


async def test_a_client_that_stops_reading_is_disconnected_and_its_task_cancelled(make_flow, told):
    """A client that reads the headers and then nothing: the worker is held back (the stream
    window and hyper's bounded buffer), the connection is closed after client_timeout_sec, and
    the handler is told; memory does not grow with the parts it would have sent."""
    told_r, told_w = told
    flow = make_flow(FlowStep(Stream(told_w), nprocs=1))
    async with serving(flow, timeout_sec=30, client_timeout_sec=1) as front:
        reader, writer = await asyncio.open_connection(*front.address)
        body = json.dumps({'forever': True, 'kind': 'bytes', 'size': 1 << 20}).encode()
        writer.write(
            b'POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s'
            % (len(body), body)
        )
        await writer.drain()
        assert (await reader.readline()).startswith(b'HTTP/1.1 200')
        gone = await read_told(told_r)
        sent = int(gone.split()[1])
        # The window of 8 parts, what hyper buffers, and what the socket buffers hold: bounded,
        # far below what a worker sends in the seconds the client did not read (thousands).
        assert sent < 200, sent
        writer.close()
        await until(lambda: front._server.in_flight == 0)


async def test_a_worker_killed_mid_stream_ends_the_stream_with_worker_died(make_flow, told):
    flow = make_flow(FlowStep(Stream(told[1]), nprocs=1))
    async with serving(flow, timeout_sec=30) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'forever': True, 'kind': 'sse', 'pid': True}) as response:
            (_, _, data), = events((await response.content.readuntil(b'\n\n')).decode())
            os.kill(json.loads(data)['pid'], signal.SIGKILL)
            text = (await response.read()).decode()
        kind, _, data = events(text)[-1]
        assert kind == 'error'
        assert error_of(data.encode())['error'] == 'worker_died'
        # A replacement serves the next request.
        async with await post(session, front, {'parts': 1}) as response:
            assert await response.read() == b'part 0\n'


async def test_the_deadline_covers_the_whole_stream(make_flow, told):
    flow = make_flow(FlowStep(Stream(told[1]), nprocs=1))
    async with serving(flow, timeout_sec=1) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'forever': True, 'kind': 'sse', 'pause': 0.05}) as response:
            assert response.status == 200
            kind, _, data = events((await response.read()).decode())[-1]
        assert kind == 'error'
        assert error_of(data.encode())['error'] == 'timeout'
        assert (await read_told(told[0])).startswith('gone ')


async def test_the_idle_limit_ends_a_stream_that_stalls(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1, handle_timeout=30))
    async with serving(flow, timeout_sec=30, idle_timeout_sec=0.5) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 2, 'kind': 'sse', 'pause': 20}) as response:
            found = events((await response.read()).decode())
        assert found[0][1] == '0'
        kind, _, data = found[-1]
        assert (kind, error_of(data.encode())['error']) == ('error', 'idle_timeout')


async def test_a_first_part_with_bad_headers_is_a_500(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        ask = {'parts': 3, 'headers': {'content-length': '3'}}
        async with await post(session, front, ask) as response:
            assert response.status == 500
            doc = error_of(await response.read())
        assert doc['error'] == 'bad_reply'
        assert 'content-length' in doc['message']
        async with await post(session, front, {'parts': 3, 'headers': {'bad name': 'x'}}) as response:
            assert response.status == 500
        async with await post(session, front, {'parts': 1}) as response:
            assert await response.read() == b'part 0\n'


async def test_flow_stream_of_a_request_yields_the_chunks_the_front_would_send(make_flow):
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    ask = {'parts': 2, 'kind': 'sse', 'final': 'bye', 'status': 201, 'headers': {'x-model': 'tiny'}}
    task = Request(json.dumps(ask).encode())
    parts = [part async for part in flow.stream(task)]
    assert parts == [bytes(sse({'n': 0}, event='token', id='0')), bytes(sse({'n': 1}, event='token', id='1'))]
    assert task.reply_body == b'bye'
    # The head that went out with the first part, for a caller testing the handler without HTTP.
    assert task.status == 201
    assert ('x-model', 'tiny') in [tuple(h) for h in task.reply_headers]
    assert ('content-type', 'text/event-stream') in [tuple(h) for h in task.reply_headers]
    # Large chunks come through the pool.
    task = Request(json.dumps({'parts': 3, 'kind': 'bytes', 'size': 1 << 20}).encode())
    parts = [bytes(part) async for part in flow.stream(task)]
    assert parts == [bytes([n]) * (1 << 20) for n in range(3)]


async def test_routes_that_do_not_stream_are_unchanged_beside_ones_that_do(make_flow):
    flow = make_flow(FlowStep(Describe(), nprocs=1), FlowStep(Stream(), nprocs=1, handle_condition=_never))
    async with serving(flow, routes={'/d/json': 0, '/s': 1}) as front:
        async with aiohttp.ClientSession() as session:
            async with session.post(front.url + '/d/json', data=b'x') as response:
                assert response.status == 200
                assert 'content-length' in response.headers
            async with await post(session, front, {'parts': 2}, path='/s') as response:
                assert await response.read() == b'part 0\npart 1\n'


def _never(task) -> bool:
    return False


def test_sse_formats_one_event_and_refuses_what_would_split_it():
    assert bytes(sse('hello')) == b'data: hello\n\n'
    assert sse('x') == ServerSentEvent(b'data: ', 'x', b'\n\n')
    assert pickle.loads(pickle.dumps(sse('x'))) == sse('x')
    # Every line break of the data becomes a data line: no text can end the event early.
    assert bytes(sse('a\r\nb\rc\nd')) == b'data: a\ndata: b\ndata: c\ndata: d\n\n'
    assert bytes(sse('a\n\nevent: evil')) == b'data: a\ndata: \ndata: event: evil\n\n'
    assert bytes(sse('')) == b'data: \n\n'
    assert bytes(sse('é')) == 'data: é\n\n'.encode()
    event = sse({'x': [1, 2]}, event='e', id='7', retry_ms=100)
    assert bytes(event) == b'event: e\nid: 7\nretry: 100\ndata: {"x":[1,2]}\n\n'
    for bad in ({'event': 'a\nb'}, {'id': 'a\rb'}, {'id': 'a\0b'}):
        with pytest.raises(ValueError, match='one line'):
            sse('x', **bad)
    with pytest.raises(TypeError):
        sse('x', event=3)
    for retry in (-1, True, 1.5):
        with pytest.raises(ValueError, match='retry_ms'):
            sse('x', retry_ms=retry)
    with pytest.raises(ValueError, match='not valid JSON'):
        sse(float('nan'))


async def test_streamed_requests_in_flight_are_bounded_by_max_in_flight(make_flow, told):
    flow = make_flow(FlowStep(Stream(told[1]), nprocs=1))
    async with serving(flow, max_in_flight=1, timeout_sec=30) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'forever': True, 'kind': 'sse'}) as streaming:
            await streaming.content.readuntil(b'\n\n')
            async with await post(session, front, {'parts': 1}) as refused:
                assert refused.status == 503
                assert error_of(await refused.read())['error'] == 'busy'
        assert (await read_told(told[0])).startswith('gone ')
        await until(lambda: front._server.in_flight == 0)
        async with await post(session, front, {'parts': 1}) as response:
            assert response.status == 200


async def test_an_event_left_as_the_response_of_a_request_that_sent_no_part_is_sent_whole(make_flow):
    """The pattern of docs/http.md (``task.response = sse('', event='done')`` after the parts)
    for a request whose handler sent no part, and for a ``process()`` caller, whose parts are
    dropped: the event is the whole body of a ``text/event-stream`` response, not a 500."""
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 0, 'final': 'bye', 'final_event': 'done'}) as response:
            assert response.status == 200, await response.read()
            assert response.headers['content-type'] == 'text/event-stream'
            assert await response.read() == b'event: done\ndata: bye\n\n'
    task = Request(json.dumps({'parts': 2, 'kind': 'sse', 'final': 'bye', 'final_event': 'done'}).encode())
    await flow.process(task)
    assert task.reply_body == b'event: done\ndata: bye\n\n'
    assert ('content-type', 'text/event-stream') in task.reply_headers


def test_an_event_of_a_str_subclass_is_sent_as_its_text():
    """``sse(token)`` with a ``str`` subclass (``numpy.str_``, what indexing an array of
    strings gives; a ``StrEnum``): a part is not refused ('the response could not be
    encoded'), and the last chunk is its UTF-8 text, not the buffer a ``numpy.str_`` exposes
    (UCS-4: ``data: t\\0\\0\\0o...``)."""
    import numpy as np
    from aqueduct import _core

    class Token(str):
        pass

    for text in (np.array(['tok'])[0], Token('tok')):
        assert bytes(sse(text)) == b'data: tok\n\n'
        task = Request(b'')
        first = _core.decode_state(task._part_state(sse(text, event='token')))[2]
        assert b''.join(p.encode() if isinstance(p, str) else p for p in first['reply_body']) == (
            b'event: token\ndata: tok\n\n'
        )
        task.response = sse(text)
        assert _core.decode_state(task._final_state())[2]['reply_body'] == b'data: tok\n\n'


class _Http10(http.client.HTTPConnection):
    _http_vsn = 10
    _http_vsn_str = 'HTTP/1.0'


def _get_1_0(address, body: bytes):
    conn = _Http10(*address, timeout=10)
    try:
        conn.request('POST', '/', body=body, headers={'content-type': 'application/json'})
        response = conn.getresponse()
        return response.status, response.getheader('transfer-encoding'), response.read()
    finally:
        conn.close()


async def test_a_failure_after_parts_is_an_error_for_an_http_1_0_client_too(make_flow):
    """HTTP/1.0 has no chunked encoding: the body is delimited by the connection's close, so
    a body cut short by a normal close reads as a complete response (behind a proxy speaking
    HTTP/1.0 to the front, nginx's default, the client got a truncated 200). The connection is
    reset instead, which the client reports."""
    flow = make_flow(FlowStep(Stream(), nprocs=1))
    async with serving(flow) as front:
        body = json.dumps({'parts': 5, 'kind': 'text', 'fail_after': 2}).encode()
        with pytest.raises((ConnectionError, http.client.IncompleteRead)):
            await asyncio.to_thread(_get_1_0, front.address, body)
        # A stream that ends well ends with the close, as HTTP/1.0 has it.
        body = json.dumps({'parts': 2, 'kind': 'text', 'final': 'end'}).encode()
        status, framing, text = await asyncio.to_thread(_get_1_0, front.address, body)
        assert (status, framing, text) == (200, None, b'part 0\npart 1\nend')


async def test_the_idle_limit_does_not_cut_a_response_that_does_not_stream(make_flow):
    """``idle_timeout_sec`` limits the wait for the parts of a streamed response; a request whose
    handler takes longer than it and sends no part (a route that does not stream, beside ones
    that do) is bound by its deadline only, as before, not failed with ``idle_timeout``. A
    response streams from its first part on, so the idle limit runs from there."""
    flow = make_flow(FlowStep(Stream(), nprocs=1, handle_timeout=30))
    async with serving(flow, timeout_sec=30, idle_timeout_sec=0.3) as front, aiohttp.ClientSession() as session:
        async with await post(session, front, {'parts': 0, 'delay': 1, 'final': {'whole': True}}) as response:
            assert response.status == 200, await response.read()
            assert await response.json() == {'whole': True}
        # The wait before a stream's first part is the deadline's too; after it, the idle limit's.
        async with await post(session, front, {'parts': 2, 'kind': 'sse', 'delay': 1, 'pause': 20}) as response:
            assert response.status == 200
            found = events((await response.read()).decode())
        assert found[0][1] == '0'
        kind, _, data = found[-1]
        assert (kind, error_of(data.encode())['error']) == ('error', 'idle_timeout')
