"""Untrusted HTTP input: a request body cannot reserve more shared memory than the app allows,
nor keep any once its upload fails, and the services say so (413, 503 with ``Retry-After``,
``/healthz``) instead of failing every later request with 500.

The unit tests drive ``share_value_with_data`` with the cyclic GC off: memory a failed read held
must come back at once, not whenever the collector runs. The service tests run the example apps
as real servers on an ephemeral port of 127.0.0.1, also with the GC off, and attack them with raw
sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import signal
import socket
import struct
import sys
import textwrap
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator

import pytest
from aqueduct import BaseTask, shm
from aqueduct.exceptions import (
    FlowError,
    LengthRequiredError,
    PayloadLengthError,
    PayloadTimeoutError,
    PayloadTooLargeError,
    SharedMemoryExhaustedError,
)
from aqueduct.integrations import utils
from aqueduct.task import DEFAULT_MAX_PAYLOAD

from .test_integrations import assert_all_gone, sample_image, server_process

MiB = 1 << 20


class Task(BaseTask):
    def __init__(self):
        super().__init__()
        self.body = None


class Stream:
    """``readany()`` over ``chunks``; then ``end``: ``b''`` (the body ends), an exception to
    raise (the client hung up), or ``'stall'`` (waits for ever, like a client that sends nothing
    more). ``reads`` is set once every chunk has been read."""

    def __init__(self, *chunks: bytes, end=b''):
        self.chunks = list(chunks)
        self.end = end
        self.reads = asyncio.Event()
        self.calls = 0

    async def readany(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(0)
        if self.chunks:
            return self.chunks.pop(0)
        self.reads.set()
        if isinstance(self.end, BaseException):
            raise self.end
        if self.end == 'stall':
            await asyncio.Event().wait()
        return self.end


@pytest.fixture
def used():
    """The pool's bytes in use, read with the cyclic GC off for the whole test: whatever is freed
    is freed by reference counting alone. The test must give back every byte it took."""
    enabled = gc.isenabled()
    gc.disable()
    pool = shm.pool()
    before = pool.used_bytes
    try:
        yield lambda: pool.used_bytes - before
        assert pool.used_bytes == before, 'shared memory kept after the test'
    finally:
        if enabled:
            gc.enable()


# ------------------------------------------------------------------ share_value_with_data


def test_the_signature_is_1_15s_with_keyword_only_limits():
    params = inspect.signature(BaseTask.share_value_with_data).parameters
    positional = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ['self', 'field_name', 'content', 'size']
    keyword_only = {p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == {'max_size': DEFAULT_MAX_PAYLOAD, 'timeout': None}
    assert DEFAULT_MAX_PAYLOAD == 1 << 20, "aiohttp's default client_max_size"


async def test_a_body_within_the_limit_is_shared(used):
    data = b'x' * 70_000 + b'y' * 30_000
    t = Task()
    await t.share_value_with_data('body', Stream(data[:70_000], data[70_000:]), len(data), max_size=len(data))
    assert bytes(t.body) == data and used() > 0
    del t
    assert used() == 0


@pytest.mark.parametrize(
    ('size', 'kwargs', 'limit'),
    [
        (DEFAULT_MAX_PAYLOAD + 1, {}, DEFAULT_MAX_PAYLOAD),  # the default refuses what aiohttp would
        (10_001, {'max_size': 10_000}, 10_000),
        (512 * MiB, {'max_size': 64 * MiB}, 64 * MiB),
    ],
)
async def test_a_size_over_the_limit_is_refused_before_anything_is_reserved(size, kwargs, limit, used):
    stream = Stream(b'x' * 100)
    t = Task()
    with pytest.raises(PayloadTooLargeError) as info:
        await t.share_value_with_data('body', stream, size, **kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlowError)
    assert (info.value.size, info.value.max_size) == (size, limit)
    assert f'{size} bytes' in str(info.value) and f'{limit} bytes' in str(info.value)
    assert stream.calls == 0, 'nothing read'
    assert used() == 0 and '_shared_fields' not in t.__dict__ or not t._shared_fields


@pytest.mark.parametrize('size', [-1, 1.5, '100', True, None])
async def test_a_size_that_is_not_a_byte_count_is_refused(size, used):
    stream = Stream(b'x')
    with pytest.raises(ValueError, match='size must be an integer >= 0'):
        await Task().share_value_with_data('body', stream, size)
    assert stream.calls == 0 and used() == 0


@pytest.mark.parametrize('max_size', [-1, 2.0, True, '1'])
async def test_a_limit_that_is_not_a_byte_count_is_refused(max_size, used):
    with pytest.raises(ValueError, match='max_size must be an integer >= 0'):
        await Task().share_value_with_data('body', Stream(b'x'), 1, max_size=max_size)
    assert used() == 0


async def test_an_absurd_size_is_refused_even_without_a_limit(used):
    capacity = shm.pool().capacity
    for size in (capacity + 1, 1 << 70):
        with pytest.raises(PayloadTooLargeError, match='more than the whole shared-memory pool'):
            await Task().share_value_with_data('body', Stream(b'x'), size, max_size=None)
    assert used() == 0


@pytest.mark.parametrize(
    ('chunks', 'size', 'message'),
    [
        ((b'x' * 100_000,), 100_001, 'shorter than size=100001 \\(got 100000 bytes\\)'),
        ((b'x' * 60_000, b'x' * 40_001), 100_000, 'longer than size=100000 \\(got at least 100001 bytes\\)'),
        ((), 100_000, 'shorter than size=100000 \\(got 0 bytes\\)'),  # headers, then nothing
    ],
)
async def test_a_body_shorter_or_longer_than_declared_is_an_error_that_frees_the_memory(chunks, size, message, used):
    t = Task()
    errors = []
    try:
        await t.share_value_with_data('body', Stream(*chunks), size)
    except PayloadLengthError as exc:
        # Kept, with its traceback and the failed call's frame, as aiohttp keeps the error it
        # logs: the memory must be free all the same.
        errors.append(exc)
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    with pytest.raises(PayloadLengthError, match=message):
        raise errors[0]
    assert used() == 0
    assert not t.__dict__.get('_shared_fields')


async def test_a_client_that_hangs_up_mid_body_frees_the_memory_at_once(used):
    t = Task()
    errors = []
    try:
        await t.share_value_with_data('body', Stream(b'x' * 200_000, end=ConnectionResetError('gone')), 900_000)
    except ConnectionResetError as exc:
        errors.append(exc)
    assert errors and errors[0].__traceback__ is not None
    assert used() == 0


async def test_cancelling_the_read_mid_body_frees_the_memory_at_once(used):
    stream = Stream(b'x' * 300_000, end='stall')
    t = Task()
    reading = asyncio.ensure_future(t.share_value_with_data('body', stream, 900_000))
    await stream.reads.wait()
    assert used() >= 900_000, 'reserved once the body started'
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert used() == 0
    del reading


async def test_a_client_that_sends_only_headers_reserves_nothing(used):
    stream = Stream(end='stall')
    reading = asyncio.ensure_future(Task().share_value_with_data('body', stream, 900_000))
    await stream.reads.wait()
    assert used() == 0, 'nothing reserved before the first byte of the body'
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    del reading


async def test_a_body_that_does_not_arrive_in_time_fails_and_frees_the_memory(used):
    stream = Stream(b'x' * 100_000, end='stall')
    with pytest.raises(PayloadTimeoutError, match='did not arrive within 0.2 s \\(100000 of 500000 bytes\\)') as info:
        await Task().share_value_with_data('body', stream, 500_000, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    del info
    assert used() == 0


async def test_a_full_pool_fails_the_read_and_keeps_nothing(used):
    pool = shm.pool()
    hog = []
    with contextlib.suppress(SharedMemoryExhaustedError):
        while True:
            hog.append(pool.alloc(64 * MiB))
    with contextlib.suppress(SharedMemoryExhaustedError):
        while True:
            hog.append(pool.alloc(shm.PAGE_SIZE))
    held = used()
    with pytest.raises(SharedMemoryExhaustedError):
        await Task().share_value_with_data('body', Stream(b'x' * 1000), 1000)
    assert used() == held
    hog.clear()


# ------------------------------------------------------------------ the policy both integrations share


async def test_the_integrations_policy_on_a_request_body(used):
    t = Task()
    with pytest.raises(LengthRequiredError):
        await utils.share_request_body(t, 'body', Stream(b'x'), None, 10)
    with pytest.raises(PayloadLengthError, match='not a number of bytes'):
        await utils.share_request_body(t, 'body', Stream(b'x'), '12abc', 10)
    with pytest.raises(PayloadTooLargeError):
        await utils.share_request_body(t, 'body', Stream(b'x' * 11), '11', 10)
    # No limit of the app's own: 1 MiB, what aiohttp refuses by default.
    assert utils.body_size_limit(None) == utils.MAX_BODY_SIZE_DEFAULT == 1 << 20
    assert utils.body_size_limit(0) is None, "aiohttp's 0: no limit but the pool's"
    with pytest.raises(PayloadTimeoutError):
        await utils.share_request_body(t, 'body', Stream(b'x', end='stall'), 2, 10, timeout=0.1)
    await utils.share_request_body(t, 'body', Stream(b'x' * 10), '10', 10)
    assert bytes(t.body) == b'x' * 10
    del t
    assert used() == 0


async def test_the_fastapi_limit_is_the_integrators_or_the_calls(used):
    from aqueduct.integrations.fastapi import AppIntegrator, share_request_body
    from fastapi import FastAPI
    from starlette.requests import ClientDisconnect, Request

    app = FastAPI()
    AppIntegrator(app, client_max_size=1000)

    def request(size: int, messages: list) -> Request:
        async def receive():
            return messages.pop(0)

        scope = {'type': 'http', 'app': app, 'method': 'POST', 'headers': [(b'content-length', str(size).encode())]}
        return Request(scope, receive)

    body = {'type': 'http.request', 'body': b'x' * 1001, 'more_body': False}
    with pytest.raises(PayloadTooLargeError, match='over the limit of 1000 bytes'):
        await share_request_body(Task(), 'body', request(1001, [body]))
    t = Task()
    await share_request_body(t, 'body', request(1001, [body]), client_max_size=2000)
    assert len(t.body) == 1001
    del t
    # A client that hangs up mid-body: Starlette's ClientDisconnect, answered as an incomplete body.
    partial = {'type': 'http.request', 'body': b'x' * 500, 'more_body': True}
    with pytest.raises(PayloadLengthError, match='closed the connection') as info:
        await share_request_body(Task(), 'body', request(1000, [partial, {'type': 'http.disconnect'}]))
    assert info.value.__cause__ is None and isinstance(info.value.__context__, ClientDisconnect)
    del info
    assert used() == 0


def test_each_refusal_has_its_own_answer():
    answers = {
        LengthRequiredError('no length'): 411,
        PayloadTooLargeError('large', 2, 1): 413,
        PayloadTimeoutError('slow'): 408,
        PayloadLengthError('short'): 400,
        SharedMemoryExhaustedError('full'): 503,
    }
    for exc, status in answers.items():
        assert isinstance(exc, utils.PAYLOAD_ERRORS)
        code, _, headers = utils.http_error(exc)
        assert code == status
        assert ('Retry-After' in headers) == (status == 503)
    assert utils.http_error(FlowError('other')) is None
    assert utils.http_error(ValueError('other')) is None


# ------------------------------------------------------------------ the example services

# The example app served on a socket bound here to port 0 (its port printed for the test), with
# the cyclic GC off, and a pool small enough for a test to fill: 128 MiB, two bodies of the
# example's 64 MiB limit.
LAUNCHERS = {
    'aiohttp': """
        import asyncio, gc, socket, sys
        gc.disable()
        sys.path.insert(0, 'examples/aiohttp')
        from aiohttp import web
        import app as example
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))
        sock.listen(128)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        application = example.create_app()
        print(sock.getsockname()[1], flush=True)
        web.run_app(application, sock=sock, loop=loop, print=None)
    """,
    'fastapi': """
        import gc, socket, sys
        gc.disable()
        sys.path.insert(0, 'examples/fastapi')
        import uvicorn
        import app as example
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))
        sock.listen(128)
        print(sock.getsockname()[1], flush=True)
        uvicorn.Server(uvicorn.Config(example.app, log_level='warning')).run(sockets=[sock])
    """,
}
POOL_SIZE = 128 * MiB
LIMIT = 64 * MiB  # the examples' MAX_IMAGE_BYTES


class Service:
    def __init__(self, port: int):
        self.port = port
        self.base = f'http://127.0.0.1:{port}'

    def get(self, path: str) -> tuple:
        """``(status, headers, body)`` of a GET."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=10) as response:
                return response.status, _lower(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _lower(exc.headers), exc.read()

    def health(self) -> tuple:
        status, _, body = self.get('/healthz')
        return status, json.loads(body)

    def used(self) -> int:
        return self.health()[1]['shared_memory']['used']

    def classify(self, image: bytes) -> tuple:
        """``(status, headers, body)`` of a POST of ``image``, on a connection of its own."""
        request = urllib.request.Request(self.base + '/classify', data=image, method='POST')
        request.add_header('Content-Type', 'application/octet-stream')
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, _lower(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _lower(exc.headers), exc.read()

    @contextlib.contextmanager
    def upload(self, declared: int, body: bytes = b'', headers: str = '') -> Iterator[socket.socket]:
        """A raw connection that sends a POST's headers declaring ``declared`` bytes, then
        ``body``; closed on exit (the client hangs up)."""
        sock = socket.create_connection(('127.0.0.1', self.port), timeout=20)
        try:
            length = f'Content-Length: {declared}\r\n' if declared is not None else ''
            head = f'POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n{length}{headers}\r\n'
            sock.sendall(head.encode() + body)
            yield sock
        finally:
            sock.close()


def _lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def status_line(sock: socket.socket) -> tuple:
    """``(status, headers)`` of the response the server sends on ``sock``."""
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = sock.recv(65536)
        assert chunk, f'the server closed the connection without an answer: {data!r}'
        data += chunk
    head = data.split(b'\r\n\r\n', 1)[0].decode('latin-1').split('\r\n')
    return int(head[0].split()[1]), _lower(dict(line.split(': ', 1) for line in head[1:]))


def reset(sock: socket.socket) -> None:
    """Makes the coming close() a TCP reset, as a client that crashes mid-upload."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Polls ``condition`` (the server's state, which only its HTTP answers show) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'{what}: not within {timeout} s'
        time.sleep(0.02)


@pytest.fixture(scope='module', params=['aiohttp', 'fastapi'])
def service(request, tmp_path_factory) -> Iterator[Service]:
    """An example service; at the end it must stop on SIGTERM and leave no process behind."""
    script = tmp_path_factory.mktemp(request.param) / 'serve.py'
    script.write_text(textwrap.dedent(LAUNCHERS[request.param]))
    env = {'AQUEDUCT_SHM_POOL_SIZE': str(POOL_SIZE)}
    with server_process([sys.executable, str(script)], env=env) as server:
        yield Service(server.port)
        processes = server.family()
        server.proc.send_signal(signal.SIGTERM)
        code, log = server.wait_exit()
        # aiohttp exits with 0; uvicorn shuts down gracefully, then re-raises the signal it got.
        assert code in (0, -signal.SIGTERM), f'exit code {code}: {log[-3000:]}'
        assert 'Traceback' not in log, f'an error answered 500: {log[-3000:]}'
        assert_all_gone(processes)


@pytest.fixture
def image() -> bytes:
    return sample_image(256, 256, seed=3)


def baseline(service: Service) -> int:
    status, report = service.health()
    assert status == 200, report
    return report['shared_memory']['used']


@pytest.mark.timeout(120)
def test_two_clients_that_declare_512_mib_and_hang_up_do_not_take_the_service_down(service, image):
    before = baseline(service)
    for _ in range(2):
        with service.upload(512 * MiB) as sock:
            status, _ = status_line(sock)
            assert status == 413
            assert service.used() == before, 'nothing reserved for a body over the limit'
    status, _, body = service.classify(image)
    assert status == 200, body
    assert len(json.loads(body)['top5']) == 5
    assert service.health()[0] == 200 and service.used() == before


@pytest.mark.timeout(120)
def test_two_clients_that_hang_up_mid_body_give_their_memory_back_at_once(service, image):
    before = baseline(service)
    declared = 60 * MiB  # within the limit: the server accepts the upload and starts reading it
    with service.upload(declared, b'\0' * (256 << 10)), service.upload(declared, b'\0' * 1000) as second:
        wait_for(lambda: service.used() >= before + 2 * declared, 'both uploads reserved their memory')
        reset(second)  # one hangs up cleanly (FIN), the other crashes (RST)
    # The server runs with the cyclic GC off: only a read that frees its memory when it fails
    # gives it back.
    wait_for(lambda: service.used() == before, 'the memory of the aborted uploads freed')
    status, _, body = service.classify(image)
    assert status == 200, body
    assert service.used() == before


@pytest.mark.timeout(120)
def test_a_body_over_the_limit_gets_413_and_reserves_nothing(service):
    before = baseline(service)
    with service.upload(LIMIT + 1) as sock:
        status, _ = status_line(sock)
        assert status == 413
    assert service.used() == before
    with service.upload(None, b'5\r\nhello\r\n0\r\n\r\n', 'Transfer-Encoding: chunked\r\n') as sock:
        status, _ = status_line(sock)
        assert status == 411, 'a body of no declared size'
    assert service.used() == before


@pytest.mark.timeout(120)
def test_a_full_pool_gets_503_with_retry_after_and_healthz_says_not_ready(service, image):
    before = baseline(service)
    capacity = service.health()[1]['shared_memory']['capacity']
    assert capacity == POOL_SIZE
    # Two uploads in progress hold all but about 100 KiB of the pool: less than the image needs.
    first = LIMIT - 1000
    second = capacity - before - first - (100 << 10)
    with service.upload(first, b'\0' * 1000), service.upload(second, b'\0' * 1000):
        wait_for(lambda: service.used() >= before + first + second, 'both uploads reserved their memory')
        status, report = service.health()
        assert status == 503, 'not ready: the pool is nearly full'
        pool = report['shared_memory']
        assert pool['ready'] is False and pool['ratio'] > utils.SHM_NOT_READY_RATIO == pool['not_ready_ratio']
        assert all(r['ready'] for name, r in report.items() if name != 'shared_memory'), 'the flow itself is fine'
        status, headers, body = service.classify(image)
        assert status == 503, body
        assert headers['retry-after'] == str(utils.RETRY_AFTER_SECONDS)
    wait_for(lambda: service.used() == before, 'the memory of the aborted uploads freed')
    assert service.health()[0] == 200
    assert service.classify(image)[0] == 200


@pytest.mark.timeout(120)
def test_healthz_shows_the_pool_figures(service):
    status, report = service.health()
    assert status == 200
    pool = report['shared_memory']
    assert pool['capacity'] == POOL_SIZE and 0 <= pool['used'] < POOL_SIZE
    assert pool['ratio'] == pytest.approx(pool['used'] / pool['capacity'])
    assert pool['ready'] is True and pool['not_ready_ratio'] == utils.SHM_NOT_READY_RATIO
    assert report['flow']['ready'] is True


@pytest.mark.timeout(120)
def test_a_body_the_handlers_refuse_gets_400_and_gives_its_memory_back(service):
    before = baseline(service)
    status, _, body = service.classify(b'not an image' * 20_000)  # 240 kB, read into the pool
    assert status == 400, body
    assert service.used() == before
