"""The rest of aqueduct 1.15's public surface: its other modules and names, each either working
as in 1.15 or, for its engine's internals, importable and refusing use with a clear error (see
docs/migrating.md)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import time

import pytest
from aqueduct import Flow, FlowState, FlowStep, RestartPolicy
from aqueduct.exceptions import FlowError, HandlerError, NotSupportedError
from aqueduct.logger import log

from .conftest import children
from .handlers import Add, Raise, Task

#: Every module of aqueduct 1.15 beyond the core ones, and the names in it that code used.
NAMES_OF_115 = {
    'aqueduct.multiprocessing': [
        'ProcessContext', 'ProcessException', 'ProcessExitedException', 'ProcessRaisedException', 'start_processes',
    ],
    'aqueduct.queues': ['FlowStepQueue', 'select_next_queue'],
    'aqueduct.utils': ['get_env_with_prefix'],
    'aqueduct.worker': ['Worker', 'MAX_SPIN_ITERATIONS'],
    'aqueduct.sockets.connection_pool': [
        'OpenConnectionError', 'SocketConnectionPool', 'SocketServerError', 'SOCKET_ERROR', 'FLOW_ERROR',
    ],
    'aqueduct.sockets.protocol': ['SocketProtocol', 'SocketResponse'],
    'aqueduct.sockets.flow': ['SocketFlow', 'get_env_with_prefix'],
    'aqueduct.sockets.flow_server': ['FlowSocketServer', 'FLOW_ERROR', 'SOCKET_ERROR'],
    'aqueduct.integrations.zero': ['BaseFlowClient'],
    'aqueduct.integrations.aiohttp': [
        'AQUEDUCT_FLOW_NAMES', 'FLOW_NAME', 'FLOWS_OBSERVER', 'FLOW_START_TIMEOUT_NAME', 'FLOW_START_TIMEOUT_DEFAULT',
        'AppIntegrator', 'get_start_timeout', 'observe_flows', 'run_flows_observer', 'stop_flows',
        'stop_flows_observer',
    ],
    'aqueduct.integrations.fastapi': ['AQUEDUCT_FLOW_NAMES', 'FLOW_NAME', 'AppIntegrator', 'get_flow', 'observe_flows'],
    'aqueduct.integrations.utils': ['FLOW_START_TIMEOUT_NAME', 'FLOW_START_TIMEOUT_DEFAULT', 'get_start_timeout'],
    'aqueduct.logger': ['LOGGER_NAME', 'ch', 'formatter', 'log', 'replace_logger'],
}  # fmt: skip


@pytest.mark.parametrize('module', sorted(NAMES_OF_115))
def test_every_module_and_name_of_115_imports(module):
    mod = importlib.import_module(module)
    missing = [name for name in NAMES_OF_115[module] if not hasattr(mod, name)]
    assert not missing


@pytest.mark.parametrize(
    'use, replacement',
    [
        (lambda: importlib.import_module('aqueduct.worker').Worker([], None, 1, 0, None, None, 1), 'batch_size'),
        (lambda: importlib.import_module('aqueduct.queues').FlowStepQueue(None, bool), 'handle_condition'),
        (lambda: importlib.import_module('aqueduct.queues').select_next_queue([], Task()), 'handle_condition'),
    ],
    ids=['Worker', 'FlowStepQueue', 'select_next_queue'],
)
def test_the_115_engines_internals_refuse_use_and_name_the_replacement(use, replacement):
    with pytest.raises(NotSupportedError, match=replacement) as caught:
        use()
    assert isinstance(caught.value, NotImplementedError)
    assert "aqueduct 1.15's engine" in str(caught.value)


def test_the_stand_ins_can_still_be_named_and_subclassed():
    from aqueduct.queues import FlowStepQueue
    from aqueduct.worker import Worker

    class Mine(Worker):
        pass

    assert not isinstance(object(), FlowStepQueue)
    assert Worker.__module__ == 'aqueduct.worker' and Mine.__mro__[1] is Worker


def test_the_loggers_handler_and_formatter_have_their_115_names():
    from aqueduct.logger import ch, formatter

    assert ch in log.handlers and ch.formatter is formatter
    record = logging.LogRecord('aqueduct', logging.INFO, __file__, 1, 'hello', None, None)
    assert formatter.format(record).endswith(f'INFO [Flow] [pid:{os.getpid()}] hello')


def test_get_env_with_prefix():
    from aqueduct.utils import get_env_with_prefix

    assert get_env_with_prefix('detector', 'SOCKET_PATH') == 'detector_SOCKET_PATH'
    assert get_env_with_prefix('', 'SOCKET_PATH') == '_SOCKET_PATH'


# ---------------------------------------------------------------------- Flow._contexts


async def test_contexts_show_the_real_workers_per_handler(make_flow):
    first, second = Add(), Raise()
    flow = make_flow(FlowStep(first, nprocs=2), second)
    contexts = flow._contexts
    assert list(contexts) == [first, second]
    pids = [p.pid for c in contexts.values() for p in c.processes]
    assert sorted(pids) == sorted(w.pid for w in flow.view.workers())
    assert contexts[first].pids() == [p.pid for p in contexts[first].processes]
    assert all(p.is_alive() and p.exitcode is None for c in contexts.values() for p in c.processes)
    with pytest.raises(TypeError):
        contexts[first] = None  # a view, not the flow's state


async def test_a_worker_terminated_through_contexts_is_replaced(make_flow):
    flow = make_flow(Add())
    (context,) = flow._contexts.values()
    process = context.processes[0]
    process.terminate()
    process.join(10)
    assert not process.is_alive()
    task = Task(1)
    await flow.process(task, timeout_sec=10)  # served by the replacement
    (replacement,) = next(iter(flow._contexts.values())).processes
    assert replacement.pid != process.pid and replacement.pid == task.pid
    assert process.exitcode == -signal.SIGTERM
    assert flow.state is FlowState.RUNNING


async def test_with_no_restarts_a_terminated_worker_stops_the_flow_as_in_115(make_flow, caplog):
    flow = make_flow(Add(), restart_policy=RestartPolicy(max_restarts=0))
    process = next(iter(flow._contexts.values())).processes[0]
    process.kill()
    for _ in range(100):
        if flow.state is FlowState.STOPPED:
            break
        await asyncio.sleep(0.05)
    assert flow.state is FlowState.STOPPED
    assert f'The process {process.pid} for Add handler is dead' in caplog.text
    assert process.exitcode == -signal.SIGKILL and not process.is_alive()
    assert dict(flow._contexts) == {}


# ---------------------------------------------------------------------- handler errors


@pytest.mark.parametrize('stop', [False, True])
async def test_a_handler_error_stops_the_flow_only_when_the_policy_says_so(stop, make_flow):
    flow = make_flow(Raise(), restart_policy=RestartPolicy(stop_on_handler_error=stop))
    with pytest.raises(HandlerError):
        await flow.process(Task(-1))
    if stop:
        await asyncio.wait_for(flow.wait_stopped(), 20)
        assert flow.state is FlowState.STOPPED
    else:
        ok = Task(1)
        await flow.process(ok)  # still serving
        assert flow.state is FlowState.RUNNING


# ---------------------------------------------------------------------- start_processes


def _write_index(index: int, directory: str) -> None:
    with open(os.path.join(directory, str(index)), 'w') as f:
        f.write(str(os.getpid()))


def _fail(index: int) -> None:
    raise ValueError(f'process {index} failed')


def _exit_with(index: int, code: int) -> None:
    os._exit(code)


def test_start_processes_runs_the_function_in_each_process(tmp_path):
    from aqueduct.multiprocessing import start_processes

    assert start_processes(_write_index, args=(str(tmp_path),), nprocs=3, start_method='fork') is None
    pids = {(tmp_path / str(i)).read_text() for i in range(3)}
    assert len(pids) == 3 and str(os.getpid()) not in pids


def test_start_processes_raises_the_childs_error_with_its_traceback():
    from aqueduct.multiprocessing import ProcessRaisedException, start_processes

    with pytest.raises(ProcessRaisedException, match='process 0 failed') as caught:
        start_processes(_fail, start_method='fork')
    assert 'Traceback' in str(caught.value) and caught.value.error_index == 0


def test_a_context_reports_an_exit_code():
    from aqueduct.multiprocessing import ProcessContext, ProcessExitedException, start_processes

    context = start_processes(_exit_with, args=(3,), join=False, start_method='fork')
    assert isinstance(context, ProcessContext) and len(context.pids()) == 1
    with pytest.raises(ProcessExitedException, match='exit code 3') as caught:
        while not context.join(10):
            pass
    assert caught.value.exit_code == 3
    assert context.join_all(1)
    context.close()


# ---------------------------------------------------------------------- sockets




async def test_the_connection_pool_sends_a_batch_and_returns_it_processed(socket_path, servers):
    from aqueduct.sockets import SocketFlow
    from aqueduct.sockets.connection_pool import SocketConnectionPool

    servers.append(SocketFlow().preload(Flow(Raise(), FlowStep(Add(10))), timeout=30))
    pool = SocketConnectionPool(socket_path=socket_path, connect_timeout_sec=5)
    await pool.init()
    batch = [Task(1), Task(2)]
    assert await pool.handle(batch) is batch
    assert [t.result for t in batch] == [11, 12]
    with pytest.raises(HandlerError, match='negative input'):
        await pool.handle([Task(-20)])  # not retried: the flow's failure, not the connection's
    await pool.close()


async def test_the_connection_pool_without_a_server_fails_to_connect(tmp_path):
    from aqueduct.sockets.connection_pool import OpenConnectionError, SocketConnectionPool

    pool = SocketConnectionPool(socket_path=str(tmp_path / 'none.sock'), connection_retries=2)
    await pool.init()  # as in 1.15: it connects later
    started = time.monotonic()
    with pytest.raises(OpenConnectionError, match='none.sock'):
        await pool.handle([Task(1)])
    assert time.monotonic() - started < 5
    assert isinstance(OpenConnectionError('x'), FlowError)


async def test_a_flow_server_started_with_start_processes_serves_the_pool(tmp_path):
    """aqueduct 1.15's way: init_processes, then FlowSocketServer.start in a process of its own."""
    from aqueduct.multiprocessing import start_processes
    from aqueduct.sockets.connection_pool import SocketConnectionPool
    from aqueduct.sockets.flow_server import FlowSocketServer

    path = str(tmp_path / 'flow.sock')
    flow = Flow(FlowStep(Add(5)))
    flow.init_processes(timeout=30)
    server = FlowSocketServer(flow, socket_path=path)
    context = start_processes(server.start, join=False, daemon=True, start_method='fork')
    pool = SocketConnectionPool(socket_path=path, connect_timeout_sec=10)
    try:
        (task,) = await pool.handle([Task(1)])
        assert task.result == 6
    finally:
        await pool.close()
        for process in context.processes:
            process.terminate()
            process.join(30)
        await flow.stop(graceful=False)
    assert children() == []


def test_flow_socket_server_keeps_115s_payload_bound_and_error_names():
    from aqueduct.sockets.flow_server import FLOW_ERROR, SOCKET_ERROR, FlowSocketServer
    from aqueduct.sockets.protocol import SocketProtocol, SocketResponse

    assert issubclass(FlowSocketServer, SocketProtocol)
    assert FlowSocketServer.max_payload_bytes == 16 * 1024 * 1024
    assert (FLOW_ERROR, SOCKET_ERROR) == ('flow_error', 'socket_error')
    assert SocketResponse(error=FLOW_ERROR).result == []


async def test_the_protocols_framing_round_trips_and_bounds_payloads():
    from aqueduct.sockets.protocol import SocketProtocol

    class Small(SocketProtocol):
        max_payload_bytes = 8

    class Sink:
        def __init__(self):
            self.data = b''

        def write(self, data):
            self.data += data

        async def drain(self):
            pass

    sink = Sink()
    await Small()._write_msg(sink, b'hello')
    reader = asyncio.StreamReader()
    reader.feed_data(sink.data + (9).to_bytes(4, 'big'))
    assert await Small()._read_msg(reader) == b'hello'
    with pytest.raises(ValueError, match='Payload too large'):
        await Small()._read_msg(reader)
    with pytest.raises(ValueError, match='Payload too large'):
        await Small()._write_msg(sink, b'123456789')


async def test_base_flow_client_connects_its_named_socket_flow(tmp_path, monkeypatch, servers):
    from aqueduct.integrations.zero import BaseFlowClient
    from aqueduct.sockets import SocketFlow

    monkeypatch.setenv('adder_SOCKET_PATH', str(tmp_path / 'adder.sock'))

    class Adder(BaseFlowClient):
        _name = 'adder'

        async def process(self, x: int) -> int:
            task = Task(x)
            await self._flow.process([task], timeout_sec=10)
            return task.result

    with pytest.raises(TypeError):
        BaseFlowClient()  # process() is for the subclass to write
    servers.append(SocketFlow('adder').preload(Flow(Add(100)), timeout=30))
    client = Adder()
    await client.connect()
    assert await client.process(1) == 101
    await client.disconnect()
    assert not client._flow.is_running


# ---------------------------------------------------------------------- web integrations


class _Sigterm:
    """Records a SIGTERM this process sends itself, instead of dying of it."""

    def __enter__(self):
        self.received = asyncio.get_running_loop().create_future()
        self._previous = signal.signal(signal.SIGTERM, lambda *_: self.received.done() or self.received.set_result(1))
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


# 1.15's apps keep flows under string keys; aiohttp recommends AppKeys, and says so.
@pytest.mark.filterwarnings('ignore::aiohttp.web_exceptions.NotAppKeyWarning')
async def test_aiohttp_hooks_wired_by_hand_as_in_115():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from aqueduct.integrations.aiohttp import (
        AQUEDUCT_FLOW_NAMES,
        run_flows_observer,
        stop_flows,
        stop_flows_observer,
    )

    async def add(request: web.Request) -> web.Response:
        task = Task(1)
        await request.app['flow'].process(task, timeout_sec=10)
        return web.json_response({'result': task.result, 'pid': task.pid})

    flow = Flow(Add(), restart_policy=RestartPolicy(max_restarts=0))
    flow.start(timeout=30)
    app = web.Application()
    app[AQUEDUCT_FLOW_NAMES] = ['flow']
    app['flow'] = flow
    app.on_startup.append(run_flows_observer)
    app.on_shutdown.append(stop_flows_observer)
    app.on_shutdown.append(stop_flows)
    app.router.add_get('/add', add)
    try:
        with _Sigterm() as sigterm:
            async with TestClient(TestServer(app)) as client:
                answer = await (await client.get('/add')).json()
                assert answer['result'] == 2
                os.kill(answer['pid'], signal.SIGKILL)  # the flow stops for good: the app must go
                await asyncio.wait_for(sigterm.received, 10)
    finally:
        await flow.stop(graceful=False)
    assert flow.state is FlowState.STOPPED
    assert children() == []


async def test_aiohttp_stop_flows_stops_every_flow_of_the_app():
    from aiohttp import web
    from aqueduct.integrations.aiohttp import AppIntegrator, stop_flows

    app = web.Application()
    integrator = AppIntegrator(app, exit_on_fail=False)
    integrator.add_flow(Flow(Add()), 'one')
    integrator.add_flow(Flow(Add()), 'two')
    await stop_flows(app)
    assert not app['one'].is_running and not app['two'].is_running
    assert children() == []


async def test_fastapi_names_its_flows_in_app_state_and_observes_them():
    from aqueduct.integrations.fastapi import AQUEDUCT_FLOW_NAMES, AppIntegrator, observe_flows
    from fastapi import FastAPI

    app = FastAPI()
    integrator = AppIntegrator(app, exit_on_fail=False)
    integrator.add_flow(Flow(Add()), with_start=False)
    assert getattr(app.state, AQUEDUCT_FLOW_NAMES) == ['flow']
    with pytest.raises(RuntimeError, match='only once'):
        AppIntegrator(app)
    with _Sigterm() as sigterm:
        await asyncio.wait_for(observe_flows({'flow': app.state.flow}), 10)  # never started: not running
        await asyncio.wait_for(sigterm.received, 10)
