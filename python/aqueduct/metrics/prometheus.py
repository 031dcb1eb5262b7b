"""Prometheus exposition: a collector over one or more flows, and ``/metrics`` handlers for
aiohttp and ASGI apps (FastAPI, Starlette).

    from prometheus_client import CollectorRegistry
    from aqueduct.metrics.prometheus import FlowCollector, aiohttp_handler

    registry = CollectorRegistry()
    registry.register(FlowCollector(flow))
    app.router.add_get('/metrics', aiohttp_handler(registry))

Families (all labelled with ``flow`` and ``step``):

- ``aqueduct_handle_seconds`` (histogram): handler time per batch;
- ``aqueduct_transfer_seconds`` (histogram, ``from``, ``to``, ``priority``): time from a task
  being queued for a step until that step's worker has it, and from a worker's result until the
  main process has it;
- ``aqueduct_task_size_bytes`` (histogram, ``from``, ``to``);
- ``aqueduct_batch_size`` and ``aqueduct_batch_wait_seconds`` (histograms);
- ``aqueduct_tasks_total`` (counter, ``outcome``, ``priority``; no ``step`` label);
- ``aqueduct_queue_size``, ``aqueduct_processes_alive``, ``aqueduct_memory_bytes`` (gauges);
- ``aqueduct_worker_deaths_total``, ``aqueduct_worker_restarts_total`` (counters);
- ``aqueduct_streams_open`` (gauge), ``aqueduct_stream_parts_total`` (counter) and
  ``aqueduct_stream_first_part_seconds`` (histogram), by the streams' entry step.

Buckets are the engine's octave boundaries, from 16 µs to 64 s for times and from 1 KiB to
1 GiB for sizes, so the exposed counts are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, List, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ._flow import count_below

if TYPE_CHECKING:  # pragma: no cover
    pass

#: Octave bounds in microseconds (16 µs .. 64 s) and bytes (1 KiB .. 1 GiB).
TIME_BOUNDS_US = [1 << k for k in range(4, 27, 2)]
SIZE_BOUNDS = [1 << k for k in range(10, 31, 2)]
BATCH_BOUNDS = [1 << k for k in range(0, 11)]


def _buckets(hist: Tuple[List[int], int, int], bounds: List[int], scale: float) -> Tuple[list, float]:
    buckets, count, total = hist
    out = [(repr(b * scale), count_below(buckets, b)) for b in bounds]
    out.append(('+Inf', count))
    return out, total * scale


class FlowCollector:
    """A prometheus-client collector for ``flows`` (a flow, or ``{name: flow}``)."""

    def __init__(self, flows, name: str = 'flow'):
        self.flows = flows if isinstance(flows, dict) else {name: flows}

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterator:
        handle = HistogramMetricFamily('aqueduct_handle_seconds', 'Handler time per batch', labels=['flow', 'step'])
        transfer = HistogramMetricFamily(
            'aqueduct_transfer_seconds',
            'Time from a task being queued for a step to its worker having it, or from a result to the main process',
            labels=['flow', 'step', 'from', 'to', 'priority'],
        )
        size = HistogramMetricFamily(
            'aqueduct_task_size_bytes', 'Task size on the wire', labels=['flow', 'step', 'from', 'to']
        )
        batch = HistogramMetricFamily('aqueduct_batch_size', 'Tasks per batch', labels=['flow', 'step'])
        wait = HistogramMetricFamily(
            'aqueduct_batch_wait_seconds', 'How long the oldest task of a batch waited', labels=['flow', 'step']
        )
        tasks = CounterMetricFamily('aqueduct_tasks', 'Tasks by outcome', labels=['flow', 'outcome', 'priority'])
        queue = GaugeMetricFamily('aqueduct_queue_size', 'Tasks waiting for a step', labels=['flow', 'step'])
        alive = GaugeMetricFamily('aqueduct_processes_alive', 'Worker processes alive', labels=['flow', 'step'])
        memory = GaugeMetricFamily('aqueduct_memory_bytes', 'Resident memory of the workers', labels=['flow', 'step'])
        deaths = CounterMetricFamily('aqueduct_worker_deaths', 'Worker processes that died', labels=['flow', 'step'])
        restarts = CounterMetricFamily(
            'aqueduct_worker_restarts', 'Worker processes restarted', labels=['flow', 'step']
        )
        streams = GaugeMetricFamily(
            'aqueduct_streams_open', 'Streams (Flow.stream) not finished, by entry step', labels=['flow', 'step']
        )
        parts = CounterMetricFamily(
            'aqueduct_stream_parts', 'Partial results delivered to streams, by entry step', labels=['flow', 'step']
        )
        first_part = HistogramMetricFamily(
            'aqueduct_stream_first_part_seconds',
            "Time from a stream's submission to its first part",
            labels=['flow', 'step'],
        )
        for flow_name, flow in self.flows.items():
            snap = flow.metrics()
            for i, s in enumerate(snap['steps']):
                step = s['name']
                labels = [flow_name, step]
                if 'handle_us' in s:
                    handle.add_metric(labels, *_buckets(s['handle_us'], TIME_BOUNDS_US, 1e-6))
                    src = 'main_process' if i == 0 else snap['steps'][i - 1]['name']
                    transfer_in = _buckets(s['transfer_in_us'], TIME_BOUNDS_US, 1e-6)
                    transfer.add_metric([flow_name, step, src, step, ''], *transfer_in)
                    size.add_metric([flow_name, step, src, step], *_buckets(s['size_in'], SIZE_BOUNDS, 1))
                    batch.add_metric(labels, *_buckets(s['batch_size'], BATCH_BOUNDS, 1))
                    wait.add_metric(labels, *_buckets(s['batch_wait_us'], TIME_BOUNDS_US, 1e-6))
                    queue.add_metric(labels, s['queue_len'])
                alive.add_metric(labels, s['alive'])
                memory.add_metric(labels, snap['rss'].get(step, 0))
                deaths.add_metric(labels, s['deaths'])
                restarts.add_metric(labels, s['restarts'])
                if 'streams_open' in s:
                    streams.add_metric(labels, s['streams_open'])
                    parts.add_metric(labels, s['stream_parts'])
                    first_part.add_metric(labels, *_buckets(s['first_part_us'], TIME_BOUNDS_US, 1e-6))
            for src, dst, priority, th, sh in snap['routes']:
                transfer.add_metric([flow_name, src, src, dst, str(priority)], *_buckets(th, TIME_BOUNDS_US, 1e-6))
                size.add_metric([flow_name, src, src, dst], *_buckets(sh, SIZE_BOUNDS, 1))
            for priority, counts in snap['outcomes'].items():
                for outcome, n in counts.items():
                    tasks.add_metric([flow_name, outcome, str(priority)], n)
        yield from (handle, transfer, size, batch, wait, tasks, queue, alive, memory, deaths, restarts)
        yield from (streams, parts, first_part)


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def aiohttp_handler(registry: CollectorRegistry):
    """An aiohttp request handler serving ``registry`` in the Prometheus text format."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={'Content-Type': CONTENT_TYPE_LATEST})

    return metrics


def asgi_app(registry: CollectorRegistry):
    """An ASGI app serving ``registry``; mount it at ``/metrics`` in FastAPI or Starlette."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=registry)
