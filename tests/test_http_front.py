"""The Rust HTTP front (``aqueduct.http``), over real HTTP on 127.0.0.1 (a free port each
time): routes and request fields, response kinds, the statuses it gives itself (404, 408, 413,
500, 503, 504), slow and vanishing clients, a worker killed mid-request, shutdown with requests
in flight, Python callers beside it, and ``python -m aqueduct serve --http``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys

import pytest
from aqueduct import FlowStep
from aqueduct.http import HttpFront, Request

from .conftest import children
from .http_handlers import Describe, Digest, Gate, Report

pytestmark = pytest.mark.timeout(60)


def request(address, method='POST', path='/', body=b'', headers=None, timeout=10.0):
    """``(status, headers, body)`` of one request on a new connection."""
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


async def call(address, *args, **kwargs):
    return await asyncio.to_thread(request, address, *args, **kwargs)


def error_of(body: bytes) -> dict:
    doc = json.loads(body)
    assert set(doc) >= {'error', 'message'}
    return doc


@contextlib.asynccontextmanager
async def serving(flow, **options):
    options.setdefault('port', 0)
    front = HttpFront(flow, **options)
    await front.start()
    try:
        yield front
    finally:
        await front.stop(grace_sec=5)
    assert not [t for t in os.listdir('/proc/self/task') if _thread_name(t) == 'aqueduct-http']


def _thread_name(tid: str) -> str:
    try:
        with open(f'/proc/self/task/{tid}/comm') as f:
            return f.read().strip()
    except OSError:
        return ''


@pytest.fixture
def start_method() -> str:
    """Forked workers, unless a test asks for more: the Gate's events are inherited."""
    return 'fork'


class Pipes:
    """The test's side of a :class:`Gate`: ``entered()`` waits for a worker to hold a batch and
    returns its pid; ``release()`` lets every batch, now and later, through."""

    def __init__(self):
        self.entered_r, self.entered_w = os.pipe()
        self.release_r, self.release_w = os.pipe()

    def handler(self) -> Gate:
        return Gate(self.entered_w, self.release_r)

    def wait_entered(self) -> int:
        ready, _, _ = select.select([self.entered_r], [], [], 10)
        assert ready, 'no worker took the request'
        return int(os.read(self.entered_r, 64).split()[0])

    async def entered(self) -> int:
        return await asyncio.to_thread(self.wait_entered)

    def release(self) -> None:
        os.write(self.release_w, b'x')

    def close(self) -> None:
        for fd in (self.entered_r, self.entered_w, self.release_r, self.release_w):
            os.close(fd)


@pytest.fixture
def gate():
    pipes = Pipes()
    yield pipes
    pipes.close()


@pytest.mark.parametrize('start_method', ['fork', 'spawn'])
async def test_routes_enter_their_steps_with_the_request_fields(make_flow):
    flow = make_flow(FlowStep(Digest()), FlowStep(Report()))
    async with serving(flow, routes={'/both': 0, '/second': 'step2_Report'}) as front:
        status, headers, body = await call(front.address, path='/both?q=1', body=b'abc')
        assert status == 200 and headers['content-type'] == 'application/json'
        assert json.loads(body) == {'digest': hashlib.sha256(b'abc').hexdigest(), 'size': 3}
        # A route enters its step directly: the first step never saw this one.
        status, _, body = await call(front.address, path='/second', body=b'abc')
        assert status == 200 and json.loads(body) == {'digest': None, 'size': None}
        status, _, body = await call(front.address, path='/elsewhere')
        assert status == 404 and error_of(body)['error'] == 'not_found'
        assert front.responses() == {200: 2, 404: 1}


async def test_request_fields(make_flow):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow, routes={'/d': 0}) as front:
        conn = http.client.HTTPConnection(*front.address, timeout=10)
        conn.putrequest('PUT', '/d?a=1&b=%20')
        conn.putheader('X-Twice', 'one')
        conn.putheader('X-Twice', 'two')
        conn.putheader('X-Latin', b'caf\xe9')  # not UTF-8: read as Latin-1
        conn.putheader('Content-Length', '4')
        conn.endheaders(b'\xffab\x00')
        response = conn.getresponse()
        doc = json.loads(response.read())
        conn.close()
        assert response.status == 200
        assert doc['method'] == 'PUT' and doc['path'] == '/d' and doc['query'] == 'a=1&b=%20'
        assert doc['headers']['x-twice'] == 'one, two'
        assert doc['headers']['x-latin'] == 'caf\u00e9'
        assert doc['body'] == '\xffab\x00'


async def test_response_kinds(make_flow):
    flow = make_flow(FlowStep(Describe()))
    routes = {f'/{k}': 0 for k in ('bytes', 'text', 'none', 'numpy', 'created')}
    async with serving(flow, routes=routes) as front:
        status, headers, body = await call(front.address, path='/bytes')
        assert (status, headers['content-type'], body) == (200, 'application/octet-stream', b'\x00raw')
        status, headers, body = await call(front.address, path='/text')
        assert (status, headers['content-type'], body) == (200, 'text/plain; charset=utf-8', 'h\u00e9llo'.encode())
        status, headers, body = await call(front.address, path='/none')
        assert (status, body) == (204, b'')
        status, _, body = await call(front.address, path='/numpy')
        assert json.loads(body) == {'vector': [0.0, 1.0, 2.0]}
        status, headers, body = await call(front.address, path='/created')
        assert (status, headers['location'], headers['content-type'], body) == (
            201, '/things/1', 'application/x-thing', b'{}'
        )  # fmt: skip


@pytest.mark.parametrize(
    'kind, says',
    [
        ('raise', "builtins.ValueError: cannot handle b'x'"),
        ('nan', 'not valid JSON'),
        ('status600', 'not an HTTP status'),
        ('statusbool', 'status is not an int'),
        ('status101', 'not an HTTP status'),
        ('framing', 'content-length is the front'),
        ('crlf', 'not valid HTTP'),
        ('header_not_str', 'must be str'),
        ('object', 'not JSON-serialisable'),
    ],
)
async def test_what_a_handler_gets_wrong_is_a_500_naming_it(make_flow, kind, says):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow, routes={f'/{kind}': 0, '/ok': 0}) as front:
        status, headers, body = await call(front.address, path=f'/{kind}', body=b'x')
        assert status == 500, body
        doc = error_of(body)
        assert says in doc['message'] and 'set-cookie' not in {h.lower() for h in headers}
        if kind == 'raise':
            assert doc['error'] == 'handler_error' and doc['step'] == 'step1_Describe'
        # and the front goes on serving
        assert (await call(front.address, path='/ok'))[0] == 200


async def test_body_limits(make_flow):
    flow = make_flow(FlowStep(Digest()), FlowStep(Report()))
    async with serving(flow, max_body_bytes=1000) as front:
        status, _, body = await call(front.address, body=b'x' * 1000)
        assert status == 200 and json.loads(body)['size'] == 1000
        status, _, body = await call(front.address, body=b'x' * 1001)
        assert status == 413 and error_of(body)['error'] == 'body_too_large'
        # Refused from Content-Length alone, before any of the body is sent.
        with socket.create_connection(front.address, timeout=10) as s:
            s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n')
            assert s.recv(100).startswith(b'HTTP/1.1 413')

        # A chunked body found too large while it is read.
        def chunked():
            conn = http.client.HTTPConnection(*front.address, timeout=10)
            conn.request('POST', '/', body=iter([b'y' * 600, b'y' * 600]), encode_chunked=True)
            response = conn.getresponse()
            out = response.status, response.read()
            conn.close()
            return out

        status, body = await asyncio.to_thread(chunked)
        assert status == 413


async def test_a_megabyte_through_two_steps(make_flow):
    flow = make_flow(FlowStep(Digest()), FlowStep(Report()))
    image = os.urandom(1 << 20)
    async with serving(flow) as front:
        results = await asyncio.gather(*(call(front.address, body=image) for _ in range(8)))
    for status, _, body in results:
        assert status == 200 and json.loads(body) == {'digest': hashlib.sha256(image).hexdigest(), 'size': 1 << 20}


async def test_max_in_flight_answers_503_then_serves_again(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    async with serving(flow, max_in_flight=1) as front:
        held = asyncio.ensure_future(call(front.address))
        await gate.entered()
        status, headers, body = await call(front.address)
        assert status == 503 and headers['retry-after'] == '1' and error_of(body)['error'] == 'busy'
        gate.release()
        assert (await held)[0] == 200
        assert (await call(front.address))[0] == 200


async def test_deadline_in_the_flow_is_a_504(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    async with serving(flow, timeout_sec=0.5) as front:
        status, _, body = await call(front.address)
        assert status == 504 and error_of(body)['error'] == 'timeout'
        gate.release()
        assert (await call(front.address))[0] == 200


async def test_a_worker_killed_mid_request_is_a_503_and_is_replaced(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    async with serving(flow) as front:
        held = asyncio.ensure_future(call(front.address))
        killed = await gate.entered()
        os.kill(killed, signal.SIGKILL)
        status, headers, body = await held
        assert status == 503 and error_of(body)['error'] == 'worker_died' and headers['retry-after'] == '1'
        # The replacement was started by the event loop from the events the front forwarded.
        gate.release()
        status, _, body = await call(front.address)
        assert status == 200 and await gate.entered() != killed
        assert flow.health()['steps'][0]['restarts'] == 1


async def test_slow_and_vanishing_clients(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    async with serving(flow, timeout_sec=1.0, client_timeout_sec=0.5) as front:

        def headers_never_finish():
            with socket.create_connection(front.address, timeout=10) as s:
                s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\n')
                return s.recv(200)  # the front closes the connection (or answers 408)

        got = await asyncio.to_thread(headers_never_finish)
        assert got == b'' or got.startswith(b'HTTP/1.1 408')

        def body_never_finishes():
            with socket.create_connection(front.address, timeout=10) as s:
                s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab')
                return s.recv(200)

        got = await asyncio.to_thread(body_never_finishes)
        assert got.startswith(b'HTTP/1.1 408'), got

        def hang_up_mid_request():
            with socket.create_connection(front.address, timeout=10) as s:
                s.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n')
                gate.wait_entered()

        await asyncio.to_thread(hang_up_mid_request)
        gate.release()
        assert (await call(front.address))[0] == 200
    assert flow._live().pending == 0


async def test_a_client_that_does_not_read_its_response_is_disconnected(make_flow):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow, routes={'/big': 0, '/ok': 0}, max_connections=1, client_timeout_sec=0.5) as front:
        with socket.create_connection(front.address, timeout=10) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.sendall(b'POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n')
            # It never reads the 32 MiB: the front gives up on it and serves the next client,
            # which would otherwise wait for ever behind max_connections=1.
            status, _, body = await call(front.address, path='/ok')
            assert status == 200


async def test_one_front_per_flow(make_flow):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow) as front:
        with pytest.raises(RuntimeError, match='another HttpFront'):
            await HttpFront(flow, port=0).start()
        with pytest.raises(RuntimeError, match='served by an HTTP front already'):
            from aqueduct import _core

            _core.HttpServer(flow._live(), '127.0.0.1', 0, [('/', 0)], lambda kind: (200, '', b''))
        assert (await call(front.address))[0] == 200
    # once it stopped, another may serve the flow
    async with serving(flow) as again:
        assert (await call(again.address))[0] == 200


async def test_stopping_the_flow_answers_every_python_caller_beside_the_front(make_flow):
    """Outcomes the front's poller collected for Python callers reach them even when the flow
    stops at that moment (they were once lost between the poller and the stop)."""
    for _ in range(10):
        flow = make_flow(FlowStep(Describe(), nprocs=2))
        async with serving(flow):

            async def caller(flow=flow):
                while True:
                    try:
                        await flow.process(Request(b'x'), timeout_sec=10)
                    except Exception as exc:  # the stop: NotRunningError or FlowError
                        return type(exc).__name__

            callers = [asyncio.ensure_future(caller()) for _ in range(64)]
            await asyncio.sleep(0.05)  # let them run a little while
            await flow.stop(graceful=False)
            done, pending = await asyncio.wait(callers, timeout=10)
            assert not pending, f'{len(pending)} callers never answered'


async def test_python_callers_beside_the_front(make_flow):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow) as front:
        tasks = [Request(str(i).encode(), path='/any') for i in range(50)]
        results = await asyncio.gather(
            *(flow.process(t) for t in tasks), *(call(front.address, body=f'h{i}'.encode()) for i in range(50))
        )
        assert all(r is True for r in results[:50])
        assert [json.loads(t.reply_body)['body'] for t in tasks] == [str(i) for i in range(50)]
        assert [json.loads(r[2])['body'] for r in results[50:]] == [f'h{i}' for i in range(50)]
    # after the front: the event loop polls again
    task = Request(b'after')
    await flow.process(task)
    assert task.status == 200 and json.loads(task.reply_body)['body'] == 'after'


async def test_graceful_stop_drains_and_refuses_new_connections(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    front = HttpFront(flow, port=0)
    await front.start()
    address = front.address
    held = asyncio.ensure_future(call(address))
    await gate.entered()
    stopping = asyncio.ensure_future(front.stop(grace_sec=20))
    await asyncio.sleep(0)  # a yield: the stop task runs up to its first await, shutdown() included
    # The listener closes on the front's own thread, which has no event to wait on from here:
    # the test polls what a client sees, for at most 2 s.
    for _ in range(100):
        try:
            socket.create_connection(address, timeout=1).close()
        except ConnectionRefusedError:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail('the front kept accepting connections after stop()')
    gate.release()
    assert (await held)[0] == 200
    await stopping


async def test_stop_past_the_grace_closes_and_cancels(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    front = HttpFront(flow, port=0)
    await front.start()
    held = asyncio.ensure_future(call(front.address))
    await gate.entered()
    await front.stop(grace_sec=0.2)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        await held
    assert flow._live().pending == 0  # the call was cancelled in the driver
    gate.release()


async def test_flow_stop_answers_every_request(make_flow, gate):
    flow = make_flow(FlowStep(gate.handler()))
    async with serving(flow) as front:
        held = asyncio.ensure_future(call(front.address))
        await gate.entered()
        await flow.stop(graceful=False)
        status, _, body = await held
        assert status == 503 and error_of(body)['error'] == 'not_running'
        status, _, body = await call(front.address)
        assert status == 503
    gate.release()


async def test_healthz_and_metrics(make_flow):
    flow = make_flow(FlowStep(Describe()))
    async with serving(flow) as front:
        await call(front.address, path='/')
        status, headers, body = await call(front.address, method='GET', path='/healthz')
        assert status == 200 and json.loads(body)['flow']['ready'] is True
        status, headers, body = await call(front.address, method='GET', path='/metrics')
        assert status == 200 and headers['content-type'].startswith('text/plain')
        assert b'aqueduct_http_responses_total{code="200"} 2.0' in body
        assert b'aqueduct_processes_alive{flow="flow",step="step1_Describe"} 1.0' in body


async def test_bad_arguments_are_named(make_flow):
    flow = make_flow(FlowStep(Describe()))
    with pytest.raises(ValueError, match='no step named'):
        HttpFront(flow, routes={'/': 'nope'})
    with pytest.raises(ValueError, match="starting with '/'"):
        HttpFront(flow, routes={'x': 0})
    with pytest.raises(ValueError, match='index below 1'):
        HttpFront(flow, routes={'/': 1})
    with pytest.raises(ValueError, match='timeout_sec'):
        HttpFront(flow, timeout_sec=float('nan'))
    with pytest.raises(ValueError, match='max_in_flight'):
        HttpFront(flow, max_in_flight=0)
    with pytest.raises(TypeError, match='port must be an int'):
        HttpFront(flow, port='80')
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        with pytest.raises(OSError, match='cannot listen on'):
            await HttpFront(flow, port=taken.getsockname()[1]).start()
    async with serving(flow) as front:  # the failed one left nothing claimed
        with pytest.raises(RuntimeError, match='already started'):
            await front.start()
        assert (await call(front.address))[0] == 200


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def served_from_the_command_line(target: str, *options: str, cwd: str = ROOT):
    """``python -m aqueduct serve target --http 127.0.0.1:0 ...`` running; yields its address.
    SIGTERM at the end must stop it cleanly, leaving no process behind."""
    proc = subprocess.Popen(
        [sys.executable, '-m', 'aqueduct', 'serve', target, '--http', '127.0.0.1:0', *options],
        stdout=subprocess.PIPE, text=True, cwd=cwd,
        env={**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))},
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith('listening on http://127.0.0.1:'), line
        yield ('127.0.0.1', int(line.rsplit(':', 1)[1]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
    assert children() == []


def test_serve_http_from_the_command_line():
    with served_from_the_command_line('tests.http_handlers:build_flow', '--route', '/describe=0') as address:
        status, _, body = request(address, path='/describe', body=b'cli')
        assert status == 200 and json.loads(body)['body'] == 'cli'


def test_the_example_service():
    sys.path.insert(0, os.path.join(ROOT, 'examples'))
    try:
        from pipeline import sample_image
    finally:
        sys.path.pop(0)
    examples = os.path.join(ROOT, 'examples', 'http')
    with served_from_the_command_line('service:build_flow', '--route', '/classify=0', cwd=examples) as address:
        status, _, body = request(address, path='/classify', body=sample_image())
        assert status == 200, body
        top5 = json.loads(body)['top5']
        assert len(top5) == 5 and all(0 <= c < 1000 for c, _ in top5)
        status, _, body = request(address, path='/classify', body=b'not an image')
        assert status == 400 and 'not an H x W x 3' in json.loads(body)['error']
        status, _, body = request(address, method='GET', path='/healthz')
        assert status == 200
