"""The web integrations tie a flow's life to the server's, as aqueduct 1.15 does:
``FLOW_START_TIMEOUT`` bounds the start, and a server whose flow has stopped for good stops
itself rather than keep accepting requests it cannot serve. Servers run as real processes on
127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from aqueduct import Flow, FlowStep

from .conftest import children
from .handlers import SlowStart
from .test_integrations import assert_all_gone, free_port, server_process

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parent

APPS = {
    'aiohttp': """
        from aiohttp import web
        from aqueduct.integrations.aiohttp import AppIntegrator

        async def pid(request):
            task = Task(1)
            await request.app['flow'].process(task)
            return web.json_response({'pid': task.pid})

        app = web.Application()
        app.router.add_get('/pid', pid)
        AppIntegrator(app, health_path='/healthz').add_flow(build_flow())
        web.run_app(app, host='127.0.0.1', port=PORT, print=None)
    """,
    'fastapi': """
        import uvicorn
        from fastapi import FastAPI, Request
        from aqueduct.integrations.fastapi import AppIntegrator

        app = FastAPI()

        @app.get('/pid')
        async def pid(request: Request):
            task = Task(1)
            await request.app.state.flow.process(task)
            return {'pid': task.pid}

        AppIntegrator(app, health_path='/healthz').add_flow(build_flow())
        uvicorn.run(app, host='127.0.0.1', port=PORT, log_level='warning')
    """,
}


def _script(framework: str, port: int) -> str:
    head = f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from handlers import Add, Task
        from aqueduct import Flow, FlowStep, RestartPolicy

        PORT = {port}

        def build_flow():
            # No replacement for a dead worker: its death stops the flow for good.
            return Flow(FlowStep(Add()), restart_policy=RestartPolicy(max_restarts=0))
    """
    return textwrap.dedent(head) + textwrap.dedent(APPS[framework])


@pytest.mark.parametrize('framework', ['aiohttp', 'fastapi'])
def test_flow_start_timeout_bounds_add_flow(framework, monkeypatch):
    if framework == 'aiohttp':
        from aiohttp import web
        from aqueduct.integrations.aiohttp import AppIntegrator

        app = web.Application()
    else:
        from aqueduct.integrations.fastapi import AppIntegrator
        from fastapi import FastAPI

        app = FastAPI()
    monkeypatch.setenv('FLOW_START_TIMEOUT', '0.5')
    with pytest.raises(TimeoutError):
        AppIntegrator(app).add_flow(Flow(FlowStep(SlowStart(delay=30))))
    assert children() == []


async def test_healthz_answers_503_until_the_flow_is_ready():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from aqueduct.integrations.aiohttp import AppIntegrator

    from .handlers import Add

    app = web.Application()
    flow = Flow(Add())
    # Started by hand below; exit_on_fail would stop this process over a flow not yet running.
    AppIntegrator(app, exit_on_fail=False, health_path='/healthz').add_flow(flow, with_start=False)
    async with TestClient(TestServer(app)) as client:
        response = await client.get('/healthz')
        assert response.status == 503
        assert (await response.json())['flow']['ready'] is False
        flow.start(timeout=30)
        try:
            response = await client.get('/healthz')
            assert response.status == 200
            report = (await response.json())['flow']
            assert report['ready'] is True and report['steps'][0]['alive'] == 1
        finally:
            await flow.stop()
    assert children() == []


@pytest.mark.parametrize('framework', ['aiohttp', 'fastapi'])
def test_a_server_stops_itself_when_its_flow_stops_for_good(framework, tmp_path):
    port = free_port()
    script = tmp_path / 'app.py'
    script.write_text(_script(framework, port))
    with server_process([sys.executable, str(script)], port) as server:
        with urllib.request.urlopen(server.base + '/pid', timeout=10) as response:
            worker = json.load(response)['pid']
        processes = server.family()
        assert worker in [p.pid for p in processes]
        os.kill(worker, signal.SIGKILL)
        # The flow stops (no restarts allowed), and the server stops on its own, cleanly.
        code, log = server.wait_exit()
        # aiohttp exits with 0 after a SIGTERM; uvicorn shuts down gracefully, then re-raises the
        # signal it got, as it does under any SIGTERM.
        expected = 0 if framework == 'aiohttp' else -signal.SIGTERM
        assert code == expected, f'exit code {code}: {log[-3000:]}'
        assert f'The process {worker} for Add handler is dead' in log
        assert 'Flow flow is not running, application will be stopped' in log
        assert_all_gone(processes)
