"""Untrusted HTTP input: a request body cannot reserve more shared memory than the app allows,
nor keep any once its upload fails, and the services say so (413, 503 with ``Retry-After``,
``/healthz``) instead of failing every later request with 500.

The tests drive ``share_value_with_data`` with the cyclic GC off: memory a failed read held must
come back at once, not whenever the collector runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect

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
