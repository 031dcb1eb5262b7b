"""Metrics: StatsD names and values as in 1.15, Prometheus over HTTP, the stats socket and top."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import pytest
from aqueduct import FlowStep, top
from aqueduct.exceptions import FlowError, WorkerDiedError
from aqueduct.logger import log
from aqueduct.metrics.prometheus import FlowCollector, aiohttp_handler, asgi_app
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from .fake_statsd import FakeStatsD
from .handlers import Add, Die, Nap, RaiseOdd, Task


async def test_statsd_names_and_values_are_those_of_aqueduct_1_15(make_flow):
    statsd = FakeStatsD()
    exporter = statsd.exporter(export_period=0.05, prefix='app')
    flow = make_flow(FlowStep(Nap(), batch_size=4, batch_timeout=0.01), FlowStep(RaiseOdd()), metrics_exporter=exporter)
    tasks = [Task(2 * i) for i in range(20)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    with pytest.raises(FlowError):
        await flow.process(Task(1))
    with pytest.raises(FlowError, match='[Tt]imeout'):
        await flow.process(Task(0), timeout_sec=0.002)  # less than the 10 ms handler
    cancelled = asyncio.ensure_future(flow.process(Task(4)))
    await asyncio.sleep(0)  # one pass of the loop: the call is submitted
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await statsd.exported()
    timings, counts = statsd.names('timing'), statsd.names('count')
    assert {
        'aqueduct.app.handle_time.step1_Nap',
        'aqueduct.app.handle_time.step2_RaiseOdd',
        'aqueduct.app.transfer_time.from_main_process_to_step1_Nap',
        'aqueduct.app.transfer_time.from_step1_Nap_to_step2_RaiseOdd',
        'aqueduct.app.transfer_time.from_step2_RaiseOdd_to_main_process',
        'aqueduct.app.task_size.from_main_process_to_step1_Nap',
        'aqueduct.app.batch_time.step1_Nap',
        'aqueduct.app.batch_size.step1_Nap',
        'aqueduct.app.qsize.from_main_process_to_step1_Nap',
        'aqueduct.app.qsize.from_step2_RaiseOdd_to_main_process',
        'aqueduct.app.memory_usage.step0_Nap',  # 1.15 numbers steps from 0 in these names
        'aqueduct.app.memory_usage.step1_RaiseOdd',
        'aqueduct.app.handle_time.total',
        'aqueduct.app.memory_usage.all_memory_usage',
    } <= timings
    assert 'aqueduct.app.batch_size.step2_RaiseOdd' not in timings, '1.15 records batches only for batch_size > 1'
    assert all(ms >= 10 for ms in statsd.calls[('timing', 'aqueduct.app.handle_time.step1_Nap')]), 'milliseconds'
    assert max(statsd.calls[('timing', 'aqueduct.app.batch_size.step1_Nap')]) == 4
    assert sum(statsd.calls[('count', 'aqueduct.app.tasks.complete')]) == 20
    assert sum(statsd.calls[('count', 'aqueduct.app.tasks.error')]) == 1
    assert sum(statsd.calls[('count', 'aqueduct.app.tasks.timeout')]) == 1
    assert sum(statsd.calls[('count', 'aqueduct.app.tasks.cancel')]) == 1
    assert 'aqueduct.app.processes.running' in counts


async def test_deaths_and_restarts_are_counted(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(Die(), metrics_exporter=statsd.exporter(export_period=0.05))
    with pytest.raises(WorkerDiedError):
        await flow.process(Task(0, die='kill'), timeout_sec=20)
    await flow.process(Task(1), timeout_sec=20)
    await statsd.exported()
    assert sum(statsd.calls[('count', 'aqueduct.processes.dead')]) == 1
    assert sum(statsd.calls[('count', 'aqueduct.processes.restarted')]) == 1


async def test_disabled_metrics_record_and_export_nothing(make_flow):
    statsd = FakeStatsD()
    flow = make_flow(Add(), metrics_enabled=False, metrics_exporter=statsd.exporter(export_period=0.05))
    await asyncio.gather(*(flow.process(Task(i)) for i in range(10)))
    await asyncio.sleep(0.15)
    assert not statsd.calls
    assert flow.metrics()['steps'][0]['handle_us'][1] == 0


async def test_prometheus_scrape_from_a_real_server(make_flow):
    from aiohttp import ClientSession, web

    flow = make_flow(FlowStep(Nap(), batch_size=2), Add())
    registry = CollectorRegistry()
    registry.register(FlowCollector(flow, name='demo'))
    app = web.Application()
    app.router.add_get('/metrics', aiohttp_handler(registry))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        await asyncio.gather(*(flow.process(Task(i)) for i in range(12)))
        async with ClientSession() as session:
            async with session.get(f'http://127.0.0.1:{port}/metrics') as response:
                assert response.status == 200
                assert response.headers['Content-Type'].startswith('text/plain')
                text = await response.text()
    finally:
        await runner.cleanup()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    complete = samples[('aqueduct_tasks_total', (('flow', 'demo'), ('outcome', 'complete'), ('priority', '0')))]
    assert complete == 12
    handle_count = samples[('aqueduct_handle_seconds_count', (('flow', 'demo'), ('step', 'step1_Nap')))]
    assert 6 <= handle_count <= 12, 'one sample per batch'
    slow = samples[('aqueduct_handle_seconds_bucket', (('flow', 'demo'), ('le', '0.004096'), ('step', 'step1_Nap')))]
    assert slow == 0, 'no batch of a 10 ms handler took under 4 ms'
    assert samples[('aqueduct_processes_alive', (('flow', 'demo'), ('step', 'step2_Add')))] == 1
    assert samples[('aqueduct_memory_bytes', (('flow', 'demo'), ('step', 'step1_Nap')))] > 1 << 20


async def test_the_asgi_app_serves_the_same_exposition(make_flow):
    flow = make_flow(Add())
    await flow.process(Task(1))
    registry = CollectorRegistry()
    registry.register(FlowCollector(flow))
    app = asgi_app(registry)
    sent = []

    async def receive():
        return {'type': 'http.request', 'body': b'', 'more_body': False}

    async def send(message):
        sent.append(message)

    scope = {'type': 'http', 'method': 'GET', 'path': '/metrics', 'query_string': b'', 'headers': []}
    await app(scope, receive, send)
    assert sent[0]['status'] == 200
    body = b''.join(m.get('body', b'') for m in sent[1:]).decode()
    assert 'aqueduct_tasks_total{flow="flow",outcome="complete",priority="0"} 1.0' in body


async def test_top_shows_the_flow_from_its_stats_socket(make_flow, tmp_path, caplog):
    path = str(tmp_path / 'stats.sock')
    with caplog.at_level(logging.INFO, logger=log.name):
        flow = make_flow(FlowStep(Nap(), nprocs=2), stats_socket=path)
    assert f'Flow stats at {path} (python -m aqueduct top {path})' in caplog.text
    loop = asyncio.get_running_loop()
    # The socket is served by this loop: read it from another thread.
    before = await loop.run_in_executor(None, top.read_snapshot, path)
    for i in range(10):  # one at a time: ten batches of one
        await flow.process(Task(i))
    after = await loop.run_in_executor(None, top.read_snapshot, path)
    row = next(line for line in top.render(after, before, dt=2.0).splitlines() if line.startswith('step1_Nap'))
    procs, queue, held, rate, p50, p50_unit, p99, p99_unit, batch = row.split()[1:10]
    assert (procs, queue, held, rate, batch) == ('2/2', '0', '0', '5', '1.0'), row  # 10 tasks in 2 s
    assert p50_unit == p99_unit == 'ms' and 10 <= float(p50) <= float(p99), row  # the 10 ms nap

    def run_top():
        return subprocess.run(
            [sys.executable, '-m', 'aqueduct', 'top', path, '--once', '--interval', '0.1'],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    done = await loop.run_in_executor(None, run_top)
    assert done.returncode == 0, done.stderr
    assert 'step1_Nap' in done.stdout and '2/2' in done.stdout and 'complete 10' in done.stdout
    assert os.path.exists(path)
    await flow.stop()
    assert not os.path.exists(path), 'the socket goes with the flow'


def test_top_without_a_flow_says_so(tmp_path):
    assert top.main([str(tmp_path / 'none.sock'), '--once']) == 1
