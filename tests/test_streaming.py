"""Streaming (``Flow.stream``, ``aqueduct.emit``, generator handlers): parts in order and then the
final state, batches of streams, big arrays as parts, ``process()`` of a streaming step, faults
after the parts delivered (a handler exception, a worker SIGKILLed), the deadline and the idle
limit, cancellation by leaving the loop, backpressure on a slow consumer, any step streaming."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from aqueduct import FlowStep, emit
from aqueduct.exceptions import HandlerError, TaskTimeoutError, WorkerDiedError
from aqueduct.streaming import STREAM_WINDOW

from .conftest import until
from .stream_handlers import Arrays, BigText, Counter, Finish, Job, Stall, emit_outside_a_handler

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start_method() -> str:
    return 'fork'


async def collect(flow, task, **kwargs) -> list:
    return [part async for part in flow.stream(task, **kwargs)]


@pytest.mark.parametrize('start_method', ['fork', 'spawn'])
async def test_parts_arrive_in_order_then_the_final_state(make_flow):
    flow = make_flow(FlowStep(Counter()))
    task = Job(parts=5)
    parts = await collect(flow, task)
    assert [p['i'] for p in parts] == [0, 1, 2, 3, 4]
    assert task.result == '5 parts' and task.sent == 5


async def test_a_batch_streams_one_stream_per_task(make_flow):
    flow = make_flow(FlowStep(Counter(), batch_size=4, batch_timeout=0.2))
    tasks = [Job(parts=n) for n in (2, 7, 4, 1)]
    results = await asyncio.gather(*(collect(flow, t) for t in tasks))
    assert [[p['i'] for p in parts] for parts in results] == [list(range(n)) for n in (2, 7, 4, 1)]
    assert len({p['pid'] for parts in results for p in parts}) == 1, 'one worker, one batch'
    assert [t.result for t in tasks] == ['2 parts', '7 parts', '4 parts', '1 parts']


async def test_big_arrays_travel_as_parts(make_flow):
    flow = make_flow(FlowStep(Arrays()))
    task = Job(parts=12)  # more than the window: the worker waits for the consumer in between
    seen = []
    async for array in flow.stream(task, timeout_sec=30):
        assert array.shape == (1 << 18,) and array.dtype.name == 'float32'
        seen.append(int(array[0]))
        assert (array == array[0]).all()
    assert seen == list(range(12)) and task.result == 'arrays'


async def test_parts_larger_than_a_ring_record_travel_through_the_pool(make_flow):
    from aqueduct import shm

    flow = make_flow(FlowStep(BigText()))
    before = shm.stats()['used']  # the pool is the process's: earlier tests may hold some of it
    parts = await collect(flow, Job(parts=12), timeout_sec=30)
    assert [(len(p), p[:1]) for p in parts] == [(2 << 20, chr(ord('a') + i)) for i in range(12)]
    del parts
    assert shm.stats()['used'] <= before, 'every part given back to the pool'


async def test_process_of_a_streaming_step_returns_the_final_result(make_flow):
    flow = make_flow(FlowStep(Counter()), FlowStep(Arrays()))
    task = Job(parts=20)
    assert await flow.process(task, timeout_sec=30)
    assert task.result == 'arrays'


async def test_any_step_streams_to_the_caller_and_the_next_step_sees_the_task(make_flow):
    flow = make_flow(FlowStep(Counter()), FlowStep(Finish()))
    task = Job(parts=3)
    parts = await collect(flow, task)
    assert [p['i'] for p in parts] == [0, 1, 2]
    assert task.result == 'finished after 3 parts'


async def test_a_handler_exception_raises_after_the_parts_delivered(make_flow):
    flow = make_flow(FlowStep(Counter()))
    got = []
    with pytest.raises(HandlerError) as info:
        async for part in flow.stream(Job(parts=5, mode='raise')):
            got.append(part['i'])
    assert got == [0, 1]
    assert isinstance(info.value, ValueError) and 'part 2 of 5 went wrong' in str(info.value)
    # The flow serves on.
    assert [p['i'] for p in await collect(flow, Job(parts=2))] == [0, 1]


async def test_a_handler_yielding_something_else_fails_naming_it(make_flow):
    flow = make_flow(FlowStep(Counter()))
    with pytest.raises(HandlerError) as info:
        await collect(flow, Job(parts=2, mode='bad_yield'))
    assert isinstance(info.value, TypeError) and '(task, part) pairs' in str(info.value)


def test_emit_outside_a_handler_says_so():
    with pytest.raises(RuntimeError, match='while handle'):
        emit_outside_a_handler()


async def test_a_worker_killed_mid_stream_raises_after_its_parts(make_flow):
    flow = make_flow(FlowStep(Counter()))
    got = []
    with pytest.raises(WorkerDiedError):
        async for part in flow.stream(Job(parts=1000, pause=0.01), timeout_sec=30):
            got.append(part['i'])
            if len(got) == 3:
                os.kill(part['pid'], signal.SIGKILL)
    assert got[:3] == [0, 1, 2]
    assert got == list(range(len(got))), 'parts in order, none lost before the failure'
    # A replacement serves the next stream.
    assert [p['i'] for p in await collect(flow, Job(parts=2), timeout_sec=30)] == [0, 1]


async def test_the_deadline_covers_the_whole_stream(make_flow):
    flow = make_flow(FlowStep(Counter()))
    got = []
    with pytest.raises(TaskTimeoutError):
        async for part in flow.stream(Job(parts=1000, pause=0.02), timeout_sec=0.5):
            got.append(part['i'])
    assert 0 < len(got) < 1000
    # The handler was told and stopped: the next call gets the worker.
    report = Job(mode='report')
    assert await flow.process(report, timeout_sec=10)
    assert report.result['closed'] == 1


async def test_an_idle_stream_times_out(make_flow):
    flow = make_flow(FlowStep(Stall()))
    got = []
    with pytest.raises(TaskTimeoutError, match='idle_timeout_sec'):
        async for part in flow.stream(Job(pause=3), timeout_sec=20, idle_timeout_sec=0.3):
            got.append(part)
    assert got == ['first']


@pytest.mark.parametrize('how', ['break', 'aclose', 'drop'])
async def test_leaving_the_loop_cancels_the_stream_and_the_handler_is_told(make_flow, how):
    flow = make_flow(FlowStep(Counter()))
    stream = flow.stream(Job(parts=10**9), timeout_sec=30)
    async for part in stream:
        if part['i'] == 2:
            break
    if how == 'aclose':
        await stream.aclose()
    elif how == 'drop':
        del stream
    else:
        stream = None  # the loop's iterator goes away with the last reference
    # One worker: this call runs only once the endless generator was closed.
    report = Job(mode='report')
    assert await flow.process(report, timeout_sec=10)
    assert report.result['closed'] == 1


async def test_a_slow_consumer_holds_the_worker_back(make_flow):
    flow = make_flow(FlowStep(Counter()))
    task = Job(parts=100)
    stream = flow.stream(task, timeout_sec=30)
    first = await stream.__anext__()
    assert first['i'] == 0
    # The worker goes on until it is a window ahead; it cannot buffer more than that.
    call = stream._call
    await until(lambda: len(call.parts) >= STREAM_WINDOW)  # no event says "the worker waits"
    assert len(call.parts) == STREAM_WINDOW
    rest = [p['i'] async for p in stream]
    assert rest == list(range(1, 100)) and task.result == '100 parts'


async def test_bad_idle_limits_are_refused(make_flow):
    flow = make_flow(FlowStep(Counter()))
    refused = [(0, ValueError), (-1, ValueError), (float('nan'), ValueError), ('1', TypeError), (True, TypeError)]
    for bad, error in refused:
        with pytest.raises(error):
            flow.stream(Job(), idle_timeout_sec=bad)
    assert [p['i'] async for p in flow.stream(Job(parts=1), idle_timeout_sec=float('inf'))] == [0]


async def test_a_stream_of_a_stopped_flow_raises_in_the_loop(make_flow):
    from aqueduct.exceptions import NotRunningError

    flow = make_flow(FlowStep(Counter()))
    await flow.stop()
    with pytest.raises(NotRunningError):
        await collect(flow, Job())


def test_emit_is_exported():
    import aqueduct

    assert aqueduct.emit is emit


async def test_streams_are_counted_in_the_metrics(make_flow):
    flow = make_flow(FlowStep(Counter()))
    # More parts than the window: while the first is held the worker waits, the call stays open.
    stream = flow.stream(Job(parts=STREAM_WINDOW * 4), timeout_sec=30)
    first = await stream.__anext__()
    assert first['i'] == 0
    step = flow.metrics()['steps'][0]
    assert step['streams_open'] == 1
    rest = [p async for p in stream]
    assert len(rest) == STREAM_WINDOW * 4 - 1
    step = flow.metrics()['steps'][0]
    assert step['streams_open'] == 0 and step['stream_parts'] == STREAM_WINDOW * 4
    buckets, count, total = step['first_part_us']
    assert count == 1 and sum(buckets) == 1 and total > 0
    from aqueduct.metrics.prometheus import FlowCollector

    text = {m.name: m for m in FlowCollector({'f': flow}).collect()}
    assert text['aqueduct_streams_open'].samples[0].value == 0
    assert text['aqueduct_stream_parts'].samples[0].value == STREAM_WINDOW * 4


async def test_a_dropped_stream_is_cancelled_from_the_loop_not_its_finalizer(make_flow):
    # A finalizer can run inside the driver's delivery of parts (under its lock): the cancel
    # must not touch the driver there, only once the loop runs it.
    flow = make_flow(FlowStep(Counter()))
    stream = flow.stream(Job(parts=10**9), timeout_sec=30)
    assert (await stream.__anext__())['i'] == 0
    driver = flow._driver
    assert driver.pending == 1
    del stream
    assert driver.pending == 1, 'not cancelled from the finalizer itself'
    await asyncio.sleep(0)  # one loop iteration: the cancel scheduled by the finalizer runs
    assert driver.pending == 0
    report = Job(mode='report')
    assert await flow.process(report, timeout_sec=10)
    assert report.result['closed'] == 1


async def test_a_second_reader_is_refused_and_the_stream_goes_on(make_flow):
    flow = make_flow(FlowStep(Stall()))
    stream = flow.stream(Job(pause=1), timeout_sec=20)
    got = []

    async def consume():
        async for part in stream:
            got.append(part)

    first = asyncio.ensure_future(consume())
    await until(lambda: got)  # the first reader has its first part and waits for the next
    with pytest.raises(RuntimeError, match='one consumer'):
        await stream.__anext__()
    await first
    assert got == ['first'] and stream._task.result == 'late'
