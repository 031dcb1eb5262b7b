"""Streams through a port: ``SocketFlow.stream`` in a process that did not start the flow, with
the semantics of ``Flow.stream`` (order, backpressure, cancellation, faults after the parts,
the deadline and the idle limit), and several client processes streaming at once."""

from __future__ import annotations

import asyncio
import os
import signal

import numpy as np
import pytest
from aqueduct import Flow, FlowStep
from aqueduct.exceptions import FlowError, HandlerError, WorkerDiedError
from aqueduct.sockets import SocketFlow, SocketTaskTimeoutError
from aqueduct.streaming import STREAM_WINDOW

from .conftest import until
from .stream_handlers import Arrays, Counter, Job, Stall
from .test_sockets import run_clients

pytestmark = pytest.mark.timeout(90)


async def serving(servers, *steps) -> SocketFlow:
    client = SocketFlow()
    servers.append(client.preload(Flow(*steps), timeout=30))
    await client.start()
    return client


async def test_parts_come_in_order_then_the_final_state(socket_path, servers):
    client = await serving(servers, FlowStep(Counter(), batch_size=4, batch_timeout=0.05))
    try:
        tasks = [Job(parts=20 + n) for n in range(4)]

        async def one(task):
            return [part['i'] async for part in client.stream(task, timeout_sec=30)]

        answers = await asyncio.gather(*(one(task) for task in tasks))
        for n, (task, parts) in enumerate(zip(tasks, answers, strict=True)):
            assert parts == list(range(20 + n))
            assert task.result == f'{20 + n} parts'
        # process() of the same streaming step: the parts are dropped, the result comes.
        plain = Job(parts=5)
        await client.process(plain, timeout_sec=30)
        assert plain.result == '5 parts'
    finally:
        await client.stop()


async def test_megabyte_arrays_through_the_pool(socket_path, servers):
    client = await serving(servers, FlowStep(Arrays()))
    try:
        task = Job(parts=6)
        parts = [part async for part in client.stream(task, timeout_sec=30)]
        assert [(p.nbytes, float(p[0]), float(p[-1])) for p in parts] == [(1 << 20, i, i) for i in range(6)]
        assert all(isinstance(p, np.ndarray) for p in parts) and task.result == 'arrays'
    finally:
        await client.stop()


async def test_a_slow_consumer_holds_the_worker_back(socket_path, servers):
    client = await serving(servers, FlowStep(Counter()))
    try:
        task = Job(parts=100)
        stream = client.stream(task, timeout_sec=30)
        assert (await stream.__anext__())['i'] == 0
        call = stream._call
        await until(lambda: len(call.parts) >= STREAM_WINDOW)  # no event says "the worker waits"
        assert len(call.parts) == STREAM_WINDOW
        assert [p['i'] async for p in stream] == list(range(1, 100))
        assert task.result == '100 parts'
    finally:
        await client.stop()


@pytest.mark.parametrize('how', ['break', 'aclose'])
async def test_leaving_the_loop_cancels_the_task_and_the_handler_is_told(socket_path, servers, how):
    client = await serving(servers, FlowStep(Counter()))
    try:
        stream = client.stream(Job(parts=10**9), timeout_sec=30)
        async for part in stream:
            if part['i'] == 2:
                break
        if how == 'aclose':
            await stream.aclose()
        else:
            stream = None
        # One worker: this call runs only once the endless generator was closed.
        report = Job(mode='report')
        await client.process(report, timeout_sec=10)
        assert report.result['closed'] == 1
    finally:
        await client.stop()


async def test_faults_raise_after_the_parts_already_delivered(socket_path, servers):
    client = await serving(servers, FlowStep(Counter()))
    try:
        got = []
        with pytest.raises(HandlerError, match='part 2 of 5 went wrong') as raised:
            async for part in client.stream(Job(parts=5, mode='raise'), timeout_sec=30):
                got.append(part['i'])
        assert isinstance(raised.value, ValueError)
        assert got == [0, 1]
        got = []
        with pytest.raises(WorkerDiedError):
            async for part in client.stream(Job(parts=10**6, pause=0.001), timeout_sec=30):
                got.append(part['i'])
                if part['i'] == 3:
                    os.kill(part['pid'], signal.SIGKILL)
        assert got[:4] == [0, 1, 2, 3]
        assert [p['i'] async for p in client.stream(Job(parts=2), timeout_sec=30)] == [0, 1]
    finally:
        await client.stop()


async def test_the_deadline_and_the_idle_limit(socket_path, servers):
    client = await serving(servers, FlowStep(Stall(), nprocs=2))  # the first stall holds one
    try:
        got = []
        with pytest.raises(SocketTaskTimeoutError, match='idle_timeout_sec'):
            async for part in client.stream(Job(pause=3), timeout_sec=20, idle_timeout_sec=0.3):
                got.append(part)
        assert got == ['first']
        got = []
        with pytest.raises(SocketTaskTimeoutError):
            async for part in client.stream(Job(pause=3), timeout_sec=0.5):
                got.append(part)
        assert got == ['first']
    finally:
        await client.stop()


async def test_a_server_gone_mid_stream_raises_in_the_loop(socket_path, servers):
    client = await serving(servers, FlowStep(Counter()))
    try:
        with pytest.raises(FlowError):
            async for part in client.stream(Job(parts=10**6, pause=0.001), timeout_sec=30):
                if part['i'] == 2:
                    os.kill(servers[0].pid, signal.SIGKILL)
    finally:
        await client.stop()


def test_several_client_processes_stream_at_once(socket_path, servers):
    flow = Flow(FlowStep(Counter(), nprocs=2, batch_size=8, batch_timeout=0.01))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))

    async def body(i: int) -> None:
        mine = SocketFlow()
        await mine.start()
        try:
            tasks = [Job(parts=30 + i) for _ in range(4)]

            async def one(task):
                return [part['i'] async for part in mine.stream(task, timeout_sec=30)]

            for parts in await asyncio.gather(*(one(t) for t in tasks)):
                assert parts == list(range(30 + i))
        finally:
            await mine.stop()

    assert run_clients(3, body) == [0, 0, 0]
