"""Streaming under faults and misuse (the cases a hostile review tried): cancelling a stream
sent ahead to a busy worker, a slow consumer and the idle limit, parts from a thread the
handler left running, stop() with a worker waiting for room, cancelling some streams of a
batch, many streams, the HTTP front polling beside streams, a worker killed while it waits for
room, process() tasks batched with cancelled streams, executor slots, unpicklable parts,
aclose() from another task, and a stream read from another thread."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aqueduct import FlowStep
from aqueduct.exceptions import FlowError

from .conftest import until
from .stream_fault_handlers import Review, RJob

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def start_method() -> str:
    return 'fork'


def read(path):
    try:
        with open(path) as f:
            return f.read().split('\n')
    except FileNotFoundError:
        return []


async def test_cancelling_a_stream_sent_ahead_tells_its_handler(make_flow, tmp_path):
    """Three endless streams on one worker (batch_size=1: the hub sends B and C ahead of A).
    B cancelled while it waits in the pipeline (too late to take back) is told as soon as it
    begins, so C gets the worker."""
    flow = make_flow(FlowStep(Review()))
    logs = [str(tmp_path / n) for n in 'abc']
    streams = [flow.stream(RJob(log=log, pause=0.001), timeout_sec=30) for log in logs]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    assert await firsts[0] == 0  # A runs, B and C sent ahead
    await until(lambda: flow.health()['steps'][0]['queued'] == 2)  # B and C sent ahead
    await streams[1].aclose()  # B: in the middle of the pipeline
    firsts[1].cancel()
    await streams[0].aclose()  # A: running, told at once
    # C must start soon: B's handler is told as soon as it begins (or B never runs).
    try:
        got = await asyncio.wait_for(firsts[2], 5)
    except TimeoutError:
        pytest.fail(f'C never started; B ran untold: {read(logs[1])[:2]} ... sent >1000 parts: '
                    f'{"told" not in "".join(read(logs[1]))}; A: {read(logs[0])}')
    assert got == 0
    await streams[2].aclose()


async def test_idle_timeout_does_not_fire_at_a_slow_consumer(make_flow):
    """The idle limit is on waiting for a part: a consumer slower than the limit, with parts
    buffered (the worker held back by the window), does not time out."""
    flow = make_flow(FlowStep(Review()))
    got = []
    async for part in flow.stream(RJob(mode='plain', parts=30), timeout_sec=30, idle_timeout_sec=0.5):
        got.append(part)
        await asyncio.sleep(0.6)  # a slow consumer: each part takes it longer than the idle limit
        if len(got) >= 12:
            break
    assert len(got) >= 12


async def test_a_part_emitted_by_a_late_thread_never_reaches_another_caller(make_flow, tmp_path):
    """A thread the handler left running emits for task A after handle() returned and the
    worker moved on to task B: the late part is refused, never given to B's caller."""
    flow = make_flow(FlowStep(Review()))
    a = RJob(mode='thread', pause=0.5, log=str(tmp_path / 'a'))
    b = RJob(mode='plain', parts=3, pause=0.3, log=str(tmp_path / 'b'))
    async def consume(stream):
        return [p async for p in stream]

    pa = asyncio.ensure_future(consume(flow.stream(a, timeout_sec=10)))
    await until(lambda: 'thread started' in read(a.log))  # A first, then B on the same worker
    parts_b = [p async for p in flow.stream(b, timeout_sec=10)]
    await pa
    assert all(p.startswith('plain') for p in parts_b), parts_b


@pytest.mark.parametrize('graceful', [True, False])
async def test_stop_with_a_stalled_consumer_and_a_blocked_worker(make_flow, tmp_path, graceful):
    """A stream whose consumer stopped reading holds its worker in wait_for_room; stop() must
    end within its grace, and the parts buffered before must still read (or raise), not crash."""
    from .stream_fault_handlers import BigArrays

    flow = make_flow(FlowStep(BigArrays()))
    stream = flow.stream(RJob(parts=100), timeout_sec=30)
    first = await stream.__anext__()
    assert int(first[0]) == 0
    await until(lambda: len(stream._call.parts) == 8)  # the worker fills the window and waits
    await asyncio.wait_for(flow.stop(graceful=graceful, grace_sec=2), 10)
    # The parts the consumer had not read yet: their arrays are in the pool of a closed flow.
    seen = []
    with pytest.raises(FlowError):  # the flow stopped before the stream's end
        async for a in stream:
            seen.append(int(a[0]))
    assert seen == list(range(1, 1 + len(seen))) and len(seen) <= 8, seen


async def test_cancelling_one_stream_of_a_batch_lets_the_others_finish(make_flow):
    from .stream_handlers import Counter, Job

    flow = make_flow(FlowStep(Counter(), batch_size=4, batch_timeout=0.3))
    tasks = [Job(parts=60) for _ in range(4)]

    async def consume(i, task):
        got = []
        async for p in flow.stream(task, timeout_sec=30):
            got.append(p['i'])
            if i == 0 and len(got) == 3:
                break
            if i == 1 and len(got) == 20:
                break
        return got

    results = await asyncio.gather(*(consume(i, t) for i, t in enumerate(tasks)))
    assert [len(r) for r in results] == [3, 20, 60, 60]
    assert results[2] == list(range(60)) == results[3]
    assert tasks[2].pid == tasks[3].pid, 'one batch'
    report = Job(mode='report')
    assert await flow.process(report, timeout_sec=10)


async def test_many_streams_do_not_leak(make_flow):
    from .stream_handlers import Counter, Job

    flow = make_flow(FlowStep(Counter(), batch_size=2, batch_timeout=0.01, nprocs=2))
    for _ in range(30):
        streams = [flow.stream(Job(parts=20), timeout_sec=30) for _ in range(6)]

        async def consume(s, n):
            k = 0
            async for _ in s:
                k += 1
                if k == n:
                    await s.aclose()
                    break
            return k

        await asyncio.gather(*(consume(s, n) for s, n in zip(streams, (1, 5, 20, 100, 3, 8), strict=True)))
        del streams
    import gc

    gc.collect()
    assert await flow.process(Job(parts=3), timeout_sec=10)


async def test_streams_while_the_http_front_polls(make_flow):
    from aqueduct.http import HttpFront

    from .stream_handlers import Counter, Job
    flow = make_flow(FlowStep(Counter(), batch_size=2, batch_timeout=0.01))
    front = HttpFront(flow, port=0, routes={'/x': 0})
    await front.start()
    try:
        async def small():
            return [p['i'] async for p in flow.stream(Job(parts=30), timeout_sec=20)]

        results = await asyncio.gather(*(small() for _ in range(8)))
        assert all(r == list(range(30)) for r in results)
        # A consumer that stalls and then cancels, with the front polling.
        s = flow.stream(Job(parts=1000), timeout_sec=20)
        assert (await s.__anext__())['i'] == 0
        await until(lambda: len(s._call.parts) == 8)  # stalled: the worker waits for room
        await s.aclose()
        assert [p['i'] async for p in flow.stream(Job(parts=3), timeout_sec=20)] == [0, 1, 2]
    finally:
        await front.stop(grace_sec=5)


async def test_a_worker_killed_while_waiting_for_room(make_flow):
    import signal

    from .stream_handlers import Counter, Job

    flow = make_flow(FlowStep(Counter()))
    s = flow.stream(Job(parts=1000), timeout_sec=20)
    first = await s.__anext__()
    await until(lambda: len(s._call.parts) == 8)  # window full: the worker waits for room
    os.kill(first['pid'], signal.SIGKILL)
    from aqueduct.exceptions import WorkerDiedError

    got = [first['i']]
    with pytest.raises(WorkerDiedError):
        async for p in s:
            got.append(p['i'])
    assert got == list(range(9))
    # The replacement in the same slot streams with a fresh window.
    parts = [p['i'] async for p in flow.stream(Job(parts=50), timeout_sec=20)]
    assert parts == list(range(50))


async def test_a_process_task_batched_with_a_cancelled_stream_still_completes(make_flow):
    """A process() task batched with a stream whose caller left: the generator is not closed
    while the process() caller waits, so its task completes with the handler's work done."""
    from .stream_handlers import Counter, Job

    flow = make_flow(FlowStep(Counter(), batch_size=2, batch_timeout=0.5))
    plain = Job(parts=50)
    p = asyncio.ensure_future(flow.process(plain, timeout_sec=20))
    s = flow.stream(Job(parts=50), timeout_sec=20)
    async for part in s:
        if part['i'] == 1:
            break
    await s.aclose()
    assert await p
    assert plain.pid and plain.pid == part['pid'], 'one batch'
    assert plain.result == '50 parts', (plain.result, plain.sent)


async def test_streams_on_two_slots_of_a_thread_executor(make_flow):
    """Two executor slots (threads of this process) streaming at once: each emit finds its own
    batch."""
    from .stream_handlers import Counter, Job
    from .test_executor import ThreadExecutor

    flow = make_flow(FlowStep(Counter(), nprocs=2, executor=ThreadExecutor()))

    async def one(n):
        return [p['i'] async for p in flow.stream(Job(parts=n, pause=0.01), timeout_sec=20)]

    results = await asyncio.gather(one(20), one(30), return_exceptions=True)
    assert results == [list(range(20)), list(range(30))], results


async def test_an_unpicklable_part_fails_the_task_and_leaks_no_pool_memory(make_flow):
    from aqueduct import shm
    from aqueduct.exceptions import HandlerError

    from .stream_fault_handlers import BadPart

    flow = make_flow(FlowStep(BadPart()))
    before = shm.stats()
    for _ in range(20):
        with pytest.raises(HandlerError):
            async for _ in flow.stream(RJob(), timeout_sec=10):
                pass
    await until(lambda: shm.stats()['used'] - before['used'] < (8 << 20))


async def test_array_parts_forwarded_by_the_http_front(make_flow):
    from aqueduct import shm
    from aqueduct.http import HttpFront

    from .stream_fault_handlers import BigArrays

    flow = make_flow(FlowStep(BigArrays(), nprocs=2))
    before = shm.stats()['used']  # the pool is the process's: earlier tests may hold some of it
    front = HttpFront(flow, port=0, routes={'/x': 0})
    await front.start()
    try:
        async def one():
            return [int(a[0]) async for a in flow.stream(RJob(parts=15), timeout_sec=20)]

        results = await asyncio.gather(*(one() for _ in range(4)))
        assert all(r == list(range(15)) for r in results)
        stalled = flow.stream(RJob(parts=100), timeout_sec=20)
        await stalled.__anext__()
        await until(lambda: len(stalled._call.parts) == 8)
        await stalled.aclose()
        stalled = None
    finally:
        await front.stop(grace_sec=5)
    import gc

    gc.collect()
    await until(lambda: shm.stats()['used'] <= before)


async def test_aclose_from_another_task_ends_a_pending_anext(make_flow):
    """aclose() from another task while a consumer awaits the next part ends that consumer's
    loop (the driver has forgotten the call: no outcome would come)."""
    from .stream_handlers import Job, Stall

    flow = make_flow(FlowStep(Stall()))
    stream = flow.stream(Job(pause=3), timeout_sec=5)

    got = []

    async def consume():
        async for p in stream:
            got.append(p)

    consumer = asyncio.ensure_future(consume())
    await until(lambda: got == ['first'])  # the consumer has 'first' and waits for more
    await stream.aclose()
    try:
        await asyncio.wait_for(consumer, 8)  # past the call's 5 s deadline
    except TimeoutError:
        pytest.fail('the consumer still waits, 8 s after aclose() and past the deadline')


async def test_two_emitting_threads_in_an_executor_slot_do_not_deadlock(make_flow):
    """An executor's slot whose handler emits from two threads while the window is full: the
    event loop in the same process still gives the room back (no lock is waited for with the
    GIL held)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent('''
        import asyncio, sys
        sys.path.insert(0, %r)
        from aqueduct import Flow, FlowStep
        from tests.stream_fault_handlers import TwoEmitters, RJob
        from tests.test_executor import ThreadExecutor

        async def main():
            flow = Flow(FlowStep(TwoEmitters(), executor=ThreadExecutor()))
            flow.start()
            got = []
            try:
                async for p in flow.stream(RJob(parts=30), timeout_sec=3):
                    got.append(p)
                    await asyncio.sleep(0.05)  # a slow consumer: the window fills
            except Exception as e:
                print('raised', type(e).__name__, e)
            print('got', len(got))
            await flow.stop(graceful=False)
        asyncio.run(main())
    ''') % str(Path(__file__).resolve().parent.parent)
    try:
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail('the main process hung (GIL held while waiting for the worker lock)')
    assert b'got 31' in out.stdout, out.stdout + out.stderr[-2000:]


async def test_stream_from_another_thread_is_refused_cleanly(make_flow):
    from aqueduct.exceptions import FlowError

    from .stream_handlers import Counter, Job

    flow = make_flow(FlowStep(Counter()))
    assert [p['i'] async for p in flow.stream(Job(parts=2))] == [0, 1]

    def other():
        async def go():
            return [p['i'] async for p in flow.stream(Job(parts=2))]

        return asyncio.run(go())

    with pytest.raises(FlowError, match='another thread'):
        await asyncio.wait_for(asyncio.to_thread(other), 10)
    assert [p['i'] async for p in flow.stream(Job(parts=2))] == [0, 1]
