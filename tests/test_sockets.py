"""One flow shared by several processes: SocketFlow clients attached to a flow server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from aqueduct import Flow, FlowState, FlowStep, shm
from aqueduct.exceptions import (
    FlowError,
    HandlerError,
    NotRunningError,
    TaskSerializationError,
    TaskTimeoutError,
    WorkerDiedError,
)
from aqueduct.sockets import SocketFlow, SocketTaskTimeoutError

from .conftest import python_script
from .handlers import Add, ArrayTask, Die, Double, Raise, Sleep, Task, Triple, is_even


def wait_until(condition, timeout: float = 10.0, what: str = 'condition') -> None:
    """For state another process changes without telling this one (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.01)


async def eventually(condition, timeout: float = 10.0, what: str = 'condition') -> None:
    """``wait_until`` that lets this process's event loop run meanwhile (completed futures keep
    their results, pool buffers included, until the loop has run their callbacks)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        await asyncio.sleep(0.01)


def run_clients(count: int, body) -> list:
    """Forks ``count`` client processes, each running ``asyncio.run(body(i))``; returns their
    exit codes (0: every assertion of ``body`` held)."""
    pids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:  # a web worker
            code = 1
            try:
                asyncio.events._set_running_loop(None)  # forked from inside pytest's loop
                asyncio.run(body(i))
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes


async def test_tasks_round_trip_through_the_flow_server(socket_path, servers):
    flow = Flow(FlowStep(Add(10)), FlowStep(Double(), handle_condition=is_even))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))
    await client.start()
    try:
        tasks = [Task(x) for x in range(6)]
        assert await client.process(tasks) is True
        assert [t.result for t in tasks] == [(x + 10) * 2 if x % 2 == 0 else x + 10 for x in range(6)]
        single = Task(1)
        await client.process(single)  # a single task is accepted too
        assert single.result == 11
    finally:
        await client.stop()
    with pytest.raises(NotRunningError):
        await client.process([Task(1)])


async def test_failures_reach_the_client_with_the_flows_exceptions(socket_path, servers):
    flow = Flow(FlowStep(Raise()), FlowStep(Sleep(), handle_condition=lambda t: t.x == 7))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))
    await client.start()
    try:
        with pytest.raises(ValueError, match='negative input -3') as info:
            await client.process([Task(-3)])
        assert isinstance(info.value, HandlerError)
        slow = Task(7, sleep=2.0)
        with pytest.raises(SocketTaskTimeoutError) as timeout:
            await client.process([slow], timeout_sec=0.2)
        assert isinstance(timeout.value, TaskTimeoutError) and isinstance(timeout.value, asyncio.TimeoutError)
        # One failure does not hide the others' results.
        batch = [Task(1), Task(-1), Task(2)]
        with pytest.raises(ValueError):
            await client.process(batch)
        assert (batch[0].result, batch[2].result) == (1, 2)
        with pytest.raises(TaskSerializationError):
            await client.process([Task(1, lock=__import__('threading').Lock())])
        with pytest.raises(ValueError, match='priority'):
            await client.process([Task(1, priority=-1)])
        with pytest.raises(ValueError, match='timeout_sec'):
            await client.process([Task(1)], timeout_sec=0)
        after = Task(5)
        await client.process([after])
        assert after.result == 5
    finally:
        await client.stop()


async def test_a_dead_worker_fails_its_task_and_is_replaced(socket_path, servers):
    flow = Flow(FlowStep(Die()))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))
    await client.start()
    try:
        with pytest.raises(WorkerDiedError):
            await client.process([Task(1, die='kill')], timeout_sec=10)
        ok = Task(2)
        await client.process([ok], timeout_sec=10)
        assert ok.result[0] == ok.result[1], 'a fresh worker that ran on_start'
    finally:
        await client.stop()


async def test_shared_arrays_travel_by_reference_and_in_place_changes_come_back(socket_path, servers):
    client = SocketFlow()
    servers.append(client.preload(Flow(FlowStep(Triple())), timeout=30))
    await client.start()
    used_before = shm.stats()['used']

    async def round_trips() -> None:  # its locals (the arrays) are gone when it returns
        task = ArrayTask(np.arange(1_000_000, dtype=np.float64))
        task.share_value('arr')
        view = task.arr
        await client.process([task])
        assert task.was_shared_view, 'the handler saw the shared memory itself'
        assert view[10] == 30.0, "the handler's in-place change is visible in the caller's array"
        plain = ArrayTask(np.ones(500_000))
        await client.process([plain])
        assert plain.arr.sum() == 1_500_000

    try:
        await round_trips()
    finally:
        await client.stop()
    # The worker drops its own view of the last array just after answering.
    await eventually(lambda: shm.stats()['used'] == used_before, what='every shared page to go back to the pool')


def test_several_client_processes_share_one_flow(socket_path, servers):
    flow = Flow(FlowStep(Add(1), nprocs=2), FlowStep(Triple(), handle_condition=lambda t: hasattr(t, 'arr')))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))

    async def web_worker(n: int) -> None:
        await client.start()
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with sem:
                if i % 10 == 0:
                    t = ArrayTask(np.full(50_000, float(i)), x=i)
                    await client.process([t], timeout_sec=30)
                    assert t.arr[0] == 3.0 * i and t.result == i + 1
                else:
                    t = Task(i)
                    await client.process([t], timeout_sec=30)
                    assert t.result == i + 1

        await asyncio.gather(*(one(i) for i in range(1000)))
        await client.stop()

    assert run_clients(3, web_worker) == [0, 0, 0]


def test_a_killed_client_leaves_no_shared_memory_and_others_carry_on(socket_path, servers):
    flow = Flow(FlowStep(Sleep(0.05)))
    client = SocketFlow()
    servers.append(client.preload(flow, timeout=30))
    used_before = shm.stats()['used']
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a web worker with large arrays in flight, killed mid-way

        async def doomed() -> None:
            await client.start()
            tasks = [ArrayTask(np.ones(300_000), x=i) for i in range(20)]
            for t in tasks:
                t.share_value('arr')
            pending = asyncio.ensure_future(client.process(tasks, timeout_sec=30))
            await asyncio.sleep(0)  # one turn of the loop: the tasks are submitted
            os.write(write_end, b'x')
            await pending

        try:
            asyncio.events._set_running_loop(None)
            asyncio.run(doomed())
        finally:
            os._exit(1)
    os.close(write_end)
    assert os.read(read_end, 1) == b'x'
    os.close(read_end)
    assert shm.stats()['used'] > used_before
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    wait_until(lambda: shm.stats()['used'] == used_before, what='the flow server to free the dead client\'s memory')

    async def survivor(n: int) -> None:
        await client.start()
        t = Task(9)
        await client.process([t], timeout_sec=10)
        assert t.result == 9
        await client.stop()

    assert run_clients(1, survivor) == [0]


async def test_a_dead_server_fails_pending_tasks_at_once(socket_path, servers):
    client = SocketFlow()
    server = client.preload(Flow(FlowStep(Sleep())), timeout=30)
    servers.append(server)
    flow_processes = psutil.Process(server.pid).children(recursive=True)
    assert flow_processes, 'the zygote and the worker'
    await client.start()
    slow = asyncio.ensure_future(client.process([Task(1, sleep=30)], timeout_sec=60))
    await asyncio.sleep(0)  # one turn of the loop: the task is submitted
    os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(FlowError, match='flow server .* has gone'):
        await asyncio.wait_for(slow, 10)
    with pytest.raises(NotRunningError):
        await client.process([Task(1)])
    server.join(10)
    gone, alive = psutil.wait_procs(flow_processes, timeout=10)
    assert alive == [], 'the workers die with their server'


async def test_an_initialized_flow_is_handed_over_to_the_server(socket_path, servers):
    flow = Flow(FlowStep(Add(5)))
    flow.init_processes(timeout=30)
    assert flow.are_steps_initialized
    client = SocketFlow()
    servers.append(client.preload(flow))
    assert flow.state is FlowState.STOPPED, 'this process no longer drives the flow'
    await client.start()
    try:
        t = Task(1)
        await client.process([t])
        assert t.result == 6
    finally:
        await client.stop()


async def test_a_full_queue_and_full_rings_hold_tasks_back_without_losing_any(socket_path, servers):
    client = SocketFlow()
    servers.append(client.preload(Flow(FlowStep(Add(1)), FlowStep(Double()), queue_size=4), timeout=30))
    await client.start()
    try:
        tasks = [Task(i) for i in range(20_000)]  # far more than the queues and the rings hold
        await asyncio.gather(*(client.process([t], timeout_sec=60) for t in tasks))
        assert [t.result for t in tasks] == [(i + 1) * 2 for i in range(20_000)]
    finally:
        await client.stop()


async def test_a_standalone_server_serves_processes_it_did_not_fork(socket_path):
    server = subprocess.Popen(
        [sys.executable, '-m', 'aqueduct', 'serve', 'tests.handlers:build_shared_flow', '--socket', socket_path],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        client = SocketFlow()
        await client.start()  # retries until the server is up
        try:
            tasks = [Task(x) for x in range(4)]
            await client.process(tasks)
            assert [t.result for t in tasks] == [20, 11, 24, 13]
        finally:
            await client.stop()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert not os.path.exists(socket_path), 'the server removed its socket'
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


async def test_a_second_sigterm_hurries_the_server_out_and_it_still_cleans_up(socket_path, tmp_path):
    """Two SIGTERMs while a task holds the server up: the second one makes it stop at once, with
    exit status 0 and its sockets removed (it exited 143 half-way and left them)."""
    server = subprocess.Popen(
        [sys.executable, '-m', 'aqueduct', 'serve', 'tests.handlers:build_blocking_flow', '--socket', socket_path],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = SocketFlow()
        await client.start()
        try:
            task = Task(1, started=str(tmp_path / 'started'), release=str(tmp_path / 'never'))
            call = asyncio.ensure_future(client.process(task, timeout_sec=60))
            await eventually(lambda: os.path.exists(task.started), 30, 'the handler to start')
            server.send_signal(signal.SIGTERM)
            # The first signal only starts the drain: the server waits for its client.
            await eventually(lambda: not os.path.exists(socket_path), 30, 'the listener to close')
            assert server.poll() is None
            server.send_signal(signal.SIGTERM)
            with pytest.raises(FlowError):
                await asyncio.wait_for(call, 30)
        finally:
            await client.stop()
        assert await asyncio.get_running_loop().run_in_executor(None, server.wait, 30) == 0
        log = server.stderr.read()
        stats = re.search(r'Flow stats at (\S+)', log)
        assert stats, log
        assert not os.path.exists(stats.group(1)), 'the stats socket was removed'
        assert not os.path.exists(socket_path)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stderr.close()


def _remote_client() -> str:
    """The Rust API's example client (`crates/aqueduct/examples/remote_client.rs`), built now."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        ['cargo', 'build', '--quiet', '-p', 'aqueduct', '--example', 'remote_client'],
        cwd=root,
        check=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    return os.path.join(root, 'target', 'debug', 'examples', 'remote_client')


async def test_the_rust_api_submits_into_a_flow_served_by_python(socket_path, servers):
    """The handshake is binary and JSON and the tasks travel as the codec's bytes: a Rust program
    (`aqueduct::RemoteFlow`) submits into this Python flow, errors included, and the flow server
    never unpickles anything on the way."""
    client = await asyncio.to_thread(_remote_client)
    flow = Flow(FlowStep(Raise()), FlowStep(Add(100)))
    servers.append(SocketFlow().preload(flow, timeout=30))
    args = [client, socket_path, 'tests.handlers', 'Task', '1', '2', '-3', '4']
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == 'steps step1_Raise,step2_Add'
    # Raise fails negative inputs; the others get x + 100 from the second step.
    assert lines[1:3] == ['result 101', 'result 102']
    assert lines[3].startswith('error the handler of step1_Raise failed: ') and 'negative input -3' in lines[3]
    assert lines[4] == 'result 104'


@pytest.mark.parametrize(
    ('answer', 'expected'),
    [
        (b'HTTP/1.1 200 OK\r\n\r\n' + b'x' * 40, 'is not an aqueduct flow server'),
        (b'AQFS\x00\x01' + bytes(22), 'speaks handshake version 1'),
        (b'AQFS\x00\x03\x00\x04' + bytes(12) + (1 << 30).to_bytes(4, 'big') + bytes(4), 'malformed handshake'),
        (b'AQFS\x00\x02' + bytes(22), 'speaks handshake version 2'),
        (b'AQFS', 'closed the connection during the handshake'),
    ],
)
async def test_the_rust_client_refuses_what_a_flow_server_does_not_send(tmp_path, answer, expected):
    client = await asyncio.to_thread(_remote_client)
    path = str(tmp_path / 'fake.sock')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(answer)

    fake = threading.Thread(target=serve_once, daemon=True)
    fake.start()
    try:
        done = await asyncio.to_thread(
            subprocess.run, [client, path, 'm', 'C', '1'], capture_output=True, text=True, timeout=60
        )
    finally:
        fake.join(10)
        listener.close()
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert expected in done.stdout, done.stdout


async def test_start_without_a_server_names_the_socket(tmp_path, monkeypatch):
    path = str(tmp_path / 'nobody.sock')
    monkeypatch.setenv('_SOCKET_PATH', path)
    monkeypatch.setenv('_SOCKET_CONNECT_TIMEOUT', '0.2')
    with pytest.raises(FlowError, match='no flow server at .*nobody.sock'):
        await SocketFlow().start()


async def test_calls_lost_to_a_stop_leave_no_reference_holding_their_tasks(socket_path, servers):
    """Every call the client answers 'lost' (stop(), a dead server) raises an exception of its
    own: one shared error would collect the tracebacks of all those calls, their frames and
    tasks (with their shared memory) for as long as the SocketFlow lives."""
    import gc
    import weakref

    client = SocketFlow()
    servers.append(client.preload(Flow(FlowStep(Sleep())), timeout=30))
    await client.start()
    tasks = [Task(i, sleep=2) for i in range(2)]
    alive = [weakref.ref(t) for t in tasks]
    errors = []

    async def call(task):
        try:
            await client.process([task], timeout_sec=60)
        except FlowError as exc:
            errors.append(type(exc))

    gc.collect()
    gc.disable()
    try:
        calls = [asyncio.ensure_future(call(t)) for t in tasks]
        del tasks
        await asyncio.sleep(0)  # one turn of the loop: both tasks are submitted
        await client.stop()
        await asyncio.wait_for(asyncio.gather(*calls), 10)
        del calls
        await asyncio.sleep(0)
        assert errors == [FlowError, FlowError]
        assert [a() for a in alive] == [None, None], 'the lost calls\' tasks are freed'
    finally:
        gc.enable()


def test_a_call_too_large_to_send_from_the_backlog_fails_alone(tmp_path):
    """A request that waited in the client's backlog (the request ring was full) and then finds
    no shared memory for its body fails with SharedMemoryExhaustedError; the calls behind it,
    and the client's event loop, go on."""
    with python_script(
        f"""
        import os
        os.environ['AQUEDUCT_SHM_POOL_SIZE'] = str(4 << 20)
        import asyncio
        from aqueduct import Flow, FlowStep
        from aqueduct.exceptions import FlowError
        from aqueduct.sockets import SocketFlow
        from tests.handlers import Sleep, Task
        async def main():
            client = SocketFlow(socket_path={str(tmp_path / 'flow.sock')!r})
            server = client.preload(Flow(FlowStep(Sleep()), queue_size=1), timeout=30)
            await client.start()
            async def call(task):
                try:
                    await client.process([task], timeout_sec=60)
                    return 'ok'
                except FlowError as exc:
                    return type(exc).__name__
            try:
                # ~60 KB bodies: a few fill the request ring, the rest wait in the backlog...
                ahead = [asyncio.ensure_future(call(Task(i, sleep=0.01, pad='x' * 60_000))) for i in range(40)]
                await asyncio.sleep(0)
                # ...then one larger than the whole pool, and small ones behind it.
                big = asyncio.ensure_future(call(Task(99, pad='y' * (16 << 20))))
                await asyncio.sleep(0)
                behind = [asyncio.ensure_future(call(Task(i))) for i in range(3)]
                got = await asyncio.wait_for(asyncio.gather(*ahead, big, *behind), 20)
                print(got.count('ok'), got[40], flush=True)
            finally:
                await client.stop()
                server.stop(timeout=10)
        asyncio.run(main())
        """
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError('the client did not finish') from None
        assert proc.returncode == 0
        assert out.split() == ['43', 'SharedMemoryExhaustedError']


async def test_a_cancelled_call_is_dropped_at_once_not_at_the_next_wake_up(socket_path, servers):
    """Cancelling a process() call tells the engine now: a task sent ahead to a busy worker is
    taken back before the worker gets to it (the cancel must not wait, unpublished, for this
    client's next flush)."""
    client = SocketFlow()
    servers.append(client.preload(Flow(FlowStep(Sleep())), timeout=30))  # one worker, batches of 1
    await client.start()
    try:
        running = asyncio.ensure_future(client.process([Task(1, sleep=1.0)], timeout_sec=30))
        behind = asyncio.ensure_future(client.process([Task(2)], timeout_sec=30))
        await asyncio.sleep(0)  # one turn of the loop: both submitted
        behind.cancel()
        assert (await asyncio.gather(behind, return_exceptions=True))[0].__class__ is asyncio.CancelledError
        await running
        after = Task(3)
        await client.process([after], timeout_sec=30)
        assert after.seen_so_far == [1, 3], 'the cancelled task never ran'
    finally:
        await client.stop()
